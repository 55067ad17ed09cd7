#!/bin/bash
# Device call 3 (fresh machine; #16): where the fixed cost of a small TTT chunk step goes. The
# chunk-step grid at 2 and 64 documents x 32 and 2,048 tokens, with a kernel profile of each
# shape (its eager step: the same kernels a graph replays) and the launch tables.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=/root/site
python3 tools/bench_ttt.py --batches 2,64 --contexts 32,2048 --steps 8 --profile-steps 2 --top 40 \
  --show-launches --no-e2e --out $OUT/bench_ttt_profile.json > $OUT/bench_ttt_profile.console.txt 2>&1
tail -30 $OUT/bench_ttt_profile.console.txt | cut -c1-160

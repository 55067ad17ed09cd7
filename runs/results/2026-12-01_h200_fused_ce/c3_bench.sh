#!/bin/bash
# call 3: after the A/B, the training benchmark alone on the GPU (attention: torch varlen_attn, no FA4 wheels this session)
. runs/results/2026-12-01_h200_fused_ce/env.sh
pkill -f "[t]rain_gpt.py"; sleep 2
python3 tools/bench_train.py --data-dir /root/data --steps 5 --profile --out $OUT/bench_train.json 2>&1 | tee $OUT/bench_train.console.txt

#!/bin/bash
# usage: poll.sh SECONDS -- until chain.sh is done (or SECONDS pass, or it has ended), then packs
# /root/res and the trios' logs into $OUT/results.tgz and prints the milestones.
LIMIT=$1; t0=$(date +%s)
while [ $(( $(date +%s) - t0 )) -lt $LIMIT ] && ! grep -q "chain done" /root/res/stages.txt 2>/dev/null \
    && pgrep -f "[c]hain.sh" > /dev/null; do sleep 5; done
RUNS="nope_s0 nominlr_s0 notaper_s0 nosparse_s0 qk50_s0 lr022_s0 wd85_s0 b2_99_s0 wd85b2_s0 capneg20_s0 wdmlp05_s0 wdmlp2_s0"
bash tools/device/collect.sh $RUNS
cat /root/res/stages.txt
for n in $RUNS; do [ -f /root/runs/$n.out ] && { echo "== $n"; grep -E "^error|live_val_bpb|ema_select|prequant|^step:[0-9]+/" /root/runs/$n.out | tail -3; }; done
for f in /root/res/bench_*.console.txt /root/res/same_math_qkv.console.txt; do [ -f $f ] && { echo "== $f"; tail -6 $f | cut -c1-400; }; done
nvidia-smi --query-gpu=memory.used --format=csv,noheader

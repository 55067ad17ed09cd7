#!/bin/bash
# usage: poll_chain.sh SECONDS NAME... -- for a detached driver (a runs/results/*/chain.sh that writes
# /root/res/stages.txt): wait until it has written "chain done", has ended, or SECONDS have passed;
# then pack /root/res and the named runs' logs into $OUT/results.tgz (collect.sh) and print the
# stages, each run's milestones and the tail of every benchmark or same-math console.
LIMIT=$1; shift; t0=$(date +%s)
while [ $(( $(date +%s) - t0 )) -lt $LIMIT ] && ! grep -q "chain done" /root/res/stages.txt 2>/dev/null \
    && pgrep -f "[c]hain.sh" > /dev/null; do sleep 5; done
bash "$(dirname "$0")/collect.sh" "$@"
cat /root/res/stages.txt
for n in "$@"; do [ -f /root/runs/$n.out ] && { echo "== $n"
  grep -E "^error|warmup_and|train_done|ema_select|prequant|^step:[0-9]+/" /root/runs/$n.out | tail -4; }; done
for f in /root/res/bench_*.console.txt /root/res/same_math_*.console.txt; do [ -f $f ] && { echo "== $f"; tail -6 $f | cut -c1-400; }; done
nvidia-smi --query-gpu=memory.used --format=csv,noheader

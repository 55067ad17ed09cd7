#!/bin/bash
# usage: poll.sh SECONDS -- waits until the A/B runs have their pre-quantization score (or SECONDS
# pass), copying the benchmarks' and runs' logs into $OUT; stops each run after its prequant line.
LIMIT=$1; t0=$(date +%s); R="base_s0 gate_s0 nosmear_s0"
while [ $(( $(date +%s) - t0 )) -lt $LIMIT ]; do
  grep -q "ab started" /root/out/stages.txt 2>/dev/null && break; sleep 5
done
left=$(( LIMIT - ($(date +%s) - t0) )); [ $left -lt 5 ] && left=5
bash tools/device/wait_for.sh $left prequant $R
for n in $R; do grep -q prequant /root/runs/$n.out 2>/dev/null && pkill -f "[s]nap/$n/train_gpt" ; done
cp /root/out/* $OUT/ 2>/dev/null
cat /root/out/stages.txt; for f in /root/out/bench_*.console.txt; do echo "== $f"; tail -25 $f; done

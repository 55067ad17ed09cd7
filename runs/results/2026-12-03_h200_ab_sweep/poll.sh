#!/bin/bash
# usage: poll.sh SECONDS -- until chain.sh has written "chain done" (or SECONDS pass, or the chain has
# ended), copying /root/out and the A/B runs' logs into $OUT; prints the stages and the latest lines.
LIMIT=$1; t0=$(date +%s)
while [ $(( $(date +%s) - t0 )) -lt $LIMIT ] && ! grep -q "chain done" /root/out/stages.txt 2>/dev/null \
    && pgrep -f "[c]hain.sh" > /dev/null; do sleep 5; done
for n in base_s0 gate_s0 nosmear_s0; do cp /root/runs/$n.out $OUT/$n.console.txt 2>/dev/null; cp /root/runs/$n/train.log $OUT/$n.train.log 2>/dev/null; done
cp /root/out/* $OUT/ 2>/dev/null
cat /root/out/stages.txt
for f in /root/out/bench_*.console.txt /root/out/same_math_qkv.console.txt; do [ -f $f ] && { echo "== $f"; tail -12 $f; }; done
for n in base_s0 gate_s0 nosmear_s0; do echo "== $n"; grep -E "^error|Error|warmup_and|val_bpb|prequant|ema_select|^step:[0-9]+/" /root/runs/$n.out 2>/dev/null | tail -4; done
tail -8 /root/out/quant_sweep.console.txt 2>/dev/null
nvidia-smi --query-gpu=memory.used --format=csv,noheader

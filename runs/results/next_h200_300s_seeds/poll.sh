#!/bin/bash
# usage: poll.sh SECONDS -- until chain.sh is done (or SECONDS pass, or it has ended), then copies
# /root/out and the running run's console into $OUT and prints each run's milestones.
LIMIT=$1; t0=$(date +%s)
while [ $(( $(date +%s) - t0 )) -lt $LIMIT ] && ! grep -q "chain done" /root/out/stages.txt 2>/dev/null \
    && pgrep -f "[c]hain.sh" > /dev/null; do sleep 5; done
for n in new_s0 new_s1 old_s1; do cp /root/runs/$n.out $OUT/$n.console.txt 2>/dev/null; done
cp /root/out/* $OUT/ 2>/dev/null
cat /root/out/stages.txt
for n in new_s0 new_s1 old_s1; do echo "== $n"; grep -E "warmup_and|train_done|ema_select|prequant|^error" /root/runs/$n.out 2>/dev/null | tail -4; done

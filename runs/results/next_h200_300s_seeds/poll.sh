#!/bin/bash
# usage: poll.sh SECONDS -- until chain.sh is done (or SECONDS pass, or it has ended), then packs
# /root/res and the runs' logs into $OUT/results.tgz (tools/device/collect.sh) and prints each run's milestones.
LIMIT=$1; t0=$(date +%s)
while [ $(( $(date +%s) - t0 )) -lt $LIMIT ] && ! grep -q "chain done" /root/res/stages.txt 2>/dev/null \
    && pgrep -f "[c]hain.sh" > /dev/null; do sleep 5; done
bash tools/device/collect.sh new_s0 new_s1 old_s1
cat /root/res/stages.txt
for n in new_s0 new_s1 old_s1; do echo "== $n"; grep -E "warmup_and|train_done|ema_select|prequant|^error|^step:[0-9]+/" /root/runs/$n.out 2>/dev/null | tail -4; done

#!/bin/bash
# usage: poll_pipeline.sh NAME SECONDS -- follows a pipeline.sh chain for up to SECONDS (stopping
# early when it is done or has ended), copying its logs and results into $OUT every 10 s, then prints
# its stages and milestones. Call it back to back: the machine goes back 30 s after a call ends.
set -u
NAME=$1; LIMIT=$2; t0=$(date +%s)
copy() {
  for f in $NAME.out $NAME.quant.out $NAME.ttt.out $NAME.stages $NAME.chain.out; do
    cp /root/runs/$f $OUT/$f.txt 2>/dev/null; done
  for f in quant.json ttt.json train.log summary.json; do cp /root/runs/$NAME/$f $OUT/$NAME.$f 2>/dev/null; done
}
while [ $(( $(date +%s) - t0 )) -lt $LIMIT ]; do
  copy
  grep -q "pipeline_done\|failed" /root/runs/$NAME.stages 2>/dev/null && break
  kill -0 "$(cat /root/runs/$NAME.pid)" 2>/dev/null || break
  sleep 10
done
copy
cat /root/runs/$NAME.stages
grep -hE "^error|train_done|prequant|^quantized|artifact:|ema_select|^final |ttt val_" /root/runs/$NAME.out | tail -8
tail -4 /root/runs/$NAME.quant.out /root/runs/$NAME.ttt.out 2>/dev/null

#!/bin/bash
# usage: wait_run.sh NAME SECONDS -- follow a detached run until it ends or SECONDS pass; copy logs to $OUT
NAME=$1; LIMIT=$2; t0=$(date +%s)
while [ $(( $(date +%s) - t0 )) -lt $LIMIT ]; do
  if ! pgrep -f "RUN_ID=$NAME|train_gpt.py" > /dev/null; then echo "run ended"; break; fi
  sleep 10
done
cp /root/runs/$NAME.out $OUT/$NAME.out 2>/dev/null
cp /root/runs/$NAME/train.log $OUT/$NAME.train.log 2>/dev/null
for f in summary.json submission.json final_model.int6.ptz train_gpt.min.py; do cp /root/runs/$NAME/$f $OUT/$NAME.$f 2>/dev/null; done
grep -v "^ttt_progress" /root/runs/$NAME.out | tail -60; grep "^ttt_progress" /root/runs/$NAME.out | tail -5
nvidia-smi --query-gpu=memory.used --format=csv

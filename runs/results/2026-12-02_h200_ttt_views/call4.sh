#!/bin/bash
# Device call 4 (fresh machine, the session's last 280 s of device time; #16): the 300-document
# sample on HEAD (first steps captured at once, gradients in their parameters' layout), same
# artifact, stopped once TTT has scored. The corpus comes prebuilt (.carry/valdata: the same
# 2,100-document build as call 1's data_build.txt), and the console is copied every 5 s so a
# timeout still returns it.
# carry: .carry/valdata .carry/art60.int6.ptz .whl1/brotli-*.whl .whl1/python_minifier-*.whl
set -u
export PYTHONUNBUFFERED=1
mkdir -p /root/data && cp -r .carry/valdata/* /root/data/
E="EVAL_ONLY_PATH=$PWD/.carry/art60.int6.ptz SEED=0 TTT_ENABLED=1 ARTIFACT_LIMIT_BYTES=16100000"
bash tools/device/start_run.sh ttt_sample 1 $E VAL_DOC_FRACTION=0.15
for i in $(seq 1 30); do
  sleep 5; cp /root/runs/ttt_sample.out $OUT/ttt_sample.console.txt
  grep -q "^ttt val_\|Traceback" /root/runs/ttt_sample.out && break
done
pkill -f /root/snap/ttt_sample/train_gpt.py
cp /root/runs/ttt_sample.out $OUT/ttt_sample.console.txt
grep -E "ttt_warmup|ttt_progress|ttt |WARN|rror|quantized" /root/runs/ttt_sample.out | tail -12

#!/bin/bash
# usage: [SCRIPT=path] ttt_sample.sh NAME ARTIFACT [ENV=VALUE...] -- times TTT on the 300-document sample
# (VAL_DOC_FRACTION=0.15 SEED=0) of one artifact: starts the run (start_run.sh), copies its console to
# $OUT/NAME.console.txt every 5 s (a call cut at its limit still returns it), stops it once TTT has
# scored (the no-adaptation baseline after that adds ~27 s), and prints the TTT lines. Needs the
# corpus in /root/data: carried prebuilt (.carry/valdata, copied there) or built by start_run.sh.
# ARTIFACT_LIMIT_BYTES=16100000 lets EVAL_ONLY_PATH load an artifact fitted with shorter code.
set -u
NAME=$1; ARTIFACT=$2; shift 2
if [ -d .carry/valdata ] && [ ! -d /root/data/datasets ]; then mkdir -p /root/data && cp -r .carry/valdata/* /root/data/; fi
bash tools/device/start_run.sh "$NAME" 1 EVAL_ONLY_PATH="$ARTIFACT" SEED=0 TTT_ENABLED=1 \
  ARTIFACT_LIMIT_BYTES=16100000 VAL_DOC_FRACTION=0.15 "$@"
for i in $(seq 1 60); do
  sleep 5; cp /root/runs/$NAME.out $OUT/$NAME.console.txt 2>/dev/null
  grep -q "^ttt val_\|Traceback" /root/runs/$NAME.out 2>/dev/null && break
done
pkill -f "/root/snap/$NAME/[t]rain_gpt.py"; sleep 2
cp /root/runs/$NAME.out $OUT/$NAME.console.txt
grep -E "ttt_warmup|ttt_progress.*docs|ttt_graphs|^ttt |WARN|rror" /root/runs/$NAME.out | tail -10

#!/bin/bash
# usage: [SCRIPT=path] ttt_sample.sh NAME ARTIFACT [ENV=VALUE...] -- times TTT on the 300-document sample
# (VAL_DOC_FRACTION=0.15 SEED=0) of one artifact: starts the run (start_run.sh), copies its console to
# $OUT/NAME.console.txt every 5 s (a call cut at its limit still returns it), stops it once TTT has
# scored (the no-adaptation baseline after that adds ~27 s), and prints the TTT lines. Needs the
# corpus: carried prebuilt (.carry/valdata, copied to /root/valdata: its one train shard is too small
# to train on, so it stays out of start_run.sh's /root/data) or the full build in /root/data.
# ARTIFACT_LIMIT_BYTES=16100000 lets EVAL_ONLY_PATH load an artifact fitted with shorter code.
set -u
NAME=$1; ARTIFACT=$2; shift 2
D=()
if [ -d .carry/valdata ]; then
  [ -d /root/valdata ] || { mkdir -p /root/valdata && cp -r .carry/valdata/* /root/valdata/; }
  D=(DATA_DIR=/root/valdata)
fi
bash tools/device/start_run.sh "$NAME" 1 "${D[@]}" EVAL_ONLY_PATH="$ARTIFACT" SEED=0 TTT_ENABLED=1 \
  ARTIFACT_LIMIT_BYTES=16100000 VAL_DOC_FRACTION=0.15 "$@"
for i in $(seq 1 60); do
  sleep 5; cp /root/runs/$NAME.out $OUT/$NAME.console.txt 2>/dev/null
  grep -q "^ttt val_\|Traceback" /root/runs/$NAME.out 2>/dev/null && break
  kill -0 "$(cat /root/runs/$NAME.pid)" 2>/dev/null || break  # exited early
done
pkill -f "/root/snap/$NAME/[t]rain_gpt.py"; sleep 2
cp /root/runs/$NAME.out $OUT/$NAME.console.txt
grep -E "ttt_warmup|ttt_progress.*docs|ttt_graphs|^ttt |WARN|rror" /root/runs/$NAME.out | tail -10

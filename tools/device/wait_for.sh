#!/bin/bash
# usage: wait_for.sh SECONDS PATTERN NAME... -- until every run's console log has PATTERN (or SECONDS
# pass), then pack each run's logs into $OUT/results.tgz (collect.sh) and print its milestones. PATTERN examples:
# train_done (training over), prequant (pre-quantization score), "^final " (the run's score).
LIMIT=$1; PATTERN=$2; shift 2; t0=$(date +%s)
while [ $(( $(date +%s) - t0 )) -lt $LIMIT ]; do
  done_all=1
  for n in "$@"; do  # a run that exited (an early error, say) waits no more
    grep -q -- "$PATTERN" /root/runs/$n.out 2>/dev/null || { kill -0 "$(cat /root/runs/$n.pid)" 2>/dev/null && done_all=0; }
  done
  [ $done_all = 1 ] && break
  sleep 5
done
bash "$(dirname "$0")/collect.sh" "$@"  # every run's logs in $OUT/results.tgz
for n in "$@"; do
  echo "== $n"; grep -E "^error|warmup_and|val_bpb|train_done|ema_select|^step:[0-9]+/" /root/runs/$n.out | tail -8
done
nvidia-smi --query-gpu=memory.used --format=csv

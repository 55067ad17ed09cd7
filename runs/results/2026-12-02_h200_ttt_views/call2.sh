#!/bin/bash
# Device call 2 (#16): polls TTT over all 2,000 documents (ttt_full, started by call 1).
set -u
bash tools/device/wait_for.sh 580 "^final \|Traceback" ttt_full
grep -E "ttt_warmup|ttt_progress|ttt |ttt_time|rror|WARN" /root/runs/ttt_full.out | tail -40 > $OUT/ttt_full_progress.txt
tail -8 $OUT/ttt_full_progress.txt

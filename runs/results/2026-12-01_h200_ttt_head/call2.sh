#!/bin/bash
# Device call 2 (#16): polls TTT over all 2,000 documents (ttt_full, started by call 1); then builds
# the whole corpus (for call 3's training benchmark) into /root/data_full.
# carry: .carry/debian_docs.jsonl.xz .carry/fineweb_8192_bpe.model
set -u
bash tools/device/wait_for.sh 560 "^final " ttt_full
grep -E "ttt_warmup|ttt_progress|ttt |ttt_time|rror|WARN" /root/runs/ttt_full.out | tail -40 > $OUT/ttt_full_progress.txt
tail -12 $OUT/ttt_full_progress.txt
if grep -q "^final " /root/runs/ttt_full.out; then
  t0=$(date +%s)
  python3 data/tokenize_docs.py --docs .carry/debian_docs.jsonl.xz --tokenizer .carry/fineweb_8192_bpe.model \
    --val-docs 2000 --out /root/data_full > $OUT/data_full_build.txt 2>&1
  echo "full corpus built in $(( $(date +%s) - t0 ))s"; tail -2 $OUT/data_full_build.txt
fi

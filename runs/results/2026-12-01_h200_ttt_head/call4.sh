#!/bin/bash
# Device call 4 (fresh machine; #16): the sample again, after three changes to the chunk step
# (fused AdamW on per-slot parts, wide steps uncaptured at their exact window, exact slot counts
# as views), on the same artifact; then the chunk-step grid, time permitting.
# carry: as call1.sh
set -u
export PYTHONUNBUFFERED=1
python3 data/tokenize_docs.py --docs .carry/val_docs.jsonl.xz --tokenizer .carry/fineweb_8192_bpe.model \
  --val-docs 2000 --out /root/data > $OUT/data_build4.txt 2>&1
E="EVAL_ONLY_PATH=$PWD/.carry/art60.int6.ptz SEED=0 TTT_ENABLED=1 ARTIFACT_LIMIT_BYTES=16100000"
bash tools/device/start_run.sh ttt_sample2 1 $E VAL_DOC_FRACTION=0.15
bash tools/device/wait_for.sh 230 "^final " ttt_sample2
grep -E "ttt_warmup|ttt_progress|ttt |ttt_time|rror|WARN" /root/runs/ttt_sample2.out | tail -16
export PYTHONPATH=/root/site
timeout 75 python3 tools/bench_ttt.py --batches 64,16,2 --contexts 2048,1024,32 --steps 6 --profile-steps 0 --no-e2e \
  --out $OUT/bench_ttt2.json > $OUT/bench_ttt2.console.txt 2>&1
tail -14 $OUT/bench_ttt2.console.txt

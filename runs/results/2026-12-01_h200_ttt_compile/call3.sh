#!/bin/bash
# Device call 3 (fresh machine; #16): the same 60-step artifact (from call 1, carried back), TTT with
# regional compilation (TTT_COMPILE=1) on the 300-document sample, then on all 2,000 documents.
# The corpus here is the first 2,100 documents of debian_docs (the 2,000 validation ones, tokenized
# exactly as in call 1, and 100 training ones, so that the data layout is complete).
# carry: .carry/val_docs.jsonl.xz .carry/fineweb_8192_bpe.model .carry/art60.int6.ptz .whl1/brotli-*.whl
#        .whl1/python_minifier-*.whl
set -u
export PYTHONUNBUFFERED=1
t0=$(date +%s)
python3 data/tokenize_docs.py --docs .carry/val_docs.jsonl.xz --tokenizer .carry/fineweb_8192_bpe.model \
  --val-docs 2000 --out /root/data > $OUT/data_build3.txt 2>&1
echo "corpus built in $(( $(date +%s) - t0 ))s" | tee -a $OUT/data_build3.txt; tail -2 $OUT/data_build3.txt
E="EVAL_ONLY_PATH=$PWD/.carry/art60.int6.ptz SEED=0 TTT_ENABLED=1 TTT_COMPILE=1"
bash tools/device/start_run.sh ttt_r1 1 $E VAL_DOC_FRACTION=0.15
bash tools/device/wait_for.sh 330 "^final " ttt_r1
grep -E "ttt_warmup|ttt_progress|ttt |ttt_time|rror" /root/runs/ttt_r1.out | tail -14
bash tools/device/start_run.sh ttt_full 1 $E VAL_DOC_FRACTION=1

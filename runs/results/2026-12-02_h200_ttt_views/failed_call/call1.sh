#!/bin/bash
# Device call 1 (fresh machine; #16): TTT on HEAD with the same 60-step artifact as
# ../2026-12-01_h200_ttt_compile/ (art60.int6.ptz): the 300-document sample, the chunk-step grid
# (tools/bench_ttt.py), then all 2,000 documents, started detached and polled by call 2.
# Corpus: the first 2,100 documents of debian_docs (the 2,000 validation documents, tokenized as in
# every earlier run, and 100 training ones).
# carry: .carry/val_docs.jsonl.xz .carry/fineweb_8192_bpe.model .carry/art60.int6.ptz .whl1/brotli-*.whl
#        .whl1/python_minifier-*.whl
set -u
export PYTHONUNBUFFERED=1
t0=$(date +%s)
python3 data/tokenize_docs.py --docs .carry/val_docs.jsonl.xz --tokenizer .carry/fineweb_8192_bpe.model \
  --val-docs 2000 --out /root/data > $OUT/data_build.txt 2>&1
echo "corpus built in $(( $(date +%s) - t0 ))s" | tee -a $OUT/data_build.txt
# ARTIFACT_LIMIT_BYTES: the artifact was fitted with older, shorter code; this measures TTT only
E="EVAL_ONLY_PATH=$PWD/.carry/art60.int6.ptz SEED=0 TTT_ENABLED=1 ARTIFACT_LIMIT_BYTES=16100000"
bash tools/device/start_run.sh ttt_sample 1 $E VAL_DOC_FRACTION=0.15
bash tools/device/wait_for.sh 300 "^final " ttt_sample
grep -E "ttt_warmup|ttt_progress|ttt |ttt_time|rror|WARN" /root/runs/ttt_sample.out | tail -16
export PYTHONPATH=/root/site
python3 tools/bench_ttt.py --batches 64,16,2 --contexts 2048,256,32 --steps 8 --profile-steps 0 --no-e2e \
  --out $OUT/bench_ttt.json > $OUT/bench_ttt.console.txt 2>&1
tail -22 $OUT/bench_ttt.console.txt
bash tools/device/start_run.sh ttt_full 1 $E VAL_DOC_FRACTION=1
echo "call 1 done at $(( $(date +%s) - t0 ))s"

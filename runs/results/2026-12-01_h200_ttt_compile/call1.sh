#!/bin/bash
# Device call 1 (#16): a 60-step artifact of the defaults (kept: it comes back in $OUT), then the
# 300-document TTT sample on it with the code of this commit, TTT_COMPILE=0 (today's default) and =1.
# carry: .carry/debian_docs.jsonl.xz .carry/fineweb_8192_bpe.model .whl1/brotli-*.whl .whl1/python_minifier-*.whl
set -u
export PYTHONUNBUFFERED=1
bash tools/device/start_run.sh art 1 SEED=0 ITERATIONS=60 MAX_WALLCLOCK_SECONDS=0 TTT_ENABLED=0 WARMUP_STEPS=4 \
  VAL_LOSS_EVERY=0
bash tools/device/wait_for.sh 420 "^final " art
cp /root/runs/art/final_model.int6.ptz $OUT/art.int6.ptz && ls -l $OUT/art.int6.ptz
E="EVAL_ONLY_PATH=/root/runs/art/final_model.int6.ptz VAL_DOC_FRACTION=0.15 SEED=0 TTT_ENABLED=1"
bash tools/device/start_run.sh ttt_c0 1 $E TTT_COMPILE=0
# call 2 (same machine): when ttt_c0 is over, the same sample with TTT_COMPILE=1
#   bash tools/device/wait_for.sh 330 "^final " ttt_c0; bash tools/device/start_run.sh ttt_c1 1 $E TTT_COMPILE=1
#   bash tools/device/wait_for.sh 250 "^final " ttt_c1

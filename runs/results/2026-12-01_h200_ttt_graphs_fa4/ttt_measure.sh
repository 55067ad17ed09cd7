#!/bin/bash
# Device driver for runs/results/2026-12-01_h200_ttt_graphs (started detached with setsid from the
# repo root; writes everything under /root/out, copied back by the polling calls):
#   A  a short training run -> a fixed artifact (final_model.int6.ptz)
#   C  new code: TTT on the 300-document sample, alone on the GPU (timing + bpb)
#   B  old code (commit 940d5f7): TTT on the same sample (bpb; its timing is not claimed)
#   D  new code: TTT on all 2,000 documents, next to B (a time that holds alone a fortiori)
#   E  bench_train with the FA4 backend; F bench_ttt (small grid); C2 = C with ATTN_BACKEND=fa4
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=/root/site:/root/site/nvidia_cutlass_dsl/dsl_packages
O=/root/out; R=/root/runs; mkdir -p $O $R
say() { echo "[$(date -u +%T)] $*" | tee -a $O/driver.txt; }
EVAL="DATA_DIR=/root/data SEED=0 ATTN_BACKEND=varlen EVAL_ONLY_PATH=$R/art/final_model.int6.ptz"
say "A: artifact"
env DATA_DIR=/root/data SEED=0 RUN_ID=art ARTIFACT_DIR=$R/art ITERATIONS=60 MAX_WALLCLOCK_SECONDS=0 \
  ENABLE_LOOPING_AT=0 WARMUP_STEPS=3 TTT_ENABLED=0 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=10 ARTIFACT_AUTOFIT=1 \
  ATTN_BACKEND=varlen timeout 420 python3 train_gpt.py > $O/A_artifact.console.txt 2>&1
say "A rc=$? $(ls -la $R/art/ | grep ptz)"
cp $R/art/train.log $O/A_artifact.train.log 2>/dev/null
say "C: new TTT sample"
env $EVAL RUN_ID=new_s ARTIFACT_DIR=$R/new_s VAL_DOC_FRACTION=0.15 timeout 400 python3 train_gpt.py > $O/C_new_sample.console.txt 2>&1
say "C rc=$?"; cp $R/new_s/summary.json $O/C_new_sample.summary.json 2>/dev/null
say "B+D: old TTT sample next to new TTT all"
env $EVAL RUN_ID=old_s ARTIFACT_DIR=$R/old_s VAL_DOC_FRACTION=0.15 timeout 900 python3 .carry/old/train_gpt.py > $O/B_old_sample.console.txt 2>&1 &
PB=$!
env $EVAL RUN_ID=new_all ARTIFACT_DIR=$R/new_all VAL_DOC_FRACTION=1 timeout 1100 python3 train_gpt.py > $O/D_new_all.console.txt 2>&1
say "D rc=$?"; cp $R/new_all/summary.json $O/D_new_all.summary.json 2>/dev/null
wait $PB; say "B rc=$?"; cp $R/old_s/summary.json $O/B_old_sample.summary.json 2>/dev/null
say "E: bench_train fa4"
timeout 400 python3 tools/bench_train.py --data-dir /root/data --out $O/E_bench_train_fa4.json > $O/E_bench_train_fa4.console.txt 2>&1
say "E rc=$?"
say "F: bench_ttt"
timeout 300 python3 tools/bench_ttt.py --batches 64,8,1 --contexts 2048,32 --profile-steps 1 --out $O/F_bench_ttt.json > $O/F_bench_ttt.console.txt 2>&1
say "F rc=$?"
say "C2: new TTT sample with FA4"
env $EVAL ATTN_BACKEND=fa4 RUN_ID=new_s_fa4 ARTIFACT_DIR=$R/new_s_fa4 VAL_DOC_FRACTION=0.15 timeout 400 python3 train_gpt.py > $O/C2_new_sample_fa4.console.txt 2>&1
say "C2 rc=$?"
say "done"

#!/bin/bash
# Second driver (after the graph self-check's tolerance was widened): C, then B next to D, then F.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=/root/site:/root/site/nvidia_cutlass_dsl/dsl_packages
O=/root/out; R=/root/runs
say() { echo "[$(date -u +%T)] $*" | tee -a $O/driver.txt; }
EVAL="DATA_DIR=/root/data SEED=0 ATTN_BACKEND=varlen EVAL_ONLY_PATH=$R/art/final_model.int6.ptz"
say "C: new TTT sample (2)"
env $EVAL RUN_ID=new_s2 ARTIFACT_DIR=$R/new_s2 VAL_DOC_FRACTION=0.15 timeout 400 python3 train_gpt.py > $O/C_new_sample.console.txt 2>&1
say "C rc=$?"; cp $R/new_s2/summary.json $O/C_new_sample.summary.json 2>/dev/null
say "B+D (2)"
env $EVAL RUN_ID=old_s2 ARTIFACT_DIR=$R/old_s2 VAL_DOC_FRACTION=0.15 timeout 900 python3 .carry/old/train_gpt.py > $O/B_old_sample.console.txt 2>&1 &
PB=$!
env $EVAL RUN_ID=new_all2 ARTIFACT_DIR=$R/new_all2 VAL_DOC_FRACTION=1 timeout 1100 python3 train_gpt.py > $O/D_new_all.console.txt 2>&1
say "D rc=$?"; cp $R/new_all2/summary.json $O/D_new_all.summary.json 2>/dev/null
wait $PB; say "B rc=$?"; cp $R/old_s2/summary.json $O/B_old_sample.summary.json 2>/dev/null
say "F: bench_ttt"
timeout 300 python3 tools/bench_ttt.py --batches 64,8,1 --contexts 2048,32 --profile-steps 1 --no-e2e --out $O/F_bench_ttt.json > $O/F_bench_ttt.console.txt 2>&1
say "F rc=$? done2"

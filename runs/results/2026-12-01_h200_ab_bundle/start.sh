#!/bin/bash
# usage: start.sh NAME SEED [VAR=value ...] -- one step-based A/B run (DEVELOPERS.md "Quality A/B"),
# detached, from the snapshot of train_gpt.py taken in call 1 (later calls copy a newer working tree).
# WARMUP_STEPS=4: the warm-up is rolled back completely, so its length changes only the compile time.
# EVAL_SEQ_LEN=2048 for every variant, so a longer training context is not also a longer evaluation.
name=$1; seed=$2; shift 2
mkdir -p /root/runs
setsid nohup env PYTHONUNBUFFERED=1 DATA_DIR=/root/data ARTIFACT_DIR=/root/runs/$name RUN_ID=$name \
    ITERATIONS=270 MAX_WALLCLOCK_SECONDS=0 SEED=$seed TRAIN_LOG_EVERY=1 TTT_ENABLED=0 WARMUP_STEPS=4 \
    EVAL_SEQ_LEN=2048 "$@" python3 /root/snap/train_gpt.py > /root/runs/$name.out 2>&1 < /dev/null &
echo "started $name (seed $seed) $*"

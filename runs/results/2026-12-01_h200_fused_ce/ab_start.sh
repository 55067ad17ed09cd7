#!/bin/bash
# The step-based command side by side on the GPU (step-based: sharing changes no number), new
# code at seeds 0 and 1; the issue holds the old code's numbers. WARMUP_STEPS=4: the warm-up is rolled
# back completely (tests/test_training.py), so its length changes nothing but the compile time.
. runs/results/2026-12-01_h200_fused_ce/env.sh
mkdir -p /root/runs
for seed in 0 1; do
  name=new_s$seed
  setsid nohup env DATA_DIR=/root/data ARTIFACT_DIR=/root/runs/$name RUN_ID=$name ITERATIONS=150 \
      MAX_WALLCLOCK_SECONDS=0 SEED=$seed TRAIN_LOG_EVERY=1 TTT_ENABLED=0 WARMUP_STEPS=4 \
      python3 train_gpt.py > /root/runs/$name.out 2>&1 < /dev/null &
done
sleep 2; echo "A/B started"

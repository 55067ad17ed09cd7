#!/bin/bash
# Detached driver (call 1): training benchmarks alone on the GPU (COMPILE_REGIONS=2, then the
# default 0, each compiling into empty caches; then FUSED_QKV=1), the same-math check of FUSED_QKV=1,
# then three step-based A/B runs side by side.
# Writes to /root/out (a call's $OUT is emptied by the next call); poll.sh copies it back.
set -u
D=runs/results/2026-12-02_h200_regions_ab
mkdir -p /root/out; cd "$(dirname "$0")/../../.."
source tools/device/setup.sh > /root/out/setup.txt 2>&1
git rev-parse HEAD > /root/out/commit.txt 2>/dev/null || true
mkdir -p /root/snap/bench && cp -r train_gpt.py tools tests /root/snap/bench/
for v in regions2:COMPILE_REGIONS=2:--fresh-caches regions0:COMPILE_REGIONS=0:--fresh-caches qkv:FUSED_QKV=1:; do
  IFS=: read -r name set_ fresh <<< "$v"
  echo "$(date +%H:%M:%S) bench $name" >> /root/out/stages.txt
  (cd /root/snap/bench && python3 tools/bench_train.py --data-dir /root/data --steps 3 $fresh \
     --set $set_ --out /root/out/bench_$name.json) > /root/out/bench_$name.console.txt 2>&1
done
echo "$(date +%H:%M:%S) same_math FUSED_QKV=1" >> /root/out/stages.txt
(cd /root/snap/bench && python3 tests/gpu/test_same_math_gpu.py FUSED_QKV=1) \
  > /root/out/same_math_qkv.console.txt 2>&1
echo "$(date +%H:%M:%S) ab start" >> /root/out/stages.txt
A="ITERATIONS=270 MAX_WALLCLOCK_SECONDS=0 TRAIN_LOG_EVERY=1 TTT_ENABLED=0 WARMUP_STEPS=4 VAL_LOSS_EVERY=0 SEED=0 EMA_SELECT=0"
bash tools/device/start_run.sh base_s0 1 $A
bash tools/device/start_run.sh gate_s0 1 $A EMA_WINDOW_DIVISOR=30 ATTN_OUT_GATE=1 SPARSE_ATTN_GATE=0
bash tools/device/start_run.sh nosmear_s0 1 $A EMA_WINDOW_DIVISOR=30 SMEAR_GATE=0
echo "$(date +%H:%M:%S) ab started" >> /root/out/stages.txt

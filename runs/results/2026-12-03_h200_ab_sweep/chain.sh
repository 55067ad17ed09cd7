#!/bin/bash
# Detached driver, started by call 1; every stage writes to /root/out (a call's $OUT is emptied by
# the next call) and a line to /root/out/stages.txt; poll.sh copies it back. In order of value, so
# whatever the session's 30 device minutes cut off is the least needed:
#   1. three step-based A/B runs side by side (#17), SEED=0, all with EMA_SELECT_DIVISORS=30,100
#      (averages change no training step: each ema_select line gives the held-out loss of live and of
#      the windows k = 9, 30, 100): the defaults; ATTN_OUT_GATE=1 SPARSE_ATTN_GATE=0; SMEAR_GATE=0
#      (the bundle item with most of its step time, left out); each stopped after its prequant score;
#   2. tools/quant_sweep.py on the defaults run's final_model.pt, alone (#18): the defaults, two
#      norm-tweak rows, MLP clip 12.0;
#   3. the GPU same-math check of FUSED_QKV=1 against the plain path (#15);
#   4. training benchmarks alone: FUSED_QKV=1, the defaults (warm caches from the A/B), then
#      COMPILE_REGIONS=2 in empty caches (its console names why it failed in the last attempt).
set -u
mkdir -p /root/out; cd "$(dirname "$0")/../../.."
stage() { echo "$(date +%H:%M:%S) $1" >> /root/out/stages.txt; }
source tools/device/setup.sh > /root/out/setup.txt 2>&1
stage "setup done"
export TORCHINDUCTOR_CACHE_DIR=/root/cache/inductor TRITON_CACHE_DIR=/root/cache/triton  # every stage, the runs too
mkdir -p /root/snap/bench && cp -r train_gpt.py tools tests /root/snap/bench/
git rev-parse HEAD > /root/out/commit.txt 2>/dev/null
A="ITERATIONS=270 MAX_WALLCLOCK_SECONDS=0 TRAIN_LOG_EVERY=1 TTT_ENABLED=0 WARMUP_STEPS=4 VAL_LOSS_EVERY=0 SEED=0 EMA_SELECT_DIVISORS=30,100"
RUNS="base_s0 gate_s0 nosmear_s0"
bash tools/device/start_run.sh base_s0 1 $A
bash tools/device/start_run.sh gate_s0 1 $A ATTN_OUT_GATE=1 SPARSE_ATTN_GATE=0
bash tools/device/start_run.sh nosmear_s0 1 $A SMEAR_GATE=0
stage "ab started"
for n in $RUNS; do  # each stopped after its prequant line (GPTQ would only repeat the sweep's row)
  while kill -0 "$(cat /root/runs/$n.pid)" 2>/dev/null && ! grep -q prequant /root/runs/$n.out; do sleep 5; done
  pkill -f "[s]nap/$n/train_gpt"; cp /root/runs/$n.out /root/out/$n.console.txt
  cp /root/runs/$n/train.log /root/out/$n.train.log 2>/dev/null; stage "done $n"
done
sleep 3
(cd /root/snap/bench && DATA_DIR=/root/data python3 tools/quant_sweep.py /root/runs/base_s0/final_model.pt \
   --variant "defaults:" --variant "norm tweak, 32 steps: QUANT_TWEAK_STEPS=32" \
   --variant "norm tweak, 64 steps at 3e-3: QUANT_TWEAK_STEPS=64 QUANT_TWEAK_LR=3e-3" \
   --variant "MLP clip 12.0: MLP_CLIP_SIGMAS=12.0" \
   --out-dir /root/runs/quant --out /root/out/quant_sweep.json) > /root/out/quant_sweep.console.txt 2>&1
cp /root/runs/quant/*.log /root/out/ 2>/dev/null; stage "sweep done"
(cd /root/snap/bench && python3 tests/gpu/test_same_math_gpu.py FUSED_QKV=1) > /root/out/same_math_qkv.console.txt 2>&1
stage "same_math done"
bench() {  # NAME ARGS...: one benchmark alone, its console and JSON into /root/out
  stage "bench $1"; local name=$1; shift
  (cd /root/snap/bench && python3 tools/bench_train.py --data-dir /root/data --steps 3 "$@" \
     --out /root/out/bench_$name.json) > /root/out/bench_$name.console.txt 2>&1
}
bench qkv --set FUSED_QKV=1
bench default
bench regions2 --fresh-caches --set COMPILE_REGIONS=2
stage "chain done"

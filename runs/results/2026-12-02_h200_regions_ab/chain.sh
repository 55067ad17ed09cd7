#!/bin/bash
# Detached driver, started by call 1; every stage writes to /root/out (a call's $OUT is emptied by
# the next call) and a line to /root/out/stages.txt; poll.sh copies it back.
#   1. training benchmarks, alone on the GPU: COMPILE_REGIONS=2 in empty caches of its own (a cold
#      compile: #15's compile target), then FUSED_QKV=1 for its step time, with COMPILE_REGIONS=2 if
#      that benchmark succeeded, else with the default;
#   2. the GPU same-math check of FUSED_QKV=1 against the plain path;
#   3. two step-based A/B runs side by side (#17): the defaults and ATTN_OUT_GATE=1, both with
#      EMA_SELECT_DIVISORS=30,100 (averages change no training step: the ema_select line gives the
#      held-out loss of live, k=9, 30 and 100 in each run), each stopped after its prequant score;
#   4. the default benchmark alone (COMPILE_REGIONS=0; its graphs cached by the A/B's defaults run,
#      so its compile time is a warm one: the cold one was 185-228 s in earlier sessions);
#   5. tools/quant_sweep.py on the defaults run's final_model.pt, alone (#18): the defaults, the two
#      norm-tweak rows and MLP clip 12.0 (no --sensitivity: it would not fit the session's device time).
set -u
mkdir -p /root/out; cd "$(dirname "$0")/../../.."
stage() { echo "$(date +%H:%M:%S) $1" >> /root/out/stages.txt; }
source tools/device/setup.sh > /root/out/setup.txt 2>&1
export TORCHINDUCTOR_CACHE_DIR=/root/cache/inductor TRITON_CACHE_DIR=/root/cache/triton  # every stage, the runs too
rm -rf /root/cache
mkdir -p /root/snap/bench && cp -r train_gpt.py tools tests /root/snap/bench/
bench() {  # NAME ARGS...: one benchmark alone, its console and JSON into /root/out
  stage "bench $1"; local name=$1; shift
  (cd /root/snap/bench && python3 tools/bench_train.py --data-dir /root/data --steps 3 "$@" \
     --out /root/out/bench_$name.json) > /root/out/bench_$name.console.txt 2>&1
}
bench regions2 --fresh-caches --set COMPILE_REGIONS=2
if [ -f /root/out/bench_regions2.json ]; then
  bench qkv_regions2 --set COMPILE_REGIONS=2 --set FUSED_QKV=1
else
  bench qkv --set FUSED_QKV=1
fi
stage "same_math FUSED_QKV=1"
(cd /root/snap/bench && python3 tests/gpu/test_same_math_gpu.py FUSED_QKV=1) > /root/out/same_math_qkv.console.txt 2>&1
stage "ab start"
A="ITERATIONS=270 MAX_WALLCLOCK_SECONDS=0 TRAIN_LOG_EVERY=1 TTT_ENABLED=0 WARMUP_STEPS=4 VAL_LOSS_EVERY=0 SEED=0 EMA_SELECT_DIVISORS=30,100"
bash tools/device/start_run.sh base_s0 1 $A
bash tools/device/start_run.sh gate_s0 1 $A ATTN_OUT_GATE=1 SPARSE_ATTN_GATE=0
for n in base_s0 gate_s0; do  # each stopped after its prequant line (GPTQ would only repeat the sweep's row)
  while kill -0 "$(cat /root/runs/$n.pid)" 2>/dev/null && ! grep -q prequant /root/runs/$n.out; do sleep 5; done
  pkill -f "[s]nap/$n/train_gpt"; cp /root/runs/$n.out /root/out/$n.console.txt
done
stage "ab done"
bench regions0  # the default, alone; its graphs are in the chain's caches by now (the base_s0 run)
(cd /root/snap/bench && DATA_DIR=/root/data python3 tools/quant_sweep.py /root/runs/base_s0/final_model.pt \
   --variant "defaults:" --variant "norm tweak, 32 steps: QUANT_TWEAK_STEPS=32" \
   --variant "norm tweak, 64 steps at 3e-3: QUANT_TWEAK_STEPS=64 QUANT_TWEAK_LR=3e-3" \
   --variant "MLP clip 12.0: MLP_CLIP_SIGMAS=12.0" \
   --out-dir /root/runs/quant --out /root/out/quant_sweep.json) > /root/out/quant_sweep.console.txt 2>&1
stage "sweep done"

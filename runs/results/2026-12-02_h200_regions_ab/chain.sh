#!/bin/bash
# Detached driver, started by call 1; every stage writes to /root/out (a call's $OUT is emptied by
# the next call) and a line to /root/out/stages.txt; poll.sh copies it back.
#   1. training benchmarks, alone on the GPU: COMPILE_REGIONS=2 (in empty caches of its own), then the
#      default 0 (into the chain's caches, emptied first), each a cold compile (#15's compile target);
#      then FUSED_QKV=1 for its step time, with COMPILE_REGIONS=2 if that benchmark succeeded (its
#      compile is the shorter one), else with the default; the A/B's defaults run then finds its graphs
#      in the chain's caches;
#   2. the GPU same-math check of FUSED_QKV=1 against the plain path;
#   3. two step-based A/B runs side by side (#17): the defaults and ATTN_OUT_GATE=1, both with
#      EMA_SELECT_DIVISORS=30,100 (averages change no training step: the ema_select line gives the
#      held-out loss of live, k=9, 30 and 100 in each run), each stopped after its prequant score;
#   4. tools/quant_sweep.py --sensitivity on the defaults run's final_model.pt, alone (#18).
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
bench regions0
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
(cd /root/snap/bench && DATA_DIR=/root/data python3 tools/quant_sweep.py \
   /root/runs/base_s0/final_model.pt --sensitivity --out-dir /root/runs/quant --out /root/out/quant_sweep.json) \
   > /root/out/quant_sweep.console.txt 2>&1
stage "sweep done"

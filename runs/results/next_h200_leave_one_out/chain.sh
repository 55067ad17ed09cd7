#!/bin/bash
# usage: chain.sh 1|2|3|4 -- detached driver for #17's leave-one-out A/B, one trio per session:
#   trio 1: MUON_POLAR_EXPRESS=0, MIN_LR=0, MUON_WD_TAPER_AT=0;
#   trio 2: SPARSE_ATTN_GATE=0, QK_GAIN_INIT=5.0, MATRIX_LR=0.022;
#   trio 3 (not in the bundle: PR #1855's values): WARMDOWN_FRAC=0.85, BETA2=0.99, and both;
#   trio 4: LOGIT_SOFTCAP_NEG=20, MUON_WD_MLP_FACTOR=0.5 and 2;
# each the defaults with one bundle item back at the record's value, 270 steps at SEED=0, side by side,
# against base_s0 of ../2026-12-03_h200_ab_sweep/ (the same training code and seed: live 1.01576).
# Then, alone on the GPU (#15): the FUSED_QKV same-math check and the benchmarks FUSED_QKV=1 and the
# defaults (warm caches from the trio), and COMPILE_REGIONS=2 in empty caches (trio 1 only).
# Everything under /root/res; poll.sh packs it into $OUT/results.tgz.
set -u
TRIO=$1
mkdir -p /root/res; cd "$(dirname "$0")/../../.."
stage() { echo "$(date +%H:%M:%S) $1" >> /root/res/stages.txt; }
source tools/device/setup.sh > /root/res/setup.txt 2>&1
export TORCHINDUCTOR_CACHE_DIR=/root/cache/inductor TRITON_CACHE_DIR=/root/cache/triton
stage "setup done"
mkdir -p /root/snap/bench && cp -r train_gpt.py tools tests /root/snap/bench/
if [ "$TRIO" = 1 ]; then
  bash tools/device/ab_runs.sh 270 0 "nope:MUON_POLAR_EXPRESS=0" "nominlr:MIN_LR=0" "notaper:MUON_WD_TAPER_AT=0"
elif [ "$TRIO" = 2 ]; then
  bash tools/device/ab_runs.sh 270 0 "nosparse:SPARSE_ATTN_GATE=0" "qk50:QK_GAIN_INIT=5.0" "lr022:MATRIX_LR=0.022"
elif [ "$TRIO" = 3 ]; then  # PR #1855's retuned schedule and Adam beta2, each alone and together (#17 item 8)
  bash tools/device/ab_runs.sh 270 0 "wd85:WARMDOWN_FRAC=0.85" "b2_99:BETA2=0.99" "wd85b2:WARMDOWN_FRAC=0.85,BETA2=0.99"
else  # 4: the two switches with no record value: the negative softcap at 20 (a public ablation's
      # (30, 20) pair), and the MLP banks' decay bracketed at half and twice
  bash tools/device/ab_runs.sh 270 0 "capneg20:LOGIT_SOFTCAP_NEG=20" "wdmlp05:MUON_WD_MLP_FACTOR=0.5" "wdmlp2:MUON_WD_MLP_FACTOR=2"
fi
(cd /root/snap/bench && python3 tests/gpu/test_same_math_gpu.py FUSED_QKV=1) > /root/res/same_math_qkv.console.txt 2>&1
stage "same_math done"
bench() {  # NAME ARGS...: one benchmark alone
  stage "bench $1"; local name=$1; shift
  (cd /root/snap/bench && python3 tools/bench_train.py --data-dir /root/data --steps 3 "$@" \
     --out /root/res/bench_$name.json) > /root/res/bench_$name.console.txt 2>&1
}
bench qkv --set FUSED_QKV=1
bench default
[ "$TRIO" = 1 ] && bench regions2 --fresh-caches --set COMPILE_REGIONS=2
stage "chain done"

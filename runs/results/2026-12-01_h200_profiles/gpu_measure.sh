#!/bin/bash
# Device driver for runs/results/2026-12-01_h200_profiles: data build, bench_ttt, bench_train --profile.
# Run from the repo root on the device: bash .carry/gpu_measure.sh   (writes everything under $OUT)
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
left() { echo $(( ${1} - ($(date +%s) - T0) )); }
{ date -u; nvidia-smi; python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; nproc; } > $OUT/env.txt 2>&1
tail -3 $OUT/env.txt
python3 .carry/snap/data/tokenize_docs.py --docs .carry/debian_docs.jsonl.xz --tokenizer .carry/fineweb_8192_bpe.model \
  --val-docs 2000 --out /root/data > $OUT/data_build.txt 2>&1
echo "data build rc=$? at $(( $(date +%s) - T0 ))s"; tail -2 $OUT/data_build.txt
set -o pipefail
T=$(left 250); [ $T -gt 240 ] && T=240
timeout $T python3 tools/bench_ttt.py --repo-root .carry/snap --out $OUT/bench_ttt.json 2>&1 | grep -v '^USDT' > $OUT/bench_ttt.console.txt
echo "bench_ttt rc=$? at $(( $(date +%s) - T0 ))s"
T=$(left 585)
echo "bench_train budget ${T}s"
timeout $T python3 .carry/train_profile_detail.py --data-dir /root/data --profile --out $OUT/bench_train.json 2>&1 | grep -v '^USDT' > $OUT/bench_train.console.txt
echo "bench_train rc=$? at $(( $(date +%s) - T0 ))s"
nvidia-smi --query-gpu=memory.used,temperature.gpu,clocks.sm --format=csv >> $OUT/env.txt 2>&1
tail -c 5000 $OUT/bench_ttt.console.txt
tail -c 5500 $OUT/bench_train.console.txt

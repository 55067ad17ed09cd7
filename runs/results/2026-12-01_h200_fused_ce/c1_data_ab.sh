#!/bin/bash
# call 1 (carry .carry): corpus; the fused cross-entropy kernel at the training shape (alone on the GPU);
# then the step-based A/B command for the new code at seeds 0 and 1, side by side, detached
. runs/results/2026-12-01_h200_fused_ce/env.sh
t0=$(date +%s)
python3 data/tokenize_docs.py --docs .carry/debian_docs.jsonl.xz --tokenizer .carry/fineweb_8192_bpe.model \
    --val-docs 2000 --out /root/data > $OUT/data_build.txt 2>&1; tail -2 $OUT/data_build.txt
echo "corpus built in $(( $(date +%s) - t0 ))s"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.total --format=csv > $OUT/env.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $OUT/env.txt
python3 tests/gpu/test_fused_ce_gpu.py 2>&1 | tee $OUT/fused_ce_gpu.txt
bash $R/ab_start.sh

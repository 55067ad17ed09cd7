#!/bin/bash
# call 1 (carry .carry): corpus, snapshot of train_gpt.py, then three step-based runs side by side at seed 0
R=runs/results/2026-12-01_h200_ab_bundle; . $R/bundles.sh
t0=$(date +%s)
python3 data/tokenize_docs.py --docs .carry/debian_docs.jsonl.xz --tokenizer .carry/fineweb_8192_bpe.model \
    --val-docs 2000 --out /root/data > $OUT/data_build.txt 2>&1; tail -2 $OUT/data_build.txt
echo "corpus built in $(( $(date +%s) - t0 ))s"
mkdir -p /root/snap && cp train_gpt.py /root/snap/ && git rev-parse HEAD > $OUT/commit.txt
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/env.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $OUT/env.txt
bash $R/start.sh base_s0 0
bash $R/start.sh b1_s0 0 $B1
bash $R/start.sh b2_s0 0 $B2
bash runs/results/2026-12-01_h200_fused_ce/wait_for.sh ${1:-480} prequant base_s0 b1_s0 b2_s0

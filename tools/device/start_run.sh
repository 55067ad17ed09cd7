#!/bin/bash
# usage: start_run.sh NAME NPROC [ENV=VALUE...]  -- builds the corpus once, then starts a detached run
set -u
NAME=$1; NPROC=$2; shift 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
if [ ! -f /root/data/datasets/fineweb10B_sp8192/fineweb_val_000000.bin ]; then
  t0=$(date +%s)
  python3 data/tokenize_docs.py --docs .carry/debian_docs.jsonl.xz --tokenizer .carry/fineweb_8192_bpe.model --val-docs 2000 --out /root/data 2>&1 | tail -3
  echo "corpus built in $(( $(date +%s) - t0 ))s"; ls -la /root/data/datasets/fineweb10B_sp8192
fi
mkdir -p /root/runs
setsid nohup env DATA_DIR=/root/data ARTIFACT_DIR=/root/runs/$NAME RUN_ID=$NAME "$@" torchrun --standalone --nproc_per_node=$NPROC train_gpt.py > /root/runs/$NAME.out 2>&1 < /dev/null &
echo "started $NAME"

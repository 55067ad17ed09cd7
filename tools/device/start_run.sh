#!/bin/bash
# usage: [SCRIPT=path] start_run.sh NAME NPROC [ENV=VALUE...]  -- installs the carried wheels and builds
# the corpus (each once per machine), then starts a detached run of train_gpt.py (or SCRIPT: another
# version of it, e.g. a branch's, carried in an ignored folder): torchrun with NPROC > 1, python3 with 1.
# Wheels: any of .whl/, .whl1/, .whl2/ carried in this call or an earlier one (copied to /root/whl);
# .whl2 holds the second half of the split FA4 libs wheel (README.md, "FlashAttention 4").
set -u
NAME=$1; NPROC=$2; shift 2
mkdir -p /root/whl /root/runs
for d in .whl .whl1 .whl2; do [ -d $d ] && cp $d/* /root/whl/ 2>/dev/null; done
part=/root/whl/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
[ -f /root/whl/cu13.part.aa ] && [ -f /root/whl/cu13.part.ab ] && [ ! -f $part ] && \
  cat /root/whl/cu13.part.aa /root/whl/cu13.part.ab > $part
if ls /root/whl/*.whl > /dev/null 2>&1 && { [ ! -f /root/site/.installed ] || \
    [ -n "$(find /root/whl -name '*.whl' -newer /root/site/.installed)" ]; }; then  # new wheels only
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site \
    /root/whl/*.whl 2>&1 | tail -2
  touch /root/site/.installed
fi
export PYTHONPATH=/root/site:/root/site/nvidia_cutlass_dsl/dsl_packages PYTHONUNBUFFERED=1
if [ ! -f /root/data/datasets/fineweb10B_sp8192/fineweb_val_000000.bin ] && [ -f .carry/debian_docs.jsonl.xz ]; then
  t0=$(date +%s)
  python3 data/tokenize_docs.py --docs .carry/debian_docs.jsonl.xz --tokenizer .carry/fineweb_8192_bpe.model \
    --val-docs 2000 --out /root/data 2>&1 | tail -2
  echo "corpus built in $(( $(date +%s) - t0 ))s"
fi
# the run reads its own copy of the script: a later call replaces the working tree
mkdir -p /root/snap/$NAME && cp "${SCRIPT:-train_gpt.py}" /root/snap/$NAME/train_gpt.py
launch=(python3); [ "$NPROC" -gt 1 ] && launch=(torchrun --standalone --nproc_per_node=$NPROC)
setsid nohup env DATA_DIR=/root/data ARTIFACT_DIR=/root/runs/$NAME RUN_ID=$NAME "$@" "${launch[@]}" \
  /root/snap/$NAME/train_gpt.py > /root/runs/$NAME.out 2>&1 < /dev/null &
echo $! > /root/runs/$NAME.pid  # wait loops stop once it is gone: an early one-line error ends a wait
echo "started $NAME: $*"

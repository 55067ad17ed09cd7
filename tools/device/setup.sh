#!/bin/bash
# Sourced by start_run.sh and pipeline.sh: installs the carried wheels into /root/site (new ones
# only), exports PYTHONPATH, and builds the sp8192 corpus into /root/data once per machine when
# .carry/debian_docs.jsonl.xz is carried (never from the validation-only .carry/valdata).
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

#!/bin/bash
# Device call 1: install brotli + python-minifier, build the corpus, check FUSED_HEAD_CE on the GPU,
# benchmark the default step with and without it (alone on the GPU), then start the seed-0 300 s run.
# carry: .carry/debian_docs.jsonl.xz .carry/fineweb_8192_bpe.model .whl1/brotli-*.whl .whl1/python_minifier-*.whl
set -u
export PYTHONUNBUFFERED=1
mkdir -p /root/whl && cp .whl1/*.whl /root/whl/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site /root/whl/*.whl
touch /root/site/.installed
export PYTHONPATH=/root/site
t0=$(date +%s)
python3 data/tokenize_docs.py --docs .carry/debian_docs.jsonl.xz --tokenizer .carry/fineweb_8192_bpe.model \
  --val-docs 2000 --out /root/data > $OUT/data_build.txt 2>&1
echo "corpus built in $(( $(date +%s) - t0 ))s" | tee -a $OUT/data_build.txt
timeout 90 python3 tests/gpu/test_fused_ce_gpu.py > $OUT/fused_ce_gpu.txt 2>&1; echo "fused_ce_gpu rc=$?"; tail -4 $OUT/fused_ce_gpu.txt
for v in default:FUSED_HEAD_CE=0 fused_ce:FUSED_HEAD_CE=1; do
  name=${v%%:*}
  timeout 230 python3 tools/bench_train.py --data-dir /root/data --steps 5 --set ${v#*:} --out $OUT/bench_$name.json \
    > $OUT/bench_$name.console.txt 2>&1; echo "bench $name rc=$?"; grep -E "ms/step|tok/s|MiB|compile|MFU" $OUT/bench_$name.console.txt | head -8
done
bash tools/device/start_run.sh d_s0 1 SEED=0 MAX_WALLCLOCK_SECONDS=300 TTT_ENABLED=0

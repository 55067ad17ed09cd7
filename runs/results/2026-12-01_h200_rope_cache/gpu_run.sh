#!/bin/bash
# One device call: data, RoPE-cache bench (alone, cold caches), same-step check, bench with
# Inductor's mix-order reduction off (alone, cold caches), Inductor kernels of interest.
export PYTHONUNBUFFERED=1
R=$(pwd)
{ nvidia-smi; python3 -c "import torch, triton, torch._inductor.config as c; print(torch.__version__, triton.__version__, 'mix_order_reduction', c.triton.mix_order_reduction)"; git -C $R log -1 --format=%H 2>/dev/null; } > $OUT/env.txt 2>&1
python3 .carry/base/data/tokenize_docs.py --docs .carry/debian_docs.jsonl.xz --tokenizer .carry/fineweb_8192_bpe.model --val-docs 2000 --out /root/data > $OUT/data_build.txt 2>&1
echo "data rc $? $(date +%T)"
# 1. bench of the new file, alone, cold caches
export TORCHINDUCTOR_CACHE_DIR=/tmp/ic1 TRITON_CACHE_DIR=/tmp/ic1/triton
(cd .carry/snap2 && timeout 215 python3 tools/bench_train.py --data-dir /root/data --steps 6 --profile --out $OUT/bench_new.json) > $OUT/bench_new.console.txt 2>&1
echo "bench_new rc $? $(date +%T)"; grep -E "ms/step|compile \+ warmup \(|peak" $OUT/bench_new.console.txt | head -6
# kernels of interest from the compiled graphs (kernel + wrapper modules naming them)
mkdir -p /tmp/k && grep -rlE "lerp_mul_select_sigmoid_sub_sum|arange_cos" /tmp/ic1 --include=*.py | head -20 | xargs -r cp -t /tmp/k
tar -cJf $OUT/kernels.tar.xz -C /tmp k; ls /tmp/k | wc -l
# 2. same-step check (shares the new file's compile cache; base compiles cold)
timeout 150 python3 .carry/snap2/check_same_step.py --base .carry/base/train_gpt.py --new .carry/snap2/train_gpt.py --data-dir /root/data > $OUT/check.txt 2>&1
echo "check rc $? $(date +%T)"; tail -12 $OUT/check.txt
# 3. bench of the new file with Inductor's mix-order reduction off, alone, cold caches
export TORCHINDUCTOR_CACHE_DIR=/tmp/ic2 TRITON_CACHE_DIR=/tmp/ic2/triton TORCHINDUCTOR_MIX_ORDER_REDUCTION=0
(cd .carry/snap2 && timeout 185 python3 tools/bench_train.py --data-dir /root/data --steps 6 --profile --out $OUT/bench_mo0.json) > $OUT/bench_mo0.console.txt 2>&1
echo "bench_mo0 rc $? $(date +%T)"; grep -E "ms/step|compile \+ warmup \(|peak" $OUT/bench_mo0.console.txt | head -6

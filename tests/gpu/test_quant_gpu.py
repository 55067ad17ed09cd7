"""GPU checks of the quantization section: GPTQ speed and agreement with the CPU at full size, and a
compiled Triton kernel running from the self-extracting code stub.

    python3 -m pytest -q -s tests/gpu/test_quant_gpu.py
"""
import os
import subprocess
import sys
import time

import pytest
import torch

import train_gpt as tg


def test_gptq_full_model_on_gpu_is_fast_and_matches_cpu():
    g = torch.Generator().manual_seed(0)
    shapes = [(512, 512), (256, 512), (256, 512), (512, 512), (2048, 512), (512, 2048)]
    hess = {}
    for cols in (512, 2048):
        x = torch.randn(2 * cols, cols, generator=g) @ (torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=g) / cols**0.5)
        hess[cols] = (x.T @ x).cuda()
    state, hessians = {"tok_emb.weight": torch.randn(8192, 512, generator=g).bfloat16().cuda()}, {"tok_emb.weight": hess[512]}
    for i in range(11):
        for j, (r, c) in enumerate(shapes):
            state[f"blocks.{i}.m{j}.weight"] = torch.randn(r, c, generator=g).bfloat16().cuda()
            hessians[f"blocks.{i}.m{j}.weight"] = hess[c]
    tg.gptq_quantize(torch.randn(64, 64, device="cuda"), torch.eye(64, device="cuda"), 12.85, 6)  # cusolver init
    torch.cuda.synchronize()
    t = time.perf_counter()
    w, meta = tg.quantize_state_dict(state, hessians, 6, 12.85, 8, 20.0)
    sec = time.perf_counter() - t
    print(f"\nGPTQ of 66 matrices + 8192x512 embedding on {torch.cuda.get_device_name()}: {sec:.2f}s")
    assert sec < 10
    name = "blocks.3.m4.weight"
    q_ref, s_ref = _gptq_on_cpu(state[name].cpu(), hessians[name].cpu())
    assert torch.equal(w[name + ".scale"], s_ref)
    assert (w[name + ".q"] != q_ref).float().mean() < 0.01  # fp32 reductions differ between devices


def _gptq_on_cpu(W, H):  # gptq_quantize moves CPU tensors to the GPU when there is one; hide it
    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: False
    try:
        return tg.gptq_quantize(W, H, 12.85, 6)
    finally:
        torch.cuda.is_available = real


KERNEL_MODULE = '''
import torch, triton, triton.language as tl


@triton.jit
def add_one(x_ptr, n, BLOCK: tl.constexpr):
    """A docstring the minifier drops."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)


if __name__ == "__main__":
    x = torch.zeros(1000, device="cuda")
    add_one[(triton.cdiv(1000, 256),)](x, 1000, BLOCK=256)
    print("kernel", int(x.sum().item()))
'''


def test_stub_runs_a_compiled_triton_kernel(tmp_path):
    if tg.triton is None or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs compiled Triton")
    path = tmp_path / "stub.py"
    path.write_text(tg.minified_code_stub(KERNEL_MODULE), encoding="utf-8")
    run = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("kernel 1000")

"""GPU checks of the model (run through the device tool; skipped without CUDA).

    python3 tests/gpu/test_model_gpu.py        # prints the numbers
    python3 -m pytest -q tests/gpu             # asserts them

- varlen (torch), FA3 and FA4 attention (those installed) vs SDPA per segment, bf16, on a packed
  row of documents, and FA4's gradients against varlen's;
- compiled forward+backward of the default model on one 98,304-token packed row, looping off
  and on: ms per fwd+bwd and peak memory.
"""
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import train_gpt as tg  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def packed_row(n_tokens: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, vocab, (n_tokens + 1,), generator=g)
    starts = torch.cumsum(torch.randint(50, 3000, (n_tokens // 50,), generator=g), 0)
    x[starts[starts < n_tokens]] = tg.BOS_ID
    x[0] = tg.BOS_ID
    cu, _ = tg.build_cu_seqlens(x[:-1].numpy(), 2048)
    return x[:-1].cuda(), x[1:].cuda(), torch.from_numpy(cu).cuda()


def attention_agreement() -> dict:
    torch.manual_seed(0)
    x, _, cu = packed_row(8192, 100)
    q = torch.randn(1, 8192, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8192, 4, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 8192, 4, 64, device="cuda", dtype=torch.bfloat16)
    ref = tg.causal_attention(q.float(), k.float(), v.float(), cu, 2048, "sdpa")
    out = {}
    for backend in ("sdpa", "varlen", "fa3", "fa4"):
        try:
            y = tg.causal_attention(q, k, v, cu, 2048, backend).float()
        except ImportError:  # FA3 / FA4 not installed
            continue
        err = (y - ref).abs()
        out[backend] = (err.max().item(), (err.max() / ref.abs().max()).item())
    return out


def model_step(looping: bool, n_tokens: int = 98_304, iters: int = 10) -> dict:
    h = tg.Hyperparameters(env={})
    model = tg.build_model(h, torch.device("cuda"), tg.pick_attention_backend())
    model.looping = looping
    fn = torch.compile(model, dynamic=False, fullgraph=True)
    x, y, cu = packed_row(n_tokens, h.vocab_size)
    tg.mark_cu_dynamic(cu)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(x, y, cu, h.train_seq_len).mean()
        loss.backward()

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return {"looping": looping, "ms_fwd_bwd": start.elapsed_time(end) / iters, "compile_s": compile_s,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20, "backend": model.attn_backend}


def test_attention_backends_agree():
    for backend, (abs_err, rel_err) in attention_agreement().items():
        assert rel_err < 2e-2, (backend, abs_err, rel_err)


def test_fa4_gradients_match_varlen():
    if not tg._has_fa4():
        pytest.skip("FlashAttention 4 is not installed (pip install --pre flash-attn-4)")
    _, _, cu = packed_row(8192, 100)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 8192, h, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (8, 4, 4))
    grad = torch.randn(1, 8192, 8, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    grads = {b: torch.autograd.grad(tg.causal_attention(q, k, v, cu, 2048, b), (q, k, v), grad)
             for b in ("varlen", "fa4")}
    for name, a, b in zip("qkv", grads["fa4"], grads["varlen"]):
        assert ((a - b).abs().max() / b.abs().max()).item() < 2e-2, name


@pytest.mark.parametrize("looping", [False, True])
def test_full_model_step(looping):
    r = model_step(looping)
    assert r["ms_fwd_bwd"] > 0


if __name__ == "__main__":
    for backend, (abs_err, rel_err) in attention_agreement().items():
        print(f"ATTENTION {backend} vs fp32 sdpa: max_abs {abs_err:.3e} max_rel {rel_err:.3e}", flush=True)
    for looping in (False, True):
        print("MODEL", model_step(looping), flush=True)

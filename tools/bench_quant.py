"""Measurements behind the serialization choices in train_gpt.py's ARTIFACT section.

    python3 tools/bench_quant.py REPO_ROOT [single]

Builds a realistic quantized state (11 layers x {c_q, c_k, c_v, proj, fc, mlp proj} at int6, 12.85
sigma, an 8192x512 int8 embedding at 20 sigma, small fp16 tensors) from Gaussian weights and
correlated-input Hessians, times GPTQ, and compares one brotli-11 / lzma stream with
serialize_quantized. "single" also times the one-stream baselines (slow: minutes on one core).
"""
import io
import lzma
import os
import sys
import time

import torch

sys.path.insert(0, sys.argv[1])
import train_gpt as tg  # noqa: E402


def synthetic_state(layers=11, dim=512, vocab=8192, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = {"attn.c_q.weight": (dim, dim), "attn.c_k.weight": (dim // 2, dim), "attn.c_v.weight": (dim // 2, dim),
              "attn.proj.weight": (dim, dim), "mlp.fc.weight": (4 * dim, dim), "mlp.proj.weight": (dim, 4 * dim)}
    hess = {}
    for cols in (dim, 4 * dim):
        x = torch.randn(2 * cols, cols, generator=g) @ (torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=g) / cols**0.5)
        hess[cols] = (x.T @ x).to(device)
    state, hessians = {"tok_emb.weight": (torch.randn(vocab, dim, generator=g) * 0.005).bfloat16()}, {"tok_emb.weight": hess[dim]}
    for i in range(layers):
        for k, (r, c) in shapes.items():
            state[f"blocks.{i}.{k}"] = (torch.randn(r, c, generator=g) * 0.02).bfloat16()
            hessians[f"blocks.{i}.{k}"] = hess[c]
        state[f"blocks.{i}.attn.q_gain"] = torch.full((8,), 5.0)
        for k in ("attn_scale", "mlp_scale"):
            state[f"blocks.{i}.{k}"] = torch.rand(dim, generator=g)
        state[f"blocks.{i}.resid_mix"] = torch.rand(2, dim, generator=g)
    state["skip_weights"] = torch.rand(5, dim, generator=g)
    state["skip_gates"] = torch.rand(5, dim, generator=g)
    return {k: v.to(device) for k, v in state.items()}, hessians


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {dev} {torch.cuda.get_device_name() if dev == 'cuda' else ''} cores {len(os.sched_getaffinity(0))} "
          f"torch {torch.__version__}", flush=True)
    state, hessians = synthetic_state(device=dev)
    tg.gptq_quantize(torch.randn(64, 64, device=dev), torch.eye(64, device=dev), 12.85, 6)  # warm-up (cusolver init)
    (w, meta), sec = timed(lambda: tg.quantize_state_dict(state, hessians, 6, 12.85, 8, 20.0))
    print(f"GPTQ quantize_state_dict (same-shape matrices batched), state on {dev}: {sec:.2f}s", flush=True)
    big = [n for n in state if state[n].numel() > 65536]
    _, sec = timed(lambda: [tg.gptq_quantize(state[n], hessians[n], 20.0 if n.startswith("tok") else 12.85,
                                             8 if n.startswith("tok") else 6) for n in big])
    print(f"GPTQ one matrix at a time ({len(big)} calls): {sec:.2f}s", flush=True)
    cpu_state = {k: v.cpu() for k, v in state.items()}
    cpu_h = {k: v.cpu() for k, v in hessians.items()}
    _, sec = timed(lambda: tg.quantize_state_dict(cpu_state, cpu_h, 6, 12.85, 8, 20.0))
    print(f"GPTQ quantize_state_dict, state and Hessians on cpu (computed on {dev}): {sec:.2f}s", flush=True)
    q = torch.cat([v.flatten().float() for k, v in w.items() if k.endswith(".q") and not k.startswith("tok")])
    print(f"matrix q std {q.std():.3f}, embedding q std {w['tok_emb.weight.q'].float().std():.3f}", flush=True)

    if dev == "cuda":  # does TF32 in the lazy-update matmul cost GPTQ accuracy?
        n = "blocks.0.mlp.proj.weight"
        W, H = state[n].float(), hessians[n]
        errs = {}
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            qq, ss = tg.gptq_quantize(state[n], H, 12.85, 6)
            D = W - qq.float() * ss.float()[:, None]
            errs[tf32] = torch.einsum("ij,jk,ik->", D.double(), H.double(), D.double()).item()
        torch.backends.cuda.matmul.allow_tf32 = False
        print(f"H-weighted error of {n}: fp32 {errs[False]:.6g}, tf32 {errs[True]:.6g} "
              f"({100 * (errs[True] / errs[False] - 1):+.3f}%)", flush=True)

    buf = io.BytesIO()
    torch.save({"w": w, "m": meta}, buf)
    payload = tg.byte_shuffle(buf.getvalue(), 2)
    print(f"payload {len(payload):,} bytes", flush=True)
    for comp, ans in (("brotli", False), ("lzma", False), ("brotli", True)):
        blob, sec = timed(lambda: tg.serialize_quantized(w, meta, comp, ans))
        (w2, m2), dsec = timed(lambda: tg.deserialize_quantized(blob))
        same = m2 == meta and all(torch.equal(w2[k], w[k]) for k in w)
        pieces = int.from_bytes(blob[6:10], "little")
        print(f"{'ans+' if ans else ''}{comp} pieces: {len(blob):,} bytes in {sec:.1f}s ({pieces} pieces), "
              f"decompress {dsec:.2f}s, roundtrip exact {same}", flush=True)
        if "single" in sys.argv[2:] and not ans:
            fn = (lambda: __import__("brotli").compress(payload, quality=11)) if comp == "brotli" else \
                (lambda: lzma.compress(payload, preset=6))
            one, sec1 = timed(fn)
            print(f"{comp} one stream: {len(one):,} bytes in {sec1:.1f}s; pieces are "
                  f"{100 * (len(blob) / len(one) - 1):+.4f}% bytes, {sec1 / sec:.1f}x faster", flush=True)


if __name__ == "__main__":
    main()

"""FA4 probe on the device: does torch route varlen_attn to FlashAttention 4 for our shapes?"""
import os, sys, time, json, traceback
import torch
import torch.nn.attention as A
print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
print("registry:", [n for n in dir(A) if "flash_attention" in n])
from torch.nn.attention.varlen import varlen_attn
import inspect
print("varlen_attn sig:", inspect.signature(varlen_attn))
res = {}
t0 = time.time()
try:
    import flash_attn.cute.interface as fi
    print("import flash_attn.cute.interface %.1fs" % (time.time() - t0), flush=True)
except Exception:
    traceback.print_exc(); sys.exit(1)
dev = "cuda"
g = torch.Generator(device="cpu").manual_seed(0)
def doc_lengths(total, cap=2048):
    out = []
    while sum(out) < total:
        out.append(int(min(cap, max(16, torch.empty(1).log_normal_(6.0, 1.2, generator=g).item()))))
    out[-1] -= sum(out) - total
    return [x for x in out if x > 0]
T = 98304
lens = doc_lengths(T)
cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
mx = max(lens)
print("docs", len(lens), "max", mx)
torch.manual_seed(0)
q = torch.randn(T, 8, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(T, 4, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(T, 4, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
do = torch.randn(T, 8, 64, device=dev, dtype=torch.bfloat16)
def run(fn):
    for t in (q, k, v): t.grad = None
    o = fn(); o.backward(do)
    return o.detach().clone(), [t.grad.clone() for t in (q, k, v)]
def f_varlen(): return varlen_attn(q, k, v, cu, cu, mx, mx, window_size=(-1, 0))
def f_fa4():
    o = fi.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mx, max_seqlen_k=mx, causal=True)
    return o[0] if isinstance(o, tuple) else o
from torch import Tensor
@torch.library.custom_op("probe::fa4", mutates_args=())
def fa4_op(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, m: int) -> tuple[Tensor, Tensor]:
    out, lse = fi._flash_attn_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m, max_seqlen_k=m, causal=True, return_lse=True)[:2]
    return out, lse
@fa4_op.register_fake
def _(q, k, v, cu, m):
    return q.new_empty(q.shape), q.new_empty((q.size(1), q.size(0)), dtype=torch.float32)
@torch.library.custom_op("probe::fa4_bwd", mutates_args=())
def fa4_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = fi._flash_attn_bwd(q, k, v, out, do, lse, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m, max_seqlen_k=m)[:3]
    return dq, dk, dv
@fa4_bwd.register_fake
def _(do, q, k, v, out, lse, cu, m):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
def _setup(ctx, inputs, output):
    q, k, v, cu, m = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu); ctx.m = m
def _bwd(ctx, do, dlse):
    q, k, v, out, lse, cu = ctx.saved_tensors
    dq, dk, dv = fa4_bwd(do.contiguous(), q, k, v, out, lse, cu, ctx.m)
    return dq, dk, dv, None, None
fa4_op.register_autograd(_bwd, setup_context=_setup)
def f_op(): return fa4_op(q, k, v, cu, mx)[0]
def timeit(fn, n=20):
    for t in (q, k, v): t.grad = None
    torch.cuda.synchronize()
    e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    fw = bw = 0.0
    for i in range(n):
        e[0].record(); o = fn(); e[1].record(); o.backward(do); e[2].record(); torch.cuda.synchronize()
        fw += e[0].elapsed_time(e[1]); bw += e[1].elapsed_time(e[2])
    return fw / n, bw / n
ref_o, ref_g = run(f_varlen)
res["fa2_ms"] = timeit(f_varlen)
print("FA2 varlen fwd/bwd ms", res["fa2_ms"], flush=True)
t0 = time.time()
try:
    o4, g4 = run(f_fa4)
    res["fa4_first_call_s"] = time.time() - t0
    print("FA4 direct first call (JIT) %.1fs" % res["fa4_first_call_s"], flush=True)
    res["fa4_direct_maxdiff"] = [float((o4 - ref_o).abs().max())] + [float((a - b).abs().max()) for a, b in zip(g4, ref_g)]
    res["fa2_scale"] = [float(ref_o.abs().max())] + [float(b.abs().max()) for b in ref_g]
    print("FA4 direct maxdiff o,dq,dk,dv", res["fa4_direct_maxdiff"], "scale", res["fa2_scale"])
    res["fa4_direct_ms"] = timeit(f_fa4)
    print("FA4 direct fwd/bwd ms", res["fa4_direct_ms"], flush=True)
except Exception:
    traceback.print_exc()
try:
    t0 = time.time()
    o5, g5 = run(f_op)
    res["op_first_call_s"] = time.time() - t0
    res["op_maxdiff"] = [float((o5 - ref_o).abs().max())] + [float((a - b).abs().max()) for a, b in zip(g5, ref_g)]
    res["op_meandiff"] = [float((o5 - ref_o).abs().float().mean())] + [float((a - b).abs().float().mean()) for a, b in zip(g5, ref_g)]
    print("op maxdiff", res["op_maxdiff"], "mean", res["op_meandiff"], "first %.1fs" % res["op_first_call_s"])
    res["op_ms"] = timeit(f_op)
    print("op fwd/bwd ms", res["op_ms"], flush=True)
    cf = torch.compile(lambda q, k, v: fa4_op(q, k, v, cu, mx)[0] * 2, fullgraph=True)
    t0 = time.time()
    for t in (q, k, v): t.grad = None
    o6 = cf(q, k, v); o6.backward(do)
    print("compiled op ok %.1fs maxdiff %.3g dq %.3g" % (time.time() - t0, float((o6.detach() / 2 - ref_o).abs().max()), float((q.grad / 2 - ref_g[0]).abs().max())))
    for n, t in ((64, 2048), (8, 2048), (1, 2048), (64, 32), (1, 32), (3, 96)):
        qq = torch.randn(n * t, 8, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
        kk = torch.randn(n * t, 4, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
        vv = torch.randn(n * t, 4, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
        cc = torch.arange(0, (n + 1) * t, t, device=dev, dtype=torch.int32)
        t0 = time.time()
        oo = fa4_op(qq, kk, vv, cc, t)[0]; oo.float().sum().backward(); torch.cuda.synchronize()
        ref = varlen_attn(qq, kk, vv, cc, cc, t, t, window_size=(-1, 0))
        print(f"ttt shape n={n} t={t} ok first {time.time() - t0:.2f}s maxdiff {float((oo - ref).abs().max()):.3g}", flush=True)
except Exception:
    traceback.print_exc()
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "fa4_probe.json"), "w"), indent=1)

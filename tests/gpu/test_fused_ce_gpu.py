"""GPU check of the fused softcapped cross-entropy at the training shape (98,304 tokens x 8,192, bf16).

    python3 tests/gpu/test_fused_ce_gpu.py        # prints the numbers and a FUSED_CE summary line
    python3 -m pytest -q -s tests/gpu/test_fused_ce_gpu.py

Accuracy: loss and d(loss)/d(logits) of the kernel against the eager fp32 math (softcap, then
F.cross_entropy), symmetric and asymmetric caps. Speed and memory: forward + backward from bf16
logits, median of 20 (CUDA events, after warmup), for the kernel and for torch.compile'd eager
math, and the peak memory each adds on top of its inputs. In the model's use, the tied head
(hidden @ W^T) and the loss compiled together, forward + backward: the plain path (head, then the
fused loss) against FUSED_HEAD_CE's head inside the loss; time, peak memory, gradients.
"""
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # run as a script; under pytest tests/conftest.py does this
    sys.path.append(ROOT)
from tests.gpu.test_fused_mlp_gpu import _tg  # noqa: E402  (train_gpt with compiled Triton, or a skip)

N, V, CAP = 98_304, 8192, 30.0


def _inputs():
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(N, V, device="cuda", generator=gen) * 8).to(torch.bfloat16)
    targets = torch.randint(0, V, (N,), device="cuda", generator=gen)
    return logits, targets, torch.full((N,), 1 / N, device="cuda")


def _loss_and_grad(fn, logits, targets, grad, *caps):
    leaf = logits.detach().requires_grad_()
    loss = fn(leaf, targets, *caps)
    return loss, torch.autograd.grad(loss, leaf, grad)[0]


def accuracy(caps=(CAP, CAP)) -> dict:
    tg = _tg()
    logits, targets, grad = _inputs()
    fused = _loss_and_grad(tg.softcapped_cross_entropy, logits, targets, grad, *caps)
    eager = _loss_and_grad(tg.eager_softcapped_cross_entropy, logits, targets, grad, *caps)
    rel = lambda a, b: ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()  # noqa: E731
    return {"loss": rel(fused[0], eager[0]), "dlogits": rel(fused[1], eager[1]),
            "mean_loss_diff": (fused[0].double().mean() - eager[0].double().mean()).abs().item()}


def _time(fn, logits, targets, grad, iters=20) -> tuple[float, float]:
    for _ in range(3):
        _loss_and_grad(fn, logits, targets, grad, CAP, CAP)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _loss_and_grad(fn, logits, targets, grad, CAP, CAP)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def timings() -> dict:
    tg = _tg()
    logits, targets, grad = _inputs()
    compiled = torch.compile(tg.eager_softcapped_cross_entropy, dynamic=False, fullgraph=True)
    out = {}
    for name, fn in (("fused", tg.softcapped_cross_entropy), ("compiled_eager", compiled)):
        out[f"{name}_ms"], out[f"{name}_extra_mib"] = _time(fn, logits, targets, grad)
    return out


def head_and_loss() -> dict:
    """ms and peak MiB above the inputs of head + loss, forward + backward, compiled as in training,
    for the plain path and FUSED_HEAD_CE's; the largest gradient difference relative to the largest."""
    tg = _tg()
    gen = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(N, 512, device="cuda", generator=gen).bfloat16()
    weight = (torch.randn(V, 512, device="cuda", generator=gen) / 512**0.5).bfloat16()
    targets = torch.randint(0, V, (N,), device="cuda", generator=gen)
    paths = {"plain": lambda h, w: tg.softcapped_cross_entropy(h @ w.T, targets, CAP, CAP).mean(),
             "fused_head": lambda h, w: tg.head_softcapped_cross_entropy(h, w, targets, CAP, CAP).mean()}
    out, grads = {}, {}
    for name, f in paths.items():
        fn = torch.compile(f, dynamic=False, fullgraph=True)
        leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
        for _ in range(3):
            grads[name] = torch.autograd.grad(fn(*leaves), leaves)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.autograd.grad(fn(*leaves), leaves)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        out[f"{name}_ms"] = statistics.median(times)
        out[f"{name}_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    for i, key in enumerate(("dhidden", "dweight")):
        a, b = grads["fused_head"][i].double(), grads["plain"][i].double()
        out[f"{key}_rel"] = ((a - b).abs().max() / b.abs().max()).item()
    return out


def test_head_inside_the_loss_is_smaller_and_no_slower():
    m = head_and_loss()
    print(m)
    assert m["dhidden_rel"] <= 8e-3 and m["dweight_rel"] <= 8e-3, m  # bf16 rounding, in other places
    logits_mib = N * V * 2 / 2**20
    assert m["fused_head_extra_mib"] <= m["plain_extra_mib"] - 0.9 * logits_mib, m
    assert m["fused_head_ms"] <= 1.02 * m["plain_ms"], m


def test_loss_and_grad_match_eager():
    for caps in ((CAP, CAP), (CAP, 15.0)):
        acc = accuracy(caps)
        print(caps, {k: f"{v:.2e}" for k, v in acc.items()})
        assert acc["loss"] <= 1e-5 and acc["mean_loss_diff"] <= 1e-5, acc
        assert acc["dlogits"] <= 8e-3, acc  # two bf16 ulps of the largest gradient


def test_faster_and_smaller_than_compiled_eager():
    t = timings()
    print(summary(t))
    assert t["fused_ms"] < t["compiled_eager_ms"], t


def summary(t=None) -> str:
    t = t or timings()
    moved = 3 * N * V * 2  # bytes at least: bf16 logits read in each direction, bf16 gradient written
    return (f"FUSED_CE N={N} V={V} fused_ms={t['fused_ms']:.3f} compiled_eager_ms={t['compiled_eager_ms']:.3f} "
            f"speedup={t['compiled_eager_ms'] / t['fused_ms']:.2f}x fused_extra_mib={t['fused_extra_mib']:.0f} "
            f"compiled_eager_extra_mib={t['compiled_eager_extra_mib']:.0f} "
            f"fused_GB_per_s={moved / t['fused_ms'] / 1e6:.0f}")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    test_loss_and_grad_match_eager()
    print(summary())
    print("FUSED_HEAD_CE", head_and_loss())

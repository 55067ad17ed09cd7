"""KERNELS: the fused LeakyReLU² MLP and softcapped cross-entropy kernels against the eager math, on
CPU under the Triton interpreter.

Triton fixes interpreted-or-compiled per process: `@triton.jit` reads TRITON_INTERPRET when it runs,
and Triton's own library functions are decorated once, when triton is first imported (often by
another test module, without the interpreter). So the checks run in one child process started
with TRITON_INTERPRET=1 (this file run as a script, printing JSON), and the tests below assert
on its results. Nothing in this pytest process sees the variable.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (M, D, H). M is not a multiple of the interpreter's 32-row tiles; the second shape also leaves
# partial tiles along K (D=24 with 16-wide slabs) and N (H=80 with 32-wide tiles).
SHAPES = [(70, 32, 64), (33, 24, 80)]
CE_CASES = [(1000, (30.0, 30.0), "float32"), (1000, (30.0, 15.0), "float32"), (8192, (30.0, 30.0), "bfloat16")]


def _run_checks():
    """In the child: {check: {quantity: max abs error / max(1, max abs reference)}} in fp32."""
    import torch
    import torch.nn.functional as F
    import train_gpt as tg

    assert tg._TRITON_INTERPRETED, "the kernels must be interpreted in this process"

    def err(got, want):
        assert got.shape == want.shape, f"{tuple(got.shape)} != {tuple(want.shape)}"
        return (got - want).abs().max().item() / max(1.0, want.abs().max().item())

    def grads_vs_eager(fn, x, w_up, w_down, grad=None):
        # loss/output and its gradients through fn and through eager_mlp, from fresh leaves
        rows = []
        for f in (fn, tg.eager_mlp):
            leaves = [t.clone().requires_grad_() for t in (x, w_up, w_down)]
            out = f(*leaves)
            rows.append((out, *torch.autograd.grad(out, leaves, grad)))
        return {k: err(g, w) for k, g, w in zip(("out", "dx", "dw_up", "dw_down"), *rows)}

    results = {}
    for M, D, H in SHAPES:
        gen = torch.Generator().manual_seed(M)
        x, grad = torch.randn(M, D, generator=gen), torch.randn(M, D, generator=gen)
        w_up = torch.randn(H, D, generator=gen) / D**0.5
        w_down = torch.randn(D, H, generator=gen) / H**0.5
        shape = f"{M}x{D}x{H}"
        pre_ref = x @ w_up.T
        pre, post = tg.fused_mlp_up(x, w_up)
        results[f"kernel forward {shape}"] = {
            "pre": err(pre, pre_ref), "post": err(post, F.leaky_relu(pre_ref, 0.5).square())}
        dpre = tg.fused_mlp_up(grad, w_down.T.contiguous(), aux=pre_ref)
        results[f"kernel backward {shape}"] = {
            "dpre": err(dpre, (grad @ w_down) * torch.where(pre_ref > 0, 2 * pre_ref, 0.5 * pre_ref))}
        # leading dims are flattened and restored: feed [2, M/2, D] where M is even
        xs, gs = (x.reshape(2, -1, D), grad.reshape(2, -1, D)) if M % 2 == 0 else (x, grad)
        results[f"autograd {shape}"] = grads_vs_eager(tg.fused_mlp, xs, w_up, w_down, gs)

    # aot_eager: dynamo and AOTAutograd trace the autograd.Function and the custom ops' fake
    # implementations, as fullgraph=True on the GPU needs, without a C++ compiler.
    x, w_up, w_down = torch.randn(40, 32), torch.randn(64, 32) / 32**0.5, torch.randn(32, 64) / 8
    compiled = torch.compile(lambda *t: tg.fused_mlp(*t).square().sum(), backend="aot_eager", fullgraph=True)
    rows = []
    for fn in (compiled, lambda *t: tg.eager_mlp(*t).square().sum()):
        leaves = [t.clone().requires_grad_() for t in (x, w_up, w_down)]
        loss = fn(*leaves)
        rows.append((loss, *torch.autograd.grad(loss, leaves)))
    results["torch.compile fullgraph"] = {k: err(g, w) for k, g, w in zip(("loss", "dx", "dw_up", "dw_down"), *rows)}

    # softcapped cross-entropy: V not a power of two (masked tail), logits big enough to saturate
    # the cap, symmetric and asymmetric caps, bf16 and fp32 inputs
    for V, caps, dtype in CE_CASES:
        gen = torch.Generator().manual_seed(V)
        logits = (torch.randn(37, V, generator=gen) * 40).to(getattr(torch, dtype))
        targets = torch.randint(0, V, (37,), generator=gen)
        grad = torch.rand(37, generator=gen)
        rows = []
        for f in (tg.softcapped_cross_entropy, tg.eager_softcapped_cross_entropy):
            leaf = logits.clone().requires_grad_()
            loss = f(leaf, targets, *caps)
            rows.append((loss, *torch.autograd.grad(loss, leaf, grad)))
        results[f"cross-entropy {V} {caps} {dtype}"] = {k: err(g.float(), w.float())
                                                         for k, g, w in zip(("loss", "dlogits"), *rows)}
    compiled = torch.compile(lambda t, y: tg.softcapped_cross_entropy(t, y, 30.0, 20.0).sum(), backend="aot_eager",
                             fullgraph=True)
    leaf = logits.float().clone().requires_grad_()
    got = torch.autograd.grad(compiled(leaf, targets), leaf)[0]
    leaf = leaf.detach().requires_grad_()
    want = torch.autograd.grad(tg.eager_softcapped_cross_entropy(leaf, targets, 30.0, 20.0).sum(), leaf)[0]
    results["cross-entropy torch.compile fullgraph"] = {"dlogits": err(got, want)}

    # FUSED_HEAD_CE: the head inside the loss; a different upstream gradient per row (the algebra
    # that moves it past the head's products), eagerly and through AOTAutograd's graph
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(37, 24, generator=gen), torch.randn(1000, 24, generator=gen) / 2
    y, row_grad = torch.randint(0, 1000, (37,), generator=gen), torch.rand(37, generator=gen) + 0.5
    fused = lambda a, b: tg.head_softcapped_cross_entropy(a, b, y, 30.0, 20.0)  # noqa: E731
    rows = []
    for fn in (fused, torch.compile(fused, backend="aot_eager", fullgraph=True),
               lambda a, b: tg.eager_softcapped_cross_entropy(a @ b.T, y, 30.0, 20.0)):
        leaves = [t.clone().requires_grad_() for t in (x, w)]
        loss = fn(*leaves)
        rows.append((loss, *torch.autograd.grad(loss, leaves, row_grad)))
    for name, row in (("eager", rows[0]), ("torch.compile", rows[1])):
        results[f"head cross-entropy {name}"] = {k: err(g, w) for k, g, w in zip(("loss", "dx", "dw"), row, rows[2])}

    # the model's forward (the kernels run on CPU here, as on CUDA): FUSED_CE=0 (eager loss),
    # FUSED_CE=1 and FUSED_HEAD_CE=1 give the same loss and parameter gradients
    from tests.test_model import VOCAB, tiny_model
    ids = torch.randint(0, VOCAB, (2, 33), generator=gen)
    grads = {}
    for name, env in (("eager", {"FUSED_CE": 0}), ("fused", {"FUSED_HEAD_CE": 0}), ("fused_head", {})):
        model = tiny_model(seed=6, **env)
        loss = model(ids[:, :-1], ids[:, 1:]).mean()
        grads[name] = [loss] + list(torch.autograd.grad(loss, list(model.parameters())))
    for name in ("fused", "fused_head"):
        results[f"model loss {name}"] = {f"{i}": err(g, w) for i, (g, w) in enumerate(zip(grads[name], grads["eager"]))}
    return results


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), ROOT) if p))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"interpreted checks failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_small(errors, tol=1e-4):
    assert all(e <= tol for e in errors.values()), f"relative errors above {tol}: {errors}"


@pytest.mark.parametrize("shape", [f"{M}x{D}x{H}" for M, D, H in SHAPES])
def test_kernel_forward_stores_pre_and_post(results, shape):
    _assert_small(results[f"kernel forward {shape}"])


@pytest.mark.parametrize("shape", [f"{M}x{D}x{H}" for M, D, H in SHAPES])
def test_kernel_backward_mode_scales_by_activation_derivative(results, shape):
    _assert_small(results[f"kernel backward {shape}"])


@pytest.mark.parametrize("shape", [f"{M}x{D}x{H}" for M, D, H in SHAPES])
def test_fused_mlp_output_and_grads_match_eager(results, shape):
    _assert_small(results[f"autograd {shape}"])


def test_fused_mlp_compiles_fullgraph(results):
    _assert_small(results["torch.compile fullgraph"])


@pytest.mark.parametrize("case", [f"{V} {caps} {dtype}" for V, caps, dtype in CE_CASES])
def test_fused_cross_entropy_loss_and_grad_match_eager(results, case):
    # bf16 gradients are compared after both are rounded to bf16: one ulp of [0.5, 1) is 2^-8
    _assert_small(results[f"cross-entropy {case}"], tol=1e-4 if "float32" in case else 8e-3)


def test_fused_cross_entropy_compiles_fullgraph(results):
    _assert_small(results["cross-entropy torch.compile fullgraph"])


@pytest.mark.parametrize("mode", ["eager", "torch.compile"])
def test_head_inside_the_loss_gives_the_same_loss_and_gradients(results, mode):
    _assert_small(results[f"head cross-entropy {mode}"])


@pytest.mark.parametrize("path", ["fused", "fused_head"])
def test_the_model_trains_the_same_through_the_fused_losses(results, path):
    """GPT.forward with FUSED_CE=1 (and FUSED_HEAD_CE=1) against FUSED_CE=0: loss and every gradient."""
    _assert_small(results[f"model loss {path}"])


if __name__ == "__main__":  # the child process
    sys.path.append(ROOT)
    print(json.dumps(_run_checks()))

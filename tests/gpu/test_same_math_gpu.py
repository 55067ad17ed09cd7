"""GPU check that the fast training path and the plain one do the same math (issue #15).

    python3 tests/gpu/test_same_math_gpu.py              # prints the numbers, then one JSON line
    python3 -m pytest -q tests/gpu/test_same_math_gpu.py  # asserts them (skipped without CUDA)
    python3 tests/gpu/test_same_math_gpu.py --cpu-tiny   # the same code on CPU, tiny model (a dry run)
    python3 tests/gpu/test_same_math_gpu.py FUSED_HEAD_CE=1   # a switch of the fast path (VAR=VALUE)

From the same weights, fresh optimizer state and the same grad_accum micro-batches (98,304-token
packed rows that the training loader reads from a synthetic shard), ONE Trainer.step of
- the fast path: the defaults (FUSED_MLP=1, FUSED_CE=1), pick_attention_backend(), the model under
  torch.compile(dynamic=False, fullgraph=True), Muon's orthogonalize compiled (as Trainer does), and
- the plain path: FUSED_MLP=0, FUSED_CE=0, FUSED_QKV=0, eager model, Muon's orthogonalize uncompiled, attention
  "varlen" (torch's own kernel, run eagerly; "sdpa" would build [T, T] masks and scores, over
  100 GB at T = 98,304; its agreement with the other backends is test_model_gpu.py's check),
must give the same mean loss (relative difference <= 2e-3) and, for every parameter tensor, the same
update (param after - param before) to bf16 tolerance: relative L2 of the difference <= 0.1 and
cosine >= 0.99, or, where the step itself is that sensitive, no worse than twice what the plain path
does when its weights start one bf16 rounding off (see UPDATE_REL_L2 below); the clipped gradients
likewise (relative L2). The weights are the seeded init with O and MLP-down orthogonal instead of
zero: from zero, most tensors get no gradient, and the MLP's backward would multiply by zeros.
Also printed: a floor, the fast path run again from the same start (its kernels are not bitwise
deterministic). Looping off and on.
"""
import json
import os
import sys
import tempfile

import numpy as np
import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import train_gpt as tg  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MAX_REL_DLOSS = 2e-3
# Per tensor, the update may differ from the plain one by rel_l2 <= max(0.1, 2 r) and cosine >= min(0.99,
# 1 - 4 (1 - c)), where r and c are the plain path's own difference when every weight starts off by
# about one bf16 rounding (x (1 + 2^-9 N(0, 1))): the bound is bf16 tolerance as this step measures it.
# The clipped gradients: rel_l2 <= max(0.1, 2 r) with r the same reference's gradient difference.
UPDATE_REL_L2, UPDATE_COS, BF16_NOISE = 0.1, 0.99, 2**-9


def write_synthetic_shard(h) -> None:
    """One train shard of random tokens in documents of 50..3000 tokens (packed_row's recipe in
    test_model_gpu.py), long enough for one step's grad_accum micro-batches."""
    n = h.grad_accum_steps * (h.local_batch_tokens + 1) + 1
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, h.vocab_size, n)
    starts = np.cumsum(rng.integers(50, 3000, n // 50))
    tokens[starts[starts < n]] = tg.BOS_ID
    tokens[0] = tg.BOS_ID
    tg.write_shard(os.path.join(h.dataset_dir, "fineweb_train_000000.bin"), tokens)


def first_batches(h, device) -> list:
    loader = tg.DocumentPackingLoader(h.train_files, h.local_batch_tokens, h.train_seq_len, device=device)
    try:
        return [loader.next_batch() for _ in range(h.grad_accum_steps)]
    finally:
        loader.close()


def run_path(h, device, backend: str, fast: bool, state: dict, batches: list, looping: bool, repeats: int = 1):
    """`repeats` steps of one path, each from `state` with a fresh Trainer, on one model (compiled
    once); each gives (mean loss, clipped grads, updates), fp32 tensors by parameter name."""
    model = tg.build_model(h, device, backend)
    model.looping = looping
    model_fn = tg.compile_for(device, model, dynamic=False, fullgraph=True) if fast else model
    runs = []
    for _ in range(repeats):
        model.load_state_dict(state)
        trainer = tg.Trainer(h, model, model_fn, device, print)
        trainer.loader.close()  # the batches are given; its loader only proved the shard is readable
        if not fast:  # Trainer compiles orthogonalize on CUDA; torch.compile keeps the function as __wrapped__
            trainer.opt.muon.orthogonalize = getattr(trainer.opt.muon.orthogonalize, "__wrapped__",
                                                     trainer.opt.muon.orthogonalize)
        grads = {}
        # AdamW steps first in Optimizers.step, after clipping: every gradient is still there
        trainer.opt.adam_embed.register_step_pre_hook(lambda *_: grads.update(
            {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}))
        loss = trainer.step(0, 0.0, batches)
        updates = {n: p.detach().float() - state[n].float() for n, p in model.named_parameters()}
        runs.append((loss, grads, updates))
    return runs


def compare(a: dict, b: dict) -> dict:
    """Per tensor where b is nonzero: |a - b| / |b| (L2), cosine(a, b), max |a - b|, |b|."""
    out = {}
    for name, ref in b.items():
        x, ref = a[name].double(), ref.double()
        norm = ref.norm().item()
        if norm == 0:
            continue
        diff = x - ref
        out[name] = {"rel_l2": diff.norm().item() / norm, "max_abs": diff.abs().max().item(), "norm": norm,
                     "cos": (x * ref).sum().item() / max(x.norm().item() * norm, 1e-300)}
    return out


def same_math(looping: bool, data_dir: str, env: dict | None = None, device=None) -> dict:
    device = torch.device(device or "cuda")
    # EMA_SELECT=0: one step's shard holds no batches to hold out, and the EMA plays no part in a step
    env = dict(env or {}, DATA_DIR=data_dir, EMA_SELECT="0")
    h_fast = tg.Hyperparameters(env=env)
    h_plain = tg.Hyperparameters(env=dict(env, FUSED_MLP="0", FUSED_CE="0", FUSED_QKV="0"))
    write_synthetic_shard(h_fast)
    batches = first_batches(h_fast, device)
    torch.manual_seed(0)
    model = tg.build_model(h_fast, device)
    with torch.no_grad():  # O and MLP-down start at zero, and so would most gradients: orthogonal like the rest
        for w in (*model.qo_bank[h_fast.num_layers:], *model.mlp_down_bank):
            torch.nn.init.orthogonal_(w)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    noisy = {k: (v.float() * (1 + BF16_NOISE * torch.randn_like(v.float()))).to(v.dtype) for k, v in state.items()}
    del model
    fast_backend = tg.pick_attention_backend()
    plain_backend = "varlen" if device.type == "cuda" else "sdpa"
    (plain,) = run_path(h_plain, device, plain_backend, False, state, batches, looping)
    (ref,) = run_path(h_plain, device, plain_backend, False, noisy, batches, looping)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    fast, again = run_path(h_fast, device, fast_backend, True, state, batches, looping, repeats=2)
    update, grad, noise, grad_noise, floor = (compare(fast[2], plain[2]), compare(fast[1], plain[1]),
                                              compare(ref[2], plain[2]), compare(ref[1], plain[1]),
                                              compare(again[2], fast[2]))
    tensors = {}
    for name, u in update.items():
        n, g, f = noise.get(name, {}), grad.get(name, {}), floor.get(name, {})
        tensors[name] = dict(u, grad_rel_l2=g.get("rel_l2", 0.0), grad_cos=g.get("cos", 1.0),
                             grad_tol=max(UPDATE_REL_L2, 2 * grad_noise.get(name, {}).get("rel_l2", 0.0)),
                             ref_rel_l2=n.get("rel_l2", 0.0), ref_cos=n.get("cos", 1.0),
                             rel_tol=max(UPDATE_REL_L2, 2 * n.get("rel_l2", 0.0)),
                             cos_tol=min(UPDATE_COS, 1 - 4 * (1 - n.get("cos", 1.0))),
                             floor_rel_l2=f.get("rel_l2", 0.0))
    worst = max(tensors, key=lambda k: tensors[k]["rel_l2"] / tensors[k]["rel_tol"])
    return {"looping": looping, "fast_backend": fast_backend, "plain_backend": plain_backend,
            "fused_mlp": (h_fast.fused_mlp, h_plain.fused_mlp),
            "fused_ce": (getattr(h_fast, "fused_ce", None), getattr(h_plain, "fused_ce", None)),
            "micro_batch_tokens": h_fast.local_batch_tokens, "grad_accum_steps": h_fast.grad_accum_steps,
            "loss_plain": plain[0], "loss_fast": fast[0], "loss_fast_again": again[0], "loss_ref": ref[0],
            "rel_dloss": abs(fast[0] - plain[0]) / abs(plain[0]), "worst_update": worst,
            "worst_update_rel_l2": tensors[worst]["rel_l2"], "min_update_cos": min(t["cos"] for t in tensors.values()),
            "tensors": tensors}


def report(r: dict) -> None:
    print(f"SAME MATH looping={r['looping']}: fast {r['fast_backend']} (fused_mlp, fused_ce = "
          f"{r['fused_mlp'][0]}, {r['fused_ce'][0]}) vs plain {r['plain_backend']} ({r['fused_mlp'][1]}, "
          f"{r['fused_ce'][1]}), {r['grad_accum_steps']} x {r['micro_batch_tokens']} tokens", flush=True)
    print(f"  loss plain {r['loss_plain']:.6f} fast {r['loss_fast']:.6f} (again {r['loss_fast_again']:.6f}, "
          f"bf16 ref {r['loss_ref']:.6f}) |dloss|/loss {r['rel_dloss']:.2e}", flush=True)
    print("  update u = param after - before; fast vs plain (rel_l2 <= tol, cos >= tol); bf16 ref = plain from "
          "weights x (1 + 2^-9 noise) vs plain; floor = fast again vs fast", flush=True)
    cols = (("|u|", "norm"), ("rel_l2", "rel_l2"), ("tol", "rel_tol"), ("cos", "cos"), ("tol", "cos_tol"),
            ("max_abs", "max_abs"), ("grad rel", "grad_rel_l2"), ("tol", "grad_tol"), ("grad cos", "grad_cos"),
            ("ref rel", "ref_rel_l2"), ("ref cos", "ref_cos"), ("floor", "floor_rel_l2"))
    print(f"  {'tensor':23s}" + "".join(f"{c:>10s}" for c, _ in cols), flush=True)
    for name, t in r["tensors"].items():
        print(f"  {name:23s}" + "".join(f"{t[k]:10.5f}" if "cos" in k else f"{t[k]:10.2e}" for _, k in cols),
              flush=True)
    print(f"  worst update (against its tolerance): {r['worst_update']} rel_l2 {r['worst_update_rel_l2']:.2e}; "
          f"lowest cosine {r['min_update_cos']:.5f}", flush=True)


def check(r: dict) -> None:
    assert r["rel_dloss"] <= MAX_REL_DLOSS, (r["loss_fast"], r["loss_plain"])
    for name, t in r["tensors"].items():
        assert t["rel_l2"] <= t["rel_tol"] and t["cos"] >= t["cos_tol"], (name, t)
        assert t["grad_rel_l2"] <= t["grad_tol"], (name, t)


@pytest.mark.parametrize("looping, extra", [(False, {}), (True, {}), (False, {"FUSED_HEAD_CE": "1"})])
def test_fast_and_plain_paths_take_the_same_step(looping, extra, tmp_path):
    """extra: switches of the fast path only (FUSED_HEAD_CE: the head inside the fused loss)."""
    r = same_math(looping, str(tmp_path), extra)
    report(r)
    check(r)


if __name__ == "__main__":
    env, device = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a), "cuda"  # e.g. FUSED_HEAD_CE=1
    if "--cpu-tiny" in sys.argv:  # tests/conftest.py's tiny model, on CPU: both paths are eager there
        from tests.conftest import TINY_ENV
        env, device = dict(TINY_ENV, VOCAB_SIZE="512", **env), "cpu"
    results = []
    for looping in (False, True):
        with tempfile.TemporaryDirectory() as data_dir:
            results.append(same_math(looping, data_dir, env, device))
        report(results[-1])
    print(json.dumps(results), flush=True)
    for r in results:
        check(r)

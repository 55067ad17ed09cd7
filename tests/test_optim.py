"""OPTIMIZERS AND EMA: Muon against a plain single-matrix implementation, gradient synchronisation
over 2 gloo processes (sharded Muon, packed small-tensor all-reduce) against one process with
gradient accumulation, the schedule reaching every optimizer, and the bias-corrected EMA.

CPU only. The 2-process checks start this file as a script twice (RANK 0 and 1, gloo on
127.0.0.1); their results come back through torch.save files.
Run: python3 -m pytest -q tests/test_optim.py
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import train_gpt as tg
from tests.evalkit import _free_port, one_thread  # noqa: F401  (autouse: one CPU thread)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The model of the 2-process checks: 5 layers, so that the MLP banks (5 matrices) are padded to 6
# for 2 ranks while the attention banks (10) split evenly.
DIST_ENV = {
    "NUM_LAYERS": "5", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MLP_MULT": "2",
    "LOOP_START": "1", "LOOP_END": "2", "PARALLEL_START_LAYER": "4", "XSA_LAST_N": "2", "ROPE_DIMS": "8",
    "VOCAB_SIZE": "512", "TRAIN_SEQ_LEN": "64", "EVAL_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "1024",
    "VAL_BATCH_TOKENS": "512", "GPTQ_CALIBRATION_BATCHES": "2", "GRAD_CLIP_NORM": "0", "SEED": "0",
}
DIST_STEPS = 3
HALF_TOKENS = 96  # tokens per rank (per half of the global batch) and step


# ---------------------------------------------------------------------------------------------
# Muon, one process
# ---------------------------------------------------------------------------------------------

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def reference_orthogonalize(m: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Quintic Newton-Schulz of one matrix, in bf16, the short side first."""
    a, b, c = NS_COEFFS
    x = m.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class ReferenceMuon:
    """Muon for a list of matrices, one at a time: bf16 momentum buffer, Nesterov, each row of the
    update normalised, Newton-Schulz, decoupled weight decay, scale sqrt(max(1, rows / cols))."""

    def __init__(self, matrices, lr, momentum, weight_decay, row_normalize=True):
        self.w = [m.clone() for m in matrices]
        self.buf = [torch.zeros_like(m, dtype=torch.bfloat16) for m in matrices]
        self.lr, self.mu, self.wd, self.row_normalize = lr, momentum, weight_decay, row_normalize

    def step(self, grads):
        for i, g in enumerate(grads):
            g = g.bfloat16()
            self.buf[i] = self.buf[i] * self.mu + g
            # Nesterov: u = g + mu * buf, rounded to bf16 once (a fused add). Rounding mu * buf first
            # moves u by one bf16 ulp here and there, and bf16 Newton-Schulz turns that into
            # differences of ~0.05 in the orthogonalized matrix, so the reference rounds like Muon.
            u = torch.add(g, self.buf[i], alpha=self.mu)
            if self.row_normalize:
                u = u / u.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).bfloat16()
            o = reference_orthogonalize(u) * math.sqrt(max(1.0, u.size(0) / u.size(1)))
            self.w[i] = self.w[i] * (1 - self.lr * self.wd) - self.lr * o.float()


def test_newton_schulz_is_nearly_orthogonal():
    g = torch.Generator().manual_seed(0)
    for shape in ((3, 8, 4), (2, 4, 8), (1, 32, 32)):
        out = tg.newton_schulz5(torch.randn(*shape, generator=g), 5)
        assert out.dtype == torch.bfloat16 and out.shape == shape
        s = torch.linalg.svdvals(out.float())
        assert s.min() > 0.5 and s.max() < 1.3  # the quintic's band around 1, not exact
    # zero matrices (e.g. MLP-up's gradient while MLP-down is still zero) give zero, not NaN
    assert not tg.newton_schulz5(torch.zeros(2, 4, 8), 5).any()


def test_polar_express_is_closer_to_the_polar_factor_than_the_fixed_quintic():
    """MUON_POLAR_EXPRESS=1: the same 5 steps land nearer U V^T on ill-conditioned matrices (singular
    values over three decades), keep the bf16 output and the zero-in zero-out property."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(4, 96, 48, generator=g) * torch.logspace(-3, 0, 48)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    err = {f.__name__: float((f(G, 5).float() - polar).norm() / polar.norm())
           for f in (tg.newton_schulz5, tg.polar_express)}
    assert err["polar_express"] < 0.75 * err["newton_schulz5"], err
    out = tg.polar_express(torch.randn(2, 8, 32, generator=g), 5)
    s = torch.linalg.svdvals(out.float())
    assert out.dtype == torch.bfloat16 and s.min() > 0.7 and s.max() < 1.2
    assert not tg.polar_express(torch.zeros(2, 4, 8), 7).any()  # past five steps: the last quintic again
    assert tg.Optimizers(tg.build_model(dist_hparams(), torch.device("cpu")),
                         dist_hparams(MUON_POLAR_EXPRESS=1)).muon.orthogonalize is tg.polar_express
    assert tg.Optimizers(tg.build_model(dist_hparams(), torch.device("cpu")),
                         dist_hparams(MUON_POLAR_EXPRESS=0)).muon.orthogonalize is tg.newton_schulz5


def test_muon_weight_decay_taper():
    h = dist_hparams(MUON_WD_TAPER_AT=0.7, MUON_WD_TAPER=0.5)
    assert [tg.muon_wd_at(f, h) for f in (0.0, 0.69, 0.7, 1.0)] == [h.muon_wd] * 2 + [0.5 * h.muon_wd] * 2
    off = dist_hparams(MUON_WD_TAPER_AT=0)
    assert all(tg.muon_wd_at(f, off) == off.muon_wd for f in (0.0, 0.9, 1.0))
    opt = tg.Optimizers(tg.build_model(h, torch.device("cpu")), h)
    opt.set_schedule(1.0, 0.95, tg.muon_wd_at(0.8, h))
    assert opt.muon.param_groups[0]["weight_decay"] == pytest.approx(0.5 * h.muon_wd)


def test_split_weight_decay_scales_the_mlp_banks_only():
    """MUON_WD_MLP_FACTOR=f: with zero gradients a Muon step is pure decay, 1 - lr wd for the
    attention banks and 1 - lr wd f for the MLP banks."""
    h = dist_hparams(MUON_WD_MLP_FACTOR=3)
    model = tg.build_model(h, torch.device("cpu"))
    opt = tg.Optimizers(model, h)
    banks = {n: getattr(model, n) for n in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")}
    with torch.no_grad():
        for b in banks.values():
            b.fill_(1.0)
            b.grad = torch.zeros_like(b)
    opt.muon.launch_reduce_scatter()
    opt.muon.step()
    lr, wd = h.matrix_lr, h.muon_wd
    for name, b in banks.items():
        factor = 3 if name.startswith("mlp") else 1
        torch.testing.assert_close(b.detach(), torch.full_like(b, 1 - lr * wd * factor))


@pytest.mark.parametrize("row_normalize", [True, False])
def test_muon_step_matches_single_matrix_reference(row_normalize):
    g = torch.Generator().manual_seed(1)
    banks = [nn.Parameter(torch.randn(3, 8, 4, generator=g)), nn.Parameter(torch.randn(2, 4, 8, generator=g))]
    lr, mu, wd = 0.05, 0.9, 0.1
    muon = tg.Muon(banks, lr=lr, momentum=mu, weight_decay=wd, ns_steps=5, row_normalize=row_normalize)
    matrices = [m for bank in banks for m in bank.detach()]
    ref = ReferenceMuon(matrices, lr, mu, wd, row_normalize)
    for step in range(3):
        grads = [torch.randn(b.shape, generator=g) * (step + 1) for b in banks]
        grads[0][1] = 0  # a matrix without gradient: only weight decay and momentum act on it
        for b, gr in zip(banks, grads):
            b.grad = gr.clone()
        before = [b.detach().clone() for b in banks]
        muon.launch_reduce_scatter()
        muon.step()
        ref.step([m for gr in grads for m in gr])
        got = [m for b in banks for m in b.detach()]
        prev = [m for b in before for m in b]
        for i, (w, w_ref, w_prev) in enumerate(zip(got, ref.w, prev)):
            # the applied update, in units of lr: the same bf16 matrix (fp32 rounding of the apply aside)
            upd, upd_ref = (w_prev * (1 - lr * wd) - w) / lr, (w_prev * (1 - lr * wd) - w_ref) / lr
            torch.testing.assert_close(upd, upd_ref, atol=1e-4, rtol=0, msg=f"step {step} matrix {i}")
            torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-6)
        ref.w = [w.clone() for w in got]  # continue from the same weights
    state = [muon.state[b]["momentum_buffer"] for b in banks]
    assert all(s.dtype == torch.bfloat16 for s in state)
    torch.testing.assert_close(torch.cat([s.flatten() for s in state]).float(),
                               torch.cat([b.flatten() for b in ref.buf]).float(), atol=0, rtol=0)
    # the update of the tall bank [3, 8, 4] is scaled by sqrt(2), the wide one's by 1
    g2 = torch.Generator().manual_seed(2)
    for b in banks:
        b.grad = torch.randn(b.shape, generator=g2)
    fresh = tg.Muon(banks, lr=1.0, momentum=0.0, weight_decay=0.0, ns_steps=5)
    before = [b.detach().clone() for b in banks]
    fresh.launch_reduce_scatter()
    fresh.step()
    for b, w0, scale in zip(banks, before, (math.sqrt(2), 1.0)):
        s = torch.linalg.svdvals((w0 - b.detach()).float())
        assert 0.5 * scale < s.mean() < 1.3 * scale


def test_muon_keeps_bf16_momentum_and_exact_buffer_recurrence():
    p = nn.Parameter(torch.zeros(1, 4, 4))
    muon = tg.Muon([p], lr=0.0, momentum=0.5, weight_decay=0.0, ns_steps=5)
    grads = [torch.full((1, 4, 4), v) for v in (1.0, 2.0, 4.0)]
    expected = torch.zeros(1, 4, 4)
    for gr in grads:
        p.grad = gr
        muon.launch_reduce_scatter()
        muon.step()
        expected = 0.5 * expected + gr
        assert muon.state[p]["momentum_buffer"].dtype == torch.bfloat16
        torch.testing.assert_close(muon.state[p]["momentum_buffer"].float(), expected, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Two gloo processes vs one process with gradient accumulation
# ---------------------------------------------------------------------------------------------


def dist_hparams(**env) -> tg.Hyperparameters:
    return tg.Hyperparameters(env=dict(DIST_ENV, **{k: str(v) for k, v in env.items()}))


def fp32_model(h) -> tg.GPT:
    torch.manual_seed(0)
    model = tg.build_model(h, torch.device("cpu")).float()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero output matrices, so every bank learns from the first step
        model.qo_bank[h.num_layers:] = 0.05 * torch.randn(model.qo_bank[h.num_layers:].shape, generator=g)
        model.mlp_down_bank.copy_(0.05 * torch.randn(model.mlp_down_bank.shape, generator=g))
    return model


def global_batch(step: int) -> list:
    """The two halves (x, y, cu_seqlens) of one step's global batch: packed rows of documents."""
    g = torch.Generator().manual_seed(1000 + step)
    halves = []
    for _ in range(2):
        tokens = torch.randint(2, 512, (HALF_TOKENS + 1,), generator=g)
        starts = torch.randint(1, HALF_TOKENS, (4,), generator=g)
        tokens[starts] = tg.BOS_ID
        tokens[0] = tg.BOS_ID
        cu, _ = tg.build_cu_seqlens(tokens[:-1].numpy(), 64)
        halves.append((tokens[:-1], tokens[1:], torch.from_numpy(cu)))
    return halves


def rank_grads(model: tg.GPT, rank: int) -> dict:
    """Distinct gradients per rank, reproducible in any process."""
    out = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        g = torch.Generator().manual_seed(10_000 * (rank + 1) + i)
        out[name] = (torch.randn(p.shape, generator=g) * (rank + 1)).to(p.dtype)
    return out


def worker_packed_sync(h) -> dict:
    """Each rank sets its own gradients and runs the replicated-gradient sync; with the default size
    threshold (the tiny tok_emb, 32,768 bf16 elements, is 'small'), and with a threshold of 1,024 (it
    gets its own all-reduce). The model has the GPU dtypes (tok_emb bf16, the rest fp32), so the
    small tensors fall in two (device, dtype) groups."""
    results = {}
    original_all_reduce, original_threshold = tg.all_reduce_avg, tg.SMALL_TENSOR_NUMEL
    for threshold in (original_threshold, 1024):
        tg.SMALL_TENSOR_NUMEL = threshold
        calls = []
        tg.all_reduce_avg = lambda t: calls.append((t.numel(), str(t.dtype))) or original_all_reduce(t)
        try:
            torch.manual_seed(0)
            model = tg.GPT(h)
            opt = tg.Optimizers(model, h)
            for name, p in model.named_parameters():
                p.grad = rank_grads(model, h.rank)[name].clone()
            for work in opt.sync_replicated_grads():
                work.wait()
        finally:
            tg.all_reduce_avg, tg.SMALL_TENSOR_NUMEL = original_all_reduce, original_threshold
        results[threshold] = {"grads": {n: p.grad.clone() for n, p in model.named_parameters()}, "calls": calls}
    return results


def train_steps(h, rank: int | None) -> tuple[dict, list]:
    """DIST_STEPS optimizer steps of the fp32 model. rank None: one process over both halves with
    gradient accumulation 2; otherwise this rank's half, synchronised inside Optimizers.step.

    Muon works on bf16 gradients: 2 ranks round each half's bank gradient to bf16 before averaging
    (they send bf16), one process rounds the average once. One bf16 ulp in Muon's input becomes
    ~5% of an element of its Newton-Schulz output, so the single process rounds its bank gradients
    the way the ranks do; everything else (the replicated tensors' fp32 gradients, Adam) is the
    plain accumulation: mean over tokens, each half's loss divided by 2."""
    model = fp32_model(h)
    opt = tg.Optimizers(model, h)
    losses = []
    for step in range(DIST_STEPS):
        model.looping = step == DIST_STEPS - 1
        halves = global_batch(step)
        mine = halves if rank is None else [halves[rank]]
        sent = {id(p): [] for p in opt.banks}
        for x, y, cu in mine:
            loss = model(x, y, cu, 64).mean()
            (loss / len(mine)).backward()
            losses.append(loss.item())
            if rank is None:  # what each rank would send: its own half's gradient in bf16
                for p in opt.banks:
                    sent[id(p)].append((p.grad * len(mine)).bfloat16().float())
                    p.grad = None
        if rank is None:
            for p in opt.banks:
                p.grad = (sent[id(p)][0] + sent[id(p)][1]) / 2
        opt.set_schedule(tg.lr_multiplier(0.0, h), tg.muon_momentum_at(step, h))
        opt.step()
    return {n: t.detach().clone() for n, t in model.state_dict().items()}, losses


def _worker_main(out_path: str) -> None:
    torch.set_num_threads(1)
    import datetime
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    h = dist_hparams(RANK=os.environ["RANK"], WORLD_SIZE=os.environ["WORLD_SIZE"])
    assert h.distributed and h.world_size == 2 and dist.get_world_size() == 2
    results = {"packed": worker_packed_sync(h), "train": train_steps(h, h.rank)}
    torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Runs this file as 2 gloo ranks; returns [rank 0 results, rank 1 results]."""
    folder = tmp_path_factory.mktemp("gloo")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = []
    for rank in range(2):
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), str(folder / f"rank{rank}.pt")],
                                      env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_ranks_match_one_process_with_grad_accumulation(two_ranks):
    h = dist_hparams()
    assert not h.distributed and h.grad_clip_norm == 0  # clipping would see each rank's local gradient
    ref_state, ref_losses = train_steps(h, None)
    (state0, losses0), (state1, losses1) = two_ranks[0]["train"], two_ranks[1]["train"]
    # each rank saw its half: its losses are the single process's losses of that half
    torch.testing.assert_close(torch.tensor(losses0), torch.tensor(ref_losses[0::2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(losses1), torch.tensor(ref_losses[1::2]), atol=1e-5, rtol=0)
    init = fp32_model(h).state_dict()
    for name, ref in ref_state.items():
        assert torch.equal(state0[name], state1[name]), name  # the replicas stay identical, bit for bit
        torch.testing.assert_close(state0[name], ref, atol=1e-6, rtol=1e-5, msg=name)
        assert (ref - init[name]).abs().max() > 1e-3, name  # and every tensor did move


def test_packed_all_reduce_averages_every_replicated_gradient(two_ranks):
    h = dist_hparams()
    torch.manual_seed(0)
    model = tg.GPT(h)
    g0, g1 = rank_grads(model, 0), rank_grads(model, 1)
    bank_names = {"qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"}
    for threshold in (tg.SMALL_TENSOR_NUMEL, 1024):
        r0, r1 = two_ranks[0]["packed"][threshold], two_ranks[1]["packed"][threshold]
        for name in g0:
            if name in bank_names:  # banks are Muon's, reduce-scattered there: untouched here
                assert torch.equal(r0["grads"][name], g0[name]) and torch.equal(r1["grads"][name], g1[name]), name
                continue
            mean = ((g0[name].float() + g1[name].float()) / 2).to(g0[name].dtype)
            assert torch.equal(r0["grads"][name], r1["grads"][name]), name
            got = r0["grads"][name]
            assert got.dtype == g0[name].dtype
            tol = 1e-6 if got.dtype == torch.float32 else 2 ** -7  # bf16: the sum is rounded before halving
            torch.testing.assert_close(got.float(), mean.float(), atol=0, rtol=tol, msg=name)
        # one all-reduce per (dtype) group of small tensors; tok_emb alone once it is above the threshold
        n_scalars = sum(p.numel() for n, p in model.named_parameters() if n not in bank_names | {"tok_emb.weight"})
        emb = model.tok_emb.weight.numel()
        assert sorted(r0["calls"]) == sorted([(emb, "torch.bfloat16"), (n_scalars, "torch.float32")]), r0["calls"]
        assert r0["calls"] == r1["calls"]


# ---------------------------------------------------------------------------------------------
# EMA and the optimizers' schedule hook
# ---------------------------------------------------------------------------------------------


def test_ema_of_constant_weights_is_that_constant_from_the_first_step():
    model = nn.Linear(5, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 5))
        model.bias.copy_(torch.randn(3))
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    for decay in (0.9965, 0.9):
        ema = tg.EMA(model, decay)
        for _ in range(6):
            ema.update(model)
            for name, value in ema.averaged().items():
                torch.testing.assert_close(value, want[name], atol=0, rtol=2e-5)
    ema.copy_to(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], atol=0, rtol=2e-5)


@pytest.mark.parametrize("k", [9.0, 30.0])
def test_ema_matches_the_warmed_up_bias_corrected_formula(k):
    """With d_t = min(decay, (1+t)/(1+k+t)) (k = EMA_WINDOW_DIVISOR; 9 gives (1+t)/(10+t)):
    shadow_t = sum_i (1-d_i) prod_{j>i} d_j w_i, divided by 1 - prod_i d_i."""
    decay = 0.8 if k == 9 else 0.9
    model = nn.Linear(4, 2, bias=False)
    ema = tg.EMA(model, decay, k)
    g = torch.Generator().manual_seed(3)
    history = []
    for t in range(1, 40):
        with torch.no_grad():
            model.weight.copy_(torch.randn(2, 4, generator=g))
        history.append(model.weight.detach().double().clone())
        ema.update(model)
        d = [min(decay, (1 + i) / (1 + k + i)) for i in range(1, t + 1)]
        shadow = sum((1 - d[i]) * math.prod(d[i + 1:]) * w for i, w in enumerate(history))
        want = shadow / (1 - math.prod(d))
        torch.testing.assert_close(ema.averaged()["weight"].double(), want, atol=1e-6, rtol=1e-6)
    assert ema.decay_at(39) == min(decay, 40 / (40 + k))  # k = 9: warmed up, 40/49 > 0.8; k = 30: not yet
    state = ema.state_dict()
    other = tg.EMA(model, decay, k)
    other.load_state_dict(state)
    assert other.steps == 39 and torch.equal(other.averaged()["weight"], ema.averaged()["weight"])


def test_ema_without_updates_leaves_the_weights_alone():
    """A run that makes no optimizer step (ITERATIONS=0, or MAX_WALLCLOCK_SECONDS at most
    GPTQ_RESERVE_SECONDS, which stops the loop at step 0) still ends with run()'s
    `trainer.ema.copy_to(model)`. There is no average yet: the model must keep its weights,
    not be overwritten with the all-zero shadow."""
    model = nn.Linear(4, 3)
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    tg.EMA(model, 0.9965).copy_to(model)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), want[name]), f"{name} was overwritten by an EMA of zero steps"


def test_ema_of_bf16_weights_is_kept_in_fp32():
    model = nn.Linear(4, 4).to(torch.bfloat16)
    ema = tg.EMA(model, 0.9)
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    ema.update(model)
    ema.copy_to(model)
    assert model.weight.dtype == torch.bfloat16


def test_schedule_reaches_every_optimizer():
    h = dist_hparams()
    model = tg.build_model(h, torch.device("cpu"))
    opt = tg.Optimizers(model, h)
    opt.set_schedule(0.25, 0.93)
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.25 * h.matrix_lr)
    assert opt.muon.param_groups[0]["momentum"] == 0.93
    assert opt.adam_embed.param_groups[0]["lr"] == pytest.approx(0.25 * h.tied_embed_lr)
    assert opt.adam_scalars.param_groups[0]["lr"] == pytest.approx(0.25 * h.scalar_lr)
    # every parameter is in exactly one optimizer; the banks in Muon, tok_emb alone in its AdamW
    groups = [{id(p) for g in o.param_groups for p in g["params"]} for o in opt.all]
    assert sum(map(len, groups)) == len(list(model.parameters())) == len(set().union(*groups))
    assert groups[0] == {id(p) for p in (model.qo_bank, model.kv_bank, model.mlp_up_bank, model.mlp_down_bank)}
    assert groups[1] == {id(model.tok_emb.weight)}
    assert opt.adam_embed.param_groups[0]["weight_decay"] == h.embed_wd
    assert opt.adam_scalars.param_groups[0]["weight_decay"] == h.adam_wd
    assert opt.muon.param_groups[0]["weight_decay"] == h.muon_wd


if __name__ == "__main__":  # a rank of the 2-process checks (started by the two_ranks fixture)
    _worker_main(sys.argv[1])

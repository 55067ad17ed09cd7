"""TEST-TIME TRAINING: per-document score-first LoRA adaptation (train_gpt.py TTT section).

Documents, batches and chunk windows are checked against their definitions; the TTT numbers
against references computed here, on a tiny fp32 model with random weights (tests/evalkit.py).
To see what TTT scores, a recording model_fn keeps each chunk forward's per-token losses, and
per_target_losses() maps them back to (document, target position) with the window rule of ttt_chunk_inputs;
that map is checked to add up to exactly what ttt_batch returns. CPU only; the 2-rank tests
start two gloo processes. Run: python3 -m pytest -q tests/test_ttt.py
"""
import copy
import math
import re
import types
import random

import pytest
import torch

import train_gpt as tg
from tests.evalkit import (CPU, SumsSpy, doc_stream, docs_of_lengths, make_model,
                           run_two_ranks, stream_bytes)
from tests.evalkit import one_thread, setup  # noqa: F401  (fixtures shared with test_eval.py)

CHUNK, WINDOW = 8, 32  # TTT_CHUNK_SIZE, TTT_EVAL_SEQ_LEN of SMALL_ENV


# ---------------------------------------------------------------------------------------------
# Documents and batches
# ---------------------------------------------------------------------------------------------


def random_stream(rng: random.Random, n: int, p_bos: float, first_bos: bool) -> torch.Tensor:
    tokens = [tg.BOS_ID if rng.random() < p_bos else rng.randrange(2, 500) for _ in range(n)]
    if n:
        tokens[0] = tg.BOS_ID if first_bos else 7
    return torch.tensor(tokens)


@pytest.mark.parametrize("n, p_bos, first_bos", [
    (500, 0.05, True), (500, 0.05, False), (300, 0.5, True),  # many consecutive BOS (empty documents)
    (40, 0.0, True), (40, 0.0, False), (2, 0.0, True), (1, 0.0, True),
])
def test_split_documents_covers_every_target_once(n, p_bos, first_bos):
    rng = random.Random(n + int(100 * p_bos) + first_bos)
    for trial in range(5):
        tokens = random_stream(rng, n, p_bos, first_bos)
        if trial == 1 and n > 2:
            tokens[-1] = tg.BOS_ID  # a stream that ends on a BOS
        docs = tg.split_documents(tokens)
        assert sum(length - 1 for _, length in docs) == max(n - 1, 0)
        position = 0
        for k, (start, length) in enumerate(docs):
            assert start == position and length >= 2  # contiguous: each starts at the previous one's last token
            doc = tokens[start:start + length].tolist()
            assert doc[0] == tg.BOS_ID or (start == 0 and not first_bos)
            assert tg.BOS_ID not in doc[1:-1]
            if k < len(docs) - 1:
                assert doc[-1] == tg.BOS_ID  # the last target is the next document's BOS
            position = start + length - 1
        assert position == max(n - 1, 0)


@pytest.mark.parametrize("n, fraction, seed", [(37, 0.3, 5), (10, 0.5, 0), (200, 0.07, 1337), (1, 0.9, 2)])
def test_select_documents_is_the_records_seeded_sample(n, fraction, seed):
    docs = [(10 * i, i + 2) for i in range(n)]
    expected = [docs[i] for i in sorted(random.Random(seed).sample(range(n), round(n * fraction)))]
    assert tg.select_documents(docs, fraction, seed) == expected
    assert tg.select_documents(docs, 1.0, seed) == docs


@pytest.mark.parametrize("n_docs, batch_size", [(23, 5), (20, 5), (3, 8), (1, 1)])
def test_ttt_batches_order(n_docs, batch_size):
    rng = random.Random(n_docs)
    docs = [(i * 1000, rng.choice([2, 3, 9, 40, 41, 300]) + rng.randrange(3)) for i in range(n_docs)]
    batches = tg.ttt_batches(docs, batch_size)
    assert sorted(d for b in batches for d in b) == sorted(docs)
    # groups of batch_size documents of the length-sorted list (the longest group the short one)
    ordered = sorted(length for _, length in docs)
    groups = sorted(ordered[i:i + batch_size] for i in range(0, n_docs, batch_size))
    assert sorted(sorted(length for _, length in b) for b in batches) == groups
    for b in batches:  # each batch longest first
        assert [length for _, length in b] == sorted((length for _, length in b), reverse=True)
    maxima = [b[0][1] for b in batches]  # longest batches first
    assert maxima == sorted(maxima, reverse=True)


# ---------------------------------------------------------------------------------------------
# Chunk windows
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [32, 20, 8])
def test_ttt_chunk_inputs_windows_and_coverage(window):
    rng = random.Random(window)
    lengths = sorted((rng.randrange(2, 120) for _ in range(9)), reverse=True) + [2]
    tokens = torch.tensor([rng.randrange(2, 500) for _ in range(sum(lengths) + 1)])  # no 0: padding shows
    starts, s = [], 0
    for n in lengths:
        starts.append(s)
        tokens[s] = tg.BOS_ID
        s += n - 1  # the next document starts on this one's last token
    pred_lens = [n - 1 for n in lengths]
    covered = [torch.zeros(p, dtype=torch.int64) for p in pred_lens]
    for ci in range(-(-pred_lens[0] // CHUNK)):
        n = sum(p > ci * CHUNK for p in pred_lens)  # the documents that have chunk ci (a prefix)
        # as TTTSlots holds them: a rounded-up slot count (empty slots: pred_len 0) and a padded window
        size = tg.ttt_slot_bucket(n + 1)
        context = tg.ttt_context_bucket(min((ci + 1) * CHUNK, window), CHUNK, window)
        pad = [0] * (size - n)
        x, y, at, scored = tg.ttt_chunk_inputs(tokens, torch.tensor(starts[:n] + pad), torch.tensor(pred_lens[:n] + pad),
                                               torch.tensor(ci), CHUNK, window, context)
        assert x.shape == y.shape == (size, context) and at.shape == scored.shape == (size, CHUNK)
        assert context >= min((ci + 1) * CHUNK, window)
        assert not x[n:].any() and not y[n:].any() and not scored[n:].any()  # empty slots score nothing
        for i in range(n):
            end = min(pred_lens[i], (ci + 1) * CHUNK)  # the chunk's end: its last target is doc token `end`
            width = int((x[i] != 0).sum())
            assert width == min(end, window)  # the last <= window tokens, ending at the chunk end
            doc = tokens[starts[i]:starts[i] + pred_lens[i] + 1]
            assert torch.equal(x[i, :width], doc[end - width:end])
            assert torch.equal(y[i, :width], doc[end - width + 1:end + 1])
            assert not x[i, width:].any() and not y[i, width:].any()
            scored_at = at[i][scored[i]] + end - width  # target positions in the doc
            assert torch.equal(scored_at, torch.arange(ci * CHUNK, end))
            assert torch.equal(at[i][scored[i]], torch.arange(ci * CHUNK, end) - (end - width))  # in order
            covered[i][scored_at] += 1
    for c in covered:
        assert torch.equal(c, torch.ones_like(c))


@pytest.mark.parametrize("n, expected", [(1, 1), (2, 2), (3, 3), (4, 4), (5, 6), (7, 8), (9, 12), (13, 16),
                                         (17, 24), (25, 32), (33, 48), (44, 48), (49, 64), (64, 64), (65, 96)])
def test_slot_bucket_wastes_at_most_a_third(n, expected):
    assert tg.ttt_slot_bucket(n) == expected and (expected - n) / expected < 1 / 3 + 1e-9


def test_context_bucket_is_a_power_of_two_chunks_up_to_the_window():
    for chunk, window in ((32, 2048), (8, 32), (8, 20), (5, 64)):
        for ci in range(3 * window // chunk):
            need = min((ci + 1) * chunk, window)
            got = tg.ttt_context_bucket(need, chunk, window)
            assert need <= got <= window and (got == window or got // chunk & (got // chunk - 1) == 0)
            assert got < 2 * need


# ---------------------------------------------------------------------------------------------
# What TTT scores
# ---------------------------------------------------------------------------------------------


class Recorder:
    """model_fn that keeps every forward's per-token losses [docs, context]."""

    def __init__(self, model):
        self.model, self.losses = model, []

    def __call__(self, x, y, cu_seqlens, max_seqlen, lora=None, positions=None):
        loss = self.model(x, y, cu_seqlens, max_seqlen, lora, positions)
        self.losses.append(loss.detach().double().clone())
        return loss


def per_target_losses(losses, batch, chunk=CHUNK, window=WINDOW, min_slots=1) -> list[torch.Tensor]:
    """Forward ci (TTT_GRAD_STEPS=1: one per chunk) has a row per slot, the documents that still
    have chunk ci first (longest first), then, in a graphed step's rounded-up slot count, finished
    or empty slots; row i column c is the loss of
    target ci * chunk + c of its document. Returns, per document, the loss of each target position
    from the forward of its chunk."""
    pred = [n - 1 for _, n in batch]
    out = [torch.full((p,), math.nan, dtype=torch.float64) for p in pred]
    assert len(losses) == -(-pred[0] // chunk)
    for ci, loss in enumerate(losses):
        active = sum(p > ci * chunk for p in pred)
        exact = max(active, min_slots)  # a step that replays no graph (every step on a CPU) runs these
        assert loss.shape in ((exact, chunk), (tg.ttt_slot_bucket(exact), chunk))
        for i in range(active):
            end = min(pred[i], (ci + 1) * chunk)
            out[i][ci * chunk:end] = loss[i, :end - ci * chunk]
    assert all(not o.isnan().any() for o in out)
    return out


def run_ttt_batch(model, tokens, batch, h, luts, runner=None):
    """ttt_batch on the frozen model; returns ((nats, bytes, count), per-doc losses). The global RNG
    is not reset: the LoRA A init comes from h.seed alone."""
    rec = Recorder(model)
    with tg.frozen(model):
        sums = tg.ttt_batch(rec, model, tokens, batch, h, luts, runner=runner)
    per_doc = per_target_losses(rec.losses, batch, h.ttt_chunk_size, h.ttt_eval_seq_len, 2 if model.regions else 1)
    assert sums[0] == pytest.approx(sum(float(d.sum()) for d in per_doc), rel=1e-12)  # the map is what is scored
    assert sums[2] == sum(len(d) for d in per_doc)
    return sums, per_doc


def hparams_like(h, **changes):
    """A copy of Hyperparameters h with some attributes changed."""
    out = copy.copy(h)
    for k, v in changes.items():
        setattr(out, k, v)
    return out


def changed_token(t: int, vocab: int) -> int:
    return 2 + (t - 2 + 37) % (vocab - 2)  # another ordinary token (never BOS or 0)


def test_no_target_is_scored_after_training_on_itself_or_later_tokens(setup):
    """Score-first, checked by its consequence: the loss at target position p (predicting token
    p+1 from tokens <= p) cannot change when any token after p+1 changes, although those tokens do
    train the adapters. One document of 5 chunks + 6 targets, so the 32-token window also slides.

    Method: Recorder keeps every chunk forward's per-token losses and per_target_losses() maps
    them to target positions (checked to sum to what ttt_batch scored). Token j (j >= 1) is changed
    alone, and positions p <= j - 2 must keep their loss; j runs over chunk starts, middles and
    ends. A leak can only show at positions of the changed target's own chunk or later, so the
    j - 1 in the middle of a chunk (2, 10, 24, 31, 39, ...) are the sharp cases: a variant of
    ttt_batch that trains on a chunk before scoring it (TTT_GRAD_STEPS=2, scored at the last step)
    fails exactly there."""
    h, model, luts, val = setup
    tokens = docs_of_lengths(val, (46,))
    batch = [(0, 47)]  # its last target is the final BOS
    _, (base,) = run_ttt_batch(model, tokens, batch, h, luts)
    _, (frozen,) = run_ttt_batch(model, tokens, batch, hparams_like(h, ttt_lora_lr=0.0), luts)
    assert (base[CHUNK:] - frozen[CHUNK:]).abs().max() > 1e-2  # adaptation matters at this lr
    assert torch.equal(base[:CHUNK], frozen[:CHUNK])  # the first chunk is scored before any step
    for j in (1, 2, 7, 8, 9, 10, 16, 17, 24, 31, 32, 33, 39, 40, 41, 45, 46):
        changed = tokens.clone()
        changed[j] = changed_token(int(tokens[j]), h.vocab_size)
        _, (after,) = run_ttt_batch(model, changed, batch, h, luts)
        assert torch.allclose(after[:j - 1], base[:j - 1], rtol=0, atol=1e-6), (
            f"changing token {j} changed the loss at positions "
            f"{torch.nonzero((after[:j - 1] - base[:j - 1]).abs() > 1e-6).flatten().tolist()}")
        assert after[j - 1] != base[j - 1]  # the target at j - 1 is the changed token itself


def test_documents_of_a_batch_do_not_influence_each_other(setup):
    h, model, luts, val = setup
    tokens = docs_of_lengths(val, (46, 20, 9))
    batch = tg.split_documents(tokens)
    assert [n for _, n in batch] == [47, 21, 10]
    _, base = run_ttt_batch(model, tokens, batch, h, luts)
    for victim in range(3):
        start, n = batch[victim]
        changed = tokens.clone()
        for j in range(start + 1, start + n - 1):  # every token of that document but its BOS and the next BOS
            changed[j] = changed_token(int(tokens[j]), h.vocab_size)
        _, after = run_ttt_batch(model, changed, batch, h, luts)
        for other in range(3):
            if other != victim:
                assert torch.allclose(after[other], base[other], rtol=0, atol=1e-6), (victim, other)
        assert not torch.allclose(after[victim], base[victim])


def plain_reference(model, stream, docs, chunk=CHUNK, window=WINDOW) -> float:
    """Σ nats of every document scored on its own by the plain model: chunk ci's targets from one
    forward over the last <= window tokens ending at the chunk end. A document of at most window
    targets is a single forward over the whole document."""
    total = 0.0
    with torch.no_grad():
        for start, n in docs:
            doc = stream[start:start + n]
            if n - 1 <= window:
                total += float(model(doc[:-1], doc[1:]).double().sum())
                continue
            for ci in range(-(-(n - 1) // chunk)):
                end = min(n - 1, (ci + 1) * chunk)
                ws = max(0, end - window)
                total += float(model(doc[ws:end], doc[ws + 1:end + 1]).double()[ci * chunk - ws:].sum())
    return total


def run_eval_ttt(model, stream, h, luts, spy):
    lines, before = [], {k: v.clone() for k, v in model.state_dict().items()}
    loss, bpb = tg.eval_val_ttt(model, model, stream, h, luts, CPU, lines.append)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # given back trainable, no grads
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # only the adapters trained
    return loss, bpb, spy.last, lines


def test_zero_lr_equals_each_document_scored_alone_by_the_plain_model(setup, monkeypatch):
    h, model, luts, val = setup
    h0 = hparams_like(h, ttt_lora_lr=0.0)
    stream = doc_stream(val, 5 * 64 + 1)  # documents of 150 (longer than the window), 40, 70, ... tokens
    docs = tg.split_documents(stream)
    assert max(n for _, n in docs) > WINDOW + 1 and min(n for _, n in docs) <= 3
    spy = SumsSpy(monkeypatch)
    loss, bpb, (nats, nbytes, count), _ = run_eval_ttt(model, stream, h0, luts, spy)
    assert count == len(stream) - 1 and nbytes == stream_bytes(stream, luts)
    ref = plain_reference(model, stream, docs)
    assert nats == pytest.approx(ref, rel=1e-6)
    assert loss == pytest.approx(ref / count, rel=1e-6) and bpb == tg.bits_per_byte(nats, nbytes)


def test_without_adaptation_equals_the_plain_model_on_the_same_documents(setup, monkeypatch):
    """adapt=False (the baseline logged for a VAL_DOC_FRACTION sample) scores the same windows as
    TTT with the plain model: equal to lr 0, and trains nothing."""
    h, model, luts, val = setup
    stream = doc_stream(val, 5 * 64 + 1)
    docs = tg.split_documents(stream)
    spy = SumsSpy(monkeypatch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, bpb = tg.eval_val_ttt(model, model, stream, h, luts, CPU, lambda line: None, adapt=False)
    nats, nbytes, count = spy.last
    assert count == len(stream) - 1 and nbytes == stream_bytes(stream, luts)
    assert nats == pytest.approx(plain_reference(model, stream, docs), rel=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    adapted = run_eval_ttt(model, stream, h, luts, spy)[2][0]
    assert adapted != pytest.approx(nats, rel=1e-4)  # with the default lr, TTT does change the score


def test_ttt_counts_the_same_targets_and_bytes_as_standard_eval(setup, monkeypatch):
    h, model, luts, val = setup
    stream = doc_stream(val, 5 * 64 + 1, skip=2)
    spy = SumsSpy(monkeypatch)
    tg.eval_val(model, stream, h, luts, CPU)
    standard = spy.last
    ttt = run_eval_ttt(model, stream, h, luts, spy)[2]
    assert ttt[1:] == standard[1:] == [stream_bytes(stream, luts), len(stream) - 1]
    assert ttt[0] != pytest.approx(standard[0], rel=1e-3)  # sanity: TTT scored differently


def test_sgd_runs_and_adapts(setup):
    h, model, luts, val = setup
    tokens = docs_of_lengths(val, (46, 20, 9))
    batch = tg.split_documents(tokens)
    adam0, _ = run_ttt_batch(model, tokens, batch, hparams_like(h, ttt_lora_lr=0.0), luts)
    sgd0, _ = run_ttt_batch(model, tokens, batch, hparams_like(h, ttt_lora_lr=0.0, ttt_optimizer="sgd"), luts)
    sgd, _ = run_ttt_batch(model, tokens, batch, hparams_like(h, ttt_optimizer="sgd"), luts)
    assert sgd0 == adam0  # lr 0: the adapters stay the identity change (B = 0) whatever the optimizer
    assert math.isfinite(sgd[0]) and sgd[1:] == adam0[1:]
    assert abs(sgd[0] - adam0[0]) > 1e-3


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_lora_optimizer_steps_each_slot_as_torch_optim_would(optimizer):
    """LoRAOptimizer updates stacked tensors [slots, docs, ...] slot by slot, from per-slot gradients
    (BatchedLoRA's leaves): three steps equal torch.optim.AdamW (or SGD with momentum and L2 weight
    decay) on the stacked tensors with the stacked gradients."""
    h = types.SimpleNamespace(ttt_optimizer=optimizer, ttt_beta1=0.5, ttt_beta2=0.99, ttt_lora_lr=1e-2,
                              ttt_weight_decay=0.5)
    g = torch.Generator().manual_seed(0)
    stacked = [torch.randn(3, 2, 4, 5, generator=g), torch.randn(1, 2, 6, 4, generator=g)]
    ref = [t.clone().requires_grad_() for t in stacked]
    opt = tg.LoRAOptimizer(stacked, h)
    if optimizer == "adam":
        torch_opt = torch.optim.AdamW(ref, lr=h.ttt_lora_lr, betas=(h.ttt_beta1, h.ttt_beta2), eps=1e-10,
                                      weight_decay=h.ttt_weight_decay, foreach=False)
    else:
        torch_opt = torch.optim.SGD(ref, lr=h.ttt_lora_lr, momentum=h.ttt_beta1, dampening=0,
                                    weight_decay=h.ttt_weight_decay, foreach=False)
    for _ in range(3):
        grads = [torch.randn(t.shape, generator=g) for t in stacked]
        opt.step([t[i] for t in grads for i in range(t.size(0))])
        for r, gr in zip(ref, grads):
            r.grad = gr.clone()
        torch_opt.step()
    for mine, theirs in zip(stacked, ref):
        torch.testing.assert_close(mine, theirs.detach(), rtol=1e-5, atol=1e-6)
    assert float(opt.t) == 3


def test_the_fused_adamw_gets_gradients_strided_like_their_parameters(setup, monkeypatch):
    """torch's fused AdamW on CUDA refuses a gradient strided unlike its parameter (a CPU does not
    check): every call TTT makes, over whole and shrunk slot views, passes matching ones."""
    h, model, luts, val = setup
    tokens = docs_of_lengths(val, (46, 20, 9))
    real, calls = torch._fused_adamw_, []

    def checked(params, grads, m, v, *args, **kwargs):
        for group in (grads, m, v):
            assert [t.stride() for t in group] == [p.stride() for p in params]
            assert [t.shape for t in group] == [p.shape for p in params]
        calls.append(len(params))
        return real(params, grads, m, v, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", checked)
    run_ttt_batch(model, tokens, tg.split_documents(tokens), h, luts)
    assert calls


def test_autograd_gives_each_lora_gradient_the_layout_of_its_parameter(setup, monkeypatch):
    """with_lora's operand layout: every gradient TTT's optimizer gets is already strided like its
    parameter, so nothing is copied for the fused AdamW; and the input's gradient stays in its own
    layout (a transposed one would be added strided into the residual stream's gradient)."""
    h, model, luts, val = setup
    tokens = docs_of_lengths(val, (46, 20, 9))
    real, layouts = tg.LoRAOptimizer.step, []

    def step(self, grads):
        layouts.append([g.stride() == p.stride() for g, p in zip(grads, self.parts[0])])
        return real(self, grads)

    monkeypatch.setattr(tg.LoRAOptimizer, "step", step)
    run_ttt_batch(model, tokens, tg.split_documents(tokens), h, luts)
    assert layouts and all(all(same) for same in layouts)
    x = torch.randn(3, 5, 8, requires_grad=True)
    A, B = torch.randn(3, 8, 2, requires_grad=True), torch.randn(3, 2, 6, requires_grad=True)
    out = tg.with_lora(torch.zeros(3, 5, 6), {"q": (A, B)}, "q", x)
    torch.testing.assert_close(out, x @ A @ B)
    out.square().sum().backward()
    assert x.grad.is_contiguous() and A.grad.is_contiguous() and B.grad.is_contiguous()


class Boom(Exception):
    pass


@pytest.mark.parametrize("fail", [False, True])
def test_ttt_freezes_the_base_weights_and_gives_them_back(setup, fail):
    """eval_val_ttt and warm_up_ttt run with every base weight frozen (only the adapters get
    gradients) and give the weights back trainable, also when a forward raises."""
    h, model, luts, val = setup
    seen = []

    def model_fn(*args):
        seen.append([p.requires_grad for p in model.parameters()])
        if fail:
            raise Boom
        return model(*args)

    stream = doc_stream(val, 60, skip=3)
    for run in (lambda: tg.warm_up_ttt(model_fn, model, h, luts, CPU),
                lambda: tg.eval_val_ttt(model_fn, model, stream, h, luts, CPU, lambda line: None)):
        seen.clear()
        if fail:
            with pytest.raises(Boom):
                run()
        else:
            run()
        assert seen and not any(any(flags) for flags in seen)
        assert all(p.requires_grad and p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Independence of batching and of the number of ranks
# ---------------------------------------------------------------------------------------------


def test_lora_init_is_seeded_and_the_same_for_every_document():
    """BatchedLoRA draws A once from a generator seeded with `seed` (ttt_batch passes SEED) and
    gives every document that draw; B is zero, so every adapter starts as the identity change."""
    shapes = {"q": (3, 16, 16), "v": (3, 16, 8), "head": (1, 16, 40)}
    a, b = tg.BatchedLoRA(shapes, 4, 2, CPU, seed=7), tg.BatchedLoRA(shapes, 1, 2, CPU, seed=7)
    torch.manual_seed(123)  # the global RNG plays no part
    c, d = tg.BatchedLoRA(shapes, 4, 2, CPU, seed=7), tg.BatchedLoRA(shapes, 4, 2, CPU, seed=8)
    for name, (slots, d_in, d_out) in shapes.items():
        A = a.A[name]
        assert A.shape == (slots, 4, d_in, 2) and torch.equal(a.B[name], torch.zeros(slots, 4, 2, d_out))
        assert torch.equal(A, b.A[name].expand_as(A)) and torch.equal(A, c.A[name])
        assert A.abs().max() <= 1 / math.sqrt(d_in) and A.std() > 0.2 / math.sqrt(d_in)
        assert not torch.equal(A, d.A[name])


def test_ttt_batch_does_not_depend_on_the_global_rng(setup):
    h, model, luts, val = setup
    tokens = docs_of_lengths(val, (46, 20))
    batch = tg.split_documents(tokens)
    torch.manual_seed(0)
    first = run_ttt_batch(model, tokens, batch, h, luts)
    torch.manual_seed(1)
    torch.rand(1000)
    second = run_ttt_batch(model, tokens, batch, h, luts)
    assert first[0] == second[0] and all(torch.equal(x, y) for x, y in zip(first[1], second[1]))
    reseeded = run_ttt_batch(model, tokens, batch, hparams_like(h, seed=h.seed + 1), luts)
    assert reseeded[0][0] != first[0][0]  # SEED does pick the init


def each_alone(model, tokens, batch, h, luts):
    return [run_ttt_batch(model, tokens, [doc], h, luts)[1][0] for doc in batch]


BATCH_LENGTHS = (100, 47, 20, 9, 2)  # very different lengths: the batch shrinks 4 times


def test_ttt_batch_equals_each_document_alone(setup):
    """§8.3 / the TTT section's comment: nothing is shared between documents, so the result does
    not depend on batching: every document starts from the same seeded adapters, and the batch's
    shrinking (slicing adapters and optimizer state as documents finish) is exact, so batch and
    alone agree to fp32 rounding."""
    h, model, luts, val = setup
    tokens = docs_of_lengths(val, BATCH_LENGTHS)
    batch = tg.split_documents(tokens)
    sums, together = run_ttt_batch(model, tokens, batch, h, luts)
    alone = each_alone(model, tokens, batch, h, luts)
    for i, (a, b) in enumerate(zip(together, alone)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (
            f"document {i} ({len(a)} targets): max difference {float((a - b).abs().max()):.3g} between in-batch and alone")
    assert sums[0] == pytest.approx(sum(float(b.sum()) for b in alone), rel=1e-6)


def _ttt_on_rank(h, state, stream, luts):
    """On each rank: TTT as the script runs it."""
    model = make_model(h)
    model.load_state_dict(state)
    return run_eval_ttt(model, stream, h, luts, SumsSpy())


@pytest.fixture(scope="module")
def ttt_ranks(setup):
    h, model, luts, val = setup
    h = hparams_like(h, ttt_batch_size=2)
    stream = doc_stream(val, 300, skip=5)  # 9 documents: 5 batches for the 2 ranks to share
    with pytest.MonkeyPatch.context() as mp:
        one = run_eval_ttt(model, stream, h, luts, SumsSpy(mp))
    two = run_two_ranks(_ttt_on_rank, h, model.state_dict(), stream, luts)
    return stream, luts, len(tg.ttt_batches(tg.split_documents(stream), 2)), one, two


def claimed(lines) -> list[int]:
    return [int(line.split("batch:")[1].split("/")[0]) for line in lines if line.startswith("ttt_progress")]


def test_two_ranks_share_the_batches_and_count_every_target(ttt_ranks):
    stream, luts, n_batches, one, (rank0, rank1) = ttt_ranks
    mine0, mine1 = claimed(rank0[3]), claimed(rank1[3])
    assert sorted(mine0 + mine1) == list(range(1, n_batches + 1))  # each batch by exactly one rank
    assert rank0[:3] == rank1[:3]  # all-reduced
    assert rank0[2][1:] == one[2][1:] == [stream_bytes(stream, luts), len(stream) - 1]


def test_phased_ttt_on_two_ranks_equals_one_rank(setup):
    """The global step shares its rows out over the ranks and sums their gradients: the same update,
    and the same scores, as on one rank."""
    h, model, luts, val = setup
    h = hparams_like(h, ttt_batch_size=2, ttt_global_phases=1, ttt_global_prefix_docs=4, ttt_global_lr=0.05,
                     ttt_global_batch_tokens=96)
    stream = doc_stream(val, 300, skip=5)
    batches = tg.ttt_batches(tg.split_documents(stream), 2)
    assert 0 < tg.ttt_global_phase_ends(batches, h)[0] < len(batches) - 1  # scored after the phase: 2+ batches
    with pytest.MonkeyPatch.context() as mp:
        one = run_eval_ttt(model, stream, h, luts, SumsSpy(mp))
    rank0, rank1 = run_two_ranks(_ttt_on_rank, h, model.state_dict(), stream, luts)
    assert rank0[:3] == rank1[:3]
    assert rank0[:2] == pytest.approx(one[:2], rel=5e-5)  # the gradients summed in another order (fp32)
    assert any(line.startswith("ttt_global_phase") for line in rank0[3])


def test_two_ranks_equal_one_rank(ttt_ranks):
    """The TTT section's promise: the result does not depend on the number of ranks (each batch's
    adapters start from the seeded init whichever rank claims it)."""
    *_, one, (rank0, _) = ttt_ranks
    assert rank0[:2] == pytest.approx(one[:2], rel=1e-6)


def test_a_padded_window_scores_and_trains_the_same(setup):
    """TTTRunner rounds windows up for its CUDA graphs (ttt_context_bucket): the padding after each
    row is causally invisible, so one chunk step over a longer window gives the same scores and the
    same adapter update."""
    h, model, luts, val = setup
    tokens = docs_of_lengths(val, (46, 20, 9))
    batch = tg.split_documents(tokens)
    ci = 2
    context = min((ci + 1) * h.ttt_chunk_size, h.ttt_eval_seq_len)
    results = []
    with tg.frozen(model):
        for window in (context, context + 13):
            slots = tg.TTTSlots(model, h, 4, CPU)  # one empty slot too
            slots.load(batch, h.ttt_chunk_size)
            sums = torch.zeros(3, dtype=torch.float64)
            tg.ttt_chunk_step(model, tokens, slots, torch.tensor(ci), window, h, luts, sums, train=True)
            results.append((sums, [t.clone() for t in slots.lora.tensors()]))
    (a, lora_a), (b, lora_b) = results
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    assert a[2] > 0 and any(t.abs().sum() > 0 for t in lora_a[len(lora_a) // 2:])  # scored, and B moved
    for x, y in zip(lora_a, lora_b):
        # A longer window changes the fp32 summation order of each gradient. Adam's first step is
        # lr * g / (|g| + eps), so an element whose gradient is near eps moves by a few 1e-5 of the
        # largest entry (3e-5 seen on CI's CPU); allow 1e-4 of it, far below a wrong mask's error.
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4 * float(x.abs().max()) + 1e-12)


def test_adapters_can_be_switched_off_and_documents_stay_independent(setup):
    """TTT_Q_LORA=0 TTT_V_LORA=0 (PR #1953's target set): no Q or V adapters, and a batch still
    equals its documents run alone."""
    h, model, luts, val = setup
    h = hparams_like(h, ttt_q_lora=False, ttt_v_lora=False)
    assert set(tg.lora_shapes(model, h)) == {"head", "k", "o", "mlp"}
    tokens = docs_of_lengths(val, (46, 20, 9))
    batch = tg.split_documents(tokens)
    sums, together = run_ttt_batch(model, tokens, batch, h, luts)
    for a, b in zip(together, each_alone(model, tokens, batch, h, luts)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    full, _ = run_ttt_batch(model, tokens, batch, hparams_like(h, ttt_q_lora=True, ttt_v_lora=True), luts)
    assert sums[1:] == full[1:] and sums[0] != full[0]


# ---------------------------------------------------------------------------------------------
# Phased TTT (TTT_GLOBAL_PHASES): the base weights learn the documents already scored
# ---------------------------------------------------------------------------------------------


def scrambled(tokens: torch.Tensor, docs: list) -> torch.Tensor:
    """A copy with every token of these documents changed but their BOS and the next one."""
    out = tokens.clone()
    for start, n in docs:
        out[start + 1:start + n - 1] = (out[start + 1:start + n - 1] + 7) % 400 + 2
    return out


def test_global_phase_ends_split_the_prefix_into_equal_parts():
    batches = [[(0, 9)] * 2, [(0, 9)] * 2, [(0, 9)] * 2, [(0, 9)] * 2, [(0, 9)]]  # 2, 4, 6, 8, 9 documents

    def ends(**env):
        return tg.ttt_global_phase_ends(batches, tg.Hyperparameters(env={k.upper(): str(v) for k, v in env.items()}))

    assert ends(ttt_global_phases=2, ttt_global_prefix_docs=6) == [2, 3]  # after 3 and 6 documents
    assert ends(ttt_global_phases=1, ttt_global_prefix_docs=5) == [3]  # the batch that reaches 5
    assert ends(ttt_global_phases=1, ttt_global_prefix_docs=100) == []  # after the last batch: nothing to gain
    assert ends(ttt_global_phases=3, ttt_global_prefix_docs=4) == [1, 2]  # 1.33 and 2.67 -> batch 1; 4 -> batch 2
    assert ends(ttt_global_phases=0) == []


def test_phases_that_cannot_run_are_named_in_the_log(setup):
    """TTT_GLOBAL_PREFIX_DOCS at or above the documents scored puts the phase after the last batch,
    where it would adapt nothing: the run goes on without it and says so, naming the variable."""
    h, model, luts, val = setup
    stream = doc_stream(val, 2 * 64 + 1)
    lines = []
    hp = hparams_like(h, ttt_global_phases=1, ttt_global_prefix_docs=2500)
    tg.eval_val_ttt(model, model, stream, hp, luts, CPU, lines.append)
    named = [line for line in lines if line.startswith("ttt_global:")]
    assert len(named) == 1 and "0 of TTT_GLOBAL_PHASES=1" in named[0] and "TTT_GLOBAL_PREFIX_DOCS=2500" in named[0]
    lines.clear()
    tg.eval_val_ttt(model, model, stream, h, luts, CPU, lines.append)  # phases off: nothing to say
    assert not [line for line in lines if line.startswith("ttt_global")]


def test_phased_ttt_scores_each_phase_before_the_weights_learn_it(setup, monkeypatch):
    """With one phase after the first batches: the global step runs once, on exactly the documents
    already scored, before any later batch is scored; a later document cannot change an earlier
    batch's score, an earlier one does change the later scores (through the global step); the base
    weights are given back unchanged."""
    h, model, luts, val = setup
    stream = doc_stream(val, 5 * 64 + 1)
    batches = tg.ttt_batches(tg.split_documents(stream), h.ttt_batch_size)
    assert len(batches) >= 3
    hp = hparams_like(h, ttt_global_phases=1, ttt_global_prefix_docs=len(batches[0]), ttt_global_lr=0.05,
                      ttt_global_batch_tokens=64)
    assert tg.ttt_global_phase_ends(batches, hp) == [1]
    events = []
    real_batch, real_adapt = tg.ttt_batch, tg.ttt_global_adapt

    def batch_spy(model_fn, model_, tokens, batch, *args, **kwargs):
        result = real_batch(model_fn, model_, tokens, batch, *args, **kwargs)
        events.append(("score", tuple(batch), result))
        return result

    def adapt_spy(model_, tokens, docs, *args):
        events.append(("global", tuple(docs), None))
        return real_adapt(model_, tokens, docs, *args)

    monkeypatch.setattr(tg, "ttt_batch", batch_spy)
    monkeypatch.setattr(tg, "ttt_global_adapt", adapt_spy)

    def run(tokens):
        events.clear()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        tg.eval_val_ttt(model, model, tokens, hp, luts, CPU, lambda line: None)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return list(events)

    base = run(stream)
    assert [e[0] for e in base] == ["score", "global"] + ["score"] * (len(batches) - 1)
    assert base[1][1] == tuple(batches[0])  # the global step sees the scored documents only
    after = run(scrambled(stream, batches[-1][:1]))
    assert after[0][2] == base[0][2]  # the first batch's score ignores a later document
    after = run(scrambled(stream, batches[0][:1]))
    assert after[2][2] != base[2][2]  # ... while a scored document teaches the base weights


def test_global_adapt_learns_its_documents_only(setup):
    h, model, luts, val = setup
    hp = hparams_like(h, ttt_global_lr=0.05, ttt_global_batch_tokens=64)
    stream = doc_stream(val, 3 * 64 + 1)
    docs = tg.split_documents(stream)
    mine, others = docs[:2], docs[2:]
    fresh = lambda: copy.deepcopy(model)  # noqa: E731
    loss_of = lambda m: sum(float(m(stream[s:s + n - 1], stream[s + 1:s + n]).sum()) for s, n in mine)  # noqa: E731
    a = fresh()
    with torch.no_grad():
        before = loss_of(a)
    stats = tg.ttt_global_adapt(a, stream, mine, hp, CPU)
    with torch.no_grad():
        assert loss_of(a) < before
    rows = math.ceil((stats["tokens"] - 1) / h.ttt_eval_seq_len)  # 32-token rows, two to a step
    assert stats["tokens"] == sum(n for _, n in mine) and stats["steps"] == math.ceil(rows / 2)
    b = fresh()
    tg.ttt_global_adapt(b, scrambled(stream, others), mine, hp, CPU)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_compiled_blocks_score_and_train_the_same(setup):
    """TTT_COMPILE=1: each kind of block goes through torch.compile once and serves every layer
    (regional compilation; traced by Dynamo, here with a counting backend that runs the traced
    graph: Inductor on CPU takes minutes for this suite). Over a batch whose slot count (2, then
    1) and window (16 to 60) change, every target gets the loss of the eager forward, and Dynamo
    traces a handful of graphs, all in the warmup, not one per layer or shape; on a GPU, Inductor's
    kernels compute the same."""
    h, model, luts, val = setup
    tokens = docs_of_lengths(val, (60, 40))  # two slots, then one; the last chunk untrained
    batch = tg.split_documents(tokens)
    sums, eager = run_ttt_batch(model, tokens, batch, h, luts)
    torch._dynamo.reset()
    traced = []

    def backend(gm, example_inputs):
        traced.append(gm)
        return gm.forward

    hc = hparams_like(h, ttt_compile=True)
    assert tg.ttt_model_fn(model, hc, backend=backend) is model
    try:
        with tg.frozen(model):
            tg.warm_up_ttt(model, model, hc, luts, CPU)  # two short documents
        first = len(traced)
        runner = tg.TTTRunner(model, hc, CPU, graphs=False)
        got_sums, got = run_ttt_batch(model, tokens, batch, hc, luts, runner)
        other = docs_of_lengths(val, (52, 44, 20))  # other windows, three slots
        run_ttt_batch(model, other, tg.split_documents(other), hc, luts, runner)
        assert runner.slots_for(1).size == 2  # compiled: at least two slots, never a specialized one
    finally:
        tg.ttt_model_fn(model, h)  # TTT_COMPILE=0: the plain blocks again (the module's shared model)
    assert model.regions is None
    for i, (a, b) in enumerate(zip(got, eager)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), f"document {i}: {float((a - b).abs().max()):.3g}"
    assert got_sums[0] == pytest.approx(sums[0], rel=1e-6) and got_sums[1:] == sums[1:]
    # the warmup traced every graph the batches use: the sequential and the parallel block (in this
    # small model, each with and without XSA), the untrained last chunk included (grad stays on);
    # never one per layer, per shape or per grad mode
    assert first <= 4 and len(traced) == first, (first, len(traced))
    assert tg.ttt_model_fn(model, hc) is model and model.regions is None  # on a CPU only with a backend given


def fake_cuda_graphs(monkeypatch):
    """torch.cuda's graph API (and torch.compile's stance) replaced by recorders, since captures need
    a GPU: returns (events, state), events "capture"/"replay" in order, state["capturing"] while a
    capture is open, state["stances"] as set, state["fail"] for a test's step to raise once."""
    events, state = [], {"capturing": False, "fail": False, "stances": []}

    class Graph:
        def replay(self):
            events.append("replay")

    class capture:
        def __init__(self, graph, pool=None):
            pass

        def __enter__(self):
            events.append("capture")
            state["capturing"] = True

        def __exit__(self, *exc):
            state["capturing"] = False
            return False

    real_stance = torch.compiler.set_stance

    def stance(name, **kwargs):
        state["stances"].append(name)
        return real_stance(name, **kwargs)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.compiler, "set_stance", stance)
    return events, state


def test_a_graphed_ttt_logs_its_graph_shapes(setup, monkeypatch):
    """eval_val_ttt with CUDA graphs on (recorded: a replay here computes nothing): one line with the
    shapes captured and how many of them first ran uncaptured."""
    h, model, luts, val = setup
    stream = doc_stream(val, 3 * 64 + 1)
    events, state = fake_cuda_graphs(monkeypatch)
    real_init = tg.TTTRunner.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.graphs_on = True  # as on CUDA

    monkeypatch.setattr(tg.TTTRunner, "__init__", init)
    graphed = run_eval_ttt(model, stream, h, luts, SumsSpy(monkeypatch))
    assert "capture" in events
    lines = [line for line in graphed[3] if line.startswith("ttt_graphs")]
    assert len(lines) == 1 and re.fullmatch(r"ttt_graphs rank:0 shapes:[1-9]\d* first_uncaptured:0", lines[0]), lines


def test_the_runner_captures_each_shape_once_and_compiled_shapes_uncaptured_only_where_they_compile(
        setup, monkeypatch):
    """TTTRunner's CUDA-graph schedule, with torch.cuda's graph API replaced by a recorder (the
    captures themselves need a GPU): a shape is captured at its first step and replayed after; with
    compiled blocks that capture runs under the stance fail_on_recompile, and where it fails (a block
    would compile) the step runs uncaptured and the shape is captured at its next step; steps of
    eager_from tokens or more run uncaptured, at their own window."""
    h, model, luts, val = setup
    events, state = fake_cuda_graphs(monkeypatch)
    tokens = docs_of_lengths(val, (40, 40))
    step = tg.ttt_chunk_step

    def recorded(*args, **kwargs):
        if state["capturing"] and state["fail"]:
            state["fail"] = False
            raise RuntimeError("Detected recompile when torch.compile stance is 'fail_on_recompile'")
        if not state["capturing"]:
            events.append("run")
        return step(*args, **kwargs)

    monkeypatch.setattr(tg, "ttt_chunk_step", recorded)

    def schedule(regions, eager_from, fail=False):
        events.clear()
        state.update(fail=fail, stances=[])
        model.regions = regions
        try:
            runner = tg.TTTRunner(model, h, CPU, graphs=False, eager_from=eager_from)
            runner.graphs_on = True  # as on CUDA
            slots = runner.slots_for(2)
            slots.load(tg.split_documents(tokens), h.ttt_chunk_size)
            with tg.frozen(model):
                for _ in range(3):
                    runner.step(model, tokens, slots, h.ttt_chunk_size, luts, train=True)
        finally:
            model.regions = None
        return list(events)

    assert schedule(None, math.inf) == ["capture", "replay", "replay", "replay"]
    assert state["stances"] == ["default"]
    assert schedule(None, 1) == ["run", "run", "run"]  # wide steps: never captured
    compiled = (model.sequential_block, model.parallel_block)  # stands in for compiled blocks
    assert schedule(compiled, math.inf) == ["capture", "replay", "replay", "replay"]
    assert state["stances"] == ["fail_on_recompile"]
    assert schedule(compiled, math.inf, fail=True) == ["capture", "run", "capture", "replay", "replay"]
    assert state["stances"] == ["fail_on_recompile", "default"]
    assert schedule(compiled, 1) == ["run", "run", "run"]
    with pytest.raises(RuntimeError, match="fail_on_recompile"):  # eager blocks: a failed capture is an error
        schedule(None, math.inf, fail=True)
    assert tg.TTT_EAGER_TOKENS_COMPILED > tg.TTT_EAGER_TOKENS  # the compiled blocks' host cost hides behind more work


def _raising_backend(gm, example_inputs):
    raise RuntimeError("no compiler here")


def _wrong_backend(gm, example_inputs):
    """Runs the traced graph with every output scaled: a compile that runs but computes wrongly."""
    return lambda *args: [o * 1.5 if isinstance(o, torch.Tensor) else o for o in gm.forward(*args)]


def _asserting_backend(gm, example_inputs):
    """Compiles, then fails when run, as Inductor's stride checks did on an H200 (torch 2.11)."""
    def run(*args):
        raise AssertionError("expected size 8==8, stride 128==96 at dim=0")
    return run


@pytest.mark.parametrize("backend, message", [(_raising_backend, "no compiler here"),
                                              (_asserting_backend, "stride 128==96"),
                                              (_wrong_backend, "TTTMismatch")])
def test_a_failed_compile_of_the_blocks_leaves_ttt_to_run_them_eagerly(setup, monkeypatch, backend, message):
    """TTT_COMPILE=1 where torch.compile fails (a backend that raises), its code fails when run, or
    it computes other numbers than the plain blocks on the warmup's synthetic batch: one warning
    line, and TTT runs the blocks eagerly, with the scores of TTT_COMPILE=0; the run is not lost."""
    h, model, luts, val = setup
    tokens = docs_of_lengths(val, (60, 40))
    lines = []
    ctx = types.SimpleNamespace(h=hparams_like(h, val_doc_fraction=1.0), log=lines.append, model=model, device=CPU,
                                luts=luts, val_tokens=tokens)
    plain = tg.evaluate_ttt(ctx)
    torch._dynamo.reset()
    real = tg.ttt_model_fn
    monkeypatch.setattr(tg, "ttt_model_fn", lambda m, hp: real(m, hparams_like(hp, ttt_compile=True), backend=backend))
    lines.clear()
    fallback = tg.evaluate_ttt(ctx)
    warnings = [line for line in lines if line.startswith("WARNING: TTT's compiled blocks failed")]
    assert len(warnings) == 1 and message in warnings[0], lines
    assert model.regions is None
    assert fallback["val_bpb"] == plain["val_bpb"]

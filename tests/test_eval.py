"""EVALUATION: standard and sliding-window scoring, on one rank and on two.

Every number is checked against a reference computed here from the definitions, by running the model on
each isolated sequence separately (dense, no cu_seqlens). The model is a tiny fp32 one with random
weights (tests/evalkit.py), so numbers agree to float rounding and byte counts exactly.
CPU only; the 2-rank tests spawn two gloo processes. Run: python3 -m pytest -q tests/test_eval.py
"""
import math

import pytest
import torch

import train_gpt as tg
from tests.evalkit import (CPU, RowsSpy, SumsSpy, doc_stream, docs_of_lengths, hparams, make_model,
                           run_two_ranks, stream_bytes)
from tests.evalkit import one_thread, setup  # noqa: F401  (fixtures shared with test_ttt.py)

L = 64  # EVAL_SEQ_LEN in every test here


def isolated_loss_sum(model, stream: torch.Tensor, segments) -> float:
    """Σ per-token loss, each segment [a, b) of target positions run on its own: inputs
    stream[a:b], targets stream[a+1:b+1], positions from 0."""
    total = 0.0
    with torch.no_grad():
        for a, b in segments:
            total += float(model(stream[a:b], stream[a + 1:b + 1]).double().sum())
    return total


def doc_cuts(stream: torch.Tensor, a: int, b: int, max_len: int) -> list[tuple[int, int]]:
    """Target range [a, b) cut where an input token is BOS, then every document piece cut
    every max_len tokens from its own start."""
    starts = [a] + [i for i in range(a + 1, b) if int(stream[i]) == tg.BOS_ID]
    out = []
    for s, e in zip(starts, starts[1:] + [b]):
        out += [(p, min(p + max_len, e)) for p in range(s, e, max_len)]
    return out


def eval_val_segments(stream: torch.Tensor, h) -> list[tuple[int, int]]:
    """The isolated sequences of eval_val as §8.1 (and this project's every-target rule) define
    them: the targets cut into rows of VAL_BATCH_TOKENS / 8 from the stream's start (the last row
    shorter), whatever the world size, and each row at BOS and at EVAL_SEQ_LEN pieces of a document."""
    row, n = h.val_batch_tokens // 8, len(stream) - 1
    return [seg for a in range(0, n, row) for seg in doc_cuts(stream, a, min(a + row, n), h.eval_seq_len)]


def check_partition(segments, n_targets):
    covered = torch.zeros(n_targets, dtype=torch.int64)
    for a, b in segments:
        covered[a:b] += 1
    assert torch.equal(covered, torch.ones_like(covered))


# ---------------------------------------------------------------------------------------------
# eval_val
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_targets, batch_tokens", [
    (8 * L, 32 * L),  # two full rows of 4 sequences
    (6 * L, 32 * L),  # a full row and a final partial one (2 of 4 sequences)
    (3 * L, 64 * L),  # a single, partial row
    (5 * L, 8 * L),  # one sequence per row
    (5 * L + 19, 16 * L),  # rows of 2 sequences, the last one 83 targets (not a whole sequence)
])
def test_eval_val_equals_isolated_per_segment_reference(setup, make_hparams, monkeypatch, n_targets, batch_tokens):
    _, model, luts, val = setup
    h = hparams(make_hparams, VAL_BATCH_TOKENS=batch_tokens)
    stream = doc_stream(val, n_targets + 1)
    spy = SumsSpy(monkeypatch)
    loss, bpb = tg.eval_val(model, stream, h, luts, CPU)
    nats, nbytes, count = spy.last

    assert count == len(stream) - 1  # every target scored exactly once
    assert nbytes == stream_bytes(stream, luts)  # the foundation's byte count, exactly
    segments = eval_val_segments(stream, h)
    check_partition(segments, len(stream) - 1)
    assert len(segments) > -(-n_targets // L)  # the stream's documents really cut the rows
    ref = isolated_loss_sum(model, stream, segments)
    assert nats == pytest.approx(ref, rel=1e-6)
    assert loss == pytest.approx(ref / count, rel=1e-6)
    assert bpb == pytest.approx(ref / math.log(2) / nbytes, rel=1e-6)
    assert bpb == tg.bits_per_byte(nats, nbytes)  # the same bytes as counted


def test_eval_val_partial_row_tail_is_scored_but_padding_is_not(setup, make_hparams, monkeypatch):
    """A final row of 1 sequence where rows hold 4: its targets count once, the padding not at all,
    and the value is the one from running the stream's whole rows and tail separately."""
    _, model, luts, val = setup
    h = hparams(make_hparams, VAL_BATCH_TOKENS=32 * L)
    stream = doc_stream(val, 5 * L + 1, skip=3)
    spy = SumsSpy(monkeypatch)
    tg.eval_val(model, stream, h, luts, CPU)
    full, tail = stream[:4 * L + 1], stream[4 * L:]
    tg.eval_val(model, full, h, luts, CPU)
    tg.eval_val(model, tail, h, luts, CPU)
    whole, a, b = spy.calls
    assert whole[2] == 5 * L and whole[1] == a[1] + b[1]
    assert whole[0] == pytest.approx(a[0] + b[0], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# eval_val_sliding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_targets", [8 * L, 8 * L + 19, 41])
def test_sliding_scores_every_target_once_with_its_context(setup, make_hparams, monkeypatch, n_targets):
    """§8.2: windows of EVAL_SEQ_LEN at every multiple of EVAL_STRIDE; the first scores all its
    targets, later ones their last EVAL_STRIDE; each window is cut at BOS. Checked piece by piece
    (which tokens, which targets scored) and against the isolated reference."""
    _, model, luts, val = setup
    h = hparams(make_hparams, EVAL_STRIDE=32)
    stream = doc_stream(val, n_targets + 1, skip=1)
    rows = RowsSpy(monkeypatch).rows
    spy = SumsSpy(monkeypatch)
    loss, bpb = tg.eval_val_sliding(model, stream, h, luts, CPU)
    nats, nbytes, count = spy.last

    stride, covered, segments = h.eval_stride, torch.zeros(n_targets, dtype=torch.int64), []
    for k, (inp, tgt, mask) in enumerate(rows):
        start = k * stride
        end = start + len(inp)
        assert len(inp) <= L and end <= n_targets
        assert torch.equal(inp, stream[start:end]) and torch.equal(tgt, stream[start + 1:end + 1])
        first_scored = 0 if k == 0 else L - stride
        assert torch.equal(mask, torch.arange(len(inp)) >= first_scored)
        covered[start:end] += mask.long()
        # the reference scores the window's scored targets with the window's context, cut at BOS
        segments += [(a, b, start + first_scored) for a, b in doc_cuts(stream, start, end, L)]
    assert torch.equal(covered, torch.ones_like(covered))
    assert count == n_targets and nbytes == stream_bytes(stream, luts)

    ref = 0.0
    with torch.no_grad():
        for a, b, first in segments:
            if b > first:
                losses = model(stream[a:b], stream[a + 1:b + 1]).double()
                ref += float(losses[max(first - a, 0):].sum())
    assert nats == pytest.approx(ref, rel=1e-6)
    assert loss == pytest.approx(ref / n_targets, rel=1e-6) and bpb == tg.bits_per_byte(nats, nbytes)


def test_sliding_with_stride_equal_to_seq_len_equals_eval_val(setup, make_hparams, monkeypatch):
    """With EVAL_STRIDE = EVAL_SEQ_LEN and one sequence per eval_val row, both cut the stream into
    the same EVAL_SEQ_LEN windows (then at BOS), so they must agree."""
    _, model, luts, val = setup
    h = hparams(make_hparams, EVAL_STRIDE=L, VAL_BATCH_TOKENS=8 * L)
    stream = doc_stream(val, 7 * L + 1)
    spy = SumsSpy(monkeypatch)
    standard = tg.eval_val(model, stream, h, luts, CPU)
    sliding = tg.eval_val_sliding(model, stream, h, luts, CPU)
    (n1, b1, c1), (n2, b2, c2) = spy.calls
    assert c1 == c2 == 7 * L and b1 == b2
    assert n2 == pytest.approx(n1, rel=1e-6)
    assert sliding == pytest.approx(standard, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# 2 ranks (gloo) versus 1
# ---------------------------------------------------------------------------------------------


def _eval_on_rank(h, state, streams, luts):
    """On each rank: eval_val of every stream; (loss, bpb, all-reduced sums, the pieces it scored)."""
    model = make_model(h)
    model.load_state_dict(state)
    sums, rows = SumsSpy(), RowsSpy().rows
    out = []
    for s in streams:
        before = len(rows)
        out.append((*tg.eval_val(model, s, h, luts, CPU), sums.last, rows[before:]))
    return out


@pytest.fixture(scope="module")
def two_ranks(setup):
    """eval_val on 1 rank and on 2 of: a real document stream, a grid-aligned one, a real one whose
    3 rows (the last one short) split unevenly, and one shorter than a row (rank 0 has nothing)."""
    h, model, luts, val = setup
    assert h.val_batch_tokens // 8 == 2 * L
    # documents cut to multiples of EVAL_SEQ_LEN start on the EVAL_SEQ_LEN grid, so no row or rank
    # boundary cuts a context there
    streams = [doc_stream(val, 8 * L + 1), docs_of_lengths(val, (64, 128, 64, 192, 64)),
               doc_stream(val, 5 * L + 37 + 1, skip=4), doc_stream(val, 41 + 1, skip=7)]
    one = []
    with pytest.MonkeyPatch.context() as mp:
        sums, rows = SumsSpy(mp), RowsSpy(mp).rows
        for s in streams:
            before = len(rows)
            one.append((*tg.eval_val(model, s, h, luts, CPU), sums.last, rows[before:]))
    two = run_two_ranks(_eval_on_rank, h, model.state_dict(), streams, luts)
    return streams, one, two, luts


def test_two_ranks_score_every_target_and_byte_once(two_ranks):
    streams, one, (rank0, rank1), luts = two_ranks
    for s, o, r0, r1 in zip(streams, one, rank0, rank1):
        assert r0[:3] == r1[:3]  # both ranks return the all-reduced result
        nats, nbytes, count = r0[2]
        assert count == len(s) - 1 and nbytes == stream_bytes(s, luts)
        assert o[2][1:] == r0[2][1:]


def test_two_ranks_split_the_one_rank_rows_contiguously(two_ranks):
    """Rank 0 scores the first rows and rank 1 the rest, each row exactly as 1 rank scores it
    (same tokens, targets and mask), so contexts are cut at the same places on any world size."""
    streams, one, (rank0, rank1), _ = two_ranks
    for k, (o, r0, r1) in enumerate(zip(one, rank0, rank1)):
        alone, shared = o[3], r0[3] + r1[3]
        assert len(shared) == len(alone) and abs(len(r0[3]) - len(r1[3])) <= 1, (k, len(r0[3]), len(r1[3]))
        for (x1, y1, m1), (x2, y2, m2) in zip(alone, shared):
            assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(m1, m2), k
    assert [len(o[3]) for o in one] == [4, 4, 3, 1]
    assert (len(rank0[2][3]), len(rank0[3][3])) == (1, 0)  # the uneven shares


def test_two_ranks_equal_one_rank_when_documents_align_with_sequences(two_ranks):
    _, one, (rank0, _), _ = two_ranks
    assert rank0[1][:2] == pytest.approx(one[1][:2], rel=1e-6)


@pytest.mark.parametrize("k", [0, 2, 3])
def test_two_ranks_equal_one_rank(two_ranks, setup, k):
    """The score must not depend on the world size. Here the
    documents do not align with the rows (a document straddles each row boundary, so a context is
    cut there), and in streams 2 and 3 the ranks get unequal shares."""
    h, *_ = setup
    streams, one, (rank0, _), _ = two_ranks
    boundaries = range(h.val_batch_tokens // 8, len(streams[k]) - 1, h.val_batch_tokens // 8)
    assert all(int(streams[k][b]) != tg.BOS_ID for b in boundaries)  # no row starts on a document
    assert rank0[k][:2] == pytest.approx(one[k][:2], rel=1e-6), (
        f"1 rank (loss, bpb) {one[k][:2]} != 2 ranks {rank0[k][:2]}")

"""Helpers shared by test_eval.py and test_ttt.py (not a test module).

- SMALL_ENV: the tiny model/eval/TTT settings both files use on top of conftest's TINY_ENV.
- Fixtures, imported by both test modules: one_thread (autouse) and setup, the module's
  (hyperparameters, model, byte LUTs, validation tokens).
- make_model: a tiny fp32 model whose zero-initialized parts are randomized, so that attention,
  the MLPs and the logits all depend on the context (at init, O and MLP-down are zero and every
  position would be scored from its own token only, which hides any context or leak bug).
- doc_stream: a short validation stream of real documents (BOS-separated) from the tiny val split.
- SumsSpy: records the (nats, bytes, tokens) totals each evaluation all-reduces.
- RowsSpy: records the (inputs, targets, mask) pieces every score_rows call scores.
- run_two_ranks: runs a module-level function in 2 spawned gloo processes and returns what each returned.
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile

import pytest
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg

CPU = torch.device("cpu")

# VAL_BATCH_TOKENS: eval_val rows of VAL_BATCH_TOKENS / 8 = 128 tokens, two EVAL_SEQ_LEN sequences.
SMALL_ENV = {
    "NUM_LAYERS": 4, "MODEL_DIM": 64, "NUM_HEADS": 4, "NUM_KV_HEADS": 2, "MLP_MULT": 2, "LOOP_START": 1,
    "LOOP_END": 2, "PARALLEL_START_LAYER": 3, "XSA_LAST_N": 2, "ROPE_DIMS": 8, "EVAL_SEQ_LEN": 64,
    "VAL_BATCH_TOKENS": 1024, "EVAL_STRIDE": 32, "TTT_LORA_RANK": 4, "TTT_CHUNK_SIZE": 8, "TTT_EVAL_SEQ_LEN": 32,
    "TTT_BATCH_SIZE": 3, "TTT_LORA_LR": 1e-2,
}

# Caps on the length of successive validation documents in doc_stream: long ones (cut at
# EVAL_SEQ_LEN pieces, longer than the TTT window), short ones, and the split's BOS-only documents.
DOC_CAPS = (150, 9, 40, 2, 70, 12, 1, 30, 90, 3, 25, 55)


def hparams(make_hparams, **overrides):
    return make_hparams(**dict(SMALL_ENV, **overrides))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops run faster on one thread, and on a loaded machine a second OpenMP thread that spins
    waiting for a core makes them up to 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(make_hparams):
    """(h, model, luts, val) of SMALL_ENV (TTT_LORA_LR=1e-2: large enough that adaptation changes
    the numbers)."""
    h = hparams(make_hparams)
    return h, make_model(h), byte_luts(h), val_tokens(h)


def make_model(h, seed: int = 0) -> tg.GPT:
    """fp32, looping on (as every eval model runs), eval mode, deterministic for a seed."""
    torch.manual_seed(seed)
    model = tg.build_model(h, "cpu", "sdpa").float()
    g = torch.Generator().manual_seed(seed + 1)
    L = h.num_layers
    with torch.no_grad():
        model.tok_emb.weight.normal_(0, 0.3, generator=g)  # sharp logits, so context changes the loss
        model.qo_bank[L:].normal_(0, 0.1, generator=g)  # O projections (zero at init)
        model.mlp_down_bank.normal_(0, 0.1, generator=g)  # MLP down (zero at init)
    model.looping = True
    return model.eval()


def byte_luts(h):
    sp = spm.SentencePieceProcessor(model_file=h.tokenizer_path)
    return tg.build_byte_luts(sp, h.vocab_size)


def val_tokens(h) -> torch.Tensor:
    return tg.load_validation_tokens(h.val_files, h.eval_seq_len)


def doc_stream(val: torch.Tensor, total: int, caps=DOC_CAPS, skip: int = 0) -> torch.Tensor:
    """`total` tokens: validation documents from the skip-th on, document k cut to at most
    caps[k % len(caps)] tokens (its BOS included), concatenated; the last one is cut by `total`."""
    bos = torch.nonzero(val == tg.BOS_ID).flatten().tolist() + [len(val)]
    pieces, n, k = [], 0, 0
    for a, b in zip(bos[skip:-1], bos[skip + 1:]):
        piece = val[a:min(b, a + caps[k % len(caps)])]
        pieces.append(piece)
        n, k = n + len(piece), k + 1
        if n >= total:
            break
    out = torch.cat(pieces)[:total].clone()
    assert len(out) == total, "the tiny validation split is too short for this stream"
    return out


def docs_of_lengths(val: torch.Tensor, lengths, final_bos: bool = True) -> torch.Tensor:
    """Documents of exactly these lengths (BOS included), each the start of a different long
    validation document, concatenated; with final_bos a last BOS follows, so that every document,
    the last one too, ends at the next BOS (its length as split_documents counts it is length + 1)."""
    bos = torch.nonzero(val == tg.BOS_ID).flatten().tolist() + [len(val)]
    long_docs = [a for a, b in zip(bos, bos[1:]) if b - a >= max(lengths)]
    assert len(long_docs) >= len(lengths), "the tiny validation split has too few long documents"
    pieces = [val[a:a + n] for a, n in zip(long_docs, lengths)]
    return torch.cat(pieces + [torch.tensor([tg.BOS_ID])] * final_bos).clone()


def stream_bytes(stream: torch.Tensor, luts) -> int:
    """Bytes of every target of a stream (the foundation's count, §5.4)."""
    return int(tg.target_bytes(stream[:-1], stream[1:], luts).sum())


def _patch(name: str, value, monkeypatch=None):
    """train_gpt.<name> = value: undone after the test through monkeypatch, or for good without
    (a spawned worker owns its module)."""
    if monkeypatch is not None:
        monkeypatch.setattr(tg, name, value)
    else:
        setattr(tg, name, value)


class SumsSpy:
    """Wraps train_gpt.reduce_over_ranks: .calls holds the rank-summed values of every call."""

    def __init__(self, monkeypatch=None):
        self.calls = []
        original = tg.reduce_over_ranks

        def spy(*values, device):
            out = original(*values, device=device)
            self.calls.append(out)
            return out

        _patch("reduce_over_ranks", spy, monkeypatch)

    @property
    def last(self):
        return self.calls[-1]


class RowsSpy:
    """Wraps train_gpt.score_rows: .rows holds every (inputs, targets, mask) piece scored, in order."""

    def __init__(self, monkeypatch=None):
        self.rows = []
        original = tg.score_rows

        def spy(model_fn, rows, *args, **kwargs):
            self.rows.extend(rows)
            return original(model_fn, rows, *args, **kwargs)

        _patch("score_rows", spy, monkeypatch)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, port: int, folder: str, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(*args)
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_two_ranks(fn, *args) -> list:
    """fn(*args) on 2 gloo ranks (new processes); fn must be a module-level function.
    Returns [rank 0's result, rank 1's result]. The processes come from a forkserver that has
    imported torch and train_gpt once per session (a fresh interpreter takes seconds to do that),
    and that never ran torch code, so forking it is safe."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "train_gpt", __name__])
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_rank_entry, args=(_free_port(), folder, fn, args), nprocs=2, join=True,
                           start_method="forkserver")
        return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(2)]

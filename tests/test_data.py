"""DATA: shard format, packed rows and cu_seqlens, the two training loaders, validation tokens, and
check_data, which guards them at start."""
import os
import shutil

import numpy as np
import pytest
import torch

from tests.conftest import one_line
from train_gpt import (BOS_ID, ConfigError, DocumentPackingLoader, ShardError, ShuffledSequenceLoader, build_cu_seqlens,
                       check_data, load_validation_tokens, read_shard, write_shard)

# ---------------------------------------------------------------------------------------------
# Shard format
# ---------------------------------------------------------------------------------------------


def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 2**16, size=1000)
    path = str(tmp_path / "fineweb_train_000000.bin")
    write_shard(path, tokens)
    assert os.path.getsize(path) == 1024 + 2 * 1000
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [20240520, 1, 1000] and not header[3:].any()
    got = read_shard(path)
    assert got.dtype == np.uint16 and np.array_equal(got, tokens)


@pytest.mark.parametrize("bad", [-1, 2**16])
def test_write_shard_rejects_ids_outside_uint16(tmp_path, bad):
    path = str(tmp_path / "x.bin")
    with pytest.raises(ShardError, match="uint16") as e:
        write_shard(path, [5, bad])
    assert path in str(e.value)


def _corrupt(path, kind):
    """Write a shard of 1000 tokens, then break it in one way."""
    if kind == "too short for header":
        open(path, "wb").write(b"\0" * 100)
        return
    write_shard(path, [] if kind == "empty" else np.arange(1000) + 2)
    header = np.fromfile(path, dtype="<i4", count=256)
    body = open(path, "rb").read()[1024:]
    if kind == "bad magic":
        header[0] = 20240521
    elif kind == "bad version":
        header[1] = 2
    elif kind == "truncated body":
        body = body[:1500]
    elif kind == "count mismatch":
        header[2] = 999  # the body holds 1000 tokens
    with open(path, "wb") as f:
        f.write(header.tobytes() + body)


@pytest.mark.parametrize("kind, message", [
    ("bad magic", "bad magic"), ("bad version", "version"), ("truncated body", "truncated or corrupt"),
    ("count mismatch", "truncated or corrupt"), ("empty", "empty"), ("too short for header", "shorter than"),
])
def test_read_shard_names_the_file_for_each_corruption(tmp_path, kind, message):
    path = str(tmp_path / "fineweb_val_000000.bin")
    _corrupt(path, kind)
    with pytest.raises(ShardError, match=message) as e:
        read_shard(path)
    assert str(e.value).startswith(path) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# cu_seqlens
# ---------------------------------------------------------------------------------------------


def check_cu_seqlens(tokens, max_doc_len, bucket=64):
    cu, max_len = build_cu_seqlens(tokens, max_doc_len, bucket)
    n = len(tokens)
    assert cu.dtype == np.int32 and cu[0] == 0 and cu[-1] == n
    assert len(cu) % bucket == 0
    seg = np.diff(cu.astype(np.int64))
    assert (seg >= 0).all() and seg.max() <= max_doc_len and max_len == seg.max()
    end = int(np.argmax(cu == n))  # the padding is the end repeated, fewer than `bucket` entries of it
    assert (cu[end:] == n).all() and len(cu) - (end + 1) < bucket
    bounds = cu[:end + 1].tolist()
    assert len(set(bounds)) == len(bounds)  # real segments are never empty
    bos = set(np.flatnonzero(tokens == BOS_ID).tolist())
    assert bos <= set(bounds)  # a boundary at every BOS (so no segment spans two documents)
    for prev, start in zip(bounds[:-2], bounds[1:-1]):  # any other boundary splits an over-long document
        if start not in bos:
            assert start - prev == max_doc_len
    return cu


def test_cu_seqlens_example():
    tokens = np.array([5, 5, 1, 5, 5, 5, 5, 5, 1, 5])
    cu = check_cu_seqlens(tokens, max_doc_len=3)
    assert cu[:5].tolist() == [0, 2, 5, 8, 10] and len(cu) == 64
    assert build_cu_seqlens(tokens, 3, bucket=1)[0].tolist() == [0, 2, 5, 8, 10]


def test_cu_seqlens_invariants_random():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 3000))
        tokens = rng.integers(2, 500, size=n)
        tokens[rng.random(n) < rng.choice([0.0, 0.001, 0.01, 0.2, 1.0])] = BOS_ID
        if rng.random() < 0.5:
            tokens[0] = BOS_ID
        check_cu_seqlens(tokens, max_doc_len=int(rng.choice([1, 5, 64, 2048])), bucket=int(rng.choice([1, 8, 64])))


# ---------------------------------------------------------------------------------------------
# Synthetic shards whose tokens say where they come from
# ---------------------------------------------------------------------------------------------


def make_shards(folder, lengths, lead=3, split="train", seed=0):
    """Shards whose non-BOS tokens are unique (2 + position across all shards) with BOS every 1-40
    tokens; each shard starts with `lead` tokens of a document continued from the previous shard."""
    rng = np.random.default_rng(seed)
    arrays, offset = [], 0
    for k, n in enumerate(lengths):
        tokens = 2 + offset + np.arange(n)
        offset += n
        bos = lead + np.cumsum(np.concatenate([[0], rng.integers(1, 40, size=n)]))
        tokens[bos[bos < n]] = BOS_ID
        write_shard(os.path.join(folder, f"fineweb_{split}_{k:06d}.bin"), tokens)
        arrays.append(tokens)
    assert offset < 2**16
    return os.path.join(folder, f"fineweb_{split}_*.bin"), arrays


def expected_spans(arrays, span, steps):
    """(shard, start) of each global span per spec 5.2: start at the first BOS, advance by the span,
    drop a shard's tail that cannot hold a whole span, wrap around after the last shard."""
    k, cursor, out = 0, int(np.flatnonzero(arrays[0] == BOS_ID)[0]), []
    for _ in range(steps):
        if cursor + span > len(arrays[k]):
            k = (k + 1) % len(arrays)
            cursor = int(np.flatnonzero(arrays[k] == BOS_ID)[0])
        out.append((k, cursor))
        cursor += span
    return out


def locate(arrays, row):
    """(shard, offset) of a contiguous slice, found through its first non-BOS token."""
    i = int(np.flatnonzero(row != BOS_ID)[0])
    position = int(row[i]) - 2
    for k, a in enumerate(arrays):
        if position < len(a):
            start = position - i
            assert np.array_equal(a[start:start + len(row)], row), "not a contiguous slice of one shard"
            return k, start
        position -= len(a)
    raise AssertionError("token not found")


# ---------------------------------------------------------------------------------------------
# DocumentPackingLoader
# ---------------------------------------------------------------------------------------------


def test_packing_loader_ranks_cursor_and_wraparound(tmp_path):
    world, n, max_doc_len = 4, 50, 16
    span = world * (n + 1)
    pattern, arrays = make_shards(str(tmp_path), [1000, 777, 1300])
    # spans per pass: (1000-3)//204 = 4, (777-3)//204 = 3, (1300-3)//204 = 6
    steps = 2 * 13 + 3
    plan = expected_spans(arrays, span, steps)
    assert plan[4] == (1, 3) and plan[7] == (2, 3) and plan[13] == (0, 3)  # tails dropped, then wrap
    rows = {}
    for rank in range(world):
        loader = DocumentPackingLoader(pattern, n, max_doc_len, rank=rank, world_size=world)
        try:
            for step in range(steps):
                x, y, cu, max_len = loader.next_batch()
                assert x.shape == y.shape == (n,) and x.dtype == y.dtype == torch.int64
                assert torch.equal(x[1:], y[:-1])  # targets are the inputs shifted by one
                ref_cu, ref_max = build_cu_seqlens(x.numpy(), max_doc_len)
                assert cu.dtype == torch.int32 and np.array_equal(cu.numpy(), ref_cu) and max_len == ref_max
                rows[rank, step] = torch.cat([x, y[-1:]]).numpy()
        finally:
            loader.close()
    for step, (k, start) in enumerate(plan):
        for rank in range(world):
            # rank r reads [start + r(n+1), start + (r+1)(n+1)): disjoint, contiguous, covering the span
            assert locate(arrays, rows[rank, step]) == (k, start + rank * (n + 1))
        if plan[step][0] == plan[step - 1][0] and step:
            assert start == plan[step - 1][1] + span  # the cursor advances by one global span
    assert rows[0, 0][0] == BOS_ID and np.array_equal(rows[0, 13], rows[0, 0])  # wrap to shard 0's first BOS


def test_packing_loader_single_shard_keeps_cycling(tmp_path):
    pattern, arrays = make_shards(str(tmp_path), [500], lead=0)
    loader = DocumentPackingLoader(pattern, 99, 2048)
    try:
        starts = [locate(arrays, torch.cat([x, y[-1:]]).numpy()) for x, y, _, _ in
                  (loader.next_batch() for _ in range(12))]
    finally:
        loader.close()
    assert [s for _, s in starts] == [0, 100, 200, 300, 400] * 2 + [0, 100]


def test_packing_loader_holds_out_the_last_shards_tail_in_every_pass(tmp_path):
    """hold_out=k: the last k global spans of the last shard (from a BOS) are never served by
    next_batch, however often the loader wraps; held_out_batches() serves exactly them, each rank
    its slice; a last shard too short for them leaves them to the shard before it. Before, EMA_SELECT scored the loader's next batches, which a run longer than one
    pass over the data (a 300 s run on the corpus makes three) had already trained on."""
    world, n, max_doc_len, k = 2, 40, 16, 2
    span = world * (n + 1)
    pattern, arrays = make_shards(str(tmp_path), [1400, 900])
    last = arrays[-1]
    bos = np.flatnonzero(last == BOS_ID)
    start = int(bos[bos <= len(last) - k * span][-1])
    held = {int(t) for t in last[start:start + k * span]}
    for rank in range(world):
        loader = DocumentPackingLoader(pattern, n, max_doc_len, rank=rank, world_size=world, hold_out=k)
        try:
            served = set()
            for _ in range(40):  # several passes over both shards
                x, y, _, _ = loader.next_batch()
                served |= {int(t) for t in torch.cat([x, y[-1:]])}
            batches = loader.held_out_batches()
        finally:
            loader.close()
        assert not (served - {BOS_ID}) & (held - {BOS_ID})
        assert len(batches) == k
        for j, (x, y, cu, max_len) in enumerate(batches):
            a = start + j * span + rank * (n + 1)
            assert np.array_equal(torch.cat([x, y[-1:]]).numpy(), last[a:a + n + 1])
            ref_cu, ref_max = build_cu_seqlens(x.numpy(), max_doc_len)
            assert np.array_equal(cu.numpy(), ref_cu) and max_len == ref_max
    assert last[start] == BOS_ID
    loader = DocumentPackingLoader(pattern, n, max_doc_len, world_size=world)  # EMA_SELECT=0: nothing held out
    try:
        assert loader.held_out_batches() == []
    finally:
        loader.close()
    with pytest.raises(ConfigError, match="EMA_SELECT=50"):
        DocumentPackingLoader(pattern, n, max_doc_len, world_size=world, hold_out=50)
    loader = DocumentPackingLoader(pattern, n, max_doc_len, world_size=world, hold_out=10)
    try:  # 900 tokens cannot hold 10 spans of 82 and one more: shard 0 holds them
        assert loader.held_shard == 0 and span <= loader.held_start <= 1400 - 10 * span
    finally:
        loader.close()


def test_packing_loader_rejects_unusable_shards(tmp_path):
    pattern, _ = make_shards(str(tmp_path), [100])
    with pytest.raises(ConfigError, match="cannot fill one global batch"):
        DocumentPackingLoader(pattern, 100, 64)
    nobos = tmp_path / "nobos"
    nobos.mkdir()
    write_shard(str(nobos / "fineweb_train_000000.bin"), np.full(500, 7))
    with pytest.raises(ShardError, match="no BOS"):
        DocumentPackingLoader(str(nobos / "fineweb_train_*.bin"), 10, 64)
    with pytest.raises(ConfigError, match="no shards match"):
        DocumentPackingLoader(str(tmp_path / "missing_*.bin"), 10, 64)


def test_packing_loader_on_tiny_dataset(tiny_dataset, make_hparams):
    h = make_hparams()
    loader = DocumentPackingLoader(h.train_files, h.local_batch_tokens, h.train_seq_len)
    try:
        for _ in range(20):
            x, y, cu, max_len = loader.next_batch()
            assert x.shape == (h.local_batch_tokens,) and int(x.max()) < tiny_dataset.vocab_size
            assert max_len <= h.train_seq_len and len(cu) % 64 == 0
    finally:
        loader.close()


# ---------------------------------------------------------------------------------------------
# ShuffledSequenceLoader
# ---------------------------------------------------------------------------------------------


def test_shuffled_loader_shapes_windows_and_determinism(tmp_path):
    seq_len, batch = 32, 6
    pattern, arrays = make_shards(str(tmp_path), [700, 500, 900, 650])

    def draw(rank, batches):
        loader = ShuffledSequenceLoader(pattern, seq_len, rank=rank, world_size=2)
        return [loader.next_batch(batch) for _ in range(batches)]

    for rank in range(2):
        mine = set(range(4)[rank::2])
        first, again = draw(rank, 5), draw(rank, 5)
        phases = {}
        for (x, y), (x2, y2) in zip(first, again):
            assert x.shape == y.shape == (batch, seq_len) and x.dtype == torch.int64
            assert torch.equal(x[:, 1:], y[:, :-1])
            assert torch.equal(x, x2) and torch.equal(y, y2)  # seeded by rank only
            for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
                k, start = locate(arrays, row)
                assert k in mine  # rank r reads shards r, r + world, ...
                assert phases.setdefault(k, start % seq_len) == start % seq_len  # one phase per shard and epoch
    assert not torch.equal(draw(0, 1)[0][0], draw(1, 1)[0][0])


def test_shuffled_loader_uses_each_window_once_per_epoch(tmp_path):
    seq_len = 50
    pattern, arrays = make_shards(str(tmp_path), [400, 300])
    loader = ShuffledSequenceLoader(pattern, seq_len)
    windows = sum(len(w) for _, w in loader.order)
    rows = [tuple(locate(arrays, torch.cat([x, y[:, -1:]], 1).numpy()[0])) for x, y in
            (loader.next_batch(1) for _ in range(windows))]
    assert len(set(rows)) == windows
    x, _ = loader.next_batch(3)  # a new epoch starts without error
    assert x.shape == (3, seq_len)


def test_shuffled_loader_rejects_short_shards(tmp_path):
    pattern, _ = make_shards(str(tmp_path), [40])
    with pytest.raises(ConfigError, match="calibration window"):
        ShuffledSequenceLoader(pattern, 64)


# ---------------------------------------------------------------------------------------------
# Validation tokens
# ---------------------------------------------------------------------------------------------


def test_load_validation_tokens_truncates_to_whole_windows(tmp_path):
    pattern, arrays = make_shards(str(tmp_path), [100, 57, 30], split="val")
    all_tokens = np.concatenate(arrays)
    for seq_len in (1, 16, 64, 186):
        got = load_validation_tokens(pattern, seq_len)
        usable = (len(all_tokens) - 1) // seq_len * seq_len
        assert got.dtype == torch.int64 and len(got) == usable + 1
        assert np.array_equal(got.numpy(), all_tokens[:usable + 1])
    with pytest.raises(ConfigError, match="fewer than EVAL_SEQ_LEN"):
        load_validation_tokens(pattern, 187)


def test_validation_tokens_of_tiny_dataset(tiny_dataset, make_hparams):
    h = make_hparams()
    tokens = load_validation_tokens(h.val_files, h.eval_seq_len)
    assert (len(tokens) - 1) % h.eval_seq_len == 0 and tiny_dataset.val_tokens - len(tokens) < h.eval_seq_len
    assert int((tokens == BOS_ID).sum()) <= tiny_dataset.val_docs and tokens[0] == BOS_ID


# ---------------------------------------------------------------------------------------------
# check_data: missing or mismatched data and tokenizer, in one line
# ---------------------------------------------------------------------------------------------


def test_vocab_size_mismatch(tmp_path, tiny_dataset, make_hparams):
    os.makedirs(tmp_path / "datasets")
    os.symlink(tiny_dataset.dataset_dir, tmp_path / "datasets" / "fineweb10B_sp999")
    os.makedirs(tmp_path / "tokenizers")
    shutil.copy(tiny_dataset.tokenizer_path, tmp_path / "tokenizers" / "fineweb_999_bpe.model")
    with pytest.raises(ConfigError) as e:
        check_data(make_hparams(DATA_DIR=tmp_path, VOCAB_SIZE=999))
    assert "VOCAB_SIZE=999" in one_line(e) and f"{tiny_dataset.vocab_size} pieces" in one_line(e)


def test_missing_data_folder(tmp_path, make_hparams):
    with pytest.raises(ConfigError) as e:  # vocab 512: no such download, so only the build is suggested
        check_data(make_hparams(DATA_DIR=tmp_path / "nowhere"))
    assert "DATA_DIR=" in one_line(e) and "tokenize_docs.py" in one_line(e) and "--variant" not in one_line(e)
    with pytest.raises(ConfigError) as e:
        check_data(make_hparams(DATA_DIR=tmp_path / "nowhere", VOCAB_SIZE=1024))
    assert "cached_challenge_fineweb.py --variant sp1024" in one_line(e) and "tokenize_docs.py" in one_line(e)


def test_missing_shards_and_tokenizer(tmp_path, tiny_dataset, make_hparams):
    dataset = tmp_path / "datasets" / f"fineweb10B_sp{tiny_dataset.vocab_size}"
    os.makedirs(dataset)
    h = make_hparams(DATA_DIR=tmp_path)
    with pytest.raises(ConfigError, match="no shards match") as e:
        check_data(h)
    assert "fineweb_val_" in one_line(e)
    for path in tiny_dataset.val_files:
        shutil.copy(path, dataset)
    with pytest.raises(ConfigError, match="no shards match .*fineweb_train_"):
        check_data(h)
    with pytest.raises(ConfigError) as e:
        check_data(h, need_train=False)  # only validation shards are needed for evaluation
    message = one_line(e)
    assert f"fineweb_{tiny_dataset.vocab_size}_bpe.model" in message and "does not exist" in message
    assert f"VOCAB_SIZE={tiny_dataset.vocab_size}" in message and "DATA_DIR=" in message




def test_packing_loader_cuts_at_a_new_max_doc_len_from_the_next_batch(tmp_path):
    # the batch prepared ahead with the old length is cut again; the ones after use the new length
    pattern, _ = make_shards(str(tmp_path), [5000], lead=0)
    loader = DocumentPackingLoader(pattern, 400, 128)
    try:
        batches = [loader.next_batch(), loader.next_batch(32), loader.next_batch(), loader.next_batch(32)]
    finally:
        loader.close()
    for (x, _, cu, max_len), cut in zip(batches, (128, 32, 32, 32)):
        ref_cu, ref_max = build_cu_seqlens(x.numpy(), cut)
        assert np.array_equal(cu.numpy(), ref_cu) and max_len == ref_max <= cut
    assert batches[0][3] > 32  # the documents are long enough for the new length to matter

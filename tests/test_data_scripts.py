"""The data scripts: data/tokenize_docs.py (documents -> shards) and data/cached_challenge_fineweb.py
(hub -> data/), the latter against a fake hub; nothing here touches the network."""
import json
import lzma
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm

import cached_challenge_fineweb as cf
import tokenize_docs as td
from tests.conftest import REPO_ROOT, generate_docs
from train_gpt import BOS_ID, read_shard, write_shard

SCRIPT = os.path.join(REPO_ROOT, "data", "tokenize_docs.py")

# ---------------------------------------------------------------------------------------------
# tokenize_docs
# ---------------------------------------------------------------------------------------------


def write_docs(path, texts, xz=False):
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
    if xz:
        with lzma.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(lines)
    return str(path)


def shards_of(dataset_dir, split):
    names = sorted(n for n in os.listdir(dataset_dir) if n.startswith(f"fineweb_{split}_"))
    return [np.array(read_shard(os.path.join(dataset_dir, n))) for n in names]


@pytest.fixture(scope="module")
def docs60():
    return generate_docs(60, seed=3)


def test_jsonl_and_xz_give_the_same_split_and_shards(tmp_path, tiny_tokenizer, docs60):
    sp = spm.SentencePieceProcessor(model_file=tiny_tokenizer)
    results = []
    for xz in (False, True):
        docs = write_docs(tmp_path / ("docs.jsonl.xz" if xz else "docs.jsonl"), docs60, xz)
        s = td.build_dataset(docs, str(tmp_path / f"out{xz}"), tiny_tokenizer, val_docs=10, shard_tokens=500)
        assert (s["val_docs"], s["train_docs"]) == (10, 50)
        results.append({split: shards_of(s["dataset_dir"], split) for split in ("val", "train")})
    for split, docs in (("val", docs60[:10]), ("train", docs60[10:])):
        plain, packed = results[0][split], results[1][split]
        assert len(plain) == len(packed) and all(np.array_equal(a, b) for a, b in zip(plain, packed))
        assert all(len(a) == 500 for a in plain[:-1]) and 0 < len(plain[-1]) <= 500  # the shard limit
        stream = np.concatenate(plain)
        assert int((stream == BOS_ID).sum()) == len(docs)  # one BOS per document, no EOS
        expected = np.concatenate([[BOS_ID] + ids for ids in sp.encode(docs)])
        assert np.array_equal(stream, expected)
    assert s["val_tokens"] == sum(map(len, results[1]["val"]))


def test_workers_keep_document_order(tmp_path, tiny_tokenizer, docs60, monkeypatch):
    monkeypatch.setattr(td, "CHUNK_DOCS", 4)  # many chunks in flight at once
    docs = write_docs(tmp_path / "docs.jsonl", docs60)
    one = td.build_dataset(docs, str(tmp_path / "one"), tiny_tokenizer, val_docs=7, shard_tokens=700, workers=1)
    two = td.build_dataset(docs, str(tmp_path / "two"), tiny_tokenizer, val_docs=7, shard_tokens=700, workers=2)
    for a, b in zip(one["val_shards"] + one["train_shards"], two["val_shards"] + two["train_shards"]):
        assert open(a, "rb").read() == open(b, "rb").read()
    assert len(one["train_shards"]) == len(two["train_shards"]) > 1


def test_tokenizer_files_are_installed_and_old_shards_removed(tmp_path, tiny_tokenizer, docs60):
    docs = write_docs(tmp_path / "docs.jsonl", docs60)
    out = tmp_path / "data"
    stale = out / "datasets" / "fineweb10B_sp512" / "fineweb_train_000099.bin"
    write_shard(str(stale), [BOS_ID, 5])
    s = td.build_dataset(docs, str(out), tiny_tokenizer, val_docs=5)
    assert not stale.exists() and len(s["train_shards"]) == 1
    assert s["tokenizer_path"] == str(out / "tokenizers" / "fineweb_512_bpe.model")
    assert open(s["tokenizer_path"], "rb").read() == open(tiny_tokenizer, "rb").read()
    assert (out / "tokenizers" / "fineweb_512_bpe.vocab").is_file()
    s2 = td.build_dataset(docs, str(out), s["tokenizer_path"], val_docs=5)  # the installed copy is reusable
    assert s2["train_tokens"] == s["train_tokens"]


def test_train_tokenizer_uses_the_challenge_settings(tmp_path, docs60):
    docs = write_docs(tmp_path / "docs.jsonl", docs60 * 2)
    out = tmp_path / "data"
    assert td.main(["--docs", docs, "--out", str(out), "--train-tokenizer", "--vocab-size", "512",
                    "--val-docs", "20", "--shard-tokens", "1000", "--workers", "1"]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizers" / "fineweb_512_bpe.model"))
    assert (out / "tokenizers" / "fineweb_512_bpe.vocab").is_file()
    assert (sp.vocab_size(), sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (512, 0, 1, 2, 3)
    assert sum(sp.is_byte(i) for i in range(512)) == 256  # byte fallback
    assert sp.encode("2024", out_type=str) == ["2", "0", "2", "4"]  # split digits
    assert not sp.encode("model", out_type=str)[0].startswith("\u2581")  # no dummy prefix
    assert sp.decode(sp.encode("a \n\n  b\ufb01")) == "a bfi"  # nmt_nfkc
    assert shards_of(out / "datasets" / "fineweb10B_sp512", "train")


def test_train_tokenizer_errors(tmp_path, docs60):
    docs = write_docs(tmp_path / "docs.jsonl", docs60[:20])
    with pytest.raises(td.DocsError, match="no training documents after the first 20"):
        td.train_tokenizer(docs, str(tmp_path / "t"), 512, val_docs=20, sample_mb=1)
    with pytest.raises(td.DocsError, match="--vocab-size 270: SentencePiece could not train") as e:
        td.train_tokenizer(docs, str(tmp_path / "t"), 270, val_docs=5, sample_mb=1)
    assert "\n" not in str(e.value)


def test_input_errors_in_process(tmp_path, tiny_tokenizer, docs60, monkeypatch):
    docs = write_docs(tmp_path / "docs.jsonl", docs60[:5])
    with pytest.raises(td.DocsError, match="none left for training after --val-docs 5"):
        td.build_dataset(docs, str(tmp_path / "a"), tiny_tokenizer, val_docs=5)
    broken = tmp_path / "broken.jsonl.xz"
    broken.write_bytes(b"definitely not xz")
    with pytest.raises(td.DocsError, match="not a valid .xz file"):
        td.build_dataset(str(broken), str(tmp_path / "b"), tiny_tokenizer, val_docs=1)
    text_file = tmp_path / "docs.txt"
    text_file.write_text("plain text\n")
    with pytest.raises(td.DocsError, match="expected a .jsonl or .jsonl.xz"):
        td.build_dataset(str(text_file), str(tmp_path / "c"), tiny_tokenizer, val_docs=1)
    monkeypatch.setattr(td, "MAX_VOCAB", 300)  # stands in for a model with more than 65536 pieces
    with pytest.raises(td.DocsError, match="512 pieces do not fit uint16 shards"):
        td.build_dataset(docs, str(tmp_path / "d"), tiny_tokenizer, val_docs=1)


def run_cli(*args):
    result = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=60)
    return result.returncode, result.stderr.strip()


@pytest.mark.parametrize("case", ["missing file", "bad json", "no text field", "text not a string",
                                  "vocab too large", "bad json in a worker"])
def test_cli_error_exits_with_one_line(tmp_path, tiny_tokenizer, case):
    docs = tmp_path / "docs.jsonl"
    good = json.dumps({"text": "fine"}) + "\n"
    lines = {"bad json": good * 2 + '{"text": "unterminated}\n',
             "no text field": good + json.dumps({"body": "x"}) + "\n",
             "text not a string": good * 3 + json.dumps({"text": 42}) + "\n",
             "bad json in a worker": good * 4 + "[1, 2\n"}.get(case, good * 3)
    docs.write_text(lines, encoding="utf-8")
    args = ["--docs", str(docs), "--out", str(tmp_path / "out"), "--val-docs", "1", "--workers", "1"]
    if case == "missing file":
        args[1] = str(tmp_path / "absent.jsonl")
    if case == "vocab too large":
        args += ["--train-tokenizer", "--vocab-size", "70000"]
    else:
        args += ["--tokenizer", tiny_tokenizer]
    if case == "bad json in a worker":
        args[-3] = "2"  # --workers 2
    code, stderr = run_cli(*args)
    assert code == 2 and "\n" not in stderr and stderr.startswith("tokenize_docs: error: ")
    expected = {"missing file": "absent.jsonl: no such file", "bad json": "docs.jsonl:3: not valid JSON",
                "no text field": 'docs.jsonl:2: the object has no "text" field',
                "text not a string": 'docs.jsonl:4: "text" is a int, not a string',
                "vocab too large": "--vocab-size 70000: must be between 1 and 65536",
                "bad json in a worker": "docs.jsonl:5: not valid JSON"}[case]
    assert expected in stderr


def test_cli_usage_errors(tmp_path, tiny_tokenizer):
    code, stderr = run_cli("--docs", "x.jsonl", "--train-tokenizer")
    assert code == 2 and "--train-tokenizer needs --vocab-size" in stderr


# A failed run must leave an existing dataset (shards and tokenizer) byte-identical: everything is
# written into a temporary folder and swapped in only when the whole input has been read.


def snapshot(folder):
    """{relative path: bytes (files), link target (symlinks) or None (folders)}, hidden entries included."""
    tree = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                tree[rel] = "-> " + os.readlink(path)
            elif os.path.isdir(path):
                tree[rel] = None
            else:
                with open(path, "rb") as f:
                    tree[rel] = f.read()
    return tree


@pytest.fixture(scope="module")
def built_data(tmp_path_factory, tiny_tokenizer, docs60):
    """A DATA_DIR built from docs60 (val 5, 500-token shards: several of each split) plus a file of
    the user's own in the dataset folder; copy it before use."""
    folder = tmp_path_factory.mktemp("built")
    docs = write_docs(folder / "docs.jsonl", docs60)
    s = td.build_dataset(docs, str(folder / "data"), tiny_tokenizer, val_docs=5, shard_tokens=500)
    assert len(s["val_shards"]) > 1 and len(s["train_shards"]) > 5
    with open(os.path.join(s["dataset_dir"], "NOTES.txt"), "w") as f:
        f.write("kept across rebuilds\n")
    return folder / "data"


BAD_INPUTS = {  # case: (lines of the --docs file, or None for a case-specific file; extra args; message)
    "missing file": (None, [], "absent.jsonl: no such file"),
    "empty file": ("", [], "docs.jsonl: no documents (the file is empty or has only blank lines)"),
    "blank lines only": ("\n  \n\t\n", [], "docs.jsonl: no documents"),
    "not json after shards were written": (20, [], "docs.jsonl:21: not valid JSON"),
    "not json, two workers": (20, ["--workers", "2"], "docs.jsonl:21: not valid JSON"),
    "no text field": (20, [], 'docs.jsonl:21: the object has no "text" field'),
    "too few documents": (5, ["--val-docs", "5"], "has only 5 documents, none left for training after --val-docs 5"),
    "empty xz": (None, [], "docs.jsonl.xz: not a valid .xz file"),
    "garbage xz": (None, [], "docs.jsonl.xz: not a valid .xz file"),
    "truncated xz": (None, [], "docs.jsonl.xz: not a valid .xz file (Compressed file ended"),
    "not a tokenizer": (20, [], "junk.model: not a SentencePiece model"),
    "out not writable": (20, [], "cannot write there"),
    "out is a file": (20, [], "is not a folder"),
    "disk full": (20, [], "No space left on device"),
    "val-docs negative": (20, ["--val-docs", "-3"], "--val-docs -3: must be at least 1"),
    "val-docs negative, trained tokenizer": (20, ["--val-docs", "-1", "--train-tokenizer", "--vocab-size", "512"],
                                             "--val-docs -1: must be at least 1"),
    "not json after the tokenizer's sample": (60, ["--train-tokenizer", "--vocab-size", "512", "--sample-mb", "0.03"],
                                              "docs.jsonl:61: not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_leaves_the_old_dataset_untouched(case, tmp_path, tiny_tokenizer, docs60, built_data, monkeypatch,
                                                    capsys):
    """Exit status 2, one line naming the file and the problem, and the DATA_DIR built before (shards,
    tokenizer, the user's file) byte-identical, with no temporary files left behind."""
    out = tmp_path / "data"
    shutil.copytree(built_data, out, symlinks=True)
    before = snapshot(out)
    monkeypatch.setattr(td, "CHUNK_DOCS", 4)  # shards are written long before a bad line is read
    lines, extra, expected = BAD_INPUTS[case]
    docs = tmp_path / ("docs.jsonl.xz" if "xz" in case else "docs.jsonl")
    if isinstance(lines, int):
        bad = '{"text": "unterminated\n' if "json" in case else json.dumps({"body": "x"}) + "\n"
        write_docs(docs, docs60[:lines])
        if "too few" not in case:
            with open(docs, "a") as f:
                f.write(bad)
    elif lines is not None:
        docs.write_text(lines)
    elif case == "missing file":
        docs = tmp_path / "absent.jsonl"
    elif case == "empty xz":
        docs.write_bytes(b"")
    elif case == "garbage xz":
        docs.write_bytes(b"definitely not xz")
    elif case == "truncated xz":
        whole = lzma.compress("".join(json.dumps({"text": t}) + "\n" for t in docs60).encode())
        docs.write_bytes(whole[:len(whole) * 2 // 3])
    tokenizer = tiny_tokenizer
    if case == "not a tokenizer":
        tokenizer = str(tmp_path / "junk.model")
        open(tokenizer, "wb").write(b"junk")
    target = out
    if case == "out is a file":
        target = out / "datasets" / "fineweb10B_sp512" / "NOTES.txt" / "data"
    if case == "out not writable":  # a permission check that holds as root too
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: (not str(p).startswith(str(out)) or not mode & os.W_OK)
                            and real_access(p, mode, **kw))
    if case == "disk full":
        def full_disk_after_two_shards(path, tokens, written=[]):
            if len(written) == 2:
                raise OSError(28, "No space left on device", path)
            written.append(path)
            write_shard(path, tokens)
        monkeypatch.setattr(td, "shard_writer", lambda: full_disk_after_two_shards)
    args = ["--docs", str(docs), "--out", str(target), "--shard-tokens", "500", "--workers", "1"] + extra
    if "--val-docs" not in extra:
        args += ["--val-docs", "5"]
    if "--train-tokenizer" not in extra:
        args += ["--tokenizer", tokenizer]
    assert td.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("tokenize_docs: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and expected in errors[0], err
    assert len(err) == 1 or "--train-tokenizer" in extra  # (training logs one line of progress first)
    assert snapshot(out) == before


def test_bad_input_in_a_real_process_after_shards_were_written(tmp_path, tiny_tokenizer, built_data):
    """As above through the command line, with the bad line in the second 2048-document chunk (so
    the first chunk's shards are already written) and two worker processes."""
    out = tmp_path / "data"
    shutil.copytree(built_data, out, symlinks=True)
    before = snapshot(out)
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "a few words"}) + "\n" * 1 + (json.dumps({"text": "x y"}) + "\n") * 2100
                    + "not json\n")
    code, stderr = run_cli("--docs", str(docs), "--out", str(out), "--tokenizer", tiny_tokenizer, "--val-docs", "5",
                           "--shard-tokens", "500", "--workers", "2")
    lines = stderr.splitlines()  # a slow machine may log a progress line first
    assert code == 2 and lines[-1] == f"tokenize_docs: error: {docs}:2102: not valid JSON (Expecting value at column 1)"
    assert "Traceback" not in stderr and sum("error" in line for line in lines) == 1
    assert snapshot(out) == before


def test_a_failed_first_build_leaves_nothing(tmp_path, tiny_tokenizer, docs60):
    docs = write_docs(tmp_path / "docs.jsonl", docs60[:3])
    out = tmp_path / "new" / "data"
    with pytest.raises(td.DocsError, match="none left for training"):
        td.build_dataset(docs, str(out), tiny_tokenizer, val_docs=3)
    assert os.listdir(tmp_path) == ["docs.jsonl"]


def test_a_relative_out_folder(tmp_path, tiny_tokenizer, docs60, monkeypatch):
    """--out relative to the working directory, and not there yet: built, then rebuilt in place."""
    monkeypatch.chdir(tmp_path)
    docs = write_docs(tmp_path / "docs.jsonl", docs60)
    for _ in range(2):
        s = td.build_dataset("docs.jsonl", os.path.join("new", "data"), tiny_tokenizer, val_docs=5, shard_tokens=4000)
        assert s["dataset_dir"] == os.path.join("new", "data", "datasets", "fineweb10B_sp512")
        assert all(os.path.isfile(p) for p in s["val_shards"] + s["train_shards"])
    assert sorted(os.listdir("new/data/datasets")) == ["fineweb10B_sp512"] and os.path.isfile(docs)


def test_a_successful_rebuild_replaces_the_dataset(tmp_path, tiny_tokenizer, docs60, built_data, capsys):
    """Old shards all go (the new build has fewer), the tokenizer is replaced, the user's file stays,
    and no temporary file is left."""
    out = tmp_path / "data"
    shutil.copytree(built_data, out, symlinks=True)
    dataset = out / "datasets" / "fineweb10B_sp512"
    (out / "tokenizers" / "fineweb_512_bpe.model").write_bytes(b"an old model")
    docs = write_docs(tmp_path / "docs.jsonl", docs60[30:])
    assert td.main(["--docs", docs, "--out", str(out), "--tokenizer", tiny_tokenizer, "--val-docs", "3",
                    "--shard-tokens", "4000", "--workers", "1"]) == 0
    assert f"replaced the old dataset in {dataset}" in capsys.readouterr().err
    assert sorted(os.listdir(out / "datasets")) == ["fineweb10B_sp512"]
    assert sorted(os.listdir(out / "tokenizers")) == ["fineweb_512_bpe.model", "fineweb_512_bpe.vocab"]
    assert (out / "tokenizers" / "fineweb_512_bpe.model").read_bytes() == open(tiny_tokenizer, "rb").read()
    names = sorted(os.listdir(dataset))
    assert names[0] == "NOTES.txt" and (dataset / "NOTES.txt").read_text() == "kept across rebuilds\n"
    sp = spm.SentencePieceProcessor(model_file=tiny_tokenizer)
    stream = np.concatenate(shards_of(dataset, "val") + shards_of(dataset, "train"))
    assert np.array_equal(stream, np.concatenate([[BOS_ID] + ids for ids in sp.encode(docs60[30:])]))
    assert len(names) == 1 + len(shards_of(dataset, "val")) + len(shards_of(dataset, "train"))


# ---------------------------------------------------------------------------------------------
# cached_challenge_fineweb against a fake hub
# ---------------------------------------------------------------------------------------------

REPO_A, REPO_B = "willdepueoai/parameter-golf", "kevclark/parameter-golf"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake hub: repository files under tmp/hub/<repo_id>/<path>. cf.download is replaced by a copy
    from there that records each (repo_id, path); `publish` creates a repository's files."""
    root = tmp_path / "hub"
    calls = []

    def fake_download(repo_id, remote_path, dest):
        calls.append((repo_id, remote_path))
        source = root / repo_id / remote_path
        if not source.is_file():
            raise FileNotFoundError(f"404 Client Error. Entry Not Found for url: {remote_path}")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(source, dest)

    def publish(repo_id, variants, remote_root="datasets", sizes=True, train_shards=4):
        base = root / repo_id / remote_root
        manifest = {"version": 1, "datasets": [], "tokenizers": []}
        for variant in variants:
            name, tok = f"fineweb10B_{variant}", f"tok_{variant}"
            files = []
            for split, count in (("val", 1), ("train", train_shards)):
                for i in range(count):
                    rel = f"datasets/{name}/fineweb_{split}_{i:06d}.bin"
                    write_shard(str(base / rel), [BOS_ID] + [i + 2] * (10 + i))
                    files.append({"path": rel, "size": (base / rel).stat().st_size})
            entry = {"name": name, "tokenizer_name": tok, "stats": {"files_val": 1, "files_train": train_shards}}
            if sizes:
                entry["files"] = files
            manifest["datasets"].append(entry)
            stem = "fineweb_pure_byte_260" if variant == "byte260" else f"fineweb_{variant[2:]}_bpe"
            paths = [f"tokenizers/{stem}.json"] if variant == "byte260" else [f"tokenizers/{stem}.model",
                                                                              f"tokenizers/{stem}.vocab"]
            for p in paths:
                os.makedirs(base / "tokenizers", exist_ok=True)
                (base / p).write_text(f"{repo_id} {p}")
            keys = ["path"] if variant == "byte260" else ["model_path", "vocab_path"]
            manifest["tokenizers"].append({"name": tok, **dict(zip(keys, paths))})
        (base / "manifest.json").write_text(json.dumps(manifest))

    monkeypatch.setattr(cf, "download", fake_download)
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    monkeypatch.delenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", raising=False)
    return SimpleNamespace(root=root, calls=calls, publish=publish, data=tmp_path / "data")


def fetch(hub, variant, train_shards, **kw):
    logs = []
    paths = cf.fetch(variant, train_shards, str(hub.data), log=logs.append, **kw)
    return paths, logs


def test_fetch_then_skip_present_files(hub):
    hub.publish(REPO_A, ["sp1024", "byte260"])
    paths, logs = fetch(hub, "sp1024", 2)
    data = hub.data
    expected = [data / "datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
                data / "datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
                data / "datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
                data / "tokenizers/fineweb_1024_bpe.model", data / "tokenizers/fineweb_1024_bpe.vocab"]
    assert paths == [str(p) for p in expected] and all(p.is_file() for p in expected)
    assert hub.calls[0] == (REPO_A, "datasets/manifest.json") and len(hub.calls) == 6
    assert all(path.startswith("datasets/") for _, path in hub.calls)
    assert all("downloaded" in line for line in logs) and logs[0].startswith("[1/5]")
    assert json.loads((data / "manifest.json").read_text())["_source"] == {"repo_id": REPO_A, "remote_root": "datasets"}

    hub.calls.clear()
    _, logs = fetch(hub, "sp1024", 3)  # one more shard: only it and the manifest are fetched
    assert hub.calls == [(REPO_A, "datasets/manifest.json"),
                         (REPO_A, "datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin")]
    assert sum("present, skipped" in line for line in logs) == 5


def test_files_of_the_wrong_size_or_broken_shards_are_fetched_again(hub):
    hub.publish(REPO_A, ["sp1024"], sizes=True)
    fetch(hub, "sp1024", 1)
    shard = hub.data / "datasets/fineweb10B_sp1024/fineweb_train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])  # a size the manifest does not list
    hub.calls.clear()
    fetch(hub, "sp1024", 1)
    assert hub.calls[1:] == [(REPO_A, "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin")]

    hub.publish(REPO_A, ["sp1024"], sizes=False)  # counts only (as the challenge's manifest): check headers
    shard.write_bytes(shard.read_bytes()[:-2])
    hub.calls.clear()
    fetch(hub, "sp1024", 1)
    assert hub.calls[1:] == [(REPO_A, "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin")]
    assert len(read_shard(str(shard))) == 11


def test_manifest_from_another_repo_is_replaced(hub, monkeypatch):
    hub.publish(REPO_A, ["sp1024"])
    hub.publish(REPO_B, ["sp8192"])
    fetch(hub, "sp1024", 1)
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", REPO_B)
    paths, logs = fetch(hub, "sp8192", 1)
    assert logs[0] == (f"{hub.data / 'manifest.json'} came from {REPO_A}:datasets; "
                       f"replacing it with the manifest of {REPO_B}:datasets")
    assert json.loads((hub.data / "manifest.json").read_text())["_source"]["repo_id"] == REPO_B
    assert (hub.data / "tokenizers/fineweb_8192_bpe.model").read_text().startswith(REPO_B)
    # a manifest without a source tag (e.g. left by another downloader) is replaced too
    (hub.data / "manifest.json").write_text(json.dumps({"datasets": []}))
    _, logs = fetch(hub, "sp8192", 1)
    assert "came from an unknown source; replacing it" in logs[0]


def test_unknown_variant_is_explained(hub, monkeypatch, capsys):
    hub.publish(REPO_A, ["sp1024", "byte260"])
    with pytest.raises(cf.FetchError) as e:
        fetch(hub, "sp8192", 1)
    message = str(e.value)
    assert message.startswith(f"--variant sp8192 is not in {REPO_A}:datasets/manifest.json (it has: byte260, sp1024)")
    assert "MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf" in message and "\n" not in message
    monkeypatch.setattr(cf, "DATA_DIR", str(hub.data))
    assert cf.main(["--variant", "sp4096"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("cached_challenge_fineweb: error: --variant sp4096 is not in") and "\n" not in err
    with pytest.raises(SystemExit) as exit_:
        cf.main(["--variant", "sp9999"])
    assert exit_.value.code == 2


def test_remote_root_override_byte260_and_shard_count(hub, monkeypatch):
    hub.publish(REPO_A, ["byte260"], remote_root="exports/v2", train_shards=2)
    monkeypatch.setenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "exports/v2")
    paths, logs = fetch(hub, "byte260", 80)
    assert logs[0] == f"byte260 has 2 train shards on {REPO_A}; fetching all 2"
    assert hub.calls[0] == (REPO_A, "exports/v2/manifest.json")
    assert all(path.startswith("exports/v2/") for _, path in hub.calls)
    assert [os.path.basename(p) for p in paths] == ["fineweb_val_000000.bin", "fineweb_train_000000.bin",
                                                    "fineweb_train_000001.bin", "fineweb_pure_byte_260.json"]


def test_download_failures_are_one_line(hub):
    with pytest.raises(cf.FetchError, match="cannot download datasets/manifest.json from the dataset repo") as e:
        fetch(hub, "sp1024", 1)
    assert "\n" not in str(e.value)
    hub.publish(REPO_A, ["sp1024"])
    os.remove(hub.root / REPO_A / "datasets/tokenizers/fineweb_1024_bpe.vocab")
    with pytest.raises(cf.FetchError, match="cannot download datasets/tokenizers/fineweb_1024_bpe.vocab"):
        fetch(hub, "sp1024", 0)


def test_manifest_reader_is_tolerant():
    manifest = {
        "datasets": {"fineweb10B_sp4096": {  # a dict keyed by name, bare shard names, inline tokenizer
            "path": "data/sp4096", "val_files": ["fineweb_val_000000.bin"],
            "train_files": [{"name": "fineweb_train_000001.bin", "bytes": 7}, "fineweb_train_000000.bin"],
            "tokenizer": {"files": ["tok/fineweb_4096_bpe.model"]}}},
    }
    files, available = cf.variant_files(manifest, "sp4096", 5, "m")
    assert available == 2 and files == [
        ("data/sp4096/fineweb_val_000000.bin", "datasets/fineweb10B_sp4096/fineweb_val_000000.bin", None),
        ("data/sp4096/fineweb_train_000000.bin", "datasets/fineweb10B_sp4096/fineweb_train_000000.bin", None),
        ("data/sp4096/fineweb_train_000001.bin", "datasets/fineweb10B_sp4096/fineweb_train_000001.bin", 7),
        ("tok/fineweb_4096_bpe.model", "tokenizers/fineweb_4096_bpe.model", None)]
    for broken, message in (({"datasets": [{"name": "fineweb10B_sp4096"}]}, "lists neither its shard files"),
                            ({"datasets": [{"name": "sp4096", "stats": {"files_val": 1, "files_train": 1},
                                            "tokenizer_name": "x"}]}, "names tokenizer 'x'"),
                            ({}, r"is not in m \(it has: none\)")):
        with pytest.raises(cf.FetchError, match=message):
            cf.variant_files(broken, "sp4096", 1, "m")


def test_real_download_places_the_cached_file(tmp_path, monkeypatch):
    """cf.download itself, with huggingface_hub.hf_hub_download replaced by a fake cache."""
    import huggingface_hub
    blob = tmp_path / "cache" / "blobs" / "abc"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"shard bytes")
    snapshot = tmp_path / "cache" / "snapshot.bin"
    snapshot.symlink_to(blob)
    seen = {}

    def fake_hf_hub_download(**kwargs):
        seen.update(kwargs)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    dest = tmp_path / "data" / "datasets" / "x" / "fineweb_val_000000.bin"
    cf.download(REPO_A, "datasets/datasets/x/fineweb_val_000000.bin", str(dest))
    assert seen == {"repo_id": REPO_A, "filename": "fineweb_val_000000.bin", "subfolder": "datasets/datasets/x",
                    "repo_type": "dataset"}
    assert dest.read_bytes() == b"shard bytes" and not dest.is_symlink()
    assert not os.path.exists(str(dest) + ".partial")

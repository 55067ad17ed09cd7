"""Turn your own documents into a dataset that train_gpt.py reads unchanged.

The challenge ships FineWeb already tokenized; this builds the same layout from any `.jsonl` or
`.jsonl.xz` file of {"text": ...} objects, so that other corpora (or a re-tokenized FineWeb) can be
trained and scored with the same script:

    <out>/datasets/fineweb10B_sp<V>/fineweb_val_000000.bin, ..., fineweb_train_000000.bin, ...
    <out>/tokenizers/fineweb_<V>_bpe.model (and .vocab)

Each document is stored as BOS (id 1) followed by its token ids, with no EOS; the first --val-docs
documents form the validation split and the rest the training split, in file order. Shards are
filled to exactly --shard-tokens tokens (the last one of each split holds the rest), so a document
may continue in the next shard, as in the challenge's export. Shards are written by train_gpt.py's
own `write_shard`, so the format has a single writer; it is imported only when the first shard is
written, because it pulls in torch (seconds) and bad input should fail at once.

Nothing is destroyed before the whole input has been read: shards are written into a temporary folder
beside the dataset (<out>/datasets/.fineweb10B_sp<V>.tmp-<pid>-*, the same filesystem) and the
tokenizer into temporary names in <out>/tokenizers; only when every document has been tokenized are
they renamed into place (the old dataset folder is renamed aside, the new one in, then the old one
deleted; files in it other than shards are carried over). Any failure, bad input, a full disk or
Ctrl-C, removes the temporary files and leaves an existing dataset and tokenizer byte-identical.
Bad input or options print one line on stderr and exit with status 2 (as argparse's usage errors do).

    python3 data/tokenize_docs.py --docs docs.jsonl.xz --tokenizer fineweb_8192_bpe.model --val-docs 2000
    python3 data/tokenize_docs.py --docs docs.jsonl --train-tokenizer --vocab-size 4096
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import lzma
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_VOCAB = 2**16  # token ids are stored as uint16
CHUNK_BYTES = 1 << 20  # raw JSON text per worker task: large enough to batch, small enough to stream
CHUNK_DOCS = 2048
PROGRESS_SECONDS = 5.0
# The challenge's SentencePiece exporter settings (see README): these make the byte counting of
# train_gpt.py exact (byte fallback, "▁" as its own piece) and give BOS id 1, train_gpt.BOS_ID.
SP_TRAINER_SETTINGS = dict(model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
                           add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=0.999)


class DocsError(Exception):
    """Bad input or options: main() prints the message as one line and exits with status 2."""


def shard_writer():
    """train_gpt.write_shard, the project's one shard writer (imported on first use)."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    import train_gpt
    if train_gpt.BOS_ID != SP_TRAINER_SETTINGS["bos_id"]:
        raise DocsError(f"train_gpt.BOS_ID={train_gpt.BOS_ID} but tokenize_docs.py writes BOS id "
                        f"{SP_TRAINER_SETTINGS['bos_id']}; make SP_TRAINER_SETTINGS agree")
    return train_gpt.write_shard


# ---------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------


def open_docs(path: str):
    """A text stream over the documents file (.jsonl, or .jsonl.xz decompressed on the fly)."""
    if not os.path.isfile(path):
        raise DocsError(f"--docs {path}: no such file")
    if not path.endswith((".jsonl.xz", ".jsonl")):
        raise DocsError(f"--docs {path}: expected a .jsonl or .jsonl.xz file of {{\"text\": ...}} objects")
    try:
        if path.endswith(".jsonl.xz"):
            return lzma.open(path, "rt", encoding="utf-8")
        return open(path, encoding="utf-8")
    except OSError as e:
        raise DocsError(f"--docs {path}: cannot read it ({e.strerror or e})") from None


def iter_chunks(path: str):
    """Yield (path, [(line number, raw line), ...]) chunks in file order; blank lines are skipped."""
    number = 0

    def where():
        return f", after line {number}" if number else ""

    try:
        with open_docs(path) as f:
            lines, size = [], 0
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                lines.append((number, line))
                size += len(line)
                if size >= CHUNK_BYTES or len(lines) >= CHUNK_DOCS:
                    yield path, lines
                    lines, size = [], 0
            if lines:
                yield path, lines
    except (lzma.LZMAError, EOFError) as e:  # EOFError: a truncated (or empty) .xz file
        raise DocsError(f"--docs {path}: not a valid .xz file ({e}{where()})") from None
    except UnicodeDecodeError as e:
        raise DocsError(f"--docs {path}: not UTF-8 text ({e.reason} after line {number})") from None
    except OSError as e:
        raise DocsError(f"--docs {path}: cannot read it ({e.strerror or e}{where()})") from None


def check_docs(path: str) -> None:
    """Fail at once, before anything is written, on a missing, misnamed, unreadable or empty file
    (reads only the first chunk)."""
    chunks = iter_chunks(path)
    try:
        if next(chunks, None) is None:
            raise DocsError(f"--docs {path}: no documents (the file is empty or has only blank lines)")
    finally:
        chunks.close()


def parse_texts(path: str, lines) -> list[str]:
    """The `text` field of each numbered raw JSON line; errors name the file and line."""
    texts = []
    for number, line in lines:
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise DocsError(f"{path}:{number}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from None
        if not isinstance(doc, dict) or "text" not in doc:
            raise DocsError(f"{path}:{number}: the object has no \"text\" field")
        if not isinstance(doc["text"], str):
            raise DocsError(f"{path}:{number}: \"text\" is a {type(doc['text']).__name__}, not a string")
        texts.append(doc["text"])
    return texts


def iter_texts(path: str):
    """Every document's text, in file order (read in this process)."""
    for path_, lines in iter_chunks(path):
        yield from parse_texts(path_, lines)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def load_tokenizer(path: str):
    """Load a SentencePiece model and check that train_gpt.py can use it."""
    import sentencepiece as spm
    if not os.path.isfile(path):
        raise DocsError(f"--tokenizer {path}: no such file")
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise DocsError(f"--tokenizer {path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
    if sp.vocab_size() > MAX_VOCAB:
        raise DocsError(f"--tokenizer {path}: {sp.vocab_size()} pieces do not fit uint16 shards "
                        f"(at most {MAX_VOCAB}); use a smaller vocabulary")
    bos = SP_TRAINER_SETTINGS["bos_id"]
    if sp.bos_id() != bos:
        raise DocsError(f"--tokenizer {path}: BOS id is {sp.bos_id()} but train_gpt.py expects {bos}; "
                        f"retrain it with bos_id={bos}")
    return sp


def train_tokenizer(docs: str, prefix: str, vocab_size: int, val_docs: int, sample_mb: float, log=None) -> str:
    """Train a BPE model with the challenge's settings on the first `sample_mb` MB of training
    documents (never on the validation split); returns the .model path."""
    import sentencepiece as spm
    if not 0 < vocab_size <= MAX_VOCAB:
        raise DocsError(f"--vocab-size {vocab_size}: must be between 1 and {MAX_VOCAB} (ids are stored as uint16)")
    budget = int(sample_mb * 1e6)

    def sample():
        used = 0
        for text in itertools.islice(iter_texts(docs), val_docs, None):
            if used >= budget:
                return
            used += len(text.encode("utf-8"))
            yield text

    texts = list(sample())  # read first, so that input errors surface as DocsError, not inside the trainer
    if not texts:
        raise DocsError(f"--docs {docs}: no training documents after the first {val_docs} (--val-docs) "
                        f"to train a tokenizer on")
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    sizes = [len(t.encode("utf-8")) for t in texts]
    if log:
        log(f"training a {vocab_size}-piece BPE tokenizer on {len(texts):,} documents ({sum(sizes) / 1e6:,.1f} MB)")
    longest = max(sizes)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size,
                                       max_sentence_length=max(longest + 1, 4192), num_threads=os.cpu_count() or 1,
                                       minloglevel=1, **SP_TRAINER_SETTINGS)
    except RuntimeError as e:
        message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DocsError(f"--vocab-size {vocab_size}: SentencePiece could not train on {len(texts)} documents "
                        f"({message}); lower --vocab-size or raise --sample-mb") from None
    return prefix + ".model"


def tokenizer_files(source: str) -> list[str]:
    """The .model and, if present, the .vocab beside it."""
    vocab = os.path.splitext(source)[0] + ".vocab"
    return [source] + ([vocab] if os.path.isfile(vocab) else [])


# ---------------------------------------------------------------------------------------------
# Tokenizing in worker processes, in order
# ---------------------------------------------------------------------------------------------

_worker_sp = None


def _init_worker(model_path: str) -> None:
    global _worker_sp
    import sentencepiece as spm
    _worker_sp = spm.SentencePieceProcessor(model_file=model_path)


def encode_chunk(task) -> tuple[np.ndarray, np.ndarray]:
    """(tokens: each document as BOS + ids, uint16; per-document token counts including the BOS)."""
    path, lines = task
    texts = parse_texts(path, lines)
    ids = _worker_sp.encode(texts, num_threads=1)
    counts = np.fromiter((len(d) for d in ids), dtype=np.int64, count=len(ids))
    body = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint16, count=int(counts.sum()))
    starts = np.cumsum(counts) - counts  # where each document begins in `body`
    return np.insert(body, starts, _worker_sp.bos_id()), counts + 1


def encoded_chunks(docs: str, model_path: str, workers: int):
    """encode_chunk over the file's chunks, results in file order, with a bounded number in flight
    (so memory stays flat however large the file is). workers <= 1 runs in this process."""
    if workers <= 1:
        _init_worker(model_path)
        for task in iter_chunks(docs):
            yield encode_chunk(task)
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(model_path,)) as pool:
        pending = collections.deque()
        for task in iter_chunks(docs):
            pending.append(pool.apply_async(encode_chunk, (task,)))
            if len(pending) >= 3 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------------------------------------
# Writing shards: into a temporary folder, swapped in only when complete
# ---------------------------------------------------------------------------------------------


def is_shard(name: str) -> bool:
    return name.startswith("fineweb_") and name.endswith(".bin")


def check_out(out: str) -> None:
    """Fail at once if `out` cannot be written: its deepest existing folder must be a writable folder."""
    existing = os.path.abspath(out)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise DocsError(f"--out {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DocsError(f"--out {out}: cannot write there ({existing} is not writable)")


def make_dirs(path: str) -> list[str]:
    """os.makedirs(path, exist_ok=True); returns the folders it created, outermost first."""
    missing, path = [], os.path.abspath(path)
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for folder in reversed(missing):
        os.mkdir(folder)
    return missing[::-1]


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


class StagedOutput:
    """A dataset written beside the one it replaces (context manager).

    Shards go into `self.folder`, a temporary folder next to <out>/datasets/fineweb10B_sp<V>, and
    stage_tokenizer() copies the tokenizer to temporary names in <out>/tokenizers. commit() renames
    them into place; leaving the `with` block without commit() (any exception) deletes them, and the
    folders this run created, so an existing dataset and tokenizer stay byte-identical.
    """

    def __init__(self, out: str, vocab_size: int):
        self.out = out
        self.dataset_dir = os.path.join(out, "datasets", f"fineweb10B_sp{vocab_size}")
        self.tokenizer_path = os.path.join(out, "tokenizers", f"fineweb_{vocab_size}_bpe.model")
        self.created: list[str] = []
        self.folder = None
        self.staged: list[tuple[str, str]] = []  # (temporary file, its final path)
        self.committed = False

    def __enter__(self) -> "StagedOutput":
        try:
            for folder in (os.path.dirname(self.dataset_dir), os.path.dirname(self.tokenizer_path)):
                self.created += make_dirs(folder)
            self.folder = tempfile.mkdtemp(prefix=f".{os.path.basename(self.dataset_dir)}.tmp-{os.getpid()}-",
                                           dir=os.path.dirname(self.dataset_dir))
        except OSError as e:
            self._remove()
            raise DocsError(f"--out {self.out}: cannot write there ({e.strerror or e})") from None
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self._remove()

    def _remove(self) -> None:
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
        for tmp, _ in self.staged:
            if os.path.lexists(tmp):
                os.remove(tmp)
        for folder in reversed(self.created):
            try:
                os.rmdir(folder)  # only if still empty
            except OSError:
                pass

    def _write_error(self, e: OSError) -> DocsError:
        return DocsError(f"--out {self.out}: cannot write {e.filename or 'there'} ({e.strerror or e})")

    def stage_tokenizer(self, source: str) -> None:
        """Copy the .model (and its .vocab, if present) to temporary names beside their final paths."""
        final = self.tokenizer_path
        for src, dst in zip(tokenizer_files(source), (final, final[:-len(".model")] + ".vocab")):
            tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.tmp-{os.getpid()}")
            self.staged.append((tmp, dst))
            try:
                shutil.copyfile(src, tmp)
            except OSError as e:
                raise self._write_error(e) from None

    def carry_over(self) -> None:
        """Link (or copy) what the old dataset folder holds besides shards into the new one."""
        if not os.path.isdir(self.dataset_dir):
            return
        try:
            for name in os.listdir(self.dataset_dir):
                src, dst = os.path.join(self.dataset_dir, name), os.path.join(self.folder, name)
                if is_shard(name) or os.path.lexists(dst):
                    continue
                if os.path.isdir(src) and not os.path.islink(src):
                    shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
                else:
                    link_or_copy(src, dst)
        except OSError as e:
            raise self._write_error(e) from None

    def commit(self, log=None) -> None:
        """Swap the new dataset in: the old folder renamed aside, the new one renamed in, the
        tokenizer files os.replace()d, the old folder deleted. Each step is a rename within one
        folder; if one fails, the steps before it are undone (the old dataset is put back)."""
        self.carry_over()
        aside = self.folder + ".old"
        had_old = os.path.lexists(self.dataset_dir)
        done = []  # how to undo each rename made so far, last first
        try:
            if had_old:
                os.rename(self.dataset_dir, aside)
                done.insert(0, lambda: os.rename(aside, self.dataset_dir))
            os.rename(self.folder, self.dataset_dir)
            done.insert(0, lambda: os.rename(self.dataset_dir, self.folder))
            for tmp, dst in self.staged:
                os.replace(tmp, dst)
        except OSError as e:
            for undo in done:
                undo()
            raise self._write_error(e) from None
        self.committed = True
        if had_old:
            shutil.rmtree(aside, ignore_errors=True)
            if log:
                log(f"replaced the old dataset in {self.dataset_dir}")


class ShardWriter:
    """Fills fineweb_<split>_000000.bin, _000001.bin, ... with exactly `shard_tokens` tokens each."""

    def __init__(self, folder: str, split: str, shard_tokens: int):
        self.folder, self.split = folder, split
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.paths: list[str] = []
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == len(self.buf):
                self.close()

    def close(self) -> None:
        if self.fill:
            path = os.path.join(self.folder, f"fineweb_{self.split}_{len(self.paths):06d}.bin")
            write = shard_writer()
            try:
                write(path, self.buf[:self.fill])
            except OSError as e:
                raise DocsError(f"cannot write {path} ({e.strerror or e})") from None
            self.paths.append(path)
            self.tokens += self.fill
            self.fill = 0


def check_options(val_docs: int, shard_tokens: int, sample_mb: float | None = None) -> None:
    """The numeric options, checked before any file is read or written."""
    if val_docs < 1:
        raise DocsError(f"--val-docs {val_docs}: must be at least 1")
    if shard_tokens < 1:
        raise DocsError(f"--shard-tokens {shard_tokens}: must be at least 1")
    if sample_mb is not None and not sample_mb > 0:
        raise DocsError(f"--sample-mb {sample_mb:g}: must be more than 0")


def build_dataset(docs: str, out: str, tokenizer: str, val_docs: int = 50_000, shard_tokens: int = 100_000_000,
                  workers: int = 1, log=None) -> dict:
    """Tokenize `docs` with the SentencePiece model `tokenizer` into `out` (DATA_DIR layout).

    Returns a summary dict: dataset_dir, tokenizer_path, vocab_size, val_docs, train_docs,
    val_tokens, train_tokens, val_shards, train_shards (shard path lists), seconds.
    """
    check_options(val_docs, shard_tokens)
    check_docs(docs)  # a missing, misnamed, unreadable or empty file fails here, before anything is touched
    sp = load_tokenizer(tokenizer)
    vocab_size = sp.vocab_size()
    check_out(out)
    with StagedOutput(out, vocab_size) as stage:
        writers = {"val": ShardWriter(stage.folder, "val", shard_tokens), "train": None}
        doc_count = token_count = 0
        t0 = last = time.time()
        with contextlib.closing(encoded_chunks(docs, tokenizer, workers)) as chunks:
            for tokens, lengths in chunks:
                split_at = min(max(val_docs - doc_count, 0), len(lengths))  # documents of this chunk that are val
                cut = int(lengths[:split_at].sum())
                if split_at:
                    writers["val"].add(tokens[:cut])
                if split_at < len(lengths):
                    if writers["train"] is None:
                        writers["val"].close()
                        writers["train"] = ShardWriter(stage.folder, "train", shard_tokens)
                    writers["train"].add(tokens[cut:])
                doc_count += len(lengths)
                token_count += len(tokens)
                now = time.time()
                if log and now - last >= PROGRESS_SECONDS:
                    last = now
                    log(f"{doc_count:,} docs ({doc_count / (now - t0):,.0f} docs/s), {token_count:,} tokens")
        writers["val"].close()
        if writers["train"] is None:
            raise DocsError(f"--docs {docs}: has only {doc_count} documents, none left for training after "
                            f"--val-docs {val_docs}; lower --val-docs")
        writers["train"].close()
        stage.stage_tokenizer(tokenizer)
        stage.commit(log)

    def final(paths):
        return [os.path.join(stage.dataset_dir, os.path.basename(p)) for p in paths]

    return dict(dataset_dir=stage.dataset_dir, tokenizer_path=stage.tokenizer_path, vocab_size=vocab_size,
                val_docs=val_docs, train_docs=doc_count - val_docs,
                val_tokens=writers["val"].tokens, train_tokens=writers["train"].tokens,
                val_shards=final(writers["val"].paths), train_shards=final(writers["train"].paths),
                seconds=time.time() - t0)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", required=True, metavar="PATH",
                   help="documents: .jsonl or .jsonl.xz, one {\"text\": ...} per line")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "data"), metavar="DIR",
                   help="DATA_DIR to write (default: the repo's data/)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="PATH", help="an existing SentencePiece .model to tokenize with")
    tok.add_argument("--train-tokenizer", action="store_true",
                     help="train a BPE model with the challenge's settings (needs --vocab-size)")
    p.add_argument("--vocab-size", type=int, metavar="N", help="vocabulary size for --train-tokenizer")
    p.add_argument("--sample-mb", type=float, default=200.0, metavar="MB",
                   help="MB of training documents (in file order) that --train-tokenizer learns from (default 200)")
    p.add_argument("--val-docs", type=int, default=50_000, metavar="N",
                   help="the first N documents are validation (default 50000)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                   help="tokens per shard (default 100000000)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="tokenizer processes (default: all cores)")
    args = p.parse_args(argv)
    if args.train_tokenizer and args.vocab_size is None:
        p.error("--train-tokenizer needs --vocab-size N")
    if args.tokenizer and args.vocab_size is not None:
        p.error("--vocab-size only applies to --train-tokenizer; a given --tokenizer brings its own")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def log(msg):
        print(f"tokenize_docs: {msg}", file=sys.stderr, flush=True)

    try:
        tokenizer = args.tokenizer
        # A trained tokenizer is written to a scratch folder; build_dataset installs it only with the
        # finished dataset, so a failure cannot leave a new tokenizer beside the old shards.
        with tempfile.TemporaryDirectory(prefix="tokenize_docs-") as scratch:
            if args.train_tokenizer:
                check_options(args.val_docs, args.shard_tokens, args.sample_mb)
                check_docs(args.docs)
                check_out(args.out)  # before minutes of training
                prefix = os.path.join(scratch, f"fineweb_{args.vocab_size}_bpe")
                tokenizer = train_tokenizer(args.docs, prefix, args.vocab_size, args.val_docs, args.sample_mb, log)
            s = build_dataset(args.docs, args.out, tokenizer, args.val_docs, args.shard_tokens, args.workers, log)
    except DocsError as e:
        print(f"tokenize_docs: error: {e}", file=sys.stderr)
        return 2
    log(f"done in {s['seconds']:.1f}s: val {s['val_docs']:,} docs / {s['val_tokens']:,} tokens in "
        f"{len(s['val_shards'])} shard(s), train {s['train_docs']:,} docs / {s['train_tokens']:,} tokens in "
        f"{len(s['train_shards'])} shard(s)")
    log(f"dataset {s['dataset_dir']}, tokenizer {s['tokenizer_path']}; train with "
        f"DATA_DIR={args.out} VOCAB_SIZE={s['vocab_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

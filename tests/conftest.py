"""Shared fixtures for the whole test suite: a tiny tokenizer and dataset built in seconds on CPU.

Tests never touch /work/shared/data or the network: they generate their own text, train a small
SentencePiece model with the challenge's settings, and tokenize it into the DATA_DIR layout with
data/tokenize_docs.py, so every test file can run train_gpt.py's code on real shards.

Session fixtures (built once, read-only: copy before modifying):
    tiny_tokenizer  path to a 512-piece SentencePiece BPE .model
    tiny_dataset    TinyDataset: a DATA_DIR folder with val and train shards of ~200 documents
    make_hparams    make_hparams(**env) -> train_gpt.Hyperparameters for tiny_dataset and a tiny model
Helpers: generate_text(rng, n_words), generate_docs(n, seed).

The repo root and data/ are put on sys.path, so tests can `import train_gpt`, `import tokenize_docs`
and `import cached_challenge_fineweb`.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import shutil
import sys

import pytest

# One intra-op thread: with two or more threads on a 2-core machine that is also running loader
# threads or a second test process, OpenMP's spinning makes small matmuls hundreds of times slower.
# Subprocesses (torchrun, gloo ranks, scripts) inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO_ROOT, os.path.join(REPO_ROOT, "data")):
    if _path not in sys.path:
        sys.path.insert(0, _path)



# Module fixtures that take seconds to build (a training run, a checkpoint, two gloo ranks). xdist
# would build one in every worker that draws one of its tests; pytest.ini's --dist loadgroup sends
# all the tests that use one such fixture to the same worker, so it is built once.
SHARED_FIXTURES = ("trained_run", "checkpoint", "artifact", "two_ranks", "ttt_ranks", "results")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        used = [name for name in SHARED_FIXTURES if name in getattr(item, "fixturenames", ())]
        if used:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}.{used[0]}"))


@pytest.fixture(autouse=True)
def _seeded_random():
    """Every test starts from the same random state, whichever tests ran before it in its worker:
    a test that draws unseeded numbers gets the same ones in any order (one did not, and a CI
    order made its margin vanish)."""
    torch.manual_seed(0)
    random.seed(0)


TINY_VOCAB = 512
TINY_DOCS = 200
TINY_VAL_DOCS = 40
TINY_SHARD_TOKENS = 8192  # small, so the training split spans several shards

_WORDS = ("the of and to in is that it for was on are as with his they at be this from have or by one had "
          "not but what all were when we there can an your which their said if do will each about how up out "
          "them then she many some so these would other into has more her two like him see time could no make "
          "than first been its who now people my made over did down only way find use may water long little "
          "very after words called just where most know model token byte shard train loss value").split()
_UNICODE = ("café naïve résumé Straße façade smörgåsbord Ελληνικά русский язык 日本語 中文 한국어 عربى עברית "
            "ﬁnance ① ½ ™ № µ Å ℃ 𝔘𝔫𝔦 👍 🙂 🚀 ∑ ∞ → ≤ ≠ — – … “quoted” ‘single’ «guillemets» ¿qué? ¡sí!").split()
_PUNCT = [".", ",", ";", ":", "!", "?", " -", " (", ")", "\"", "'", "/", "%", "&", "#", "@", "*", "[", "]", "{}"]
_SPACES = [" ", " ", " ", " ", " ", " ", "  ", "\n", "\n\n", "\t", " \n  ", "   "]


def generate_text(rng: random.Random, n_words: int) -> str:
    """English-like text with unicode, digits, punctuation, code and irregular whitespace (runs of
    spaces, tabs, blank lines), so tokenizers meet byte fallback, NFKC folding and split digits."""
    out = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.70:
            word = rng.choice(_WORDS)
            word = word.capitalize() if rng.random() < 0.1 else word
        elif r < 0.80:
            word = rng.choice(_UNICODE)
        elif r < 0.88:
            word = rng.choice([str(rng.randrange(10 ** rng.randrange(1, 7))), f"{rng.uniform(0, 100):.2f}",
                               f"{rng.randrange(1900, 2030)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"])
        elif r < 0.93:
            word = rng.choice(["def f(x):", "return x**2", "x[i] += 1", "if (a && b) {", "}", "<div>", "</div>",
                               "SELECT * FROM t;", "print('hi')", "0xFF", "a_b_c", "--flag=1"])
        else:
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzäöüéñ") for _ in range(rng.randrange(2, 12)))
        out.append(word)
        if rng.random() < 0.12:
            out.append(rng.choice(_PUNCT))
        out.append(rng.choice(_SPACES))
    return "".join(out)


def generate_docs(n: int, seed: int = 0) -> list[str]:
    """n documents of very different lengths (a few words to a few thousand), some empty-ish."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        length = rng.choice([0, 1, 3, 10, 30, 60, 120, 250, 600]) if i % 17 else 800
        docs.append(generate_text(rng, length))
    return docs


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> str:
    """Path to a SentencePiece BPE .model (vocab TINY_VOCAB=512) trained on ~60 KB of generated text
    with the challenge's exporter settings: byte_fallback, split_digits, nmt_nfkc, no dummy prefix,
    pad/bos/eos/unk = 0/1/2/3. Its .vocab lies next to it."""
    import sentencepiece as spm
    from tokenize_docs import SP_TRAINER_SETTINGS
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    rng = random.Random(1234)
    texts = [generate_text(rng, rng.randrange(20, 300)) for _ in range(120)]
    prefix = str(folder / "tiny_bpe")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=TINY_VOCAB,
                                   max_sentence_length=1 << 16, num_threads=1, minloglevel=2, **SP_TRAINER_SETTINGS)
    return prefix + ".model"


@dataclasses.dataclass(frozen=True)
class TinyDataset:
    """A DATA_DIR-layout folder: datasets/fineweb10B_sp<V>/fineweb_{val,train}_*.bin + tokenizers/."""
    data_dir: str  # DATA_DIR
    dataset_dir: str  # data_dir/datasets/fineweb10B_sp<vocab_size>
    tokenizer_path: str  # data_dir/tokenizers/fineweb_<vocab_size>_bpe.model
    vocab_size: int  # VOCAB_SIZE
    docs_path: str  # the .jsonl it was built from
    texts: tuple  # every document's text, in file order
    val_docs: int  # the first val_docs texts are the validation split, the rest train
    val_files: tuple  # shard paths, sorted
    train_files: tuple
    val_tokens: int  # tokens in the validation / training shards (BOS included)
    train_tokens: int

    @property
    def env(self) -> dict:
        return {"DATA_DIR": self.data_dir, "VOCAB_SIZE": str(self.vocab_size)}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_tokenizer) -> TinyDataset:
    """TINY_DOCS=200 generated documents tokenized by data/tokenize_docs.py with tiny_tokenizer:
    the first TINY_VAL_DOCS=40 are validation, the rest train, in shards of TINY_SHARD_TOKENS=8192
    tokens (several train and val shards). Treat it as read-only."""
    import tokenize_docs
    folder = tmp_path_factory.mktemp("tiny_dataset")
    texts = generate_docs(TINY_DOCS, seed=7)
    docs_path = folder / "docs.jsonl"
    with open(docs_path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "source": f"generated/{i}"}, ensure_ascii=i % 2 == 0) + "\n")
    data_dir = str(folder / "data")
    s = tokenize_docs.build_dataset(str(docs_path), data_dir, tiny_tokenizer, val_docs=TINY_VAL_DOCS,
                                    shard_tokens=TINY_SHARD_TOKENS, workers=1)
    return TinyDataset(data_dir=data_dir, dataset_dir=s["dataset_dir"], tokenizer_path=s["tokenizer_path"],
                       vocab_size=s["vocab_size"], docs_path=str(docs_path), texts=tuple(texts),
                       val_docs=TINY_VAL_DOCS,
                       val_files=tuple(sorted(glob.glob(os.path.join(s["dataset_dir"], "fineweb_val_*.bin")))),
                       train_files=tuple(sorted(glob.glob(os.path.join(s["dataset_dir"], "fineweb_train_*.bin")))),
                       val_tokens=s["val_tokens"], train_tokens=s["train_tokens"])


def with_one_val_shard(tiny_dataset: TinyDataset, folder) -> TinyDataset:
    """A copy of tiny_dataset in folder/data with its first validation shard only, for end-to-end runs
    that evaluate many times: each evaluation then takes a third of the time."""
    import train_gpt
    root = folder / "data"
    shutil.copytree(tiny_dataset.data_dir, root)
    moved = lambda path: str(root / os.path.relpath(path, tiny_dataset.data_dir))  # noqa: E731
    for path in tiny_dataset.val_files[1:]:
        os.remove(moved(path))
    val_tokens = (os.path.getsize(tiny_dataset.val_files[0]) - train_gpt.SHARD_HEADER_BYTES) // 2
    return dataclasses.replace(tiny_dataset, data_dir=str(root), dataset_dir=moved(tiny_dataset.dataset_dir),
                               tokenizer_path=moved(tiny_dataset.tokenizer_path),
                               val_files=(moved(tiny_dataset.val_files[0]),),
                               train_files=tuple(moved(p) for p in tiny_dataset.train_files), val_tokens=val_tokens)


# A small model and short sequences that pass Hyperparameters.check() with WORLD_SIZE 1 (8 grad-accum
# micro-steps): 8 x 2 rows x 64 tokens per step, head dim 16, 4 layers with a loop over 1..2.
TINY_ENV = {
    "RUN_ID": "test", "SEED": "0",
    "TRAIN_SEQ_LEN": "64", "EVAL_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "1024", "VAL_BATCH_TOKENS": "512",
    "ITERATIONS": "4", "WARMUP_STEPS": "0", "MAX_WALLCLOCK_SECONDS": "0", "VAL_LOSS_EVERY": "0",
    "TRAIN_LOG_EVERY": "1", "NUM_LAYERS": "4", "XSA_LAST_N": "4", "MODEL_DIM": "64", "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2", "MLP_MULT": "2", "ROPE_DIMS": "8", "LOOP_START": "1", "LOOP_END": "2",
    "PARALLEL_START_LAYER": "3", "EVAL_STRIDE": "32", "TTT_EVAL_SEQ_LEN": "64", "TTT_CHUNK_SIZE": "16",
    "TTT_BATCH_SIZE": "4", "TTT_LORA_RANK": "4", "GPTQ_CALIBRATION_BATCHES": "2",
}


@pytest.fixture(scope="session")
def make_hparams(tiny_dataset, tmp_path_factory):
    """make_hparams(**env) -> Hyperparameters(env=...) for tiny_dataset: TINY_ENV, DATA_DIR, VOCAB_SIZE
    and a fresh ARTIFACT_DIR, updated by the keyword arguments (env names; values are str()-ed;
    None removes a variable so its default applies). Raises ConfigError like the script does."""
    from train_gpt import Hyperparameters

    def make(**overrides) -> Hyperparameters:
        env = dict(TINY_ENV, **tiny_dataset.env, ARTIFACT_DIR=str(tmp_path_factory.mktemp("run")))
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return Hyperparameters(env=env)

    return make


def one_line(e) -> str:
    """The message of a pytest.raises ExceptionInfo, checked to be a single line."""
    message = str(e.value)
    assert "\n" not in message
    return message

"""Run a tiny 2-process CPU (gloo) torchrun of train_gpt.py several times and print the exit codes.

A finished run must exit 0 on every try: an abort at interpreter exit ("terminate called without
an active exception", SIGABRT) makes torchrun report a completed run as FAILED. This builds its own
tiny tokenizer and dataset in a temporary folder (nothing under the repo is written), so it works
from the repo root of any checkout:

    python3 tools/gloo_shutdown_check.py                      # ./train_gpt.py, 10 runs
    python3 tools/gloo_shutdown_check.py /tmp/gloo/train_gpt.py --runs 5 --keep

--stress leaves one collective running when the script calls destroy_process_group() (a wrapper
starts an async all_reduce first). That is harmless when destroy_process_group() really frees the
process group; when something still holds it, gloo's threads finish that work during interpreter
shutdown and abort it, so --stress shows the fault in most runs instead of in a few.

Exit status: 0 when every run exited 0, 1 otherwise. With --keep, the temporary folder (data and
each run's log, runs/<i>.log) is left for inspection and its path printed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO_ROOT, os.path.join(REPO_ROOT, "data")]
from tests.conftest import TINY_ENV as TEST_ENV  # noqa: E402  (the test suite's tiny model)

# The test suite's tiny model and short sequences, with compile warmup steps and TTT on a quarter of
# the validation documents so the WorkQueue's store is used too; one run takes ~10-20 s on 2 cores.
TINY_ENV = dict(TEST_ENV, RUN_ID="gloo_check", WARMUP_STEPS="2", TTT_ENABLED="1", VAL_DOC_FRACTION="0.25",
                COMPRESSOR="lzma")
STRESS_WRAPPER = """\
import runpy, sys, torch, torch.distributed as dist
_destroy = dist.destroy_process_group
def destroy_process_group(*args, **kwargs):
    dist.all_reduce(torch.ones(1 << 16), async_op=True)  # still running while the group is destroyed
    return _destroy(*args, **kwargs)
dist.destroy_process_group = destroy_process_group
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
WORDS = ("the of and to in is that it for was on are as with his they at be this from have or by one had not "
         "but what all were when we there can an your which their said if do will each about how up out them "
         "café naïve Straße 日本語 👍 0xFF 2024 def f(x): return x**2 { } < > ; , . ! ?").split()


def text(rng: random.Random, n_words: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice("  \n") for _ in range(n_words))


def build_data(folder: str) -> dict:
    """A 512-piece tokenizer and ~200 documents tokenized by data/tokenize_docs.py into folder/data."""
    import sentencepiece as spm
    import tokenize_docs
    rng = random.Random(1234)
    prefix = os.path.join(folder, "tiny_bpe")
    spm.SentencePieceTrainer.train(sentence_iterator=iter([text(rng, rng.randrange(20, 300)) for _ in range(120)]),
                                   model_prefix=prefix, vocab_size=512, max_sentence_length=1 << 16, num_threads=1,
                                   minloglevel=2, **tokenize_docs.SP_TRAINER_SETTINGS)
    docs = os.path.join(folder, "docs.jsonl")
    with open(docs, "w", encoding="utf-8") as f:
        for i in range(200):
            f.write(json.dumps({"text": text(rng, rng.choice([3, 10, 30, 60, 120, 250, 600]))}) + "\n")
    s = tokenize_docs.build_dataset(docs, os.path.join(folder, "data"), prefix + ".model", val_docs=40,
                                    shard_tokens=8192, workers=1)
    return {"DATA_DIR": os.path.join(folder, "data"), "VOCAB_SIZE": str(s["vocab_size"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("script", nargs="?", default="train_gpt.py", help="the training script (default: train_gpt.py)")
    p.add_argument("--runs", type=int, default=10, help="how many runs (default 10)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (data and logs)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override one of the tiny configuration's variables (repeatable)")
    p.add_argument("--stress", action="store_true",
                   help="leave a collective running at destroy_process_group() (see above)")
    args = p.parse_args(argv)
    script = os.path.abspath(args.script)
    overrides = dict(item.split("=", 1) for item in args.set)
    if not os.path.isfile(script):
        print(f"gloo_shutdown_check: error: {args.script}: no such file", file=sys.stderr)
        return 2
    folder = tempfile.mkdtemp(prefix="gloo_shutdown_check-")
    try:
        data_env = build_data(folder)
        os.makedirs(os.path.join(folder, "runs"))
        command = [script]
        if args.stress:
            command = [os.path.join(folder, "stress_wrapper.py"), script]
            with open(command[0], "w") as f:
                f.write(STRESS_WRAPPER)
        codes = []
        for i in range(args.runs):
            env = {**os.environ, **TINY_ENV, **data_env, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
                   "ARTIFACT_DIR": os.path.join(folder, "runs", str(i)), **overrides}
            log = os.path.join(folder, "runs", f"{i}.log")
            t0 = time.time()
            with open(log, "w") as f:
                code = subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node=2", *command], env=env, stdout=f, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
            with open(log, errors="replace") as f:
                out = f.read()
            finished = "final val_loss:" in out
            aborted = "terminate called" in out or "Signal 6" in out or "SIGABRT" in out
            codes.append(code)
            print(f"run {i + 1}/{args.runs}: exit {code} in {time.time() - t0:.0f}s"
                  f"{'' if finished else ', did NOT finish'}{', SIGABRT at exit' if aborted else ''}", flush=True)
        failed = sum(c != 0 for c in codes)
        print(f"exit codes: {' '.join(map(str, codes))} ({failed} of {len(codes)} failed)")
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

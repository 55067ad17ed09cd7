"""GPU check of TTT's CUDA graphs (run through the device tool; skipped without CUDA).

    python3 -m pytest -q tests/gpu/test_ttt_gpu.py

The default model with random weights (O and MLP-down filled, so no matmul runs on zeros):
warm_up_ttt's own graph-vs-eager check, then one synthetic batch of eight documents eagerly and
through TTTRunner's graphs, which must score the same (to the rounding that ~100 adapter steps
amplify) and count the same bytes and tokens; the replay must be faster than the eager run.
"""
import os
import sys
import time

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
import bench_ttt  # noqa: E402  (its synthetic tokens and byte tables)
import train_gpt as tg  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_graphed_ttt_scores_like_the_eager_step_and_is_faster():
    # the benchmark's model: defaults, random weights, no matmul on zeros, eval mode, looping on
    _, h, device, _, model, luts = bench_ttt.build(bench_ttt.parse_args(["--set", "ATTN_BACKEND=varlen"]))
    tg.warm_up_ttt(model, model, h, luts, device)  # raises if its graphed pass scores differently
    tokens, docs = bench_ttt.synthetic_stream([3001, 2601, 2101, 1501, 901, 401, 201, 61], h.vocab_size, tg.BOS_ID, 0)
    tokens = tokens.to(device)
    results, seconds = {}, {}
    with tg.frozen(model):
        for graphs in (False, True):
            runner = tg.TTTRunner(model, h, device, graphs)
            for _ in range(2 if graphs else 1):  # graphed: the second call replays only
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                results[graphs] = tg.ttt_batch(model, model, tokens, docs, h, luts, runner=runner)
                torch.cuda.synchronize()
                seconds[graphs] = time.perf_counter() - t0
    eager, graphed = results[False], results[True]
    assert graphed[1:] == eager[1:]
    assert abs(graphed[0] - eager[0]) / eager[0] < 1e-4, (graphed, eager)
    assert seconds[True] < 0.7 * seconds[False], seconds  # 2.4 s vs 12.2 s on one H200

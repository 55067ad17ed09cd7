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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import train_gpt as tg  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_graphed_ttt_scores_like_the_eager_step_and_is_faster():
    h = tg.Hyperparameters(env={"RUN_ID": "ttt_gpu"})
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = tg.build_model(h, device, tg.pick_attention_backend("varlen"))
    with torch.no_grad():
        model.qo_bank[model.num_layers:].normal_(0, 0.02)
        model.mlp_down_bank.normal_(0, 0.02)
    model.eval()
    model.looping = True
    g = torch.Generator().manual_seed(0)
    V = h.vocab_size
    luts = (torch.randint(1, 9, (V,), generator=g, dtype=torch.int16).to(device),
            (torch.rand(V, generator=g) < 0.5).to(device), torch.zeros(V, dtype=torch.bool, device=device))
    tg.warm_up_ttt(model, model, h, luts, device)  # raises if its graphed pass scores differently
    lengths = [3000, 2600, 2100, 1500, 900, 400, 200, 60]
    tokens = torch.randint(2, V, (sum(lengths) + 1,), generator=g)
    docs, start = [], 0
    for n in lengths:
        tokens[start] = tg.BOS_ID
        docs.append((start, n + 1))
        start += n
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

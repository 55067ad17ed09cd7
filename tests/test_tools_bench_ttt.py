"""CPU tests of tools/bench_ttt.py's pure helpers: arguments, chunk shapes (checked against
train_gpt.ttt_chunk_inputs), the FLOP count, kernel attribution, the breakdown arithmetic and the
tables. No CUDA; the benchmark itself runs on the GPU box.

Run: python3 -m pytest -q tests/test_tools_bench_ttt.py
"""
import importlib.util
import os

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench_ttt", os.path.join(REPO_ROOT, "tools", "bench_ttt.py"))
bt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bt)


def test_import_is_light():
    names = vars(bt)
    assert "torch" not in names and "train_gpt" not in names  # both imported only when a benchmark runs
    assert bt.REPO_ROOT == REPO_ROOT


def test_parse_args_defaults_and_values():
    a = bt.parse_args([])
    assert (a.batches, a.contexts, a.steps, a.warmup, a.profile_steps) == ((64, 32, 8, 1), (32, 512, 2048), 8, 2, 2)
    assert a.repo_root == REPO_ROOT and a.long_docs == (8193, 8001) and a.mixed_docs == 64 and a.out == ""
    a = bt.parse_args(["--repo-root", ".carry/snap", "--batches", "4,2", "--contexts", "64", "--steps", "3",
                       "--set", "TTT_LORA_RANK=8", "--no-e2e", "--out", "r.json"])
    assert (a.repo_root, a.batches, a.contexts, a.steps, a.no_e2e) == (".carry/snap", (4, 2), (64,), 3, True)
    assert a.overrides == [("TTT_LORA_RANK", "8")]


@pytest.mark.parametrize("argv", [["--batches", "0"], ["--batches", "a,b"], ["--contexts", ""], ["--steps", "0"],
                                  ["--set", "lower=1"], ["--mixed-range", "10"], ["--mixed-range", "9,3"],
                                  ["--long-docs", "1"]])
def test_parse_args_rejects(argv, capsys):
    with pytest.raises(SystemExit):
        bt.parse_args(argv)


def test_chunk_index_and_doc_length():
    assert [bt.chunk_index_for_context(c, 32, 2048) for c in (32, 64, 512, 2048)] == [0, 1, 15, 63]
    assert bt.chunk_index_for_context(100, 32, 100) == 3  # a window that is not a multiple of the chunk
    for bad in (0, 33, 4096):
        with pytest.raises(ValueError):
            bt.chunk_index_for_context(bad, 32, 2048)
    assert bt.training_doc_length(0, 32) == 65 and bt.training_doc_length(63, 32) == 2081


@pytest.mark.parametrize("context", [8, 16, 32])
def test_shapes_match_train_gpt_chunk_inputs(context):
    import train_gpt as tg
    chunk, window, n = 8, 32, 3
    ci = bt.chunk_index_for_context(context, chunk, window)
    length = bt.training_doc_length(ci, chunk)
    docs, total = bt.doc_layout([length] * n)
    tokens = torch.arange(total) % 50 + 2
    x, y, scored = tg.ttt_chunk_inputs(tokens, torch.tensor([s for s, _ in docs]),
                                       torch.tensor([m - 1 for _, m in docs]), ci, chunk, window)
    assert tuple(x.shape) == (n, context) and scored.sum(1).tolist() == [chunk] * n
    # the document still has a chunk after ci, so ttt_batch trains on ci
    assert -(-(length - 1) // chunk) > ci + 1
    assert bt.chunk_contexts([length] * n, chunk, window)[ci] == (n, context)


def test_doc_layout_mixed_lengths_and_chunk_contexts():
    docs, total = bt.doc_layout([10, 5, 2])
    assert docs == [(0, 10), (9, 5), (13, 2)] and total == 15  # neighbours share the boundary BOS
    with pytest.raises(ValueError):
        bt.doc_layout([1])
    lengths = bt.mixed_lengths(50, 64, 2600, seed=1)
    assert len(lengths) == 50 and lengths == sorted(lengths, reverse=True) and 64 <= min(lengths)
    assert max(lengths) <= 2600 and lengths == bt.mixed_lengths(50, 64, 2600, seed=1)
    # documents of 65 and 33 tokens, chunk 16, window 32: 4 and 2 chunks
    assert bt.chunk_contexts([65, 33], 16, 32) == [(2, 16), (2, 32), (1, 32), (1, 32)]
    assert bt.chunk_contexts([], 16, 32) == []


def test_ttt_step_flops_hand_count():
    # d 4, q 4, kv 2, hidden 8, vocab 10, 2 layers, one LoRA "q" (2 slots, 4 -> 4), rank 1
    f = bt.ttt_step_flops(n=2, context=3, d_model=4, q_dim=4, kv_dim=2, hidden=8, vocab=10, layers=2,
                          lora_dims={"q": (2, 4, 4)}, rank=1)
    per_layer = 2 * 4 * 4 + 2 * 2 * 4 + 2 * 8 * 4  # 32 + 16 + 64
    base = 2 * per_layer + 10 * 4  # 224 + 40 = 264
    lora = 2 * 1 * (4 + 4)  # 16
    attn = 2 * 4 * 3 * 2  # 48
    assert f["base_params"] == base and f["lora_params_per_doc"] == lora and f["tokens"] == 6
    assert f["forward"] == 6 * (2 * base + 2 * lora + attn)
    assert f["backward"] == 6 * (2 * base + 4 * lora + 2 * attn)
    assert f["total"] == f["forward"] + f["backward"]


def test_attribute_kernels():
    regions = [("forward", 0, 10), ("score", 10, 12), ("backward", 12, 30), ("optimizer", 30, 35),
               ("forward", 100, 110), ("score", 110, 112), ("backward", 112, 130), ("optimizer", 130, 135)]
    kernels = [(1, 3), (5, 9), (11, 11.5), (13, 20), (31, 32), (101, 104), (120, 125), (50, 52), (-5, -4)]
    att = bt.attribute_kernels(kernels, regions)
    assert att["forward"] == {"us": 2 + 4 + 3, "count": 3}
    assert att["score"] == {"us": 0.5, "count": 1}
    assert att["backward"] == {"us": 7 + 5, "count": 2}
    assert att["optimizer"] == {"us": 1, "count": 1}
    assert att["unattributed"] == {"us": 3, "count": 2}  # between steps, and before every range
    assert bt.attribute_kernels([], [("forward", 0, 1)]) == {"forward": {"us": 0.0, "count": 0}}


def test_region_spans_and_step_breakdown():
    marks = [[0, 4, 5, 9, 10], [10, 15, 16, 21, 22], [22, 26, 27, 31, 32]]
    spans = bt.region_spans(marks)
    assert spans == {"forward": 4, "score": 1, "backward": 4, "optimizer": 1}
    bd = bt.step_breakdown(10.0, spans, {"forward": 3.0, "score": 0.2, "backward": 3.5, "optimizer": 1.5,
                                         "unattributed": 0.3}, {"forward": 100, "score": 5, "backward": 150})
    rows = {r["region"]: r for r in bd["regions"]}
    assert rows["forward"]["gap_ms"] == pytest.approx(1.0) and rows["optimizer"]["gap_ms"] == 0.0  # never negative
    assert rows["score"]["kernels"] == 5 and rows["optimizer"]["kernels"] == 0
    assert bd["kernel_ms"] == pytest.approx(8.5) and bd["span_ms"] == pytest.approx(10.0)
    assert bd["host_gap_ms"] == pytest.approx(1.5) and bd["host_gap_fraction"] == pytest.approx(0.15)
    assert bd["kernels"] == 255
    assert bt.step_breakdown(1.0, {}, {"forward": 2.0})["host_gap_ms"] == 0.0
    with pytest.raises(ValueError):
        bt.step_breakdown(0.0, {}, {})


def test_format_tables():
    bd = bt.step_breakdown(12.5, {"forward": 5.0, "score": 0.5, "backward": 6.0, "optimizer": 1.0},
                           {"forward": 2.0, "score": 0.1, "backward": 3.0, "optimizer": 0.4}, {"forward": 900})
    rows = [{"n": 8, "context": 512, "tokens": 4096, "breakdown": bd, "sync_ms_median": 12.9, "tflops": 35.25,
             "tokens_per_s": 327680.0, "peak_gib": 3.25},
            {"n": 64, "context": 2048, "error": "out of memory: CUDA out of memory"}]
    text = bt.format_grid(rows)
    assert "12.50" in text and "12.90" in text and "5.00 (  2.00)" in text and "7.00 (56.0%)" in text
    assert "35.2" in text and "3.2GiB" in text and "out of memory" in text and "900" in text
    e2e = [{"name": "long", "docs": 2, "longest": 8193, "chunks": 256, "scored_tokens": 16192.0, "wall_s": 5.12,
            "ms_per_chunk": 20.0, "tokens_per_s": 3162.5,
            "region_ms_per_chunk": {"forward": 8.0, "score+backward": 10.0, "optimizer": 1.0, "between chunks": 1.0},
            "by_window": {"growing": {"chunks": 64, "ms_per_chunk": 15.0}, "full": {"chunks": 192, "ms_per_chunk": 21.7}}},
           {"name": "mixed", "error": "out of memory"}]
    text = bt.format_e2e(e2e)
    assert "256 chunks" in text and "20.00 ms/chunk" in text and "score+backward 10.00" in text
    assert "full window: 192 chunks, 21.70" in text and "mixed: out of memory" in text


def test_group_launches_and_format():
    recs = [("forward", "aten::linear", "aten::copy_", "cast_kernel", 2.0),
            ("forward", "aten::linear", "aten::copy_", "cast_kernel", 2.0),
            ("forward", "aten::linear", "aten::mm", "nvjet_gemm", 10.0),
            ("backward", "MmBackward0", "aten::mm", "nvjet_gemm", 20.0)]
    g = bt.group_launches(recs, steps=2)
    assert g["by_outer_op"][0] == {"region": "forward", "name": "aten::linear", "launches": 1.5, "ms": 0.007}
    assert g["by_inner_op"][0] == {"region": "forward", "name": "aten::copy_", "launches": 1.0, "ms": 0.002}
    assert g["by_kernel"][0]["name"] == "nvjet_gemm" and g["by_kernel"][0]["region"] == "backward"
    assert len(bt.group_launches(recs, steps=1, top=1)["by_inner_op"]) == 1
    text = bt.format_launches(g)
    assert "launches by outermost op" in text and "MmBackward0" in text and "[forward] aten::copy_" in text
    with pytest.raises(ValueError):
        bt.group_launches(recs, steps=0)

"""CPU tests of tools/bench_ttt.py's pure helpers: arguments, chunk shapes (checked against
train_gpt.ttt_chunk_inputs and its slot and context buckets), the FLOP count, region spans, kernel
attribution, the breakdown arithmetic and the tables; the instrumentation on train_gpt's own
classes; and one smoke run of the whole benchmark on CPU with a tiny model (--allow-cpu: eager
only, the graphed measurements skipped with a note). The real numbers come from the GPU box.

Run: python3 -m pytest -q tests/test_tools_bench_ttt.py
"""
import importlib.util
import json
import math
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


@pytest.mark.parametrize("context, n", [(8, 3), (16, 3), (32, 3), (24, 5)])
def test_shapes_match_train_gpt_chunk_inputs(context, n):
    import train_gpt as tg
    chunk, window = 8, 32
    ci = bt.chunk_index_for_context(context, chunk, window)
    length = bt.training_doc_length(ci, chunk)
    docs, total = bt.doc_layout([length] * n)
    tokens = torch.arange(total) % 50 + 2
    # as bench_shape runs it: ttt_slot_bucket(n) slots (the rest empty), the padded context
    size, padded = tg.ttt_slot_bucket(n), tg.ttt_context_bucket(min((ci + 1) * chunk, window), chunk, window)
    pad = [0] * (size - n)
    x, y, at, scored = tg.ttt_chunk_inputs(tokens, torch.tensor([s for s, _ in docs] + pad),
                                           torch.tensor([m - 1 for _, m in docs] + pad), torch.tensor(ci), chunk,
                                           window, padded)
    assert tuple(x.shape) == (size, padded) and tuple(at.shape) == tuple(scored.shape) == (size, chunk)
    assert padded >= context and scored.sum(1).tolist() == [chunk] * n + [0] * (size - n)
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
    assert f["total"] == f["forward"] + f["backward"] and f["head_positions"] == 6
    # the TTT step: the head (and its adapter) only at 1 of the 3 positions per row
    dims = {"q": (2, 4, 4), "head": (1, 4, 10)}
    g = bt.ttt_step_flops(n=2, context=3, d_model=4, q_dim=4, kv_dim=2, hidden=8, vocab=10, layers=2,
                          lora_dims=dims, rank=1, head_positions=1)
    body, head, lora_head = 2 * per_layer, 10 * 4, 1 * (4 + 10)
    assert g["head_positions"] == 2 and g["lora_params_per_doc"] == lora + lora_head
    assert g["forward"] == 6 * (2 * body + 2 * lora + attn) + 2 * (2 * head + 2 * lora_head)
    assert g["backward"] == 6 * (2 * body + 4 * lora + 2 * attn) + 2 * (2 * head + 4 * lora_head)
    full = bt.ttt_step_flops(n=2, context=3, d_model=4, q_dim=4, kv_dim=2, hidden=8, vocab=10, layers=2,
                             lora_dims=dims, rank=1)
    assert full["total"] - g["total"] == 4 * (4 * head + 6 * lora_head)  # 4 positions fewer through the head


def test_kernels_by_region():
    recs = [("forward", "aten::linear", "aten::mm", "gemm", 10.0), ("forward", "aten::add", "aten::add", "add", 2.0),
            ("score+backward", "MmBackward0", "aten::mm", "gemm", 20.0), ("optimizer", "_foreach", "_foreach", "k", 4.0)]
    ms, counts = bt.kernels_by_region(recs, steps=2, device_us=40.0, device_count=6)
    assert ms == pytest.approx({"forward": 0.006, "score+backward": 0.01, "optimizer": 0.002, "unattributed": 0.002})
    assert counts == {"forward": 1, "score+backward": 0, "optimizer": 0, "unattributed": 1}  # per step, rounded
    ms, counts = bt.kernels_by_region(recs, steps=1, device_us=36.0, device_count=4)  # every kernel claimed
    assert "unattributed" not in ms and counts == {"forward": 2, "score+backward": 1, "optimizer": 1}
    assert bt.kernels_by_region([], 1) == ({r: 0.0 for r in bt.REGIONS}, {r: 0 for r in bt.REGIONS})
    with pytest.raises(ValueError):
        bt.kernels_by_region(recs, steps=0)


def test_launch_records_regions_from_the_cpu_tree():
    from types import SimpleNamespace as NS
    from torch.autograd import DeviceType

    def op(name, parent=None, kernels=()):
        return NS(name=name, cpu_parent=parent, kernels=[NS(name=k, duration=d) for k, d in kernels],
                  device_type=DeviceType.CPU, is_async=False)

    fwd = op("bench_ttt::forward")
    linear = op("aten::linear", fwd)
    mm = op("aten::mm", linear, [("gemm", 5.0)])
    opt = op("bench_ttt::optimizer")
    foreach = op("aten::_foreach_mul_", opt, [("mul", 1.0), ("mul", 1.5)])
    node = op("autograd::engine::evaluate_function: MmBackward0")  # autograd's thread: no range
    back = op("aten::mm", node, [("gemm", 7.0)])
    where = op("aten::where", None, [("where", 0.5)])
    recs = bt._launch_records([fwd, linear, mm, opt, foreach, node, back, where])
    assert recs == [("forward", "aten::linear", "aten::mm", "gemm", 5.0),
                    ("optimizer", "aten::_foreach_mul_", "aten::_foreach_mul_", "mul", 1.0),
                    ("optimizer", "aten::_foreach_mul_", "aten::_foreach_mul_", "mul", 1.5),
                    ("score+backward", "MmBackward0", "aten::mm", "gemm", 7.0),
                    ("score+backward", "aten::where", "aten::where", "where", 0.5)]


def test_region_spans_and_step_breakdown():
    def step(t, fwd, opt, total):
        marks = [("step_start", t), ("fwd_start", t + 0.5), ("fwd_end", t + 0.5 + fwd)]
        if opt:
            marks += [("opt_start", t + total - opt - 0.2), ("opt_end", t + total - 0.2)]
        return marks + [("step_end", t + total)]

    marks = step(0, 4, 1, 10) + step(10, 5, 1, 12) + step(22, 4, 2, 10)
    spans = bt.region_spans(marks)
    assert spans == pytest.approx({"forward": 4, "score+backward": 5, "optimizer": 1})  # medians per region
    assert bt.region_spans(step(0, 3, 0, 5)) == pytest.approx({"forward": 3, "score+backward": 2, "optimizer": 0})
    assert bt.region_spans([]) == {r: 0.0 for r in bt.REGIONS}
    for bad in ([("fwd_start", 0), ("fwd_end", 1)], [("step_start", 0), ("fwd_end", 1)],
                [("step_start", 0), ("bogus", 1)], [("step_start", 0)]):
        with pytest.raises(ValueError):
            bt.region_spans(bad)
    bd = bt.step_breakdown(10.0, {"forward": 4, "score+backward": 5, "optimizer": 1},
                           {"forward": 3.0, "score+backward": 3.7, "optimizer": 1.5, "unattributed": 0.3},
                           {"forward": 100, "score+backward": 155})
    rows = {r["region"]: r for r in bd["regions"]}
    assert [r["region"] for r in bd["regions"]] == list(bt.REGIONS)
    assert rows["forward"]["gap_ms"] == pytest.approx(1.0) and rows["optimizer"]["gap_ms"] == 0.0  # never negative
    assert rows["score+backward"]["kernels"] == 155 and rows["optimizer"]["kernels"] == 0
    assert bd["kernel_ms"] == pytest.approx(8.5) and bd["span_ms"] == pytest.approx(10.0)
    assert bd["host_gap_ms"] == pytest.approx(1.5) and bd["host_gap_fraction"] == pytest.approx(0.15)
    assert bd["kernels"] == 255
    assert bt.step_breakdown(1.0, {}, {"forward": 2.0})["host_gap_ms"] == 0.0
    with pytest.raises(ValueError):
        bt.step_breakdown(0.0, {}, {})


def test_chunk_split():
    # three chunks: two train (forward, then the optimizer), the last only scores
    marks = [("fwd_start", 0), ("fwd_end", 4), ("opt_start", 9), ("opt_end", 10),
             ("fwd_start", 11), ("fwd_end", 16), ("opt_start", 22), ("opt_end", 23),
             ("fwd_start", 25), ("fwd_end", 28)]
    split = bt.chunk_split(marks, [(2, 16), (2, 32), (1, 32)], window=32)
    assert split["chunk_ms"] == [11, 14, 3]
    assert split["region_ms_per_chunk"] == pytest.approx({"forward": 4, "score+backward": 11 / 3, "optimizer": 2 / 3,
                                                          "between chunks": 1})
    assert split["by_window"] == {"growing": {"chunks": 1, "ms_per_chunk": 11},
                                  "full": {"chunks": 2, "ms_per_chunk": 8.5}}
    assert bt.chunk_split([], [], 32)["by_window"]["full"] == {"chunks": 0, "ms_per_chunk": 0.0}
    with pytest.raises(ValueError):
        bt.chunk_split([("opt_start", 0)], [], 32)


def test_speedup_and_rel_diff():
    assert bt.speedup(10.0, 2.5) == 4.0 and bt.speedup(10.0, None) is None and bt.speedup(None, 1.0) is None
    assert bt.speedup(10.0, 0.0) is None
    assert bt.rel_diff(1.0, 1.0) == 0.0 and bt.rel_diff(0.0, 0.0) == 0.0 and bt.rel_diff(1.0, 0.0) == float("inf")
    assert bt.rel_diff(101.0, 100.0) == pytest.approx(0.01) and bt.rel_diff(99.0, 100.0) == pytest.approx(0.01)


def _grid_row(graphed: bool) -> dict:
    bd = bt.step_breakdown(12.5, {"forward": 5.0, "score+backward": 6.5, "optimizer": 1.0},
                           {"forward": 2.0, "score+backward": 3.1, "optimizer": 0.4}, {"forward": 900})
    row = {"n": 8, "slots": 8, "context": 512, "tokens": 4096, "breakdown": bd,
           "eager": {"wall_ms": 12.5, "sync_ms_median": 12.9}, "graphed": None, "graphed_note": None,
           "speedup": None, "tflops": 3.5, "tflops_on": "eager", "peak_gib": 3.25}
    if graphed:
        row.update(graphed={"wall_ms": 2.5, "sync_ms_median": 2.75, "capture_ms": 310.0}, speedup=5.0, tflops=17.625,
                   tflops_on="graphed")
    else:
        row.update(graphed_note="skipped: CUDA graphs need a CUDA device, this is cpu", peak_gib=None)
    return row


def test_format_grid():
    rows = [_grid_row(True), _grid_row(False), {"n": 64, "context": 2048, "error": "out of memory: CUDA out of memory"}]
    text = bt.format_grid(rows)
    lines = text.splitlines()
    graphed, eager_only = lines[4], lines[5]
    assert "12.50" in graphed and "12.90" in graphed and "2.50" in graphed and "2.75" in graphed
    assert "310.0" in graphed and "5.00x" in graphed and "17.6 " in graphed and "3.2GiB" in graphed
    assert "5.00 (  2.00)" in graphed and "6.50 (  3.10)" in graphed and "7.00 (56.0%)" in graphed and "900" in graphed
    assert "3.5*" in eager_only and " - " in eager_only  # TFLOP/s on the eager time, no graphed cells
    assert "out of memory" in lines[6]
    assert lines[-1] == "graphed: skipped: CUDA graphs need a CUDA device, this is cpu"
    assert all(r in lines[2] for r in bt.REGIONS) and "speedup" in lines[2] and "launches" in lines[2]
    assert len({len(line) for line in lines[2:6]}) == 1  # header, rule and rows aligned


def test_format_e2e():
    eager = {"wall_s": 5.12, "ms_per_chunk": 20.0, "tokens_per_s": 3162.5, "bpb": 1.2345678,
             "region_ms_per_chunk": {"forward": 8.0, "score+backward": 10.0, "optimizer": 1.0, "between chunks": 1.0},
             "by_window": {"growing": {"chunks": 64, "ms_per_chunk": 15.0}, "full": {"chunks": 192, "ms_per_chunk": 21.7}}}
    graphed = {"wall_s": 1.28, "first_call_s": 3.5, "graphs": 12, "ms_per_chunk": 5.0, "tokens_per_s": 12650.0,
               "bpb": 1.2345679, "nats_rel_diff": 1.5e-7, "first_call_nats_rel_diff": 2e-7, "counts_equal": True}
    base = {"docs": 2, "longest": 8193, "chunks": 256, "scored_tokens": 16192.0, "eager": eager}
    rows = [dict(base, name="long", graphed=graphed, speedup=4.0),
            dict(base, name="cpu", graphed=None, graphed_note="skipped: CUDA graphs need a CUDA device, this is cpu"),
            {"name": "mixed", "error": "out of memory"}]
    text = bt.format_e2e(rows)
    assert "256 chunks" in text and "20.00 ms/chunk" in text and "score+backward 10.00" in text
    assert "full window: 192 chunks, 21.70" in text and "mixed: out of memory" in text
    assert "bpb 1.234568" in text and "bpb 1.234568; speedup 4.00x" in text and "3.50 s, 12 graphs" in text
    assert "5.00 ms/chunk" in text and "12,650 scored tok/s" in text and "relative difference 1.50e-07" in text
    assert "graphed: skipped: CUDA graphs need a CUDA device" in text and "DIFFER" not in text


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


# ---------------------------------------------------------------------------------------------
# on train_gpt's own classes, and the whole benchmark on CPU
# ---------------------------------------------------------------------------------------------


def test_instrumented_stamps_and_restores_the_optimizer():
    import train_gpt as tg

    class H:
        ttt_optimizer, ttt_beta1, ttt_beta2, ttt_lora_lr, ttt_weight_decay = "adam", 0.0, 0.999, 1e-2, 0.5

    original = tg.LoRAOptimizer.step
    calls = []
    with bt.instrumented(tg, lambda *a: calls.append(a) or torch.ones(2), torch.device("cpu")) as (model_fn, stamps):
        assert tg.LoRAOptimizer.step is not original
        p = torch.ones(1, 3)  # one slot
        opt = tg.LoRAOptimizer([p], H)
        assert model_fn(1, 2).tolist() == [1.0, 1.0] and calls == [(1, 2)]
        opt.step([torch.ones(3)])
    assert tg.LoRAOptimizer.step is original
    assert float(opt.t) == 1 and (p < 1).all()  # the real step ran
    times = stamps.times_ms()
    assert [k for k, _ in times] == ["fwd_start", "fwd_end", "opt_start", "opt_end"]
    assert times[0][1] == 0.0 and all(a[1] <= b[1] for a, b in zip(times, times[1:]))
    with pytest.raises(RuntimeError), bt.instrumented(tg, None, torch.device("cpu")):
        raise RuntimeError("restored on errors too")
    assert tg.LoRAOptimizer.step is original


def test_cpu_smoke_run(tmp_path, capsys):
    from tests.conftest import TINY_ENV
    out = tmp_path / "result.json"
    argv = ["--batches", "3,1", "--contexts", "16,64", "--steps", "2", "--warmup", "1", "--profile-steps", "1",
            "--long-docs", "100,80", "--mixed-docs", "3", "--mixed-range", "20,60", "--show-launches",
            "--out", str(out), "--allow-cpu", "--set", "VOCAB_SIZE=512"]
    for key, value in TINY_ENV.items():
        argv += ["--set", f"{key}={value}"]
    assert bt.main(argv) == 0
    text = capsys.readouterr().out
    assert "TTT chunk step" in text and "End to end" in text and "graphed: skipped" in text
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["ttt"]["chunk"] == 16 and result["warm_up_ttt_s"] > 0
    grid = {(r["n"], r["context"]): r for r in result["grid"]}
    assert set(grid) == {(3, 16), (3, 64), (1, 16), (1, 64)} and not any("error" in r for r in grid.values())
    for (n, context), row in grid.items():
        assert row["slots"] == n and row["padded_context"] == context and row["scored_per_step"] == n * 16
        assert row["graphed"] is None and "CUDA" in row["graphed_note"] and row["speedup"] is None
        assert len(row["eager"]["sync_ms"]) == 2 and row["eager"]["wall_ms"] > 0 and row["tflops_on"] == "eager"
        spans = {g["region"]: g["span_ms"] for g in row["breakdown"]["regions"]}
        assert list(spans) == list(bt.REGIONS) and spans["forward"] > 0 and spans["optimizer"] > 0
        assert row["profiled_wall_ms"] > 0 and row["flops"]["head_positions"] == n * 16
    for row in result["e2e"]:
        e = row["eager"]
        assert row["graphed"] is None and "CUDA" in row["graphed_note"]
        assert math.isfinite(e["bpb"]) and e["bpb"] > 0 and row["scored_tokens"] == sum(n - 1 for n in row["lengths"])
        assert sum(g["chunks"] for g in e["by_window"].values()) == row["chunks"]
        assert e["region_ms_per_chunk"]["forward"] > 0
    assert [r["name"] for r in result["e2e"]] == ["long", "mixed"] and result["e2e"][0]["chunks"] == 7

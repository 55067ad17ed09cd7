"""Timing of train_gpt.py's per-document LoRA test-time-training (TTT) chunk step on one GPU.

    python3 tools/bench_ttt.py [--repo-root DIR] [--batches 64,32,8,1] [--contexts 32,512,2048]
                               [--steps 8] [--out result.json]

What runs: the default model (Hyperparameters with every default: 35.9M parameters, 11 layers,
looping on as run() sets it for TTT, so 17 virtual layers), random weights (weights do not change
the timing; the banks that start at zero, O and MLP-down, are filled with small random values so
no matmul runs on zeros), eager and in eval mode, inside train_gpt.frozen(model), exactly as
run() calls eval_val_ttt(model, model, ...). Tokens are synthetic (uniform random ids, BOS at each
document start); the byte tables are synthetic too. Nothing reads data or a tokenizer.

1. The chunk-step grid. For each batch size n (documents still active) and context length
   (the window of chunk ci: min((ci+1) * TTT_CHUNK_SIZE, TTT_EVAL_SEQ_LEN)), n synthetic documents
   long enough that chunk ci trains, its inputs from train_gpt.ttt_chunk_inputs, a fresh
   BatchedLoRA / LoRAOptimizer / OptionalLoRA, and then the body of ttt_batch's chunk loop
   (chunk_step below, a copy of it with region marks) in four regions:
       forward   model(x, y, None, 0, adapters) under bf16 autocast with grad on: the one forward
                 that both scores the chunk and trains on it
       score     the no_grad sums of nats, bytes and scored tokens (boolean-mask indexing: each
                 [scored] is a nonzero(), so a host-device synchronisation)
       backward  the per-document mean loss and .backward() into the LoRA tensors
       optimizer LoRAOptimizer.step() (foreach AdamW over the adapter tensors)
   Three measurements per shape: (a) wall time of a step, synchronised after each, median over
   --steps; (b) the same steps without synchronisation, with CUDA events at the region marks:
   the mean wall time per step and each region's span on the GPU timeline (kernels plus the idle
   time while the GPU waited for the host); (c) --profile-steps steps under torch.profiler with a
   synchronisation at each mark, so every kernel falls inside its region's CPU range: GPU kernel
   time and kernel count per region. Host gap = wall (b) - kernel time (c), per region span - kernel.
   Model FLOPs per step (ttt_step_flops) over the wall time gives the achieved TFLOP/s.
2. End to end: train_gpt.ttt_batch itself, unmodified, over synthetic batches (default: two
   documents of 8,193 and 8,001 tokens, then 64 documents of mixed lengths), after the project's
   own warm_up_ttt. model_fn is wrapped and LoRAOptimizer.step patched (for the call only) to
   record CUDA events, so the chunks' time splits into forward, score+backward, optimizer and the
   time between chunks (batch shrinking, chunk inputs); ms per chunk is given for chunks whose
   window is still growing and for chunks at the full window.

Pure helpers (argument parsing, shapes, FLOP count, kernel attribution, breakdown arithmetic,
tables) need no GPU and do not import train_gpt: tests/test_tools_bench_ttt.py checks them on
CPU. train_gpt is imported from --repo-root (default: the parent of tools/) only when the
benchmark runs.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import _env_pair, _non_negative, launching_ops, write_json  # noqa: E402  (shared with bench_train)
REGIONS = ("forward", "score", "backward", "optimizer")
E2E_REGIONS = ("forward", "score+backward", "optimizer", "between chunks")
DEFAULT_BATCHES = (64, 32, 8, 1)
DEFAULT_CONTEXTS = (32, 512, 2048)
DEFAULT_LONG_DOCS = (8193, 8001)


# =============================================================================================
#                                   ARGUMENTS AND SHAPES (pure)
# =============================================================================================


def parse_int_list(text: str) -> tuple[int, ...]:
    """'64,32,8' -> (64, 32, 8); every entry a positive integer."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} must list positive integers")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time train_gpt.py's LoRA TTT chunk step (default model, one GPU).")
    p.add_argument("--repo-root", default=REPO_ROOT, help="folder holding the train_gpt.py to import "
                   "(default: the parent of tools/)")
    p.add_argument("--batches", type=parse_int_list, default=DEFAULT_BATCHES,
                   help="active documents per chunk step (default 64,32,8,1)")
    p.add_argument("--contexts", type=parse_int_list, default=DEFAULT_CONTEXTS,
                   help="context lengths: multiples of TTT_CHUNK_SIZE up to TTT_EVAL_SEQ_LEN (default 32,512,2048)")
    p.add_argument("--warmup", type=_non_negative, default=2, help="untimed steps per shape (default 2)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per shape and measurement (default 8)")
    p.add_argument("--profile-steps", type=_non_negative, default=2, help="profiled steps per shape (default 2; 0: none)")
    p.add_argument("--top", type=int, default=25, help="rows kept per launch table (default 25)")
    p.add_argument("--show-launches", action="store_true", help="print the launch tables of every shape")
    p.add_argument("--long-docs", type=parse_int_list, default=DEFAULT_LONG_DOCS,
                   help="document lengths of the end-to-end ttt_batch (default 8193,8001)")
    p.add_argument("--mixed-docs", type=int, default=64,
                   help="documents of the second end-to-end batch, lengths log-uniform in --mixed-range (0: skip)")
    p.add_argument("--mixed-range", type=parse_int_list, default=(64, 2600), help="min,max length (default 64,2600)")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end ttt_batch runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the results as JSON to this path")
    p.add_argument("--set", dest="overrides", type=_env_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hyperparameters variable, e.g. --set TTT_LORA_RANK=64 (repeatable)")
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # smoke tests only
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if len(args.mixed_range) != 2 or args.mixed_range[0] < 2 or args.mixed_range[0] > args.mixed_range[1]:
        p.error("--mixed-range must be MIN,MAX with 2 <= MIN <= MAX")
    if any(n < 2 for n in args.long_docs):
        p.error("--long-docs lengths must be at least 2")
    return args


def chunk_index_for_context(context: int, chunk: int, window: int) -> int:
    """The first chunk index ci whose window min((ci+1)*chunk, window) equals `context`."""
    if context < 1 or context > window or (context % chunk and context != window):
        raise ValueError(f"context {context} is not a window of chunks of {chunk} up to {window}")
    return -(-context // chunk) - 1


def training_doc_length(ci: int, chunk: int) -> int:
    """Tokens of a document (inputs + the final target) whose chunk ci still trains: ttt_batch trains
    a document on chunk ci while it has chunks after it, i.e. ceil((len-1)/chunk) > ci + 1."""
    return (ci + 2) * chunk + 1


def doc_layout(lengths) -> tuple[list[tuple[int, int]], int]:
    """(start, length) of documents laid end to end as split_documents cuts a stream: each document's
    last target is the next one's BOS, so consecutive documents share one token. Returns the docs
    and the stream length."""
    docs, start = [], 0
    for n in lengths:
        if n < 2:
            raise ValueError("a document needs at least 2 tokens (an input and a target)")
        docs.append((start, n))
        start += n - 1
    return docs, start + 1


def mixed_lengths(count: int, lo: int, hi: int, seed: int) -> list[int]:
    """`count` document lengths, log-uniform in [lo, hi], longest first (as ttt_batches orders a batch)."""
    import random
    rng = random.Random(seed)
    out = [int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))) for _ in range(count)]
    return sorted((max(lo, min(hi, n)) for n in out), reverse=True)


def chunk_contexts(lengths, chunk: int, window: int) -> list[tuple[int, int]]:
    """(active documents, context) of each chunk ttt_batch runs over documents of these lengths."""
    chunks = [-(-(n - 1) // chunk) for n in lengths]
    return [(sum(c > ci for c in chunks), min((ci + 1) * chunk, window)) for ci in range(max(chunks, default=0))]


# =============================================================================================
#                                        FLOP COUNT (pure)
# =============================================================================================


def ttt_step_flops(n: int, context: int, d_model: int, q_dim: int, kv_dim: int, hidden: int, vocab: int,
                   layers: int, lora_dims: dict[str, tuple[int, int, int]], rank: int) -> dict:
    """Model FLOPs of one training chunk step over n rows of `context` tokens (every position runs
    the forward and the backward; the dense causal mask of a row).

    Frozen matmuls per token: per virtual layer Q and O (q_dim x d), K and V (kv_dim x d), MLP up
    and down (hidden x d), plus the tied head (vocab x d): 2 FLOPs per weight forward, 2 backward
    (input gradients only: the base weights are frozen). LoRA: a delta B(Ax) costs rank*(in+out)
    weights per slot, 2 FLOPs each forward and 4 backward (input and weight gradients).
    lora_dims: name -> (slots, in, out), as train_gpt.lora_shapes. Attention per token and layer,
    forward: 2 * q_dim * context (QK^T and PV over the causal half of context keys on average),
    backward twice that. Not counted: norms, RoPE, XSA, softcap, loss, optimizer."""
    per_layer = 2 * q_dim * d_model + 2 * kv_dim * d_model + 2 * hidden * d_model
    base = layers * per_layer + vocab * d_model
    lora = sum(slots * rank * (d_in + d_out) for slots, d_in, d_out in lora_dims.values())
    attn_fwd = 2 * q_dim * context * layers
    fwd = 2 * base + 2 * lora + attn_fwd
    bwd = 2 * base + 4 * lora + 2 * attn_fwd
    tokens = n * context
    return {"tokens": tokens, "base_params": base, "lora_params_per_doc": lora, "forward": tokens * fwd,
            "backward": tokens * bwd, "total": tokens * (fwd + bwd)}


# =============================================================================================
#                                   BREAKDOWN ARITHMETIC (pure)
# =============================================================================================


def attribute_kernels(kernels, regions) -> dict:
    """Kernel time and count per region: kernels [(start, end)], regions [(name, start, end)] (one
    clock, e.g. the profiler's microseconds). A kernel belongs to the region whose range holds its
    start (the runs synchronise at every region boundary, so a kernel starts and ends inside the
    range that launched it); kernels outside every range go to 'unattributed'. Returns
    {name: {"us": total, "count": n}}, regions summed over their repeats."""
    ordered = sorted(regions, key=lambda r: r[1])
    out: dict[str, dict] = {}
    for name, _, _ in ordered:
        out.setdefault(name, {"us": 0.0, "count": 0})
    starts = [r[1] for r in ordered]
    import bisect
    for ks, ke in kernels:
        i = bisect.bisect_right(starts, ks) - 1
        name = ordered[i][0] if i >= 0 and ks <= ordered[i][2] else "unattributed"
        slot = out.setdefault(name, {"us": 0.0, "count": 0})
        slot["us"] += ke - ks
        slot["count"] += 1
    return out


def step_breakdown(wall_ms: float, spans_ms: dict, kernel_ms: dict, kernels: dict | None = None,
                   regions=REGIONS) -> dict:
    """One shape's numbers: per region the GPU-timeline span (events, unsynchronised run), the
    kernel time inside it (profiler, synchronised run), the gap (span - kernels, at least 0) and
    the kernel count; totals: wall, summed spans, summed kernel time (regions and unattributed),
    host gap = wall - kernel time (at least 0) and its share of the wall."""
    if wall_ms <= 0:
        raise ValueError("wall time must be positive")
    kernels = kernels or {}
    rows = []
    for r in regions:
        span, k = float(spans_ms.get(r, 0.0)), float(kernel_ms.get(r, 0.0))
        rows.append({"region": r, "span_ms": span, "kernel_ms": k, "gap_ms": max(span - k, 0.0),
                     "kernels": kernels.get(r, 0)})
    kernel_total = float(sum(kernel_ms.values()))
    gap = max(wall_ms - kernel_total, 0.0)
    return {"regions": rows, "wall_ms": wall_ms, "span_ms": float(sum(spans_ms.get(r, 0.0) for r in regions)),
            "kernel_ms": kernel_total, "kernels": int(sum(kernels.values())), "host_gap_ms": gap,
            "host_gap_fraction": gap / wall_ms}


def region_spans(marks_ms: list[list[float]], regions=REGIONS) -> dict:
    """Median span per region from per-step mark times [[t0, t1, ..., tR], ...] (ms, one clock):
    region i runs from mark i to mark i+1."""
    out = {}
    for i, r in enumerate(regions):
        out[r] = statistics.median(m[i + 1] - m[i] for m in marks_ms) if marks_ms else 0.0
    return out


def group_launches(records, steps: int, top: int = 20) -> dict:
    """Kernel launches per step grouped three ways, from records (region, outer op, inner op,
    kernel name, microseconds): by the outermost CPU op under the region's range (aten::linear,
    aten::rms_norm, or in the backward the autograd node, e.g. MmBackward0), by the innermost op
    that launched the kernel (aten::copy_ for casts, aten::mm, ...), and by kernel name. Each:
    [{"name", "region", "launches", "ms"}] per step, most launches first (kernel names: most time
    first), at most `top` rows."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    out = {}
    for key, idx in (("by_outer_op", 1), ("by_inner_op", 2), ("by_kernel", 3)):
        acc: dict = {}
        for rec in records:
            k = (rec[0], rec[idx])
            n, us = acc.get(k, (0, 0.0))
            acc[k] = (n + 1, us + rec[4])
        rows = [{"region": r, "name": name, "launches": n / steps, "ms": us / 1000 / steps}
                for (r, name), (n, us) in acc.items()]
        rows.sort(key=(lambda x: (-x["ms"], x["name"])) if key == "by_kernel" else (lambda x: (-x["launches"], x["name"])))
        out[key] = rows[:top]
    return out


def format_launches(groups: dict, limit: int = 14) -> str:
    lines = []
    for key, title in (("by_outer_op", "launches by outermost op"), ("by_inner_op", "launches by launching op"),
                       ("by_kernel", "kernels by GPU time")):
        lines.append(f"    {title}:")
        for row in groups.get(key, [])[:limit]:
            name = row["name"] if len(row["name"]) <= 96 else row["name"][:93] + "..."
            lines.append(f"      {row['launches']:7.0f} x {row['ms']:8.3f} ms  [{row['region']}] {name}")
    return "\n".join(lines)


def _f(value, fmt: str = "7.2f", none: str = "-") -> str:
    if value is None:
        width = int(fmt.split(".")[0] or 0) if fmt[0].isdigit() else 0
        return none.rjust(width)
    return format(value, fmt)


def format_grid(rows: list[dict]) -> str:
    """The chunk-step table: one line per (n, context); each region as span (kernels) in ms."""
    head = (f"{'n':>3s} {'ctx':>5s} {'tokens':>7s} {'wall':>8s} {'sync':>8s} | "
            + " | ".join(f"{r + ' (GPU)':>17s}" for r in REGIONS)
            + f" | {'GPU sum':>8s} {'host gap':>15s} {'kernels':>7s} {'TFLOP/s':>7s} {'tok/s':>9s} {'peak':>8s}")
    lines = ["TTT chunk step, ms per step: wall (unsynchronised mean), sync (median, synchronised each step); "
             "per region the GPU-timeline span (kernel time)", head, "-" * len(head)]
    for row in rows:
        if row.get("error"):
            lines.append(f"{row['n']:3d} {row['context']:5d} {row['n'] * row['context']:7d}   {row['error']}")
            continue
        bd = row["breakdown"]
        cells = [f"{_f(g['span_ms'], '8.2f')} ({_f(g['kernel_ms'], '6.2f')})" for g in bd["regions"]]
        gap = f"{bd['host_gap_ms']:7.2f} ({100 * bd['host_gap_fraction']:4.1f}%)"
        peak = row.get("peak_gib")
        lines.append(f"{row['n']:3d} {row['context']:5d} {row['tokens']:7d} {bd['wall_ms']:8.2f} "
                     f"{_f(row.get('sync_ms_median'), '8.2f')} | " + " | ".join(f"{c:>17s}" for c in cells)
                     + f" | {bd['kernel_ms']:8.2f} {gap:>15s} {bd['kernels']:7d} {_f(row.get('tflops'), '7.1f')} "
                     f"{_f(row.get('tokens_per_s'), '9.0f')} {_f(peak, '6.1f') + 'GiB' if peak is not None else '-':>8s}")
    return "\n".join(lines)


def format_e2e(rows: list[dict]) -> str:
    lines = ["End to end: train_gpt.ttt_batch over synthetic documents (CUDA events around model_fn and "
             "LoRAOptimizer.step)"]
    for row in rows:
        if row.get("error"):
            lines.append(f"  {row['name']}: {row['error']}")
            continue
        lines.append(f"  {row['name']}: {row['docs']} docs, longest {row['longest']}, {row['chunks']} chunks, "
                     f"{row['scored_tokens']:,.0f} scored tokens in {row['wall_s']:.2f} s: "
                     f"{row['ms_per_chunk']:.2f} ms/chunk, {row['tokens_per_s']:,.0f} scored tok/s")
        split = ", ".join(f"{r} {row['region_ms_per_chunk'][r]:.2f}" for r in E2E_REGIONS)
        lines.append(f"    per chunk (GPU timeline, ms): {split}")
        for key, label in (("growing", "window still growing"), ("full", "full window")):
            g = row["by_window"].get(key)
            if g and g["chunks"]:
                lines.append(f"    {label}: {g['chunks']} chunks, {g['ms_per_chunk']:.2f} ms/chunk")
    return "\n".join(lines)


# =============================================================================================
#                                          THE BENCHMARK
# =============================================================================================


def _tg(repo_root: str):
    """train_gpt from repo_root (put first on sys.path)."""
    repo_root = os.path.abspath(repo_root)
    if not os.path.isfile(os.path.join(repo_root, "train_gpt.py")):
        raise SystemExit(f"bench_ttt: no train_gpt.py in {repo_root}")
    if sys.path[:1] != [repo_root]:
        sys.path.insert(0, repo_root)
    import train_gpt
    if os.path.dirname(os.path.abspath(train_gpt.__file__)) != repo_root:
        raise SystemExit(f"bench_ttt: imported {train_gpt.__file__}, not the one in {repo_root}")
    return train_gpt


class Marks:
    """Timestamps at region boundaries: CUDA events on a GPU (read after a synchronisation), the
    host clock on CPU (smoke tests)."""

    def __init__(self, device):
        import torch
        self.cuda = device.type == "cuda"
        self.torch = torch
        self.steps: list[list] = []

    def new_step(self):
        self.steps.append([])

    def __call__(self):
        if self.cuda:
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record()
            self.steps[-1].append(ev)
        else:
            self.steps[-1].append(time.perf_counter())

    def times_ms(self) -> list[list[float]]:
        if self.cuda:
            self.torch.cuda.synchronize()
            t0 = self.steps[0][0]
            return [[t0.elapsed_time(ev) for ev in step] for step in self.steps]
        t0 = self.steps[0][0]
        return [[1000 * (t - t0) for t in step] for step in self.steps]


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chunk_step(tg, model, x, y, scored, adapters, opt, luts, sums, trains: int, mark=None):
    """One chunk of train_gpt.ttt_batch (TTT_GRAD_STEPS=1), with a mark() at each region boundary.
    Keep in step with ttt_batch's loop body."""
    import torch
    mark = mark or (lambda: None)
    device = x.device
    mark()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), \
            torch.set_grad_enabled(trains > 0):
        loss = model(x, y, None, 0, adapters)
    mark()
    with torch.no_grad():
        sums[0] += loss.detach().double()[scored].sum()
        sums[1] += tg.target_bytes(x, y, luts)[scored].sum()
        sums[2] += scored.sum()
    mark()
    if trains:
        per_doc = (loss * scored).sum(1) / scored.sum(1).clamp_min(1)
        per_doc[:trains].sum().backward()
    mark()
    if trains:
        opt.step()
    mark()


def synthetic_luts(vocab: int, device, seed: int = 0):
    """Byte tables of the shape and dtypes build_byte_luts returns, with random contents."""
    import torch
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(1, 9, (vocab,), generator=g, dtype=torch.int16)
    space = torch.rand(vocab, generator=g) < 0.5
    boundary = torch.zeros(vocab, dtype=torch.bool)
    boundary[:2] = True
    return base.to(device), space.to(device), boundary.to(device)


def synthetic_stream(lengths, vocab: int, bos: int, seed: int):
    import torch
    docs, total = doc_layout(lengths)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, vocab, (total,), generator=g)
    for s, _ in docs:
        tokens[s] = bos
    return tokens, docs


def build(args, log=print):
    import torch
    tg = _tg(args.repo_root)
    env = {"RUN_ID": "bench_ttt", "DATA_DIR": "/nonexistent"}
    env.update(dict(args.overrides))
    h = tg.Hyperparameters(env=env)
    device = tg.setup_distributed(h)
    if device.type != "cuda" and not args.allow_cpu:
        raise SystemExit("bench_ttt: needs a CUDA device")
    torch.manual_seed(h.seed)
    backend = tg.pick_attention_backend(h.attn_backend)
    model = tg.build_model(h, device, backend)
    with torch.no_grad():  # no matmul on zeros: O and MLP-down start at zero
        L = model.num_layers
        model.qo_bank[L:].normal_(0, 0.02)
        model.mlp_down_bank.normal_(0, 0.02)
    model.eval()
    model.looping = h.num_loops > 0  # as run() before TTT
    luts = synthetic_luts(h.vocab_size, device, args.seed)
    return tg, h, device, backend, model, luts


def model_dims(model) -> dict:
    return {"d_model": int(model.qo_bank.shape[-1]), "q_dim": int(model.qo_bank.shape[-2]),
            "kv_dim": int(model.kv_bank.shape[-2]), "hidden": int(model.mlp_up_bank.shape[-2]),
            "vocab": int(model.tok_emb.weight.shape[0]),
            "layers": sum(len(half) for half in model.layer_order())}


def _is_kernel(ev) -> bool:
    import torch
    if getattr(ev, "device_type", None) != torch.autograd.DeviceType.CUDA:
        return False
    if getattr(ev, "is_user_annotation", False):
        return False
    activity = (getattr(ev, "activity_type", None) or "").lower()
    return "annotation" not in activity and "sync" not in activity


def _launch_records(events) -> list[tuple]:
    """(region, outer op, inner op, kernel, us) for every kernel a CPU op claims in a profile of
    bench_shape: region from the enclosing bench_ttt:: range (backward ops run on autograd's own
    thread, outside it: 'backward'), outer op the outermost ancestor below that range (autograd
    nodes without their 'autograd::engine::evaluate_function: ' prefix)."""
    out = []
    for ev, kernels in launching_ops(events):
        chain, region, e = [], None, ev
        while e is not None:
            if e.name.startswith("bench_ttt::"):
                region = e.name.split("::", 1)[1]
                break
            chain.append(e.name)
            e = e.cpu_parent
        if region is None:
            region = "backward" if any(n.startswith("autograd::") or "Backward" in n for n in chain) else "other"
        outer = chain[-1].replace("autograd::engine::evaluate_function: ", "")
        for k in kernels:
            out.append((region, outer, ev.name, k.name, float(k.duration)))
    return out


def bench_shape(tg, h, model, luts, device, n: int, context: int, args, log=print) -> dict:
    """The three measurements of one (n, context) chunk step."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    chunk, window = h.ttt_chunk_size, h.ttt_eval_seq_len
    ci = chunk_index_for_context(context, chunk, window)
    length = training_doc_length(ci, chunk)
    tokens, docs = synthetic_stream([length] * n, h.vocab_size, tg.BOS_ID, args.seed + n * 100003 + context)
    tokens = tokens.to(device)
    starts = torch.tensor([s for s, _ in docs], device=device)
    pred_lens = torch.tensor([m - 1 for _, m in docs], device=device)
    x, y, scored = tg.ttt_chunk_inputs(tokens, starts, pred_lens, ci, chunk, window)
    if tuple(x.shape) != (n, context):
        raise RuntimeError(f"chunk inputs {tuple(x.shape)}, expected {(n, context)}")
    lora = tg.BatchedLoRA(tg.lora_shapes(model, h), n, h.ttt_lora_rank, device, h.seed)
    opt = tg.LoRAOptimizer(lora.parameters(), h)
    adapters = tg.OptionalLoRA(lora)
    sums = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(3)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(mark=None):
        chunk_step(tg, model, x, y, scored, adapters, opt, luts, sums, n, mark)

    for _ in range(args.warmup):
        step()
    _sync(device)
    synced = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        _sync(device)
        synced.append(1000 * (time.perf_counter() - t))
    marks = Marks(device)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        marks.new_step()
        step(marks)
    _sync(device)
    wall = 1000 * (time.perf_counter() - t0) / args.steps
    spans = region_spans(marks.times_ms())
    kernel_ms, counts, prof_wall, launches = {}, {}, None, None
    if args.profile_steps:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        labels = iter(())

        def synced_mark():
            nonlocal current
            _sync(device)
            if current is not None:
                current.__exit__(None, None, None)
            name = next(labels, None)
            current = record_function(f"bench_ttt::{name}") if name else None
            if current is not None:
                current.__enter__()

        with profile(activities=acts) as prof:
            t = time.perf_counter()
            for _ in range(args.profile_steps):
                labels, current = iter(REGIONS), None
                step(synced_mark)
            prof_wall = 1000 * (time.perf_counter() - t) / args.profile_steps
        events = prof.events()
        ranges = [(ev.name.split("::", 1)[1], ev.time_range.start, ev.time_range.end) for ev in events
                  if ev.name.startswith("bench_ttt::") and ev.device_type == torch.autograd.DeviceType.CPU]
        kern = [(ev.time_range.start, ev.time_range.end) for ev in events if _is_kernel(ev)]
        if len(ranges) != len(REGIONS) * args.profile_steps:
            log(f"  warning: {len(ranges)} region ranges in the profile, expected {len(REGIONS) * args.profile_steps}")
        att = attribute_kernels(kern, ranges)
        kernel_ms = {r: v["us"] / 1000 / args.profile_steps for r, v in att.items()}
        counts = {r: round(v["count"] / args.profile_steps) for r, v in att.items()}
        launches = group_launches(_launch_records(events), args.profile_steps, top=args.top)
    bd = step_breakdown(wall, spans, kernel_ms, counts)
    dims = model_dims(model)
    flops = ttt_step_flops(n, context, dims["d_model"], dims["q_dim"], dims["kv_dim"], dims["hidden"], dims["vocab"],
                           dims["layers"], tg.lora_shapes(model, h), h.ttt_lora_rank)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row = {"n": n, "context": context, "chunk_index": ci, "tokens": n * context,
           "scored_per_step": int(scored.sum().item()), "sync_ms": synced, "sync_ms_median": statistics.median(synced),
           "profiled_wall_ms": prof_wall, "breakdown": bd, "launches": launches, "flops": flops,
           "tflops": flops["total"] / (wall / 1000) / 1e12, "tokens_per_s": n * context / (wall / 1000),
           "scored_tokens_per_s": int(scored.sum().item()) / (wall / 1000), "peak_gib": peak}
    log(f"  n={n:3d} ctx={context:5d}: wall {wall:8.2f} ms (sync median {row['sync_ms_median']:.2f}), kernels "
        f"{bd['kernel_ms']:.2f} ms in {bd['kernels']} launches, host gap {100 * bd['host_gap_fraction']:.0f}%"
        + (f", peak {peak:.1f} GiB" if peak is not None else ""))
    return row


@contextlib.contextmanager
def instrumented(tg, model, device):
    """model_fn recording events around each forward, and LoRAOptimizer.step patched likewise (for
    the duration); yields (model_fn, marks) with marks a list of (kind, event)."""
    import torch
    marks: list = []

    def stamp(kind):
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append((kind, ev))
        else:
            marks.append((kind, time.perf_counter()))

    def model_fn(*a, **k):
        stamp("fwd_start")
        out = model(*a, **k)
        stamp("fwd_end")
        return out

    original = tg.LoRAOptimizer.step

    def step(self):
        stamp("opt_start")
        original(self)
        stamp("opt_end")

    tg.LoRAOptimizer.step = step
    try:
        yield model_fn, marks
    finally:
        tg.LoRAOptimizer.step = original


def e2e_split(marks: list, device, contexts: list[tuple[int, int]], window: int) -> dict:
    """Per-chunk region times from the (kind, stamp) marks of one ttt_batch: chunk k runs from its
    forward's start to the next chunk's forward start (the last one to its last mark)."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
        t0 = marks[0][1]
        ts = [(k, t0.elapsed_time(e)) for k, e in marks]
    else:
        t0 = marks[0][1]
        ts = [(k, 1000 * (e - t0)) for k, e in marks]
    chunks, cur = [], None
    for kind, t in ts:
        if kind == "fwd_start":
            if cur is not None:
                cur["next"] = t
            cur = {"fwd_start": t}
            chunks.append(cur)
        else:
            cur[kind] = t
    if chunks:
        chunks[-1]["next"] = ts[-1][1]
    totals = dict.fromkeys(E2E_REGIONS, 0.0)
    per_chunk = []
    for c in chunks:
        fwd = c["fwd_end"] - c["fwd_start"]
        if "opt_start" in c:
            mid, opt, rest = c["opt_start"] - c["fwd_end"], c["opt_end"] - c["opt_start"], c["next"] - c["opt_end"]
        else:
            mid, opt, rest = c["next"] - c["fwd_end"], 0.0, 0.0
        for r, v in zip(E2E_REGIONS, (fwd, mid, opt, rest)):
            totals[r] += v
        per_chunk.append(c["next"] - c["fwd_start"])
    by_window = {"growing": [], "full": []}
    for (n, ctx), ms in zip(contexts, per_chunk):
        by_window["full" if ctx >= window else "growing"].append(ms)
    k = max(len(chunks), 1)
    return {"region_ms_per_chunk": {r: v / k for r, v in totals.items()}, "chunk_ms": per_chunk,
            "by_window": {key: {"chunks": len(v), "ms_per_chunk": sum(v) / len(v) if v else 0.0}
                          for key, v in by_window.items()}}


def bench_e2e(tg, h, model, luts, device, name: str, lengths, seed: int, log=print) -> dict:
    lengths = sorted(lengths, reverse=True)
    tokens, docs = synthetic_stream(lengths, h.vocab_size, tg.BOS_ID, seed)
    tokens = tokens.to(device)
    contexts = chunk_contexts(lengths, h.ttt_chunk_size, h.ttt_eval_seq_len)
    if device.type == "cuda":
        import torch
        torch.cuda.reset_peak_memory_stats(device)
    with instrumented(tg, model, device) as (model_fn, marks):
        _sync(device)
        t0 = time.perf_counter()
        nats, nbytes, count = tg.ttt_batch(model_fn, model, tokens, docs, h, luts)
        _sync(device)
        wall = time.perf_counter() - t0
        split = e2e_split(marks, device, contexts, h.ttt_eval_seq_len)
    row = {"name": name, "docs": len(lengths), "longest": lengths[0], "lengths": lengths, "chunks": len(contexts),
           "scored_tokens": count, "wall_s": wall, "ms_per_chunk": 1000 * wall / max(len(contexts), 1),
           "tokens_per_s": count / wall, "bpb": tg.bits_per_byte(nats, nbytes), **split}
    del row["chunk_ms"]
    if device.type == "cuda":
        import torch
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    log(f"  {name}: {row['chunks']} chunks in {wall:.2f} s, {row['ms_per_chunk']:.2f} ms/chunk")
    return row


def run_benchmark(args, log=print) -> dict:
    import torch
    tg, h, device, backend, model, luts = build(args, log)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "attn_backend": backend, "train_gpt": tg.__file__,
              "dims": model_dims(model), "lora_shapes": {k: list(v) for k, v in tg.lora_shapes(model, h).items()},
              "ttt": {"rank": h.ttt_lora_rank, "chunk": h.ttt_chunk_size, "window": h.ttt_eval_seq_len,
                      "batch_size": h.ttt_batch_size, "grad_steps": h.ttt_grad_steps, "optimizer": h.ttt_optimizer},
              "settings": {"warmup": args.warmup, "steps": args.steps, "profile_steps": args.profile_steps},
              "overrides": dict(args.overrides), "grid": [], "e2e": [], "show_launches": args.show_launches}
    log(f"device {result['device']}, torch {torch.__version__}, attention {backend}, "
        f"{result['dims']['layers']} virtual layers, LoRA rank {h.ttt_lora_rank}")
    with tg.frozen(model):
        t = time.perf_counter()
        result["warm_up_ttt_s"] = tg.warm_up_ttt(model, model, h, luts, device)
        log(f"warm_up_ttt: {result['warm_up_ttt_s']:.1f} s")
        log("chunk-step grid:")
        for n in args.batches:
            for context in args.contexts:
                try:
                    row = bench_shape(tg, h, model, luts, device, n, context, args, log)
                except torch.OutOfMemoryError as e:
                    row = {"n": n, "context": context, "error": f"out of memory: {str(e).splitlines()[0]}"}
                    log(f"  n={n} ctx={context}: {row['error']}")
                except ValueError as e:
                    row = {"n": n, "context": context, "error": str(e)}
                    log(f"  n={n} ctx={context}: {row['error']}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                result["grid"].append(row)
        if not args.no_e2e:
            log("end to end (train_gpt.ttt_batch):")
            runs = [("long", list(args.long_docs))]
            if args.mixed_docs:
                runs.append(("mixed", mixed_lengths(args.mixed_docs, *args.mixed_range, args.seed)))
            for name, lengths in runs:
                label = name
                try:
                    result["e2e"].append(bench_e2e(tg, h, model, luts, device, label, lengths, args.seed + 7, log))
                except torch.OutOfMemoryError as e:
                    result["e2e"].append({"name": label, "error": f"out of memory: {str(e).splitlines()[0]}"})
        result["seconds"] = time.perf_counter() - t
    return result


def format_report(result: dict) -> str:
    lines = [f"device: {result['device']}  torch {result['torch']}  attention: {result['attn_backend']}  "
             f"train_gpt: {result['train_gpt']}",
             f"model: {result['dims']}  TTT: {result['ttt']}",
             f"warm_up_ttt (the project's TTT warm-up, synthetic tokens): {result['warm_up_ttt_s']:.2f} s",
             format_grid(result["grid"])]
    if result.get("show_launches"):
        for row in result["grid"]:
            if row.get("launches"):
                lines.append(f"  n={row['n']} ctx={row['context']}: {row['breakdown']['kernels']} kernels/step")
                lines.append(format_launches(row["launches"]))
    if result["e2e"]:
        lines.append(format_e2e(result["e2e"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("bench_ttt: needs a CUDA device", file=sys.stderr)
        return 2
    result = run_benchmark(args)
    print(format_report(result), flush=True)
    if args.out:
        write_json(result, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

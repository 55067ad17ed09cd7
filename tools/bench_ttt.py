"""Timing of train_gpt.py's per-document LoRA test-time-training (TTT) chunk step on one GPU, eager
and replayed as a CUDA graph.

    python3 tools/bench_ttt.py [--repo-root DIR] [--batches 64,32,8,1] [--contexts 32,512,2048]
                               [--steps 8] [--profile-steps 2] [--show-launches] [--out result.json]

What runs: the default model (Hyperparameters with every default: 35.9M parameters, 11 layers,
looping on as run() sets it for TTT, so 17 virtual layers), random weights (weights do not change
the timing; the banks that start at zero, O and MLP-down, are filled with small random values so
no matmul runs on zeros), eager and in eval mode, inside train_gpt.frozen(model), exactly as
run() calls eval_val_ttt(model, model, ...), after the project's own warm_up_ttt (which, with
TTT_CUDA_GRAPHS=1, also captures a graphed batch and checks that it scores like the eager one).
Tokens are synthetic (uniform random ids, BOS at each document start); the byte tables are
synthetic too. Nothing reads data or a tokenizer. Nothing here copies train_gpt's step: every
chunk step is train_gpt.ttt_chunk_step, run by a train_gpt.TTTRunner. The measurements below use
TTTRunner(graphs=False) and TTTRunner(graphs=True) whatever TTT_CUDA_GRAPHS says.

1. The chunk-step grid. For each batch size n (documents still active) and context length
   (the window of chunk ci: min((ci+1) * TTT_CHUNK_SIZE, TTT_EVAL_SEQ_LEN)): n synthetic
   documents long enough that chunk ci trains, loaded (TTTSlots.load) into a TTTSlots of
   ttt_slot_bucket(n) slots (the ones after the n documents empty, as in ttt_batch), and chunk ci
   at the padded context ttt_context_bucket (the context itself for the default grid), one
   optimizer step per call. Every step trains the adapters further, which changes no timing; the
   slots are loaded again before the graphed runs, so that both start from the same state, and
   the two first steps' nats are compared.
   (a) eager: TTTRunner(graphs=False).step: wall time per step synchronised after each (median
       over --steps) and unsynchronised (mean over --steps).
   (b) graphed (CUDA only; skipped with a note on CPU): TTTRunner(graphs=True).step: the first
       call captures the step's graph and replays it once (its wall time: "capture"); then the
       same two measurements over replays. Speedup = eager / graphed, unsynchronised.
   (c) the eager step's breakdown: model_fn wrapped and LoRAOptimizer.step(self, grads) patched
       (instrumented(), the same mechanism as the end-to-end split) to record CUDA events around
       the forward and the optimizer step; an unsynchronised run of --steps steps gives each
       region's median span on the GPU timeline (kernels plus the idle time while the GPU waited
       for the host):
           forward         model_fn(x, y, None, 0, adapters, at) under bf16 autocast with grad
                           on: the one forward that both scores the chunk and trains on it
           score+backward  the rest of the step: the chunk inputs (ttt_chunk_inputs), the
                           no_grad sums of nats, bytes and scored tokens, the per-document mean
                           loss and autograd.grad into the LoRA tensors
           optimizer       LoRAOptimizer.step(grads) (torch's fused AdamW over each slot's adapter parts)
       With --profile-steps > 0, that many more eager steps under torch.profiler, with
       record_function ranges opened in the wrapped model_fn and the patched step: GPU kernel
       time and launch count per region, a kernel belonging to the region of the CPU op that
       launched it (ops outside both ranges, among them the backward's, which run on autograd's
       own thread: score+backward; kernels no CPU op claims: unattributed). Host gap = eager wall
       (a) - kernel time. --show-launches prints each shape's launch tables.
   Model FLOPs per step (ttt_step_flops over the slots x padded context that run, the head over
   the chunk's positions only) over the graphed wall time (the eager one where there is no
   graph) give the achieved TFLOP/s.
2. End to end: train_gpt.ttt_batch itself, unmodified, over synthetic batches (default: two
   documents of 8,193 and 8,001 tokens, then 64 documents of mixed lengths), once eagerly
   (TTTRunner(graphs=False), with model_fn wrapped and LoRAOptimizer.step patched for the call
   to record CUDA events, so the chunks' time splits into forward, score+backward, optimizer and
   the time between chunks: slots moving to fewer documents, the next chunk's inputs; ms per
   chunk is given for chunks whose window is still growing and for chunks at the full window),
   and graphed (CUDA only): twice on one TTTRunner(graphs=True), the first call capturing each
   (slots, context, train) graph, the second, timed, only replaying (no split: one graph per
   chunk). Both report ms per chunk, scored tok/s and bpb; the relative difference of their nats
   should be ~0.

Pure helpers (argument parsing, shapes, FLOP count, region spans, kernel attribution, breakdown
arithmetic, tables) need no GPU; this module imports neither torch nor train_gpt at module level
(bench_train, whose helpers it shares, imports torch). tests/test_tools_bench_ttt.py checks them
on CPU, and runs the whole benchmark once on CPU with a tiny model (--allow-cpu; the graphed
parts skipped). train_gpt is imported from --repo-root (default: the parent of tools/) only when
the benchmark runs.
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
REGIONS = ("forward", "score+backward", "optimizer")
E2E_REGIONS = ("forward", "score+backward", "optimizer", "between chunks")
DEFAULT_BATCHES = (64, 32, 8, 1)
DEFAULT_CONTEXTS = (32, 512, 2048)
DEFAULT_LONG_DOCS = (8193, 8001)
CPU_GRAPH_NOTE = "skipped: CUDA graphs need a CUDA device"


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
    p.add_argument("--warmup", type=_non_negative, default=2,
                   help="untimed steps per shape and runner (default 2; the first step always runs untimed)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per shape and measurement (default 8)")
    p.add_argument("--profile-steps", type=_non_negative, default=2, help="profiled steps per shape (default 2; 0: none)")
    p.add_argument("--top", type=int, default=25, help="rows kept per launch table (default 25)")
    p.add_argument("--show-launches", action="store_true", help="print the launch tables of every shape (eager step)")
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
                   layers: int, lora_dims: dict[str, tuple[int, int, int]], rank: int,
                   head_positions: int | None = None) -> dict:
    """Model FLOPs of one training chunk step over n rows of `context` tokens (every position runs
    the layers forward and backward; the dense causal mask of a row), of which head_positions per
    row (default: all; the TTT step passes its chunk's positions) go through the head.

    Frozen matmuls per token: per virtual layer Q and O (q_dim x d), K and V (kv_dim x d), MLP up
    and down (hidden x d); per head position the tied head (vocab x d): 2 FLOPs per weight forward,
    2 backward (input gradients only: the base weights are frozen). LoRA: a delta B(Ax) costs
    rank*(in+out) weights per slot, 2 FLOPs each forward and 4 backward (input and weight
    gradients); the "head" adapter runs at the head positions, the others at every token.
    lora_dims: name -> (slots, in, out), as train_gpt.lora_shapes. Attention per token and layer,
    forward: 2 * q_dim * context (QK^T and PV over the causal half of context keys on average),
    backward twice that. Not counted: norms, RoPE, XSA, softcap, loss, optimizer."""
    head_positions = context if head_positions is None else head_positions
    per_layer = 2 * q_dim * d_model + 2 * kv_dim * d_model + 2 * hidden * d_model
    body, head = layers * per_layer, vocab * d_model
    lora = {name: slots * rank * (d_in + d_out) for name, (slots, d_in, d_out) in lora_dims.items()}
    lora_head = lora.get("head", 0)
    lora_body = sum(lora.values()) - lora_head
    attn_fwd = 2 * q_dim * context * layers
    tokens, heads = n * context, n * head_positions
    fwd = tokens * (2 * body + 2 * lora_body + attn_fwd) + heads * (2 * head + 2 * lora_head)
    bwd = tokens * (2 * body + 4 * lora_body + 2 * attn_fwd) + heads * (2 * head + 4 * lora_head)
    return {"tokens": tokens, "head_positions": heads, "base_params": body + head,
            "lora_params_per_doc": lora_body + lora_head, "forward": fwd, "backward": bwd, "total": fwd + bwd}


# =============================================================================================
#                                   BREAKDOWN ARITHMETIC (pure)
# =============================================================================================


_MARK_REGIONS = {"fwd": "forward", "opt": "optimizer", "step": "step"}


def region_spans(marks, regions=REGIONS) -> dict:
    """Median span per region (ms) from the marks of timed steps, [(kind, ms)] on one clock: each
    step runs from 'step_start' to 'step_end' and holds forwards (fwd_start, fwd_end) and
    optimizer steps (opt_start, opt_end); forward and optimizer are the sums of those spans within
    a step, score+backward the rest of the step (never below 0)."""
    steps, current, opened = [], None, {}
    for kind, t in marks:
        what, _, edge = kind.rpartition("_")
        name = _MARK_REGIONS.get(what)
        if name is None or edge not in ("start", "end"):
            raise ValueError(f"unknown mark {kind!r}")
        if edge == "start":
            if name == "step":
                current = dict.fromkeys(("forward", "optimizer", "step"), 0.0)
                steps.append(current)
            elif current is None:
                raise ValueError(f"mark {kind!r} before the first step_start")
            opened[name] = t
        else:
            if name not in opened:
                raise ValueError(f"mark {kind!r} without its start")
            current[name] += t - opened.pop(name)
    if opened:
        raise ValueError(f"marks {sorted(opened)} started and never ended")
    rows = [{"forward": s["forward"], "optimizer": s["optimizer"],
             "score+backward": max(s["step"] - s["forward"] - s["optimizer"], 0.0)} for s in steps]
    return {r: statistics.median(row.get(r, 0.0) for row in rows) if rows else 0.0 for r in regions}


def kernels_by_region(records, steps: int, device_us: float | None = None, device_count: int | None = None,
                      regions=REGIONS) -> tuple[dict, dict]:
    """Kernel time (ms) and launches per step and region from launch records (region, outer op,
    inner op, kernel, us) of `steps` profiled steps. device_us / device_count: every kernel the
    profiler saw (time and count, all steps); what no CPU op claims goes to 'unattributed'.
    Returns (ms, counts), counts rounded to whole launches."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    us, count = dict.fromkeys(regions, 0.0), dict.fromkeys(regions, 0)
    for rec in records:
        us[rec[0]] = us.get(rec[0], 0.0) + rec[4]
        count[rec[0]] = count.get(rec[0], 0) + 1
    if device_count is not None and device_count > sum(count.values()):
        us["unattributed"] = max((device_us or 0.0) - sum(us.values()), 0.0)
        count["unattributed"] = device_count - sum(count.values())
    return ({r: v / 1000 / steps for r, v in us.items()}, {r: round(v / steps) for r, v in count.items()})


def step_breakdown(wall_ms: float, spans_ms: dict, kernel_ms: dict, kernels: dict | None = None,
                   regions=REGIONS) -> dict:
    """One shape's numbers: per region the GPU-timeline span (events, unsynchronised run), the
    kernel time inside it (profiler), the gap (span - kernels, at least 0) and the kernel count;
    totals: wall, summed spans, summed kernel time (regions and unattributed), host gap = wall -
    kernel time (at least 0) and its share of the wall."""
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


def chunk_split(marks, contexts: list[tuple[int, int]], window: int) -> dict:
    """Per-chunk region times of one ttt_batch from its marks [(kind, ms)] (fwd_start, fwd_end and,
    on chunks that train, opt_start, opt_end; TTT_GRAD_STEPS=1, one forward per chunk): chunk k runs from its forward's start to the next
    chunk's forward start (the last one to the last mark). contexts: (documents, window) of each
    chunk, as chunk_contexts gives them, to sort the chunks into growing and full windows."""
    chunks, current = [], None
    for kind, t in marks:
        if kind == "fwd_start":
            if current is not None:
                current["next"] = t
            current = {"fwd_start": t}
            chunks.append(current)
        elif current is None:
            raise ValueError(f"mark {kind!r} before the first forward")
        else:
            current[kind] = t
    if chunks:
        chunks[-1]["next"] = marks[-1][1]
    totals = dict.fromkeys(E2E_REGIONS, 0.0)
    per_chunk = []
    for c in chunks:
        fwd = c["fwd_end"] - c["fwd_start"]
        if "opt_start" in c:
            mid, opt, rest = c["opt_start"] - c["fwd_end"], c["opt_end"] - c["opt_start"], c["next"] - c["opt_end"]
        else:  # the last chunk of the batch: scored, not trained
            mid, opt, rest = c["next"] - c["fwd_end"], 0.0, 0.0
        for r, v in zip(E2E_REGIONS, (fwd, mid, opt, rest)):
            totals[r] += v
        per_chunk.append(c["next"] - c["fwd_start"])
    by_window = {"growing": [], "full": []}
    for (_, ctx), ms in zip(contexts, per_chunk):
        by_window["full" if ctx >= window else "growing"].append(ms)
    k = max(len(chunks), 1)
    return {"region_ms_per_chunk": {r: v / k for r, v in totals.items()}, "chunk_ms": per_chunk,
            "by_window": {key: {"chunks": len(v), "ms_per_chunk": sum(v) / len(v) if v else 0.0}
                          for key, v in by_window.items()}}


def speedup(eager_ms: float | None, graphed_ms: float | None) -> float | None:
    """eager / graphed, None when either is missing or not positive."""
    if not eager_ms or not graphed_ms or eager_ms <= 0 or graphed_ms <= 0:
        return None
    return eager_ms / graphed_ms


def rel_diff(value: float, reference: float) -> float:
    """|value - reference| / |reference| (0 when both are 0, inf when only the reference is)."""
    if value == reference:
        return 0.0
    return abs(value - reference) / abs(reference) if reference else math.inf


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
    """The chunk-step table: one line per (n, context); each region of the eager step as span
    (kernels) in ms."""
    head = (f"{'n':>3s} {'slots':>5s} {'ctx':>5s} {'tokens':>7s} | {'eager':>8s} {'sync':>8s} | {'graphed':>8s} "
            f"{'sync':>8s} {'capture':>8s} | {'speedup':>7s} | " + " | ".join(f"{r:>17s}" for r in REGIONS)
            + f" | {'kernels':>8s} {'launches':>8s} {'host gap':>15s} {'TFLOP/s':>7s} {'peak':>8s}")
    lines = ["TTT chunk step (train_gpt.ttt_chunk_step through TTTRunner), ms per step. eager, graphed: "
             "unsynchronised mean; sync: median, synchronised after each step; capture: the first graphed call "
             "(capture and one replay); speedup = eager / graphed",
             "per region of the eager step: GPU-timeline span (kernel time); kernels, launches: the eager step "
             "(profiler); host gap = eager - kernels; TFLOP/s on the graphed time (* on the eager time)",
             head, "-" * len(head)]
    notes = []
    for row in rows:
        if row.get("error"):
            lines.append(f"{row['n']:3d} {'':5s} {row['context']:5d} {row['n'] * row['context']:7d}   {row['error']}")
            continue
        bd, eager, graphed = row["breakdown"], row["eager"], row.get("graphed") or {}
        if row.get("graphed_note") and row["graphed_note"] not in notes:
            notes.append(row["graphed_note"])
        cells = [f"{_f(g['span_ms'], '8.2f')} ({_f(g['kernel_ms'], '6.2f')})" for g in bd["regions"]]
        gap = f"{bd['host_gap_ms']:7.2f} ({100 * bd['host_gap_fraction']:4.1f}%)"
        ratio = row.get("speedup")
        tflops = _f(row.get("tflops"), "6.1f") + ("*" if row.get("tflops_on") == "eager" else " ")
        peak = row.get("peak_gib")
        lines.append(f"{row['n']:3d} {row['slots']:5d} {row['context']:5d} {row['tokens']:7d} | "
                     f"{eager['wall_ms']:8.2f} {_f(eager.get('sync_ms_median'), '8.2f')} | "
                     f"{_f(graphed.get('wall_ms'), '8.2f')} {_f(graphed.get('sync_ms_median'), '8.2f')} "
                     f"{_f(graphed.get('capture_ms'), '8.1f')} | "
                     f"{(_f(ratio, '6.2f') + 'x') if ratio is not None else '-':>7s} | "
                     + " | ".join(f"{c:>17s}" for c in cells)
                     + f" | {bd['kernel_ms']:8.2f} {bd['kernels']:8d} {gap:>15s} {tflops:>7s} "
                     f"{_f(peak, '5.1f') + 'GiB' if peak is not None else '-':>8s}")
    lines += [f"graphed: {note}" for note in notes]
    return "\n".join(lines)


def format_e2e(rows: list[dict]) -> str:
    lines = ["End to end: train_gpt.ttt_batch over synthetic documents. eager: TTTRunner(graphs=False), CUDA events "
             "around model_fn and LoRAOptimizer.step; graphed: TTTRunner(graphs=True), the second call (the first "
             "captures)"]
    for row in rows:
        if row.get("error"):
            lines.append(f"  {row['name']}: {row['error']}")
            continue
        e = row["eager"]
        lines.append(f"  {row['name']}: {row['docs']} docs, longest {row['longest']}, {row['chunks']} chunks, "
                     f"{row['scored_tokens']:,.0f} scored tokens")
        lines.append(f"    eager:   {e['wall_s']:.2f} s, {e['ms_per_chunk']:.2f} ms/chunk, "
                     f"{e['tokens_per_s']:,.0f} scored tok/s, bpb {e['bpb']:.6f}")
        split = ", ".join(f"{r} {e['region_ms_per_chunk'][r]:.2f}" for r in E2E_REGIONS)
        lines.append(f"      per chunk (GPU timeline, ms): {split}")
        for key, label in (("growing", "window still growing"), ("full", "full window")):
            g = e["by_window"].get(key)
            if g and g["chunks"]:
                lines.append(f"      {label}: {g['chunks']} chunks, {g['ms_per_chunk']:.2f} ms/chunk")
        g = row.get("graphed")
        if not g:
            lines.append(f"    graphed: {row.get('graphed_note') or 'not run'}")
            continue
        ratio = row.get("speedup")
        lines.append(f"    graphed: {g['wall_s']:.2f} s (first call, with capture: {g['first_call_s']:.2f} s, "
                     f"{g['graphs']} graphs), {g['ms_per_chunk']:.2f} ms/chunk, {g['tokens_per_s']:,.0f} scored tok/s, "
                     f"bpb {g['bpb']:.6f}" + (f"; speedup {ratio:.2f}x" if ratio is not None else ""))
        lines.append(f"      nats vs eager: relative difference {g['nats_rel_diff']:.2e} "
                     f"(first call {g['first_call_nats_rel_diff']:.2e}); bytes and tokens "
                     f"{'equal' if g['counts_equal'] else 'DIFFER'}")
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


class Stamps:
    """(kind, timestamp) marks: CUDA events on a GPU (read after a synchronisation), the host clock
    on CPU (smoke tests). Called as stamps(kind); times_ms() gives [(kind, ms since the first)]."""

    def __init__(self, device):
        import torch
        self.torch, self.cuda, self.marks = torch, device.type == "cuda", []

    def __call__(self, kind: str):
        if self.cuda:
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((kind, ev))
        else:
            self.marks.append((kind, time.perf_counter()))

    def times_ms(self) -> list[tuple[str, float]]:
        if not self.marks:
            return []
        t0 = self.marks[0][1]
        if self.cuda:
            self.torch.cuda.synchronize()
            return [(k, t0.elapsed_time(ev)) for k, ev in self.marks]
        return [(k, 1000 * (t - t0)) for k, t in self.marks]


@contextlib.contextmanager
def instrumented(tg, model, device, ranges: bool = False):
    """model_fn recording fwd_start / fwd_end stamps around each forward, and
    train_gpt.LoRAOptimizer.step(self, grads) patched (for the duration) to record opt_start /
    opt_end around the step; with ranges, each also opens a record_function range
    (bench_ttt::forward, bench_ttt::optimizer) for the profiler. Yields (model_fn, stamps)."""
    from torch.profiler import record_function
    stamps = Stamps(device)

    def region(name):
        return record_function(f"bench_ttt::{name}") if ranges else contextlib.nullcontext()

    def model_fn(*a, **k):
        with region("forward"):
            stamps("fwd_start")
            out = model(*a, **k)
            stamps("fwd_end")
        return out

    original = tg.LoRAOptimizer.step

    def step(self, grads):
        with region("optimizer"):
            stamps("opt_start")
            original(self, grads)
            stamps("opt_end")

    tg.LoRAOptimizer.step = step
    try:
        yield model_fn, stamps
    finally:
        tg.LoRAOptimizer.step = original


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step, steps: int, device) -> tuple[list[float], float]:
    """(ms of each of `steps` calls, synchronised after each; mean ms over `steps` more calls without
    synchronisation, one at the end)."""
    _sync(device)
    synced = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        _sync(device)
        synced.append(1000 * (time.perf_counter() - t))
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return synced, 1000 * (time.perf_counter() - t) / steps


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
    tg.ttt_model_fn(model, h)  # TTT_COMPILE (default 1, CUDA): each kind of block compiled once, as run() does
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
    instrumented(ranges=True) steps: region from the enclosing bench_ttt:: range (forward or
    optimizer), else score+backward (the chunk inputs and sums on the main thread, and the
    backward, whose ops run on autograd's own thread); outer op the outermost ancestor below that
    range (autograd nodes without their 'autograd::engine::evaluate_function: ' prefix)."""
    out = []
    for ev, kernels in launching_ops(events):
        chain, region, e = [], "score+backward", ev
        while e is not None:
            if e.name.startswith("bench_ttt::"):
                region = e.name.split("::", 1)[1]
                break
            chain.append(e.name)
            e = e.cpu_parent
        outer = chain[-1].replace("autograd::engine::evaluate_function: ", "")
        for k in kernels:
            out.append((region, outer, ev.name, k.name, float(k.duration)))
    return out


def _profile_eager(tg, model, device, step, steps: int, top: int, log=print) -> dict:
    """`steps` eager steps (step(model_fn)) under torch.profiler with the region ranges: kernel ms
    and launches per region, the launch tables, the profiled wall time."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with instrumented(tg, model, device, ranges=True) as (model_fn, _), profile(activities=acts) as prof:
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            step(model_fn)
        _sync(device)
        wall = 1000 * (time.perf_counter() - t) / steps
    events = prof.events()
    ranges = [ev for ev in events if ev.name.startswith("bench_ttt::")
              and ev.device_type == torch.autograd.DeviceType.CPU]
    if len(ranges) != 2 * steps:
        log(f"  warning: {len(ranges)} region ranges in the profile, expected {2 * steps} (forward, optimizer)")
    kernels = [ev for ev in events if _is_kernel(ev)]
    records = _launch_records(events)
    kernel_ms, counts = kernels_by_region(records, steps, sum(ev.time_range.end - ev.time_range.start for ev in kernels),
                                          len(kernels))
    return {"kernel_ms": kernel_ms, "counts": counts, "wall_ms": wall,
            "launches": group_launches(records, steps, top=top)}


def bench_shape(tg, h, model, luts, device, n: int, context: int, args, log=print) -> dict:
    """Eager, graphed and the eager breakdown of chunk ci's step for n documents (see the module
    docstring)."""
    import torch
    chunk, window = h.ttt_chunk_size, h.ttt_eval_seq_len
    ci = chunk_index_for_context(context, chunk, window)
    run_context = tg.ttt_context_bucket(min((ci + 1) * chunk, window), chunk, window)
    size = tg.ttt_slot_bucket(n)  # a graphed step's slots for n documents
    tokens, docs = synthetic_stream([training_doc_length(ci, chunk)] * n, h.vocab_size, tg.BOS_ID,
                                    args.seed + n * 100003 + context)
    tokens = tokens.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    slots = tg.TTTSlots(model, h, size, device)
    slots.load(docs, chunk)
    starts, pred_lens, chunks = slots.docs  # the shape the step runs, from train_gpt's own inputs
    x, _, at, scored = tg.ttt_chunk_inputs(tokens, starts, pred_lens, ci, chunk, window, run_context)
    if tuple(x.shape) != (size, run_context) or tuple(at.shape) != (size, chunk):
        raise RuntimeError(f"chunk inputs {tuple(x.shape)} / {tuple(at.shape)}, expected {(size, run_context)} / "
                           f"{(size, chunk)}")
    scored_per_step = int(scored.sum().item())
    if int((chunks > ci + 1).sum().item()) != n:
        raise RuntimeError(f"chunk {ci} does not train all {n} documents")
    del x, at, scored

    def runner(graphs: bool):
        r = tg.TTTRunner(model, h, device, graphs=graphs, eager_from=math.inf)  # graphs at every shape
        r.ci.fill_(ci)
        return r

    # (a) eager
    eager = runner(False)

    def eager_step(model_fn=model):
        eager.step(model_fn, tokens, slots, run_context, luts, True)

    eager_step()  # the first step from the loaded state: its score is compared with the graphed one's
    first_eager = eager.sums.clone()
    for _ in range(max(args.warmup - 1, 0)):
        eager_step()
    e_sync, e_wall = _time_steps(eager_step, args.steps, device)
    # (c) breakdown: event spans, then (optionally) the profiler's kernels
    with instrumented(tg, model, device) as (model_fn, stamps):
        _sync(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            stamps("step_start")
            eager_step(model_fn)
            stamps("step_end")
        _sync(device)
        instrumented_wall = 1000 * (time.perf_counter() - t) / args.steps
        spans = region_spans(stamps.times_ms())
    prof = _profile_eager(tg, model, device, eager_step, args.profile_steps, args.top, log) if args.profile_steps else {}
    bd = step_breakdown(e_wall, spans, prof.get("kernel_ms", {}), prof.get("counts", {}))
    # (b) graphed, from the same loaded state
    graphed, note, first_diff = None, None, None
    if device.type == "cuda":
        slots.load(docs, chunk)
        g_runner = runner(True)
        if not g_runner.graphs_on:
            raise RuntimeError("TTTRunner(graphs=True) did not turn graphs on")

        def graphed_step():
            g_runner.step(model, tokens, slots, run_context, luts, True)

        _sync(device)
        t = time.perf_counter()
        graphed_step()  # captures, then replays once
        _sync(device)
        capture = 1000 * (time.perf_counter() - t)
        first = g_runner.sums.tolist()
        reference = first_eager.tolist()
        first_diff = rel_diff(first[0], reference[0])
        if first[1:] != reference[1:]:
            log(f"  warning: graphed first step counted {first[1:]} (bytes, tokens), eager {reference[1:]}")
        for _ in range(max(args.warmup - 1, 0)):
            graphed_step()
        g_sync, g_wall = _time_steps(graphed_step, args.steps, device)
        graphed = {"capture_ms": capture, "sync_ms": g_sync, "sync_ms_median": statistics.median(g_sync),
                   "wall_ms": g_wall, "graphs": len(g_runner.graphs)}
        del g_runner
    else:
        note = f"{CPU_GRAPH_NOTE}, this is {device.type}"
    dims = model_dims(model)
    flops = ttt_step_flops(size, run_context, dims["d_model"], dims["q_dim"], dims["kv_dim"], dims["hidden"],
                           dims["vocab"], dims["layers"], tg.lora_shapes(model, h), h.ttt_lora_rank, head_positions=chunk)
    tflops_eager = flops["total"] / (e_wall / 1000) / 1e12
    tflops_graphed = flops["total"] / (graphed["wall_ms"] / 1000) / 1e12 if graphed else None
    best = graphed["wall_ms"] if graphed else e_wall
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row = {"n": n, "slots": size, "context": context, "padded_context": run_context, "chunk_index": ci,
           "tokens": n * context, "scored_per_step": scored_per_step,
           "eager": {"sync_ms": e_sync, "sync_ms_median": statistics.median(e_sync), "wall_ms": e_wall},
           "graphed": graphed, "graphed_note": note, "speedup": speedup(e_wall, graphed and graphed["wall_ms"]),
           "first_step_nats_rel_diff": first_diff, "breakdown": bd, "instrumented_wall_ms": instrumented_wall,
           "profiled_wall_ms": prof.get("wall_ms"), "launches": prof.get("launches"), "flops": flops,
           "tflops": tflops_graphed if graphed else tflops_eager, "tflops_on": "graphed" if graphed else "eager",
           "tflops_eager": tflops_eager, "tflops_graphed": tflops_graphed,
           "tokens_per_s": n * context / (best / 1000), "scored_tokens_per_s": scored_per_step / (best / 1000),
           "peak_gib": peak}
    log(f"  n={n:3d} ({size} slots) ctx={context:5d}: eager {e_wall:8.2f} ms (sync median "
        f"{row['eager']['sync_ms_median']:.2f}), "
        + (f"graphed {graphed['wall_ms']:.2f} ms (sync median {graphed['sync_ms_median']:.2f}, capture "
           f"{graphed['capture_ms']:.0f} ms), speedup {row['speedup']:.2f}x, first-step nats rel diff {first_diff:.1e}, "
           if graphed else f"graphed {note}, ")
        + f"kernels {bd['kernel_ms']:.2f} ms in {bd['kernels']} launches"
        + (f", peak {peak:.1f} GiB" if peak is not None else ""))
    return row


def bench_e2e(tg, h, model, luts, device, name: str, lengths, seed: int, log=print) -> dict:
    """ttt_batch over one synthetic batch: eager (instrumented) and graphed (second call timed)."""
    import torch
    lengths = sorted(lengths, reverse=True)
    tokens, docs = synthetic_stream(lengths, h.vocab_size, tg.BOS_ID, seed)
    tokens = tokens.to(device)
    contexts = chunk_contexts(lengths, h.ttt_chunk_size, h.ttt_eval_seq_len)
    chunks = max(len(contexts), 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with instrumented(tg, model, device) as (model_fn, stamps):
        _sync(device)
        t0 = time.perf_counter()
        nats, nbytes, count = tg.ttt_batch(model_fn, model, tokens, docs, h, luts,
                                           runner=tg.TTTRunner(model, h, device, graphs=False))
        _sync(device)
        wall = time.perf_counter() - t0
        split = chunk_split(stamps.times_ms(), contexts, h.ttt_eval_seq_len)
    del split["chunk_ms"]
    eager = {"wall_s": wall, "ms_per_chunk": 1000 * wall / chunks, "tokens_per_s": count / wall, "nats": nats,
             "bytes": nbytes, "bpb": tg.bits_per_byte(nats, nbytes), **split}
    row = {"name": name, "docs": len(lengths), "longest": lengths[0], "lengths": lengths, "chunks": len(contexts),
           "scored_tokens": count, "eager": eager, "graphed": None, "graphed_note": None, "speedup": None}
    if device.type == "cuda":
        runner = tg.TTTRunner(model, h, device, graphs=True)
        t0 = time.perf_counter()
        first = tg.ttt_batch(model, model, tokens, docs, h, luts, runner=runner)  # captures every shape
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = tg.ttt_batch(model, model, tokens, docs, h, luts, runner=runner)  # replays only
        g_wall = time.perf_counter() - t0
        row["graphed"] = {"first_call_s": first_s, "wall_s": g_wall, "ms_per_chunk": 1000 * g_wall / chunks,
                          "tokens_per_s": result[2] / g_wall, "nats": result[0], "bytes": result[1],
                          "bpb": tg.bits_per_byte(result[0], result[1]), "graphs": len(runner.graphs),
                          "nats_rel_diff": rel_diff(result[0], nats), "first_call_nats_rel_diff": rel_diff(first[0], nats),
                          "counts_equal": tuple(result[1:]) == (nbytes, count) and tuple(first[1:]) == (nbytes, count)}
        row["speedup"] = speedup(wall, g_wall)
        del runner
    else:
        row["graphed_note"] = f"{CPU_GRAPH_NOTE}, this is {device.type}"
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    g = row["graphed"]
    log(f"  {name}: {row['chunks']} chunks, eager {wall:.2f} s ({eager['ms_per_chunk']:.2f} ms/chunk, bpb "
        f"{eager['bpb']:.6f}), "
        + (f"graphed {g['wall_s']:.2f} s ({g['ms_per_chunk']:.2f} ms/chunk, bpb {g['bpb']:.6f}, first call "
           f"{g['first_call_s']:.2f} s), nats rel diff {g['nats_rel_diff']:.1e}" if g else f"graphed {row['graphed_note']}"))
    return row


def run_benchmark(args, log=print) -> dict:
    import torch
    tg, h, device, backend, model, luts = build(args, log)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "attn_backend": backend, "train_gpt": tg.__file__,
              "dims": model_dims(model), "lora_shapes": {k: list(v) for k, v in tg.lora_shapes(model, h).items()},
              "ttt": {"rank": h.ttt_lora_rank, "chunk": h.ttt_chunk_size, "window": h.ttt_eval_seq_len,
                      "batch_size": h.ttt_batch_size, "grad_steps": h.ttt_grad_steps, "optimizer": h.ttt_optimizer,
                      "cuda_graphs": h.ttt_cuda_graphs},
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
                try:
                    result["e2e"].append(bench_e2e(tg, h, model, luts, device, name, lengths, args.seed + 7, log))
                except torch.OutOfMemoryError as e:
                    result["e2e"].append({"name": name, "error": f"out of memory: {str(e).splitlines()[0]}"})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
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
                lines.append(f"  n={row['n']} ctx={row['context']}: {row['breakdown']['kernels']} kernels/step (eager)")
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

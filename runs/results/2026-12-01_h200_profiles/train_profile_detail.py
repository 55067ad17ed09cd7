"""bench_train.py (the snapshot's, unmodified) with a finer per-component GPU breakdown.

    python3 .carry/train_profile_detail.py --data-dir /root/data --profile --out OUT.json [bench_train args]

Runs exactly bench_train.run_benchmark / format_report / write_json (so its console report and
JSON are the same as `python3 tests/gpu/bench_train.py ...`), except that profile_phase is replaced
by a copy that also records operator input shapes (record_shapes=True) and adds
bd["detail"]: every kernel's time split by
  - direction: forward / backward (an ancestor CPU op named *Backward* or autograd::engine*), or
    the optimizer scopes of bench_train (Newton-Schulz, Muon other, AdamW, clip, EMA);
  - component: attention (by kernel name), fused MLP (Triton), cuBLAS gemms by the shape of the
    aten op that launched them (a dim == vocab: tied head; a dim == MLP hidden: MLP down-proj and
    MLP weight/input grads; otherwise Q/K/V/O projections), Inductor kernels by the aten ops in
    their names (log_softmax/nll/tanh: softcap + cross-entropy; cat/slice: RoPE, usually fused
    with QK-norm; rms_norm/rsqrt: RMSNorm; embedding), the rest.
Then prints a summary table with host gaps = unprofiled ms/step - GPU busy ms/step.
Written for the 2026-12-01 H200 profile (runs/results/2026-12-01_h200_profiles/).
"""
import collections
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "snap", "tests", "gpu"))
import bench_train as bt  # noqa: E402
import torch  # noqa: E402

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
            "aten::_scaled_mm", "aten::addmm_")


def direction(ev) -> str:
    e = ev
    while e is not None:
        n = e.name
        if "Backward" in n or n.startswith("autograd::engine"):
            return "bwd"
        e = e.cpu_parent
    return "fwd"


def gemm_shape_dims(ev):
    e = ev
    while e is not None:
        if e.name in GEMM_OPS and getattr(e, "input_shapes", None):
            dims = set()
            for s in e.input_shapes:
                if isinstance(s, (list, tuple)):
                    dims.update(int(d) for d in s if isinstance(d, int))
            return e.name, dims, [list(s) for s in e.input_shapes if isinstance(s, (list, tuple))]
        e = e.cpu_parent
    return None, set(), None


def detail_component(name, base, dims, model_dims):
    low = name.lower()
    if base == bt.ATTENTION:
        return "attention"
    if base == bt.FUSED_MLP:
        return "MLP up+act fused (Triton)"
    if base == bt.MATMULS:
        if not dims:
            return "gemm (shape unknown)"
        if model_dims["vocab"] in dims:
            return "head matmul (tied emb)"
        if model_dims["hidden"] in dims:
            return "MLP down/grad gemms (cuBLAS)"
        return "Q/K/V/O projection gemms"
    if base == bt.ELEMENTWISE:
        if any(m in low for m in ("log_softmax", "nll_loss", "cross_entropy", "tanh")):
            return "softcap + cross-entropy"
        if "cat" in low or "slice" in low:
            return "RoPE (+fused QK-norm etc.)"
        if any(m in low for m in ("rms_norm", "rsqrt")):
            return "RMSNorm (+fused)"
        if "embedding" in low:
            return "embedding"
        return "other elementwise"
    return base


def detail_breakdown(events, steps, model_dims):
    device_us = collections.defaultdict(float)
    device_n = collections.defaultdict(int)
    for ev in events:
        if bt._is_device_event(ev):
            device_us[ev.name] += ev.time_range.end - ev.time_range.start
            device_n[ev.name] += 1
    claims = collections.defaultdict(list)
    for ev in events:
        if getattr(ev, "device_type", None) != torch.autograd.DeviceType.CPU or getattr(ev, "is_async", False):
            continue
        kernels = getattr(ev, "kernels", None)
        if not kernels:
            continue
        scope = bt.enclosing_scope(ev)
        d = direction(ev)
        op, dims, shapes = gemm_shape_dims(ev)
        for k in kernels:
            if k.name in device_us:
                claims[k.name].append((scope, d, frozenset(dims), op, float(k.duration)))
    table = collections.defaultdict(float)  # (component, direction) -> us
    counts = collections.defaultdict(int)
    per_kernel = collections.defaultdict(float)
    gemm_shapes = collections.defaultdict(float)
    for name, total in device_us.items():
        mine = claims.get(name, [])
        claimed = sum(c[-1] for c in mine)
        scale = total / claimed if claimed > total else 1.0
        base_none = bt.classify_kernel(name, None)
        for scope, d, dims, op, us in mine:
            us *= scale
            if scope in bt.SCOPES:
                comp, d = bt.SCOPES[scope], "opt"
            else:
                comp = detail_component(name, base_none, dims, model_dims)
                if comp == "attention":
                    d = "bwd" if "bwd" in name.lower() else ("fwd" if "fwd" in name.lower() else d)
            table[(comp, d)] += us
            counts[(comp, d)] += 1
            per_kernel[(name, comp, d)] += us
            if base_none == bt.MATMULS and scope not in bt.SCOPES:
                gemm_shapes[(op, tuple(sorted(dims)), d)] += us
        rest = total - claimed
        if rest > 1e-9 * total or device_n[name] > len(mine):
            comp = detail_component(name, base_none, set(), model_dims) + " [unlinked]"
            table[(comp, "?")] += max(rest, 0.0)
            counts[(comp, "?")] += max(device_n[name] - len(mine), 0)
            per_kernel[(name, comp, "?")] += max(rest, 0.0)
    rows = collections.defaultdict(lambda: {"fwd": 0.0, "bwd": 0.0, "opt": 0.0, "?": 0.0, "kernels": 0})
    for (comp, d), us in table.items():
        rows[comp][d] += us / 1000 / steps
        rows[comp]["kernels"] += counts[(comp, d)] / steps
    out_rows = []
    for comp, r in rows.items():
        total = r["fwd"] + r["bwd"] + r["opt"] + r["?"]
        out_rows.append({"component": comp, "fwd_ms": r["fwd"], "bwd_ms": r["bwd"], "opt_ms": r["opt"],
                         "unlinked_ms": r["?"], "total_ms": total, "kernels_per_step": r["kernels"]})
    out_rows.sort(key=lambda r: -r["total_ms"])
    kernels = [{"name": n, "component": c, "dir": d, "ms_per_step": us / 1000 / steps}
               for (n, c, d), us in sorted(per_kernel.items(), key=lambda kv: -kv[1])]
    shapes = [{"op": op, "dims": list(dims), "dir": d, "ms_per_step": us / 1000 / steps}
              for (op, dims, d), us in sorted(gemm_shapes.items(), key=lambda kv: -kv[1])]
    return {"rows": out_rows, "kernels": kernels[:150], "gemm_shapes": shapes[:40],
            "total_ms": sum(r["total_ms"] for r in out_rows)}


def format_detail(det) -> str:
    lines = [f"    {'component':40s} {'fwd':>8s} {'bwd':>8s} {'optim':>8s} {'unlinked':>8s} {'total':>8s} {'kern/step':>9s}"]
    for r in det["rows"]:
        lines.append(f"    {r['component']:40s} {r['fwd_ms']:8.2f} {r['bwd_ms']:8.2f} {r['opt_ms']:8.2f} "
                     f"{r['unlinked_ms']:8.2f} {r['total_ms']:8.2f} {r['kernels_per_step']:9.0f}")
    lines.append(f"    {'sum':40s} {'':8s} {'':8s} {'':8s} {'':8s} {det['total_ms']:8.2f}")
    lines.append("    gemm time by launching op and its dims (excl. optimizer):")
    for s in det["gemm_shapes"][:14]:
        lines.append(f"      {s['ms_per_step']:8.2f} ms  {s['dir']}  {s['op']} {s['dims']}")
    lines.append("    largest kernels (detailed class):")
    for k in det["kernels"][:30]:
        n = k["name"] if len(k["name"]) <= 100 else k["name"][:97] + "..."
        lines.append(f"      {k['ms_per_step']:8.2f} ms  [{k['component']} / {k['dir']}] {n}")
    return "\n".join(lines)


_MODEL_DIMS = {}


def profile_phase(trainer, device, looping, steps, step0, frac, trace_path=""):
    """bench_train.profile_phase with record_shapes=True and the detailed breakdown added."""
    from torch.profiler import ProfilerActivity, profile, schedule
    trainer.model.looping = looping
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step = step0
    with bt.labelled_ranges(trainer):
        with profile(activities=activities, record_shapes=True,
                     schedule=schedule(wait=0, warmup=1, active=steps, repeat=1)) as prof:
            trainer.step(step, frac)
            step += 1
            prof.step()
            bt._sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.step(step, frac)
                step += 1
                prof.step()
            bt._sync(device)
            wall = time.perf_counter() - t0
    t_post = time.perf_counter()
    events = prof.events()
    bd = bt.breakdown(bt.kernel_records(events), steps, wall_ms_per_step=1000 * wall / steps,
                      busy_ms_per_step=bt.busy_us(bt.device_intervals(events)) / 1000 / steps)
    try:
        if not _MODEL_DIMS:
            _MODEL_DIMS.update(bt.model_dims(trainer.model))
        bd["detail"] = detail_breakdown(events, steps, _MODEL_DIMS)
    except Exception:
        bd["detail_error"] = traceback.format_exc()
        print(bd["detail_error"], flush=True)
    bd["postprocess_s"] = time.perf_counter() - t_post
    bd["next_step"] = step
    return bd


def summary(result) -> str:
    lines = ["", "=== SUMMARY (train_profile_detail) ===",
             f"compile + warmup {result['compile_warmup_s']:.1f} s, setup {result['setup_s']:.1f} s"]
    for name, _ in bt.PHASES:
        ph = result["phases"][name]
        prof = result.get("profile", {}).get(name)
        line = (f"[{name}] {ph['ms_per_step']:.1f} ms/step, {ph['tokens_per_s']:,.0f} tok/s, MFU {100 * ph['mfu']:.1f}%"
                f", peak {ph['peak_memory_mib']:,.0f} MiB")
        if prof:
            busy = prof.get("busy_ms_per_step") or 0.0
            line += (f"; GPU kernels {prof['kernel_ms_per_step']:.1f} ms/step, busy {busy:.1f}; host gap vs "
                     f"unprofiled step {ph['ms_per_step'] - busy:.1f} ms ({100 * (ph['ms_per_step'] - busy) / ph['ms_per_step']:.1f}%)")
        lines.append(line)
        if prof and "detail" in prof:
            lines.append(format_detail(prof["detail"]))
    return "\n".join(lines)


def main(argv=None):
    args = bt.parse_args(argv)
    bt.profile_phase = profile_phase
    result = bt.run_benchmark(args)
    print(bt.format_report(result), flush=True)
    if args.out:
        bt.write_json(result, args.out)
        print(f"wrote {args.out}")
    try:
        print(summary(result), flush=True)
    except Exception:
        traceback.print_exc()
    return 0


if __name__ == "__main__":
    sys.exit(main())

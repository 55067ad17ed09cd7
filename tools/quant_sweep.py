"""Quantization variants of one checkpoint, side by side: exact artifact bytes and quantized bpb.

    python3 tools/quant_sweep.py CHECKPOINT [--variant "NAME: VAR=VALUE ..."]... [--out results.json]

CHECKPOINT is a final_model.pt written by train_gpt.py. Settings come from the environment as for
train_gpt.py (DATA_DIR, VOCAB_SIZE, the model's shape); set them as the checkpoint was trained.
The checkpoint is loaded and scored once, as EVAL_ONLY_PATH would, and the GPTQ Hessians are
collected once. Then each variant (quantization variables only) is quantized, compressed and
counted exactly as train_gpt.py builds its artifact (code bytes included), loaded back from its
bytes and scored by the standard evaluation. A variant with its own GPTQ_CALIBRATION_BATCHES
collects its own Hessians. One GPU (or the CPU), no torchrun.

This picks defaults faster than one EVAL_ONLY_PATH run per variant (one start-up, one Hessian pass,
one compiled evaluation); confirm the chosen settings with one such run. With no --variant, the
quantization rows of the README's "Techniques beyond the record" table are measured. With
--sensitivity, the first variant's quantized model is also scored with one group of matrices at a
time put back to float (each kind across layers, then each layer), to show where the gap is.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import train_gpt as tg  # noqa: E402

# The variables a variant may change: they act after training, on the same weights.
QUANT_VARIABLES = ("MATRIX_BITS", "EMBED_BITS", "MATRIX_CLIP_SIGMAS", "EMBED_CLIP_SIGMAS", "MLP_CLIP_SIGMAS",
                   "ATTN_CLIP_SIGMAS", "AWQ_LITE_GROUPS", "AWQ_LITE_GROUP_SIZE", "AWQ_LITE_BITS", "ROW_REORDER",
                   "LQER_TOP_K", "LQER_RANK", "LQER_GROUP", "COMPRESSOR", "ANS_CODING", "GPTQ_CALIBRATION_BATCHES",
                   "QUANT_TWEAK_STEPS", "QUANT_TWEAK_LR", "QUANT_TWEAK_BATCH_TOKENS")

DEFAULT_VARIANTS = (
    "defaults:",
    "int7 embeddings (PR #1626): EMBED_BITS=7",
    "LQER (PR #1851): LQER_TOP_K=3",
    "AWQ-lite (PR #1908): AWQ_LITE_GROUPS=1",
    "rows reordered: ROW_REORDER=1",
    "32 calibration batches (PR #2135): GPTQ_CALIBRATION_BATCHES=32",
    "MLP clip 11.5 (PR #2164): MLP_CLIP_SIGMAS=11.5",
    "MLP clip 12.0 (with the bytes ANS saves): MLP_CLIP_SIGMAS=12.0",
    "without the entropy coder: ANS_CODING=0",
    "norm tweak, 32 steps (arXiv:2309.02784): QUANT_TWEAK_STEPS=32",
    "norm tweak, 64 steps at 3e-3: QUANT_TWEAK_STEPS=64 QUANT_TWEAK_LR=3e-3",
    "together: EMBED_BITS=7 LQER_TOP_K=3 AWQ_LITE_GROUPS=1 ROW_REORDER=1",
)


SENSITIVITY_HELP = ("then the first variant's quantized model with one group of matrices at a time put back to "
                    "the checkpoint's float weights (each kind across layers, then each layer): the gap each carries")


def sensitivity_groups(names, num_layers: int) -> list[tuple[str, list[str]]]:
    """(label, tensor names) of the quantized matrices: each kind across the layers, then each layer
    (kinds that hold no quantized matrix, such as a small embedding stored as fp16, left out)."""
    kinds = [("embedding / tied head", lambda n: n == "tok_emb.weight")]
    kinds += [(name, lambda n, name=name: n.endswith(f".{name}.weight")) for _, name, _ in tg.BANK_LAYOUT]
    kinds += [(f"layer {i}", lambda n, i=i: n.startswith(f"blocks.{i}.")) for i in range(num_layers)]
    groups = [(label, [n for n in names if pick(n)]) for label, pick in kinds]
    return [(label, members) for label, members in groups if members]


def measure_sensitivity(ctx, model, h, w: dict, meta: dict, state: dict, quantized_bpb: float) -> list[dict]:
    """For each group: the quantized model (w, meta) with that group's matrices as they were in the
    float state, scored; 'carries' is how much of the quantized bpb that group's rounding costs."""
    dequantized = tg.dequantize_state_dict(w, meta)
    floats = tg.unbank_state(state, h.num_layers)
    quantized = [n for n, info in meta.items() if info["tag"].startswith("gptq")]
    rows = []
    for label, names in sensitivity_groups(quantized, h.num_layers):
        mixed = {k: (floats[k].to(v.dtype) if k in names else v) for k, v in dequantized.items()}
        tg.load_matching("the sensitivity state", tg.rebank_state(mixed, h.num_layers), model)
        score = ctx.evaluate(f"sensitivity: {label} in float")
        rows.append({"group": label, "tensors": len(names), "val_bpb": score["val_bpb"],
                     "carries_bpb": quantized_bpb - score["val_bpb"]})
    model.load_state_dict(state)
    return rows


class UsageError(Exception):
    pass


def parse_variant(text: str, allowed: tuple[str, ...] = QUANT_VARIABLES) -> tuple[str, dict[str, str]]:
    """"NAME: VAR=VALUE ..." -> (NAME, {VAR: VALUE}); only the allowed variables may appear."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise UsageError(f"--variant {text!r} must read 'NAME: VAR=VALUE ...' (nothing after ':' for the defaults)")
    env = {}
    for item in rest.split():
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise UsageError(f"--variant {text!r}: {item!r} must be VAR=VALUE with VAR one of {', '.join(allowed)}")
        env[key] = value
    return name.strip(), env


def variants_environment(variants: list, environ=None) -> dict:
    """The run's environment; a variable that a variant sets may not be set in it as well."""
    base_env = dict(os.environ if environ is None else environ)
    for key in base_env:  # a variable set for the run: fine; set for one variant only: not here
        if any(key in env for _, env in variants):
            raise UsageError(f"{key} is set in the environment and in a variant: set it in the variants only")
    return base_env


def parse_sweep_args(argv, tool: str, source: str, source_help: str, rows: str,
                     flags: tuple = ()) -> argparse.Namespace:
    """A sweep tool's arguments: its input file (named source), --variant, --out-dir, --out, and
    the tool's own (--flag, help) switches."""
    p = argparse.ArgumentParser(description=f"{rows} variants of one train_gpt.py {source}, side by side.")
    p.add_argument(source, help=source_help)
    p.add_argument("--variant", action="append", default=[], metavar="'NAME: VAR=VALUE ...'",
                   help=f"a variant to measure (repeatable); default: the README's {rows} rows")
    p.add_argument("--out-dir", default="", help=f"folder for the run's log (default runs/{tool}_<time>)")
    p.add_argument("--out", default="", help="also write the results as JSON to this path")
    for flag, text in flags:
        p.add_argument(flag, action="store_true", help=text)
    return p.parse_args(argv)


def parse_args(argv=None) -> argparse.Namespace:
    return parse_sweep_args(argv, "quant_sweep", "checkpoint", "a final_model.pt written by train_gpt.py",
                            "quantization", flags=[("--sensitivity", SENSITIVITY_HELP)])


def sweep(args: argparse.Namespace, environ=None) -> dict:
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    base_env = variants_environment(variants, environ)
    out_dir = args.out_dir or os.path.join("runs", time.strftime("quant_sweep_%Y%m%d_%H%M%S"))
    base_env.update(EVAL_ONLY_PATH=args.checkpoint, ARTIFACT_DIR=out_dir, TTT_ENABLED="0")
    if not args.checkpoint.endswith(".pt"):
        raise UsageError(f"{args.checkpoint}: quant_sweep takes a final_model.pt (a .ptz is already quantized)")
    if not os.path.isfile(args.checkpoint):
        raise UsageError(f"{args.checkpoint} does not exist")
    h = tg.Hyperparameters(env=base_env)
    settings = [(name, env, tg.Hyperparameters(env={**base_env, **env})) for name, env in variants]  # checked now
    ctx = tg.start_run(h)
    log, model = ctx.log, ctx.model
    model.looping = h.num_loops > 0  # as train_gpt.run() evaluates and quantizes a finished model
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    code_bytes = len(tg.minified_code_stub(ctx.source).encode("utf-8"))
    result = {"checkpoint": os.path.abspath(args.checkpoint), "code_bytes": code_bytes,
              "limit_bytes": h.artifact_limit_bytes, "variants": []}
    result["prequant"] = ctx.evaluate("checkpoint as saved")
    hessians = {}
    for i, (name, env, hv) in enumerate(settings):
        t0 = time.perf_counter()
        if hv.gptq_calibration_batches not in hessians:
            hessians[hv.gptq_calibration_batches] = tg.collect_hessians(model, hv, ctx.device)
        hessian_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        w, meta = tg.quantize_model(model, hv, hessians[hv.gptq_calibration_batches], log=log)
        quantize_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        blob = tg.serialize_quantized(w, meta, hv.compressor, hv.ans_coding)
        compress_s = time.perf_counter() - t0
        tg.load_artifact(blob, model)
        score = ctx.evaluate(f"[{i + 1}/{len(settings)}] {name}")
        model.load_state_dict(state)
        total = len(blob) + code_bytes
        row = {"name": name, "env": env, "model_bytes": len(blob), "total_bytes": total,
               "fits": total <= h.artifact_limit_bytes, "val_bpb": score["val_bpb"], "val_loss": score["val_loss"],
               "gap_bpb": score["val_bpb"] - result["prequant"]["val_bpb"], "hessian_s": hessian_s,
               "quantize_s": quantize_s, "compress_s": compress_s}
        result["variants"].append(row)
        if i == 0 and args.sensitivity:
            result["sensitivity"] = measure_sensitivity(ctx, model, hv, w, meta, state, score["val_bpb"])
        log(f"quant_sweep {name}: {total:,} bytes ({'fits' if row['fits'] else 'OVER the limit'}), "
            f"val_bpb {row['val_bpb']:.5f} (gap {row['gap_bpb']:+.5f}); quantize {quantize_s:.1f}s, "
            f"compress {compress_s:.1f}s")
    return result


def format_table(result: dict) -> str:
    base = result["variants"][0]
    lines = [f"checkpoint {result['checkpoint']}: val_bpb {result['prequant']['val_bpb']:.5f} as saved; "
             f"code {result['code_bytes']:,} bytes; limit {result['limit_bytes']:,}",
             f"{'variant':<44} {'total bytes':>12} {'Δ bytes':>10} {'fits':>5} {'val_bpb':>9} {'Δ bpb':>9} {'gap':>9}"]
    for row in result["variants"]:
        lines.append(f"{row['name'][:44]:<44} {row['total_bytes']:>12,} {row['total_bytes'] - base['total_bytes']:>+10,} "
                     f"{'yes' if row['fits'] else 'NO':>5} {row['val_bpb']:>9.5f} {row['val_bpb'] - base['val_bpb']:>+9.5f} "
                     f"{row['gap_bpb']:>+9.5f}")
    lines.append("Δ: against the first variant; gap: quantized − the checkpoint as saved")
    if result.get("sensitivity"):
        lines.append(f"{'the first variant with in float':<44} {'tensors':>8} {'val_bpb':>9} {'carries':>9} {'of gap':>7}")
        gap = base["gap_bpb"]
        for row in result["sensitivity"]:
            share = f"{row['carries_bpb'] / gap:>7.0%}" if gap > 0 else f"{'-':>7}"
            lines.append(f"{row['group']:<44} {row['tensors']:>8} {row['val_bpb']:>9.5f} {row['carries_bpb']:>+9.5f} {share}")
        lines.append("carries: the first variant's bpb minus this one's (that group's rounding); groups overlap")
    return "\n".join(lines)


def run_sweep(tool: str, args: argparse.Namespace, sweep_fn, table_fn, environ=None) -> int:
    """A sweep tool's main: the table on stdout (and the JSON with --out); bad input is one line
    on stderr and exit 2."""
    try:
        result = sweep_fn(args, environ)
    except (UsageError, tg.ConfigError, tg.ShardError) as e:
        print(f"{tool}: {e}", file=sys.stderr)
        return 2
    print(table_fn(result))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {args.out}")
    return 0


def main(argv=None, environ=None) -> int:
    return run_sweep("quant_sweep", parse_args(argv), sweep, format_table, environ)


if __name__ == "__main__":
    sys.exit(main())

"""TTT variants of one artifact, side by side: the TTT bpb of each, its gain and its seconds.

    python3 tools/ttt_sweep.py ARTIFACT [--variant "NAME: VAR=VALUE ..."]... [--out results.json]

ARTIFACT is a final_model.int6.ptz written by train_gpt.py: TTT runs on the quantized model, as in
a submission. Settings come from the environment as for train_gpt.py (DATA_DIR, VOCAB_SIZE, the
model's shape, VAL_DOC_FRACTION and SEED for the document sample: 0.15 is the 300-document sample of
the corpus). The artifact is loaded once; each variant (TTT variables only) then runs as
EVAL_ONLY_PATH would run TTT: its blocks compiled, its warmup on synthetic tokens, its TTT over the
same documents. The first variant also scores the sample without adaptation, so the table shows
the gain; a variant that changes the windows (TTT_EVAL_SEQ_LEN, TTT_CHUNK_SIZE) has other windows,
whose unadapted score this does not show. Every variant starts from the same weights (phased TTT
restores them). One GPU (or the CPU), no torchrun.

With no --variant, the TTT rows of the README's "Techniques beyond the record" table that are still open
are measured.
An artifact that no longer fits the limit with the code as it is now is refused; for a measurement,
raise ARTIFACT_LIMIT_BYTES.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)
import train_gpt as tg  # noqa: E402
from quant_sweep import (UsageError, parse_sweep_args, parse_variant, run_sweep,  # noqa: E402  (shared)
                         variants_environment)

# The variables a variant may change: they act on the evaluation only, on the same artifact.
TTT_VARIABLES = ("TTT_LORA_RANK", "TTT_LORA_LR", "TTT_CHUNK_SIZE", "TTT_EVAL_SEQ_LEN", "TTT_BATCH_SIZE",
                 "TTT_GRAD_STEPS", "TTT_WEIGHT_DECAY", "TTT_BETA1", "TTT_BETA2", "TTT_Q_LORA", "TTT_V_LORA",
                 "TTT_K_LORA", "TTT_MLP_LORA", "TTT_O_LORA", "TTT_OPTIMIZER", "TTT_GLOBAL_PHASES",
                 "TTT_GLOBAL_PREFIX_DOCS", "TTT_GLOBAL_LR", "TTT_GLOBAL_MOMENTUM", "TTT_GLOBAL_BATCH_TOKENS",
                 "TTT_COMPILE", "TTT_CUDA_GRAPHS")

# The phased rows' prefixes fall inside the 300-document sample (the default 2500 is for FineWeb's
# 50,000 documents: on the sample the one phase would come after the last batch and do nothing).
# The longer contexts (TTT_EVAL_SEQ_LEN=2560, 3072) are not here: they lost 0.003 on a model trained
# at 2,048 tokens (runs/results/2026-12-02_h200_qat85_pipeline/); they belong with TRAIN_SEQ_SCHEDULE.
DEFAULT_VARIANTS = (
    "defaults:",
    "no Q and V adapters (PR #1953): TTT_Q_LORA=0 TTT_V_LORA=0",
    "phased, one global phase (PR #1610): TTT_GLOBAL_PHASES=1 TTT_GLOBAL_PREFIX_DOCS=150",
    "phased, three global phases (PR #1626): TTT_GLOBAL_PHASES=3 TTT_GLOBAL_PREFIX_DOCS=225",
    "PR #1855 retune: TTT_LORA_RANK=80 TTT_BETA2=0.99",
    "PR #2135 retune: TTT_LORA_RANK=80 TTT_LORA_LR=8e-5 TTT_WEIGHT_DECAY=2.0 TTT_K_LORA=0",
    "twice the rate: TTT_LORA_LR=2e-4",
    # PR #1767 scales the LoRA output by alpha/rank = 1.5 and decays by 1.0; under Adam, whose steps
    # ignore the gradient's scale, that is the rate x 1.5 with the decay / 1.5 in this script's terms
    "PR #1767 (alpha 1.5x, decay 1.0): TTT_LORA_LR=1.5e-4 TTT_WEIGHT_DECAY=0.667",
)


def parse_args(argv=None) -> argparse.Namespace:
    return parse_sweep_args(argv, "ttt_sweep", "artifact", "a final_model.int6.ptz written by train_gpt.py", "TTT")


def sweep(args: argparse.Namespace, environ=None) -> dict:
    variants = [parse_variant(v, TTT_VARIABLES) for v in (args.variant or DEFAULT_VARIANTS)]
    base_env = variants_environment(variants, environ)
    if not args.artifact.endswith(".ptz"):
        raise UsageError(f"{args.artifact}: ttt_sweep takes a final_model.int6.ptz (TTT runs on the quantized model)")
    if not os.path.isfile(args.artifact):
        raise UsageError(f"{args.artifact} does not exist")
    out_dir = args.out_dir or os.path.join("runs", time.strftime("ttt_sweep_%Y%m%d_%H%M%S"))
    base_env.update(EVAL_ONLY_PATH=args.artifact, ARTIFACT_DIR=out_dir, TTT_ENABLED="1")
    h = tg.Hyperparameters(env=base_env)
    settings = [(name, env, tg.Hyperparameters(env={**base_env, **env})) for name, env in variants]  # checked now
    ctx = tg.start_run(h)
    ctx.model.looping = h.num_loops > 0  # as train_gpt.run() evaluates a finished model
    state = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
    result = {"artifact": os.path.abspath(args.artifact), "doc_fraction": h.val_doc_fraction, "seed": h.seed,
              "variants": []}
    for i, (name, env, hv) in enumerate(settings):
        ctx.log(f"ttt_sweep [{i + 1}/{len(settings)}] {name}")
        score = tg.evaluate_ttt(ctx, hv, baseline=i == 0)
        ctx.model.load_state_dict(state)  # what a variant might leave behind never reaches the next
        row = {"name": name, "env": env, "val_bpb": score["val_bpb"], "val_loss": score["val_loss"],
               "ttt_seconds": score["eval_seconds"], "warmup_seconds": score["warmup_seconds"]}
        if "sample_val_bpb_without_ttt" in score:
            result["without_ttt_bpb"] = score["sample_val_bpb_without_ttt"]
        result["variants"].append(row)
    return result


def format_table(result: dict) -> str:
    base = result["variants"][0]
    unadapted = result.get("without_ttt_bpb")
    head = f"artifact {result['artifact']}: documents {result['doc_fraction']:g} (seed {result['seed']})"
    if unadapted is not None:
        head += f"; without adaptation {unadapted:.5f} bpb"
    lines = [head, f"{'variant':<44} {'val_bpb':>9} {'Δ bpb':>9} {'gain':>9} {'TTT s':>7} {'Δ s':>7} {'warmup s':>8}"]
    for row in result["variants"]:
        gain = f"{row['val_bpb'] - unadapted:>+9.5f}" if unadapted is not None else f"{'':>9}"
        lines.append(f"{row['name'][:44]:<44} {row['val_bpb']:>9.5f} {row['val_bpb'] - base['val_bpb']:>+9.5f} {gain} "
                     f"{row['ttt_seconds']:>7.1f} {row['ttt_seconds'] - base['ttt_seconds']:>+7.1f} "
                     f"{row['warmup_seconds']:>8.1f}")
    lines.append("Δ: against the first variant; gain: TTT against the same documents without adaptation "
                 "(the first variant's windows)")
    return "\n".join(lines)


def main(argv=None, environ=None) -> int:
    return run_sweep("ttt_sweep", parse_args(argv), sweep, format_table, environ)


if __name__ == "__main__":
    sys.exit(main())

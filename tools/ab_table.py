"""The table of a step-based A/B (DEVELOPERS.md's "Quality A/B") from the runs' console logs.

    python3 tools/ab_table.py LOG [LOG ...] [--steps 50,100,150,200,250] [--base LOG]

Each LOG is the console output (or train.log) of one train_gpt.py run. Per run: the train loss at
the given steps and at the last one, the live val_bpb at the end of training, the pre-quantization
score of the weights kept (EMA, or live when EMA_SELECT chose them) and which, and the settings that
differ from the defaults; Δ against the first LOG (or --base). Markdown, ready for a results README.
"""
import argparse
import os
import re
import sys

STEP = re.compile(r"^step:(\d+)/(\d+) train_loss:([0-9.]+)")
DONE = re.compile(r"^train_done steps:(\d+) .*?live_val_bpb:([0-9.]+)")
PREQUANT = re.compile(r"^prequant \((\w+) weights\) val_loss:[0-9.]+ val_bpb:([0-9.]+)")
KEPT = re.compile(r"^ema_select .*: kept the (\w+) weights")
HELD_OUT = re.compile(r"(\w+) loss ([0-9.]+)")  # in the ema_select line: live, EMA, ema30 (EMA_SELECT_DIVISORS), ...
CHANGED = re.compile(r"^settings that differ from the defaults: (.*)$")
NOISE = ("DATA_DIR", "RUN_ID", "ARTIFACT_DIR", "TRAIN_LOG_EVERY", "WARMUP_STEPS", "MAX_WALLCLOCK_SECONDS",
         "ITERATIONS", "TTT_ENABLED", "EVAL_SEQ_LEN", "VAL_LOSS_EVERY")  # the A/B's own fixed settings


def parse_log(path: str) -> dict:
    run = {"name": os.path.basename(path).split(".")[0], "loss": {}, "live": None, "prequant": None,
           "kept": None, "held_out": {}, "settings": ""}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if m := STEP.match(line):
                run["loss"][int(m[1])] = float(m[3])
            elif m := DONE.match(line):
                run["steps"], run["live"] = int(m[1]), float(m[2])
            elif m := PREQUANT.match(line):  # logs before EMA_SELECT's label said "EMA" whatever it kept
                run["kept"], run["prequant"] = run["kept"] or m[1], float(m[2])
            elif m := KEPT.match(line):
                run["kept"] = m[1].replace("ema", "EMA")  # live, EMA, EMA30 (EMA_SELECT_DIVISORS), ...
                run["held_out"] = {name: float(v) for name, v in HELD_OUT.findall(line.split(":", 1)[1])}
            elif m := CHANGED.match(line):
                items = [s.strip() for s in re.split(r", (?=[A-Z0-9_]+=)", m[1])]
                run["settings"] = " ".join(i.split(" (default")[0] for i in items if i.split("=")[0] not in NOISE)
    if not run["loss"]:
        raise ValueError(f"{path}: no 'step:N/M train_loss:X' lines (a train_gpt.py console log or train.log?)")
    return run


def fmt(x, digits=4):
    return "—" if x is None else f"{x:.{digits}f}"


def table(runs: list[dict], steps: list[int], base: dict) -> str:
    last = max(max(r["loss"]) for r in runs)
    cols = [s for s in steps if s < last] + [last]
    head = ("| run | " + " | ".join(f"loss @{s}" for s in cols)
            + " | live val_bpb | Δ live | kept: val_bpb | held-out loss (EMA_SELECT) | settings |")
    lines = [head, "|" + "---|" * (len(cols) + 6)]
    for r in runs:
        delta = None if r["live"] is None or base["live"] is None else r["live"] - base["live"]
        kept = "—" if r["prequant"] is None else f"{r['kept']}: {r['prequant']:.5f}"
        held = ", ".join(f"{name} {loss:.5f}" for name, loss in r["held_out"].items()) or "—"
        lines.append(f"| {r['name']} | " + " | ".join(fmt(r["loss"].get(s)) for s in cols)
                     + f" | {fmt(r['live'], 5)} | {'—' if delta is None else f'{delta:+.5f}'} | {kept} | {held} | "
                     f"{r['settings'] or 'defaults'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Markdown table of a step-based A/B from train_gpt.py console logs.")
    p.add_argument("logs", nargs="+")
    p.add_argument("--steps", default="50,100,150,200,250", help="train-loss columns (the last step is added)")
    p.add_argument("--base", default="", help="the run the Δ column is against (default: the first LOG)")
    args = p.parse_args(argv)
    try:
        steps = [int(s) for s in args.steps.split(",") if s]
        runs = [parse_log(path) for path in args.logs]
        base = parse_log(args.base) if args.base else runs[0]
    except (OSError, ValueError) as e:
        print(f"ab_table: {e}", file=sys.stderr)
        return 2
    print(table(runs, steps, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())

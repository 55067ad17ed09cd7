"""tools/quant_sweep.py: one checkpoint, several quantization variants; the defaults' row must be the
artifact train_gpt.py itself builds from that checkpoint (bytes and score)."""
import json
import os

import pytest
import torch

import train_gpt as tg
from tests.conftest import with_one_val_shard
from tests.test_main import E2E_ENV, read_json, run_main
from tools import quant_sweep as qs


@pytest.fixture(scope="module")
def checkpoint(tiny_dataset, tmp_path_factory):
    """A final_model.pt of the end-to-end model shape with random weights (no zero matrices), on the
    tiny dataset with one validation shard (each evaluation here takes a third of the time)."""
    folder = tmp_path_factory.mktemp("sweep")
    env = dict(E2E_ENV, **with_one_val_shard(tiny_dataset, folder).env, COMPRESSOR="lzma")
    return env, random_checkpoint(env, folder)


def random_checkpoint(env: dict, folder) -> str:
    """folder/final_model.pt: the model of env with seeded random weights, O and MLP-down included."""
    torch.manual_seed(0)
    model = tg.build_model(tg.Hyperparameters(env=dict(env, ARTIFACT_DIR=str(folder))), torch.device("cpu"))
    with torch.no_grad():
        for bank in (model.qo_bank, model.mlp_down_bank):
            bank.normal_(std=0.02)
    path = folder / "final_model.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def test_the_defaults_row_is_the_artifact_train_gpt_builds(checkpoint, tmp_path, monkeypatch, capsys):
    env, ckpt = checkpoint
    out = tmp_path / "sweep.json"
    code = qs.main([ckpt, "--variant", "defaults:", "--variant", "reordered: ROW_REORDER=1",
                    "--variant", "int4: MATRIX_BITS=4", "--variant", "tweaked: QUANT_TWEAK_STEPS=3 QUANT_TWEAK_BATCH_TOKENS=256",
                    "--out-dir", str(tmp_path / "sweep"),
                    "--out", str(out)], environ=env)
    assert code == 0
    table = capsys.readouterr().out
    assert "reordered" in table and "Δ bpb" in table
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["variants"]}
    assert rows["int4"]["env"] == {"MATRIX_BITS": "4"}
    # reordering rows moves values, never changes them: the same score, other bytes
    assert rows["reordered"]["val_bpb"] == rows["defaults"]["val_bpb"]
    assert rows["int4"]["model_bytes"] < rows["defaults"]["model_bytes"]
    assert rows["int4"]["gap_bpb"] > rows["defaults"]["gap_bpb"]  # coarser rounding costs more
    # the norm tweak changes float tensors only: another score; more bytes here, since this barely
    # trained checkpoint's gains and scales sit at their constant init and compress to almost nothing
    assert rows["tweaked"]["val_bpb"] != rows["defaults"]["val_bpb"]
    assert rows["defaults"]["model_bytes"] <= rows["tweaked"]["model_bytes"] < 1.05 * rows["defaults"]["model_bytes"]
    # train_gpt.py on the same checkpoint: the same total bytes and quantized score
    run_dir = tmp_path / "eval_only"
    assert run_main(monkeypatch, dict(env, EVAL_ONLY_PATH=ckpt, ARTIFACT_DIR=str(run_dir), TTT_ENABLED="0")) == 0
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert rows["defaults"]["total_bytes"] == summary["artifact"]["total_bytes"]
    assert rows["defaults"]["val_bpb"] == pytest.approx(summary["quantized"]["val_bpb"], rel=1e-6)
    assert result["prequant"]["val_bpb"] == pytest.approx(summary["prequant"]["val_bpb"], rel=1e-6)


@pytest.mark.parametrize("variant, says", [("LQER_TOP_K=3", "NAME: VAR=VALUE"),
                                           ("wider: MODEL_DIM=256", "MODEL_DIM=256"),
                                           ("bad: LQER_TOP_K=three", "LQER_TOP_K")])
def test_a_bad_variant_is_one_line_and_exit_2(checkpoint, tmp_path, capsys, variant, says):
    env, ckpt = checkpoint
    assert qs.main([ckpt, "--variant", variant, "--out-dir", str(tmp_path / "s")], environ=env) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err


def test_sensitivity_puts_each_group_back_to_float_in_turn(checkpoint, tmp_path, capsys):
    """--sensitivity: after the first variant, its quantized model with each kind of matrix (across
    the layers) and then each layer in float; every quantized matrix is in exactly one kind, and the
    variants after it are scored from the checkpoint as before (the float weights are restored)."""
    env, ckpt = checkpoint
    env = dict(env, MATRIX_BITS="3")  # coarse rounding, so that every group carries a visible part
    args = [ckpt, "--variant", "int3: ", "--variant", "again: LQER_TOP_K=0", "--out-dir", str(tmp_path / "s")]
    result = qs.sweep(qs.parse_args(args + ["--sensitivity"]), environ=env)
    rows = {row["group"]: row for row in result["sensitivity"]}
    h = tg.Hyperparameters(env=env)
    state = tg.unbank_state(torch.load(ckpt, map_location="cpu"), h.num_layers)
    quantized = [n for n, t in state.items() if t.dim() >= 2 and t.numel() > tg.QUANT_MIN_NUMEL]
    kinds = [label for label in ["embedding / tied head"] + [name for _, name, _ in tg.BANK_LAYOUT] if label in rows]
    layers = [f"layer {i}" for i in range(h.num_layers)]
    assert kinds and list(rows) == kinds + layers  # (the tiny model quantizes its MLP only)
    assert sum(rows[k]["tensors"] for k in kinds) == sum(rows[k]["tensors"] for k in layers) == len(quantized)
    first, again = result["variants"]
    assert again["val_bpb"] == first["val_bpb"]  # the sensitivity rows left the weights as they were
    assert sum(row["carries_bpb"] for row in result["sensitivity"][:len(kinds)]) > 0
    assert all(row["val_bpb"] != first["val_bpb"] for row in result["sensitivity"])
    table = qs.format_table(result)
    assert "mlp.fc" in table and "of gap" in table

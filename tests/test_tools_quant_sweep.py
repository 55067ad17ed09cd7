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
                    "--variant", "int4: MATRIX_BITS=4", "--out-dir", str(tmp_path / "sweep"),
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

"""tools/ttt_sweep.py: one artifact, several TTT variants; the defaults' row must be the TTT score
train_gpt.py itself gives that artifact."""
import json
import os

import pytest

from tests.conftest import with_one_val_shard
from tests.test_main import E2E_ENV, read_json, run_main
from tests.test_tools_quant_sweep import random_checkpoint
from tools import ttt_sweep as ts


@pytest.fixture(scope="module")
def artifact(tiny_dataset, tmp_path_factory):
    """A final_model.int6.ptz of the end-to-end model shape (random weights, no zero matrices),
    written by train_gpt.py's evaluation of a checkpoint, on the tiny dataset with one validation
    shard; TTT on a tenth of its documents."""
    folder = tmp_path_factory.mktemp("ttt_sweep")
    env = dict(E2E_ENV, **with_one_val_shard(tiny_dataset, folder).env, VAL_DOC_FRACTION="0.1")
    checkpoint = random_checkpoint(env, folder)
    mp = pytest.MonkeyPatch()
    try:
        assert run_main(mp, dict(env, EVAL_ONLY_PATH=checkpoint, ARTIFACT_DIR=str(folder / "quantized"))) == 0
    finally:
        mp.undo()
    return env, str(folder / "quantized" / "final_model.int6.ptz")


def test_the_defaults_row_is_the_ttt_score_train_gpt_gives(artifact, tmp_path, monkeypatch, capsys):
    env, ptz = artifact
    out = tmp_path / "sweep.json"
    code = ts.main([ptz, "--variant", "defaults:", "--variant", "lr 1e-2: TTT_LORA_LR=1e-2",
                    "--out-dir", str(tmp_path / "sweep"), "--out", str(out)], environ=env)
    assert code == 0
    assert "lr 1e-2" in capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["variants"]}
    assert rows["lr 1e-2"]["env"] == {"TTT_LORA_LR": "1e-2"}
    assert rows["lr 1e-2"]["val_bpb"] != rows["defaults"]["val_bpb"]
    assert result["without_ttt_bpb"] > 0
    run_dir = tmp_path / "eval_only"
    assert run_main(monkeypatch, dict(env, EVAL_ONLY_PATH=ptz, ARTIFACT_DIR=str(run_dir), TTT_ENABLED="1")) == 0
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert rows["defaults"]["val_bpb"] == pytest.approx(summary["ttt"]["val_bpb"], rel=1e-9)
    assert result["without_ttt_bpb"] == pytest.approx(summary["ttt"]["sample_val_bpb_without_ttt"], rel=1e-9)


@pytest.mark.parametrize("args, says", [(["--variant", "wider: MODEL_DIM=256"], "MODEL_DIM=256"),
                                        (["--variant", "TTT_LORA_RANK=4"], "NAME: VAR=VALUE"),
                                        (["--variant", "bad: TTT_LORA_RANK=four"], "TTT_LORA_RANK")])
def test_a_bad_variant_is_one_line_and_exit_2(artifact, tmp_path, capsys, args, says):
    env, ptz = artifact
    assert ts.main([ptz, *args, "--out-dir", str(tmp_path / "s")], environ=env) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err


def test_a_checkpoint_is_refused_for_an_artifact(artifact, tmp_path, capsys):
    env, ptz = artifact
    pt = os.path.join(os.path.dirname(os.path.dirname(ptz)), "final_model.pt")
    assert ts.main([pt, "--variant", "defaults:", "--out-dir", str(tmp_path / "s")], environ=env) == 2
    assert "final_model.int6.ptz" in capsys.readouterr().err

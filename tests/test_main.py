"""The whole script through main(), in-process on CPU: train -> checkpoint -> quantize -> evaluate,
EVAL_ONLY_PATH on both the checkpoint and the artifact, the size limit (refusal and autofit), and
the one-line errors for bad input."""
import json
import os
import shutil
import sys

import pytest
import torch

import train_gpt as tg
from tests.conftest import TINY_ENV, with_one_val_shard

# Wide enough that the MLP matrices (640 x 128 > 65,536 elements) go through GPTQ at int6.
# Validation rows of 512 tokens (VAL_BATCH_TOKENS / 8) and TTT chunks of 32: fewer, larger calls.
E2E_ENV = dict(TINY_ENV, MODEL_DIM="128", MLP_MULT="5", NUM_HEADS="4", NUM_KV_HEADS="2", ITERATIONS="3",
               WARMUP_STEPS="2", TTT_ENABLED="0", COMPRESSOR="lzma", VAL_BATCH_TOKENS="4096", TTT_CHUNK_SIZE="32")


@pytest.fixture(scope="module")
def tiny_dataset(tiny_dataset, tmp_path_factory):
    """The runs here evaluate many times: they read the dataset with one validation shard."""
    return with_one_val_shard(tiny_dataset, tmp_path_factory.mktemp("e2e_data"))


def run_main(monkeypatch, env: dict) -> int:
    for key in list(os.environ):
        if key in tg.Hyperparameters(env={}).__dict__ or key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    return tg.main([])


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def trained_run(tiny_dataset, tmp_path_factory):
    """One tiny training run shared by the tests below (its folder is read-only for them)."""
    out = str(tmp_path_factory.mktemp("e2e"))
    mp = pytest.MonkeyPatch()
    try:
        code = run_main(mp, dict(E2E_ENV, **tiny_dataset.env, ARTIFACT_DIR=out, TTT_ENABLED="1",
                                 VAL_DOC_FRACTION="0.25", SUBMISSION_NAME="tiny", SUBMISSION_AUTHOR="tests"))
    finally:
        mp.undo()
    assert code == 0
    return out


def test_run_writes_everything_and_counts_exact_bytes(trained_run):
    for name in ("train.log", "final_model.pt", "final_model.int6.ptz", "train_gpt.min.py", "summary.json",
                 "submission.json"):
        assert os.path.isfile(os.path.join(trained_run, name)), name
    summary = read_json(os.path.join(trained_run, "summary.json"))
    artifact = summary["artifact"]
    assert artifact["model_bytes"] == os.path.getsize(os.path.join(trained_run, "final_model.int6.ptz"))
    assert artifact["code_bytes"] == os.path.getsize(os.path.join(trained_run, "train_gpt.min.py"))
    assert artifact["total_bytes"] == artifact["model_bytes"] + artifact["code_bytes"] <= 16_000_000
    assert summary["train"]["steps"] == 3
    assert "ttt" in summary and summary["final"] == summary["ttt"]
    assert "sample_val_bpb_without_ttt" in summary["ttt"]  # the sample's own baseline (VAL_DOC_FRACTION < 1)
    submission = read_json(os.path.join(trained_run, "submission.json"))
    assert submission["name"] == "tiny" and submission["bytes_total"] == artifact["total_bytes"]
    assert submission["val_bpb"] == summary["ttt"]["val_bpb"]
    # GPTQ actually ran on the wide MLP matrices
    log = open(os.path.join(trained_run, "train.log")).read()
    assert "gptq (int6)" in log


@pytest.mark.parametrize("target", ["final_model.pt", "final_model.int6.ptz"])
def test_eval_only_reproduces_the_quantized_score(trained_run, tiny_dataset, tmp_path, monkeypatch, target):
    before = read_json(os.path.join(trained_run, "summary.json"))["quantized"]
    code = run_main(monkeypatch, dict(E2E_ENV, **tiny_dataset.env, ARTIFACT_DIR=str(tmp_path),
                                      EVAL_ONLY_PATH=os.path.join(trained_run, target)))
    assert code == 0
    after = read_json(os.path.join(tmp_path, "summary.json"))["quantized"]
    assert after["val_bpb"] == pytest.approx(before["val_bpb"], rel=1e-6)
    assert after["val_loss"] == pytest.approx(before["val_loss"], rel=1e-6)


def test_over_limit_artifact_is_written_then_refused(trained_run, tiny_dataset, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "final_model.pt"  # no artifact beside it: quantize again, then check the size
    shutil.copy(os.path.join(trained_run, "final_model.pt"), ckpt)
    code = run_main(monkeypatch, dict(E2E_ENV, **tiny_dataset.env, ARTIFACT_DIR=str(tmp_path),
                                      EVAL_ONLY_PATH=str(ckpt), ARTIFACT_LIMIT_BYTES="20000", ARTIFACT_AUTOFIT="0"))
    assert code == 3
    err = capsys.readouterr().err
    assert "over the 20,000-byte limit" in err and "artifact:" in err
    assert (tmp_path / "final_model.int6.ptz").is_file() and (tmp_path / "summary.json").is_file()


def test_autofit_finds_a_clip_that_fits(trained_run, tiny_dataset, tmp_path, monkeypatch):
    ckpt = tmp_path / "final_model.pt"
    shutil.copy(os.path.join(trained_run, "final_model.pt"), ckpt)
    fitted = read_json(os.path.join(trained_run, "summary.json"))["artifact"]["total_bytes"]
    limit = fitted - 1500  # a little less than the unfitted artifact
    code = run_main(monkeypatch, dict(E2E_ENV, **tiny_dataset.env, ARTIFACT_DIR=str(tmp_path), EVAL_ONLY_PATH=str(ckpt),
                                      ARTIFACT_LIMIT_BYTES=str(limit)))  # ARTIFACT_AUTOFIT=1 by default
    assert code == 0
    artifact = read_json(os.path.join(tmp_path, "summary.json"))["artifact"]
    assert artifact["total_bytes"] <= limit
    assert artifact["autofit_clip_factor"] > 1
    assert "autofit_bpb_cost" in artifact


def test_eval_only_with_wrong_shapes_names_the_tensor(trained_run, tiny_dataset, tmp_path, monkeypatch, capsys):
    code = run_main(monkeypatch, dict(E2E_ENV, **tiny_dataset.env, ARTIFACT_DIR=str(tmp_path), MLP_MULT="4",
                                      EVAL_ONLY_PATH=os.path.join(trained_run, "final_model.pt")))
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "mlp_down_bank" in err and "(4, 128, 640)" in err and "(4, 128, 512)" in err


@pytest.mark.parametrize("switch", ["SMEAR_GATE", "SPARSE_ATTN_GATE"])
def test_eval_only_of_a_checkpoint_with_another_gate_setting_names_the_switch(trained_run, tiny_dataset, tmp_path,
                                                                           monkeypatch, capsys, switch):
    """The gates are on by default since #17's A/B: a checkpoint trained with one, evaluated without it."""
    code = run_main(monkeypatch, dict(E2E_ENV, **tiny_dataset.env, ARTIFACT_DIR=str(tmp_path), **{switch: "0"},
                                      EVAL_ONLY_PATH=os.path.join(trained_run, "final_model.pt")))
    assert code == 2
    assert f"set {switch}=1 as it was trained" in one_line_error(capsys)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_missing_data_folder(tmp_path, monkeypatch, capsys):
    code = run_main(monkeypatch, dict(TINY_ENV, DATA_DIR=str(tmp_path / "nowhere"), VOCAB_SIZE="1024",
                                      ARTIFACT_DIR=str(tmp_path / "run")))
    assert code == 2
    err = one_line_error(capsys)
    assert "DATA_DIR" in err and "cached_challenge_fineweb.py" in err
    assert not os.path.exists(tmp_path / "run")  # a launch that fails its checks leaves no folder


def test_tokenizer_that_does_not_match_vocab_size(tiny_dataset, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset.dataset_dir, data / "datasets" / "fineweb10B_sp1024")
    os.makedirs(data / "tokenizers")
    shutil.copy(tiny_dataset.tokenizer_path, data / "tokenizers" / "fineweb_1024_bpe.model")
    code = run_main(monkeypatch, dict(TINY_ENV, DATA_DIR=str(data), VOCAB_SIZE="1024", ARTIFACT_DIR=str(tmp_path)))
    assert code == 2
    err = one_line_error(capsys)
    assert "VOCAB_SIZE=1024" in err and "512" in err and "fineweb_1024_bpe.model" in err


def test_corrupt_shard(tiny_dataset, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset.data_dir, data)
    val = sorted((data / "datasets").glob("*/fineweb_val_*.bin"))[0]
    with open(val, "r+b") as f:
        f.truncate(os.path.getsize(val) - 7)
    code = run_main(monkeypatch, dict(TINY_ENV, DATA_DIR=str(data), VOCAB_SIZE=str(tiny_dataset.vocab_size),
                                      ARTIFACT_DIR=str(tmp_path)))
    assert code == 2
    err = one_line_error(capsys)
    assert str(val) in err and "truncated" in err


@pytest.mark.parametrize("module, fix", [("python_minifier", "pip install python-minifier"),
                                         ("brotli", "pip install brotli")])
def test_a_missing_artifact_package_stops_the_run_before_training(tiny_dataset, tmp_path, monkeypatch, capsys,
                                                                   module, fix):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import <module>` raise ImportError
    code = run_main(monkeypatch, dict(TINY_ENV, **tiny_dataset.env, ARTIFACT_DIR=str(tmp_path / "run"),
                                      COMPRESSOR="brotli"))
    assert code == 2
    assert fix in one_line_error(capsys)
    assert not os.path.exists(tmp_path / "run")  # nothing trained, nothing written


@pytest.mark.parametrize("env, variable", [({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS"),
                                           ({"WORLD_SIZE": "3", "RANK": "0"}, "WORLD_SIZE"),
                                           ({"NUM_LAYERS": "eleven"}, "NUM_LAYERS")])
def test_impossible_settings(tiny_dataset, tmp_path, monkeypatch, capsys, env, variable):
    code = run_main(monkeypatch, dict(TINY_ENV, **tiny_dataset.env, ARTIFACT_DIR=str(tmp_path), **env))
    assert code == 2
    assert variable in one_line_error(capsys)


FAILING_RANK_SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
import train_gpt as tg
if os.environ["RANK"] == "1":  # rank 1 breaks in the middle of training, rank 0 is inside a collective
    def broken(self):
        raise RuntimeError("injected failure on rank 1")
    tg.Optimizers.step = broken
sys.exit(tg.main())
"""


def test_one_failing_rank_does_not_hang_the_others(tiny_dataset, tmp_path):
    import subprocess
    import sys
    import time
    script = tmp_path / "fail.py"
    script.write_text(FAILING_RANK_SCRIPT.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = dict(os.environ, **TINY_ENV, **tiny_dataset.env, ARTIFACT_DIR=str(tmp_path / "run"), TTT_ENABLED="0")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr + proc.stdout
    assert time.time() - t0 < 200


def test_an_existing_artifact_over_the_limit_is_not_used(trained_run, tiny_dataset, tmp_path, monkeypatch, capsys):
    """EVAL_ONLY_PATH=final_model.pt with an artifact beside it that no longer fits: quantize
    again (here: and refuse); EVAL_ONLY_PATH=that .ptz: refuse at once."""
    limit = "20000"
    code = run_main(monkeypatch, dict(E2E_ENV, **tiny_dataset.env, ARTIFACT_DIR=str(tmp_path / "a"),
                                      EVAL_ONLY_PATH=os.path.join(trained_run, "final_model.pt"),
                                      ARTIFACT_LIMIT_BYTES=limit, ARTIFACT_AUTOFIT="0"))
    assert code == 3
    assert "quantizing again" in capsys.readouterr().out
    assert (tmp_path / "a" / "final_model.int6.ptz").is_file()  # the new one goes to ARTIFACT_DIR
    code = run_main(monkeypatch, dict(E2E_ENV, **tiny_dataset.env, ARTIFACT_DIR=str(tmp_path / "b"),
                                      EVAL_ONLY_PATH=os.path.join(trained_run, "final_model.int6.ptz"),
                                      ARTIFACT_LIMIT_BYTES=limit))
    assert code == 3
    err = capsys.readouterr().err
    assert "over the 20,000-byte limit" in err and "ARTIFACT_AUTOFIT=1" in err


@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_stops_training_at_a_step_boundary_and_saves_the_weights(tiny_dataset, tmp_path, signame, code):
    import signal
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, **TINY_ENV, **tiny_dataset.env)
    env.update(ARTIFACT_DIR=str(tmp_path / "run"), ITERATIONS="100000", TTT_ENABLED="0", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "train_gpt.py"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step:3/"):
            break
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.startswith("stopped: ") and err.count("\n") == 1 and "Traceback" not in err, err
    ckpt = tmp_path / "run" / "final_model.pt"
    assert f"{signame} stopped training at step" in err and f"EVAL_ONLY_PATH={ckpt}" in err
    assert f"{signame} stopped training at step" in (tmp_path / "run" / "train.log").read_text()
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["train"]["interrupted"]["signal"] == getattr(signal, signame) and "final" not in summary
    h = tg.Hyperparameters(env=dict(TINY_ENV, **tiny_dataset.env))  # what EVAL_ONLY_PATH would load
    tg.load_matching(str(ckpt), tg.read_eval_only_path(str(ckpt)), tg.build_model(h, torch.device("cpu")))


STOP_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train_gpt as tg
with tg.StopOnSignal() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)  # torchrun's SIGTERM after a Ctrl-C: the same request
    print("first", stop.signum, flush=True)
    os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C: exit at once
    print("not reached", flush=True)
"""


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    import subprocess
    import sys
    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and proc.stdout == "first 2\n", (proc.stdout, proc.stderr)


def test_training_side_switches_run_end_to_end(tiny_dataset, tmp_path, monkeypatch):
    """The switches that are off by default (the dense attention output gate in place of the sparse
    one, the asymmetric softcap) with those that are on (SmearGate, Polar Express, the Muon
    weight-decay taper, EMA_SELECT), late QAT from half-way: train, quantize (the new small tensors pass through the
    artifact) with AWQ-lite, LQER and reordered rows, evaluate the artifact."""
    env = dict(E2E_ENV, **tiny_dataset.env, ARTIFACT_DIR=str(tmp_path), SMEAR_GATE="1", ATTN_OUT_GATE="1",
               SPARSE_ATTN_GATE="0",
               LOGIT_SOFTCAP_NEG="12", MUON_POLAR_EXPRESS="1", MUON_WD_TAPER_AT="0.5", EMA_SELECT="2",
               AWQ_LITE_GROUPS="1", LQER_TOP_K="2", ROW_REORDER="1", QAT_AT="0.5")
    assert run_main(monkeypatch, env) == 0
    summary = read_json(os.path.join(tmp_path, "summary.json"))
    assert summary["ema_select"]["kept"] in ("live", "ema")
    assert summary["quantized"]["val_bpb"] == pytest.approx(summary["prequant"]["val_bpb"], rel=0.05)
    w, meta = tg.deserialize_quantized(open(os.path.join(tmp_path, "final_model.int6.ptz"), "rb").read())
    assert {"smear_w", "smear_lambda", "attn_gate"} <= set(meta)
    assert sum("lqer" in m for m in meta.values()) == 2 and any(k.endswith(".fine_scale") for k in w)
    assert any(k.endswith(".mlp.fc.weight.row_order") for k in w)

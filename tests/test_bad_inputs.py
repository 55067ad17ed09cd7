"""Every bad input we could think of, through main() in-process: each exits with its code and ONE
line on stderr that names the file or variable, without a traceback, and a launch that fails its
checks leaves no ARTIFACT_DIR behind. A new case is one row of CASES."""
import os
import shutil

import pytest
import torch

import train_gpt as tg
from tests.conftest import TINY_ENV
from tests.test_main import run_main


def _model_state(env: dict) -> dict:
    h = tg.Hyperparameters(env=env)
    torch.manual_seed(0)
    return tg.build_model(h, torch.device("cpu")).state_dict()


def _artifact(env: dict) -> bytes:
    h = tg.Hyperparameters(env=env)
    state = tg.unbank_state(_model_state(env), h.num_layers)  # tiny: every tensor is stored as fp16, no GPTQ
    w, meta = tg.quantize_state_dict(state, {}, 6, 12.85, 8, 20.0)
    return tg.serialize_quantized(w, meta, "lzma")


def _ans_artifact() -> bytes:
    """A version-2 artifact (its int8 matrix rANS-coded after the compressed part)."""
    q = torch.randint(-31, 32, (64, 128), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    return tg.serialize_quantized({"m.q": q}, {}, "lzma", ans=True)


def _write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _checkpoint(tmp, env, name="final_model.pt", **other) -> str:
    path = os.path.join(tmp, "given", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(_model_state(dict(env, **other)), path)
    return path


def _truncate(path: str, keep: float = 0.5) -> str:
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))
    return path


def _copy_data(tmp, env) -> str:
    data = os.path.join(tmp, "data")
    shutil.copytree(env["DATA_DIR"], data)
    return data


def _shard(data: str, split: str) -> str:
    return sorted(p for p in (os.path.join(r, f) for r, _, fs in os.walk(data) for f in fs)
                  if f"fineweb_{split}_" in p)[0]


def _corrupt_shard(tmp, env, split, how):
    data = _copy_data(tmp, env)
    path = _shard(data, split)
    if how == "truncate":
        _truncate(path, 0.9)
    else:
        with open(path, "r+b") as f:
            f.write(b"\0\0\0\0")
    return {"DATA_DIR": data}


def _tokenizer_for_other_vocab(tmp, env):
    data = _copy_data(tmp, env)
    os.rename(os.path.join(data, "datasets", f"fineweb10B_sp{env['VOCAB_SIZE']}"),
              os.path.join(data, "datasets", "fineweb10B_sp1024"))
    os.rename(os.path.join(data, "tokenizers", f"fineweb_{env['VOCAB_SIZE']}_bpe.model"),
              os.path.join(data, "tokenizers", "fineweb_1024_bpe.model"))
    return {"DATA_DIR": data, "VOCAB_SIZE": "1024"}


def _run_dir_with(tmp, name):
    folder = os.path.join(tmp, "old_run")
    os.makedirs(folder)
    _write(os.path.join(folder, name), b"an earlier run's file")
    return {"ARTIFACT_DIR": folder}


# (id, env overrides or a function (tmp, env) -> overrides, exit code, words the message must contain)
CASES = [
    ("no data folder", {"DATA_DIR": "{tmp}/nowhere"}, 2, ["DATA_DIR=", "does not exist"]),
    ("tokenizer of another vocab", _tokenizer_for_other_vocab, 2, ["VOCAB_SIZE=1024", "pieces"]),
    ("truncated validation shard", lambda t, e: _corrupt_shard(t, e, "val", "truncate"), 2, ["fineweb_val_", "truncated"]),
    ("truncated training shard", lambda t, e: _corrupt_shard(t, e, "train", "truncate"), 2, ["fineweb_train_", "truncated"]),
    ("shard with a bad magic", lambda t, e: _corrupt_shard(t, e, "train", "magic"), 2, ["fineweb_train_", "bad magic"]),
    ("non-numeric value", {"NUM_LAYERS": "eleven"}, 2, ["NUM_LAYERS='eleven'", "int"]),
    ("negative iterations", {"ITERATIONS": "-5"}, 2, ["ITERATIONS=-5", "at least 1"]),
    ("boolean out of range", {"TTT_ENABLED": "2"}, 2, ["TTT_ENABLED=2", "0 or 1"]),
    ("beta of 1", {"BETA2": "1"}, 2, ["BETA2=1"]),
    ("zero-width MLP", {"MLP_MULT": "0"}, 2, ["MLP_MULT=0", "positive"]),
    ("9-bit matrices", {"MATRIX_BITS": "9"}, 2, ["MATRIX_BITS=9"]),
    ("vocab beyond uint16", {"VOCAB_SIZE": "70000"}, 2, ["VOCAB_SIZE=70000", "65536"]),
    ("batch not divisible", {"TRAIN_BATCH_TOKENS": "1000"}, 2, ["TRAIN_BATCH_TOKENS=1000"]),
    ("world size 3", {"RANK": "0", "WORLD_SIZE": "3"}, 2, ["WORLD_SIZE=3"]),
    ("non-numeric rank", {"RANK": "x", "WORLD_SIZE": "2"}, 2, ["RANK", "integers"]),
    ("unknown lane merge", {"PARALLEL_FINAL_LANE": "sum"}, 2, ["PARALLEL_FINAL_LANE='sum'"]),
    ("unknown compressor", {"COMPRESSOR": "zstd"}, 2, ["COMPRESSOR='zstd'"]),
    ("stride 0", {"EVAL_STRIDE": "0"}, 2, ["EVAL_STRIDE=0"]),
    ("held-out batches beyond the data", {"EMA_SELECT": "100000"}, 2, ["EMA_SELECT=100000", "lower EMA_SELECT"]),
    ("TTT window under a chunk", {"TTT_EVAL_SEQ_LEN": "8", "TTT_CHUNK_SIZE": "16"}, 2, ["TTT_EVAL_SEQ_LEN=8"]),
    ("budget inside the GPTQ reserve", {"MAX_WALLCLOCK_SECONDS": "10"}, 2, ["MAX_WALLCLOCK_SECONDS=10"]),
    ("FA3 requested on CPU", {"ATTN_BACKEND": "fa3"}, 2, ["ATTN_BACKEND=fa3", "not available"]),
    ("missing EVAL_ONLY_PATH", {"EVAL_ONLY_PATH": "{tmp}/none.pt"}, 2, ["EVAL_ONLY_PATH=", "does not exist"]),
    ("EVAL_ONLY_PATH of another kind", {"EVAL_ONLY_PATH": "{tmp}/model.bin"}, 2, ["EVAL_ONLY_PATH=", "final_model.pt"]),
    ("text file as checkpoint", lambda t, e: {"EVAL_ONLY_PATH": _write(os.path.join(t, "x.pt"), b"hello")}, 2,
     ["x.pt", "cannot be read"]),
    ("truncated checkpoint", lambda t, e: {"EVAL_ONLY_PATH": _truncate(_checkpoint(t, e))}, 2,
     ["final_model.pt", "cannot be read"]),
    ("checkpoint of other shapes", lambda t, e: {"EVAL_ONLY_PATH": _checkpoint(t, e, MODEL_DIM="32")}, 2,
     ["final_model.pt", "shape"]),
    ("checkpoint of another vocab", lambda t, e: {"EVAL_ONLY_PATH": _checkpoint(t, e, VOCAB_SIZE="1024")}, 2,
     ["tok_emb.weight", "shape"]),
    ("text file as artifact", lambda t, e: {"EVAL_ONLY_PATH": _write(os.path.join(t, "a.ptz"), b"hello")}, 2,
     ["a.ptz", "cannot be read"]),
    ("truncated artifact", lambda t, e: {"EVAL_ONLY_PATH": _truncate(_write(os.path.join(t, "a.ptz"), _artifact(e)))},
     2, ["a.ptz", "truncated"]),
    ("artifact with a cut ANS stream", lambda t, e: {"EVAL_ONLY_PATH": _truncate(_write(os.path.join(t, "a.ptz"),
                                                                                    _ans_artifact()), 0.99)},
     2, ["a.ptz", "truncated"]),
    ("artifact of fewer layers", lambda t, e: {"EVAL_ONLY_PATH": _write(os.path.join(t, "a.ptz"), _artifact(
        dict(e, NUM_LAYERS="3", XSA_LAST_N="3")))}, 2, ["a.ptz", "NUM_LAYERS"]),
    ("artifact of other shapes", lambda t, e: {"EVAL_ONLY_PATH": _write(os.path.join(t, "a.ptz"), _artifact(
        dict(e, MODEL_DIM="32")))}, 2, ["a.ptz", "shape"]),
    ("ARTIFACT_DIR is a file", lambda t, e: {"ARTIFACT_DIR": _write(os.path.join(t, "f"), b"")}, 2,
     ["ARTIFACT_DIR=", "is a file"]),
    ("ARTIFACT_DIR cannot be created", lambda t, e: {"ARTIFACT_DIR": os.path.join(_write(os.path.join(t, "f"), b""),
                                                                                 "run")}, 2, ["ARTIFACT_DIR"]),
    ("ARTIFACT_DIR holds a checkpoint", lambda t, e: _run_dir_with(t, "final_model.pt"), 2,
     ["already holds final_model.pt"]),
    ("ARTIFACT_DIR holds an artifact", lambda t, e: _run_dir_with(t, "final_model.int6.ptz"), 2,
     ["already holds final_model.int6.ptz"]),
]


@pytest.mark.parametrize("overrides, code, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_a_nonzero_exit(tiny_dataset, tmp_path, monkeypatch, capsys, request, overrides,
                                                  code, words):
    env = dict(TINY_ENV, **tiny_dataset.env, ARTIFACT_DIR=str(tmp_path / "run"))
    if callable(overrides):
        overrides = overrides(str(tmp_path), env)
    env.update({k: v.format(tmp=tmp_path) for k, v in overrides.items()})
    assert run_main(monkeypatch, env) == code
    err = capsys.readouterr().err.strip()
    if os.environ.get("BAD_INPUT_TABLE"):  # BAD_INPUT_TABLE=file appends each case's row, for reports
        with open(os.environ["BAD_INPUT_TABLE"], "a") as f:
            f.write(f"| {request.node.callspec.id} | {code} | `{err.replace(str(tmp_path), '<tmp>')}` |\n")
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert not os.path.exists(tmp_path / "run")  # the default ARTIFACT_DIR of these cases is never created


def test_arguments_are_refused_and_help_lists_every_variable(capsys):
    assert tg.main(["--epochs", "3"]) == 2
    assert "takes no arguments" in capsys.readouterr().err
    for flag in ("-h", "--help"):
        assert tg.main([flag]) == 0
        out = capsys.readouterr().out
        for name, default in tg.Hyperparameters(env={})._defaults.items():
            assert f"  {name} " in out and repr(default) in out, name


def test_unknown_look_alike_variables_are_named_and_changed_settings_listed(tiny_dataset, tmp_path, monkeypatch,
                                                                            capsys):
    env = dict(TINY_ENV, **tiny_dataset.env, ARTIFACT_DIR=str(tmp_path / "run"), TTT_ENABLE="0", num_layers="5",
               MAX_JOBS="4")
    env["DATA_DIR"] = str(tmp_path / "nowhere")
    assert run_main(monkeypatch, env) == 2  # stopped by the missing data, after the warnings
    out = capsys.readouterr().out
    assert "warning: TTT_ENABLE is not a variable of train_gpt.py (it is ignored); did you mean TTT_ENABLED?" in out
    assert "warning: num_layers is not a variable of train_gpt.py (it is ignored); did you mean NUM_LAYERS?" in out
    assert "MAX_JOBS" not in out  # other programs' variables are left alone
    settings = next(line for line in out.splitlines() if line.startswith("settings that differ from the defaults:"))
    assert "NUM_LAYERS=4 (default 11)" in settings and "TTT_ENABLED" not in settings

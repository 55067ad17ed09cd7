"""Quantization and artifact: GPTQ, the quantized state dict, serialization, code size, autofit.

CPU only and fast. Run: python3 -m pytest -q tests/test_quant.py
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import train_gpt as tg


def correlated_hessian(cols: int, n: int = 2048, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.8 * torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(n, cols, generator=g) @ mix * torch.linspace(0.2, 2.0, cols)
    return x.T @ x / n


def weighted_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    d = (w - w_hat).double()
    return torch.einsum("ij,jk,ik->", d, h.double(), d).item()


# ----------------------------------------------------------------------------- GPTQ


def test_gptq_beats_round_to_nearest_with_same_scales():
    torch.manual_seed(0)
    w, h = torch.randn(256, 128) * 0.02, correlated_hessian(128)
    for bits, sigmas in ((6, 12.85), (8, 20.0), (4, 3.0)):
        q, scale = tg.gptq_quantize(w, h, sigmas, bits)
        r = 2 ** (bits - 1) - 1
        assert q.dtype == torch.int8 and q.shape == w.shape and scale.dtype == torch.float16 and scale.shape == (256,)
        assert q.abs().max() <= r
        s = scale.float()[:, None]
        rtn = torch.clamp(torch.round(w / s), -r, r) * s
        assert weighted_error(w, q.float() * s, h) < 0.9 * weighted_error(w, rtn, h)


def test_gptq_sdclip_scale_is_fixed_from_row_std():
    w, h = torch.randn(64, 96), correlated_hessian(96)
    _, scale = tg.gptq_quantize(w, h, 12.85, 6)
    assert torch.equal(scale, (12.85 * w.std(dim=1) / 31).half())


def test_gptq_dead_columns_and_zero_rows():
    w, h = torch.randn(32, 64), correlated_hessian(64)
    dead = [3, 17, 40]
    h[dead, :] = 0
    h[:, dead] = 0
    w[5] = 0  # an all-zero row: its scale must not be 0 (division) and its q must be 0
    q, scale = tg.gptq_quantize(w, h, 12.85, 6)
    assert (q[:, dead] == 0).all()
    assert (q[5] == 0).all() and scale[5] > 0
    assert torch.isfinite(scale.float()).all()


def test_gptq_batched_matches_one_by_one():
    ws = torch.randn(3, 48, 80)
    hs = torch.stack([correlated_hessian(80, seed=i) for i in range(3)])
    qb, sb = tg.gptq_quantize(ws, hs, 12.85, 6, block_size=32)
    for i in range(3):
        q, s = tg.gptq_quantize(ws[i], hs[i], 12.85, 6, block_size=32)
        assert torch.equal(s, sb[i])
        assert (q != qb[i]).float().mean() < 1e-3  # batched BLAS may differ in the last bit


# ----------------------------------------------------------------------------- state dict


def small_state():
    g = torch.Generator().manual_seed(1)
    state = {
        "tok_emb.weight": torch.randn(520, 128, generator=g).bfloat16(),  # 66,560 elements: GPTQ, int8
        "blocks.0.mlp.fc.weight": torch.randn(320, 256, generator=g).bfloat16(),
        "blocks.0.attn.c_q.weight": torch.randn(256, 256, generator=g).float(),  # exactly 65,536: passthrough
        "blocks.0.attn_scale": torch.rand(128, generator=g),
        "skip_weights": torch.rand(2, 128, generator=g).bfloat16(),
        "step": torch.tensor([7]),
    }
    hessians = {"tok_emb.weight": correlated_hessian(128), "blocks.0.mlp.fc.weight": correlated_hessian(256)}
    return state, hessians


def quantize_small():
    state, hessians = small_state()
    return state, tg.quantize_state_dict(state, hessians, 6, 12.85, 8, 20.0)


def test_quantize_state_dict_layout_and_tags():
    state, (w, meta) = quantize_small()
    assert meta["tok_emb.weight"]["tag"] == "gptq (int8)"
    assert meta["blocks.0.mlp.fc.weight"]["tag"] == "gptq (int6)"
    assert meta["blocks.0.attn.c_q.weight"]["tag"] == "passthrough (float16)"
    assert meta["skip_weights"]["tag"] == "passthrough (float16)"
    assert w["blocks.0.mlp.fc.weight.q"].dtype == torch.int8 and w["blocks.0.mlp.fc.weight.q"].abs().max() <= 31
    assert w["tok_emb.weight.scale"].dtype == torch.float16 and w["tok_emb.weight.scale"].shape == (520,)
    assert w["blocks.0.attn_scale"].dtype == torch.float16
    out = tg.dequantize_state_dict(w, meta)
    assert list(out) == list(state)
    for name, t in state.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
    assert torch.equal(out["step"], state["step"])
    rel = (out["blocks.0.mlp.fc.weight"].float() - state["blocks.0.mlp.fc.weight"].float()).norm() / \
        state["blocks.0.mlp.fc.weight"].float().norm()
    assert rel < 0.4  # int6 at 12.85 sigma: a step of 0.41 sigma; GPTQ trades plain error for H-weighted error


def test_quantize_state_dict_needs_every_hessian():
    state, hessians = small_state()
    del hessians["blocks.0.mlp.fc.weight"]
    with pytest.raises(ValueError, match="blocks.0.mlp.fc.weight: no Hessian"):
        tg.quantize_state_dict(state, hessians, 6, 12.85, 8, 20.0)


# ----------------------------------------------------------------------------- serialization


@pytest.mark.parametrize("length", [0, 1, 2, 7, 1000, 1001])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_byte_shuffle_inverts(length, stride):
    data = os.urandom(length)
    shuffled = tg.byte_shuffle(data, stride)
    assert shuffled[:5] == b"BSHF" + bytes([stride]) and len(shuffled) == length + 5
    assert tg.byte_unshuffle(shuffled) == data
    if stride == 2:
        assert shuffled[5:] == data[0::2] + data[1::2]


@pytest.mark.parametrize("compressor", ["brotli", "lzma"])
def test_serialize_roundtrip_is_bitwise(compressor, monkeypatch):
    pytest.importorskip("brotli") if compressor == "brotli" else None
    monkeypatch.setattr(tg, "ARTIFACT_PIECE_BYTES", 50_000)  # several pieces, as at full size
    _, (w, meta) = quantize_small()
    blob = tg.serialize_quantized(w, meta, compressor)
    assert blob[:4] == b"PGQA"
    assert int.from_bytes(blob[6:10], "little") > 2
    w2, meta2 = tg.deserialize_quantized(blob)
    assert meta2 == meta and list(w2) == list(w)
    for k in w:
        assert w2[k].dtype == w[k].dtype and torch.equal(w2[k], w[k])
    a, b = tg.dequantize_state_dict(w, meta), tg.dequantize_state_dict(w2, meta2)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8) if a[k].is_floating_point() else a[k],
                                                        b[k].view(torch.uint8) if b[k].is_floating_point() else b[k])
    assert tg.serialize_quantized(w2, meta2, compressor) == blob  # deterministic


def test_deserialize_rejects_truncated_and_foreign_blobs():
    _, (w, meta) = quantize_small()
    blob = tg.serialize_quantized(w, meta, "lzma")
    with pytest.raises(ValueError, match="truncated"):
        tg.deserialize_quantized(blob[:-1])
    with pytest.raises(ValueError, match="magic"):
        tg.deserialize_quantized(b"XXXX" + blob[4:])


def test_lzma_works_without_brotli(monkeypatch):
    monkeypatch.setitem(sys.modules, "brotli", None)  # makes `import brotli` raise ImportError
    _, (w, meta) = quantize_small()
    w2, _ = tg.deserialize_quantized(tg.serialize_quantized(w, meta, "lzma"))
    assert torch.equal(w2["tok_emb.weight.q"], w["tok_emb.weight.q"])
    with pytest.raises(tg.ConfigError, match="pip install brotli"):
        tg.serialize_quantized(w, meta, "brotli")


# ----------------------------------------------------------------------------- code size

SMALL_MODULE = '''"""A docstring the minifier drops."""
import inspect
import linecache
import sys


def twice(x):
    """Doubles."""
    return 2 * x


class Box:
    size = 3


def own_source():  # as train_gpt.script_source
    return "".join(linecache.getlines(own_source.__code__.co_filename))


if __name__ == "__main__":
    print("main", twice(21), Box.size, __name__, "src-ok" if "def twice" in inspect.getsource(twice) else "src-missing")
'''


def test_stub_runs_as_the_script(tmp_path):
    stub = tg.minified_code_stub(SMALL_MODULE)
    assert stub.count("\n") == 2 and stub.endswith("\n")
    path = tmp_path / "stub.py"
    path.write_text(stub, encoding="utf-8")
    assert len(stub.encode("utf-8")) == os.path.getsize(path)
    run = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "main 42 3 __main__ src-ok"
    ns = {"__name__": "imported"}
    exec(stub, ns)
    assert ns["twice"](4) == 8 and ns["Box"].size == 3
    assert '"""' not in ns["own_source"]()  # the minified text, read back through linecache
    assert tg.minified_code_stub(ns["own_source"]()) == stub  # minifying the minified text changes nothing


def test_stub_of_train_gpt_defines_the_same_names():
    source = tg.script_source()
    assert source == open(tg.__file__, encoding="utf-8").read()
    stub = tg.minified_code_stub(source)
    ns = {"__name__": "train_gpt_stub"}
    exec(stub, ns)

    def defined(names):
        return {k for k, v in names.items()
                if (callable(v) or isinstance(v, type)) and getattr(v, "__module__", None) in ("train_gpt", "train_gpt_stub")}
    assert defined(ns) == defined(vars(tg))
    assert tg.minified_code_stub(ns["script_source"]()) == stub  # counts the same when run from the stub
    print(f"counted code size of {tg.__file__}: {len(stub.encode('utf-8')):,} bytes")


def test_size_report_and_check():
    _, (w, meta) = quantize_small()
    stored = tg.stored_bytes_by_kind(w, meta)
    assert set(stored) == {"gptq (int8)", "gptq (int6)", "scales (float16)", "passthrough (float16)", "passthrough (int64)"}
    assert stored["gptq (int6)"] == 320 * 256
    report = tg.artifact_size_report(15_990_000, 27_000, 16_000_000, stored, "brotli")
    assert "17,000 OVER" in report and "gptq (int6)" in report
    with pytest.raises(tg.ArtifactTooLarge, match="17,000 over the 16,000,000-byte limit") as err:
        tg.check_artifact_size(16_017_000, 16_000_000, report)
    assert "gptq (int6)" in str(err.value)
    tg.check_artifact_size(16_000_000, 16_000_000, report)  # equal to the limit fits


# ----------------------------------------------------------------------------- autofit


@pytest.mark.parametrize("over", [1, 50_000, 900_000])
def test_autofit_finds_the_smallest_fitting_factor(over):
    limit, slope = 16_000_000, 3_000_000
    calls = []

    def total_at(f):  # monotone, integer, about linear in ln f like the real artifact
        calls.append(f)
        return limit + over - math.floor(slope * math.log(f))

    f, size = tg.autofit_clip_factor(total_at, limit, rel_tol=0.002)
    root = math.exp(over / slope)
    assert size == total_at(f) <= limit
    assert root <= f * (1 + 1e-12) and f <= root * 1.002
    assert len(calls) <= 11


def test_autofit_keeps_a_fitting_artifact_and_gives_up_loudly():
    assert tg.autofit_clip_factor(lambda f: 100, 100) == (1.0, 100)
    with pytest.raises(tg.ArtifactTooLarge, match="x1.5"):
        tg.autofit_clip_factor(lambda f: 200 - int(10 * f), 100)

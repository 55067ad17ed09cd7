"""ARTIFACT: per-layer naming of the banks, Hessian collection, GPTQ, the quantized state dict,
serialization, the counted code stub, the size check and autofit, and write_artifact end to end.

CPU only and fast. Run: python3 -m pytest -q tests/test_artifact.py
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from tests.test_model import tiny_model


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


def test_int7_embeddings_use_the_int7_grid_and_cost_a_little_accuracy():
    """EMBED_BITS=7 (PR #1626): the embedding's codes lie in [-63, 63], it is tagged int7, and its
    step and its error are about twice int8's; the other matrices do not change."""
    state, hessians = small_state()
    w8, _ = tg.quantize_state_dict(state, hessians, 6, 12.85, 8, 20.0)
    w7, meta7 = tg.quantize_state_dict(state, hessians, 6, 12.85, 7, 20.0)
    assert meta7["tok_emb.weight"]["tag"] == "gptq (int7)" and tg.Hyperparameters(env={"EMBED_BITS": "7"}).embed_bits == 7
    assert w7["tok_emb.weight.q"].abs().max() <= 63
    # the same clip (20 sigma) over 63 levels a side instead of 127: a step 127/63 times as large
    torch.testing.assert_close(w7["tok_emb.weight.scale"].float(), w8["tok_emb.weight.scale"].float() * 127 / 63,
                               rtol=2e-3, atol=0)
    assert torch.equal(w7["blocks.0.mlp.fc.weight.q"], w8["blocks.0.mlp.fc.weight.q"])
    ref = state["tok_emb.weight"].float()
    err = {bits: (tg._gptq_dequantized(w, "tok_emb.weight") - ref).norm() / ref.norm() for bits, w in ((8, w8), (7, w7))}
    assert err[8] < err[7] < 3 * err[8]  # about twice the step, so about twice the error


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


@pytest.mark.parametrize("compressor,ans", [("brotli", False), ("lzma", False), ("lzma", True)])
def test_serialize_roundtrip_is_bitwise(compressor, ans, monkeypatch):
    pytest.importorskip("brotli") if compressor == "brotli" else None
    monkeypatch.setattr(tg, "ARTIFACT_PIECE_BYTES", 50_000)  # several pieces, as at full size
    monkeypatch.setattr(tg, "ANS_LANES", 64)  # several steps per lane at this size
    _, (w, meta) = quantize_small()
    blob = tg.serialize_quantized(w, meta, compressor, ans)
    assert blob[:5] == b"PGQA" + bytes([2 if ans else 1])
    assert int.from_bytes(blob[6:10], "little") > 2
    w2, meta2 = tg.deserialize_quantized(blob)
    assert meta2 == meta and list(w2) == list(w)
    for k in w:
        assert w2[k].dtype == w[k].dtype and torch.equal(w2[k], w[k])
    a, b = tg.dequantize_state_dict(w, meta), tg.dequantize_state_dict(w2, meta2)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8) if a[k].is_floating_point() else a[k],
                                                        b[k].view(torch.uint8) if b[k].is_floating_point() else b[k])
    assert tg.serialize_quantized(w2, meta2, compressor, ans) == blob  # deterministic


def ans_symbols(seed: int, n: int, tables: int) -> tuple:
    """n symbols from `tables` distributions (Gaussian-like of several spreads, one of a single
    symbol, one that uses all 256), with the table of each."""
    g = np.random.default_rng(seed)
    ctx = g.integers(0, tables, n).astype(np.int32)
    spread = np.array([0.0, 60.0] + [1.0 + 4 * k for k in range(tables - 2)])[ctx]
    sym = np.clip(np.rint(g.normal(128, 1, n) + spread * g.standard_normal(n)), 0, 255).astype(np.uint8)
    sym[ctx == 0] = 131  # table 0 holds one symbol: its frequency is the whole 2^15
    counts = np.bincount(ctx.astype(np.int64) * 256 + sym, minlength=tables * 256).reshape(tables, 256)
    return sym, ctx, counts


@pytest.mark.parametrize("n", [1, 63, 64, 65, 5000])
def test_ans_decodes_what_it_encoded_from_several_tables(n, monkeypatch):
    monkeypatch.setattr(tg, "ANS_LANES", 64)  # n below, at and above one step of the lanes
    sym, ctx, counts = ans_symbols(n, n, 6)
    freq = tg.ans_frequencies(counts)
    used = counts.sum(1) > 0  # an unused table still sums to 2^15 (on symbol 0), so the slot layout holds
    assert (freq.sum(1) == 1 << tg.ANS_PROB_BITS).all() and ((freq > 0) == (counts > 0))[used].all()
    words, states = tg.ans_encode(sym, ctx, freq)
    assert words.dtype == np.uint16 and states.dtype == np.uint32 and len(states) == 64
    assert np.array_equal(tg.ans_decode(words, states, ctx, freq), sym)


def test_ans_comes_within_half_a_percent_of_the_entropy():
    sym, ctx, counts = ans_symbols(1, 400_000, 5)
    p = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    entropy_bytes = -(counts * np.log2(np.where(counts > 0, p, 1))).sum() / 8
    words, states = tg.ans_encode(sym, ctx, tg.ans_frequencies(counts))
    assert entropy_bytes < 2 * len(words) + 4 * len(states) < 1.005 * entropy_bytes + 4 * len(states)


def test_a_damaged_ans_stream_is_refused():
    _, (w, meta) = quantize_small()
    blob = tg.serialize_quantized(w, meta, "lzma", ans=True)
    for bad in (blob[:-2], blob + b"\0\0", blob[:-40] + bytes(b ^ 0x5A for b in blob[-40:])):
        with pytest.raises(ValueError, match="ANS|truncated|corrupt"):
            tg.deserialize_quantized(bad)


def test_ans_is_smaller_than_the_compressor_alone_on_int6_matrices():
    g = torch.Generator().manual_seed(0)
    spread = torch.linspace(3, 9, 256)  # input channels differ in spread, as in trained matrices
    w = {f"m{i}.q": torch.clamp(torch.round(torch.randn(512, 256, generator=g) * spread), -31, 31).to(torch.int8)
         for i in range(4)}
    w["m0.scale"] = torch.rand(512, generator=g).half()
    plain, coded = tg.serialize_quantized(w, {}, "lzma"), tg.serialize_quantized(w, {}, "lzma", ans=True)
    assert len(coded) < 0.98 * len(plain)  # (8 KB of it the lane states, negligible at full size)
    w2, _ = tg.deserialize_quantized(coded)
    assert list(w2) == list(w) and all(torch.equal(w2[k], w[k]) for k in w)


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


def test_unbank_rebank_round_trip():
    model = tiny_model()
    L, D, kv, hidden = 4, 64, 32, 128
    state = model.state_dict()
    flat = tg.unbank_state(state, L)
    assert not any(k.endswith("_bank") for k in flat)
    for i in range(L):
        for name, bank, index, shape in (("attn.c_q", "qo_bank", i, (D, D)), ("attn.proj", "qo_bank", L + i, (D, D)),
                                         ("attn.c_k", "kv_bank", i, (kv, D)), ("attn.c_v", "kv_bank", L + i, (kv, D)),
                                         ("mlp.fc", "mlp_up_bank", i, (hidden, D)),
                                         ("mlp.proj", "mlp_down_bank", i, (D, hidden))):
            w = flat[f"blocks.{i}.{name}.weight"]
            assert w.shape == shape and torch.equal(w, state[bank][index]), (i, name)
    assert len(flat) == len(state) - 4 + 6 * L
    for k in state:
        if not k.endswith("_bank"):
            assert flat[k] is state[k]
    back = tg.rebank_state(flat, L)
    assert set(back) == set(state)
    for k in state:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]), k
    fresh = tiny_model(seed=1)
    fresh.load_state_dict(back)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def _quiet(*args, **kwargs):
    pass


def test_weights_reading_names_every_quantized_matrix():
    model = tiny_model()
    names = set(tg.unbank_state(model.state_dict(), model.num_layers))
    keys = ["tok_emb"] + [f"blocks.{i}.{k}" for i in range(4) for k in ("attn.c_qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    read = [n for key in keys for n in tg.weights_reading(key)]
    assert len(read) == len(set(read)) and set(read) == {n for n in names if n.endswith(".weight") and "blocks." in n} | {
        "tok_emb.weight"}


def test_collect_hessians_is_the_mean_input_gram_matrix(make_hparams):
    h = make_hparams(GPTQ_CALIBRATION_BATCHES=3)
    torch.manual_seed(0)
    model = tg.build_model(h, torch.device("cpu"))
    model.looping = True
    model.train()
    H = tg.collect_hessians(model, h, torch.device("cpu"))
    assert model.capture is None and model.training  # the model is handed back as it came
    flat = tg.unbank_state(model.state_dict(), h.num_layers)
    assert set(H) == {n for n in flat if n.startswith("blocks.")} | {"tok_emb.weight"}
    for i in range(h.num_layers):  # Q, K and V read one input: one matrix, shared
        assert H[f"blocks.{i}.attn.c_q.weight"] is H[f"blocks.{i}.attn.c_k.weight"] is H[f"blocks.{i}.attn.c_v.weight"]
    for name, m in H.items():
        assert m.shape == (flat[name].size(1),) * 2 and torch.allclose(m, m.T), name
        assert torch.linalg.eigvalsh(m.double()).min() > -1e-6 * m.diagonal().max(), name
    # the tied head's Hessian from the same calibration windows, by hand
    loader = tg.ShuffledSequenceLoader(h.train_files, h.train_seq_len)
    want = torch.zeros(h.model_dim, h.model_dim)
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            x, _ = loader.next_batch(h.local_batch_tokens // h.train_seq_len)
            hid = model.hidden(x).reshape(-1, h.model_dim)
            want += hid.T @ hid
    assert torch.allclose(H["tok_emb.weight"], want / 3, rtol=1e-4, atol=1e-5)


def test_write_artifact_writes_what_it_counts(make_hparams):
    # MODEL_DIM 256: the MLP matrices (512 x 256) go through int6 GPTQ, the embedding through int8, the rest fp16
    h = make_hparams(MODEL_DIM=256, COMPRESSOR="lzma")
    torch.manual_seed(0)
    model = tg.build_model(h, torch.device("cpu"))
    model.looping = True
    ptz = os.path.join(h.artifact_dir, "final_model.int6.ptz")
    info = tg.write_artifact(h, model, "x = 1\n", ptz, torch.device("cpu"), _quiet, None)
    stub = os.path.join(h.artifact_dir, "train_gpt.min.py")
    assert os.path.getsize(ptz) == info["model_bytes"] and os.path.getsize(stub) == info["code_bytes"]
    assert info["total_bytes"] == info["model_bytes"] + info["code_bytes"] <= h.artifact_limit_bytes
    assert "under" in info["report"] and "gptq (int6)" in info["report"]
    with open(ptz, "rb") as f:
        w, meta = tg.deserialize_quantized(f.read())
    assert {n for n, m in meta.items() if m["tag"] == "gptq (int6)"} == {
        f"blocks.{i}.mlp.{k}.weight" for i in range(h.num_layers) for k in ("fc", "proj")}
    fresh = tg.build_model(h, torch.device("cpu"))
    with open(ptz, "rb") as f:
        tg.load_artifact(f.read(), fresh)
    original = model.state_dict()
    for name, t in fresh.state_dict().items():  # the loaded model is the quantized one, tensor by tensor
        if not original[name].abs().max() > 0:  # zero-initialised (O, MLP-down) stay zero
            assert not t.abs().max() > 0, name
            continue
        err = (t.float() - original[name].float()).pow(2).mean().sqrt() / original[name].float().pow(2).mean().sqrt()
        if name in ("mlp_up_bank", "mlp_down_bank", "tok_emb.weight"):  # GPTQ int6 / int8: rounded, a little
            assert 0 < err < 0.25, (name, err)
        else:  # fp16 passthrough
            assert err < 1e-3, (name, err)


def test_write_artifact_over_the_limit_writes_it_and_autofit_makes_it_fit(make_hparams):
    h = make_hparams(MODEL_DIM=256, COMPRESSOR="lzma")
    torch.manual_seed(0)
    model = tg.build_model(h, torch.device("cpu"))
    device, ptz = torch.device("cpu"), os.path.join(h.artifact_dir, "a.ptz")
    total = tg.write_artifact(h, model, "x = 1\n", ptz, device, _quiet, None)["total_bytes"]
    tight = make_hparams(MODEL_DIM=256, COMPRESSOR="lzma", ARTIFACT_LIMIT_BYTES=total - 2000, ARTIFACT_AUTOFIT=0)
    over = tg.write_artifact(tight, model, "x = 1\n", ptz, device, _quiet, None)
    assert over["total_bytes"] == total > tight.artifact_limit_bytes and os.path.getsize(ptz) == over["model_bytes"]
    assert "OVER" in over["report"]
    with pytest.raises(tg.ArtifactTooLarge, match="ARTIFACT_AUTOFIT=1"):
        tg.check_artifact_size(over["total_bytes"], tight.artifact_limit_bytes, over["report"])
    scored = []

    def evaluate(name):
        scored.append(name)
        return {"val_bpb": float(len(scored))}

    fit = make_hparams(MODEL_DIM=256, COMPRESSOR="lzma", ARTIFACT_LIMIT_BYTES=total - 2000, ARTIFACT_AUTOFIT=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = tg.write_artifact(fit, model, "x = 1\n", ptz, device, _quiet, evaluate)
    assert info["total_bytes"] <= fit.artifact_limit_bytes and info["autofit_clip_factor"] > 1
    assert len(scored) == 2 and info["autofit_bpb_cost"] == 1.0  # scored at x1 and at the factor found
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights handed back


def test_group_clip_sigmas_set_the_scale_of_their_matrices_only():
    """MLP_CLIP_SIGMAS / ATTN_CLIP_SIGMAS (passed as group_clip_sigmas): SDClip's scale is
    sigmas * std / r, so doubling the MLP's sigmas doubles its scales; the embedding keeps its own."""
    state, hessians = small_state()
    w, _ = tg.quantize_state_dict(state, hessians, 6, 12.85, 8, 20.0)
    w2, _ = tg.quantize_state_dict(state, hessians, 6, 12.85, 8, 20.0, group_clip_sigmas={".mlp.": 25.7})
    torch.testing.assert_close(w2["blocks.0.mlp.fc.weight.scale"].float(), 2 * w["blocks.0.mlp.fc.weight.scale"].float(),
                               rtol=2e-3, atol=0)
    assert torch.equal(w2["tok_emb.weight.scale"], w["tok_emb.weight.scale"])
    h = tg.Hyperparameters(env={"MLP_CLIP_SIGMAS": "14", "ATTN_CLIP_SIGMAS": "11"})
    assert (h.mlp_clip_sigmas, h.attn_clip_sigmas) == (14.0, 11.0)
    assert tg.Hyperparameters(env={}).mlp_clip_sigmas == 0  # default: MATRIX_CLIP_SIGMAS for every matrix


def test_lqer_corrects_the_largest_residuals_and_round_trips():
    """LQER_TOP_K=1: the GPTQ'd matrix with the largest residual gets a rank-r correction (int2 A, int4 B
    in groups) that lowers its error; the others are untouched; the factors survive serialization."""
    state, (w, meta) = quantize_small()
    plain = tg.dequantize_state_dict(w, meta)
    residual = {n: (state[n].float() - plain[n].float()).norm().item() for n in ("tok_emb.weight",
                                                                                 "blocks.0.mlp.fc.weight")}
    picked = tg.lqer_correct(state, w, meta, top_k=1, rank=4, group=64)
    assert picked == [max(residual, key=residual.get)]
    name = picked[0]
    assert meta[name]["lqer"] == [4, state[name].shape[1]]
    a, b = w[name + ".lqer_a"], w[name + ".lqer_b"]
    assert a.dtype == b.dtype == torch.int8 and a.shape == (state[name].shape[0], 4)
    assert a.min() >= -2 and a.max() <= 1 and b.min() >= -8 and b.max() <= 7 and b.shape[1] == 64
    assert w[name + ".lqer_b_scale"].dtype == torch.float16 and w[name + ".lqer_b_scale"].numel() == b.shape[0]
    blob = tg.serialize_quantized(w, meta, "lzma")
    out = tg.dequantize_state_dict(*tg.deserialize_quantized(blob))
    after = (state[name].float() - out[name].float()).norm().item()
    assert after < residual[name]
    other = next(n for n in residual if n != name)
    assert torch.equal(out[other], plain[other])
    assert tg.stored_bytes_by_kind(w, meta)["LQER factors"] == a.numel() + b.numel() + 2 + 2 * b.shape[0]


def test_lqer_recovers_a_low_rank_residual():
    """A residual that is exactly rank 4 (weights on the grid plus a rank-4 term) is partly removed;
    what is left is the factors' coarse rounding (A has four levels)."""
    torch.manual_seed(0)
    q = torch.round(torch.randn(256, 128) * 2).clamp(-31, 31)
    low = torch.randn(256, 4) @ torch.randn(4, 128) * 1e-3
    state = {"m": q * 0.01 + low}
    w = {"m.q": q.to(torch.int8), "m.scale": torch.full((256,), 0.01).half()}
    meta = {"m": {"tag": "gptq (int6)", "dtype": "float32"}}
    before = (state["m"] - tg.dequantize_state_dict(w, meta)["m"]).norm()
    tg.lqer_correct(state, w, meta, top_k=1, rank=4, group=64)
    after = (state["m"] - tg.dequantize_state_dict(w, meta)["m"]).norm()
    assert after < 0.75 * before, (after, before)  # 0.37 -> 0.25: four levels in A are coarse


def test_awq_lite_picks_the_most_salient_column_group():
    """Saliency of a column: its input's RMS (sqrt of the Hessian diagonal) times its mean |weight|."""
    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(64, 256, generator=g), "b": torch.randn(64, 256, generator=g)}
    hessians = {"a": torch.eye(256), "b": torch.eye(256)}
    hessians["b"][128:192, 128:192] *= 9  # inputs 3x larger in b's third group
    state["a"][:, 0:64] *= 2  # weights 2x larger in a's first group: less than 3x
    assert tg.awq_lite_groups(state, hessians, ["a", "b"], 1, 64) == {"b": [128]}
    assert tg.awq_lite_groups(state, hessians, ["a", "b"], 2, 64) == {"b": [128], "a": [0]}


def test_awq_lite_quantizes_its_group_finer_in_the_same_solve():
    state, hessians = small_state()
    name = "blocks.0.mlp.fc.weight"
    w0, meta0 = tg.quantize_state_dict(state, hessians, 6, 12.85, 8, 20.0)
    w, meta = tg.quantize_state_dict(state, hessians, 6, 12.85, 8, 20.0, fine_groups=1, fine_group_size=64)
    # the int8 embedding is not a candidate: only matrices below AWQ_LITE_BITS are
    assert name + ".fine_scale" in w and "tok_emb.weight.fine_scale" not in w
    (start, size), = w[name + ".fine_cols"].tolist()
    assert size == 64 and start % 64 == 0
    cols = torch.zeros(256, dtype=torch.bool)
    cols[start:start + 64] = True
    q = w[name + ".q"]
    assert q[:, ~cols].abs().max() <= 31 < q[:, cols].abs().max() <= 127
    out = tg.dequantize_state_dict(*tg.deserialize_quantized(tg.serialize_quantized(w, meta, "lzma")))
    plain = tg.dequantize_state_dict(w0, meta0)
    err = lambda d, c: (d[name].float() - state[name].float())[:, c].norm().item()  # noqa: E731
    assert err(out, cols) < 0.3 * err(plain, cols)  # 127 levels instead of 31 on those columns
    assert tg.stored_bytes_by_kind(w, meta)["AWQ-lite scales"] == 320 * 2 + 2 * 4


def test_gptq_fine_columns_batched_match_one_by_one():
    ws = torch.randn(2, 48, 80, generator=torch.Generator().manual_seed(0))
    hs = torch.stack([correlated_hessian(80, seed=i) for i in range(2)])
    mask = torch.zeros(2, 80, dtype=torch.bool)
    mask[0, 16:32] = True
    qb, sb, fb = tg.gptq_quantize(ws, hs, 12.85, 6, block_size=32, fine_cols=mask)
    for i in range(2):
        q, s, f = tg.gptq_quantize(ws[i], hs[i], 12.85, 6, block_size=32, fine_cols=mask[i])
        assert torch.equal(s, sb[i]) and torch.equal(f, fb[i])
        assert (q != qb[i]).float().mean() < 1e-3
    # the fine columns' levels are ~4x finer (127 against 31 over the same clip): their values spread wider
    assert qb[1].abs().max() <= 31 and qb[0, :, 16:32].abs().max() > 2 * qb[0][:, ~mask[0]].abs().max()


def test_row_reorder_is_exact_and_groups_similar_rows():
    """ROW_REORDER: rows stored in a nearest-neighbour chain, put back exactly when dequantized; on a
    matrix of noisy copies of a few prototype rows, shuffled, the chain brings copies together and the
    stored bytes compress smaller."""
    g = torch.Generator().manual_seed(0)
    protos = torch.randint(-31, 32, (8, 128), generator=g)
    rows = protos[torch.randint(0, 8, (512,), generator=g)] + torch.randint(-1, 2, (512, 128), generator=g)
    w = {"m.q": rows.clamp(-31, 31).to(torch.int8), "m.scale": torch.rand(512, generator=g).half(),
         # an LQER correction (rank 4, B in 8 groups of 64): its A is row-aligned and must move with the rows
         "m.lqer_a": torch.randint(-2, 2, (512, 4), generator=g).to(torch.int8), "m.lqer_a_scale": torch.tensor(0.01).half(),
         "m.lqer_b": torch.randint(-8, 8, (8, 64), generator=g).to(torch.int8), "m.lqer_b_scale": torch.full((8,), 0.01).half()}
    meta = {"m": {"tag": "gptq (int6)", "dtype": "float32", "lqer": [4, 128]}}
    before = tg.dequantize_state_dict(w, meta)["m"]
    plain_blob = tg.serialize_quantized(w, meta, "lzma")
    tg.reorder_rows(w, ["m"])
    order = w["m.row_order"].long()
    assert w["m.row_order"].dtype == torch.int16 and sorted(order.tolist()) == list(range(512)) and order[0] == 0
    assert torch.equal(tg.dequantize_state_dict(w, meta)["m"], before)
    blob = tg.serialize_quantized(w, meta, "lzma")
    assert torch.equal(tg.dequantize_state_dict(*tg.deserialize_quantized(blob))["m"], before)
    assert len(blob) < len(plain_blob)
    assert tg.stored_bytes_by_kind(w, meta)["row orders"] == 512 * 2
    h = tg.Hyperparameters(env={"ROW_REORDER": "1"})
    assert h.row_reorder and any(k in "blocks.3.mlp.fc.weight" for k in tg.ROW_REORDER_NAMES)


def test_rows_laid_end_to_end_are_cut_at_each_row_and_each_bos():
    """The norm tweak packs its calibration rows with _packed_row: no segment crosses a row start."""
    x = torch.tensor([[5, tg.BOS_ID, 7, 8], [9, 9, tg.BOS_ID, 3]])
    ids, cu = tg._packed_row(list(x), x.numel(), max_doc_len=64)
    assert torch.equal(ids, x.reshape(-1))
    assert cu.tolist()[:5] == [0, 1, 4, 6, 8] and set(cu.tolist()[5:]) <= {8}


def test_quant_tweak_moves_only_float_tensors_lowers_the_loss_and_hands_the_model_back(make_hparams):
    """QUANT_TWEAK_STEPS: with the matrices at their quantized values, Adam on the tensors the artifact
    keeps in float lowers the training loss; the GPTQ'd tensors are the untweaked ones byte for byte,
    the float ones change, and the model has its own weights back afterwards."""
    h = make_hparams(MODEL_DIM=256, COMPRESSOR="lzma")
    tweak = make_hparams(MODEL_DIM=256, COMPRESSOR="lzma", QUANT_TWEAK_STEPS=12, QUANT_TWEAK_LR=1e-2,
                         QUANT_TWEAK_BATCH_TOKENS=512)
    torch.manual_seed(0)
    model = tg.build_model(h, torch.device("cpu"))
    model.looping = True
    with torch.no_grad():  # non-zero O and MLP-down, so every float tensor reaches the loss
        model.qo_bank[h.num_layers:].normal_(0, 0.05)
        model.mlp_down_bank.normal_(0, 0.05)
    hessians = tg.collect_hessians(model, h, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.regions = marker = ("compiled blocks would trace again", None)  # the tweak runs the plain blocks
    lines = []
    w0, meta = tg.quantize_model(model, h, hessians)
    w1, meta1 = tg.quantize_model(model, tweak, hessians, log=lines.append)
    assert meta1 == meta and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.regions is marker
    assert all(p.grad is None for p in model.parameters())
    moved = [n for n, info in meta.items() if info["tag"] == "passthrough (float16)" and not torch.equal(w0[n], w1[n])]
    assert "attn_scale" in moved and "q_gain" in moved
    for n, info in meta.items():
        if info["tag"].startswith("gptq"):
            assert torch.equal(w0[n + ".q"], w1[n + ".q"]) and torch.equal(w0[n + ".scale"], w1[n + ".scale"]), n
    assert len(lines) == 1 and lines[0].startswith("quant_tweak: 12 steps")

    def loss_of(w):  # the mean training loss of the quantized model with these float tensors
        fresh = tg.build_model(h, torch.device("cpu"))
        fresh.load_state_dict(tg.rebank_state(tg.dequantize_state_dict(w, meta), h.num_layers))
        fresh.looping = True
        loader = tg.ShuffledSequenceLoader(h.train_files, h.train_seq_len, rank=1)  # other windows
        total = 0.0
        with torch.no_grad():
            for _ in range(4):
                x, y = loader.next_batch(2)
                ids, cu = tg._packed_row(list(x), x.numel(), h.train_seq_len)
                total += fresh(ids, y.reshape(-1), cu, h.train_seq_len).mean().item()
        return total / 4

    assert loss_of(w1) < loss_of(w0)

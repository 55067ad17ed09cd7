"""MODEL: shapes and parameter count of the record's GPT, the virtual layer order, document isolation
in packed rows, attention (SDPA per segment, GQA, XSA), partial RoPE, U-Net skips, two-lane parallel
residuals, bank <-> per-layer names, and the configuration checks that guard the architecture.

CPU only: tiny models (4 layers, width 64), cast to fp32 where a check is exact math. The default
model is only built on the meta device (no forward: it is slow on CPU).
Run: python3 -m pytest -q tests/test_model.py
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from train_gpt import ConfigError, Hyperparameters

VOCAB = 512
TINY_MODEL_ENV = {
    "NUM_LAYERS": "4", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MLP_MULT": "2",
    "LOOP_START": "1", "LOOP_END": "2", "PARALLEL_START_LAYER": "3", "XSA_LAST_N": "2", "ROPE_DIMS": "8",
    "VOCAB_SIZE": str(VOCAB), "TRAIN_SEQ_LEN": "64", "EVAL_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "1024",
    "VAL_BATCH_TOKENS": "512", "GPTQ_CALIBRATION_BATCHES": "2",
}


def tiny_hparams(**overrides) -> Hyperparameters:
    env = dict(TINY_MODEL_ENV)
    env.update({k: str(v) for k, v in overrides.items()})
    return Hyperparameters(env=env)


def tiny_model(seed: int = 0, randomize: bool = True, fp32: bool = True, backend: str = "sdpa", device="cpu",
               **overrides) -> tg.GPT:
    """A tiny GPT. randomize: the zero-initialised output matrices and every control tensor get random
    values, so that every path of the forward matters. fp32: everything fp32 (exact math);
    otherwise the GPU training dtypes, tok_emb bf16 and so bf16 activations, whatever the device."""
    torch.manual_seed(seed)
    model = tg.GPT(tiny_hparams(**overrides), backend).to(device)
    if randomize:
        g = torch.Generator().manual_seed(seed + 1)
        L = model.num_layers

        def rand(t, scale, shift=0.0):
            return (shift + scale * torch.randn(t.shape, generator=g)).to(t.device, t.dtype)

        with torch.no_grad():
            model.qo_bank[L:] = rand(model.qo_bank[L:], 0.1)
            model.mlp_down_bank.copy_(rand(model.mlp_down_bank, 0.05))
            model.tok_emb.weight.copy_(rand(model.tok_emb.weight, 1.0))
            model.q_gain.copy_(rand(model.q_gain, 0.5, 2.0))
            for p in (model.attn_scale, model.mlp_scale, model.skip_weights, model.parallel_resid_lambdas):
                p.copy_(rand(p, 0.3, 1.0))
            for p in (model.resid_mix, model.skip_gates, model.parallel_post_lambdas):
                p.copy_(rand(p, 0.5) + p)
    return model.float() if fp32 else model


def packed_row(doc_lens, vocab=VOCAB, seed=0, cut_first=True):
    """A row of documents (BOS + random tokens) of the given lengths, plus one more token for the
    targets. cut_first: the row starts inside a document (no BOS at position 0)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(doc_lens)
    tokens = torch.randint(2, vocab, (n + 1,), generator=g)
    starts = np.concatenate([[0], np.cumsum(doc_lens)[:-1]])
    for i, s in enumerate(starts):
        if i > 0 or not cut_first:
            tokens[s] = tg.BOS_ID
    tokens[n] = tg.BOS_ID  # the next row's document
    return tokens, [int(s) for s in starts]


# ---------------------------------------------------------------------------------------------
# Shapes, parameter count and layer order at the defaults (the record's, plus SmearGate and the
# sparse attention gate)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_model():
    with torch.device("meta"):
        return tg.GPT(Hyperparameters(env={}))


def test_default_parameter_count_and_shapes(default_model):
    m = default_model
    assert sum(p.numel() for p in m.parameters()) == 35_944_602 + 11 * 8 * 12 + 12 + 1  # + the two gates
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {
        "tok_emb.weight": (8192, 512), "qo_bank": (22, 512, 512), "kv_bank": (22, 256, 512),
        "mlp_up_bank": (11, 2048, 512), "mlp_down_bank": (11, 512, 2048), "q_gain": (11, 8),
        "attn_scale": (11, 512), "mlp_scale": (11, 512), "resid_mix": (11, 2, 512), "skip_weights": (8, 512),
        "skip_gates": (8, 512), "parallel_post_lambdas": (11, 2, 2), "parallel_resid_lambdas": (11, 2),
        "attn_gate": (11, 8, 12), "smear_w": (12,), "smear_lambda": (1,)}
    # tok_emb stays bf16, banks and control tensors are fp32
    assert {n for n, p in m.named_parameters() if p.dtype == torch.bfloat16} == {"tok_emb.weight"}
    assert all(p.dtype == torch.float32 for n, p in m.named_parameters() if n != "tok_emb.weight")


def test_default_layer_order(default_model):
    m = default_model
    assert m.layer_order(looping=True) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert m.layer_order(looping=False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    assert sum(map(len, m.layer_order(looping=True))) == 17  # virtual layers (slots) with looping on
    assert sum(map(len, m.layer_order(looping=False))) == 11
    assert m.looping is False and m.layer_order() == m.layer_order(looping=False)  # off until training turns it on


def test_init_values_follow_the_spec():
    m = tiny_model(randomize=False, fp32=False)
    L = m.num_layers
    assert m.tok_emb.weight.dtype == torch.bfloat16
    assert abs(m.tok_emb.weight.float().std().item() - 0.005) < 0.0005
    assert not m.qo_bank[L:].any() and not m.mlp_down_bank.any()  # O and MLP-down start at zero
    for bank, idx in ((m.qo_bank, range(L)), (m.kv_bank, range(2 * L)), (m.mlp_up_bank, range(L))):
        for i in idx:  # orthogonal slices: W W^T = I (rows <= cols) or W^T W = I
            w = bank[i].detach().double()
            gram = w @ w.T if w.size(0) <= w.size(1) else w.T @ w
            torch.testing.assert_close(gram, torch.eye(gram.size(0), dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.equal(m.q_gain, torch.full_like(m.q_gain, 5.25))
    assert torch.equal(m.resid_mix[:, 0], torch.ones(L, 64)) and not m.resid_mix[:, 1].any()
    assert torch.equal(m.skip_weights, torch.ones_like(m.skip_weights)) and not m.skip_gates.any()
    assert torch.equal(m.parallel_post_lambdas, torch.ones(L, 2, 2))
    assert torch.equal(m.parallel_resid_lambdas, torch.full((L, 2), 1.1))
    torch.testing.assert_close(m.ln_scales, torch.tensor([1 / math.sqrt(i + 1) for i in range(L)]))


def test_build_model_dtypes():
    """On CUDA the training dtypes (tok_emb bf16, the rest fp32); on CPU all fp32 (slow bf16 matmuls)."""
    h = tiny_hparams()
    model = tg.build_model(h, torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    if torch.cuda.is_available():
        model = tg.build_model(h, torch.device("cuda"))
        assert {n for n, p in model.named_parameters() if p.dtype != torch.float32} == {"tok_emb.weight"}
        assert model.tok_emb.weight.dtype == torch.bfloat16


def test_tiny_layer_order_and_forward_visits_it():
    m = tiny_model()
    assert m.layer_order(looping=False) == ([0, 1], [2, 3])
    assert m.layer_order(looping=True) == ([0, 1, 2, 1], [2, 1, 2, 3])
    assert m.skip_weights.size(0) == 4  # min(#encoder, #decoder) of the looped layout
    ids = torch.randint(2, VOCAB, (1, 16))
    for looping in (False, True):
        m.looping = looping
        visited = []
        original = m.block_weights
        m.block_weights = lambda l, dtype, **kw: visited.append(l) or original(l, dtype, **kw)  # read once per block
        m.hidden(ids)
        del m.block_weights
        encoder, decoder = m.layer_order()
        assert visited == encoder + decoder


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def dense_causal_reference(q, k, v):
    """Plain causal attention of one sequence, q [T, Hq, D], k/v [T, Hkv, D]; query head h reads
    KV head h // (Hq / Hkv). Computed head by head in float64."""
    T, Hq, D = q.shape
    group = Hq // k.size(1)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    out = torch.empty(T, Hq, D, dtype=torch.float64)
    for h in range(Hq):
        qh, kh, vh = q[:, h].double(), k[:, h // group].double(), v[:, h // group].double()
        scores = (qh @ kh.T / math.sqrt(D)).masked_fill(~mask, float("-inf"))
        out[:, h] = scores.softmax(-1) @ vh
    return out


def random_qkv(T, Hq=4, Hkv=2, D=16, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, Hq, D, generator=g), torch.randn(B, T, Hkv, D, generator=g),
            torch.randn(B, T, Hkv, D, generator=g))


def cu_from_lengths(lengths, bucket=tg.CU_SEQLENS_BUCKET):
    cu = np.concatenate([[0], np.cumsum(lengths)])
    cu = np.concatenate([cu, np.full(-len(cu) % bucket, cu[-1])])
    return torch.from_numpy(cu.astype(np.int32))


def test_sdpa_segments_single_document_is_dense_causal():
    q, k, v = random_qkv(37)
    ref = dense_causal_reference(q[0], k[0], v[0])
    y = tg.causal_attention(q, k, v, cu_from_lengths([37]), 37, "sdpa")
    assert y.shape == q.shape
    torch.testing.assert_close(y[0].double(), ref, atol=1e-5, rtol=1e-5)
    # no cu_seqlens: every row of a dense batch is one causal sequence
    q, k, v = random_qkv(23, B=2, seed=1)
    y = tg.causal_attention(q, k, v, None, 0, "sdpa")
    for b in range(2):
        torch.testing.assert_close(y[b].double(), dense_causal_reference(q[b], k[b], v[b]), atol=1e-5, rtol=1e-5)


def test_sdpa_segments_are_per_document_attention():
    lengths = [1, 12, 30, 2, 19]  # padded to 64 boundaries with zero-length segments
    q, k, v = random_qkv(sum(lengths), seed=2)
    y = tg.causal_attention(q, k, v, cu_from_lengths(lengths), max(lengths), "sdpa")
    start = 0
    for n in lengths:
        ref = dense_causal_reference(q[0, start:start + n], k[0, start:start + n], v[0, start:start + n])
        torch.testing.assert_close(y[0, start:start + n].double(), ref, atol=1e-5, rtol=1e-5)
        start += n
    # a single document's first token sees only itself: its output is its own value vector
    for s in np.cumsum([0] + lengths[:-1]):
        for h in range(4):
            torch.testing.assert_close(y[0, s, h], v[0, s, h // 2], atol=1e-6, rtol=1e-6)


def _backend_params():
    out = []
    for backend in ("sdpa", "varlen", "fa3", "fa4"):
        try:
            tg.pick_attention_backend(backend)
            available = True
        except ConfigError:
            available = False
        reason = f"ATTN_BACKEND={backend} is not available here"
        out.append(pytest.param(backend, marks=pytest.mark.skipif(not available, reason=reason)))
    return out


@pytest.mark.parametrize("smear", [0, 1])
@pytest.mark.parametrize("backend", _backend_params())
def test_documents_are_isolated_in_a_packed_row(backend, smear):
    """SMEAR_GATE=1 too: its share of the previous token never flows into a document's BOS."""
    device = "cpu" if backend == "sdpa" else "cuda"
    model = tiny_model(backend=backend, device=device, fp32=device == "cpu", SMEAR_GATE=smear)  # CUDA: bf16
    if smear:
        with torch.no_grad():
            model.smear_lambda.fill_(0.8)
            model.smear_w.copy_(torch.linspace(-1, 1, model.smear_w.numel()))
    model.looping = True
    # the row starts inside a document; one document (90 tokens) is longer than TRAIN_SEQ_LEN=64
    lengths = [7, 25, 1, 90, 40, 3, 26]
    tokens, starts = packed_row(lengths)
    x = tokens[:-1]
    cu = torch.from_numpy(tg.build_cu_seqlens(x.numpy(), 64)[0]).to(device)

    def losses(tok):
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            return model(tok[:-1].to(device), tok[1:].to(device), cu, 64).float().cpu()

    base = losses(tokens)
    assert base.shape == x.shape and torch.isfinite(base).all()
    tol = 1e-5 if device == "cpu" else 2e-2
    for doc in (1, 4, 6):  # first BOS'd doc, a middle one, the last one
        s, e = starts[doc], starts[doc] + lengths[doc]
        changed = tokens.clone()
        g = torch.Generator().manual_seed(100 + doc)
        changed[s + 1:e] = torch.randint(2, VOCAB, (e - s - 1,), generator=g)  # keep its BOS
        new = losses(changed)
        inside = torch.zeros(len(x), dtype=torch.bool)
        inside[s:e] = True
        torch.testing.assert_close(new[~inside], base[~inside], atol=tol, rtol=0)
        assert (new[inside] - base[inside]).abs().max() > 0.05
    # and without cu_seqlens the same change reaches the later documents (the check can fail)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        dense = model(x[None].to(device), tokens[1:][None].to(device)).float().cpu()[0]
        s, e = starts[1], starts[1] + lengths[1]
        changed = tokens.clone()
        changed[s + 1:e] = (changed[s + 1:e] + 1) % (VOCAB - 2) + 2
        dense_new = model(changed[:-1][None].to(device), changed[1:][None].to(device)).float().cpu()[0]
    assert (dense_new[e:] - dense[e:]).abs().max() > 1e-3


def test_exclusive_self_attention_removes_own_value_direction():
    g = torch.Generator().manual_seed(3)
    y = torch.randn(2, 9, 4, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 9, 2, 16, generator=g, dtype=torch.float64)
    out = tg.exclusive_self_attention(y, v)
    assert out.shape == y.shape
    for h in range(4):
        v_hat = v[..., h // 2, :] / v[..., h // 2, :].norm(dim=-1, keepdim=True)
        proj = (y[..., h, :] * v_hat).sum(-1, keepdim=True)
        torch.testing.assert_close(out[..., h, :], y[..., h, :] - proj * v_hat, atol=1e-12, rtol=0)
        assert (out[..., h, :] * v_hat).sum(-1).abs().max() < 1e-12  # orthogonal to its own KV head
        other = v[..., 1 - h // 2, :]  # but not to the other KV head's value direction
        assert (out[..., h, :] * other).sum(-1).abs().max() > 1e-3
    # a head output already orthogonal to v is unchanged; one along v is removed entirely
    torch.testing.assert_close(tg.exclusive_self_attention(out, v), out, atol=1e-12, rtol=0)
    torch.testing.assert_close(tg.exclusive_self_attention(v.repeat_interleave(2, dim=-2) * 3.0, v),
                               torch.zeros_like(y), atol=1e-12, rtol=0)


def test_rope_half_split_on_first_dims():
    T, H, D, R, base = 50, 3, 16, 8, 10000.0
    cos, sin = tg.rotary_tables(T, R, base, "cpu")
    assert cos.shape == sin.shape == (T, R // 2)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, T, H, D, generator=g)
    out = tg.apply_rope(x, cos, sin)
    assert torch.equal(out[..., R:], x[..., R:])  # the remaining dims pass through
    half = R // 2
    for t in (0, 1, 17, 49):
        for i in range(half):
            theta = t * base ** (-2 * i / R)
            x1, x2 = x[:, t, :, i].double(), x[:, t, :, i + half].double()
            torch.testing.assert_close(out[:, t, :, i].double(), x1 * math.cos(theta) + x2 * math.sin(theta),
                                       atol=2e-5, rtol=0)
            torch.testing.assert_close(out[:, t, :, i + half].double(), -x1 * math.sin(theta) + x2 * math.cos(theta),
                                       atol=2e-5, rtol=0)
    torch.testing.assert_close(out[:, 0], x[:, 0])  # position 0 is not rotated
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    pair_norms = lambda z: z[..., :half] ** 2 + z[..., half:R] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norms(out), pair_norms(x), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_offset():
    T, D, R = 64, 16, 8
    cos, sin = tg.rotary_tables(T, R, 10000.0, "cpu")
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    qr = tg.apply_rope(q.expand(1, T, 1, D), cos.double(), sin.double())[0, :, 0]
    kr = tg.apply_rope(k.expand(1, T, 1, D), cos.double(), sin.double())[0, :, 0]
    scores = qr @ kr.T  # [query position, key position]
    for offset in (0, 1, 5, 30):
        diag = torch.diagonal(scores, -offset)  # q at m, k at m - offset
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), atol=1e-4, rtol=1e-5)
    assert abs(scores[5, 0] - scores[5, 4]) > 1e-3  # different offsets, different scores


def test_attention_backend_choice_on_cpu():
    if not torch.cuda.is_available():
        assert tg.pick_attention_backend() == "sdpa"
        for backend in ("varlen", "fa3", "fa4"):
            with pytest.raises(ConfigError, match=f"ATTN_BACKEND={backend}"):
                tg.pick_attention_backend(backend)
    assert tg.pick_attention_backend("sdpa") == "sdpa"


class ReferenceFA4:
    """Stands in for flash_attn.cute.interface on CPU: the two functions the fa4 custom ops call,
    with FlashAttention 4's signatures and layouts, computed per segment in fp64."""

    @staticmethod
    def _segments(q, k, v, cu_seqlens):
        """(start, end, q, k, v, probabilities) per segment, heads first, K/V expanded to Q's heads."""
        group, scale = q.size(1) // k.size(1), 1 / math.sqrt(q.size(-1))
        for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            qs, ks, vs = (t[a:b].double().transpose(0, 1) for t in (q, k.repeat_interleave(group, 1),
                                                                    v.repeat_interleave(group, 1)))
            s = (qs @ ks.mT * scale).masked_fill(~torch.ones(b - a, b - a).tril().bool(), -math.inf)
            yield a, b, qs, ks, vs, s

    @classmethod
    def _flash_attn_fwd(cls, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, return_lse):
        assert causal and return_lse and cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k
        out, lse = torch.zeros_like(q), q.new_zeros(q.size(1), q.size(0), dtype=torch.float32)
        for a, b, _, _, vs, s in cls._segments(q, k, v, cu_seqlens_q):
            lse[:, a:b] = s.logsumexp(-1).float()
            out[a:b] = (s.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
        return out, lse, None, None, None

    @classmethod
    def _flash_attn_bwd(cls, q, k, v, out, grad, lse, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        """The textbook attention backward, written out (custom-op kernels run without autograd)."""
        group, scale = q.size(1) // k.size(1), 1 / math.sqrt(q.size(-1))
        dq = torch.zeros_like(q, dtype=torch.float64)
        dk, dv = (torch.zeros(q.shape, dtype=torch.float64) for _ in range(2))
        for a, b, qs, ks, vs, s in cls._segments(q, k, v, cu_seqlens_q):
            p, do, o = s.softmax(-1), grad[a:b].double().transpose(0, 1), out[a:b].double().transpose(0, 1)
            ds = p * (do @ vs.mT - (do * o).sum(-1, keepdim=True))
            dq[a:b] = (ds @ ks * scale).transpose(0, 1)
            dk[a:b] = (ds.mT @ qs * scale).transpose(0, 1)
            dv[a:b] = (p.mT @ do).transpose(0, 1)
        dk, dv = (t.unflatten(1, (k.size(1), group)).sum(2) for t in (dk, dv))  # GQA: sum over each group
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def test_fa4_custom_op_forward_backward_and_registration(monkeypatch):
    """The fa4 backend's wiring (custom op, fake shapes, autograd, the dense-row path) on CPU, with the
    kernels replaced by a reference: same outputs and gradients as SDPA with the segment mask."""
    monkeypatch.setattr(tg, "_fa4_interface", lambda: ReferenceFA4)
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    cu = torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32)
    q, k, v = (torch.randn(1, sum(lengths), h, 8, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    grad = torch.randn(1, sum(lengths), 4, 8, dtype=torch.float64)
    got = tg.causal_attention(q, k, v, cu, max(lengths), "fa4")
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    ref = tg.causal_attention(q, k, v, cu, max(lengths), "sdpa")
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(got, ref)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b)
    # dense rows (TTT's layout): each row one causal document
    dq = torch.randn(3, 6, 4, 8, dtype=torch.float64)
    dk, dv = torch.randn(3, 6, 2, 8, dtype=torch.float64), torch.randn(3, 6, 2, 8, dtype=torch.float64)
    torch.testing.assert_close(tg.causal_attention(dq, dk, dv, None, 0, "fa4"),
                               tg.causal_attention(dq, dk, dv, None, 0, "sdpa"))
    # schema, fake (meta) kernel and autograd registration as torch.compile sees them
    args = (q[0].detach().requires_grad_(), k[0].detach().requires_grad_(), v[0].detach().requires_grad_(),
            cu, max(lengths))
    torch.library.opcheck(tg.fa4_varlen, args, test_utils=("test_schema", "test_autograd_registration",
                                                           "test_faketensor"))


def test_smear_gate_starts_as_the_identity_and_mixes_in_the_previous_token():
    plain, smear = tiny_model(seed=4, SMEAR_GATE=0), tiny_model(seed=4, SMEAR_GATE=1)
    assert not hasattr(plain, "smear_w") and "smear_w" not in plain.state_dict()  # off: no new tensors
    missing = smear.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["smear_lambda", "smear_w"]
    ids = torch.randint(2, VOCAB, (2, 9))
    ids[0, 4] = tg.BOS_ID
    with torch.no_grad():
        torch.testing.assert_close(smear.hidden(ids), plain.hidden(ids), rtol=0, atol=0)  # lambda = 0
        smear.smear_lambda.fill_(0.5)
        x = tg.rms_norm(smear.tok_emb(ids))
        got = smear.smear_previous(x, ids)
    share = 0.5 * 0.5  # sigmoid(0) with w = 0
    torch.testing.assert_close(got[:, 0], x[:, 0])
    torch.testing.assert_close(got[1, 1:], x[1, 1:] + share * x[1, :-1])
    torch.testing.assert_close(got[0, 4], x[0, 4])  # a BOS takes nothing from the document before it
    torch.testing.assert_close(got[0, 5], x[0, 5] + share * x[0, 4])


def attn_of(model, l, x, rope):
    """Layer l's attention sublayer on x, as its block calls it."""
    return model.attn(model.block_weights(l, x.dtype), x, rope, None, 0, None, l >= model.xsa_first)


def test_attention_output_gate_starts_open_and_scales_each_head():
    """ATTN_OUT_GATE=1: head h's output times 2 sigmoid(w_h . x), x the block's normed input; zero
    weights give exactly the model without it."""
    plain = tiny_model(seed=5, SPARSE_ATTN_GATE=0)
    gated = tiny_model(seed=5, ATTN_OUT_GATE=1, SPARSE_ATTN_GATE=0)
    gated.load_state_dict(plain.state_dict(), strict=False)
    ids = torch.randint(2, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gated.hidden(ids), plain.hidden(ids), rtol=0, atol=0)
        gated.attn_gate.normal_(0, 0.3)
        rope = tg.rotary_tables(12, gated.rope_dims, gated.rope_base, "cpu")
        x = torch.randn(2, 12, 64)
        captured = {}
        gated.capture = lambda key, t: captured.setdefault(key, t)  # the input of the output projection
        attn_of(gated, 0, x, rope)
        plain.capture = lambda key, t: captured.setdefault("plain_" + key, t)
        attn_of(plain, 0, x, rope)
    gate = 2 * torch.sigmoid(x @ gated.attn_gate[0].T)  # [2, 12, heads]
    expected = (captured["plain_blocks.0.attn.proj"].unflatten(-1, (4, 16)) * gate[..., None]).flatten(-2)
    torch.testing.assert_close(captured["blocks.0.attn.proj"], expected)
    assert not torch.allclose(gate, torch.ones_like(gate))


def test_sparse_attention_gate_reads_twelve_channels_and_starts_at_one_half():
    """SPARSE_ATTN_GATE=1: head h's output times sigmoid(scale * w_h . x[:12]), x the block's normed
    input; zero weights halve every head's output."""
    gated = tiny_model(seed=5, SPARSE_ATTN_GATE=1, SPARSE_ATTN_GATE_SCALE=0.5)
    assert gated.attn_gate.shape == (gated.num_layers, 4, 12)
    rope = tg.rotary_tables(12, gated.rope_dims, gated.rope_base, "cpu")
    x = torch.randn(2, 12, 64)
    weights = torch.randn_like(gated.attn_gate) * 0.3
    outs = []
    with torch.no_grad():
        for w in (torch.zeros_like(weights), weights):
            gated.attn_gate.copy_(w)
            captured = {}
            gated.capture = lambda key, t: captured.setdefault(key, t)  # the input of the output projection
            attn_of(gated, 0, x, rope)
            outs.append(captured["blocks.0.attn.proj"].unflatten(-1, (4, 16)))
    ungated = 2 * outs[0]  # sigmoid(0) = 1/2
    gate = torch.sigmoid(0.5 * (x[..., :12] @ weights[0].T))  # [2, 12, heads]
    torch.testing.assert_close(outs[1], ungated * gate[..., None])
    with pytest.raises(tg.ConfigError, match="two forms of one gate"):
        tg.Hyperparameters(env={"SPARSE_ATTN_GATE": "1", "ATTN_OUT_GATE": "1"}).check()


def test_asymmetric_softcap_bounds_negative_logits_separately():
    """LOGIT_SOFTCAP_NEG=c: negative logits are c * tanh(z / c), positive ones keep LOGIT_SOFTCAP;
    unset (0) it is the symmetric cap, bit for bit."""
    h = torch.randn(2, 5, 64) * 40
    sym, asym = tiny_model(seed=3), tiny_model(seed=3, LOGIT_SOFTCAP_NEG=12)
    raw = F.linear(h, sym.tok_emb.weight.float())
    torch.testing.assert_close(sym.logits(h), 30 * torch.tanh(raw / 30), rtol=0, atol=0)
    expected = torch.where(raw >= 0, 30 * torch.tanh(raw / 30), 12 * torch.tanh(raw / 12))
    torch.testing.assert_close(asym.logits(h), expected)
    assert asym.logits(h).min() >= -12 and (raw < -30).any()


# ---------------------------------------------------------------------------------------------
# Blocks: sequential, two-lane parallel, U-Net skips
# ---------------------------------------------------------------------------------------------


def _block_inputs(model, T=21, seed=6):
    g = torch.Generator().manual_seed(seed)
    D = model.qo_bank.size(-1)
    lane0, lane1, x0 = (torch.randn(1, T, D, generator=g) for _ in range(3))
    rope = tg.rotary_tables(T, model.rope_dims, model.rope_base, "cpu")
    return lane0, lane1, x0, (rope, None, 0, None)  # then xsa: l >= model.xsa_first


def test_sequential_block_formula():
    model = tiny_model()
    x, _, x0, args = _block_inputs(model)
    l = 1
    w, args = model.block_weights(l, x.dtype), args + (l >= model.xsa_first,)
    s, mix = 1 / math.sqrt(l + 1), model.resid_mix[l]
    x_in = mix[0] * x + mix[1] * x0
    x_mid = x_in + model.attn_scale[l] * model.attn(w, F.rms_norm(x_in, (64,)) * s, *args)
    expected = x_mid + model.mlp_scale[l] * model.mlp(w, F.rms_norm(x_mid, (64,)) * s, None)
    torch.testing.assert_close(model.sequential_block(w, x, x0, *args), expected, atol=1e-5, rtol=1e-5)


def test_parallel_block_formula():
    """Spec §4.2 step 5: a from RMSNorm(mix0 lane0 + mix1 x0), m from RMSNorm(lane1) (no x0), both
    from the old lanes; lane_j <- r_j lane_j + P[0, j] a + P[1, j] m."""
    model = tiny_model()
    lane0, lane1, x0, args = _block_inputs(model)
    l = 3
    w, args = model.block_weights(l, x0.dtype), args + (l >= model.xsa_first,)
    s, mix = 1 / math.sqrt(l + 1), model.resid_mix[l]
    a = model.attn_scale[l] * model.attn(w, F.rms_norm(mix[0] * lane0 + mix[1] * x0, (64,)) * s, *args)
    m = model.mlp_scale[l] * model.mlp(w, F.rms_norm(lane1, (64,)) * s, None)
    P, r = model.parallel_post_lambdas[l], model.parallel_resid_lambdas[l]
    assert len({round(float(p), 4) for p in P.detach().flatten()}) == 4  # distinct, so a transposed P is caught
    out0, out1 = model.parallel_block(w, lane0, lane1, x0, *args)
    torch.testing.assert_close(out0, r[0] * lane0 + P[0, 0] * a + P[1, 0] * m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out1, r[1] * lane1 + P[0, 1] * a + P[1, 1] * m, atol=1e-5, rtol=1e-5)

    # identity-like lambdas (P = I, r = 1): lane0 + attention of lane0, lane1 + MLP of lane1
    with torch.no_grad():
        model.parallel_post_lambdas[l] = torch.eye(2)
        model.parallel_resid_lambdas[l] = 1.0
    w = model.block_weights(l, x0.dtype)
    out0, out1 = model.parallel_block(w, lane0, lane1, x0, *args)
    torch.testing.assert_close(out0, lane0 + a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out1, lane1 + m, atol=1e-5, rtol=1e-5)
    other0, other1 = model.parallel_block(w, lane0, lane1 + 1.0, x0, *args)  # lane1 feeds only the MLP
    torch.testing.assert_close(other0, out0, atol=0, rtol=0)
    assert not torch.allclose(other1, out1)


@pytest.mark.parametrize("final_lane", ["mean", "attn", "mlp"])
def test_parallel_lanes_start_from_x_and_merge_at_the_end(final_lane):
    model = tiny_model(PARALLEL_FINAL_LANE=final_lane)
    assert model.parallel_final_lane == final_lane
    seq_out, par = [], []
    seq_block, par_block = model.sequential_block, model.parallel_block
    model.sequential_block = lambda *a: seq_out.append(seq_block(*a)) or seq_out[-1]
    model.parallel_block = lambda w, l0, l1, *a: par.append(((l0, l1), par_block(w, l0, l1, *a))) or par[-1][1]
    with torch.no_grad():
        hidden = model.hidden(torch.randint(2, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7)))
    # looping off: encoder [0, 1], decoder [2, 3]; layer 3 is the only parallel one
    assert len(seq_out) == 3 and len(par) == 1
    (in0, in1), (lane0, lane1) = par[0]
    # the lanes start as x; the last skip (encoder layer 0's output) is merged into lane0 only
    torch.testing.assert_close(in1, seq_out[2], atol=0, rtol=0)
    torch.testing.assert_close(in0, model.merge_skip(1, seq_out[2], seq_out[0]), atol=0, rtol=0)
    assert (lane0 - lane1).abs().max() > 0.1
    merged = {"mean": 0.5 * (lane0 + lane1), "attn": lane0, "mlp": lane1}[final_lane]
    torch.testing.assert_close(hidden, F.rms_norm(merged, (64,)), atol=1e-5, rtol=1e-5)


def test_no_parallel_lanes_when_disabled():
    model = tiny_model(PARALLEL_START_LAYER=0)
    model.parallel_block = None  # would fail if called
    with torch.no_grad():
        assert torch.isfinite(model.hidden(torch.randint(2, VOCAB, (1, 8)))).all()


def test_skip_merge_is_a_gated_lerp():
    model = tiny_model(randomize=False)
    g = torch.Generator().manual_seed(8)
    x, skip = torch.randn(2, 5, 64, generator=g), torch.randn(2, 5, 64, generator=g)
    for j in range(model.skip_weights.size(0)):  # at init: 0.5 x + 0.5 skip
        torch.testing.assert_close(model.merge_skip(j, x, skip), 0.5 * x + 0.5 * skip, atol=1e-6, rtol=0)
    model = tiny_model()
    w, gate = model.skip_weights[2], torch.sigmoid(model.skip_gates[2])
    torch.testing.assert_close(model.merge_skip(2, x, skip), w * skip + gate * (x - w * skip), atol=1e-5, rtol=1e-5)
    model = tiny_model(SKIP_GATES_ENABLED=0)
    torch.testing.assert_close(model.merge_skip(2, x, skip), x + model.skip_weights[2] * skip, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Whole model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("looping", [False, True])
def test_forward_backward_is_finite(looping):
    model = tiny_model(randomize=False, fp32=False)  # GPU training dtypes: bf16 embedding and activations
    model.looping = looping
    tokens, _ = packed_row([30, 50, 48])
    cu, _ = tg.build_cu_seqlens(tokens[:-1].numpy(), 64)
    loss = model(tokens[:-1], tokens[1:], torch.from_numpy(cu), 64)
    assert loss.dtype == torch.float32 and loss.shape == (128,)
    # tiny embedding at init: near-uniform predictions
    assert abs(loss.mean().item() - math.log(VOCAB)) < 0.05
    loss.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad.float()).all(), name
    # with non-zero output matrices every bank receives gradient
    model = tiny_model(fp32=False)
    model.looping = looping
    model(tokens[:-1], tokens[1:], torch.from_numpy(cu), 64).mean().backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad.float()).all(), name
        if name.endswith("_bank"):
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("looping", [False, True])
def test_fused_qkv_is_the_same_math(looping):
    """FUSED_QKV=1: Q, K and V from one matmul over the concatenated weights give the same losses and
    the same gradient for every parameter as three matmuls (fp32; only summation order differs)."""
    tokens, _ = packed_row([30, 50, 48])
    cu = torch.from_numpy(tg.build_cu_seqlens(tokens[:-1].numpy(), 64)[0])
    results = []
    for fused in (0, 1):
        model = tiny_model(FUSED_QKV=fused)
        assert model.fused_qkv == bool(fused)
        model.looping = looping
        loss = model(tokens[:-1], tokens[1:], cu, 64)
        loss.mean().backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert grads_a["kv_bank"].abs().sum() > 0 and grads_a["qo_bank"].abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp32_model_trains_on_cuda():
    """An fp32 model (model.float(), e.g. for exact checks) in training mode on CUDA: its MLP must run,
    through the fused kernel only where that supports the dtype, else eagerly."""
    model = tiny_model(device="cuda")
    tokens, _ = packed_row([30, 50, 48])
    cu = torch.from_numpy(tg.build_cu_seqlens(tokens[:-1].numpy(), 64)[0]).cuda()
    loss = model(tokens[:-1].cuda(), tokens[1:].cuda(), cu, 64)
    loss.mean().backward()
    assert torch.isfinite(loss).all() and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_batched_and_packed_forward_agree():
    """A dense batch [B, T] scores each row as one document; the same rows packed into one row with
    cu_seqlens (one segment each) give the same per-token losses, RoPE positions aside: positions run
    through the packed row, and only relative offsets matter for attention."""
    model = tiny_model()
    g = torch.Generator().manual_seed(9)
    rows = torch.randint(2, VOCAB, (3, 33), generator=g)
    dense = model(rows[:, :-1], rows[:, 1:])
    cu = cu_from_lengths([32, 32, 32])
    packed = model(rows[:, :-1].reshape(-1), rows[:, 1:].reshape(-1), cu, 32)
    torch.testing.assert_close(packed.view(3, 32), dense, atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Configuration checks of the architecture
# ---------------------------------------------------------------------------------------------




def test_regional_compilation_traces_each_kind_of_block_once_for_any_depth():
    """COMPILE_REGIONS=1 (training_model_fn): the sequential and the parallel block, each compiled
    once (traced by Dynamo; here a counting backend runs the traced graph), serve every layer with
    looping off and on, and training's loss and gradients are the plain model's."""
    model = tiny_model(seed=3, XSA_LAST_N=tiny_hparams().num_layers)  # XSA in every layer, as by default
    model.train()
    g = torch.Generator().manual_seed(4)
    ids, targets = (torch.randint(2, VOCAB, (1, 48), generator=g) for _ in range(2))
    cu = torch.tensor([0, 20, 48], dtype=torch.int32)

    def loss_and_grads():
        results = []
        for looping in (False, True):
            model.looping = looping
            model.zero_grad()
            loss = model(ids, targets, cu, 28).mean()
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        return results

    plain = loss_and_grads()
    traced = []

    def backend(gm, example_inputs):
        traced.append(gm)
        return gm.forward

    model.regions = tg.compile_blocks(model, lambda block: torch.compile(block, backend=backend, dynamic=False,
                                                                          fullgraph=True))
    try:
        compiled = loss_and_grads()
    finally:
        model.regions, model.looping = None, False
    for (loss_a, grads_a), (loss_b, grads_b) in zip(plain, compiled):
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
        assert len(grads_a) == len(grads_b)
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert len(traced) == 2, len(traced)  # one sequential, one parallel block: any layer, both depths
    h = tg.Hyperparameters(env={"COMPILE_REGIONS": "1"})
    assert tg.training_model_fn(model, h, torch.device("cpu")) is model  # eager on a CPU, blocks included
    model.regions = None


# ---------------------------------------------------------------------------------------------
# Late QAT (QAT_AT)
# ---------------------------------------------------------------------------------------------


def test_fake_quantize_is_the_export_grid_gptq_writes_without_error_feedback():
    """fake_quantize rounds to the artifact's levels and scale: GPTQ with an identity Hessian (no
    error to spread) stores exactly those q * scale."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 40, generator=g) * torch.linspace(0.01, 2.0, 24)[:, None]  # rows of other spreads
    W[3, 5] = 40.0  # an outlier beyond the clip, clamped to the top level
    for bits, sigmas in ((6, 12.85), (6, 3.0), (8, 20.0)):
        q, scale = tg.gptq_quantize(W, torch.eye(40), sigmas, bits)
        torch.testing.assert_close(tg.fake_quantize(W, sigmas, bits), q.float() * scale.float()[:, None],
                                   rtol=0, atol=0)
    fq = tg.fake_quantize(W, 3.0, 6)
    assert fq[3, 5] == 31 * tg.sdclip_scale(W, 3.0, 31)[3].float() and fq.dtype == W.dtype


def qat_loss(model, ids, targets):
    return model(ids, targets, None, 0).mean()


def test_late_qat_trains_on_the_grid_with_straight_through_gradients():
    """QAT_AT > 0: with the gate at 0 the model is the one without QAT, bit for bit; at 1 its
    training forward is that of the same weights fake-quantized, and each matrix's gradient is the
    one at those quantized weights (straight through); evaluation always sees the float weights."""
    base, qat = tiny_model(seed=3), tiny_model(seed=3, QAT_AT=0.5)
    assert base.qat is None and qat.qat is not None and float(qat.qat) == 0
    assert "qat" not in qat.state_dict() and qat.qat_sigmas["up"] == qat.qat_sigmas["q"] == 12.85
    ids = torch.randint(2, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, 1)
    base.train(), qat.train()
    assert torch.equal(qat_loss(qat, ids, targets), qat_loss(base, ids, targets))  # gate 0
    qat.qat.fill_(1.0)
    on_grid = tiny_model(seed=3)
    banks = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
    with torch.no_grad():
        for name in banks:
            bank = getattr(on_grid, name)
            bank.copy_(torch.stack([tg.fake_quantize(m, 12.85, 6) for m in bank]))
    on_grid.train()
    loss, want = qat_loss(qat, ids, targets), qat_loss(on_grid, ids, targets)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    loss.backward(), want.backward()
    for name in banks:
        torch.testing.assert_close(getattr(qat, name).grad, getattr(on_grid, name).grad, rtol=1e-4, atol=1e-6)
    qat.eval(), base.eval()
    with torch.no_grad():
        assert torch.equal(qat_loss(qat, ids, targets), qat_loss(base, ids, targets))  # eval: float weights


def test_late_qat_starts_at_its_fraction_of_the_budget():
    h = tg.Hyperparameters(env={"QAT_AT": "0.85"})
    assert not tg.qat_on_at(0.8499, h) and tg.qat_on_at(0.85, h) and tg.qat_on_at(1.0, h)
    assert not tg.qat_on_at(1.0, tg.Hyperparameters(env={}))  # default: never


# ---------------------------------------------------------------------------------------------
# COMPILE_REGIONS=2: the whole model compiled, each kind of block a nested region
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp32", [False, True])
def test_nested_blocks_compute_the_model_and_trace_each_kind_of_block_once(fp32):
    """NestedBlocks: eagerly the model's own loss and gradients; under torch.compile (fullgraph;
    here a backend that runs Dynamo's graph as traced, the blocks as invoke_subgraph calls) the
    same loss, with each block variant used at several layers traced once and called at each.
    fp32 too: there no cast copies the weights, and K and V, views of one bank, once stopped the
    trace ("Encountered aliasing during higher order op tracing")."""
    ref, model = tiny_model(seed=3, fp32=fp32), tiny_model(seed=3, fp32=fp32)
    ref.train(), model.train()  # looping off: four layers, two of them one variant
    model.regions = tg.NestedBlocks(model)
    ids = torch.randint(2, VOCAB, (1, 64), generator=torch.Generator().manual_seed(0))
    targets, cu = ids.roll(-1, 1), torch.tensor([0, 30, 64], dtype=torch.int32)
    want = ref(ids, targets, cu, 64).mean()
    want.backward()
    got = model(ids, targets, cu, 64).mean()
    got.backward()
    assert torch.equal(got, want)  # eagerly: the clones change nothing, forward or backward
    for a, b in zip(model.parameters(), ref.parameters()):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():  # (invoke_subgraph's backward runs only under AOT autograd)
            compiled = torch.compile(model, backend=backend, fullgraph=True)(ids, targets, cu, 64).mean()
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, want)
    assert len(graphs) == 1
    calls = [n for n in graphs[0].graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
    # a block variant (sequential or parallel, XSA or not) used at several layers is one subgraph
    # called at each; one used once is inlined
    variants = [(l >= model.parallel_start > 0, l >= model.xsa_first) for l in sum(model.layer_order(), [])]
    repeated = {v: variants.count(v) for v in variants if variants.count(v) > 1}
    assert len(calls) == sum(repeated.values()) >= 2 and len({n.args[0].target for n in calls}) == len(repeated)

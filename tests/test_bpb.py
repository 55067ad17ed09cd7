"""BITS PER BYTE: the bytes charged to each target token equal the UTF-8 bytes of the text the
tokenizer decodes, on random Unicode and on the tiny validation stream, with SentencePiece's
normalizer and decoder corner cases pinned."""
import random

import numpy as np
import pytest
import sentencepiece as spm
import torch

from train_gpt import BOS_ID, build_byte_luts, read_shard, target_bytes


# ---------------------------------------------------------------------------------------------
# Bytes per token: the bpb denominator must equal the bytes of the decoded text
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_luts(tiny_tokenizer):
    sp = spm.SentencePieceProcessor(model_file=tiny_tokenizer)
    return sp, build_byte_luts(sp, sp.vocab_size())


def stream_bytes(luts, ids):
    """target_bytes of a BOS-prefixed document as the loader and eval see it (BOS precedes the first piece)."""
    stream = torch.tensor([BOS_ID] + list(ids), dtype=torch.int64)
    return int(target_bytes(stream[:-1], stream[1:], luts).sum())


def random_unicode_text(rng: random.Random) -> str:
    tricky = list(" \u00a0\u3000\u2002\u200b\u2028\r\n\t\x0b\x0c\u2581\u00a8\u00b4\ufeff\x00\x7f\x85\u0301ﬁ①é日🙂")
    out = []
    for _ in range(rng.randrange(0, 60)):
        r = rng.random()
        if r < 0.5:
            out.append(rng.choice("the model of a byte 0123456789 .,;:!?'\"-()"))
        elif r < 0.75:
            out.append(rng.choice(tricky))
        else:
            cp = rng.randrange(0x20, 0x3000) if rng.random() < 0.6 else rng.randrange(0xE000, 0x110000)
            out.append(chr(cp))
    return "".join(out)


def test_target_bytes_equal_decoded_bytes_on_random_unicode(sp_luts):
    sp, luts = sp_luts
    rng = random.Random(0)
    texts = [random_unicode_text(rng) for _ in range(1500)]
    for text, ids in zip(texts, sp.encode(texts)):
        assert stream_bytes(luts, ids) == len(sp.decode(ids).encode("utf-8")), repr(text)


def test_target_bytes_equal_decoded_bytes_over_tiny_val_stream(tiny_dataset, sp_luts):
    sp, luts = sp_luts
    stream = torch.from_numpy(np.concatenate([read_shard(p) for p in tiny_dataset.val_files]).astype(np.int64))
    total = int(target_bytes(stream[:-1], stream[1:], luts).sum())
    docs = np.split(stream.numpy(), np.flatnonzero(stream.numpy() == BOS_ID)[1:])
    assert len(docs) == tiny_dataset.val_docs
    decoded = [sp.decode(d[1:].tolist()) for d in docs]
    assert total == sum(len(t.encode("utf-8")) for t in decoded)
    # ...which is the normalized text, not the raw documents: see the pinned cases below
    assert decoded == [sp.decode(sp.encode(t)) for t in tiny_dataset.texts[:tiny_dataset.val_docs]]


# SentencePiece facts the bpb byte count depends on (nmt_nfkc, no dummy prefix). For every text the
# decoded bytes equal the LUT bytes; they differ from the raw text because the normalizer removes
# leading/trailing whitespace, folds whitespace runs, newlines and tabs (and a literal "▁") to one
# space, applies NFKC (which can also *add* bytes: "¨" becomes space + combining diaeresis) and
# drops control characters. bpb therefore counts the bytes of the normalized text.
@pytest.mark.parametrize("text, decoded", [
    ("  leading spaces", "leading spaces"),
    ("runs  of\n\nblank\tlines \r\n and trailing  \n", "runs of blank lines and trailing"),
    ("a\u2581b", "a b"),  # a literal U+2581 is whitespace to the normalizer
    ("\ufb01 \u2460 e\u0301", "fi 1 \u00e9"),  # NFKC: ligature, circled digit, composed accent
    ("x\u200by\x7fz", "x yz"),  # a zero-width space becomes a space; DEL is removed
    ("a\u00a8b", "a \u0308b"),  # NFKC expands the diaeresis: 4 raw bytes, 5 decoded
    ("nul\x00byte", "nul\x00byte"),  # kept, through byte fallback
])
def test_normalization_corner_cases(sp_luts, text, decoded):
    sp, luts = sp_luts
    ids = sp.encode(text)
    assert sp.decode(ids) == decoded
    assert stream_bytes(luts, ids) == len(decoded.encode("utf-8"))


def test_decoder_corner_cases_that_encoding_never_produces(sp_luts):
    """Token sequences where sp.decode and the LUT disagree. None comes out of sp.encode on a whole
    document (leading whitespace is stripped, runs are folded, byte fallback leaves no <unk> and
    always emits whole UTF-8 sequences), so the bpb of encoded data is exact; but beware of them
    when checking bytes by decoding model samples or a stream cut mid-character."""
    sp, luts = sp_luts
    ids = lambda *pieces: [sp.piece_to_id(p) for p in pieces]  # noqa: E731
    space, a, b = sp.piece_to_id("\u2581"), sp.piece_to_id("a"), sp.piece_to_id("b")
    assert space != sp.unk_id() and sp.id_to_piece(space) == "\u2581"
    # the decoder drops the leading space of a document's first piece even without a dummy prefix;
    # the LUT agrees because BOS, the previous token, is a boundary
    assert sp.decode([space, a]) == "a" and stream_bytes(luts, [space, a]) == 1
    # ...but it drops *every* leading "▁" piece, while the LUT charges the second one a byte
    assert sp.decode([space, space, a]) == "a" and stream_bytes(luts, [space, space, a]) == 2
    # decoding across a BOS keeps the space of the next document's first piece; the LUT does not
    spaced_b = sp.piece_to_id("\u2581b")
    assert spaced_b != sp.unk_id()
    assert sp.decode([a, BOS_ID, spaced_b]) == "a b" and stream_bytes(luts, [a, BOS_ID, spaced_b]) == 2
    # an incomplete byte-fallback sequence decodes to U+FFFD (3 bytes); the LUT counts its 1 byte
    assert sp.decode(ids("<0xCC>")) == "\ufffd" and stream_bytes(luts, ids("<0xCC>")) == 1
    # <unk> decodes to " \u2047 " (5 bytes); the LUT counts 0
    assert sp.decode([sp.unk_id()]) == " \u2047 " and stream_bytes(luts, [sp.unk_id()]) == 0
    assert sp.decode([a, b]) == "ab"

"""CONFIGURATION: Hyperparameters reads every variable once, with the record's defaults, and rejects
impossible values and combinations before anything is built, in one line that names the variable."""
import os

import pytest

import train_gpt as tg
from train_gpt import ConfigError, Hyperparameters, check_data
from tests.conftest import one_line
from tests.evalkit import hparams
from tests.test_model import tiny_hparams

L = 64  # EVAL_SEQ_LEN in the evaluation checks below


def test_valid_tiny_config_passes(make_hparams, tiny_dataset):
    h = make_hparams()
    check_data(h)
    assert h.vocab_size == tiny_dataset.vocab_size and os.path.samefile(h.tokenizer_path, tiny_dataset.tokenizer_path)


def test_train_batch_tokens_not_divisible(make_hparams):
    with pytest.raises(ConfigError) as e:
        make_hparams(TRAIN_BATCH_TOKENS=1000)
    assert one_line(e).startswith("TRAIN_BATCH_TOKENS=1000")


def test_world_size_must_divide_8(make_hparams):
    with pytest.raises(ConfigError) as e:
        make_hparams(RANK=0, WORLD_SIZE=3)
    assert one_line(e).startswith("WORLD_SIZE=3")


def test_bad_values_name_the_variable(make_hparams):
    for env, name in (({"SEED": "abc"}, "SEED='abc'"), ({"ROPE_DIMS": 7}, "ROPE_DIMS=7"),
                      ({"PARALLEL_FINAL_LANE": "sum"}, "PARALLEL_FINAL_LANE='sum'"),
                      ({"LOOP_END": 9}, "LOOP_END=9"), ({"VAL_BATCH_TOKENS": 100}, "VAL_BATCH_TOKENS=100")):
        with pytest.raises(ConfigError) as e:
            make_hparams(**env)
        assert name in one_line(e)


def test_hyperparameters_defaults_are_the_record(tiny_dataset):
    h = Hyperparameters(env={"DATA_DIR": tiny_dataset.data_dir})
    assert (h.vocab_size, h.train_batch_tokens, h.train_seq_len, h.world_size, h.grad_accum_steps) == (
        8192, 786432, 2048, 1, 8)
    assert h.local_batch_tokens == 98304


@pytest.mark.parametrize("env, names", [
    ({"PARALLEL_START_LAYER": 2}, ["PARALLEL_START_LAYER=2", "LOOP_END=2"]),  # inside the loop 1..2
    ({"PARALLEL_START_LAYER": 1}, ["PARALLEL_START_LAYER=1"]),
    ({"PARALLEL_FINAL_LANE": "both"}, ["PARALLEL_FINAL_LANE='both'"]),
    ({"ATTN_BACKEND": "flash"}, ["ATTN_BACKEND='flash'"]),
    ({"LOOP_START": 3, "LOOP_END": 2, "PARALLEL_START_LAYER": 0}, ["LOOP_START=3"]),
    ({"LOOP_END": 4}, ["LOOP_END=4"]),
    ({"NUM_HEADS": 5}, ["NUM_HEADS=5"]),
    ({"NUM_KV_HEADS": 3}, ["NUM_KV_HEADS=3"]),
    ({"ROPE_DIMS": 32}, ["ROPE_DIMS=32"]),
    ({"ROPE_DIMS": 5}, ["ROPE_DIMS=5"]),
    ({"NUM_LAYERS": "4.5"}, ["NUM_LAYERS='4.5'"]),
    ({"MLP_MULT": "wide"}, ["MLP_MULT='wide'"]),
    ({"TTT_OPTIMIZER": "lion"}, ["TTT_OPTIMIZER='lion'"]),
    ({"COMPRESSOR": "zstd"}, ["COMPRESSOR='zstd'"]),
    ({"VAL_DOC_FRACTION": 0}, ["VAL_DOC_FRACTION=0"]),
    ({"RANK": 0, "WORLD_SIZE": 4, "GPTQ_CALIBRATION_BATCHES": 3, "TRAIN_BATCH_TOKENS": 2048, "VAL_BATCH_TOKENS": 1024},
     ["GPTQ_CALIBRATION_BATCHES=3"]),
])
def test_config_errors_name_the_variable(env, names):
    with pytest.raises(ConfigError) as e:
        tiny_hparams(**env)
    message = str(e.value)
    assert "\n" not in message
    for name in names:
        assert name in message


@pytest.mark.parametrize("env", [{"PARALLEL_START_LAYER": 0}, {"PARALLEL_START_LAYER": 3}, {"LOOP_START": 0, "LOOP_END": 0},
                                 {"ROPE_DIMS": 16}, {"PARALLEL_FINAL_LANE": "mlp"}, {"ATTN_BACKEND": "sdpa"}])
def test_config_edge_values_pass(env):
    h = tiny_hparams(**env)
    tg.GPT(h)  # and the model builds


@pytest.mark.parametrize("stride", [0, -1, L + 1])
def test_sliding_stride_outside_one_to_seq_len_is_a_config_error(make_hparams, stride):
    """EVAL_STRIDE 0 crashes the sliding eval (range step 0) and EVAL_STRIDE > EVAL_SEQ_LEN leaves
    targets between windows unscored; either is known at start, before hours of training."""
    with pytest.raises(tg.ConfigError, match="EVAL_STRIDE"):
        hparams(make_hparams, SLIDING_WINDOW_ENABLED=1, EVAL_STRIDE=stride)
    for ok in (1, L):  # the ends of the allowed range
        assert hparams(make_hparams, SLIDING_WINDOW_ENABLED=1, EVAL_STRIDE=ok).eval_stride == ok


@pytest.mark.parametrize("batch_tokens", [4 * L, 12 * L, 8 * L + 8])
def test_val_batch_tokens_not_a_multiple_of_8_sequences_is_a_config_error(make_hparams, batch_tokens):
    """eval_val's rows are VAL_BATCH_TOKENS / 8 tokens on every world size; they must hold whole
    EVAL_SEQ_LEN sequences."""
    with pytest.raises(tg.ConfigError, match="VAL_BATCH_TOKENS"):
        hparams(make_hparams, VAL_BATCH_TOKENS=batch_tokens)


def test_ttt_window_shorter_than_a_chunk_is_a_config_error(make_hparams):
    """With TTT_EVAL_SEQ_LEN < TTT_CHUNK_SIZE a chunk's first targets fall outside its window and
    are never scored (the bpb silently covers fewer tokens)."""
    with pytest.raises(tg.ConfigError, match="TTT_EVAL_SEQ_LEN"):
        hparams(make_hparams, TTT_EVAL_SEQ_LEN=4, TTT_CHUNK_SIZE=8)
    assert hparams(make_hparams, TTT_EVAL_SEQ_LEN=8, TTT_CHUNK_SIZE=8).ttt_eval_seq_len == 8  # equal is fine

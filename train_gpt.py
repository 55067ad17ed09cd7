"""Parameter Golf training script: the best language model that fits 16,000,000 bytes.

One file, launched by torchrun and configured only by environment variables:

    torchrun --standalone --nproc_per_node=8 train_gpt.py

It trains a GPT on document-packed FineWeb rows within a wall-clock budget, quantizes it with GPTQ
(int6 matrices, int8 embedding), compresses it, checks the artifact against the size limit, and
scores it in bits per byte: standard, sliding-window and per-document LoRA test-time training.
The behaviour follows the Parameter Golf record "VarLen attention + fused MLP + doc-independent TTT"
(PR #1530 by samacqua, val_bpb 1.07336), with later records' model and optimizer changes on by
default where they measured better (SmearGate, a sparse attention gate, Polar Express, an LR floor,
a Muon weight-decay taper, retuned query gain and Muon LR, a choice among live and averaged weights).

Sections, in the order a run uses them:
    CONFIGURATION       Hyperparameters: every environment variable, read and checked once
    RUNTIME             ranks and collectives, compilation helpers, logging, environment report
    DATA                token shards, the document-packing training loader, calibration windows
    BITS PER BYTE       what each target token is charged in UTF-8 bytes
    KERNELS             the fused Triton MLP (up-projection + LeakyReLU(0.5)^2), softcapped cross-entropy
    MODEL               attention backends and the GPT
    OPTIMIZERS AND EMA  Muon for the weight banks, AdamW for the rest, the weight average
    TRAINING            the schedule, the honest compile warmup, the wall-clock training loop
    ARTIFACT            Hessians, GPTQ, entropy coding and compression, the counted code, the size limit
    EVALUATION          standard and sliding-window scoring
    TEST-TIME TRAINING  per-document score-first LoRA adaptation
    MAIN                run(): train -> choose the artifact -> build or load it -> evaluate
"""


from __future__ import annotations

import base64
import concurrent.futures
import copy
import datetime
import functools
import glob
import io
import json
import linecache
import lzma
import math
import os
import platform
import random
import subprocess
import sys
import time
import types
import uuid
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager MLP path is used
    triton = None


# =============================================================================================
#                                        CONFIGURATION
# =============================================================================================

# Every knob is an environment variable, read once here and nowhere else, so a log's header
# (which prints them all) reproduces a run, and a test can build any configuration from a dict.
# Names and defaults are the record's. Arithmetic that must hold between variables is checked
# before anything is built, and every error names the variable and what would fix it.


class ConfigError(Exception):
    """A problem with the run's inputs; main() prints it as one line and exits non-zero."""


# Allowed values, by the short codes Hyperparameters.__init__ gives each variable.
RANGES = {"0/1": (lambda v: v in (0, 1), "0 or 1"), "0/1/2": (lambda v: v in (0, 1, 2), "0, 1 or 2"),
          ">=0": (lambda v: v >= 0, "at least 0"),
          ">=1": (lambda v: v >= 1, "at least 1"), ">0": (lambda v: v > 0, "positive"),
          "0..1": (lambda v: 0 <= v <= 1, "between 0 and 1"), "[0,1)": (lambda v: 0 <= v < 1, "in [0, 1)")}
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class Hyperparameters:
    def __init__(self, env: dict | None = None):
        env = os.environ if env is None else env
        self._defaults: dict = {}  # every variable read, in order: name -> default (for --help)
        self._given: dict = {}  # the variables set in env: name -> value

        def get(name, default, allowed=""):
            self._defaults[name] = default
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = type(default)(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a valid {type(default).__name__}") from None
            if allowed and not RANGES[allowed][0](value):
                raise ConfigError(f"{name}={raw} must be {RANGES[allowed][1]}")
            self._given[name] = value
            return value

        # data, run identity and outputs
        self.data_dir = get("DATA_DIR", "./data/")
        self.seed = get("SEED", 1337)
        self.run_id = get("RUN_ID", "") or uuid.uuid4().hex[:12]
        self.artifact_dir = get("ARTIFACT_DIR", "") or os.path.join("runs", self.run_id)
        self.eval_only_path = get("EVAL_ONLY_PATH", "")  # a final_model.pt or final_model.int6.ptz
        # schedule (time-based: the budget, not the step count, ends training)
        self.iterations = get("ITERATIONS", 20000, ">=1")
        self.warmdown_frac = get("WARMDOWN_FRAC", 0.72, "0..1")
        # compile-warmup steps over all compiled variants, rolled back afterwards: two per variant (the
        # second shows the graph is reused) cost about 16 training steps fewer than the record's 20
        self.warmup_steps = get("WARMUP_STEPS", 4, ">=0")
        self.train_batch_tokens = get("TRAIN_BATCH_TOKENS", 786432, ">=1")
        self.train_seq_len = get("TRAIN_SEQ_LEN", 2048, ">=1")  # longest document segment in a packed row
        # progressive context: "LEN@END,...", segments of LEN tokens until that fraction of training
        self.train_seq_schedule = get("TRAIN_SEQ_SCHEDULE", "")
        self.seq_change_warmup_steps = get("SEQ_CHANGE_WARMUP_STEPS", 0, ">=0")  # LR ramp after each change
        self.train_log_every = get("TRAIN_LOG_EVERY", 500, ">=1")
        self.train_log_seconds = get("TRAIN_LOG_SECONDS", 60.0, ">=0")  # and a line at least this often; 0: off
        self.max_wallclock_seconds = get("MAX_WALLCLOCK_SECONDS", 600.0, ">=0")  # 0: no cap
        self.val_batch_tokens = get("VAL_BATCH_TOKENS", 524288, ">=1")
        self.eval_seq_len = get("EVAL_SEQ_LEN", 2048, ">=1")
        self.val_loss_every = get("VAL_LOSS_EVERY", 4000, ">=0")  # 0: only at the end of training
        # 1: also validate the untrained model at step 0 (the record did; a cold eval graph of its own)
        self.val_at_start = bool(get("VAL_AT_START", 0, "0/1"))
        self.sliding_window_enabled = bool(get("SLIDING_WINDOW_ENABLED", 0, "0/1"))
        self.eval_stride = get("EVAL_STRIDE", 64)
        # model
        self.vocab_size = get("VOCAB_SIZE", 8192, ">=1")
        self.num_layers = get("NUM_LAYERS", 11, ">=1")
        self.xsa_last_n = get("XSA_LAST_N", 11, ">=0")
        self.model_dim = get("MODEL_DIM", 512, ">=1")
        self.num_kv_heads = get("NUM_KV_HEADS", 4, ">=1")
        self.num_heads = get("NUM_HEADS", 8, ">=1")
        self.mlp_mult = get("MLP_MULT", 4.0, ">0")
        self.skip_gates_enabled = bool(get("SKIP_GATES_ENABLED", 1, "0/1"))
        self.smear_gate = bool(get("SMEAR_GATE", 1, "0/1"))  # each token adds a gated share of the previous one
        self.attn_out_gate = bool(get("ATTN_OUT_GATE", 0, "0/1"))  # input-dependent gate on each head's output
        self.sparse_attn_gate = bool(get("SPARSE_ATTN_GATE", 1, "0/1"))  # the same gate from 12 input channels
        self.sparse_attn_gate_scale = get("SPARSE_ATTN_GATE_SCALE", 0.5)
        self.logit_softcap = get("LOGIT_SOFTCAP", 30.0, ">0")
        self.logit_softcap_neg = get("LOGIT_SOFTCAP_NEG", 0.0, ">=0")  # cap of negative logits; 0: LOGIT_SOFTCAP
        self.rope_base = get("ROPE_BASE", 10000.0, ">0")
        self.rope_dims = get("ROPE_DIMS", 16, ">=0")
        self.ln_scale = bool(get("LN_SCALE", 1, "0/1"))
        self.qk_gain_init = get("QK_GAIN_INIT", 5.25)
        self.num_loops = get("NUM_LOOPS", 2, ">=0")
        self.loop_start = get("LOOP_START", 3)
        self.loop_end = get("LOOP_END", 5)
        self.enable_looping_at = get("ENABLE_LOOPING_AT", 0.35, "0..1")
        self.parallel_start_layer = get("PARALLEL_START_LAYER", 8, ">=0")
        self.parallel_final_lane = get("PARALLEL_FINAL_LANE", "mean")
        self.tied_embed_init_std = get("TIED_EMBED_INIT_STD", 0.005, ">=0")
        self.attn_backend = get("ATTN_BACKEND", "")  # fa3 | fa4 | varlen | sdpa; empty: best available
        self.fused_mlp = bool(get("FUSED_MLP", 1, "0/1"))
        self.fused_ce = bool(get("FUSED_CE", 1, "0/1"))  # fused softcapped cross-entropy kernel (CUDA)
        self.fused_head_ce = bool(get("FUSED_HEAD_CE", 1, "0/1"))  # with FUSED_CE: the head inside it too
        self.fused_qkv = bool(get("FUSED_QKV", 0, "0/1"))  # Q, K and V as one matmul (same math)
        # 0: the whole model in one graph; 1: the two kinds of block compiled, the rest eager; 2: the
        # whole model with each kind of block a nested region, compiled once (NestedBlocks)
        self.compile_regions = get("COMPILE_REGIONS", 0, "0/1/2")
        # optimizers
        self.min_lr = get("MIN_LR", 0.1, "0..1")
        self.tied_embed_lr = get("TIED_EMBED_LR", 0.03, ">=0")
        self.matrix_lr = get("MATRIX_LR", 0.028, ">=0")
        self.scalar_lr = get("SCALAR_LR", 0.02, ">=0")
        self.muon_momentum = get("MUON_MOMENTUM", 0.97, "[0,1)")
        self.muon_backend_steps = get("MUON_BACKEND_STEPS", 5, ">=0")
        self.muon_polar_express = bool(get("MUON_POLAR_EXPRESS", 1, "0/1"))  # per-step Newton-Schulz coefficients
        self.muon_wd_taper_at = get("MUON_WD_TAPER_AT", 0.7, "0..1")  # from this budget fraction (0: never)...
        self.muon_wd_taper = get("MUON_WD_TAPER", 0.5, ">=0")  # ...Muon weight decay is MUON_WD x this
        self.muon_wd_mlp_factor = get("MUON_WD_MLP_FACTOR", 1.0, ">=0")  # the MLP banks' decay, x MUON_WD
        self.muon_momentum_warmup_start = get("MUON_MOMENTUM_WARMUP_START", 0.92, "[0,1)")
        self.muon_momentum_warmup_steps = get("MUON_MOMENTUM_WARMUP_STEPS", 1500, ">=0")
        self.muon_row_normalize = bool(get("MUON_ROW_NORMALIZE", 1, "0/1"))
        self.beta1 = get("BETA1", 0.9, "[0,1)")
        self.beta2 = get("BETA2", 0.95, "[0,1)")
        self.adam_eps = get("ADAM_EPS", 1e-8, ">=0")
        self.grad_clip_norm = get("GRAD_CLIP_NORM", 0.3, ">=0")  # 0 disables
        self.adam_wd = get("ADAM_WD", 0.02, ">=0")
        self.muon_wd = get("MUON_WD", 0.095, ">=0")
        self.embed_wd = get("EMBED_WD", 0.085, ">=0")
        # late QAT: from this budget fraction (0: never) training sees every matrix on its export grid
        self.qat_at = get("QAT_AT", 0.0, "0..1")
        self.ema_decay = get("EMA_DECAY", 0.9965, "[0,1)")
        # until EMA_DECAY caps it, the average spans about the last t / EMA_WINDOW_DIVISOR steps
        self.ema_window_divisor = get("EMA_WINDOW_DIVISOR", 9.0, ">0")
        self.ema_select = get("EMA_SELECT", 4, ">=0")  # >0: keep EMA or live weights, whichever has the lower
        # loss on this many held-out training micro-batches (never trained on, never validation data)
        # more averages for EMA_SELECT to choose from: their window divisors (a shorter window each; "none": only
        # live and the EMA); they won in every 270-step run measured, where the EMA alone lost to live
        self.ema_select_divisors = self._divisors(get("EMA_SELECT_DIVISORS", "30,100"))
        # test-time training
        self.ttt_enabled = bool(get("TTT_ENABLED", 1, "0/1"))
        self.ttt_lora_rank = get("TTT_LORA_RANK", 96, ">=1")
        self.ttt_lora_lr = get("TTT_LORA_LR", 1e-4, ">=0")
        self.ttt_chunk_size = get("TTT_CHUNK_SIZE", 32, ">=1")
        self.ttt_eval_seq_len = get("TTT_EVAL_SEQ_LEN", 2048, ">=1")
        self.ttt_batch_size = get("TTT_BATCH_SIZE", 64, ">=1")
        self.ttt_grad_steps = get("TTT_GRAD_STEPS", 1, ">=1")
        self.ttt_weight_decay = get("TTT_WEIGHT_DECAY", 0.5, ">=0")
        self.ttt_beta1 = get("TTT_BETA1", 0.0, "[0,1)")
        self.ttt_beta2 = get("TTT_BETA2", 0.999, "[0,1)")
        self.ttt_q_lora = bool(get("TTT_Q_LORA", 1, "0/1"))  # Q and V adapters off: PR #1953's TTT target set
        self.ttt_v_lora = bool(get("TTT_V_LORA", 1, "0/1"))
        self.ttt_k_lora = bool(get("TTT_K_LORA", 1, "0/1"))
        self.ttt_mlp_lora = bool(get("TTT_MLP_LORA", 1, "0/1"))
        self.ttt_o_lora = bool(get("TTT_O_LORA", 1, "0/1"))
        self.ttt_optimizer = get("TTT_OPTIMIZER", "adam")
        self.ttt_cuda_graphs = bool(get("TTT_CUDA_GRAPHS", 1, "0/1"))  # replay each chunk-step shape as a CUDA graph
        self.ttt_compile = bool(get("TTT_COMPILE", 1, "0/1"))  # TTT's two kinds of block through torch.compile (CUDA)
        # phased TTT: after each of TTT_GLOBAL_PHASES equal parts of the first TTT_GLOBAL_PREFIX_DOCS scored
        # documents, one SGD epoch of the base weights over every document scored so far
        self.ttt_global_phases = get("TTT_GLOBAL_PHASES", 0, ">=0")
        self.ttt_global_prefix_docs = get("TTT_GLOBAL_PREFIX_DOCS", 2500, ">=1")
        self.ttt_global_lr = get("TTT_GLOBAL_LR", 0.001, ">=0")
        self.ttt_global_momentum = get("TTT_GLOBAL_MOMENTUM", 0.9, "[0,1)")
        self.ttt_global_batch_tokens = get("TTT_GLOBAL_BATCH_TOKENS", 32768, ">=1")  # per rank and SGD step
        self.val_doc_fraction = get("VAL_DOC_FRACTION", 1.0)
        # quantization and artifact
        self.compressor = get("COMPRESSOR", "brotli")
        self.ans_coding = bool(get("ANS_CODING", 1, "0/1"))  # the int8 matrices rANS-coded, the rest COMPRESSOR
        self.gptq_calibration_batches = get("GPTQ_CALIBRATION_BATCHES", 64, ">=1")
        self.gptq_reserve_seconds = get("GPTQ_RESERVE_SECONDS", 13.0, ">=0")
        self.matrix_bits = get("MATRIX_BITS", 6)
        self.embed_bits = get("EMBED_BITS", 8)
        self.matrix_clip_sigmas = get("MATRIX_CLIP_SIGMAS", 12.85, ">0")
        self.embed_clip_sigmas = get("EMBED_CLIP_SIGMAS", 20.0, ">0")
        # per-group clip (PR #1626): the MLP's and attention's matrices apart; 0: MATRIX_CLIP_SIGMAS
        self.mlp_clip_sigmas = get("MLP_CLIP_SIGMAS", 0.0, ">=0")
        # AWQ-lite: the AWQ_LITE_GROUPS most salient column groups of the model get AWQ_LITE_BITS
        self.awq_lite_groups = get("AWQ_LITE_GROUPS", 0, ">=0")
        self.awq_lite_group_size = get("AWQ_LITE_GROUP_SIZE", 64, ">=1")
        self.awq_lite_bits = get("AWQ_LITE_BITS", 8)
        self.row_reorder = bool(get("ROW_REORDER", 0, "0/1"))  # similar rows side by side before compression
        # LQER: low-rank correction of the GPTQ residual of the LQER_TOP_K matrices it is largest in
        self.lqer_top_k = get("LQER_TOP_K", 0, ">=0")
        self.lqer_rank = get("LQER_RANK", 4, ">=1")
        self.lqer_group = get("LQER_GROUP", 64, ">=1")  # int4 factor B: one fp16 scale per this many values
        self.attn_clip_sigmas = get("ATTN_CLIP_SIGMAS", 0.0, ">=0")
        # norm tweaking: Adam steps on the tensors the artifact keeps in float, with the matrices quantized
        self.quant_tweak_steps = get("QUANT_TWEAK_STEPS", 0, ">=0")
        self.quant_tweak_lr = get("QUANT_TWEAK_LR", 1e-3, ">0")
        self.quant_tweak_batch_tokens = get("QUANT_TWEAK_BATCH_TOKENS", 32768, ">=1")
        self.artifact_limit_bytes = get("ARTIFACT_LIMIT_BYTES", 16_000_000, ">=1")
        self.artifact_autofit = bool(get("ARTIFACT_AUTOFIT", 1, "0/1"))  # 0: refuse an oversized artifact
        # submission.json metadata
        self.submission_name = get("SUBMISSION_NAME", "")
        self.submission_author = get("SUBMISSION_AUTHOR", "")
        self.submission_github_id = get("SUBMISSION_GITHUB_ID", "")
        # distributed layout, from torchrun
        self.distributed = "RANK" in env and "WORLD_SIZE" in env
        try:
            self.rank, self.world_size, self.local_rank = (int(env.get(name, default)) if self.distributed else default
                                                           for name, default in zip(TORCHRUN_VARIABLES, (0, 1, 0)))
        except ValueError:
            raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun), got "
                              f"{[env.get(n) for n in TORCHRUN_VARIABLES]}") from None
        if self.world_size < 1 or 8 % self.world_size:
            raise ConfigError(f"WORLD_SIZE={self.world_size} must divide 8 (use 1, 2, 4 or 8 processes)")
        self.grad_accum_steps = 8 // self.world_size
        self.warnings = unknown_variable_warnings(env, self._defaults)
        self.check()

    # paths derived from DATA_DIR and VOCAB_SIZE, as the challenge's downloader lays them out
    @property
    def dataset_dir(self) -> str:
        return os.path.join(self.data_dir, "datasets", f"fineweb10B_sp{self.vocab_size}")

    @property
    def train_files(self) -> str:
        return os.path.join(self.dataset_dir, "fineweb_train_*.bin")

    @property
    def val_files(self) -> str:
        return os.path.join(self.dataset_dir, "fineweb_val_*.bin")

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.data_dir, "tokenizers", f"fineweb_{self.vocab_size}_bpe.model")

    @property
    def local_batch_tokens(self) -> int:
        return self.train_batch_tokens // (self.world_size * self.grad_accum_steps)

    @property
    def train_seq_stages(self) -> list[tuple[int, float]]:
        """[(segment length, fraction of training it ends at)], from TRAIN_SEQ_SCHEDULE, else one stage."""
        if not self.train_seq_schedule:
            return [(self.train_seq_len, 1.0)]
        stages = []
        for item in self.train_seq_schedule.split(","):
            length, _, end = item.strip().partition("@")
            try:
                stages.append((int(length), float(end)))
            except ValueError:
                raise ConfigError(f"TRAIN_SEQ_SCHEDULE={self.train_seq_schedule!r} must be LEN@END items, e.g. "
                                  f"1024@0.1,2048@0.7,3072@1: segments of LEN tokens until fraction END") from None
        return stages

    def group_clip_sigmas(self, group: str) -> float:
        """The SDClip sigmas of the "mlp" or "attn" matrices: MLP_CLIP_SIGMAS / ATTN_CLIP_SIGMAS, or
        MATRIX_CLIP_SIGMAS where that is 0. The export and late QAT both read it."""
        return {"mlp": self.mlp_clip_sigmas, "attn": self.attn_clip_sigmas}[group] or self.matrix_clip_sigmas

    def check(self):
        """Arithmetic that must hold before anything is built; paths are checked by check_data()."""
        stages = self.train_seq_stages
        ends = [end for _, end in stages]
        if any(b <= a for a, b in zip([0.0] + ends, ends)) or ends[-1] != 1.0 or min(n for n, _ in stages) < 1:
            raise ConfigError(f"TRAIN_SEQ_SCHEDULE={self.train_seq_schedule!r}: lengths must be positive and the "
                              f"END fractions rise to exactly 1, e.g. 1024@0.1,2048@0.7,3072@1")
        if max(n for n, _ in stages) != self.train_seq_len:
            raise ConfigError(f"TRAIN_SEQ_SCHEDULE={self.train_seq_schedule!r}: its longest length must be "
                              f"TRAIN_SEQ_LEN={self.train_seq_len} (set TRAIN_SEQ_LEN to it)")
        split = self.world_size * self.grad_accum_steps * self.train_seq_len
        if self.train_batch_tokens % split:
            raise ConfigError(
                f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be a multiple of WORLD_SIZE x grad_accum x "
                f"TRAIN_SEQ_LEN = {self.world_size} x {self.grad_accum_steps} x {self.train_seq_len} = {split}")
        if self.model_dim % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(f"MODEL_DIM={self.model_dim}, NUM_HEADS={self.num_heads}, NUM_KV_HEADS="
                              f"{self.num_kv_heads}: heads must divide the width and KV heads the heads")
        if self.rope_dims % 2 or self.rope_dims > self.model_dim // self.num_heads:
            raise ConfigError(f"ROPE_DIMS={self.rope_dims} must be even and at most the head dim")
        if not 0 <= self.loop_start <= self.loop_end < self.num_layers:
            raise ConfigError(f"LOOP_START={self.loop_start}..LOOP_END={self.loop_end} must lie in 0..NUM_LAYERS-1")
        if 0 < self.parallel_start_layer <= self.loop_end:
            raise ConfigError(f"PARALLEL_START_LAYER={self.parallel_start_layer} must be 0 (off) or after "
                              f"LOOP_END={self.loop_end}: the two lanes cannot re-enter the looped segment")
        for name, value, allowed in (("PARALLEL_FINAL_LANE", self.parallel_final_lane, ("mean", "mlp", "attn")),
                                     ("ATTN_BACKEND", self.attn_backend, ("", "fa3", "fa4", "varlen", "sdpa")),
                                     ("TTT_OPTIMIZER", self.ttt_optimizer, ("adam", "sgd")),
                                     ("COMPRESSOR", self.compressor, ("brotli", "lzma"))):
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} must be one of {', '.join(repr(a) for a in allowed)}")
        if 0 < self.max_wallclock_seconds <= self.gptq_reserve_seconds:
            raise ConfigError(f"MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds} leaves no training time after "
                              f"GPTQ_RESERVE_SECONDS={self.gptq_reserve_seconds}")
        if self.gptq_calibration_batches < self.world_size:
            raise ConfigError(f"GPTQ_CALIBRATION_BATCHES={self.gptq_calibration_batches} must be at least WORLD_SIZE")
        if not 0 < self.val_doc_fraction <= 1:
            raise ConfigError(f"VAL_DOC_FRACTION={self.val_doc_fraction} must be in (0, 1]")
        if self.val_batch_tokens % (8 * self.eval_seq_len):
            raise ConfigError(f"VAL_BATCH_TOKENS={self.val_batch_tokens} must be a multiple of 8 x EVAL_SEQ_LEN = "
                              f"{8 * self.eval_seq_len} (rows of VAL_BATCH_TOKENS/8 tokens, on any world size)")
        if not 0 < self.eval_stride <= self.eval_seq_len:
            raise ConfigError(f"EVAL_STRIDE={self.eval_stride} must be in 1..EVAL_SEQ_LEN={self.eval_seq_len}")
        if self.ttt_eval_seq_len < self.ttt_chunk_size:
            raise ConfigError(f"TTT_EVAL_SEQ_LEN={self.ttt_eval_seq_len} must be at least "
                              f"TTT_CHUNK_SIZE={self.ttt_chunk_size}")
        if not self.ema_select:  # nothing chooses among the extra averages: none is kept
            if self.ema_select_divisors and "EMA_SELECT_DIVISORS" in self._given:
                raise ConfigError("EMA_SELECT_DIVISORS adds averages for EMA_SELECT to choose from: set EMA_SELECT>0 "
                                  "(4 held-out micro-batches by default) or leave EMA_SELECT_DIVISORS unset")
            self.ema_select_divisors = ()
        if self.attn_out_gate and self.sparse_attn_gate:
            raise ConfigError("ATTN_OUT_GATE=1 and SPARSE_ATTN_GATE=1 are two forms of one gate: with ATTN_OUT_GATE=1 "
                              "set SPARSE_ATTN_GATE=0 (the sparse gate is on by default)")
        if self.vocab_size > 2**16:
            raise ConfigError(f"VOCAB_SIZE={self.vocab_size} must be at most 65536: shards store uint16 token ids")
        for name, bits in (("MATRIX_BITS", self.matrix_bits), ("EMBED_BITS", self.embed_bits),
                           ("AWQ_LITE_BITS", self.awq_lite_bits)):
            if not 2 <= bits <= 8:
                raise ConfigError(f"{name}={bits} must be between 2 and 8 (quantized values are stored as int8)")
        if self.eval_only_path and not self.eval_only_path.endswith((".pt", ".ptz")):
            raise ConfigError(f"EVAL_ONLY_PATH={self.eval_only_path} must be a final_model.pt checkpoint or a "
                              f"final_model.int6.ptz artifact written by this script")

    @staticmethod
    def _divisors(raw: str) -> tuple[float, ...]:
        if raw.strip().lower() == "none":
            return ()
        try:
            values = tuple(float(v) for v in raw.split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"EMA_SELECT_DIVISORS={raw!r} must be window divisors separated by commas, "
                              f"e.g. 30,100") from None
        if any(not math.isfinite(v) or v <= 0 for v in values):
            raise ConfigError(f"EMA_SELECT_DIVISORS={raw!r}: every divisor must be > 0")
        return values

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def changed(self) -> list[str]:
        """NAME=value (default ...) for every variable set to something other than its default."""
        return [f"{name}={value!r} (default {self._defaults[name]!r})" for name, value in self._given.items()
                if value != self._defaults[name]]


def unknown_variable_warnings(env, known) -> list[str]:
    """One line per environment variable that looks like one of ours but is not read: another
    case (num_layers) or a close spelling (TTT_ENABLE)."""
    import difflib
    names = set(known) | set(TORCHRUN_VARIABLES)
    warnings = []
    for key in sorted(env):
        if key in names:
            continue
        guess = key.upper() if key.upper() in names else next(iter(difflib.get_close_matches(key.upper(), names, 1, 0.85)), None)
        if guess:
            warnings.append(f"warning: {key} is not a variable of train_gpt.py (it is ignored); did you mean {guess}?")
    return warnings


def help_text() -> str:
    """What `python3 train_gpt.py --help` prints: every variable with its default."""
    defaults = Hyperparameters(env={})._defaults
    width = max(map(len, defaults))
    rows = [f"  {name:<{width}}  {default!r}" for name, default in defaults.items()]
    return ("train_gpt.py is configured by environment variables only, e.g.\n"
            "  NUM_LAYERS=11 SEED=0 torchrun --standalone --nproc_per_node=8 train_gpt.py\n"
            "Variables and their defaults (README.md explains each one; booleans are 0/1):\n" + "\n".join(rows))


# =============================================================================================
#                                           RUNTIME
# =============================================================================================

# What every later section leans on: which rank this is and how ranks talk, how graphs are
# compiled, and where messages go. There is no DDP wrapper. The collectives below are the only
# ones the run uses; each has a gloo form (sum, then divide; all-reduce instead of
# reduce-scatter), so every distributed path also runs, and is tested, on CPU with two processes.


# ---------------------------------------------------------------------------------------------
# Ranks and collectives. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on GPUs, gloo on CPU.
# ---------------------------------------------------------------------------------------------


def setup_distributed(h: Hyperparameters) -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", h.local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if h.distributed:
        # Before init_process_group: torch.distributed.nn's functions take `group=group.WORLD` as a
        # default argument, evaluated on import, and torch.optim imports it (through torch._dynamo)
        # on the first add_param_group. Imported later, those defaults would hold the process
        # group, so destroy_process_group() could not free it: gloo's threads would live on into
        # interpreter shutdown and abort it (SIGABRT, "terminate called without an active
        # exception"). Imported now, they hold None.
        from torch.distributed import nn as _dist_nn  # noqa: F401
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None,
                                timeout=datetime.timedelta(minutes=10))
    return device


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class _Finished:
    """A collective handle for the emulated (gloo) collectives: finishing work runs at wait()."""

    def __init__(self, work=None, then=None):
        self.work, self.then = work, then

    def wait(self):
        if self.work is not None:
            self.work.wait()
        if self.then is not None:
            self.then()
        self.work = self.then = None


def _nccl() -> bool:
    return dist.get_backend() == "nccl"


def all_reduce_avg(t: Tensor):
    """Asynchronous in-place mean over ranks. gloo has no AVG: it sums, then divides at wait()."""
    if _nccl():
        return dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True)
    return _Finished(dist.all_reduce(t, async_op=True), lambda: t.div_(dist.get_world_size()))


def reduce_scatter_avg(out: Tensor, inp: Tensor):
    """Mean over ranks of inp, rank r keeping the r-th slice of its leading dim. gloo lacks
    reduce_scatter: all-reduce a copy and keep the slice."""
    if _nccl():
        return dist.reduce_scatter_tensor(out, inp, op=dist.ReduceOp.AVG, async_op=True)
    full = inp.float()
    dist.all_reduce(full)
    out.copy_(full.chunk(dist.get_world_size())[dist.get_rank()] / dist.get_world_size())
    return _Finished()


def all_gather_into(out: Tensor, inp: Tensor):
    if _nccl():
        return dist.all_gather_into_tensor(out, inp, async_op=True)
    dist.all_gather(list(out.chunk(dist.get_world_size())), inp.contiguous())
    return _Finished()


def reduce_over_ranks(*values: float, device, op: str = "sum") -> list[float]:
    """Sum (or "max") of each value over ranks, in float64; the values themselves on one process."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool, device) -> bool:
    return bool(reduce_over_ranks(float(flag), device=device, op="max")[0])


class WorkQueue:
    """Ranks claim batch indices from an atomic counter in torch.distributed's key-value store
    (works across hosts, leaves no files behind). Single process: a plain counter."""

    created = 0  # every rank creates its queues in the same order, so the keys agree

    def __init__(self, key: str):
        WorkQueue.created += 1
        self.key, self.next = f"{key}_{WorkQueue.created}", 0
        self.store = dist.distributed_c10d._get_default_store() if dist.is_initialized() else None

    def claim(self) -> int:
        if self.store is None:
            self.next += 1
            return self.next - 1
        return self.store.add(self.key, 1) - 1


# ---------------------------------------------------------------------------------------------
# Compilation: one model object, one compiled callable, as few graphs as the run needs.
# ---------------------------------------------------------------------------------------------


def compile_for(device, fn, **kwargs):
    """torch.compile on CUDA; eager on CPU, where compiling costs more than it saves."""
    if device.type != "cuda":
        return fn
    # Inductor's mix-order reduction fuses the per-channel gradient sums over all tokens (skip
    # gates and weights, resid_mix, scales) into an RMSNorm backward: one kernel with ten fp32
    # [512] accumulators, 20 loads and 64 rows per program, 44 ms of an 827 ms step on an H200.
    # Off, the same sums run as split reductions (another fp32 summation order): 39 ms faster.
    import torch._inductor.config
    torch._inductor.config.triton.mix_order_reduction = False
    return torch.compile(fn, **kwargs)


def mark_cu_dynamic(cu: Tensor) -> None:
    """One compiled graph for every cu_seqlens length (the record compiled one per bucket)."""
    if cu.is_cuda:
        torch._dynamo.maybe_mark_dynamic(cu, 0)


# ---------------------------------------------------------------------------------------------
# Logging: rank 0 prints and appends to ARTIFACT_DIR/train.log; other ranks stay quiet.
# ---------------------------------------------------------------------------------------------


class Logger:
    """Lines are held in memory until open() (called once a run's inputs have passed their checks),
    so a launch that fails its checks writes nothing and leaves no folder behind."""

    def __init__(self, path: str | None, enabled: bool = True):
        self.path = path if enabled else None
        self.enabled = enabled
        self.pending: list[str] | None = []

    def open(self) -> None:
        """Create the log's folder and write what was held; ConfigError if that is impossible."""
        if self.path and self.pending is not None:
            try:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write("".join(m + "\n" for m in self.pending))
            except OSError as e:
                raise ConfigError(f"cannot write {self.path} ({e.strerror}): set ARTIFACT_DIR to a folder you "
                                  f"can write") from None
        self.pending = None

    def __call__(self, msg: str = "", console: bool = True) -> None:
        if not self.enabled:
            return
        if console:
            print(msg, flush=True)
        if self.pending is not None:
            self.pending.append(msg)
        elif self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")


def environment_report() -> str:
    """Versions and hardware, so a log alone says where its numbers came from."""
    lines = [f"python {platform.python_version()}  torch {torch.__version__}  "
             f"triton {getattr(triton, '__version__', 'absent')}  numpy {np.__version__}"]
    if torch.cuda.is_available():
        lines.append(f"cuda {torch.version.cuda}  gpus {torch.cuda.device_count()} x {torch.cuda.get_device_name()}")
        try:
            lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        lines.append(f"no CUDA device; cpu: {platform.processor() or platform.machine()} x {os.cpu_count()}")
    return "\n".join(lines)


# =============================================================================================
#                                             DATA
# =============================================================================================


# Shards are flat token streams: a 1024-byte header (256 little-endian int32: magic 20240520,
# version 1, token count) then uint16 tokens, each document written as BOS + its tokens. Training
# reads them strictly in order and packs one row of documents per rank and micro-step; attention
# is cut at every document start through `cu_seqlens`, so no token ever sees another document.
# A malformed shard is named and explained here instead of surfacing later as a shape error.


BOS_ID = 1  # every document starts with BOS; there is no EOS


SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
CU_SEQLENS_BUCKET = 64  # cu_seqlens is padded to a multiple of this many entries (few compiled shapes)


class ShardError(ValueError):
    pass


def write_shard(path: str, tokens) -> None:
    """Write tokens (any int array with values < 65536) as one shard."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ShardError(f"{path}: token ids must fit in uint16")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def read_shard(path: str) -> np.ndarray:
    """Memory-map a shard's tokens after checking its header against its size."""
    size = os.path.getsize(path)
    if size < SHARD_HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {SHARD_HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}); not a token shard")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    count = int(header[2])
    if count <= 0:
        raise ShardError(f"{path}: header says {count} tokens; the shard is empty")
    if size != SHARD_HEADER_BYTES + 2 * count:
        raise ShardError(f"{path}: header says {count} tokens ({SHARD_HEADER_BYTES + 2 * count} bytes) "
                         f"but the file has {size} bytes; it is truncated or corrupt")
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(count,))


def shard_paths(pattern: str) -> list[str]:
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise ConfigError(f"no shards match {pattern}")
    return paths


def build_cu_seqlens(tokens: np.ndarray, max_doc_len: int, bucket: int = CU_SEQLENS_BUCKET) -> tuple[np.ndarray, int]:
    """Segment boundaries of one packed row: a start at every BOS (and at 0, for a document cut by
    the row's start), documents longer than max_doc_len split into max_doc_len pieces, then the
    row's end, padded with the end to a multiple of `bucket` entries (zero-length segments)."""
    n = len(tokens)
    starts = np.flatnonzero(np.asarray(tokens) == BOS_ID)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    lengths = np.diff(np.concatenate([starts, [n]]))
    pieces = -(-lengths // max_doc_len)  # ceil
    offsets = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    seg_starts = np.repeat(starts, pieces) + offsets * max_doc_len
    cu = np.concatenate([seg_starts, [n]])
    cu = np.concatenate([cu, np.full(-len(cu) % bucket, n)])
    return cu.astype(np.int32), int(np.diff(cu).max())


@functools.lru_cache(maxsize=4)  # check_data and every loader of a run ask; each answer scans a shard
def hold_out_place(paths: tuple[str, ...], span: int, hold_out: int) -> tuple[int, int]:
    """(shard, start) of the training data held out for EMA_SELECT: the last shard with a BOS that
    leaves hold_out global spans after it and one span to train on before it."""
    for index in reversed(range(len(paths))):
        tokens = read_shard(paths[index])
        bos = np.flatnonzero(tokens == BOS_ID)
        fits = bos[(bos <= len(tokens) - hold_out * span) & (bos >= bos[:1] + span)]
        if fits.size:
            return index, int(fits[-1])
    raise ConfigError(f"none of the {len(paths)} training shards (the last: {paths[-1]}) holds EMA_SELECT={hold_out} "
                      f"held-out batches of {span} tokens and one more to train on; lower EMA_SELECT or use "
                      f"larger shards")


class DocumentPackingLoader:
    """Sequential packed rows for training.

    Each micro-step takes one global span of world x (n + 1) contiguous tokens from the current
    shard (a shard's first span starts at its first BOS, each next span where the last ended);
    rank r reads the r-th slice of n + 1 tokens: inputs are its first n tokens, targets the same
    slice shifted by one. A span that would overrun the shard drops the shard's
    tail and the next shard starts at its first BOS; after the last shard the loader wraps around.
    The next shard is read and the next batch prepared in background threads.

    hold_out=k keeps k global spans at the end of the last shard that can hold them (from a BOS)
    out of every pass, so held_out_batches() serves data never trained on, however often the
    loader wraps around.
    """

    def __init__(self, pattern: str, local_tokens: int, max_doc_len: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", hold_out: int = 0):
        self.paths = shard_paths(pattern)
        self.n, self.max_doc_len, self.rank, self.world = local_tokens, max_doc_len, rank, world_size
        self.device = torch.device(device)
        self.span = self.global_span(local_tokens, world_size)
        self.hold_out = hold_out
        self.held_shard, self.held_start = (hold_out_place(tuple(self.paths), self.span, hold_out) if hold_out
                                            else (None, None))
        self._shard_pool = concurrent.futures.ThreadPoolExecutor(1)
        self._batch_pool = concurrent.futures.ThreadPoolExecutor(1)
        self.shard_index = -1
        self._next_shard = self._shard_pool.submit(self._load_shard, 0)
        self._advance_shard()
        self._next_batch = self._batch_pool.submit(self._prepare)

    @staticmethod
    def global_span(local_tokens: int, world_size: int) -> int:
        """Tokens one micro-step takes from the stream: each rank's local_tokens inputs, and one more
        for its last target."""
        return world_size * (local_tokens + 1)

    def _load_shard(self, index: int):
        tokens = np.array(read_shard(self.paths[index]))  # read fully into memory, off the main thread
        bos = np.flatnonzero(tokens == BOS_ID)
        if bos.size == 0:
            raise ShardError(f"{self.paths[index]}: no BOS token ({BOS_ID}); documents cannot be found")
        if index == self.held_shard:
            tokens = tokens[:self.held_start]
        if len(tokens) - bos[0] < self.span:
            held = f" after the last {self.hold_out} spans held out (EMA_SELECT)" if self.hold_out else ""
            raise ConfigError(f"{self.paths[index]}: {len(tokens)} tokens{held} cannot fill one global batch of "
                              f"{self.span}; lower TRAIN_BATCH_TOKENS or use larger shards")
        return tokens, int(bos[0])

    def _rank_slice(self, tokens: np.ndarray, span_start: int, max_doc_len: int) -> tuple[list[Tensor], int]:
        """This rank's n + 1 tokens of the global span at span_start: [inputs, targets, cu_seqlens]
        (CPU) and the longest segment."""
        start = span_start + self.rank * (self.n + 1)
        chunk = torch.from_numpy(tokens[start:start + self.n + 1].astype(np.int64))
        cu, max_len = build_cu_seqlens(chunk[:-1].numpy(), max_doc_len)
        return [chunk[:-1], chunk[1:], torch.from_numpy(cu)], max_len

    def held_out_batches(self) -> list[tuple[Tensor, Tensor, Tensor, int]]:
        """The hold_out micro-batches (this rank's slice of each held-out span), cut as next_batch cuts;
        none when nothing is held out (EMA_SELECT=0)."""
        if not self.hold_out:
            return []
        tokens = read_shard(self.paths[self.held_shard])
        batches = [self._rank_slice(tokens, self.held_start + k * self.span, self.max_doc_len)
                   for k in range(self.hold_out)]
        return [(*(t.to(self.device) for t in batch), max_len) for batch, max_len in batches]

    def _advance_shard(self):
        self.shard_index = (self.shard_index + 1) % len(self.paths)
        self.tokens, self.cursor = self._next_shard.result()
        self._next_shard = self._shard_pool.submit(self._load_shard, (self.shard_index + 1) % len(self.paths))

    def _prepare(self):
        if self.cursor + self.span > len(self.tokens):
            self._advance_shard()
        max_doc_len = self.max_doc_len
        batch, max_len = self._rank_slice(self.tokens, self.cursor, max_doc_len)
        self.cursor += self.span
        if self.device.type == "cuda":
            batch = [t.pin_memory() for t in batch]
        return batch, max_len, max_doc_len

    def next_batch(self, max_doc_len: int | None = None) -> tuple[Tensor, Tensor, Tensor, int]:
        """(inputs [n], targets [n], cu_seqlens int32, longest segment), on the loader's device.
        max_doc_len: cut documents at this length from now on (progressive context); the batch
        prepared ahead with the old length is cut again."""
        (x, y, cu), max_len, cut_at = self._next_batch.result()
        if max_doc_len is not None and max_doc_len != cut_at:
            self.max_doc_len = max_doc_len
            cu, max_len = build_cu_seqlens(x.numpy(), max_doc_len)
            cu = torch.from_numpy(cu)
        self._next_batch = self._batch_pool.submit(self._prepare)
        dev = self.device
        return x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), cu.to(dev, non_blocking=True), max_len

    def close(self):
        for pool in (self._batch_pool, self._shard_pool):
            pool.shutdown(wait=True, cancel_futures=True)


class ShuffledSequenceLoader:
    """Random fixed-length windows from the training shards, for GPTQ calibration.

    Rank r reads shards r, r + world, ... with its own PCG64(r) stream. Each shard gets a random
    phase and a random order of its non-overlapping windows; a batch draws each window's shard with
    probability proportional to the windows it has left, so shards are used up evenly.
    """

    def __init__(self, pattern: str, seq_len: int, rank: int = 0, world_size: int = 1):
        paths = shard_paths(pattern)
        self.paths = paths[rank::world_size] or paths
        self.seq_len = seq_len
        self.rng = np.random.Generator(np.random.PCG64(rank))
        self.shards = [read_shard(p) for p in self.paths]
        self._new_epoch()

    def _new_epoch(self):
        self.order = []
        for tokens in self.shards:
            phase = int(self.rng.integers(self.seq_len))
            count = max((len(tokens) - phase - 1) // self.seq_len, 0)
            self.order.append((phase, list(self.rng.permutation(count))))
        if not any(windows for _, windows in self.order):
            raise ConfigError(f"training shards are shorter than one calibration window of {self.seq_len + 1} tokens")

    def next_batch(self, batch_size: int) -> tuple[Tensor, Tensor]:
        rows = []
        for _ in range(batch_size):
            left = np.array([len(w) for _, w in self.order], dtype=np.float64)
            if left.sum() == 0:
                self._new_epoch()
                left = np.array([len(w) for _, w in self.order], dtype=np.float64)
            i = int(self.rng.choice(len(left), p=left / left.sum()))
            phase, windows = self.order[i]
            start = phase + int(windows.pop()) * self.seq_len
            rows.append(np.asarray(self.shards[i][start:start + self.seq_len + 1], dtype=np.int64))
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1], batch[:, 1:]


def load_validation_tokens(pattern: str, seq_len: int) -> Tensor:
    """All validation shards in order, cut to a whole number of seq_len windows plus one token."""
    tokens = np.concatenate([read_shard(p) for p in shard_paths(pattern)])
    usable = (len(tokens) - 1) // seq_len * seq_len
    if usable <= 0:
        raise ConfigError(f"validation shards {pattern} hold {len(tokens)} tokens, fewer than EVAL_SEQ_LEN+1")
    return torch.from_numpy(tokens[:usable + 1].astype(np.int64))


DOWNLOADABLE_VOCABS = (1024, 4096, 8192)  # the sp<V> variants data/cached_challenge_fineweb.py knows


def check_data(h: Hyperparameters, need_train: bool = True) -> None:
    """Fail early, in one line, when the data or tokenizer is missing or does not match VOCAB_SIZE,
    or any shard's header disagrees with its size: a broken shard is found in seconds, before
    anything compiles, not when the loader reaches it an hour later."""
    build = "build it from your own documents with `python3 data/tokenize_docs.py`"
    fetch = (f"download it with `python3 data/cached_challenge_fineweb.py --variant sp{h.vocab_size}` or {build}"
             if h.vocab_size in DOWNLOADABLE_VOCABS else build)
    if not os.path.isdir(h.dataset_dir):
        raise ConfigError(f"data folder {h.dataset_dir} (DATA_DIR={h.data_dir}, VOCAB_SIZE={h.vocab_size}) "
                          f"does not exist: {fetch}")
    patterns = [h.val_files] + ([h.train_files] if need_train else [])
    for pattern in patterns:
        if not glob.glob(pattern):
            raise ConfigError(f"no shards match {pattern} (DATA_DIR={h.data_dir}, VOCAB_SIZE={h.vocab_size}): {fetch}")
        for path in shard_paths(pattern):
            read_shard(path)  # header against file size; raises ShardError naming the file
    if need_train and h.ema_select:
        span = DocumentPackingLoader.global_span(h.local_batch_tokens, h.world_size)
        hold_out_place(tuple(shard_paths(h.train_files)), span, h.ema_select)
    if not os.path.isfile(h.tokenizer_path):
        raise ConfigError(f"tokenizer {h.tokenizer_path} (DATA_DIR={h.data_dir}, VOCAB_SIZE={h.vocab_size}) "
                          f"does not exist: {fetch}")
    import sentencepiece as spm
    size = spm.SentencePieceProcessor(model_file=h.tokenizer_path).vocab_size()
    if size != h.vocab_size:
        raise ConfigError(f"tokenizer {h.tokenizer_path} has {size} pieces but VOCAB_SIZE={h.vocab_size}: "
                          f"set VOCAB_SIZE={size} or use the matching tokenizer")


# =============================================================================================
#                                        BITS PER BYTE
# =============================================================================================


# The score is bits per byte of the original text, so that models with different tokenizers can
# be compared. Each target token is charged the UTF-8 bytes of its piece: byte-fallback pieces
# one byte, control/unknown/unused pieces none, and a piece's leading "▁" one space byte unless
# the previous token is a boundary (BOS), because the decoder drops a document's leading space.
# Sums of nats and bytes are kept in float64 and summed over ranks before the division.
#
# The bytes are those of the text as the tokenizer's nmt_nfkc normalizer leaves it (whitespace
# runs folded, ends trimmed, NFKC): exactly the UTF-8 length of each document decoded on its own.
# SentencePiece's decoder departs from these tables only on id sequences that encoding never
# produces (pinned in tests/test_bpb.py): it drops *every* leading "▁" piece, not just one;
# decoding across a BOS keeps the next document's leading space; an incomplete byte-fallback
# sequence decodes to U+FFFD (3 bytes, not 1 per byte piece); <unk> decodes to " ⁇ ".


def build_byte_luts(sp, vocab_size: int, device="cpu") -> tuple[Tensor, Tensor, Tensor]:
    """(base_bytes int16, has_leading_space bool, is_boundary bool), each of length vocab_size."""
    if sp.piece_to_id("\u2581") == sp.unk_id():
        raise ConfigError("the tokenizer has no piece for '\u2581' (a lone space); its byte count would be wrong")
    base_bytes = np.zeros(vocab_size, dtype=np.int16)
    has_space = np.zeros(vocab_size, dtype=bool)
    is_boundary = np.ones(vocab_size, dtype=bool)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        is_boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            has_space[i], piece = True, piece[1:]
        base_bytes[i] = len(piece.encode("utf-8"))
    return (torch.tensor(base_bytes, device=device), torch.tensor(has_space, device=device),
            torch.tensor(is_boundary, device=device))


def target_bytes(prev: Tensor, target: Tensor, luts) -> Tensor:
    """UTF-8 bytes charged to each target token given the token before it."""
    base_bytes, has_space, is_boundary = luts
    return base_bytes[target].to(torch.int64) + (has_space[target] & ~is_boundary[prev]).to(torch.int64)


def bits_per_byte(loss_sum: float, byte_sum: float) -> float:
    return loss_sum / math.log(2) / max(byte_sum, 1.0)


# =============================================================================================
#                                           KERNELS
# =============================================================================================


# The fused MLP: the up-projection and its LeakyReLU(0.5)^2 activation in one Triton matmul
# (record PR #1530's design). The MLP's hidden activations are 4x wider than the residual stream,
# so they dominate its memory traffic. Eager code writes the pre-activation, reads it back for the
# activation and writes the result; the kernel applies the activation in the matmul's epilogue,
# so both are written once and never re-read. In the backward pass the same kernel computes
# grad·W_down and multiplies in f'(pre) in its epilogue, so d(post) never reaches memory. The
# down-projection and the weight gradients stay in cuBLAS. eager_mlp is the same math in plain
# PyTorch: the path on CPU, in evaluation and TTT, and for Hessian collection.
#
# Persistent kernel: min(#SMs, #tiles) programs, each walking tiles with stride #SMs. On Hopper it
# reads and writes through TMA (host-side tensor descriptors); elsewhere, and under the Triton
# interpreter on CPU (TRITON_INTERPRET=1, how the tests run it), through masked pointer accesses.

# Triton reads TRITON_INTERPRET when @triton.jit runs, so the kernels below are interpreted iff it
# was set when this file was imported.
_TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

if triton is not None:

    @triton.jit
    def _tile_load(ref, r0, c0, R, C, BR: tl.constexpr, BC: tl.constexpr, USE_TMA: tl.constexpr):
        """Rows r0..r0+BR, columns c0..c0+BC of a row-major [R, C] tensor, zeros outside it."""
        if USE_TMA:
            tile = ref.load([r0, c0])
        else:
            rows = (r0 + tl.arange(0, BR)).to(tl.int64)
            cols = c0 + tl.arange(0, BC)
            mask = (rows[:, None] < R) & (cols[None, :] < C)
            tile = tl.load(ref + rows[:, None] * C + cols[None, :], mask=mask, other=0.0)
        return tile

    @triton.jit
    def _tile_store(ref, value, r0, c0, R, C, USE_TMA: tl.constexpr):
        """Store value (cast to ref's dtype) at rows r0.., columns c0.. of a row-major [R, C] tensor,
        dropping what falls outside; returns the value as stored."""
        if USE_TMA:
            value = value.to(ref.dtype)
            ref.store([r0, c0], value)
        else:
            value = value.to(ref.dtype.element_ty)
            rows = (r0 + tl.arange(0, value.shape[0])).to(tl.int64)
            cols = c0 + tl.arange(0, value.shape[1])
            mask = (rows[:, None] < R) & (cols[None, :] < C)
            tl.store(ref + rows[:, None] * C + cols[None, :], value, mask=mask)
        return value

    @triton.jit
    def _fused_mlp_epilogue(acc, c, aux, off_m, off_n, M, N, BLOCK_M: tl.constexpr, HALF_N: tl.constexpr,
                            FORWARD: tl.constexpr, USE_TMA: tl.constexpr):
        """One [BLOCK_M, HALF_N] half of an output tile, acc = a·bᵀ in fp32."""
        if FORWARD:
            # pre = acc rounded to the output dtype; post = LeakyReLU_0.5(pre)^2 from that rounded pre,
            # exactly as the eager path computes it from its bf16 pre.
            pre = _tile_store(c, acc, off_m, off_n, M, N, USE_TMA).to(tl.float32)
            act = tl.where(pre > 0, pre, 0.5 * pre)
            _tile_store(aux, act * act, off_m, off_n, M, N, USE_TMA)
        else:
            # dpre = dpost · f'(pre), with f'(p) = 2p for p > 0 and 0.5p otherwise.
            pre = _tile_load(aux, off_m, off_n, M, N, BLOCK_M, HALF_N, USE_TMA).to(tl.float32)
            _tile_store(c, acc * tl.where(pre > 0, 2.0 * pre, 0.5 * pre), off_m, off_n, M, N, USE_TMA)

    @triton.jit
    def _fused_mlp_kernel(a, b, c, aux, M, N, K, FORWARD: tl.constexpr, USE_TMA: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                NUM_SMS: tl.constexpr):
        """a [M, K], b [N, K] -> acc = a·bᵀ per [BLOCK_M, BLOCK_N] tile, then the activation epilogue.
        FORWARD: c <- pre, aux <- post.  Backward: aux holds pre, c <- dpre.
        a, b, c, aux are TMA descriptors when USE_TMA, else pointers to contiguous tensors."""
        tiles_n = tl.cdiv(N, BLOCK_N)
        num_tiles = tl.cdiv(M, BLOCK_M) * tiles_n
        # The epilogue recomputes its tile from its own counter, so the flattened, software-pipelined
        # loop carries no value from its prologue (the loads) to its epilogue (the stores).
        tile_c = tl.program_id(0) - NUM_SMS
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True):
            # Main loop: fp32 accumulator over BLOCK_K-wide slabs of the shared K dimension.
            off_m = (tile // tiles_n) * BLOCK_M
            off_n = (tile % tiles_n) * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                a_tile = _tile_load(a, off_m, k, M, K, BLOCK_M, BLOCK_K, USE_TMA)
                b_tile = _tile_load(b, off_n, k, N, K, BLOCK_N, BLOCK_K, USE_TMA)
                acc = tl.dot(a_tile, b_tile.T, acc)
            # Epilogue in two [BLOCK_M, BLOCK_N/2] halves: half the registers and store buffers live.
            tile_c += NUM_SMS
            off_m = (tile_c // tiles_n) * BLOCK_M
            off_n = (tile_c % tiles_n) * BLOCK_N
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            _fused_mlp_epilogue(acc0, c, aux, off_m, off_n, M, N, BLOCK_M, BLOCK_N // 2, FORWARD, USE_TMA)
            _fused_mlp_epilogue(acc1, c, aux, off_m, off_n + BLOCK_N // 2, M, N, BLOCK_M, BLOCK_N // 2,
                                FORWARD, USE_TMA)


def fused_mlp_up(a: Tensor, b: Tensor, aux: Tensor | None = None, use_tma: bool | None = None):
    """Launch the kernel. Forward (aux None): returns (pre, post) = (a·bᵀ, LeakyReLU_0.5(pre)²).
    Backward (aux = pre): returns dpre = (a·bᵀ)·f'(pre). a [M, K], b [N, K], outputs [M, N] in a's dtype.
    use_tma None picks TMA on Hopper; tests force the pointer path with False."""
    if triton is None or not (a.is_cuda or _TRITON_INTERPRETED):
        raise RuntimeError("the fused MLP kernel needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    if a.dtype != b.dtype or a.shape[1] != b.shape[1]:
        raise ValueError(f"a {a.dtype}{tuple(a.shape)} and b {b.dtype}{tuple(b.shape)} do not match")
    forward = aux is None
    a, b = a.contiguous(), b.contiguous()
    (M, K), N = a.shape, b.shape[0]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    aux = torch.empty_like(c) if forward else aux.contiguous()
    if use_tma is None:
        use_tma = a.is_cuda and not _TRITON_INTERPRETED and torch.cuda.get_device_capability(a.device)[0] == 9
    if use_tma:  # Hopper: the record's tiles, 4 (fwd) / 3 (bwd) pipeline stages
        block_m, block_n, block_k, warps, stages = 128, 256, 64, 8, (4 if forward else 3)
    elif a.is_cuda:  # other GPUs: smaller tiles that fit 100 KB of shared memory
        block_m, block_n, block_k, warps, stages = 128, 128, 32, 4, 3
    else:  # interpreter: small tiles keep the CPU tests fast and exercise the edge masks
        block_m, block_n, block_k, warps, stages = 32, 32, 16, 4, 1
    num_sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 4
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        assert K % 8 == 0 and N % 8 == 0, f"TMA needs 16-byte rows: K={K} and N={N} must be multiples of 8"
        a = TensorDescriptor.from_tensor(a, [block_m, block_k])
        b = TensorDescriptor.from_tensor(b, [block_n, block_k])
        c_arg = TensorDescriptor.from_tensor(c, [block_m, block_n // 2])
        aux_arg = TensorDescriptor.from_tensor(aux, [block_m, block_n // 2])
    else:
        c_arg, aux_arg = c, aux
    grid = (min(num_sms, triton.cdiv(M, block_m) * triton.cdiv(N, block_n)),)
    _fused_mlp_kernel[grid](a, b, c_arg, aux_arg, M, N, K, FORWARD=forward, USE_TMA=use_tma,
                                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, NUM_SMS=num_sms,
                                  num_warps=warps, num_stages=stages)
    return (c, aux) if forward else c


# torch.compile must not trace into the launcher (host-side descriptors, device queries), so each
# direction is an opaque custom op with a shape-only fake implementation; the model still compiles
# with fullgraph=True around them. Schemas are written out rather than inferred from annotations,
# which this file's `from __future__ import annotations` turns into strings.
@torch.library.custom_op("pgolf::fused_mlp_up_fwd", mutates_args=(),
                         schema="(Tensor x, Tensor w_up) -> (Tensor, Tensor)")
def _fused_mlp_up_fwd(x, w_up):
    return fused_mlp_up(x, w_up)


@_fused_mlp_up_fwd.register_fake
def _(x, w_up):
    pre = x.new_empty((x.shape[0], w_up.shape[0]))
    return pre, torch.empty_like(pre)


@torch.library.custom_op("pgolf::fused_mlp_up_bwd", mutates_args=(),
                         schema="(Tensor grad, Tensor w_down_t, Tensor pre) -> Tensor")
def _fused_mlp_up_bwd(grad, w_down_t, pre):
    return fused_mlp_up(grad, w_down_t, aux=pre)


@_fused_mlp_up_bwd.register_fake
def _(grad, w_down_t, pre):
    return torch.empty_like(pre)


class FusedMLP(torch.autograd.Function):
    """out = LeakyReLU_0.5(x·W_upᵀ)²·W_downᵀ with the fused kernel; x [..., D], W_up [H, D], W_down [D, H],
    all one dtype (bf16 in training)."""

    @staticmethod
    def forward(ctx, x, w_up, w_down):
        x2 = x.reshape(-1, x.shape[-1])
        pre, post = _fused_mlp_up_fwd(x2, w_up)
        ctx.save_for_backward(x2, w_up, w_down, pre, post)
        return F.linear(post, w_down).reshape(*x.shape[:-1], w_down.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, w_up, w_down, pre, post = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(post.dtype)
        dw_down = g.t() @ post                                     # [D, H]
        dpre = _fused_mlp_up_bwd(g, w_down.t().contiguous(), pre)  # (g·W_down)·f'(pre), [M, H]
        dw_up = dpre.t() @ x2                                      # [H, D]
        dx = (dpre @ w_up).reshape(*grad.shape[:-1], w_up.shape[1])
        return dx, dw_up, dw_down


def fused_mlp(x: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """The training MLP through the fused kernel; x is cast to the weights' dtype (autograd sees the cast)."""
    return FusedMLP.apply(x.to(w_up.dtype), w_up, w_down.to(w_up.dtype))


def eager_mlp(x: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """The same math in plain PyTorch: the model's path wherever the fused kernel is not used."""
    # LeakyReLU(0.5)^2 activation: Parameter Golf records since PR #626 / #635
    return F.linear(F.leaky_relu(F.linear(x, w_up), 0.5).square(), w_down)


# The softcapped cross-entropy: z = cap·tanh(x/cap) over the tied head's bf16 logits x, then
# loss = logsumexp(z) − z[target], per token. Compiled eager code turns the [tokens, 8192] logits
# into fp32 and keeps more than one such tensor for the backward; here one program reads its row
# of bf16 logits once per direction, keeps z in fp32 registers and saves only the row's logsumexp.
# The backward recomputes z and writes d(loss)/dx = g·(softmax(z) − onehot)·(1 − tanh²) straight
# in the logits' dtype. (Fused softcapped cross-entropy: the modded-nanogpt speedruns' idea.)
if triton is not None:

    @triton.jit
    def _softcap(x, cap_pos, cap_neg):
        """(cap·tanh(x/cap), tanh(x/cap)) in fp32, cap = cap_pos for x >= 0 else cap_neg.
        tanh(u) = 1 − 2/(exp(2u) + 1): one exp, exact at both ends (exp overflows to inf: tanh 1)."""
        cap = tl.where(x >= 0, cap_pos, cap_neg)
        th = 1.0 - 2.0 / (tl.exp(2.0 * x / cap) + 1.0)
        return cap * th, th

    @triton.jit
    def _softcap_ce_kernel(logits, targets, lse, grad_loss, out, grad_out, V, cap_pos, cap_neg,
                           FORWARD: tl.constexpr, GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
        """One row per program. FORWARD: out[row] <- loss, lse[row] <- logsumexp(z), and with GRAD also
        grad_out[row, :] <- (softmax(z) − onehot(target))·(1 − tanh²), the gradient for a unit
        d(loss); grad_out may be the logits themselves (the row is read whole before it is written).
        Backward: out[row, :] <- grad_loss[row]·(softmax(z) − onehot(target))·(1 − tanh²)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_V)
        inside = cols < V
        x = tl.load(logits + row * V + cols, mask=inside, other=0.0).to(tl.float32)
        z, th = _softcap(x, cap_pos, cap_neg)
        target = tl.load(targets + row)
        if FORWARD:
            z = tl.where(inside, z, float("-inf"))
            peak = tl.max(z, axis=0)
            row_lse = peak + tl.log(tl.sum(tl.exp(z - peak), axis=0))
            tl.store(lse + row, row_lse)
            tl.store(out + row, row_lse - tl.sum(tl.where(cols == target, z, 0.0), axis=0))
            if GRAD:
                g = tl.exp(z - row_lse) - tl.where(cols == target, 1.0, 0.0)
                tl.store(grad_out + row * V + cols, (g * (1.0 - th * th)).to(grad_out.dtype.element_ty), mask=inside)
        else:
            p = tl.exp(z - tl.load(lse + row))
            g = (p - tl.where(cols == target, 1.0, 0.0)) * tl.load(grad_loss + row)
            tl.store(out + row * V + cols, (g * (1.0 - th * th)).to(out.dtype.element_ty), mask=inside)


def softcap_ce(logits: Tensor, targets: Tensor, cap_pos: float, cap_neg: float, lse: Tensor | None = None,
               grad_loss: Tensor | None = None, grad_out: Tensor | None = None):
    """Launch the kernel. Forward (lse None): returns (loss, lse), fp32 [N], for logits [N, V] and
    targets [N] of ids in [0, V); with grad_out [N, V] (which may be `logits` itself) it also writes
    the gradient for a unit d(loss) there. Backward (lse and grad_loss [N] given): returns
    d(loss)/d(logits)."""
    if triton is None or not (logits.is_cuda or _TRITON_INTERPRETED):
        raise RuntimeError("the fused cross-entropy kernel needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    logits, targets = logits.contiguous(), targets.contiguous()
    (N, V), forward = logits.shape, lse is None
    if forward:
        lse, out = (torch.empty(N, dtype=torch.float32, device=logits.device) for _ in range(2))
        grad_loss = out  # unread
    else:
        out, grad_loss = torch.empty_like(logits), grad_loss.float().contiguous()
    block = triton.next_power_of_2(V)
    _softcap_ce_kernel[(N,)](logits, targets, lse, grad_loss, out, out if grad_out is None else grad_out, V,
                             float(cap_pos), float(cap_neg), FORWARD=forward, GRAD=grad_out is not None,
                             BLOCK_V=block, num_warps=min(16, max(1, block // 512)))
    return (out, lse) if forward else out


@torch.library.custom_op("pgolf::softcap_ce_fwd", mutates_args=(),
                         schema="(Tensor logits, Tensor targets, float cap_pos, float cap_neg) -> (Tensor, Tensor)")
def _softcap_ce_fwd(logits, targets, cap_pos, cap_neg):
    return softcap_ce(logits, targets, cap_pos, cap_neg)


@_softcap_ce_fwd.register_fake
def _(logits, targets, cap_pos, cap_neg):
    loss = logits.new_empty(logits.shape[:1], dtype=torch.float32)
    return loss, torch.empty_like(loss)


@torch.library.custom_op("pgolf::softcap_ce_bwd", mutates_args=(),
                         schema="(Tensor grad_loss, Tensor logits, Tensor targets, Tensor lse, float cap_pos, "
                                "float cap_neg) -> Tensor")
def _softcap_ce_bwd(grad_loss, logits, targets, lse, cap_pos, cap_neg):
    return softcap_ce(logits, targets, cap_pos, cap_neg, lse=lse, grad_loss=grad_loss)


@_softcap_ce_bwd.register_fake
def _(grad_loss, logits, targets, lse, cap_pos, cap_neg):
    return torch.empty_like(logits)


class SoftcapCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of softcapped logits, fp32 [N], from raw logits [N, V] (any float dtype)."""

    @staticmethod
    def forward(ctx, logits, targets, cap_pos, cap_neg):
        loss, lse = _softcap_ce_fwd(logits, targets, cap_pos, cap_neg)
        ctx.save_for_backward(logits, targets, lse)
        ctx.caps = (cap_pos, cap_neg)
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        return _softcap_ce_bwd(grad, logits, targets, lse, *ctx.caps), None, None, None


def softcapped_cross_entropy(logits: Tensor, targets: Tensor, cap_pos: float, cap_neg: float) -> Tensor:
    """Fused: the same loss as eager_softcapped_cross_entropy without fp32 [N, V] tensors."""
    return SoftcapCrossEntropy.apply(logits, targets, cap_pos, cap_neg)


# FUSED_HEAD_CE=1: the tied head and the loss as one function whose forward also computes the
# loss's gradient for a unit d(loss), written over the logits it just made. A row's upstream
# gradient g only scales that row, and scaling rows commutes with the head's two products:
# d(hidden) = g·(U W) and d(W) = Uᵀ (g·hidden). So the backward needs neither the logits nor
# a second [tokens, 8192] tensor (the plain path keeps the logits and allocates d(logits) beside
# them, 1.5 GiB each at the training shape), and the kernel reads the logits once instead of twice.
# (A fused linear + cross-entropy, as in Liger-Kernel; there the work is also split in row chunks.)
@torch.library.custom_op("pgolf::head_softcap_ce", mutates_args=(),
                         schema="(Tensor hidden, Tensor weight, Tensor targets, float cap_pos, float cap_neg) "
                                "-> (Tensor, Tensor)")
def _head_softcap_ce(hidden, weight, targets, cap_pos, cap_neg):
    unit_grad = hidden @ weight.t()  # the logits, overwritten in place by their unit gradient
    loss, _ = softcap_ce(unit_grad, targets, cap_pos, cap_neg, grad_out=unit_grad)
    return loss, unit_grad


@_head_softcap_ce.register_fake
def _(hidden, weight, targets, cap_pos, cap_neg):
    return hidden.new_empty(hidden.shape[:1], dtype=torch.float32), hidden.new_empty(hidden.size(0), weight.size(0))


class HeadSoftcapCrossEntropy(torch.autograd.Function):
    """Per-token loss, fp32 [N], of the softcapped logits hidden [N, D] @ weight [V, D]^T (same dtype)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, cap_pos, cap_neg):
        loss, unit_grad = _head_softcap_ce(hidden, weight, targets, cap_pos, cap_neg)
        ctx.save_for_backward(hidden, weight, unit_grad)
        return loss

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, unit_grad = ctx.saved_tensors
        g = grad.float()[:, None]  # scaled in fp32: g is ~1e-6 and a bf16 g would be off by up to 0.4%
        d_hidden = ((unit_grad @ weight).float() * g).to(hidden.dtype)
        return d_hidden, unit_grad.t() @ (hidden.float() * g).to(hidden.dtype), None, None, None


def head_softcapped_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, cap_pos: float,
                                  cap_neg: float) -> Tensor:
    """The loss of softcapped_cross_entropy(hidden @ weight.T, ...) with the head inside (FUSED_HEAD_CE)."""
    return HeadSoftcapCrossEntropy.apply(hidden, weight, targets, cap_pos, cap_neg)


def eager_softcapped_cross_entropy(logits: Tensor, targets: Tensor, cap_pos: float, cap_neg: float) -> Tensor:
    """The same math in plain PyTorch, fp32: per-token loss [N] from raw logits [N, V]."""
    return F.cross_entropy(softcap(logits.float(), cap_pos, cap_neg), targets, reduction="none")


def softcap(logits: Tensor, cap_pos: float, cap_neg: float) -> Tensor:
    """cap·tanh(logits/cap); an asymmetric softcap (PR #1923) bounds negative logits by cap_neg."""
    if cap_neg == cap_pos:
        return cap_pos * torch.tanh(logits / cap_pos)
    cap = torch.where(logits >= 0, cap_pos, cap_neg)
    return cap * torch.tanh(logits / cap)


# =============================================================================================
#                                            MODEL
# =============================================================================================


# The record's GPT: 11 blocks of width 512 whose matrices live in four "banks" (qo, kv, mlp_up,
# mlp_down) so that Muon orthogonalizes a whole bank as one batched tensor (parameter banking,
# PR #593); tied embedding with a tanh logit softcap; QK-norm with a learned per-head
# query gain; partial RoPE; XSA on the last layers; U-Net skips merged by a gated lerp; depth
# recurrence over a middle segment once training is far enough along; two-lane parallel
# residuals in the last layers. Each technique is credited where it is computed.
# The same forward serves training (one packed row cut by cu_seqlens), evaluation (dense
# batches) and test-time training (a per-document LoRA set added to the projections).


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


_ROTARY_CACHE: dict = {}  # (rope_dims, base, device) -> cos/sin [2, longest length so far, rope_dims/2]


def rotary_tables(positions: int, rope_dims: int, base: float, device) -> tuple[Tensor, Tensor]:
    """cos/sin [positions, rope_dims/2] for partial RoPE (only the first rope_dims of a head rotate)."""
    table = _rotary_table(positions, rope_dims, base, device)
    return table[0], table[1]


@torch.compiler.assume_constant_result
def _rotary_table(positions: int, rope_dims: int, base: float, device) -> Tensor:
    """Computed eagerly once per (rope_dims, base, device), for the longest length asked so far,
    and sliced (an entry depends on its position alone, so a slice equals a fresh table). Under
    torch.compile this runs at trace time and the graph holds the table as a constant, so neither
    its forward nor its backward recomputes cos/sin from arange (the backward did, per element of
    q and k in every layer: 42.5 ms of an 852 ms training step on an H200)."""
    # RoPE: Su et al. 2021, arXiv:2104.09864; partial (16 of 64 dims) as in the record stack
    key = rope_dims, float(base), torch.device(device)
    table = _ROTARY_CACHE.get(key)
    if table is None or table.size(1) < positions:
        # inference_mode(False): a table first built while evaluating must still serve training
        with torch.no_grad(), torch.inference_mode(False):
            inv_freq = base ** (-torch.arange(0, rope_dims, 2, device=device, dtype=torch.float32) / rope_dims)
            freqs = torch.outer(torch.arange(positions, device=device, dtype=torch.float32), inv_freq)
            table = _ROTARY_CACHE[key] = torch.stack((freqs.cos(), freqs.sin()))
    return table[:, :positions]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-split rotation of the first 2*cos.size(-1) dims of x [..., T, H, D]; the rest pass through."""
    pairs = cos.size(-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    x1, x2, rest = x[..., :pairs], x[..., pairs:2 * pairs], x[..., 2 * pairs:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


def exclusive_self_attention(y: Tensor, v: Tensor) -> Tensor:
    """Remove from each head's output its component along the unit value vector of its own
    position, so a token cannot simply copy itself. y [..., T, Hq, D], v [..., T, Hkv, D], Hq a
    multiple of Hkv (each KV head's group of query heads shares its value direction)."""
    # XSA: Zhai 2026, arXiv:2603.09078; in Parameter Golf since PR #265 / #287
    group = y.size(-2) // v.size(-2)
    y = y.unflatten(-2, (v.size(-2), group))
    v_hat = F.normalize(v, dim=-1).unsqueeze(-2)
    return (y - (y * v_hat).sum(-1, keepdim=True) * v_hat).flatten(-3, -2)


def with_lora(y: Tensor, adapters: dict | None, name: str, x: Tensor) -> Tensor:
    """y plus the LoRA change x A B of adapter `name`, if this slot's adapters (BatchedLoRA.slot:
    name -> (A [docs, in, r], B [docs, r, out])) have it; y itself otherwise. Stored as the right
    operands, so autograd returns A's, B's and x's gradients in their own layouts (torch's fused
    AdamW needs that of the parameters; transposed ones were copied every step)."""
    if not adapters or name not in adapters:
        return y
    A, B = adapters[name]
    return y + torch.bmm(torch.bmm(x, A.to(x.dtype)), B.to(x.dtype))


# ---------------------------------------------------------------------------------------------
# Attention backends. FlashAttention 3 is fastest on Hopper but is not on PyPI; FlashAttention 4
# (pip install flash-attn-4: CuTe DSL kernels, JIT-compiled, Hopper and Blackwell) is about as fast
# and installs from PyPI; torch's own varlen_attn (torch >= 2.10, FA2-class kernels) runs the same
# document-isolated attention on any recent GPU; SDPA with a per-document causal mask is the
# portable reference (CPU, tests). One is chosen at start and logged.
# Layout everywhere: q [B, T, Hq, D], k/v [B, T, Hkv, D]; cu_seqlens (B == 1) cuts the row into
# documents, otherwise each row is one causal sequence.
# ---------------------------------------------------------------------------------------------


ATTENTION_NEEDS = {"fa3": "CUDA and flash_attn_interface (FlashAttention 3)",
                   "fa4": "a Hopper or Blackwell GPU and pip install flash-attn-4",
                   "varlen": "CUDA and torch >= 2.10", "sdpa": ""}


def pick_attention_backend(requested: str = "") -> str:
    checks = {"fa3": lambda: torch.cuda.is_available() and _has_fa3(), "fa4": _has_fa4,
              "varlen": lambda: torch.cuda.is_available() and _has_varlen_attn(), "sdpa": lambda: True}
    if requested:
        if not checks[requested]():
            raise ConfigError(f"ATTN_BACKEND={requested} is not available here (needs {ATTENTION_NEEDS[requested]})")
        return requested
    return next(name for name in ("fa3", "fa4", "varlen", "sdpa") if checks[name]())


def _has_fa3() -> bool:
    try:
        import flash_attn_interface  # noqa: F401
        return True
    except ImportError:
        return False


def _has_fa4() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10):
        return False
    try:
        _fa4_interface()
        return True
    except ImportError:
        return False


def _fa4_interface():
    import flash_attn.cute.interface as fa4  # about 7 s the first time: it loads the CuTe DSL
    return fa4


# FlashAttention 4 as a torch custom op with its own backward, so torch.compile keeps one graph
# around it: its Python API is an autograd.Function, which the compiler would break the graph on.
# The op namespace is the module's name, so that a second copy of this code in one process (the
# code stub run by the tests) registers its own ops instead of replacing these.
_OPS = __name__.split(".")[-1].strip("_")


@torch.library.custom_op(f"{_OPS}::fa4_varlen", mutates_args=())
def fa4_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> tuple[Tensor, Tensor]:
    """Causal attention within each segment of cu_seqlens: q [N, Hq, D], k/v [N, Hkv, D] ->
    (out [N, Hq, D], log-sum-exp [Hq, N] fp32)."""
    out, lse = _fa4_interface()._flash_attn_fwd(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                                max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, causal=True,
                                                return_lse=True)[:2]
    return out, lse


@fa4_varlen.register_fake
def _(q, k, v, cu_seqlens, max_seqlen):
    return torch.empty_like(q), q.new_empty((q.size(1), q.size(0)), dtype=torch.float32)


@torch.library.custom_op(f"{_OPS}::fa4_varlen_backward", mutates_args=())
def fa4_varlen_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        cu_seqlens: Tensor, max_seqlen: int) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _fa4_interface()._flash_attn_bwd(q, k, v, out, grad, lse, causal=True, cu_seqlens_q=cu_seqlens,
                                                  cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                                                  max_seqlen_k=max_seqlen)[:3]
    return dq, dk, dv


@fa4_varlen_backward.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens, max_seqlen):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fa4_save(ctx, inputs, output):
    q, k, v, cu_seqlens, ctx.max_seqlen = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens)


def _fa4_grad(ctx, grad, _grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    return *fa4_varlen_backward(grad.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen), None, None


fa4_varlen.register_autograd(_fa4_grad, setup_context=_fa4_save)


def _has_varlen_attn() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        return True
    except ImportError:
        return False


def causal_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None, max_seqlen: int,
                     backend: str) -> Tensor:
    if backend == "fa3":
        import flash_attn_interface as fa3
        if cu_seqlens is None:
            return fa3.flash_attn_func(q, k, v, causal=True)
        return fa3.flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                          causal=True)[None]
    if backend in ("varlen", "fa4"):
        B, T = q.shape[:2]
        if cu_seqlens is None:  # dense rows are documents of length T
            cu_seqlens, max_seqlen = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int32), T
        q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
        if backend == "fa4":
            y = fa4_varlen(q, k, v, cu_seqlens, max_seqlen)[0]
        else:
            from torch.nn.attention.varlen import varlen_attn
            y = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=(-1, 0), **_VARLEN_GQA)
        return y.view(B, T, *y.shape[1:])
    # SDPA with a block-diagonal causal mask: a token sees earlier tokens of its own segment only.
    # O(T^2) memory, so this is the portable reference path (CPU, tests), not a training path.
    mask = None
    if cu_seqlens is not None:
        segment = torch.searchsorted(cu_seqlens[1:], torch.arange(q.size(1), device=q.device), right=True)
        mask = (segment[:, None] == segment[None, :]).tril()
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=mask is None, enable_gqa=True)
    return y.transpose(1, 2)


def _varlen_gqa_kwargs() -> dict:
    """torch >= 2.13 wants enable_gqa=True for fewer KV heads; 2.11 takes them without the flag.
    Probed once at import, only where CUDA is (varlen needs it), since importing the varlen module
    loads the compiler stack: about 2 s on every CPU process otherwise (tests, data scripts)."""
    if not torch.cuda.is_available():
        return {}
    try:
        import inspect
        from torch.nn.attention.varlen import varlen_attn
        return {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}
    except (ImportError, ValueError, TypeError):
        return {}


_VARLEN_GQA = _varlen_gqa_kwargs()


def sdclip_scale(W: Tensor, clip_sigmas: float, r: int) -> Tensor:
    """The export's quantization step per row (SDClip, PR #1394): clip_sigmas standard deviations
    of the row over r levels, rounded to fp16 as the artifact stores it, at least fp16's smallest
    subnormal (2^-24; 1e-10 would round to 0). W [..., rows, cols] fp32 -> [..., rows] fp16."""
    return (clip_sigmas * W.std(dim=-1) / r).clamp_min(2.0**-24).half()


def fake_quantize(W: Tensor, clip_sigmas: float, bits: int) -> Tensor:
    """W rounded to the nearest level of its export grid (levels -r..r, r = 2^(bits-1) - 1, the
    SDClip step): what quantization without GPTQ's error feedback would store. W's shape and dtype."""
    r = 2 ** (bits - 1) - 1
    x = W.float()
    step = sdclip_scale(x, clip_sigmas, r).float()[..., None]
    return (torch.clamp(torch.round(x / step), -r, r) * step).to(W.dtype)


SMEAR_INPUTS = 12  # SmearGate reads the first channels of each token's normed embedding
ATTN_GATE_INPUTS = 12  # SPARSE_ATTN_GATE reads the first channels of each block's normed input


class GPT(nn.Module):
    def __init__(self, h: Hyperparameters, attn_backend: str = "sdpa"):
        super().__init__()
        L, D = h.num_layers, h.model_dim
        self.num_layers, self.num_heads, self.num_kv_heads = L, h.num_heads, h.num_kv_heads
        self.head_dim = D // h.num_heads
        kv_dim = self.head_dim * h.num_kv_heads
        hidden = int(h.mlp_mult * D)
        self.rope_dims, self.rope_base = h.rope_dims, h.rope_base
        self.regions = None  # (sequential, parallel) block functions to call instead of the methods (TTT_COMPILE)
        # late QAT (QAT_AT): a 0-dim gate the schedule sets to 1, a tensor so that one compiled graph
        # serves both states; not persistent, so no checkpoint carries it. Each matrix's clip is the export's.
        attn_sigmas, mlp_sigmas = h.group_clip_sigmas("attn"), h.group_clip_sigmas("mlp")
        self.qat_bits = h.matrix_bits
        self.qat_sigmas = dict(q=attn_sigmas, k=attn_sigmas, v=attn_sigmas, o=attn_sigmas, up=mlp_sigmas,
                               down=mlp_sigmas)
        self.register_buffer("qat", torch.zeros(()) if h.qat_at > 0 else None, persistent=False)
        self.logit_softcap, self.attn_backend = h.logit_softcap, attn_backend
        self.logit_softcap_neg = h.logit_softcap_neg or h.logit_softcap
        self.skip_gates_enabled, self.fused_mlp_enabled = h.skip_gates_enabled, h.fused_mlp
        self.fused_ce_enabled, self.fused_head_ce, self.fused_qkv = h.fused_ce, h.fused_head_ce, h.fused_qkv
        self.loop_start, self.loop_end, self.num_loops = h.loop_start, h.loop_end, h.num_loops
        self.parallel_start, self.parallel_final_lane = h.parallel_start_layer, h.parallel_final_lane
        self.xsa_first = L - h.xsa_last_n
        self.looping = False  # switched on by the training loop at ENABLE_LOOPING_AT
        self.capture = None  # Hessian collection: capture(key, input) sees each matrix's input (weights_reading)
        self.capture_layer = 0  # the physical layer whose block runs (capture keys only)
        ln = [1 / math.sqrt(i + 1) if h.ln_scale else 1.0 for i in range(L)]
        self.register_buffer("ln_scales", torch.tensor(ln), persistent=False)

        self.tok_emb = nn.Embedding(h.vocab_size, D, dtype=torch.bfloat16)  # tied output head
        self.qo_bank = nn.Parameter(torch.empty(2 * L, D, D))  # Q of layers 0..L-1, then O
        self.kv_bank = nn.Parameter(torch.empty(2 * L, kv_dim, D))  # K of layers 0..L-1, then V
        self.mlp_up_bank = nn.Parameter(torch.empty(L, hidden, D))
        self.mlp_down_bank = nn.Parameter(torch.empty(L, D, hidden))
        self.q_gain = nn.Parameter(torch.full((L, h.num_heads), h.qk_gain_init))
        self.attn_scale = nn.Parameter(torch.ones(L, D))
        self.mlp_scale = nn.Parameter(torch.ones(L, D))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(L, D), torch.zeros(L, D)], dim=1))  # [L, 2, D]
        num_skips = min(len(x) for x in self.layer_order(looping=True))
        self.skip_weights = nn.Parameter(torch.ones(num_skips, D))
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, D))
        self.parallel_post_lambdas = nn.Parameter(torch.ones(L, 2, 2))  # [layer, source attn/mlp, dest lane]
        self.parallel_resid_lambdas = nn.Parameter(torch.full((L, 2), 1.1))
        self.smear = h.smear_gate
        if h.attn_out_gate or h.sparse_attn_gate:  # zero weights: gates 2 sigmoid(0) = 1 (dense), sigmoid(0) (sparse)
            self.attn_gate = nn.Parameter(torch.zeros(L, h.num_heads, min(ATTN_GATE_INPUTS, D) if h.sparse_attn_gate
                                                      else D))
            self.attn_gate_scale = h.sparse_attn_gate_scale if h.sparse_attn_gate else None
        if self.smear:  # zero strength: the model starts as if without it
            self.smear_w = nn.Parameter(torch.zeros(min(SMEAR_INPUTS, D)))
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.reset_parameters(h.tied_embed_init_std)

    @torch.no_grad()
    def reset_parameters(self, embed_std: float):
        nn.init.normal_(self.tok_emb.weight, std=embed_std)
        L = self.num_layers
        for bank, orthogonal in ((self.qo_bank, range(L)), (self.kv_bank, range(2 * L)), (self.mlp_up_bank, range(L))):
            bank.zero_()
            for i in orthogonal:
                nn.init.orthogonal_(bank[i])
        self.mlp_down_bank.zero_()  # O (qo_bank[L:]) and MLP-down start at zero

    def layer_order(self, looping: bool | None = None) -> tuple[list[int], list[int]]:
        """Physical layer per virtual position, split into encoder and decoder halves."""
        # depth recurrence: PR #1204 (idea), #1260 (implementation), three looped layers in #1493
        looping = self.looping if looping is None else looping
        segment = list(range(self.loop_start, self.loop_end + 1))
        order = (list(range(self.loop_start)) + segment * ((self.num_loops + 1) if looping else 1)
                 + list(range(self.loop_end + 1, self.num_layers)))
        middle = len(order) // 2
        return order[:middle], order[middle:]

    # -- sublayers ---------------------------------------------------------------------------
    def block_weights(self, l: int, dtype, copy: bool = False) -> dict[str, Tensor]:
        """Layer l's tensors as its block reads them, cast to the activations' dtype (the RMSNorm
        input scale stays fp32). A block takes them as arguments, so one compiled block serves
        every layer (TTT_COMPILE's regions) and never specializes on a layer index. copy: new
        tensors even where the dtype is already right (a nested region refuses inputs that are
        views of one bank, as K and V are in fp32)."""
        L = self.num_layers
        w = dict(q=self.qo_bank[l], k=self.kv_bank[l], v=self.kv_bank[L + l], o=self.qo_bank[L + l],
                 up=self.mlp_up_bank[l], down=self.mlp_down_bank[l], q_gain=self.q_gain[l],
                 attn_scale=self.attn_scale[l], mlp_scale=self.mlp_scale[l], mix=self.resid_mix[l],
                 post=self.parallel_post_lambdas[l], resid=self.parallel_resid_lambdas[l])
        if hasattr(self, "attn_gate"):
            w["gate"] = self.attn_gate[l]
        if self.qat is not None and self.training:
            # late QAT (PR #714 and the March 2026 records): the forward sees the matrix on its export
            # grid, the gradient passes straight through to the float weight
            for name, sigmas in self.qat_sigmas.items():
                t = w[name]
                w[name] = t + self.qat * (fake_quantize(t.detach(), sigmas, self.qat_bits) - t).detach()
        w = {name: t.to(dtype, copy=copy) for name, t in w.items()}
        w["ln"] = self.ln_scales[l]
        return w

    def attn(self, w: dict, x: Tensor, rope, cu_seqlens, max_seqlen, adapters, xsa: bool) -> Tensor:
        hd = self.head_dim
        if self.capture:
            self.capture(f"blocks.{self.capture_layer}.attn.c_qkv", x)
        if self.fused_qkv:  # one matmul reads x once, and its backward sums x's three gradients itself
            qkv = F.linear(x, torch.cat((w["q"], w["k"], w["v"])))
            q, k, v = qkv.split((w["q"].size(0), w["k"].size(0), w["v"].size(0)), dim=-1)
        else:
            q, k, v = F.linear(x, w["q"]), F.linear(x, w["k"]), F.linear(x, w["v"])
        q, k, v = with_lora(q, adapters, "q", x), with_lora(k, adapters, "k", x), with_lora(v, adapters, "v", x)
        q = rms_norm(q.unflatten(-1, (self.num_heads, hd)))
        k = rms_norm(k.unflatten(-1, (self.num_kv_heads, hd)))
        v = v.unflatten(-1, (self.num_kv_heads, hd))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = q * w["q_gain"][:, None]
        y = causal_attention(q, k, v, cu_seqlens, max_seqlen, self.attn_backend)
        if xsa:
            y = exclusive_self_attention(y, v)
        if "gate" in w:  # per-head output gate (gated attention: Qiu et al. 2025, arXiv:2505.06708)
            g = F.linear(x[..., :w["gate"].size(-1)], w["gate"])
            if self.attn_gate_scale is None:  # dense: the whole normed input (PR #1736's form), starts at 1
                y = y * (2 * torch.sigmoid(g))[..., None]
            else:  # sparse: its first 12 channels, sigmoid(scale * g), starts at 1/2 (PR #1787; scale 0.5: #1855)
                y = y * torch.sigmoid(self.attn_gate_scale * g)[..., None]
        y = y.flatten(-2)
        if self.capture:
            self.capture(f"blocks.{self.capture_layer}.attn.proj", y)
        return with_lora(F.linear(y, w["o"]), adapters, "o", x)  # the "O" adapter reads the normed block input

    def mlp(self, w: dict, x: Tensor, adapters) -> Tensor:
        up, down = w["up"], w["down"]
        if self.capture:
            self.capture(f"blocks.{self.capture_layer}.mlp.fc", x)
            hidden = F.leaky_relu(F.linear(x, up), 0.5).square()
            self.capture(f"blocks.{self.capture_layer}.mlp.proj", hidden)
            out = F.linear(hidden, down)
        elif self.fused_mlp_enabled and self.training and x.is_cuda and x.dtype == torch.bfloat16 and triton is not None:
            out = fused_mlp(x, up, down)
        else:
            out = eager_mlp(x, up, down)
        return with_lora(out, adapters, "mlp", x)

    def sequential_block(self, w: dict, x, x0, rope, cu_seqlens, max_seqlen, adapters, xsa) -> Tensor:
        mix, s = w["mix"], w["ln"]
        x = mix[0] * x + mix[1] * x0
        x = x + w["attn_scale"] * self.attn(w, rms_norm(x) * s, rope, cu_seqlens, max_seqlen, adapters, xsa)
        return x + w["mlp_scale"] * self.mlp(w, rms_norm(x) * s, adapters)

    def parallel_block(self, w: dict, lane0, lane1, x0, rope, cu_seqlens, max_seqlen, adapters,
                       xsa) -> tuple[Tensor, Tensor]:
        """Two-lane parallel residual: attention reads lane0 (mixed with x0), the MLP reads lane1;
        both outputs are written into both lanes with learned weights."""
        # parallel residuals: PR #1412, the two-lane form of PR #1529
        mix, s = w["mix"], w["ln"]
        a = w["attn_scale"] * self.attn(w, rms_norm(mix[0] * lane0 + mix[1] * x0) * s, rope, cu_seqlens, max_seqlen,
                                        adapters, xsa)
        m = w["mlp_scale"] * self.mlp(w, rms_norm(lane1) * s, adapters)
        post, resid = w["post"], w["resid"]
        return (resid[0] * lane0 + post[0, 0] * a + post[1, 0] * m,
                resid[1] * lane1 + post[0, 1] * a + post[1, 1] * m)

    def smear_previous(self, x: Tensor, ids: Tensor) -> Tensor:
        """SmearGate (PR #1667): x_t + lambda * sigmoid(w . x_t[:SMEAR_INPUTS]) * x_{t-1}, with no share
        into a BOS, so nothing crosses from one document into the next in a packed row (PR #1851)."""
        w = self.smear_w.to(x.dtype)
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(x[..., :w.numel()] @ w)
        gate = torch.where(ids[:, 1:] == BOS_ID, 0, gate[:, 1:])
        return torch.cat([x[:, :1], x[:, 1:] + gate[..., None] * x[:, :-1]], dim=1)

    def merge_skip(self, j: int, x: Tensor, skip: Tensor) -> Tensor:
        """U-Net skip as a gated lerp from the weighted skip towards x (init: 0.5 x + 0.5 skip)."""
        skip = self.skip_weights[j].to(x.dtype) * skip
        if not self.skip_gates_enabled:
            return x + skip
        return torch.lerp(skip, x, torch.sigmoid(self.skip_gates[j]).to(x.dtype))

    # -- full model --------------------------------------------------------------------------
    def hidden(self, ids: Tensor, cu_seqlens: Tensor | None = None, max_seqlen: int = 0, lora=None) -> Tensor:
        """Final normed hidden states [B, T, D] for token ids [B, T]. lora: a BatchedLoRA (TTT), one
        adapter set per virtual layer."""
        x = rms_norm(self.tok_emb(ids))
        x = x0 = self.smear_previous(x, ids) if self.smear else x
        rope = rotary_tables(ids.size(1), self.rope_dims, self.rope_base, ids.device)
        regions = None if self.capture else self.regions  # Hessian collection sees every input eagerly
        sequential, parallel = regions or (self.sequential_block, self.parallel_block)
        nested = isinstance(regions, NestedBlocks)
        if nested:  # a nested region takes no inputs that alias each other: x0, cos and sin do
            x, rope = x.clone(), tuple(t.clone() for t in rope)
        elif regions:  # the first block then takes what every later one takes, so one compiled block serves all
            # not x0 itself; and, from TTT's frozen embedding, an input with grad where grad is on
            x = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(torch.is_grad_enabled())
        encoder, decoder = self.layer_order()
        skips, lanes = [], None
        for slot, l in enumerate(encoder + decoder):
            if self.capture:
                self.capture_layer = l
            args = (rope, cu_seqlens, max_seqlen, lora.slot(slot) if lora is not None else None, l >= self.xsa_first)
            w = self.block_weights(l, x.dtype, copy=nested)
            if slot < len(encoder):
                x = sequential(w, x, x0, *args)
                skips.append(x)
                continue
            j = slot - len(encoder)
            if lanes is None and 0 < self.parallel_start <= l:
                lanes = (x, x.clone() if nested else x)
            if skips:
                if lanes is None:
                    x = self.merge_skip(j, x, skips.pop())
                else:
                    lanes = (self.merge_skip(j, lanes[0], skips.pop()), lanes[1])
            if lanes is None:
                x = sequential(w, x, x0, *args)
            else:
                lanes = parallel(w, *lanes, x0, *args)
        if lanes is not None:
            x = {"mean": lambda: 0.5 * (lanes[0] + lanes[1]), "attn": lambda: lanes[0],
                 "mlp": lambda: lanes[1]}[self.parallel_final_lane]()
        return rms_norm(x)

    def head(self, hidden: Tensor) -> Tensor:
        """Raw logits of the tied head, in hidden's dtype."""
        return F.linear(hidden, self.tok_emb.weight.to(hidden.dtype))

    def logits(self, hidden: Tensor, lora=None) -> Tensor:
        logits = self.head(hidden)
        if lora is not None:
            logits = with_lora(logits, lora.slot(0, head=True), "head", hidden)
        return softcap(logits.float(), self.logit_softcap, self.logit_softcap_neg)

    def forward(self, ids: Tensor, targets: Tensor, cu_seqlens: Tensor | None = None, max_seqlen: int = 0,
                lora=None, positions: Tensor | None = None) -> Tensor:
        """Per-token cross-entropy in nats, fp32, shaped like targets. ids/targets [B, T] or [T].
        positions [B, P]: only these positions of each row go through the head (TTT scores one chunk
        of a long window), and the result is [B, P]."""
        squeeze = ids.dim() == 1
        if squeeze:
            ids, targets = ids[None], targets[None]
        hidden = self.hidden(ids, cu_seqlens, max_seqlen, lora)
        if positions is not None:
            hidden = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.size(-1)))
            targets = targets.gather(1, positions)
        if self.fused_ce_enabled and lora is None and (hidden.is_cuda or _TRITON_INTERPRETED) and triton is not None:
            caps = (self.logit_softcap, self.logit_softcap_neg)
            if self.fused_head_ce and torch.is_grad_enabled():
                weight = self.tok_emb.weight.to(hidden.dtype)
                loss = head_softcapped_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten(), *caps)
            else:
                loss = softcapped_cross_entropy(self.head(hidden).flatten(0, 1), targets.flatten(), *caps)
        else:
            loss = F.cross_entropy(self.logits(hidden, lora).flatten(0, 1), targets.flatten(), reduction="none")
        loss = loss.view_as(targets)
        return loss[0] if squeeze else loss


def build_model(h: Hyperparameters, device, attn_backend: str = "sdpa") -> GPT:
    """The model in its training dtypes: banks and small control tensors fp32, tok_emb bf16 (so
    activations are bf16). Without CUDA everything is fp32: CPUs emulate bf16 matmuls slowly."""
    model = GPT(h, attn_backend).to(device)
    return model if torch.device(device).type == "cuda" else model.float()


# =============================================================================================
#                                      OPTIMIZERS AND EMA
# =============================================================================================


# Muon for the four matrix banks, AdamW for the tied embedding and the small control tensors.
# There is no DDP wrapper: gradients are synchronised inside Optimizers.step, which starts every
# collective at once and overlaps them with compute. Each bank is reduce-scattered so a rank
# orthogonalizes only its shard of matrices, then the updates are all-gathered; the tied
# embedding gets its own all-reduce; all tensors of at most 32,768 elements travel in one packed
# all-reduce instead of dozens of tiny ones.

SMALL_TENSOR_NUMEL = 2**15


def quintic_orthogonalize(G: Tensor, steps: int, coefficients, norm_margin: float, eps: float) -> Tensor:
    """X <- a X + (b A + c A A) X with A = X X^T, `steps` times from X = G / (|G|_F * norm_margin + eps)
    in bf16, for each matrix of G [B, m, n]; step k uses coefficients[k] (the last one after them)."""
    X = G.bfloat16()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * norm_margin + eps)
    for k in range(steps):
        a, b, c = coefficients[min(k, len(coefficients) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def newton_schulz5(G: Tensor, steps: int) -> Tensor:
    """Approximate orthogonalization U V^T of each matrix in G [B, m, n] by a quintic Newton-Schulz
    iteration in bf16 (Muon, Keller Jordan 2024: kellerjordan.github.io/posts/muon)."""
    return quintic_orthogonalize(G, steps, ((3.4445, -4.7750, 2.0315),), 1.0, 1e-7)


# Polar Express (Amsel et al. 2025, arXiv:2505.16932; in parameter golf since PR #1787): a
# different quintic per step, minimax-fitted to push every singular value towards 1 faster than
# one fixed quintic; five steps, with a 2% margin on the norm estimate. MUON_POLAR_EXPRESS=1.
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def polar_express(G: Tensor, steps: int) -> Tensor:
    """newton_schulz5 with Polar Express's coefficients for step k (the last one repeated after five)."""
    return quintic_orthogonalize(G, steps, POLAR_EXPRESS, 1.02, 1e-6)


class Muon(torch.optim.Optimizer):
    """Muon on batched weight banks: Nesterov momentum, each row of the update normalised before
    Newton-Schulz (MuonEq-R), decoupled weight decay, update scaled by sqrt(max(1, rows/cols)).

    Distributed: a bank's leading dim is padded to a multiple of the world size; its gradient is
    reduce-scattered (mean), this rank keeps momentum for its shard only, orthogonalizes it, and
    the updates are all-gathered. Bank i's all-gather is in flight while bank i+1 is computed.
    """

    def __init__(self, banks: list[Tensor], lr: float, momentum: float, weight_decay: float, ns_steps: int,
                 row_normalize: bool = True, polar: bool = False, wd_factors: dict | None = None):
        super().__init__(banks, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_steps, self.row_normalize = ns_steps, row_normalize
        self.orthogonalize = polar_express if polar else newton_schulz5  # the Trainer compiles it on CUDA
        self.wd_factors = wd_factors or {}  # id(bank) -> its weight decay relative to the group's
        self._pending: list = []

    @torch.no_grad()
    def launch_reduce_scatter(self):
        """Start averaging every bank's gradient; called first in Optimizers.step."""
        _, world = _world()
        self._pending = []
        for p in sorted(self.param_groups[0]["params"], key=lambda p: -p.numel()):  # largest first
            per_rank = -(-p.size(0) // world)
            shard = torch.empty(per_rank, *p.shape[1:], device=p.device, dtype=torch.bfloat16)
            if world == 1:
                shard.copy_(p.grad)
                work = None
            else:
                padded = torch.zeros(per_rank * world, *p.shape[1:], device=p.device, dtype=torch.bfloat16)
                padded[:p.size(0)].copy_(p.grad)
                work = reduce_scatter_avg(shard, padded)
            self._pending.append((p, shard, work))

    @torch.no_grad()
    def step(self):
        _, world = _world()
        group = self.param_groups[0]
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        applies = []
        for p, grad, work in self._pending:
            if work is not None:
                work.wait()
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(grad)
            update = grad.add(buf, alpha=mu)  # Nesterov
            if self.row_normalize:  # MuonEq-R: PR #1394 / #1290
                update = update / update.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(update.dtype)
            update = self.orthogonalize(update, self.ns_steps)
            update = update * math.sqrt(max(1.0, p.size(-2) / p.size(-1)))
            if world == 1:
                applies.append((p, update.to(torch.bfloat16), None))
            else:
                full = torch.empty(grad.size(0) * world, *grad.shape[1:], device=p.device, dtype=torch.bfloat16)
                applies.append((p, full, all_gather_into(full, update.to(torch.bfloat16).contiguous())))
        for p, full, work in applies:
            if work is not None:
                work.wait()
            p.mul_(1 - lr * wd * self.wd_factors.get(id(p), 1.0)).add_(full[:p.size(0)].to(p.dtype), alpha=-lr)
        self._pending = []


class Optimizers:
    """The three optimizers of a run and the gradient synchronisation that feeds them."""

    def __init__(self, model: GPT, h: Hyperparameters):
        self.banks = [model.qo_bank, model.kv_bank, model.mlp_up_bank, model.mlp_down_bank]
        bank_ids = {id(p) for p in self.banks}
        self.embed = [model.tok_emb.weight]
        self.scalars = [p for p in model.parameters() if id(p) not in bank_ids and p is not model.tok_emb.weight]
        fused = dict(fused=True) if model.tok_emb.weight.is_cuda else {}
        adam = dict(betas=(h.beta1, h.beta2), eps=h.adam_eps, **fused)
        # split weight decay (PR #1812): the MLP banks' own factor, MUON_WD_MLP_FACTOR
        mlp_wd = {id(b): h.muon_wd_mlp_factor for b in (model.mlp_up_bank, model.mlp_down_bank)}
        self.muon = Muon(self.banks, h.matrix_lr, h.muon_momentum, h.muon_wd, h.muon_backend_steps,
                         h.muon_row_normalize, h.muon_polar_express, mlp_wd)
        self.adam_embed = torch.optim.AdamW(self.embed, lr=h.tied_embed_lr, weight_decay=h.embed_wd, **adam)
        self.adam_scalars = torch.optim.AdamW(self.scalars, lr=h.scalar_lr, weight_decay=h.adam_wd, **adam)
        self.all = [self.muon, self.adam_embed, self.adam_scalars]
        for opt in self.all:
            for g in opt.param_groups:
                g["base_lr"] = g["lr"]
        self.replicated = self.embed + self.scalars

    def set_schedule(self, lr_mult: float, muon_momentum: float, muon_wd: float | None = None):
        for opt in self.all:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mult
        self.muon.param_groups[0]["momentum"] = muon_momentum
        if muon_wd is not None:
            self.muon.param_groups[0]["weight_decay"] = muon_wd

    @torch.no_grad()
    def sync_replicated_grads(self) -> list:
        """Average the gradients of the replicated (non-bank) tensors over ranks (average_grads)."""
        return average_grads(self.replicated)

    def step(self):
        """Start every collective, wait for the replicated gradients, step AdamW, then Muon
        (which waits for each bank's reduce-scatter just before orthogonalizing it)."""
        self.muon.launch_reduce_scatter()
        if dist.is_initialized() and dist.get_world_size() > 1:
            for work in self.sync_replicated_grads():
                work.wait()
        self.adam_embed.step()
        self.adam_scalars.step()
        self.muon.step()
        for opt in self.all:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list:
        return [opt.state_dict() for opt in self.all]

    def load_state_dict(self, states: list):
        for opt, state in zip(self.all, states):
            opt.load_state_dict(state)


def average_grads(params: list[Tensor]) -> list:
    """Start averaging these tensors' gradients over ranks (a missing one counts as zeros): one
    async all-reduce per large tensor, and all small ones packed per dtype into one flat buffer.
    Returns the works to wait for."""
    works = []
    small: dict[tuple, list[Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if p.numel() > SMALL_TENSOR_NUMEL:
            works.append(all_reduce_avg(p.grad))
        else:
            small.setdefault((p.device, p.dtype), []).append(p)
    for group in small.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        work = all_reduce_avg(flat)
        works.append(_Finished(work, lambda flat=flat, group=group: unpack_into_grads(flat, group)))
    return works


def unpack_into_grads(flat: Tensor, params: list[Tensor]) -> None:
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


class EMA:
    """Exponential moving average of the weights in fp32, right for any run length.

    The record started an fp32 shadow at the initial weights with a fixed decay of 0.9965; after
    a 300-step run ~35% of that shadow was still the random init, and most of the rest came
    from the first, high-loss steps (measured on the corpus: live 1.052 bpb, such an average
    1.289). Here the decay warms up as in TensorFlow's ExponentialMovingAverage(num_updates):
    d_t = min(decay, (1 + t) / (1 + k + t)) with k = EMA_WINDOW_DIVISOR (9: (1 + t) / (10 + t)), so
    the average spans about the last t/k steps early on and, at k = 9, reaches the full decay after
    ~2,600 steps (a 600 s record run, ~4,850 steps, ends with the record's average); a larger k
    follows the live weights more closely in a short run. The shadow starts at zero and is divided
    by 1 - prod(d_t), as Adam corrects its moments, so no initial weight survives and a constant
    stays that constant."""

    def __init__(self, model: nn.Module, decay: float, window_divisor: float = 9.0):
        self.decay, self.window_divisor, self.steps, self.init_weight = decay, window_divisor, 0, 1.0
        self.shadow = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (1 + self.window_divisor + step))

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.steps += 1
        d = self.decay_at(self.steps)
        self.init_weight *= d
        params = dict(model.named_parameters())
        torch._foreach_lerp_(list(self.shadow.values()), [params[n].float() for n in self.shadow], 1 - d)

    def averaged(self) -> dict[str, Tensor]:
        return {n: s / (1 - self.init_weight) for n, s in self.shadow.items()}

    @torch.no_grad()
    def copy_to(self, model: nn.Module):
        if self.steps == 0:  # no average yet: keep the live weights
            return
        params = dict(model.named_parameters())
        for n, value in self.averaged().items():
            params[n].copy_(value.to(params[n].dtype))

    def state_dict(self) -> dict:
        return {"steps": self.steps, "init_weight": self.init_weight,
                "shadow": {n: s.clone() for n, s in self.shadow.items()}}

    def load_state_dict(self, state: dict):
        self.steps, self.init_weight = state["steps"], state["init_weight"]
        for n, s in state["shadow"].items():
            self.shadow[n].copy_(s)


# =============================================================================================
#                                           TRAINING
# =============================================================================================


# The budget is wall-clock time, not steps: MAX_WALLCLOCK_SECONDS minus the GPTQ reserve, and
# all ranks stop together once any rank has used it. Before the clock starts, every graph the run
# will need is compiled on real training batches; then weights, optimizer state, EMA, data loader
# and random generators are put back exactly as they were, so nothing learned during warmup
# survives into the timed run (modded-nanogpt's honest warmup).
#
# The schedule, in one place. `frac` is the fraction of the budget used (of ITERATIONS when there
# is no time cap), `step` the optimizer step:
#
#   what               when                                   value
#   learning rate      frac < 1 - WARMDOWN_FRAC               1 x each optimizer's LR
#                      after that                             linear to 0 at frac = 1, floored at MIN_LR
#   Muon momentum      step < MUON_MOMENTUM_WARMUP_STEPS      linear MUON_MOMENTUM_WARMUP_START -> MUON_MOMENTUM
#                      after that                             MUON_MOMENTUM
#   Muon weight decay  frac < MUON_WD_TAPER_AT (or it is 0)   MUON_WD
#                      after that                             MUON_WD x MUON_WD_TAPER (taper: PR #1729)
#   depth recurrence   frac >= ENABLE_LOOPING_AT              on (off before; NUM_LOOPS > 0)
#   late QAT           frac >= QAT_AT (or it is 0: never)     matrices fake-quantized in training forwards
#   EMA decay          every step t                           min(EMA_DECAY, (1 + t) / (1 + k + t)), see EMA
#                                                             (k = EMA_WINDOW_DIVISOR)


def lr_multiplier(frac: float, h: Hyperparameters) -> float:
    if frac < 1 - h.warmdown_frac:
        return 1.0
    return max((1 - frac) / max(h.warmdown_frac, 1e-9), h.min_lr)


def muon_momentum_at(step: int, h: Hyperparameters) -> float:
    t = min(step / h.muon_momentum_warmup_steps, 1.0) if h.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - t) * h.muon_momentum_warmup_start + t * h.muon_momentum


def muon_wd_at(frac: float, h: Hyperparameters) -> float:
    return h.muon_wd * (h.muon_wd_taper if 0 < h.muon_wd_taper_at <= frac else 1.0)


def looping_at(frac: float, h: Hyperparameters) -> bool:
    return h.num_loops > 0 and frac >= h.enable_looping_at


def qat_on_at(frac: float, h: Hyperparameters) -> bool:
    return 0 < h.qat_at <= frac


def train_seq_len_at(frac: float, h: Hyperparameters) -> int:
    """Longest document segment at this point of training (TRAIN_SEQ_SCHEDULE; else TRAIN_SEQ_LEN)."""
    # progressive training context: PR #2014 (1k -> 2k -> 3k)
    return next((n for n, end in h.train_seq_stages if frac < end), h.train_seq_stages[-1][0])


def warmup_cu_seqlens(n: int, segment: int, device) -> Tensor:
    """cu_seqlens of a row of n tokens cut every `segment` tokens: build_cu_seqlens of a row with no BOS."""
    cu, _ = build_cu_seqlens(np.full(n, BOS_ID + 1), max(segment, 1))
    return torch.from_numpy(cu).to(device)


def seq_change_ramp(steps_since: int, changed: bool, h: Hyperparameters) -> float:
    """LR factor after a segment-length change: (k+1)/SEQ_CHANGE_WARMUP_STEPS for the k-th step since."""
    if not changed or steps_since >= h.seq_change_warmup_steps:
        return 1.0
    return (steps_since + 1) / h.seq_change_warmup_steps


def compile_variants(h: Hyperparameters) -> list[tuple[bool, int]]:
    """The (looping, segment length) pairs training will meet, in order: one compiled graph each."""
    starts = sorted({0.0, h.enable_looping_at, *(end for _, end in h.train_seq_stages[:-1])})
    variants = [(looping_at(f, h), train_seq_len_at(f, h)) for f in starts if f < 1]
    if not h.train_seq_schedule:  # as before the schedule existed: both looping graphs, whatever ENABLE_LOOPING_AT
        variants = [(False, h.train_seq_len), (True, h.train_seq_len)]
    return list(dict.fromkeys(variants))


def rng_state() -> dict:
    """Every random generator a run draws from, to put back after the warmup."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training; main() exits with 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopOnSignal:
    """While active, SIGINT / SIGTERM only ask training to stop at the next step boundary (all ranks
    agree there, so nobody is left inside a collective). A second signal of the same kind exits at
    once; torchrun's SIGTERM after a Ctrl-C counts as the same request."""

    def __init__(self):
        self.signum = 0

    def __enter__(self):
        import signal
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signum == signum:
            os._exit(128 + signum)
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Owns the model, its optimizers, EMA and loader for one run; `train()` runs the budget."""

    def __init__(self, h: Hyperparameters, model: GPT, model_fn, device, log):
        self.h, self.model, self.model_fn, self.device, self.log = h, model, model_fn, device, log
        self.opt = Optimizers(model, h)
        self.opt.muon.orthogonalize = compile_for(device, self.opt.muon.orthogonalize)
        self.ema = EMA(model, h.ema_decay, h.ema_window_divisor)
        # every average by its name in the log: the EMA, then EMA_SELECT_DIVISORS' (only for the choice
        # at the end; "ema30" for k = 30, ...)
        self.averages = {"ema": self.ema, **{f"ema{k:g}": EMA(model, h.ema_decay, k) for k in h.ema_select_divisors}}
        self.loader = self.new_loader()
        self.seq_len, self.seq_changed_at = h.train_seq_stages[0][0], 0  # progressive context: now, since step
        self.warmup_seconds: dict = {}  # (looping, seq_len) -> seconds of each warm-up step (warm_up)

    def new_loader(self) -> DocumentPackingLoader:
        h = self.h
        return DocumentPackingLoader(h.train_files, h.local_batch_tokens, h.train_seq_stages[0][0], h.rank,
                                     h.world_size, self.device, hold_out=h.ema_select)

    def step(self, step: int, frac: float, batches=None, seq_len: int | None = None) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean training loss.
        seq_len: the longest document segment (default: TRAIN_SEQ_SCHEDULE at frac)."""
        h, total = self.h, torch.zeros((), device=self.device)
        seq_len = seq_len or train_seq_len_at(frac, h)
        if seq_len != self.seq_len:
            self.seq_len, self.seq_changed_at = seq_len, step
        for micro in range(h.grad_accum_steps):
            x, y, cu, _ = batches[micro] if batches else self.loader.next_batch(seq_len)
            mark_cu_dynamic(cu)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                loss = self.model_fn(x, y, cu, seq_len).mean()
            (loss / h.grad_accum_steps).backward()
            total += loss.detach()
        lr_mult = lr_multiplier(frac, h) * seq_change_ramp(step - self.seq_changed_at, self.seq_changed_at > 0, h)
        self.opt.set_schedule(lr_mult, muon_momentum_at(step, h), muon_wd_at(frac, h))
        if h.grad_clip_norm > 0:
            # Clipping sees this rank's local gradient: there is no DDP, and ranks are averaged
            # later, inside the optimizer step (as in the record).
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), h.grad_clip_norm)
        self.opt.step()
        for ema in self.averages.values():
            ema.update(self.model)
        return total.item() / h.grad_accum_steps

    @torch.no_grad()
    def held_out_loss(self, batches) -> float:
        """Mean loss of the model as it is now on training micro-batches (uncompiled, in eval mode)."""
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for x, y, cu, _ in batches:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                total += self.model(x, y, cu, self.h.train_seq_len).double().mean()
        self.model.train()
        return reduce_over_ranks(total.item(), device=self.device)[0] / (len(batches) * _world()[1])

    def finish_with_better_average(self) -> dict:
        """The EMA weights, unless the live ones (or an EMA_SELECT_DIVISORS average) score lower on the
        EMA_SELECT training micro-batches held out of every pass over the training shards (never
        trained on): a short run's average can lag. Selection on training data only, the same on
        every rank; a tie keeps the earlier of live, ema, then the extra averages in their order."""
        batches = self.held_out
        live_state = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        losses = {"live": self.held_out_loss(batches)}
        for name, ema in self.averages.items():
            ema.copy_to(self.model)
            losses[name] = self.held_out_loss(batches)
        kept = min(losses, key=losses.get)
        with torch.no_grad():
            if kept == "live":
                for n, p in self.model.named_parameters():
                    p.copy_(live_state[n])
            else:
                self.averages[kept].copy_to(self.model)
        return {"live_loss": losses["live"], "ema_loss": losses["ema"], "losses": losses, "kept": kept}

    def warm_up(self) -> float:
        """Compile every graph training will use (looping off/on, each TRAIN_SEQ_SCHEDULE length, short
        and long cu_seqlens) on training batches, then restore the exact initial state: weights, every
        optimizer buffer, EMA, loader, progressive-context state and random generators. Returns seconds."""
        h, model, t0 = self.h, self.model, time.perf_counter()
        if h.warmup_steps <= 0:
            return 0.0
        emas = list(self.averages.values())
        snapshot = (copy.deepcopy(model.state_dict()), copy.deepcopy(self.opt.state_dict()),
                    [ema.state_dict() for ema in emas], rng_state(), (self.seq_len, self.seq_changed_at))
        variants = compile_variants(h)
        self.warmup_seconds = {v: [] for v in variants}  # per warm-up step; the first of each includes compiling
        steps = max(h.warmup_steps // len(variants), 1)
        for looping, seq_len in variants:
            model.looping = looping
            for i in range(steps):
                t_step = time.perf_counter()
                batches = None
                if i < 4:  # vary the number of segments so each cu_seqlens bucket is seen
                    batches = []
                    for _ in range(h.grad_accum_steps):
                        x, y, _, _ = self.loader.next_batch(seq_len)
                        batches.append((x, y, warmup_cu_seqlens(len(x), seq_len // (i + 1), self.device), 0))
                self.step(0, 0.0, batches, seq_len)  # .item() inside: the time is the step's
                self.warmup_seconds[looping, seq_len].append(time.perf_counter() - t_step)
                if i == 0 or i == steps - 1:
                    self.log(f"warmup looping:{int(looping)} seq_len:{seq_len} step:{i + 1}/{steps} "
                             f"{self.warmup_seconds[looping, seq_len][-1]:.1f}s elapsed:{time.perf_counter() - t0:.0f}s")
        model.looping = False
        model.load_state_dict(snapshot[0])
        self.opt.load_state_dict(snapshot[1])
        for ema, state in zip(emas, snapshot[2]):
            ema.load_state_dict(state)
        set_rng_state(snapshot[3])
        self.seq_len, self.seq_changed_at = snapshot[4]
        self.loader.close()
        self.loader = self.new_loader()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def train(self, validate) -> dict:
        """Train until the step or time budget ends, or a signal asks to stop; validate(step) ->
        (loss, bpb) runs every VAL_LOSS_EVERY steps and at the end, untimed; at step 0 only with
        VAL_AT_START=1 (the untrained model's score, 4.8 bpb, for an eval graph of its own that
        cost 33 s of compile on one H200 and serves nothing after it)."""
        with StopOnSignal() as stop:
            return self._train(validate, stop)

    def _train(self, validate, stop: StopOnSignal) -> dict:
        h, log, model = self.h, self.log, self.model
        budget_ms = max(h.max_wallclock_seconds - h.gptq_reserve_seconds, 0) * 1000 if h.max_wallclock_seconds > 0 else None
        tokens_per_step = h.train_batch_tokens
        train_ms, step, stats, logged_ms = 0.0, 0, {"looping_at_step": None}, 0.0
        phase = {"steps": 0, "ms": 0.0}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        while True:
            over_budget, signum = reduce_over_ranks(float(budget_ms is not None and train_ms >= budget_ms),
                                                    float(stop.signum), device=self.device, op="max")
            if signum:
                stats["interrupted"] = {"signal": int(signum), "step": step}
                break
            last_step = step >= h.iterations or bool(over_budget)
            periodic = h.val_loss_every > 0 and step % h.val_loss_every == 0 and (step > 0 or h.val_at_start)
            if last_step or periodic:
                val_loss, val_bpb = validate(step)
                log(f"step:{step}/{h.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                    f"train_time:{train_ms:.0f}ms")
                stats.update(final_val_loss=val_loss, final_val_bpb=val_bpb)
            if last_step:
                break
            frac = train_ms / budget_ms if budget_ms else step / h.iterations
            if not model.looping and looping_at(frac, h):
                model.looping = True
                stats["looping_at_step"] = step
                stats["before_looping"] = dict(phase)
                phase = {"steps": 0, "ms": 0.0}
                encoder, decoder = model.layer_order()
                log(f"looping:on step:{step} encoder:{encoder} decoder:{decoder}")
            if model.qat is not None and "qat_at_step" not in stats and qat_on_at(frac, h):
                model.qat.fill_(1.0)
                stats["qat_at_step"] = step
                log(f"qat:on step:{step} (training forwards see the matrices on their int{h.matrix_bits} grid)")
            if train_seq_len_at(frac, h) != self.seq_len:
                log(f"seq_len:{train_seq_len_at(frac, h)} step:{step} (was {self.seq_len})")
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = self.step(step, frac)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) * 1000
            train_ms += dt
            phase["steps"] += 1
            phase["ms"] += dt
            step += 1
            due = h.train_log_seconds > 0 and train_ms - logged_ms >= h.train_log_seconds * 1000
            if step <= 5 or step % h.train_log_every == 0 or due:
                logged_ms = train_ms
                ms_per_step = phase["ms"] / max(phase["steps"], 1)
                eta = (budget_ms - train_ms) / 1000 if budget_ms else (h.iterations - step) * ms_per_step / 1000
                log(f"step:{step}/{h.iterations} train_loss:{loss:.4f} lr_mult:{lr_multiplier(frac, h):.3f} "
                    f"ms/step:{ms_per_step:.1f} tok/s:{tokens_per_step / ms_per_step * 1000:.0f} "
                    f"elapsed:{train_ms / 1000:.1f}s eta:{max(eta, 0):.0f}s")
        stats[("after_looping" if model.looping else "before_looping")] = dict(phase)
        stats.update(steps=step, train_ms=train_ms)
        if model.qat is not None:  # later training-mode forwards (TTT's global phases) see float weights
            model.qat.zero_()
        if self.device.type == "cuda":
            stats["peak_memory_mib"] = torch.cuda.max_memory_allocated() // 2**20
        self.held_out = self.loader.held_out_batches()  # for EMA_SELECT: the loader never serves them
        self.loader.close()
        return stats


# =============================================================================================
#                                           ARTIFACT
# =============================================================================================


# The submission is code + compressed weights, at most 16,000,000 bytes. Weights get there in
# three steps: GPTQ rounds every large matrix to int6 (the tied embedding to int8) against the
# Hessian of its inputs, so rounding errors are steered where the data cannot see them (optional
# refinements: LQER's low-rank residual, AWQ-lite's finer columns, and QUANT_TWEAK_STEPS, which
# retrains the few tensors kept in float around the rounded matrices); the quantized state is
# saved, byte-shuffled and compressed (brotli-11 or lzma) in independent pieces on all cores, the
# int6/int8 codes rANS-coded first; the code is counted as the self-extracting stub of its
# minified text.
# The total is checked against the limit in one place (check_artifact_size), not just logged: a
# record that is 20 KB over is not a record.


# ---------------------------------------------------------------------------------------------
# Naming, in one place: the per-layer names of the banked weights (as the artifact stores them),
# and which of those matrices read each input the model hands to `capture` for the Hessians.
# ---------------------------------------------------------------------------------------------

BANK_LAYOUT = (  # (bank, per-layer name, part: layer i's matrix is bank[part * num_layers + i])
    ("qo_bank", "attn.c_q", 0), ("qo_bank", "attn.proj", 1),
    ("kv_bank", "attn.c_k", 0), ("kv_bank", "attn.c_v", 1),
    ("mlp_up_bank", "mlp.fc", 0), ("mlp_down_bank", "mlp.proj", 0),
)


def unbank_state(state: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Banked state dict -> per-layer matrices blocks.{i}.attn.c_q.weight, ... (other tensors as is)."""
    out = {k: v for k, v in state.items() if not k.endswith("_bank")}
    for bank, name, part in BANK_LAYOUT:
        for i in range(num_layers):
            out[f"blocks.{i}.{name}.weight"] = state[bank][part * num_layers + i]
    return out


def rebank_state(state: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    out = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    for bank in dict.fromkeys(b for b, _, _ in BANK_LAYOUT):
        parts = sorted(((part, name) for b, name, part in BANK_LAYOUT if b == bank))
        out[bank] = torch.stack([state[f"blocks.{i}.{name}.weight"] for _, name in parts for i in range(num_layers)])
    return out


def weights_reading(capture_key: str) -> list[str]:
    """The quantized matrices whose input GPT.attn / GPT.mlp / collect_hessians captured under
    `capture_key`: Q, K and V share one input; the tied head reads the final hidden state."""
    if capture_key == "tok_emb":
        return ["tok_emb.weight"]
    if capture_key.endswith("attn.c_qkv"):
        return [capture_key.replace("c_qkv", kind) + ".weight" for kind in ("c_q", "c_k", "c_v")]
    return [capture_key + ".weight"]


# ---------------------------------------------------------------------------------------------
# GPTQ: Hessians H = sum X^T X of each matrix's input, then error-steered rounding against them.
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def collect_hessians(model: GPT, h: Hyperparameters, device) -> dict[str, Tensor]:
    """H = sum X^T X of every quantized matrix's input over calibration batches from the training
    shards, summed over ranks and divided by the number of batches. The EMA model runs uncompiled,
    with the eager MLP and looping on, so a looped layer sees all its passes. Ranks split the
    GPTQ_CALIBRATION_BATCHES between them (the record had each rank collect them all and used
    only rank 0's)."""
    rank, world = _world()
    loader = ShuffledSequenceLoader(h.train_files, h.train_seq_len, rank, world)
    batch_seqs = h.local_batch_tokens // h.train_seq_len
    my_batches = len(range(rank, h.gptq_calibration_batches, world))
    hessians: dict[str, Tensor] = {}

    def capture(key: str, x: Tensor):
        x = x.reshape(-1, x.size(-1)).float()
        if key not in hessians:
            hessians[key] = torch.zeros(x.size(1), x.size(1), device=x.device)
        hessians[key].addmm_(x.T, x)

    was_training, model.capture = model.training, capture
    model.eval()
    try:
        for _ in range(my_batches):
            x, _ = loader.next_batch(batch_seqs)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                capture("tok_emb", model.hidden(x.to(device)))  # the tied head's input
    finally:
        model.capture = None
        model.train(was_training)
    out = {}
    for key in sorted(hessians):
        H = hessians[key]
        if world > 1:
            dist.all_reduce(H)
        H /= max(h.gptq_calibration_batches, 1)
        out.update((name, H) for name in weights_reading(key))
    return out


def gptq_quantize(weight: Tensor, hessian: Tensor, clip_sigmas: float, bits: int,
                  block_size: int = 128, fine_cols: Tensor | None = None,
                  fine_bits: int = 8) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """GPTQ (Frantar et al. 2022, arXiv:2210.17323) with act-order and SDClip scales (PR #1394).

    weight [rows, cols] with hessian [cols, cols] = sum of x x^T over the layer's inputs, or a
    stack [batch, rows, cols] with [batch, cols, cols] (matrices of one shape done in one pass,
    which cuts the per-column Python loop by the batch size). Returns q int8 (levels -r..r,
    r = 2^(bits-1) - 1) and the per-row scale fp16, on the weight's device; w ~ q * scale.
    fine_cols: bool [cols] (or [batch, cols]): these columns get fine_bits levels and a second
    per-row scale in the same solve (AWQ_LITE_GROUPS); the third result is that scale.
    Runs in fp32 on the GPU when there is one.
    """
    r = 2 ** (bits - 1) - 1
    home = weight.device
    dev = torch.device("cuda") if home.type == "cpu" and torch.cuda.is_available() else home
    single = weight.dim() == 2
    W = weight.detach().to(dev, torch.float32, copy=True)
    H = hessian.detach().to(dev, torch.float32, copy=True)
    if single:
        W, H = W[None], H[None]
    batch, rows, cols = W.shape

    # SDClip: the scale is fixed before GPTQ from the row's spread, rounded to fp16 first, and that
    # rounded value is what q is computed against, so q * scale in the artifact reproduces exactly
    # what GPTQ saw.
    scale = sdclip_scale(W, clip_sigmas, r)
    s = scale.float()  # [batch, rows]
    if fine_cols is not None:  # AWQ-lite: its columns' own levels and per-row scale
        fine = fine_cols.to(dev).expand(batch, cols)
        r_fine = 2 ** (fine_bits - 1) - 1
        fine_scale = sdclip_scale(W, clip_sigmas, r_fine)

    # Dead inputs (never nonzero in calibration) carry no information: pin their Hessian
    # diagonal to 1 and drop the weight; then damp by 1% of the mean diagonal for stability.
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    W.masked_fill_(dead[:, None, :], 0.0)
    diag.masked_fill_(dead, 1.0)
    diag.add_(0.01 * diag.mean(dim=-1, keepdim=True))

    # Act-order (the "--act-order" option of the GPTQ authors' code): quantize the inputs with the
    # largest Hessian diagonal first, while many columns are still left to absorb their errors.
    perm = torch.argsort(diag, dim=-1, descending=True, stable=True)  # stable: ties order alike everywhere
    W = W.gather(-1, perm[:, None, :].expand(-1, rows, -1))
    if fine_cols is not None:
        fine = fine.gather(-1, perm)
        levels = torch.where(fine, r_fine, r).float()  # [batch, cols], in act order
        s_fine = fine_scale.float()
    H = H.gather(-1, perm[:, None, :].expand(-1, cols, -1)).gather(-2, perm[:, :, None].expand(-1, -1, cols))

    # The rows of the upper Cholesky factor of H^-1 are exactly the error-propagation weights
    # the GPTQ paper uses (its "Cholesky reformulation").
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    del H

    Q = torch.empty_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        Wb = W[..., i1:i2].clone()
        Ub = U[:, i1:i2, i1:i2]
        d = Ub.diagonal(dim1=-2, dim2=-1)[:, None, :]  # [batch, 1, n]
        Eb = torch.empty_like(Wb)
        for j in range(i2 - i1):
            w = Wb[..., j]
            if fine_cols is None:
                sj = s
                q = torch.clamp(torch.round(w / s), -r, r)
            else:  # this column's own levels and scale: [batch, 1] and [batch, rows]
                sj, lim = torch.where(fine[:, i1 + j, None], s_fine, s), levels[:, i1 + j, None]
                q = torch.maximum(torch.minimum(torch.round(w / sj), lim), -lim)
            Q[..., i1 + j] = q
            e = (w - q * sj) / d[..., j]
            Eb[..., j] = e
            # spread this column's error over the rest of the block (rank-1 update)
            Wb[..., j + 1:] -= e[..., None] * Ub[:, None, j, j + 1:]
        # lazy batch update: the columns right of the block get the whole block's error at once
        W[..., i2:] -= Eb @ U[:, i1:i2, i2:]

    # undo the act-order permutation: column j of Q belongs at column perm[j]
    q = torch.empty_like(Q).scatter_(-1, perm[:, None, :].expand(-1, rows, -1), Q).to(torch.int8)
    if single:
        q, scale = q[0], scale[0]
    if fine_cols is not None:
        return q.to(home), scale.to(home), (fine_scale[0] if single else fine_scale).to(home)
    return q.to(home), scale.to(home)


QUANT_MIN_NUMEL = 65_536  # tensors up to this size are stored as fp16, larger ones through GPTQ


def quantize_state_dict(state: dict, hessians: dict, matrix_bits: int, matrix_clip_sigmas: float,
                        embed_bits: int, embed_clip_sigmas: float,
                        embed_name: str = "tok_emb.weight", group_clip_sigmas: dict | None = None,
                        fine_groups: int = 0, fine_group_size: int = 64, fine_bits: int = 8) -> tuple[dict, dict]:
    """Split a float state dict into what the artifact stores.

    Returns (w, meta). w: "<name>.q" int8 and "<name>.scale" fp16 for each GPTQ'd tensor, the
    fp16 copy under "<name>" for each passthrough tensor; everything on the CPU. meta: name ->
    {"tag": "gptq (int6)" | "gptq (int8)" | "passthrough (float16)" | ..., "dtype": original}.
    Matrices of one shape and setting go through GPTQ together (see gptq_quantize).
    group_clip_sigmas: {".mlp.": sigmas, ...}: matrices whose name contains the key use that clip.
    fine_groups: the model's most salient fine_group_size-column groups get fine_bits (awq_lite_groups);
    such a matrix also stores "<name>.fine_scale" fp16 and "<name>.fine_cols" int32 [[start, size], ...].
    """
    w, meta, jobs = {}, {}, {}
    for name, t in state.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if not t.is_floating_point():
            w[name], meta[name] = t.detach().cpu().clone(), {"tag": f"passthrough ({dtype})", "dtype": dtype}
        elif t.numel() <= QUANT_MIN_NUMEL:
            # clone: a view (of a bank, say) would make torch.save write its whole storage
            w[name] = t.detach().to("cpu", torch.float16).clone()
            meta[name] = {"tag": "passthrough (float16)", "dtype": dtype}
        else:
            if t.dim() != 2:
                raise ValueError(f"{name}: GPTQ needs a 2-D matrix, got shape {tuple(t.shape)}; unbank it first")
            if name not in hessians:
                raise ValueError(f"{name}: no Hessian was collected for this {tuple(t.shape)} matrix; every "
                                 f"tensor over {QUANT_MIN_NUMEL} elements needs one (have: {sorted(hessians)})")
            bits, sigmas = (embed_bits, embed_clip_sigmas) if name == embed_name else (matrix_bits, matrix_clip_sigmas)
            sigmas = next((v for k, v in (group_clip_sigmas or {}).items() if k in name and name != embed_name), sigmas)
            meta[name] = {"tag": f"gptq (int{bits})", "dtype": dtype}
            jobs.setdefault((tuple(t.shape), bits, sigmas), []).append(name)
    coarse = [n for (_, bits, _), names in jobs.items() if bits < fine_bits for n in names]
    fine = awq_lite_groups(state, hessians, coarse, fine_groups, fine_group_size) if fine_groups else {}
    for (_, bits, sigmas), names in jobs.items():
        mask = None
        if any(n in fine for n in names):
            mask = torch.zeros(len(names), state[names[0]].shape[1], dtype=torch.bool)
            for i, n in enumerate(names):
                for start in fine.get(n, []):
                    mask[i, start:start + fine_group_size] = True
        try:
            out = gptq_quantize(torch.stack([state[n].detach() for n in names]),
                                torch.stack([hessians[n].detach() for n in names]), sigmas, bits,
                                fine_cols=mask, fine_bits=fine_bits)
        except torch.linalg.LinAlgError as e:  # a NaN/inf Hessian (diverged run) ends up here
            raise ValueError(f"GPTQ failed for {', '.join(names)}: {e}") from None
        for i, n in enumerate(names):
            w[n + ".q"], w[n + ".scale"] = out[0][i].cpu().clone(), out[1][i].cpu().clone()
            if n in fine:
                w[n + ".fine_scale"] = out[2][i].cpu().clone()
                w[n + ".fine_cols"] = torch.tensor([[start, fine_group_size] for start in fine[n]], dtype=torch.int32)
    return w, meta


def awq_lite_groups(state: dict, hessians: dict, names: list[str], count: int, size: int) -> dict[str, list[int]]:
    """The `count` most salient groups of `size` consecutive input columns over all these matrices:
    {name: [first column, ...]}. Saliency of column j: RMS of its input (sqrt of the Hessian's
    diagonal, the mean of x_j^2) times the mean |W_ij| over rows; a group's is the sum over its columns."""
    # AWQ-lite (PR #1908): mixed precision for the salient columns instead of AWQ's rescaling
    scores = []
    for name in names:
        W, H = state[name].detach().float(), hessians[name].detach().float()
        saliency = H.diagonal().clamp_min(0).sqrt().to(W.device) * W.abs().mean(dim=0)
        usable = saliency.numel() - saliency.numel() % size
        for g, value in enumerate(saliency[:usable].view(-1, size).sum(dim=1).tolist()):
            scores.append((value, name, g * size))
    picked = {}
    for _, name, start in sorted(scores, key=lambda t: -t[0])[:count]:
        picked.setdefault(name, []).append(start)
    return picked


# LQER (low-rank quantization error reconstruction; Zhang et al. 2024, arXiv:2402.02446; PR #1797,
# kept in #1851): the GPTQ residual E = W - q*scale of the few matrices where it is largest gets a
# rank-r correction A·B from its SVD, stored small: A (rows x r) as int2 levels -2..1 with one fp16
# scale, B (r x cols) as int4 levels -8..7 with one fp16 scale per LQER_GROUP values.
LQER_A_LEVELS, LQER_B_LEVELS = (-2, 1), (-8, 7)


def lqer_correct(state: dict, w: dict, meta: dict, top_k: int, rank: int, group: int) -> list[str]:
    """Add LQER factors to w for the top_k GPTQ'd matrices by Frobenius norm of their residual;
    returns their names. meta[name]["lqer"] = [rank, cols] marks them."""
    residual = {name: state[name].detach().float().cpu() - _gptq_dequantized(w, name)
                for name, info in meta.items() if info["tag"].startswith("gptq")}
    picked = sorted(residual, key=lambda n: -residual[n].norm().item())[:top_k]
    for name in picked:
        U, S, Vh = torch.linalg.svd(residual[name], full_matrices=False)
        r = min(rank, S.numel())
        a, b = U[:, :r] * S[:r], Vh[:r]
        a_scale = (a.abs().max() / 1.5).clamp_min(2.0**-24).half()
        b_flat = F.pad(b.flatten(), (0, -b.numel() % group)).view(-1, group)
        b_scale = (b_flat.abs().amax(dim=1) / 7.5).clamp_min(2.0**-24).half()
        w[name + ".lqer_a"] = torch.round(a / a_scale.float()).clamp(*LQER_A_LEVELS).to(torch.int8)
        w[name + ".lqer_a_scale"] = a_scale
        w[name + ".lqer_b"] = torch.round(b_flat / b_scale.float()[:, None]).clamp(*LQER_B_LEVELS).to(torch.int8)
        w[name + ".lqer_b_scale"] = b_scale
        meta[name]["lqer"] = [r, b.shape[1]]
    return picked


ROW_REORDER_NAMES = ("tok_emb.weight", ".attn.c_q.", ".mlp.fc.")  # the matrices PR #1855 reordered


def reorder_rows(w: dict, names: list[str]) -> None:
    """Store the rows of each named GPTQ'd matrix (and everything row-aligned with them: scales, LQER's
    A) in a greedy nearest-neighbour chain, so that similar rows sit side by side for the compressor;
    "<name>.row_order" keeps the order and dequantizing puts every row back. Exact: each row is
    quantized on its own."""
    # rows reordered for similarity before compression: PR #1855's idea (there with lrzip)
    for name in names:
        order = nearest_neighbour_chain(w[name + ".q"])
        for suffix in (".q", ".scale", ".fine_scale", ".lqer_a"):
            if name + suffix in w:
                w[name + suffix] = w[name + suffix][order].clone()
        w[name + ".row_order"] = order.to(torch.int16 if len(order) <= 2**15 else torch.int32)


def nearest_neighbour_chain(q: Tensor) -> Tensor:
    """A row order starting at row 0 whose next row is always the unused one nearest (L1) to the
    current row; on the GPU when there is one (an 8192-row matrix is 8192 passes over it)."""
    dev = torch.device("cuda") if torch.cuda.is_available() else q.device
    rows = q.to(dev, torch.float32)
    used = torch.zeros(len(rows), dtype=torch.bool, device=dev)
    order = torch.empty(len(rows), dtype=torch.long, device=dev)
    current = torch.zeros((), dtype=torch.long, device=dev)
    for i in range(len(rows)):
        order[i], used[current] = current, True
        distance = (rows - rows[current]).abs().sum(dim=1).masked_fill_(used, float("inf"))
        current = distance.argmin()
    return order.cpu()


def _gptq_dequantized(w: dict, name: str) -> Tensor:
    """q * scale (the fine scale in AWQ-lite's columns; + the LQER correction where there is one), fp32."""
    q, scale = w[name + ".q"].float(), w[name + ".scale"].float()[:, None]
    if name + ".fine_scale" in w:
        fine_cols = torch.zeros(q.shape[1], dtype=torch.bool)
        for start, size in w[name + ".fine_cols"].tolist():
            fine_cols[start:start + size] = True
        scale = torch.where(fine_cols, w[name + ".fine_scale"].float()[:, None], scale)
    out = q * scale
    if name + ".lqer_a" in w:
        r, cols = int(w[name + ".lqer_a"].shape[1]), out.shape[1]
        a = w[name + ".lqer_a"].float() * w[name + ".lqer_a_scale"].float()
        b = (w[name + ".lqer_b"].float() * w[name + ".lqer_b_scale"].float()[:, None]).flatten()[:r * cols]
        out = out + a @ b.view(r, cols)
    if name + ".row_order" in w:  # reorder_rows: row i of the stored matrix is row order[i]
        out = torch.empty_like(out).index_copy_(0, w[name + ".row_order"].long(), out)
    return out


def dequantize_state_dict(w: dict, meta: dict) -> dict:
    """Invert quantize_state_dict: q * scale per row (in fp32, plus any LQER correction), every
    tensor cast back to its original dtype, in meta's order."""
    out = {}
    for name, info in meta.items():
        dtype = getattr(torch, info["dtype"])
        if info["tag"].startswith("gptq"):
            out[name] = _gptq_dequantized(w, name).to(dtype)
        else:
            out[name] = w[name].to(dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Serialization. torch.save({"w", "m"}) -> byte shuffle -> cut into 1 MiB pieces -> each piece
# compressed on its own, all cores at once -> one container. The pieces are cut from the one
# shuffled stream, so no tensor is regrouped and the inverse is a plain concatenation. Why
# pieces: brotli-11 on one 36 MB stream takes over a minute, and its work per byte grows with the
# input it can look back over; 1 MiB pieces on all cores take seconds for about 0.01% more
# bytes (tools/bench_quant.py measures it). The piece size is fixed, never derived from the core
# count, so the artifact's bytes do not depend on the machine that wrote it.
#
# Container: b"PGQA", version byte, compressor byte (b"b" brotli, b"l" lzma), uint32 piece
# count, then one uint32 compressed length per piece (little-endian), then the pieces; version 2
# (ANS_CODING=1) appends the rANS stream of the int8 matrices (below) after the pieces.
# ---------------------------------------------------------------------------------------------

ARTIFACT_MAGIC, ARTIFACT_VERSION = b"PGQA", 1
ARTIFACT_PIECE_BYTES = 1 << 20
SHUFFLE_MAGIC = b"BSHF"
COMPRESSOR_CODES = {"brotli": b"b", "lzma": b"l"}


def byte_shuffle(data: bytes, stride: int = 2) -> bytes:
    """All bytes at offsets = 0 mod stride, then those = 1 mod stride, ...; prefixed by b"BSHF"
    and the stride. With stride 2 the low and high bytes of fp16 values land in separate runs,
    which a compressor models better (on the int6/int8 state: 0.05% smaller than no shuffle)."""
    a = np.frombuffer(data, dtype=np.uint8)
    return SHUFFLE_MAGIC + bytes([stride]) + b"".join(a[k::stride].tobytes() for k in range(stride))


def byte_unshuffle(blob: bytes) -> bytes:
    if blob[:4] != SHUFFLE_MAGIC:
        raise ValueError("not a byte-shuffled payload (no BSHF magic)")
    stride, body = blob[4], np.frombuffer(blob, dtype=np.uint8, offset=5)
    out, pos = np.empty(len(body), dtype=np.uint8), 0
    for k in range(stride):
        count = len(range(k, len(body), stride))
        out[k::stride] = body[pos:pos + count]
        pos += count
    return out.tobytes()


# ---------------------------------------------------------------------------------------------
# Entropy coding (ANS_CODING=1). brotli sees the int6/int8 matrices as bytes and lands a little
# above their order-0 entropy; a coder told that they are independent symbols drawn from a few
# distributions per matrix gets below it. Each matrix's columns (its input channels, which differ
# in spread) are split into up to ANS_COLUMN_GROUPS groups by their mean square, and each group has
# its own frequency table. Every symbol of every such matrix goes through one rANS stream (Duda
# 2013, arXiv:1311.2540; on Parameter Golf weights since PR #1510), interleaved over ANS_LANES
# lanes so that numpy codes one symbol of each lane per step: the symbols are independent, so the
# lanes only share the word stream. A lane's state lives in [2^16, 2^32) and moves 16 bits at a
# time; a table's frequencies sum to 2^ANS_PROB_BITS. The stream follows the compressed pieces;
# its tables, column groups, lane states and length travel inside them. Pure integer arithmetic:
# the bytes never depend on the machine.
# ---------------------------------------------------------------------------------------------

ANS_PROB_BITS, ANS_LANES, ANS_COLUMN_GROUPS, ANS_LOW = 15, 2048, 4, 1 << 16
ANS_MIN_NUMEL = 1 << 12  # smaller int8 tensors stay in the compressed part


def ans_frequencies(counts: np.ndarray) -> np.ndarray:
    """Symbol counts [C, 256] -> frequencies [C, 256] int64, each row summing to 2^ANS_PROB_BITS,
    every counted symbol at least 1; the rounding error goes to the row's most frequent symbol."""
    total = 1 << ANS_PROB_BITS
    counts = counts.astype(np.int64)
    freq = np.where(counts > 0, np.maximum(1, counts * total // np.maximum(counts.sum(1, keepdims=True), 1)), 0)
    freq[np.arange(len(freq)), freq.argmax(1)] += total - freq.sum(1)
    # cannot fail: the symbols raised to 1 (p < 2^-15) are fewer than the top frequency can give
    assert not np.any((counts > 0) & (freq < 1)), "ANS: a symbol's frequency rounded away"
    return freq


def _ans_flat_tables(freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each (table, symbol)'s frequency and the sum of those before it in its table, flat at table * 256 + symbol."""
    return freq.reshape(-1).astype(np.uint64), (np.cumsum(freq, 1) - freq).reshape(-1).astype(np.uint64)


def ans_encode(sym: np.ndarray, ctx: np.ndarray, freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symbols sym [N] (uint8), each coded with table ctx[i] of freq [C, 256] -> (the 16-bit words
    in the order ans_decode reads them, the lanes' final states [ANS_LANES] uint32). Symbol i goes
    to lane i % ANS_LANES; the encoder runs backwards, so that the decoder runs forwards."""
    K, P = ANS_LANES, ANS_PROB_BITS
    f_of, c_of = _ans_flat_tables(freq)
    x, chunks = np.full(K, ANS_LOW, dtype=np.uint64), []
    for start in range((len(sym) - 1) // K * K, -1, -K):
        i = ctx[start:start + K].astype(np.int64) * 256 + sym[start:start + K]
        f, c, xs = f_of[i], c_of[i], x[:len(i)]
        full = xs >= f << np.uint64(32 - P)  # one more symbol would leave [2^16, 2^32): shift a word out first
        chunks.append((xs[full] & np.uint64(0xFFFF)).astype(np.uint16))
        xs[full] >>= np.uint64(16)
        x[:len(i)] = (xs // f << np.uint64(P)) + xs % f + c
    words = np.concatenate(chunks[::-1]) if chunks else np.zeros(0, np.uint16)
    return words, x.astype(np.uint32)


def ans_decode(words: np.ndarray, states: np.ndarray, ctx: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """Inverse of ans_encode: len(ctx) symbols (uint8). Raises ValueError unless the words are used
    up exactly and every lane ends in the encoder's start state (a corrupt stream does not)."""
    K, P, M = ANS_LANES, ANS_PROB_BITS, 1 << ANS_PROB_BITS
    f_of, c_of = _ans_flat_tables(freq)
    # slot -> symbol, table after table: symbol s owns the slots [cum_s, cum_s + freq_s) of its table
    symbol_at = np.repeat(np.tile(np.arange(256, dtype=np.uint8), len(freq)), freq.reshape(-1))
    x, words, out, pos = states.astype(np.uint64), words.astype(np.uint64), np.empty(len(ctx), np.uint8), 0
    for start in range(0, len(ctx), K):
        c = ctx[start:start + K].astype(np.int64)
        xs = x[:len(c)]
        slot = xs & np.uint64(M - 1)
        s = symbol_at[c * M + slot.astype(np.int64)]
        i = c * 256 + s
        xs = f_of[i] * (xs >> np.uint64(P)) + slot - c_of[i]
        low = np.flatnonzero(xs < ANS_LOW)
        if pos + len(low) > len(words):
            raise ValueError("ANS stream ends early: truncated or corrupt artifact")
        xs[low] = (xs[low] << np.uint64(16)) | words[pos:pos + len(low)]
        x[:len(c)], out[start:start + len(c)], pos = xs, s, pos + len(low)
    if pos != len(words) or np.any(x != ANS_LOW):
        raise ValueError("ANS stream does not decode to its start state: corrupt artifact")
    return out


def _ans_contexts(shapes: list, ngroups: list, groups: list) -> np.ndarray:
    """The table of every symbol: each matrix's groups get their own table numbers, in order."""
    parts, base = [], 0
    for shape, g, group in zip(shapes, ngroups, groups):
        rows = math.prod(shape[:-1])
        parts.append(np.broadcast_to(group.astype(np.int32) + base, (rows, shape[-1])).reshape(-1))
        base += g
    return np.concatenate(parts)


def ans_pack(w: dict) -> tuple[dict, dict | None, bytes]:
    """w -> (w without its int8 matrices, their side information, their rANS stream); (w, None, b"")
    when w holds no int8 matrix of ANS_MIN_NUMEL elements or more."""
    names = sorted(k for k, t in w.items() if t.dtype == torch.int8 and t.dim() >= 2 and t.numel() >= ANS_MIN_NUMEL)
    if not names:
        return w, None, b""
    shapes, ngroups, groups, syms = [], [], [], []
    for name in names:
        q = w[name].contiguous().numpy().reshape(-1, w[name].size(-1))
        g = min(ANS_COLUMN_GROUPS, q.shape[1])
        group = np.empty(q.shape[1], np.uint8)
        for k, part in enumerate(np.array_split(np.argsort((q.astype(np.int64) ** 2).sum(0), kind="stable"), g)):
            group[part] = k
        shapes.append(list(w[name].shape)), ngroups.append(g), groups.append(group)
        syms.append(q.view(np.uint8).reshape(-1) ^ np.uint8(0x80))  # int8 -> 0..255, order kept
    sym, ctx = np.concatenate(syms), _ans_contexts(shapes, ngroups, groups)
    freq = ans_frequencies(np.bincount(ctx.astype(np.int64) * 256 + sym, minlength=sum(ngroups) * 256)
                           .reshape(-1, 256))
    words, states = ans_encode(sym, ctx, freq)
    order, side_names = {k: i for i, k in enumerate(w)}, set(names)
    side = {"names": names, "shapes": shapes, "ngroups": ngroups, "groups": [torch.from_numpy(g) for g in groups],
            # frequencies stored minus one, so that 2^15 (a table of one symbol) fits int16; unused symbols: -1
            "freq": torch.from_numpy((freq - 1).astype(np.int16)), "states": torch.from_numpy(states.view(np.int32)),
            "words": len(words), "at": [order[name] for name in names]}  # their places in w's order
    return {k: t for k, t in w.items() if k not in side_names}, side, words.astype("<u2").tobytes()


def ans_unpack(rest: dict, side: dict, stream: bytes) -> dict:
    """Inverse of ans_pack: the whole w, in its order."""
    if len(stream) != 2 * side["words"]:
        raise ValueError(f"ANS stream is {len(stream)} bytes, its header says {2 * side['words']}: "
                         "truncated or corrupt")
    ctx = _ans_contexts(side["shapes"], side["ngroups"], [g.numpy() for g in side["groups"]])
    sym = ans_decode(np.frombuffer(stream, dtype="<u2"), side["states"].numpy().view(np.uint32), ctx,
                     side["freq"].numpy().astype(np.int64) + 1)
    decoded, keys, pos = {}, list(rest), 0
    for name, shape in zip(side["names"], side["shapes"]):
        n = math.prod(shape)
        decoded[name] = torch.from_numpy((sym[pos:pos + n] ^ np.uint8(0x80)).view(np.int8).reshape(shape).copy())
        pos += n
    for at, name in sorted(zip(side["at"], side["names"])):
        keys.insert(at, name)
    return {k: decoded[k] if k in decoded else rest[k] for k in keys}


def _codec(compressor: str):
    """(compress, decompress) for one piece. brotli is imported only when asked for, so lzma
    runs work on installs without it. Both libraries release the GIL, so threads suffice."""
    if compressor == "brotli":
        try:
            import brotli
        except ImportError:
            raise ConfigError("COMPRESSOR=brotli needs the brotli package: pip install brotli, "
                              "or set COMPRESSOR=lzma") from None
        return (lambda b: brotli.compress(b, quality=11)), brotli.decompress
    if compressor == "lzma":
        return (lambda b: lzma.compress(b, preset=6)), lzma.decompress
    raise ConfigError(f"COMPRESSOR={compressor!r} must be 'brotli' or 'lzma'")


def _parallel_map(fn, items: list) -> list:
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max(1, min(workers, len(items)))) as pool:
        return list(pool.map(fn, items))


def serialize_quantized(w: dict, meta: dict, compressor: str, ans: bool = False) -> bytes:
    """The artifact's model bytes; ans: the int8 matrices as one rANS stream after the pieces
    (container version 2), the rest compressed as always (version 1 without)."""
    compress, _ = _codec(compressor)
    state, stream = {"w": w, "m": meta}, b""
    if ans:
        rest, side, stream = ans_pack(w)
        if side is not None:
            state = {"w": rest, "m": meta, "ans": side}
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = byte_shuffle(buf.getvalue(), 2)
    pieces = _parallel_map(compress, [payload[i:i + ARTIFACT_PIECE_BYTES]
                                      for i in range(0, len(payload), ARTIFACT_PIECE_BYTES)])
    header = (ARTIFACT_MAGIC + bytes([ARTIFACT_VERSION + bool(stream)]) + COMPRESSOR_CODES[compressor]
              + np.array([len(pieces)] + [len(p) for p in pieces], dtype="<u4").tobytes())
    return header + b"".join(pieces) + stream


def deserialize_quantized(blob: bytes) -> tuple[dict, dict]:
    """Exact inverse of serialize_quantized; the compressor is read from the header."""
    if blob[:4] != ARTIFACT_MAGIC:
        raise ValueError(f"not a quantized artifact: magic {blob[:4]!r}, expected {ARTIFACT_MAGIC!r}")
    if blob[4] not in (ARTIFACT_VERSION, ARTIFACT_VERSION + 1):
        raise ValueError(f"artifact version {blob[4]}, this script reads versions {ARTIFACT_VERSION} and "
                         f"{ARTIFACT_VERSION + 1} (with an ANS stream)")
    names = {code[0]: name for name, code in COMPRESSOR_CODES.items()}
    if blob[5] not in names:
        raise ValueError(f"artifact names an unknown compressor code {bytes([blob[5]])!r}")
    _, decompress = _codec(names[blob[5]])
    count = int(np.frombuffer(blob, dtype="<u4", count=1, offset=6)[0])
    lengths = np.frombuffer(blob, dtype="<u4", count=count, offset=10).tolist()
    ends = np.cumsum([10 + 4 * count] + lengths).tolist()
    if ends[-1] > len(blob) or (blob[4] == ARTIFACT_VERSION and ends[-1] != len(blob)):
        raise ValueError(f"artifact is {len(blob)} bytes but its header describes {ends[-1]}; truncated or corrupt")
    payload = b"".join(_parallel_map(decompress, [blob[a:b] for a, b in zip(ends[:-1], ends[1:])]))
    state = torch.load(io.BytesIO(byte_unshuffle(payload)), map_location="cpu", weights_only=True)
    if "ans" in state:
        return ans_unpack(state["w"], state["ans"], blob[ends[-1]:]), state["m"]
    return state["w"], state["m"]


# ---------------------------------------------------------------------------------------------
# Code size. The counted code is a two-line stub that carries this file minified
# (python_minifier, the library behind the `pyminify` command, with the record's flags), lzma-
# compressed and base85-encoded. The stub is real: run as a script it behaves as this file.
# It registers the minified text in linecache under a pseudo file name and compiles against that
# name, so whatever reads source at run time still finds it: inspect.getsource, which
# triton.jit needs for its kernels, and script_source() below, which the log header and the size
# count use. Run from the stub, script_source() returns the minified text; minifying that again
# gives the same text (checked in tests/test_artifact.py), so the stub counts the same either way.
# ---------------------------------------------------------------------------------------------

STUB_FILENAME = "<train_gpt.min>"


def script_source() -> str:
    """This script's own text: its file when run as train_gpt.py, the minified text when run
    from the stub (looked up through the file name this function was compiled under)."""
    lines = linecache.getlines(script_source.__code__.co_filename)
    if not lines:
        raise RuntimeError(f"cannot read this script's source from {script_source.__code__.co_filename!r}")
    return "".join(lines)


def _without_annotations(source: str) -> str:
    """source with the argument and return annotations removed from every function except those
    that read their own: Triton kernels (`BLOCK: tl.constexpr`) and torch custom ops (the schema)."""
    import ast
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and not any(
                ast.unparse(d).split("(")[0].endswith(("jit", "custom_op")) for d in node.decorator_list):
            args = node.args
            for arg in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
                if arg is not None:
                    arg.annotation = None
            node.returns = None
    return ast.unparse(tree)


def _python_minifier():
    try:
        import python_minifier
    except ImportError:
        raise ConfigError("code-size accounting needs python_minifier: pip install python-minifier") from None
    return python_minifier


@functools.lru_cache(maxsize=2)  # plan_artifact and write_artifact both need it; minifying takes seconds
def minified_code_stub(source: str) -> str:
    """The self-extracting stub for `source`; its UTF-8 length is the counted code size."""
    python_minifier = _python_minifier()
    # The record's pyminify flags, except that function annotations stay for the minifier: Triton
    # reads `BLOCK: tl.constexpr` from them and torch.library.custom_op its schema, so the stub
    # would fail without them. Every other function annotation is dropped beforehand.
    keep_args = python_minifier.RemoveAnnotationsOptions(
        remove_variable_annotations=True, remove_return_annotations=False,
        remove_argument_annotations=False, remove_class_attribute_annotations=False)
    small = python_minifier.minify(_without_annotations(source), remove_annotations=keep_args,
                                   rename_locals=False, hoist_literals=False, remove_literal_statements=True)
    packed = base64.b85encode(lzma.compress(small.encode("utf-8"))).decode("ascii")  # b85 has no quote or backslash
    f = STUB_FILENAME
    return ("import lzma as L,base64 as B,linecache as C\n"
            f's=L.decompress(B.b85decode("{packed}")).decode();'
            f'C.cache["{f}"]=(len(s),None,s.splitlines(1),"{f}");exec(compile(s,"{f}","exec"))\n')


class ArtifactTooLarge(Exception):
    """Model + code exceed ARTIFACT_LIMIT_BYTES; the message has the breakdown and overshoot."""


GPTQ_EXTRAS = {  # what else a GPTQ'd matrix may store, by the kind the size report counts it under
    ".lqer_a": "LQER factors", ".lqer_a_scale": "LQER factors", ".lqer_b": "LQER factors",
    ".lqer_b_scale": "LQER factors", ".fine_scale": "AWQ-lite scales", ".fine_cols": "AWQ-lite scales",
    ".row_order": "row orders",
}


def stored_bytes_by_kind(w: dict, meta: dict) -> dict[str, int]:
    """Uncompressed bytes per kind of stored tensor, to show where the artifact goes."""
    kinds = {}
    for name, info in meta.items():
        parts = [(info["tag"], w[name + ".q"]), ("scales (float16)", w[name + ".scale"])] \
            if info["tag"].startswith("gptq") else [(info["tag"], w[name])]
        parts += [(kind, w[name + suffix]) for suffix, kind in GPTQ_EXTRAS.items() if name + suffix in w]
        for kind, t in parts:
            kinds[kind] = kinds.get(kind, 0) + t.numel() * t.element_size()
    return kinds


def artifact_size_report(model_bytes: int, code_bytes: int, limit: int, stored: dict[str, int] | None = None,
                         compressor: str = "") -> str:
    total = model_bytes + code_bytes
    verdict = f"{limit - total:,} under" if total <= limit else f"{total - limit:,} OVER"
    lines = [f"artifact: {total:,} bytes = model {model_bytes:,} ({compressor or 'compressed'}) + code {code_bytes:,} "
             f"(minified stub); limit {limit:,}: {verdict}"]
    if stored:
        raw = sum(stored.values())
        lines.append(f"  model before compression: {raw:,} bytes, ratio {raw / max(model_bytes, 1):.3f}")
        lines += [f"    {kind:24s} {n:>12,} bytes  {100 * n / raw:5.1f}%" for kind, n in stored.items()]
    return "\n".join(lines)


def check_artifact_size(total: int, limit: int, report: str,
                        fix: str = "raise MATRIX_CLIP_SIGMAS, or set ARTIFACT_AUTOFIT=1 to do it automatically"):
    """The one refusal: every artifact over the limit, built or given, ends the run here."""
    if total > limit:
        raise ArtifactTooLarge(f"artifact is {total:,} bytes, {total - limit:,} over the {limit:,}-byte limit "
                               f"({fix})\n{report}")


def autofit_clip_factor(total_at, limit: int, max_factor: float = 1.5, rel_tol: float = 0.002,
                        max_calls: int = 10) -> tuple[float, int]:
    """ARTIFACT_AUTOFIT: the smallest factor f >= 1 on the matrix clip sigmas whose artifact fits.

    total_at(f) -> total bytes (model + code) with the matrix clip sigmas multiplied by f.
    Direction: SDClip's scale is clip_sigmas * std / r, so a larger f means a coarser grid,
    smaller |q| and a lower-entropy, smaller artifact, paid for with larger rounding error; the
    smallest f that fits loses the least. The bytes fall about linearly in ln f (each value
    loses about log2 f bits), so the search interpolates in ln f between the last failing and
    the last fitting factor, kept inside the middle 80% of that bracket so it always shrinks.
    It stops when the bracket is within rel_tol or after max_calls calls of total_at. Returns
    (f, total_at(f)); raises ArtifactTooLarge if even max_factor does not fit.
    """
    lo, size_lo = 1.0, total_at(1.0)
    if size_lo <= limit:
        return 1.0, size_lo
    hi, size_hi = max_factor, total_at(max_factor)
    if size_hi > limit:
        raise ArtifactTooLarge(f"artifact is {size_lo:,} bytes, {size_lo - limit:,} over the {limit:,}-byte limit, "
                               f"and still {size_hi:,} bytes with the matrix clip sigmas x{max_factor}")
    calls = 2
    while hi / lo > 1 + rel_tol and calls < max_calls:
        t = min(max((size_lo - limit) / (size_lo - size_hi), 0.1), 0.9)
        mid = math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
        size, calls = total_at(mid), calls + 1
        if size <= limit:
            hi, size_hi = mid, size
        else:
            lo, size_lo = mid, size
    return hi, size_hi


def quantize_model(model: GPT, h: Hyperparameters, hessians: dict, clip_factor: float = 1.0,
                   log=print) -> tuple[dict, dict]:
    state = unbank_state({k: v.detach() for k, v in model.state_dict().items()}, h.num_layers)
    groups = {f".{group}.": h.group_clip_sigmas(group) * clip_factor for group in ("mlp", "attn")}
    w, meta = quantize_state_dict(state, hessians, h.matrix_bits, h.matrix_clip_sigmas * clip_factor,
                                  h.embed_bits, h.embed_clip_sigmas, group_clip_sigmas=groups,
                                  fine_groups=h.awq_lite_groups, fine_group_size=h.awq_lite_group_size,
                                  fine_bits=h.awq_lite_bits)
    if h.lqer_top_k:
        lqer_correct(state, w, meta, h.lqer_top_k, h.lqer_rank, h.lqer_group)
    if h.quant_tweak_steps:
        tweak_float_tensors(model, h, w, meta, log)
    if h.row_reorder:
        reorder_rows(w, [n for n, info in meta.items() if info["tag"].startswith("gptq")
                         and any(k in n for k in ROW_REORDER_NAMES)])
    return w, meta


def tweak_float_tensors(model: GPT, h: Hyperparameters, w: dict, meta: dict, log=print) -> None:
    """QUANT_TWEAK_STEPS Adam steps (QUANT_TWEAK_LR) on the tensors the artifact stores in float
    (gains, scales, lambdas, gates), with every GPTQ'd matrix at its dequantized value, on batches
    of QUANT_TWEAK_BATCH_TOKENS training tokens; the tweaked values replace those in w, and the
    model gets its own weights back. The loss is the training loss, so no validation token is seen."""
    # norm tweaking after quantization: Li et al. 2023, arXiv:2309.02784 (there LayerNorm, a KL loss)
    names = [n for n, info in meta.items() if info["tag"] == "passthrough (float16)"]
    params = dict(model.named_parameters())
    names = [n for n in names if n in params]
    if not names:
        return
    device = next(model.parameters()).device
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in params.items()}
    # eager blocks: compiled ones (COMPILE_REGIONS, TTT_COMPILE) would trace again for the changed requires_grad
    was_training, regions, model.regions = model.training, model.regions, None
    t0 = time.perf_counter()
    try:
        model.load_state_dict(rebank_state(dequantize_state_dict(w, meta), h.num_layers))
        for n, p in params.items():
            p.requires_grad_(n in names)
        opt = torch.optim.Adam([params[n] for n in names], lr=h.quant_tweak_lr)
        loader = ShuffledSequenceLoader(h.train_files, h.train_seq_len)
        rows = max(1, h.quant_tweak_batch_tokens // h.train_seq_len)
        model.train()
        losses = []
        for _ in range(h.quant_tweak_steps):
            x, y = loader.next_batch(rows)
            ids, cu = _packed_row(list(x), x.numel(), h.train_seq_len)  # the rows end to end, each its own segments
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(ids.to(device), y.reshape(-1).to(device), cu.to(device), h.train_seq_len).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        for n in names:
            w[n] = params[n].detach().to("cpu", torch.float16).clone()
    finally:
        for n, p in params.items():
            p.requires_grad_(grads[n])
            p.grad = None
        model.load_state_dict(saved)
        model.train(was_training)
        model.regions = regions
    k = max(1, len(losses) // 4)
    log(f"quant_tweak: {len(losses)} steps on {len(names)} float tensors "
        f"({sum(params[n].numel() for n in names):,} values), training loss {sum(losses[:k]) / k:.4f} "
        f"(first {k}) -> {sum(losses[-k:]) / k:.4f} (last {k}), {time.perf_counter() - t0:.1f}s")


def load_artifact(blob: bytes, model: GPT, path: str = "the artifact") -> None:
    """Load a final_model.int6.ptz into model (strict: every tensor, every shape)."""
    w, meta = deserialize_quantized(blob)
    state = dequantize_state_dict(w, meta)
    if not all(f"blocks.{model.num_layers - 1}.{name}.weight" in state for _, name, _ in BANK_LAYOUT):
        raise ConfigError(f"{path} does not hold the {model.num_layers} layers of this model: check NUM_LAYERS")
    load_matching(path, rebank_state(state, model.num_layers), model)


def write_atomically(path: str, data: bytes) -> None:
    """Write to a temporary file beside path, then rename it over: a crash mid-write never leaves a
    truncated checkpoint or artifact under the real name."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_artifact(h: Hyperparameters, model: GPT, source: str, ptz_path: str, device, log, evaluate) -> dict:
    """Hessians -> GPTQ -> compression -> size account, on rank 0 (Hessians from all ranks).
    Writes the .ptz and train_gpt.min.py (the counted code) and returns the numbers, with the
    size "report"; a total over ARTIFACT_LIMIT_BYTES is written too (the caller refuses it), unless
    ARTIFACT_AUTOFIT finds the smallest coarsening of the matrix clip that fits."""
    rank, _ = _world()
    t0 = time.perf_counter()
    hessians = collect_hessians(model, h, device)
    info = {"hessians": len(hessians), "hessian_seconds": time.perf_counter() - t0}
    log(f"GPTQ: collected {len(hessians)} Hessians in {info['hessian_seconds']:.1f}s")
    if rank != 0:
        return {"total_bytes": 0}
    stub = minified_code_stub(source)
    stub_path = os.path.join(h.artifact_dir, "train_gpt.min.py")
    with open(stub_path, "w", encoding="utf-8") as f:
        f.write(stub)
    code_bytes = os.path.getsize(stub_path)
    blobs = {}

    codec = ("ans+" if h.ans_coding else "") + h.compressor

    def build(factor: float) -> int:
        if factor in blobs:
            return len(blobs[factor][0]) + code_bytes
        t = time.perf_counter()
        w, meta = quantize_model(model, h, hessians, factor, log)
        gptq_s = time.perf_counter() - t
        t = time.perf_counter()
        blob = serialize_quantized(w, meta, h.compressor, h.ans_coding)
        blobs[factor] = (blob, w, meta)
        log(f"GPTQ clip x{factor:.4f}: quantize {gptq_s:.1f}s, {codec} {time.perf_counter() - t:.1f}s, "
            f"{len(blob):,} model bytes")
        info.setdefault("gptq_seconds", gptq_s)
        info.setdefault("compress_seconds", time.perf_counter() - t)
        return len(blob) + code_bytes

    factor, total = 1.0, build(1.0)
    if total > h.artifact_limit_bytes and h.artifact_autofit:
        factor, total = autofit_clip_factor(build, h.artifact_limit_bytes)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        costs = []
        for f in (1.0, factor):
            load_artifact(blobs[f][0], model)
            costs.append(evaluate(f"quantized at clip x{f:.4f}")["val_bpb"])
            model.load_state_dict(state)
        info.update(autofit_clip_factor=factor, autofit_bpb_cost=costs[1] - costs[0])
        log(f"ARTIFACT_AUTOFIT: matrix clip sigmas x{factor:.4f} fits; it costs {costs[1] - costs[0]:+.5f} bpb")
    blob, w, meta = blobs[factor]
    write_atomically(ptz_path, blob)
    report = artifact_size_report(len(blob), code_bytes, h.artifact_limit_bytes, stored_bytes_by_kind(w, meta),
                                  codec)
    log(report)
    info.update(model_bytes=len(blob), code_bytes=code_bytes, total_bytes=total, path=ptz_path, report=report)
    return info


def read_eval_only_path(path: str):
    """The state in EVAL_ONLY_PATH, read and checked at start: a final_model.pt -> state dict, a
    final_model.int6.ptz -> its bytes (after a header check). ConfigError for anything else."""
    hint = "EVAL_ONLY_PATH takes a final_model.pt or final_model.int6.ptz written by train_gpt.py"
    try:
        if path.endswith(".ptz"):
            with open(path, "rb") as f:
                blob = f.read()
            deserialize_quantized(blob)
            return blob
        state = torch.load(path, map_location="cpu", weights_only=True)
    except ConfigError:
        raise
    except Exception as e:  # corrupt, truncated or foreign files raise many kinds of errors
        raise ConfigError(f"{path} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                          f"{hint}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{path} is not a state dict of tensors: {hint}")
    return state


# The switches that add tensors to the model: a checkpoint from before a default changed lacks them.
SWITCH_TENSORS = {"smear_w": "SMEAR_GATE", "smear_lambda": "SMEAR_GATE", "attn_gate": "SPARSE_ATTN_GATE"}


def load_matching(path: str, state: dict, model: GPT) -> None:
    """Load state into model, naming any tensor whose name or shape does not match it."""
    expected = model.state_dict()
    for name in sorted(set(expected) | set(state)):
        switch = SWITCH_TENSORS.get(name)
        if name not in state:
            fix = f": set {switch}=0 as it was trained" if switch else ""
            raise ConfigError(f"{path}: tensor {name} is missing; it was saved with other hyperparameters{fix}")
        if name not in expected:
            fix = f"set {switch}=1 as it was trained" if switch else "check NUM_LAYERS and friends"
            raise ConfigError(f"{path}: tensor {name} is not part of this model; {fix}")
        if state[name].shape != expected[name].shape:
            raise ConfigError(f"{path}: tensor {name} has shape {tuple(state[name].shape)} but the current "
                              f"hyperparameters give {tuple(expected[name].shape)}")
    model.load_state_dict(state)


# =============================================================================================
#                                          EVALUATION
# =============================================================================================


# Standard evaluation scores every validation target once, in packed rows cut at document starts.
# The stream is cut into rows of VAL_BATCH_TOKENS / 8 tokens on any world size (a document that
# straddles a row boundary loses its earlier context there) and ranks take contiguous shares of
# the rows; the last row is padded and masked. So every target counts and the number does not
# depend on the world size (the record dropped each rank's remainder). The sliding window gives
# every scored token EVAL_SEQ_LEN - EVAL_STRIDE tokens of context instead.


def _packed_row(pieces: list[Tensor], row_len: int, max_doc_len: int) -> tuple[Tensor, Tensor]:
    """Concatenate token pieces into one row of row_len, each piece starting its own segment
    (and BOS inside a piece starting another); the unused tail is one more padding segment."""
    cus, offset = [], 0
    for piece in pieces:
        cu, _ = build_cu_seqlens(piece.numpy(), max_doc_len, bucket=1)
        cus.append(cu[:-1] + offset)
        offset += len(piece)
    row = torch.zeros(row_len, dtype=torch.int64)
    if pieces:
        row[:offset] = torch.cat(pieces)
    tail = np.arange(offset, row_len, max_doc_len) if offset < row_len else np.zeros(0, np.int64)
    cu = np.concatenate(cus + [tail, [row_len]]).astype(np.int32)
    cu = np.concatenate([cu, np.full(-len(cu) % CU_SEQLENS_BUCKET, row_len, dtype=np.int32)])
    return row, torch.from_numpy(cu)


@torch.no_grad()
def score_rows(model_fn, rows: list[tuple[Tensor, Tensor, Tensor]], row_len: int, max_doc_len: int, luts,
               device) -> tuple[float, float, float]:
    """Score a list of (inputs, targets, score_mask) pieces packed into one row.
    Returns (sum of nats, sum of bytes, number of scored tokens) over the masked targets."""
    x, cu = _packed_row([r[0] for r in rows], row_len, max_doc_len)
    y, mask = torch.zeros(row_len, dtype=torch.int64), torch.zeros(row_len, dtype=torch.bool)
    offset = 0
    for inp, tgt, m in rows:
        y[offset:offset + len(tgt)], mask[offset:offset + len(tgt)] = tgt, m
        offset += len(tgt)
    x, y, mask, cu = (t.to(device, non_blocking=True) for t in (x, y, mask, cu))
    mark_cu_dynamic(cu)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model_fn(x, y, cu, max_doc_len)
    nbytes = target_bytes(x, y, luts)
    return (float(loss.double()[mask].sum()), float(nbytes[mask].sum()), float(mask.sum()))


def eval_val(model_fn, val_tokens: Tensor, h: Hyperparameters, luts, device) -> tuple[float, float]:
    """(val_loss, val_bpb) over every target of the validation stream. The stream is cut into rows
    of VAL_BATCH_TOKENS / 8 tokens (the record's per-GPU batch on 8 GPUs) whatever the world size,
    so contexts are cut at the same places and the score does not depend on the number of ranks."""
    rank, world = _world()
    row = h.val_batch_tokens // 8
    n = len(val_tokens) - 1
    rows = list(range(0, n, row))
    sums = [0.0, 0.0, 0.0]
    for start in rows[len(rows) * rank // world:len(rows) * (rank + 1) // world]:
        chunk = val_tokens[start:min(start + row, n) + 1]
        piece = (chunk[:-1], chunk[1:], torch.ones(len(chunk) - 1, dtype=torch.bool))
        for i, v in enumerate(score_rows(model_fn, [piece], row, h.eval_seq_len, luts, device)):
            sums[i] += v
    loss_sum, byte_sum, count = reduce_over_ranks(*sums, device=device)
    return loss_sum / max(count, 1), bits_per_byte(loss_sum, byte_sum)


def eval_val_sliding(model_fn, val_tokens: Tensor, h: Hyperparameters, luts, device, log=None) -> tuple[float, float]:
    """Sliding windows of EVAL_SEQ_LEN every EVAL_STRIDE tokens; the first window scores all its
    targets, every later one only its last EVAL_STRIDE, so each target is scored once with at
    least EVAL_SEQ_LEN - EVAL_STRIDE tokens of context (up to the document start)."""
    rank, world = _world()
    seq_len, stride, N = h.eval_seq_len, h.eval_stride, len(val_tokens) - 1
    starts = list(range(0, max(N - (seq_len - stride), 1), stride))
    my_starts = starts[len(starts) * rank // world:len(starts) * (rank + 1) // world]
    per_batch = 32
    sums = [0.0, 0.0, 0.0]
    for b in range(0, len(my_starts), per_batch):
        rows = []
        for start in my_starts[b:b + per_batch]:
            end = min(start + seq_len, N)
            mask = torch.zeros(end - start, dtype=torch.bool)
            mask[0 if start == 0 else seq_len - stride:] = True
            rows.append((val_tokens[start:end], val_tokens[start + 1:end + 1], mask))
        for i, v in enumerate(score_rows(model_fn, rows, per_batch * seq_len, seq_len, luts, device)):
            sums[i] += v
        if log and (b // per_batch) % 50 == 0:
            log(f"sliding_eval batch {b // per_batch + 1}/{-(-len(my_starts) // per_batch)}")
    loss_sum, byte_sum, count = reduce_over_ranks(*sums, device=device)
    return loss_sum / max(count, 1), bits_per_byte(loss_sum, byte_sum)


# =============================================================================================
#                                   TEST-TIME TRAINING (TTT)
# =============================================================================================


# Per-document, score-first LoRA test-time training (record PR #1530; LoRA: Hu et al. 2021,
# arXiv:2106.09685). Every validation document gets its own rank-r adapters on Q, K, V, "O"
# (read from the normed block input), the MLP (per virtual layer) and the head, trained only on
# that document. Its targets are cut into chunks; each chunk is scored and added to the sums
# under no_grad *before* the same forward's loss trains the adapters, so a token is always scored
# by adapters that have seen only earlier tokens of its own document. Nothing is shared between
# documents, so the result does not depend on batching or on the number of ranks.
#
# Speed: documents of a batch are ordered longest first, and the batch moves to fewer slots as
# documents finish (views of the same adapters and optimizer state), so finished documents stop
# costing compute; slot counts and windows are rounded to a few sizes; the blocks run compiled
# (TTT_COMPILE, ttt_model_fn) and each step is replayed as a CUDA graph (TTTRunner). None of this
# changes a number beyond kernel rounding:
# each document's math is its own, and window padding is causally invisible and never scored.
# The warmup runs on synthetic random tokens only, never on validation data.


class BatchedLoRA:
    """One LoRA set per document of a batch: delta(x) = x A B, A [slots, bsz, in, r] uniform(+-1/sqrt(in)),
    B [slots, bsz, r, out] zero, so every adapter starts as the identity change. Every document
    starts from the same seeded A, so its result does not depend on its batch, slot or rank.
    The optimizer updates the stacked tensors; autograd sees one leaf per slot that shares their
    memory, so each layer's adapter gets its own gradient (indexing the stack instead would
    back-propagate a zero-filled full-size tensor per layer)."""

    def __init__(self, shapes: dict[str, tuple[int, int, int]], bsz: int, rank: int, device, seed: int = 0):
        self.A, self.B, self.A0 = {}, {}, {}
        g = torch.Generator(device=device).manual_seed(seed)
        for name, (slots, d_in, d_out) in shapes.items():
            bound = 1 / math.sqrt(d_in)
            draw = torch.empty(slots, 1, rank, d_in, device=device).uniform_(-bound, bound, generator=g)
            self.A0[name] = draw.mT.contiguous()  # drawn [r, in] as before, stored [in, r]: the same adapters
            self.A[name] = self.A0[name].expand(slots, bsz, d_in, rank).contiguous()
            self.B[name] = torch.zeros(slots, bsz, rank, d_out, device=device)
        self.make_leaves()

    def make_leaves(self):
        self.leaves = {(kind, name): [t[i].detach().requires_grad_() for i in range(t.size(0))]
                       for kind, group in (("A", self.A), ("B", self.B)) for name, t in group.items()}

    def first(self, n: int) -> "BatchedLoRA":
        """The adapters of the first n documents: views of the same memory (each leaf contiguous)."""
        view = copy.copy(self)
        view.A, view.B = ({name: t[:, :n] for name, t in group.items()} for group in (self.A, self.B))
        view.make_leaves()
        return view

    def tensors(self) -> list[Tensor]:
        """The stacked tensors, in the order of self.leaves."""
        return [(self.A if kind == "A" else self.B)[name] for kind, name in self.leaves]

    def leaf_list(self) -> list[Tensor]:
        return [leaf for group in self.leaves.values() for leaf in group]

    def slot(self, slot: int, head: bool = False) -> dict[str, tuple[Tensor, Tensor]]:
        """One virtual layer's adapters (or, head=True, the head's): name -> (A, B) leaves. Every
        layer's dict has the same names, so a compiled block takes any of them."""
        names = ["head"] if head else [name for name in self.A if name != "head"]
        return {name: (self.leaves["A", name][slot], self.leaves["B", name][slot]) for name in names}

    @torch.no_grad()
    def reset(self):
        """Back to the seeded start, in place."""
        for name, a0 in self.A0.items():
            self.A[name].copy_(a0.expand_as(self.A[name]))
            self.B[name].zero_()


def lora_shapes(model: GPT, h: Hyperparameters) -> dict[str, tuple[int, int, int]]:
    D = model.tok_emb.weight.size(1)
    kv = model.kv_bank.size(1)
    slots = sum(len(x) for x in model.layer_order())
    shapes = {"head": (1, D, model.tok_emb.weight.size(0))}
    if h.ttt_q_lora:
        shapes["q"] = (slots, D, D)
    if h.ttt_v_lora:
        shapes["v"] = (slots, D, kv)
    if h.ttt_k_lora:
        shapes["k"] = (slots, D, kv)
    if h.ttt_o_lora:
        shapes["o"] = (slots, D, D)
    if h.ttt_mlp_lora:
        shapes["mlp"] = (slots, D, D)
    return shapes


class LoRAOptimizer:
    """AdamW (or SGD with momentum) over batched LoRA tensors [slots, docs, ...], one step per chunk.
    TTT defaults: lr 1e-4, betas (0, 0.999), eps 1e-10, weight decay 0.5. It updates each slot's
    part (tensor[i], the memory of BatchedLoRA's leaf i) from that leaf's own gradient, so the
    gradients are never stacked; AdamW is torch's fused multi-tensor kernel (one pass over the
    parameters, gradients and moments: at 64 documents the foreach form took 14 ms a step). The
    step count is a device tensor, so a CUDA graph of the step replays with the right bias corrections."""

    def __init__(self, params, h: Hyperparameters):
        stacked, self.h = list(params), h
        self.t = torch.zeros((), dtype=torch.float32, device=stacked[0].device)
        self.m = [torch.zeros_like(p) for p in stacked]
        self.v = [torch.zeros_like(p) for p in stacked] if h.ttt_optimizer == "adam" else None
        self.split(stacked)

    def split(self, stacked: list[Tensor]):
        """self.parts: the slots t[0], t[1], ... of each parameter (stacked) and moment tensor, in
        the order of BatchedLoRA.leaf_list()."""
        self.parts = [[t[i] for t in ts for i in range(t.size(0))] for ts in (stacked, self.m, self.v or [])]

    def state(self) -> list[Tensor]:
        return self.m + (self.v or [])

    def first(self, n: int, params: list[Tensor]) -> "LoRAOptimizer":
        """The optimizer of the first n documents, whose stacked tensors are params (views): its
        moments are views of these moments, and its step count is this one."""
        view = copy.copy(self)
        view.m = [t[:, :n] for t in self.m]
        view.v = [t[:, :n] for t in self.v] if self.v is not None else None
        view.split(params)
        return view

    @torch.no_grad()
    def step(self, grads: list[Tensor]):
        """grads: one per slot part (leaf_list order)."""
        h = self.h
        params, m, v = self.parts
        self.t += 1
        if self.v is None:  # SGD with momentum TTT_BETA1 and L2 weight decay
            grads = torch._foreach_add(grads, params, alpha=h.ttt_weight_decay)
            torch._foreach_mul_(m, h.ttt_beta1)
            torch._foreach_add_(m, grads)
            torch._foreach_add_(params, m, alpha=-h.ttt_lora_lr)
            return
        # the CUDA kernel wants each gradient strided like its parameter: with_lora's are, others are copied
        grads = [g if g.stride() == p.stride() else torch.empty_like(p).copy_(g) for g, p in zip(grads, params)]
        torch._fused_adamw_(params, grads, m, v, [], [self.t] * len(params), lr=h.ttt_lora_lr,
                            beta1=h.ttt_beta1, beta2=h.ttt_beta2, weight_decay=h.ttt_weight_decay, eps=1e-10,
                            amsgrad=False, maximize=False)


def split_documents(tokens: Tensor) -> list[tuple[int, int]]:
    """(start, length) of each document: from its BOS through the next document's BOS, so its
    last target is that BOS; the last document runs to the end. Together they cover every target."""
    bos = torch.nonzero(tokens == BOS_ID).flatten().tolist()
    if not bos or bos[0] != 0:
        bos = [0] + bos
    ends = bos[1:] + [len(tokens) - 1]
    return [(s, e - s + 1) for s, e in zip(bos, ends) if e > s]


def select_documents(docs: list, fraction: float, seed: int) -> list:
    """A seeded subset (the record's choice: random.Random(SEED).sample, kept in index order)."""
    if fraction >= 1:
        return docs
    picked = random.Random(seed).sample(range(len(docs)), round(len(docs) * fraction))
    return [docs[i] for i in sorted(picked)]


def ttt_batches(docs: list, batch_size: int) -> list[list[tuple[int, int]]]:
    """Sort by length, cut into batches, longest batches first; each batch longest document first."""
    ordered = sorted(docs, key=lambda d: d[1])
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    batches.sort(key=lambda b: -b[-1][1])
    return [b[::-1] for b in batches]


def ttt_chunk_counts(batch: list, chunk: int) -> list[int]:
    """Chunks of each document: its targets (length - 1) in pieces of TTT_CHUNK_SIZE."""
    return [-(-(n - 1) // chunk) for _, n in batch]


def ttt_schedule(batch: list, h: Hyperparameters):
    """(ci, documents that have chunk ci, window of chunk ci) for each chunk step of a batch whose
    documents are ordered longest first, so that those with chunk ci are its first ones."""
    chunks = ttt_chunk_counts(batch, h.ttt_chunk_size)
    for ci in range(chunks[0]):
        yield ci, sum(c > ci for c in chunks), min((ci + 1) * h.ttt_chunk_size, h.ttt_eval_seq_len)


def ttt_slot_bucket(n: int) -> int:
    """Documents of a chunk step rounded up to 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (at most a third of
    the slots idle), so that few shapes occur and each one's CUDA graph is reused."""
    size = 1
    while size < n:
        size = size + 1 if size < 2 else size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


def ttt_context_bucket(need: int, chunk: int, window: int) -> int:
    """A window of `need` tokens rounded up to chunk * 2^k, at most window (the padding is causally
    invisible to the real tokens and never scored)."""
    size = chunk
    while size < need:
        size *= 2
    return min(size, window)


def ttt_chunk_inputs(tokens: Tensor, starts: Tensor, pred_lens: Tensor, ci, chunk: int, window: int,
                     context: int | None = None):
    """For chunk ci of n documents (tokens on device): inputs and targets x, y [n, context], where
    each row is the last <= window tokens up to the chunk's end, left-aligned and padded with 0; and
    the window positions of the chunk's targets, at [n, chunk], with scored [n, chunk] marking those
    that exist. context: at least min((ci + 1) * chunk, window), the default. ci may be a 0-dim
    tensor (a CUDA graph replays with new values); rows with pred_len 0 are empty slots."""
    context = context or min((ci + 1) * chunk, window)
    chunk_end = torch.clamp(pred_lens, max=(ci + 1) * chunk)
    win_start = torch.clamp(chunk_end - window, min=0)
    width = chunk_end - win_start
    pos = torch.arange(context, device=tokens.device)
    valid = pos[None] < width[:, None]
    idx = (starts + win_start)[:, None] + pos[None]
    x = torch.where(valid, tokens[idx.clamp(max=len(tokens) - 2)], 0)
    y = torch.where(valid, tokens[(idx + 1).clamp(max=len(tokens) - 1)], 0)
    at = (ci * chunk - win_start)[:, None] + torch.arange(chunk, device=tokens.device)[None]
    scored = (at < width[:, None]) & (at >= 0)
    return x, y, at.clamp(0, context - 1), scored


class TTTSlots:
    """Device state for up to `size` documents of a batch: adapters, optimizer state, and each
    document's start, target count and chunk count (0: an empty slot, scored and trained never).
    Allocated once and reused by every batch, so CUDA graphs replay on the same memory; first(n)
    is the state of its first n documents, in the same memory, so a batch moves to fewer slots as
    its documents finish (longest first) without copying anything."""

    def __init__(self, model: GPT, h: Hyperparameters, size: int, device):
        self.size, self.views = size, {}
        self.lora = BatchedLoRA(lora_shapes(model, h), size, h.ttt_lora_rank, device, h.seed)
        self.opt = LoRAOptimizer(self.lora.tensors(), h)
        self.docs = torch.zeros(3, size, dtype=torch.int64, device=device)  # start, pred_len, chunks

    def first(self, n: int) -> "TTTSlots":
        """A view of the first n documents (made once per n: graphs captured on it replay on it)."""
        if n == self.size:
            return self
        if n not in self.views:
            view = copy.copy(self)
            view.size, view.views, view.docs = n, {}, self.docs[:, :n]
            view.lora = self.lora.first(n)
            view.opt = self.opt.first(n, view.lora.tensors())
            self.views[n] = view
        return self.views[n]

    @torch.no_grad()
    def load(self, batch: list[tuple[int, int]], chunk: int):
        """The seeded start for the documents of batch, empty slots after them."""
        self.lora.reset()
        self.opt.t.zero_()
        torch._foreach_zero_(self.opt.state())
        counts = ttt_chunk_counts(batch, chunk)
        rows = [(s, n - 1, c) for (s, n), c in zip(batch, counts)] + [(0, 0, 0)] * (self.size - len(batch))
        self.docs.copy_(torch.tensor(rows).T)


def ttt_chunk_step(model_fn, tokens: Tensor, slots: TTTSlots, ci, context: int, h: Hyperparameters, luts,
                   sums: Tensor, train: bool, score_on=1.0, grad: bool = False):
    """Chunk ci of every document in slots: its targets are scored (nats, bytes, count added to
    sums, times score_on) from the forward that then, if train, gives one optimizer step on the
    mean loss of each document that has a later chunk. grad: the forward keeps grad on even
    without training (compiled blocks: a forward without grad would be other graphs to compile).
    No host synchronisation, so it can be captured in a CUDA graph; the same function runs eagerly."""
    starts, pred_lens, chunks = slots.docs
    x, y, at, scored = ttt_chunk_inputs(tokens, starts, pred_lens, ci, h.ttt_chunk_size, h.ttt_eval_seq_len, context)
    device = tokens.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False), \
            torch.set_grad_enabled(train or grad):
        loss = model_fn(x, y, None, 0, slots.lora, at)  # [n, chunk]: only the chunk's targets
    with torch.no_grad():  # score first, before any update on this chunk
        nbytes = torch.where(scored, target_bytes(x.gather(1, at), y.gather(1, at), luts), 0)
        sums += torch.stack([torch.where(scored, loss.detach().double(), 0).sum(), nbytes.sum().double(),
                             scored.sum().double()]) * score_on
    if train:  # a document's last chunk teaches nothing
        per_doc = torch.where(scored, loss, 0).sum(1) / scored.sum(1).clamp_min(1)
        objective = torch.where(chunks > ci + 1, per_doc, 0).sum()
        slots.opt.step(torch.autograd.grad(objective, slots.lora.leaf_list()))


# Chunk steps of at least this many slot x window tokens run uncaptured at their exact window and
# on exactly their documents, not as a graph rounded up to 32 x 2^k tokens and 1, 2, 3, 4, 6, 8, ...
# slots: there the GPU is busy anyway and the padding is work. One H200, default model: eager blocks
# (TTT_COMPILE=0) took 486 ms at 64 x 2048 eagerly and as a graph; compiled blocks cost the host
# ~55-80 ms a step uncaptured, at any shape (17 blocks' wrappers and guards), which the GPU's work
# hides from 24 slots x 2048 (or 48 x 1024) tokens on (graphed: 16 x 2048 66 ms, 64 x 2048 243 ms).
TTT_EAGER_TOKENS = 32768
TTT_EAGER_TOKENS_COMPILED = 49152


class TTTRunner:
    """Runs chunk steps for one evaluation: the slot state (one TTTSlots and its views), the score
    sums, and (CUDA, TTT_CUDA_GRAPHS=1) one CUDA graph per (slots view, rounded-up window, train)
    captured at its first use and replayed after, for steps under eager_from tokens (default
    TTT_EAGER_TOKENS, or TTT_EAGER_TOKENS_COMPILED with compiled blocks, where a shape that would
    compile runs once uncaptured first). Eagerly a chunk step launches ~4,400 small kernels, so the
    host, not the GPU, set the pace of the smaller steps. The graphs share one memory pool: they
    never run at once, and every tensor that outlives a step is allocated outside them."""

    def __init__(self, model: GPT, h: Hyperparameters, device, graphs: bool, eager_from: float | None = None):
        self.model, self.h, self.device, self.eager_from = model, h, device, eager_from
        self.graphs_on = graphs and torch.device(device).type == "cuda"
        self.base, self.graphs, self.pool, self.tokens = None, {}, None, None
        self.fell_back = set()  # shapes whose first, strict capture failed: they ran once uncaptured
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.ci = torch.zeros((), dtype=torch.int64, device=device)
        self.score_on = torch.ones((), dtype=torch.float64, device=device)
        self.progress = None  # progress(ci, chunks): called about every 30 s inside a long batch

    def least_slots(self, n: int) -> int:
        """Slots for n documents before any rounding: two at least with compiled blocks, since
        torch.compile specializes a dynamic size of 1 and compiles again. (Traced size-obliviously
        instead, torch 2.11 baked one window into the one-slot backward graph, and a stride assertion
        failed at the next window on the H200.)"""
        return max(n, 2) if self.model.regions else n

    def graphed(self, n: int, context: int) -> bool:
        """Whether a step of n documents over `context` tokens replays a graph (of
        ttt_slot_bucket(least_slots(n)) slots and the rounded-up window); if not, it runs on
        least_slots(n) slots and its own window."""
        eager_from = self.eager_from or (TTT_EAGER_TOKENS_COMPILED if self.model.regions else TTT_EAGER_TOKENS)
        padded = ttt_context_bucket(context, self.h.ttt_chunk_size, self.h.ttt_eval_seq_len)
        return self.graphs_on and ttt_slot_bucket(self.least_slots(n)) * padded < eager_from

    def slots_for(self, n: int, context: int = 0) -> TTTSlots:
        """The slots for a step of n documents over `context` tokens: a view of the first ones of
        the one TTTSlots this runner allocates (for TTT_BATCH_SIZE documents, or more if asked)."""
        size = ttt_slot_bucket(self.least_slots(n))
        if self.base is None or self.base.size < size:
            self.base = TTTSlots(self.model, self.h, max(size, ttt_slot_bucket(self.h.ttt_batch_size)), self.device)
            self.graphs.clear()  # captured on the old memory
        if context and not self.graphed(n, context):
            size = self.least_slots(n)
        return self.base.first(size)

    def step(self, model_fn, tokens: Tensor, slots: TTTSlots, context: int, luts, train: bool):
        """One chunk step over windows of `context` tokens (the longest row's)."""
        compiled = self.model.regions is not None
        graphed = self.graphed(slots.size, context)
        context = ttt_context_bucket(context, self.h.ttt_chunk_size, self.h.ttt_eval_seq_len) if graphed else context
        run = lambda: ttt_chunk_step(model_fn, tokens, slots, self.ci, context, self.h, luts, self.sums, train,
                                     self.score_on, grad=compiled)
        if not graphed:
            return run()
        if tokens is not self.tokens:  # graphs read the tokens they were captured with
            self.graphs.clear()
            self.tokens = tokens
        key = (slots, context, train)  # a graph replays on the memory it was captured on
        if key not in self.graphs:
            graph = self.capture(run, strict=compiled and key not in self.fell_back)
            if graph is None:  # it would have compiled: this once uncaptured (compiling), captured next time
                self.fell_back.add(key)
                return run()
            self.graphs[key] = graph
        self.graphs[key].replay()

    def capture(self, run, strict: bool):
        """run() captured as a CUDA graph (nothing runs yet). strict (compiled blocks at a shape not
        run before): under torch.compile's stance fail_on_recompile, so a block that would compile
        again, which must never happen inside a capture, raises before it traces; any failure of a
        strict capture gives None. The warmup checks the graphs against the uncaptured step."""
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.compiler.set_stance("fail_on_recompile" if strict else "default"), \
                    torch.cuda.graph(graph, pool=self.pool):
                run()
        except Exception:
            if not strict:
                raise
            return None
        return graph


def ttt_batch(model_fn, model: GPT, tokens: Tensor, batch: list, h: Hyperparameters, luts,
              adapt: bool = True, runner: TTTRunner | None = None) -> tuple[float, float, float]:
    """Score-first TTT over one batch of documents (longest first). Returns (nats, bytes, tokens).
    adapt=False scores the same windows without training: the baseline TTT is measured against.
    The documents still active at chunk ci are the first ones (longest first); the slots shrink
    to fewer as documents finish (views of the same memory, adapters and optimizer state included)."""
    runner = runner or TTTRunner(model, h, tokens.device, graphs=False)
    total = ttt_chunk_counts(batch, h.ttt_chunk_size)[0]
    runner.sums.zero_()
    runner.slots_for(len(batch)).load(batch, h.ttt_chunk_size)
    last_report = time.perf_counter()
    for ci, active, window in ttt_schedule(batch, h):
        if runner.progress and time.perf_counter() - last_report > 30:
            runner.progress(ci, total)
            last_report = time.perf_counter()
        slots = runner.slots_for(active, window)
        train = adapt and total > ci + 1
        runner.ci.fill_(ci)
        for step in range(h.ttt_grad_steps if train else 1):
            runner.score_on.fill_(1.0 if step == 0 else 0.0)
            runner.step(model_fn, tokens, slots, window, luts, train)
    return tuple(runner.sums.tolist())


def ttt_batch_work(batch: list, h: Hyperparameters) -> int:
    """Token positions a batch's chunk steps run through (documents x window): TTT's cost model."""
    return sum(active * window for _, active, window in ttt_schedule(batch, h))


def ttt_global_phase_ends(batches: list, h: Hyperparameters) -> list[int]:
    """Phased TTT: the batch counts after which a global phase runs. Phase p ends with the first batch
    that brings the scored documents to TTT_GLOBAL_PREFIX_DOCS x (p + 1) / TTT_GLOBAL_PHASES."""
    counts = np.cumsum([len(b) for b in batches])
    ends = []
    for p in range(h.ttt_global_phases):
        need = min(h.ttt_global_prefix_docs, int(counts[-1])) * (p + 1) / h.ttt_global_phases
        end = int(np.searchsorted(counts, need - 1e-9)) + 1
        if end < len(batches) and end not in ends:  # a phase after the last batch would help nothing
            ends.append(end)
    return ends


def ttt_global_adapt(model: GPT, tokens: Tensor, docs: list, h: Hyperparameters, device) -> dict:
    """Phased TTT's global step: one epoch of SGD with momentum and a cosine-decaying rate on the base
    weights over these documents, all of them already scored. Their tokens are cut into rows of
    TTT_EVAL_SEQ_LEN (attention within each row and document); a step takes TTT_GLOBAL_BATCH_TOKENS of
    rows, shared out over the ranks, and follows the gradient of the step's mean loss, clipped at 1:
    the same update on any number of ranks."""
    # phased / global TTT on already-scored documents: PR #1610, three phases in #1626
    rank, world = _world()
    L = h.ttt_eval_seq_len
    stream = torch.cat([tokens[s:s + n] for s, n in docs]).cpu()
    n = len(stream) - 1  # targets
    rows = [(stream[i:min(i + L, n)], stream[i + 1:min(i + L, n) + 1]) for i in range(0, n, L)]
    per_step = max(h.ttt_global_batch_tokens // L, 1)
    steps = math.ceil(len(rows) / per_step)
    params = list(model.parameters())
    momentum = [torch.zeros_like(p) for p in params]
    flags = [p.requires_grad for p in params]
    total = torch.zeros((), device=device)
    for p in params:
        p.requires_grad_(True)
    try:
        for step in range(steps):
            step_rows = rows[step * per_step:(step + 1) * per_step]
            mine, count = step_rows[rank::world], sum(len(y) for _, y in step_rows)
            loss_sum = torch.zeros((), device=device)
            if mine:
                x, cu = _packed_row([x for x, _ in mine], sum(len(x) for x, _ in mine), L)
                y = torch.cat([y for _, y in mine])
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss_sum = model(x.to(device), y.to(device), cu.to(device), L).sum()
                (loss_sum / count).backward()
            for p in params:  # a weight this step's loss does not reach still takes its momentum step
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if world > 1:  # the step's mean loss is the sum of the ranks' parts
                for work in average_grads(params):
                    work.wait()
                for p in params:
                    p.grad.mul_(world)
            grads = [p.grad for p in params]
            torch.nn.utils.clip_grad_norm_(grads, 1.0)
            lr = h.ttt_global_lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            with torch.no_grad():
                for p, g, m in zip(params, grads, momentum):
                    m.mul_(h.ttt_global_momentum).add_(g)
                    p.sub_(lr * m)
                    p.grad = None
            total += loss_sum.detach() / count
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    mean_loss = reduce_over_ranks(float(total), device=device)[0] / max(steps, 1)  # one sync, at the end
    return {"steps": steps, "tokens": len(stream), "mean_loss": mean_loss}


class TTTProgress:
    """Running sums of a TTT evaluation and its progress lines (an ETA by work, this rank's share)."""

    def __init__(self, batches: list, work: list, log, adapt: bool):
        self.batches, self.work, self.log, self.tag = batches, work, log, "" if adapt else "_baseline"
        self.sums, self.tokens, self.done, self.t0 = [0.0, 0.0, 0.0], 0, 0, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def inside(self, b: int):
        """The runner's callback for a long batch: a line every 30 s."""
        return lambda ci, chunks: self.log(f"ttt_progress rank:{_world()[0]} batch:{b + 1}/{len(self.batches)} "
                                           f"chunk:{ci}/{chunks} elapsed:{self.elapsed():.1f}s")

    def add(self, b: int, result: tuple[float, float, float]) -> None:
        rank, world = _world()
        self.sums = [a + r for a, r in zip(self.sums, result)]
        self.tokens, self.done = self.tokens + int(result[2]), self.done + self.work[b]
        elapsed = self.elapsed()
        eta = elapsed / self.done * max(sum(self.work) / world - self.done, 0)
        self.log(f"ttt_progress{self.tag} rank:{rank} batch:{b + 1}/{len(self.batches)} docs:{len(self.batches[b])} "
                 f"longest:{self.batches[b][0][1]} bpb_so_far:{bits_per_byte(self.sums[0], self.sums[1]):.4f} "
                 f"tok/s:{self.tokens / max(elapsed, 1e-9):.0f} elapsed:{elapsed:.1f}s eta:{eta:.0f}s")


def eval_val_ttt(model_fn, model: GPT, val_tokens: Tensor, h: Hyperparameters, luts, device, log,
                 adapt: bool = True) -> tuple[float, float]:
    """(val_loss, val_bpb) with per-document LoRA TTT over the (optionally sampled) documents; with
    TTT_GLOBAL_PHASES the base weights also adapt between phases, and are restored at the end."""
    docs = select_documents(split_documents(val_tokens), h.val_doc_fraction, h.seed)
    batches = ttt_batches(docs, h.ttt_batch_size)
    tokens = val_tokens.to(device)
    runner = TTTRunner(model, h, device, graphs=h.ttt_cuda_graphs)
    progress = TTTProgress(batches, [ttt_batch_work(b, h) for b in batches], log, adapt)
    ends = ttt_global_phase_ends(batches, h) if adapt else []
    if adapt and len(ends) < h.ttt_global_phases:  # a phase at or after the last batch would adapt nothing
        log(f"ttt_global: {len(ends)} of TTT_GLOBAL_PHASES={h.ttt_global_phases} phases run: "
            f"TTT_GLOBAL_PREFIX_DOCS={h.ttt_global_prefix_docs} reaches the last of the {len(docs)} documents "
            f"in {len(batches)} batches; set it lower to adapt between them")
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()} if ends else None
    with frozen(model):
        for lo, hi in zip([0] + ends, ends + [len(batches)]):
            queue = WorkQueue(f"ttt_queue_{h.run_id}")  # one per phase: every rank ends a phase before the next
            while (b := lo + queue.claim()) < hi:
                runner.progress = progress.inside(b)
                progress.add(b, ttt_batch(model_fn, model, tokens, batches[b], h, luts, adapt, runner))
            if hi < len(batches):  # every document of batches[:hi] is scored: the base weights may learn it
                scored = [d for batch in batches[:hi] for d in batch]
                stats = ttt_global_adapt(model, tokens, scored, h, device)
                log(f"ttt_global_phase after batch {hi}/{len(batches)}: {len(scored)} scored documents, "
                    f"{stats['tokens']} tokens, {stats['steps']} SGD steps, mean loss {stats['mean_loss']:.4f} "
                    f"elapsed:{progress.elapsed():.1f}s")
    if weights is not None:
        model.load_state_dict(weights)
    if runner.graphs_on:
        # first_uncaptured: shapes where a compiled block would have compiled again inside the capture
        log(f"ttt_graphs{progress.tag} rank:{_world()[0]} shapes:{len(runner.graphs)} "
            f"first_uncaptured:{len(runner.fell_back)}")
    loss_sum, byte_sum, count = reduce_over_ranks(*progress.sums, device=device)
    return loss_sum / max(count, 1), bits_per_byte(loss_sum, byte_sum)


class TTTMismatch(RuntimeError):
    """Compiled TTT blocks scored the warmup's synthetic batch unlike the plain ones."""


def same_scores(got: tuple, want: tuple) -> bool:
    """TTT sums (nats, bytes, count) of one batch, two ways. cuBLAS may pick other kernels under
    capture or compile, and ~70 adapter steps amplify their rounding (8e-5 relative seen on a
    trained model); a graph reading the wrong memory or a wrong kernel is far off."""
    return math.isclose(got[0], want[0], rel_tol=1e-3) and got[1:] == want[1:]


def warm_up_ttt(model_fn, model: GPT, h: Hyperparameters, luts, device) -> float:
    """Warm up the TTT step on synthetic random tokens (never validation data): once uncaptured,
    then, with CUDA graphs on, once captured, which must score the same; compiled blocks must also
    score as the plain ones (TTTMismatch otherwise). Returns seconds."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    # compiled blocks take any window (dynamic shapes): two short documents compile them; eager
    # ones warm up, and their graphs are checked, at every window up to TTT_EVAL_SEQ_LEN
    span = 2 * h.ttt_chunk_size if model.regions else h.ttt_eval_seq_len
    n = span + 2 * h.ttt_chunk_size + 1
    fake = torch.randint(2, model.tok_emb.weight.size(0), (2 * n,), generator=g)
    fake[0] = fake[n] = BOS_ID
    fake, batch = fake.to(device), [(0, n), (n, n - 2 * h.ttt_chunk_size)]
    with frozen(model):
        eager = ttt_batch(model_fn, model, fake, batch, h, luts)
        if model.regions:  # the same batch through the plain blocks
            regions, model.regions = model.regions, None
            try:
                plain = ttt_batch(model_fn, model, fake, batch, h, luts)
            finally:
                model.regions = regions
            if not same_scores(eager, plain):
                raise TTTMismatch(f"TTT's compiled blocks scored {eager} where the plain blocks scored {plain}")
        runner = TTTRunner(model, h, device, graphs=h.ttt_cuda_graphs)
        if runner.graphs_on:
            graphed = ttt_batch(model_fn, model, fake, batch, h, luts, runner=runner)
            if not same_scores(graphed, eager):
                raise RuntimeError(f"TTT under CUDA graphs scored {graphed} where the eager step scored {eager}; "
                                   f"run with TTT_CUDA_GRAPHS=0 and report this")
    return time.perf_counter() - t0


class frozen:
    """Context manager: the model's own weights get no gradients while the LoRAs train."""

    def __init__(self, model: nn.Module):
        self.params = list(model.parameters())

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in zip(self.params, self.flags):
            p.requires_grad_(flag)


# =============================================================================================
#                                             MAIN
# =============================================================================================


# A run is a short sequence of phases, each a function below:
#   start_run         ranks, the log header, input checks, validation data, the model and its graph
#   train_phase       warm up, train within the budget, switch to the EMA weights, save final_model.pt
#                     (skipped with EVAL_ONLY_PATH, which loads a checkpoint or an artifact instead)
#   plan_artifact     decide which artifact is evaluated: one ArtifactPlan mode
#   build_artifact    Hessians, GPTQ, compression and the size check, when the plan says "quantize"
#   evaluate_artifact the quantized score, then the sliding window and TTT where enabled
#   finish            final_score picks the submitted number; summary.json and submission.json
# final_model.pt is written right after training, before anything that can fail, so no later
# error loses the trained model: EVAL_ONLY_PATH resumes from it.


class RunContext:
    """What the phases of one run share: settings, device and ranks, the log, this file's source,
    the one model and its compiled callable, the validation data, and the summary being filled."""

    def __init__(self, h: Hyperparameters):
        self.h = h
        self.device = setup_distributed(h)
        self.rank, self.world = _world()
        self.log = Logger(os.path.join(h.artifact_dir, "train.log"), enabled=self.rank == 0)
        self.source = script_source()
        self.summary: dict = {"run_id": h.run_id, "world_size": self.world}
        self.model = self.model_fn = self.luts = self.val_tokens = self.plan = self.eval_only_state = None

    def evaluate(self, name: str) -> dict:
        """Standard evaluation of the model as it is now (float or quantized weights)."""
        self.model.eval()
        return timed_score(self.log, name, lambda: eval_val(self.model_fn, self.val_tokens, self.h, self.luts,
                                                             self.device))


def timed_score(log, name: str, score) -> dict:
    """Run score() -> (val_loss, val_bpb), log it and return it with its time."""
    t0 = time.perf_counter()
    loss, bpb = score()
    result = {"val_loss": loss, "val_bpb": bpb, "eval_seconds": time.perf_counter() - t0}
    log(f"{name} val_loss:{loss:.5f} val_bpb:{bpb:.5f} eval:{result['eval_seconds']:.1f}s")
    return result


def check_inputs(ctx: RunContext) -> None:
    """Everything that can be wrong with a run's inputs, before it writes a byte: the data and
    tokenizer, every shard's header, EVAL_ONLY_PATH's contents, which artifact it will evaluate,
    and that ARTIFACT_DIR holds no checkpoint or artifact that this run would replace."""
    h = ctx.h
    for warning in h.warnings:
        ctx.log(warning)
    if h.eval_only_path and not os.path.isfile(h.eval_only_path):
        raise ConfigError(f"EVAL_ONLY_PATH={h.eval_only_path} does not exist")
    check_data(h, need_train=not h.eval_only_path.endswith(".ptz"))
    ctx.eval_only_state = read_eval_only_path(h.eval_only_path) if h.eval_only_path else None
    ctx.plan = plan_artifact(h, ctx.source, ctx.log)
    if ctx.plan.mode == "quantize":  # the artifact's packages, checked now rather than after training
        _codec(h.compressor)
        _python_minifier()
    if os.path.exists(h.artifact_dir) and not os.path.isdir(h.artifact_dir):
        raise ConfigError(f"ARTIFACT_DIR={h.artifact_dir} is a file, not a folder")
    writes = (["final_model.pt"] if not h.eval_only_path else []) + (
        ["final_model.int6.ptz"] if ctx.plan.mode == "quantize" else [])
    existing = [name for name in writes if os.path.exists(os.path.join(h.artifact_dir, name))]
    if existing and ctx.rank == 0:
        raise ConfigError(f"ARTIFACT_DIR={h.artifact_dir} already holds {' and '.join(existing)}, which this run "
                          f"would replace: set another ARTIFACT_DIR (or RUN_ID), or move the old files away")


def start_run(h: Hyperparameters) -> RunContext:
    """Ranks, the log header, every input check, validation data and the model (with EVAL_ONLY_PATH's
    weights). ARTIFACT_DIR and train.log are created only once all of that has passed."""
    ctx = RunContext(h)
    log = ctx.log
    log("\n".join(f"{k}: {v}" for k, v in sorted(h.as_dict().items())), console=False)
    log(ctx.source, console=False)
    environment = environment_report()
    log(environment, console=False)
    ctx.summary["environment"] = environment.splitlines()[:2]
    log(f"run_id:{h.run_id} artifact_dir:{h.artifact_dir} world_size:{ctx.world} grad_accum:{h.grad_accum_steps}")
    log("settings that differ from the defaults: " + (", ".join(h.changed()) or "none"))
    check_inputs(ctx)
    random.seed(h.seed)
    np.random.seed(h.seed)
    torch.manual_seed(h.seed)
    import sentencepiece as spm
    ctx.luts = build_byte_luts(spm.SentencePieceProcessor(model_file=h.tokenizer_path), h.vocab_size, ctx.device)
    ctx.val_tokens = load_validation_tokens(h.val_files, h.eval_seq_len)
    log(f"val_tokens:{len(ctx.val_tokens) - 1} train_shards:{len(glob.glob(h.train_files))}")
    build_run_model(ctx)
    log.open()
    return ctx


def compile_blocks(model: GPT, compile_fn, dynamic_rows: bool = False) -> tuple:
    """(sequential, parallel): the model's two kinds of block, each through compile_fn once. A block
    takes its layer's weights and adapters as arguments, so one compiled block serves every layer
    and any depth (regional compilation). dynamic_rows: the rows and their length are marked
    dynamic at each call (TTT: the slot count and the window change from step to step)."""
    def region(block):
        compiled = compile_fn(block)
        if not dynamic_rows:
            return compiled

        def call(w, *args):  # args: activations..., rope, cu_seqlens, max_seqlen, adapters, xsa
            for t in args[:-5]:
                torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(t, 1)
            for t in list(args[-5]) + [t for pair in (args[-2] or {}).values() for t in pair]:
                torch._dynamo.maybe_mark_dynamic(t, 0)
            return compiled(w, *args)  # a size of 1 would compile again: TTTRunner.least_slots
        return call

    return region(model.sequential_block), region(model.parallel_block)


class NestedBlocks(tuple):
    """(sequential, parallel) for COMPILE_REGIONS=2: each calls a copy of the block's function
    marked as a torch.compile nested region, so inside the one compiled model each kind of block
    is traced and compiled once and called at every layer (torch's invoke_subgraph), while the
    code between blocks (embedding, skips, lanes, head, loss) is fused with the rest. A copy, so
    that TTT's own compile of the same blocks is not affected by the mark."""

    def __new__(cls, model: GPT):
        def region(method):
            fn = method.__func__
            marked = torch.compiler.nested_compile_region(
                types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__))
            return lambda *args: marked(model, *args)
        return super().__new__(cls, (region(model.sequential_block), region(model.parallel_block)))


def training_model_fn(model: GPT, h: Hyperparameters, device):
    """The callable that training and evaluation run: the whole model through one torch.compile (a
    graph per train/eval mode and looping state); COMPILE_REGIONS=1, the model itself with its two
    kinds of block compiled (a graph per kind and mode, whatever the depth; embedding, skips, head
    and loss run eagerly); COMPILE_REGIONS=2, the whole model compiled with its blocks as nested
    regions (NestedBlocks). Eager on a CPU in every case."""
    if h.compile_regions == 1:
        model.regions = compile_blocks(model, lambda block: compile_for(device, block, dynamic=False, fullgraph=True))
        return model
    if h.compile_regions == 2:
        model.regions = NestedBlocks(model)
    return compile_for(device, model, dynamic=False, fullgraph=True)


def build_run_model(ctx: RunContext) -> None:
    h, log = ctx.h, ctx.log
    backend = pick_attention_backend(h.attn_backend)
    log(f"attention_backend:{backend} fused_mlp:{h.fused_mlp and ctx.device.type == 'cuda' and triton is not None}")
    ctx.model = build_model(h, ctx.device, backend)
    log(f"model_params:{sum(p.numel() for p in ctx.model.parameters())}")
    if isinstance(ctx.eval_only_state, dict):  # a checkpoint: its weights, checked tensor by tensor
        load_matching(h.eval_only_path, ctx.eval_only_state, ctx.model)
    elif ctx.eval_only_state is not None:  # an artifact: loaded here once to check it fits this model
        load_artifact(ctx.eval_only_state, ctx.model, h.eval_only_path)
    if ctx.device.type == "cuda":
        torch._dynamo.config.cache_size_limit = 16
    # One model object and one compiled callable for the whole run: training, evaluation (a
    # separate graph per train/eval mode and looping state) and the quantized model, whose
    # weights are loaded into the same tensors, so no graph is compiled twice.
    ctx.model_fn = training_model_fn(ctx.model, h, ctx.device)


def train_phase(ctx: RunContext) -> None:
    h, log, model = ctx.h, ctx.log, ctx.model
    trainer = Trainer(h, model, ctx.model_fn, ctx.device, log)
    warmup_s = trainer.warm_up()
    log(f"warmup_and_compile:{warmup_s:.1f}s")

    def validate(step):
        result = ctx.evaluate(f"step:{step}")
        model.train()
        return result["val_loss"], result["val_bpb"]

    stats = trainer.train(validate)
    ctx.summary.update(train=stats, warmup_seconds=warmup_s)
    live = f" live_val_bpb:{stats['final_val_bpb']:.5f}" if "final_val_bpb" in stats else ""
    log(f"train_done steps:{stats['steps']} train_time:{stats['train_ms'] / 1000:.1f}s "
        f"peak_memory:{stats.get('peak_memory_mib', 0)}MiB{live}")
    if h.ema_select:
        choice = ctx.summary["ema_select"] = trainer.finish_with_better_average()
        more = "".join(f", {name} loss {loss:.5f}" for name, loss in list(choice["losses"].items())[2:])
        log(f"ema_select on {h.ema_select} held-out training micro-batches: live loss {choice['live_loss']:.5f}, "
            f"EMA loss {choice['ema_loss']:.5f}{more}: kept the {choice['kept']} weights")
    else:
        trainer.ema.copy_to(model)
    ckpt_path = os.path.join(h.artifact_dir, "final_model.pt")
    if ctx.rank == 0:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        write_atomically(ckpt_path, buffer.getvalue())
        log(f"saved {ckpt_path} ({os.path.getsize(ckpt_path)} bytes)")
    if "interrupted" in stats:
        import signal
        signum, step = stats["interrupted"]["signal"], stats["interrupted"]["step"]
        message = (f"{signal.Signals(signum).name} stopped training at step {step}; the final weights are in "
                   f"{ckpt_path}: evaluate them with EVAL_ONLY_PATH={ckpt_path}")
        log(message)
        if ctx.rank == 0:
            write_run_files(h, ctx.summary)
        raise Interrupted(signum, message)


class ArtifactPlan(NamedTuple):
    """Which artifact a run evaluates, and where it comes from:
    "quantize"       the float weights in memory (trained, or EVAL_ONLY_PATH's checkpoint) are
                     quantized into ptz_path, inside ARTIFACT_DIR;
    "reuse"          EVAL_ONLY_PATH is a checkpoint and the artifact beside it (ptz_path) fits;
    "artifact_only"  EVAL_ONLY_PATH is the artifact itself: there are no float weights to score."""
    mode: str
    ptz_path: str


def plan_artifact(h: Hyperparameters, source: str, log) -> ArtifactPlan:
    """An existing artifact is used only if it fits the limit together with this file's code;
    one beside a checkpoint that does not is replaced by quantizing again, a given one is refused."""
    fresh = ArtifactPlan("quantize", os.path.join(h.artifact_dir, "final_model.int6.ptz"))
    if not h.eval_only_path:
        return fresh
    given = h.eval_only_path.endswith(".ptz")
    path = h.eval_only_path if given else os.path.join(os.path.dirname(os.path.abspath(h.eval_only_path)),
                                                        "final_model.int6.ptz")
    if not os.path.isfile(path):
        return fresh
    total = os.path.getsize(path) + len(minified_code_stub(source).encode("utf-8"))
    if total <= h.artifact_limit_bytes:
        log(f"using the existing artifact {path} ({total:,} bytes with the code)")
        return ArtifactPlan("artifact_only" if given else "reuse", path)
    if given:
        check_artifact_size(total, h.artifact_limit_bytes, f"{path} with this file's code",
                            fix="evaluate its final_model.pt with ARTIFACT_AUTOFIT=1 instead")
    log(f"the artifact beside the checkpoint, {path}, is {total:,} bytes with the code: quantizing again")
    return fresh


def build_artifact(ctx: RunContext, ptz_path: str) -> None:
    """write_artifact on every rank (they share the Hessian work); all ranks refuse together when
    rank 0 finds the artifact over the limit, after summary.json records what was built."""
    h = ctx.h
    info = ctx.summary["artifact"] = write_artifact(h, ctx.model, ctx.source, ptz_path, ctx.device, ctx.log,
                                                    ctx.evaluate)
    if any_rank(info["total_bytes"] > h.artifact_limit_bytes, ctx.device):
        if ctx.rank == 0:
            write_run_files(h, ctx.summary)
            check_artifact_size(info["total_bytes"], h.artifact_limit_bytes, info["report"])
        raise ArtifactTooLarge("the artifact is over ARTIFACT_LIMIT_BYTES: see rank 0's log")


def evaluate_artifact(ctx: RunContext, plan: ArtifactPlan) -> None:
    h, summary = ctx.h, ctx.summary
    with open(plan.ptz_path, "rb") as f:
        load_artifact(f.read(), ctx.model, plan.ptz_path)
    summary["quantized"] = ctx.evaluate("quantized")
    if h.sliding_window_enabled:
        summary["sliding"] = timed_score(ctx.log, "sliding_window", lambda: eval_val_sliding(
            ctx.model_fn, ctx.val_tokens, h, ctx.luts, ctx.device, ctx.log))
    if h.ttt_enabled:
        summary["ttt"] = evaluate_ttt(ctx)


def evaluate_ttt(ctx: RunContext, h: Hyperparameters | None = None, baseline: bool = True) -> dict:
    """TTT on the quantized model as it is, with ctx.h's TTT settings or h's (tools/ttt_sweep.py):
    compiled blocks (TTT_COMPILE) replayed as CUDA graphs (TTT_CUDA_GRAPHS). On a document sample
    (VAL_DOC_FRACTION < 1) and with baseline, the same windows are also scored without adaptation."""
    h, log, model = h or ctx.h, ctx.log, ctx.model
    trained_with, training_regions = model.attn_backend, model.regions
    if trained_with == "fa4" and h.ttt_cuda_graphs and ctx.device.type == "cuda" and _has_varlen_attn():
        # FA4 replayed inside a CUDA graph ran at half speed on TTT's widest step (n=64, 2048 tokens:
        # 1,081 ms against 486 ms with varlen_attn, graphed or not), and eagerly it gained nothing there
        model.attn_backend = "varlen"
        log("ttt attention_backend:varlen (FA4 is slower in TTT's CUDA graphs)")
    try:
        model_fn = ttt_model_fn(model, h)
        try:
            warmup_s = warm_up_ttt(model_fn, model, h, ctx.luts, ctx.device)
        except Exception as e:  # compiled blocks that fail to compile, fail at run time or score wrongly
            if model.regions is None:
                raise
            log(f"WARNING: TTT's compiled blocks failed in the warmup ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:240]}); TTT runs them eagerly, as with TTT_COMPILE=0")
            model.regions = None
            warmup_s = warm_up_ttt(model_fn, model, h, ctx.luts, ctx.device)
        log(f"ttt_warmup:{warmup_s:.1f}s (synthetic tokens{', compiling' if model.regions else ''})")
        result = timed_score(log, "ttt", lambda: eval_val_ttt(model_fn, model, ctx.val_tokens, h, ctx.luts,
                                                              ctx.device, log))
        result.update(warmup_seconds=warmup_s, doc_fraction=h.val_doc_fraction)
        if h.val_doc_fraction < 1 and baseline:  # the quantized score of the same sample, to measure the gain on it
            base_loss, base_bpb = eval_val_ttt(model_fn, model, ctx.val_tokens, h, ctx.luts, ctx.device, log,
                                               adapt=False)
            result.update(sample_val_loss_without_ttt=base_loss, sample_val_bpb_without_ttt=base_bpb)
            log(f"ttt sample without adaptation val_loss:{base_loss:.5f} val_bpb:{base_bpb:.5f} "
                f"(TTT gain {result['val_bpb'] - base_bpb:+.5f} bpb)")
    finally:
        model.attn_backend, model.regions = trained_with, training_regions
    total_s = warmup_s + result["eval_seconds"]
    log(f"ttt_time warmup:{warmup_s:.1f}s ttt:{result['eval_seconds']:.1f}s total:{total_s:.1f}s "
        f"(the challenge's evaluation budget: 600s)")
    if total_s > 600:
        log(f"WARNING: TTT warmup + evaluation took {total_s:.0f}s, over the challenge's 600s evaluation budget")
    return result


def ttt_model_fn(model: GPT, h: Hyperparameters, backend=None):
    """The forward TTT calls: the model itself; with TTT_COMPILE=1 its two kinds of block (sequential
    and parallel) each go through torch.compile once and serve every layer, taking the layer's
    weights and adapters as arguments (regional compilation), with the slot count and the window
    marked dynamic. Compiling the whole 17-layer model with dynamic shapes instead had not finished
    its warmup after 6 minutes on an H200. Only on CUDA unless a backend is given (Inductor on a CPU
    compiles C++ for minutes). model.regions = None undoes it."""
    if not h.ttt_compile or (backend is None and model.tok_emb.weight.device.type != "cuda"):
        model.regions = None
        return model
    backend = backend or "inductor"
    model.regions = compile_blocks(model, lambda block: torch.compile(block, backend=backend), dynamic_rows=True)
    return model


def final_score(summary: dict) -> dict:
    """The submitted score, decided here only: TTT if it ran, else the sliding window, else the
    standard evaluation of the quantized artifact."""
    return next(summary[name] for name in ("ttt", "sliding", "quantized") if name in summary)


def run(h: Hyperparameters) -> dict:
    ctx = start_run(h)
    if not h.eval_only_path:
        train_phase(ctx)
    ctx.model.looping = h.num_loops > 0  # the model is evaluated and quantized as it ends training
    plan = ctx.plan
    if plan.mode != "artifact_only":
        kept = ctx.summary.get("ema_select", {}).get("kept", "ema")
        weights = "saved" if h.eval_only_path else kept.replace("ema", "EMA")  # live, EMA, EMA30, ...
        ctx.summary["prequant"] = ctx.evaluate(f"prequant ({weights} weights)")
    if plan.mode == "quantize":
        build_artifact(ctx, plan.ptz_path)
    evaluate_artifact(ctx, plan)
    final = ctx.summary["final"] = final_score(ctx.summary)
    if ctx.rank == 0:
        write_run_files(h, ctx.summary)
    ctx.log(f"final val_loss:{final['val_loss']:.5f} val_bpb:{final['val_bpb']:.5f}")
    return ctx.summary


def write_run_files(h: Hyperparameters, summary: dict) -> None:
    """summary.json (everything measured) and submission.json (the challenge's record format)."""
    with open(os.path.join(h.artifact_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    if "final" not in summary:  # a refused artifact: no score to submit
        return
    artifact = summary.get("artifact", {})
    submission = {"name": h.submission_name or h.run_id, "author": h.submission_author,
                  "github_id": h.submission_github_id, "val_bpb": summary["final"]["val_bpb"],
                  "val_loss": summary["final"]["val_loss"], "bytes_total": artifact.get("total_bytes"),
                  "bytes_code": artifact.get("code_bytes"), "date": datetime.date.today().isoformat()}
    with open(os.path.join(h.artifact_dir, "submission.json"), "w") as f:
        json.dump(submission, f, indent=2)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 bad input (one line naming the file or variable); 3 artifact over the
    size limit (written, then refused); 128 + signal when SIGINT / SIGTERM stopped training
    (checkpoint saved); 1 a bug (traceback)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        print(help_text())
        return 0
    code = 0
    try:
        if argv:
            raise ConfigError(f"train_gpt.py takes no arguments (got {' '.join(argv)}): it is configured by "
                              f"environment variables; --help lists them")
        run(Hyperparameters())
    except (ConfigError, ShardError, ArtifactTooLarge) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 3 if isinstance(e, ArtifactTooLarge) else 2
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        code = 128 + e.signum
    except KeyboardInterrupt:
        print("stopped: interrupted (SIGINT) outside the training loop; nothing was saved by this step",
              file=sys.stderr, flush=True)
        code = 130
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    if dist.is_initialized():
        if code == 0:
            dist.destroy_process_group()
        else:  # a failed rank must not leave the others waiting in a collective: torchrun stops them
            os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())

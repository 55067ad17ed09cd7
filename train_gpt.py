"""Parameter Golf training script: the best language model that fits 16,000,000 bytes.

One file, launched by torchrun and configured only by environment variables:

    torchrun --standalone --nproc_per_node=8 train_gpt.py

It trains a GPT on document-packed FineWeb rows within a wall-clock budget, quantizes it with GPTQ
(int6 matrices, int8 embedding), compresses it, checks the artifact against the size limit, and
scores it in bits per byte: standard, sliding-window and per-document LoRA test-time training.

The behaviour follows the Parameter Golf record "VarLen attention + fused MLP + doc-independent TTT"
(PR #1530 by samacqua, val_bpb 1.07336), rewritten section by section in pipeline order:
hyperparameters -> data -> tokenizer/bpb -> model -> kernels -> optimizers -> quantization and
artifact -> evaluation -> TTT -> training loop -> main.
"""
from __future__ import annotations

import base64
import concurrent.futures
import copy
import datetime
import glob
import io
import json
import lzma
import math
import os
import platform
import random
import subprocess
import sys
import time
import uuid

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
#                                        HYPERPARAMETERS
# =============================================================================================
# Every knob is an environment variable, read once here and nowhere else, so a log's header
# (which prints them all) reproduces a run. Names and defaults follow the record; the variables
# it read but never used (ROPE_TRAIN_SEQ_LEN, MUON_BETA2, EMBED_LR, HEAD_LR, and the untied-head
# and embedding-projection switches they belonged to) are gone.


class ConfigError(Exception):
    """A problem with the run's inputs; main() prints it as one line and exits non-zero."""


BOS_ID = 1  # every document starts with BOS; there is no EOS


class Hyperparameters:
    def __init__(self, env: dict | None = None):
        env = os.environ if env is None else env

        def get(name, default):
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                return type(default)(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a valid {type(default).__name__}") from None

        # data, run identity and outputs
        self.data_dir = get("DATA_DIR", "./data/")
        self.seed = get("SEED", 1337)
        self.run_id = get("RUN_ID", "") or uuid.uuid4().hex[:12]
        self.artifact_dir = get("ARTIFACT_DIR", "") or os.path.join("runs", self.run_id)
        self.eval_only_path = get("EVAL_ONLY_PATH", "")  # a final_model.pt or final_model.int6.ptz
        # schedule (time-based: the budget, not the step count, ends training)
        self.iterations = get("ITERATIONS", 20000)
        self.warmdown_frac = get("WARMDOWN_FRAC", 0.72)
        self.warmup_steps = get("WARMUP_STEPS", 20)  # compile-warmup steps, rolled back afterwards
        self.train_batch_tokens = get("TRAIN_BATCH_TOKENS", 786432)
        self.train_seq_len = get("TRAIN_SEQ_LEN", 2048)  # longest document segment in a packed row
        self.train_log_every = get("TRAIN_LOG_EVERY", 500)
        self.max_wallclock_seconds = get("MAX_WALLCLOCK_SECONDS", 600.0)  # 0: no cap
        self.val_batch_tokens = get("VAL_BATCH_TOKENS", 524288)
        self.eval_seq_len = get("EVAL_SEQ_LEN", 2048)
        self.val_loss_every = get("VAL_LOSS_EVERY", 4000)
        self.sliding_window_enabled = bool(get("SLIDING_WINDOW_ENABLED", 0))
        self.eval_stride = get("EVAL_STRIDE", 64)
        # model
        self.vocab_size = get("VOCAB_SIZE", 8192)
        self.num_layers = get("NUM_LAYERS", 11)
        self.xsa_last_n = get("XSA_LAST_N", 11)
        self.model_dim = get("MODEL_DIM", 512)
        self.num_kv_heads = get("NUM_KV_HEADS", 4)
        self.num_heads = get("NUM_HEADS", 8)
        self.mlp_mult = get("MLP_MULT", 4.0)
        self.skip_gates_enabled = bool(get("SKIP_GATES_ENABLED", 1))
        self.logit_softcap = get("LOGIT_SOFTCAP", 30.0)
        self.rope_base = get("ROPE_BASE", 10000.0)
        self.rope_dims = get("ROPE_DIMS", 16)
        self.ln_scale = bool(get("LN_SCALE", 1))
        self.qk_gain_init = get("QK_GAIN_INIT", 5.0)
        self.num_loops = get("NUM_LOOPS", 2)
        self.loop_start = get("LOOP_START", 3)
        self.loop_end = get("LOOP_END", 5)
        self.enable_looping_at = get("ENABLE_LOOPING_AT", 0.35)
        self.parallel_start_layer = get("PARALLEL_START_LAYER", 8)
        self.parallel_final_lane = get("PARALLEL_FINAL_LANE", "mean")
        self.tied_embed_init_std = get("TIED_EMBED_INIT_STD", 0.005)
        self.attn_backend = get("ATTN_BACKEND", "")  # fa3 | varlen | sdpa; empty: best available
        self.fused_mlp = bool(get("FUSED_MLP", 1))
        # optimizers
        self.min_lr = get("MIN_LR", 0.0)
        self.tied_embed_lr = get("TIED_EMBED_LR", 0.03)
        self.matrix_lr = get("MATRIX_LR", 0.022)
        self.scalar_lr = get("SCALAR_LR", 0.02)
        self.muon_momentum = get("MUON_MOMENTUM", 0.97)
        self.muon_backend_steps = get("MUON_BACKEND_STEPS", 5)
        self.muon_momentum_warmup_start = get("MUON_MOMENTUM_WARMUP_START", 0.92)
        self.muon_momentum_warmup_steps = get("MUON_MOMENTUM_WARMUP_STEPS", 1500)
        self.muon_row_normalize = bool(get("MUON_ROW_NORMALIZE", 1))
        self.beta1 = get("BETA1", 0.9)
        self.beta2 = get("BETA2", 0.95)
        self.adam_eps = get("ADAM_EPS", 1e-8)
        self.grad_clip_norm = get("GRAD_CLIP_NORM", 0.3)  # 0 disables
        self.adam_wd = get("ADAM_WD", 0.02)
        self.muon_wd = get("MUON_WD", 0.095)
        self.embed_wd = get("EMBED_WD", 0.085)
        self.ema_decay = get("EMA_DECAY", 0.9965)
        # test-time training
        self.ttt_enabled = bool(get("TTT_ENABLED", 1))
        self.ttt_lora_rank = get("TTT_LORA_RANK", 96)
        self.ttt_lora_lr = get("TTT_LORA_LR", 1e-4)
        self.ttt_chunk_size = get("TTT_CHUNK_SIZE", 32)
        self.ttt_eval_seq_len = get("TTT_EVAL_SEQ_LEN", 2048)
        self.ttt_batch_size = get("TTT_BATCH_SIZE", 64)
        self.ttt_grad_steps = get("TTT_GRAD_STEPS", 1)
        self.ttt_weight_decay = get("TTT_WEIGHT_DECAY", 0.5)
        self.ttt_beta1 = get("TTT_BETA1", 0.0)
        self.ttt_beta2 = get("TTT_BETA2", 0.999)
        self.ttt_k_lora = bool(get("TTT_K_LORA", 1))
        self.ttt_mlp_lora = bool(get("TTT_MLP_LORA", 1))
        self.ttt_o_lora = bool(get("TTT_O_LORA", 1))
        self.ttt_optimizer = get("TTT_OPTIMIZER", "adam")
        self.val_doc_fraction = get("VAL_DOC_FRACTION", 1.0)
        # quantization and artifact
        self.compressor = get("COMPRESSOR", "brotli")
        self.gptq_calibration_batches = get("GPTQ_CALIBRATION_BATCHES", 64)
        self.gptq_reserve_seconds = get("GPTQ_RESERVE_SECONDS", 13.0)
        self.matrix_bits = get("MATRIX_BITS", 6)
        self.embed_bits = get("EMBED_BITS", 8)
        self.matrix_clip_sigmas = get("MATRIX_CLIP_SIGMAS", 12.85)
        self.embed_clip_sigmas = get("EMBED_CLIP_SIGMAS", 20.0)
        self.artifact_limit_bytes = get("ARTIFACT_LIMIT_BYTES", 16_000_000)
        self.artifact_autofit = bool(get("ARTIFACT_AUTOFIT", 0))
        # submission.json metadata
        self.submission_name = get("SUBMISSION_NAME", "")
        self.submission_author = get("SUBMISSION_AUTHOR", "")
        self.submission_github_id = get("SUBMISSION_GITHUB_ID", "")
        # distributed layout, from torchrun
        self.distributed = "RANK" in env and "WORLD_SIZE" in env
        self.rank = int(env.get("RANK", 0))
        self.world_size = int(env.get("WORLD_SIZE", 1))
        self.local_rank = int(env.get("LOCAL_RANK", 0))
        if self.world_size < 1 or 8 % self.world_size:
            raise ConfigError(f"WORLD_SIZE={self.world_size} must divide 8 (use 1, 2, 4 or 8 processes)")
        self.grad_accum_steps = 8 // self.world_size
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

    def check(self):
        """Arithmetic that must hold before anything is built; paths are checked by check_data()."""
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
        for name, value, allowed in (("PARALLEL_FINAL_LANE", self.parallel_final_lane, ("mean", "mlp", "attn")),
                                     ("ATTN_BACKEND", self.attn_backend, ("", "fa3", "varlen", "sdpa")),
                                     ("TTT_OPTIMIZER", self.ttt_optimizer, ("adam", "sgd")),
                                     ("COMPRESSOR", self.compressor, ("brotli", "lzma"))):
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} must be one of {', '.join(repr(a) for a in allowed)}")
        if not 0 < self.val_doc_fraction <= 1:
            raise ConfigError(f"VAL_DOC_FRACTION={self.val_doc_fraction} must be in (0, 1]")
        if self.val_batch_tokens % (self.world_size * self.eval_seq_len):
            raise ConfigError(f"VAL_BATCH_TOKENS={self.val_batch_tokens} must be a multiple of WORLD_SIZE x "
                              f"EVAL_SEQ_LEN = {self.world_size * self.eval_seq_len}")

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items()}


def check_data(h: Hyperparameters, need_train: bool = True) -> None:
    """Fail early, in one line, when the data or tokenizer is missing or does not match VOCAB_SIZE."""
    fetch = (f"download it with `python3 data/cached_challenge_fineweb.py --variant sp{h.vocab_size}` "
             f"or build it with `python3 data/tokenize_docs.py`")
    if not os.path.isdir(h.dataset_dir):
        raise ConfigError(f"data folder {h.dataset_dir} (DATA_DIR={h.data_dir}, VOCAB_SIZE={h.vocab_size}) "
                          f"does not exist: {fetch}")
    patterns = [h.val_files] + ([h.train_files] if need_train else [])
    for pattern in patterns:
        if not glob.glob(pattern):
            raise ConfigError(f"no shards match {pattern}: {fetch}")
    if not os.path.isfile(h.tokenizer_path):
        raise ConfigError(f"tokenizer {h.tokenizer_path} does not exist: {fetch}")
    import sentencepiece as spm
    size = spm.SentencePieceProcessor(model_file=h.tokenizer_path).vocab_size()
    if size != h.vocab_size:
        raise ConfigError(f"tokenizer {h.tokenizer_path} has {size} pieces but VOCAB_SIZE={h.vocab_size}: "
                          f"set VOCAB_SIZE={size} or use the matching tokenizer")


# ---------------------------------------------------------------------------------------------
# Logging: rank 0 prints and appends to ARTIFACT_DIR/train.log; other ranks stay quiet.
# ---------------------------------------------------------------------------------------------


class Logger:
    def __init__(self, path: str | None, enabled: bool = True):
        self.path = path if enabled else None
        self.enabled = enabled
        if self.path:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)

    def __call__(self, msg: str = "", console: bool = True) -> None:
        if not self.enabled:
            return
        if console:
            print(msg, flush=True)
        if self.path:
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


class DocumentPackingLoader:
    """Sequential packed rows for training (spec §5.2).

    Each step takes one global span of world x (n + 1) contiguous tokens from the current shard,
    starting at a BOS; rank r reads the r-th slice of n + 1 tokens: inputs are its first n tokens,
    targets the same slice shifted by one. A span that would overrun the shard drops the shard's
    tail and the next shard starts at its first BOS; after the last shard the loader wraps around.
    The next shard is read and the next batch prepared in background threads.
    """

    def __init__(self, pattern: str, local_tokens: int, max_doc_len: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        self.paths = shard_paths(pattern)
        self.n, self.max_doc_len, self.rank, self.world = local_tokens, max_doc_len, rank, world_size
        self.device = torch.device(device)
        self.span = world_size * (local_tokens + 1)
        self._shard_pool = concurrent.futures.ThreadPoolExecutor(1)
        self._batch_pool = concurrent.futures.ThreadPoolExecutor(1)
        self.shard_index = -1
        self._next_shard = self._shard_pool.submit(self._load_shard, 0)
        self._advance_shard()
        self._next_batch = self._batch_pool.submit(self._prepare)

    def _load_shard(self, index: int):
        tokens = np.array(read_shard(self.paths[index]))  # read fully into memory, off the main thread
        bos = np.flatnonzero(tokens == BOS_ID)
        if bos.size == 0:
            raise ShardError(f"{self.paths[index]}: no BOS token ({BOS_ID}); documents cannot be found")
        if len(tokens) - bos[0] < self.span:
            raise ConfigError(f"{self.paths[index]}: {len(tokens)} tokens cannot fill one global batch of "
                              f"{self.span}; lower TRAIN_BATCH_TOKENS or use larger shards")
        return tokens, int(bos[0])

    def _advance_shard(self):
        self.shard_index = (self.shard_index + 1) % len(self.paths)
        self.tokens, self.cursor = self._next_shard.result()
        self._next_shard = self._shard_pool.submit(self._load_shard, (self.shard_index + 1) % len(self.paths))

    def _prepare(self):
        if self.cursor + self.span > len(self.tokens):
            self._advance_shard()
        start = self.cursor + self.rank * (self.n + 1)
        chunk = torch.from_numpy(self.tokens[start:start + self.n + 1].astype(np.int64))
        self.cursor += self.span
        cu, max_len = build_cu_seqlens(chunk[:-1].numpy(), self.max_doc_len)
        batch = [chunk[:-1], chunk[1:], torch.from_numpy(cu)]
        if self.device.type == "cuda":
            batch = [t.pin_memory() for t in batch]
        return batch, max_len

    def next_batch(self) -> tuple[Tensor, Tensor, Tensor, int]:
        """(inputs [n], targets [n], cu_seqlens int32, longest segment), on the loader's device."""
        (x, y, cu), max_len = self._next_batch.result()
        self._next_batch = self._batch_pool.submit(self._prepare)
        dev = self.device
        return x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), cu.to(dev, non_blocking=True), max_len

    def close(self):
        for pool in (self._batch_pool, self._shard_pool):
            pool.shutdown(wait=True, cancel_futures=True)


class ShuffledSequenceLoader:
    """Random fixed-length windows from the training shards, for GPTQ calibration (spec §5.3).

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


# =============================================================================================
#                                    TOKENIZER AND BITS PER BYTE
# =============================================================================================
# The score is bits per byte of the original text, so that models with different tokenizers can
# be compared. Each target token is charged the UTF-8 bytes of its piece: byte-fallback pieces
# one byte, control/unknown/unused pieces none, and a piece's leading "▁" one space byte unless
# the previous token is a boundary (BOS), because the decoder drops a document's leading space.
# Sums of nats and bytes are kept in float64 and summed over ranks before the division.


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

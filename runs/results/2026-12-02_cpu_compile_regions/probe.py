"""Cold compile + first training step of the DEFAULT model (11 layers, looping on) on a CPU, whole
model (COMPILE_REGIONS=0) against blocks as nested regions (COMPILE_REGIONS=2), each in a fresh
process with empty Inductor caches. The GPU's compile differs (Triton instead of C++), so only the
ratio says anything. The embedding is bf16 as on the GPU, so the blocks see bf16 activations and
bf16 copies of their weights. Usage: python3 probe.py 0|2 [TOKENS]"""
import os
import sys
import tempfile
import time

mode, tokens = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 512
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="probe_inductor_")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import train_gpt as tg  # noqa: E402

h = tg.Hyperparameters(env={"COMPILE_REGIONS": str(mode)})
torch.manual_seed(0)
model = tg.build_model(h, torch.device("cpu"))
model.tok_emb.to(torch.bfloat16)  # the GPU's dtypes: bf16 embedding, so bf16 activations and weight copies
model.looping = True
if mode == 2:
    model.regions = tg.NestedBlocks(model)
fn = torch.compile(model, dynamic=False, fullgraph=True)
rng = np.random.default_rng(0)
ids = torch.from_numpy(rng.integers(2, h.vocab_size, tokens + 1))
ids[0] = tg.BOS_ID
cu = torch.from_numpy(tg.build_cu_seqlens(ids[:-1].numpy(), 256)[0])
t0 = time.perf_counter()
fn(ids[:-1], ids[1:], cu, 256).mean().backward()
first = time.perf_counter() - t0
t0 = time.perf_counter()
fn(ids[:-1], ids[1:], cu, 256).mean().backward()
second = time.perf_counter() - t0
print(f"COMPILE_REGIONS={mode} tokens={tokens}: compile + first step {first:.1f} s, second step {second:.2f} s",
      flush=True)

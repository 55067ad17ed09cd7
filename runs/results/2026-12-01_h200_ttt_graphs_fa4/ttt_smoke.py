"""GPU smoke of the graphed TTT step: warm_up_ttt (with its graph-vs-eager check), then one synthetic
batch eagerly and graphed (twice: capture, then replay only), default model with random weights."""
import sys, time, torch
sys.path.insert(0, ".")
import train_gpt as tg
h = tg.Hyperparameters(env={"RUN_ID": "smoke", "DATA_DIR": "/nonexistent", "ATTN_BACKEND": sys.argv[1] if len(sys.argv) > 1 else "varlen"})
device = tg.setup_distributed(h)
torch.manual_seed(0)
model = tg.build_model(h, device, tg.pick_attention_backend(h.attn_backend))
with torch.no_grad():
    model.qo_bank[model.num_layers:].normal_(0, 0.02); model.mlp_down_bank.normal_(0, 0.02)
model.eval(); model.looping = True
g = torch.Generator().manual_seed(0)
V = h.vocab_size
luts = (torch.randint(1, 9, (V,), generator=g, dtype=torch.int16).to(device), (torch.rand(V, generator=g) < 0.5).to(device),
        torch.zeros(V, dtype=torch.bool).to(device))
t = time.perf_counter(); w = tg.warm_up_ttt(model, model, h, luts, device); print(f"warm_up_ttt {w:.1f}s", flush=True)
lengths = [3000, 2600, 2100, 1500, 900, 400, 200, 60]
tokens = torch.randint(2, V, (sum(lengths) + 1,), generator=g); s = 0; docs = []
for L in lengths:
    tokens[s] = tg.BOS_ID; docs.append((s, L + 1)); s += L
tokens = tokens.to(device)
with tg.frozen(model):
    for name, graphs in (("eager", False), ("graphs", True)):
        runner = tg.TTTRunner(model, h, device, graphs)
        for rep in range(2 if graphs else 1):
            torch.cuda.synchronize(); t = time.perf_counter()
            r = tg.ttt_batch(model, model, tokens, docs, h, luts, runner=runner)
            torch.cuda.synchronize(); dt = time.perf_counter() - t
            chunks = -(-(lengths[0]) // 32)
            print(f"{name} rep{rep}: {dt:.2f}s {1000 * dt / chunks:.1f} ms/chunk nats {r[0]:.6f} bytes {r[1]} count {r[2]} "
                  f"graphs {len(runner.graphs)} peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)

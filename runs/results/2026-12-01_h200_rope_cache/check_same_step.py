"""Same-math check of two train_gpt.py files: identical weights, the same real batch, one
forward/backward and one optimizer step (Trainer.step) through each file's code; prints loss,
gradient and update differences, with a noise floor from running the base file twice.

    python3 .carry/snap2/check_same_step.py --base .carry/base/train_gpt.py \
        --new .carry/snap2/train_gpt.py --data-dir /root/data [--tiny]

On CUDA the model is compiled as train_gpt.run() does (dynamic=False, fullgraph=True) under bf16
autocast; without CUDA it runs eagerly in fp32 (--tiny: a small model; data optional there).
"""
import argparse
import importlib.util
import os
import sys
import time

import numpy as np
import torch
import torch._inductor.config


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def diff(a: dict, b: dict) -> tuple[float, float, str]:
    """max abs difference, worst relative L2 difference over tensors (and its name)."""
    mx, worst, wname = 0.0, 0.0, ""
    for k in a:
        d = (a[k].double() - b[k].double())
        mx = max(mx, d.abs().max().item())
        rel = (d.norm() / a[k].double().norm().clamp_min(1e-30)).item()
        if rel > worst:
            worst, wname = rel, k
    return mx, worst, wname


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--new", required=True)
    p.add_argument("--data-dir", default="/root/data")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    tg0, tg1 = load(args.base, "tg_base"), load(args.new, "tg_new")
    cuda = torch.cuda.is_available()
    env = {"DATA_DIR": args.data_dir, "RUN_ID": "check_same_step"}
    if args.tiny:
        env.update({"NUM_LAYERS": "5", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                    "LOOP_START": "1", "LOOP_END": "2", "PARALLEL_START_LAYER": "3", "XSA_LAST_N": "2",
                    "TRAIN_BATCH_TOKENS": "2048", "TRAIN_SEQ_LEN": "128"})
    h0, h1 = tg0.Hyperparameters(env=env), tg1.Hyperparameters(env=env)
    device = tg0.setup_distributed(h0)
    backend = tg0.pick_attention_backend(h0.attn_backend)
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}, "
          f"attention {backend}, grad_accum {h0.grad_accum_steps}, local tokens {h0.local_batch_tokens}")

    # RoPE tables: the old in-graph (compiled) values against the new cached eager ones
    T = h0.local_batch_tokens
    if cuda:
        old = torch.compile(tg0.rotary_tables, fullgraph=True, dynamic=False)(T, h0.rope_dims, h0.rope_base, device)
    else:
        old = tg0.rotary_tables(T, h0.rope_dims, h0.rope_base, device)
    new = tg1.rotary_tables(T, h1.rope_dims, h1.rope_base, device)
    for name, a, b in (("cos", old[0], new[0]), ("sin", old[1], new[1])):
        d = (a - b).abs()
        nb = (a.bfloat16() != b.bfloat16()).sum().item()
        print(f"rope {name} [{T}, {a.size(1)}]: old {'compiled' if cuda else 'eager'} vs new cached: max abs fp32 "
              f"{d.max().item():.3e}, bf16 values differing {nb} of {a.numel()}; eager old vs new equal: "
              f"{torch.equal(tg0.rotary_tables(T, h0.rope_dims, h0.rope_base, device)[0 if name == 'cos' else 1], b)}")

    torch.manual_seed(h0.seed)
    m0 = tg0.build_model(h0, device, backend)
    m1 = tg1.build_model(h1, device, backend)
    m1.load_state_dict(m0.state_dict())
    init = {k: v.detach().clone() for k, v in m0.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    if os.path.isdir(os.path.join(args.data_dir, "datasets")):
        loader = tg0.DocumentPackingLoader(h0.train_files, h0.local_batch_tokens, h0.train_seq_len, 0, 1, device)
        batches = [loader.next_batch() for _ in range(h0.grad_accum_steps)]
        loader.close()
    else:  # CPU without data: random tokens, a few documents per row
        batches = []
        for _ in range(h0.grad_accum_steps):
            toks = torch.randint(0, h0.vocab_size, (h0.local_batch_tokens + 1,), generator=g)
            cu = torch.tensor([0, 300, 700, 1500, h0.local_batch_tokens], dtype=torch.int32)
            batches.append((toks[:-1].to(device), toks[1:].to(device), cu.to(device), 800))
    if cuda:
        torch._dynamo.config.cache_size_limit = 16

    def fwd_bwd(tg, model, fn, h):
        x, y, cu, _ = batches[0]
        model.zero_grad(set_to_none=True)
        tg.mark_cu_dynamic(cu)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = fn(x, y, cu, h.train_seq_len).mean()
        loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return loss.item(), grads

    def opt_step(tg, model, fn, h):
        model.load_state_dict(init)
        trainer = tg.Trainer(h, model, fn, device, print)
        try:
            before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
            loss = trainer.step(0, 0.0, batches)
            upd = {n: p.detach().float() - before[n] for n, p in model.named_parameters()}
        finally:
            trainer.loader.close()
        model.load_state_dict(init)
        return loss, upd

    results = {}
    for tag, tg, model, h in (("base", tg0, m0, h0), ("new", tg1, m1, h1)):
        fn = tg.compile_for(device, model, dynamic=False, fullgraph=True)  # as run(): the new file turns mix-order reduction off here
        t0 = time.perf_counter()
        l1, g1 = fwd_bwd(tg, model, fn, h)
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        l2, g2 = fwd_bwd(tg, model, fn, h)
        s1, u1 = opt_step(tg, model, fn, h)
        s2, u2 = opt_step(tg, model, fn, h) if tag == "base" else (None, None)
        results[tag] = dict(loss=l1, loss_again=l2, grads=g1, grads_again=g2, step_loss=s1, upd=u1, step_loss2=s2, upd2=u2)
        mix = torch._inductor.config.triton.mix_order_reduction if cuda else None
        print(f"[{tag}] first fwd/bwd (compile) {t1 - t0:.1f} s; loss {l1:.6f}, again {l2:.6f}; "
              f"optimizer-step mean loss {s1:.6f}; inductor mix_order_reduction {mix}")
        if cuda:
            print(f"[{tag}] peak memory {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")

    b, n = results["base"], results["new"]
    print("=== comparison (max abs, worst relative L2 over tensors) ===")
    print(f"loss: base {b['loss']:.7f} new {n['loss']:.7f} |diff| {abs(b['loss'] - n['loss']):.3e}; "
          f"base vs base-again {abs(b['loss'] - b['loss_again']):.3e}")
    print(f"step mean loss: base {b['step_loss']:.7f} new {n['step_loss']:.7f} |diff| "
          f"{abs(b['step_loss'] - n['step_loss']):.3e}; base twice {abs(b['step_loss'] - b['step_loss2']):.3e}")
    for what, x, y in (("grads base vs new", b["grads"], n["grads"]),
                       ("grads base vs base again (noise floor)", b["grads"], b["grads_again"]),
                       ("updates base vs new", b["upd"], n["upd"]),
                       ("updates base vs base again (noise floor)", b["upd"], b["upd2"])):
        mx, rel, name = diff(x, y)
        print(f"{what}: max abs {mx:.3e}, worst rel L2 {rel:.3e} ({name})")
    ref = max(v.abs().max().item() for v in b["upd"].values())
    print(f"largest update element (scale): {ref:.3e}")


if __name__ == "__main__":
    main()

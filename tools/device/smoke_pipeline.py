"""GPU smoke test of the whole pipeline on a small dataset (see tools/device/README.md)."""
import os, sys, time, torch
sys.path.insert(0, os.getcwd())  # run from the repo root
import train_gpt as tg
env = dict(os.environ, DATA_DIR=".carry/tiny", VOCAB_SIZE="1024", ITERATIONS="12", WARMUP_STEPS="4", MAX_WALLCLOCK_SECONDS="0",
           TRAIN_LOG_EVERY="4", VAL_LOSS_EVERY="0", VAL_DOC_FRACTION="0.3", TTT_BATCH_SIZE="8", ENABLE_LOOPING_AT="0.5", GPTQ_CALIBRATION_BATCHES="8")
h = tg.Hyperparameters(env=env)
tg.check_data(h)
dev = torch.device("cuda")
log = tg.Logger(None)
import sentencepiece as spm
luts = tg.build_byte_luts(spm.SentencePieceProcessor(model_file=h.tokenizer_path), h.vocab_size, dev)
val = tg.load_validation_tokens(h.val_files, h.eval_seq_len)
model = tg.build_model(h, dev, tg.pick_attention_backend())
print("backend", model.attn_backend, "varlen gqa kwargs", tg._VARLEN_GQA)
fn = torch.compile(model, dynamic=False, fullgraph=True)
tr = tg.Trainer(h, model, fn, dev, log)
tr.opt.muon.orthogonalize = torch.compile(tg.newton_schulz5)
def validate(step):
    model.eval()
    try: return tg.eval_val(fn, val, h, luts, dev)
    finally: model.train()
t = time.time(); print("warmup", tr.warm_up(), flush=True)
stats = tr.train(validate); print(stats, time.time() - t, flush=True)
tr.ema.copy_to(model); model.looping = True
t = time.time(); hs = tg.collect_hessians(model, h, dev); print("hessians", len(hs), time.time() - t, flush=True)
model.eval()
print("eval", tg.eval_val(fn, val, h, luts, dev), flush=True)
print("ttt warmup", tg.warm_up_ttt(model, model, h, luts, dev), flush=True)  # TTT runs eagerly, as in run()
t = time.time(); print("ttt", tg.eval_val_ttt(model, model, val, h, luts, dev, print), time.time() - t, flush=True)

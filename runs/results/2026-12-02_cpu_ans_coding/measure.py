"""The 60-step corpus artifact (.carry/art60.int6.ptz, see ../2026-12-02_h200_ttt_views/) re-serialized
with and without ANS_CODING, brotli for the rest; run from the repo root: python3 runs/results/2026-12-02_cpu_ans_coding/measure.py"""
import sys, time, torch
sys.path.insert(0, ".")
import train_gpt as tg
w, m = tg.deserialize_quantized(open(".carry/art60.int6.ptz", "rb").read())
for ans in (False, True):
    t = time.time(); blob = tg.serialize_quantized(w, m, "brotli", ans); write_s = time.time() - t
    t = time.time(); w2, m2 = tg.deserialize_quantized(blob); read_s = time.time() - t
    same = list(w2) == list(w) and m2 == m and all(torch.equal(w[k], w2[k]) for k in w)
    print(f"ANS_CODING={int(ans)}: {len(blob):,} model bytes, write {write_s:.1f}s, read {read_s:.1f}s, exact {same}")
print(f"code stub: {len(tg.minified_code_stub(open('train_gpt.py').read()).encode()):,} bytes")

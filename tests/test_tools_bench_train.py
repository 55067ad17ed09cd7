"""CPU tests of tools/bench_train.py's helpers: arguments, FLOP counting (checked against
torch's FlopCounterMode), the kernel classifier and breakdown on synthetic profiler events, the
report, and one smoke run of the whole benchmark flow on the tiny dataset (eager, CPU).

Run: python3 -m pytest -q tests/test_tools_bench_train.py
"""
import json
import math
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.utils.flop_counter import FlopCounterMode

import train_gpt as tg
from tests.conftest import REPO_ROOT, TINY_ENV
from tools import bench_train as bt


# ---------------------------------------------------------------------------------------------
# import, arguments, settings
# ---------------------------------------------------------------------------------------------


def test_import_has_no_side_effects():
    code = ("import sys, torch; path = list(sys.path); import tools.bench_train as bt; "
            "assert 'train_gpt' not in sys.modules, 'train_gpt imported'; "
            "assert sys.path == path, 'sys.path changed'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_parse_args_defaults(monkeypatch):
    monkeypatch.delenv("DATA_DIR", raising=False)
    a = bt.parse_args([])
    assert (a.data_dir, a.steps, a.settle_steps, a.profile, a.profile_steps, a.out, a.overrides) == \
        ("/root/data", 10, 1, False, 2, "", [])
    assert a.peak_tflops == 989.0 and not a.allow_cpu and not a.fresh_caches
    monkeypatch.setenv("DATA_DIR", "/elsewhere")
    assert bt.parse_args([]).data_dir == "/elsewhere"


def test_parse_args_values():
    a = bt.parse_args(["--data-dir", "/d", "--steps", "3", "--settle-steps", "0", "--profile", "--profile-steps", "4",
                       "--out", "r.json", "--set", "ATTN_BACKEND=varlen", "--set", "FUSED_MLP=0", "--peak-tflops",
                       "790", "--fresh-caches"])
    assert (a.data_dir, a.steps, a.settle_steps, a.profile, a.profile_steps, a.out) == ("/d", 3, 0, True, 4, "r.json")
    assert a.overrides == [("ATTN_BACKEND", "varlen"), ("FUSED_MLP", "0")] and a.peak_tflops == 790 and a.fresh_caches


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--steps", "x"], ["--settle-steps", "-1"],
                                  ["--profile-steps", "0"], ["--set", "NOVALUE"], ["--set", "lower=1"],
                                  ["--set", "=1"], ["--peak-tflops", "0"]])
def test_parse_args_rejects(argv, capsys):
    with pytest.raises(SystemExit):
        bt.parse_args(argv)


def test_hparams_env_gives_the_default_benchmark_setup():
    env = bt.hparams_env(bt.parse_args(["--data-dir", "/d"]))
    assert env["DATA_DIR"] == "/d" and "WORLD_SIZE" not in env and "RANK" not in env
    h = tg.Hyperparameters(env=env)
    assert (h.vocab_size, h.train_batch_tokens, h.world_size, h.grad_accum_steps, h.local_batch_tokens) == \
        (8192, 786_432, 1, 8, 98_304)
    assert h.train_files == "/d/datasets/fineweb10B_sp8192/fineweb_train_*.bin"
    h = tg.Hyperparameters(env=bt.hparams_env(bt.parse_args(["--set", "ATTN_BACKEND=sdpa", "--set", "SEED=3"])))
    assert h.attn_backend == "sdpa" and h.seed == 3


# ---------------------------------------------------------------------------------------------
# FLOP counting
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_model():
    torch.manual_seed(0)
    return tg.GPT(tg.Hyperparameters(env={}), "sdpa")


def test_default_model_dims_and_matmul_params(default_model):
    m = default_model
    dims = bt.model_dims(m)
    assert dims == {"d_model": 512, "q_dim": 512, "kv_dim": 256, "hidden": 2048, "vocab": 8192,
                    "virtual_layers": {False: 11, True: 17}, "gate": 8 * 12}  # the sparse attention gate
    per_layer = 512 * 512 * 2 + 256 * 512 * 2 + 2048 * 512 * 2  # Q, O, K, V, up, down
    assert per_layer == 2_883_584
    off = bt.matmul_params_per_token(11, 512, 512, 256, 2048, 8192)
    on = bt.matmul_params_per_token(17, 512, 512, 256, 2048, 8192)
    assert off == 11 * per_layer + 8192 * 512 == 35_913_728
    assert on == 17 * per_layer + 8192 * 512 == 53_215_232
    # without looping every matrix is applied once: the matmul weights are the banks + the tied head
    banks = sum(p.numel() for p in (m.qo_bank, m.kv_bank, m.mlp_up_bank, m.mlp_down_bank, m.tok_emb.weight))
    assert off == banks
    total = sum(p.numel() for p in m.parameters())
    assert 35.9e6 <= total < 36.0e6 and total - banks < 40_000  # 35.9M, the rest small control tensors
    f_off = bt.model_flops_per_token(dims, False, [])
    f_on = bt.model_flops_per_token(dims, True, [])
    off, on = off + 11 * 96, on + 17 * 96  # each applied layer's attention gate: 8 heads x 12 inputs
    assert f_off["matmul_flops"] == 6 * off and f_off["attention_flops"] == 0 and f_off["total"] == 6 * off
    assert f_on["virtual_layers"] == 17 and f_on["matmul_params"] == on


def _count_matmul_flops(model, ids, cu):
    """Forward + backward FLOPs of 2-D matrix products (every linear layer and the head) as torch
    counts them. The attention's batched products are bmm and are not included."""
    with FlopCounterMode(display=False) as counter:
        loss = model(ids, ids, cu, int(np.diff(cu.numpy()).max())).mean()
        loss.backward()
    counts = counter.get_flop_counts()["Global"]
    return sum(v for k, v in counts.items() if str(k).split(".")[1] in ("mm", "addmm"))


@pytest.mark.parametrize("looping", [False, True])
def test_matmul_flops_match_torch_flop_counter(looping):
    env = dict(TINY_ENV, MODEL_DIM="48", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="3", VOCAB_SIZE="96",
               NUM_LAYERS="5", XSA_LAST_N="2", LOOP_START="1", LOOP_END="2", PARALLEL_START_LAYER="4", FUSED_MLP="0")
    torch.manual_seed(0)
    model = tg.GPT(tg.Hyperparameters(env=env), "sdpa").float()
    for bank in (model.qo_bank, model.mlp_down_bank):
        torch.nn.init.normal_(bank, std=0.02)  # no zero matrices: every product is done
    model.looping = looping
    dims = bt.model_dims(model)
    assert dims["virtual_layers"][looping] == len(sum(model.layer_order(looping), []))
    T = 40
    ids = torch.randint(2, 96, (T,))
    cu = torch.tensor([0, 17, 40, 40], dtype=torch.int32)
    counted = _count_matmul_flops(model, ids, cu)
    expected = bt.model_flops_per_token(dims, looping, [cu.numpy()])["matmul_flops"] * T
    assert counted == expected


def test_attention_flops_hand_count():
    cu = np.array([0, 3, 7, 7, 7], dtype=np.int32)  # segments 3 and 4, then two padding entries
    assert bt.attention_flops_per_token([cu], 2, 4) == pytest.approx(6 * 2 * 4 * (9 + 16) / 7)
    assert bt.attention_flops_per_token([cu, np.array([0, 7])], 2, 4) == pytest.approx(6 * 2 * 4 * (25 + 49) / 14)
    assert bt.attention_flops_per_token([], 2, 4) == 0.0
    s = bt.segment_stats([cu])
    assert s == {"batches": 1, "tokens": 7, "segments": 2, "sum_sq_lengths": 25, "token_weighted_mean_length": 25 / 7}
    # one segment of T tokens gives the usual causal 6 * L * d * T per token
    assert bt.attention_flops_per_token([np.array([0, 2048])], 11, 512) == 6 * 11 * 512 * 2048
    with pytest.raises(ValueError):
        bt.segment_lengths(np.array([0, 5, 3]))
    with pytest.raises(ValueError):
        bt.segment_lengths(np.array([1, 5]))


def test_attention_flops_match_torch_flop_counter():
    """Attention written as plain batched products: torch counts the full n x n score matrix
    (no causal saving), forward + backward. The benchmark's causal count is exactly half."""
    H, hd, L = 4, 8, 1
    for n in (5, 33):
        q, k, v = (torch.randn(1, H, n, hd, requires_grad=True) for _ in range(3))
        with FlopCounterMode(display=False) as counter:
            scores = (q @ k.transpose(-1, -2)).softmax(-1)
            (scores @ v).sum().backward()
        counted = counter.get_total_flops()
        per_token = bt.attention_flops_per_token([np.array([0, n])], L, H * hd)
        assert counted == 2 * per_token * n


# ---------------------------------------------------------------------------------------------
# phase summary, targets, report
# ---------------------------------------------------------------------------------------------


DIMS = {"d_model": 512, "q_dim": 512, "kv_dim": 256, "hidden": 2048, "vocab": 8192,
        "virtual_layers": {False: 11, True: 17}}


def _phase(looping, ms, peak_mib):
    cus = [np.array([0, 1000, 98_304, 98_304])] * 8 * 4
    return bt.summarize_phase(looping, [ms / 1000] * 4, 4 * ms / 1000, 786_432, cus, DIMS, peak_mib * 2**20,
                              989e12, [9.1, 9.0, 8.8, 8.7])


def test_summarize_phase_numbers():
    ph = _phase(False, 500.0, 30_000)
    assert ph["ms_per_step"] == pytest.approx(500) and ph["ms_per_step_median"] == pytest.approx(500)
    assert ph["tokens_per_s"] == pytest.approx(786_432 / 0.5)
    f = ph["flops_per_token"]
    sum_sq, tokens = 1000 ** 2 + 97_304 ** 2, 98_304
    assert f["attention_flops"] == pytest.approx(6 * 11 * 512 * sum_sq / tokens)
    assert f["total"] == pytest.approx(6 * 35_913_728 + f["attention_flops"])
    assert ph["mfu"] == pytest.approx(f["total"] * 786_432 / 0.5 / 989e12)
    assert ph["mfu_matmul_only"] < ph["mfu"] and ph["peak_memory_mib"] == pytest.approx(30_000)
    assert ph["segments"]["tokens"] == 32 * 98_304 and ph["segments"]["segments"] == 64
    assert ph["graphs_compiled"] is None
    with pytest.raises(ValueError):
        bt.summarize_phase(False, [], 0.0, 1, [], DIMS, None, 1.0, [])


def _result(ms_off=500.0, ms_on=700.0, warm=100.0, peak_on=39_000):
    return {"device": "NVIDIA H200", "torch": "2.11", "attn_backend": "varlen", "fused_mlp": True,
            "params": 35_944_602, "dims": DIMS, "tokens_per_step": 786_432, "grad_accum": 8, "world_size": 1,
            "peak_tflops": 989.0, "setup_s": 3.0, "compile_warmup_s": warm,
            "phases": {"before_looping": _phase(False, ms_off, 30_000), "after_looping": _phase(True, ms_on, peak_on)}}


def test_targets_met_and_missed():
    rows = {r["name"]: r for r in bt.check_targets(bt.headline(_result()))}
    assert rows["tokens_per_s_before_looping"]["met"] is True  # 1,572,864 >= 1,284,000
    assert rows["tokens_per_s_after_looping"]["met"] is True  # 1,123,474 >= 859,000
    assert rows["compile_warmup_s"]["met"] is True and rows["peak_memory_gib"]["met"] is True
    assert rows["peak_memory_gib"]["value"] == pytest.approx(39_000 / 1024)
    assert rows["tokens_per_s_before_looping"]["reference"] == 1_027_240
    rows = {r["name"]: r for r in bt.check_targets(bt.headline(_result(ms_off=728.6, warm=356, peak_on=41_000)))}
    assert rows["tokens_per_s_before_looping"]["met"] is False and rows["compile_warmup_s"]["met"] is False
    assert rows["peak_memory_gib"]["met"] is False
    assert rows["tokens_per_s_after_looping"]["met"] is True
    rows = bt.check_targets({"compile_warmup_s": 1.0})
    assert [r["met"] for r in rows if r["name"] != "compile_warmup_s"] == [None] * 3


def test_format_report_shows_numbers_targets_and_reference():
    text = bt.format_report(_result())
    for piece in ("1,572,864", "≥ 1,284,000", "≥ 859,000", "≤ 100.0 s", "≤ 40.0 GiB",
                  "1,027,240", "687,270", "765.6", "1,144.2", "363.6 s", "40.6 GiB", "before_looping", "after_looping",
                  "11 layers applied", "17 layers applied", "41,567 MiB", "39,000 MiB"):
        assert piece in text, piece
    assert " NO " not in text and "WARNING" not in text
    result = _result()
    result["phases"]["after_looping"]["graphs_compiled"] = 2
    assert "WARNING: torch.compile built 2 graph(s)" in bt.format_report(result)


def test_parse_compile_times_keeps_the_largest_rows():
    table = ("TorchDynamo compilation metrics:\nFunction, Runtimes (s)\n_compile.compile_inner, 51.2\n"
             "GraphLowering.compile_to_module, 30.5\nbuild_guards, 0.02\nasync_compile.wait, 12.0\n")
    assert bt.parse_compile_times(table, top=2) == {"_compile.compile_inner": 51.2,
                                                    "GraphLowering.compile_to_module": 30.5}
    tabulated = ("TorchDynamo compilation metrics:\nFunction                          Runtimes (s)\n"
                 "--------------------------------  --------------\n_compile.compile_inner            51.2\n"
                 "build_guards                      0.02\n")  # torch 2.11's layout
    assert bt.parse_compile_times(tabulated) == {"_compile.compile_inner": 51.2, "build_guards": 0.02}
    result = _result()
    result["warmup_step_s"] = {"off": [55.0, 0.7], "on": [40.0, 1.0]}
    result["compile_times_s"] = bt.parse_compile_times(table, top=1)
    text = bt.format_report(result)
    assert "warm-up steps, looping off (s): 55.0 0.7" in text and "_compile.compile_inner 51.2" in text


def test_compiled_graphs_counter():
    before = bt.compiled_graphs()
    assert isinstance(before, int)
    fn = torch.compile(lambda x: x * 2 + 1, backend="eager")
    fn(torch.ones(3))
    assert bt.compiled_graphs() == before + 1


# ---------------------------------------------------------------------------------------------
# kernel classification and breakdown
# ---------------------------------------------------------------------------------------------


KERNELS = [
    ("void flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90<2, cute::tuple<cute::C<128> >, "
     "cutlass::bfloat16_t, float, cutlass::arch::Sm90, true, false> >", bt.ATTENTION),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, "
     "cutlass::bfloat16_t>, true, false>(pytorch_flash::Flash_fwd_params)", bt.ATTENTION),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64> >", bt.ATTENTION),
    ("flash::prepare_varlen_num_blocks_kernel(int, int, int)", bt.ATTENTION),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", bt.ATTENTION),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", bt.ATTENTION),
    ("triton_tem_fused_flex_attention_0", bt.ATTENTION),
    ("_fused_mlp_kernel", bt.FUSED_MLP),
    ("_softcap_ce_kernel", bt.FUSED_CE),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", bt.MATMULS),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel",
     bt.MATMULS),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(Params)", bt.MATMULS),
    ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn", bt.MATMULS),
    ("void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true>(...)", bt.MATMULS),
    ("triton_tem_fused_mm_3", bt.MATMULS),
    ("triton_poi_fused__to_copy_add_mul_0", bt.ELEMENTWISE),
    ("triton_per_fused__fused_rms_norm_mul_1", bt.ELEMENTWISE),
    ("triton_red_fused_sum_2", bt.ELEMENTWISE),
    ("triton_poi_fused_cat_flash_like_name_4", bt.ELEMENTWISE),  # Inductor kernels are never attention
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >",
     bt.ELEMENTWISE),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::NormTwoOps<float> > >",
     bt.ELEMENTWISE),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4> >",
     bt.ELEMENTWISE),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", bt.COMMUNICATION),
    ("Memcpy HtoD (Pinned -> Device)", bt.MEMCPY),
    ("Memset (Device)", bt.MEMCPY),
    ("some_mystery_kernel", bt.OTHER),
]


@pytest.mark.parametrize("name,component", KERNELS)
def test_classify_kernel_by_name(name, component):
    assert bt.classify_kernel(name) == component
    assert bt.classify_kernel(name, scope=None) == component
    assert bt.classify_kernel(name, scope="some other range") == component


def test_classify_kernel_scope_wins():
    gemm = "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT"
    assert bt.classify_kernel(gemm, "newton_schulz") == bt.SCOPES["newton_schulz"]
    assert bt.classify_kernel("triton_poi_fused_mul_0", "muon") == bt.SCOPES["muon"]
    adam = "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4> >"
    assert bt.classify_kernel(adam, "adamw") == bt.SCOPES["adamw"]
    assert bt.classify_kernel("triton_red_fused_0", "grad_clip") == bt.SCOPES["grad_clip"]
    assert bt.classify_kernel("multi_tensor_apply_kernel<LerpFunctor>", "ema") == bt.SCOPES["ema"]


class Events:
    """Builds FunctionEvents (torch's own class) the way profiler post-processing leaves them."""

    def __init__(self):
        self.events, self.next_id = [], 1

    def cpu(self, name, start, end, parent=None, annotation=False):
        ev = FunctionEvent(id=self.next_id, name=name, thread=1, start_us=start, end_us=end, use_device="cuda",
                           is_user_annotation=annotation, device_type=DeviceType.CPU)
        self.next_id += 1
        if parent is not None:
            ev.set_cpu_parent(parent)
            parent.append_cpu_child(ev)
        self.events.append(ev)
        return ev

    def kernel(self, name, start, dur, launched_by=None, annotation=False):
        ev = FunctionEvent(id=self.next_id, name=name, thread=7, start_us=start, end_us=start + dur, use_device="cuda",
                           is_user_annotation=annotation, device_type=DeviceType.CUDA)
        self.next_id += 1
        if launched_by is not None:
            launched_by.append_kernel(name, 0, dur)
        self.events.append(ev)
        return ev


def _synthetic_step():
    e = Events()
    muon = e.cpu("muon", 0, 100, annotation=True)
    ns = e.cpu("newton_schulz", 10, 50, muon, annotation=True)
    mm_ns = e.cpu("aten::mm", 20, 30, ns)
    add = e.cpu("aten::add", 60, 70, muon)
    mm = e.cpu("aten::mm", 200, 210)
    backward = e.cpu("CompiledFunctionBackward", 220, 260)
    mm_bwd = e.cpu("aten::mm", 230, 240, backward)
    adam = e.cpu("adamw", 300, 320, annotation=True)
    fused = e.cpu("aten::_fused_adamw_", 305, 315, adam)
    gemm = "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT"
    e.kernel(gemm, 1000, 5, mm_ns)
    e.kernel("triton_poi_fused_add_0", 1006, 2, add)
    e.kernel(gemm, 1010, 7, mm)
    e.kernel(gemm, 1040, 6, mm_bwd)
    e.kernel("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 1020, 4, fused)
    e.kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 1012, 3)  # no CPU link; overlaps the gemm
    e.kernel("Memset (Device)", 1030, 1)
    e.kernel("muon", 1000, 9, annotation=True)  # the GPU-side span of the range: not a kernel
    return e.events


def test_enclosing_scope_and_kernel_records():
    events = _synthetic_step()
    by_name = {ev.name: ev for ev in events if ev.device_type == DeviceType.CPU}
    assert bt.enclosing_scope(by_name["aten::add"]) == "muon"
    assert bt.enclosing_scope(by_name["aten::_fused_adamw_"]) == "adamw"
    assert bt.enclosing_scope(by_name["muon"]) == "muon"
    records = sorted(bt.kernel_records(events), key=lambda r: (r[0], str(r[1])))
    gemm = "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT"
    assert bt.pass_of(by_name["aten::add"]) == "optimizer" and bt.pass_of(by_name["aten::mm"]) == "backward"
    records = sorted(records, key=lambda r: (r[0], str(r[1]), str(r[4])))
    assert records == sorted([
        (gemm, "newton_schulz", 5.0, 1, "optimizer"), (gemm, None, 7.0, 1, "forward"),
        (gemm, None, 6.0, 1, "backward"), ("triton_poi_fused_add_0", "muon", 2.0, 1, "optimizer"),
        ("multi_tensor_apply_kernel<FusedAdamMathFunctor>", "adamw", 4.0, 1, "optimizer"),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", None, 3.0, 1, None), ("Memset (Device)", None, 1.0, 1, None),
    ], key=lambda r: (r[0], str(r[1]), str(r[4])))


def test_kernel_records_scales_claims_down_to_the_device_total():
    e = Events()
    op = e.cpu("aten::mm", 0, 10)
    e.kernel("nvjet_a", 100, 4, op)
    op.append_kernel("nvjet_a", 0, 4)  # claimed twice (as after torch lifts a merged node's kernels)
    op.append_kernel("gpu_only_annotation", 0, 50)  # a name with no device event: ignored
    records = bt.kernel_records(e.events)
    assert sum(r[2] for r in records) == pytest.approx(4.0)
    assert {r[0] for r in records} == {"nvjet_a"}


def test_breakdown_of_synthetic_step():
    events = _synthetic_step()
    busy = bt.busy_us(bt.device_intervals(events)) / 1000
    bd = bt.breakdown(bt.kernel_records(events), steps=2, wall_ms_per_step=0.05, busy_ms_per_step=busy / 2)
    ms = {r["component"]: r["ms_per_step"] for r in bd["components"]}
    assert ms == pytest.approx({bt.SCOPES["newton_schulz"]: 0.0025, bt.MATMULS: 0.0065, bt.SCOPES["muon"]: 0.001,
                                bt.SCOPES["adamw"]: 0.002, bt.COMMUNICATION: 0.0015, bt.MEMCPY: 0.0005})
    matmuls = next(r for r in bd["components"] if r["component"] == bt.MATMULS)
    assert (matmuls["forward_ms"], matmuls["backward_ms"]) == pytest.approx((0.0035, 0.003))
    assert bd["kernel_ms_per_step"] == pytest.approx(0.014)
    assert sum(r["percent"] for r in bd["components"]) == pytest.approx(100)
    assert [r["component"] for r in bd["components"]][0] == bt.MATMULS  # largest first
    assert {r["component"]: r["kernels_per_step"] for r in bd["components"]}[bt.MATMULS] == 1.0
    # kernels: [1000,1005] [1006,1008] [1010,1017] [1012,1015] [1020,1024] [1030,1031] [1040,1046]
    # -> 5+2+7+4+1+6 = 25 us busy
    assert busy == pytest.approx(0.025)
    assert bd["top_kernels"][0]["name"].startswith("nvjet") and bd["top_kernels"][0]["component"] == bt.MATMULS
    launches = sum(k["launches_per_step"] for k in bd["top_kernels"])
    assert launches == pytest.approx(sum(r["kernels_per_step"] for r in bd["components"]))  # every kernel kept
    text = bt.format_breakdown(bd)
    assert "Muon: Newton-Schulz" in text and "GPU busy" in text and "largest kernels" in text
    empty = bt.breakdown([], steps=3, wall_ms_per_step=10.0, busy_ms_per_step=0.0)
    assert empty["kernel_ms_per_step"] == 0 and empty["components"] == []
    bt.format_breakdown(empty)
    with pytest.raises(ValueError):
        bt.breakdown([], steps=0)


def test_busy_union():
    assert bt.busy_us([]) == 0
    assert bt.busy_us([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert bt.busy_us([(3, 4), (0, 10)]) == 10


def test_labelled_ranges_wrap_restore_and_nest(monkeypatch):
    """The ranges appear around the wrapped calls in a real (CPU) profile, the kernel-owner ops
    inside get the innermost scope, and every attribute is put back afterwards."""
    calls = []

    class Opt:
        def step(self):
            calls.append("step")
            torch.ones(4).add_(1)

    class Muon(Opt):
        def __init__(self):
            self.orthogonalize = lambda g, steps: g @ g.T

        def launch_reduce_scatter(self):
            torch.zeros(3).add_(2)

        def step(self):
            calls.append("muon")
            return self.orthogonalize(torch.ones(4, 4), 5).sum()

    class Ema:
        def update(self, model):
            torch.zeros(2).lerp_(torch.ones(2), 0.5)

    muon, ema = Muon(), Ema()
    trainer = types.SimpleNamespace(opt=types.SimpleNamespace(muon=muon, adam_embed=Opt(), adam_scalars=Opt()),
                                    ema=ema)
    ortho, clip = muon.orthogonalize, torch.nn.utils.clip_grad_norm_
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with bt.labelled_ranges(trainer):
            assert "step" in vars(muon) and muon.orthogonalize is not ortho
            trainer.opt.muon.launch_reduce_scatter()
            trainer.opt.adam_embed.step()
            trainer.opt.muon.step()
            trainer.ema.update(None)
            p = torch.nn.Parameter(torch.ones(3))
            p.grad = torch.ones(3)
            torch.nn.utils.clip_grad_norm_([p], 0.3)
    assert calls == ["step", "muon"]
    assert "step" not in vars(muon) and "launch_reduce_scatter" not in vars(muon)
    assert "step" not in vars(trainer.opt.adam_embed) and "update" not in vars(ema)
    assert muon.orthogonalize is ortho and torch.nn.utils.clip_grad_norm_ is clip
    scopes = {}
    for ev in prof.events():
        if ev.name in ("aten::mm", "aten::lerp_", "aten::fill_", "aten::add_", "aten::linalg_vector_norm"):
            scopes.setdefault(ev.name, set()).add(bt.enclosing_scope(ev))
    assert scopes["aten::mm"] == {"newton_schulz"}
    assert scopes["aten::lerp_"] == {"ema"}
    assert scopes["aten::add_"] == {"muon", "adamw"}
    assert scopes["aten::linalg_vector_norm"] == {"grad_clip"}


def test_batch_recorder():
    class Loader:
        def __init__(self):
            self.i = 0

        def next_batch(self):
            self.i += 1
            return "x", "y", torch.tensor([0, self.i, 8], dtype=torch.int32), 8

    loader = Loader()
    rec = bt.BatchRecorder(loader)
    loader.next_batch()
    rec.start()
    loader.next_batch()
    loader.next_batch()
    cus = rec.stop()
    loader.next_batch()
    assert [c.tolist() for c in cus] == [[0, 2, 8], [0, 3, 8]] and rec.stop() == []


# ---------------------------------------------------------------------------------------------
# the whole flow, eager on CPU with the tiny model and dataset
# ---------------------------------------------------------------------------------------------


def test_cpu_smoke_run(tiny_dataset, tmp_path, capsys):
    env = dict(TINY_ENV, **tiny_dataset.env, WARMUP_STEPS="2")
    out = tmp_path / "result.json"
    argv = ["--data-dir", tiny_dataset.data_dir, "--steps", "2", "--settle-steps", "1", "--profile",
            "--profile-steps", "1", "--out", str(out), "--allow-cpu"]
    for key, value in env.items():
        if key != "DATA_DIR":
            argv += ["--set", f"{key}={value}"]
    assert bt.main(argv) == 0
    text = capsys.readouterr().out
    assert "before_looping" in text and "after_looping" in text and "GPU time by component" in text
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["tokens_per_step"] == 1024 and result["grad_accum"] == 8
    assert result["compile_warmup_s"] > 0
    assert {k: len(v) for k, v in result["warmup_step_s"].items()} == {"off": 1, "on": 1}
    for name, looping in bt.PHASES:
        ph = result["phases"][name]
        assert ph["looping"] is looping and ph["steps"] == 2 and ph["peak_memory_mib"] is None
        assert ph["segments"]["tokens"] == 2 * 1024 and ph["segments"]["batches"] == 16
        assert all(math.isfinite(x) for x in ph["losses"]) and ph["tokens_per_s"] > 0
        assert ph["graphs_compiled"] == 0  # eager on CPU
        assert ph["flops_per_token"]["virtual_layers"] == (8 if looping else 4)  # [0] + [1, 2] x 3 + [3]
        assert result["profile"][name]["steps"] == 1 and result["profile"][name]["wall_ms_per_step"] > 0


def test_cpu_smoke_run_without_data(tmp_path, capsys):
    assert bt.main(["--data-dir", str(tmp_path), "--allow-cpu", "--steps", "1"]) == 2
    assert "tokenize_docs.py" in capsys.readouterr().err

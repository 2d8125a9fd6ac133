"""The GPU run's train stage without a GPU: the kernel-category table on recorded kernel
names, the Chrome-trace reader on fake traces (GPU and CPU shaped), the markdown that
renders what is missing as missing, and resuming from a state file."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from fusedres.bench import breakdown as B
from fusedres.bench import trainstep as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Kernel names as torch.profiler reports them on an H100/H200 (cuDNN 9, torch 2.x), and
# the ranges that launched them, innermost first; the category each must land in.
RECORDED = [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64",
     ["aten::cudnn_convolution", "aten::convolution", "aten::conv2d"], B.CONV_FWD),
    ("cudnn::gemm::computeOffsetsKernel", ["aten::cudnn_convolution"], B.CONV_FWD),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc",
     ["aten::convolution_backward"], B.DGRAD),
    ("sm90_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc",
     ["aten::convolution_backward"], B.WGRAD),
    ("_conv_kernel", ["fusedres::triton_conv_backward"], B.DGRAD),
    ("_conv_kernel", ["fusedres::triton_conv_prologue_stats"], B.CONV_FWD),
    ("_conv_wgrad_kernel", ["fusedres::triton_conv_backward"], B.WGRAD),
    ("_stats_merge_kernel", ["fusedres::triton_conv_stats"], B.BN_OURS),
    ("_bn_stats_partial_kernel", ["fusedres::triton_bn_stats", "fusedres::batch_norm_act"],
     B.BN_OURS),
    ("void fusedres::cuda::(anonymous namespace)::reduce_inner_kernel<__nv_bfloat16, 0>",
     ["fusedres::bn_stats"], B.BN_OURS),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>",
     ["aten::zero_", "fusedres::batch_norm_act"], B.COPIES),
    ("void cudnn::bn_fw_tr_1C11_singleread_spec<__nv_bfloat16, 512, true, 1, 2, 0>",
     ["aten::cudnn_batch_norm", "aten::batch_norm"], B.BN_TORCH),
    ("void at::native::batch_norm_backward_elemt_channels_last_kernel<4, c10::BFloat16>",
     ["aten::native_batch_norm_backward"], B.BN_TORCH),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::threshold_kernel_impl>",
     ["aten::threshold_backward"], B.BN_TORCH),
    ("triton_red_fused__native_batch_norm_legit_functional_relu_threshold_backward_7",
     ["CompiledFunctionBackward"], B.BN_INDUCTOR),
    ("void at::native::max_pool_forward_nhwc<c10::BFloat16, float>",
     ["aten::max_pool2d_with_indices"], B.POOL),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::BFloat16, MeanOps>>",
     ["aten::mean", "aten::adaptive_avg_pool2d"], B.POOL),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNT", ["aten::addmm", "aten::linear"], B.GEMM),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x128x64", ["aten::mm"], B.GEMM),
    ("void (anonymous namespace)::cunn_SoftMaxForward<4, float>", ["aten::_log_softmax"],
     B.LOSS),
    ("void at::native::nll_loss_forward_reduce_cuda_kernel_2d<float, long>",
     ["aten::nll_loss_forward"], B.LOSS),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<SGD>",
     ["aten::_foreach_add_", "Optimizer.step#SGD.step"], B.OPTIM),
    ("void at::native::_amp_foreach_non_finite_check_and_unscale_cuda_kernel",
     ["aten::_amp_foreach_non_finite_check_and_unscale_"], B.OPTIM),
    ("Memcpy DtoD (Device -> Device)", [], B.COPIES),
    ("void at::native::unrolled_elementwise_kernel<at::native::bfloat16_copy_kernel_cuda>",
     ["aten::copy_", "aten::_to_copy", "aten::conv2d"], B.COPIES),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>",
     ["aten::add_"], B.BN_TORCH),
    # the CPU dry run: operators are the "kernels"
    ("aten::mkldnn_convolution", ["aten::_convolution", "aten::convolution"], B.CONV_FWD),
    ("aten::convolution_backward", ["autograd::engine::evaluate_function: "
                                    "ConvolutionBackward0"], B.CONV_BWD),
    ("aten::native_batch_norm", ["aten::batch_norm"], B.BN_TORCH),
    ("fusedres::cpu_bn_relu_fwd", ["fusedres::batch_norm_act"], B.BN_OURS),
    ("aten::addmm", ["aten::linear"], B.GEMM),
    ("some_kernel_nobody_knows", [], B.OTHER),
]


@pytest.mark.parametrize("kernel,ops,want", RECORDED, ids=lambda v: str(v)[:40])
def test_categorize_recorded_kernels(kernel, ops, want):
    assert B.categorize(kernel, ops) == want


def test_categories_are_the_fixed_table():
    assert {r[0] for r in B.RULES} | {B.OTHER} == set(B.CATEGORIES)
    assert len(set(B.CATEGORIES)) == len(B.CATEGORIES)


def _x(name, cat, ts, dur, ext=None, tid=1):
    ev = {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur}
    if ext is not None:
        ev["args"] = {"External id": ext}
    return ev


def test_gpu_trace_kernels_idle_and_sum():
    """Two steps: kernels linked to their ops by External id; one pair overlaps (counted
    once in busy); a gap of 30 us is idle. Categories sum to the total."""
    ev = [
        _x(B.STEP_RANGE, "user_annotation", 0, 500),
        _x("aten::conv2d", "cpu_op", 10, 50),
        _x("aten::cudnn_convolution", "cpu_op", 12, 40, ext=7),
        _x("fusedres::batch_norm_act", "cpu_op", 70, 30),
        _x("fusedres::triton_bn_apply", "cpu_op", 72, 20, ext=8),
        _x("Optimizer.step#SGD.step", "user_annotation", 110, 40),
        _x("aten::_foreach_add_", "cpu_op", 112, 10, ext=9),
        _x(B.STEP_RANGE, "user_annotation", 600, 500),
        # device side: GPU timeline from 1000
        _x("sm90_xmma_fprop_implicit_gemm", "kernel", 1000, 100, ext=7, tid=7),
        _x("_bn_apply_kernel", "kernel", 1100, 50, ext=8, tid=7),
        _x("multi_tensor_apply_kernel<SGD>", "kernel", 1180, 20, ext=9, tid=7),  # gap 30
        _x("Memcpy DtoD (Device -> Device)", "gpu_memcpy", 1190, 20, tid=8),  # overlaps 10
    ]
    kernels, window = B.kernels_from_trace({"traceEvents": ev})
    assert window == {"device": "cuda", "wall_us": 210.0, "steps": 2}
    assert kernels[1]["ops"] == ["fusedres::triton_bn_apply", "fusedres::batch_norm_act",
                                 B.STEP_RANGE]
    s = B.summarize(kernels, window)
    c = s["categories_ms"]
    assert c[B.CONV_FWD] == pytest.approx(0.050) and c[B.BN_OURS] == pytest.approx(0.025)
    assert c[B.OPTIM] == pytest.approx(0.010) and c[B.COPIES] == pytest.approx(0.010)
    assert sum(c.values()) == pytest.approx(s["total_ms"]) == pytest.approx(0.095)
    assert s["busy_ms"] == pytest.approx(0.090)  # 100 + 50 + (1180..1210) = 180 us / 2
    assert s["wall_ms"] == pytest.approx(0.105) and s["idle_ms"] == pytest.approx(0.015)


def test_cpu_trace_self_time():
    """Nested operators: each gets its self time; only what lies in a step counts."""
    ev = [
        _x(B.STEP_RANGE, "user_annotation", 0, 100),
        _x("aten::conv2d", "cpu_op", 0, 60),
        _x("aten::mkldnn_convolution", "cpu_op", 5, 50),
        _x("aten::empty", "cpu_op", 6, 4),
        _x("aten::relu", "cpu_op", 70, 20),
        _x("aten::addmm", "cpu_op", 200, 30),  # outside every step
    ]
    kernels, window = B.kernels_from_trace({"traceEvents": ev})
    s = B.summarize(kernels, window)
    c = s["categories_ms"]
    assert c[B.CONV_FWD] == pytest.approx(0.060)  # 10 + 46 + 4 (empty under the conv)
    assert c[B.BN_TORCH] == pytest.approx(0.020) and c[B.GEMM] == 0
    assert s["total_ms"] == pytest.approx(0.080) == pytest.approx(s["busy_ms"])
    assert s["idle_ms"] == pytest.approx(0.020)


def test_resnet_bn_sites_and_floor():
    import torch

    sites = B.resnet_bn_sites(T.TinyResNet(), torch.empty(2, 3, 32, 32))
    kinds = [op for op, _ in sites]
    # stem; layer1.0 and layer2.0: bn1, bn2, the dual tail; layer2.1: bn1, bn2, bn3 + add
    assert kinds.count("dual_bn_add_relu") == 2 and kinds.count("bn_add_relu") == 1
    assert kinds.count("bn_relu") == 7 and len(sites) == 10
    t = B.bn_traffic(sites, torch.bfloat16)
    assert 0 < t["fused"] < t["eager"]
    assert B.floor_ms(t["fused"], 1000.0) == pytest.approx(t["fused"] / 1e12 * 1e3)
    assert B.floor_ms(t["fused"], None) is None


def test_markdown_renders_missing_as_missing():
    bd = {"categories_ms": {c: 0.0 for c in B.CATEGORIES}, "total_ms": 2.0, "busy_ms": 1.5,
          "wall_ms": 2.5, "idle_ms": 1.0}
    bd["categories_ms"][B.CONV_FWD] = 2.0
    lines = B.markdown({"eager": bd, "compile": None}, {"fused_ms": 0.5})
    conv = next(line for line in lines if line.startswith(f"| {B.CONV_FWD} |"))
    assert conv == f"| {B.CONV_FWD} | 2 | missing |"
    idle = next(line for line in lines if "idle" in line)
    assert idle.endswith("| 1 | missing |")


def _records():
    header = {"kind": "header", "stage": "train", "session": "2026-12-06T10:00:00Z",
              "machine": {"gpu": "NVIDIA H200", "git_commit": "abc", "command": "x"},
              "settings": {"model": "resnet50", "batch": 256, "image_size": 224,
                           "layout": "channels_last", "dtypes": ["bfloat16", "float16"],
                           "providers": ["eager", "compile", "auto"]},
              "copy": {"gbps": 4000.0}, "bn_sites": 49,
              "bn_bytes": {"bfloat16": {"fused": 8e9, "eager": 13e9}},
              "bn_floor_ms": {"bfloat16": {"fused": 2.0, "eager": 3.25}}}
    row = {"kind": "row", "provider": "eager", "dtype": "bfloat16", "time_ms": 50.0,
           "time_p20_ms": 49.0, "time_p80_ms": 51.0, "images_per_s": 5120.0,
           "speedup_vs_eager": 1.0, "speedup_vs_compile": None, "peak_mem_bytes": 2**34,
           "session": header["session"], "extra": {"prep_s": 3, "convert_s": 0,
                                                   "tune_s": 0, "first_steps_s": 3}}
    err = {"kind": "error", "provider": "compile", "dtype": "bfloat16", "phase": "build",
           "error": "PrepTimeout: preparing compile passed its cap of 150 s"}
    return [header, row, err]


def test_train_markdown_says_why_figures_are_missing():
    text = "\n".join(B.train_markdown(_records()))
    assert ("| eager | 50 (p20-p80 49-51) | 5120 | 1.00x | missing (no torch.compile row in "
            "call 1) | 16.0 GiB |") in text
    assert "| compile | missing (failed in build: PrepTimeout" in text
    # no end line: the stage was killed before auto and before fp16
    assert "| auto | missing (not reached: the stage was killed" in text
    assert "**float16**" in text
    assert "fused traffic 8.00 GB = 2 ms" in text
    for line in text.splitlines():  # a missing figure is never printed as a zero
        if "missing" in line:
            assert "| 0 |" not in line and "| 0.0" not in line
    empty = "\n".join(B.train_markdown([], providers=["eager"], dtypes=["bfloat16"]))
    assert "| eager | missing (not measured: no run of this train stage yet)" in empty


def test_parse_providers():
    assert T.parse("eager") == T.TrainProvider("eager")
    assert T.parse("compile") == T.TrainProvider("compile", compile=True)
    assert T.parse("auto+compile") == T.TrainProvider("auto+compile", convert="auto",
                                                      compile=True)
    assert T.parse("tuned:triton-conv").tune == ("triton-conv",)
    assert T.parse("tuned").tune == ()
    assert T.parse("cudnn").convert == "cudnn"
    with pytest.raises(ValueError):
        T.parse("auto+cudagraphs")
    import torch

    assert "no backend 'cudnn'" in T.unavailable(T.parse("cudnn"), torch.device("cpu"))
    from fusedres.tune import RANK

    conv_paths = [c for c in RANK if c not in T._BN_CANDIDATES]
    assert [f"tuned:{c}" for c in conv_paths] == \
        [p for p in T.default_providers() if p.startswith("tuned:")]


def _summary_mod():
    spec = importlib.util.spec_from_file_location(
        "gpu_summary", os.path.join(ROOT, "scripts", "gpu_summary.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train(tmp_path, state, providers="eager,auto", *extra):
    out = tmp_path / "train.jsonl"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "gpu_bench.py"), "train", "--dry-run",
         "--out", str(out), "--state", str(state), "--providers", providers,
         "--dtypes", "float16", "--profile-steps", "1", "--budget-s", "300", *extra],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env=dict(os.environ, TRITON_INTERPRET="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return [json.loads(line) for line in f]


def test_resume_skips_finished_units_and_redoes_the_rest(tmp_path):
    """A fake state file: eager's row and breakdown and auto's row finished, auto's
    breakdown not. The run profiles auto only; with auto's row then removed from the
    state, a second run times auto again beside eager (a baseline row, not a new eager
    result), in fp16 with its GradScaler."""
    gs = _summary_mod()
    state = tmp_path / "state.json"
    for key in ("train/float16/eager", "train/float16/eager/breakdown", "train/float16/auto"):
        gs.state_set(str(state), key, "ok")
    lines = _train(tmp_path, state)
    assert [r["kind"] for r in lines if r["kind"] in ("row", "breakdown")] == ["breakdown"]
    assert next(r for r in lines if r["kind"] == "breakdown")["provider"] == "auto"
    assert lines[-1]["complete"]
    data = gs.state_load(str(state))
    assert data["train/float16/auto/breakdown"]["status"] == "ok"

    data.pop("train/float16/auto")
    state.write_text(json.dumps(data))
    (tmp_path / "second").mkdir()
    lines = _train(tmp_path / "second", state)
    rows = [r for r in lines if r["kind"] == "row"]
    assert [(r["provider"], r["baseline"]) for r in rows] == [("eager", True),
                                                              ("auto", False)]
    assert rows[1]["speedup_vs_eager"] > 0 and rows[1]["dtype"] == "float16"
    assert not any(r["kind"] == "breakdown" for r in lines)
    assert gs.state_complete(gs.state_load(str(state)), "train/float16/auto")


def test_state_complete_rules(tmp_path):
    gs = _summary_mod()
    path = str(tmp_path / "s.json")
    gs.state_set(path, "a", "ok")
    gs.state_set(path, "b", "failed", error="boom")
    data = gs.state_load(path)
    assert gs.state_complete(data, "a") and gs.state_complete(data, "b")
    assert not gs.state_complete(data, "b", retry_failed=True)
    assert not gs.state_complete(data, "c")
    assert gs.state_load(str(tmp_path / "absent.json")) == {}


def test_results_markdown_train_section(tmp_path):
    """RESULTS.md: a folder without train.md lists every provider as missing; with it,
    its tables replace the plain train.json table."""
    from fusedres.bench import report

    d = tmp_path / "results" / "h200-2026-12-24"
    d.mkdir(parents=True)
    data = {"schema": report.SCHEMA, "machine": {"device_type": "cuda", "gpu": "NVIDIA H200",
                                                 "date": "2026-12-24T00:00:00+00:00",
                                                 "git_commit": "abc", "torch": "2.x"},
            "settings": {"dtype": "bfloat16", "layout": "channels_last", "batch": 256},
            "rows": [{"suite": "train", "case": "resnet50", "pass": "train_step",
                      "layer": "224x224", "provider": "eager", "time_ms": 53.7}]}
    (d / "train.json").write_text(json.dumps(data))
    text = report.results_markdown(str(tmp_path / "results"))
    for p in T.default_providers():
        assert f"| {p} | missing | missing | missing | missing |" in text
    assert "53.7 ms" in text  # the older table stays
    (d / "train.md").write_text("\n".join(B.train_markdown(_records())) + "\n")
    text = report.results_markdown(str(tmp_path / "results"))
    assert "| compile | missing (failed in build: PrepTimeout" in text
    assert "53.7 ms" not in text and "## train.json" not in text


def test_gpu_trace_kernel_linked_by_correlation():
    """A kernel without an External id is named through the runtime call that launched
    it (same correlation), inside its operator."""
    ev = [
        _x(B.STEP_RANGE, "user_annotation", 0, 100),
        _x("aten::max_pool2d_with_indices", "cpu_op", 10, 30),
        dict(_x("cudaLaunchKernel", "cuda_runtime", 12, 5), args={"correlation": 42}),
        dict(_x("some_kernel_nobody_knows", "kernel", 200, 10, tid=7),
             args={"correlation": 42}),
    ]
    kernels, _ = B.kernels_from_trace({"traceEvents": ev})
    assert kernels[0]["ops"][0] == "aten::max_pool2d_with_indices"
    assert B.categorize(kernels[0]["name"], kernels[0]["ops"]) == B.POOL


def test_a_failing_provider_is_reported_and_the_others_go_on(tmp_path):
    """A provider whose preparation raises is an error line (and 'failed' in the state
    file), one that cannot exist here is skipped with the reason; eager still runs."""
    gs = _summary_mod()
    state = tmp_path / "state.json"
    lines = _train(tmp_path, state, "tuned:no-such-candidate,cudnn,eager", "--no-breakdown")
    err = next(r for r in lines if r["kind"] == "error")
    assert err["provider"] == "tuned:no-such-candidate" and err["phase"] == "build"
    assert "unknown tune candidate" in err["error"]
    skip = next(r for r in lines if r["kind"] == "skipped")
    assert skip["provider"] == "cudnn" and "no backend 'cudnn'" in skip["reason"]
    assert [r["provider"] for r in lines if r["kind"] == "row"] == ["eager"]
    data = gs.state_load(str(state))
    assert data["train/float16/tuned:no-such-candidate"]["status"] == "failed"
    assert data["train/float16/cudnn"]["status"] == "unavailable"
    text = "\n".join(B.train_markdown(lines))
    assert "| tuned:no-such-candidate | missing (failed in build: ValueError: unknown" in text
    assert "| cudnn | missing (skipped: fusedres has no backend 'cudnn'" in text

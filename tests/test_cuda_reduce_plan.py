"""The launch geometry of the CUDA reductions (bn_stats, bn_backward_reduce), checked
without a GPU (issue 22): the C++ planner (plan_reduce in csrc/cuda/bn_kernels.cu, run
through the host emulation of tests/cuda_emu) must split every ResNet-50 BN shape at batch
256 over >= 2 blocks per SM of an H100/H200 (132 SMs) in both layouts, in partitions of
equal counts that the merge kernel's closed form can weigh; the emulated kernels must match
float64 at shapes that cross each of the planner's thresholds."""
import importlib.util
import os
import sys

import pytest
import torch

from fusedres import reference as ref
from fusedres.bench.cases import RESNET50_OPS

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SMS = 132
MIN_BLOCKS = 2 * SMS
K_ROWS, K_MAX_PARTS, K_THREADS = 4, 1024, 256  # bn_kernels.cu: kRows, kMaxParts, kThreads


@pytest.fixture(scope="module")
def emu():
    sys.path.insert(0, os.path.join(HERE, "cuda_emu"))
    import build  # tests/cuda_emu/build.py
    ops = build.load_emu_ops("libemu_reduce_plan.so")
    if ops is None:
        pytest.skip("the CUDA host emulation needs g++ and the CUDA headers")
    return ops


def _strides(n, c, s, cl):
    return (s * c, 1, c) if cl else (c * s, s, 1)


def _resnet50_shapes():
    return sorted({(256, c, h * h) for _, _, c, h in RESNET50_OPS})


def test_constants_match_source():
    src = open(os.path.join(ROOT, "csrc", "cuda", "bn_kernels.cu")).read()
    for name, value in (("kRows", K_ROWS), ("kMaxParts", K_MAX_PARTS), ("kThreads", K_THREADS)):
        assert f"constexpr int{'64_t' if name == 'kMaxParts' else ''} {name} = {value};" in src


def _check_plan(plan, shape, esz=2):
    """The planner's invariants; returns the block count."""
    n, c, s = shape
    m = n * s
    assert 1 <= plan["P"] <= K_MAX_PARTS
    # every partition but the last holds part_elems elements of each channel, the last
    # the rest (> 0): the counts the merge kernel weighs partitions with
    assert (plan["P"] - 1) * plan["part_elems"] < m <= plan["P"] * plan["part_elems"]
    if plan["inner"]:
        assert plan["tx"] * plan["ty"] == K_THREADS
        # partitions are whole block steps: every thread of a full partition has the same count
        assert plan["per_part"] % (plan["ty"] * K_ROWS) == 0
        assert plan["gx"] * plan["tx"] * (16 // esz if plan["vec"] else 1) >= c
    else:
        assert plan["gx"] == c
    return plan["gx"] * plan["P"]


@pytest.mark.parametrize("backward", [False, True], ids=["stats", "backward"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_resnet50_grids_fill_the_gpu(emu, dtype, layout, backward):
    cl = layout == "cl"
    rows = []
    for shape in _resnet50_shapes():
        plan = emu.reduce_plan(shape, _strides(*shape, cl), dtype, backward)
        assert plan["inner"] == cl, (shape, plan)
        assert plan["vec"] == (cl or shape[2] % 8 == 0), (shape, plan)
        rows.append((shape, _check_plan(plan, shape, dtype.itemsize), plan))
    thin = [(s, b) for s, b, _ in rows if b < MIN_BLOCKS]
    assert not thin, f"fewer than {MIN_BLOCKS} blocks: {thin}"


def test_grid_check_can_fail(emu):
    # The check above sees a thin grid: batch 2 at 7x7x512 gives 98 rows, one block step.
    shape = (2, 512, 49)
    plan = emu.reduce_plan(shape, _strides(*shape, True))
    assert _check_plan(plan, shape) < MIN_BLOCKS


def test_static_replica_matches_planner(emu):
    # scripts/static_cuda.py computes reduce_inner's grid in Python for its bytes-in-flight
    # figure: it must be the planner's.
    spec = importlib.util.spec_from_file_location(
        "static_cuda", os.path.join(ROOT, "scripts", "static_cuda.py"))
    static_cuda = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(static_cuda)
    for dtype, kernel in ((torch.bfloat16, "__nv_bfloat16"), (torch.float32, "float")):
        for mode in (0, 1):
            row = {"kernel": f"reduce_inner_kernel<{kernel}, {mode}, 8, 0>",
                   "load_bytes_before_first_use": 64}
            for shape in _resnet50_shapes() + [(64, 512, 49), (2, 512, 49), (8, 64, 3136)]:
                esz = 2 if dtype == torch.bfloat16 else 4
                got = static_cuda.reduce_inner_in_flight(row, *shape, esz)["blocks"]
                plan = emu.reduce_plan(shape, _strides(*shape, True), dtype, mode == 1)
                assert got == plan["gx"] * plan["P"], (kernel, mode, shape)


# Shapes across the planner's thresholds (small enough for the emulator, but one):
# one partition shorter than a block step; several partitions, the last one short;
# several steps per partition with a partial last one (fp32 statistics and every
# backward take >= 2 steps); TX = 1 (bf16, C = 8: 256 row lanes); the scalar inner path
# (C % 8 != 0 in bf16); channel-outer vector units and scalar tiles over 2 partitions.
# And P = kMaxParts with a short last partition (bf16 statistics only: 1024 emulated
# blocks, slow).
THRESHOLD_CASES = [
    ("cl", (1, 64, 20)),
    ("cl", (2, 256, 33)),
    ("cl", (3, 64, 700)),
    ("cl", (4, 8, 260)),
    ("cl", (2, 12, 300)),
    ("nchw", (3, 2, 4096)),
    ("nchw", (5, 2, 3001)),
]
MAX_PARTS_CASE = ("cl", (1, 256, 32763))


def _plan_of(emu, i, dtype=torch.bfloat16, backward=False):
    layout, shape = THRESHOLD_CASES[i] if i >= 0 else MAX_PARTS_CASE
    return emu.reduce_plan(shape, _strides(*shape, layout == "cl"), dtype, backward)


def test_threshold_cases_cross_the_thresholds(emu):
    bf16, fp32 = torch.bfloat16, torch.float32
    p = _plan_of(emu, 0)
    assert p["P"] == 1 and p["per_part"] > 20
    p = _plan_of(emu, 1)
    assert p["P"] == 3 and (p["P"] - 1) * p["part_elems"] < 66 < p["P"] * p["part_elems"]
    for dtype, bwd in ((fp32, False), (bf16, True), (fp32, True)):
        p = _plan_of(emu, 2, dtype, bwd)
        step = p["ty"] * K_ROWS
        # 2 steps or more per partition, the last partition and its last step partial
        assert p["per_part"] >= 2 * step and 2100 % p["per_part"] and 2100 % step, (dtype, p)
    assert _plan_of(emu, 3)["tx"] == 1 and _plan_of(emu, 3)["P"] == 2
    p = _plan_of(emu, 4)
    assert p["inner"] and not p["vec"] and p["P"] > 1
    p = _plan_of(emu, 5)
    assert not p["inner"] and p["vec"] and p["P"] == 2
    p = _plan_of(emu, 6)
    assert not p["inner"] and not p["vec"] and p["P"] == 2
    p = _plan_of(emu, -1)
    assert p["P"] == K_MAX_PARTS and 32763 % p["part_elems"] != 0


def _make(shape, layout, dtype, seed, mean=3.0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    if layout == "cl":
        n, c, s = shape
        t = t.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    return t


def _check_stats(emu, x, cl, tol=2e-6):
    mean, var = emu.bn_stats(x, cl)
    m64, v64 = ref.bn_stats(x.double())
    torch.testing.assert_close(mean.double(), m64, rtol=tol, atol=tol * 3)
    torch.testing.assert_close(var.double(), v64, rtol=1e-5, atol=1e-7)
    return m64


@pytest.mark.parametrize("layout,shape", THRESHOLD_CASES,
                         ids=[f"{lay}-{n}x{c}x{s}" for lay, (n, c, s) in THRESHOLD_CASES])
def test_emulated_reductions_match_float64(emu, layout, shape):
    cl = layout == "cl"
    for dtype in (torch.bfloat16, torch.float32):
        x = _make(shape, layout, dtype, 1)
        m64 = _check_stats(emu, x, cl)
        dout = _make(shape, layout, dtype, 2, mean=0.0, std=1.0)
        c = shape[1]
        g = torch.Generator().manual_seed(3)
        scale, shift = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
        mean_f = m64.float()
        mask = ref.pack_mask(torch.rand(shape, generator=g) < 0.7, cl)
        sg, sgx = emu.bn_backward_reduce(dout, x, mean_f, scale, shift, mask, True, cl)
        sg64, sgx64 = ref.bn_backward_reduce(dout.double(), x.double(), mean_f.double(),
                                             scale.double(), shift.double(), mask, True, cl)
        scale_g = dout.double().abs().sum((0, 2)).clamp_min(1)
        assert ((sg.double() - sg64).abs() / scale_g).max() < 1e-5, (dtype, "sum g")
        assert ((sgx.double() - sgx64).abs() / (scale_g * 0.5)).max() < 1e-5, (dtype, "sum gx")


@pytest.mark.slow
def test_emulated_statistics_at_max_parts(emu):
    layout, shape = MAX_PARTS_CASE
    _check_stats(emu, _make(shape, layout, torch.bfloat16, 4), True)

"""Numerics of the fused BN pipelines against float64, with torch's own error as the yardstick.

For each case the same inputs (rounded to the dtype under test) go through
  * the truth: the torch composite (``F.batch_norm`` [+ residual / second BN] [+ ReLU])
    in float64 on the rounded inputs,
  * torch at the dtype under test (the yardstick; its worse layout is not used: the
    same layout as the fused run),
  * the fused pipeline of each backend this machine has: ``cpu`` (the C++ kernels, on
    each instruction-set cap), ``reference_primitives`` and the CUDA kernels through
    the host emulation of tests/cuda_emu (its four primitives under the same Python
    pipeline).
Every output is judged by its relative L2 error against the truth: the fused error must
stay within ``RATIO`` x torch's, or under a floor at float64's level (where torch is
exact to the last bits): the output, every gradient (input, weight, bias, residual,
shortcut input/weight/bias) and the updated running statistics.

The shapes cross each internal threshold of the C++ CPU kernels (csrc/cpu/
bn_cpu_kernels.h): vector tails (C or S not a multiple of 8/16 lanes), the 4-row groups
of the channels-inner reductions, several 64 Ki-element reduction chunks (rows: N*S >
65536/C; planes: S > 65536), the 32 Ki-element elementwise blocks and the
non-temporal-store threshold of large outputs (2 MiB per thread). Means/spreads from 0/1
to 1e3/1e-2.
"""
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F

import fusedres
from fusedres import functional as FF
from fusedres import ops

HERE = os.path.dirname(os.path.abspath(__file__))
HAS_CPU = "cpu" in fusedres.available_backends()
RATIO = 2.0
# Floor on the relative L2 error: two unit roundoffs of float32, the accumulation dtype.
# torch's CPU batch norm accumulates in double and rounds most results once (~3e-8), so a
# value the fused pipeline rounds to float32 a few times (the running statistics through
# the float32 update, a gradient from float32 products) can sit at 2-3x of that without
# any accumulation error; the errors this file is about grow with the mean/spread and the
# size (1e-6 .. 1e-2 before the fix).
FLOOR = 2.0**-23

REGIMES = {"0/1": (0.0, 1.0), "10/0.5": (10.0, 0.5), "1e3/1e-2": (1e3, 1e-2)}
KINDS = ["bn", "bn_relu", "bn_add_relu", "dual"]
ISAS = ["default", "avx2", "avx512"]


# ---- the three implementations of one case ----------------------------------------------


def make_case(shape, dtype, regime, kind, channels_last, seed):
    """Inputs in the dtype under test (x, dout, residual/shortcut) and float32 parameters."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    mean, std = REGIMES[regime]
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def act(m, s):  # per-channel offsets around the regime's mean, as a conv output has
        off = (torch.rand(1, c, 1, 1, generator=g, dtype=torch.float64) - 0.5) * s
        t = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * s + m + off
        return t.to(dtype).contiguous(memory_format=fmt)

    def param(lo, hi):
        return (torch.rand(c, generator=g, dtype=torch.float64) * (hi - lo) + lo).float()

    case = dict(x=act(mean, std), weight=param(0.5, 1.5), bias=param(-0.2, 0.2),
                dout=act(0.0, 1.0), rm=param(-1, 1), rv=param(0.5, 2.0))
    if kind == "bn_add_relu":
        case["residual"] = act(0.0, 1.0)
    if kind == "dual":
        case.update(x2=act(mean, std), weight2=param(0.5, 1.5), bias2=param(-0.2, 0.2),
                    rm2=param(-1, 1), rv2=param(0.5, 2.0))
    return case


EMU_PRIMITIVES = []  # the emulated CUDA primitives, once the emu fixture has built them


def run(case, kind, impl, dtype=None):
    """Output, every gradient and the running statistics of one training step: impl is
    ``"torch"`` (composite, cast to ``dtype``), a fusedres backend name, or ``"cuda-emu"``:
    the ``reference_primitives`` pipeline on the emulated CUDA kernels' four primitives."""
    if impl == "cuda-emu":
        real = ops.primitives
        ops.primitives = lambda b: EMU_PRIMITIVES[0] if b == "reference_primitives" else real(b)
        try:
            return run(case, kind, "reference_primitives", dtype)
        finally:
            ops.primitives = real
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    leaves = {k: cast(v) if k in ("x", "x2", "residual") else v.clone()
              for k, v in case.items() if k not in ("dout", "rm", "rv", "rm2", "rv2")}
    if dtype == torch.float64:
        leaves = {k: v.double() for k, v in leaves.items()}
    leaves = {k: v.detach().requires_grad_() for k, v in leaves.items()}
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rm, rv = case["rm"].to(acc, copy=True), case["rv"].to(acc, copy=True)
    rm2 = case["rm2"].to(acc, copy=True) if "rm2" in case else None
    rv2 = case["rv2"].to(acc, copy=True) if "rv2" in case else None
    x, w, b = leaves["x"], leaves["weight"], leaves["bias"]
    if impl == "torch":
        out = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
        if kind == "dual":
            out = out + F.batch_norm(leaves["x2"], rm2, rv2, leaves["weight2"], leaves["bias2"],
                                     True, 0.1, 1e-5)
        if kind == "bn_add_relu":
            out = out + leaves["residual"]
        if kind != "bn":
            out = torch.relu(out)
    elif kind == "dual":
        out = FF.dual_batch_norm_add_relu(x, leaves["x2"], rm, rv, w, b, rm2, rv2,
                                          leaves["weight2"], leaves["bias2"], True, 0.1, 1e-5,
                                          backend=impl)
    else:
        out = FF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, relu=kind != "bn",
                            residual=leaves.get("residual"), backend=impl)
    out.backward(case["dout"].to(out.dtype))
    res = {"out": out.detach()}
    for k, v in leaves.items():
        res["d" + k] = v.grad
    res.update(running_mean=rm, running_var=rv)
    if rm2 is not None:
        res.update(running_mean2=rm2, running_var2=rv2)
    return {k: v.detach().double() for k, v in res.items()}


def rel_l2(a, t):
    den = t.norm().item()
    num = (a - t).norm().item()
    return num / den if den > 0 else num


def relaid(case, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {k: v.contiguous(memory_format=fmt) if v.dim() == 4 else v for k, v in case.items()}


def errors(case, kind, impl, dtype, torch_best_layout=False):
    """{result: (fused error, torch's error)}; torch's in the case's layout, or with
    ``torch_best_layout`` the smaller of its NCHW and channels_last errors."""
    truth = run(case, kind, "torch", torch.float64)
    theirs = {k: rel_l2(v, truth[k]) for k, v in run(case, kind, "torch", dtype).items()}
    if torch_best_layout:
        for cl in (False, True):
            other = run(relaid(case, cl), kind, "torch", dtype)
            theirs = {k: min(e, rel_l2(other[k], truth[k])) for k, e in theirs.items()}
    ours = run(case, kind, impl)
    assert ours["out"].shape == truth["out"].shape
    return {k: (rel_l2(ours[k], truth[k]), theirs[k]) for k in truth}


def check(case, kind, impl, dtype, label="", torch_best_layout=False):
    """Every result within RATIO x torch's error (+ FLOOR). A kernel backend may instead
    match the same pipeline on exact primitives (``reference_primitives``: statistics in
    double, rounded to the float32 per-channel vectors every backend passes between its
    primitives) to 1.1x: what that interface itself costs is not the kernels' error. At
    mean 1e3 / std 1e-2 the float32 rounding of the mean is up to 3e-3 of the spread and
    decides which elements a ReLU passes, in every backend alike."""
    errs = errors(case, kind, impl, dtype, torch_best_layout)
    bad = {k for k, (e, t) in errs.items() if not (e <= RATIO * t + FLOOR)}
    pipeline = {}
    if bad and impl != "reference_primitives":
        pipeline = {k: e for k, (e, _) in errors(case, kind, "reference_primitives", dtype).items()}
        bad = {k for k in bad if not (errs[k][0] <= 1.1 * pipeline[k] + FLOOR)}
    report = {k: f"fused {errs[k][0]:.3g} vs torch {errs[k][1]:.3g} "
                 f"({errs[k][0] / max(errs[k][1], 1e-300):.1f}x), exact primitives "
                 f"{pipeline.get(k, float('nan')):.3g}" for k in sorted(bad)}
    assert not report, f"{impl} {label}: over {RATIO}x torch's error: {report}"


# ---- cases -----------------------------------------------------------------------------

# (N, C, H, W) crossing the CPU kernels' thresholds (see the module docstring).
SHAPES = {
    "issue_16x8x32x32": (16, 8, 32, 32),    # rows: 2 chunks of 8192 rows; planes: 1024
    "issue_64x16x7x7": (64, 16, 7, 7),      # planes of 49 (tails), 4 chunks of rows
    "tails_3x19x5x7": (3, 19, 5, 7),        # C, S off the vector width; 105 rows: 1 left over
    "c1_5x1x9x9": (5, 1, 9, 9),             # one channel: planes in both layouts
    "blocks_2x24x33x33": (2, 24, 33, 33),   # elementwise blocks of 32 Ki elements, partial
}
SLOW_SHAPES = {
    "issue_8x32x56x56": (8, 32, 56, 56),    # 50176 rows: 25 chunks; planes of 3136
    "planes_1x3x257x257": (1, 3, 257, 257),  # S = 66049 > 65536: 2 plane segments, tail
    "stream_16x32x56x56": (16, 32, 56, 56),  # 6.4 MB fp32 outputs: non-temporal stores
}


def backends():
    out = ["reference_primitives"]
    if HAS_CPU:
        out.append("cpu")
    return out


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("FUSEDRES_CPU_ISA", request.param)
    return request.param


def test_issue_case_channels_last_large_mean(isa):
    """The issue's first case: BN-ReLU, channels_last 16x8x32x32, mean 1e3 std 1e-2, against
    torch's better layout (its channels_last kernel alone is 100x worse here)."""
    if not HAS_CPU:
        pytest.skip("fusedres._C has no CPU kernels")
    case = make_case((16, 8, 32, 32), torch.float32, "1e3/1e-2", "bn_relu", True, 0)
    check(case, "bn_relu", "cpu", torch.float32, isa, torch_best_layout=True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_cpu_fp32(shape, regime, channels_last, isa):
    """fp32, every instruction set, both layouts, every regime; the op kind cycles with
    the shape so each kind meets every regime."""
    if not HAS_CPU:
        pytest.skip("fusedres._C has no CPU kernels")
    i = list(SHAPES).index(shape)
    for kind in (KINDS[i % 4], KINDS[(i + 1) % 4]):
        case = make_case(SHAPES[shape], torch.float32, regime, kind, channels_last, i)
        check(case, kind, "cpu", torch.float32, f"{isa} {kind}")


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("shape", list(SLOW_SHAPES), ids=list(SLOW_SHAPES))
def test_cpu_fp32_large(shape, regime, channels_last):
    """The chunk, segment and streaming-store thresholds, on the widest instruction set."""
    if not HAS_CPU:
        pytest.skip("fusedres._C has no CPU kernels")
    kind = KINDS[list(SLOW_SHAPES).index(shape) % 4 + 1 if shape != "stream_16x32x56x56" else 1]
    case = make_case(SLOW_SHAPES[shape], torch.float32, regime, kind, channels_last, 1)
    check(case, kind, "cpu", torch.float32, f"{isa} {kind}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("backend", backends())
def test_half(backend, regime, channels_last, dtype):
    """16-bit inputs (fp32 parameters and statistics), every kind, on the widest ISA."""
    for i, kind in enumerate(KINDS):
        shape = [(16, 8, 32, 32), (3, 19, 5, 7), (64, 16, 7, 7), (2, 24, 33, 33)][i]
        case = make_case(shape, dtype, regime, kind, channels_last, 10 + i)
        check(case, kind, backend, dtype, kind)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("regime", list(REGIMES))
def test_reference_primitives_fp32(regime, channels_last, request):
    if regime == "0/1":  # the dual case on C=1 (405 values): dweight2 2.6e-7 vs torch 1.2e-8
        request.applymarker(pytest.mark.xfail(
            strict=True, reason="fusedres/reference.py's bn_backward_reduce sums g*(x - mean) "
                                "in float32 (torch's float sum); outside the kernels"))
    for i, kind in enumerate(KINDS):
        shape = list(SHAPES.values())[i]
        case = make_case(shape, torch.float32, regime, kind, channels_last, 20 + i)
        check(case, kind, "reference_primitives", torch.float32, kind)


def random_cases(count, seed=2026):
    """Seeded random draws (a fixed set, so CI is reproducible): shapes with tails, row
    groups and up to a few chunks, every kind, layout, regime and ISA."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        n, c, h, w = rng.randint(1, 9), rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 12)
        if n * h * w < 2:  # one value per channel: torch's training BN refuses it
            continue
        out.append(((n, c, h, w), rng.choice(list(REGIMES)), rng.choice(KINDS),
                    rng.random() < 0.5, rng.choice([torch.float32, torch.bfloat16]),
                    rng.choice(ISAS), rng.randrange(2**16)))
    return out


@pytest.mark.parametrize("shape,regime,kind,channels_last,dtype,isa_cap,seed",
                         random_cases(24))
def test_cpu_random(shape, regime, kind, channels_last, dtype, isa_cap, seed, monkeypatch):
    if not HAS_CPU:
        pytest.skip("fusedres._C has no CPU kernels")
    monkeypatch.setenv("FUSEDRES_CPU_ISA", isa_cap)
    case = make_case(shape, dtype, regime, kind, channels_last, seed)
    check(case, kind, "cpu", dtype, f"{isa_cap} {kind} {shape}")


# ---- the CUDA kernels through the host emulation ----------------------------------------


@pytest.fixture(scope="module")
def emu():
    import shutil
    if shutil.which("g++") is None:
        pytest.skip("the CUDA host emulation needs g++")
    sys.path.insert(0, os.path.join(HERE, "cuda_emu"))
    import build  # tests/cuda_emu/build.py
    try:
        lib = build.build("libemu_numerics.so")
    except SystemExit:
        pytest.skip("the CUDA host emulation needs the CUDA headers")
    os.environ["EMU_LIB"] = lib
    import emu_ops
    return emu_ops


@pytest.fixture
def emu_backend(emu):
    """The Python pipeline of the ``reference_primitives`` backend on the emulated CUDA
    primitives: the kernels' statistics and backward sums under the same finalize math."""
    if not EMU_PRIMITIVES:
        EMU_PRIMITIVES.append(ops.Primitives(emu.bn_stats, emu.bn_apply,
                                             emu.bn_backward_reduce, emu.bn_backward_apply))
    return "cuda-emu"


# Small enough for the emulator (one std::thread per CUDA thread), still several blocks
# of rows/planes per channel.
EMU_SHAPES = [(4, 8, 16, 16), (3, 19, 5, 7), (16, 4, 7, 7)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("dtype", [torch.float32,
                                   pytest.param(torch.bfloat16, marks=pytest.mark.slow)],
                         ids=["fp32", "bf16"])
def test_cuda_emulated(emu_backend, dtype, regime, channels_last):
    for i, shape in enumerate(EMU_SHAPES):
        kind = KINDS[(i + 1) % 4]
        case = make_case(shape, dtype, regime, kind, channels_last, 30 + i)
        check(case, kind, emu_backend, dtype, f"{kind} {shape}")

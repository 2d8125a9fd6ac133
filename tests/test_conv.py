"""Tests of the Triton implicit-GEMM conv (kernels/conv.py) and its ops (fusedres/conv.py).

On a machine without a GPU the Triton kernels run in the interpreter on CPU tensors
(TRITON_INTERPRET=1 is set here, before triton is imported); shapes are small.
Everything is compared with F.conv2d and the reference BN math, in float64 where exact
agreement is expected.
"""
import itertools
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fusedres  # noqa: E402,F401
from fusedres import conv as fconv  # noqa: E402

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K = fconv.kernels()


@pytest.fixture(autouse=True)
def ieee_fp32():
    """fp32 is compared at 1e-5..1e-4 here: TF32 (torch's default for cuDNN convs, which
    the Triton conv follows, ``kernels.conv._input_precision``) would round both the
    Triton conv and cuDNN's reference to ~1e-3 on a GPU. Off in every test; the TF32
    tests turn it on themselves."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old

# (name, N, C_in, H, W, C_out, kernel, stride, padding): every conv kind ResNets use,
# odd channel counts, N=1, H=W=1.
CASES = [
    ("stem7x7s2", 1, 3, 13, 11, 8, 7, 2, 3),
    ("3x3s1", 2, 5, 7, 7, 6, 3, 1, 1),
    ("3x3s2", 1, 8, 9, 8, 65, 3, 2, 1),
    ("1x1s1", 2, 65, 5, 5, 5, 1, 1, 0),
    ("1x1s2", 2, 16, 6, 7, 8, 1, 2, 0),
    ("1x1_hw1", 3, 4, 1, 1, 5, 1, 1, 0),
    ("3x3s2_c16", 2, 16, 7, 6, 16, 3, 2, 1),  # tap-major K loop (C % BLOCK_K == 0)
]
IDS = [c[0] for c in CASES]


def _make(case, dtype=torch.float64, channels_last=True, requires_grad=False):
    _, n, ci, h, w, co, k, st, pd = case
    g = torch.Generator().manual_seed(hash(case[0]) % 1000)
    x = torch.randn(n, ci, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(co, ci, k, k, generator=g, dtype=torch.float64) / (ci * k * k) ** 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        wt = wt.contiguous(memory_format=torch.channels_last)
    x = x.to(DEVICE, dtype).requires_grad_(requires_grad)
    wt = wt.to(DEVICE, dtype).requires_grad_(requires_grad)
    return x, wt, st, pd


def _scale_shift(ci, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(ci)
    scale = (torch.rand(ci, generator=g, dtype=torch.float64) + 0.5)
    scale[::2] *= -1
    shift = torch.rand(ci, generator=g, dtype=torch.float64) * 0.5 + 0.1  # positive: pitfall
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (scale.to(DEVICE, acc).requires_grad_(requires_grad),
            shift.to(DEVICE, acc).requires_grad_(requires_grad))


def _ref_bn_relu(x, scale, shift):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.relu(x.to(acc) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)


def _ref_stats(y):
    var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    return mean, var


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_conv2d_forward(case):
    x, w, st, pd = _make(case)
    b = torch.randn(w.shape[0], dtype=w.dtype, device=DEVICE)
    assert fconv.conv_path(x, w, b, st, pd, backend="triton")[0] == "triton"
    y = fconv.conv2d(x, w, b, st, pd, backend="triton")
    torch.testing.assert_close(y, F.conv2d(x, w, b, st, pd))
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_conv2d_forward_nchw_fp32():
    x, w, st, pd = _make(CASES[1], torch.float32, channels_last=False)
    torch.testing.assert_close(fconv.conv2d(x, w, None, st, pd, backend="triton"),
                               F.conv2d(x, w, None, st, pd), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_conv_stats_forward(case):
    x, w, st, pd = _make(case, torch.float32)
    y, mean, var = fconv.conv2d_stats(x, w, st, pd, backend="triton")
    ref = F.conv2d(x.double(), w.double(), None, st, pd)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert mean.dtype == var.dtype == torch.float32
    m_ref, v_ref = _ref_stats(y)  # statistics of y as rounded to the output dtype
    torch.testing.assert_close(mean.double(), m_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), v_ref, rtol=1e-5, atol=1e-6)


def test_stats_large_mean_no_cancellation():
    x, w, st, pd = _make(CASES[3], torch.float32)
    b = torch.full((w.shape[0],), 1000.0, device=DEVICE)
    y0, _, _ = K.conv_fwd(x, w, st, pd, bias=b, stats=False)
    y, mean, var = K.conv_fwd(x, w, st, pd, bias=b, stats=True)
    m_ref, v_ref = _ref_stats(y0)
    torch.testing.assert_close(mean.double(), m_ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(var.double(), v_ref, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[1]], ids=["stem", "3x3s2", "3x3s1"])
def test_prologue_padding_pitfall(case):
    """Padded taps are 0 after relu(x*scale + shift) even though shift > 0."""
    x, w, st, pd = _make(case)
    scale, shift = _scale_shift(x.shape[1])
    y, mean, var = fconv.bn_relu_conv2d_stats(x, scale, shift, w, st, pd, backend="triton")
    ref = F.conv2d(_ref_bn_relu(x, scale, shift), w, None, st, pd)
    torch.testing.assert_close(y, ref)
    m_ref, v_ref = _ref_stats(ref)
    torch.testing.assert_close(mean, m_ref)
    torch.testing.assert_close(var, v_ref)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=["3x3s1", "1x1s2"])
def test_bias_add_relu(case, relu):
    x, w, st, pd = _make(case)
    b = torch.randn(w.shape[0], dtype=w.dtype, device=DEVICE)
    y0 = F.conv2d(x, w, b, st, pd)
    res = torch.randn_like(y0)
    y = fconv.conv2d_bias_add_relu(x, w, b, res, st, pd, relu=relu, backend="triton")
    ref = torch.relu(y0 + res) if relu else y0 + res
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("centred", [False, True], ids=["plain", "centred"])
def test_bias_add_relu_with_prologue_and_grads(centred):
    x, w, st, pd = _make(CASES[0], requires_grad=True)  # stem: padding 3 with shift > 0
    scale, shift = _scale_shift(x.shape[1], requires_grad=True)
    b = torch.randn(w.shape[0], dtype=w.dtype, device=DEVICE, requires_grad=True)
    centre = (torch.linspace(-0.5, 0.5, x.shape[1], dtype=x.dtype, device=DEVICE)
              .requires_grad_() if centred else None)
    leaves = [x, w, b, scale, shift] + ([centre] if centred else [])
    outs, grads = [], []
    for backend in ("triton", "reference"):
        y = fconv.conv2d_bias_add_relu(x, w, b, None, st, pd, relu=True, scale=scale,
                                       shift=shift, centre=centre, backend=backend)
        outs.append(y)
        grads.append(torch.autograd.grad((y * y).sum(), leaves))
    torch.testing.assert_close(outs[0], outs[1])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_relu_epilogue_propagates_nan():
    x, w, st, pd = _make(CASES[3])
    x = x.clone()
    x[0, :, 0, 0] = float("nan")
    y = fconv.conv2d_bias_add_relu(x, w, None, None, st, pd, relu=True, backend="triton")
    assert torch.isnan(y[0, :, 0, 0]).all()
    ref = torch.relu(F.conv2d(x, w, None, st, pd))
    torch.testing.assert_close(y, ref, equal_nan=True)


def test_fp16_forward():
    """fp16 error bounded by a multiple of PyTorch's own fp16 error (fp64 reference)."""
    case = CASES[2]
    x, w, st, pd = _make(case, torch.float16)
    scale, shift = _scale_shift(x.shape[1], torch.float16)
    y, mean, var = fconv.bn_relu_conv2d_stats(x, scale, shift, w, st, pd, backend="triton")
    assert y.dtype == torch.float16 and mean.dtype == torch.float32
    a = _ref_bn_relu(x, scale, shift)
    ref64 = F.conv2d(a.double(), w.double(), None, st, pd)
    if DEVICE == "cpu":
        y32 = F.conv2d(a.float(), w.float(), None, st, pd)  # CPU fp16 conv: round fp32
        torch_err = (y32.half().double() - ref64).abs().max()
    else:
        torch_err = (F.conv2d(a, w, None, st, pd).double() - ref64).abs().max()
    err = (y.double() - ref64).abs().max()
    assert err <= 4 * torch_err + 1e-3, (err, torch_err)
    m_ref, v_ref = _ref_stats(y)
    torch.testing.assert_close(mean.double(), m_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(var.double(), v_ref, rtol=1e-4, atol=1e-4)


def test_bf16_unpacked_by_its_bits():
    """The prologue's bf16 -> fp32 by the bits (``_as_f32``: the bf16 prologue's path on a
    GPU, whose conv the interpreter cannot judge) is bit-exact against torch for all
    65,536 bf16 values (NaN payloads, infinities, -0, subnormals)."""
    import triton
    import triton.language as tl

    @triton.jit
    def unpack(X_ptr, Y_ptr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y_ptr + i, K._as_f32(tl.load(X_ptr + i)))

    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.bfloat16).to(DEVICE)
    y = torch.empty(x.shape, dtype=torch.float32, device=DEVICE)
    unpack[(x.numel() // 4096,)](x, y, BLOCK=4096)
    assert torch.equal(y.view(torch.int32), x.float().view(torch.int32))


@pytest.mark.cuda  # run by scripts/gpu_run.sh's tests stage (-m cuda)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 does not run in the interpreter")
def test_bf16_forward_cuda():
    x, w, st, pd = _make(CASES[2], torch.bfloat16)
    y, mean, var = fconv.conv2d_stats(x, w, st, pd, backend="triton")
    ref = F.conv2d(x.double(), w.double(), None, st, pd)
    assert (y.double() - ref).abs().max() < 5e-2
    m_ref, v_ref = _ref_stats(y)
    torch.testing.assert_close(mean.double(), m_ref, rtol=1e-3, atol=1e-3)


def _spy_launches(monkeypatch):
    """The kernel switches (kwargs) of every conv launch, in order."""
    seen = []
    launch = K._launch
    monkeypatch.setattr(K, "_launch", lambda run, cfgs, grid, args, kw: seen.append(kw)
                        or launch(run, cfgs, grid, args, kw))
    return seen


# The TMA tests run everywhere (the interpreter on CPU); marked cuda only where a GPU runs
# them, so that scripts/gpu_run.sh's tests stage (-m cuda) takes them there and its CPU
# dry run does not spend minutes on them in the interpreter.
ALSO_ON_GPU = pytest.mark.cuda if DEVICE == "cuda" else (lambda test: test)


# C % 16 == 0: the tap-major K loop, so the TMA operands (issue 21) run in the interpreter
TMA_CASES = [("3x3s1_c32", 2, 32, 6, 5, 24, 3, 1, 1),  # A: boxes of x per tap, padding
             ("3x3s1_3img", 3, 16, 3, 3, 20, 3, 1, 1),  # boxes of 2 images, a partial one
             ("1x1s1_c32", 2, 32, 5, 5, 20, 1, 1, 0),  # 1x1 GEMM: A and B by TMA, M tail
             ("3x3s2_even", 2, 16, 8, 6, 20, 3, 2, 1),  # boxes of the stride-2 view
             ("1x1s2_even", 3, 32, 6, 4, 24, 1, 2, 0),  # the downsample 1x1, stride 2
             ("3x3s2_c16", 2, 16, 7, 6, 16, 3, 2, 1)]  # odd H: B by TMA, A by pointers


@ALSO_ON_GPU
@pytest.mark.parametrize("case", TMA_CASES, ids=[c[0] for c in TMA_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + (
    [torch.bfloat16] if DEVICE == "cuda" else []))  # the interpreter's bf16 dot is wrong
def test_tma_operands_forward(monkeypatch, case, dtype):
    """The TMA paths (weights as [C_out, R*S*C_in]; the 1x1 conv's activations as
    [N*H*W, C_in]; a stride-1 conv's as boxes of [N, H, W, C_in] per tap, a stride-2
    conv's as boxes of [N, H/2, 2, W/2, 2*C_in]; zero fill past
    C_out, M and the image) with the BN-ReLU prologue (padded taps 0 after it) and the
    statistics (spatial tiles count their rows): y, mean, var against float64 (16-bit:
    a multiple of PyTorch's own error)."""
    if K.TensorDescriptor is None:
        pytest.skip("this triton has no host TMA descriptors")
    seen = _spy_launches(monkeypatch)
    x, w, st, pd = _make(case, dtype)
    scale, shift = _scale_shift(x.shape[1], dtype)
    y, mean, var = K.conv_fwd(x, w, st, pd, scale=scale, shift=shift, stats=True)
    _, _, _, h, w_, _, k, st, pd = case
    a_tma = (1 if (k, st, pd) == (1, 1, 0) else 2 if st == 1
             else 3 if st == 2 and h % 2 == 0 and w_ % 2 == 0 else 0)
    if DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9:
        assert seen[0]["W_TMA"] and seen[0]["A_TMA"] == a_tma, seen[0]
        # the output by TMA where A is and the rows of y are 16-byte multiples
        rows_ok = w.shape[0] * x.element_size() % 16 == 0
        assert seen[0]["Y_TMA"] == (min(a_tma, 2) if rows_ok else 0), seen[0]
    a = _ref_bn_relu(x, scale, shift)
    ref = F.conv2d(a.double(), w.double(), None, st, pd)
    if dtype != torch.float32:
        torch_err = (F.conv2d(a.float(), w.float(), None, st, pd).to(dtype).double()
                     - ref).abs().max()
        tol = 4 * torch_err + 1e-6
    else:
        tol = 1e-4 if DEVICE == "cpu" else 1e-2  # TF32 on a GPU
    assert (y.double() - ref).abs().max() <= tol
    m_ref, v_ref = _ref_stats(y)
    torch.testing.assert_close(mean.double(), m_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(var.double(), v_ref, rtol=1e-4, atol=1e-4)


# The forward prologue's tiles at their real sizes (the interpreter otherwise runs
# _INTERPRETER_TILE): the two-warpgroup 256-row tile beside the one-warpgroup 128-row one,
# as conv_fwd gets them (one box shape, TILE_H x TILE_W of the 128-row tile; the 256-row
# tile takes twice the images). C_in a multiple of BLOCK_K 64.
M256_CASES = [("1x1s1", 3, 64, 9, 10, 136, 1, 1, 0),  # GEMM: 270 rows (a tail), 2 N tiles
              ("3x3s1", 3, 64, 10, 10, 72, 3, 1, 1),  # 8x16 boxes over 10x10: edges, 3 of 4
              ("3x3s2", 3, 64, 12, 10, 64, 3, 2, 1),  # boxes of the stride-2 view
              ("1x1s2", 3, 128, 10, 8, 64, 1, 2, 0)]  # 2 channel blocks per tap


@ALSO_ON_GPU
@pytest.mark.parametrize("case", M256_CASES, ids=[c[0] for c in M256_CASES])
@pytest.mark.parametrize("rows", [256, 128])
@pytest.mark.parametrize("dtype", [torch.float16] + (
    [torch.bfloat16] if DEVICE == "cuda" else []))  # the interpreter's bf16 dot is wrong
def test_prologue_tiles_256_and_128_rows(monkeypatch, case, rows, dtype):
    """The BN-ReLU prologue + statistics forward with the real prologue tiles (BLOCK_K
    64), the one with ``rows`` rows pinned (deterministic mode: the first config) and the
    other in the list (the launcher sizes the boxes and the grid for both): y, mean, var
    against float64. (The stride-2 rows run the 256-row tile here, which conv_configs
    offers at stride 1 only.)"""
    if K.TensorDescriptor is None:
        pytest.skip("this triton has no host TMA descriptors")
    tiles = [t for t in K._CONV_TILES["prologue"] if t[2] == 64]
    wide = next(t for t in tiles if t[0] == 256)  # the two-warpgroup tile
    narrow = tiles[0]
    assert narrow[0] == 128 and narrow[1] == wide[1]
    pinned, other = (wide, narrow) if rows == 256 else (narrow, wide)
    monkeypatch.setattr(K, "conv_configs", lambda **kw: K._configs(
        K._in_budget([pinned, other], kw["itemsize"], kw["budget"])))
    seen, used, launch = _spy_launches(monkeypatch), [], K._launch
    monkeypatch.setattr(K, "_launch", lambda *a: used.append(launch(*a)) or used[-1])
    x, w, st, pd = _make(case, dtype)
    scale, shift = _scale_shift(x.shape[1], dtype)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        y, mean, var = K.conv_fwd(x, w, st, pd, scale=scale, shift=shift, stats=True)
    finally:
        torch.use_deterministic_algorithms(old)
    _, n, _, h, w_, _, k, st, pd = case
    p, q = K.out_size(h, w_, k, k, st, pd)
    a_tma = 1 if (k, st, pd) == (1, 1, 0) else (2 if st == 1 else 3)
    if DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9:
        assert seen[0]["A_TMA"] == a_tma and seen[0]["Y_TMA"] == min(a_tma, 2), seen[0]
    assert (used[0]["BLOCK_M"], used[0]["BLOCK_N"], used[0]["BLOCK_K"]) == pinned[:3]
    if seen[0]["A_TMA"] > 1:  # the 128-row tile's box: 128 / (TILE_H * TILE_W) images
        assert (seen[0]["TILE_H"], seen[0]["TILE_W"]) == K.pixel_box(n, p, q, 128)[1:]
    a = _ref_bn_relu(x, scale, shift)
    ref = F.conv2d(a.double(), w.double(), None, st, pd)
    torch_err = (F.conv2d(a.float(), w.float(), None, st, pd).to(dtype).double()
                 - ref).abs().max()
    assert (y.double() - ref).abs().max() <= 4 * torch_err + 1e-6
    m_ref, v_ref = _ref_stats(y)
    torch.testing.assert_close(mean.double(), m_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(var.double(), v_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(DEVICE != "cpu", reason="counts the interpreter's dots")
def test_tiles_past_the_batch_run_no_k_step(monkeypatch):
    """With the 256-row prologue tile in the list GEMM_M covers the images rounded up to
    its TILE_N (2 here), so at batch 1 the 128-row tile's grid has a second, empty M tile
    per box: it must run no K step (before, it did all nine taps on the zero fill: twice
    the work at batch 1) and still leave y and the statistics right (counted 0)."""
    if K.TensorDescriptor is None:
        pytest.skip("this triton has no host TMA descriptors")
    from triton.runtime import interpreter

    tiles = [t for t in K._CONV_TILES["prologue"] if t[2] == 64]
    narrow, wide = tiles[0], next(t for t in tiles if t[0] == 256)
    monkeypatch.setattr(K, "conv_configs", lambda **kw: K._configs(
        K._in_budget([narrow, wide], kw["itemsize"], kw["budget"])))
    dots, create_dot = [], interpreter.InterpreterBuilder.create_dot
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, *a: dots.append(1) or create_dot(self, *a))
    seen = _spy_launches(monkeypatch)
    case = ("n1_8x16", 1, 64, 8, 16, 128, 3, 1, 1)  # one 8x16 box: 128 rows, one image
    x, w, st, pd = _make(case, torch.float16)
    scale, shift = _scale_shift(64, torch.float16)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # the 128-row tile
    try:
        y, mean, var = K.conv_fwd(x, w, st, pd, scale=scale, shift=shift, stats=True)
    finally:
        torch.use_deterministic_algorithms(old)
    assert seen[0]["A_TMA"] == 2 and (seen[0]["TILE_H"], seen[0]["TILE_W"]) == (8, 16)
    assert len(dots) == 9  # one tile of 9 taps x 1 channel block; not 18
    a = _ref_bn_relu(x, scale, shift)
    ref = F.conv2d(a.double(), w.double(), None, st, pd)
    torch_err = (F.conv2d(a.float(), w.float(), None, st, pd).to(x.dtype).double()
                 - ref).abs().max()
    assert (y.double() - ref).abs().max() <= 4 * torch_err + 1e-6
    m_ref, v_ref = _ref_stats(y)
    torch.testing.assert_close(mean.double(), m_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(var.double(), v_ref, rtol=1e-4, atol=1e-4)


DGRAD_TMA_CASES = [("3x3s1", 2, 24, 6, 5, 32, 3, 1, 1),  # C_in 24: boxes cross taps
                   ("3x3s2", 2, 16, 8, 6, 16, 3, 2, 1),  # boxes of a phase, even sizes
                   ("1x1s1", 2, 40, 5, 5, 32, 1, 1, 0),
                   # stride 2 (boxes of one phase's dx pixels): odd sizes, where the
                   # phases differ in size (a box of the largest wholly outside another)
                   ("3x3s2_odd_n3", 3, 16, 7, 9, 32, 3, 2, 1),
                   ("3x3s2p0_n1", 1, 24, 9, 8, 16, 3, 2, 0),  # pad 0: the last row of dx
                   # is reached by no tap of phase 1; C_in 24: the weight's boxes cross taps
                   ("1x1s2_odd_n3", 3, 16, 7, 5, 32, 1, 2, 0),  # 3 of 4 phases: no tap
                   ("1x1s2_even_n1", 1, 32, 6, 4, 16, 1, 2, 0),
                   ("3x3s3", 2, 16, 8, 7, 16, 3, 3, 1),  # 9 phases, one tap each
                   # one stride 1, the other 2 (phase 0 no constant); padding > kernel/2
                   ("5x5s21p3", 2, 24, 7, 6, 16, 5, (2, 1), 3),
                   ("3x3s12p2_h1", 3, 16, 1, 7, 16, 3, (1, 2), 2)]


@ALSO_ON_GPU
@pytest.mark.parametrize("case", DGRAD_TMA_CASES, ids=[c[0] for c in DGRAD_TMA_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "dbn+drelu"])
def test_tma_weights_dgrad(monkeypatch, case, dtype, fused):
    """dgrad reads the weight by TMA as [BLOCK_K, BLOCK_N] boxes of [C_out, R*S*C_in]
    (columns past C_in land in the next tap or the zero fill and are masked) and dy as
    boxes of [N, P, Q, C_out] per tap over boxes of dx (A_TMA=2; at stride 2 boxes of
    one phase's dx pixels, grid axis 1); with the dBN prologue and the dReLU epilogue:
    dx, sum(g), sum(g*y_prev) against float64."""
    if K.TensorDescriptor is None:
        pytest.skip("this triton has no host TMA descriptors")
    seen = _spy_launches(monkeypatch)
    x, w, st, pd = _make(case, dtype)
    y = F.conv2d(x.double(), w.double(), None, st, pd)
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    d, kw = dy, {}
    if fused:
        co, ci = w.shape[:2]
        coef_y = torch.randn(co, generator=g, dtype=torch.float64)
        coef_c = torch.randn(co, generator=g, dtype=torch.float64)
        scale, shift = _scale_shift(ci, dtype)
        acc = torch.float32
        y16 = y.to(dtype)
        kw = dict(y=y16.to(DEVICE).contiguous(memory_format=torch.channels_last),
                  coef_y=coef_y.to(DEVICE, acc), coef_c=coef_c.to(DEVICE, acc),
                  y_prev=x, scale=scale, shift=shift)
        d = dy.to(dtype).double() + y16.double() * coef_y.view(1, -1, 1, 1) \
            + coef_c.view(1, -1, 1, 1)
    dy = dy.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    dx, sum_g, sum_gx = K.conv_dgrad(dy, w, x.shape[2:], st, pd, **kw)
    if DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9:
        assert seen[0]["W_TMA"] and seen[0]["A_TMA"] == 2, seen[0]
    ref = torch.nn.grad.conv2d_input(x.shape, w.double(), d.to(DEVICE), st, pd)
    tol = 1e-4 if dtype == torch.float32 and DEVICE == "cpu" else 2e-2
    if fused:
        pre = x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
        gref = torch.where(pre <= 0, torch.zeros_like(ref), ref)
        for got, want in ((sum_g, gref.sum((0, 2, 3))), (sum_gx, (gref * x).sum((0, 2, 3)))):
            assert (got.double() - want).abs().max() <= tol * (1 + want.abs().max())
        ref = gref * scale.double().view(1, -1, 1, 1)
    assert (dx.double() - ref).abs().max() <= tol * (1 + ref.abs().max())


def test_box_grid_past_int32_takes_the_pointer_path(monkeypatch):
    """A grid of TMA boxes is padded past the pixels (8-column boxes over 33 columns; at
    n = 1 a box of 32 images over one): where it, not the GEMM sizes, reaches the int32
    limit (``_INDEX_LIMIT``, lowered here), the forward and dgrad read A by pointers --
    they raised ValueError on a shape ``conv_path`` had accepted (n*H*W < 2**31)."""
    if K.TensorDescriptor is None:
        pytest.skip("this triton has no host TMA descriptors")
    seen = _spy_launches(monkeypatch)
    monkeypatch.setattr(K, "_INDEX_LIMIT", 150)
    # forward 3x3, 4 x 33 output: 132 pixels, GEMM_K 144, 5 boxes of 1 x 4 x 8 = 160 rows
    # (``pixel_box``)
    x, w, st, pd = _make(("fwd_pad", 1, 16, 4, 33, 16, 3, 1, 1), torch.float32)
    y, mean, _ = K.conv_fwd(x, w, st, pd, stats=True)
    ref = F.conv2d(x.double(), w.double(), None, st, pd)
    assert seen[-1]["A_TMA"] == 0
    assert (y.double() - ref).abs().max() <= 1e-4 * (1 + ref.abs().max())
    torch.testing.assert_close(mean.double(), ref.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    # dgrad 1x1 stride 2, dx 1 x 2: 2 pixels, GEMM_K 16, one box of 32 images (32 rows)
    monkeypatch.setattr(K, "_INDEX_LIMIT", 20)
    x, w, st, pd = _make(("dgrad_pad", 1, 16, 1, 2, 16, 1, 2, 0), torch.float32)
    dy = torch.randn(1, 16, 1, 1, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    scale, shift = _scale_shift(16, torch.float32)
    dx, sum_g, _ = K.conv_dgrad(dy, w, x.shape[2:], st, pd, y_prev=x, scale=scale,
                                shift=shift)
    assert seen[-1]["A_TMA"] == 0 and seen[-1]["DRELU"]
    ref = torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double(), st, pd)
    pre = x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    g = torch.where(pre <= 0, torch.zeros_like(ref), ref)
    assert (dx.double() - g * scale.double().view(1, -1, 1, 1)).abs().max() <= 1e-5
    assert (sum_g.double() - g.sum((0, 2, 3))).abs().max() <= 1e-5


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's tile: 16-pixel boxes")
@pytest.mark.parametrize("limit", [None, 500], ids=["flat", "offsets_past_int32"])
def test_wgrad_1x1_flat_row_only_where_its_offsets_fit_int32(monkeypatch, limit):
    """wgrad of a dense 1x1 stride-1 conv walks one row of N*H*W pixels, whose pointer
    offsets (column times channels: N*H*W*C) are int32 in the kernel: where they reach
    the int32 limit (``_INDEX_LIMIT``, lowered here) it walks boxes of each image
    instead (offsets within an image). C_in 16: x by pointers. dW against float64."""
    if limit is not None:
        monkeypatch.setattr(K, "_INDEX_LIMIT", limit)
    seen = _spy_launches(monkeypatch)
    case = ("wgrad_1x1_flat", 2, 16, 4, 4, 24, 1, 1, 0)  # N*H*W*C_out = 768 > 500
    x, w, st, pd = _make(case, torch.float32)
    dy = torch.randn(2, 24, 4, 4, generator=torch.Generator().manual_seed(3),
                     dtype=torch.float64)
    dw = K.conv_wgrad(dy.to(DEVICE, torch.float32).contiguous(
        memory_format=torch.channels_last), x, w.shape, st, pd)
    assert seen[0]["TMA"] == 0, seen[0]
    # flat: one row (TILE_H 1, BLOCK_K pixels wide); per image: 4 x 4 boxes
    assert (seen[0]["TILE_H"], seen[0]["TILE_W"]) == ((1, 16) if limit is None
                                                      else (4, 4)), seen[0]
    ref = torch.nn.grad.conv2d_weight(x.double().cpu(), w.shape, dy, st, pd)
    assert (dw.double().cpu() - ref).abs().max() <= 1e-4 * (1 + ref.abs().max())


@pytest.mark.skipif(DEVICE != "cpu", reason="counts the interpreter's dots")
def test_dgrad_s2_boxes_outside_a_phase_run_no_k_step(monkeypatch):
    """Stride-2 dgrad by TMA boxes of a phase: the grid covers the largest phase (dx rows
    h with (h + pad) % 2 == a), so where H is odd a smaller phase's last row of boxes lies
    wholly outside it: it runs no K step (no dot) and stores nothing, and dx is right."""
    if K.TensorDescriptor is None:
        pytest.skip("this triton has no host TMA descriptors")
    from triton.runtime import interpreter

    dots, create_dot = [], interpreter.InterpreterBuilder.create_dot
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, *a: dots.append(1) or create_dot(self, *a))
    seen = _spy_launches(monkeypatch)
    # dx 5 x 64, pad 1: phase rows a = 0 (h = 1, 3), a = 1 (h = 0, 2, 4); columns: 32 each.
    # Boxes of 1 row x 32 columns (BLOCK_M 32): 3 row boxes per phase, the third outside
    # the phase a = 0
    case = ("s2_odd_rows", 1, 16, 5, 64, 16, 3, 2, 1)
    x, w, st, pd = _make(case, torch.float32)
    y = F.conv2d(x.double(), w.double(), None, st, pd)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    dx, _, _ = K.conv_dgrad(dy.to(DEVICE, torch.float32).contiguous(
        memory_format=torch.channels_last), w, x.shape[2:], st, pd)
    assert seen[0]["A_TMA"] == 2 and (seen[0]["TILE_H"], seen[0]["TILE_W"]) == (1, 32)
    # taps per phase (a, b): r in a + 2j < 3 -> 2 (a = 0) or 1 (a = 1), s likewise; one
    # channel block. Phase a = 0 has 2 row boxes with steps, a = 1 has 3; each one column box
    taps = {(a, b): (2 - a) * (2 - b) for a in (0, 1) for b in (0, 1)}
    assert len(dots) == sum(t * (2 if a == 0 else 3) for (a, b), t in taps.items())
    ref = torch.nn.grad.conv2d_input(x.shape, w.double(), dy, st, pd)
    assert (dx.double() - ref).abs().max() <= 1e-4 * (1 + ref.abs().max())


PERSISTENT_CASES = [("many_tiles", 2, 8, 9, 9, 40, 3, 1, 1),  # C_in 8: A by pointers
                    # the 1x1 TMA GEMM: its tile and K loops flattened (FLATTEN), 10 tiles
                    ("1x1_flat", 4, 32, 6, 6, 40, 1, 1, 0)]


@pytest.mark.parametrize("case", PERSISTENT_CASES, ids=[c[0] for c in PERSISTENT_CASES])
@pytest.mark.parametrize("prologue", [False, True])
def test_plain_forward_is_persistent(monkeypatch, prologue, case):
    """The forward without a prologue runs a persistent grid (fewer programs than tiles,
    each walking several tiles in grouped order; 3 programs in the interpreter), the 1x1
    GEMM as one flattened tile x K loop; with the prologue one program per tile. Either
    way y (and its statistics) equal F.conv2d's in float64."""
    seen, grids = _spy_launches(monkeypatch), []
    launch = K._launch
    monkeypatch.setattr(K, "_launch", lambda run, cfgs, grid, args, kw: grids.append(
        (grid(cfgs[0].kwargs), -(-args[-5] // cfgs[0].kwargs["BLOCK_M"])
         * -(-args[-4] // cfgs[0].kwargs["BLOCK_N"]))) or launch(run, cfgs, grid, args, kw))
    x, w, st, pd = _make(case, torch.float32)  # a TMA dtype (the interpreter emulates it)
    kw = dict(zip(("scale", "shift"), _scale_shift(x.shape[1], x.dtype))) if prologue else {}
    y, mean, var = K.conv_fwd(x, w, st, pd, stats=True, **kw)
    a = _ref_bn_relu(x, kw["scale"], kw["shift"]) if prologue else x
    ref = F.conv2d(a.double(), w.double(), None, st, pd)
    assert (y.double() - ref).abs().max() <= 1e-4
    m_ref, v_ref = _ref_stats(y)
    torch.testing.assert_close(mean.double(), m_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(var.double(), v_ref, rtol=1e-4, atol=1e-4)
    (grid, tiles), = grids
    tma_gemm = case[0] == "1x1_flat" and K.TensorDescriptor is not None
    assert seen[-1]["PERSISTENT"] == (not prologue)
    assert seen[-1]["A_TMA"] == (1 if tma_gemm else 0) and seen[-1]["Y_TMA"] == seen[-1]["A_TMA"]
    assert seen[-1]["FLATTEN"] == (tma_gemm and not prologue and K.FLATTEN_PERSISTENT)
    assert grid[0] == (min(tiles, K._persistent_programs(x)) if not prologue else tiles)
    assert prologue or grid[0] < tiles


WGRAD_TMA_CASES = [("3x3s1_c32", 2, 32, 6, 5, 24, 3, 1, 1),  # boxes of x per tap, padding
                   ("1x1s1_flat", 3, 32, 5, 3, 40, 1, 1, 0),  # one row of N*H*W pixels
                   ("3x3s2_even", 2, 32, 8, 6, 24, 3, 2, 1),  # boxes of the stride-2 view
                   ("1x1s2_even", 3, 32, 6, 4, 24, 1, 2, 0),
                   ("3x3s2_odd", 2, 32, 7, 6, 16, 3, 2, 1),  # odd H: pointers
                   # boxes of 4 images x 2 x 2 tile the rows and columns, not the batch
                   ("3x3s1_exact", 3, 32, 2, 2, 24, 3, 1, 1)]


@ALSO_ON_GPU
@pytest.mark.parametrize("case", WGRAD_TMA_CASES, ids=[c[0] for c in WGRAD_TMA_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "dbn+bnrelu"])
def test_tma_wgrad(monkeypatch, case, dtype, fused):
    """wgrad over boxes of output pixels (TILE_N x TILE_H x TILE_W per K step, split in
    two): dy (and y) by TMA boxes, x by a box per tap (stride 1, the stride-2 view) or
    pointers; with the dBN prologue on dy and the BN-ReLU prologue on x (padded taps 0
    after it): dW against float64."""
    if K.TensorDescriptor is None:
        pytest.skip("this triton has no host TMA descriptors")
    seen = _spy_launches(monkeypatch)
    x, w, st, pd = _make(case, dtype)
    _, n, ci, h, w_, co, k, _, _ = case
    g = torch.Generator().manual_seed(5)
    y = F.conv2d(x.double(), w.double(), None, st, pd)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    kw, a, d = {}, x.double(), dy
    if fused:
        scale, shift = _scale_shift(ci, dtype)
        coef_y = torch.randn(co, generator=g, dtype=torch.float64)
        coef_c = torch.randn(co, generator=g, dtype=torch.float64)
        y = y.to(dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        kw = dict(y=y.to(DEVICE).contiguous(memory_format=torch.channels_last),
                  coef_y=coef_y.to(DEVICE, acc), coef_c=coef_c.to(DEVICE, acc),
                  scale=scale, shift=shift)
        a = _ref_bn_relu(x, scale, shift).double()
        d = dy.to(dtype).double() + y.double() * coef_y.view(1, -1, 1, 1) \
            + coef_c.view(1, -1, 1, 1)
    dy = dy.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    dw = K.conv_wgrad(dy, x, w.shape, st, pd, **kw)
    even = st == 1 or (h % 2 == 0 and w_ % 2 == 0)
    if DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9:
        assert seen[0]["TMA"] == ((2 if st == 1 else 3) if even else 0), seen[0]
    ref = torch.nn.grad.conv2d_weight(a, w.shape, d.to(DEVICE), st, pd)
    tol = 1e-4 if dtype == torch.float32 and DEVICE == "cpu" else 2e-2
    assert (dw.double() - ref).abs().max() <= tol * (1 + ref.abs().max())


@ALSO_ON_GPU
@pytest.mark.parametrize("swap", [0, 1], ids=["x'-as-B", "x'-as-A"])
@pytest.mark.parametrize("layout", ["tma", "pointers"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16] if DEVICE == "cuda"
                         else [torch.float16])
def test_wgrad_prologue_non_finite_coefficients(monkeypatch, dtype, layout, swap):
    """wgrad's BN-ReLU prologue on channels with non-finite coefficients, as eager's
    relu(x*scale + shift), in both MMA orientations (``SWAP_AB``: x' as A, its padding
    NaN-filled and a max that does not propagate NaN against ``floor``): shift = -inf
    with a finite scale (0 too) gives x' = 0, so a finite dW, as eager's; shift = +inf,
    an infinite scale and a NaN scale or shift give a non-finite dW, as eager's. The
    other channels' dW against float64."""
    case = ("3x3s1_c32", 2, 32, 6, 5, 24, 3, 1, 1)
    x, w, st, pd = _make(case, dtype, channels_last=layout == "tma")
    ci = x.shape[1]
    scale, shift = _scale_shift(ci, dtype)
    inf, nan = float("inf"), float("nan")
    special = {0: (None, -inf), 1: (0.0, -inf), 2: (None, inf), 3: (nan, None),
               4: (None, nan), 5: (inf, None)}
    for c, (sc, sh) in special.items():
        scale[c] = scale[c] if sc is None else sc
        shift[c] = shift[c] if sh is None else sh
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(x.shape[0], w.shape[0], 6, 5, generator=g, dtype=torch.float64)
    dy = dy.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    real = K.wgrad_configs

    def oriented(*args, **kw):  # every config in the orientation under test
        cfgs = real(*args, **kw)
        for c in cfgs:
            c.kwargs["SWAP_AB"] = swap
        return cfgs

    monkeypatch.setattr(K, "wgrad_configs", oriented)
    # the list's first config, pinned (an autotuned choice would be kept per shape)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    seen = _spy_launches(monkeypatch)
    dw = K.conv_wgrad(dy, x, w.shape, st, pd, scale=scale, shift=shift).double().cpu()
    if DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9:
        assert seen[0]["TMA"] == (2 if layout == "tma" else 0), seen[0]
    a = _ref_bn_relu(x, scale, shift).double().cpu()
    ref = torch.nn.grad.conv2d_weight(a, w.shape, dy.double().cpu(), st, pd)
    for c in special:  # finite exactly where eager's is
        assert torch.equal(dw[:, c].isfinite(), ref[:, c].isfinite()), (
            c, special[c], dw[:, c].isfinite().float().mean())
    finite = ref.isfinite()
    assert (dw[finite] - ref[finite]).abs().max() <= 2e-2 * (1 + ref[finite].abs().max())


@pytest.mark.parametrize("case", [("3x3s1_n3", 3, 32, 6, 5, 24, 3, 1, 1),  # TMA boxes
                                  ("3x3s2_odd_n3", 3, 32, 7, 6, 16, 3, 2, 1)],  # pointers
                         ids=["tma", "pointers"])
def test_wgrad_flattened_walks_whole_splits(monkeypatch, case):
    """wgrad with its item and pixel loops flattened (FLATTEN, off by default: the
    trip count may not depend on the item, so every split walks TILES_PER_SPLIT boxes):
    9 pixel boxes in 2 splits of 5, the last box past the batch adds exactly 0, with both
    prologues (whose shift would make a non-masked zero box count). dW against float64."""
    monkeypatch.setattr(K, "FLATTEN_WGRAD", True)
    seen = _spy_launches(monkeypatch)
    x, w, st, pd = _make(case, torch.float32)
    _, n, ci, h, w_, co, k, _, _ = case
    g = torch.Generator().manual_seed(7)
    y = F.conv2d(x.double(), w.double(), None, st, pd)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    scale, shift = _scale_shift(ci, torch.float32)
    coef_y = torch.randn(co, generator=g, dtype=torch.float64)
    coef_c = torch.randn(co, generator=g, dtype=torch.float64)
    y = y.float().contiguous(memory_format=torch.channels_last)
    dw = K.conv_wgrad(dy.float().contiguous(memory_format=torch.channels_last), x, w.shape,
                      st, pd, y=y, coef_y=coef_y.float(), coef_c=coef_c.float(), scale=scale,
                      shift=shift)
    assert seen[0]["FLATTEN"]
    d = dy.float().double() + y.double() * coef_y.view(1, -1, 1, 1) + coef_c.view(1, -1, 1, 1)
    ref = torch.nn.grad.conv2d_weight(_ref_bn_relu(x, scale, shift).double(), w.shape, d,
                                      st, pd)
    assert (dw.double() - ref).abs().max() <= 1e-4 * (1 + ref.abs().max())


def _wgrad_dbn(x, w, st, pd, dtype, seed, **kw):
    """conv_wgrad with the dBN prologue (and ``kw``: the BN-ReLU one) on random dy and y =
    conv(x) in ``dtype``, channels_last, coef_c ~ 30 (so that any pixel past the output
    that is not zeroed counts). Returns dW and the float64 dy' of those operands."""
    g = torch.Generator().manual_seed(seed)
    co = w.shape[0]
    y = F.conv2d(x.double(), w.double(), None, st, pd).to(dtype)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=g).to(dtype)
    coef_y = torch.randn(co, generator=g, dtype=torch.float64)
    coef_c = 30.0 + torch.randn(co, generator=g, dtype=torch.float64)
    cl = torch.channels_last
    dw = K.conv_wgrad(dy.to(DEVICE).contiguous(memory_format=cl), x, w.shape, st, pd,
                      y=y.to(DEVICE).contiguous(memory_format=cl),
                      coef_y=coef_y.to(DEVICE, torch.float32),
                      coef_c=coef_c.to(DEVICE, torch.float32), **kw)
    d = dy.double() + y.double() * coef_y.float().double().view(1, -1, 1, 1) \
        + coef_c.float().double().view(1, -1, 1, 1)
    return dw, d


@ALSO_ON_GPU
@pytest.mark.parametrize("flatten", [False, True], ids=["", "flattened"])
@pytest.mark.parametrize("case", WGRAD_TMA_CASES, ids=[c[0] for c in WGRAD_TMA_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_wgrad_dbn_alone_masks_dy_only_where_x_is_not_zero(monkeypatch, case, dtype,
                                                           flatten):
    """wgrad's dBN prologue alone: dy' = dy + y*coef_y + coef_c is coef_c at the pixels of
    a box past the output (TMA zero-fills dy and y there), so it is zeroed by the pixel
    mask (``MASK_DY``) where x's box is not zero there (3x3 over a box that overhangs the
    output's rows or columns: a tap reads the image's last rows and columns; past the
    batch x is zero-filled), not at 1x1 unpadded convs (the one-row flat box, the stride-2
    view: past the output is past x) nor on the pointer path (x masked), but always in
    fp16 (coef_c alone can overflow it: ``test_wgrad_dbn_fp16_constant_past_fp16_range``).
    coef_c ~ 30 makes any such pixel count; flattened, the last split's boxes past the
    batch too. dW against float64 of the operands' dy'."""
    if K.TensorDescriptor is None:
        pytest.skip("this triton has no host TMA descriptors")
    monkeypatch.setattr(K, "FLATTEN_WGRAD", flatten)
    seen = _spy_launches(monkeypatch)
    x, w, st, pd = _make(case, dtype)
    _, n, ci, h, w_, co, k, _, _ = case
    dw, d = _wgrad_dbn(x, w, st, pd, dtype, 13)
    tma = seen[0]["TMA"]
    if DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9:
        even = st == 1 or (h % 2 == 0 and w_ % 2 == 0)
        assert tma == ((2 if st == 1 else 3) if even else 0), seen[0]
    p, q = K.out_size(h, w_, k, k, st, pd)
    overhang = bool(p % seen[0]["TILE_H"] or q % seen[0]["TILE_W"])
    assert overhang == (case[0] != "3x3s1_exact") or k == 1, seen[0]
    assert seen[0]["MASK_DY"] == (dtype == torch.float16 or bool(tma) and k != 1
                                  and overhang), seen[0]
    assert seen[0]["FLATTEN"] == flatten
    ref = torch.nn.grad.conv2d_weight(x.double().cpu(), w.shape, d, st, pd)
    tol = 1e-4 if dtype == torch.float32 else 2e-3  # fp16: dy' rounded to the operand
    err = (dw.double().cpu() - ref).abs().max() / (1 + ref.abs().max())
    assert err <= tol, (err, seen[0])


# 16-pixel boxes (the interpreter's BLOCK_K): 2x2 outputs tile 4 images a box exactly, the
# third image's box past the batch; 5x5 ones overhang the box's rows and columns
SWAPPED_MASK_CASES = [("exact_past_batch", 3, 32, 2, 2, 24, 3, 1, 1),
                      ("overhang", 2, 32, 5, 5, 24, 3, 1, 1)]


@pytest.mark.parametrize("flatten", [False, True], ids=["", "flattened"])
@pytest.mark.parametrize("case", SWAPPED_MASK_CASES, ids=[c[0] for c in SWAPPED_MASK_CASES])
def test_wgrad_dbn_swapped_prologue_dy_unmasked_past_the_batch(monkeypatch, case, flatten):
    """bf16's dBN + BN-ReLU wgrad on CPU: x' as wgmma's A (``SWAP_AB``) with dy' unmasked
    where no box overhangs the output (``wgrad_mask_dy``'s 16-bit rule; the interpreter has
    no bf16, so fp16 runs it with the rule bf16 gets, coef_c well inside fp16). Past the
    batch dy' is coef_c alone and x' must be exactly 0 there: the NaN fill of x's box, 0
    after the prologue's max (the unswapped prologue would make relu(shift) of a zero
    fill, which its kernel masks). Flattened, whole splits past the batch too. dW against
    float64; the mask's value as the rule says."""
    if K.TensorDescriptor is None:
        pytest.skip("this triton has no host TMA descriptors")
    real_configs, real_mask = K.wgrad_configs, K.wgrad_mask_dy

    def swapped(*args, **kw):
        cfgs = real_configs(*args, **kw)
        for c in cfgs:
            c.kwargs["SWAP_AB"] = 1
        return cfgs

    monkeypatch.setattr(K, "wgrad_configs", swapped)
    monkeypatch.setattr(K, "wgrad_mask_dy", lambda dbn, tma, unpadded_1x1, overhang, fp16:
                        real_mask(dbn, tma, unpadded_1x1, overhang, False))
    monkeypatch.setattr(K, "FLATTEN_WGRAD", flatten)
    seen, launch = [], K._launch
    monkeypatch.setattr(K, "_launch", lambda run, cfgs, grid, args, kw: seen.append(
        dict(kw, **cfgs[0].kwargs)) or launch(run, cfgs, grid, args, kw))
    x, w, st, pd = _make(case, torch.float16)
    _, n, ci, h, w_, co, k, _, _ = case
    scale, shift = _scale_shift(ci, torch.float16)  # shift > 0: relu(shift) is not 0
    dw, d = _wgrad_dbn(x, w, st, pd, torch.float16, 17, scale=scale, shift=shift)
    kw = seen[0]
    if DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9:
        assert kw["TMA"] == 2 and kw["SWAP_AB"] == 1 and kw["FLATTEN"] == flatten, kw
    overhang = bool(h % kw["TILE_H"] or w_ % kw["TILE_W"])
    assert overhang == (case[0] == "overhang"), kw
    if not overhang:  # a box holds more images than the batch has left
        assert n % (kw["BLOCK_K"] // (kw["TILE_H"] * kw["TILE_W"])), kw
    assert kw["MASK_DY"] == (overhang and kw["TMA"] != 0), kw
    a = _ref_bn_relu(x, scale, shift).double().cpu()
    ref = torch.nn.grad.conv2d_weight(a, w.shape, d, st, pd)
    err = (dw.double().cpu() - ref).abs().max() / (1 + ref.abs().max())
    assert err <= 2e-3, (err, kw)


@pytest.mark.parametrize("k", [1, 3], ids=["1x1", "3x3"])
def test_wgrad_dbn_fp16_constant_past_fp16_range(k):
    """fp16 wgrad with the dBN prologue where coef_c is past fp16's range but dy' = dy +
    y*coef_y + coef_c is not (y's mean 1000 times coef_y 100 cancels coef_c = -1e5; a
    BN input with a large mean over its std, or a loss-scaled dy): dW is finite, as
    eager's (dy' materialised in fp32, rounded once). Pixels of a box past the output get
    dy' = coef_c alone, fp16(-1e5) = -inf, which a multiply by the 0/1 mask or x's zero
    fill turns into NaN (so it did before 2026-12-07 too): in fp16 ``MASK_DY`` is always
    on and selects 0 before the rounding."""
    g = torch.Generator().manual_seed(3)
    n, c, hw = 2, 32, 5  # 50 pixels: 16-pixel boxes (interpreter) run past the output
    cl = torch.channels_last
    x = torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64)
    y = 1000.0 + torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64)
    dy = torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64)
    x, y, dy = (t.to(DEVICE, torch.float16).contiguous(memory_format=cl) for t in (x, y, dy))
    coef_y = torch.full((c,), 100.0, dtype=torch.float64)
    coef_c = -1000.0 * coef_y
    dw = K.conv_wgrad(dy, x, (c, c, k, k), 1, k // 2, y=y,
                      coef_y=coef_y.to(DEVICE, torch.float32),
                      coef_c=coef_c.to(DEVICE, torch.float32)).double().cpu()
    d = dy.double().cpu() + y.double().cpu() * coef_y.view(1, -1, 1, 1) \
        + coef_c.view(1, -1, 1, 1)
    assert d.abs().max() < 1000  # the operand itself is well within fp16
    ref = torch.nn.grad.conv2d_weight(x.double().cpu(), (c, c, k, k), d, 1, k // 2)
    assert dw.isfinite().all()
    assert (dw - ref).abs().max() <= 2e-2 * (1 + ref.abs().max())


def test_deterministic():
    x, w, st, pd = _make(CASES[2], torch.float32, requires_grad=True)
    outs = []
    for _ in range(2):
        y, m, v = fconv.conv2d_stats(x, w, st, pd, backend="triton")
        gx, gw = torch.autograd.grad((y * y).sum() + m.sum() + v.sum(), [x, w])
        outs.append((y, m, v, gx, gw))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------


def _loss(y, mean, var):
    c = torch.arange(1, y.shape[1] + 1, dtype=mean.dtype, device=y.device)
    return (y * torch.cos(torch.arange(y.numel(), device=y.device).view_as(y).to(y.dtype))).sum() \
        + (mean * c).sum() + (var * c.flip(0)).sum()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_prologue_stats_grads(case):
    """Gradients of input, scale, shift and weight through (y, mean, var), vs autograd of
    the reference composite."""
    x, w, st, pd = _make(case, requires_grad=True)
    scale, shift = _scale_shift(x.shape[1], requires_grad=True)
    grads = []
    for backend in ("triton", "reference"):
        out = fconv.bn_relu_conv2d_stats(x, scale, shift, w, st, pd, backend=backend)
        grads.append(torch.autograd.grad(_loss(*out), [x, scale, shift, w]))
    for got, want, name in zip(*grads, ["input", "scale", "shift", "weight"]):
        torch.testing.assert_close(got, want, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4]], ids=["stem", "3x3s2", "1x1s2"])
def test_conv_stats_grads(case):
    x, w, st, pd = _make(case, requires_grad=True)
    grads = []
    for backend in ("triton", "reference"):
        out = fconv.conv2d_stats(x, w, st, pd, backend=backend)
        grads.append(torch.autograd.grad(_loss(*out), [x, w]))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_conv_stats_grads_y_only_and_stats_only():
    x, w, st, pd = _make(CASES[1], requires_grad=True)
    for pick in (lambda o: o[0].sum(), lambda o: o[2].sum()):
        grads = [torch.autograd.grad(pick(fconv.conv2d_stats(x, w, st, pd, backend=b)), [x, w])
                 for b in ("triton", "reference")]
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=["3x3s1", "1x1s2"])
def test_bias_add_relu_grads(case):
    x, w, st, pd = _make(case, requires_grad=True)
    b = torch.randn(w.shape[0], dtype=w.dtype, device=DEVICE, requires_grad=True)
    res = torch.randn_like(F.conv2d(x, w, b, st, pd)).requires_grad_(True)
    grads = []
    for backend in ("triton", "reference"):
        y = fconv.conv2d_bias_add_relu(x, w, b, res, st, pd, relu=True, backend=backend)
        grads.append(torch.autograd.grad(y.sum(), [x, w, b, res]))  # stride-0 dy
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_conv2d_grads_nchw_input():
    x, w, st, pd = _make(CASES[2], channels_last=False, requires_grad=True)
    grads = [torch.autograd.grad(fconv.conv2d(x, w, None, st, pd, backend=b).pow(2).sum(), [x, w])
             for b in ("triton", "reference")]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def _finalize(mean, var, gamma, beta, eps=1e-5):
    scale = gamma * torch.rsqrt(var + eps)
    return scale, beta - mean * scale


def test_two_layer_chain_matches_batch_norm():
    """conv1+stats -> finalize -> (BN-ReLU prologue) conv2+stats -> finalize -> BN-ReLU:
    every gradient equals that of the unfused F.conv2d / F.batch_norm / relu network, so
    the stats outputs' gradients supply the whole BN backward."""
    x, w1, st, pd = _make(("chain", 2, 3, 7, 7, 6, 3, 2, 1), requires_grad=True)
    g = torch.Generator().manual_seed(5)
    w2 = (torch.randn(5, 6, 3, 3, generator=g, dtype=torch.float64) / 7).to(DEVICE)
    params = [w2] + [torch.randn(c, generator=g, dtype=torch.float64).to(DEVICE)
                     for c in (6, 6, 5, 5)]
    w2, g1, b1, g2, b2 = [p.requires_grad_() for p in params]
    leaves = [x, w1, w2, g1, b1, g2, b2]

    y1, m1, v1 = fconv.conv2d_stats(x, w1, st, pd, backend="triton")
    s1, t1 = _finalize(m1, v1, g1, b1)
    y2, m2, v2 = fconv.bn_relu_conv2d_stats(y1, s1, t1, w2, 1, 1, backend="triton")
    s2, t2 = _finalize(m2, v2, g2, b2)
    z = torch.relu(y2 * s2.view(1, -1, 1, 1) + t2.view(1, -1, 1, 1))
    def loss(z, m2, v1):  # z, plus the statistics used directly
        return _loss(z, m2, m2) + (v1 * torch.arange(6, dtype=v1.dtype, device=DEVICE)).sum()

    got = torch.autograd.grad(loss(z, m2, v1), leaves)

    def bn(y, gamma, beta):
        return F.batch_norm(y, None, None, gamma, beta, training=True, eps=1e-5)

    r1 = F.conv2d(x, w1, None, st, pd)
    r2 = F.conv2d(torch.relu(bn(r1, g1, b1)), w2, None, 1, 1)
    rz = torch.relu(bn(r2, g2, b2))
    torch.testing.assert_close(z, rz)
    want = torch.autograd.grad(loss(rz, _ref_stats(r2)[0], _ref_stats(r1)[1]), leaves)
    for a, b, name in zip(got, want, ["x", "w1", "w2", "gamma1", "beta1", "gamma2", "beta2"]):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("centred", [False, True], ids=["plain", "centred"])
def test_gradcheck_prologue_stats(centred):
    """Every gradient, the prologue's centre included (relu((x - centre)*scale + shift):
    the dReLU epilogue's sum of g*(x - centre) and the centre's -scale*sum(g))."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    w = torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    scale, shift = _scale_shift(3, requires_grad=True)
    centre = torch.randn(3, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(centred)

    def fn(x, scale, shift, w, centre):
        return torch.ops.fusedres.triton_conv_prologue_stats(x, scale, shift, w, [2, 2], [1, 1],
                                                             centre if centred else None)

    assert torch.autograd.gradcheck(fn, (x, scale, shift, w, centre), eps=1e-6, atol=1e-6)


def test_gradcheck_bias_add_relu():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    r = torch.randn(1, 3, 3, 3, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()

    def fn(x, w, b, r):
        return torch.ops.fusedres.triton_conv_bias_add_relu(x, w, b, r, [1, 1], [1, 1], True)

    assert torch.autograd.gradcheck(fn, (x, w, b, r), eps=1e-6, atol=1e-6)


def test_fp16_grads():
    x, w, st, pd = _make(CASES[1], torch.float16, requires_grad=True)
    scale, shift = _scale_shift(x.shape[1], torch.float16, requires_grad=True)
    out = fconv.bn_relu_conv2d_stats(x, scale, shift, w, st, pd, backend="triton")
    got = torch.autograd.grad(_loss(*out), [x, scale, shift, w])
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    s64, t64 = scale.detach().double().requires_grad_(), shift.detach().double().requires_grad_()
    out = fconv.bn_relu_conv2d_stats(x64, s64, t64, w64, st, pd, backend="reference")
    want = torch.autograd.grad(_loss(*out), [x64, s64, t64, w64])
    for a, b in zip(got, want):
        assert a.dtype == (torch.float16 if b.dim() == 4 else torch.float32)
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


# --------------------------------------------------------------------------------------
# Ops, legality
# --------------------------------------------------------------------------------------


def test_opcheck():
    x, w, st, pd = _make(("t", 1, 3, 4, 4, 2, 3, 1, 1), requires_grad=True)
    scale, shift = _scale_shift(3, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    r = torch.randn(1, 2, 4, 4, dtype=torch.float64, device=DEVICE)
    ops = torch.ops.fusedres
    torch.library.opcheck(ops.triton_conv_stats, (x, w, [1, 1], [1, 1]))
    torch.library.opcheck(ops.triton_conv_prologue_stats, (x, scale, shift, w, [2, 2], [1, 1]))
    torch.library.opcheck(ops.triton_conv_bias_add_relu, (x, w, b, r, [1, 1], [1, 1], True))
    torch.library.opcheck(ops.triton_conv_bias_add_relu, (x, w, None, None, [2, 2], [0, 0], False))
    torch.library.opcheck(ops.triton_conv_bias_add_relu,
                          (x, w, b, None, [1, 1], [1, 1], True, scale, shift))
    centre = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ops.triton_conv_bias_add_relu,
                          (x, w, b, None, [1, 1], [1, 1], True, scale, shift, centre))
    torch.library.opcheck(ops.triton_conv_prologue_stats,
                          (x, scale, shift, w, [1, 1], [1, 1], centre))
    y = torch.randn(1, 2, 4, 4, dtype=torch.float64, device=DEVICE)
    m, dm, dv = (torch.randn(2, dtype=torch.float64, device=DEVICE) for _ in range(3))
    torch.library.opcheck(ops.triton_conv_backward,
                          (y, x.detach(), w.detach(), [1, 1], [1, 1], scale.detach(),
                           shift.detach(), y, m, dm, dv, [True, True, True]))
    torch.library.opcheck(ops.triton_conv_backward,
                          (y, x.detach(), w.detach(), [1, 1], [1, 1], None, None, None, None,
                           None, None, [True, False, False]))


def test_conv_path_legality():
    x = torch.randn(1, 4, 5, 5, device=DEVICE)
    w = torch.randn(4, 4, 3, 3, device=DEVICE)
    assert fconv.conv_path(x, w, backend="triton") == ("triton", "Triton implicit-GEMM conv")
    assert fconv.conv_path(x, w, backend="reference")[0] == "reference"
    path, why = fconv.conv_path(x, w[:, :2], groups=2, backend="triton")
    assert path == "reference" and "groups" in why
    path, why = fconv.conv_path(x, w, dilation=2, backend="triton")
    assert path == "reference" and "dilation" in why
    path, why = fconv.conv_path(x[0], w, backend="triton")
    assert path == "reference" and "4-D" in why
    path, why = fconv.conv_path(x, w, padding="same", backend="triton")
    assert path == "reference"
    if DEVICE == "cpu":
        assert fconv.conv_path(x, w)[0] == "reference"  # auto never picks the interpreter
    torch.testing.assert_close(fconv.conv2d(x, w[:, :2], None, 1, 1, 1, 2, backend="triton"),
                               F.conv2d(x, w[:, :2], None, 1, 1, 1, 2))
    torch.testing.assert_close(fconv.conv2d(x, w, None, 1, 2, 2, backend="triton"),
                               F.conv2d(x, w, None, 1, 2, 2))
    torch.testing.assert_close(fconv.conv2d(x, w, padding="same", backend="auto"),
                               F.conv2d(x, w, padding="same"))


def test_auto_is_f_conv2d_on_cuda_tensors_too():
    """The untuned safe default (issue 13): backend="auto" never picks the Triton conv,
    on (fake) CUDA tensors either, for every public conv function; "triton" named does."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), torch.device("cuda"):
        x, w = torch.randn(2, 8, 8, 8), torch.randn(16, 8, 3, 3)
        path, why = fconv.conv_path(x, w, None, 1, 1)
        assert path == "reference" and "F.conv2d" in why and "tune" in why
        if fusedres._backend.has_triton():
            assert fconv.conv_path(x, w, None, 1, 1, backend="triton")[0] == "triton"


def test_autocast_casts_input_weight_bias_only():
    x, w, st, pd = _make(CASES[1], torch.float32)
    b = torch.randn(w.shape[0], device=DEVICE)
    scale, shift = _scale_shift(x.shape[1], torch.float32)
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = fconv.conv2d(x, w, b, st, pd, backend="triton")
        y2, mean, var = fconv.bn_relu_conv2d_stats(x, scale, shift, w, st, pd, backend="triton")
    assert y.dtype == y2.dtype == torch.float16 and mean.dtype == var.dtype == torch.float32
    ref = fconv.conv2d(x.half(), w.half(), b.half(), st, pd, backend="triton")
    ref2 = fconv.bn_relu_conv2d_stats(x.half(), scale, shift, w.half(), st, pd,
                                      backend="triton")
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    for a, r in zip((y2, mean, var), ref2):
        torch.testing.assert_close(a, r, rtol=0, atol=0)


def test_meta_tensors_pass_through():
    """The meta device has no autocast: shapes only (deferred initialisation, FLOP
    counting), as F.conv2d gives them; every public function."""
    x = torch.empty(2, 5, 7, 7, device="meta")
    w = torch.empty(6, 5, 3, 3, device="meta")
    b, scale, shift = (torch.empty(n, device="meta") for n in (6, 5, 5))
    want = F.conv2d(x, w, b, 1, 1)
    for backend in ("auto", "reference"):
        assert fconv.conv_path(x, w, b, 1, 1, backend=backend)[0] == "reference"
        y = fconv.conv2d(x, w, b, 1, 1, backend=backend)
        assert y.device.type == "meta" and y.shape == want.shape
        y, mean, var = fconv.conv2d_stats(x, w, 1, 1, backend=backend)
        assert y.shape == want.shape and mean.shape == var.shape == (6,)
        y, mean, var = fconv.bn_relu_conv2d_stats(x, scale, shift, w, 1, 1, backend=backend)
        assert y.shape == want.shape and mean.shape == (6,)
        y = fconv.conv2d_bias_add_relu(x, w, b, want, 1, 1, scale=scale, shift=shift,
                                       backend=backend)
        assert y.device.type == "meta" and y.shape == want.shape


@pytest.mark.cuda  # run by scripts/gpu_run.sh's tests stage (-m cuda)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 switch only matters on GPU")
def test_tf32_follows_cudnn_flag():
    x, w, st, pd = _make(("big", 2, 64, 16, 16, 64, 3, 1, 1), torch.float32)
    ref = F.conv2d(x.double(), w.double(), None, st, pd)
    errors = {}
    for tf32 in (False, True):
        torch.backends.cudnn.allow_tf32 = tf32
        got = fconv.conv2d(x, w, None, st, pd, backend="triton")
        errors[tf32] = (got.double() - ref).abs().max().item()
    assert errors[False] < 1e-4, errors
    assert 10 * errors[False] < errors[True] < 1e-2, errors  # TF32: a 10-bit mantissa


def test_tf32_switch_read_per_call(monkeypatch):
    """The fp32 dot's precision follows torch.backends.cudnn.allow_tf32 at each call on a
    GPU; the interpreter always computes in IEEE fp32."""
    from fusedres.kernels import conv as kconv

    monkeypatch.setattr(kconv, "INTERPRET", False)
    for tf32, want in ((True, "tf32"), (False, "ieee")):
        torch.backends.cudnn.allow_tf32 = tf32
        assert kconv._input_precision(torch.float32) == want
        assert kconv._input_precision(torch.float16) == "ieee"


@pytest.mark.slow
def test_int64_offsets():
    """The second image lies past 2**31 elements of its storage (little memory touched);
    on a GPU the op copies a non-channels_last input first, so this checks the kernels'
    int64 offsets in the interpreter."""
    n_ci, h, w_ = 4, 5, 5
    base = torch.empty(2**31 + 2 * n_ci * h * w_, dtype=torch.float16, device=DEVICE)
    step = 2**31 - 7
    x = base.as_strided((2, n_ci, h, w_), (step, 1, w_ * n_ci, n_ci))
    g = torch.Generator().manual_seed(3)
    vals = torch.randn(2, n_ci, h, w_, generator=g).half().to(DEVICE)
    x.copy_(vals)
    wt = torch.randn(3, n_ci, 3, 3, generator=g).half().to(DEVICE)
    scale, shift = _scale_shift(n_ci, torch.float16)
    scale.requires_grad_()
    shift.requires_grad_()
    wt.requires_grad_()
    results = []
    for inp in (x, vals):  # x: offsets past 2**31 in the forward, dgrad epilogue and wgrad
        out = fconv.bn_relu_conv2d_stats(inp, scale, shift, wt, 1, 1, backend="triton")
        grads = torch.autograd.grad(_loss(*out), [scale, shift, wt])
        results.append(tuple(o.detach() for o in out) + grads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_torch_compile():
    """The ops trace (fake kernels, autograd) under torch.compile; aot_eager keeps it fast."""
    x, w, st, pd = _make(CASES[1], requires_grad=True)
    scale, shift = _scale_shift(x.shape[1], requires_grad=True)

    def step(x, scale, shift, w):
        out = fconv.bn_relu_conv2d_stats(x, scale, shift, w, st, pd, backend="triton")
        return torch.autograd.grad(_loss(*out), [x, scale, shift, w])

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=False, backend="aot_eager")(x, scale, shift, w)
    want = step(x, scale, shift, w)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda  # run by scripts/gpu_run.sh's tests stage (-m cuda)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="real ResNet-50 shapes on GPU only")
@pytest.mark.parametrize("shape", [
    (8, 3, 224, 224, 64, 7, 2, 3),
    (8, 64, 56, 56, 64, 3, 1, 1),
    (8, 256, 56, 56, 128, 1, 1, 0),
    (8, 128, 56, 56, 128, 3, 2, 1),
    (8, 512, 28, 28, 1024, 1, 2, 0),
], ids=["stem", "3x3_64", "1x1_256_128", "3x3s2_128", "1x1s2_512_1024"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_resnet50_shapes_cuda(shape, dtype):
    torch.backends.cudnn.allow_tf32 = True  # torch's default: what a user's model runs
    x, w, st, pd = _make(("r50",) + shape, dtype, requires_grad=True)
    scale, shift = _scale_shift(x.shape[1], dtype, requires_grad=True)
    out = fconv.bn_relu_conv2d_stats(x, scale, shift, w, st, pd, backend="triton")
    got = torch.autograd.grad(_loss(*out), [x, scale, shift, w])
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    s64, t64 = scale.detach().double().requires_grad_(), shift.detach().double().requires_grad_()
    ref = fconv.bn_relu_conv2d_stats(x64, s64, t64, w64, st, pd, backend="reference")
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-2}[dtype]  # TF32
    for a, b in zip(out, ref):
        assert (a.double() - b).abs().max() <= tol * (1 + b.abs().max())
    want = torch.autograd.grad(_loss(*ref), [x64, s64, t64, w64])
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() <= tol * (1 + b.abs().max())


@pytest.mark.cuda  # run by scripts/gpu_run.sh's tests stage (-m cuda)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="real ResNet-50 shapes on GPU only")
@pytest.mark.parametrize("mode", ["fused", "materialised"])
@pytest.mark.parametrize("shape", [
    (8, 64, 56, 56, 64, 3, 1, 1),
    (8, 128, 28, 28, 128, 3, 1, 1),
    (8, 256, 56, 56, 128, 1, 1, 0),
    (8, 128, 56, 56, 128, 3, 2, 1),
], ids=["3x3_64", "3x3_128", "1x1_256_128", "3x3s2_128"])
def test_resnet50_dbn_backward_modes_cuda(monkeypatch, shape, mode):
    """Both ways of the backward's dBN term (``fusedres.conv.dbn_backward``: the dgrad and
    wgrad prologues with the constant's field E, or the materialised dy) on real ResNet-50
    shapes in bf16, where the TMA boxes and the register-A paths run, against float64.
    "auto" (test_resnet50_shapes_cuda) checks only the mode it picks."""
    monkeypatch.setattr(fconv, "dbn_backward", mode)
    x, w, st, pd = _make(("r50",) + shape, torch.bfloat16, requires_grad=True)
    scale, shift = _scale_shift(x.shape[1], torch.bfloat16, requires_grad=True)
    out = fconv.bn_relu_conv2d_stats(x, scale, shift, w, st, pd, backend="triton")
    got = torch.autograd.grad(_loss(*out), [x, scale, shift, w])
    assert fconv.last_dbn_backward() == mode
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    s64, t64 = scale.detach().double().requires_grad_(), shift.detach().double().requires_grad_()
    ref = fconv.bn_relu_conv2d_stats(x64, s64, t64, w64, st, pd, backend="reference")
    want = torch.autograd.grad(_loss(*ref), [x64, s64, t64, w64])
    for name, a, b in zip(("x", "scale", "shift", "weight"), got, want):
        err = (a.double() - b).abs().max()
        assert err <= 5e-2 * (1 + b.abs().max()), (name, float(err))


@pytest.mark.parametrize("rows_per_prog", [None, 4, 12, 1000])
def test_merge_stats_two_level(rows_per_prog):
    """Chan merge of per-tile (mean, M2) (one or two levels) equals the direct statistics,
    with a short last tile and tiles that hold nothing."""
    g = torch.Generator().manual_seed(7)
    tile_m, tiles, c = 8, 37, 5
    m = tile_m * 34 - 3  # tiles 34..36 are empty, tile 33 is short
    vals = torch.randn(m, c, generator=g, dtype=torch.float64) * 3 + 100
    pad = torch.zeros(tiles * tile_m - m, c, dtype=torch.float64)
    blocks = torch.cat([vals, pad]).view(tiles, tile_m, c)
    counts = torch.clamp(m - torch.arange(tiles) * tile_m, 0, tile_m).to(torch.float64)
    valid = torch.arange(tile_m).view(1, -1, 1) < counts.view(-1, 1, 1)
    t_mean = (blocks * valid).sum(1) / counts.clamp(min=1).view(-1, 1)
    t_m2 = (((blocks - t_mean[:, None]) * valid) ** 2).sum(1)
    t_mean[counts == 0] = float("nan")  # never read: empty tiles are masked
    t_m2[counts == 0] = float("nan")
    mean = torch.empty(c, dtype=torch.float64, device=DEVICE)
    var = torch.empty(c, dtype=torch.float64, device=DEVICE)
    K.merge_stats(t_mean.to(DEVICE), t_m2.to(DEVICE), mean, var, tiles, m, tile_m,
                  rows_per_prog=rows_per_prog)
    v_ref, m_ref = torch.var_mean(vals, dim=0, correction=0)
    torch.testing.assert_close(mean.cpu(), m_ref)
    torch.testing.assert_close(var.cpu(), v_ref)


@pytest.mark.parametrize("shape", [
    # (N, C_in, H, W, C_out, R, S, stride, pad): phases of the strided dgrad
    (2, 3, 8, 7, 5, 3, 3, 2, 0),  # pad < phase, last input row reached by no tap
    (1, 4, 9, 9, 3, 7, 7, 2, 3),
    (2, 5, 1, 3, 4, 3, 3, 2, 1),  # H=1
    (1, 3, 6, 5, 16, 1, 1, 2, 0),  # odd rows get no tap at all; tap-major K loop
    (1, 2, 7, 6, 3, 3, 1, 3, 1),  # stride 3, rectangular kernel
    (2, 3, 5, 5, 4, 2, 2, 1, 0),  # even kernel
    (1, 32, 5, 4, 16, 3, 3, 2, 1),  # tap-major wgrad N tiles and dgrad K loop
])
def test_dgrad_kernel_shapes(shape):
    n, ci, h, w, co, r, s, st, pd = shape
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, ci, h, w, generator=g, dtype=torch.float64).to(DEVICE)
    wt = torch.randn(co, ci, r, s, generator=g, dtype=torch.float64).to(DEVICE)
    y = F.conv2d(x, wt, None, st, pd)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(DEVICE)
    dx_ref, dw_ref, _ = torch.ops.aten.convolution_backward(
        dy, x, wt, None, [st, st], [pd, pd], [1, 1], False, [0, 0], 1, [True, True, False])
    dx, _, _ = K.conv_dgrad(dy, wt, (h, w), st, pd)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(K.conv_wgrad(dy, x, wt.shape, st, pd), dw_ref)
    # dReLU epilogue: the forward input was relu(x*scale + shift)
    scale, shift = _scale_shift(ci)
    pre = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    dx2, sum_g, sum_gx = K.conv_dgrad(dy, wt, (h, w), st, pd, y_prev=x, scale=scale, shift=shift)
    gref = torch.where(pre <= 0, torch.zeros_like(dx_ref), dx_ref)
    torch.testing.assert_close(dx2, gref * scale.view(1, -1, 1, 1))
    torch.testing.assert_close(sum_g, gref.sum((0, 2, 3)))
    torch.testing.assert_close(sum_gx, (gref * x).sum((0, 2, 3)))


_AOT_SCRIPT = r"""
import importlib.util, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = importlib.util.spec_from_file_location("kc", sys.argv[1])
K = importlib.util.module_from_spec(spec)
spec.loader.exec_module(K)


def build(fn, dt, consts, warps=4, stages=3, arch=90):
    names = fn.arg_names
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = "*" + (dt if n[:2] in ("X_", "W_", "Y_", "BI", "RE", "PY", "EY", "DY")
                            else "fp32")
        elif n.endswith("_desc"):  # TMA descriptors where the mode reads through them
            tma = consts.get({"W_desc": "W_TMA", "X_desc": "A_TMA"}.get(n), False)
            rows = consts["BLOCK_N" if n == "W_desc" else "BLOCK_M"]
            sig[n] = f"tensordesc<{dt}[{rows}, {consts['BLOCK_K']}]>" if tma else "*" + dt
        else:
            sig[n] = "i32"
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", arch, 32),
                   options=dict(num_warps=warps, num_stages=stages))


tiles = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, ACC_FP64=False)
off = dict(HAS_BIAS=False, HAS_RESIDUAL=False, EPILOGUE_RELU=False, STATS=False, DRELU=False,
           W_TMA=False, A_TMA=False, PERSISTENT=False, FLATTEN=False, Y_TMA=0, TILE_H=1,
           TILE_W=1, PCOEF_ONCE=False)
for dt, prec in (("fp16", "ieee"), ("bf16", "ieee"), ("fp32", "tf32")):
    base = dict(tiles, INPUT_PRECISION=prec)
    build(K._conv_kernel, dt, {**base, **off, "TRANSPOSED": False, "TAP_LOOP": True,
                               "PROLOGUE": 1, "STATS": True}, 8)
    # weights by TMA; the 1x1 GEMM with both operands by TMA
    build(K._conv_kernel, dt, {**base, **off, "TRANSPOSED": False, "TAP_LOOP": True,
                               "W_TMA": True, "PROLOGUE": 1, "STATS": True}, 8)
    build(K._conv_kernel, dt, {**base, **off, "TRANSPOSED": False, "TAP_LOOP": True,
                               "W_TMA": True, "A_TMA": True, "PROLOGUE": 1}, 8)
    # the persistent 1x1 GEMM with its tile and K loops flattened (FLATTEN)
    build(K._conv_kernel, dt, {**base, **off, "TRANSPOSED": False, "TAP_LOOP": True,
                               "W_TMA": True, "A_TMA": True, "PROLOGUE": 0,
                               "PERSISTENT": True, "FLATTEN": True}, 8, 4)
    if dt != "fp16":
        continue  # every other mode in fp16 only (compile time)
    build(K._conv_kernel, dt, {**base, **off, "TRANSPOSED": False, "TAP_LOOP": False,
                               "PROLOGUE": 0, "HAS_BIAS": True, "HAS_RESIDUAL": True,
                               "EPILOGUE_RELU": True, "PERSISTENT": True}, 8)
    build(K._conv_kernel, dt, {**base, **off, "TRANSPOSED": True, "TAP_LOOP": True,
                               "PROLOGUE": 2, "DRELU": True}, 8)
    build(K._conv_wgrad_kernel, dt, dict(TAP_N=True, DBN=True, PROLOGUE=True, ACC_FP64=False,
                                         INPUT_PRECISION=prec, TMA=0, TILE_H=8, TILE_W=8,
                                         FLATTEN=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64,
                                         SWAP_AB=dt != "fp32"))
build(K._conv_wgrad_kernel, "fp16", dict(TAP_N=False, DBN=False, PROLOGUE=False,
                                         ACC_FP64=False, INPUT_PRECISION="ieee", TMA=0,
                                         TILE_H=8, TILE_W=8, FLATTEN=False, BLOCK_M=64,
                                         BLOCK_N=64, BLOCK_K=64, SWAP_AB=False))
# sm_80 (no TMA): the pointer paths, persistent forward and the pixel-box wgrad walk
build(K._conv_kernel, "bf16", {**tiles, **off, "INPUT_PRECISION": "ieee", "TRANSPOSED": False,
                               "TAP_LOOP": True, "PROLOGUE": 0, "PERSISTENT": True}, 8, 4, 80)
build(K._conv_wgrad_kernel, "bf16", dict(TAP_N=True, DBN=True, PROLOGUE=True, ACC_FP64=False,
                                         INPUT_PRECISION="ieee", TMA=0, TILE_H=8, TILE_W=8,
                                         FLATTEN=False, BLOCK_M=128, BLOCK_N=128,
                                         BLOCK_K=64, SWAP_AB=True), 8, 3, 80)
for final in (False, True):
    build(K._stats_merge_kernel, "fp32", dict(HAS_COUNT=final, FINAL=final, ACC_FP64=False,
                                              BLOCK_T=64, BLOCK_C=64))
print("compiled")
"""


def _compile_script(script):
    """Run ``script`` on kernels/conv.py (its argv[1]) in a Python without the
    interpreter: Triton's compiler (skips without Triton's CUDA backend)."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "kernels", "conv.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", script, path], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The interpreter does not type-check like the compiler: compile every kernel mode
    for an H100 (sm_90), and the pointer paths for an A100 (sm_80), ahead of time, no GPU
    needed (skips without Triton's CUDA backend)."""
    proc = _compile_script(_AOT_SCRIPT)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("ptxas not available")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]


_UNIT_SCALARS_SCRIPT = r"""
import importlib.util, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton._C.libtriton import ir

spec = importlib.util.spec_from_file_location("kc", sys.argv[1])
K = importlib.util.module_from_spec(spec)
spec.loader.exec_module(K)
# a launch passes an int argument equal to 1 as a constexpr (triton 3.8 does), so a
# method call on a scalar argument breaks the kernel's compile
try:
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    print("unit-constexpr", native_specialize_impl(BaseBackend, 1, False, True, True)[0])
except ImportError:  # a Triton that specializes in Python (the check holds either way)
    print("unit-constexpr unknown")
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)


def front_end(fn, consts, descs):
    # TTIR only (the Python front end, where such a call fails): no ptxas, fast
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n.endswith("_desc"):
            sig[n] = descs.get(n, "*fp16")
        elif n.endswith("_ptr"):
            sig[n] = "*i32" if n == "LANES_ptr" else "*fp16"
        else:
            sig[n] = "i32"
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    options = backend.parse_options(dict(num_warps=4, num_stages=3))
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    src.make_ir(target, options, backend.get_codegen_implementation(options),
                backend.get_module_map(), ctx)


tiles = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, ACC_FP64=False,
             INPUT_PRECISION="ieee", HAS_BIAS=False, HAS_RESIDUAL=False, EPILOGUE_RELU=False,
             PERSISTENT=False, FLATTEN=False, TAP_LOOP=True, W_TMA=False, PCOEF_ONCE=False)
box4, box5 = "tensordesc<fp16[1, 8, 16, 64]>", "tensordesc<fp16[1, 8, 1, 16, 64]>"
modes = {  # the modes whose prologue builds a padding mask from the image sides
    "fwd bn-relu prologue, boxes": (dict(tiles, TRANSPOSED=False, A_TMA=2, PROLOGUE=1,
                                         STATS=True, DRELU=False, Y_TMA=0, TILE_H=8,
                                         TILE_W=16), {"X_desc": box4}),
    "fwd bn-relu prologue, stride-2 boxes": (dict(tiles, TRANSPOSED=False, A_TMA=3,
                                                  PROLOGUE=1, STATS=True, DRELU=False,
                                                  Y_TMA=0, TILE_H=8, TILE_W=16),
                                             {"X_desc": box5}),
    "dgrad dBN prologue + dReLU, boxes": (dict(tiles, TRANSPOSED=True, A_TMA=2, PROLOGUE=2,
                                               STATS=False, DRELU=True, Y_TMA=0, TILE_H=8,
                                               TILE_W=16), {"X_desc": box4, "PY_desc": box4}),
}
failed = []
for mode, (consts, descs) in modes.items():
    scalars = [n for n in K._conv_kernel.arg_names
               if not n.endswith(("_ptr", "_desc")) and n not in consts]
    for n in [None] + scalars:
        try:
            front_end(K._conv_kernel, dict(consts, **({n: 1} if n else {})), descs)
        except Exception as e:
            while e.__cause__ is not None:  # the innermost error (a nested jit call's)
                e = e.__cause__
            failed.append(f"{mode}, {n} = 1: {type(e).__name__}: {str(e)[-200:]}")
print("\n".join(failed) or "compiled")
"""


def test_prologue_masks_compile_with_unit_scalars():
    """Triton passes an int argument equal to 1 as a constexpr (an image of height or
    width 1: ResNets on small inputs reach 1x1 maps), where a method call on it (``IH.to``)
    is a compile error on the GPU that the interpreter, which passes plain ints, cannot
    show: the padding-mask prologues (forward BN-ReLU on boxes, dgrad dBN) put through
    Triton's front end for sm_90 with each scalar argument 1 in turn."""
    proc = _compile_script(_UNIT_SCALARS_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.rstrip().splitlines()[-1] == "compiled", proc.stdout[-4000:]


def test_lane_ids_are_not_cached_during_graph_capture(monkeypatch):
    """The row ids of the padding masks (``_lanes``) are cached per device, but not when
    made during a CUDA-graph capture: there torch.arange is recorded, not run, and the
    cached tensor would hold uninitialized memory for every later eager launch (wrong
    padding masks) until the graph first replays. The capture is simulated
    (``_capturing``), so this runs on CPU."""
    from fusedres.kernels import conv as kconv

    device = torch.device("cpu")
    monkeypatch.setattr(kconv, "_capturing", lambda d: True, raising=False)
    during = [kconv._lanes(device), kconv._lanes(device)]
    assert during[0] is not during[1]  # one per captured launch
    monkeypatch.setattr(kconv, "_capturing", lambda d: False, raising=False)
    eager = kconv._lanes(device)
    assert all(eager is not t for t in during) and eager is kconv._lanes(device)
    assert torch.equal(eager, torch.arange(512, dtype=torch.int32))
    assert torch.equal(during[0], eager)


def test_every_launch_runs_under_the_tensors_device(monkeypatch):
    """Issue 12: a Triton kernel launches on the current CUDA device; each launch (conv,
    its statistics merge) enters kernels.device_guard with its input first."""
    from fusedres.kernels import conv as kconv

    seen = []
    guard = kconv.device_guard
    monkeypatch.setattr(kconv, "device_guard", lambda t: seen.append(t.device) or guard(t))
    x, w, st, pd = _make(CASES[1], torch.float32)
    K.conv_fwd(x, w, st, pd, stats=True)
    assert len(seen) == 2 and all(d == x.device for d in seen)


def test_deterministic_mode_pins_the_first_config(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) no config is chosen by timing: the
    mode's first config runs (bitwise reproducible across processes); otherwise the
    autotuner runs over the mode's configs."""
    from fusedres.kernels import conv as kconv

    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("pinned", grid, kwargs))

    class Autotuned(Kernel):
        fn = Kernel()
        best_config = triton_config = None

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("autotuned", kwargs))

    monkeypatch.setattr(kconv, "INTERPRET", False)
    configs = kconv.conv_configs(fused=True)
    run = Autotuned()
    run.best_config = configs[-1]
    old = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        got = kconv._launch(run, configs, lambda meta: (meta["BLOCK_M"],),
                            (torch.empty(1),), {"TRANSPOSED": False})
        torch.use_deterministic_algorithms(False)
        kconv._launch(run, configs, lambda meta: (1,), (torch.empty(1),), {})
    finally:
        torch.use_deterministic_algorithms(old)
    first = configs[0]
    assert got == first.kwargs
    assert calls[0] == ("pinned", (first.kwargs["BLOCK_M"],),
                        {"TRANSPOSED": False, **first.kwargs, "num_warps": first.num_warps,
                         "num_stages": first.num_stages})
    assert calls[1] == ("autotuned", {})


def test_autotune_key_fixes_the_config_list(monkeypatch):
    """A tuned key's config is reused by every later launch with that key (Triton's
    autotuner adds the tensors' dtypes), and the launchers size the statistics / dReLU
    workspaces from their own config list (its smallest BLOCK_M): launches that share a
    key must share the list ``_conv_prune`` gives them. Before, TAP_LOOP was not in the
    key: a tap-loop conv of the same GEMM shape as a C_in = 3-style one (sm_80, or operands
    TMA cannot read) reused the stem's 64-row tile and wrote statistics rows past its
    workspace; residual and stride changed the list too (spilling 128x256, the 256-row
    prologue tile at stride 2)."""
    from fusedres.kernels import conv as kconv

    monkeypatch.setattr(kconv, "INTERPRET", False)
    every = kconv._configs(kconv._union(kconv._CONV_TILES))
    lists = {}
    for tap, transposed, fused, residual, stride, gemm_n, dtype, ci in itertools.product(
            (True, False), (False, True), (False, True), (False, True), (1, 2),
            (64, 128, 2048), (torch.bfloat16, torch.float32), (64, 128)):
        kw = dict(TAP_LOOP=tap, TRANSPOSED=transposed,
                  PROLOGUE=(2 if transposed else 1) if fused else 0, DRELU=False,
                  HAS_RESIDUAL=residual and not transposed, STATS=True, W_TMA=False,
                  A_TMA=0, TILE_H=1, TILE_W=1, PERSISTENT=False, Y_TMA=0,
                  INPUT_PRECISION=kconv._input_precision(dtype))
        nargs = dict(GEMM_M=4096, GEMM_N=gemm_n, GEMM_K=576, STRIDE_H=stride,
                     STRIDE_W=stride, X_ptr=torch.empty(0, dtype=dtype), CI=ci)
        launch = {**nargs, **kw}
        key = tuple(launch[k] for k in kconv._CONV_KEY) + (dtype,)
        got = sorted(kconv._key(c) for c in kconv._conv_prune(every, nargs, **kw))
        lists.setdefault(key, []).append((got, launch))
    for key, seen in lists.items():
        assert all(got == seen[0][0] for got, _ in seen), [
            {k: v for k, v in launch.items() if k not in kconv._CONV_KEY} for _, launch in seen]


def test_prologue_tiles_need_wgmma(monkeypatch):
    """The forward BN-ReLU prologue's one-warpgroup tiles (128x128 at 4 warps, 256x128 at
    8) are made for sm_90's register-A wgmma; with mma.sync (sm_80/86) they spill (bf16
    sm_80 static: 92 B and 144 B at 255 registers; the 8-warp 128x128 none), so there the
    prologue runs the 8-warp ``fused`` tiles: in conv_fwd's list and in the autotuner's
    prune alike, at Hopper's, A100's and sm_86's shared-memory budgets."""
    from fusedres.kernels import conv as kconv

    monkeypatch.setattr(kconv, "INTERPRET", False)
    for major, wgmma in ((8, False), (9, True), (10, False), (12, False)):
        monkeypatch.setattr(kconv, "_capability", lambda index, major=major: (major, 0))
        assert kconv._wgmma_ok(torch.device("cuda", 0)) == wgmma
    assert kconv._wgmma_ok(torch.device("cpu"))  # the static check reads the sm_90 lists
    monkeypatch.setattr(kconv, "_wgmma_ok", lambda device: False)
    every = kconv._configs(kconv._union(kconv._CONV_TILES))
    for co, budget in itertools.product((64, 128, 2048), (160, 99, 35)):
        got = kconv.conv_configs(fused=True, gemm_n=co, budget=budget * 1024, wgmma=False)
        dgrad_like = kconv.conv_configs(fused=True, transposed=True, gemm_n=co,
                                        budget=budget * 1024)
        assert [kconv._key(c) for c in got] == [kconv._key(c) for c in dgrad_like]
        for c in got:
            m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            assert m == 128 and (n < 128 or c.num_warps == 8), (co, budget, c)
        if budget == 160:  # the prune (CPU tensors: the default budget) agrees
            nargs = dict(GEMM_N=co, X_ptr=torch.empty(0, dtype=torch.bfloat16), STRIDE_H=1,
                         STRIDE_W=1)
            kw = dict(TAP_LOOP=True, TRANSPOSED=False, PROLOGUE=1, DRELU=False,
                      HAS_RESIDUAL=False)
            assert ({kconv._key(c) for c in kconv._conv_prune(every, nargs, **kw)}
                    == {kconv._key(c) for c in got})


@pytest.mark.parametrize("co", [64, 128, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_config_lists_are_small_and_mode_specific(monkeypatch, co, dtype):
    """Each kernel mode autotunes at most three configs, its own, pruned by shape at
    launch: BLOCK_K 64 in 16-bit (32 in fp32: 128-byte rows), 128x256 only for C_out >=
    256 without a residual or prologue, 128x64 only for C_out <= 64, the operand pipeline
    within budget; the forward prologue's 256-row tile (16-bit) only at stride 1."""
    from fusedres.kernels import conv as kconv

    monkeypatch.setattr(kconv, "INTERPRET", False)
    size = torch.empty(0, dtype=dtype).element_size()
    for stem, fused, residual, stride in itertools.product((False, True), repeat=4):
        configs = kconv.conv_configs(stem=stem, fused=fused, gemm_n=co, itemsize=size,
                                     residual=residual, strided=stride)
        assert 1 <= len(configs) <= 3
        kw = dict(TAP_LOOP=not stem, TRANSPOSED=False, PROLOGUE=int(fused), DRELU=False,
                  HAS_RESIDUAL=residual)
        nargs = dict(GEMM_N=co, X_ptr=torch.empty(0, dtype=dtype), STRIDE_H=1 + stride,
                     STRIDE_W=1)
        pruned = kconv._conv_prune(kconv._configs(kconv._union(kconv._CONV_TILES)), nargs,
                                   **kw)
        assert {kconv._key(c) for c in pruned} == {kconv._key(c) for c in configs}
        rows = {c.kwargs["BLOCK_M"] for c in configs}
        wide = kconv._triton_ok("prologue", (256, 128, 64, 8))  # not under triton 3.6
        assert rows == ({128, 256} if fused and not stem and not stride and size == 2
                        and wide else {128} if not stem else rows), (stem, fused, stride)
        for c in configs:
            m, n, k = (c.kwargs[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            assert c.num_stages * (m + n) * k * size <= kconv._SMEM_BUDGET
            if not stem:
                assert k * size == 128
                assert n <= 128 or (co >= 256 and not fused and not residual)
                assert n >= 128 or co <= 64
    for stem in (False, True):
        for fused in (False, True):
            for ci in (3, 64, 128, 2048):
                wcfg = kconv.wgrad_configs(stem=stem, fused=fused, gemm_m=co, channels=ci,
                                           itemsize=size)
                assert 1 <= len(wcfg) <= 3
                assert len({c.kwargs["BLOCK_K"] for c in wcfg}) == 1  # one pixel box
                for c in wcfg:
                    m, n, k = (c.kwargs[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                    assert k * size == 128
                    assert c.num_stages * (m + n) * k * size <= kconv._SMEM_BUDGET
                    if not stem:
                        assert (m == 64) == (co <= 64) or dtype == torch.float32
                        assert n <= 128 or (ci >= 256 and not fused)


@pytest.mark.parametrize("optin_kb,budget_kb", [(227, 160), (163, 99), (99, 35)])
def test_configs_fit_the_devices_shared_memory(monkeypatch, optin_kb, budget_kb):
    """sm_90 (227 KB per block) keeps the listed configs; an A100 (163 KB) or an sm_86/89
    card (99 KB) gets them with fewer stages, or the smallest tile at 2 stages, so that
    deterministic mode's pinned config compiles there; every config given is one the
    autotuner knows (its key is in the union it prunes)."""
    from types import SimpleNamespace

    from fusedres.kernels import conv as kconv

    monkeypatch.setattr(kconv, "INTERPRET", False)
    kconv._device_smem_budget.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(
        shared_memory_per_block_optin=optin_kb * 1024))
    try:
        budget = kconv.smem_budget(torch.device("cuda", 0))
    finally:
        kconv._device_smem_budget.cache_clear()
    assert budget == budget_kb * 1024
    assert kconv.smem_budget(torch.device("cpu")) == kconv._SMEM_BUDGET
    known = {kconv._key(c) for c in kconv._configs(kconv._union(kconv._CONV_TILES))}
    known_w = {kconv._key(c) for c in kconv._wgrad_union()}  # both MMA orientations
    for size in (2, 4):
        for stem in (False, True):
            for fused in (False, True):
                full = kconv.conv_configs(stem=stem, fused=fused, gemm_n=128, itemsize=size)
                got = kconv.conv_configs(stem=stem, fused=fused, gemm_n=128, itemsize=size,
                                         budget=budget)
                wgot = kconv.wgrad_configs(stem=stem, fused=fused, gemm_m=128, channels=128,
                                           itemsize=size, budget=budget)
                for cfgs, universe in ((got, known), (wgot, known_w)):
                    assert cfgs and all(kconv._key(c) in universe for c in cfgs)
                    for c in cfgs:
                        m, n, k = (c.kwargs[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                        assert c.num_stages >= 2
                        assert (c.num_stages * (m + n) * k * size <= budget
                                or (len(cfgs) == 1 and c.num_stages == 2))
                if optin_kb == 227:  # Hopper: exactly the listed configs
                    assert [kconv._key(c) for c in got] == [kconv._key(c) for c in full]
                m, n, k = (full[0].kwargs[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                if full[0].num_stages * (m + n) * k * size > budget:  # cut, not kept
                    assert kconv._key(got[0]) != kconv._key(full[0])


def test_wgrad_fp64_fallback_tile_fits(monkeypatch):
    """fp64 has no tile with 128-byte K rows (BLOCK_K 16), so each wgrad mode falls back
    to the last tile of its list (``wgrad_configs``): that must be a small-K one within the
    pipeline budget, as in fp16/fp32, never a prologue's 256-wide 16-bit tile (the fused
    list's last after the 256-wide tiles were appended: 256x128x64 at 2 stages, 384 KB of
    shared memory, which no device has)."""
    from fusedres.kernels import conv as kconv

    monkeypatch.setattr(kconv, "INTERPRET", False)
    for stem, fused, dbn in ((False, False, False), (False, True, False), (False, True, True),
                             (True, False, False), (True, True, True)):
        for co, ci in ((64, 64), (128, 128), (256, 256)):
            for c in kconv.wgrad_configs(stem=stem, fused=fused, gemm_m=co, channels=ci,
                                         itemsize=8, dbn=dbn):
                m, n, k = (c.kwargs[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                assert m <= 128 and n <= 128, (stem, fused, dbn, co, ci, m, n, k)
                assert c.num_stages * (m + n) * k * 8 <= kconv._SMEM_BUDGET, (m, n, k)


def test_wgrad_lists_have_one_pixel_box_and_the_dbn_64_tile_alone(monkeypatch):
    """Every wgrad mode (stem, dBN, BN-ReLU, both) at each element size, C_out, C_in and
    shared-memory budget: the list is not empty, has one BLOCK_K (conv_wgrad sizes the
    pixel box of every config from configs[0]'s), and only configs the autotuner knows
    (``_wgrad_union``); the 256-pixel ``_WGRAD_DBN_64`` is offered exactly for the dBN
    prologue alone, 16-bit, tap-major, C_out and C_in <= 64, where 2 stages of it (128 KB)
    fit the budget, and then alone (deterministic mode's config), unswapped, at 2 stages;
    the autotuner's prune of a launch of that mode (``_wgrad_prune``: DBN, PROLOGUE as
    conv_wgrad passes them) gives the same list."""
    from fusedres.kernels import conv as kconv

    monkeypatch.setattr(kconv, "INTERPRET", False)
    union = kconv._wgrad_union()
    known = {kconv._key(c) for c in union}
    dbn_64 = tuple(kconv._WGRAD_DBN_64[:3])
    dtypes = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}
    for stem, dbn, bn_relu, size, co, ci, budget_kb in itertools.product(
            (False, True), (False, True), (False, True), (2, 4, 8), (32, 64, 128, 256),
            (64, 128, 256), (160, 128, 127, 99)):
        where = dict(stem=stem, dbn=dbn, bn_relu=bn_relu, size=size, co=co, ci=ci,
                     budget_kb=budget_kb)
        budget = budget_kb * 1024
        cfgs = kconv.wgrad_configs(stem=stem, fused=dbn or bn_relu, gemm_m=co, channels=ci,
                                   itemsize=size, budget=budget, dbn=dbn, bn_relu=bn_relu)
        tiles = [tuple(c.kwargs[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) for c in cfgs]
        assert tiles and len({t[2] for t in tiles}) == 1, (where, tiles)
        assert all(kconv._key(c) in known for c in cfgs), where
        wide = (dbn and not bn_relu and not stem and size == 2 and co <= 64 and ci <= 64
                and budget_kb >= 128)
        assert (dbn_64 in tiles) == wide, (where, tiles)
        if wide:
            assert tiles == [dbn_64] and cfgs[0].num_stages == 2, (where, tiles)
            assert cfgs[0].kwargs["SWAP_AB"] == 0, where
        monkeypatch.setattr(kconv, "smem_budget", lambda device, b=budget: b)
        nargs = dict(GEMM_M=co, CI=ci, X_ptr=torch.empty(0, dtype=dtypes[size]))
        pruned = kconv._wgrad_prune(union, nargs, TAP_N=not stem, DBN=dbn, PROLOGUE=bn_relu)
        assert sorted(map(kconv._key, pruned)) == sorted(map(kconv._key, cfgs)), where


def test_conv_fp64_configs_exist(monkeypatch):
    """fp64 on a GPU (``conv_path`` lets it run the Triton conv): every tap-loop mode of the
    forward and dgrad offers a config, the mode's BLOCK_K 32 tile within sm_90's pipeline
    budget (no list had a 128-byte-row tile for 8-byte elements: ``_in_budget`` got an
    empty list and raised, so only the stem ran)."""
    from fusedres.kernels import conv as kconv

    monkeypatch.setattr(kconv, "INTERPRET", False)
    for transposed, fused, wgmma, n in itertools.product((False, True), (False, True),
                                                         (False, True), (64, 256)):
        got = kconv.conv_configs(transposed=transposed, fused=fused, gemm_n=n, itemsize=8,
                                 wgmma=wgmma, channels=n)
        assert got, (transposed, fused, wgmma, n)
        for c in got:
            m, bn, k = (c.kwargs[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            assert k == 32 and c.num_stages >= 2, (m, bn, k, c.num_stages)
            assert c.num_stages * (m + bn) * k * 8 <= kconv._SMEM_BUDGET


def _pow2_box(n, p, q, rows):
    """The boxes the launchers made before ``pixel_box``: next_pow2(Q) columns, then rows."""
    tw = min(1 << (q - 1).bit_length(), rows)
    th = min(1 << (p - 1).bit_length(), rows // tw)
    return rows // (tw * th), th, tw


def _boxes(n, p, q, box):
    tn, th, tw = box
    return -(-n // tn) * -(-p // th) * -(-q // tw)


def test_pixel_box_pow2_gives_the_boxes_of_before(monkeypatch):
    """``FUSEDRES_PIXEL_BOX=pow2``: the next_pow2 boxes (to time the two on a GPU); an
    unknown value raises, naming the two."""
    monkeypatch.setenv("FUSEDRES_PIXEL_BOX", "pow2")
    for args in ((256, 28, 28, 64), (256, 7, 7, 128), (3, 5, 33, 32)):
        assert K.pixel_box(*args) == _pow2_box(*args)
    monkeypatch.setenv("FUSEDRES_PIXEL_BOX", "smallest")
    with pytest.raises(ValueError, match="'fewest' .* or 'pow2'"):
        K.pixel_box(256, 28, 28, 64)


def test_pixel_box_wastes_no_row_at_resnet50_and_never_more_than_before():
    """``pixel_box``: at batch 256 ResNet-50's output sizes are tiled with no pixel past the
    output (next_pow2 boxes wasted 12.5% at 56x56 and 28x28, 23% at 14x14 and 7x7); at any
    size no more boxes than those; each box ``rows`` pixels, powers of two."""
    for size, rows in itertools.product((112, 56, 28, 14, 7), (64, 128, 256)):
        box = K.pixel_box(256, size, size, rows)
        assert _boxes(256, size, size, box) * rows == 256 * size * size, (size, rows, box)
    assert K.pixel_box(256, 28, 28, 64) == (4, 4, 4)
    assert K.pixel_box(256, 7, 7, 128) == (128, 1, 1)
    assert K.pixel_box(256, 7, 7, 128, min_pixels=2) == (16, 1, 8)  # 12.5% wasted
    wasted = _boxes(256, 14, 14, _pow2_box(256, 14, 14, 128)) * 128 / (256 * 14 * 14) - 1
    assert 0.3 < wasted < 0.31  # 1 - 196/256 of the rows: the old boxes' waste
    for n, p, q, rows in itertools.product((1, 2, 3, 5, 8, 33, 256), (1, 2, 3, 5, 7, 9, 17),
                                           (1, 4, 6, 7, 13, 28), (16, 64, 128)):
        box = K.pixel_box(n, p, q, rows)
        assert box[0] * box[1] * box[2] == rows and all(v & (v - 1) == 0 for v in box)
        assert _boxes(n, p, q, box) <= _boxes(n, p, q, _pow2_box(n, p, q, rows)), (n, p, q)
        two = K.pixel_box(n, p, q, rows, min_pixels=2)
        assert two[1] * two[2] >= 2 and two[0] * two[1] * two[2] == rows
        old = _pow2_box(n, p, q, rows)
        assert _boxes(n, p, q, box) <= _boxes(n, p, q, two), (n, p, q)
        assert old[1] * old[2] == 1 or _boxes(n, p, q, two) <= _boxes(n, p, q, old)


@ALSO_ON_GPU
@pytest.mark.parametrize("prologue", [False, True], ids=["conv+stats", "bn_relu+conv+stats"])
@pytest.mark.parametrize("n,h", [(4, 12), (32, 3)], ids=["4x12x12", "32x3x3"])
def test_launchers_make_their_boxes_with_pixel_box(monkeypatch, n, h, prologue):
    """The forward, dgrad and wgrad of a 3x3 conv with statistics (and the BN-ReLU
    prologue), trained once on channels_last tensors: each TMA launch's pixel box is
    ``pixel_box``'s for its rows (the smallest BLOCK_M of the forward's configs, dgrad's
    BLOCK_M, wgrad's BLOCK_K; the prologue's forward 2 pixels of an image at least), and y
    and every gradient agree with float64. 12x12 (4 images): 4 x 4 pixels, where next_pow2
    boxes are a row of 16 or 2 x 16; 3x3 (32 images): one pixel of every image, 1 x 2 with
    the prologue (the interpreter's tiles; on CUDA the real ones)."""
    if K.TensorDescriptor is None:
        pytest.skip("no TMA descriptors in this Triton")
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA boxes: sm_90 and later")
    seen = []
    launch = K._launch
    monkeypatch.setattr(K, "_launch", lambda run, cfgs, grid, args, kw: seen.append(
        (cfgs, kw)) or launch(run, cfgs, grid, args, kw))
    ci = co = 32
    g = torch.Generator().manual_seed(n)
    cl = torch.channels_last
    x = torch.randn(n, ci, h, h, dtype=torch.float64, generator=g)
    w = torch.randn(co, ci, 3, 3, dtype=torch.float64, generator=g) / 17
    scale = torch.rand(ci, dtype=torch.float64, generator=g) + 0.5
    shift = torch.rand(ci, dtype=torch.float64, generator=g) - 0.25
    ramp = torch.cos(torch.arange(n * co * h * h, dtype=torch.float64)).view(n, co, h, h)

    def run(backend, dtype):
        leaves = [t.to(DEVICE, dtype).contiguous(memory_format=cl) if t.dim() == 4 else
                  t.to(DEVICE, dtype) for t in (x, w, scale, shift)]
        leaves = [t.requires_grad_() for t in leaves]
        xx, ww, sc, sh = leaves
        if prologue:
            y, mean, var = fconv.bn_relu_conv2d_stats(xx, sc, sh, ww, 1, 1, backend=backend)
        else:
            y, mean, var = fconv.conv2d_stats(xx, ww, 1, 1, backend=backend)
            leaves = leaves[:2]
        r = ramp.to(DEVICE, dtype).contiguous(memory_format=cl)
        loss = (y * r).sum() + mean.sum() + var.sum()
        return [y] + list(torch.autograd.grad(loss, leaves))

    got = run("triton", torch.float32)
    want = run("reference", torch.float64)
    kinds = set()
    for cfgs, kw in seen:
        if "TAP_N" in kw:
            kind, rows, least = "wgrad", cfgs[0].kwargs["BLOCK_K"], 1
            assert kw["TMA"] == 2, kw
        else:
            kind = "dgrad" if kw["TRANSPOSED"] else "forward"
            rows = min(c.kwargs["BLOCK_M"] for c in cfgs)
            least = 2 if kw["PROLOGUE"] == 1 else 1
            assert kw["A_TMA"] == 2, kw
        kinds.add(kind)
        box = K.pixel_box(n, h, h, rows, least)
        assert (kw["TILE_H"], kw["TILE_W"]) == box[1:], (kind, kw)
        assert box != _pow2_box(n, h, h, rows), (kind, box)
    assert kinds == {"forward", "dgrad", "wgrad"}, kinds
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-4,
                                   atol=1e-4 * b.abs().max().item())

"""The CUDA kernel primitives (fusedres._C, CUDA key) against fusedres.reference.

Every op is called on CUDA tensors in several memory layouts (NCHW, channels-last,
strided views, views whose data pointer is not 16-byte aligned, S-major permutations,
stride-0 expansions), awkward shapes (C = 1, 3, 65, 256; S = 1; N = 1) and all four
dtypes. float32/float64 are compared tightly; float16/bfloat16 outputs are compared
with a float64 reference, the error bounded by twice the reference primitive's own
error at that dtype. Skipped unless a GPU is present and the CUDA kernels are built.
"""
from __future__ import annotations

import pytest
import torch

import fusedres  # noqa: F401  (loads fusedres._C)
from fusedres import reference as ref
from fusedres._backend import has_cuda_kernels

CUDA_OK = torch.cuda.is_available() and has_cuda_kernels()
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA_OK, reason="needs a GPU and fusedres._C built with CUDA kernels"),
]

# Overridable (a host emulation of the kernels can reuse these checks on CPU tensors).
DEVICE = "cuda"
OPS = torch.ops.fusedres

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "cl", "strided", "misaligned", "cl_misaligned", "s_major"]
SHAPES = [(2, 3, 5), (1, 65, 49), (4, 256, 1), (3, 1, 100), (2, 64, 196), (1, 1, 1), (2, 8, 64),
          (1, 256, 9), (5, 16, 3)]
SMALL_SHAPES = [(2, 3, 5), (1, 65, 49), (4, 256, 1), (3, 1, 100), (2, 64, 24)]
# Absolute slack on top of twice the reference's own error, per output dtype.
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(values: torch.Tensor, layout: str, dtype: torch.dtype) -> torch.Tensor:
    """An (N, C, S) tensor holding ``values`` in the requested memory layout."""
    n, c, s = values.shape
    kw = dict(dtype=dtype, device=DEVICE)
    if layout == "nchw":
        t = torch.empty(n, c, s, **kw)
    elif layout == "cl":
        t = torch.empty(n, s, c, **kw).permute(0, 2, 1)
    elif layout == "strided":  # every other channel, an offset window of S
        t = torch.empty(n, 2 * c + 1, s + 3, **kw)[:, 1::2, 2:2 + s]
    elif layout == "misaligned":  # dense NCHW, data pointer one element past 16 bytes
        t = torch.empty(n * c * s + 1, **kw)[1:].view(n, c, s)
    elif layout == "cl_misaligned":
        t = torch.empty(n * s * c + 1, **kw)[1:].view(n, s, c).permute(0, 2, 1)
    elif layout == "s_major":  # strides (C, 1, N*C): neither layout
        t = torch.empty(s, n, c, **kw).permute(1, 2, 0)
    else:
        raise ValueError(layout)
    t.copy_(values.to(DEVICE))
    return t


def rand(shape, seed, scale=2.0, offset=0.5) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=_gen(seed)) * scale + offset


def chan(c, dtype, seed, scale=0.5, offset=0.0) -> torch.Tensor:
    """A per-channel vector in the accumulation dtype of ``dtype`` activations."""
    v = torch.randn(c, dtype=torch.float64, generator=_gen(seed)) * scale + offset
    return v.to(device=DEVICE, dtype=ref.acc_dtype(dtype))


def away_from_zero(x: torch.Tensor, mean, scale, shift) -> torch.Tensor:
    """Nudges values so that (x - mean)*scale + shift is not within 1e-2 of 0 (a ReLU
    decision there may legitimately differ between an fma and a rounded multiply-add)."""
    v = lambda t: t.double().cpu().view(1, -1, 1)  # noqa: E731
    pre = (x - v(mean)) * v(scale) + v(shift)
    bump = 0.05 / scale.double().cpu().view(1, -1, 1)
    return torch.where(pre.abs() < 1e-2, x + bump, x)


def assert_close_lowp(out, ref_same, ref64, what=""):
    """out vs the float64 truth: max error <= 2 * (reference at out's dtype)'s + ATOL."""
    assert out.dtype == ref_same.dtype, what
    assert out.shape == ref64.shape, what
    o, r, t = out.double(), ref_same.double(), ref64.double()
    nan = torch.isnan(t)
    assert torch.equal(torch.isnan(o), nan), f"{what}: NaN positions differ"
    o, r, t = o[~nan], r[~nan], t[~nan]
    if o.numel() == 0:
        return
    err = (o - t).abs().max().item()
    ref_err = (r - t).abs().max().item()
    bound = 2 * ref_err + ATOL[out.dtype]
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (reference {ref_err:.3g})"


def assert_sums_close(out, ref64, abs_sum, what=""):
    """Per-channel sums vs float64: error within a relative eps of sum(|terms|)."""
    eps = 1e-12 if out.dtype == torch.float64 else 1e-5
    assert out.dtype == ref64.dtype or ref64.dtype == torch.float64, what
    err = (out.double() - ref64.double()).abs()
    bound = eps * (abs_sum.double() + 1)
    assert bool((err <= bound).all()), f"{what}: error {err.max().item():.3g} over bound"


def assert_mask_ok(mask, mask_ref, pre64, shape, cl, what=""):
    """Bit-exact mask, except where the float64 pre-activation is within 1e-4 of 0."""
    n, c, s = shape
    assert mask.dtype == torch.uint8 and mask.dim() == 1, what
    assert mask.numel() == (n * c * s + 7) // 8 == mask_ref.numel(), what
    bits = ref.unpack_mask(mask, shape, cl)
    bits_ref = ref.unpack_mask(mask_ref, shape, cl)
    diff = bits != bits_ref
    if bool(diff.any()):
        near = pre64.to(diff.device)[diff].abs()
        assert bool((near < 1e-4).all()), f"{what}: {int(diff.sum())} mask bits differ"
    e = n * c * s
    if e % 8:  # padding bits of the last byte are 0
        assert int(mask[-1].item()) >> (e % 8) == 0, what


def layout_of(t: torch.Tensor, cl: bool) -> bool:
    """Whether t is dense in the layout channels_last=cl (size-1 dims ignored)."""
    n, c, s = t.shape
    want = (s * c, 1, c) if cl else (c * s, s, 1)
    return all(size == 1 or st == w for size, st, w in zip(t.shape, t.stride(), want))


# --------------------------------------------------------------------------------------
# bn_stats
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_bn_stats(dtype, layout, shape):
    x = make(rand(shape, 1, scale=2.0, offset=3.0), layout, dtype)
    mean, var = OPS.bn_stats(x, layout.startswith("cl"))
    mean64, var64 = ref.bn_stats(x.double())
    acc = ref.acc_dtype(dtype)
    assert mean.dtype == acc and var.dtype == acc and mean.shape == (shape[1],)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(mean.double(), mean64, rtol=tol, atol=tol)
    torch.testing.assert_close(var.double(), var64, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", ["nchw", "cl", "s_major"])
def test_bn_stats_large_mean(layout):
    """Welford: a mean of 1e3 with unit spread keeps var accurate in fp32 accumulation."""
    shape = (8, 32, 1024)
    x = make(rand(shape, 2, scale=1.0, offset=1000.0), layout, torch.float32)
    mean, var = OPS.bn_stats(x, layout == "cl")
    mean64, var64 = ref.bn_stats(x.double())
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), var64, rtol=1e-3, atol=0)  # E[x^2]-E[x]^2: ~100%


@pytest.mark.parametrize("layout", ["nchw", "cl", "strided"])
def test_bn_stats_many_partitions(layout):
    """Large enough for several partial blocks per channel and the merge kernel."""
    shape = (16, 64, 3136)
    x = make(rand(shape, 3), layout, torch.float32)
    mean, var = OPS.bn_stats(x, layout == "cl")
    mean64, var64 = ref.bn_stats(x.double())
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# bn_apply
# --------------------------------------------------------------------------------------

VARIANTS = {  # name: (residual, x2, relu, save_mask)
    "affine": (False, False, False, False),
    "relu": (False, False, True, False),
    "relu_mask": (False, False, True, True),
    "res_relu_mask": (True, False, True, True),
    "dual_relu_mask": (False, True, True, True),
    "dual_res": (True, True, False, False),
}


def _apply_case(shape, dtype, layout, variant, out_cl, res_layout=None, seed=10):
    has_res, has_x2, relu, save_mask = VARIANTS[variant]
    c = shape[1]
    x = make(rand(shape, seed), layout, dtype)
    mean = chan(c, dtype, seed + 7, offset=0.5)
    scale, shift = chan(c, dtype, seed + 1, offset=1.0), chan(c, dtype, seed + 2)
    res = make(rand(shape, seed + 3), res_layout or layout, dtype) if has_res else None
    x2 = make(rand(shape, seed + 4), layout, dtype) if has_x2 else None
    mean2 = chan(c, dtype, seed + 8, offset=-0.5) if has_x2 else None
    scale2 = chan(c, dtype, seed + 5, offset=1.0) if has_x2 else None
    shift2 = chan(c, dtype, seed + 6) if has_x2 else None
    args = (x, mean, scale, shift, res, x2, mean2, scale2, shift2, relu, save_mask, out_cl)
    out, mask = OPS.bn_apply(*args)
    out_same, mask_ref = ref.bn_apply(*args)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    out64, _ = ref.bn_apply(*(d(t) for t in args[:9]), relu, False, out_cl)
    pre64 = ref._pre_activation(*(d(t) for t in args[:9]))
    what = f"bn_apply {variant} {dtype} {layout} {shape} out_cl={out_cl}"
    assert layout_of(out, out_cl), what
    assert_close_lowp(out, out_same, out64, what)
    if save_mask:
        assert_mask_ok(mask, mask_ref, pre64, shape, out_cl, what)
    else:
        assert mask.numel() == 0 and mask.dtype == torch.uint8, what


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("out_cl", [False, True])
def test_bn_apply_relu_mask(dtype, layout, shape, out_cl):
    _apply_case(shape, dtype, layout, "relu_mask", out_cl)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "cl", "strided"])
@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("out_cl", [False, True])
def test_bn_apply_variants(dtype, layout, shape, variant, out_cl):
    _apply_case(shape, dtype, layout, variant, out_cl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout,res_layout", [("nchw", "cl"), ("cl", "nchw"), ("cl", "strided")])
def test_bn_apply_mixed_layouts(dtype, layout, res_layout):
    _apply_case((2, 64, 49), dtype, layout, "res_relu_mask", True, res_layout=res_layout)
    _apply_case((2, 64, 49), dtype, layout, "res_relu_mask", False, res_layout=res_layout)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bn_apply_grid_stride(layout, dtype):
    """More chunks than one grid covers: each thread walks several chunks."""
    _apply_case((4, 64, 12544), dtype, layout, "res_relu_mask", layout == "cl")


# --------------------------------------------------------------------------------------
# bn_backward_reduce / bn_backward_apply
# --------------------------------------------------------------------------------------


def _backward_inputs(shape, dtype, layout, dout_layout, seed):
    c = shape[1]
    scale, shift = chan(c, dtype, seed + 1, offset=1.0), chan(c, dtype, seed + 2)
    mean = chan(c, dtype, seed + 4, offset=0.5)
    x = make(away_from_zero(rand(shape, seed), mean, scale, shift), layout, dtype)
    if dout_layout == "expanded":  # stride-0 gradient, as from out.sum().backward()
        dout = make(rand((1, c, 1), seed + 3), "nchw", dtype).expand(*shape)
    else:
        dout = make(rand(shape, seed + 3), dout_layout or layout, dtype)
    return dout, x, mean, scale, shift


def _mask_for(source, shape, mask_cl, seed):
    if source == "mask":
        passes = torch.rand(*shape, generator=_gen(seed)) < 0.6
        return ref.pack_mask(passes.to(DEVICE), mask_cl)
    if source == "empty_mask":  # an empty mask means "no mask", as in the reference
        return torch.empty(0, dtype=torch.uint8, device=DEVICE)
    return None


BWD_SOURCES = {"none": False, "relu": True, "mask": True, "empty_mask": True}  # -> relu flag


def _reduce_case(shape, dtype, layout, source, mask_cl, dout_layout=None, seed=20):
    dout, x, mean, scale, shift = _backward_inputs(shape, dtype, layout, dout_layout, seed)
    mask = _mask_for(source, shape, mask_cl, seed + 7)
    relu = BWD_SOURCES[source]
    args = (dout, x, mean, scale, shift, mask, relu, mask_cl)
    sum_g, sum_gxc = OPS.bn_backward_reduce(*args)
    d = lambda t: None if t is None else (t if t.dtype == torch.uint8 else t.double())  # noqa
    args64 = tuple(d(t) for t in args[:6]) + (relu, mask_cl)
    sg64, sgx64 = ref.bn_backward_reduce(*args64)
    g64 = ref._gradient_after_relu(d(dout), d(x), d(mean), d(scale), d(shift), mask, relu,
                                   mask_cl)
    xc64 = d(x) - d(mean).view(1, -1, 1)
    acc = ref.acc_dtype(dtype)
    what = f"bn_backward_reduce {source} {dtype} {layout} {shape} mask_cl={mask_cl}"
    assert sum_g.dtype == acc and sum_gxc.dtype == acc and sum_g.shape == (shape[1],), what
    assert_sums_close(sum_g, sg64, g64.abs().sum(dim=(0, 2)), what + " sum_g")
    assert_sums_close(sum_gxc, sgx64, (g64 * xc64).abs().sum(dim=(0, 2)), what + " sum_g_xc")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("source", list(BWD_SOURCES))
def test_bn_backward_reduce(dtype, layout, shape, source):
    _reduce_case(shape, dtype, layout, source, mask_cl=layout.startswith("cl"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dout_layout", ["nchw", "cl", "expanded"])
@pytest.mark.parametrize("mask_cl", [False, True])
def test_bn_backward_reduce_mixed(dtype, layout, dout_layout, mask_cl):
    _reduce_case((3, 64, 56), dtype, layout, "mask", mask_cl, dout_layout=dout_layout)
    _reduce_case((3, 64, 56), dtype, layout, "relu", mask_cl, dout_layout=dout_layout)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_bn_backward_reduce_many_partitions(layout):
    _reduce_case((16, 64, 3136), torch.float32, layout, "mask", layout == "cl")


def _bwd_apply_case(shape, dtype, layout, source, write_dres, out_cl, dout_layout=None, seed=30):
    dout, x, mean, scale, shift = _backward_inputs(shape, dtype, layout, dout_layout, seed)
    mask = _mask_for(source, shape, out_cl, seed + 7)
    relu = BWD_SOURCES[source]
    c = shape[1]
    coefs = [chan(c, dtype, seed + 8 + k) for k in range(3)]
    args = (dout, x, mean, scale, shift, mask, *coefs, relu, write_dres, out_cl)
    dx, dres = OPS.bn_backward_apply(*args)
    dx_same, dres_same = ref.bn_backward_apply(*args)
    d = lambda t: None if t is None else (t if t.dtype == torch.uint8 else t.double())  # noqa
    dx64, _ = ref.bn_backward_apply(*(d(t) for t in args[:9]), relu, False, out_cl)
    what = f"bn_backward_apply {source} {dtype} {layout} {shape} out_cl={out_cl}"
    assert layout_of(dx, out_cl), what
    assert_close_lowp(dx, dx_same, dx64, what + " dx")
    if write_dres:
        assert layout_of(dres, out_cl), what
        torch.testing.assert_close(dres, dres_same, rtol=0, atol=0, msg=what + " dres")
    else:
        assert dres.numel() == 0 and dres.dtype == dtype, what


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("source", list(BWD_SOURCES))
def test_bn_backward_apply(dtype, layout, shape, source):
    out_cl = layout.startswith("cl")
    _bwd_apply_case(shape, dtype, layout, source, write_dres=source == "mask", out_cl=out_cl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dout_layout", ["nchw", "cl", "expanded"])
@pytest.mark.parametrize("out_cl", [False, True])
def test_bn_backward_apply_mixed(dtype, layout, dout_layout, out_cl):
    _bwd_apply_case((3, 64, 56), dtype, layout, "mask", True, out_cl, dout_layout=dout_layout)
    _bwd_apply_case((3, 64, 56), dtype, layout, "relu", True, out_cl, dout_layout=dout_layout)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_bn_backward_apply_grid_stride(layout):
    _bwd_apply_case((4, 64, 12544), torch.float32, layout, "mask", True, layout == "cl")


# --------------------------------------------------------------------------------------
# NaN, empty inputs, determinism, int64 offsets, errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "cl", "strided"])
def test_nan_propagates(dtype, layout):
    shape = (2, 16, 40)
    v = rand(shape, 40)
    v[0, 3, 5] = float("nan")
    v[1, 7, :] = float("nan")
    x = make(v, layout, dtype)
    cl = layout == "cl"
    mean, var = OPS.bn_stats(x, cl)
    mean64, var64 = ref.bn_stats(x.double())
    torch.testing.assert_close(mean.double(), mean64, rtol=2e-5, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(var.double(), var64, rtol=2e-5, atol=2e-5, equal_nan=True)
    assert torch.isnan(mean[3]) and torch.isnan(var[7]) and not torch.isnan(mean[0])

    scale, shift = chan(16, dtype, 41, offset=1.0), chan(16, dtype, 42)
    centre = chan(16, dtype, 40, offset=0.5)  # finite: NaN enters through x only
    args = (x, centre, scale, shift, None, None, None, None, None, True, True, cl)
    out, mask = OPS.bn_apply(*args)
    out_ref, mask_ref = ref.bn_apply(*args)
    assert torch.isnan(out[0, 3, 5]) and bool(torch.isnan(out[1, 7]).all())
    torch.testing.assert_close(out.double(), out_ref.double(), rtol=2e-2, atol=1e-2,
                               equal_nan=True)
    passes = ref.unpack_mask(mask, shape, cl)
    assert bool(passes[0, 3, 5]) and bool(passes[1, 7].all())  # NaN passes the gradient

    # NaN gradient where the mask blocks it gives 0; where it passes, NaN.
    dv = rand(shape, 43)
    dv[0, 3, :] = float("nan")
    dout = make(dv, layout, dtype)
    blocked = torch.zeros(shape, dtype=torch.bool)
    blocked[0, 3, :] = True
    m = ref.pack_mask((~blocked).to(DEVICE), cl)
    mean_c = chan(16, dtype, 44)
    sg, sgx = OPS.bn_backward_reduce(dout, x, mean_c, scale, shift, m, True, cl)
    assert not torch.isnan(sg[3]) and torch.isnan(sgx[7]) and not torch.isnan(sg[0])
    coefs = [chan(16, dtype, 45 + k) for k in range(3)]
    args = (dout, x, mean_c, scale, shift, m, *coefs, True, True, cl)
    dx, dres = OPS.bn_backward_apply(*args)
    dx_ref, _ = ref.bn_backward_apply(*args)
    torch.testing.assert_close(dx.double(), dx_ref.double(), rtol=2e-2, atol=2e-2, equal_nan=True)
    assert bool((dres[0, 3] == 0).all())
    m2 = ref.pack_mask(blocked.to(DEVICE), cl)  # now only the NaN row passes
    _, dres2 = OPS.bn_backward_apply(dout, x, mean_c, scale, shift, m2, *coefs, True, True, cl)
    assert bool(torch.isnan(dres2[0, 3]).all())


@pytest.mark.parametrize("shape", [(0, 4, 5), (2, 4, 0), (2, 0, 5)])
def test_empty(shape):
    n, c, s = shape
    x = torch.empty(shape, device=DEVICE)
    vec = torch.ones(c, device=DEVICE)
    mean, var = OPS.bn_stats(x, False)
    assert mean.shape == (c,) and var.shape == (c,)
    if c:
        assert bool(torch.isnan(mean).all())
    out, mask = OPS.bn_apply(x, vec, vec, vec, None, None, None, None, None, True, True, True)
    assert out.shape == shape and mask.numel() == 0
    sg, sgx = OPS.bn_backward_reduce(x, x, vec, vec, vec, None, True, False)
    assert sg.shape == (c,) and bool((sg == 0).all())
    dx, dres = OPS.bn_backward_apply(x, x, vec, vec, vec, None, vec, vec, vec, True, True, False)
    assert dx.shape == shape and dres.shape == shape


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "cl", "s_major"])
def test_deterministic(dtype, layout):
    """Two runs give bitwise-identical results (no atomics, fixed merge order)."""
    shape = (8, 64, 3136)
    cl = layout == "cl"
    x = make(rand(shape, 50), layout, dtype)
    dout = make(rand(shape, 51), layout, dtype)
    scale, shift, mean = (chan(64, dtype, 52 + k) for k in range(3))
    m = ref.pack_mask((torch.rand(*shape, generator=_gen(55)) < 0.5).to(DEVICE), cl)
    for _ in range(2):
        runs = []
        for _ in range(2):
            st = OPS.bn_stats(x, cl)
            red = OPS.bn_backward_reduce(dout, x, mean, scale, shift, m, True, cl)
            red2 = OPS.bn_backward_reduce(dout, x, mean, scale, shift, None, True, cl)
            out = OPS.bn_apply(x, mean, scale, shift, dout, None, None, None, None, True, True,
                               cl)
            runs.append([*st, *red, *red2, *out])
        for a, b in zip(*runs):
            assert torch.equal(_bits(a), _bits(b))


@pytest.mark.slow
def test_int64_offsets():
    """A view whose offsets pass 2**31 elements (about 4.3 GB of float16)."""
    if DEVICE == "cuda" and torch.cuda.get_device_properties(0).total_memory < 12 * 2**30:
        pytest.skip("needs 12 GiB of GPU memory")
    big = 2**31 + 4096
    buf = torch.empty(big, dtype=torch.float16, device=DEVICE)
    shape = (2, 8, 256)
    x = buf.as_strided(shape, (2**31, 256, 1))  # n = 1 lies past 2**31
    x.copy_(rand(shape, 60).to(DEVICE))
    mean, var = OPS.bn_stats(x, False)
    mean64, var64 = ref.bn_stats(x.double())
    torch.testing.assert_close(mean.double(), mean64, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(var.double(), var64, rtol=2e-5, atol=2e-5)
    scale, shift = chan(8, torch.float16, 61, offset=1.0), chan(8, torch.float16, 62)
    args = (x, mean, scale, shift, x, None, None, None, None, True, True, False)
    out, mask = OPS.bn_apply(*args)
    out_ref, mask_ref = ref.bn_apply(*args)
    torch.testing.assert_close(out, out_ref, rtol=2e-3, atol=2e-3)
    del buf


def test_errors():
    x = torch.randn(2, 4, 5, device=DEVICE)
    vec = torch.ones(4, device=DEVICE)
    with pytest.raises(RuntimeError, match="3-D"):
        OPS.bn_stats(x.view(2, 20), False)
    with pytest.raises(RuntimeError, match="scale"):
        OPS.bn_apply(x, vec, vec.double(), vec, None, None, None, None, None, True, False, False)
    with pytest.raises(RuntimeError, match="save_mask requires relu"):
        OPS.bn_apply(x, vec, vec, vec, None, None, None, None, None, False, True, False)
    with pytest.raises(RuntimeError, match="mask"):
        bad = torch.zeros(1, dtype=torch.uint8, device=DEVICE)
        OPS.bn_backward_reduce(x, x, vec, vec, vec, bad, True, False)
    with pytest.raises(RuntimeError, match="shape"):
        OPS.bn_apply(x, vec, vec, vec, x[:, :, :4], None, None, None, None, True, False, False)

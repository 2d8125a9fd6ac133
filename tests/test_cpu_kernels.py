"""The C++ CPU kernels of the four primitives against fusedres.reference.

Layouts: NCHW-contiguous, channels_last, a channel slice of an NCHW tensor, and a
generic strided view (neither C nor S contiguous). Half and bfloat16 are compared
with a tolerance against the reference computed in float64; the ReLU mask must be
byte-identical to the reference's in every dtype.
"""
import pytest
import torch

import fusedres  # loads fusedres._C when it was built
from fusedres import reference as ref

pytestmark = pytest.mark.skipif(
    not torch._C._dispatch_has_kernel_for_dispatch_key("fusedres::bn_stats", "CPU"),
    reason="fusedres._C has no CPU kernels (not built)",
)

ops = torch.ops.fusedres
# Every test runs once per instruction-set cap (FUSEDRES_CPU_ISA): the baseline build,
# AVX2 (8 float lanes, blend masks) and AVX-512 (16 lanes, mask registers). A cap above
# what this processor has runs the widest it has; test_isa_cap says which ran.
ISAS = ["default", "avx2", "avx512"]
ISA_RANK = {"default": 0, "avx2": 1, "avx512": 2}


@pytest.fixture(autouse=True, params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("FUSEDRES_CPU_ISA", request.param)
    return request.param


def test_isa_cap(isa, monkeypatch):
    ran = fusedres.cpu_isa()
    monkeypatch.delenv("FUSEDRES_CPU_ISA")
    widest = fusedres.cpu_isa()
    assert ran == min(isa, widest, key=ISA_RANK.get)
    if isa == "default":
        assert ran == "default"


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "cl", "cslice", "generic"]
SHAPES = [(2, 3, 5), (1, 65, 7), (3, 1, 9), (4, 16, 1), (2, 8, 33), (1, 1, 1), (3, 40, 700)]
# Tolerances of a half/bf16 output against the float64 reference (a few ulps).
LOW_TOL = {torch.float16: dict(rtol=4e-3, atol=2e-3), torch.bfloat16: dict(rtol=3e-2, atol=2e-2)}


def make(kind, n, c, s, dtype, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) + offset).to(dtype)

    if kind == "nchw":
        return r(n, c, s)
    if kind == "cl":
        return r(n, s, c).permute(0, 2, 1)
    if kind == "cslice":  # S contiguous, channel stride 2*S
        return r(n, 2 * c, s)[:, ::2]
    if kind == "generic":  # channel stride 2, spatial stride 2*C, storage offset
        return r(n, s + 1, 2 * c).permute(0, 2, 1)[:, ::2, 1:]
    raise ValueError(kind)


def vec(c, dtype, seed, lo=-1.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(c, generator=g, dtype=torch.float64)
    return (u * (hi - lo) + lo).to(ref.acc_dtype(dtype))


def d64(t):
    return None if t is None else t.double()


def check_low(actual, expected64, dtype):
    if dtype in LOW_TOL:
        torch.testing.assert_close(actual.double(), expected64, equal_nan=True, **LOW_TOL[dtype])
    else:
        torch.testing.assert_close(actual, expected64.to(actual.dtype), equal_nan=True)


def check_layout(t, channels_last):
    n, c, s = t.shape
    want = (s * c, 1, c) if channels_last else (c * s, s, 1)
    for dim, size in enumerate(t.shape):
        if size > 1:
            assert t.stride(dim) == want[dim], (t.stride(), want)


# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_bn_stats(kind, dtype):
    for i, (n, c, s) in enumerate(SHAPES):
        x = make(kind, n, c, s, dtype, seed=i, offset=100.0)  # large mean: no E[x^2]-E[x]^2
        mean, var = ops.bn_stats(x, kind == "cl")
        rm, rv = ref.bn_stats(x.double())
        assert mean.dtype == ref.acc_dtype(dtype) and mean.shape == (c,)
        torch.testing.assert_close(mean.double(), rm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var.double(), rv, rtol=1e-3, atol=1e-4)


def test_bn_stats_long_planes_and_rows():
    # Several chunks in both traversals (rows: many (n, s); planes: S > one segment).
    planes = torch.randn(2, 3, 140000) * 3 + 7  # 3 segments of 65536
    rows = (torch.randn(3, 9000, 17) * 3 + 7).permute(0, 2, 1)
    for x in (planes, rows):
        mean, var = ops.bn_stats(x, False)
        rm, rv = ref.bn_stats(x.double())
        torch.testing.assert_close(mean.double(), rm, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(var.double(), rv, rtol=1e-5, atol=1e-6)


def test_bn_stats_deterministic_across_threads():
    xs = [torch.randn(4, 37, 3000), torch.randn(4, 3000, 37).permute(0, 2, 1),
          torch.randn(4, 3000, 74).permute(0, 2, 1)[:, ::2]]
    old = torch.get_num_threads()
    try:
        for x in xs:
            torch.set_num_threads(1)
            a = ops.bn_stats(x, False)
            g1 = ops.bn_backward_reduce(x, x, a[0], a[1], a[0], None, True, False)
            torch.set_num_threads(max(2, old))
            b = ops.bn_stats(x, False)
            g2 = ops.bn_backward_reduce(x, x, a[0], a[1], a[0], None, True, False)
            for u, v in zip(a + g1, b + g2):
                assert torch.equal(u, v)
    finally:
        torch.set_num_threads(old)


def test_bn_stats_empty():
    for shape in [(0, 4, 5), (2, 4, 0)]:
        mean, var = ops.bn_stats(torch.randn(shape), False)
        assert mean.shape == (4,) and var.shape == (4,)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_apply(kind, dtype, channels_last):
    options = [  # residual, x2, relu, save_mask
        (False, False, True, True), (True, False, True, True), (True, True, True, True),
        (False, True, False, False), (True, False, False, True), (True, False, True, False),
    ]
    for i, (n, c, s) in enumerate(SHAPES):
        opt = options[i % len(options)]
        both = [opt, options[(i + 1) % len(options)]]
        for j, (has_res, has_x2, relu, save_mask) in enumerate(both):
            x = make(kind, n, c, s, dtype, seed=10 * i + j)
            if i % 2 == 0 and x.numel() > 2:
                x[0, 0, 0] = float("nan")
            other = "cl" if kind == "nchw" else "nchw"
            res = make(other, n, c, s, dtype, seed=100 + i) if has_res else None
            x2 = make(kind, n, c, s, dtype, seed=200 + i) if has_x2 else None
            mn, sc, sh = vec(c, dtype, 11 + i), vec(c, dtype, 1 + i), vec(c, dtype, 2 + i)
            mn2, sc2, sh2 = ((vec(c, dtype, 12 + i), vec(c, dtype, 3 + i), vec(c, dtype, 4 + i))
                             if has_x2 else (None, None, None))
            args = (mn, sc, sh, res, x2, mn2, sc2, sh2, relu, save_mask, channels_last)
            out, mask = ops.bn_apply(x, *args)
            r_out, r_mask = ref.bn_apply(x, *args)  # same dtype: the mask must be identical
            assert out.dtype == dtype and out.shape == x.shape
            check_layout(out, channels_last)
            assert mask.dtype == torch.uint8
            assert torch.equal(mask, r_mask), (kind, dtype, (n, c, s), opt)
            r64, _ = ref.bn_apply(x.double(), *(d64(t) for t in args[:8]), relu, False,
                                  channels_last)
            check_low(out, r64, dtype)


def _plain(x, mean, scale, shift, relu=True, save_mask=True, cl=False, res=None):
    """bn_apply's arguments for one BN (no second input)."""
    return (x, mean, scale, shift, res, None, None, None, None, relu, save_mask, cl)


def test_bn_apply_no_fused_multiply_add():
    # (x - mean)*scale rounds to exactly -shift: 0 without FMA (mask 0), 2**-46 with FMA
    # (mask 1).
    one = 1 + 2.0 ** -23
    for cl in (False, True):
        x = torch.full((2, 19, 13), one)
        zero = torch.zeros(19)
        sc = torch.full((19,), one)
        sh = torch.full((19,), -(1 + 2.0 ** -22))
        out, mask = ops.bn_apply(*_plain(x, zero, sc, sh, cl=cl))
        r_out, r_mask = ref.bn_apply(*_plain(x, zero, sc, sh, cl=cl))
        assert torch.equal(mask, r_mask) and int(mask.sum()) == 0
        assert torch.equal(out, r_out)


def test_bn_apply_mask_parallel():
    # Odd inner sizes over many blocks: mask bytes shared between rows are written once.
    for n, c, s in [(3, 33, 2001), (2, 3, 30001), (5, 1001, 13)]:
        for cl in (False, True):
            x = torch.randn(n, c, s)
            mn, sc, sh = torch.randn(c), torch.randn(c), torch.randn(c)
            out, mask = ops.bn_apply(*_plain(x, mn, sc, sh, cl=cl))
            r_out, r_mask = ref.bn_apply(*_plain(x, mn, sc, sh, cl=cl))
            assert torch.equal(mask, r_mask)
            torch.testing.assert_close(out, r_out)


def test_bn_apply_nan_and_empty():
    x = torch.tensor([[[float("nan"), -1.0, 0.0, 2.0, float("-inf"), float("inf")]]])
    one, zero = torch.ones(1), torch.zeros(1)
    out, mask = ops.bn_apply(*_plain(x, zero, one, zero))
    assert torch.isnan(out[0, 0, 0])
    assert out[0, 0, 1:].tolist() == [0.0, 0.0, 2.0, 0.0, float("inf")]
    assert mask.tolist() == [0b101001]
    for shape, cl in [((0, 4, 5), True), ((2, 4, 0), False)]:
        out, mask = ops.bn_apply(*_plain(torch.randn(shape), torch.zeros(4), torch.ones(4),
                                         torch.zeros(4), cl=cl))
        assert out.shape == shape and mask.numel() == 0


def _masks(x, kind, channels_last, seed):
    """None, an empty mask, and a random packed mask in the layout channels_last."""
    g = torch.Generator().manual_seed(seed)
    passes = torch.rand(x.shape, generator=g) > 0.4
    return [None, torch.empty(0, dtype=torch.uint8), ref.pack_mask(passes, channels_last)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_backward(kind, dtype, channels_last):
    for i, (n, c, s) in enumerate(SHAPES):
        x = make(kind, n, c, s, dtype, seed=300 + i)
        other = "cl" if kind != "cl" else "generic"
        dout = make(other if i % 2 else kind, n, c, s, dtype, seed=400 + i)
        if i == 1:
            dout[0, 1, 2] = float("nan")  # NaN gradient where the ReLU passes/blocks
        mean, sc, sh = vec(c, dtype, 5 + i), vec(c, dtype, 6 + i), vec(c, dtype, 7 + i)
        cg, cxc, cc = vec(c, dtype, 8 + i), vec(c, dtype, 9 + i), vec(c, dtype, 10 + i)
        for m_i, mask in enumerate(_masks(x, kind, channels_last, seed=i)):
            for relu in ([True, False] if m_i < 2 else [True]):
                write_res = (m_i + i) % 2 == 0
                sg, sgx = ops.bn_backward_reduce(dout, x, mean, sc, sh, mask, relu, channels_last)
                r_sg, r_sgx = ref.bn_backward_reduce(dout.double(), x.double(), mean.double(),
                                                     sc.double(), sh.double(), mask, relu,
                                                     channels_last)
                assert sg.dtype == ref.acc_dtype(dtype)
                tol = dict(rtol=1e-4, atol=1e-4, equal_nan=True)
                torch.testing.assert_close(sg.double(), r_sg, **tol)
                torch.testing.assert_close(sgx.double(), r_sgx, **tol)
                dx, dres = ops.bn_backward_apply(dout, x, mean, sc, sh, mask, cg, cxc, cc, relu,
                                                 write_res, channels_last)
                r_dx, r_dres = ref.bn_backward_apply(dout.double(), x.double(), mean.double(),
                                                     sc.double(), sh.double(), mask, cg.double(),
                                                     cxc.double(), cc.double(), relu, write_res,
                                                     channels_last)
                assert dx.dtype == dtype
                check_layout(dx, channels_last)
                check_low(dx, r_dx, dtype)
                if write_res:
                    check_layout(dres, channels_last)
                    check_low(dres, r_dres, dtype)
                else:
                    assert dres.numel() == 0


def test_bn_backward_relu_mask_from_apply():
    # The mask bn_apply saves gives the same gradient as recomputing it (no residual).
    for cl in (False, True):
        x = torch.randn(3, 24, 50)
        dout = torch.randn(3, 24, 50)
        sc, sh, mean = torch.randn(24), torch.randn(24), torch.randn(24)
        _, mask = ops.bn_apply(*_plain(x, mean, sc, sh, cl=cl))
        a = ops.bn_backward_reduce(dout, x, mean, sc, sh, mask, True, cl)
        b = ops.bn_backward_reduce(dout, x, mean, sc, sh, None, True, cl)
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_outputs_streamed(dtype):
    # Outputs over 2 MiB per thread are written with non-temporal stores where aligned
    # (channels-last rows of 64 channels), plain stores elsewhere (65: rows off 64 bytes).
    torch.manual_seed(0)
    for c, cl in [(64, True), (65, True), (64, False)]:
        n, s = 4, (9 << 20) // (4 * c * dtype.itemsize) + 3  # > 2 MiB x 2 threads x 2
        x = torch.randn(n, s, c, dtype=dtype).permute(0, 2, 1) if cl \
            else torch.randn(n, c, s, dtype=dtype)
        res, dout = torch.randn_like(x), torch.randn_like(x)
        sc, sh, mean = (torch.randn(c, dtype=dtype) for _ in range(3))
        args = _plain(x, mean, sc, sh, cl=cl, res=res)
        out, mask = ops.bn_apply(*args)
        r_out, r_mask = ref.bn_apply(*args)
        assert torch.equal(mask, r_mask)
        torch.testing.assert_close(out, r_out)
        got = ops.bn_backward_apply(dout, x, mean, sc, sh, mask, sc, sh, mean, True, True, cl)
        want = ref.bn_backward_apply(dout, x, mean, sc, sh, mask, sc, sh, mean, True, True, cl)
        torch.testing.assert_close(got, want)


def test_input_checks():
    x = torch.randn(2, 4, 5)
    v = torch.ones(4)
    with pytest.raises(RuntimeError, match="3-D"):
        ops.bn_stats(torch.randn(2, 4), False)
    with pytest.raises(RuntimeError, match="C = 4"):
        ops.bn_apply(*_plain(x, v, torch.ones(3), v, save_mask=False))
    with pytest.raises(RuntimeError, match="C = 4"):
        ops.bn_apply(*_plain(x, torch.ones(3), v, v, save_mask=False))
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        ops.bn_apply(*_plain(x, v, v.double(), v, save_mask=False))
    with pytest.raises(RuntimeError, match="residual must have x's shape"):
        ops.bn_apply(*_plain(x, v, v, v, save_mask=False, res=torch.randn(2, 4, 6)))
    with pytest.raises(RuntimeError, match="x2 must have x's shape"):
        ops.bn_apply(x, v, v, v, None, torch.randn(2, 3, 5), v, v, v, True, False, False)
    with pytest.raises(RuntimeError, match="x2 needs mean2"):
        ops.bn_apply(x, v, v, v, None, x, None, v, v, True, False, False)
    with pytest.raises(RuntimeError, match="dout must have x's shape"):
        ops.bn_backward_reduce(torch.randn(2, 4, 6), x, v, v, v, None, True, False)
    with pytest.raises(RuntimeError, match="bytes"):
        ops.bn_backward_apply(x, x, v, v, v, torch.zeros(3, dtype=torch.uint8), v, v, v, True,
                              False, False)


def test_expanded_gradient():
    # Autograd can hand over a stride-0 gradient (out.sum().backward()).
    x = torch.randn(2, 6, 10)
    dout = torch.ones(1, 1, 1).expand(2, 6, 10)
    mean, sc, sh = torch.randn(6), torch.randn(6), torch.randn(6)
    for cl in (False, True):
        got = ops.bn_backward_reduce(dout, x, mean, sc, sh, None, True, cl)
        want = ref.bn_backward_reduce(dout, x, mean, sc, sh, None, True, cl)
        torch.testing.assert_close(got, want)
        got = ops.bn_backward_apply(dout, x, mean, sc, sh, None, sc, sh, mean, True, True, cl)
        want = ref.bn_backward_apply(dout, x, mean, sc, sh, None, sc, sh, mean, True, True, cl)
        torch.testing.assert_close(got, want)


def test_int64_offsets():
    # Elements past 2**31 of an untouched big buffer (only a few pages become resident).
    try:
        big = torch.empty(2**31 + 4096, dtype=torch.float16)
    except (RuntimeError, MemoryError):
        pytest.skip("cannot reserve 4 GiB of address space")
    n, c, s = 2, 5, 7
    for strides in [(2**31 - 16, s, 1), (2**31 - 16, 1, c)]:
        x = big.as_strided((n, c, s), strides)
        x.copy_(torch.randn(n, c, s))
        sc, sh, mean = torch.randn(c), torch.randn(c), torch.randn(c)
        torch.testing.assert_close(ops.bn_stats(x, False), ref.bn_stats(x), rtol=1e-5, atol=1e-5)
        args = _plain(x, mean, sc, sh, cl=strides[1] == 1, res=x)
        out, mask = ops.bn_apply(*args)
        r_out, r_mask = ref.bn_apply(*args)
        assert torch.equal(mask, r_mask)
        torch.testing.assert_close(out, r_out)
        torch.testing.assert_close(ops.bn_backward_reduce(x, x, mean, sc, sh, None, True, False),
                                   ref.bn_backward_reduce(x, x, mean, sc, sh, None, True, False))
        torch.testing.assert_close(
            ops.bn_backward_apply(x, x, mean, sc, sh, None, sc, sh, mean, True, True, False),
            ref.bn_backward_apply(x, x, mean, sc, sh, None, sc, sh, mean, True, True, False))
    del big


# --------------------------------------------------------------------------------------
# Issue 14 point 7: a large mean with a small spread (the centred apply)
# --------------------------------------------------------------------------------------


def _bn_relu_and_grads(fn, x, weight, bias, dout):
    """fn(x, weight, bias) and the gradients of <out, dout> w.r.t. x, weight, bias."""
    x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
    out = fn(x, weight, bias)
    out.backward(dout.to(out.dtype))
    return [t.detach().double() for t in (out, x.grad, weight.grad, bias.grad)]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_mean_small_spread(channels_last, training):
    """mean 1e3, std 1e-2, float32: the cpu pipeline's output and every gradient are within
    2x torch's own float32 error against float64 (the old x*scale + (bias - mean*scale)
    cancelled: 1.3-5.6x torch's error)."""
    g = torch.Generator().manual_seed(7)
    n, c, h, w = 4, 24, 7, 7
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 1e-2 + 1e3).float()
    x = x.contiguous(memory_format=fmt)
    weight = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).float()
    bias = (torch.randn(c, generator=g, dtype=torch.float64) * 0.1).float()
    dout = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
    x64 = x.double()
    # eval: the batch's statistics, rounded to float32 (the truth sees the same inputs)
    rm, rv = (v.float().double() for v in (x64.mean(dim=(0, 2, 3)), x64.var(dim=(0, 2, 3))))

    def torch_bn(dtype):
        def f(xx, ww, bb):
            return torch.relu(torch.nn.functional.batch_norm(
                xx, rm.to(dtype), rv.to(dtype), ww, bb, training=training, eps=1e-5))
        return f

    def fused(xx, ww, bb):
        out = torch.ops.fusedres.bn_act_forward(
            xx, ww, bb, rm.float(), rv.float(), None, None, None, None, None, None, training,
            1e-5, True)[0]
        assert out.is_contiguous(memory_format=fmt)
        return out

    truth = _bn_relu_and_grads(torch_bn(torch.float64), x64, weight.double(), bias.double(),
                               dout)
    theirs = _bn_relu_and_grads(torch_bn(torch.float32), x, weight, bias, dout)
    ours = _bn_relu_and_grads(fused, x, weight, bias, dout)
    for name, t, a, b in zip(["out", "dx", "dweight", "dbias"], truth, ours, theirs):
        err, torch_err = (a - t).abs().max().item(), (b - t).abs().max().item()
        floor = 1e-7 * t.abs().max().item()  # where torch is exact to the last bits
        assert err <= 2 * torch_err + floor, (name, err, torch_err)

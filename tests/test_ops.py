"""torch.library.opcheck on every registered op, and the kernel primitives of each
backend against their pure-PyTorch contract in fusedres.reference."""
import pytest
import torch

import fusedres
from fusedres import ops
from fusedres import reference as ref


def _ncs(n, c, s, dtype, device, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, s, c, generator=g, dtype=torch.float64).permute(0, 2, 1) \
        if channels_last else torch.randn(n, c, s, generator=g, dtype=torch.float64)
    return t.to(device=device, dtype=dtype)


def _vec(c, device, seed, lo=-1.0, hi=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(c, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(device, dtype)


def _fused_args(device, residual, dual, training, relu, channels_last, backend,
                dtype=torch.float64):
    n, c, s = 2, 3, 5
    x = _ncs(n, c, s, dtype, device, channels_last).requires_grad_()
    pd = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = _vec(c, device, 1, 0.5, 1.5, pd).requires_grad_()
    b = _vec(c, device, 2, dtype=pd).requires_grad_()
    rm, rv = _vec(c, device, 3, dtype=pd), _vec(c, device, 4, 0.5, 1.5, pd)
    r = _ncs(n, c, s, dtype, device, channels_last, 5).requires_grad_() if residual else None
    if dual:
        x2 = _ncs(n, c, s, dtype, device, channels_last, 6).requires_grad_()
        w2 = _vec(c, device, 7, 0.5, 1.5, pd).requires_grad_()
        b2 = _vec(c, device, 8, dtype=pd).requires_grad_()
        rm2, rv2 = _vec(c, device, 9, dtype=pd), _vec(c, device, 10, 0.5, 1.5, pd)
    else:
        x2 = w2 = b2 = rm2 = rv2 = None
    return (x, w, b, rm, rv, r, x2, w2, b2, rm2, rv2, training, 1e-5, relu, channels_last,
            backend)


@pytest.mark.parametrize("variant", ["relu", "bn", "add", "dual"])
def test_opcheck_fused_op(backend_device, variant):
    backend, device = backend_device
    interpreted = backend == "triton" and device == "cpu"
    for training in (True, False):
        for channels_last in ((False,) if interpreted else (False, True)):
            args = _fused_args(device, variant == "add", variant == "dual", training,
                               variant != "bn", channels_last, backend)
            torch.library.opcheck(torch.ops.fusedres.batch_norm_act.default, args)


def test_opcheck_update_running_stats():
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    mean, var = torch.randn(4), torch.rand(4)
    torch.library.opcheck(torch.ops.fusedres.update_running_stats.default,
                          (rm, rv, mean, var, 1.5, 0.1, None))
    torch.library.opcheck(torch.ops.fusedres.update_running_stats.default,
                          (rm, rv, mean, var, 1.0, 0.0, torch.tensor(3)))


def _primitive_cases(device, dtype, channels_last):
    """(name, args) of each primitive on awkward shapes."""
    cases = []
    for n, c, s in ((2, 3, 5), (1, 65, 3), (4, 8, 1), (3, 1, 7)):
        x = _ncs(n, c, s, dtype, device, channels_last, 1)
        r = _ncs(n, c, s, dtype, device, channels_last, 2)
        x2 = _ncs(n, c, s, dtype, device, channels_last, 3)
        acc = ref.acc_dtype(dtype)
        sc, sh = _vec(c, device, 4, 0.5, 1.5, acc), _vec(c, device, 5, dtype=acc)
        sc2, sh2 = _vec(c, device, 6, 0.5, 1.5, acc), _vec(c, device, 7, dtype=acc)
        mean = _vec(c, device, 8, dtype=acc)
        cg, cx, cc = (_vec(c, device, k, dtype=acc) for k in (9, 10, 11))
        m2 = _vec(c, device, 12, dtype=acc)
        _, mask = ref.bn_apply(x, mean, sc, sh, r, x2, m2, sc2, sh2, True, True, channels_last)
        cases += [
            ("stats", (x, channels_last)),
            ("apply", (x, mean, sc, sh, None, None, None, None, None, True, False,
                       channels_last)),
            ("apply", (x, mean, sc, sh, None, None, None, None, None, False, False,
                       channels_last)),
            ("apply", (x, mean, sc, sh, r, None, None, None, None, True, True, channels_last)),
            ("apply", (x, mean, sc, sh, r, x2, m2, sc2, sh2, True, True, channels_last)),
            ("backward_reduce", (r, x, mean, sc, sh, None, True, channels_last)),
            ("backward_reduce", (r, x, mean, sc, sh, None, False, channels_last)),
            ("backward_reduce", (r, x, mean, sc, sh, mask, True, channels_last)),
            ("backward_apply", (r, x, mean, sc, sh, None, cg, cx, cc, True, False,
                                channels_last)),
            ("backward_apply", (r, x, mean, sc, sh, mask, cg, cx, cc, True, True,
                                channels_last)),
            ("backward_apply", (r, x, mean, sc, sh, None, cg, cx, cc, False, True,
                                channels_last)),
        ]
    return cases


_REF = ops.primitives("reference_primitives")


@pytest.mark.parametrize("channels_last", [False, True], ids=["ncs", "cl"])
def test_primitives_match_contract(backend_device, channels_last):
    backend, device = backend_device
    if backend == "reference_primitives":
        pytest.skip("the contract itself")
    prims = ops.primitives(backend)
    for name, args in _primitive_cases(device, torch.float64, channels_last):
        got = getattr(prims, name)(*args)
        want = getattr(_REF, name)(*args)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape, name
            if g.dtype == torch.uint8:
                assert torch.equal(g, w), f"{name}: mask bits differ"
            else:
                torch.testing.assert_close(g, w, msg=name)
                if g.dim() == 3 and g.numel() > 0:
                    assert g.stride() == w.stride(), f"{name}: output layout"


def test_opcheck_primitives(backend_device):
    backend, device = backend_device
    if backend == "reference_primitives":
        pytest.skip("plain Python functions, not ops")
    prims = ops.primitives(backend)
    for name, args in _primitive_cases(device, torch.float64, True)[:11]:
        torch.library.opcheck(getattr(prims, name), args)


def test_mask_pack_roundtrip():
    for channels_last in (False, True):
        passes = torch.rand(3, 5, 7) > 0.5
        mask = ref.pack_mask(passes, channels_last)
        assert mask.numel() == (3 * 5 * 7 + 7) // 8
        assert torch.equal(ref.unpack_mask(mask, (3, 5, 7), channels_last), passes)
    # bit order: element offset o -> byte o >> 3, bit o & 7
    passes = torch.zeros(1, 1, 10, dtype=torch.bool)
    passes[0, 0, 9] = True
    assert ref.pack_mask(passes, False).tolist() == [0, 2]


def test_int64_offsets(backend_device):
    """A (N, C, S) view whose largest offset passes 2**31 over an untouched buffer (only
    the few pages the view reads become resident)."""
    backend, device = backend_device
    if backend == "reference_primitives":
        pytest.skip("the contract itself")
    n, c, s = 2, 3, 8
    buf = torch.empty(2**31 + 64, dtype=torch.float16, device=device)
    x = buf.as_strided((n, c, s), (2**31, s, 1))
    x.copy_(torch.randn(n, c, s, dtype=torch.float16))
    dout = torch.randn(n, c, s, dtype=torch.float16, device=device)
    prims = ops.primitives(backend)
    dense = x.clone()
    for name, args in (("stats", (x, False)),):
        torch.testing.assert_close(getattr(prims, name)(*args), _REF.stats(dense, False))
    mean, var = _REF.stats(dense, False)
    sc, sh = torch.rsqrt(var + 1e-5), torch.zeros_like(mean)
    got = prims.apply(x, mean, sc, sh, None, None, None, None, None, True, False, False)[0]
    torch.testing.assert_close(got, _REF.apply(dense, mean, sc, sh, None, None, None, None,
                                               None, True, False, False)[0])
    got = prims.backward_reduce(dout, x, mean, sc, sh, None, True, False)
    torch.testing.assert_close(got, _REF.backward_reduce(dout, dense, mean, sc, sh, None, True,
                                                         False))


# --------------------------------------------------------------------------------------
# The C++ pipeline (csrc/bn_fused.cpp) of the cpu and cuda backends
# --------------------------------------------------------------------------------------


def _native_backends():
    out = [(b, d) for b, d in (("cpu", "cpu"), ("cuda", "cuda"))
           if b in fusedres.available_backends()
           and torch._C._dispatch_has_kernel_for_dispatch_key("fusedres::bn_act_forward",
                                                               d.upper())]
    return out or [pytest.param(None, None, marks=pytest.mark.skip("fusedres._C not built"))]


_VARIANTS = {"relu": (False, False, True), "bn": (False, False, False),
             "add": (True, False, True), "dual": (False, True, True),
             "add+dual": (True, True, True)}


def _grads(outputs, inputs, seed=11):
    out = outputs[0]
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("backend,device", _native_backends())
@pytest.mark.parametrize("variant", list(_VARIANTS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncs", "cl"])
def test_native_pipeline_equals_python_pipeline(backend, device, variant, training,
                                                channels_last):
    """Same primitives, same finalize formulas: the C++ pipeline and its autograd give
    bitwise the Python pipeline's outputs, statistics, mask and every gradient."""
    residual, dual, relu = _VARIANTS[variant]
    args = _fused_args(device, residual, dual, training, relu, channels_last, backend,
                       dtype=torch.float32)
    python = torch.ops.fusedres.batch_norm_act(*args)
    native = torch.ops.fusedres.bn_act_forward(*args[:-2])
    for p, n in zip(python, native):
        assert p.shape == n.shape and p.stride() == n.stride()
        assert torch.equal(p, n)
    for p, n in zip(_grads(python, args), _grads(native, args)):
        assert torch.equal(p, n)


@pytest.mark.parametrize("backend,device", _native_backends())
def test_native_pipeline_on_4d_any_strides(backend, device):
    """(N, C, H, W) in, out in x's shape and layout; gradients of any strides."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 5, 4, generator=g).to(device, memory_format=torch.channels_last)
    x.requires_grad_()
    r = torch.randn(2, 6, 5, 4, generator=g).to(device).requires_grad_()  # NCHW residual
    w = (torch.rand(6, generator=g) + 0.5).to(device).requires_grad_()
    b = torch.randn(6, generator=g).to(device).requires_grad_()
    out, *_ = torch.ops.fusedres.bn_act_forward(x, w, b, None, None, r, None, None, None, None,
                                                None, True, 1e-5, True)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    want = torch.relu(torch.nn.functional.batch_norm(x.double(), None, None, w.double(),
                                                     b.double(), True) + r.double())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    dout = torch.randn(6, 1, 1, generator=g).to(device).expand(2, 6, 5, 4)  # stride 0
    got = torch.autograd.grad(out, (x, r, w, b), dout)
    ref_in = [t.detach().double().requires_grad_() for t in (x, r, w, b)]
    want = torch.relu(torch.nn.functional.batch_norm(ref_in[0], None, None, ref_in[2],
                                                     ref_in[3], True) + ref_in[1])
    for a, e in zip(got, torch.autograd.grad(want, ref_in, dout.double())):
        torch.testing.assert_close(a.double(), e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", _native_backends())
@pytest.mark.parametrize("variant", ["relu", "add", "dual"])
def test_opcheck_native_ops(backend, device, variant):
    residual, dual, relu = _VARIANTS[variant]
    for training in (True, False):
        for channels_last in (False, True):
            args = _fused_args(device, residual, dual, training, relu, channels_last, backend)
            torch.library.opcheck(torch.ops.fusedres.bn_act_forward.default, args[:-2])
            outs = torch.ops.fusedres.bn_act_forward(*args[:-2])
            x, w, b, _, _, r, x2, w2, b2 = args[:9]
            bwd = (torch.randn_like(outs[0]), x.detach(), w.detach(), b.detach(), outs[1],
                   outs[2], outs[5] if outs[5].numel() else None,
                   None if x2 is None else x2.detach(), None if w2 is None else w2.detach(),
                   None if b2 is None else b2.detach(), outs[3] if dual else None,
                   outs[4] if dual else None, training, 1e-5, relu, residual,
                   [True, True, residual, dual, dual])
            torch.library.opcheck(torch.ops.fusedres.bn_act_backward.default, bwd)


@pytest.mark.parametrize("momentum,nbt", [(0.3, None), (0.7, None), (0.0, 3), (0.0, 1)],
                         ids=["momentum", "large-momentum", "cumulative", "cumulative-first"])
@pytest.mark.parametrize("layout", ["float32", "float64", "float16-running", "strided-running"])
def test_update_running_stats_matches_reference_function(momentum, nbt, layout):
    """The op (C++ when fusedres._C is loaded: a loop for dense CPU statistics, tensor ops
    otherwise) is the Python function it documents, bit for bit, and is nn.BatchNorm's
    update; it bumps the running tensors' version counters as an in-place op does."""
    g = torch.Generator().manual_seed(0)
    acc = torch.float64 if layout == "float64" else torch.float32
    running = {"float16-running": torch.float16}.get(layout, acc)
    rm, rv = torch.randn(10, generator=g, dtype=acc), torch.rand(10, generator=g, dtype=acc)
    rm, rv = rm.to(running), rv.to(running)
    step = 2 if layout == "strided-running" else 1  # every other value: not contiguous
    rm, rv = rm[:5 * step:step], rv[:5 * step:step]
    mean, var = torch.randn(5, generator=g, dtype=acc), torch.rand(5, generator=g, dtype=acc)
    count = None if nbt is None else torch.tensor(nbt)
    rm0, rv0 = rm.to(acc).clone(), rv.to(acc).clone()
    want_m, want_v = rm.clone(), rv.clone()
    ops.update_running_stats_reference(want_m, want_v, mean, var, 1.25, momentum, count)
    versions = rm._version, rv._version
    ops.update_running_stats(rm, rv, mean, var, 1.25, momentum, count)
    assert torch.equal(rm, want_m) and torch.equal(rv, want_v)
    assert rm._version > versions[0] and rv._version > versions[1]
    f = momentum if nbt is None else 1 / nbt  # nn.BatchNorm's update
    tol = {"atol": 1e-3, "rtol": 1e-3} if running == torch.float16 else {}
    torch.testing.assert_close(rm.to(acc), (1 - f) * rm0 + f * mean, **tol)
    torch.testing.assert_close(rv.to(acc), (1 - f) * rv0 + f * var * 1.25, **tol)
    if f == 1:  # the first batch of a cumulative average is the batch, exactly
        assert torch.equal(rm, mean.to(running)) and torch.equal(rv, (var * 1.25).to(running))


def test_update_running_stats_unusual_inputs_as_torch():
    """What the CPU loop does not take goes through tensor ops, which raise (before writing
    anything) where an in-place torch op would; a fractional counter is read as a float."""
    mean, var = torch.randn(4), torch.rand(4)
    with pytest.raises(RuntimeError, match="more than one element"):  # overlapping
        ops.update_running_stats(torch.zeros(1).expand(4), torch.ones(4), mean, var, 1.0,
                                 0.1, None)
    leaf_m, leaf_v = torch.zeros(4, requires_grad=True), torch.ones(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        ops.update_running_stats(leaf_m, leaf_v, mean, var, 1.0, 0.1, None)
    assert torch.equal(leaf_m.detach(), torch.zeros(4))
    with pytest.raises(RuntimeError):  # sizes
        ops.update_running_stats(torch.zeros(3), torch.ones(3), mean, var, 1.0, 0.1, None)
    counter = torch.tensor(2.5, dtype=torch.float64)
    got_m, got_v, want_m, want_v = torch.zeros(4), torch.ones(4), torch.zeros(4), torch.ones(4)
    ops.update_running_stats(got_m, got_v, mean, var, 1.5, 0.0, counter)
    ops.update_running_stats_reference(want_m, want_v, mean, var, 1.5, 0.0, counter)
    assert torch.equal(got_m, want_m) and torch.equal(got_v, want_v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("nbt", [None, 1, 3])
def test_update_running_stats_cuda(nbt):
    """On CUDA (torch.lerp, whose multiply-add may be fused): the reference to a rounding."""
    g = torch.Generator().manual_seed(0)
    rm, rv = torch.randn(64, generator=g).cuda(), torch.rand(64, generator=g).cuda()
    mean, var = torch.randn(64, generator=g).cuda(), torch.rand(64, generator=g).cuda()
    count = None if nbt is None else torch.tensor(nbt, device="cuda")
    want_m, want_v = rm.clone(), rv.clone()
    ops.update_running_stats_reference(want_m, want_v, mean, var, 1.25, 0.3, count)
    ops.update_running_stats(rm, rv, mean, var, 1.25, 0.3, count)
    torch.testing.assert_close(rm, want_m, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rv, want_v, atol=1e-6, rtol=1e-6)
    if nbt == 1:
        assert torch.equal(rm, mean) and torch.equal(rv, var * 1.25)


def test_import_does_not_query_the_gpu():
    """Importing fusedres (its backend table included) never asks torch.cuda about a GPU:
    a forked worker may still initialise CUDA itself."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        def refuse(*args, **kwargs):
            raise AssertionError("torch.cuda queried at import")
        torch.cuda.is_available = torch.cuda.device_count = refuse
        torch.cuda.init = torch.cuda.current_device = refuse
        import fusedres, fusedres.functional, fusedres.nn, fusedres.convert
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_package_works_without_extension():
    """With fusedres._C unavailable the package imports, says which backends remain, and
    the Python definitions of the ops (update_running_stats included) run."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        sys.modules["fusedres._C"] = None  # import fails as if never built
        import torch
        import fusedres
        from fusedres import functional as FF, ops
        assert fusedres.extension_error is not None
        assert "cpu" not in fusedres.available_backends()
        assert "reference" in fusedres.available_backends()
        assert not ops._has_native("bn_act_forward")
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        y = FF.batch_norm_relu(x, rm, rv, training=True, backend="reference_primitives")
        want_rm = 0.1 * x.detach().mean((0, 2, 3))
        torch.testing.assert_close(rm, want_rm)
        want = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True))
        torch.testing.assert_close(y, want)
        y.sum().backward()
        assert x.grad is not None
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# --------------------------------------------------------------------------------------
# Numerics of the centred apply (issue 14 point 7)
# --------------------------------------------------------------------------------------

def _large_mean_case(channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 1e3 + 1e-2 * torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    x = x.float()  # the fp32 values every computation starts from
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).float()
    b = (0.1 * torch.randn(3, generator=g, dtype=torch.float64)).float()
    rm = x.double().mean((0, 2, 3)).float() + 1e-3  # eval: centre near the data
    rv = torch.full((3,), 1e-4)
    dout = torch.randn(x.shape, generator=g, dtype=torch.float64).float()
    return x, w, b, rm, rv, dout


def _bn_relu_grads(fn, x, w, b, rm, rv, dout, training):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    out = fn(leaves[0], rm.clone(), rv.clone(), leaves[1], leaves[2], training)
    return (out, *torch.autograd.grad(out, leaves, dout.to(out.dtype)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_large_mean_small_spread_within_twice_torch_error(backend_device, channels_last,
                                                          training):
    """mean 1e3, std 1e-2, fp32, every backend: the output and every gradient within 2x
    torch's own fp32 error against float64. ``x*scale + (beta - mean*scale)`` cancels (~1e5 terms, an ulp
    of 8e-3), ``(x - mean)*scale + beta`` does not."""
    backend, device = backend_device
    from fusedres import functional as FF

    x, w, b, rm, rv, dout = (t.to(device) for t in _large_mean_case(channels_last))

    def torch_bn_relu(x, rm, rv, w, b, training):
        return torch.relu(torch.nn.functional.batch_norm(x, rm, rv, w, b, training))

    def fused(x, rm, rv, w, b, training):
        return FF.batch_norm_relu(x, rm, rv, w, b, training, backend=backend)

    exact = _bn_relu_grads(torch_bn_relu, *(t.double() for t in (x, w, b, rm, rv, dout)),
                           training)
    torch32 = _bn_relu_grads(torch_bn_relu, x, w, b, rm, rv, dout, training)
    got = _bn_relu_grads(fused, x, w, b, rm, rv, dout, training)
    for name, e, t, f in zip(("out", "dx", "dweight", "dbias"), exact, torch32, got):
        torch_err = (t.double() - e).abs().max().item()
        err = (f.double() - e).abs().max().item()
        assert err <= 2 * torch_err, (f"{name}: error {err:.3g} vs float64, torch's own fp32 "
                                      f"error {torch_err:.3g}")

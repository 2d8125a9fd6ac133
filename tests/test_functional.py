"""fusedres.functional on every kernel backend against the composite reference.

Each backend runs the same cases: outputs, every gradient and the running statistics
against ``fusedres.reference`` (F.batch_norm + relu) computed in float64.
"""
import copy

import pytest
import torch

import fusedres
from fusedres import functional as FF
from fusedres import reference as ref

KINDS = ("bn", "relu", "add", "dual")


def _interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def make_case(kind, shape, dtype, device, layout, seed=0, mean=0.0, std=1.0):
    """Inputs, parameters and running stats for one call (all leaves, grads on)."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]

    def act():
        t = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean)
        if layout == "channels_last" and t.dim() == 4:
            t = t.to(memory_format=torch.channels_last)
        return t.to(device=device, dtype=dtype).requires_grad_()

    def vec(lo=-1.0, hi=1.0):
        return (torch.rand(c, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(device)

    pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    case = {
        "x": act(),
        "weight": vec(0.5, 1.5).to(pdtype).requires_grad_(),
        "bias": vec().to(pdtype).requires_grad_(),
        "running_mean": vec().to(pdtype),
        "running_var": vec(0.5, 1.5).to(pdtype),
    }
    if kind == "add":
        case["residual"] = act()
    if kind == "dual":
        case.update(shortcut=act(), shortcut_weight=vec(0.5, 1.5).to(pdtype).requires_grad_(),
                    shortcut_bias=vec().to(pdtype).requires_grad_(),
                    shortcut_running_mean=vec().to(pdtype),
                    shortcut_running_var=vec(0.5, 1.5).to(pdtype))
    return case


def call(kind, case, training, backend, momentum=0.1, eps=1e-5, **kw):
    c = case
    if backend == "reference":
        if kind == "dual":
            return ref.dual_batch_norm_add_relu(
                c["x"], c["running_mean"], c["running_var"], c["weight"], c["bias"],
                c["shortcut"], c["shortcut_running_mean"], c["shortcut_running_var"],
                c["shortcut_weight"], c["shortcut_bias"], training, momentum, eps)
        y = torch.nn.functional.batch_norm(c["x"], c["running_mean"], c["running_var"],
                                           c["weight"], c["bias"], training, momentum, eps)
        if kind == "add":
            y = y + c["residual"]
        return y if kind == "bn" else torch.relu(y)
    if kind == "dual":
        return FF.dual_batch_norm_add_relu(
            c["x"], c["shortcut"], c["running_mean"], c["running_var"], c["weight"], c["bias"],
            c["shortcut_running_mean"], c["shortcut_running_var"], c["shortcut_weight"],
            c["shortcut_bias"], training, momentum, eps, backend=backend, **kw)
    if kind == "add":
        return FF.batch_norm_add_relu(c["x"], c["residual"], c["running_mean"], c["running_var"],
                                      c["weight"], c["bias"], training, momentum, eps,
                                      backend=backend, **kw)
    if kind == "relu":
        return FF.batch_norm_relu(c["x"], c["running_mean"], c["running_var"], c["weight"],
                                  c["bias"], training, momentum, eps, backend=backend, **kw)
    return FF.batch_norm(c["x"], c["running_mean"], c["running_var"], c["weight"], c["bias"],
                         training, momentum, eps, relu=False, backend=backend, **kw)


def to64(case):
    out = {}
    for k, v in case.items():
        t = v.detach().to(torch.float64)
        out[k] = t.requires_grad_() if v.requires_grad else t
    return out


def run_and_grads(kind, case, training, backend, grad_seed=1, dy=None, **kw):
    y = call(kind, case, training, backend, **kw)
    if dy is None:
        g = torch.Generator().manual_seed(grad_seed)
        dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device, y.dtype)
    leaves = {k: v for k, v in case.items() if v.requires_grad}
    grads = torch.autograd.grad(y, list(leaves.values()), dy, allow_unused=True)
    return y, dict(zip(leaves, grads))


def check_against_reference(kind, shape, dtype, layout, training, backend, device, atol, rtol):
    case = make_case(kind, shape, dtype, device, layout)
    expected_case = to64(case)
    y, grads = run_and_grads(kind, case, training, backend)
    assert FF.last_backend() == backend
    y_ref, grads_ref = run_and_grads(kind, expected_case, training, "reference")
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol, msg=f"{kind} output")
    if layout == "channels_last" and len(shape) == 4:
        assert y.is_contiguous(memory_format=torch.channels_last)
    for name in grads_ref:
        torch.testing.assert_close(grads[name].double(), grads_ref[name], atol=atol, rtol=rtol,
                                   msg=f"gradient of {name}")
    for name in ("running_mean", "running_var", "shortcut_running_mean",
                 "shortcut_running_var"):
        if name in case:
            torch.testing.assert_close(case[name].double(), expected_case[name], atol=atol,
                                       rtol=rtol, msg=name)


SHAPES = [(2, 3, 4, 5), (1, 65, 3, 3), (4, 8, 1, 1), (3, 5), (2, 4, 7)]
SHAPES_INTERPRETED = [(2, 3, 4, 5), (3, 5)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_matches_reference_fp64(backend_device, kind, training, layout):
    backend, device = backend_device
    shapes = SHAPES_INTERPRETED if _interpreted(backend, device) else SHAPES
    for shape in shapes:
        check_against_reference(kind, shape, torch.float64, layout, training, backend, device,
                                atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_reference_fp32(backend_device, kind, training):
    backend, device = backend_device
    shape = (2, 3, 4, 5) if _interpreted(backend, device) else (4, 16, 6, 6)
    for layout in ("nchw", "channels_last"):
        check_against_reference(kind, shape, torch.float32, layout, training, backend, device,
                                atol=1e-4, rtol=1e-4)


def _max_err(kind, case, training, backend, y64, g64):
    y, grads = run_and_grads(kind, case, training, backend)
    errs = [(y.double() - y64).abs().max().item()]
    errs += [(grads[k].double() - g64[k]).abs().max().item() for k in g64]
    return errs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["relu", "add", "dual"])
def test_half_precision_error_bounded_by_torch(backend_device, dtype, kind):
    """Error against an fp64 reference within 2x (+ one ulp-ish slack) of torch's own."""
    backend, device = backend_device
    if _interpreted(backend, device) and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic does not run in the Triton interpreter")
    if device == "cpu" and backend == "reference_primitives" and dtype == torch.bfloat16:
        pass  # the reference primitives compute in fp32: fine on CPU
    shape = (2, 3, 4, 5) if _interpreted(backend, device) else (4, 32, 8, 8)
    case = make_case(kind, shape, dtype, device, "channels_last")
    y64, g64 = run_and_grads(kind, to64(case), True, "reference")
    torch_errs = _max_err(kind, copy.deepcopy(case), True, "reference", y64, g64)
    ours = _max_err(kind, case, True, backend, y64, g64)
    eps = torch.finfo(dtype).eps
    for name, a, b in zip(["output"] + list(g64), ours, torch_errs):
        assert a <= 2 * b + 4 * eps, f"{name}: fused error {a:.3g} vs torch {b:.3g}"


def test_large_mean_small_spread_statistics(backend_device):
    """mean 1e3, std 1e-2: E[x^2]-E[x]^2 in fp32 would give garbage variance."""
    backend, device = backend_device
    shape = (2, 3, 4, 5) if _interpreted(backend, device) else (16, 8, 32, 32)
    case = make_case("relu", shape, torch.float32, device, "channels_last", mean=1e3, std=1e-2)
    case64 = to64(case)
    y, _ = run_and_grads("relu", case, True, backend)
    y64, _ = run_and_grads("relu", case64, True, "reference")
    torch_y, _ = run_and_grads("relu", copy.deepcopy(case), True, "reference")
    ours = (y.double() - y64).abs().max().item()
    theirs = (torch_y.double() - y64).abs().max().item()
    assert ours <= 4 * theirs + 1e-3, f"fused error {ours:.3g}, torch's own {theirs:.3g}"
    torch.testing.assert_close(case["running_var"].double(), case64["running_var"],
                               rtol=1e-3, atol=1e-6)


def test_gradcheck_fp64(backend_device):
    backend, device = backend_device
    interpreted = _interpreted(backend, device)  # slow there: fewer cases, tiny shapes
    for kind in ("relu", "dual") if interpreted else KINDS:
        for training in (True,) if interpreted else (True, False):
            case = make_case(kind, (2, 3, 2, 3), torch.float64, device, "nchw")
            names = [k for k, v in case.items() if v.requires_grad]

            def f(*leaves):
                c = dict(case)
                c.update(zip(names, leaves))
                c["running_mean"] = case["running_mean"].clone()
                c["running_var"] = case["running_var"].clone()
                return call(kind, c, training, backend)

            assert torch.autograd.gradcheck(f, [case[k] for k in names])


def test_momentum_none_and_no_tracking(backend_device):
    backend, device = backend_device
    shape = (2, 3, 2, 3)
    case = make_case("relu", shape, torch.float64, device, "nchw")
    expected = to64(case)
    nbt = torch.tensor(3, device=device)
    call("relu", case, True, backend, momentum=None, num_batches_tracked=nbt)
    torch.nn.functional.batch_norm(expected["x"], expected["running_mean"],
                                   expected["running_var"], None, None, True, 1 / 3)
    torch.testing.assert_close(case["running_mean"], expected["running_mean"])
    torch.testing.assert_close(case["running_var"], expected["running_var"])
    # No running statistics, no affine parameters.
    x = case["x"].detach()
    y = FF.batch_norm_relu(x, None, None, None, None, True, backend=backend)
    torch.testing.assert_close(y, torch.relu(torch.nn.functional.batch_norm(x, None, None,
                                                                            training=True)))


def test_gradient_with_any_strides(backend_device):
    """Autograd may hand backward an NCHW gradient for a channels_last output, or an
    expanded stride-0 one."""
    backend, device = backend_device
    for kind in ("relu", "add"):
        case = make_case(kind, (2, 3, 4, 5), torch.float64, device, "channels_last")
        y = call(kind, case, True, backend)
        (gx,) = torch.autograd.grad(y.sum(), [case["x"]])  # stride-0 gradient
        case2 = to64(case)
        y2 = call(kind, case2, True, "reference")
        (gx2,) = torch.autograd.grad(y2.sum(), [case2["x"]])
        torch.testing.assert_close(gx, gx2)
        y = call(kind, case, True, backend)
        dy = torch.randn(y.shape, dtype=y.dtype, device=device).contiguous()  # NCHW
        (gx,) = torch.autograd.grad(y, [case["x"]], dy)
        y2 = call(kind, case2, True, "reference")
        (gx2,) = torch.autograd.grad(y2, [case2["x"]], dy)
        torch.testing.assert_close(gx, gx2)


def test_nan_propagates(backend_device):
    backend, device = backend_device
    for kind in ("relu", "add"):
        case = make_case(kind, (2, 3, 2, 3), torch.float32, device, "nchw")
        with torch.no_grad():
            case["x"][0, 1, 0, 0] = float("nan")
        y = call(kind, case, False, backend)
        y_ref = call(kind, to64(case), False, "reference")
        assert torch.isnan(y[0, 1, 0, 0])
        torch.testing.assert_close(y.double(), y_ref, equal_nan=True, atol=1e-5, rtol=1e-5)


def test_strided_input_view(backend_device):
    backend, device = backend_device
    base = torch.randn(3, 10, 6, 7, dtype=torch.float64, device=device)
    x = base[:, 1::3, ::2, 1:]  # spatial dims not mergeable: a copy is made, result right
    y = FF.batch_norm_relu(x, None, None, training=True, backend=backend)
    torch.testing.assert_close(y, ref.batch_norm_relu(x, None, None, training=True))
    x = base[:2, 2:7]  # mergeable spatial dims with a channel slice: read in place
    r = base[1:, 3:8]
    y = FF.batch_norm_add_relu(x, r, None, None, training=True, backend=backend)
    torch.testing.assert_close(y, ref.batch_norm_add_relu(x, r, None, None, training=True))


def test_deterministic(backend_device):
    backend, device = backend_device
    shape = (2, 3, 4, 5) if _interpreted(backend, device) else (8, 32, 14, 14)
    results = []
    for _ in range(2):
        case = make_case("dual", shape, torch.float32, device, "channels_last")
        y, grads = run_and_grads("dual", case, True, backend)
        results.append([y] + list(grads.values()) + [case["running_var"]])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_empty_batch_as_torch(backend_device):
    backend, device = backend_device
    x = torch.randn(0, 3, 4, 4, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = FF.batch_norm_relu(x, rm, rv, training=True, backend=backend)
    assert y.shape == x.shape
    torch.testing.assert_close(rm, torch.zeros(3, device=device))


# --------------------------------------------------------------------------------------
# Bad input: the same errors for every backend
# --------------------------------------------------------------------------------------


def test_bad_input_errors():
    x = torch.randn(2, 3, 4, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        FF.batch_norm_relu(torch.randn(1, 3), torch.zeros(3), torch.ones(3), training=True)
    with pytest.raises(RuntimeError, match="should contain 3 elements"):
        FF.batch_norm_relu(x, torch.zeros(4), torch.ones(4), training=True)
    with pytest.raises(RuntimeError, match="has shape"):
        FF.batch_norm_add_relu(x, torch.randn(2, 3, 4, 5), rm, rv, training=True)
    with pytest.raises(TypeError, match="dtype"):
        FF.batch_norm_add_relu(x, x.half(), rm, rv, training=True)
    with pytest.raises(TypeError, match="dtype"):
        FF.batch_norm_relu(x, rm, rv, torch.ones(3, dtype=torch.float16), training=True)
    with pytest.raises(TypeError, match="not supported"):
        FF.batch_norm_relu(x.int(), rm, rv, training=True)
    with pytest.raises(RuntimeError, match="evaluation mode"):
        FF.batch_norm_relu(x, None, None, training=False)
    with pytest.raises(ValueError, match="2 or more dims"):
        FF.batch_norm_relu(torch.randn(3), None, None, training=True)
    with pytest.raises(ValueError, match="unknown fusedres backend"):
        FF.batch_norm_relu(x, rm, rv, training=True, backend="cudnn")
    with pytest.raises(ValueError, match="num_batches_tracked"):
        FF.batch_norm_relu(x, rm, rv, training=True, momentum=None)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cannot run on cpu"):
            FF.batch_norm_relu(x, rm, rv, training=True, backend="cuda")
    else:
        with pytest.raises(RuntimeError, match="is on"):
            FF.batch_norm_relu(x.cuda(), rm, rv, training=True)


def test_auto_never_picks_interpreter_or_plumbing():
    name = fusedres.resolve_backend("cpu")
    assert name in ("cpu", "reference")
    assert name == ("cpu" if "cpu" in fusedres.available_backends() else "reference")
    assert "reference_primitives" not in fusedres.available_backends()


def test_auto_on_cuda_prefers_triton_then_cuda(monkeypatch):
    """auto's CUDA order (Triton, measured faster on an H200, then the CUDA C++ kernels,
    then the reference), whatever this machine has."""
    from fusedres import _backend

    cuda = torch.device("cuda")
    monkeypatch.setattr(_backend, "has_triton", lambda: True)
    monkeypatch.setattr(_backend, "has_cuda_kernels", lambda: True)
    assert _backend._resolve(cuda, "auto") == "triton"
    monkeypatch.setattr(_backend, "has_triton", lambda: False)
    assert _backend._resolve(cuda, "auto") == "cuda"
    monkeypatch.setattr(_backend, "has_cuda_kernels", lambda: False)
    assert _backend._resolve(cuda, "auto") == "reference"


def test_resolve_table_is_the_resolution():
    """The looked-up answers of resolve_backend are what resolving gives, for every device
    type and name (string or torch.device), and what cannot run still raises."""
    from fusedres import _backend

    assert _backend._RESOLVED  # the common case is looked up
    for device_type in ("cpu", "cuda", "meta"):
        for backend in ("auto",) + _backend.BACKENDS + (_backend.PLUMBING_BACKEND,):
            try:
                want = _backend._resolve(torch.device(device_type), backend)
            except RuntimeError:
                with pytest.raises(RuntimeError, match="cannot run"):
                    fusedres.resolve_backend(device_type, backend)
                continue
            assert fusedres.resolve_backend(device_type, backend) == want
            assert fusedres.resolve_backend(torch.device(device_type), backend) == want
    with pytest.raises(ValueError, match="unknown fusedres backend"):
        fusedres.resolve_backend("cpu", ["cpu"])


def test_torch_compile_fullgraph(backend_device):
    backend, device = backend_device
    if _interpreted(backend, device):
        pytest.skip("torch.compile of interpreted Triton is not meaningful")
    case = make_case("add", (2, 4, 3, 3), torch.float32, device, "channels_last")
    case64 = to64(case)

    def f(c):
        return call("add", c, True, backend)

    y = torch.compile(f, fullgraph=True)(case)
    y.sum().backward()
    y_ref = call("add", case64, True, "reference")
    y_ref.sum().backward()
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(case["x"].grad.double(), case64["x"].grad, atol=1e-4, rtol=1e-4)


def test_torch_compile_dynamic_shapes_one_graph(backend_device):
    """Batches of other sizes reuse the graph compiled with dynamic shapes: nothing in the
    fused path (e.g. the running-statistics update's Bessel factor) pins the size."""
    from torch._dynamo.testing import CompileCounter

    backend, device = backend_device
    if _interpreted(backend, device):
        pytest.skip("torch.compile of interpreted Triton is not meaningful")
    torch._dynamo.reset()
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    w = torch.ones(3, device=device, requires_grad=True)
    b = torch.zeros(3, device=device, requires_grad=True)

    def f(x):
        return FF.batch_norm_relu(x, rm, rv, w, b, training=True, backend=backend)

    counter = CompileCounter()
    compiled = torch.compile(f, backend=counter, dynamic=True, fullgraph=True)
    for n in (2, 3, 5):
        x = torch.randn(n, 3, 4, 4, device=device)
        want_rm, want_rv = rm.clone(), rv.clone()
        torch.nn.functional.batch_norm(x, want_rm, want_rv, training=True)
        torch.testing.assert_close(compiled(x), torch.relu(
            torch.nn.functional.batch_norm(x, None, None, w, b, training=True)))
        torch.testing.assert_close(rm, want_rm)
        torch.testing.assert_close(rv, want_rv)
    assert counter.frame_count == 1


def _cuda_only(backend_device):
    backend, device = backend_device
    if device != "cuda":
        pytest.skip("needs a GPU")
    return backend


def test_no_host_sync_on_gpu(backend_device):
    backend = _cuda_only(backend_device)
    for kind in KINDS:
        case = make_case(kind, (8, 64, 14, 14), torch.float16, "cuda", "channels_last")
        call(kind, case, True, backend)  # warm up (autotuning may sync)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run_and_grads(kind, case, True, backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_capture_equals_eager(backend_device):
    backend = _cuda_only(backend_device)
    case = make_case("dual", (8, 64, 14, 14), torch.float16, "cuda", "channels_last")
    y_eager, _ = run_and_grads("dual", copy.deepcopy(case), True, backend)  # warm up
    torch.cuda.synchronize()
    dy = torch.randn(y_eager.shape, generator=torch.Generator().manual_seed(1),
                     dtype=torch.float64).to("cuda", y_eager.dtype)
    y_eager, g_eager = run_and_grads("dual", copy.deepcopy(case), True, backend, dy=dy)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # no host transfer inside: dy was made beforehand
        y, grads = run_and_grads("dual", case, True, backend, dy=dy)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, y_eager)
    for k in g_eager:
        torch.testing.assert_close(grads[k], g_eager[k])


def _leaves_and_fn(kind, case, training, backend):
    """The case's grad-requiring tensors and a function of them (fresh running stats per
    call, so repeated evaluations by gradcheck see the same inputs)."""
    names = [k for k, v in case.items() if v.requires_grad]

    def f(*leaves):
        c = dict(case)
        c.update(zip(names, leaves))
        for k in case:
            if "running" in k:
                c[k] = case[k].clone()
        return call(kind, c, training, backend)

    return [case[k] for k in names], f


def test_double_backward_fp64(backend_device):
    """create_graph=True (gradient penalties): second derivatives equal the reference's
    (gradgradcheck in float64), the first-order gradients still run fused, and
    last_backend() says the second-order pass ran through the reference."""
    backend, device = backend_device
    interpreted = _interpreted(backend, device)  # slow there: one case
    for kind in ("dual",) if interpreted else KINDS:
        for training in (True,) if interpreted else (True, False):
            case = make_case(kind, (2, 3, 2, 2), torch.float64, device, "nchw")
            leaves, f = _leaves_and_fn(kind, case, training, backend)
            assert torch.autograd.gradgradcheck(f, leaves, fast_mode=True), (kind, training)
            # A gradient penalty, step by step: fused first order, reference second order.
            y = f(*leaves)
            assert FF.last_backend() == backend
            grads = torch.autograd.grad(y.pow(2).sum(), leaves, create_graph=True)
            case64 = to64(case)
            leaves64, f64 = _leaves_and_fn(kind, case64, training, "reference")
            grads64 = torch.autograd.grad(f64(*leaves64).pow(2).sum(), leaves64,
                                          create_graph=True)
            for g, g64 in zip(grads, grads64):
                torch.testing.assert_close(g, g64)
            penalty = sum(g.pow(2).sum() for g in grads)
            second = torch.autograd.grad(penalty, leaves)
            assert FF.last_backend() == "reference"
            second64 = torch.autograd.grad(sum(g.pow(2).sum() for g in grads64), leaves64)
            for g, g64 in zip(second, second64):
                torch.testing.assert_close(g, g64)


def test_backward_ops_are_differentiable():
    """The derivative registered for the backward ops themselves (the C++ pipeline's
    ``bn_act_backward`` and the Python pipeline's ``batch_norm_act_backward``), checked
    directly with gradcheck in float64: d(dx, dweight, dbias, dresidual, ...) with respect
    to (dout, x, weight, bias, x2, ...), batch statistics recomputed from x."""
    from fusedres import ops

    g = torch.Generator().manual_seed(3)
    x, x2, dout = (torch.randn(3, 2, 2, 3, generator=g, dtype=torch.float64)
                   for _ in range(3))
    w, b, w2, b2 = (torch.rand(2, generator=g, dtype=torch.float64) + 0.5 for _ in range(4))
    ops_to_check = [("batch_norm_act_backward", True)]
    if "cpu" in fusedres.available_backends():
        ops_to_check.append(("bn_act_backward", False))
    for op_name, python_pipeline in ops_to_check:
        op = getattr(torch.ops.fusedres, op_name)
        for training, dual in ((True, False), (False, False), (True, True)):
            needs = [True, True, False, dual, dual]
            extra = (False, "reference_primitives") if python_pipeline else ()
            running = [t.clone() for t in (b, w, b2, w2)]  # eval: running mean, var

            def stats(t, running_mean, running_var):
                """What the forward passes on: batch statistics of t (functions of t, as
                in the model), or the running ones."""
                if not training:
                    return running_mean, running_var
                var, mean = torch.var_mean(t.detach(), dim=(0, 2, 3), correction=0)
                return mean, var

            def f(dout_, x_, w_, b_, *second):
                x2_, w2_, b2_ = second if dual else (None, None, None)
                mean, var = stats(x_, *running[:2])
                mean2, var2 = stats(x2_, *running[2:]) if dual else (None, None)
                mask = None
                if dual:  # the forward's ReLU mask, as the fused forward saves it
                    with torch.no_grad():
                        pre = (torch.nn.functional.batch_norm(x_, mean, var, w_, b_)
                               + torch.nn.functional.batch_norm(x2_, mean2, var2, w2_, b2_))
                    mask = ref.pack_mask(ops.ncs(pre) > 0, False)
                if python_pipeline:
                    dout_, x_, x2_ = ops.ncs(dout_), ops.ncs(x_), ops.ncs(x2_)
                out = op(dout_, x_, w_, b_, mean, var, mask, x2_, w2_, b2_, mean2, var2,
                         training, 1e-5, True, False, *extra, needs)
                return tuple(t for t, keep in zip(out, (1, 1, 1, 0, dual, dual, dual)) if keep)

            inputs = [t.clone().requires_grad_() for t in (dout, x, w, b)]
            if dual:
                inputs += [t.clone().requires_grad_() for t in (x2, w2, b2)]
            assert torch.autograd.gradcheck(f, inputs, fast_mode=True), (op_name, training, dual)


def test_forward_mode_ad_matches_torch(backend_device):
    """torch.func.jvp and forward_ad dual tensors: the tangent equals torch's BN jvp in
    float64 (the call runs through the reference composite and says so); the running
    statistics update as torch's."""
    import torch.autograd.forward_ad as fwAD

    backend, device = backend_device
    for kind in ("bn", "relu", "add", "dual"):
        case = make_case(kind, (2, 3, 3, 2), torch.float64, device, "nchw")
        leaves, f = _leaves_and_fn(kind, case, True, backend)
        tangents = [torch.randn_like(t) for t in leaves]
        case64 = to64(case)
        leaves64, f64 = _leaves_and_fn(kind, case64, True, "reference")
        y, jt = torch.func.jvp(f, tuple(leaves), tuple(tangents))
        assert FF.last_backend() == "reference"
        y64, jt64 = torch.func.jvp(f64, tuple(leaves64), tuple(tangents))
        torch.testing.assert_close(y, y64)
        torch.testing.assert_close(jt, jt64)
        with fwAD.dual_level():
            duals = [fwAD.make_dual(t.detach(), d) for t, d in zip(leaves, tangents)]
            tangent = fwAD.unpack_dual(f(*duals)).tangent
        torch.testing.assert_close(tangent, jt64)
        # the running statistics of a call under jvp move as torch's do
        rm, rv = case["running_mean"], case["running_var"]
        call(kind, case, True, backend)  # no transform: fused, updates in place
        assert FF.last_backend() == backend
        want_rm, want_rv = case64["running_mean"], case64["running_var"]
        call(kind, case64, True, "reference")
        torch.testing.assert_close(rm, want_rm)
        torch.testing.assert_close(rv, want_rv)


def test_func_grad_matches_torch(backend_device):
    backend, device = backend_device
    case = make_case("add", (2, 3, 3, 2), torch.float64, device, "nchw")
    leaves, f = _leaves_and_fn("add", case, True, backend)
    leaves64, f64 = _leaves_and_fn("add", to64(case), True, "reference")
    got = torch.func.grad(lambda *t: f(*t).pow(2).sum(), argnums=(0, 1, 2))(*leaves)
    want = torch.func.grad(lambda *t: f64(*t).pow(2).sum(), argnums=(0, 1, 2))(*leaves64)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_eps_checked_as_torch(kind):
    """torch's messages: eps <= 0 in training, eps < 0 in eval raise ValueError."""
    case = make_case(kind, (2, 3, 2, 2), torch.float32, "cpu", "nchw")
    for training, eps, msg in ((True, 0.0, "must be positive during training"),
                               (True, -1e-5, "must be positive during training"),
                               (False, -1e-5, "must be non-negative")):
        with pytest.raises(ValueError, match=msg):
            torch.nn.functional.batch_norm(case["x"], case["running_mean"].clone(),
                                           case["running_var"].clone(), None, None, training,
                                           0.1, eps)
        with pytest.raises(ValueError, match=f"batch_norm eps {msg}, but got {eps}"):
            call(kind, case, training, "auto", eps=eps)
    y = call(kind, case, False, "auto", eps=0.0)  # eval with eps=0: allowed, as torch
    torch.testing.assert_close(y, call(kind, case, False, "reference", eps=0.0))


def test_dual_argument_order_and_old_order_error():
    """dual_batch_norm_add_relu takes the shortcut second, as batch_norm_add_relu takes
    its residual; a call in the old order (shortcut sixth) raises a TypeError saying so."""
    case = make_case("dual", (2, 3, 2, 2), torch.float64, "cpu", "nchw")
    c = case
    old = (c["x"], c["running_mean"], c["running_var"], c["weight"], c["bias"], c["shortcut"],
           c["shortcut_running_mean"], c["shortcut_running_var"], c["shortcut_weight"],
           c["shortcut_bias"], True)
    with pytest.raises(TypeError, match="takes the shortcut tensor second"):
        FF.dual_batch_norm_add_relu(*old)
    with pytest.raises(TypeError, match="got None as shortcut"):
        FF.dual_batch_norm_add_relu(c["x"], None, None, None, None, None, None, None, None,
                                    None, True)
    y = call("dual", case, True, "auto")
    torch.testing.assert_close(y, call("dual", to64(case), True, "reference"))
    import inspect
    names = lambda f: list(inspect.signature(f).parameters)[:2]  # noqa: E731
    assert names(FF.batch_norm_add_relu) == ["input", "residual"]
    assert names(FF.dual_batch_norm_add_relu) == ["input", "shortcut"]


def test_meta_tensors_run_like_eager():
    """Deferred initialisation / FLOP counting: meta tensors go through the reference
    composite and give eager's shapes, dtypes and layouts."""
    for kind in KINDS:
        for training in (True, False):
            case = make_case(kind, (2, 3, 4, 5), torch.float32, "cpu", "channels_last")
            meta = {k: v.detach().to("meta").requires_grad_(v.requires_grad)
                    for k, v in case.items()}
            y, grads = run_and_grads(kind, meta, training, "auto",
                                     dy=torch.empty(2, 3, 4, 5, device="meta"))
            assert FF.last_backend() == "reference"
            want = call(kind, case, training, "auto")
            assert (y.device.type, y.shape, y.dtype) == ("meta", want.shape, want.dtype)
            assert all(g.device.type == "meta" and g.shape == meta[k].shape
                       for k, g in grads.items())


def test_functional_holds_every_public_function():
    """Issue 3 / 12.4: the conv functions are in fusedres.functional too (the same ones)."""
    from fusedres import conv

    for name in ("conv2d", "conv2d_stats", "bn_relu_conv2d_stats", "conv2d_bias_add_relu",
                 "conv_path"):
        assert getattr(FF, name) is getattr(conv, name) and name in FF.__all__
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(FF.conv2d(x, w, None, 1, 1),
                               torch.nn.functional.conv2d(x, w, None, 1, 1))
    y, mean, var = FF.conv2d_stats(x, w, 1, 1)
    torch.testing.assert_close(mean, y.mean(dim=(0, 2, 3)))
    assert FF.conv_path(x, w)[0] == "reference"


def test_package_namespace_is_clean():
    public = {n for n in dir(fusedres) if not n.startswith("_")}
    assert not public & {"os", "sys", "importlib"}, public
    assert set(fusedres.__all__) <= public
    for name in FF.__all__:
        assert callable(getattr(FF, name))

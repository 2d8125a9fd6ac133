"""PyTorch's own BatchNorm2d module tests, run against the drop-in modules.

The samples are torch's: the ``nn.BatchNorm2d`` entry of
``torch.testing._internal.common_modules.module_db`` (its ``module_inputs_func`` and
``module_error_inputs_func``, as installed with torch), on CPU in float32 and float64,
training and eval. Each sample builds torch's module and ``fusedres.nn.BatchNorm2d``
(and ``BatchNormReLU2d`` against ``relu(torch's)``) from the same constructor arguments
and runs both on the same inputs; the checks are those of torch's ``test_modules.py``
that apply on one CPU: forward (outputs, running statistics, ``num_batches_tracked``,
two steps), backward (input and parameter gradients), gradcheck and gradgradcheck in
float64, non-contiguous and channels_last inputs (the output's memory format too),
repr, factory kwargs, state_dict round trips with torch's module, pickling, the meta
device context, train/eval differing, and the error samples (same type and message).

``KNOWN_DEVIATIONS`` lists, in one place, where the drop-in differs from torch's module
and why (mirrored in the docstring of ``fusedres.nn``); each entry is checked below.
"""
import copy
import io

import pytest
import torch
from torch import nn

import fusedres
import fusedres.nn as fnn

pytest.importorskip("expecttest", reason="torch's test framework (module_db) imports "
                    "expecttest: pip install expecttest")


def _torch_module_db():
    """torch's module_db, without the process-wide changes its test framework makes on
    import: it forbids setting torch.backends flags by assignment (other test files do)
    and wraps every TorchScript call."""
    backends = torch.backends.disable_global_flags.__globals__  # torch/backends/__init__.py
    saved = (backends["__allow_nonbracketed_mutation_flag"],
             torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__)
    try:
        from torch.testing._internal.common_modules import module_db
    finally:
        backends["__allow_nonbracketed_mutation_flag"] = saved[0]
        torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__ = saved[1:]
    return module_db


INFO = next(m for m in _torch_module_db() if m.module_cls is nn.BatchNorm2d)
DTYPES = (torch.float32, torch.float64)
CLASSES = (fnn.BatchNorm2d, fnn.BatchNormReLU2d)

# Where the drop-in modules differ from nn.BatchNorm2d, and why. Nothing here changes a
# result: each entry is a path that runs differently (or an error torch does not raise).
KNOWN_DEVIATIONS = {
    "torch.jit.script runs torch's BN math":
        "TorchScript cannot compile the fused custom ops' Python glue; a scripted module "
        "computes F.batch_norm (unfused, same results, saveable). Use torch.compile or "
        "torch.jit.trace for fused kernels in a compiled or exported model.",
    "double backward runs through the reference composite":
        "the fused backward kernels have no derivative of their own: with create_graph=True "
        "the first-order gradients are fused, their derivative is torch's "
        "(aten.native_batch_norm_backward's, last_backend() says 'reference'); it works "
        "under vmap (batched gradients), train and eval.",
    "third-order derivatives raise":
        "create_graph=True inside a double backward would need a derivative of that "
        "recomputation: RuntimeError naming backend='reference', which supports it.",
    "forward-mode AD and torch.func grad/jvp run the reference composite":
        "the fused ops have no forward-mode formula and their C++ autograd does not run "
        "under functorch: the call goes through F.batch_norm (same results, unfused).",
}


def _samples(dtype, training):
    return INFO.module_inputs_func(INFO, device="cpu", dtype=dtype, requires_grad=True,
                                   training=training)


def _cases():
    for dtype in DTYPES:
        for training in (True, False):
            for i, sample in enumerate(_samples(dtype, training)):
                yield pytest.param(dtype, training, i,
                                   id=f"{str(dtype)[6:]}-{'train' if training else 'eval'}-"
                                      f"{sample.desc or 'default'}")


def _build(cls, sample, dtype, training):
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    theirs = nn.BatchNorm2d(*args, **kwargs, dtype=dtype).train(training)
    ours = cls(*args, **kwargs, dtype=dtype).train(training)
    if theirs.affine:  # not the default ones/zeros: a test that can see the parameters
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(torch.rand(p.shape, generator=g, dtype=dtype) + 0.5)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _apply(cls, theirs, x):
    y = theirs(x)
    return torch.relu(y) if cls is fnn.BatchNormReLU2d else y


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def _same_state(theirs, ours, dtype):
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    assert list(sd_t) == list(sd_o)
    for k in sd_t:
        torch.testing.assert_close(sd_o[k], sd_t[k], **_tol(dtype), msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype,training,index", list(_cases()))
def test_forward_backward_buffers_like_torch(cls, dtype, training, index):
    """Two steps of forward + backward on torch's sample: outputs, input and parameter
    gradients, running statistics and num_batches_tracked as torch's module."""
    sample = _samples(dtype, training)[index]
    theirs, ours = _build(cls, sample, dtype, training)
    (x,) = sample.forward_input.args
    for step in range(2):
        xt, xo = (x.detach().clone().requires_grad_() for _ in range(2))
        want, got = _apply(cls, theirs, xt), ours(xo)
        torch.testing.assert_close(got, want, **_tol(dtype))
        assert got.dtype == want.dtype and got.shape == want.shape
        if x.numel():
            g = torch.randn_like(want)
            want.backward(g)
            got.backward(g)
            torch.testing.assert_close(xo.grad, xt.grad, **_tol(dtype))
            for (name, p), q in zip(theirs.named_parameters(), ours.parameters()):
                torch.testing.assert_close(q.grad, p.grad, **_tol(dtype), msg=name)
        _same_state(theirs, ours, dtype)
    if x.numel() and training:  # the fused kernels ran (nothing silently fell back)
        assert ours.last_backend == fusedres.resolve_backend("cpu")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck_fp64(cls, training):
    """torch's test_grad / test_gradgrad: input and parameters, float64, every sample."""
    for sample in _samples(torch.float64, training):
        (x,) = sample.forward_input.args
        if not x.numel():
            continue
        _, ours = _build(cls, sample, torch.float64, training)
        names = [n for n, _ in ours.named_parameters()]

        def f(t, *ps):  # a fresh copy per evaluation: the same running statistics each time
            return torch.func.functional_call(copy.deepcopy(ours), dict(zip(names, ps)), (t,))

        inputs = (x.detach().clone().requires_grad_(),
                  *[p.detach().clone().requires_grad_() for p in ours.parameters()])
        assert torch.autograd.gradcheck(f, inputs, fast_mode=True), sample.desc
        assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True,
                                            check_batched_grad=True), sample.desc


def _drop_in(name):
    """(module, extra inputs) of one drop-in module, float64, on a small case."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    module = {"BatchNorm2d": lambda: fnn.BatchNorm2d(3),
              "BatchNormReLU2d": lambda: fnn.BatchNormReLU2d(3),
              "BatchNormAddReLU2d": lambda: fnn.BatchNormAddReLU2d(3),
              "DualBatchNormAddReLU2d": lambda: fnn.DualBatchNormAddReLU2d(3),
              "ConvBatchNormReLU2d": lambda: fnn.ConvBatchNormReLU2d(2, 3, 3, padding=1)}[name]()
    module = module.double()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(rand(3))
                m.running_mean.copy_(rand(3) * 0.1)
                m.running_var.copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
    x = rand(2, 2 if name == "ConvBatchNormReLU2d" else 3, 3, 3)
    extra = (rand(2, 3, 3, 3),) if "Add" in name else ()
    return module, (x, *extra)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["BatchNorm2d", "BatchNormReLU2d", "BatchNormAddReLU2d",
                                  "DualBatchNormAddReLU2d", "ConvBatchNormReLU2d"])
def test_batched_gradgradcheck_every_drop_in_module(name, training):
    """Double backward under vmap (torch's test_gradgrad with check_batched_grad=True, what
    torch.func per-sample gradients and Hessian-vector products need): every drop-in
    module, its inputs and parameters, float64, train and eval."""
    module, tensors = _drop_in(name)
    module.train(training)
    names = [n for n, _ in module.named_parameters()]

    def f(*args):  # a fresh copy per evaluation: the same running statistics each time
        ps = dict(zip(names, args[len(tensors):]))
        return torch.func.functional_call(copy.deepcopy(module), ps, args[:len(tensors)])

    inputs = tuple(t.requires_grad_() for t in tensors) + tuple(
        p.detach().clone().requires_grad_() for p in module.parameters())
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True, check_batched_grad=True)
    module(*(t.detach() for t in tensors))
    assert fnn.last_backend() in (fusedres.resolve_backend("cpu"), "folded")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_non_contiguous_and_channels_last_inputs(cls):
    """torch's test_non_contiguous_tensors and test_memory_format: strided views and
    channels_last inputs give torch's values, gradients and output memory format."""
    for training in (True, False):
        for sample in _samples(torch.float32, training):
            (x,) = sample.forward_input.args
            if not x.numel():
                continue
            base = torch.randn(x.shape[0], x.shape[1], x.shape[2] * 2, x.shape[3] + 1)
            for t in (base[:, :, ::2, 1:], x.detach().to(memory_format=torch.channels_last),
                      x.detach().transpose(2, 3)):
                theirs, ours = _build(cls, sample, torch.float32, training)
                xt, xo = (t.clone().requires_grad_() for _ in range(2))
                want, got = _apply(cls, theirs, xt), ours(xo)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                for fmt in (torch.contiguous_format, torch.channels_last):
                    assert got.is_contiguous(memory_format=fmt) == \
                        want.is_contiguous(memory_format=fmt), (fmt, t.stride())
                g = torch.randn_like(want)
                want.backward(g)
                got.backward(g)
                torch.testing.assert_close(xo.grad, xt.grad, rtol=1e-5, atol=1e-5)
                _same_state(theirs, ours, torch.float32)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_repr_factory_kwargs_state_dict_pickle_meta(cls):
    """torch's test_repr, test_factory_kwargs, test_save_load, test_device_ctx_init and
    test_if_train_and_eval_modes_differ, per sample."""
    for sample in _samples(torch.float64, True):
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        theirs, ours = _build(cls, sample, torch.float64, True)
        assert ours.extra_repr() == theirs.extra_repr()
        if cls is fnn.BatchNorm2d:
            assert repr(ours) == repr(theirs)
        for t in list(ours.parameters()) + list(ours.buffers()):
            want = torch.long if t is ours.num_batches_tracked else torch.float64
            assert t.dtype == want
        # state_dict both ways, and a pickle of the module
        fresh = nn.BatchNorm2d(*args, **kwargs, dtype=torch.float64)
        fresh.load_state_dict(ours.state_dict())
        ours.load_state_dict(fresh.state_dict())
        buf = io.BytesIO()
        torch.save(ours, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert type(loaded) is cls
        _same_state(ours, loaded, torch.float64)
        # built under the meta device context, as torch's module
        with torch.device("meta"):
            meta_t = nn.BatchNorm2d(*args, **kwargs)
            meta_o = cls(*args, **kwargs)
        assert [(n, t.device.type, t.shape) for n, t in meta_o.state_dict().items()] == \
            [(n, t.device.type, t.shape) for n, t in meta_t.state_dict().items()]
        (x,) = sample.forward_input.args
        xm = x.detach().to("meta", torch.float32)  # the modules above are float32
        try:
            want = meta_t(xm).shape
        except RuntimeError as exc:  # torch's momentum=None reads the meta counter's value
            assert "meta" in str(exc) and meta_t.momentum is None
            want = x.shape
        assert meta_o(xm).shape == want
        # train and eval differ where torch's do
        if x.numel() and theirs.track_running_stats:
            xd = x.detach()
            theirs.train(), ours.train()
            ours(xd), theirs(xd)
            theirs.eval(), ours.eval()
            torch.testing.assert_close(ours(xd), _apply(cls, theirs, xd))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_error_samples_raise_as_torch(cls):
    """torch's test_errors: module_error_inputs_func's samples (eps <= 0) raise the same
    error type with a message matching torch's regex, from the same call."""
    for error in INFO.module_error_inputs_func(INFO, device="cpu", dtype=torch.float32,
                                               requires_grad=False, training=True):
        sample = error.module_error_input
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        (x,) = sample.forward_input.args
        assert error.error_on.name == "FORWARD_ERROR"
        with pytest.raises(error.error_type, match=error.error_regex):
            nn.BatchNorm2d(*args, **kwargs)(x)
        module = cls(*args, **kwargs)  # constructs, as torch's
        with pytest.raises(error.error_type, match=error.error_regex):
            module(x)


def test_known_deviations_are_what_happens():
    """Each KNOWN_DEVIATIONS entry is checked: the behaviour it describes happens (and the
    list is the one fusedres.nn's docstring points to)."""
    assert "KNOWN_DEVIATIONS" in fnn.__doc__
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    m = fnn.BatchNormReLU2d(3, dtype=torch.float64)
    # scripted: torch's math (no fusedres op in the graph)
    scripted = torch.jit.script(copy.deepcopy(m))
    graph = str(scripted.inlined_graph)
    assert "fusedres::" not in graph and "aten::batch_norm" in graph
    # double backward: fused first order, reference second order
    y = m(x)
    assert m.last_backend == fusedres.resolve_backend("cpu")
    try:
        (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), x, create_graph=True)
        assert fnn.last_backend() == "reference"
        gg.sum().backward()
    except RuntimeError as exc:
        if "third-order derivatives" not in str(exc):
            raise
    else:
        raise AssertionError("third-order derivatives did not raise")
    # forward-mode AD: the reference composite
    torch.func.jvp(lambda t: fusedres.functional.batch_norm_relu(t, None, None, training=True),
                   (x.detach(),), (torch.ones_like(x),))
    assert fusedres.functional.last_backend() == "reference"


# --------------------------------------------------------------------------------------
# test_nn's BatchNorm tests (PyTorch's test/test_nn.py is not installed with torch: its
# BatchNorm cases that apply on one CPU are restated here, on the drop-in modules and on
# fusedres.functional, with torch's own as the reference)
# --------------------------------------------------------------------------------------


def _arange_case(dims):
    """test_batchnorm_grad's tensors: arange input (large, unnormalised values), weight
    1..C, bias 0..C-1, running_mean 1-c, running_var 2c, float64."""
    bs, n_feat, size = 4, 5, 6
    shape = (bs, n_feat, size) if dims == 3 else (bs, n_feat, 2, size // 2)
    x = torch.arange(bs * n_feat * size, dtype=torch.float64).view(shape).requires_grad_()
    w = torch.arange(1, n_feat + 1, dtype=torch.float64).requires_grad_()
    b = torch.arange(n_feat, dtype=torch.float64).requires_grad_()
    rm = 1 - torch.arange(n_feat, dtype=torch.float64)
    rv = 2 * torch.arange(n_feat, dtype=torch.float64)
    return x, w, b, rm, rv


@pytest.mark.parametrize("dims", [3, 4])
def test_nn_batchnorm_grad(dims):
    """test_nn's test_batchnorm_grad: gradcheck and gradgradcheck with batched gradients
    (as torch's test helper runs them) of F.batch_norm's signature, eval then training, eps
    1e-4, on fusedres.functional.batch_norm (3-D and 4-D inputs) -- eval reads the running
    statistics (running_var 0 in channel 0, so eps matters). (Not with a ReLU: these
    integer inputs put pre-activations exactly on its kink.)"""
    x, w, b, rm, rv = _arange_case(dims)
    fn = fusedres.functional.batch_norm
    for training in (False, True):
        def f(t, weight, bias):  # fresh running statistics each call
            return fn(t, rm.clone(), rv.clone(), weight, bias, training, 0.1, 1e-4)

        assert torch.autograd.gradcheck(f, (x, w, b), check_batched_grad=True)
        assert torch.autograd.gradgradcheck(f, (x, w, b), check_batched_grad=True)
        f(x, w, b)  # the fused kernels ran (gradgradcheck's last pass: the reference)
        assert fusedres.functional.last_backend() == fusedres.resolve_backend("cpu")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_nn_batchnorm_simple_average_and_update_stats(cls):
    """test_nn's test_batchnorm_simple_average (momentum=None: the running statistics are
    the plain average over the batches seen, reset_running_stats starts again) and
    test_batchnorm_update_stats (num_batches_tracked counts training calls only;
    track_running_stats=False updates nothing), against torch's module."""
    torch.manual_seed(0)
    xs = [torch.rand(4, 3, 5, 5) for _ in range(2)]
    for kwargs in (dict(momentum=None), dict(momentum=0.3), dict(track_running_stats=False)):
        theirs, ours = nn.BatchNorm2d(3, **kwargs), cls(3, **kwargs)
        for reset in (False, True):
            for x in xs:
                torch.testing.assert_close(ours(x), _apply(cls, theirs, x))
            _same_state(theirs, ours, torch.float32)
            if ours.track_running_stats:
                assert int(ours.num_batches_tracked) == 2
                if kwargs.get("momentum", 0.1) is None:  # the plain average of the batches
                    want = torch.stack([x.var((0, 2, 3)) for x in xs]).mean(0)
                    torch.testing.assert_close(ours.running_var, want)
                ours.eval(), theirs.eval()
                torch.testing.assert_close(ours(xs[0]), _apply(cls, theirs, xs[0]))
                assert int(ours.num_batches_tracked) == 2  # eval calls are not counted
                ours.train(), theirs.train()
            else:
                assert ours.running_mean is None and ours.num_batches_tracked is None
            if reset:
                continue
            ours.reset_running_stats(), theirs.reset_running_stats()


def test_deviations_are_listed_in_the_docs():
    """docs/deviations.md is the one list: every KNOWN_DEVIATIONS entry (drop-in modules)
    and every DEVIATIONS entry of test_model_suites (converted models) is in it."""
    import pathlib

    from test_model_suites import DEVIATIONS

    text = (pathlib.Path(__file__).parent.parent / "docs" / "deviations.md").read_text()
    missing = [k for k in (*KNOWN_DEVIATIONS, *DEVIATIONS) if f"`{k}`" not in text]
    assert not missing, f"not in docs/deviations.md: {missing}"

"""fusedres.nn: drop-in fused BN modules against nn.BatchNorm2d."""
import copy
import io
import itertools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import fusedres
import fusedres.nn as fnn
from _cases import device_backends, ids

CASES = device_backends()
FUSED = device_backends(include_reference=False)


def _close(a, b, msg=""):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{msg}: {m}")


def _bn_pair(cls, device, backend, **kw):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(6, device=device, **kw)
    if ref.weight is not None:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            if ref.bias is not None:
                ref.bias.uniform_(-0.5, 0.5)
    fused = cls.from_bn(copy.deepcopy(ref), backend=backend)
    return ref, fused


def _compare_state(ref, fused):
    sd_r = ref.state_dict()
    sd_f = {k: v for k, v in fused.state_dict().items() if not k.startswith("shortcut_bn.")}
    assert list(sd_r) == list(sd_f)
    for k in sd_r:
        _close(sd_f[k], sd_r[k], k)


OPTIONS = [dict(momentum=0.1), dict(momentum=None), dict(affine=False),
           dict(track_running_stats=False), dict(momentum=None, affine=False, eps=1e-3)]


@pytest.mark.parametrize("device,backend", CASES, ids=ids(CASES))
@pytest.mark.parametrize("kw", OPTIONS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("cls", [fnn.BatchNorm2d, fnn.BatchNormReLU2d, fnn.BatchNormAddReLU2d])
def test_matches_torch(cls, kw, device, backend):
    ref, fused = _bn_pair(cls, device, backend, **kw)
    relu = cls is not fnn.BatchNorm2d
    for step, training in itertools.product(range(3), (True, True, False)):
        ref.train(training)
        fused.train(training)
        x = torch.randn(3, 6, 5, 4, device=device) * 2 + 1
        r = torch.randn_like(x)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        rr, rf = r.clone().requires_grad_(), r.clone().requires_grad_()
        want = ref(xr)
        if cls is fnn.BatchNormAddReLU2d:
            want = want + rr
            got = fused(xf, rf)
        else:
            got = fused(xf)
        if relu:
            want = torch.relu(want)
        _close(got, want, "output")
        g = torch.randn_like(want)
        want.backward(g)
        got.backward(g)
        _close(xf.grad, xr.grad, "dx")
        if cls is fnn.BatchNormAddReLU2d:
            _close(rf.grad, rr.grad, "dresidual")
        for (n, p), q in zip(ref.named_parameters(), fused.parameters()):
            _close(q.grad, p.grad, f"d{n}")
        _compare_state(ref, fused)
        assert fused.last_backend == backend


@pytest.mark.parametrize("device,backend", CASES, ids=ids(CASES))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_dual_matches_torch(device, backend, momentum):
    torch.manual_seed(0)
    bn, bn_d = (nn.BatchNorm2d(6, momentum=momentum, device=device) for _ in range(2))
    with torch.no_grad():
        for m in (bn, bn_d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    fused = fnn.DualBatchNormAddReLU2d.from_modules(copy.deepcopy(bn), copy.deepcopy(bn_d),
                                                    backend=backend)
    for training in (True, True, False):
        for m in (bn, bn_d, fused):
            m.train(training)
        x, s = (torch.randn(4, 6, 3, 3, device=device).requires_grad_() for _ in range(2))
        want = torch.relu(bn(x) + bn_d(s))
        got = fused(x, s)
        _close(got, want, "output")
        gx, gs = torch.autograd.grad(want.sum(), (x, s))
        fx, fs = torch.autograd.grad(got.sum(), (x, s))
        _close(fx, gx, "dx")
        _close(fs, gs, "dshortcut")
        _compare_state(bn, fused)
        _compare_state(bn_d, fused.shortcut_bn)
    assert fused.last_backend == backend


def test_constructor_state_dict_repr_like_torch():
    for kw in ({}, dict(eps=1e-3, momentum=None), dict(affine=False),
               dict(track_running_stats=False)):
        ref = nn.BatchNorm2d(5, **kw)
        for cls in (fnn.BatchNorm2d, fnn.BatchNormReLU2d, fnn.BatchNormAddReLU2d):
            m = cls(5, **kw)
            assert isinstance(m, nn.BatchNorm2d)
            assert list(m.state_dict()) == list(ref.state_dict())
            assert m.extra_repr() == ref.extra_repr()
            m.load_state_dict(ref.state_dict())
            ref.load_state_dict(m.state_dict())
    m = fnn.BatchNorm2d(4, 1e-3, 0.2, True, True, None, torch.float64, backend="reference")
    assert m.weight.dtype == torch.float64 and m.running_mean.dtype == torch.float64
    assert m.eps == 1e-3 and m.momentum == 0.2
    assert m.extra_repr().endswith("backend='reference'")
    with torch.no_grad():
        m.weight.fill_(3)
        m.running_var.fill_(7)
    m.num_batches_tracked.fill_(4)
    m.reset_parameters()
    assert (m.weight == 1).all() and (m.running_var == 1).all() and m.num_batches_tracked == 0
    dual = fnn.DualBatchNormAddReLU2d(4)
    assert "shortcut_bn.weight" in dual.state_dict()


def test_from_bn_shares_tensors():
    bn = nn.BatchNorm2d(4, momentum=None)
    f = fnn.BatchNormReLU2d.from_modules(bn, nn.ReLU(inplace=True), backend="reference")
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(f, name) is getattr(bn, name)
    assert f.momentum is None and f.backend == "reference"
    f(torch.randn(2, 4, 3, 3))
    assert bn.num_batches_tracked.item() == 1 and f.num_batches_tracked.item() == 1
    with pytest.raises(TypeError):
        fnn.BatchNormReLU2d.from_modules(bn, nn.GELU())


def test_unsupported_dtype_falls_back_to_torch():
    bn = nn.BatchNorm2d(4).double()
    f = fnn.BatchNormReLU2d.from_bn(copy.deepcopy(bn), backend="reference_primitives")
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError):  # torch itself refuses fp32 input with fp64 params
        bn(x)
    x = x.double()
    _close(f(x), torch.relu(bn(x)))
    assert f.last_backend == "reference_primitives"
    # a residual of another dtype: torch's promotion, through torch
    a = fnn.BatchNormAddReLU2d.from_bn(copy.deepcopy(bn), backend="reference_primitives")
    r = torch.randn(2, 4, 3, 3)
    _close(a(x, r), torch.relu(bn(x) + r))
    assert a.last_backend == "torch"


def test_input_dim_checked():
    with pytest.raises(ValueError):
        fnn.BatchNormReLU2d(4)(torch.randn(2, 4))


def test_conv_bn_relu_module():
    torch.manual_seed(0)
    m = fnn.ConvBatchNormReLU2d(3, 8, 3, padding=1, backend="reference_primitives")
    conv, bn = copy.deepcopy(m.conv), copy.deepcopy(m.bn)
    x = torch.randn(2, 3, 6, 6)
    _close(m(x), torch.relu(bn(conv(x))))
    assert list(m.state_dict()) == ["conv.weight"] + [f"bn.{k}" for k in bn.state_dict()]
    w = fnn.ConvBatchNormReLU2d.from_modules(conv, bn, relu=False)
    assert w.conv is conv and w.bn is bn and not w.relu
    _close(w(x), bn(conv(x)))


def test_pickle_and_deepcopy():
    m = fnn.DualBatchNormAddReLU2d(4, backend="reference")
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)
    x, s = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    _close(m2(x, s), copy.deepcopy(m)(x, s))
    assert m2.backend == "reference"


# --------------------------------------------------------------------------------------
# What torch's BN can do beyond forward/backward (issue 14 points 1-6)
# --------------------------------------------------------------------------------------


def _net(backend, relu_cls=fnn.BatchNormReLU2d):
    """A small model with every drop-in module."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = fnn.ConvBatchNormReLU2d(3, 4, 3, padding=1, backend=backend)
            self.bn = relu_cls(4, backend=backend)
            self.plain = fnn.BatchNorm2d(4, momentum=None, backend=backend)
            self.add = fnn.BatchNormAddReLU2d(4, backend=backend)
            self.dual = fnn.DualBatchNormAddReLU2d(4, backend=backend)

        def forward(self, x):
            y = self.bn(self.stem(x))
            y = self.add(self.plain(y), y)
            return self.dual(y, x[:, :1].expand_as(y).contiguous())

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net


def _unfused(net):
    """The same model with torch's own modules (the reference of every check below)."""
    ref = copy.deepcopy(net)

    class Tail(nn.Module):  # relu(bn(x) [+ r | + bn2(s)])
        def __init__(self, bn, shortcut_bn=None):
            super().__init__()
            self.bn, self.shortcut_bn = bn, shortcut_bn

        def forward(self, x, r):
            s = self.shortcut_bn(r) if self.shortcut_bn is not None else r
            return torch.relu(self.bn(x) + s)

    def plain(m):
        bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                            device=m.running_mean.device, dtype=m.running_mean.dtype)
        bn.load_state_dict({k: v for k, v in m.state_dict().items()
                            if not k.startswith("shortcut_bn.")})
        return bn

    ref.stem = nn.Sequential(net.stem.conv, net.stem.bn, nn.ReLU())
    ref.stem = copy.deepcopy(ref.stem)
    ref.bn = nn.Sequential(plain(net.bn), nn.ReLU())
    ref.plain = plain(net.plain)
    ref.add = Tail(plain(net.add))
    ref.dual = Tail(plain(net.dual), copy.deepcopy(net.dual.shortcut_bn))
    return ref


@pytest.mark.parametrize("device,backend", FUSED, ids=ids(FUSED))
def test_fx_symbolic_trace_modules_are_leaves(device, backend):
    """torch.fx.symbolic_trace records each drop-in module as one call_module node (as
    torch's own BN), tracing touches no buffer, and the traced graph runs fused, in the
    mode the modules are in when it runs."""
    net = _net(backend).to(device)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    gm = torch.fx.symbolic_trace(net)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by tracing"
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["stem", "bn", "plain", "add", "dual"], calls
    ref = _unfused(net)
    x = torch.randn(2, 3, 5, 5, device=device)
    for training in (True, False):
        net.train(training)
        ref.train(training)
        _close(gm(x), ref(x), f"traced, training={training}")
        assert net.bn.last_backend == backend and net.dual.last_backend == backend
    _close(net.plain.running_var, ref.plain.running_var, "running_var")


def test_torch_jit_script_runs_torch_math_and_saves():
    """torch.jit.script compiles the drop-in modules to torch's own BN math (no fused
    kernels in TorchScript): same outputs and buffer updates as the unfused model, and
    the scripted module saves and loads."""
    net = _net("auto")
    ref = _unfused(net)
    scripted = torch.jit.script(copy.deepcopy(net))
    x = torch.randn(2, 3, 5, 5)
    for training in (True, False):
        scripted.train(training)
        ref.train(training)
        _close(scripted(x), ref(x), f"scripted, training={training}")
    _close(scripted.plain.running_mean, ref.plain.running_mean, "running_mean")
    assert int(scripted.plain.num_batches_tracked) == int(ref.plain.num_batches_tracked) == 1
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    _close(loaded(x), scripted(x), "saved and loaded")
    # the eager model is still fused after scripting a copy of it
    net(x)
    assert net.bn.last_backend == fnn.last_backend() != "torch"


def test_conv_bn_relu_from_modules_defaults_like_constructor():
    """from_modules(conv, bn) applies the ReLU, as the constructor's default does."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
    x = torch.randn(2, 3, 5, 5)
    assert fnn.ConvBatchNormReLU2d(3, 4, 3).relu is True
    m = fnn.ConvBatchNormReLU2d.from_modules(conv, bn, backend="reference_primitives")
    assert m.relu is True
    _close(m(x), torch.relu(bn(conv(x))))
    assert (m(x) >= 0).all()
    assert fnn.ConvBatchNormReLU2d.from_modules(conv, bn, nn.ReLU()).relu is True
    assert fnn.ConvBatchNormReLU2d.from_modules(conv, bn, False).relu is False
    assert fnn.ConvBatchNormReLU2d.from_modules(conv, bn, None).relu is False


@pytest.mark.parametrize("cls", [fnn.BatchNorm2d, fnn.BatchNormReLU2d, fnn.BatchNormAddReLU2d,
                                 fnn.DualBatchNormAddReLU2d])
def test_eps_not_positive_raises_as_torch(cls):
    x = torch.randn(2, 3, 4, 4)
    args = (x,) if cls in (fnn.BatchNorm2d, fnn.BatchNormReLU2d) else (x, x.clone())
    for eps, msg in ((0.0, "must be positive during training"), (-1e-5, "must be positive")):
        with pytest.raises(ValueError, match=msg):
            nn.BatchNorm2d(3, eps=eps)(x)
        with pytest.raises(ValueError, match=f"batch_norm eps {msg}"):
            cls(3, eps=eps)(*args)
    with pytest.raises(ValueError, match="must be non-negative"):
        cls(3, eps=-1e-5).eval()(*args)
    assert torch.isfinite(cls(3, eps=0.0).eval()(*args)).all()  # eval, eps=0: as torch


def test_modules_on_meta_device_like_eager():
    """Deferred initialisation and FLOP counting: a model of drop-in modules built and run
    on the meta device (training and eval, backward included) gives eager's shapes, then
    materialises with to_empty + reset_parameters and runs fused."""
    from torch.utils.flop_counter import FlopCounterMode

    eager = _net("auto")
    with torch.device("meta"):
        net = _net("auto")
    x = torch.randn(2, 3, 5, 5)
    want = eager(x)
    xm = x.to("meta").requires_grad_()
    with FlopCounterMode(display=False) as counter:
        y = net(xm)
        y.sum().backward()
    assert y.device.type == "meta" and y.shape == want.shape and y.dtype == want.dtype
    assert counter.get_total_flops() > 0 and xm.grad.shape == x.shape
    assert fnn.last_backend() == "reference"
    net.eval()
    assert net(xm).shape == want.shape
    net.to_empty(device="cpu")
    for m in net.modules():
        if hasattr(m, "reset_parameters") and m is not net:
            m.reset_parameters()
    net.train()
    assert net(x).shape == want.shape
    assert net.bn.last_backend == fusedres.resolve_backend("cpu")


@pytest.mark.parametrize("device,backend", FUSED, ids=ids(FUSED))
def test_modules_double_backward_and_jvp(device, backend):
    """gradgradcheck (float64) through every drop-in module against the same functions of
    torch's modules; forward-mode AD equals torch's BN jvp."""
    if backend == "triton":
        pytest.skip("interpreted Triton: covered by test_functional's double backward")
    net = _net(backend).to(device).double()
    ref = _unfused(net)
    x = torch.randn(2, 3, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    for training in (True, False):
        for m in (net, ref):
            m.train(training)
        state = copy.deepcopy(net.state_dict())

        def fused(t):  # a fresh copy per evaluation: the same running statistics each time
            return copy.deepcopy(net)(t)

        assert torch.autograd.gradgradcheck(fused, (x,), fast_mode=True)
        net.load_state_dict(state)
        ref.load_state_dict(_unfused(net).state_dict())
        (g,) = torch.autograd.grad(fused(x).pow(2).sum(), x, create_graph=True)
        (g_ref,) = torch.autograd.grad(ref(x).pow(2).sum(), x, create_graph=True)
        _close(g, g_ref, "first order")
        (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
        (gg_ref,) = torch.autograd.grad(g_ref.pow(2).sum(), x)
        _close(gg, gg_ref, "second order")
        assert fnn.last_backend() == "reference"
        # forward-mode AD (torch.func.jvp of a training BN fails in torch too: its
        # num_batches_tracked.add_ mutates a captured tensor; forward_ad does not mind)
        t = torch.randn_like(x)
        net.load_state_dict(state)
        ref.load_state_dict(_unfused(net).state_dict())
        tangents = []
        for m in (net, ref):
            with fwAD.dual_level():
                tangents.append(fwAD.unpack_dual(m(fwAD.make_dual(x.detach(), t))).tangent)
        _close(tangents[0], tangents[1], "jvp")
        _close(net.plain.running_var, ref.plain.running_var, "running_var under forward AD")
        if not training:
            _, jt = torch.func.jvp(net, (x.detach(),), (t,))
            _close(jt, tangents[1], "torch.func.jvp")


def test_fx_feature_extractor_and_custom_tracers():
    """torchvision's create_feature_extractor (its own fx tracer) sees each drop-in module
    as one node and returns torch's values; the extracted graph runs fused."""
    from torchvision.models.feature_extraction import create_feature_extractor

    net = _net("auto").eval()
    ref = _unfused(net).eval()
    x = torch.randn(2, 3, 5, 5)
    got = create_feature_extractor(net, {"bn": "bn", "add": "add", "dual": "out"})(x)
    want = {"bn": ref.bn(ref.stem(x))}
    want["add"] = ref.add(ref.plain(want["bn"]), want["bn"])
    want["out"] = ref(x)
    for k in want:
        _close(got[k], want[k], k)
    assert net.dual.last_backend == fusedres.resolve_backend("cpu")


def test_converted_model_on_meta_device_like_eager():
    """Issue 14 point 1: a converted torchvision ResNet runs on the meta device (deferred
    initialisation, FLOP counting) in training and eval, with eager's output shape, and
    counts the same convolution FLOPs as the unconverted model."""
    torchvision = pytest.importorskip("torchvision")
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = torchvision.models.resnet18(num_classes=10)
    fused = fusedres.convert(copy.deepcopy(model))
    x = torch.empty(2, 3, 64, 64, device="meta")
    flops = []
    for m in (model, fused):
        for training in (True, False):
            m.train(training)
            with FlopCounterMode(display=False) as counter:
                y = m(x)
            assert y.device.type == "meta" and y.shape == (2, 10)
            flops.append(counter.get_total_flops())
    assert flops[:2] == flops[2:] and flops[0] > 0


@pytest.mark.parametrize("training,grad", [(True, True), (False, True), (False, False)],
                         ids=["train", "eval", "eval-no_grad"])
def test_torch_jit_trace_with_its_check(training, grad):
    """torch.jit.trace (with its default check that a second trace gives the same graph)
    records the fused ops and reproduces the model. It failed the check before: each
    module's last_backend attribute went from None to a string, a new TorchScript type;
    and in eval under no_grad the folded conv weights were a cached constant on the check
    run but computed on the first (now the fold is recorded on both, from the
    parameters, so a traced model follows later weight changes)."""
    net = _net("auto").train(training)
    x = torch.randn(2, 3, 5, 5)
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(copy.deepcopy(net), x)
        assert "fusedres::" in str(traced.inlined_graph)
        _close(traced(x), net(x), "traced")
        if grad:  # eval folds while tracing, differentiably: the same gradients
            leaves = [p for p in net.parameters()]
            want = torch.autograd.grad(net(x).square().sum(), leaves)
            got = torch.autograd.grad(traced(x).square().sum(), list(traced.parameters()))
            for g, w in zip(got, want):
                _close(g, w, "traced gradient")
        if not training:  # the fold reads the parameters: a BN change reaches the trace
            for m in (traced, net):
                m.stem.bn.running_var.mul_(4.0)
            _close(traced(x), net(x), "traced, after a running_var change")


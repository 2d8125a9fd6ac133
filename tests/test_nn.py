"""fusedres.nn: drop-in fused BN modules against nn.BatchNorm2d."""
import copy
import io
import itertools

import pytest
import torch
from torch import nn

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

"""Plain conv -> BN (-> add) (-> ReLU) sites on the cudnn-graph path (CPU, the reference
graphs standing in for cuDNN): in training the site's conv runs as F0 (conv + genstats)
and its BN normalises with F0's statistics -- torchvision's stem (padded 3 -> 8), a
downsample's projection shortcut, a block tail -- and a torchvision ResNet's training step
equals the unconverted model's in float64 (output, every gradient, running statistics).
A refused F0 falls back to F.conv2d and the BN's own statistics pass; tune tries the
candidate at such sites. Whether cuDNN accepts these graphs is a GPU question."""
import contextlib
import importlib

import pytest
import torch
import torchvision
from torch import nn

import fusedres
from fusedres import cudnn_graph
from test_cudnn_graph import (  # cuDNN faked by the reference graphs
    _ReferenceGraph, _close, _fake_cudnn, _set_graph_plans, _train_steps)

T = importlib.import_module("fusedres.tune")


def _record_graphs(monkeypatch, refuse=()):
    """cuDNN faked (``refuse``: kinds refused); returns the forward graphs run as
    ``(kind, input channels, weight shape)``."""
    _fake_cudnn(monkeypatch, refuse)
    seen = []

    def run(x, w, scale, shift, stride, padding):
        seen.append(("F1" if scale is not None else "F0", x.shape[1], tuple(w.shape)))
        return _ReferenceGraph.apply(x, w, scale, shift, stride, padding)

    monkeypatch.setattr(cudnn_graph, "_run_graph", run)
    return seen


def _resnet(name):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)(num_classes=10).double()
    for m in ref.modules():  # non-trivial BN parameters and running statistics
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
            m.running_mean.uniform_(-0.1, 0.1)
    fused = fusedres.convert(ref, backend="reference")
    _set_graph_plans(fused)
    return ref, fused


def _train_step(ref, fused):  # (at 32x32 the layer4 BNs see 2 values: ill-conditioned)
    _train_steps(ref, fused, steps=1, shape=(2, 3, 64, 64))


def _downsample_shapes(model):
    return [tuple(m.downsample[0].weight.shape) for m in model.modules()
            if getattr(m, "downsample", None) is not None]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])  # (under 1 s each here)
def test_resnet_training_step_on_the_graph_path(monkeypatch, name):
    seen = _record_graphs(monkeypatch)
    ref, fused = _resnet(name)
    used = []
    run = cudnn_graph.bn_act_with_stats
    monkeypatch.setattr(cudnn_graph, "bn_act_with_stats",
                        lambda y, *a, **k: used.append((a[2] is not None, k["shortcut_stats"]
                                                        is not None)) or run(y, *a, **k))
    _train_step(ref, fused)
    f0 = [(cin, w) for kind, cin, w in seen if kind == "F0"]
    assert f0[0] == (8, (64, 8, 7, 7)), seen  # the stem: F0 with its input padded 3 -> 8
    for shape in _downsample_shapes(ref):  # every projection shortcut: F0
        assert (shape[1], shape) in f0, (shape, seen)
    # plain sites normalised with given statistics: the stem (F0), every block tail (its
    # input carried from the F1 of the conv before it) and every dual tail's shortcut (F0)
    tails = sum(1 for m in ref.modules() if isinstance(m, (torchvision.models.resnet.BasicBlock,
                                                           torchvision.models.resnet.Bottleneck)))
    assert used[0] == (True, False)
    assert len(used) == 1 + tails and all(main for main, _ in used), used
    assert sum(short for _, short in used) == len(_downsample_shapes(ref))
    rows = {r["site"]: r for r in fusedres.explain(fused)}
    assert rows["bn1"]["conv"] == "cudnn-graph stats", rows["bn1"]
    assert "F0 (conv + statistics) at conv1 (input channels padded 3->8)" in rows["bn1"]["reason"]
    down = rows["layer2.0.downsample.1"]
    assert down["conv"] == "cudnn-graph stats" and "F0" in down["reason"], down


def test_refused_f0_falls_back(monkeypatch):
    """F0 refused (faked check_support): plain sites run F.conv2d and the BN's own
    statistics pass, the BN-ReLU -> conv sites still run F1; the same answers, explain
    names the refusal, no exception."""
    seen = _record_graphs(monkeypatch, refuse=("F0",))
    ref, fused = _resnet("resnet18")
    _train_step(ref, fused)
    assert seen and {kind for kind, _, _ in seen} == {"F1"}
    rows = {r["site"]: r for r in fusedres.explain(fused)}
    assert rows["bn1"]["conv"] == "conv2d", rows["bn1"]
    assert "cuDNN refused the F0 graph" in rows["bn1"]["reason"], rows["bn1"]
    assert "check_support: faked" in rows["layer2.0.downsample.1"]["reason"]


def test_eval_keeps_todays_path(monkeypatch):
    """Eval (running statistics): no graph runs at a plain site."""
    seen = _record_graphs(monkeypatch)
    ref, fused = _resnet("resnet18")
    ref.eval(), fused.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _close(fused(x), ref(x), "eval output")
    assert not [s for s in seen if s[0] == "F0"], seen


def test_tune_tries_the_graph_at_plain_sites():
    """tune's cudnn-graph candidate is tried at a plain conv site in training (the
    correctness gate then decides), never in eval or where the site has no conv; the
    Triton conv path still only at BN-ReLU -> conv sites."""
    conv, bn = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)

    def site(**kwargs):
        return T._Site("bn", conv if kwargs.pop("conv", True) else None, bn, kwargs, {}, None)

    assert T._changes_site("cudnn-graph", site(relu=True), train=True)
    assert T._changes_site("cudnn-graph", site(conv=False, shortcut_conv=conv), train=True)
    assert not T._changes_site("cudnn-graph", site(relu=True), train=False)
    assert not T._changes_site("cudnn-graph", site(conv=False), train=True)
    assert not T._changes_site("triton-conv", site(relu=True), train=True)
    assert T._changes_site("triton-conv", site(relu=True, next_conv=conv), train=True)


class _StemOnly(nn.Module):
    """torchvision's stem: conv 7x7/2 (3 -> 8) - BN - ReLU - max-pool (a plain site)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        return self.pool(torch.relu(self.bn1(self.conv1(x))))


@pytest.mark.parametrize("wrong", [False, True])
def test_tune_gate_at_the_stem(monkeypatch, wrong):
    """tune (cuDNN faked, candidates as on a GPU with the path) times cudnn-graph at the
    stem and picks it when fastest; an F0 whose statistics are off by 1% fails the
    correctness gate and is never chosen."""
    from test_tune import fake_timer

    seen = _record_graphs(monkeypatch)
    if wrong:
        def off(x, w, scale, shift, stride, padding):
            y, s1, s2 = _ReferenceGraph.apply(x, w, scale, shift, stride, padding)
            return y, s1 * 1.01, s2
        monkeypatch.setattr(cudnn_graph, "_run_graph", off)
    real = T._candidates
    monkeypatch.setattr(T, "_candidates", lambda device, only: real(device, only) + ["cudnn-graph"])
    torch.manual_seed(0)
    model = fusedres.convert(_StemOnly().double(), backend="reference")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    timer = fake_timer({"torch": 3.0, "reference": 2.0, "cpu": 2.0, "cudnn-graph": 1.0})
    with pytest.warns(RuntimeWarning) if wrong else contextlib.nullcontext():
        T.tune(model, x, cache=False, verbose=False, timer=timer)
    tuning = model.bn1.fusedres_tuning
    if wrong:
        assert tuning["choice"] != "cudnn-graph"
        assert "cudnn-graph" in tuning["failed"], tuning
    else:
        assert tuning["choice"] == "cudnn-graph", tuning
        assert seen and seen[0][:2] == ("F0", 8)


def _kernel_backends_here():
    from conftest import kernel_backends
    return [b for b, device in kernel_backends() if device == "cpu"]


@pytest.mark.parametrize("backend", _kernel_backends_here())
@pytest.mark.parametrize("form", ["bn", "bn-relu", "add-relu", "dual"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_bn_act_with_stats_against_torch(backend, form, layout):
    """The BN of a plain site given its batch statistics (as F0 computes them): output
    and every gradient equal torch's training-mode BN, whose statistics are functions of
    its input, on each backend's primitives (the backward includes their gradient)."""
    dtype = torch.float64 if backend == "reference_primitives" else torch.float32
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    g = torch.Generator().manual_seed(3)

    def t(*shape, grad=True, lo=-1.0, hi=1.0):
        v = (torch.rand(shape, generator=g, dtype=dtype) * (hi - lo) + lo)
        v = v.contiguous(memory_format=layout) if len(shape) == 4 else v
        return v.requires_grad_(grad)

    y, s, res = t(2, 8, 5, 5, lo=2.0, hi=4.0), t(2, 8, 5, 5), t(2, 8, 5, 5)
    w, b, w2, b2 = t(8, lo=0.5, hi=1.5), t(8), t(8, lo=0.5, hi=1.5), t(8)

    def stats(v):
        var, mean = torch.var_mean(v.detach(), dim=(0, 2, 3), correction=0)
        return mean, var

    relu = form != "bn"
    kw = dict(residual=res if form == "add-relu" else None)
    if form == "dual":
        kw.update(shortcut=s, shortcut_weight=w2, shortcut_bias=b2, shortcut_stats=stats(s))
    out, _, _ = cudnn_graph.bn_act_with_stats(y, w, b, stats(y), relu=relu, eps=1e-5,
                                              backend=backend, **kw)
    want = torch.nn.functional.batch_norm(y, None, None, w, b, True, 0.1, 1e-5)
    if form == "add-relu":
        want = want + res
    if form == "dual":
        want = want + torch.nn.functional.batch_norm(s, None, None, w2, b2, True, 0.1, 1e-5)
    want = torch.relu(want) if relu else want
    torch.testing.assert_close(out, want, **tol)
    inputs = [y, w, b] + ([res] if form == "add-relu" else []) + (
        [s, w2, b2] if form == "dual" else [])
    dout = torch.randn(out.shape, generator=g, dtype=dtype)
    got = torch.autograd.grad(out, inputs, dout)
    for i, (a, e) in enumerate(zip(got, torch.autograd.grad(want, inputs, dout))):
        torch.testing.assert_close(a, e, **tol, msg=lambda m: f"gradient {i}: {m}")


@pytest.mark.parametrize("failing", ["F0", "F1"])
def test_forward_graph_that_fails_to_execute_falls_back(monkeypatch, failing):
    """A planned forward graph whose execution raises (faked, every call of that kind):
    the training step gives torch's results all the same -- no exception --, the kind is
    remembered as failed (tried once per conv signature, then refused) and named."""
    seen = _record_graphs(monkeypatch)
    tried = []

    def run(x, w, scale, shift, stride, padding):
        kind = "F1" if scale is not None else "F0"
        if kind == failing:
            tried.append((kind, tuple(w.shape), tuple(x.shape)))
            raise RuntimeError(f"cudnn_graph_conv_stats: execute failed: faked {kind}")
        seen.append((kind, x.shape[1], tuple(w.shape)))
        return _ReferenceGraph.apply(x, w, scale, shift, stride, padding)

    monkeypatch.setattr(cudnn_graph, "_run_graph", run)
    ref, fused = _resnet("resnet18")
    _train_step(ref, fused)
    assert tried and len(tried) == len(set(tried))  # once per signature, then refused
    assert all(kind != failing for kind, _, _ in seen)
    failed = [s for s in cudnn_graph.statuses() if s["kind"] == failing]
    assert failed and all(s["status"].startswith("execute failed: cudnn_graph_conv_stats")
                          for s in failed), failed

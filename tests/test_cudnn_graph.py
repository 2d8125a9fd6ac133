"""The cudnn-graph conv path on CPU: the planner's rules with faked capabilities, the
fallback when a graph is refused (faked), the site wiring and autograd with the reference
graphs standing in for cuDNN (float64: outputs, every gradient, running statistics), the
fake kernel, and what tune/doctor offer on CPU. The graphs themselves run only on a GPU
(fusedres-bench doctor, scripts/gpu_cudnn_sites.py)."""
import importlib
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedres
from fusedres import conv_paths, cudnn_graph
from fusedres import nn as fnn
from fusedres import reference as R

T = importlib.import_module("fusedres.tune")
H100 = cudnn_graph.Capabilities(True, 92400, (9, 0))


# --------------------------------------------------------------------------------------
# Planner
# --------------------------------------------------------------------------------------


def _plan(caps=H100, dtype=torch.bfloat16, cin=64, cout=256, **kw):
    args = dict(weight_dtype=dtype, has_bias=False, input_shape=(32, cin, 56, 56),
                weight_shape=(cout, cin, 1, 1))
    args.update(kw)
    return cudnn_graph.plan(caps, dtype, **args)


def test_planner_rules():
    assert _plan() is None  # ResNet-50 conv1 of stage 1, bf16, sm_90
    assert _plan(dtype=torch.float16) is None
    assert _plan(weight_shape=(128, 64, 3, 3)) is None  # kernel size: cuDNN decides
    assert "built without" in _plan(caps=H100._replace(built=False))
    assert "8.0" in _plan(caps=H100._replace(arch=(7, 5)))
    assert _plan(caps=H100._replace(arch=(8, 0))) is None
    assert "float16 or bfloat16" in _plan(dtype=torch.float32)
    stem = dict(cin=3, input_shape=(32, 3, 224, 224), weight_shape=(64, 3, 7, 7))
    assert _plan(**stem) is None  # F0: planned with its input channels padded to 8
    assert "multiples of 8" in _plan(prologue=True, **stem)  # F1 is not padded
    assert "multiples of 8" in _plan(weight_shape=(12, 64, 1, 1))
    assert "bias" in _plan(has_bias=True)
    assert "groups" in _plan(groups=2)
    assert "channels_last" in _plan(channels_last=False)
    assert "weight dtype" in _plan(weight_dtype=torch.float32)
    assert "aligned" in _plan(aligned=False)


def test_problem_on_cpu_says_cuda_only():
    x = torch.randn(2, 8, 4, 4)
    w = torch.randn(8, 8, 1, 1)
    assert "CUDA" in cudnn_graph.problem(x, w, None, 1, 0, 1, 1)


# --------------------------------------------------------------------------------------
# A model whose BN-ReLU -> conv sites the graph path takes: the reference graphs stand in
# for cuDNN, with the path's own autograd (cudnn_graph._backward)
# --------------------------------------------------------------------------------------


class _ReferenceGraph(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, scale, shift, stride, padding):
        out = R.graph_f1(x, scale, shift, w, stride, padding) if scale is not None \
            else R.graph_f0(x, w, stride, padding)
        cudnn_graph._setup(ctx, (x, w, scale, shift, stride, padding), out)
        return out

    @staticmethod
    def backward(ctx, dy, dsum, dsq):
        return cudnn_graph._backward(ctx, dy, dsum, dsq)


class Bottleneck(nn.Module):
    """conv1-bn1-relu-conv2(3x3, strided)-bn2-relu-conv3-bn3 + projection, relu."""

    def __init__(self, momentum=0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8, momentum=momentum)
        self.conv2 = nn.Conv2d(8, 8, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8, momentum=momentum)
        self.conv3 = nn.Conv2d(8, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16, momentum=momentum)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.down(x))


def _reference_dgrad_drelu_dbn(dy, w, x, mean, invstd, gamma, beta, stride, padding):
    """cudnn_graph._run_dgrad_drelu_dbn's stand-in: the reference graph."""
    return R.graph_dgrad_drelu_dbn(dy, w, stride, padding, x, mean, invstd, gamma, beta)


def _reference_wgrad(dy, x, scale, shift, w, stride, padding):
    """cudnn_graph._run_wgrad's stand-in: the reference graph."""
    return R.graph_wgrad(dy, x, scale, shift, w.shape, stride, padding)


def _fake_cudnn(monkeypatch, refuse=()):
    """cuDNN faked: the graph kinds in ``refuse`` refused (check_support), every other one
    planned (engine "fake-engine") and run by its reference; returns the kinds run."""
    calls = []

    def run(x, w, scale, shift, stride, padding):
        calls.append("F1" if scale is not None else "F0")
        return _ReferenceGraph.apply(x, w, scale, shift, stride, padding)

    def dgrad_drelu_dbn(*args):
        calls.append("DgradDreluDBN")
        return _reference_dgrad_drelu_dbn(*args)

    def wgrad(*args):
        calls.append("ConvBNwgrad")
        return _reference_wgrad(*args)

    real_ask = cudnn_graph._ask_cudnn

    def ask(ops, *args):
        if ops != "cudnn_graph":  # the finalize and tail graphs: not faked here
            return real_ask(ops, *args)
        kind = args[0]
        return ("check_support: faked", None) if kind in refuse else ("", "fake-engine")

    monkeypatch.setattr(cudnn_graph, "problem", lambda *a, **k: None)
    monkeypatch.setattr(cudnn_graph, "_STATUS", {})
    monkeypatch.setattr(cudnn_graph, "_ENGINE", {})
    monkeypatch.setattr(cudnn_graph, "_ask_cudnn", ask)
    monkeypatch.setattr(cudnn_graph, "_run_graph", run)
    monkeypatch.setattr(cudnn_graph, "_run_dgrad_drelu_dbn", dgrad_drelu_dbn)
    monkeypatch.setattr(cudnn_graph, "_run_wgrad", wgrad)
    return calls


@pytest.fixture
def graph_calls(monkeypatch):
    """cuDNN faked: every graph planned and supported, run by the reference; the kinds
    run are recorded."""
    return _fake_cudnn(monkeypatch)


def _set_graph_plans(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.fusedres_plan = fnn.SitePlan(conv="cudnn-graph")


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"{what}: {m}")


def _train_steps(ref, fused, steps=2, shape=(2, 8, 8, 8)):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_r, out_f = ref(xr), fused(xf)
        _close(out_f, out_r, "output")
        dout = torch.randn(out_r.shape, generator=g, dtype=torch.float64)
        out_r.backward(dout)
        out_f.backward(dout)
        _close(xf.grad, xr.grad, "input grad")
        for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
            _close(q.grad, p.grad, f"grad of {name}")
            p.grad = q.grad = None
        for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
            _close(b.double(), a.double(), name)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_graph_sites_match_torch(graph_calls, momentum):
    torch.manual_seed(0)
    ref = Bottleneck(momentum).double()
    for m in ref.modules():  # non-trivial BN parameters
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    fused = fusedres.convert(ref, backend="reference")
    _set_graph_plans(fused)
    rows = {r["site"]: r for r in fusedres.explain(fused)}
    assert rows["bn1"]["conv"] == "cudnn-graph stats+prologue", rows["bn1"]
    assert rows["bn2"]["conv"] == "cudnn-graph prologue", rows["bn2"]
    _train_steps(ref, fused)
    assert fnn.last_backend() == "cudnn-graph-stats"  # the tail ran last
    # per step: conv1 F0 (bn1's statistics), conv2 F1 (its statistics carried to bn2),
    # conv3 F1 (its statistics carried to bn3), the shortcut conv F0 (the tail's second
    # BN); backward: the bn2-relu-conv3 site, then the bn1-relu-conv2 site, each
    # DgradDreluDBN (dx, dgamma, dbeta of the BN) and ConvBNwgrad (dw)
    backward = ["DgradDreluDBN", "ConvBNwgrad"] * 2
    assert graph_calls == (["F0", "F1", "F1", "F0"] + backward) * 2
    rows = {r["site"]: r for r in fusedres.explain(fused)}
    assert "F1 on fake-engine; backward: DgradDreluDBN on fake-engine; ConvBNwgrad on " \
        "fake-engine; dBNApply: the fusedres BN kernel" in rows["bn1"]["reason"]


@pytest.mark.parametrize("refuse", [("DgradDreluDBN",), ("ConvBNwgrad",),
                                    ("DgradDreluDBN", "ConvBNwgrad")])
def test_refused_backward_graph_falls_back(monkeypatch, refuse):
    """A backward graph cuDNN refuses (faked) runs as today's backward (ATen's dgrad or
    wgrad, the BN backward kernels): the same gradients, the other graph still used,
    explain says which was refused. Asked once per graph signature."""
    calls = _fake_cudnn(monkeypatch, refuse)
    torch.manual_seed(0)
    ref = Bottleneck().double()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    fused = fusedres.convert(ref, backend="reference")
    _set_graph_plans(fused)
    _train_steps(ref, fused)
    backward = [k for k in ("DgradDreluDBN", "ConvBNwgrad") if k not in refuse] * 2
    assert calls == (["F0", "F1", "F1", "F0"] + backward) * 2
    note = {r["site"]: r for r in fusedres.explain(fused)}["bn1"]["reason"]
    for kind in refuse:
        assert f"{kind} refused at input" in note and "check_support: faked" in note, note
    # one status per (kind, site); the refused ones are remembered, not asked again
    assert len([s for s in cudnn_graph.statuses() if s["kind"] in refuse]) == 2 * len(refuse)


def test_backward_graph_that_fails_to_execute_falls_back(monkeypatch):
    """A planned backward graph whose execution raises (faked) gives today's backward
    instead -- the same gradients, no exception -- and is remembered as refused."""
    calls = _fake_cudnn(monkeypatch)

    def broken(*args):
        calls.append("broken")
        raise RuntimeError("fusedres cudnn_graph_wgrad: execute failed: faked")

    monkeypatch.setattr(cudnn_graph, "_run_wgrad", broken)
    x, w, gamma, beta, mean, invstd = _site_inputs(True)
    x.requires_grad_(), w.requires_grad_()
    for _ in range(2):
        y, _, _ = cudnn_graph.bn_relu_conv(x, w, gamma, beta, mean, invstd, True, [1, 1], [1, 1])
        got = torch.autograd.grad(y.sum(), (x, w))
    y_t = F.conv2d(torch.relu(F.batch_norm(x, None, None, gamma, beta, True, 0.1, 1e-5)), w,
                   None, 1, 1)
    for a, b, name in zip(got, torch.autograd.grad(y_t.sum(), (x, w)), ("x", "w")):
        _close(a, b, f"grad {name}")
    assert calls.count("broken") == 1  # remembered: not tried again
    wgrad = [s for s in cudnn_graph.statuses() if s["kind"] == "ConvBNwgrad"]
    # the C++ op's own message (csrc/cuda/cudnn_graph.cpp, execute) says "execute failed"
    # too: the status says it once, then the op and cuDNN's message
    assert wgrad[0]["status"] == "execute failed: fusedres cudnn_graph_wgrad: faked"


@pytest.mark.parametrize("message, status", [
    ("fusedres cudnn_graph_wgrad: execute failed: faked",  # the C++ op's own statement
     "execute failed: fusedres cudnn_graph_wgrad: faked"),
    ("execute failed: faked", "execute failed: faked"),
    # the words elsewhere in the message are its text, kept as they are
    ("fusedres cudnn_graph_wgrad: cudnn-frontend: graph execute failed: faked",
     "execute failed: fusedres cudnn_graph_wgrad: cudnn-frontend: graph execute failed: faked"),
    ("CUDA error: misaligned address", "execute failed: CUDA error: misaligned address")])
def test_remembered_failure_states_the_step_once(message, status):
    """``_remembered.call``'s prefix is dropped from the error's line only where the line
    states it as its step (first, or right after the op's name), never from its text."""
    from fusedres import _remembered

    def fail():
        raise RuntimeError(message + "\nException raised from execute at cudnn_graph.cpp")

    statuses = {}
    assert _remembered.call(threading.Lock(), statuses, "k", fail,
                            prefix="execute failed: ") is None
    assert statuses == {"k": status}


def test_fused_backward_switch(graph_calls, monkeypatch):
    """fused_backward=False: the site's backward is today's (autograd through scale/shift),
    no backward graph runs, the gradients are the same."""
    monkeypatch.setattr(cudnn_graph, "fused_backward", False)
    torch.manual_seed(0)
    ref = Bottleneck().double()
    fused = fusedres.convert(ref, backend="reference")
    _set_graph_plans(fused)
    _train_steps(ref, fused, steps=1)
    assert graph_calls == ["F0", "F1", "F1", "F0"]
    assert "fused_backward is False" in {r["site"]: r for r in fusedres.explain(fused)}[
        "bn1"]["reason"]


def test_carried_statistics_are_used(graph_calls, monkeypatch):
    """bn2's statistics come from conv2's F1 graph, not from a pass over its output."""
    torch.manual_seed(0)
    fused = fusedres.convert(Bottleneck().double(), backend="reference")
    _set_graph_plans(fused)
    seen = []
    run = fnn._prologue_conv
    monkeypatch.setattr(fnn, "_prologue_conv",
                        lambda bn, conv, y, stats, backend: seen.append(stats is not None)
                        or run(bn, conv, y, stats, backend))
    fused(torch.randn(2, 8, 8, 8, dtype=torch.float64))
    assert seen == [True, True]


def test_refused_graph_falls_back(graph_calls, monkeypatch):
    """A graph cuDNN refuses (faked) runs as the cudnn path: same answers, no graph run,
    and explain says why."""
    monkeypatch.setattr(cudnn_graph, "plan_status", lambda *a, **k: "check_support: faked")
    monkeypatch.setattr(cudnn_graph, "fused_backward", False)  # (bn_relu_conv never runs)
    real_problem = cudnn_graph.CudnnGraphConv._problem

    def refused_at(self, conv, x, prologue):
        if x is None:  # explain (module-level) sees the refusal recorded at run time
            return "cuDNN refused the F1 graph at input (2, 8, 8, 8): check_support: faked"
        return real_problem(self, conv, x, prologue)

    monkeypatch.setattr(cudnn_graph.CudnnGraphConv, "_problem", refused_at)
    torch.manual_seed(0)
    ref = Bottleneck().double()
    fused = fusedres.convert(ref, backend="reference")
    _set_graph_plans(fused)
    _train_steps(ref, fused, steps=1)
    assert graph_calls == []
    rows = {r["site"]: r for r in fusedres.explain(fused)}
    assert "check_support: faked" in rows["bn1"]["reason"]


def test_refusals_are_remembered(monkeypatch):
    """plan_status asks cuDNN once per graph signature, and _refused reports it."""
    asked = []

    class FakeOps:
        @staticmethod
        def cudnn_graph_plan(kind, x, w, stride, padding):
            asked.append(kind)
            return "" if kind == "ConvBNwgrad" else "check_support: no engine"

        @staticmethod
        def cudnn_graph_engine(kind, x, w, stride, padding):
            return "eng_7 (scale/shift fp16, intermediate fp32)"

    monkeypatch.setattr(cudnn_graph, "_STATUS", {})
    monkeypatch.setattr(cudnn_graph, "_ENGINE", {})
    monkeypatch.setattr(cudnn_graph.torch.ops, "fusedres", FakeOps, raising=False)
    conv = nn.Conv2d(8, 16, 3, 2, 1, bias=False)
    x = torch.randn(2, 8, 8, 8)
    for _ in range(3):
        assert cudnn_graph.plan_status(x, conv.weight, True, 2, 1) == "check_support: no engine"
        assert cudnn_graph.plan_status(x, conv.weight, "ConvBNwgrad", 2, 1) == ""
    assert asked == ["F1", "ConvBNwgrad"]
    assert "check_support: no engine" in cudnn_graph._refused(conv, True)
    assert cudnn_graph._refused(conv, False) is None
    assert cudnn_graph._refused(conv, "ConvBNwgrad") is None
    assert cudnn_graph.engine(x, conv.weight, "ConvBNwgrad", 2, 1).startswith("eng_7")
    assert cudnn_graph.engine(x, conv.weight, "F1", 2, 1) is None
    rows = {r["kind"]: r for r in cudnn_graph.statuses()}
    assert rows["F1"]["engine"] is None and rows["ConvBNwgrad"]["status"] == ""
    note = cudnn_graph.backward_note(conv)
    assert "ConvBNwgrad on eng_7" in note and "DgradDreluDBN planned at the first" in note
    with pytest.raises(ValueError, match="unknown cuDNN graph kind"):
        cudnn_graph.plan_status(x, conv.weight, "F2", 2, 1)


# --------------------------------------------------------------------------------------
# Autograd formula and fake kernel
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prologue", [False, True])
def test_backward_formula_against_autograd(prologue):
    g = torch.Generator().manual_seed(5)
    d = torch.float64
    x = torch.randn(2, 8, 7, 7, generator=g, dtype=d, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, generator=g, dtype=d, requires_grad=True)
    s = (torch.rand(8, generator=g, dtype=d) + 0.5).requires_grad_() if prologue else None
    t = torch.randn(8, generator=g, dtype=d, requires_grad=True) if prologue else None
    wrt = [x, w] + ([s, t] if prologue else [])
    dy = torch.randn(2, 8, 4, 4, generator=g, dtype=d)

    def loss(y, s1, s2):
        return (y * dy).sum() + s1.sum() * 0.3 + s2.sum() * 0.01

    got = torch.autograd.grad(loss(*_ReferenceGraph.apply(x, w, s, t, [2, 2], [1, 1])), wrt)
    ref = R.graph_f1(x, s, t, w, 2, 1) if prologue else R.graph_f0(x, w, 2, 1)
    want = torch.autograd.grad(loss(*ref), wrt)
    for a, b, name in zip(got, want, ["x", "w", "scale", "shift"]):
        _close(a, b, f"grad {name}")


def _site_inputs(batch_stats, affine=True, seed=6):
    """Inputs of fusedres::cudnn_graph_bn_relu_conv (float64, channels_last) and the
    torch composite they stand for."""
    g = torch.Generator().manual_seed(seed)
    d, cl = torch.float64, torch.channels_last
    x = torch.randn(3, 8, 7, 7, generator=g, dtype=d).contiguous(memory_format=cl)
    w = torch.randn(16, 8, 3, 3, generator=g, dtype=d).contiguous(memory_format=cl)
    gamma = (torch.rand(8, generator=g, dtype=d) + 0.5) if affine else None
    beta = torch.randn(8, generator=g, dtype=d) * 0.5 if affine else None
    if batch_stats:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    else:  # running statistics: constants
        mean, var = torch.randn(8, generator=g, dtype=d) * 0.2, torch.rand(8, generator=g,
                                                                          dtype=d) + 0.5
    invstd = torch.rsqrt(var + 1e-5)
    return x, w, gamma, beta, mean, invstd


@pytest.mark.parametrize("batch_stats,affine", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("refuse", [(), ("DgradDreluDBN", "ConvBNwgrad")])
def test_site_op_against_torch(monkeypatch, batch_stats, affine, refuse):
    """The site op's gradients (x, w, gamma, beta) against torch's conv(relu(bn(x))) in
    float64, with the backward graphs (their references) and with today's backward;
    batch statistics (their gradient included) and constant ones."""
    calls = _fake_cudnn(monkeypatch, refuse)
    x, w, gamma, beta, mean, invstd = _site_inputs(batch_stats, affine)
    wrt = [x, w] + ([gamma, beta] if affine else [])
    for t in wrt:
        t.requires_grad_()
    y, s1, s2 = cudnn_graph.bn_relu_conv(x, w, gamma, beta, mean, invstd, batch_stats,
                                         [2, 2], [1, 1])
    if batch_stats:
        bn = F.batch_norm(x, None, None, gamma, beta, True, 0.1, 1e-5)
    else:
        v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
        bn = (x - v(mean)) * v(invstd) * (v(gamma) if affine else 1) + (v(beta) if affine else 0)
    y_t = F.conv2d(torch.relu(bn), w, None, 2, 1)
    _close(y, y_t, "y")
    _close(s1, y_t.sum(dim=(0, 2, 3)), "sum")
    dy = torch.randn(y.shape, dtype=y.dtype)
    # a loss through y and through the sums (the next site's statistics when not fused)
    got = torch.autograd.grad((y * dy).sum() + 0.3 * s1.sum() + 0.01 * s2.sum(), wrt)
    want = torch.autograd.grad((y_t * dy).sum() + 0.3 * y_t.sum() + 0.01 * y_t.square().sum(),
                               wrt)
    for a, b, name in zip(got, want, ["x", "w", "gamma", "beta"]):
        _close(a, b, f"grad {name}")
    assert calls == ["F1"] + [k for k in ("DgradDreluDBN", "ConvBNwgrad") if k not in refuse]


def test_site_op_opcheck(monkeypatch):
    """opcheck of fusedres::cudnn_graph_bn_relu_conv on CPU (schema, fake kernel, autograd
    registration, AOT dispatch) with the reference graphs standing in for cuDNN."""
    _fake_cudnn(monkeypatch)
    x, w, gamma, beta, mean, invstd = _site_inputs(True)
    for t in (x, w, gamma, beta):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.fusedres.cudnn_graph_bn_relu_conv.default,
                          (x, w, gamma, beta, mean, invstd, True, [1, 1], [1, 1]))


def test_backward_fake_kernels():
    cl = torch.channels_last
    x = torch.empty(4, 16, 9, 9, device="meta").contiguous(memory_format=cl)
    w = torch.empty(32, 16, 3, 3, device="meta").contiguous(memory_format=cl)
    dy = torch.empty(4, 32, 5, 5, device="meta").contiguous(memory_format=cl)
    c = torch.empty(16, device="meta")
    g, dgamma, dbeta = cudnn_graph._dgrad_drelu_dbn_fake(dy, w, x, c, c, c, c, [2, 2], [1, 1])
    assert g.shape == x.shape and g.is_contiguous(memory_format=cl) and g.dtype == x.dtype
    assert dgamma.shape == dbeta.shape == (16,) and dgamma.dtype == torch.float32
    dw = cudnn_graph._wgrad_fake(dy, x, c, c, w, [2, 2], [1, 1])
    assert dw.shape == w.shape and dw.is_contiguous(memory_format=cl)


def test_fake_kernel_shapes():
    x = torch.empty(4, 16, 9, 9, device="meta").contiguous(memory_format=torch.channels_last)
    w = torch.empty(32, 16, 3, 3, device="meta")
    y, s1, s2 = cudnn_graph._fake(x, w, None, None, [2, 2], [1, 1])
    want = F.conv2d(torch.empty(4, 16, 9, 9, device="meta"), w, None, 2, 1)
    assert y.shape == want.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert s1.shape == s2.shape == (32,) and s1.dtype == torch.float32


# --------------------------------------------------------------------------------------
# Registry, tune, doctor on CPU
# --------------------------------------------------------------------------------------


def test_registered_and_chosen_by_plan():
    assert "cudnn-graph" in conv_paths.conv_paths()
    assert fnn.conv_choice(fnn.SitePlan(conv="cudnn-graph"), "auto") == ("cudnn-graph", None)
    assert fnn.conv_choice(fnn.SitePlan(conv="cudnn-graph"), "cudnn")[0] == "cudnn"
    assert T.plan_of("cudnn-graph") == fnn.SitePlan(conv="cudnn-graph")


def test_tune_never_offers_it_on_cpu(monkeypatch):
    assert "cudnn-graph" not in T._candidates(torch.device("cpu"), None)
    monkeypatch.setattr(cudnn_graph, "built", lambda: True)
    assert "cudnn-graph" not in T._candidates(torch.device("cpu"), None)
    assert "cudnn-graph" in T._candidates(torch.device("cuda"), None)
    monkeypatch.setattr(cudnn_graph, "built", lambda: False)
    assert "cudnn-graph" not in T._candidates(torch.device("cuda"), None)


def test_doctor_backward_rows_with_faked_cudnn(monkeypatch):
    """The doctor's backward rows (DgradDreluDBN, ConvBNwgrad, the whole site) run their
    checks -- here in float64 on CPU with the references standing in for cuDNN -- and a
    wrong graph fails its row."""
    from fusedres.bench import doctor

    _fake_cudnn(monkeypatch)

    def rows_of(d):
        x = d.rand((2, 8, 7, 7), torch.float64, True, 0, 1.0, 0.3)
        w = d.rand((16, 8, 3, 3), torch.float64, True, 1, 0.1)
        d._cudnn_backward_graphs(torch.float64, 0, x, w, 2, 1, "8->16 3x3/2 @7")
        return {r.kernel: r for r in d.rows.values()}

    rows = rows_of(doctor.Doctor(torch.device("cpu"), quick=True, progress=False))
    assert set(rows) == {"cudnn_graph_DgradDreluDBN", "cudnn_graph_ConvBNwgrad",
                         "cudnn_graph_site"}
    assert all(r.ok and r.cases == 1 for r in rows.values()), rows
    wrong = cudnn_graph._run_wgrad
    monkeypatch.setattr(cudnn_graph, "_run_wgrad", lambda *a: wrong(*a) * 1.01)
    rows = rows_of(doctor.Doctor(torch.device("cpu"), quick=True, progress=False))
    assert not rows["cudnn_graph_ConvBNwgrad"].ok and not rows["cudnn_graph_site"].ok
    assert "fake-engine" in rows["cudnn_graph_ConvBNwgrad"].detail
    assert rows["cudnn_graph_DgradDreluDBN"].ok


def test_imports_and_falls_back_without_the_extension():
    """With fusedres._C unavailable (no cuDNN, no frontend headers at build time) the
    package imports, the site op is defined, the path is never planned and says why."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        sys.modules["fusedres._C"] = None  # import fails as if never built
        import torch
        import fusedres
        from fusedres import cudnn_graph
        assert not cudnn_graph.built()
        assert hasattr(torch.ops.fusedres, "cudnn_graph_bn_relu_conv")
        caps = cudnn_graph.Capabilities(cudnn_graph.built(), 0, (9, 0))
        why = cudnn_graph.plan(caps, torch.float16, torch.float16, False, (8, 64, 8, 8),
                               (64, 64, 3, 3))
        assert "built without the cuDNN graph path" in why, why
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_doctor_skips_with_a_reason_on_cpu():
    from fusedres.bench import doctor

    d = doctor.Doctor(torch.device("cpu"), quick=True, only="nothing-matches")
    d.run()
    assert ("cudnn-graph", "the cuDNN graphs run on CUDA only") in d.skipped


# --------------------------------------------------------------------------------------
# On a GPU with the path built (skipped elsewhere): cuDNN itself
# --------------------------------------------------------------------------------------

_NEEDS_GPU = pytest.mark.skipif(not (torch.cuda.is_available() and cudnn_graph.built()),
                                reason="needs a GPU and fusedres._C built with the cuDNN graph path")


def _ON_GPU(test):
    """Skipped without a GPU; marked cuda: scripts/gpu_run.sh's tests stage runs -m cuda."""
    return pytest.mark.cuda(_NEEDS_GPU(test))


def _gpu_inputs(dtype, prologue, cin=64, cout=64, k=3, h=14):
    g = torch.Generator(device="cuda").manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(8, cin, h, h, device="cuda", generator=g).to(dtype).contiguous(memory_format=cl)
    w = (torch.randn(cout, cin, k, k, device="cuda", generator=g) * (cin * k * k) ** -0.5
         ).to(dtype).contiguous(memory_format=cl)
    s = torch.rand(cin, device="cuda", generator=g) + 0.5 if prologue else None
    t = torch.randn(cin, device="cuda", generator=g) * 0.1 if prologue else None
    return x, w, s, t


@_ON_GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prologue", [False, True])
def test_gpu_graph_against_reference(dtype, prologue):
    x, w, s, t = _gpu_inputs(dtype, prologue)
    status = cudnn_graph.plan_status(x, w, prologue, 1, 1)
    if status:
        pytest.skip(f"cuDNN refused the graph here: {status}")
    y, s1, s2 = torch.ops.fusedres.cudnn_graph_conv_stats(x, w, s, t, [1, 1], [1, 1])
    d = torch.float64
    ref = R.graph_f1(x.to(d), s.to(d), t.to(d), w.to(d), 1, 1) if prologue \
        else R.graph_f0(x.to(d), w.to(d), 1, 1)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    for got, want, name in zip((y, s1, s2), ref, ("y", "sum", "sum_sq")):
        err = (got.double() - want).norm() / want.norm()
        assert err < tol, f"{name}: relative error {err:.3g}"


@_ON_GPU
@pytest.mark.parametrize("prologue", [False, True])
def test_gpu_opcheck(prologue):
    x, w, s, t = _gpu_inputs(torch.float16, prologue)
    if cudnn_graph.plan_status(x, w, prologue, 1, 1):
        pytest.skip("cuDNN refused the graph here")
    x.requires_grad_()
    torch.library.opcheck(torch.ops.fusedres.cudnn_graph_conv_stats.default,
                          (x, w, s, t, [1, 1], [1, 1]),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


@_ON_GPU
def test_gpu_compile_fullgraph():
    x, w, s, t = _gpu_inputs(torch.bfloat16, True)
    if cudnn_graph.plan_status(x, w, True, 1, 1):
        pytest.skip("cuDNN refused the graph here")
    eager = cudnn_graph.conv_stats(x, w, 1, 1, s, t)
    compiled = torch.compile(lambda *a: cudnn_graph.conv_stats(*a, 1, 1, s, t), fullgraph=True)
    for a, b in zip(compiled(x, w), eager):
        torch.testing.assert_close(a, b)


def _gpu_site_inputs(dtype):
    """A BN-ReLU -> conv site on the GPU: x (the BN's input), w, the BN's batch statistics
    and affine parameters (fp32), dy at the conv's output."""
    x, w, _, _ = _gpu_inputs(dtype, False)
    g = torch.Generator(device="cuda").manual_seed(1)
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    gamma = torch.rand(x.shape[1], device="cuda", generator=g) + 0.5
    beta = torch.randn(x.shape[1], device="cuda", generator=g) * 0.1
    dy = (torch.randn(8, w.shape[0], 14, 14, device="cuda", generator=g) * 0.1).to(dtype) \
        .contiguous(memory_format=torch.channels_last)
    return x, w, mean, invstd, gamma, beta, dy


def _planned_or_skip(x, w, kind):
    status = cudnn_graph.plan_status(x, w, kind, 1, 1)
    if status:
        pytest.skip(f"cuDNN refused the {kind} graph here: {status}")
    return cudnn_graph.engine(x, w, kind, 1, 1)


@_ON_GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", cudnn_graph.BACKWARD_KINDS)
def test_gpu_backward_graph_against_reference(dtype, kind):
    x, w, mean, invstd, gamma, beta, dy = _gpu_site_inputs(dtype)
    engine = _planned_or_skip(x, w, kind)
    d = torch.float64
    if kind == "DgradDreluDBN":
        got = torch.ops.fusedres.cudnn_graph_dgrad_drelu_dbn(dy, w, x, mean, invstd, gamma, beta,
                                                             [1, 1], [1, 1])
        want = R.graph_dgrad_drelu_dbn(dy.to(d), w.to(d), 1, 1, x.to(d), mean.to(d),
                                       invstd.to(d), gamma.to(d), beta.to(d))
    else:
        scale, shift = cudnn_graph.prologue_scale_shift(gamma, beta, mean, invstd)
        got = [torch.ops.fusedres.cudnn_graph_wgrad(dy, x, scale, shift, w, [1, 1], [1, 1])]
        want = [R.graph_wgrad(dy.to(d), x.to(d), scale.to(d), shift.to(d), w.shape, 1, 1)]
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    for i, (a, b) in enumerate(zip(got, want)):
        err = (a.double() - b).norm() / b.norm()
        assert err < tol, f"{kind} output {i} on {engine}: relative error {err:.3g}"


@_ON_GPU
@pytest.mark.parametrize("kind", cudnn_graph.BACKWARD_KINDS)
def test_gpu_backward_opcheck(kind):
    x, w, mean, invstd, gamma, beta, dy = _gpu_site_inputs(torch.float16)
    _planned_or_skip(x, w, kind)
    if kind == "DgradDreluDBN":
        op, args = torch.ops.fusedres.cudnn_graph_dgrad_drelu_dbn.default, (
            dy, w, x, mean, invstd, gamma, beta, [1, 1], [1, 1])
    else:
        scale, shift = cudnn_graph.prologue_scale_shift(gamma, beta, mean, invstd)
        op, args = torch.ops.fusedres.cudnn_graph_wgrad.default, (
            dy, x, scale, shift, w, [1, 1], [1, 1])
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@_ON_GPU
def test_gpu_site_compile_fullgraph():
    """The site op forward and backward under torch.compile(fullgraph=True), after one
    eager step planned its graphs: the same output and gradients."""
    x, w, mean, invstd, gamma, beta, dy = _gpu_site_inputs(torch.bfloat16)
    _planned_or_skip(x, w, "F1")

    def step(x, w, gamma, beta):
        y, _, _ = cudnn_graph.bn_relu_conv(x, w, gamma, beta, mean, invstd, True, [1, 1],
                                           [1, 1])
        return (y.float() * dy.float()).sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        ins = [t.detach().requires_grad_() for t in (x, w, gamma, beta)]
        loss = fn(*ins)
        results.append([loss, *torch.autograd.grad(loss, ins)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)


@_ON_GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_converted_block_under_autocast(dtype):
    """A bottleneck (channels 16/32, so the planner takes every inner conv) with every site
    on the graph path under autocast: output and gradients against the unfused block,
    running statistics too; last_backend says the prologue ran."""
    class Wide(Bottleneck):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
            self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)
            self.conv3, self.bn3 = nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)
            self.down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))

    torch.manual_seed(0)
    cl = torch.channels_last
    ref = Wide().cuda().to(memory_format=cl)
    fused = fusedres.convert(Wide().cuda().to(memory_format=cl))
    fused.load_state_dict(ref.state_dict())
    _set_graph_plans(fused)
    x = torch.randn(8, 16, 16, 16, device="cuda").contiguous(memory_format=cl)
    outs = []
    for m in (ref, fused):
        xx = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype):
            out = m(xx)
        out.float().square().sum().backward()
        outs.append([out.float(), xx.grad] + [p.grad for p in m.parameters()]
                    + [b for b in m.buffers() if b.dtype.is_floating_point])
    assert any(r["conv"].startswith("cudnn-graph") for r in fusedres.explain(fused)), \
        fusedres.explain(fused)
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-2
    for i, (a, b) in enumerate(zip(*outs)):
        err = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))
        assert err < tol, f"tensor {i}: relative error {err:.3g}"


class _ShiftedBottleneck(Bottleneck):
    """conv2's output changed in place before bn2: the statistics its F1 graph computed
    no longer describe it."""

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        y = self.conv2(out)
        y.mul_(2.0).add_(0.5)
        out = F.relu(self.bn2(y))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.down(x))


def test_carried_statistics_not_used_after_an_in_place_change(graph_calls):
    """Forward only: the graph op saves its output for backward (as the Triton conv-stats
    op does), so autograd refuses a backward through the in-place change -- an error,
    never a wrong gradient (docs/cudnn_graph.md)."""
    torch.manual_seed(0)
    ref = _ShiftedBottleneck().double()
    fused = fusedres.convert(ref, backend="reference")
    _set_graph_plans(fused)
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    _close(fused(x), ref(x), "output")
    for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        _close(b.double(), a.double(), name)

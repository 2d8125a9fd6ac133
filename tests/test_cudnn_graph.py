"""The cudnn-graph conv path on CPU: the planner's rules with faked capabilities, the
fallback when a graph is refused (faked), the site wiring and autograd with the reference
graphs standing in for cuDNN (float64: outputs, every gradient, running statistics), the
fake kernel, and what tune/doctor offer on CPU. The graphs themselves run only on a GPU
(fusedres-bench doctor, scripts/gpu_cudnn_sites.py)."""
import importlib

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


@pytest.fixture
def graph_calls(monkeypatch):
    """cuDNN faked: every graph planned and supported, run by the reference; the kinds
    run are recorded."""
    calls = []

    def run(x, w, scale, shift, stride, padding):
        calls.append("F1" if scale is not None else "F0")
        return _ReferenceGraph.apply(x, w, scale, shift, stride, padding)

    monkeypatch.setattr(cudnn_graph, "problem", lambda *a, **k: None)
    monkeypatch.setattr(cudnn_graph, "plan_status", lambda *a, **k: "")
    monkeypatch.setattr(cudnn_graph, "_run_graph", run)
    return calls


def _set_graph_plans(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.fusedres_plan = fnn.SitePlan(conv="cudnn-graph")


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"{what}: {m}")


def _train_steps(ref, fused, steps=2):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, 8, 8, 8, generator=g, dtype=torch.float64)
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
    assert fnn.last_backend() != "cudnn-graph-prologue"  # the tail ran last
    # per step: conv1 F0 (bn1's statistics), conv2 F1 (its statistics carried to bn2),
    # conv3 F1
    assert graph_calls == ["F0", "F1", "F1"] * 2


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
        def cudnn_graph_plan(x, w, prologue, stride, padding):
            asked.append(prologue)
            return "check_support: no engine"

    monkeypatch.setattr(cudnn_graph, "_STATUS", {})
    monkeypatch.setattr(cudnn_graph.torch.ops, "fusedres", FakeOps, raising=False)
    conv = nn.Conv2d(8, 16, 3, 2, 1, bias=False)
    x = torch.randn(2, 8, 8, 8)
    for _ in range(3):
        assert cudnn_graph.plan_status(x, conv.weight, True, 2, 1) == "check_support: no engine"
    assert asked == [True]
    assert "check_support: no engine" in cudnn_graph._refused(conv, True)
    assert cudnn_graph._refused(conv, False) is None
    assert cudnn_graph.statuses()[0]["kind"] == "F1"


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

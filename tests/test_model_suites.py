"""torchvision's (and timm's) model-test checks on converted models.

torchvision's ``test/test_models.py`` checks each classification model for: the forward
output, an input gradient, ``torch.fx.symbolic_trace`` giving the same output,
``torch.jit.script`` giving the same output (and surviving save/load), and eval mode.
timm's model tests add a backward with every parameter's gradient and the same fx/script
checks. Here the same checks run on converted models against the unconverted ones, in
float64 on small inputs (2x3x64x64), plus a state_dict round trip. Where a converted
model cannot do what the original does, the check asserts the documented behaviour
instead, and the reason is in ``DEVIATIONS`` (mirrored in docs/convert.md, "Known
deviations").
"""
import copy
import io

import pytest
import torch
import torchvision

import fusedres
from fusedres.convert import explain

# Every way a converted model differs from the original in these checks, with its reason.
DEVIATIONS = {
    "jit.script": (
        "torch.jit.script raises RuntimeError: a converted block's forward is generated "
        "Python that calls fusedres.nn.conv_bn_act with modules as arguments, which "
        "TorchScript cannot compile; so does scripting an fx GraphModule of a converted "
        "model (timm's forward_fx_torchscript), which calls it. The error names what "
        "works instead: "
        "torch.jit.trace(model, example_input), torch.compile(model), or scripting the "
        "unconverted model (its state_dict is the converted one's)."),
    "fx.graph": (
        "torch.fx.symbolic_trace works, but each fused site is one call_function node of "
        "fusedres.nn.conv_bn_act (its conv/BN modules are get_attr arguments), not "
        "conv/bn/relu nodes: graph passes that look for nn.BatchNorm2d calls (FX "
        "quantisation's conv-bn fusion) do not see those BNs. The root module's own "
        "forward is traced from its class, unfused (a stem fused there runs unfused in "
        "the GraphModule: same function)."),
    "fx.eval_fold": (
        "The fx GraphModule of a converted model runs the root module's own sites (a stem "
        "conv-BN, a final BN-ReLU written in the model's forward) with torch's modules, "
        "unfused (fx traces the class's forward), where the eager converted model runs "
        "them fused -- and in eval under no_grad folds a conv-BN into the conv weights: "
        "the two agree to float rounding, not bitwise (timm resnet50, fp32 2x3x64x64, "
        "eval under no_grad: 5.2e-8 apart, outputs up to 0.096)."),
}

TORCHVISION = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121"]
TIMM = ["resnet18", "resnet50d", "resnetv2_50", "resnetv2_50d", "densenet121"]
# CI time: these run test_forward_backward_eval only (the others add nothing they need:
# resnetv2_50 covers timm's BatchNormAct2d in the fx, TorchScript and state_dict checks)
FORWARD_ONLY = {("timm", "resnetv2_50d"), ("timm", "densenet121")}


def _build(source, arch):
    torch.manual_seed(0)
    if source == "timm":
        timm = pytest.importorskip("timm")
        model = timm.create_model(arch, pretrained=False, num_classes=10)
    else:
        model = getattr(torchvision.models, arch)(weights=None, num_classes=10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # running statistics and affine parameters away from 0/1
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.double()


def _close(got, want, what):
    scale = max(float(want.detach().abs().max()), 1.0)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7 * scale,
                               msg=lambda m: f"{what}: {m}")


def _same_state(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb), what
    for k in sa:
        _close(sb[k], sa[k], f"{what} {k}")


CASES = [("torchvision", a) for a in TORCHVISION] + [("timm", a) for a in TIMM]


@pytest.fixture(scope="module", params=CASES, ids=[f"{s}-{a}" for s, a in CASES])
def pair(request):
    ref = _build(*request.param)
    return ref, fusedres.convert(ref)


@pytest.fixture
def full_pair(request, pair):
    """``pair``, for the checks past the forward/backward one (see ``FORWARD_ONLY``)."""
    if tuple(request.node.callspec.params["pair"]) in FORWARD_ONLY:
        pytest.skip("FORWARD_ONLY model: test_forward_backward_eval checks it (CI time)")
    return pair


def _x(requires_grad=False):
    torch.manual_seed(2)
    return torch.randn(2, 3, 64, 64, dtype=torch.float64, requires_grad=requires_grad)


def test_forward_backward_eval(pair):
    """torchvision's forward and input-gradient checks, timm's backward (every parameter's
    gradient), in training (with the running statistics after it) and in eval."""
    ref, fused = copy.deepcopy(pair[0]), copy.deepcopy(pair[1])
    bns = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in ref.modules())
    assert len(explain(fused).fused()) >= 0.8 * bns, str(explain(fused))
    ref.train(), fused.train()
    xr, xf = _x(True), _x(True)
    out_r, out_f = ref(xr), fused(xf)
    _close(out_f, out_r, "train output")
    out_r.sum().backward()
    out_f.sum().backward()
    _close(xf.grad, xr.grad, "input gradient")
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert q.grad is not None, name
        _close(q.grad, p.grad, f"grad of {name}")
    _same_state(ref, fused, "after a training step:")
    ref.eval(), fused.eval()
    with torch.no_grad():
        _close(fused(_x()), ref(_x()), "eval output (no_grad)")
    _close(fused(_x()), ref(_x()), "eval output (autograd on)")


def test_fx_symbolic_trace(full_pair):
    """torchvision's _check_fx_compatible: the traced model gives the eager output, in
    eval (autograd on and under no_grad) and (running statistics included) in training;
    its backward too. To float rounding, not bitwise: DEVIATIONS["fx.eval_fold"]."""
    fused = full_pair[1]
    for training in (False, True):
        model = copy.deepcopy(fused).train(training)
        twin = copy.deepcopy(model)
        traced = torch.fx.symbolic_trace(model)
        assert any(n.target is fusedres.nn.conv_bn_act for n in traced.graph.nodes) == \
            any(r["status"] == "fused" and r["block"] for r in explain(fused))
        x1, x2 = _x(True), _x(True)
        out_t, out_e = traced(x1), twin(x2)
        _close(out_t, out_e, f"fx output (training={training})")
        out_t.sum().backward()
        out_e.sum().backward()
        _close(x1.grad, x2.grad, "fx input gradient")
        _same_state(twin, model, "fx running statistics")  # the GraphModule shares them
    model = copy.deepcopy(fused).eval()  # traced in eval: fx bakes in Python branches
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        _close(traced(_x()), model(_x()), "fx output (eval, no_grad: eager folds)")


def test_torchscript(full_pair):
    """torchvision's _check_jit_scriptable: scripting a converted model, or its fx
    GraphModule (timm's forward_fx_torchscript), raises the documented error
    (DEVIATIONS["jit.script"]); torch.jit.trace in eval passes torch's check (it re-traces
    under no_grad: one graph whatever the grad mode) with autograd on and off, and
    survives save/load."""
    ref, fused = full_pair[0].eval(), full_pair[1].eval()  # each test sets its mode
    converted = any(r["status"] == "fused" for r in explain(fused))
    if converted:
        with pytest.raises(RuntimeError, match=r"torch\.jit\.trace.*torch\.compile"):
            torch.jit.script(fused)
    graph_module = torch.fx.symbolic_trace(fused)
    if any(n.target is fusedres.nn.conv_bn_act for n in graph_module.graph.nodes):
        with pytest.raises(RuntimeError, match=r"fx GraphModule.*torch\.jit\.trace.*"
                                               r"torch\.compile"):
            torch.jit.script(graph_module)
    x = _x()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            traced = torch.jit.trace(fused, (x,))  # check_trace=True: torch's check
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        buf.seek(0)
        with torch.no_grad():
            _close(torch.jit.load(buf)(x), ref(x), f"jit.trace (grad={grad}) after save/load")


def test_state_dict_round_trip(full_pair):
    ref, fused = full_pair  # fused ends with the values it had (the original's)
    assert list(ref.state_dict()) == list(fused.state_dict())
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    other = copy.deepcopy(ref)  # another original with other values, to load into
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(torch.load(buf), strict=True)
    _same_state(ref, other, "converted -> original")
    fused.load_state_dict(other.state_dict(), strict=True)
    ref.eval(), fused.eval()
    with torch.no_grad():
        _close(fused(_x()), ref(_x()), "output after the round trip")

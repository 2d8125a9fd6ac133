"""BN-ReLU -> conv sites with the BN-ReLU in the Triton conv's prologue
(``fusedres.nn.bn_relu_conv2d``, ``convert``), against the unconverted model.

Without a GPU the Triton conv runs in the interpreter: batch 2, 8-16 channels, 8x8 images.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.densenet import _DenseBlock, _Transition

import pytest

import fusedres
import fusedres.nn as fnn
import models
from fusedres.convert import convert, explain
from test_convert import _randomize
from test_conv import ieee_fp32  # noqa: F401  (autouse: fp32 without TF32 on a GPU)

pytestmark = pytest.mark.skipif("triton" not in fusedres.available_backends(),
                                reason="the Triton backend is not available here")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


@pytest.fixture
def prologue_calls(monkeypatch):
    """Each run of the fused prologue path: (BN in training, stats from a conv epilogue)."""
    calls = []
    run = fnn._prologue_conv

    def spy(bn, conv, y, stats, backend):
        calls.append((bn.training, stats is not None))
        return run(bn, conv, y, stats, backend)

    monkeypatch.setattr(fnn, "_prologue_conv", spy)
    return calls


def _close(want, got, what, dtype):
    tol = TOL[dtype]
    atol = tol * max(float(want.detach().abs().max()), 1.0)
    torch.testing.assert_close(got, want, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def _pair(build, dtype):
    torch.manual_seed(0)
    ref = _randomize(build()).to(DEVICE, dtype)
    return ref, convert(ref, backend="triton")


def _kernels(fused):
    return [(r["site"], r["kernel"], r["conv"]) for r in explain(fused)]


def _step(ref, fused, x, dtype, last=None):
    """One forward and backward of both models: output, input and parameter gradients."""
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_f = ref(xr), fused(xf)
    if last is not None:
        assert fnn.last_backend() == last
    _close(out_r, out_f, "output", dtype)
    g = torch.randn_like(out_r)
    out_r.backward(g)
    out_f.backward(g)
    _close(xr.grad, xf.grad, "input grad", dtype)
    for (n, p), q in zip(ref.named_parameters(), fused.parameters()):
        _close(p.grad, q.grad, f"grad of {n}", dtype)
        p.grad = q.grad = None


def _same_state(ref, fused, dtype):
    """Same state_dict keys; values (running statistics, num_batches_tracked) close."""
    sr, sf = ref.state_dict(), fused.state_dict()
    assert list(sr) == list(sf)
    for k in sr:
        _close(sr[k].double(), sf[k].double(), k, dtype)


def _check(ref, fused, dtype, shape=(2, 8, 8, 8), last="triton-prologue", last_eval=None):
    """Two training steps (running statistics, num_batches_tracked), then eval with and
    without autograd."""
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        x = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)
        _step(ref.train(), fused.train(), x, dtype, last)
        _same_state(ref, fused, dtype)
    _step(ref.eval(), fused.eval(), x, dtype)
    with torch.no_grad():
        _close(ref(x), fused(x), "eval output without autograd", dtype)
    if last_eval is not None:
        assert fnn.last_backend() == last_eval
    _same_state(ref, fused, dtype)


@pytest.mark.parametrize("cin,cout,stride,dtype", [(8, 8, 1, torch.float32),
                                                   (8, 16, 2, torch.float32),
                                                   (8, 8, 1, torch.float64)],
                         ids=["identity", "projection", "identity-fp64"])
def test_preact_block(cin, cout, stride, dtype, prologue_calls):
    ref, fused = _pair(lambda: models.PreActBlock(cin, cout, stride), dtype)
    rows = {r["site"]: r for r in explain(fused)}
    assert rows["bn2"]["kernel"] == "bn_relu_prologue"
    if stride == 1:  # bn1-relu-conv1, bn2-relu-conv2: statistics from torch.var_mean
        assert rows["bn1"]["conv"] == rows["bn2"]["conv"] == "triton prologue"
        _check(ref, fused, dtype, last_eval="triton-prologue")
        # 2 training steps, then eval with and without autograd: running statistics
        assert prologue_calls == [(True, False)] * 4 + [(False, False)] * 4
    else:  # bn1's output also feeds the shortcut conv: stored; conv1's epilogue feeds bn2
        assert rows["bn1"]["kernel"] == "batch_norm_relu"
        assert "feeds 2 convs (shortcut.0, conv1)" in rows["bn1"]["reason"]
        assert rows["bn2"]["conv"] == "triton stats+prologue"
        _check(ref, fused, dtype, last_eval="folded")  # no autograd: conv1+bn2 fold
        assert prologue_calls == [(True, True)] * 2 + [(False, False)]


class Chain(nn.Module):
    """conv -> BN -> ReLU -> conv, the second conv strided, padded, optionally biased."""

    def __init__(self, momentum=0.1, bias=False):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8, momentum=momentum)
        self.conv2 = nn.Conv2d(8, 16, 3, 2, 1, bias=bias)

    def forward(self, x):
        return self.conv2(F.relu(self.bn1(self.conv1(x))))


@pytest.mark.parametrize("momentum,bias,dtype", [(None, True, torch.float32),
                                                 (0.1, False, torch.float64)],
                         ids=["cumulative-bias", "momentum-fp64"])
def test_conv_bn_relu_conv_chain(momentum, bias, dtype, prologue_calls, monkeypatch):
    stats = []
    run = fusedres.conv.conv2d_stats
    monkeypatch.setattr(fusedres.conv, "conv2d_stats",
                        lambda *a, **k: stats.append(1) or run(*a, **k))
    ref, fused = _pair(lambda: Chain(momentum, bias), dtype)
    assert _kernels(fused) == [("bn1", "bn_relu_prologue", "triton stats+prologue")]
    _check(ref, fused, dtype, last_eval="folded")  # eval without autograd: conv1+bn1 folded
    assert fused.bn1.num_batches_tracked.item() == 2
    # training: conv1's statistics epilogue, then conv2's prologue; eval with autograd: the
    # running statistics in conv2's prologue
    assert prologue_calls == [(True, True)] * 2 + [(False, False)]
    assert len(stats) == 2


def test_cifar_block(prologue_calls):
    """conv1-bn1-relu-conv2, then the BN-add-ReLU tail on conv2's output."""
    ref, fused = _pair(lambda: models.CifarBlock(8, 8), torch.float32)
    assert _kernels(fused) == [("bn1", "bn_relu_prologue", "triton stats+prologue"),
                               ("bn2", "batch_norm_add_relu", "")]
    _check(ref, fused, torch.float32, last="triton")
    assert prologue_calls == [(True, True)] * 2 + [(False, False)]


class DenseNetLike(nn.Module):
    """torchvision's dense block (norm-relu-conv1x1-norm-relu-conv3x3 layers, concatenated)
    and transition (norm-relu-conv1x1-pool, an nn.Sequential traced through)."""

    def __init__(self):
        super().__init__()
        self.block = _DenseBlock(2, 8, bn_size=2, growth_rate=4, drop_rate=0)
        self.transition = _Transition(16, 8)

    def forward(self, x):
        return self.transition(self.block(x))


def test_densenet_layers(prologue_calls):
    ref, fused = _pair(DenseNetLike, torch.float32)
    rows = explain(fused)
    assert [r["site"] for r in rows if r["kernel"] == "bn_relu_prologue"] == [
        "transition.norm", "block.denselayer1.norm1", "block.denselayer1.norm2",
        "block.denselayer2.norm1", "block.denselayer2.norm2"]
    assert len(rows) == 5
    _check(ref, fused, torch.float32, last_eval="triton-prologue")
    assert prologue_calls.count((True, False)) == 10 and len(prologue_calls) == 20


class PreLayer(nn.Module):
    def __init__(self, **bn):
        super().__init__()
        self.bn = nn.BatchNorm2d(8, **bn)
        self.conv = nn.Conv2d(8, 8, 3, 1, 1, bias=False)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(x)))


@pytest.mark.parametrize("bn", [dict(affine=False, momentum=None),
                                dict(track_running_stats=False, eps=1e-3)],
                         ids=["no-affine", "no-running-stats"])
def test_bn_options(bn, prologue_calls):
    ref, fused = _pair(lambda: PreLayer(**bn), torch.float32)
    assert _kernels(fused) == [("bn", "bn_relu_prologue", "triton prologue")]
    _check(ref, fused, torch.float32, last_eval="triton-prologue")
    assert prologue_calls == [(True, False)] * 2 + [(False, False)] * 2


class Unsupported(nn.Module):
    """BN-ReLU -> conv sites the Triton conv does not take."""

    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, 1, 1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.dilated = nn.Conv2d(8, 8, 3, 1, 2, dilation=2, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.reflect = nn.Conv2d(8, 8, 3, 1, 1, padding_mode="reflect")

    def forward(self, x):
        x = self.grouped(F.relu(self.bn1(x)))
        x = self.dilated(F.relu(self.bn2(x)))
        return self.reflect(F.relu(self.bn3(x)))


def test_unsupported_convs_stay_on_the_old_path(prologue_calls):
    ref, fused = _pair(Unsupported, torch.float32)
    rows = explain(fused)
    assert [(r["kernel"], r["conv"]) for r in rows] == [("batch_norm_relu", "conv2d")] * 3
    for row, why in zip(rows, ["groups=2", "dilation=", "padding_mode='reflect'"]):
        assert "BN-ReLU runs before conv" in row["reason"] and why in row["reason"], row
    _check(ref, fused, torch.float32, last="triton")  # the BN-ReLU kernel, not a fallback
    assert prologue_calls == []


def test_prologue_switch(prologue_calls, monkeypatch):
    monkeypatch.setattr(fnn, "conv_prologue", False)
    ref, fused = _pair(lambda: models.PreActBlock(8, 8, 1), torch.float32)
    rows = explain(fused)
    assert {r["kernel"] for r in rows} == {"batch_norm_relu"}
    assert all("conv_prologue is False" in r["reason"] for r in rows)
    _step(ref.train(), fused.train(), torch.randn(2, 8, 8, 8, device=DEVICE), torch.float32,
          last="triton")
    assert prologue_calls == []


def _saved_activations(model, x):
    """How many distinct activation-sized storages autograd keeps for backward."""
    storages = set()

    def pack(t):
        if t.untyped_storage().nbytes() >= x.numel() * x.element_size():
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return len(storages)


def test_nothing_stored_and_memory_saving_needs_no_checkpoint(monkeypatch):
    torch.manual_seed(0)
    ref = models.PreActBlock(8, 8, 1).to(DEVICE)
    saving = convert(ref, backend="triton", memory_saving=True)
    assert all("prologue" in r["pattern"] and "recomputed" not in r["pattern"]
               for r in explain(saving))
    monkeypatch.setattr(fnn, "_bn_relu_conv_recomputed", None)  # must not be called
    x = torch.randn(2, 8, 8, 8, device=DEVICE, requires_grad=True)
    fused_saved = _saved_activations(saving, x)
    monkeypatch.setattr(fnn, "conv_prologue", False)
    plain_saved = _saved_activations(convert(ref, backend="triton"), x)
    # kept: the block input and conv1's output (each read by the BN statistics and by the
    # next conv); without the prologue, the two BN-ReLU outputs too
    assert fused_saved == 2 and plain_saved == 4


class ConvBNReLU(nn.Module):
    """A block with its own forward (not an nn.Sequential): traced on its own."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Stages(nn.Module):
    """Block boundaries: nn.Sequential stages (traced through: the BN-ReLU ending one stage
    is a prologue of the next stage's first conv) and blocks with their own forward
    (converted one at a time: left, and explain says so)."""

    def __init__(self):
        super().__init__()
        stage = lambda: nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, bias=False),  # noqa: E731
                                      nn.BatchNorm2d(8), nn.ReLU())
        self.stages = nn.Sequential(stage(), stage())
        self.blocks = nn.Sequential(ConvBNReLU(8, 8), ConvBNReLU(8, 8))

    def forward(self, x):
        return self.blocks(self.stages(x))


def test_block_boundaries(prologue_calls):
    ref, fused = _pair(Stages, torch.float32)
    rows = {r["site"]: r for r in explain(fused)}
    assert rows["stages.0.1"]["kernel"] == "bn_relu_prologue"
    assert rows["stages.0.1"]["modules"] == "stages.0.0, stages.0.1, stages.0.2, stages.1.0"
    # the last stage's BN-ReLU feeds a block: not a conv of this graph
    assert rows["stages.1.1"]["kernel"] == "batch_norm_relu"
    assert "feeds block blocks.0, converted on its own" in rows["stages.1.1"]["reason"]
    for site in ("blocks.0.bn", "blocks.1.bn"):
        assert rows[site]["kernel"] == "batch_norm_relu"
    assert "its output leaves the block" in rows["blocks.0.bn"]["reason"]
    _check(ref, fused, torch.float32, last="triton")
    assert prologue_calls == [(True, True)] * 2 + [(False, False)]


def test_autocast_fp16():
    """Under autocast the BN reads the fp16 conv output with fp32 parameters; the conv casts
    its weight and bias. An input not in the autocast dtype goes to the old path."""
    torch.manual_seed(0)
    ref = _randomize(PreLayer()).to(DEVICE)
    ref.conv.bias = nn.Parameter(torch.randn(8, device=DEVICE))
    bn, conv = copy.deepcopy([ref.bn, ref.conv])
    y = torch.randn(2, 8, 8, 8, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.float16):
        assert "autocast" in fnn.prologue_problem(bn, conv, y, "triton")
        y = y.half().requires_grad_()
        y2 = y.detach().clone().requires_grad_()
        want = ref(y)
        assert fnn.prologue_problem(bn, conv, y2, "triton") is None
        got = fnn.bn_relu_conv2d(bn, conv, y2, backend="triton")
    assert fnn.last_backend() == "triton-prologue" and got.dtype == want.dtype
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    for w, f, what in [(want, got, "output"), (y.grad, y2.grad, "input grad"),
                       (ref.bn.weight.grad, bn.weight.grad, "BN weight grad"),
                       (ref.conv.weight.grad, conv.weight.grad, "conv weight grad"),
                       (ref.conv.bias.grad, conv.bias.grad, "conv bias grad"),
                       (ref.bn.running_var, bn.running_var, "running var")]:
        atol = 1e-2 * max(float(w.detach().abs().max()), 1.0)
        torch.testing.assert_close(f.float(), w.float(), rtol=1e-2, atol=atol,
                                   msg=lambda m: f"{what}: {m}")

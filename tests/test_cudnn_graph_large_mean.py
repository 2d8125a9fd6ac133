"""The cudnn-graph BN-ReLU -> conv site at a large mean/std of its input: output and every
gradient against float64, eager torch as the yardstick (tests/test_large_mean.py's judge).

The site's unfused forms -- ``cudnn_graph.fused_backward = False`` (autograd through the
prologue's scale/shift, ATen's dgrad/wgrad) and a site whose F1 graph failed to execute
(the F.conv2d composite) -- took the BN as ``y*scale + shift``, ``shift = beta -
mean*scale``: the prologue's backward returned ``sum(g*y)`` and autograd subtracted
``mean*sum(g)``, which cancels in fp32 (mean/std 100: dgamma 8.6x torch's error, dy
2.4x). Centred on the BN mean, as the Triton prologue is, the backward sums
``g*(y - mean)``. On CPU the reference graphs stand in for cuDNN (in fp32 too: the real
graphs take 16-bit only); the GPU test runs cuDNN's.
"""
import os
import sys

import pytest
import torch
from torch import nn

import fusedres.nn as fnn
from fusedres import cudnn_graph
from fusedres import reference as R

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_cudnn_graph as TG  # noqa: E402  (cuDNN faked by the reference graphs)
import test_large_mean as TL  # noqa: E402  (the cases and the judge)

MODES = ("fused", "unfused", "f1-failed")


def site_grads(y, w, gamma, beta, dz):
    """Output and gradients of ``fusedres.nn.bn_relu_conv2d`` on the cudnn-graph path
    (batch statistics, 3x3 conv, padding 1)."""
    y, w, gamma, beta = [t.detach().requires_grad_() for t in (y, w, gamma, beta)]
    bn = nn.BatchNorm2d(y.shape[1], track_running_stats=False).to(y.device)
    conv = nn.Conv2d(y.shape[1], w.shape[0], 3, padding=1, bias=False).to(y.device, w.dtype)
    bn.weight, bn.bias, conv.weight = (nn.Parameter(t) for t in (gamma, beta, w))
    out = fnn.bn_relu_conv2d(bn, conv, y, conv_backend="cudnn-graph")
    assert fnn.last_backend() == "cudnn-graph-prologue", fnn.last_backend()
    out.backward(dz.to(out.dtype))
    return {"out": out.detach(), "dy": y.grad, "dw": conv.weight.grad,
            "dgamma": bn.weight.grad, "dbeta": bn.bias.grad}


def judged(case, mode_setup, label):
    y, w, gamma, beta, dz = case
    truth = TL.prologue_grads(y.double(), w.double(), gamma.double(), beta.double(), dz,
                              "eager")
    eager = [TL.prologue_grads(y.contiguous(memory_format=fmt), w, gamma, beta, dz, "eager")
             for fmt in (torch.contiguous_format, torch.channels_last)]
    mode_setup()
    TL.judge(site_grads(y, w, gamma, beta, dz), eager, truth, label)


@pytest.mark.parametrize("mode", MODES)
def test_site_fp32_large_mean(monkeypatch, mode):
    """fp32, y's mean/std 100, cuDNN faked by the reference graphs: the site op with its
    fused backward ("fused"), today's backward through scale/shift ("unfused"), and the
    composite after F1 failed to execute ("f1-failed"): within 3x torch's error."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    case = [t.cpu() for t in TL.prologue_case(torch.float32, 100.0, 1.0)]

    def setup():
        TG._fake_cudnn(monkeypatch)
        if mode == "unfused":
            monkeypatch.setattr(cudnn_graph, "fused_backward", False)
        elif mode == "f1-failed":
            def failed(*args):
                raise RuntimeError("cudnn_graph_conv_stats: execute failed: faked")
            monkeypatch.setattr(cudnn_graph, "_run_graph", failed)

    judged(case, setup, f"cudnn-graph site fp32 {mode}")


@TG._ON_GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("fused_backward", [True, False], ids=["fused", "unfused"])
def test_gpu_site_large_mean(monkeypatch, dtype, fused_backward):
    """cuDNN's graphs (the only dtypes they take: 16-bit), y's mean/std 100, 64 channels
    (so the planner takes the site): within 3x torch's error, either backward."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(cudnn_graph, "fused_backward", fused_backward)
    g = torch.Generator().manual_seed(3)
    n, c, hw, mean = 8, 64, 14, 100.0
    y = (torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64) + mean
         + torch.rand(1, c, 1, 1, generator=g, dtype=torch.float64) - 0.5)
    w = torch.randn(c, c, 3, 3, generator=g, dtype=torch.float64) * (9 * c) ** -0.5
    gamma = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    beta = (torch.rand(c, generator=g, dtype=torch.float64) - 0.5) * 0.4
    dz = torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64)
    cl = torch.channels_last
    y16 = y.to("cuda", dtype).contiguous(memory_format=cl)
    w16 = w.to("cuda", dtype).contiguous(memory_format=cl)
    status = cudnn_graph.plan_status(y16, w16, True, 1, 1)
    if status:
        pytest.skip(f"cuDNN refused the F1 graph here: {status}")
    case = (y16, w16, gamma.float().cuda(), beta.float().cuda(), dz.cuda())
    judged(case, lambda: None, f"cudnn-graph site {dtype} fused_backward={fused_backward}")


def _centred_inputs(seed=7):
    """float64 inputs of fusedres::cudnn_graph_centred_conv_stats, x around 3 (channels_last)
    and the centre near x's mean, all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    d, cl = torch.float64, torch.channels_last
    x = (torch.randn(2, 8, 7, 7, generator=g, dtype=d) + 3).contiguous(memory_format=cl)
    w = torch.randn(8, 8, 3, 3, generator=g, dtype=d).contiguous(memory_format=cl)
    scale = torch.rand(8, generator=g, dtype=d) + 0.5
    shift = torch.randn(8, generator=g, dtype=d) * 0.5
    centre = x.mean((0, 2, 3)) + torch.randn(8, generator=g, dtype=d) * 0.1
    return [t.requires_grad_() for t in (x, w, scale, shift, centre)]


def _reference_f1(x, w, scale, shift, stride, padding):
    """cudnn_graph._run_graph's stand-in (F1 only)."""
    return R.graph_f1(x, scale, shift, w, stride, padding)


def test_centred_op_against_autograd(monkeypatch):
    """The centred F1 op's output, sums and gradients (x, w, scale, shift, centre; a loss
    through y and both sums) against autograd of the float64 composite
    relu((x - centre)*scale + shift) -> conv (the reference graph runs the op's forward)."""
    monkeypatch.setattr(cudnn_graph, "_run_graph", _reference_f1)
    ins = _centred_inputs()
    dy = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(8),
                     dtype=torch.float64)

    def loss(y, s1, s2):
        return (y * dy).sum() + 0.3 * s1.sum() + 0.01 * s2.sum()

    got = cudnn_graph.centred_conv_stats(*ins, [2, 2], [1, 1])
    x, w, scale, shift, centre = ins
    want = R.graph_f1(x, scale, shift, w, 2, 1, centre)
    for a, b, name in zip(got, want, ("y", "sum", "sum_sq")):
        TG._close(a, b, name)
    for a, b, name in zip(torch.autograd.grad(loss(*got), ins),
                          torch.autograd.grad(loss(*want), ins),
                          ("x", "w", "scale", "shift", "centre")):
        TG._close(a, b, f"grad {name}")


def test_centred_op_opcheck(monkeypatch):
    """opcheck of fusedres::cudnn_graph_centred_conv_stats on CPU (schema, fake kernel,
    autograd registration, AOT dispatch), the reference graph standing in for cuDNN."""
    monkeypatch.setattr(cudnn_graph, "_run_graph", _reference_f1)
    torch.library.opcheck(torch.ops.fusedres.cudnn_graph_centred_conv_stats.default,
                          (*_centred_inputs(), [1, 1], [1, 1]))

"""The stem on the cudnn-graph path (CPU): the planner pads an F0 conv's input channels
(3 -> 8) with zeros instead of refusing it, and the padding changes nothing a user sees --
outputs, statistics and every gradient equal the unpadded conv's in float64 (the
reference graph standing in for cuDNN), gradients keep their shapes, the state_dict is
untouched. cuDNN's acceptance of the padded stem is a GPU question (doctor, gpu_cudnn_sites)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedres
from fusedres import cudnn_graph
from fusedres import nn as fnn
from test_cudnn_graph import (  # the reference graphs, the path's backward
    _ReferenceGraph, _reference_dgrad_drelu_dbn, _reference_wgrad)

H100 = cudnn_graph.Capabilities(True, 92400, (9, 0))


@pytest.mark.parametrize("cin, prologue, want", [
    (3, False, 5), (4, False, 4), (8, False, 0), (9, False, 7), (64, False, 0),
    (3, True, 0), (64, True, 0)])
def test_padding_choice(cin, prologue, want):
    assert cudnn_graph.input_channel_padding(cin, prologue) == want


def test_planner_pads_the_stem_instead_of_refusing():
    args = dict(weight_dtype=torch.bfloat16, has_bias=False, input_shape=(32, 3, 224, 224),
                weight_shape=(64, 3, 7, 7))
    assert cudnn_graph.plan(H100, torch.bfloat16, **args) is None
    assert "multiples of 8" in cudnn_graph.plan(H100, torch.bfloat16, prologue=True, **args)
    # the output channels are never padded
    assert "multiples of 8" in cudnn_graph.plan(
        H100, torch.bfloat16, **dict(args, weight_shape=(12, 3, 7, 7)))


def test_pad_input_channels_layout_and_values():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 3, 3, 3, dtype=torch.float64)
    xp, wp = cudnn_graph.pad_input_channels(x, w, 5)
    assert xp.shape == (2, 8, 5, 5) and wp.shape == (16, 8, 3, 3)
    for t in (xp, wp):
        assert t.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(xp[:, :3], x) and not xp[:, 3:].any()
    assert torch.equal(wp[:, :3], w) and not wp[:, 3:].any()
    assert cudnn_graph.pad_input_channels(x, w, 0) == (x, w)


@pytest.fixture
def graph_inputs(monkeypatch):
    """cuDNN faked by the reference graphs; the input channels each graph got recorded."""
    seen = []

    def run(x, w, scale, shift, stride, padding):
        seen.append((x.shape[1], tuple(w.shape)))
        return _ReferenceGraph.apply(x, w, scale, shift, stride, padding)

    monkeypatch.setattr(cudnn_graph, "_run_graph", run)
    return seen


def test_padded_stem_gradients_match_the_unpadded_conv(graph_inputs):
    """conv_stats on a 3-channel input: the graph runs 8 channels; y, mean, var and the
    input and weight gradients equal F.conv2d's in float64, in the original shapes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=g).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(16, 3, 7, 7, dtype=torch.float64, generator=g)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    y, mean, var = cudnn_graph.conv_stats(xa, wa, 2, 3)
    assert graph_inputs == [(8, (16, 8, 7, 7))]
    y_ref = F.conv2d(xb, wb, None, 2, 3)
    var_ref, mean_ref = torch.var_mean(y_ref, dim=(0, 2, 3), correction=0)
    for a, b in ((y, y_ref), (mean, mean_ref), (var, var_ref)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    loss = lambda y, m, v: (y * dy).sum() + (m * m).sum() + (v * 3).sum()  # noqa: E731
    loss(y, mean, var).backward()
    loss(y_ref, mean_ref, var_ref).backward()
    assert xa.grad.shape == x.shape and wa.grad.shape == w.shape
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-10, atol=1e-10)


class Stem(nn.Module):
    """A stem whose BN-ReLU feeds a conv: conv(3->8) -> BN -> ReLU -> conv -> BN -> ReLU."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def test_stem_site_takes_the_padded_graph(graph_inputs, monkeypatch):
    """A converted stem on the graph path: its conv runs F0 padded to 8 channels, the
    training step equals the unconverted model's in float64 (output, every gradient,
    running statistics) and the state_dict keeps the 3-channel weight."""
    monkeypatch.setattr(cudnn_graph, "problem", lambda *a, **k: None)
    monkeypatch.setattr(cudnn_graph, "plan_status", lambda *a, **k: "")
    monkeypatch.setattr(cudnn_graph, "_run_dgrad_drelu_dbn", _reference_dgrad_drelu_dbn)
    monkeypatch.setattr(cudnn_graph, "_run_wgrad", _reference_wgrad)
    torch.manual_seed(0)
    ref = Stem().double()
    fused = fusedres.convert(ref, backend="reference")
    for m in fused.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.fusedres_plan = fnn.SitePlan(conv="cudnn-graph")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_f = ref(xr), fused(xf)
    assert graph_inputs[0] == (8, (8, 8, 3, 3)), graph_inputs  # conv1: F0, padded
    torch.testing.assert_close(out_f, out_r, rtol=1e-9, atol=1e-9)
    dout = torch.randn_like(out_r)
    out_r.backward(dout)
    out_f.backward(dout)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-9, atol=1e-9)
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert q.grad.shape == p.shape, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-9, msg=name)
    state = fused.state_dict()
    assert state["conv1.weight"].shape == (8, 3, 3, 3)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(state[k].double(), v.double(), rtol=1e-9, atol=1e-9,
                                   msg=k)

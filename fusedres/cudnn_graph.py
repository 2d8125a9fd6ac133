"""The ``cudnn-graph`` conv path: cuDNN's fused convolution graphs (csrc/cuda/cudnn_graph.cpp).

Graph kinds (the references are ``fusedres.reference.graph_f0`` / ``graph_f1``):

    F0   conv_fprop -> genstats: ``y = conv(x)`` and per-channel ``sum(y)``, ``sum(y*y)``
    F1   relu(x*scale + shift) -> conv_fprop -> genstats: the previous BN-ReLU applied
         while the conv loads its input (never stored; padded taps 0 after it)

From the sums, ``mean = sum/M`` and the biased ``var = sum_sq/M - mean**2`` (fp32; see
docs/cudnn_graph.md for the cancellation this allows). The forward is cuDNN's; the
backward is ATen's cuDNN dgrad/wgrad (``aten.convolution_backward``) with the BN-ReLU
prologue recomputed and its gradient (dReLU, dscale, dshift) as torch ops; the statistics'
gradients enter as ``dy + dsum + 2*y*dsum_sq``.

Where a graph runs is decided per call in two steps, and anything refused falls back to
today's path (F.conv2d and the fused BN kernels), never to an exception:

1. ``problem(...)``: rules known without cuDNN -- the extension was built with the path
   (cudnn-frontend headers at build time), CUDA tensors, float16/bfloat16, compute
   capability >= 8.0, in and out channels multiples of 8 (16-byte aligned rows for the
   runtime-fusion engines; an F0 conv's input channels, the stem's 3, are padded with
   zeros to 8: ``input_channel_padding``), groups 1, dilation 1, zero padding, no conv bias,
   channels_last input and weight, 16-byte aligned (per call, not remembered);
2. ``fusedres::cudnn_graph_plan``: cuDNN builds the graph's plan once per (device, dtype,
   shapes, strides, graph kind), ``check_support`` included; a refusal is remembered
   (``statuses()``) and reported by ``explain`` and ``fusedres-bench doctor``.

Plans are built on first use: run one eager step before CUDA-graph capture or
``torch.compile`` (under tracing an unplanned graph falls back, it is not planned there).
"""
from __future__ import annotations

import threading
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _backend  # noqa: F401  (loads fusedres._C, which defines the graph ops if built)
from . import conv as fconv
from . import conv_paths
from .reference import acc_dtype, bn_relu_prologue

__all__ = ["built", "Capabilities", "capabilities", "problem", "plan", "plan_status", "statuses",
           "conv_stats", "CudnnGraphConv"]

_OP = "cudnn_graph_conv_stats"
_DTYPES = (torch.float16, torch.bfloat16)


def built() -> bool:
    """Was fusedres._C built with the cuDNN graph path (and loaded)?"""
    try:
        torch._C._dispatch_find_schema_or_throw(f"fusedres::{_OP}", "")
        return True
    except RuntimeError:
        return False


class Capabilities(NamedTuple):
    """What the planner needs to know about a device: the extension has the graph path,
    the loaded cuDNN's version (``cudnnGetVersion``), the compute capability."""

    built: bool
    cudnn_version: int
    arch: Tuple[int, int]


_CAPS: Dict[int, Capabilities] = {}


def capabilities(device: torch.device) -> Capabilities:
    """The ``Capabilities`` of a CUDA device (cached; tests replace this function)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    caps = _CAPS.get(index)
    if caps is None:
        has = built()
        version = int(torch.ops.fusedres.cudnn_graph_version()) if has else 0
        caps = _CAPS[index] = Capabilities(has, version,
                                           tuple(torch.cuda.get_device_capability(index)))
    return caps


def problem(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation,
            groups: int, padding_mode: str = "zeros", prologue: bool = False) -> Optional[str]:
    """None when a cuDNN graph may run ``conv(x, weight)`` (cuDNN still has the last word,
    ``plan_status``); else why not (``plan``'s rules on these tensors and the device's
    ``capabilities``): nothing runs on the device."""
    if x.device.type != "cuda":
        return "the cuDNN graphs run on CUDA tensors only"
    cl = torch.channels_last
    # (a FakeTensor under torch.compile has no address: the C++ op checks it at run time)
    aligned = torch.compiler.is_compiling() or (x.data_ptr() % 16 == 0
                                                and weight.data_ptr() % 16 == 0)
    return plan(capabilities(x.device), x.dtype, weight.dtype, bias is not None,
                tuple(x.shape), tuple(weight.shape), groups, fconv._pair(dilation),
                padding, padding_mode,
                x.is_contiguous(memory_format=cl) and weight.is_contiguous(memory_format=cl),
                aligned, prologue)


def plan(caps: Capabilities, dtype: torch.dtype, weight_dtype: torch.dtype, has_bias: bool,
         input_shape: tuple, weight_shape: tuple, groups: int = 1, dilation=(1, 1),
         padding=0, padding_mode: str = "zeros", channels_last: bool = True,
         aligned: bool = True, prologue: bool = False) -> Optional[str]:
    """The planner's rules for one conv (F1 with ``prologue``, else F0) on a CUDA device
    with ``caps``: None (ask cuDNN) or why no graph is planned. Stride and kernel size are
    not rules here: cuDNN's ``check_support`` decides them per shape (and is remembered,
    ``plan_status``). An F0 conv whose input channels are not a multiple of 8 (the stem)
    is planned with them padded (``input_channel_padding``)."""
    if not caps.built:
        return ("fusedres._C was built without the cuDNN graph path (no cudnn-frontend "
                "headers at build time, see docs/cudnn_graph.md)")
    if caps.arch < (8, 0):
        return (f"compute capability {caps.arch[0]}.{caps.arch[1]} < 8.0 (no conv+genstats "
                "engines)")
    if dtype not in _DTYPES:
        return f"{dtype} input: the graphs take float16 or bfloat16 (autocast)"
    if weight_dtype != dtype:
        return "weight dtype differs from the input's"
    if has_bias:
        return "a conv bias (the graphs are bias-free conv + statistics)"
    if groups != 1 or isinstance(padding, str) or list(dilation) != [1, 1] \
            or padding_mode != "zeros":
        return "groups, dilation, string padding or a padding mode the graphs do not cover"
    if len(input_shape) != 4 or len(weight_shape) != 4 or weight_shape[1] != input_shape[1]:
        return "not a plain 4-D convolution"
    if (input_shape[1] + input_channel_padding(input_shape[1], prologue)) % 8 \
            or weight_shape[0] % 8:
        return (f"channels {input_shape[1]} -> {weight_shape[0]}: cuDNN's runtime fusion "
                "needs multiples of 8 (16-byte aligned fp16/bf16 rows; only an F0 conv's "
                "input channels are padded)")
    if not channels_last:
        return "input or weight not channels_last (the graphs are NHWC)"
    if not aligned:  # not a property of the graph: checked per call, never remembered
        return "input or weight not 16-byte aligned (a view with an offset)"
    return None


# The stem: cuDNN's runtime fusion refuses input channels that are not a multiple of 8. An
# F0 conv runs with zero input channels appended to its input and its weight (zero taps:
# the same convolution), as MLPerf pads the stem's 3 channels. The padded tensors are made
# per call, never stored in the module (the state_dict is unchanged), and autograd slices
# the input and weight gradients back to their shapes. F1 is not padded (its prologue's
# scale and shift have the input's channels, and its input is a BN output with C % 8 == 0
# in the networks this is for).
CHANNEL_ALIGN = 8


def input_channel_padding(in_channels: int, prologue: bool) -> int:
    """How many zero input channels the planner adds to a conv's graph: up to the next
    multiple of ``CHANNEL_ALIGN`` for F0 (the stem: 3 -> 8), 0 for F1 or aligned inputs."""
    if prologue or in_channels % CHANNEL_ALIGN == 0:
        return 0
    return -in_channels % CHANNEL_ALIGN


def pad_input_channels(x: Tensor, weight: Tensor, pad: int) -> Tuple[Tensor, Tensor]:
    """``(x, weight)`` with ``pad`` zero input channels appended, channels_last (fresh,
    16-byte aligned); differentiable: the gradients reaching the originals are the padded
    ones' first ``C`` channels."""
    if not pad:
        return x, weight
    cl = torch.channels_last

    def padded(t):
        zeros = t.new_zeros((t.shape[0], pad, *t.shape[2:])).contiguous(memory_format=cl)
        return torch.cat([t, zeros], dim=1).contiguous(memory_format=cl)

    return padded(x), padded(weight)


# Per graph (kind, device, dtype, shapes, strides): "" (runs) or why cuDNN refused it. A
# refused graph is asked once; the C++ side caches the plans themselves.
_STATUS: Dict[tuple, str] = {}
_LOCK = threading.Lock()


def _key(x, weight, prologue, stride, padding):
    return ("F1" if prologue else "F0", str(x.device), x.dtype, tuple(x.shape), x.stride(),
            tuple(weight.shape), weight.stride(), tuple(stride), tuple(padding))


def plan_status(x: Tensor, weight: Tensor, prologue: bool, stride, padding) -> str:
    """``""`` when cuDNN runs this graph, else why not (cuDNN's message). Plans it on the
    first call (outside torch.compile tracing: there an unplanned graph is refused)."""
    stride, padding = fconv._pair(stride), fconv._pair(padding)
    key = _key(x, weight, prologue, stride, padding)
    status = _STATUS.get(key)
    if status is None:
        if torch.compiler.is_compiling():
            return "not planned before torch.compile tracing (run one eager step first)"
        xp, wp = pad_input_channels(x, weight, input_channel_padding(x.shape[1], prologue))
        status = str(torch.ops.fusedres.cudnn_graph_plan(xp, wp, prologue, stride, padding))
        with _LOCK:
            _STATUS[key] = status
    return status


def _refused(conv, prologue: bool) -> Optional[str]:
    """Why cuDNN refused this conv's graph at some input seen in this process (None if it
    never did): what ``explain``, judging from the modules, reports."""
    kind = "F1" if prologue else "F0"
    shape, st, pd = tuple(conv.weight.shape), fconv._pair(conv.stride), fconv._pair(conv.padding)
    with _LOCK:
        for k, status in _STATUS.items():
            if status and k[0] == kind and k[5] == shape and k[7] == tuple(st) \
                    and k[8] == tuple(pd):
                return f"cuDNN refused the {kind} graph at input {k[3]} {k[2]}: {status}"
    return None


def statuses() -> List[dict]:
    """Every graph planned in this process: kind, device, dtype, input and weight shapes,
    stride, padding and ``status`` ("" when it runs, else cuDNN's reason)."""
    with _LOCK:
        return [dict(kind=k[0], device=k[1], dtype=str(k[2]), input=k[3], weight=k[5],
                     stride=k[7], padding=k[8], status=v) for k, v in _STATUS.items()]


# --------------------------------------------------------------------------------------
# Autograd and fake kernel of fusedres::cudnn_graph_conv_stats (when built)
# --------------------------------------------------------------------------------------


def _fake(x, weight, scale, shift, stride, padding):
    k = weight.shape[0]
    p, q = fconv._out_hw(x, weight, stride, padding)
    y = fconv._empty_cl(x, x.shape[0], k, p, q)
    return y, x.new_empty(k, dtype=torch.float32), x.new_empty(k, dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, weight, scale, shift, stride, padding = inputs
    ctx.save_for_backward(x, weight, scale, shift, output[0])
    ctx.conv = (list(stride), list(padding))


def _backward(ctx, dy, dsum, dsq):
    x, weight, scale, shift, y = ctx.saved_tensors
    stride, padding = ctx.conv
    need = ctx.needs_input_grad
    acc = acc_dtype(y.dtype)
    g = torch.zeros_like(y, dtype=acc) if dy is None else dy.to(acc)
    if dsum is not None:  # d/dy of sum(y) and sum(y*y) per channel
        g = g + dsum.view(1, -1, 1, 1)
    if dsq is not None:
        g = g + 2 * y.to(acc) * dsq.view(1, -1, 1, 1)
    g = g.to(y.dtype)
    prologue = scale is not None
    conv_in = bn_relu_prologue(x, scale, shift) if prologue else x
    want_in = need[0] or (prologue and (need[2] or need[3]))
    gin, gw, _ = torch.ops.aten.convolution_backward(
        g, conv_in, weight, None, stride, padding, [1, 1], False, [0, 0], 1,
        [want_in, need[1], False])
    gx = gs = gt = None
    if prologue and gin is not None:
        xa = x.to(acc)
        pre = xa * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        gpre = torch.where(pre > 0, gin.to(acc), torch.zeros((), dtype=acc, device=x.device))
        gx = (gpre * scale.view(1, -1, 1, 1)).to(x.dtype) if need[0] else None
        gs = (gpre * xa).sum(dim=(0, 2, 3)) if need[2] else None
        gt = gpre.sum(dim=(0, 2, 3)) if need[3] else None
    elif need[0]:
        gx = gin
    return gx, gw if need[1] else None, gs, gt, None, None


def _register():
    if not built():
        return
    torch.library.register_fake(f"fusedres::{_OP}", _fake)
    torch.library.register_autograd(f"fusedres::{_OP}", _backward, setup_context=_setup)


_register()


def _run_graph(x, weight, scale, shift, stride, padding):
    """``(y, sum, sum_sq)`` from cuDNN (CPU tests put the reference graph here)."""
    return torch.ops.fusedres.cudnn_graph_conv_stats(x, weight, scale, shift, stride, padding)


def conv_stats(x: Tensor, weight: Tensor, stride, padding, scale: Optional[Tensor] = None,
               shift: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)``: F0 (``scale`` None) or F1 on cuDNN, the statistics from the
    graph's sums; all differentiable. The caller checked ``problem`` and ``plan_status``."""
    st, pd = fconv._pair(stride), fconv._pair(padding)
    x, weight = pad_input_channels(x, weight, input_channel_padding(x.shape[1], scale is not None))
    if scale is not None:
        acc = acc_dtype(x.dtype)  # float32 for the graphs (float64 for the CPU tests)
        scale, shift = scale.to(acc).contiguous(), shift.to(acc).contiguous()
    y, s1, s2 = _run_graph(x, weight, scale, shift, st, pd)
    count = y.numel() // y.shape[1]
    mean = s1 / count
    var = torch.clamp(s2 / count - mean * mean, min=0)
    return y, mean.to(acc_dtype(y.dtype)), var.to(acc_dtype(y.dtype))


# --------------------------------------------------------------------------------------
# The conv path
# --------------------------------------------------------------------------------------


class CudnnGraphConv(conv_paths.ConvPath):
    """``SitePlan(conv="cudnn-graph")``: F0 for a conv whose BN feeds a BN-ReLU -> conv
    site (the statistics from the conv's epilogue), F1 for that site's conv (the BN-ReLU
    in its prologue, its own output's statistics carried to the next such site)."""

    name = "cudnn-graph"
    prologue_name = "cudnn-graph-prologue"
    kernel_name = "cudnn-graph"

    def _problem(self, conv, x, prologue):
        weight = conv.weight
        if x is None:  # judged from the module: an input of its weight's device and dtype
            x = weight.new_empty((1, conv.in_channels, 1, 1)).contiguous(
                memory_format=torch.channels_last)
            return problem(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                           conv.groups, conv.padding_mode, prologue) or _refused(conv, prologue)
        cast, weight, bias = fconv.autocast_inputs(x, weight, conv.bias)
        if prologue and cast is not x:  # as the Triton prologue: BN-ReLU in x's own dtype
            return "under autocast, an input not in the autocast dtype goes to F.conv2d"
        x = cast
        why = problem(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                      conv.padding_mode, prologue)
        if why is None:
            status = plan_status(x, weight, prologue, conv.stride, conv.padding)
            why = f"cuDNN refused the {'F1' if prologue else 'F0'} graph: {status}" \
                if status else None
        return why

    def prologue_problem(self, conv, input=None):
        return self._problem(conv, input, True)

    def stats_problem(self, conv, x):
        return self._problem(conv, x, False)

    def conv_stats(self, conv, x):
        x, weight, _ = fconv.autocast_inputs(x, conv.weight, None)
        return conv_stats(x, weight, conv.stride, conv.padding)

    def prologue_conv(self, conv, y, scale, shift):
        y, weight, _ = fconv.autocast_inputs(y, conv.weight, None)
        out, mean, var = conv_stats(y, weight, conv.stride, conv.padding, scale, shift)
        return out, (mean, var)


conv_paths.register(CudnnGraphConv())

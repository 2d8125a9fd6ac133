"""The ``cudnn-eval`` conv path: an eval-mode folded conv with its bias, residual and ReLU
in ONE cuDNN call.

In eval mode without autograd a site's conv and BN fold into one conv with weight ``w'``
and bias ``b'`` (``fusedres.nn.folded_weights``). Today the rest of the site then runs as
separate passes on the conv's output (bias inside ``F.conv2d``, then the residual add and
the ReLU in place). On this path ATen's fused cuDNN ops run it in one call:

    relu(conv(x, w') + b' + residual)   torch.cudnn_convolution_add_relu(x, w', residual,
                                                                         1.0, b', ...)
    relu(conv(x, w') + b')              torch.cudnn_convolution_relu(x, w', b', ...)

(ATen ``ConvShared.cpp``: input and weight are made contiguous in the memory format
cuDNN suggests -- channels_last when either is --, the residual is converted to it, the
output is allocated in it; ``Conv_v8.cpp`` builds a conv -> add -> add bias -> ReLU graph
with fp32 compute, each tensor in its own dtype. Forward only: no autograd formula.)

Where it runs (``plan``, rules known without cuDNN; anything else is today's eval path):
a ReLU after the conv (the ops always apply one), CUDA tensors with cuDNN available and
enabled, float16/bfloat16/float32 input (under autocast: the autocast dtype, weight and
bias cast to it as ``F.conv2d`` would), weight, bias and residual in the input's dtype,
the residual of the output's shape, a channels_last input (the folded weight is made
channels_last here, once per folded weight; an NCHW input would make ATen copy it on every
call), groups 1, zero
padding given as numbers, autograd off and no ``torch.jit`` trace (the trace stays plain
aten, as the CPU oneDNN path). cuDNN has the last word: a call that raises is remembered
per (device, dtype, shapes, strides, geometry, residual or not) (``statuses()``), that
conv runs today's path from then on, and ``explain`` says why; the user never sees the
exception. During CUDA-graph capture only a call that already ran eagerly is made.

Nothing here is chosen blind: ``auto`` never takes this path. ``fusedres.tune`` offers it
(candidate ``cudnn-eval``, eval-mode tuning on CUDA) under its correctness gate and its
timer; ``fusedres-bench doctor`` checks it against float64 on a GPU.
"""
from __future__ import annotations

import threading
from typing import Dict, List, NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import _remembered
from .kernels import capturing, tracing_or_capturing
from . import conv as fconv
from . import conv_paths

__all__ = ["Capabilities", "capabilities", "plan", "problem", "run", "statuses",
           "CudnnEvalConv"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DEVICES = ("cuda",)  # where ATen has the fused ops (CPU tests add "cpu" with a fake op)


class Capabilities(NamedTuple):
    """What the rules need to know about the device: cuDNN available and enabled
    (``torch.backends.cudnn``) and its version (0 when absent)."""

    cudnn: bool
    version: int


def capabilities(device: torch.device) -> Capabilities:
    """The ``Capabilities`` for a CUDA device (not cached: ``cudnn.enabled`` may be
    switched at run time; tests replace this function)."""
    available = torch.backends.cudnn.is_available()
    return Capabilities(available and torch.backends.cudnn.enabled,
                        int(torch.backends.cudnn.version() or 0) if available else 0)


def plan(caps: Capabilities, dtype: torch.dtype, weight_dtype: torch.dtype,
         bias_dtype: Optional[torch.dtype], residual_dtype: Optional[torch.dtype],
         relu: bool, residual_shape_ok: bool = True, groups: int = 1, padding=0,
         padding_mode: str = "zeros", channels_last: bool = True) -> Optional[str]:
    """The rules for one folded conv on a CUDA device with ``caps``: None (cuDNN decides
    at the first call) or why the fused call is not made."""
    if not relu:
        return "no ReLU after the conv: the fused cuDNN calls always apply one"
    if not caps.cudnn:
        return "cuDNN is not available or torch.backends.cudnn.enabled is False"
    if dtype not in _DTYPES:
        return f"{dtype} input: the fused cuDNN call takes float16, bfloat16 or float32"
    if weight_dtype != dtype or bias_dtype not in (None, dtype):
        return "folded weight or bias dtype differs from the input's"
    if residual_dtype is not None and (residual_dtype != dtype or not residual_shape_ok):
        return "a residual of another dtype or shape than the conv output"
    if groups != 1 or isinstance(padding, str) or padding_mode != "zeros":
        return "groups, string padding or a padding mode the fused call is not used for"
    if not channels_last:
        return "input not channels_last (ATen would copy it to the suggested layout)"
    return None


# Per call signature: "" (it ran) or the error cuDNN/ATen raised (asked once:
# fusedres._remembered).
_STATUS: Dict[tuple, str] = {}
_LOCK = threading.Lock()


def _key(conv, x, residual):
    return (str(x.device), x.dtype, tuple(x.shape), x.stride(), tuple(conv.weight.shape),
            tuple(fconv._pair(conv.stride)), tuple(fconv._pair(conv.padding)),
            tuple(fconv._pair(conv.dilation)), residual is not None)


def problem(conv, x: Optional[Tensor], relu: bool, residual: Optional[Tensor] = None,
            weight: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Optional[str]:
    """None when ``run`` may make the fused call for ``relu(conv(x, weight, bias)
    [+ residual])`` (``weight``/``bias``: the folded ones; None: judged from the module,
    and with ``x`` None from an input of its weight's device and dtype); else why not.
    Nothing runs on the device."""
    weight = conv.weight if weight is None else weight
    if bias is None and x is None:
        bias = conv.bias
    judged = x is None  # from the module (explain): no call, no grad mode to check
    if judged:
        x = weight.new_empty((1, conv.in_channels, 1, 1)).contiguous(
            memory_format=torch.channels_last)
    if x.device.type not in _DEVICES:
        return "the fused cuDNN call runs on CUDA tensors only"
    if not judged and (torch.is_grad_enabled() or torch.jit.is_tracing()):
        return "autograd on or a torch.jit trace (the fused call has no autograd formula)"
    x, weight, bias = fconv.autocast_inputs(x, weight, bias)
    if residual is not None:
        shape_ok = isinstance(conv.padding, str) or \
            tuple(residual.shape) == conv_paths.conv_out_shape(conv, x)
        rdtype = residual.dtype
    else:
        shape_ok, rdtype = True, None
    why = plan(capabilities(x.device), x.dtype, weight.dtype,
               None if bias is None else bias.dtype, rdtype, relu, shape_ok, conv.groups,
               conv.padding, conv.padding_mode,
               x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    if why is None and not judged:
        status = _STATUS.get(_key(conv, x, residual))
        if status:
            return f"cuDNN refused the fused call earlier: {status}"
        if status is None and capturing(x.device):
            return "not run eagerly before this CUDA-graph capture (run one eager step first)"
    return why


def _conv_add_relu(x, w, z, b, stride, padding, dilation, groups):
    """ATen's fused op (CPU tests replace this and ``_conv_relu``)."""
    return torch.cudnn_convolution_add_relu(x, w, z, 1.0, b, stride, padding, dilation, groups)


def _conv_relu(x, w, b, stride, padding, dilation, groups):
    return torch.cudnn_convolution_relu(x, w, b, stride, padding, dilation, groups)


# The folded weight as the fused call takes it (the autocast dtype, channels_last), made
# once per folded weight instead of per call: keyed weakly by the folded tensor, which the
# fold cache (fusedres.nn.folded_weights) replaces when the module's weights change, so
# the entry goes with it. Nothing is stored on the module (state_dict, fx unchanged).
_CALL_WEIGHTS = WeakIdKeyDictionary()


def _call_weight(x: Tensor, folded: Tensor) -> Tensor:
    """``folded`` in the autocast dtype (as F.conv2d casts it) and channels_last (ATen
    would otherwise copy the input to the weight's layout), cached per folded tensor;
    during CUDA-graph capture or torch.compile tracing made, not stored."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.amp.is_autocast_available(dev) \
        and torch.is_autocast_enabled(dev) else folded.dtype
    if folded.dtype == dtype and folded.is_contiguous(memory_format=torch.channels_last):
        return folded  # nothing to convert (never cached: the value would keep its key alive)
    cached = _CALL_WEIGHTS.get(folded)
    if cached is not None and cached.dtype == dtype:
        return cached
    out = folded.to(dtype).contiguous(memory_format=torch.channels_last)
    if not tracing_or_capturing(out.device):
        _CALL_WEIGHTS[folded] = out
    return out


def run(conv, x: Tensor, weight: Tensor, bias: Optional[Tensor],
        residual: Optional[Tensor] = None) -> Optional[Tensor]:
    """``relu(conv(x, weight, bias) [+ residual])`` in one cuDNN call (the caller checked
    ``problem``), or None when the call raised: remembered, the caller runs today's path.
    ``weight``: the folded one (its call form cached: ``_call_weight``)."""
    weight = _call_weight(x, weight)
    x, weight, bias = fconv.autocast_inputs(x, weight, bias)  # (weight: already cast)
    key = _key(conv, x, residual)
    geometry = (list(fconv._pair(conv.stride)), list(fconv._pair(conv.padding)),
                list(fconv._pair(conv.dilation)), conv.groups)
    # an error (no engine for it, a cuDNN status error) is remembered, never the user's
    if residual is None:
        return _remembered.call(_LOCK, _STATUS, key, _conv_relu, x, weight, bias, *geometry,
                                limit=300)
    return _remembered.call(_LOCK, _STATUS, key, _conv_add_relu, x, weight, residual, bias,
                            *geometry, limit=300)


def _refused(conv) -> Optional[str]:
    """Why the fused call failed for this conv at some input seen in this process."""
    shape, stride = tuple(conv.weight.shape), tuple(fconv._pair(conv.stride))
    for k, status, _ in _remembered.rows(_LOCK, _STATUS,
                                         where=lambda k: k[4] == shape and k[5] == stride):
        if status:
            return f"cuDNN refused the fused call at input {k[2]} {k[1]}: {status}"
    return None


def statuses() -> List[dict]:
    """Every fused-call signature tried in this process: device, dtype, input and weight
    shapes, stride, residual, and ``status`` ("" when it ran, else the error)."""
    return [dict(device=k[0], dtype=str(k[1]), input=k[2], weight=k[4], stride=k[5],
                 padding=k[6], residual=k[8], status=v)
            for k, v, _ in _remembered.rows(_LOCK, _STATUS)]


class CudnnEvalConv(conv_paths.CudnnConv):
    """``SitePlan(conv="cudnn-eval")``: ``F.conv2d`` as ``cudnn`` in training; in eval
    with folded weights, the conv + bias (+ residual) + ReLU in one cuDNN call."""

    name = "cudnn-eval"
    eval_name = "folded-cudnn"
    eval_kernel = "cudnn conv+bias+add+relu"

    def eval_problem(self, conv, x=None, relu=True, other=None, weight=None, bias=None):
        why = problem(conv, x, relu, other, weight, bias)
        return why or (_refused(conv) if x is None else None)

    def eval_conv(self, conv, x, weight, bias, relu, other):
        return run(conv, x, weight, bias, other)


conv_paths.register(CudnnEvalConv())

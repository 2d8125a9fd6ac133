"""The ``cudnn-graph`` conv path: cuDNN's fused convolution graphs (csrc/cuda/cudnn_graph.cpp).

Graph kinds (their references in ``fusedres.reference``):

    F0             conv_fprop -> genstats: ``y = conv(x)`` and per-channel ``sum(y)``,
                   ``sum(y*y)``                                             (graph_f0)
    F1             relu(x*scale + shift) -> conv_fprop -> genstats: the previous BN-ReLU
                   applied while the conv loads its input (never stored; padded taps 0
                   after it)                                                (graph_f1)
    DgradDreluDBN  conv_dgrad -> dReLU (mask from the previous BN's output, recomputed
                   from its input) -> dbn_weight: the gradient ``g`` at that BN's output
                   and its centred weight terms ``sum(g*xhat)``, ``sum(g)``
                                                               (graph_dgrad_drelu_dbn)
    ConvBNwgrad    relu(x*scale + shift) -> conv_wgrad: the weight gradient with F1's
                   prologue recomputed                                     (graph_wgrad)
    BNFinalize     bn_finalize: sums -> scale, shift, mean, invstd, running statistics;
                   ``bn_finalize`` runs it or the project's finalize (``finalize``, the
                   project's by default until a GPU measures cuDNN's faster)
                                                                     (graph_bn_finalize)
    BNAddReLU, DualBNAddReLU
                   no conv: a block tail's apply ``relu((x - mean)*scale + shift + r)``,
                   ``r`` the residual or the second BN's ``(x2 - mean2)*scale2 +
                   shift2``, with its ReLU mask in the BN kernels' layout; only on the
                   ``cudnn-graph-tail`` path, which only tune picks (its section)
                                                               (graph_bn_add_relu)

From the sums, ``mean = sum/M`` and the biased ``var = sum_sq/M - mean**2`` (fp32; see
docs/cudnn_graph.md for the cancellation this allows).

The backward of a BN-ReLU -> conv site (``bn_relu_conv``, one autograd node for the BN
with its batch statistics, the ReLU and the conv) is the MLPerf recipe's: DgradDreluDBN
for the previous BN's input-side terms, ConvBNwgrad for the weight, and dBNApply -- ``dx =
gamma*invstd*(g - dbeta/M - xhat*dgamma/M)`` -- as the project's own centred
``bn_backward_apply`` kernel, not a cuDNN pointwise graph: cuDNN's form ``A*g + B*x + C``
cancels for ``|mean| >> std`` as ``E[y^2] - E[y]^2`` does, a pure-pointwise graph is run
only by the runtime-fusion engines of the oldest support surface (an NVRTC compile per
shape), and both move the same bytes (read g and x, write dx). A backward graph cuDNN
refuses runs as today's backward (ATen's cuDNN dgrad/wgrad with the prologue recomputed,
the project's BN backward kernels), per graph.

Where a graph runs is decided per call in two steps, and anything refused falls back to
today's path (F.conv2d and the fused BN kernels), never to an exception:

1. ``problem(...)``: rules known without cuDNN -- the extension was built with the path
   (cudnn-frontend headers at build time), CUDA tensors, float16/bfloat16, compute
   capability >= 8.0, in and out channels multiples of 8 (16-byte aligned rows for the
   runtime-fusion engines; an F0 conv's input channels, the stem's 3, are padded with
   zeros to 8: ``input_channel_padding``), groups 1, dilation 1, zero padding, no conv bias,
   channels_last input and weight, 16-byte aligned (per call, not remembered);
2. ``fusedres::cudnn_graph_plan``: cuDNN builds the graph's plan once per (graph kind,
   device, dtype, shapes, strides), ``check_support`` included; a refusal is remembered
   (``statuses()``, with the engine cuDNN chose where it planned one) and reported by
   ``explain`` and ``fusedres-bench doctor``. The backward kinds are planned at the
   first backward.

Plans are built on first use: run one eager step (forward and backward) before CUDA-graph
capture or ``torch.compile`` (under tracing an unplanned graph falls back, it is not
planned there).
"""
from __future__ import annotations

import threading
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _backend  # noqa: F401  (loads fusedres._C, which defines the graph ops if built)
from . import _remembered
from .kernels import capturing
from . import conv as fconv
from . import conv_paths, ops
from . import reference
from .reference import acc_dtype, bn_relu_prologue

__all__ = ["built", "Capabilities", "capabilities", "problem", "plan", "plan_status", "engine",
           "statuses", "conv_stats", "centred_conv_stats", "bn_relu_conv", "bn_act_with_stats",
           "fused_backward", "CudnnGraphConv", "finalize", "bn_finalize", "finalize_problem",
           "finalize_status", "TAIL_KINDS", "tail_plan", "tail_problem", "tail_status",
           "tail_planned", "tail_engine", "tail_ran", "CudnnGraphTailConv"]

_OP = "cudnn_graph_conv_stats"
_DTYPES = (torch.float16, torch.bfloat16)
FORWARD_KINDS = ("F0", "F1")
BACKWARD_KINDS = ("DgradDreluDBN", "ConvBNwgrad")
KINDS = FORWARD_KINDS + BACKWARD_KINDS
# Set False to give BN-ReLU -> conv sites today's backward (ATen's dgrad/wgrad, autograd
# through scale/shift) even where cuDNN plans the backward graphs: for A/B timing.
fused_backward = True


def _defined(op: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"fusedres::{op}", "")
        return True
    except RuntimeError:
        return False


def built() -> bool:
    """Was fusedres._C built with the cuDNN graph path (and loaded)?"""
    return _defined(_OP)


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
    return plan(capabilities(x.device), x.dtype, weight.dtype, bias is not None,
                tuple(x.shape), tuple(weight.shape), groups, fconv._pair(dilation),
                padding, padding_mode,
                x.is_contiguous(memory_format=cl) and weight.is_contiguous(memory_format=cl),
                _aligned(x) and _aligned(weight), prologue)


def _aligned(t: Tensor) -> bool:
    # (a FakeTensor -- torch.compile, opcheck -- has no address: the C++ op checks it then)
    if torch.compiler.is_compiling():
        return True
    try:
        return t.data_ptr() % 16 == 0
    except (RuntimeError, NotImplementedError):
        return True


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


# Per graph (kind, device, dtype, shapes, strides): "" (runs) or why cuDNN refused it; and
# the engine cuDNN chose for those it runs (fusedres._remembered). A refused graph is asked
# once; the C++ side caches the plans themselves.
_STATUS: Dict[tuple, str] = {}
_ENGINE: Dict[tuple, str] = {}
_LOCK = threading.Lock()


def _kind(kind) -> str:
    if isinstance(kind, bool):  # plan_status(x, w, prologue, ...) of the forward graphs
        return "F1" if kind else "F0"
    if kind not in KINDS:
        raise ValueError(f"unknown cuDNN graph kind {kind!r}: one of {KINDS}")
    return kind


def _key(kind, x, weight, stride, padding):
    return (kind, str(x.device), x.dtype, tuple(x.shape), x.stride(),
            tuple(weight.shape), weight.stride(), tuple(stride), tuple(padding))


def _not_planned_now(key, t: Tensor) -> Optional[str]:
    """Why graph ``key``, not asked yet, is not planned now (the caller falls back,
    nothing is remembered), else None: never during torch.compile tracing, nor inside a
    CUDA-graph capture (planning queries the device and compiles kernels; a failure there
    would be remembered as cuDNN's refusal for the process, and could break the capture)."""
    if key in _STATUS:
        return None
    if torch.compiler.is_compiling():
        return "not planned before torch.compile tracing (run one eager step first)"
    if capturing(t.device):
        return "not planned during CUDA-graph capture (run one eager step first)"
    return None


def plan_status(x: Tensor, weight: Tensor, kind, stride, padding) -> str:
    """``""`` when cuDNN runs graph ``kind`` (``KINDS``; a bool: F1 if True, else F0) for
    the conv of input ``x`` and weight ``weight`` (for the backward kinds too: ``x`` is
    the conv's input), else why not (cuDNN's message). Plans it on the first call
    (outside torch.compile tracing and CUDA-graph capture: there an unplanned graph is
    refused, ``_not_planned_now``)."""
    kind = _kind(kind)
    if any(isinstance(d, torch.SymInt) for d in (*x.shape, *weight.shape)):
        return "not planned for symbolic shapes (torch.compile with dynamic shapes)"
    stride, padding = fconv._pair(stride), fconv._pair(padding)

    def arguments():
        # only F0 pads (the stem); the other kinds' inputs are BN outputs, C % 8 == 0
        xp, wp = pad_input_channels(x, weight, input_channel_padding(x.shape[1], kind != "F0"))
        return kind, xp, wp, stride, padding

    return _planned_status(_key(kind, x, weight, stride, padding), x, "cudnn_graph", arguments)


def _planned_status(key, t: Tensor, ops: str, arguments) -> str:
    """The remembered status of graph ``key`` (``""`` or why cuDNN refused it). Not asked
    yet: why it is not planned now (``_not_planned_now``; nothing remembered), else the
    C++ planner's answer (``_ask_cudnn(ops, *arguments())``: the arguments are made only
    then), remembered with the engine."""
    unplanned = _not_planned_now(key, t)
    if unplanned:
        return unplanned
    return _remembered.ask_once(_LOCK, _STATUS, key, lambda: _ask_cudnn(ops, *arguments()),
                                _ENGINE)


def _ask_cudnn(ops: str, *args) -> Tuple[str, Optional[str]]:
    """``(status, engine)`` from the C++ planner: ``fusedres::<ops>_plan(*args)`` (``""`` or
    why not) and, where it plans the graph, ``<ops>_engine(*args)``; ``ops``:
    "cudnn_graph" (the conv graphs), "cudnn_graph_bn_finalize", "cudnn_graph_tail" (tests
    fake this)."""
    status = str(getattr(torch.ops.fusedres, f"{ops}_plan")(*args))
    if status:
        return status, None
    return status, str(getattr(torch.ops.fusedres, f"{ops}_engine")(*args))


def _run_planned(kind, x, weight, stride, padding, run, *args):
    """``run(*args)`` when cuDNN planned graph ``kind`` for this conv, else None; a planned
    graph whose execution fails is remembered as refused (with the error) and gives None:
    the caller falls back, the user sees no exception."""
    if plan_status(x, weight, kind, stride, padding):
        return None
    key = _key(_kind(kind), x, weight, fconv._pair(stride), fconv._pair(padding))
    return _run_remembered(key, run, *args)


def _run_remembered(key, run, *args):
    """``run(*args)`` of a planned graph; a failure is remembered for ``key`` as
    ``execute failed: <cuDNN's message>`` and gives None."""
    return _remembered.call(_LOCK, _STATUS, key, run, *args, prefix="execute failed: ",
                            raise_when_compiling=True)


def engine(x: Tensor, weight: Tensor, kind, stride, padding) -> Optional[str]:
    """The engine cuDNN chose for a graph ``plan_status`` planned (its plan name and the
    scale/shift and intermediate dtypes), None when not planned or refused."""
    key = _key(_kind(kind), x, weight, fconv._pair(stride), fconv._pair(padding))
    with _LOCK:
        return _ENGINE.get(key)


def _conv_rows(conv, kind):
    """``[(key, status, engine)]`` of graph ``kind`` planned for ``conv`` in this process."""
    shape, st, pd = tuple(conv.weight.shape), fconv._pair(conv.stride), fconv._pair(conv.padding)
    return _remembered.rows(_LOCK, _STATUS, _ENGINE, lambda k: k[0] == kind and k[5] == shape
                            and k[7] == tuple(st) and k[8] == tuple(pd))


def _refused(conv, kind) -> Optional[str]:
    """Why cuDNN refused this conv's graph ``kind`` at some input seen in this process
    (None if it never did): what ``explain``, judging from the modules, reports."""
    kind = _kind(kind)
    for k, status, _ in _conv_rows(conv, kind):
        if status:
            return f"cuDNN refused the {kind} graph at input {k[3]} {k[2]}: {status}"
    return None


def site_note(conv) -> str:
    """How a BN-ReLU -> ``conv`` site runs, from the graphs planned in this process
    (``explain``'s note): F1's engine, each backward graph's engine, or its refusal and
    what runs instead."""
    f1 = [e for _, s, e in _conv_rows(conv, "F1") if not s]
    return (f"F1 on {f1[0]}; " if f1 and f1[0] else "") + backward_note(conv)


def backward_note(conv) -> str:
    """How the backward of a BN-ReLU -> ``conv`` site runs (see ``site_note``)."""
    if not fused_backward:
        return "backward: ATen dgrad/wgrad (fusedres.cudnn_graph.fused_backward is False)"
    instead = {"DgradDreluDBN": "ATen dgrad + the BN backward kernels",
               "ConvBNwgrad": "ATen wgrad of the recomputed prologue"}
    parts = []
    for kind in BACKWARD_KINDS:
        rows = _conv_rows(conv, kind)
        refused = [(k, s) for k, s, _ in rows if s]
        if refused:
            k, s = refused[0]
            parts.append(f"{kind} refused at input {k[3]} {k[2]} ({instead[kind]}): {s}")
        elif rows:
            parts.append(f"{kind} on {rows[0][2] or 'cuDNN'}")
        else:
            parts.append(f"{kind} planned at the first backward")
    return "backward: " + "; ".join(parts) + "; dBNApply: the fusedres BN kernel"


def statuses() -> List[dict]:
    """Every graph planned in this process: kind, device, dtype, input and weight shapes,
    stride, padding (a tail graph: none; ``mask``, whether it writes the ReLU mask),
    ``status`` ("" when it runs, else cuDNN's reason) and ``engine`` (cuDNN's plan name and
    the dtypes it was built with; None if refused)."""
    return [dict(kind=k[0], device=k[1], dtype=str(k[2]), input=k[3], weight=k[5],
                 stride=k[7], padding=k[8], status=v, engine=e,
                 **({"mask": k[9]} if len(k) > 9 else {}))
            for k, v, e in _remembered.rows(_LOCK, _STATUS, _ENGINE)]


# --------------------------------------------------------------------------------------
# fusedres::cudnn_graph_conv_stats (F0, F1 with scale/shift): autograd and fake kernel
# --------------------------------------------------------------------------------------


def _fake(x, weight, scale, shift, stride, padding):
    k = weight.shape[0]
    p, q = fconv._out_hw(x, weight, stride, padding)
    y = fconv._empty_cl(x, x.shape[0], k, p, q)
    acc = acc_dtype(x.dtype)  # float32 from cuDNN (float64 from the CPU tests' reference)
    return y, x.new_empty(k, dtype=acc), x.new_empty(k, dtype=acc)


def _setup(ctx, inputs, output):
    x, weight, scale, shift, stride, padding = inputs
    _save(ctx, x, weight, scale, shift, None, stride, padding, output[0])


def _save(ctx, x, weight, scale, shift, centre, stride, padding, y):
    ctx.save_for_backward(x, weight, scale, shift, centre, y)
    ctx.conv = (list(stride), list(padding))
    ctx.set_materialize_grads(False)  # no zero-filled gradients of unused sums (a pass each)


def _output_gradient(y, dy, dsum, dsq) -> Optional[Tensor]:
    """The gradient at a graph's output ``y`` from those of its outputs (``y``, ``sum(y)``,
    ``sum(y*y)``; None where unused): ``dy + dsum + 2*y*dsq``, in ``y``'s dtype,
    channels_last and 16-byte aligned (what the backward graphs read). None if none."""
    if dsum is None and dsq is None:
        g = dy
    else:
        acc = acc_dtype(y.dtype)
        g = torch.zeros_like(y, dtype=acc) if dy is None else dy.to(acc)
        if dsum is not None:  # d/dy of sum(y) and sum(y*y) per channel
            g = g + dsum.view(1, -1, 1, 1)
        if dsq is not None:
            g = g + 2 * y.to(acc) * dsq.view(1, -1, 1, 1)
        g = g.to(y.dtype)
    if g is None:
        return None
    g = g.contiguous(memory_format=torch.channels_last)
    return g if _aligned(g) else g.clone(memory_format=torch.channels_last)


def _aten_conv_backward(g, conv_in, weight, stride, padding, mask):
    return torch.ops.aten.convolution_backward(g, conv_in, weight, None, stride, padding,
                                               [1, 1], False, [0, 0], 1, mask)


def _backward(ctx, dy, dsum, dsq):
    gx, gw, gs, gt, _ = _prologue_conv_backward(ctx, dy, dsum, dsq, ctx.needs_input_grad[:4])
    return gx, gw, gs, gt, None, None


def _prologue_conv_backward(ctx, dy, dsum, dsq, need):
    """``(dx, dw, dscale, dshift, dcentre)`` of an F0/F1 op (``_save``'s tensors; ``need``:
    which of x, weight, scale, shift, centre want one) with ATen's dgrad/wgrad and the
    prologue recomputed as the graph applied it, ``x*scale + shift`` (``shift`` already
    folded: ``_folded_shift``). With a centre, ``dscale = sum(g*(x - centre))``: summing
    ``g*x`` and leaving autograd ``-centre*sum(g)`` cancels in fp32 for a large mean."""
    x, weight, scale, shift, centre, y = ctx.saved_tensors
    stride, padding = ctx.conv
    need = list(need) + [False] * (5 - len(need))
    g = _output_gradient(y, dy, dsum, dsq)
    if g is None:
        return (None,) * 5
    prologue = scale is not None
    conv_in = bn_relu_prologue(x, scale, shift) if prologue else x
    want_in = need[0] or (prologue and (need[2] or need[3] or need[4]))
    gin, gw, _ = _aten_conv_backward(g, conv_in, weight, stride, padding,
                                     [want_in, need[1], False])
    gx = gs = gt = gc = None
    if prologue and gin is not None:
        acc = acc_dtype(x.dtype)
        xa = x.to(acc)
        v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
        pre = xa * v(scale) + v(shift)
        gpre = torch.where(pre > 0, gin.to(acc), torch.zeros((), dtype=acc, device=x.device))
        gx = (gpre * v(scale)).to(x.dtype) if need[0] else None
        if need[2]:
            gs = (gpre * (xa if centre is None else xa - v(centre))).sum(dim=(0, 2, 3))
        if need[3] or need[4]:
            gt = gpre.sum(dim=(0, 2, 3))
            gc = -scale * gt if need[4] else None
    elif need[0]:
        gx = gin
    return gx, gw if need[1] else None, gs, gt if need[3] else None, gc


# --------------------------------------------------------------------------------------
# The backward graphs (fusedres::cudnn_graph_dgrad_drelu_dbn, cudnn_graph_wgrad): fakes
# --------------------------------------------------------------------------------------


def _dgrad_drelu_dbn_fake(dy, weight, x, mean, invstd, gamma, beta, stride, padding):
    c = x.shape[1]
    g = fconv._empty_cl(x, *x.shape)
    acc = acc_dtype(x.dtype)
    return g, x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc)


def _wgrad_fake(dy, x, scale, shift, weight, stride, padding):
    return fconv._empty_cl(weight, *weight.shape)


def _register():
    if built():
        torch.library.register_fake(f"fusedres::{_OP}", _fake)
        torch.library.register_autograd(f"fusedres::{_OP}", _backward, setup_context=_setup)
    for op, fake in (("cudnn_graph_dgrad_drelu_dbn", _dgrad_drelu_dbn_fake),
                     ("cudnn_graph_wgrad", _wgrad_fake)):
        if _defined(op):  # (an extension built before the backward graphs has only F0/F1)
            torch.library.register_fake(f"fusedres::{op}", fake)


_register()


# What runs each graph (CPU tests put the references of fusedres.reference here).
def _run_graph(x, weight, scale, shift, stride, padding):
    """``(y, sum, sum_sq)`` of F0 (``scale`` None) or F1 from cuDNN."""
    return torch.ops.fusedres.cudnn_graph_conv_stats(x, weight, scale, shift, stride, padding)


def _run_dgrad_drelu_dbn(dy, weight, x, mean, invstd, gamma, beta, stride, padding):
    """``(g, dgamma, dbeta)`` of DgradDreluDBN from cuDNN."""
    return torch.ops.fusedres.cudnn_graph_dgrad_drelu_dbn(dy, weight, x, mean, invstd, gamma,
                                                          beta, stride, padding)


def _run_wgrad(dy, x, scale, shift, weight, stride, padding):
    """``dw`` of ConvBNwgrad from cuDNN."""
    return torch.ops.fusedres.cudnn_graph_wgrad(dy, x, scale, shift, weight, stride, padding)


def _folded_shift(scale: Tensor, shift: Tensor, centre: Optional[Tensor]) -> Tensor:
    """The graph's prologue is ``x*scale + shift``: a centred ``(x - centre)*scale + shift``
    takes it as ``shift - centre*scale`` (bitwise ``ops.scale_shift``'s ``beta -
    mean*scale`` when the centre is the BN mean and ``shift`` its beta)."""
    return shift if centre is None else shift - centre * scale


@torch.library.custom_op("fusedres::cudnn_graph_centred_conv_stats", mutates_args=())
def centred_conv_stats(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, centre: Tensor,
                       stride: List[int], padding: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """F1 with a centred prologue ``relu((x - centre)*scale + shift)``, run as the graph's
    ``x*scale + _folded_shift(...)``: ``(y, sum(y), sum(y*y))``. Gradients of ``x``,
    ``weight``, ``scale``, ``shift`` and ``centre``; its backward sums ``dscale`` about the
    centre (``_prologue_conv_backward``), as the Triton prologue's dReLU epilogue does."""
    return _run_graph(x, weight, scale, _folded_shift(scale, shift, centre), stride, padding)


@centred_conv_stats.register_fake
def _centred_fake(x, weight, scale, shift, centre, stride, padding):
    return _fake(x, weight, scale, shift, stride, padding)


def _centred_setup(ctx, inputs, output):
    x, weight, scale, shift, centre, stride, padding = inputs
    _save(ctx, x, weight, scale, _folded_shift(scale, shift, centre), centre, stride, padding,
          output[0])


def _centred_backward(ctx, dy, dsum, dsq):
    grads = _prologue_conv_backward(ctx, dy, dsum, dsq, ctx.needs_input_grad[:5])
    return (*grads, None, None)


centred_conv_stats.register_autograd(_centred_backward, setup_context=_centred_setup)


def _mean_var(s1, s2, count):
    """``mean = sum/M`` and the biased ``var = sum_sq/M - mean**2`` (clamped at 0)."""
    mean = s1 / count
    return mean, torch.clamp(s2 / count - mean * mean, min=0)


def _sums_to_stats(y, s1, s2):
    mean, var = _mean_var(s1, s2, y.numel() // y.shape[1])
    return mean.to(acc_dtype(y.dtype)), var.to(acc_dtype(y.dtype))


def conv_stats(x: Tensor, weight: Tensor, stride, padding, scale: Optional[Tensor] = None,
               shift: Optional[Tensor] = None, centre: Optional[Tensor] = None
               ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)``: F0 (``scale`` None) or F1 on cuDNN, the statistics from the
    graph's sums; all differentiable. F1's prologue is ``relu(x*scale + shift)``, or with
    a ``centre`` ``relu((x - centre)*scale + shift)`` (``centred_conv_stats``). The caller
    checked ``problem`` and ``plan_status``."""
    st, pd = fconv._pair(stride), fconv._pair(padding)
    if scale is not None:
        acc = acc_dtype(x.dtype)  # float32 for the graphs (float64 for the CPU tests)
        scale, shift = scale.to(acc).contiguous(), shift.to(acc).contiguous()
    x, weight = pad_input_channels(x, weight, input_channel_padding(x.shape[1], scale is not None))
    if centre is None:
        y, s1, s2 = _run_graph(x, weight, scale, shift, st, pd)
    else:
        y, s1, s2 = centred_conv_stats(x, weight, scale, shift, centre.to(scale.dtype).contiguous(),
                                       list(st), list(pd))
    return (y, *_sums_to_stats(y, s1, s2))


def _site_conv_stats(x: Tensor, weight: Tensor, stride, padding, scale: Optional[Tensor] = None,
                     shift: Optional[Tensor] = None, centre: Optional[Tensor] = None
                     ) -> Tuple[Tensor, Tensor, Tensor]:
    """``conv_stats`` for a site: where the graph failed to execute (now or before, then
    remembered: ``_run_planned``) the same from F.conv2d, so the user sees no exception.
    (``conv_stats`` itself raises: doctor and the benchmarks must see the graph fail.)"""
    kind = "F0" if scale is None else "F1"
    out = _run_planned(kind, x, weight, stride, padding, conv_stats, x, weight, stride,
                       padding, scale, shift, centre)
    if out is not None:
        return out
    st, pd = fconv._pair(stride), fconv._pair(padding)
    y, s1, s2 = (reference.graph_f0(x, weight, st, pd) if scale is None
                 else reference.graph_f1(x, scale, shift, weight, st, pd, centre))
    return (y, *_sums_to_stats(y, s1, s2))


# --------------------------------------------------------------------------------------
# A BN-ReLU -> conv site in one autograd node: fusedres::cudnn_graph_bn_relu_conv
# --------------------------------------------------------------------------------------


def prologue_scale_shift(gamma: Optional[Tensor], beta: Optional[Tensor], mean: Tensor,
                         invstd: Tensor) -> Tuple[Tensor, Tensor]:
    """F1's prologue vectors of a BN: ``scale = gamma*invstd``, ``shift = beta -
    mean*scale`` in ``mean``'s dtype, contiguous (``ops.scale_shift``'s formula)."""
    scale = invstd if gamma is None else gamma.to(mean.dtype) * invstd
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta.to(mean.dtype)
    return scale.contiguous(), shift.contiguous()


@torch.library.custom_op("fusedres::cudnn_graph_bn_relu_conv", mutates_args=())
def bn_relu_conv(x: Tensor, weight: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                 mean: Tensor, invstd: Tensor, batch_stats: bool, stride: List[int],
                 padding: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(y, sum(y), sum(y*y))`` of ``y = conv(relu(bn(x)))`` (F1), the BN given by its
    affine ``gamma``/``beta`` and the statistics it normalises with (``mean``,
    ``invstd``: constants -- with ``batch_stats`` they are ``x``'s own batch statistics
    and the backward includes their gradient, ``-dbeta/M - xhat*dgamma/M``). Gradients
    of ``x``, ``weight``, ``gamma``, ``beta``; the backward runs the DgradDreluDBN and
    ConvBNwgrad graphs where cuDNN plans them (``_site_backward``)."""
    scale, shift = prologue_scale_shift(gamma, beta, mean, invstd)
    y, s1, s2 = _run_graph(x, weight, scale, shift, stride, padding)
    return y, s1, s2


@bn_relu_conv.register_fake
def _bn_relu_conv_fake(x, weight, gamma, beta, mean, invstd, batch_stats, stride, padding):
    return _fake(x, weight, None, None, stride, padding)


def _site_setup(ctx, inputs, output):
    x, weight, gamma, beta, mean, invstd, batch_stats, stride, padding = inputs
    ctx.save_for_backward(x, weight, gamma, beta, mean, invstd, output[0])
    ctx.site = (batch_stats, list(stride), list(padding))
    ctx.set_materialize_grads(False)


def _bn_primitives(x: Tensor) -> ops.Primitives:
    """The BN kernels of the site's backward: the CUDA ones (today's backward), the
    reference elsewhere (CPU tests)."""
    if x.is_cuda and _backend._has_kernel("bn_backward_apply", "CUDA"):
        return ops.primitives("cuda")
    return ops.primitives("reference_primitives")


def _data_gradients(g, x, weight, gamma, beta, mean, invstd, batch_stats, stride, padding,
                    want_dx):
    """``(dx, dgamma, dbeta)`` of the BN in front of the conv from ``g`` at the conv's
    output: DgradDreluDBN (else ATen's dgrad and the BN backward-reduce kernel, its ReLU
    mask recomputed), then dBNApply as the BN backward-apply kernel (module docstring)."""
    gam = torch.ones_like(mean) if gamma is None else gamma.to(mean.dtype).contiguous()
    bet = torch.zeros_like(mean) if beta is None else beta.to(mean.dtype).contiguous()
    scale_c = gam * invstd  # the centred apply's scale: (x - mean)*scale_c + beta
    prims = _bn_primitives(x)
    x3 = ops.ncs(x)
    cl = ops.is_channels_last(x3)
    graph = _run_planned("DgradDreluDBN", x, weight, stride, padding, _run_dgrad_drelu_dbn,
                         g, weight, x, mean, invstd, gam, bet, stride, padding)
    if graph is not None:
        dout, dgamma, dbeta = graph
        relu = False  # g is already masked
    else:
        dout = _aten_conv_backward(g, x, weight, stride, padding, [True, False, False])[0]
        relu = True
        dbeta, sum_g_xc = prims.backward_reduce(ops.ncs(dout), x3, mean, scale_c, bet, None,
                                                relu, cl)
        dgamma = sum_g_xc * invstd
    dx = None
    if want_dx:
        if batch_stats:  # dx = scale_c*(g - dbeta/M - xhat*dgamma/M)
            m = x.numel() // x.shape[1]
            coefs = (scale_c, -scale_c * invstd * dgamma / m, -scale_c * dbeta / m)
        else:  # constant statistics: dx = scale_c*g
            coefs = (scale_c, torch.zeros_like(mean), torch.zeros_like(mean))
        dx3, _ = prims.backward_apply(ops.ncs(dout), x3, mean, scale_c, bet, None, *coefs, relu,
                                      False, cl)
        dx = dx3.reshape(x.shape)
    return dx, dgamma, dbeta


def _weight_gradient(g, x, weight, scale, shift, stride, padding):
    """ConvBNwgrad, else ATen's wgrad of the recomputed prologue."""
    dw = _run_planned("ConvBNwgrad", x, weight, stride, padding, _run_wgrad, g, x, scale, shift,
                      weight, stride, padding)
    if dw is not None:
        return dw
    conv_in = bn_relu_prologue(x, scale, shift)
    return _aten_conv_backward(g, conv_in, weight, stride, padding, [False, True, False])[1]


def _site_backward(ctx, dy, dsum, dsq):
    x, weight, gamma, beta, mean, invstd, y = ctx.saved_tensors
    batch_stats, stride, padding = ctx.site
    need = ctx.needs_input_grad
    g = _output_gradient(y, dy, dsum, dsq)
    if g is None:
        return (None,) * 9
    dx = dgamma = dbeta = None
    if need[0] or need[2] or need[3]:
        dx, dgamma, dbeta = _data_gradients(g, x, weight, gamma, beta, mean, invstd,
                                            batch_stats, stride, padding, need[0])
    dw = None
    if need[1]:
        scale, shift = prologue_scale_shift(gamma, beta, mean, invstd)
        dw = _weight_gradient(g, x, weight, scale, shift, stride, padding)
    dgamma = dgamma.to(gamma.dtype) if need[2] else None
    dbeta = dbeta.to(beta.dtype) if need[3] else None
    return dx, dw, dgamma, dbeta, None, None, None, None, None


bn_relu_conv.register_autograd(_site_backward, setup_context=_site_setup)


# --------------------------------------------------------------------------------------
# A plain conv -> BN (-> add) (-> ReLU) site: the BN with the statistics F0 computed
# --------------------------------------------------------------------------------------


class _BatchNormActWithStats(torch.autograd.Function):
    """``[relu](bn(x) [+ residual | + bn2(x2)])`` in training, normalised with the given
    batch statistics (``mean``/``var``, and ``mean2``/``var2`` of ``x2``): the fused op's
    apply and its training backward
    (``batch_norm_act_backward``, whose ``dx`` holds the statistics' gradient: they enter
    here as constants) on ``backend``'s primitives."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, residual, x2, weight2, bias2, mean2, var2,
                eps, relu, backend, tail_graph=False):
        prims = ops.primitives(backend)
        x3, r3, x23 = ops.ncs(x), ops.ncs(residual), ops.ncs(x2)
        cl = ops.is_channels_last(x3)
        _, scale, shift = ops.centred_scale_shift(weight, bias, mean, var, eps)
        scale2 = shift2 = None
        if x2 is not None:
            _, scale2, shift2 = ops.centred_scale_shift(weight2, bias2, mean2, var2, eps)
        save_mask = relu and (residual is not None or x2 is not None)
        # the block tail's apply through cuDNN's pointwise graph where it runs (the same
        # contract as prims.apply: its mask is what the backward below reads)
        graph = None
        if tail_graph:
            graph = _tail_graph_apply(x, mean, scale, shift, residual, x2, mean2, scale2,
                                      shift2, relu, save_mask)
            if not torch.compiler.is_compiling():  # (only eager calls report it)
                _TAIL_RAN.value = graph is not None
        if graph is not None:
            out, mask = ops.ncs(graph[0]), graph[1]
        else:
            out, mask = prims.apply(x3, mean, scale, shift, r3, x23, mean2, scale2, shift2,
                                    relu, save_mask, cl)
        ctx.save_for_backward(x3, weight, bias, mean, var, mask if mask.numel() else None,
                              x23, weight2, bias2, mean2, var2)
        ctx.options = (eps, relu, residual is not None, cl, backend)
        ctx.shape = x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout):
        x3, weight, bias, mean, var, mask, x23, weight2, bias2, mean2, var2 = ctx.saved_tensors
        eps, relu, has_residual, cl, backend = ctx.options
        ng = ctx.needs_input_grad
        needs = [ng[0], ng[1] or ng[2], ng[5], ng[6], ng[7] or ng[8]]
        if dout is None or not any(needs):
            return (None,) * 15
        dout = ops.ncs(dout.contiguous(memory_format=torch.channels_last if cl else
                                       torch.contiguous_format))
        grads = torch.ops.fusedres.batch_norm_act_backward(
            dout, x3, weight, bias, mean, var, mask, x23, weight2, bias2, mean2, var2, True,
            eps, relu, has_residual, cl, backend, needs)
        dx, dweight, dbias, dres, dx2, dweight2, dbias2 = grads
        shape = ctx.shape  # the gradients of 4-D inputs from their (N, C, S) views
        keep = lambda t, need: t if need else None  # noqa: E731
        dense = lambda t, need: t.view(shape) if need else None  # noqa: E731
        return (dense(dx, ng[0]), keep(dweight, ng[1]), keep(dbias, ng[2]), None, None,
                dense(dres, ng[5]), dense(dx2, ng[6]), keep(dweight2, ng[7]),
                keep(dbias2, ng[8]), None, None, None, None, None, None)


def bn_act_with_stats(y: Tensor, weight, bias, stats, *, relu: bool, residual=None,
                      shortcut: Optional[Tensor] = None, shortcut_weight=None,
                      shortcut_bias=None, shortcut_stats=None, eps: float,
                      backend: str, tail_graph: bool = False):
    """``[relu](bn(y) [+ residual | + bn2(shortcut)])`` in training with the batch
    statistics ``stats`` / ``shortcut_stats`` (``(mean, biased var)`` from a conv's
    epilogue, or None: computed by the BN kernels); returns ``(out, (mean, var),
    (mean2, var2) or None)``, the statistics used (for the running ones). ``backend``: one
    of ``ops.PRIMITIVE_BACKENDS``. ``tail_graph``: a block tail's apply (ReLU and a
    residual or ``shortcut``) runs as cuDNN's tail graph where it is planned
    (``tail_ran()`` says whether it did), else the BN kernels' apply; the backward is the
    BN kernels' either way."""
    prims = ops.primitives(backend)

    def constants(s, t):  # the BN backward holds their gradient; None: today's pass
        if s is None:
            x3 = ops.ncs(t)
            return prims.stats(x3, ops.is_channels_last(x3))
        return s[0].detach(), s[1].detach()

    stats = constants(stats, y)
    shortcut_stats = (None, None) if shortcut is None else constants(shortcut_stats, shortcut)
    out = _BatchNormActWithStats.apply(y, weight, bias, *stats, residual, shortcut,
                                       shortcut_weight, shortcut_bias, *shortcut_stats, eps,
                                       relu, backend, tail_graph)
    return out, stats, (None if shortcut is None else shortcut_stats)


# --------------------------------------------------------------------------------------
# The conv path
# --------------------------------------------------------------------------------------


class CudnnGraphConv(conv_paths.ConvPath):
    """``SitePlan(conv="cudnn-graph")``: F0 for a conv whose BN feeds a BN-ReLU -> conv
    site or ends a plain conv -> BN (-> add) (-> ReLU) site, the stem and a downsample's
    shortcut included (the statistics from the conv's epilogue; a plain site's BN takes
    them in ``bn_act_with_stats``), F1 for a BN-ReLU -> conv site's conv (the BN-ReLU in
    its prologue, its own output's statistics carried to the next site), and that site's
    backward through DgradDreluDBN and ConvBNwgrad where cuDNN plans them."""

    name = "cudnn-graph"
    prologue_name = "cudnn-graph-prologue"
    kernel_name = "cudnn-graph"
    plain_site_stats = True  # conv -> BN (-> ReLU) sites too: F0, the BN with its sums
    stats_name = "cudnn-graph-stats"

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

    def prologue_note(self, conv, stats=False):
        return site_note(conv)

    def conv_stats(self, conv, x):
        x, weight, _ = fconv.autocast_inputs(x, conv.weight, None)
        return _site_conv_stats(x, weight, conv.stride, conv.padding)

    def prologue_conv(self, conv, y, scale, shift, centre=None):
        y, weight, _ = fconv.autocast_inputs(y, conv.weight, None)
        out, mean, var = _site_conv_stats(y, weight, conv.stride, conv.padding, scale, shift,
                                          centre)
        return out, (mean, var)

    def bn_prologue_conv(self, conv, y, bn, mean, var, batch_stats):
        if not fused_backward:
            return super().bn_prologue_conv(conv, y, bn, mean, var, batch_stats)
        cast, weight, _ = fconv.autocast_inputs(y, conv.weight, None)
        # constants here: the site's backward includes the batch statistics' gradient
        invstd = torch.rsqrt(var.detach() + bn.eps).contiguous()
        st, pd = list(fconv._pair(conv.stride)), list(fconv._pair(conv.padding))
        out = _run_planned("F1", cast, weight, st, pd, bn_relu_conv, cast, weight, bn.weight,
                           bn.bias, mean.detach().contiguous(), invstd, batch_stats, st, pd)
        if out is None:  # F1 failed to execute (remembered): today's path
            return super().bn_prologue_conv(conv, y, bn, mean, var, batch_stats)
        y, s1, s2 = out
        return y, _sums_to_stats(y, s1, s2)


conv_paths.register(CudnnGraphConv())


# --------------------------------------------------------------------------------------
# BN finalize after the graphs' sums: the project's (default) or cuDNN's bn_finalize
# --------------------------------------------------------------------------------------

FINALIZE_KIND = "BNFinalize"
FINALIZES = ("fusedres", "cudnn")
# Which finalize ``bn_finalize`` runs: "fusedres" -- torch ops for mean/var and scale/shift,
# the project's running-statistics op -- or "cudnn": cuDNN's bn_finalize graph
# (fusedres::cudnn_graph_bn_finalize, one launch) where cuDNN plans it, else "fusedres"
# (remembered, as the other graphs). Never chosen blind: "fusedres" stays the default
# until the device measures cuDNN's exact (the doctor's cudnn_graph_BNFinalize row) and
# faster (scripts/gpu_cudnn_sites.py --finalize) -- docs/cudnn_graph.md.
finalize = "fusedres"


def _finalize_key(sums: Tensor) -> tuple:
    # the layout of the conv graphs' keys (statuses() reads it): the input is (C,)
    return (FINALIZE_KIND, str(sums.device), sums.dtype, tuple(sums.shape), sums.stride(),
            (), (), (), ())


def finalize_plan(on_cuda: bool, built_op: bool, sums_dtype: torch.dtype,
                  running_dtype: Optional[torch.dtype], momentum: Optional[float]
                  ) -> Optional[str]:
    """The rules for cuDNN's bn_finalize known without cuDNN: None (cuDNN decides,
    ``finalize_status``) or why the project's finalize runs."""
    if not on_cuda:
        return "cuDNN's bn_finalize runs on CUDA tensors only"
    if not built_op:
        return "fusedres._C was built without cuDNN's bn_finalize (an older build)"
    if sums_dtype != torch.float32:
        return f"{sums_dtype} sums: cuDNN's bn_finalize takes float32"
    if momentum is None:
        return ("momentum=None (a cumulative average: the factor 1/num_batches_tracked is on "
                "the device, cuDNN takes it by value)")
    if running_dtype not in (None, torch.float32):
        return f"{running_dtype} running statistics: cuDNN's bn_finalize writes float32"
    return None


def finalize_problem(sums: Tensor, running_mean: Optional[Tensor],
                     momentum: Optional[float]) -> Optional[str]:
    """``finalize_plan``'s answer for these tensors."""
    return finalize_plan(sums.device.type == "cuda", _defined("cudnn_graph_bn_finalize"),
                         sums.dtype, None if running_mean is None else running_mean.dtype,
                         momentum)


def finalize_status(sums: Tensor) -> str:
    """``""`` when cuDNN plans its bn_finalize for ``sums``' channels (planned on the
    first call, remembered per device and channel count), else cuDNN's reason."""
    return _planned_status(_finalize_key(sums), sums, "cudnn_graph_bn_finalize",
                           lambda: (sums,))


def engine_of_finalize(sums: Tensor) -> Optional[str]:
    """The engine cuDNN planned for the BNFinalize graph of ``sums``' channels, or None."""
    with _LOCK:
        return _ENGINE.get(_finalize_key(sums))


def _run_bn_finalize(sums, sq_sums, gamma, beta, running_mean, running_var, eps, momentum,
                     count):
    """cuDNN's bn_finalize, in cuDNN's order of outputs (CPU tests put
    ``reference.graph_bn_finalize`` here)."""
    return torch.ops.fusedres.cudnn_graph_bn_finalize(sums, sq_sums, gamma, beta, running_mean,
                                                      running_var, eps, momentum, count)


def _bn_finalize_fake(sums, sq_sums, gamma, beta, running_mean, running_var, eps, momentum,
                      count):
    return tuple(torch.empty_like(sums) for _ in range(6))


if _defined("cudnn_graph_bn_finalize"):  # (torch.compile traces it once planned eagerly)
    torch.library.register_fake("fusedres::cudnn_graph_bn_finalize", _bn_finalize_fake)


def _finalize_fusedres(sums, sq_sums, count, weight, bias, eps, running_mean, running_var,
                       momentum, num_batches_tracked):
    """The project's finalize: mean and biased var from the sums (``_sums_to_stats``'s
    formula), ``ops.update_from_batch`` (torch's unbiased running variance, momentum or
    the cumulative average), ``ops.scale_shift``."""
    mean, var = _mean_var(sums, sq_sums, count)
    ops.update_from_batch(running_mean, running_var, mean, var, count, momentum,
                          num_batches_tracked)
    invstd, scale, shift = ops.scale_shift(weight, bias, mean, var, eps)
    return scale, shift, mean, invstd


def _finalize_cudnn(sums, sq_sums, count, weight, bias, eps, running_mean, running_var,
                    momentum):
    """cuDNN's bn_finalize: ones/zeros for an absent affine, throw-away running
    statistics (momentum 0) without them; the next running statistics copied into the
    module's."""
    one = lambda v, fill: (torch.full_like(sums, fill) if v is None  # noqa: E731
                           else v.detach().to(sums.dtype).contiguous())  # float32
    track = running_mean is not None
    rm, rv = (one(running_mean, 0.0), one(running_var, 1.0)) if track else \
        (torch.zeros_like(sums), torch.ones_like(sums))
    scale, shift, mean, invstd, next_rm, next_rv = _run_bn_finalize(
        sums.contiguous(), sq_sums.contiguous(), one(weight, 1.0), one(bias, 0.0), rm, rv,
        float(eps), float(momentum) if track else 0.0, int(count))
    if track:
        running_mean.copy_(next_rm)
        running_var.copy_(next_rv)
    return scale, shift, mean, invstd


def bn_finalize(sums: Tensor, sq_sums: Tensor, count: int, weight: Optional[Tensor],
                bias: Optional[Tensor], eps: float, running_mean: Optional[Tensor] = None,
                running_var: Optional[Tensor] = None, momentum: Optional[float] = 0.1,
                num_batches_tracked: Optional[Tensor] = None,
                impl: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """BN finalize after a graph's ``genstats``: per-channel ``sum(y)``, ``sum(y*y)`` over
    ``count`` values -> ``(scale, shift, mean, invstd)`` (``bn(y) = y*scale + shift``:
    F1's prologue vectors), the running statistics updated in place as ``nn.BatchNorm``
    does (``momentum``, or None with ``num_batches_tracked`` already incremented: the
    cumulative average). Constants: no autograd through it (the graph sites' backward
    holds the statistics' gradient).

    ``impl`` (default: the module's ``finalize``): "fusedres" or "cudnn"; "cudnn" runs
    cuDNN's graph where ``finalize_problem`` and cuDNN allow, else the project's (a graph
    that fails to execute is remembered as refused: ``statuses()``)."""
    impl = finalize if impl is None else impl
    if impl not in FINALIZES:
        raise ValueError(f"unknown BN finalize {impl!r}: one of {FINALIZES}")
    sums, sq_sums = sums.detach(), sq_sums.detach()
    if impl == "cudnn" and finalize_problem(sums, running_mean, momentum) is None \
            and not finalize_status(sums):
        out = _run_remembered(_finalize_key(sums), _finalize_cudnn, sums, sq_sums, count,
                              weight, bias, eps, running_mean, running_var, momentum)
        if out is not None:
            return out
    weight = None if weight is None else weight.detach()
    bias = None if bias is None else bias.detach()
    return _finalize_fusedres(sums, sq_sums, count, weight, bias, eps, running_mean,
                              running_var, momentum, num_batches_tracked)


# --------------------------------------------------------------------------------------
# The block tail: (dual) BN-add-ReLU as a cuDNN pointwise graph (no conv)
# --------------------------------------------------------------------------------------

# BNAddReLU: relu(bn(y) + residual); DualBNAddReLU: relu(bn(y) + bn2(y2)). The BN kernels'
# apply (centred; reference.graph_bn_add_relu), its ReLU mask in their layout: a drop-in
# for ``prims.apply`` at a tail, whose backward stays the BN kernels'. Only the
# ``cudnn-graph-tail`` conv path uses it, and only ``fusedres.tune`` picks that path (on
# the device, where it measures faster): cuDNN runs a pure pointwise graph on its
# runtime-fusion engines, whose speed against the project's tail kernel is unknown.
TAIL_KINDS = ("BNAddReLU", "DualBNAddReLU")
_TAIL_OP = "cudnn_graph_bn_add_relu"
_TAIL_RAN = threading.local()


def tail_ran() -> bool:
    """Did the last ``bn_act_with_stats`` on this thread run its apply as the tail graph?"""
    return getattr(_TAIL_RAN, "value", False)


def tail_plan(caps: Capabilities, dtype: torch.dtype, shape: tuple, other_dtype: torch.dtype,
              other_shape: tuple, channels_last: bool = True, aligned: bool = True
              ) -> Optional[str]:
    """The planner's rules for a block tail's graph on a CUDA device with ``caps``
    (``shape``/``dtype``: the BN input's; ``other``: the residual's or the second BN
    input's): None (ask cuDNN) or why no graph is planned."""
    if not caps.built:
        return ("fusedres._C was built without the cuDNN graph path (no cudnn-frontend "
                "headers at build time, see docs/cudnn_graph.md)")
    if caps.arch < (8, 0):
        return f"compute capability {caps.arch[0]}.{caps.arch[1]} < 8.0"
    if dtype not in _DTYPES:
        return f"{dtype} input: the tail graph takes float16 or bfloat16 (autocast)"
    if other_dtype != dtype or tuple(other_shape) != tuple(shape):
        return "the residual / second BN input differs in dtype or shape"
    if len(shape) != 4:
        return "not a 4-D activation"
    if shape[1] % CHANNEL_ALIGN:
        return (f"{shape[1]} channels: cuDNN's runtime fusion needs multiples of 8 (16-byte "
                "aligned fp16/bf16 rows)")
    if not channels_last:
        return "an input not channels_last (the graph is NHWC)"
    if not aligned:  # per call, never remembered
        return "an input not 16-byte aligned (a view with an offset)"
    return None


def tail_problem(x: Tensor, other: Optional[Tensor], relu: bool) -> Optional[str]:
    """None when the tail graph may run ``relu(bn(x) + other)`` (``other``: the residual or
    the second BN's input; cuDNN still has the last word, ``tail_status``), else why not."""
    if not relu or other is None:
        return "not a block tail (the graph is a BN plus a residual or a second BN, then ReLU)"
    if x.device.type != "cuda":
        return "the cuDNN graphs run on CUDA tensors only"
    if not _defined(_TAIL_OP):
        return "fusedres._C was built without the tail graph (rebuild it)"
    cl = torch.channels_last
    return tail_plan(capabilities(x.device), x.dtype, tuple(x.shape), other.dtype,
                     tuple(other.shape),
                     x.is_contiguous(memory_format=cl) and other.is_contiguous(memory_format=cl),
                     _aligned(x) and _aligned(other))


def tail_planned(x: Tensor, residual: Optional[Tensor], x2: Optional[Tensor],
                 relu: bool) -> bool:
    """Does the tail graph run ``relu(bn(x) + residual | bn2(x2))`` in training (planner,
    then cuDNN's remembered answer; it plans the graph on the first call)?"""
    other = x2 if x2 is not None else residual
    return tail_problem(x, other, relu) is None \
        and not tail_status(TAIL_KINDS[x2 is not None], x, True)


def _tail_key(kind, x, save_mask):
    # the layout of the conv graphs' keys (statuses() reads it), the mask flag last
    return (kind, str(x.device), x.dtype, tuple(x.shape), x.stride(), (), (), (), (),
            bool(save_mask))


def tail_status(kind: str, x: Tensor, save_mask: bool) -> str:
    """``""`` when cuDNN runs tail graph ``kind`` (``TAIL_KINDS``) for BN input ``x``
    (with the ReLU mask as an output when ``save_mask``), else why not. Planned on the first
    call (not under torch.compile tracing) and remembered, as the conv graphs."""
    if kind not in TAIL_KINDS:
        raise ValueError(f"unknown tail graph kind {kind!r}: one of {TAIL_KINDS}")
    if any(isinstance(d, torch.SymInt) for d in x.shape):
        return "not planned for symbolic shapes (torch.compile with dynamic shapes)"
    return _planned_status(_tail_key(kind, x, save_mask), x, "cudnn_graph_tail",
                           lambda: (kind, x, save_mask))


def tail_engine(kind: str, x: Tensor, save_mask: bool) -> Optional[str]:
    """The engine cuDNN chose for a tail graph ``tail_status`` planned (None if none)."""
    with _LOCK:
        return _ENGINE.get(_tail_key(kind, x, save_mask))


def _run_tail(x, mean, scale, shift, residual, x2, mean2, scale2, shift2, save_mask):
    """``(out, mask)`` of the tail graph from cuDNN (CPU tests put the reference here)."""
    return torch.ops.fusedres.cudnn_graph_bn_add_relu(x, mean, scale, shift, residual, x2, mean2,
                                                      scale2, shift2, save_mask)


def _tail_fake(x, mean, scale, shift, residual, x2, mean2, scale2, shift2, save_mask):
    out = fconv._empty_cl(x, *x.shape)
    return out, x.new_empty(ops._mask_bytes(ops.ncs(x)) if save_mask else 0, dtype=torch.uint8)


if _defined(_TAIL_OP):
    torch.library.register_fake(f"fusedres::{_TAIL_OP}", _tail_fake)


def _tail_graph_apply(x, mean, scale, shift, residual, x2, mean2, scale2, shift2, relu,
                      save_mask) -> Optional[Tuple[Tensor, Tensor]]:
    """``(out, mask)`` from the tail graph (4-D, channels_last; ``mask`` in the BN kernels'
    layout), or None where it does not run (planner, cuDNN's refusal, or an execution that
    failed: remembered): the caller runs the BN kernels' apply."""
    if tail_problem(x, x2 if x2 is not None else residual, relu) is not None:
        return None
    kind = TAIL_KINDS[x2 is not None]
    if tail_status(kind, x, save_mask):
        return None
    vec = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return _run_remembered(_tail_key(kind, x, save_mask), _run_tail, x, vec(mean), vec(scale),
                           vec(shift), residual, x2, vec(mean2), vec(scale2), vec(shift2),
                           save_mask)


def tail_note(kind: str, channels: int, device: torch.device) -> str:
    """How a tail site of ``channels`` on ``device`` (its BN's) runs its (dual) BN-add-ReLU
    on the tail path, from the tail graphs planned in this process (``explain``'s note)."""
    if device.type != "cuda":
        return f"the BN kernels' apply: cuDNN's {kind} graph runs on CUDA tensors only"
    if not _defined(_TAIL_OP):
        return f"the BN kernels' apply: fusedres._C was built without cuDNN's {kind} graph"
    if channels % CHANNEL_ALIGN:  # (tail_plan's one rule known from the modules)
        return (f"the BN kernels' apply: {channels} channels (cuDNN's {kind} graph needs "
                f"multiples of {CHANNEL_ALIGN})")
    rows = _remembered.rows(_LOCK, _STATUS, _ENGINE,
                            lambda k: k[0] == kind and k[3][1] == channels)
    refused = [(k, s) for k, s, _ in rows if s]
    if refused:
        k, s = refused[0]
        how = (f"cuDNN refused it at input {k[3]} {k[2]} (the BN kernels' apply runs): {s}")
    elif rows:
        how = f"on {rows[0][2] or 'cuDNN'}"
    else:
        how = ("planned at the first training call with a float16/bfloat16 channels_last "
               "input (else the BN kernels' apply)")
    return (f"the BN-add-ReLU apply in training: cuDNN's {kind} graph, {how}; its backward "
            "the BN kernels'")


class CudnnGraphTailConv(CudnnGraphConv):
    """``SitePlan(conv="cudnn-graph-tail")``: ``cudnn-graph``, and at a block tail in
    training the (dual) BN-add-ReLU apply as cuDNN's tail graph (``TAIL_KINDS``; its
    backward the BN kernels'). A candidate of ``fusedres.tune`` at tail sites only: it is
    used where it measured faster, never by default."""

    name = "cudnn-graph-tail"
    tail_graph = True
    tail_name = "cudnn-graph-tail"  # last_backend() after the tail graph ran

    def plain_site_note(self, kind: str, bn) -> str:
        if kind not in ("tail", "dual"):
            return ""
        device = bn.running_mean.device if bn.running_mean is not None else \
            next((p.device for p in bn.parameters()), torch.device("cpu"))
        return tail_note(TAIL_KINDS[kind == "dual"], bn.num_features, device)


conv_paths.register(CudnnGraphTailConv())

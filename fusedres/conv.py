"""Convolution with fused BN prologue / epilogues: custom ops, autograd, public functions.

Public functions (all take ``backend="auto" | "reference" | "triton"``; ``"cpu"`` and
``"cuda"`` are accepted and run the reference path, fusedres has no C++ conv; ``"auto"``
is ``F.conv2d`` (cuDNN on CUDA) until ``backend="triton"`` is named, see ``conv_path``):

* ``conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)``:
  equal to ``F.conv2d``. ``conv_path(...)`` says which path a call takes and why
  (groups > 1, dilation > 1, string padding, non-4-D ... go to ``F.conv2d``).
* ``conv2d_stats(input, weight, stride, padding) -> (y, mean, var)``: conv plus the
  per-channel batch mean and biased variance of ``y`` (a statistics epilogue).
* ``bn_relu_conv2d_stats(input, scale, shift, weight, stride, padding, *, centre=None)
  -> (y, mean, var)``: the same with the previous layer's BN-ReLU ``relu(input*scale +
  shift)``, or ``relu((input - centre)*scale + shift)`` with a centre (the BN's mean: then
  ``shift`` is beta and the gradient of ``scale`` is a sum about the mean, which does not
  cancel when the mean is large), applied while loading (never materialised); padded taps
  are 0 after it.
* ``conv2d_bias_add_relu(input, weight, bias, residual, stride, padding, relu=True, *,
  scale=None, shift=None, centre=None)``: conv + bias + residual + ReLU, the inference path
  with BN folded into the weights; optionally a BN-ReLU prologue (pre-activation BN; the
  Triton conv path's BN-ReLU -> conv sites, centred on the BN's mean).

``mean`` and ``var`` are differentiable outputs (fp32, fp64 for fp64 input): their
gradients supply the BN backward's ``-dbeta/M`` and ``-xhat*dgamma/M`` terms; the conv
backward folds them in as ``dy + dmean/M + dvar*2*(y - mean)/M``: a dBN prologue of the
dgrad and wgrad kernels, or one elementwise pass before the plain kernels, as
``fusedres.conv.dbn_backward`` says ("auto": timed once per shape on CUDA, "fused"
elsewhere; ``dbn_backward_choices()``, ``last_dbn_backward()`` report it).

Custom ops (namespace ``fusedres``; Triton kernels in ``kernels/conv.py``; they run on
CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1):

    triton_conv_bias_add_relu(Tensor input, Tensor weight, Tensor? bias, Tensor? residual,
                              int[] stride, int[] padding, bool relu,
                              Tensor? scale=None, Tensor? shift=None,
                              Tensor? centre=None) -> Tensor
    triton_conv_stats(Tensor input, Tensor weight, int[] stride, int[] padding)
                              -> (Tensor out, Tensor mean, Tensor var)
    triton_conv_prologue_stats(Tensor input, Tensor scale, Tensor shift, Tensor weight,
                              int[] stride, int[] padding, Tensor? centre=None)
                              -> (Tensor out, Tensor mean, Tensor var)
    triton_conv_backward(Tensor grad_out, Tensor input, Tensor weight, int[] stride,
                         int[] padding, Tensor? scale, Tensor? shift, Tensor? out,
                         Tensor? mean, Tensor? grad_mean, Tensor? grad_var,
                         bool[] output_mask, Tensor? centre=None)
                              -> (Tensor grad_input, Tensor grad_weight,
                                  Tensor grad_scale, Tensor grad_shift)

The prologue is ``relu(input*scale + shift)``, or ``relu((input - centre)*scale + shift)``
given a centre (per input channel): the kernels apply ``input*scale + (shift -
centre*scale)`` (``_folded_shift``, the same in forward and backward), and the dReLU
epilogue sums ``g*(input - centre)`` for ``grad_scale``.

Backward (all Triton, deterministic, no atomics): dgrad is a transposed implicit-GEMM
conv with the dBN prologue ("fused" mode; "materialised": after the dBN pass) and, for
the prologue op, a dReLU epilogue that recomputes the mask from ``input*scale + shift``
and emits the partial sums of dshift and dscale (the latter about the centre); wgrad
recomputes both prologues while loading (the dBN one in "fused" mode). For
``triton_conv_bias_add_relu`` the output ReLU mask and the bias/residual gradients are
computed with plain torch ops before the Triton dgrad/wgrad (an elementwise pass, not
fused).

Outputs are channels_last (NHWC memory) whatever the input layout; the ops convert a
non-channels_last input/weight on CUDA (a copy) and read any strides in the interpreter.
Under autocast the Python wrappers cast input, weight and conv bias only.
"""
from __future__ import annotations

import threading
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend
from .reference import acc_dtype, bn_relu_prologue

__all__ = [
    "conv2d", "conv_path", "conv2d_stats", "bn_relu_conv2d_stats", "conv2d_bias_add_relu",
    "dbn_backward_choices", "last_dbn_backward",
]

_KERNELS = None


def kernels():
    """``kernels/conv.py`` (imports triton on first use)."""
    global _KERNELS
    if _KERNELS is None:
        from fusedres.kernels import conv

        _KERNELS = conv
    return _KERNELS


def _pair(v) -> List[int]:
    if isinstance(v, int):
        return [v, v]
    v = [int(i) for i in v]
    return v * 2 if len(v) == 1 else v


def _out_hw(x: Tensor, weight: Tensor, stride, padding):
    h, w = x.shape[2], x.shape[3]
    r, s = weight.shape[2], weight.shape[3]
    return (h + 2 * padding[0] - r) // stride[0] + 1, (w + 2 * padding[1] - s) // stride[1] + 1


def _empty_cl(x: Tensor, n, c, h, w, dtype=None) -> Tensor:
    return x.new_empty((n, h, w, c), dtype=dtype or x.dtype).permute(0, 3, 1, 2)


def _prepare(t: Tensor) -> Tensor:
    """Channels_last for the fast path on GPU; the interpreter reads any strides."""
    if t.is_cuda and not t.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _folded_shift(scale: Optional[Tensor], shift: Optional[Tensor],
                  centre: Optional[Tensor]) -> Optional[Tensor]:
    """The shift the kernels add, ``input*scale + shift - centre*scale``, for the prologue
    ``(input - centre)*scale + shift``. Forward and backward both call this, so the ReLU mask
    the dgrad epilogue recomputes is bitwise the one the forward applied."""
    if centre is None or scale is None:
        return shift
    return shift - centre.to(scale.dtype) * scale


# --------------------------------------------------------------------------------------
# Forward ops
# --------------------------------------------------------------------------------------


@torch.library.custom_op("fusedres::triton_conv_bias_add_relu", mutates_args=())
def triton_conv_bias_add_relu(input: Tensor, weight: Tensor, bias: Optional[Tensor],
                              residual: Optional[Tensor], stride: List[int], padding: List[int],
                              relu: bool, scale: Optional[Tensor] = None,
                              shift: Optional[Tensor] = None,
                              centre: Optional[Tensor] = None) -> Tensor:
    """``[relu](conv2d([relu((input - centre)*scale + shift)], weight) + bias + residual)``
    in one Triton kernel (``centre`` None: 0); the optional BN-ReLU prologue is a
    pre-activation BN, or the BN of a BN-ReLU -> conv site."""
    y, _, _ = kernels().conv_fwd(_prepare(input), _prepare(weight), stride, padding, bias=bias,
                                 residual=residual, relu=relu, scale=scale,
                                 shift=_folded_shift(scale, shift, centre))
    return y


@triton_conv_bias_add_relu.register_fake
def _(input, weight, bias, residual, stride, padding, relu, scale=None, shift=None,
      centre=None):
    p, q = _out_hw(input, weight, stride, padding)
    return _empty_cl(input, input.shape[0], weight.shape[0], p, q)


@torch.library.custom_op("fusedres::triton_conv_stats", mutates_args=())
def triton_conv_stats(input: Tensor, weight: Tensor, stride: List[int],
                      padding: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """Conv with a statistics epilogue: ``(y, mean, var)`` of ``y`` per output channel."""
    y, mean, var = kernels().conv_fwd(_prepare(input), _prepare(weight), stride, padding,
                                      stats=True)
    return y, mean, var


def _stats_fake(input, weight, stride, padding):
    p, q = _out_hw(input, weight, stride, padding)
    co = weight.shape[0]
    acc = acc_dtype(input.dtype)
    return (_empty_cl(input, input.shape[0], co, p, q), input.new_empty(co, dtype=acc),
            input.new_empty(co, dtype=acc))


triton_conv_stats.register_fake(_stats_fake)


@torch.library.custom_op("fusedres::triton_conv_prologue_stats", mutates_args=())
def triton_conv_prologue_stats(input: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                               stride: List[int], padding: List[int],
                               centre: Optional[Tensor] = None
                               ) -> Tuple[Tensor, Tensor, Tensor]:
    """``conv2d(relu((input - centre)*scale + shift), weight)`` (``centre`` None: 0) with
    the BN-ReLU applied while loading (padded taps 0 after it) and a statistics epilogue:
    ``(y, mean, var)``."""
    y, mean, var = kernels().conv_fwd(_prepare(input), _prepare(weight), stride, padding,
                                      scale=scale, shift=_folded_shift(scale, shift, centre),
                                      stats=True)
    return y, mean, var


@triton_conv_prologue_stats.register_fake
def _(input, scale, shift, weight, stride, padding, centre=None):
    return _stats_fake(input, weight, stride, padding)


# --------------------------------------------------------------------------------------
# Backward op
# --------------------------------------------------------------------------------------


@torch.library.custom_op("fusedres::triton_conv_backward", mutates_args=())
def triton_conv_backward(grad_out: Tensor, input: Tensor, weight: Tensor, stride: List[int],
                         padding: List[int], scale: Optional[Tensor], shift: Optional[Tensor],
                         out: Optional[Tensor], mean: Optional[Tensor],
                         grad_mean: Optional[Tensor], grad_var: Optional[Tensor],
                         output_mask: List[bool], centre: Optional[Tensor] = None
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``conv2d([relu((input - centre)*scale + shift)], weight)`` (``centre``
    None: 0; its gradient is ``-scale*grad_shift``).

    When ``grad_mean``/``grad_var`` (the gradients of the batch statistics of the conv
    output ``out``, per output channel) are given, the gradient reaching the conv output
    is ``grad_out + grad_mean/M + grad_var*2*(out - mean)/M``: read through a prologue of
    the dgrad and wgrad kernels, or written once by an elementwise pass before the plain
    kernels (``dbn_backward``). ``output_mask`` = (input, weight, scale/shift).
    Unrequested gradients are empty tensors. ``grad_scale``/``grad_shift`` are in the
    accumulation dtype.
    """
    args = (grad_out, input, weight, stride, padding, scale, shift, out, mean, grad_mean,
            grad_var, output_mask, centre)
    if out is None or (grad_mean is None and grad_var is None):
        return _conv_backward(None, *args)
    mode, timed = _dbn_backward_mode(input, weight, grad_out, stride, padding,
                                     scale is not None, output_mask,
                                     lambda m: _conv_backward(m, *args))
    return timed if timed is not None else _conv_backward(mode, *args)


def _conv_backward(dbn_mode, grad_out, input, weight, stride, padding, scale, shift, out, mean,
                   grad_mean, grad_var, output_mask, centre):
    """``triton_conv_backward`` with the dBN term read as ``dbn_mode`` says: "fused" (the
    prologues), "materialised" (one elementwise pass, then the plain kernels) or None (no
    statistics gradient)."""
    global _LAST_DBN_BACKWARD
    k = kernels()
    dy = _prepare(grad_out)
    y = coef_y = coef_c = None
    if dbn_mode == "fused":
        y = out
        coef_y, coef_c = _dbn_coefs(out, mean, grad_mean, grad_var)
    elif dbn_mode == "materialised":
        dy = _materialise_dy(dy, out, mean, grad_mean, grad_var)
    prologue = scale is not None
    acc = acc_dtype(input.dtype)
    gi = input.new_empty(0)
    gw = weight.new_empty(0)
    gs = input.new_empty(0, dtype=acc)
    gsh = input.new_empty(0, dtype=acc)
    need_in, need_w, need_ss = output_mask
    need_ss = need_ss and prologue
    x = _prepare(input)
    shift = _folded_shift(scale, shift, centre)
    if need_in or need_ss:
        dx, sum_g, sum_gy = k.conv_dgrad(
            dy, _prepare(weight), (input.shape[2], input.shape[3]), stride, padding,
            y=y, coef_y=coef_y, coef_c=coef_c, y_mean=mean if y is not None else None,
            y_prev=x if prologue else None,
            scale=scale, shift=shift, y_prev_centre=centre)
        if need_in:
            gi = dx
        if need_ss:
            gs, gsh = sum_gy, sum_g
    if need_w:
        gw = k.conv_wgrad(dy, x, tuple(weight.shape), stride, padding, y=y, coef_y=coef_y,
                          coef_c=coef_c, y_mean=mean if y is not None else None,
                          scale=scale, shift=shift)
    if dbn_mode is not None:
        _LAST_DBN_BACKWARD = dbn_mode
    return gi, gw, gs, gsh


@triton_conv_backward.register_fake
def _(grad_out, input, weight, stride, padding, scale, shift, out, mean, grad_mean, grad_var,
      output_mask, centre=None):
    acc = acc_dtype(input.dtype)
    need_in, need_w, need_ss = output_mask
    need_ss = need_ss and scale is not None
    n, ci, h, w = input.shape
    co, _, r, s = weight.shape
    gi = _empty_cl(input, n, ci, h, w) if need_in else input.new_empty(0)
    if need_w:
        gw = weight.new_empty((co, r, s, ci), dtype=input.dtype).permute(0, 3, 1, 2)
    else:
        gw = weight.new_empty(0)
    gs = input.new_empty(ci if need_ss else 0, dtype=acc)
    gsh = input.new_empty(ci if need_ss else 0, dtype=acc)
    return gi, gw, gs, gsh


def _dbn_terms(out, mean, dmean, dvar):
    """Per-channel (coef_y, coef_mean): dy_total = dy + (out - mean)*coef_y + coef_mean."""
    m = out.shape[0] * out.shape[2] * out.shape[3]
    dmean = torch.zeros_like(mean) if dmean is None else dmean.to(mean.dtype)
    dvar = torch.zeros_like(mean) if dvar is None else dvar.to(mean.dtype)
    return dvar * (2.0 / m), dmean / m


def _dbn_coefs(out, mean, dmean, dvar):
    """Per-channel (coef_y, coef_c): dy_total = dy + out*coef_y + coef_c (the prologues'
    form: one FMA per element)."""
    if dmean is None and dvar is None:
        return None, None
    coef_y, coef_mean = _dbn_terms(out, mean, dmean, dvar)
    f64 = torch.float64  # coef_c in float64: the kernels centre again on the mean
    return coef_y, coef_mean.to(f64) - coef_y.to(f64) * mean.to(f64)


def _materialise_dy(dy, out, mean, dmean, dvar):
    """``dy + (out - mean)*coef_y + coef_mean`` written once, channels_last, in ``out``'s
    dtype: the BN backward's apply kernel (``kernels/bn.py``, ``_bn_bwd_apply_kernel``:
    ``coef_g*g + coef_xc*(x - mean) + coef_c``, math in fp32 / fp64, one rounding at the
    store) with g = dy, x = out, coef_g = 1. The centred form is the BN kernels' own (a
    large mean with a small spread stays exact)."""
    from fusedres.kernels import bn

    n, c, h, w = out.shape
    coef_y, coef_mean = _dbn_terms(out, mean, dmean, dvar)
    total, _ = bn.bn_backward_apply(dy.reshape(n, c, h * w), out.reshape(n, c, h * w), mean,
                                    None, None, None, torch.ones_like(coef_y), coef_y,
                                    coef_mean, False, False, True)
    return total.view(n, c, h, w)


# dBN backward: fused prologues or one materialising pass ---------------------------------

dbn_backward = "auto"
"""How the Triton conv backward reads ``dy_total = dy + (y - mean)*coef_y + coef_mean``
when the conv's output statistics feed a BN (``conv2d_stats``, ``bn_relu_conv2d_stats``):

* ``"fused"``: through a prologue of both the dgrad and the wgrad kernel (fp32 math per
  element, in each kernel's loop; no extra memory traffic);
* ``"materialised"``: one elementwise pass writes ``dy_total`` (fp32 math, rounded once to
  the activation dtype, channels_last), then the plain dgrad and wgrad kernels read it
  (cuDNN's dBNApply route: reads dy and y and writes dy_total once more);
* ``"auto"`` (default): on CUDA, both are timed once per (device, dtype, shapes, stride,
  padding, BN-ReLU prologue, requested gradients) by ``fusedres._timing`` (interleaved
  rounds, each a median of CUDA-event repetitions) and the faster is kept (materialised
  only if ``fusedres.tune.clearly_faster``), in memory and in the decision cache on disk
  (``fusedres._tune_cache``; ``FUSEDRES_CACHE=0`` turns that off). The first backward of
  a new shape pays for it: both backward paths autotuned and run for at least 5 rounds
  (~0.1-1 s; the chosen path's last timed run is that call's result). Never timed
  during CUDA-graph capture or torch.compile tracing, nor under
  ``torch.use_deterministic_algorithms(True)`` (the choice must not vary between
  processes): the cached choice if there is one (deterministic mode: always), else
  ``"fused"``. On CPU tensors (the interpreter) ``"auto"`` is ``"fused"``: nothing to time.

``dbn_backward_choices()`` lists what ``"auto"`` decided; ``last_dbn_backward()`` says which
path the latest backward with statistics gradients took.
"""

DBN_BACKWARD_MODES = ("fused", "materialised", "auto")
_TIMED_DEVICE_TYPES = ("cuda",)  # where "auto" measures (tests add "cpu")
_DBN_LOCK = threading.Lock()
_DBN_CHOICES: dict = {}  # signature digest -> entry (choice, times, signature, source)
_DBN_DISK: dict = {}  # device -> its DecisionCache (or None: caching off)
_LAST_DBN_BACKWARD: Optional[str] = None


def dbn_backward_choices() -> List[dict]:
    """What ``dbn_backward="auto"`` decided in this process, one dict per signature:
    device, dtype, shapes, stride, padding, prologue, output_mask, ``choice``,
    ``fused_ms`` / ``materialised_ms`` (medians) and ``source`` ("timed" | "disk cache")."""
    return [dict(e["signature"], choice=e["choice"], fused_ms=e["fused_ms"],
                 materialised_ms=e["materialised_ms"], source=e["source"])
            for e in list(_DBN_CHOICES.values())]


def dbn_backward_note() -> str:
    """What ``explain`` says of a Triton conv's backward where the conv's statistics feed
    a BN: how the dBN term runs under the current ``dbn_backward``."""
    if dbn_backward == "auto":
        return ("backward: the dBN term fused into dgrad/wgrad or materialised once, timed "
                "per shape on CUDA at the first backward (dbn_backward='auto'; fused on "
                "CPU; fusedres.conv.dbn_backward_choices() lists the decisions)")
    return f"backward: the dBN term {dbn_backward} (dbn_backward={dbn_backward!r})"


def last_dbn_backward() -> Optional[str]:
    """``"fused"`` | ``"materialised"``: the path of the latest Triton conv backward with
    statistics gradients in this process (None before the first)."""
    return _LAST_DBN_BACKWARD


def _dbn_backward_mode(input, weight, grad_out, stride, padding, prologue, output_mask, run):
    """``(mode, result)``: the mode this call runs -- ``dbn_backward``, with "auto" resolved
    (see there) -- and, when "auto" timed it just now, the chosen mode's last timed
    output (this call's gradients: no extra backward), else None. ``run(mode)`` runs the
    whole backward in that mode (what "auto" times)."""
    global _LAST_DBN_BACKWARD
    mode = dbn_backward
    if mode not in DBN_BACKWARD_MODES:
        raise ValueError(f"fusedres.conv.dbn_backward = {mode!r}; expected one of "
                         f"{DBN_BACKWARD_MODES}")
    device = input.device
    if mode != "auto" or device.type not in _TIMED_DEVICE_TYPES \
            or torch.are_deterministic_algorithms_enabled():
        return ("fused" if mode == "auto" else mode), None
    from ._tune_cache import digest

    signature = {"op": "triton_conv_backward.dbn", "device": str(device),
                 "dtype": str(input.dtype).replace("torch.", ""),
                 "shapes": [list(grad_out.shape), list(input.shape), list(weight.shape)],
                 "stride": list(stride), "padding": list(padding), "prologue": bool(prologue),
                 "output_mask": [bool(b) for b in output_mask]}
    entry = _DBN_CHOICES.get(digest(signature))
    if entry is not None:
        return entry["choice"], None
    from fusedres.kernels import tracing_or_capturing

    if tracing_or_capturing(device):
        return "fused", None
    entry, outputs = _measure_dbn_backward(device, signature, run)
    with _DBN_LOCK:
        _DBN_CHOICES[digest(signature)] = entry
    timed = outputs.get(entry["choice"])
    if timed is not None:  # the timing ran the modes in turn: the last was maybe the other
        _LAST_DBN_BACKWARD = entry["choice"]
    return entry["choice"], timed


def _measure_dbn_backward(device, signature, run) -> Tuple[dict, dict]:
    """``(entry, outputs)``: the cached decision of ``signature`` (disk; no outputs), else
    both modes timed, the winner written to the cache, and each mode's last timed output
    (``{mode: run(mode)}``: the caller keeps the winner's instead of running it again)."""
    from . import _timing, _tune_cache
    from .tune import clearly_faster

    key = str(device)
    if key not in _DBN_DISK:
        directory = _tune_cache.cache_dir()
        _DBN_DISK[key] = _tune_cache.DecisionCache(
            directory, _tune_cache.environment(device, DBN_BACKWARD_MODES[:2]),
            owner="fusedres.conv.dbn_backward") if directory else None
    disk = _DBN_DISK[key]
    entry = disk.get(signature) if disk is not None else None
    if entry is not None:
        return dict(entry, source="disk cache"), {}
    outputs: dict = {}

    def timed(mode):
        outputs[mode] = run(mode)

    samples = _timing.interleaved_samples(
        {m: (lambda m=m: timed(m)) for m in DBN_BACKWARD_MODES[:2]}, device)
    faster = clearly_faster(samples["materialised"], samples["fused"])
    entry = {"choice": "materialised" if faster else "fused",
             "fused_ms": _timing.spread(samples["fused"])[0] * 1e3,
             "materialised_ms": _timing.spread(samples["materialised"])[0] * 1e3}
    if disk is not None:
        disk.put(signature, entry)
        disk.save()
    return dict(entry, signature=signature, source="timed"), outputs


def _grad_or_zero(g, like):
    return torch.zeros_like(like) if g is None else g


# autograd of triton_conv_stats ----------------------------------------------------------


def _stats_setup(ctx, inputs, output):
    input, weight, stride, padding = inputs
    y, mean, _ = output
    ctx.save_for_backward(input, weight, y, mean)
    ctx.conv = (list(stride), list(padding))


def _stats_backward(ctx, dy, dmean, dvar):
    input, weight, y, mean = ctx.saved_tensors
    stride, padding = ctx.conv
    gi, gw, _, _ = torch.ops.fusedres.triton_conv_backward(
        _grad_or_zero(dy, y), input, weight, stride, padding, None, None, y, mean, dmean, dvar,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
    return (gi if ctx.needs_input_grad[0] else None,
            gw if ctx.needs_input_grad[1] else None, None, None)


torch.library.register_autograd("fusedres::triton_conv_stats", _stats_backward,
                                setup_context=_stats_setup)


# autograd of triton_conv_prologue_stats -------------------------------------------------


def _prologue_setup(ctx, inputs, output):
    input, scale, shift, weight, stride, padding, centre = inputs
    y, mean, _ = output
    ctx.save_for_backward(input, scale, shift, weight, y, mean, centre)
    ctx.conv = (list(stride), list(padding))


def _needs_grad(ctx, i: int) -> bool:
    """``ctx.needs_input_grad[i]``; a trailing optional input left at its default (None)
    has no entry."""
    return i < len(ctx.needs_input_grad) and ctx.needs_input_grad[i]


def _centre_grad(centre, scale, grad_shift):
    """The gradient of the prologue's centre: ``-scale*sum(g)``."""
    return (-scale * grad_shift.to(scale.dtype)).to(centre.dtype)


def _prologue_backward(ctx, dy, dmean, dvar):
    input, scale, shift, weight, y, mean, centre = ctx.saved_tensors
    stride, padding = ctx.conv
    need = ctx.needs_input_grad
    gi, gw, gs, gsh = torch.ops.fusedres.triton_conv_backward(
        _grad_or_zero(dy, y), input, weight, stride, padding, scale, shift, y, mean, dmean, dvar,
        [need[0], need[3], need[1] or need[2] or _needs_grad(ctx, 6)], centre)
    return (gi if need[0] else None,
            gs.to(scale.dtype) if need[1] else None,
            gsh.to(shift.dtype) if need[2] else None,
            gw if need[3] else None, None, None,
            _centre_grad(centre, scale, gsh) if _needs_grad(ctx, 6) else None)


torch.library.register_autograd("fusedres::triton_conv_prologue_stats", _prologue_backward,
                                setup_context=_prologue_setup)


# autograd of triton_conv_bias_add_relu --------------------------------------------------


def _bar_setup(ctx, inputs, output):
    input, weight, bias, residual, stride, padding, relu, scale, shift, centre = inputs
    ctx.save_for_backward(input, weight, output if relu else None, scale, shift, centre)
    ctx.conv = (list(stride), list(padding))
    ctx.relu = relu
    ctx.has_bias = bias is not None
    ctx.res_dtype = residual.dtype if residual is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _bar_backward(ctx, dout):
    input, weight, out, scale, shift, centre = ctx.saved_tensors
    stride, padding = ctx.conv
    need = ctx.needs_input_grad
    need_centre = _needs_grad(ctx, 9)
    need_ss = scale is not None and (need[7] or need[8] or need_centre)
    # NOT fused: the output ReLU mask is applied by a torch elementwise op.
    g = torch.where(out <= 0, torch.zeros_like(dout), dout) if ctx.relu else dout
    gi = gw = gs = gsh = None
    if need[0] or need[1] or need_ss:
        gi, gw, gs, gsh = torch.ops.fusedres.triton_conv_backward(
            g, input, weight, stride, padding, scale, shift, None, None, None, None,
            [need[0], need[1], need_ss], centre)
    gb = g.sum(dim=(0, 2, 3), dtype=acc_dtype(g.dtype)).to(ctx.bias_dtype) \
        if ctx.has_bias and need[2] else None
    gr = g.to(ctx.res_dtype) if ctx.res_dtype is not None and need[3] else None
    return (gi if need[0] else None, gw if need[1] else None, gb, gr, None, None, None,
            gs.to(scale.dtype) if need_ss and need[7] else None,
            gsh.to(shift.dtype) if need_ss and need[8] else None,
            _centre_grad(centre, scale, gsh) if need_ss and need_centre else None)


torch.library.register_autograd("fusedres::triton_conv_bias_add_relu", _bar_backward,
                                setup_context=_bar_setup)


# --------------------------------------------------------------------------------------
# Legality, backend choice, public functions
# --------------------------------------------------------------------------------------

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def conv_path(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1,
              padding=0, dilation=1, groups=1, backend: str = "auto") -> Tuple[str, str]:
    """``("triton" | "reference", reason)``: the path a conv call takes and why.

    ``auto`` is the untuned safe default on every device: ``F.conv2d`` (cuDNN on CUDA),
    with the statistics and BN-ReLU as separate torch ops. The Triton implicit-GEMM conv
    runs only where it is named (``backend="triton"``: on CUDA tensors, or in the
    interpreter on CPU) or where ``fusedres.tune`` chose it for a model's site. A named
    backend that cannot run on the device raises (``resolve_backend``).
    """
    device = input.device
    if backend == "reference":
        return "reference", "backend='reference' requested"
    if backend == "auto":
        return "reference", ("auto uses F.conv2d (cuDNN on CUDA); the Triton conv runs where "
                             "backend='triton' is named or fusedres.tune picks it")
    resolved = _backend.resolve_backend(device, backend)  # raises if it cannot run
    if resolved != "triton":
        return "reference", (f"fusedres has no C++ conv kernel: backend={backend!r} uses "
                             "F.conv2d (cuDNN on CUDA)")
    if input.dim() != 4 or weight.dim() != 4:
        return "reference", "the Triton conv handles 4-D (N, C, H, W) input and weight only"
    if groups != 1:
        return "reference", f"groups={groups} > 1 goes to F.conv2d (cuDNN)"
    if isinstance(padding, str):
        return "reference", f"padding={padding!r} (a string) goes to F.conv2d"
    if _pair(dilation) != [1, 1]:
        return "reference", f"dilation={dilation} > 1 goes to F.conv2d (cuDNN)"
    if input.dtype not in _TRITON_DTYPES:
        return "reference", f"dtype {input.dtype} is not supported by the Triton conv"
    if input.dtype == torch.bfloat16 and device.type != "cuda":
        return "reference", "bfloat16 does not run in the Triton interpreter"
    if weight.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype):
        return "reference", "input, weight and bias dtypes differ (F.conv2d decides)"
    if weight.device != device or (bias is not None and bias.device != device):
        return "reference", "tensors on different devices (F.conv2d raises the error)"
    if weight.shape[1] != input.shape[1]:
        return "reference", "channel mismatch (F.conv2d raises the error)"
    st, pd = _pair(stride), _pair(padding)
    if min(st) < 1 or min(pd) < 0:
        return "reference", "invalid stride/padding (F.conv2d raises the error)"
    p, q = _out_hw(input, weight, st, pd)
    if input.numel() == 0 or p <= 0 or q <= 0:
        return "reference", "empty input or output goes to F.conv2d"
    n, c, h, w = input.shape
    if n * max(p * q, h * w) >= 2**31 or weight[0].numel() >= 2**31:
        return "reference", "a GEMM dimension >= 2**31 (the Triton conv indexes in int32)"
    return "triton", "Triton implicit-GEMM conv"


def autocast_inputs(input, weight, bias):
    """Cast input, weight and conv bias (only) to the autocast dtype, as torch's conv.
    Devices without autocast (``meta``: deferred initialisation, FLOP counting) pass
    through unchanged."""
    dev = input.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        input, weight = input.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    return input, weight, bias


def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
           dilation=1, groups=1, *, backend: str = "auto") -> Tensor:
    """Equal to ``F.conv2d``; the Triton path returns a channels_last tensor."""
    if backend != "reference":
        input, weight, bias = autocast_inputs(input, weight, bias)
    path, _ = conv_path(input, weight, bias, stride, padding, dilation, groups, backend)
    if path == "reference":
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return torch.ops.fusedres.triton_conv_bias_add_relu(input, weight, bias, None,
                                                        _pair(stride), _pair(padding), False)


def batch_stats(y: Tensor):
    """Differentiable per-channel batch ``(mean, biased var)`` of an (N, C, H, W) tensor,
    in fp32 (fp64 for fp64): the reference of the conv's statistics epilogue."""
    var, mean = torch.var_mean(y.to(acc_dtype(y.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


def conv2d_stats(input: Tensor, weight: Tensor, stride=1, padding=0, *,
                 backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)``: ``y = conv2d(input, weight)`` and its per-channel batch mean and
    biased variance (fp32; fp64 for fp64 input), all differentiable."""
    if backend != "reference":
        input, weight, _ = autocast_inputs(input, weight, None)
    path, _ = conv_path(input, weight, None, stride, padding, 1, 1, backend)
    if path == "reference":
        y = F.conv2d(input, weight, None, stride, padding)
        return (y, *batch_stats(y))
    return torch.ops.fusedres.triton_conv_stats(input, weight, _pair(stride), _pair(padding))


def bn_relu_conv2d_stats(input: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, stride=1,
                         padding=0, *, centre: Optional[Tensor] = None,
                         backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)`` of ``y = conv2d(relu((input - centre)*scale + shift), weight)``
    (``centre`` None: ``relu(input*scale + shift)``).

    ``scale``/``shift``/``centre`` (C_in,) are per input channel (fp32, or fp64 for fp64
    input) and differentiable; zero padding applies after the ReLU, as in the unfused
    network. For a BN with batch statistics pass ``centre=mean``, ``scale =
    gamma*invstd``, ``shift = beta`` (``ops.centred_scale_shift``): the gradient of
    ``scale`` is then a sum of ``g*(input - mean)``. In the uncentred form ``shift = beta -
    mean*scale`` autograd subtracts ``mean*sum(g)`` from ``sum(g*input)``, which cancels
    where the mean is large against the spread (fp32, mean/std 100: dgamma 14x torch's
    error, the input's gradient 2-4x).
    """
    if backend != "reference":
        input, weight, _ = autocast_inputs(input, weight, None)
    path, _ = conv_path(input, weight, None, stride, padding, 1, 1, backend)
    if path == "reference":
        y = F.conv2d(bn_relu_prologue(input, scale, shift, centre), weight, None, stride,
                     padding)
        return (y, *batch_stats(y))
    return torch.ops.fusedres.triton_conv_prologue_stats(input, scale, shift, weight,
                                                         _pair(stride), _pair(padding), centre)


def conv2d_bias_add_relu(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         residual: Optional[Tensor] = None, stride=1, padding=0, relu: bool = True,
                         *, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                         centre: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """``[relu](conv2d(input, weight, bias) + residual)`` (eval-mode block, BN folded).

    With ``scale``/``shift`` (C_in,), the input goes through ``relu(input*scale + shift)``,
    or ``relu((input - centre)*scale + shift)`` with ``centre`` (C_in,), while loading (a
    pre-activation BN-ReLU, which cannot fold into weights; a BN-ReLU -> conv site: centred
    on the BN's mean, see ``bn_relu_conv2d_stats``).
    """
    if backend != "reference":
        input, weight, bias = autocast_inputs(input, weight, bias)
    path, _ = conv_path(input, weight, bias, stride, padding, 1, 1, backend)
    if path == "reference":
        if scale is not None:
            input = bn_relu_prologue(input, scale, shift, centre)
        y = F.conv2d(input, weight, bias, stride, padding)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y
    return torch.ops.fusedres.triton_conv_bias_add_relu(input, weight, bias, residual,
                                                        _pair(stride), _pair(padding), relu,
                                                        scale, shift, centre)

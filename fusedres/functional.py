"""Fused functions mirroring ``torch.nn.functional.batch_norm``.

    batch_norm_relu(x, ...)            == relu(F.batch_norm(x, ...))
    batch_norm_add_relu(x, r, ...)     == relu(F.batch_norm(x, ...) + r)
    dual_batch_norm_add_relu(x, s, ...)
                                       == relu(F.batch_norm(x, ...) + F.batch_norm(s, ...))
    batch_norm(x, ..., relu=False)     == F.batch_norm(x, ...), relu optional

The second activation (``residual``, ``shortcut``) always comes right after ``input``;
then ``F.batch_norm``'s arguments (for ``dual_batch_norm_add_relu``: the main BN's four
per-channel tensors, then the shortcut BN's four). Before fusedres 0.2 the shortcut came
sixth, after ``bias``: such a call raises a TypeError that says so.

The convolutions (``conv2d``, ``conv2d_stats``, ``bn_relu_conv2d_stats``,
``conv2d_bias_add_relu``, ``conv_path``) are ``fusedres.conv``'s, re-exported here so
that every public function lives in this one module.

Every function takes ``backend="auto"`` (see ``fusedres.resolve_backend``): ``auto``
picks the compiled kernels for the tensors' device and falls back to ``reference``
(composite PyTorch) only when no kernel for that device is available;
``fusedres.functional.last_backend()`` tells which one ran.

Supported: any input of 2 or more dims ``(N, C, *spatial)``, any strides (NCHW,
channels_last, strided views; a copy is made only if the spatial dims cannot be merged),
float32/float16/bfloat16/float64 input with parameters and running statistics of the
input's dtype or float32 (the autocast case), training and eval, ``running_mean=None``
(no tracking), ``weight=None``/``bias=None`` (no affine). Running statistics update
exactly as ``nn.BatchNorm2d``: ``momentum`` float, or ``momentum=None`` with
``num_batches_tracked`` for a cumulative average (modules pass it).
Residual and shortcut tensors must have the input's shape and dtype.

``process_group=`` (a ``torch.distributed`` group, e.g. ``dist.group.WORLD``)
synchronises the batch statistics across processes in training, as
``nn.SyncBatchNorm`` does, on CPU (gloo) and GPU (NCCL); see ``fusedres.distributed``.

Where the fused kernels have no formula, the call runs through the reference composite
(``F.batch_norm``), and ``last_backend()`` says ``"reference"``:

* forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad`` dual tensors) and
  the differentiating ``torch.func`` transforms (``grad``, ``vjp``, ``jacrev``, ...);
* double backward (``create_graph=True``, gradient penalties): the first-order gradients
  still come from the fused backward kernels; their derivative is computed by
  recomputing the first-order gradient through the reference composite (the ReLU mask of
  the forward kept). ``last_backend()`` says ``"reference"`` after it (autograd runs CPU
  backward on the thread that called it; CUDA backward on its device thread).
* ``meta`` tensors (deferred initialisation, FLOP counting) and any other device without
  kernels: the reference composite, as ``fusedres.resolve_backend`` says.

``eps`` is checked as ``F.batch_norm`` does: ``eps <= 0`` in training and ``eps < 0`` in
eval raise ``ValueError``.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import Tensor

from . import distributed, ops
from . import reference as _ref
from ._backend import resolve_backend
from .conv import bn_relu_conv2d_stats, conv2d, conv2d_bias_add_relu, conv2d_stats, conv_path

__all__ = ["batch_norm", "batch_norm_relu", "batch_norm_add_relu", "dual_batch_norm_add_relu",
           "last_backend", "conv2d", "conv2d_stats", "bn_relu_conv2d_stats",
           "conv2d_bias_add_relu", "conv_path"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCED = (torch.float16, torch.bfloat16)
_last = threading.local()  # last_backend()
_module_last = threading.local()  # fusedres.nn.last_backend()


def last_backend() -> Optional[str]:
    """The backend the most recent fused call on this thread ran with (``"reference"``
    after a double backward, which runs through the reference composite)."""
    return getattr(_last, "backend", None)


def _record(name: str) -> None:
    _last.backend = name


_PARAMS = ("running_mean", "running_var", "weight", "bias")
_SHORTCUT_PARAMS = tuple(f"shortcut_{name}" for name in _PARAMS)


def _check_params(names: tuple, params: tuple, device: torch.device, channels: int,
                  dtype: torch.dtype) -> None:
    """Per-channel tensors (running stats, weight, bias; None allowed) against the input's
    device, channel count and dtype. One call for the four of a BN: the per-call Python
    is a real share of a small layer's time on CPU."""
    for name, t in zip(names, params):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
        if t.device != device:
            raise RuntimeError(f"{name} is on {t.device} but input is on {device}")
        if t.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
        if t.dtype != dtype and not (t.dtype == torch.float32 and dtype in _REDUCED):
            reduced = dtype in _REDUCED
            raise TypeError(f"{name} has dtype {t.dtype}; with {dtype} input it must be "
                            f"{dtype}" + (" or torch.float32" if reduced else ""))


def _check_activation(name: str, t: Tensor, x: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise RuntimeError(f"{name} is on {t.device} but input is on {x.device}")
    if t.shape != x.shape:
        raise RuntimeError(f"{name} has shape {tuple(t.shape)} but input has {tuple(x.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but input has {x.dtype}; cast it first")


def _check_input(x: Tensor, training: bool, running_mean, running_var) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"expected input of 2 or more dims (N, C, ...), got {x.dim()}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"batch norm of {x.dtype} input is not supported; expected one of "
                        f"{_FLOATS}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")


def _check_eps(eps: float, training: bool) -> None:
    """``F.batch_norm``'s check, with its messages."""
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _differentiating_transform() -> bool:
    """Forward-mode AD (a ``forward_ad.dual_level``, which ``torch.func.jvp`` enters too)
    or a ``torch.func`` transform that differentiates (grad, vjp, jacrev...): the fused
    ops' autograd formulas do not run there. ``vmap`` alone keeps the fused ops.
    Under torch.compile, dynamo handles the transforms itself."""
    if _forward_ad._current_level < 0 and torch._C._functorch.maybe_current_level() is None:
        return False  # the common case first: ~0.2 us
    if torch.compiler.is_compiling():
        return False
    if _forward_ad._current_level >= 0:
        return True
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() != TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def _fused(x, residual, running_mean, running_var, weight, bias, shortcut, sc_running_mean,
           sc_running_var, sc_weight, sc_bias, training, momentum, eps, relu, backend,
           num_batches_tracked, process_group=None):
    """The one path behind every public function."""
    _check_input(x, training, running_mean, running_var)
    if process_group is not None:
        distributed.check_process_group(process_group)
    synced = training and process_group is not None and distributed.world_size(process_group) > 1
    numel, channels = x.numel(), x.shape[1]
    # With synchronised statistics one rank may hold a single value, or none.
    if training and not synced and numel > 0 and numel // channels <= 1:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {x.shape}")
    _check_eps(eps, training)
    device, dtype = x.device, x.dtype
    _check_params(_PARAMS, (running_mean, running_var, weight, bias), device, channels, dtype)
    if residual is not None:
        _check_activation("residual", residual, x)
    if shortcut is not None:
        _check_activation("shortcut", shortcut, x)
        if training is False and sc_running_mean is None:
            raise RuntimeError("shortcut_running_mean must be defined in evaluation mode")
        _check_params(_SHORTCUT_PARAMS, (sc_running_mean, sc_running_var, sc_weight, sc_bias),
                      device, channels, dtype)
    if momentum is None and num_batches_tracked is None and training and running_mean is not None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")

    name = resolve_backend(x.device, backend)
    if name != "reference" and _differentiating_transform():
        name = "reference"  # the fused ops have no forward-mode / functorch formula
    if name == "reference" and synced:
        raise RuntimeError("synchronised BN runs on the fused kernels; the reference backend "
                           "has none (use torch.nn.SyncBatchNorm for a reference)")
    if name == "reference" or (numel == 0 and not synced):
        # Empty batches go through torch itself (no zero-size launch; torch's semantics).
        _record("reference")
        return _composite(x, residual, running_mean, running_var, weight, bias, shortcut,
                          sc_running_mean, sc_running_var, sc_weight, sc_bias, training,
                          momentum, eps, relu, num_batches_tracked)
    _record(name)

    if synced:
        x3 = ops.ncs(x)
        out, mean, var, mean2, var2, count = distributed.sync_batch_norm_act(
            x3, weight, bias, ops.ncs(residual), ops.ncs(shortcut), sc_weight, sc_bias, eps, relu,
            ops.is_channels_last(x3), name, process_group)
        out = out.view(x.shape)
    elif name in ops.NATIVE_BACKENDS:  # one C++ op per direction (csrc/bn_fused.cpp)
        out, mean, var, mean2, var2, _ = torch.ops.fusedres.bn_act_forward.default(
            x, weight, bias, running_mean, running_var, residual, shortcut, sc_weight, sc_bias,
            sc_running_mean, sc_running_var, training, eps, relu)
        count = numel // channels
    else:
        x3 = ops.ncs(x)
        out, mean, var, mean2, var2, _ = torch.ops.fusedres.batch_norm_act(
            x3, weight, bias, running_mean, running_var, ops.ncs(residual), ops.ncs(shortcut),
            sc_weight, sc_bias, sc_running_mean, sc_running_var, training, eps, relu,
            ops.is_channels_last(x3), name)
        out = out.view(x.shape)
        count = x3.shape[0] * x3.shape[2]
    if training:
        ops.update_from_batch(running_mean, running_var, mean, var, count, momentum,
                              num_batches_tracked)
        if shortcut is not None:
            ops.update_from_batch(sc_running_mean, sc_running_var, mean2, var2, count,
                                  momentum, num_batches_tracked)
    return out


def _composite(x, residual, running_mean, running_var, weight, bias, shortcut, sc_running_mean,
               sc_running_var, sc_weight, sc_bias, training, momentum, eps, relu,
               num_batches_tracked):
    if momentum is None:  # torch's own cumulative average, as nn.BatchNorm computes it
        # (a meta counter has no value and its statistics none to update: any factor)
        momentum = 0.0 if num_batches_tracked is None or num_batches_tracked.is_meta \
            else 1.0 / float(num_batches_tracked)
    y = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training,
                                       momentum, eps)
    if shortcut is not None:
        y = y + torch.nn.functional.batch_norm(shortcut, sc_running_mean, sc_running_var,
                                               sc_weight, sc_bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5, *,
               relu: bool = False, residual: Optional[Tensor] = None,
               num_batches_tracked: Optional[Tensor] = None, backend: str = "auto",
               process_group=None) -> Tensor:
    """``[relu](F.batch_norm(input, ...) [+ residual])``: the general form."""
    return _fused(input, residual, running_mean, running_var, weight, bias, None, None, None,
                  None, None, training, momentum, eps, relu, backend, num_batches_tracked,
                  process_group)


def batch_norm_relu(input: Tensor, running_mean: Optional[Tensor],
                    running_var: Optional[Tensor], weight: Optional[Tensor] = None,
                    bias: Optional[Tensor] = None, training: bool = False,
                    momentum: Optional[float] = 0.1, eps: float = 1e-5, *,
                    num_batches_tracked: Optional[Tensor] = None,
                    backend: str = "auto", process_group=None) -> Tensor:
    """``relu(F.batch_norm(input, running_mean, running_var, weight, bias, training,
    momentum, eps))``, fused: statistics in one pass, normalise+ReLU in one pass, and a
    backward that recomputes the ReLU mask from ``input`` (nothing else is stored)."""
    return _fused(input, None, running_mean, running_var, weight, bias, None, None, None, None,
                  None, training, momentum, eps, True, backend, num_batches_tracked,
                  process_group)


def batch_norm_add_relu(input: Tensor, residual: Tensor, running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], weight: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None, training: bool = False,
                        momentum: Optional[float] = 0.1, eps: float = 1e-5, *,
                        num_batches_tracked: Optional[Tensor] = None,
                        backend: str = "auto", process_group=None) -> Tensor:
    """``relu(F.batch_norm(input, ...) + residual)``: the identity-shortcut block tail.
    Backward keeps a 1-bit ReLU mask, not the residual."""
    if residual is None:
        raise TypeError("batch_norm_add_relu needs a residual tensor; use batch_norm_relu")
    return _fused(input, residual, running_mean, running_var, weight, bias, None, None, None,
                  None, None, training, momentum, eps, True, backend, num_batches_tracked,
                  process_group)


def dual_batch_norm_add_relu(input: Tensor, shortcut: Tensor,
                             running_mean: Optional[Tensor], running_var: Optional[Tensor],
                             weight: Optional[Tensor], bias: Optional[Tensor],
                             shortcut_running_mean: Optional[Tensor],
                             shortcut_running_var: Optional[Tensor],
                             shortcut_weight: Optional[Tensor], shortcut_bias: Optional[Tensor],
                             training: bool = False, momentum: Optional[float] = 0.1,
                             eps: float = 1e-5, *, num_batches_tracked: Optional[Tensor] = None,
                             backend: str = "auto", process_group=None) -> Tensor:
    """``relu(bn(input) + bn_shortcut(shortcut))``: the projection-shortcut block tail,
    both BNs applied in one kernel. ``shortcut`` comes second, as ``batch_norm_add_relu``'s
    residual; then the main BN's running mean, running var, weight and bias, then the
    shortcut BN's. Both BNs share ``momentum``, ``eps`` and (for ``momentum=None``)
    ``num_batches_tracked``."""
    if not isinstance(shortcut, Tensor) or (isinstance(input, Tensor)
                                            and shortcut.dim() != input.dim()):
        got = "None" if shortcut is None else (
            f"a {tuple(shortcut.shape)} tensor" if isinstance(shortcut, Tensor)
            else type(shortcut).__name__)
        raise TypeError("dual_batch_norm_add_relu(input, shortcut, running_mean, running_var, "
                        "weight, bias, shortcut_running_mean, shortcut_running_var, "
                        "shortcut_weight, shortcut_bias, training, momentum, eps) takes the "
                        "shortcut tensor second, like batch_norm_add_relu's residual (before "
                        f"fusedres 0.2 it came sixth, after bias); got {got} as shortcut")
    return _fused(input, None, running_mean, running_var, weight, bias, shortcut,
                  shortcut_running_mean, shortcut_running_var, shortcut_weight, shortcut_bias,
                  training, momentum, eps, True, backend, num_batches_tracked,
                  process_group)


# --------------------------------------------------------------------------------------
# Double backward: the derivative of the fused backward ops, through the reference
# --------------------------------------------------------------------------------------
# Both backward ops (the C++ ``fusedres::bn_act_backward`` and the Python pipeline's
# ``fusedres::batch_norm_act_backward``) start with
#     (dout, x, weight, bias, mean, var, mask, x2, weight2, bias2, mean2, var2,
#      training, eps, relu, has_residual, ...)
# and end with ``needs``; they return (dx, dweight, dbias, dresidual, dx2, dweight2, dbias2).
# Called with create_graph=True, they run their fused kernel as usual (the first-order
# gradients are the fused ones); the formula below is their derivative: it rebuilds the
# first-order gradients as a differentiable function of (dout, x, weight, bias, x2, ...)
# with F.batch_norm (batch statistics recomputed from x in training, so their dependence
# on x is included), the ReLU mask of the forward held constant, and differentiates that.

_DIFFERENTIABLE_INPUTS = (0, 1, 2, 3, 7, 8, 9)  # dout, x, weight, bias, x2, weight2, bias2


def _backward_op_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:12])
    ctx.options = (inputs[12], inputs[13], inputs[14], inputs[15], list(inputs[-1]))
    ctx.num_inputs = len(inputs)
    # An unused output's gradient stays None, not zeros: a materialised zero tensor is not
    # batched under vmap, and summing a batched gradient into it in place fails there.
    ctx.set_materialize_grads(False)


def _first_order_reference(dout, x, weight, bias, mean, var, mask, x2, weight2, bias2, mean2,
                           var2, training, eps, relu):
    """The backward op's gradients ``[(dx, dweight, dbias), dresidual, (dx2, dweight2,
    dbias2)]`` as differentiable torch functions of ``dout``, ``x``, ``weight`` (and
    ``x2``, ``weight2``), in acc dtype; None where an input is None. Each BN's gradients
    are one ``aten.native_batch_norm_backward`` (torch's own derivative of it, which
    accounts for the batch statistics' dependence on x and nests under vmap), the ReLU mask
    of the forward held constant; ``bias`` only enters through that mask."""
    acc = _ref.acc_dtype(x.dtype)
    cast = lambda p: None if p is None else p.to(acc)  # noqa: E731

    def stats(t, m, v):  # what native_batch_norm saves (batch stats, constants here)
        if not training:
            return cast(m), cast(v), None, None
        with torch.no_grad():
            v_b, m_b = torch.var_mean(t.to(acc), [d for d in range(t.dim()) if d != 1],
                                      correction=0)
            return None, None, m_b, torch.rsqrt(v_b + eps)

    g = dout.to(acc)
    if relu:
        if mask is not None and mask.numel():  # the forward's mask (residual / shortcut)
            x3 = ops.ncs(x)
            passes = _ref.unpack_mask(mask, x3.shape, ops.is_channels_last(x3)).reshape(x.shape)
        else:
            with torch.no_grad():
                passes = F.batch_norm(x.to(acc), cast(mean) if not training else None,
                                      cast(var) if not training else None, cast(weight),
                                      cast(bias), training, 0.0, eps) > 0
        g = g * passes

    def grads_of(t, w, b, m, v):
        rm, rv, sm, si = stats(t, m, v)
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            g, t.to(acc), cast(w), rm, rv, sm, si, training, eps,
            [True, w is not None, b is not None])
        return [dx, dw if w is not None else None, db if b is not None else None]

    first = grads_of(x, weight, bias, mean, var)
    second = grads_of(x2, weight2, bias2, mean2, var2) if x2 is not None else [None] * 3
    return first, g, second


def _backward_op_backward(ctx, *grad_outputs):
    (dout, x, weight, bias, mean, var, mask, x2, weight2, bias2, mean2,
     var2) = ctx.saved_tensors
    training, eps, relu, has_residual, needs = ctx.options
    if torch.is_grad_enabled() and any(g is not None and g.requires_grad
                                       for g in grad_outputs):
        raise RuntimeError("fusedres: third-order derivatives (create_graph=True in a double "
                           "backward) through the fused BN ops are not supported; use "
                           "backend='reference' for them")
    _last.backend = _module_last.backend = "reference"  # both last_backend()s say so
    result = [None] * ctx.num_inputs
    wanted = (needs[0], needs[1], needs[1], needs[2] and has_residual, needs[3], needs[4],
              needs[4])
    # The derivative of this op alone (autograd chains the inputs' own history): the
    # first-order gradients rebuilt as a function of the differentiable inputs, pulled back.
    saved = (dout, x, weight, bias, x2, weight2, bias2)
    targets = [k for k, i in enumerate(_DIFFERENTIABLE_INPUTS)
               if ctx.needs_input_grad[i] and saved[k] is not None]
    exists = (True, weight is not None, bias is not None, True, x2 is not None,
              weight2 is not None, bias2 is not None)
    chosen = [(j, go) for j, (go, want, there) in enumerate(zip(grad_outputs, wanted, exists))
              if want and there and go is not None and go.numel()]
    if not targets or not chosen:
        return tuple(result)

    def first_order(*values):
        ins = list(saved)
        for k, v in zip(targets, values):
            ins[k] = v
        (dx, dw, db), dres, (dx2, dw2, db2) = _first_order_reference(
            ins[0], ins[1], ins[2], ins[3], mean, var, mask, ins[4], ins[5], ins[6], mean2,
            var2, training, eps, relu)
        outs = (dx, dw, db, dres, dx2, dw2, db2)
        return tuple(outs[j] for j, _ in chosen)

    with torch.enable_grad():
        out, pullback = torch.func.vjp(first_order, *[saved[k] for k in targets])
        grads = pullback(tuple(go.to(t.dtype) for t, (_, go) in zip(out, chosen)))
    for k, grad in zip(targets, grads):
        if grad is not None:
            i = _DIFFERENTIABLE_INPUTS[k]
            result[i] = grad.to(saved[k].dtype)
    return tuple(result)


torch.library.register_autograd("fusedres::batch_norm_act_backward", _backward_op_backward,
                                setup_context=_backward_op_setup)
if ops._has_native("bn_act_backward"):  # fusedres._C is loaded
    torch.library.register_autograd("fusedres::bn_act_backward", _backward_op_backward,
                                    setup_context=_backward_op_setup)

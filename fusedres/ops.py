"""The fused BN ops as PyTorch custom ops, with fake kernels and autograd.

Two levels of ops live in the ``fusedres`` namespace:

* kernel primitives, one set per backend (contract: ``fusedres/reference.py``):
  ``fusedres::bn_stats`` / ``bn_apply`` / ``bn_backward_reduce`` / ``bn_backward_apply``
  registered from C++ for the CPU and CUDA keys (``csrc/``), and
  ``fusedres::triton_bn_*`` registered here around ``fusedres.kernels.bn``;
* the fused, functional, autograd-aware ops the public functions and modules call:
  ``fusedres::batch_norm_act`` (stats + finalize + apply: BN, optional second BN of a
  projection shortcut, optional residual, optional ReLU), its backward
  ``fusedres::batch_norm_act_backward`` (one reduction and one elementwise pass per BN
  input) and ``fusedres::update_running_stats`` (non-differentiable, in place, computed
  on the device: no host sync, ``momentum=None`` reads ``num_batches_tracked``).

``batch_norm_act`` takes the backend's name as an argument (resolved in Python before
the call, ``fusedres._backend.resolve_backend``) and runs the pipeline written here, on
any backend's primitives: it is what the ``triton`` and ``reference_primitives``
backends run. The ``cpu`` and ``cuda`` backends run the same pipeline compiled
(``fusedres::bn_act_forward`` / ``bn_act_backward`` in ``csrc/bn_fused.cpp``, autograd
in C++: the per-call Python cost more than a small layer's kernels), tested bit for bit
against this one.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _backend  # noqa: F401  (loads fusedres._C, whose ops are used below)
from . import reference as ref

# --------------------------------------------------------------------------------------
# Kernel primitives
# --------------------------------------------------------------------------------------


def _stats_fake(x, channels_last):
    acc = ref.acc_dtype(x.dtype)
    return x.new_empty(x.shape[1], dtype=acc), x.new_empty(x.shape[1], dtype=acc)


def _mask_bytes(x):
    return (x.shape[0] * x.shape[1] * x.shape[2] + 7) // 8


def _apply_fake(x, mean, scale, shift, residual, x2, mean2, scale2, shift2, relu, save_mask,
                channels_last):
    out = ref.empty_ncs(*x.shape, channels_last, x.dtype, x.device)
    mask = x.new_empty(_mask_bytes(x) if save_mask else 0, dtype=torch.uint8)
    return out, mask


def _backward_reduce_fake(dout, x, mean, scale, shift, mask, relu, channels_last):
    return _stats_fake(x, channels_last)


def _backward_apply_fake(dout, x, mean, scale, shift, mask, coef_g, coef_xc, coef_c, relu,
                         write_grad_residual, channels_last):
    dx = ref.empty_ncs(*x.shape, channels_last, x.dtype, x.device)
    if write_grad_residual:
        return dx, ref.empty_ncs(*x.shape, channels_last, x.dtype, x.device)
    return dx, x.new_empty(0)


_FAKES = {
    "bn_stats": _stats_fake,
    "bn_apply": _apply_fake,
    "bn_backward_reduce": _backward_reduce_fake,
    "bn_backward_apply": _backward_apply_fake,
}


def _register_cpp_fakes():
    """Fake kernels of the C++ primitives (only when fusedres._C defined them)."""
    for name, fake in _FAKES.items():
        if _backend._has_kernel(name, "CPU") or _backend._has_kernel(name, "CUDA"):
            torch.library.register_fake(f"fusedres::{name}", fake)


def _bn_kernels():
    from fusedres.kernels import bn  # imports triton: only when a Triton op runs

    return bn


@torch.library.custom_op("fusedres::triton_bn_stats", mutates_args=())
def triton_bn_stats(x: Tensor, channels_last: bool) -> tuple[Tensor, Tensor]:
    return _bn_kernels().bn_stats(x, channels_last)


@torch.library.custom_op("fusedres::triton_bn_apply", mutates_args=())
def triton_bn_apply(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                    residual: Optional[Tensor], x2: Optional[Tensor], mean2: Optional[Tensor],
                    scale2: Optional[Tensor], shift2: Optional[Tensor], relu: bool,
                    save_mask: bool, channels_last: bool) -> tuple[Tensor, Tensor]:
    return _bn_kernels().bn_apply(x, mean, scale, shift, residual, x2, mean2, scale2, shift2,
                                  relu, save_mask, channels_last)


@torch.library.custom_op("fusedres::triton_bn_backward_reduce", mutates_args=())
def triton_bn_backward_reduce(dout: Tensor, x: Tensor, mean: Tensor, scale: Tensor,
                              shift: Tensor, mask: Optional[Tensor], relu: bool,
                              channels_last: bool) -> tuple[Tensor, Tensor]:
    return _bn_kernels().bn_backward_reduce(dout, x, mean, scale, shift, mask, relu,
                                            channels_last)


@torch.library.custom_op("fusedres::triton_bn_backward_apply", mutates_args=())
def triton_bn_backward_apply(dout: Tensor, x: Tensor, mean: Tensor, scale: Tensor,
                             shift: Tensor, mask: Optional[Tensor], coef_g: Tensor,
                             coef_xc: Tensor, coef_c: Tensor, relu: bool,
                             write_grad_residual: bool,
                             channels_last: bool) -> tuple[Tensor, Tensor]:
    return _bn_kernels().bn_backward_apply(dout, x, mean, scale, shift, mask, coef_g, coef_xc,
                                           coef_c, relu, write_grad_residual, channels_last)


for _name, _fake in _FAKES.items():
    torch.library.register_fake(f"fusedres::triton_{_name}", _fake)
_register_cpp_fakes()


class Primitives(NamedTuple):
    stats: object
    apply: object
    backward_reduce: object
    backward_apply: object


def primitives(backend: str) -> Primitives:
    """The four kernel primitives of a backend.

    ``"reference_primitives"`` runs the fused op pipeline on the pure-PyTorch primitives
    of ``fusedres.reference``: it is never chosen by ``auto`` and exists to test the op
    plumbing (finalize math, autograd) separately from any kernel.
    """
    ops = torch.ops.fusedres
    if backend in ("cpu", "cuda"):
        return Primitives(ops.bn_stats, ops.bn_apply, ops.bn_backward_reduce,
                          ops.bn_backward_apply)
    if backend == "triton":
        return Primitives(ops.triton_bn_stats, ops.triton_bn_apply,
                          ops.triton_bn_backward_reduce, ops.triton_bn_backward_apply)
    if backend == "reference_primitives":
        return Primitives(ref.bn_stats, ref.bn_apply, ref.bn_backward_reduce,
                          ref.bn_backward_apply)
    raise ValueError(f"backend {backend!r} has no kernel primitives")


PRIMITIVE_BACKENDS = ("cpu", "cuda", "triton", "reference_primitives")
# Backends whose whole pipeline also exists as one C++ op per direction.
NATIVE_BACKENDS = ("cpu", "cuda")


def _has_native(op: str) -> bool:
    """Whether fusedres._C defined ``fusedres::<op>`` (it is loaded before this module)."""
    try:
        torch._C._dispatch_find_schema_or_throw(f"fusedres::{op}", "")
        return True
    except RuntimeError:
        return False

# --------------------------------------------------------------------------------------
# The fused op: forward
# --------------------------------------------------------------------------------------


def centred_scale_shift(weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                        var: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``invstd, scale = weight*invstd, shift = bias`` (zeros without one) in ``mean``'s
    dtype: the per-channel vectors of the centred apply ``(x - mean)*scale + shift`` of
    the kernel primitives (``reference.centred``).

    Forward and backward both call this, so the ReLU mask recomputed in backward is
    bitwise the one the forward applied.
    """
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else weight.to(mean.dtype) * invstd
    shift = torch.zeros_like(mean) if bias is None else bias.to(mean.dtype)
    return invstd, scale, shift


def scale_shift(weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``invstd, scale = weight*invstd, shift = bias - mean*scale`` in ``mean``'s dtype:
    BN as one affine map ``y*scale + shift``, for what takes that form (the Triton conv's
    BN-ReLU prologue, folding into conv weights). The BN primitives take the centred form
    of :func:`centred_scale_shift` instead, which does not cancel for a large mean.
    """
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else weight.to(mean.dtype) * invstd
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(mean.dtype)
    return invstd, scale, shift


def _batch_stats_or_running(prims, x, mean_in, var_in, training, channels_last):
    acc = ref.acc_dtype(x.dtype)
    if training:
        return prims.stats(x, channels_last)
    return mean_in.to(acc, copy=True), var_in.to(acc, copy=True)


@torch.library.custom_op("fusedres::batch_norm_act", mutates_args=())
def batch_norm_act(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean_in: Optional[Tensor],
    var_in: Optional[Tensor],
    residual: Optional[Tensor],
    x2: Optional[Tensor],
    weight2: Optional[Tensor],
    bias2: Optional[Tensor],
    mean2_in: Optional[Tensor],
    var2_in: Optional[Tensor],
    training: bool,
    eps: float,
    relu: bool,
    channels_last: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``out = [relu](bn(x) [+ bn2(x2)] [+ residual])`` on ``(N, C, S)`` tensors.

    Returns ``(out, mean, var, mean2, var2, mask)``: the batch statistics (training) or
    the running statistics used (eval) in acc dtype, empty ``mean2``/``var2`` without
    ``x2``, and the 1-bit ReLU mask when a residual or ``x2`` makes it necessary.

    The triton backend runs ``fusedres.kernels.bn.batch_norm_act_forward`` (three
    launches in training, two in eval: all per-channel math in one finalize kernel);
    the others the pipeline below on their four primitives. The caller updates the
    running statistics (:func:`update_from_batch`, one op per BN).
    """
    if backend == "triton" and x.numel() > 0:
        return _bn_kernels().batch_norm_act_forward(
            x, _dense(weight), _dense(bias), mean_in, var_in, residual, x2, _dense(weight2),
            _dense(bias2), mean2_in, var2_in, training, eps, relu, channels_last)
    return _python_pipeline(x, weight, bias, mean_in, var_in, residual, x2, weight2, bias2,
                            mean2_in, var2_in, training, eps, relu, channels_last, backend)


def _dense(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None else t.contiguous()


def _python_pipeline(x, weight, bias, mean_in, var_in, residual, x2, weight2, bias2, mean2_in,
                     var2_in, training, eps, relu, channels_last, backend):
    """The fused op on any backend's four primitives (the ``reference_primitives`` backend;
    the cpu/cuda backends run it compiled in C++)."""
    prims = primitives(backend)
    mean, var = _batch_stats_or_running(prims, x, mean_in, var_in, training, channels_last)
    _, scale, shift = centred_scale_shift(weight, bias, mean, var, eps)
    scale2 = shift2 = None
    if x2 is not None:
        mean2, var2 = _batch_stats_or_running(prims, x2, mean2_in, var2_in, training,
                                              channels_last)
        _, scale2, shift2 = centred_scale_shift(weight2, bias2, mean2, var2, eps)
    else:  # outputs of a custom op may not alias each other: two distinct empties
        mean2, var2 = mean.new_empty(0), mean.new_empty(0)
    save_mask = relu and (residual is not None or x2 is not None)
    out, mask = prims.apply(x, mean, scale, shift, residual, x2,
                            mean2 if x2 is not None else None, scale2, shift2, relu, save_mask,
                            channels_last)
    return out, mean, var, mean2, var2, mask


def _forward_fake(x, weight, bias, mean_in, var_in, residual, x2, weight2, bias2, mean2_in,
                  var2_in, training, eps, relu, channels_last, backend=None):
    save_mask = relu and (residual is not None or x2 is not None)
    out, mask = _apply_fake(x, None, None, None, None, None, None, None, None, relu, save_mask,
                            channels_last)
    mean, var = _stats_fake(x, channels_last)
    if x2 is not None:
        mean2, var2 = _stats_fake(x, channels_last)
    else:
        mean2, var2 = mean.new_empty(0), mean.new_empty(0)
    return out, mean, var, mean2, var2, mask


batch_norm_act.register_fake(_forward_fake)

# --------------------------------------------------------------------------------------
# The fused op: backward
# --------------------------------------------------------------------------------------


def _nothing(x: Tensor) -> Tensor:
    """A fresh empty tensor: what a custom op returns for an output it did not compute
    (outputs may not alias each other, so never one shared empty)."""
    return x.new_empty(0)


def backward_coefficients(scale: Tensor, invstd: Tensor, sum_g: Tensor, sum_g_xc: Tensor,
                          count) -> tuple[Tensor, Tensor, Tensor]:
    """``(coef_g, coef_xc, coef_c)`` of the training-mode BN input gradient
    ``dx = gamma*invstd*(g - sum(g)/M - xhat*sum(g*xhat)/M)`` written as
    ``coef_g*g + coef_xc*(x - mean) + coef_c``, for ``bn_backward_apply``. ``count`` is
    M (an int, or a tensor on the device for synchronised statistics)."""
    coef_xc = -scale * invstd * invstd * sum_g_xc / count  # xhat * sum(g*xhat) / M
    return scale, coef_xc, -scale * sum_g / count


def _bn_input_backward(prims, dout, x, weight, bias, mean, var, mask, training, eps, relu,
                       write_grad_residual, channels_last, need_dx, need_affine):
    """Gradients of one BN input: ``(dx, dweight, dbias, dres)``; empty where not needed."""
    invstd, scale, shift = centred_scale_shift(weight, bias, mean, var, eps)
    n, c, s = x.shape
    if training or need_affine:
        sum_g, sum_g_xc = prims.backward_reduce(dout, x, mean, scale, shift, mask, relu,
                                                channels_last)
    dweight = (sum_g_xc * invstd).to(weight.dtype) if need_affine and weight is not None \
        else _nothing(x)
    dbias = sum_g.to(bias.dtype) if need_affine and bias is not None else _nothing(x)
    if not (need_dx or write_grad_residual):
        return _nothing(x), dweight, dbias, _nothing(x)
    coefs = backward_coefficients(scale, invstd, sum_g, sum_g_xc, n * s) if training \
        else (scale, torch.zeros_like(scale), torch.zeros_like(scale))
    dx, dres = prims.backward_apply(dout, x, mean, scale, shift, mask, *coefs, relu,
                                    write_grad_residual, channels_last)
    return dx, dweight, dbias, dres


@torch.library.custom_op("fusedres::batch_norm_act_backward", mutates_args=())
def batch_norm_act_backward(
    dout: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    mask: Optional[Tensor],
    x2: Optional[Tensor],
    weight2: Optional[Tensor],
    bias2: Optional[Tensor],
    mean2: Optional[Tensor],
    var2: Optional[Tensor],
    training: bool,
    eps: float,
    relu: bool,
    has_residual: bool,
    channels_last: bool,
    backend: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, dweight, dbias, dresidual, dx2, dweight2, dbias2)``.

    ``needs`` = ``[dx, dweight/dbias, dresidual, dx2, dweight2/dbias2]``; what is not
    needed comes back as an empty tensor.
    """
    if backend == "triton" and x.numel() > 0:
        return _bn_kernels().batch_norm_act_backward(
            dout, x, _dense(weight), _dense(bias), mean, var, mask, x2, _dense(weight2),
            _dense(bias2), mean2, var2, training, eps, relu, has_residual, channels_last, needs)
    prims = primitives(backend)
    need_dx, need_affine, need_res, need_dx2, need_affine2 = needs
    dx, dweight, dbias, dres = _bn_input_backward(
        prims, dout, x, weight, bias, mean, var, mask, training, eps, relu,
        need_res and has_residual, channels_last, need_dx, need_affine)
    dx2, dweight2, dbias2 = _nothing(x), _nothing(x), _nothing(x)
    if x2 is not None and (need_dx2 or need_affine2):
        dx2, dweight2, dbias2, _ = _bn_input_backward(
            prims, dout, x2, weight2, bias2, mean2, var2, mask, training, eps, relu, False,
            channels_last, need_dx2, need_affine2)
    return dx, dweight, dbias, dres, dx2, dweight2, dbias2


def _backward_fake(dout, x, weight, bias, mean, var, mask, x2, weight2, bias2, mean2, var2,
                   training, eps, relu, has_residual, channels_last, backend, needs):
    need_dx, need_affine, need_res, need_dx2, need_affine2 = needs
    like = lambda t, need: torch.empty_like(t) if need and t is not None else x.new_empty(0)  # noqa: E731
    dense = lambda need: ref.empty_ncs(*x.shape, channels_last, x.dtype, x.device) \
        if need else x.new_empty(0)  # noqa: E731
    has_x2 = x2 is not None
    return (dense(need_dx or (need_res and has_residual)), like(weight, need_affine),
            like(bias, need_affine), dense(need_res and has_residual),
            dense(has_x2 and need_dx2), like(weight2, has_x2 and need_affine2),
            like(bias2, has_x2 and need_affine2))


batch_norm_act_backward.register_fake(_backward_fake)


def _register_native_fakes():
    """Fake kernels of the C++ pipeline ops (csrc/bn_fused.cpp), when fusedres._C has them:
    the Python pipeline's fakes on the ``(N, C, S)`` view, outputs shaped like ``x``."""
    if not _has_native("bn_act_forward"):
        return

    def like_x(t, x):
        return t.view(x.shape) if t.numel() else t

    @torch.library.register_fake("fusedres::bn_act_forward")
    def _(x, weight, bias, mean_in, var_in, residual, x2, weight2, bias2, mean2_in, var2_in,
          training, eps, relu):
        x3 = ncs(x)
        out, *rest = _forward_fake(x3, weight, bias, mean_in, var_in, residual,
                                   ncs(x2), weight2, bias2,
                                   mean2_in, var2_in, training, eps, relu,
                                   is_channels_last(x3))
        return (like_x(out, x), *rest)

    @torch.library.register_fake("fusedres::bn_act_backward")
    def _(dout, x, weight, bias, mean, var, mask, x2, weight2, bias2, mean2, var2, training, eps,
          relu, has_residual, needs):
        x3 = ncs(x)
        grads = _backward_fake(dout, x3, weight, bias, mean, var, mask, x2, weight2, bias2,
                               mean2, var2, training, eps, relu, has_residual,
                               is_channels_last(x3), None, needs)
        return tuple(like_x(g, x) if i in (0, 3, 4) else g for i, g in enumerate(grads))


def ncs(t: Optional[Tensor]) -> Optional[Tensor]:
    """``(N, C, *spatial)`` -> ``(N, C, S)``, a view whenever the strides allow."""
    return None if t is None else t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def is_channels_last(x3: Tensor) -> bool:
    """Outputs are written channels-last when the ``(N, C, S)`` input is laid out so."""
    n, c, s = x3.shape
    return c > 1 and s > 1 and x3.stride(1) < x3.stride(2)


_register_native_fakes()


def _setup_context(ctx, inputs, output):
    (x, weight, bias, mean_in, var_in, residual, x2, weight2, bias2, mean2_in, var2_in,
     training, eps, relu, channels_last, backend) = inputs
    out, mean, var, mean2, var2, mask = output
    ctx.save_for_backward(x, weight, bias, mean, var, mask if mask.numel() else None,
                          x2, weight2, bias2, mean2 if x2 is not None else None,
                          var2 if x2 is not None else None)
    ctx.options = (training, eps, relu, residual is not None, channels_last, backend)
    ctx.mark_non_differentiable(mean, var, mean2, var2, mask)
    ctx.set_materialize_grads(False)  # no zero-filled gradients of those (a launch each)


def _backward(ctx, dout, _dmean, _dvar, _dmean2, _dvar2, _dmask):
    x, weight, bias, mean, var, mask, x2, weight2, bias2, mean2, var2 = ctx.saved_tensors
    training, eps, relu, has_residual, channels_last, backend = ctx.options
    ng = ctx.needs_input_grad
    needs = [ng[0], ng[1] or ng[2], ng[5], ng[6], ng[7] or ng[8]]
    if dout is None or not any(needs):
        return (None,) * 16
    dx, dweight, dbias, dres, dx2, dweight2, dbias2 = torch.ops.fusedres.batch_norm_act_backward(
        dout, x, weight, bias, mean, var, mask, x2, weight2, bias2, mean2, var2, training, eps,
        relu, has_residual, channels_last, backend, needs)
    keep = lambda t, need: t if need else None  # noqa: E731
    return (keep(dx, ng[0]), keep(dweight, ng[1]), keep(dbias, ng[2]), None, None,
            keep(dres, ng[5]), keep(dx2, ng[6]), keep(dweight2, ng[7]), keep(dbias2, ng[8]),
            *(None,) * 7)


torch.library.register_autograd("fusedres::batch_norm_act", _backward,
                                setup_context=_setup_context)

# --------------------------------------------------------------------------------------
# Running statistics
# --------------------------------------------------------------------------------------


def update_running_stats_reference(running_mean: Tensor, running_var: Tensor, mean: Tensor,
                                   var: Tensor, var_correction: float, momentum: float,
                                   num_batches_tracked: Optional[Tensor]) -> None:
    """``nn.BatchNorm``'s running-statistics update, on the device:
    ``running <- running + f*(batch - running)`` (``batch - (batch - running)*(1 - f)``
    when ``|f| >= 0.5``, exact at ``f = 1``: ``torch.lerp``'s formula).

    The batch values are ``mean`` and ``var * var_correction`` (Bessel's ``M/(M-1)``
    for a biased ``var`` over ``M`` values; 1.0 when ``var`` is already unbiased). ``f``
    is ``momentum``, or ``1/num_batches_tracked`` (the cumulative average of
    ``momentum=None``) when that tensor is given; the caller increments
    ``num_batches_tracked`` first, as ``nn.BatchNorm`` does. Every operation rounds
    once in the dtype of ``mean`` (no fused multiply-adds); the result is stored rounded
    to the running statistics' dtype.

    The op ``fusedres::update_running_stats`` is this function, registered from here
    when fusedres._C is not loaded. The C++ op (csrc/bn_fused.cpp) computes it bit for
    bit on CPU (a plain loop) and with ``torch.lerp`` on other devices (the same formula;
    the device compiler may fuse its multiply-add).
    """
    acc = mean.dtype
    f = (torch.full((), momentum, dtype=acc, device=mean.device)  # a fill: no host copy
         if num_batches_tracked is None else torch.reciprocal(num_batches_tracked.to(acc)))
    small = f.abs() < 0.5
    batch_var = var if var_correction == 1.0 else var * var_correction
    for running, batch in ((running_mean, mean), (running_var, batch_var)):
        r = running.to(acc)
        d = batch - r
        running.copy_(torch.where(small, r + f * d, batch - d * (1 - f)))


if _has_native("update_running_stats"):
    update_running_stats = torch.ops.fusedres.update_running_stats.default
else:
    update_running_stats = torch.library.custom_op(
        "fusedres::update_running_stats", update_running_stats_reference,
        mutates_args=("running_mean", "running_var"))
    update_running_stats.register_fake(lambda *args: None)


def update_from_batch(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      mean: Tensor, var: Tensor, count, momentum: Optional[float],
                      num_batches_tracked: Optional[Tensor]) -> None:
    """``nn.BatchNorm``'s running-statistics update from a batch ``mean`` and biased
    ``var`` over ``count`` values (``momentum=None``: cumulative average over
    ``num_batches_tracked``, which the caller has incremented). Nothing without running
    statistics."""
    if running_mean is None:
        return
    if mean.requires_grad or var.requires_grad:  # never the C++ pipeline's statistics
        mean, var = mean.detach(), var.detach()
    if isinstance(count, Tensor) or torch.compiler.is_compiling():
        # A count on the device (synchronised BN), or under torch.compile, where it may be
        # symbolic (dynamic shapes) and as the op's float argument would be specialised:
        # one graph per batch size.
        var, correction = unbiased(var, count), 1.0
    else:  # one value per channel: inf, and so inf/nan as torch gives
        correction = count / (count - 1) if count > 1 else math.inf
    update_running_stats(running_mean, running_var, mean, var, correction,
                         0.0 if momentum is None else float(momentum),
                         num_batches_tracked if momentum is None else None)


def unbiased(var: Tensor, count) -> Tensor:
    """Bessel's correction of a biased variance over ``count`` values (an int, or a
    tensor on the device so that nothing syncs); ``count <= 1`` gives inf/nan as torch."""
    return var * (count / (count - 1))

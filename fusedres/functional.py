"""Fused functions mirroring ``torch.nn.functional.batch_norm``.

    batch_norm_relu(x, ...)            == relu(F.batch_norm(x, ...))
    batch_norm_add_relu(x, r, ...)     == relu(F.batch_norm(x, ...) + r)
    dual_batch_norm_add_relu(x, ..., shortcut, ...)
                                       == relu(F.batch_norm(x, ...) + F.batch_norm(shortcut, ...))
    batch_norm(x, ..., relu=False)     == F.batch_norm(x, ...), relu optional

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
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import Tensor

from . import distributed, ops
from ._backend import resolve_backend

__all__ = ["batch_norm", "batch_norm_relu", "batch_norm_add_relu", "dual_batch_norm_add_relu",
           "last_backend"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCED = (torch.float16, torch.bfloat16)
_last = threading.local()


def last_backend() -> Optional[str]:
    """The backend the most recent fused call on this thread ran with."""
    return getattr(_last, "backend", None)


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
    if name == "reference" and synced:
        raise RuntimeError("synchronised BN runs on the fused kernels; the reference backend "
                           "has none (use torch.nn.SyncBatchNorm for a reference)")
    if name == "reference" or (numel == 0 and not synced):
        # Empty batches go through torch itself (no zero-size launch; torch's semantics).
        _last.backend = "reference"
        return _composite(x, residual, running_mean, running_var, weight, bias, shortcut,
                          sc_running_mean, sc_running_var, sc_weight, sc_bias, training,
                          momentum, eps, relu, num_batches_tracked)
    _last.backend = name

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
        momentum = 0.0 if num_batches_tracked is None else 1.0 / float(num_batches_tracked)
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


def dual_batch_norm_add_relu(input: Tensor, running_mean: Optional[Tensor],
                             running_var: Optional[Tensor], weight: Optional[Tensor],
                             bias: Optional[Tensor], shortcut: Tensor,
                             shortcut_running_mean: Optional[Tensor],
                             shortcut_running_var: Optional[Tensor],
                             shortcut_weight: Optional[Tensor], shortcut_bias: Optional[Tensor],
                             training: bool = False, momentum: Optional[float] = 0.1,
                             eps: float = 1e-5, *, num_batches_tracked: Optional[Tensor] = None,
                             backend: str = "auto", process_group=None) -> Tensor:
    """``relu(bn(input) + bn_shortcut(shortcut))``: the projection-shortcut block tail,
    both BNs applied in one kernel. Both BNs share ``momentum``, ``eps`` and (for
    ``momentum=None``) ``num_batches_tracked``."""
    if shortcut is None:
        raise TypeError("dual_batch_norm_add_relu needs a shortcut tensor")
    return _fused(input, None, running_mean, running_var, weight, bias, shortcut,
                  shortcut_running_mean, shortcut_running_var, shortcut_weight, shortcut_bias,
                  training, momentum, eps, True, backend, num_batches_tracked,
                  process_group)

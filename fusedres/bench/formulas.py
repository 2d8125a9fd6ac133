"""Bytes moved and FLOPs per benchmark case: the one place these are counted.

Every memory-bound row's GB/s is ``bytes / time`` with ``bytes`` from here, and its
"% of copy" compares that with a plain device copy measured in the same run (a copy of
B bytes moves 2B: one read, one write). Every conv row's TFLOP/s is ``flops / time``.

Memory-bound ops (DESIGN.md section 2). S is the size in bytes of one activation tensor
(``N*C*H*W*element_size``); all operands of an op have that shape and dtype. Counts are
passes over activation-sized tensors after the conv has written its output ``y``:

    op               pass  fused (fusedres kernels)              eager PyTorch
    bn_relu          fwd   stats 1R, apply 1R+1W          = 3S   stats 1R, normalise 1R+1W,
                                                                 relu 1R+1W            = 5S
    bn_relu          bwd   reduce 2R, elementwise 2R+1W   = 5S   relu bwd 2R+1W,
                                                                 BN bwd 4R+1W          = 8S
    bn_add_relu      fwd   stats 1R, apply 2R+1W          = 4S   5R+3W                 = 8S
                           (+ 1-bit ReLU mask written when backward follows)
    bn_add_relu      bwd   reduce 2R, elementwise 2R+2W   = 6S   8S (the residual gradient
                           (dx, dresidual) + mask read           is the ReLU gradient itself)
    dual_bn_add_relu fwd   stats 1R per input, apply      = 5S   two BNs 3S each, add
                           3R+1W (+ mask written)                2R+1W, relu 1R+1W     = 11S
    dual_bn_add_relu bwd   per BN input: reduce 2R and    = 10S  relu bwd 3S, two BN
                           elementwise 2R+1W (+ 2 mask reads)    bwd 5S each           = 13S

Per-channel vectors (mean, invstd, gamma, beta, running stats: a few times 4*C bytes)
are left out: at ResNet shapes they are under 0.01% of S.

The "fused" count is the traffic the fusedres algorithm must move: the rows of every
provider of a case use it, so their GB/s are effective bandwidths comparable with each
other and with the copy bandwidth (the physical limit). The eager count is recorded
beside it (``bytes_eager``) to show what fusion saves.

Convolutions: ``flops = 2 * N * C_out * H_out * W_out * (C_in / groups) * R * S`` (one
multiply and one add per MAC). Backward is two more GEMMs of the same size (dgrad and
wgrad), so forward+backward is 3x forward; 2x when the input needs no gradient (the
stem). The minimal bytes of a conv are its input, weight and output once each.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

OPS = ("bn_relu", "bn_add_relu", "dual_bn_add_relu")
PASSES = ("fwd", "fwd+bwd")

# Passes over S: (fused fwd, fused bwd, eager fwd, eager bwd); see the table above.
_TRAFFIC = {
    "bn_relu": (3, 5, 5, 8),
    "bn_add_relu": (4, 6, 8, 8),
    "dual_bn_add_relu": (5, 10, 11, 13),
}
# 1-bit ReLU masks: written in forward and read in backward, per BN input.
_MASKS = {"bn_relu": 0, "bn_add_relu": 1, "dual_bn_add_relu": 2}


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def activation_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """S: the bytes of one activation tensor of ``shape``."""
    return numel(shape) * element_size(dtype)


def mask_bytes(shape: Sequence[int]) -> int:
    """A 1-bit-per-element mask, rounded up to whole bytes."""
    return (numel(shape) + 7) // 8


def op_bytes(op: str, pass_: str, shape: Sequence[int], dtype: torch.dtype,
             model: str = "fused") -> int:
    """Bytes a memory-bound fused op moves: ``model`` is "fused" or "eager".

    ``pass_`` "fwd" is a forward alone (no mask is written: nothing needs one);
    "fwd+bwd" is a training forward (writing the masks) followed by the backward.
    """
    if op not in _TRAFFIC:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}; expected one of {PASSES}")
    s = activation_bytes(shape, dtype)
    fused_fwd, fused_bwd, eager_fwd, eager_bwd = _TRAFFIC[op]
    if model == "eager":
        return s * (eager_fwd + (eager_bwd if pass_ == "fwd+bwd" else 0))
    if model != "fused":
        raise ValueError(f"unknown traffic model {model!r}; expected 'fused' or 'eager'")
    if pass_ == "fwd":
        return s * fused_fwd
    masks = _MASKS[op] * mask_bytes(shape)
    return s * (fused_fwd + fused_bwd) + 2 * masks  # each mask written once, read once


def copy_bytes(n_elements: int, dtype: torch.dtype) -> int:
    """A device copy of n elements reads them once and writes them once."""
    return 2 * n_elements * element_size(dtype)


def conv_out_hw(h: int, w: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    return (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1


def _taps(kernel) -> int:
    """R*S of an int (square) or (R, S) kernel size."""
    if isinstance(kernel, int):
        return kernel * kernel
    r, s = kernel
    return int(r) * int(s)


def conv2d_flops(n: int, c_in: int, c_out: int, h_out: int, w_out: int, kernel,
                 groups: int = 1, pass_: str = "fwd", input_grad: bool = True) -> int:
    """FLOPs of a 2-D conv (2 per multiply-accumulate); backward adds dgrad (when the
    input needs a gradient) and wgrad, each as many as the forward."""
    fwd = 2 * n * c_out * h_out * w_out * (c_in // groups) * _taps(kernel)
    if pass_ == "fwd":
        return fwd
    if pass_ != "fwd+bwd":
        raise ValueError(f"unknown pass {pass_!r}")
    return fwd * (3 if input_grad else 2)


def conv2d_bytes(n: int, c_in: int, c_out: int, h: int, w: int, h_out: int, w_out: int,
                 kernel: int, dtype: torch.dtype, groups: int = 1) -> int:
    """Least bytes of a conv forward: input, weight and output once each."""
    e = element_size(dtype)
    return e * (n * c_in * h * w + c_out * (c_in // groups) * _taps(kernel)
                + n * c_out * h_out * w_out)


def linear_flops(n: int, in_features: int, out_features: int, pass_: str = "fwd",
                 input_grad: bool = True) -> int:
    fwd = 2 * n * in_features * out_features
    if pass_ == "fwd":
        return fwd
    return fwd * (3 if input_grad else 2)


def model_flops(model: torch.nn.Module, example: torch.Tensor, pass_: str = "fwd",
                input_grad: bool = False) -> int:
    """FLOPs of the convs and linear layers of ``model`` on ``example`` (BN, ReLU, pools
    and adds are memory-bound and not counted). Runs one forward on the meta device with
    hooks reading each layer's output shape. In backward the first layer computes a data
    gradient only when ``input_grad`` (a block inside a network: yes; a whole model fed
    images: no)."""
    import copy

    meta = copy.deepcopy(model).to("meta")
    total = [0]
    first = [not input_grad]

    def hook(mod, inputs, output):
        grad_in = not first[0]  # every layer but a first one fed with images
        first[0] = False
        if isinstance(mod, torch.nn.Conv2d):
            n, c_out, h_out, w_out = output.shape
            total[0] += conv2d_flops(n, mod.in_channels, c_out, h_out, w_out,
                                     tuple(mod.kernel_size), mod.groups, pass_, grad_in)
        else:
            rows = numel(output.shape[:-1])
            total[0] += linear_flops(rows, mod.in_features, mod.out_features, pass_, grad_in)

    handles = [m.register_forward_hook(hook) for m in meta.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            meta(example.to("meta"))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def throughput(row_bytes: Optional[int], row_flops: Optional[int], seconds: float,
               copy_gbps: Optional[float]) -> dict:
    """Derived columns of a row: GB/s and % of the copy bandwidth, or TFLOP/s."""
    out = {"gbps": None, "pct_copy_bw": None, "tflops": None}
    if seconds <= 0:
        return out
    if row_bytes:
        out["gbps"] = row_bytes / seconds / 1e9
        if copy_gbps:
            out["pct_copy_bw"] = 100.0 * out["gbps"] / copy_gbps
    if row_flops:
        out["tflops"] = row_flops / seconds / 1e12
    return out

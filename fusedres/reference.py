"""Pure-PyTorch ground truth.

Two levels live here:

* the composite reference of every public function (``batch_norm_relu`` ...), built
  from ``torch.nn.functional`` so autograd differentiates it; every test compares the
  fused backends with these, in float64 where it matters;
* the reference of every kernel *primitive* (``bn_stats``, ``bn_apply``,
  ``bn_backward_reduce``, ``bn_backward_apply``): the exact contract the C++, CUDA and
  Triton kernels implement, written as plainly as possible. A kernel researcher who
  changes one kernel compares it with its primitive here.

Primitive contract (shared by every backend):

* Activations are 3-D ``(N, C, S)`` tensors (``S`` = product of spatial sizes) with
  *arbitrary* strides; offsets can pass 2**31, so kernels index in int64.
* Outputs are allocated dense by the primitive: ``channels_last=True`` gives strides
  ``(S*C, 1, C)``, ``False`` gives ``(C*S, S, 1)`` (see :func:`empty_ncs`).
* Per-channel vectors (``mean``, ``var``, ``scale``, ``shift``, coefficients) are in
  the accumulation dtype: float64 for float64 activations, float32 otherwise.
* The apply is centred: ``pre = (x - mean)*scale + shift`` with ``shift = beta`` (the
  BN bias, zeros without one), never ``x*scale + (beta - mean*scale)``, which cancels
  for a large mean with a small spread (:func:`centred`).
* The ReLU mask is 1 bit per element, ``uint8`` of ``ceil(N*C*S/8)`` bytes. The bit of
  element ``(n, c, s)`` is the element's offset ``o`` in the dense output
  (``(n*S+s)*C+c`` channels-last, ``(n*C+c)*S+s`` otherwise): byte ``o >> 3``,
  bit ``o & 7`` (LSB first). A bit is 1 where the gradient passes, i.e. where
  ``not (pre_activation <= 0)`` -- NaN passes the gradient, as ``torch.relu`` does.

A third level: what each cuDNN graph of ``fusedres.cudnn_graph`` computes (``graph_f0``,
``graph_f1``, ``graph_dgrad_drelu_dbn``, ``graph_wgrad``, ``bn_finalize``,
``graph_bn_finalize``, ``dgrad_drelu``, ``dbn_weight``, ``dbn_apply``), with cuDNN's
conventions (sums rather than centred statistics, the ``A*dy + B*x + C`` form
of the BN input gradient).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a kernel reading ``dtype`` activations."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_ncs(n: int, c: int, s: int, channels_last: bool, dtype, device) -> Tensor:
    """A dense ``(N, C, S)`` tensor in the requested layout."""
    if channels_last:
        return torch.empty((n, s, c), dtype=dtype, device=device).permute(0, 2, 1)
    return torch.empty((n, c, s), dtype=dtype, device=device)


def _memory_order(t: Tensor, channels_last: bool) -> Tensor:
    """``(N, C, S)`` values flattened in the order of the dense output's memory."""
    return (t.permute(0, 2, 1) if channels_last else t).reshape(-1)


def pack_mask(passes: Tensor, channels_last: bool) -> Tensor:
    """Pack a boolean ``(N, C, S)`` tensor into the 1-bit mask of the contract."""
    bits = _memory_order(passes, channels_last).to(torch.uint8)
    pad = (-bits.numel()) % 8
    bits = torch.cat([bits, bits.new_zeros(pad)]).view(-1, 8)
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.int32, device=bits.device)
    return (bits.to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack_mask(mask: Tensor, shape, channels_last: bool) -> Tensor:
    """Inverse of :func:`pack_mask`: a boolean ``(N, C, S)`` tensor."""
    n, c, s = shape
    shifts = torch.arange(8, dtype=torch.int32, device=mask.device)
    bits = ((mask.to(torch.int32)[:, None] >> shifts) & 1).reshape(-1)[: n * c * s].bool()
    if channels_last:
        return bits.view(n, s, c).permute(0, 2, 1)
    return bits.view(n, c, s)


# --------------------------------------------------------------------------------------
# Kernel primitives
# --------------------------------------------------------------------------------------


def _bcast(v: Tensor) -> Tensor:
    return v.view(1, -1, 1)


def bn_stats(x: Tensor, channels_last: bool = False) -> tuple[Tensor, Tensor]:
    """Per-channel mean and *biased* variance of ``x`` over ``(N, S)``, in acc dtype.

    Kernels must use Welford / Chan merges (or shifted sums), never E[x^2]-E[x]^2.
    ``channels_last`` only tells the kernel which traversal is cheap.
    """
    xa = x.to(acc_dtype(x.dtype))
    var, mean = torch.var_mean(xa, dim=(0, 2), correction=0)
    return mean, var


def centred(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``(x - mean)*scale + shift`` in acc dtype, unfused: THE pre-activation of one BN.

    Centring first keeps a large mean with a small spread exact (``x - mean`` is exact
    for ``x`` near ``mean``, Sterbenz), where ``x*scale + (beta - mean*scale)`` cancels.
    Every backend writes this expression the same way in its forward and backward
    kernels, so the ReLU mask recomputed in backward is the forward's bit for bit.
    """
    return (x.to(acc_dtype(x.dtype)) - _bcast(mean)) * _bcast(scale) + _bcast(shift)


def _pre_activation(x, mean, scale, shift, residual=None, x2=None, mean2=None, scale2=None,
                    shift2=None):
    pre = centred(x, mean, scale, shift)
    if x2 is not None:
        pre = pre + centred(x2, mean2, scale2, shift2)
    if residual is not None:
        pre = pre + residual.to(pre.dtype)
    return pre


def bn_apply(
    x: Tensor,
    mean: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor],
    x2: Optional[Tensor],
    mean2: Optional[Tensor],
    scale2: Optional[Tensor],
    shift2: Optional[Tensor],
    relu: bool,
    save_mask: bool,
    channels_last: bool,
) -> tuple[Tensor, Tensor]:
    """``out = [relu]((x - mean)*scale + shift [+ (x2 - mean2)*scale2 + shift2]
    [+ residual])``.

    ``mean`` is the centre (batch mean in training, running mean in eval), ``scale`` is
    ``weight*invstd`` (or ``invstd``) and ``shift`` is ``beta`` (the BN bias, or zeros).
    Math in acc dtype, one cast at the store; ``out`` has ``x``'s dtype and the layout
    ``channels_last``. ``mask`` is the packed ReLU mask when ``save_mask`` (requires
    ``relu``), else an empty ``uint8`` tensor.
    """
    n, c, s = x.shape
    pre = _pre_activation(x, mean, scale, shift, residual, x2, mean2, scale2, shift2)
    val = torch.where(pre < 0, torch.zeros_like(pre), pre) if relu else pre
    out = empty_ncs(n, c, s, channels_last, x.dtype, x.device)
    out.copy_(val)
    if save_mask:
        mask = pack_mask(~(pre <= 0), channels_last)
    else:
        mask = torch.empty(0, dtype=torch.uint8, device=x.device)
    return out, mask


def _gradient_after_relu(dout, x, mean, scale, shift, mask, relu, channels_last):
    """``g = dout * passes``: passes from the bit mask if given, else recomputed."""
    acc = acc_dtype(x.dtype)
    g = dout.to(acc)
    if mask is not None and mask.numel() > 0:
        passes = unpack_mask(mask, tuple(x.shape), channels_last)
    elif relu:
        passes = ~(centred(x, mean, scale, shift) <= 0)
    else:
        return g
    return torch.where(passes, g, torch.zeros_like(g))


def bn_backward_reduce(
    dout: Tensor,
    x: Tensor,
    mean: Tensor,
    scale: Tensor,
    shift: Tensor,
    mask: Optional[Tensor],
    relu: bool,
    channels_last: bool,
) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum(g)`` and ``sum(g * (x - mean))`` in acc dtype.

    ``g = dout * passes`` where ``passes`` is read from ``mask`` when one is given,
    else recomputed as ``not ((x - mean)*scale + shift <= 0)`` (:func:`centred`) when
    ``relu``, else all true (``shift`` is ``beta``, as in :func:`bn_apply`).
    ``channels_last`` is the layout the mask was packed in.
    """
    acc = acc_dtype(x.dtype)
    g = _gradient_after_relu(dout, x, mean, scale, shift, mask, relu, channels_last)
    xc = x.to(acc) - _bcast(mean)
    return g.sum(dim=(0, 2)), (g * xc).sum(dim=(0, 2))


def bn_backward_apply(
    dout: Tensor,
    x: Tensor,
    mean: Tensor,
    scale: Tensor,
    shift: Tensor,
    mask: Optional[Tensor],
    coef_g: Tensor,
    coef_xc: Tensor,
    coef_c: Tensor,
    relu: bool,
    write_grad_residual: bool,
    channels_last: bool,
) -> tuple[Tensor, Tensor]:
    """``dx = coef_g*g + coef_xc*(x - mean) + coef_c`` and, if asked, ``dres = g``.

    ``g`` as in :func:`bn_backward_reduce`. ``dx`` and ``dres`` have ``x``'s dtype and
    the layout ``channels_last``; ``dres`` is an empty tensor unless asked for.
    """
    n, c, s = x.shape
    acc = acc_dtype(x.dtype)
    g = _gradient_after_relu(dout, x, mean, scale, shift, mask, relu, channels_last)
    val = _bcast(coef_g) * g + _bcast(coef_xc) * (x.to(acc) - _bcast(mean)) + _bcast(coef_c)
    dx = empty_ncs(n, c, s, channels_last, x.dtype, x.device)
    dx.copy_(val)
    if write_grad_residual:
        dres = empty_ncs(n, c, s, channels_last, x.dtype, x.device)
        dres.copy_(g)
    else:
        dres = torch.empty(0, dtype=x.dtype, device=x.device)
    return dx, dres


# --------------------------------------------------------------------------------------
# Composite reference of the public functions
# --------------------------------------------------------------------------------------


def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None,
                    training=False, momentum=0.1, eps=1e-5):
    return torch.relu(F.batch_norm(input, running_mean, running_var, weight, bias,
                                   training, momentum, eps))


def batch_norm_add_relu(input, residual, running_mean, running_var, weight=None,
                        bias=None, training=False, momentum=0.1, eps=1e-5):
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return torch.relu(y + residual)


def dual_batch_norm_add_relu(input, running_mean, running_var, weight, bias,
                             shortcut, shortcut_running_mean, shortcut_running_var,
                             shortcut_weight, shortcut_bias,
                             training=False, momentum=0.1, eps=1e-5):
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    r = F.batch_norm(shortcut, shortcut_running_mean, shortcut_running_var,
                     shortcut_weight, shortcut_bias, training, momentum, eps)
    return torch.relu(y + r)


# --------------------------------------------------------------------------------------
# The cuDNN graphs (fusedres.cudnn_graph): what each computes, NCHW or channels_last
# --------------------------------------------------------------------------------------


def _sums(y: Tensor) -> tuple[Tensor, Tensor]:
    """genstats: per-channel ``sum(y)`` and ``sum(y*y)`` of ``y`` as stored (rounded to
    its dtype), accumulated in the acc dtype."""
    ya = y.to(acc_dtype(y.dtype))
    return ya.sum(dim=(0, 2, 3)), (ya * ya).sum(dim=(0, 2, 3))


def graph_f0(x: Tensor, weight: Tensor, stride, padding) -> tuple[Tensor, Tensor, Tensor]:
    """F0, conv_fprop -> genstats: ``(y, sum(y), sum(y*y))`` per output channel."""
    y = F.conv2d(x, weight, None, stride, padding)
    return (y, *_sums(y))


def bn_relu_prologue(x: Tensor, scale: Tensor, shift: Tensor,
                     centre: Optional[Tensor] = None) -> Tensor:
    """F1's prologue ``relu(x*scale + shift)``, or ``relu((x - centre)*scale + shift)``
    (acc dtype math, one rounding to ``x``'s dtype, as the graph's virtual tensor is stored
    at the conv's input dtype)."""
    acc = acc_dtype(x.dtype)
    v = lambda t: t.view(1, -1, 1, 1).to(acc)  # noqa: E731
    xa = x.to(acc) if centre is None else x.to(acc) - v(centre)
    return torch.relu(xa * v(scale) + v(shift)).to(x.dtype)


def graph_f1(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, stride, padding,
             centre: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """F1, scale*x + bias -> ReLU -> conv_fprop -> genstats: ``(y, sum(y), sum(y*y))``
    (with a ``centre``: ``(x - centre)*scale + shift``). The conv's zero padding applies to
    the prologue's output: a padded tap is 0, never ``relu(0*scale + shift)``."""
    y = F.conv2d(bn_relu_prologue(x, scale, shift, centre), weight, None, stride, padding)
    return (y, *_sums(y))


def bn_finalize(sum_y: Tensor, sum_sq: Tensor, count: int, weight: Optional[Tensor],
                bias: Optional[Tensor], eps: float, running_mean: Optional[Tensor] = None,
                running_var: Optional[Tensor] = None, momentum: float = 0.1):
    """BN finalize: per-channel sums over ``count`` elements -> ``(scale, shift, mean,
    invstd, next_running_mean, next_running_var)`` (the next running stats None without
    running stats).

    ``mean = sum/M``, biased ``var = max(sum_sq/M - mean**2, 0)`` (what the sums allow:
    it cancels when ``|mean| >> std``), ``scale = gamma*invstd``, ``shift = beta -
    mean*scale`` (so ``bn(y) = y*scale + shift``). Running stats as torch:
    ``(1-m)*old + m*batch`` with the *unbiased* variance ``var*M/(M-1)``; ``momentum`` is
    the factor ``m`` itself (torch's ``momentum=None`` is ``1/num_batches_tracked``).
    cuDNN's ``bn_finalize`` takes ``m`` as its exponential-average factor: Paddle passes
    ``1 - momentum`` because its momentum weighs the old value (:func:`graph_bn_finalize`)."""
    mean = sum_y / count
    var = torch.clamp(sum_sq / count - mean * mean, min=0)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(invstd.dtype)
    next_rm = next_rv = None
    if running_mean is not None:
        next_rm = (1 - momentum) * running_mean + momentum * mean.to(running_mean.dtype)
    if running_var is not None:
        unbiased = var * (count / max(count - 1, 1))
        next_rv = (1 - momentum) * running_var + momentum * unbiased.to(running_var.dtype)
    return scale, shift, mean, invstd, next_rm, next_rv


def graph_bn_finalize(sum_y: Tensor, sum_sq: Tensor, gamma: Tensor, beta: Tensor, eps: float,
                      prev_running_mean: Tensor, prev_running_var: Tensor,
                      exp_average_factor: float, accum_count: int):
    """cuDNN's bn_finalize graph (``BN_FINALIZE_STATISTICS``, training mode) in the order
    of ``fusedres::cudnn_graph_bn_finalize``: ``(eq_scale, eq_bias, saved_mean,
    saved_inv_std, next_running_mean, next_running_var)``, every input required.

    Conventions taken (cuDNN's docs, "Normalizations": ``next = (1 - momentum)*previous +
    momentum*current``; Paddle's ``exp_decay = 1 - paddle_momentum``): the
    exponential-average factor is torch's ``momentum``; the running variance takes the
    *unbiased* batch variance (torch's, and cuDNN's own legacy BN's), ``eq_bias = beta -
    mean*eq_scale``. The unbiased variance is not documented for the graph: the doctor's
    ``cudnn_graph_BNFinalize`` row checks all six outputs on a GPU. The new running
    statistics are returned, the given ones untouched (cuDNN writes them to new tensors).
    """
    return bn_finalize(sum_y, sum_sq, accum_count, gamma, beta, eps, prev_running_mean,
                       prev_running_var, exp_average_factor)


def _dgrad(dout: Tensor, weight: Tensor, input_shape, stride, padding) -> Tensor:
    acc = acc_dtype(dout.dtype)
    return torch.nn.grad.conv2d_input(input_shape, weight.to(acc), dout.to(acc), stride, padding)


def dgrad_drelu(dout: Tensor, weight: Tensor, stride, padding, x_prev: Tensor,
                scale: Tensor, shift: Tensor) -> Tensor:
    """dgrad -> dReLU: the gradient at the previous BN's output ``bn(x_prev) =
    x_prev*scale + shift``, i.e. ``dgrad(dout, w) * [x_prev*scale + shift > 0]`` (the mask
    recomputed from the previous conv's output), in the acc dtype."""
    dh = _dgrad(dout, weight, x_prev.shape, stride, padding)
    pre = x_prev.to(dh.dtype) * scale.view(1, -1, 1, 1).to(dh.dtype) \
        + shift.view(1, -1, 1, 1).to(dh.dtype)
    return torch.where(pre > 0, dh, torch.zeros_like(dh))


def graph_dgrad_drelu_dbn(dout: Tensor, weight: Tensor, stride, padding, x: Tensor,
                          mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """DgradDreluDBN, conv_dgrad -> dReLU -> dbn_weight: ``(g, dgamma, dbeta)``.

    ``g = dgrad(dout, w) * [((x - mean)*invstd)*gamma + beta > 0]``: the gradient at the
    previous BN's output, its ReLU mask recomputed from the BN's input ``x`` in the
    centred form of cuDNN's DgradDreluBNBwdWeight pattern, stored in ``x``'s dtype; then
    dbn_weight's centred sums of the stored ``g``: ``dgamma = sum(g*xhat)``, ``dbeta =
    sum(g)`` (acc dtype)."""
    dh = _dgrad(dout, weight, x.shape, stride, padding)
    v = lambda t: t.view(1, -1, 1, 1).to(dh.dtype)  # noqa: E731
    pre = (x.to(dh.dtype) - v(mean)) * v(invstd) * v(gamma) + v(beta)
    g = torch.where(pre > 0, dh, torch.zeros_like(dh)).to(x.dtype)
    dgamma, dbeta, *_ = dbn_weight(g, x, mean, invstd, gamma)
    return g, dgamma, dbeta


def graph_wgrad(dout: Tensor, x: Tensor, scale: Tensor, shift: Tensor, weight_shape, stride,
                padding) -> Tensor:
    """ConvBNwgrad, relu(x*scale + shift) -> conv_wgrad: the weight gradient with F1's
    prologue recomputed (:func:`bn_relu_prologue`; padded taps 0 after it), in ``dout``'s
    dtype."""
    acc = acc_dtype(dout.dtype)
    return torch.nn.grad.conv2d_weight(bn_relu_prologue(x, scale, shift).to(acc), weight_shape,
                                       dout.to(acc), stride, padding).to(dout.dtype)


def dbn_weight(g: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor]):
    """dBN weight: ``(dgamma, dbeta, A, B, C)`` of a BN in training from the gradient ``g``
    at its output and its input ``x``: ``dbeta = sum(g)``, ``dgamma = sum(g*xhat)`` with
    ``xhat = (x - mean)*invstd``, and the input gradient's coefficients, ``dx = A*g + B*x
    + C`` (``dbn_apply``) -- torch's ``gamma*invstd*(g - dbeta/M - xhat*dgamma/M)``."""
    acc = acc_dtype(x.dtype)
    g, xa = g.to(acc), x.to(acc)
    count = x.numel() // x.shape[1]
    xhat = (xa - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
    dbeta = g.sum(dim=(0, 2, 3))
    dgamma = (g * xhat).sum(dim=(0, 2, 3))
    a = invstd if weight is None else weight.to(acc) * invstd
    b = -a * invstd * dgamma / count
    c = -a * dbeta / count - b * mean
    return dgamma, dbeta, a, b, c


def dbn_apply(g: Tensor, x: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """dBNApply: ``dx = A*g + B*x + C`` per channel (acc dtype math, ``x``'s dtype out)."""
    acc = acc_dtype(x.dtype)
    v = lambda t: t.view(1, -1, 1, 1).to(acc)  # noqa: E731
    return (v(a) * g.to(acc) + v(b) * x.to(acc) + v(c)).to(x.dtype)


def graph_bn_add_relu(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                      residual: Optional[Tensor] = None, x2: Optional[Tensor] = None,
                      mean2: Optional[Tensor] = None, scale2: Optional[Tensor] = None,
                      shift2: Optional[Tensor] = None, save_mask: bool = False
                      ) -> tuple[Tensor, Tensor]:
    """The block tail's pointwise graph (BNAddReLU with ``residual``, DualBNAddReLU with
    ``x2``): ``out = relu(pre)``, ``pre = (x - mean)*scale + shift + [residual |
    (x2 - mean2)*scale2 + shift2]`` on 4-D tensors, acc dtype math, one rounding to
    ``x``'s dtype, ``out`` channels_last; with ``save_mask`` the ReLU mask ``pre > 0``
    packed 1 bit per element in the NHWC memory order (:func:`pack_mask` with
    ``channels_last``: cuDNN's BOOLEAN layout of an NHWC tensor), else an empty ``uint8``.
    The BN kernels' ``bn_apply`` with a residual or a second BN, whose backward reads this
    mask; the one difference: a NaN pre-activation's bit is 0 here (``pre > 0``), 1 there
    (``not pre <= 0``), as cuDNN's ``CMP_GT`` gives it."""
    if (residual is None) == (x2 is None):
        raise ValueError("exactly one of residual and x2")
    n, c = x.shape[:2]
    v = lambda t: t.to(acc_dtype(x.dtype)).view(1, -1, 1, 1)  # noqa: E731
    pre = (x.to(acc_dtype(x.dtype)) - v(mean)) * v(scale) + v(shift)
    if x2 is not None:
        pre = pre + ((x2.to(pre.dtype) - v(mean2)) * v(scale2) + v(shift2))
    else:
        pre = pre + residual.to(pre.dtype)
    out = torch.relu(pre).to(x.dtype).contiguous(memory_format=torch.channels_last)
    mask = pack_mask((pre > 0).reshape(n, c, -1), True) if save_mask \
        else torch.empty(0, dtype=torch.uint8, device=x.device)
    return out, mask

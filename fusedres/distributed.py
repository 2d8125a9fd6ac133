"""Synchronised BN statistics across processes (the SyncBatchNorm of the fused ops).

Forward: each rank computes its per-channel (count, mean, M2) with the backend's stats
kernel; ONE ``all_gather`` exchanges them and every rank merges them the same way
(Chan's formula in float64, in rank order: deterministic, exact for uneven batches, a
rank with an empty batch contributes count 0). The fused apply kernel then runs with the
global statistics. Backward: the backend's reduction kernel computes sum(g) and
sum(g*(x-mean)); ONE ``all_reduce`` sums them for the input gradient, while the weight
and bias gradients stay local (DDP averages them across ranks, as with
``nn.SyncBatchNorm``). Running statistics are updated from the global statistics.

Uses torch.distributed's collectives only (NCCL on GPUs, gloo on CPU). Unlike
``nn.SyncBatchNorm`` it accepts CPU tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import ops
from . import reference as ref


def world_size(process_group) -> int:
    return dist.get_world_size(process_group)


def check_process_group(process_group) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("synchronised BN needs an initialised torch.distributed process "
                           "group (torch.distributed.init_process_group); none is")


def _local_stats(prims, x3, channels_last):
    """(count, mean, M2) of one rank, acc dtype, shape (3, C)."""
    n, c, s = x3.shape
    acc = ref.acc_dtype(x3.dtype)
    count = n * s
    if count == 0:
        return torch.zeros(3, c, dtype=acc, device=x3.device)
    mean, var = prims.stats(x3, channels_last)
    return torch.stack([torch.full_like(mean, float(count)), mean, var * count])


def merge_stats(gathered: torch.Tensor):
    """Chan's merge of (W, 3, C) per-rank (count, mean, M2), in rank order, in float64;
    (count, mean, M2) in ``gathered``'s dtype. In fp32 each step rounded the running mean
    at its magnitude and the between-rank term ``delta**2`` took that rounding: at mean
    1e3, ranks' means 1e-2 apart, the variance was 6e3-1.8e4 fp32 units off
    (tests/test_distributed.py::test_merge_stats_large_mean)."""
    dtype = gathered.dtype
    gathered = gathered.to(torch.float64)
    count, mean, m2 = gathered[0, 0], gathered[0, 1], gathered[0, 2]
    for k in range(1, gathered.shape[0]):
        nb, mb, m2b = gathered[k, 0], gathered[k, 1], gathered[k, 2]
        total = count + nb
        safe = torch.where(total > 0, total, torch.ones_like(total))
        delta = mb - mean
        mean = mean + delta * nb / safe
        m2 = m2 + m2b + delta * delta * count * nb / safe
        count = total
    return count.to(dtype), mean.to(dtype), m2.to(dtype)


class SyncBatchNormAct(torch.autograd.Function):
    """``out = [relu](bn(x) [+ bn2(x2)] [+ residual])`` with global batch statistics."""

    @staticmethod
    def forward(ctx, x3, weight, bias, residual, x2, weight2, bias2, eps, relu, channels_last,
                backend, process_group):
        prims = ops.primitives(backend)
        inputs = [x3] + ([x2] if x2 is not None else [])
        local = torch.cat([_local_stats(prims, t, channels_last) for t in inputs])
        gathered = [torch.empty_like(local) for _ in range(world_size(process_group))]
        dist.all_gather(gathered, local, group=process_group)
        gathered = torch.stack(gathered)  # (W, 3 * inputs, C)
        stats = []
        for i in range(len(inputs)):
            count, mean, m2 = merge_stats(gathered[:, 3 * i:3 * i + 3])
            stats.append((mean, m2 / count))
        # The global count stays on the device: no host sync (and so no check that it
        # exceeds 1; the running variance then guards its division).
        total = gathered[:, 0, :1].sum(0)
        (mean, var) = stats[0]
        _, scale, shift = ops.centred_scale_shift(weight, bias, mean, var, eps)
        scale2 = shift2 = mean2 = var2 = None
        if x2 is not None:
            mean2, var2 = stats[1]
            _, scale2, shift2 = ops.centred_scale_shift(weight2, bias2, mean2, var2, eps)
        save_mask = relu and (residual is not None or x2 is not None)
        if x3.numel() == 0:
            out = ref.empty_ncs(*x3.shape, channels_last, x3.dtype, x3.device)
            mask = torch.zeros(0, dtype=torch.uint8, device=x3.device)
        else:
            out, mask = prims.apply(x3, mean, scale, shift, residual, x2, mean2, scale2,
                                    shift2, relu, save_mask, channels_last)
        ctx.save_for_backward(x3, weight, bias, mean, var, mask if mask.numel() else None,
                              x2, weight2, bias2, mean2, var2)
        ctx.options = (eps, relu, residual is not None, channels_last, backend, process_group,
                       total)
        ctx.mark_non_differentiable(mean, var, total)
        if mean2 is not None:
            ctx.mark_non_differentiable(mean2, var2)
        return out, mean, var, mean2, var2, total

    @staticmethod
    def backward(ctx, dout, _dmean, _dvar, _dmean2, _dvar2, _dtotal):
        x3, weight, bias, mean, var, mask, x2, weight2, bias2, mean2, var2 = ctx.saved_tensors
        eps, relu, has_residual, channels_last, backend, process_group, total = ctx.options
        prims = ops.primitives(backend)
        branches = [(x3, weight, bias, mean, var)]
        if x2 is not None:
            branches.append((x2, weight2, bias2, mean2, var2))
        dout = dout.reshape(x3.shape)
        local, coefs = [], []
        for xb, w, b, m, v in branches:
            invstd, scale, shift = ops.centred_scale_shift(w, b, m, v, eps)
            coefs.append((invstd, scale, shift))
            if xb.numel() == 0:
                local.append(torch.zeros(2, xb.shape[1], dtype=m.dtype, device=m.device))
            else:
                local.append(torch.stack(prims.backward_reduce(dout, xb, m, scale, shift, mask,
                                                               relu, channels_last)))
        sums = torch.cat(local)
        global_sums = sums.clone()
        dist.all_reduce(global_sums, group=process_group)
        grads = []
        for i, ((xb, w, b, m, v), (invstd, scale, shift)) in enumerate(zip(branches, coefs)):
            sum_g, sum_g_xc = global_sums[2 * i], global_sums[2 * i + 1]
            local_g, local_g_xc = sums[2 * i], sums[2 * i + 1]
            write_res = i == 0 and has_residual and ctx.needs_input_grad[3]
            if xb.numel() == 0:
                dx = torch.zeros_like(xb)
                dres = torch.zeros_like(xb) if write_res else None
            else:
                coefs = ops.backward_coefficients(scale, invstd, sum_g, sum_g_xc, total)
                dx, dres = prims.backward_apply(dout, xb, m, scale, shift, mask, *coefs, relu,
                                                write_res, channels_last)
            dw = (local_g_xc * invstd).to(w.dtype) if w is not None else None
            db = local_g.to(b.dtype) if b is not None else None
            grads.append((dx, dw, db, dres if write_res else None))
        dx, dw, db, dres = grads[0]
        dx2 = dw2 = db2 = None
        if x2 is not None:
            dx2, dw2, db2, _ = grads[1]
        return dx, dw, db, dres, dx2, dw2, db2, None, None, None, None, None


def sync_batch_norm_act(x3, weight, bias, residual, x2, weight2, bias2, eps, relu,
                        channels_last, backend, process_group: Optional[object]):
    """Returns ``(out, mean, var, mean2, var2, count)`` with global statistics; ``count``
    is a one-element tensor (the global number of values per channel)."""
    return SyncBatchNormAct.apply(x3, weight, bias, residual, x2, weight2, bias2, eps, relu,
                                  channels_last, backend, process_group)

# fusedres Triton kernels: BatchNorm statistics, BN(+BN)(+add)+ReLU apply, and the two
# passes of their backward.  The contract of every launcher is the primitive of the same
# name in fusedres/reference.py (signature, return values, layouts, mask format).
#
# Layouts.  Activations are 3-D (N, C, S) views with arbitrary strides (S = H*W); the
# kernels gather them by their strides with int64 offsets, so offsets past 2**31 work.
# Outputs are allocated dense by the launchers with reference.empty_ncs(...): strides
# (S*C, 1, C) when channels_last, (C*S, S, 1) otherwise.  Per-channel vectors are in
# the accumulation dtype (fp64 for fp64 activations, fp32 otherwise); all math is in it,
# with one cast at the store.
#
# Kernels (a projection shortcut's second BN input x2 rides along in the same launches).
#   _bn_stats_partial_kernel     per (reduction chunk, channel block): per-lane Welford,
#                                merged into one (count, mean, M2) per channel and chunk
#   _bn_stats_finalize_kernel    per channel block: merges the [C, P] partials in a fixed
#                                order (Chan's formula, n=0 guarded; deterministic, no
#                                atomics), then invstd, scale, shift and the running-
#                                statistics update: all per-channel forward work, 1 launch
#   _bn_bwd_reduce_partial_kernel  per (chunk, channel block): sum(g), sum(g*(x-mean))
#   _bn_bwd_finalize_kernel      merges those sums, then dweight, dbias and the input-
#                                gradient coefficients: all per-channel backward work
#   _bn_apply_kernel             out = [relu]((x-mean)*scale+shift [+ (x2-mean2)*scale2
#                                + shift2] [+ r]), optional 1-bit ReLU mask (shift = beta:
#                                the centred form, exact for a large mean, see _centred)
#   _bn_bwd_apply_kernel         dx = coef_g*g + coef_xc*(x-mean) + coef_c, optional dres=g
#                                and dx2 (one read of dout and the mask for both inputs)
# A training-mode forward + backward is 6 launches (fusedres.ops.batch_norm_act with
# backend="triton"; tests/test_launch_count_triton.py counts them).
# The elementwise kernels walk the dense output in memory order, in blocks shaped
# [BLOCK // 8, 8]: one row is one byte of the mask, so the mask is packed (or unpacked)
# with a sum of bit << k along axis 1, no atomics and no read-modify-write.  The (n, c, s)
# of each element is derived from its linear index with int32 divisions relative to the
# block start (the block start itself is split in int64).
#
# Mask: bit o of the packed uint8 mask (byte o >> 3, bit o & 7, LSB first) belongs to the
# element at offset o of the dense output; it is 1 where not (pre_activation <= 0), so
# NaN passes the gradient, as torch.relu does.  ReLU itself is where(pre < 0, 0, pre),
# which propagates NaN (tl.maximum would not).
#
# Limits: bf16 needs a GPU (the interpreter has no bf16 arithmetic).  On CPU tensors the
# kernels run only under TRITON_INTERPRET=1 (set before triton is imported), with one
# fixed config per kernel; on GPU each kernel is autotuned over a handful of configs,
# except under torch.use_deterministic_algorithms(True), which pins the first config of
# each family (bitwise reproducible across processes: no atomics, no timing-based choice).
# References: DESIGN.md sections 1-2; Chan, Golub & LeVeque (1979) for the merge.
import functools
import math
import os

import numpy as np
import torch
import triton
import triton.language as tl

from fusedres.kernels import autotune, device_guard
from fusedres.reference import acc_dtype, empty_ncs

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------
# Configs: one function per kernel family; under the interpreter the first one only.
# --------------------------------------------------------------------------------------


def _elementwise_configs():
    return [
        triton.Config({"BLOCK": 1024}, num_warps=4),
        triton.Config({"BLOCK": 2048}, num_warps=8),
        triton.Config({"BLOCK": 4096}, num_warps=8),
        triton.Config({"BLOCK": 512}, num_warps=4),
    ]


def _reduce_configs():
    # (BLOCK_C, BLOCK_S): channel-fast layouts like wide BLOCK_C, NCHW like wide BLOCK_S.
    return [
        triton.Config({"BLOCK_C": 32, "BLOCK_S": 32}, num_warps=4),
        triton.Config({"BLOCK_C": 64, "BLOCK_S": 32}, num_warps=4),
        triton.Config({"BLOCK_C": 64, "BLOCK_S": 64}, num_warps=8),
        triton.Config({"BLOCK_C": 4, "BLOCK_S": 512}, num_warps=4),
        triton.Config({"BLOCK_C": 1, "BLOCK_S": 1024}, num_warps=4),
        triton.Config({"BLOCK_C": 8, "BLOCK_S": 256}, num_warps=4),
    ]


def _merge_configs():
    # Channels per finalize program; BLOCK_P is the launcher's (_finalize_block_p: one tile
    # holds all P <= _MAX_PARTS partials of a channel, so each lane's loads are issued at
    # once).  Small BLOCK_C: C/BLOCK_C programs (32 at C = 64 with the first config); at
    # BLOCK_P = 1024 each thread holds <= 16 values of each merged array (4 channels with 8
    # warps spilled in the +x2 statistics finalize on sm_90: static check).
    return [
        triton.Config({"BLOCK_C": 2}, num_warps=4),
        triton.Config({"BLOCK_C": 1}, num_warps=4),
        triton.Config({"BLOCK_C": 4}, num_warps=16),
    ]


# Fixed configs used under the interpreter. It runs each program instance in Python with
# numpy vector ops, so its cost is per program and per loop step: big blocks are fast.
_INTERPRETER_CONFIGS = {
    "elementwise": triton.Config({"BLOCK": 1024}, num_warps=4),
    "reduce": triton.Config({"BLOCK_C": 16, "BLOCK_S": 128}, num_warps=4),
    "merge": triton.Config({"BLOCK_C": 32}, num_warps=4),
}


def _autotune(configs, key):
    """triton.autotune on GPU; under the interpreter (no driver) the kernel is left bare
    and the launcher passes the fixed config of _INTERPRETER_CONFIGS."""
    if _INTERPRET:
        return lambda fn: fn
    return autotune(configs(), key)


_FAMILY_CONFIGS = {"elementwise": _elementwise_configs, "reduce": _reduce_configs,
                   "merge": _merge_configs}


def _launch(kernel, family, grid, *args, **constexprs):
    """Launch on the device of the first tensor argument (every launcher passes its
    input first).  Under torch.use_deterministic_algorithms(True) the first config of
    the family is pinned (no timing-based choice: the reductions' rounding depends on
    the tile, so results are then bitwise reproducible across processes)."""
    with device_guard(args[0]):
        if _INTERPRET:
            cfg = _INTERPRETER_CONFIGS[family]
            kernel[grid](*args, **constexprs, **cfg.kwargs, num_warps=cfg.num_warps)
        elif torch.are_deterministic_algorithms_enabled():
            cfg = _FAMILY_CONFIGS[family]()[0]
            kernel.fn[grid](*args, **constexprs, **cfg.kwargs, num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages)
        else:
            kernel[grid](*args, **constexprs)


# --------------------------------------------------------------------------------------
# JIT kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _dense_block_index(
    pid,  # int64 program id
    C,  # channels
    S,  # spatial size
    total,  # N*C*S
    CHANNELS_LAST: tl.constexpr,  # memory order of the dense output
    WIDE: tl.constexpr,  # max(C, S) + BLOCK may pass 2**31: int64 per-element math
    BIG: tl.constexpr,  # total + BLOCK may pass 2**31: int64 block start (64-bit division)
    BLOCK: tl.constexpr,  # elements per program, a multiple of 8
):
    """Linear dense-output offsets o of this block, shaped [BLOCK//8, 8], and the
    (n, c, s) of each element (n int64, c and s int32 unless WIDE)."""
    base = pid * BLOCK
    rows = tl.arange(0, BLOCK // 8)
    bits = tl.arange(0, 8)
    local = rows[:, None] * 8 + bits[None, :]  # [BLOCK//8, 8] int32
    o = base + local.to(tl.int64)
    if CHANNELS_LAST:
        inner = C
        mid = S
    else:
        inner = S
        mid = C
    # o = (n*mid + m)*inner + i, split relative to the block start (in int32 unless BIG:
    # a 64-bit division is a ~84-instruction routine, ~10 per element of a 1024 block)
    if BIG:
        row0 = base // inner
        col0 = base - row0 * inner
        n0 = row0 // mid
        m0 = row0 - n0 * mid
    else:
        base32 = base.to(tl.int32)
        row0 = base32 // inner
        col0 = base32 - row0 * inner
        n0 = (row0 // mid).to(tl.int64)
        m0 = row0 - (row0 // mid) * mid
    if WIDE:
        t = col0 + local.to(tl.int64)
    else:
        t = col0.to(tl.int32) + local
    dq = t // inner
    i = t - dq * inner
    if WIDE:
        r = m0 + dq
    else:
        r = m0.to(tl.int32) + dq
    dn = r // mid
    m = r - dn * mid
    n = n0 + dn.to(tl.int64)
    if CHANNELS_LAST:
        c = i
        s = m
    else:
        c = m
        s = i
    valid = o < total
    return o, n, c, s, valid


@triton.jit
def _gather_offsets(
    o,  # [BLOCK//8, 8] int64 dense-output offsets
    n,  # [BLOCK//8, 8] int64 batch index
    c,  # [BLOCK//8, 8] channel index
    s,  # [BLOCK//8, 8] spatial index
    stride_n, stride_c, stride_s,  # strides of the tensor read
    DENSE: tl.constexpr,  # the tensor has the dense output's strides: read at o
):
    if DENSE:
        off = o  # contiguous: lets the compiler vectorise the access
    else:
        off = n * stride_n + c.to(tl.int64) * stride_c + s.to(tl.int64) * stride_s
    return off


@triton.jit
def _centred(x, mean, scale, shift):
    """The pre-activation of one BN, (x - mean)*scale + shift (shift = beta): the one
    expression every kernel uses, so the ReLU mask recomputed in backward is bitwise the
    forward's.  Centring first keeps a large mean with a small spread exact."""
    return (x - mean) * scale + shift


@triton.jit
def _bn_apply_kernel(
    X_ptr,  # (N, C, S) input, any strides
    stride_xn, stride_xc, stride_xs,  # strides of X
    MEAN_ptr,  # (C,) acc dtype: the centre
    SCALE_ptr,  # (C,) acc dtype
    SHIFT_ptr,  # (C,) acc dtype: beta
    R_ptr,  # (N, C, S) residual, any strides (read if HAS_RESIDUAL)
    stride_rn, stride_rc, stride_rs,  # strides of R
    X2_ptr,  # (N, C, S) second BN input, any strides (read if HAS_X2)
    stride_x2n, stride_x2c, stride_x2s,  # strides of X2
    MEAN2_ptr,  # (C,) acc dtype (read if HAS_X2)
    SCALE2_ptr,  # (C,) acc dtype (read if HAS_X2)
    SHIFT2_ptr,  # (C,) acc dtype (read if HAS_X2)
    OUT_ptr,  # (N, C, S) output, dense in the CHANNELS_LAST order
    MASK_ptr,  # (ceil(N*C*S/8),) uint8 packed ReLU mask (written if SAVE_MASK)
    C,  # channels
    S,  # spatial size
    total,  # N*C*S
    HAS_RESIDUAL: tl.constexpr,  # add R
    HAS_X2: tl.constexpr,  # add (X2 - mean2)*scale2 + shift2
    APPLY_RELU: tl.constexpr,  # relu at the end
    SAVE_MASK: tl.constexpr,  # write the 1-bit mask of not (pre <= 0)
    CHANNELS_LAST: tl.constexpr,  # layout of OUT and of the mask
    X_DENSE: tl.constexpr,  # X has OUT's strides
    R_DENSE: tl.constexpr,  # R has OUT's strides
    X2_DENSE: tl.constexpr,  # X2 has OUT's strides
    WIDE: tl.constexpr,  # int64 per-element index math
    BIG: tl.constexpr,  # int64 block start (N*C*S near 2**31)
    ACC: tl.constexpr,  # accumulation dtype (tl.float32 or tl.float64)
    BLOCK: tl.constexpr,  # elements per program, multiple of 8
):
    pid = tl.program_id(0).to(tl.int64)
    o, n, c, s, valid = _dense_block_index(pid, C, S, total, CHANNELS_LAST, WIDE, BIG, BLOCK)
    x = tl.load(X_ptr + _gather_offsets(o, n, c, s, stride_xn, stride_xc, stride_xs, X_DENSE),
                mask=valid, other=0.0)
    mean = tl.load(MEAN_ptr + c, mask=valid, other=0.0)
    scale = tl.load(SCALE_ptr + c, mask=valid, other=0.0)
    shift = tl.load(SHIFT_ptr + c, mask=valid, other=0.0)
    pre = _centred(x.to(ACC), mean, scale, shift)
    if HAS_X2:
        x2 = tl.load(X2_ptr + _gather_offsets(o, n, c, s, stride_x2n, stride_x2c, stride_x2s,
                                              X2_DENSE), mask=valid, other=0.0)
        mean2 = tl.load(MEAN2_ptr + c, mask=valid, other=0.0)
        scale2 = tl.load(SCALE2_ptr + c, mask=valid, other=0.0)
        shift2 = tl.load(SHIFT2_ptr + c, mask=valid, other=0.0)
        pre = pre + _centred(x2.to(ACC), mean2, scale2, shift2)
    if HAS_RESIDUAL:
        r = tl.load(R_ptr + _gather_offsets(o, n, c, s, stride_rn, stride_rc, stride_rs,
                                            R_DENSE), mask=valid, other=0.0)
        pre = pre + r.to(ACC)
    if APPLY_RELU:
        val = tl.where(pre < 0, 0.0, pre)  # NaN propagates
    else:
        val = pre
    tl.store(OUT_ptr + o, val.to(OUT_ptr.dtype.element_ty), mask=valid)
    if SAVE_MASK:
        passes = (~(pre <= 0) & valid).to(tl.int32)
        weights = 1 << tl.arange(0, 8)
        byte = tl.sum(passes * weights[None, :], axis=1)  # [BLOCK//8]
        byte_idx = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8).to(tl.int64)
        tl.store(MASK_ptr + byte_idx, byte.to(tl.uint8), mask=byte_idx * 8 < total)



@triton.jit
def _bn_bwd_apply_kernel(
    DOUT_ptr,  # (N, C, S) gradient of the output, any strides
    stride_dn, stride_dc, stride_ds,  # strides of DOUT
    X_ptr,  # (N, C, S) BN input, any strides
    stride_xn, stride_xc, stride_xs,  # strides of X
    MEAN_ptr,  # (C,) acc dtype
    SCALE_ptr,  # (C,) acc dtype (read if APPLY_RELU and not HAS_MASK)
    SHIFT_ptr,  # (C,) acc dtype, beta (read if APPLY_RELU and not HAS_MASK)
    MASK_ptr,  # (ceil(N*C*S/8),) uint8 packed mask, CHANNELS_LAST order (if HAS_MASK)
    COEF_G_ptr,  # (C,) acc dtype
    COEF_XC_ptr,  # (C,) acc dtype
    COEF_C_ptr,  # (C,) acc dtype
    X2_ptr,  # (N, C, S) second BN input, any strides (read if HAS_X2)
    stride_x2n, stride_x2c, stride_x2s,  # strides of X2
    MEAN2_ptr,  # (C,) acc dtype (HAS_X2)
    COEF_G2_ptr,  # (C,) acc dtype (HAS_X2)
    COEF_XC2_ptr,  # (C,) acc dtype (HAS_X2)
    COEF_C2_ptr,  # (C,) acc dtype (HAS_X2)
    DX_ptr,  # (N, C, S) output, dense in the CHANNELS_LAST order (written if NEED_DX)
    DRES_ptr,  # (N, C, S) output g, dense (written if WRITE_GRAD_RESIDUAL)
    DX2_ptr,  # (N, C, S) output, dense (written if HAS_X2)
    C,  # channels
    S,  # spatial size
    total,  # N*C*S
    HAS_MASK: tl.constexpr,  # g = dout * mask bit
    APPLY_RELU: tl.constexpr,  # without a mask: g = dout * not (_centred(x) <= 0)
    NEED_DX: tl.constexpr,  # write DX
    WRITE_GRAD_RESIDUAL: tl.constexpr,  # write DRES = g
    HAS_X2: tl.constexpr,  # also DX2 = coef_g2*g + coef_xc2*(x2 - mean2) + coef_c2
    CHANNELS_LAST: tl.constexpr,  # layout of the outputs and of the mask
    DOUT_DENSE: tl.constexpr,  # DOUT has DX's strides
    X_DENSE: tl.constexpr,  # X has DX's strides
    X2_DENSE: tl.constexpr,  # X2 has DX's strides
    WIDE: tl.constexpr,  # int64 per-element index math
    BIG: tl.constexpr,  # int64 block start (N*C*S near 2**31)
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK: tl.constexpr,  # elements per program, multiple of 8
):
    pid = tl.program_id(0).to(tl.int64)
    o, n, c, s, valid = _dense_block_index(pid, C, S, total, CHANNELS_LAST, WIDE, BIG, BLOCK)
    dout = tl.load(DOUT_ptr + _gather_offsets(o, n, c, s, stride_dn, stride_dc, stride_ds,
                                              DOUT_DENSE), mask=valid, other=0.0)
    g = dout.to(ACC)
    if HAS_MASK:
        byte_idx = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8).to(tl.int64)
        byte = tl.load(MASK_ptr + byte_idx, mask=byte_idx * 8 < total, other=0).to(tl.int32)
        bit = (byte[:, None] >> tl.arange(0, 8)[None, :]) & 1
        g = tl.where(bit != 0, g, 0.0)
    if NEED_DX or (APPLY_RELU and not HAS_MASK):
        x = tl.load(X_ptr + _gather_offsets(o, n, c, s, stride_xn, stride_xc, stride_xs,
                                            X_DENSE), mask=valid, other=0.0).to(ACC)
        mean = tl.load(MEAN_ptr + c, mask=valid, other=0.0)
        if not HAS_MASK:
            if APPLY_RELU:
                scale = tl.load(SCALE_ptr + c, mask=valid, other=0.0)
                shift = tl.load(SHIFT_ptr + c, mask=valid, other=0.0)
                g = tl.where(_centred(x, mean, scale, shift) <= 0, 0.0, g)
        if NEED_DX:
            coef_g = tl.load(COEF_G_ptr + c, mask=valid, other=0.0)
            coef_xc = tl.load(COEF_XC_ptr + c, mask=valid, other=0.0)
            coef_c = tl.load(COEF_C_ptr + c, mask=valid, other=0.0)
            dx = coef_g * g + coef_xc * (x - mean) + coef_c
            tl.store(DX_ptr + o, dx.to(DX_ptr.dtype.element_ty), mask=valid)
    if WRITE_GRAD_RESIDUAL:
        tl.store(DRES_ptr + o, g.to(DRES_ptr.dtype.element_ty), mask=valid)
    if HAS_X2:
        x2 = tl.load(X2_ptr + _gather_offsets(o, n, c, s, stride_x2n, stride_x2c, stride_x2s,
                                              X2_DENSE), mask=valid, other=0.0).to(ACC)
        mean2 = tl.load(MEAN2_ptr + c, mask=valid, other=0.0)
        coef_g2 = tl.load(COEF_G2_ptr + c, mask=valid, other=0.0)
        coef_xc2 = tl.load(COEF_XC2_ptr + c, mask=valid, other=0.0)
        coef_c2 = tl.load(COEF_C2_ptr + c, mask=valid, other=0.0)
        dx2 = coef_g2 * g + coef_xc2 * (x2 - mean2) + coef_c2
        tl.store(DX2_ptr + o, dx2.to(DX2_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _chunk_bounds(
    pid,  # int64 program id
    N,  # batch
    S,  # spatial size
    C,  # channels
    N_CHUNK,  # batch rows per reduction chunk
    S_CHUNK,  # spatial positions per reduction chunk
    NUM_S_CHUNKS,  # ceil(S / S_CHUNK)
    BLOCK_C: tl.constexpr,  # channels per program
):
    """Reduction chunk p and channel block of this program, and the chunk's bounds."""
    num_cb = tl.cdiv(C, BLOCK_C)
    cb = pid % num_cb
    p = pid // num_cb
    sc = p % NUM_S_CHUNKS
    nc = p // NUM_S_CHUNKS
    n_start = nc * N_CHUNK
    n_end = tl.minimum(n_start + N_CHUNK, N)
    s_start = sc * S_CHUNK
    s_end = tl.minimum(s_start + S_CHUNK, S)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    return p, offs_c, n_start, n_end, s_start, s_end


@triton.jit
def _partial_index(p, c64, N, N_CHUNK, NUM_S_CHUNKS):
    """Offsets of chunk p's partials in the channel-major [C, P] workspace: the finalize
    reads each channel's P partials as one contiguous run (vector loads, any BLOCK_C)."""
    num_p = tl.cdiv(N, N_CHUNK) * NUM_S_CHUNKS
    return c64 * num_p + p


@triton.jit
def _welford_step(x, upd, inv, mean, m2):
    """One per-lane Welford update of [BLOCK_C, BLOCK_S] lanes where ``upd``."""
    d = x - mean
    mean = tl.where(upd, mean + d * inv[None, :], mean)
    m2 = tl.where(upd, m2 + d * (x - mean), m2)
    return mean, m2


@triton.jit
def _merge_lanes(cnt, mean, m2):
    """Chan's merge of the BLOCK_S lanes of each channel (closed form): (mean, M2)."""
    total = tl.sum(cnt, axis=0)
    mean_c = tl.sum(mean * cnt[None, :], axis=1) / tl.maximum(total, 1.0)
    dev = mean - mean_c[:, None]
    return mean_c, tl.sum(m2, axis=1) + tl.sum(dev * dev * cnt[None, :], axis=1)


@triton.jit
def _bn_stats_partial_kernel(
    X_ptr,  # (N, C, S) input, any strides
    stride_xn, stride_xc, stride_xs,  # strides of X
    X2_ptr,  # (N, C, S) second input, any strides (read if HAS_X2)
    stride_x2n, stride_x2c, stride_x2s,  # strides of X2
    CNT_ptr,  # (C, P) acc dtype: element count of each chunk
    MEAN_ptr,  # (C, P) acc dtype: mean of each chunk, less the pivot x[0, c, 0]
    M2_ptr,  # (C, P) acc dtype: sum of squared deviations of each chunk
    MEAN2_ptr,  # (C, P) acc dtype: the same of X2 (HAS_X2; the counts are X's)
    M22_ptr,  # (C, P) acc dtype (HAS_X2)
    N,  # batch
    C,  # channels
    S,  # spatial size
    N_CHUNK,  # batch rows per chunk
    S_CHUNK,  # spatial positions per chunk
    NUM_S_CHUNKS,  # ceil(S / S_CHUNK)
    HAS_X2: tl.constexpr,  # statistics of X2 in the same pass (a projection shortcut)
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_S: tl.constexpr,  # spatial positions per tile
):
    pid = tl.program_id(0).to(tl.int64)
    p, offs_c, n_start, n_end, s_start, s_end = _chunk_bounds(
        pid, N, S, C, N_CHUNK, S_CHUNK, NUM_S_CHUNKS, BLOCK_C)
    valid_c = offs_c < C
    c64 = offs_c.to(tl.int64)
    # Statistics of x - x[0, c, 0] (the finalize adds the pivot back): at a large mean
    # with a small spread the deviations are then exact, not rounded at the mean's
    # magnitude. Every dtype: a 16-bit x widens exactly, so x - pivot is exact in fp32;
    # unpivoted, fp16 at mean/std 1e3 had 95-154x torch's batch-variance error
    # (tests/test_large_mean.py::test_triton_bn_stats_16bit).
    pivot = tl.load(X_ptr + c64 * stride_xc, mask=valid_c, other=0.0).to(ACC)[:, None]
    if HAS_X2:
        pivot2 = tl.load(X2_ptr + c64 * stride_x2c, mask=valid_c, other=0.0).to(ACC)[:, None]
    # per-lane Welford: lane (c, j) sees the spatial positions s = j (mod BLOCK_S)
    cnt = tl.zeros([BLOCK_S], dtype=ACC)
    mean = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    m2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    mean2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    m22 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    for n in range(n_start, n_end):  # n is int64: the bounds derive from the int64 pid
        for s0 in range(s_start, s_end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            valid_s = offs_s < s_end
            valid = valid_c[:, None] & valid_s[None, :]
            s64 = offs_s.to(tl.int64)[None, :]
            cnt = cnt + valid_s.to(ACC)
            inv = 1.0 / tl.maximum(cnt, 1.0)
            x = tl.load(X_ptr + n * stride_xn + c64[:, None] * stride_xc + s64 * stride_xs,
                        mask=valid, other=0.0).to(ACC) - pivot
            mean, m2 = _welford_step(x, valid_s[None, :], inv, mean, m2)
            if HAS_X2:
                x2 = tl.load(X2_ptr + n * stride_x2n + c64[:, None] * stride_x2c
                             + s64 * stride_x2s, mask=valid, other=0.0).to(ACC) - pivot2
                mean2, m22 = _welford_step(x2, valid_s[None, :], inv, mean2, m22)
    out = _partial_index(p, c64, N, N_CHUNK, NUM_S_CHUNKS)
    mean_c, m2_c = _merge_lanes(cnt, mean, m2)
    tl.store(CNT_ptr + out, tl.zeros([BLOCK_C], dtype=ACC) + tl.sum(cnt, axis=0), mask=valid_c)
    tl.store(MEAN_ptr + out, mean_c, mask=valid_c)
    tl.store(M2_ptr + out, m2_c, mask=valid_c)
    if HAS_X2:
        mean_c, m2_c = _merge_lanes(cnt, mean2, m22)
        tl.store(MEAN2_ptr + out, mean_c, mask=valid_c)
        tl.store(M22_ptr + out, m2_c, mask=valid_c)


@triton.jit
def _exact_scalar(hi, lo, ACC: tl.constexpr):
    """A host double passed as two fp32 kernel arguments (hi + lo, see _split): fp64
    pipelines see the double to ~2**-48, fp32 ones its fp32 rounding."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _channel_affine(
    W_ptr, B_ptr,  # (C,) weight, bias (read if HAS_W, HAS_B)
    var,  # [BLOCK_C] biased variance, acc dtype
    eps,  # acc-dtype scalar
    offs_c, valid_c,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACC: tl.constexpr,
):
    """(invstd, scale = weight*invstd, shift = bias) of the centred apply: the one
    expression every kernel that needs them evaluates (so a recomputed ReLU mask is the
    forward's bit for bit). IEEE-rounded sqrt and division: torch.rsqrt on CPU."""
    if ACC == tl.float64:  # fp64 sqrt and division are IEEE-rounded already
        invstd = 1.0 / tl.sqrt(var + eps)
    else:
        invstd = tl.math.div_rn(tl.full(var.shape, 1.0, ACC), tl.math.sqrt_rn(var + eps))
    if HAS_W:
        scale = tl.load(W_ptr + offs_c, mask=valid_c, other=0.0).to(ACC) * invstd
    else:
        scale = invstd
    if HAS_B:
        shift = tl.load(B_ptr + offs_c, mask=valid_c, other=0.0).to(ACC)
    else:
        shift = tl.zeros(var.shape, ACC)
    return invstd, scale, shift


@triton.jit
def _bn_bwd_reduce_partial_kernel(
    DOUT_ptr,  # (N, C, S) gradient of the output, any strides
    stride_dn, stride_dc, stride_ds,  # strides of DOUT
    X_ptr,  # (N, C, S) BN input, any strides
    stride_xn, stride_xc, stride_xs,  # strides of X
    MEAN_ptr,  # (C,) acc dtype
    W_ptr,  # (C,) scale, or weight if AFFINE_FROM_VAR (APPLY_RELU and not HAS_MASK)
    B_ptr,  # (C,) shift (beta), or bias if AFFINE_FROM_VAR (idem)
    VAR_ptr,  # (C,) biased variance (AFFINE_FROM_VAR)
    eps_hi, eps_lo,  # eps (AFFINE_FROM_VAR), see _exact_scalar
    MASK_ptr,  # (ceil(N*C*S/8),) uint8 packed mask, CHANNELS_LAST order (if HAS_MASK)
    X2_ptr,  # (N, C, S) second BN input, any strides (HAS_X2)
    stride_x2n, stride_x2c, stride_x2s,  # strides of X2
    MEAN2_ptr,  # (C,) acc dtype (HAS_X2)
    SUM_G_ptr,  # (C, P) acc dtype: partial sum(g)
    SUM_GXC_ptr,  # (C, P) acc dtype: partial sum(g * (x - mean))
    SUM_GXC2_ptr,  # (C, P) acc dtype: partial sum(g * (x2 - mean2)) (HAS_X2)
    N,  # batch
    C,  # channels
    S,  # spatial size
    N_CHUNK,  # batch rows per chunk
    S_CHUNK,  # spatial positions per chunk
    NUM_S_CHUNKS,  # ceil(S / S_CHUNK)
    HAS_MASK: tl.constexpr,  # g = dout * mask bit
    APPLY_RELU: tl.constexpr,  # without a mask: g = dout * not (_centred(x) <= 0)
    AFFINE_FROM_VAR: tl.constexpr,  # scale/shift from weight, bias, var, eps (_channel_affine)
    HAS_W: tl.constexpr,  # weight present (AFFINE_FROM_VAR)
    HAS_B: tl.constexpr,  # bias present (AFFINE_FROM_VAR)
    HAS_X2: tl.constexpr,  # also sum(g * (x2 - mean2)) (sum(g) is shared)
    CHANNELS_LAST: tl.constexpr,  # layout the mask was packed in
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_S: tl.constexpr,  # spatial positions per tile
):
    pid = tl.program_id(0).to(tl.int64)
    p, offs_c, n_start, n_end, s_start, s_end = _chunk_bounds(
        pid, N, S, C, N_CHUNK, S_CHUNK, NUM_S_CHUNKS, BLOCK_C)
    valid_c = offs_c < C
    c64 = offs_c.to(tl.int64)
    mean = tl.load(MEAN_ptr + offs_c, mask=valid_c, other=0.0)
    if HAS_X2:
        mean2 = tl.load(MEAN2_ptr + offs_c, mask=valid_c, other=0.0)
    if not HAS_MASK:
        if APPLY_RELU:
            if AFFINE_FROM_VAR:
                _, scale, shift = _channel_affine(
                    W_ptr, B_ptr, tl.load(VAR_ptr + offs_c, mask=valid_c, other=1.0),
                    _exact_scalar(eps_hi, eps_lo, ACC), offs_c, valid_c, HAS_W, HAS_B, ACC)
            else:
                scale = tl.load(W_ptr + offs_c, mask=valid_c, other=0.0)
                shift = tl.load(B_ptr + offs_c, mask=valid_c, other=0.0)
    acc_g = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    acc_gxc = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    acc_gxc2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    for n in range(n_start, n_end):  # int64: the loop bounds derive from the int64 pid
        for s0 in range(s_start, s_end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s64 = offs_s.to(tl.int64)
            valid = valid_c[:, None] & (offs_s < s_end)[None, :]
            dout = tl.load(DOUT_ptr + n * stride_dn + c64[:, None] * stride_dc
                           + s64[None, :] * stride_ds, mask=valid, other=0.0)
            x = tl.load(X_ptr + n * stride_xn + c64[:, None] * stride_xc
                        + s64[None, :] * stride_xs, mask=valid, other=0.0).to(ACC)
            g = dout.to(ACC)
            if HAS_MASK:
                if CHANNELS_LAST:
                    o = (n * S + s64[None, :]) * C + c64[:, None]
                    byte = tl.load(MASK_ptr + (o >> 3), mask=valid, other=0)
                else:
                    o = (n * C + c64[:, None]) * S + s64[None, :]
                    # The byte offsets repeat over 8 positions: contiguous along neither
                    # axis. Triton 3.6's coalescing gives such a 2-D load the channel-fast
                    # layout (3.8: the data's position-fast one), then converts dout, x and
                    # the bytes through shared memory every step and spills; a 1-D load of
                    # the flattened tile takes the data's layout in both (channels-last
                    # data is channel-fast: the 2-D load above agrees with it). See
                    # docs/cuda_reductions.md, "the NCHW mask load".
                    byte = tl.reshape(
                        tl.load(MASK_ptr + tl.reshape(o >> 3, [BLOCK_C * BLOCK_S]),
                                mask=tl.reshape(valid, [BLOCK_C * BLOCK_S]), other=0),
                        [BLOCK_C, BLOCK_S])
                byte = byte.to(tl.int32)
                bit = (byte >> (o & 7).to(tl.int32)) & 1
                g = tl.where(bit != 0, g, 0.0)
            elif APPLY_RELU:
                g = tl.where(_centred(x, mean[:, None], scale[:, None], shift[:, None]) <= 0,
                             0.0, g)
            g = tl.where(valid, g, 0.0)
            acc_g += g
            acc_gxc += g * (x - mean[:, None])
            if HAS_X2:
                x2 = tl.load(X2_ptr + n * stride_x2n + c64[:, None] * stride_x2c
                             + s64[None, :] * stride_x2s, mask=valid, other=0.0).to(ACC)
                acc_gxc2 += g * (x2 - mean2[:, None])
    out = _partial_index(p, c64, N, N_CHUNK, NUM_S_CHUNKS)
    tl.store(SUM_G_ptr + out, tl.sum(acc_g, axis=1), mask=valid_c)
    tl.store(SUM_GXC_ptr + out, tl.sum(acc_gxc, axis=1), mask=valid_c)
    if HAS_X2:
        tl.store(SUM_GXC2_ptr + out, tl.sum(acc_gxc2, axis=1), mask=valid_c)


@triton.jit
def _merge_welford(CNT_ptr, MEAN_P_ptr, M2_P_ptr, P, C, offs_c, valid_c,
                   ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chan's merge of the [C, P] (count, mean, M2) partials in a fixed order (no atomics:
    deterministic): per channel (mean, biased variance).  On GPU BLOCK_P >= P: one tile,
    all loads issued before any use, merged in closed form by pairwise trees (tl.sum)."""
    n_a = tl.zeros([BLOCK_C], dtype=ACC)
    a = tl.zeros([BLOCK_C], dtype=ACC)
    b = tl.zeros([BLOCK_C], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        valid = (offs_p < P)[:, None] & valid_c[None, :]
        idx = offs_c.to(tl.int64)[None, :] * P + offs_p[:, None]
        ta = tl.load(MEAN_P_ptr + idx, mask=valid, other=0.0)
        tb = tl.load(M2_P_ptr + idx, mask=valid, other=0.0)
        tn = tl.load(CNT_ptr + idx, mask=valid, other=0.0)
        # merge the tile's partials (closed form), then the tile into the running one
        n_b = tl.sum(tn, axis=0)
        mean_b = tl.sum(tn * ta, axis=0) / tl.maximum(n_b, 1.0)
        dev = ta - mean_b[None, :]
        m2_b = tl.sum(tb, axis=0) + tl.sum(tn * dev * dev, axis=0)
        n_ab = n_a + n_b
        w = n_b / tl.maximum(n_ab, 1.0)  # n = 0 guarded
        delta = mean_b - a
        a = a + delta * w
        b = b + m2_b + delta * delta * n_a * w
        n_a = n_ab
    return a, b / tl.where(valid_c, n_a, 1.0)  # every real channel has n_a > 0


@triton.jit
def _merge_sums(A_ptr, P, C, offs_c, valid_c,
                ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-channel total of [C, P] partial sums, in a fixed order (one tile on GPU)."""
    a = tl.zeros([BLOCK_C], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        valid = (offs_p < P)[:, None] & valid_c[None, :]
        a += tl.sum(tl.load(A_ptr + offs_c.to(tl.int64)[None, :] * P + offs_p[:, None],
                            mask=valid, other=0.0), axis=0)
    return a


@triton.jit
def _bn_stats_finalize_kernel(
    CNT_ptr,  # (C, P) partial counts (not FROM_RUNNING)
    MEAN_P_ptr, M2_P_ptr,  # (C, P) partial (mean, M2) of X (not FROM_RUNNING)
    MEAN2_P_ptr, M22_P_ptr,  # (C, P) partials of X2 (HAS_X2, not FROM_RUNNING)
    X_ptr, stride_xc,  # the statistics' input: its pivots x[0, c, 0] (not FROM_RUNNING)
    X2_ptr, stride_x2c,  # the same of X2 (HAS_X2, not FROM_RUNNING)
    P,  # number of partials
    C,  # channels
    W_ptr, B_ptr, W2_ptr, B2_ptr,  # (C,) affine parameters (HAS_W, HAS_B, HAS_W2, HAS_B2)
    RM_ptr, RV_ptr, RM2_ptr, RV2_ptr,  # (C,) running statistics (FROM_RUNNING)
    MEAN_ptr, VAR_ptr, SCALE_ptr, SHIFT_ptr,  # (C,) acc dtype outputs
    MEAN2_ptr, VAR2_ptr, SCALE2_ptr, SHIFT2_ptr,  # (C,) acc dtype outputs (HAS_X2)
    eps_hi, eps_lo,  # eps, see _exact_scalar
    HAS_X2: tl.constexpr,  # a second BN (projection shortcut)
    FROM_RUNNING: tl.constexpr,  # eval: mean/var are the running statistics
    SCALE_SHIFT: tl.constexpr,  # write scale, shift (_channel_affine); else only merge
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_W2: tl.constexpr, HAS_B2: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_P: tl.constexpr,  # partials per tile (the launcher's _finalize_block_p)
    BLOCK_C: tl.constexpr,  # channels per program
):
    """Everything per channel between the statistics pass and the apply, in ONE launch:
    merge the partials, then (scale, shift)."""
    pid = tl.program_id(0).to(tl.int64)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    valid_c = offs_c < C
    eps = _exact_scalar(eps_hi, eps_lo, ACC)
    if FROM_RUNNING:
        mean = tl.load(RM_ptr + offs_c, mask=valid_c, other=0.0).to(ACC)
        var = tl.load(RV_ptr + offs_c, mask=valid_c, other=1.0).to(ACC)
    else:
        mean, var = _merge_welford(CNT_ptr, MEAN_P_ptr, M2_P_ptr, P, C, offs_c, valid_c, ACC,
                                   BLOCK_P, BLOCK_C)
        # the partials are of x - x[0, c, 0] (_bn_stats_partial_kernel): add the pivot
        mean += tl.load(X_ptr + offs_c.to(tl.int64) * stride_xc, mask=valid_c,
                        other=0.0).to(ACC)
    tl.store(MEAN_ptr + offs_c, mean, mask=valid_c)
    tl.store(VAR_ptr + offs_c, var, mask=valid_c)
    if SCALE_SHIFT:
        _, scale, shift = _channel_affine(W_ptr, B_ptr, var, eps, offs_c, valid_c, HAS_W,
                                          HAS_B, ACC)
        tl.store(SCALE_ptr + offs_c, scale, mask=valid_c)
        tl.store(SHIFT_ptr + offs_c, shift, mask=valid_c)
    if HAS_X2:
        if FROM_RUNNING:
            mean2 = tl.load(RM2_ptr + offs_c, mask=valid_c, other=0.0).to(ACC)
            var2 = tl.load(RV2_ptr + offs_c, mask=valid_c, other=1.0).to(ACC)
        else:
            mean2, var2 = _merge_welford(CNT_ptr, MEAN2_P_ptr, M22_P_ptr, P, C, offs_c,
                                         valid_c, ACC, BLOCK_P, BLOCK_C)
            mean2 += tl.load(X2_ptr + offs_c.to(tl.int64) * stride_x2c, mask=valid_c,
                             other=0.0).to(ACC)
        tl.store(MEAN2_ptr + offs_c, mean2, mask=valid_c)
        tl.store(VAR2_ptr + offs_c, var2, mask=valid_c)
        if SCALE_SHIFT:
            _, scale2, shift2 = _channel_affine(W2_ptr, B2_ptr, var2, eps, offs_c, valid_c,
                                                HAS_W2, HAS_B2, ACC)
            tl.store(SCALE2_ptr + offs_c, scale2, mask=valid_c)
            tl.store(SHIFT2_ptr + offs_c, shift2, mask=valid_c)


@triton.jit
def _input_grad_coefficients(
    SUM_G_ptr, SUM_GXC_ptr,  # (C,) acc dtype: written totals
    W_ptr, B_ptr, VAR_ptr,  # (C,) weight, bias, biased variance
    DW_ptr, DB_ptr,  # (C,) weight / bias gradients in their dtype (WRITE_DW / WRITE_DB)
    COEF_G_ptr, COEF_XC_ptr, COEF_C_ptr, SHIFT_ptr,  # (C,) acc dtype (COEFS)
    sum_g, sum_gxc, eps, count, offs_c, valid_c,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, WRITE_DW: tl.constexpr, WRITE_DB: tl.constexpr,
    COEFS: tl.constexpr, TRAINING: tl.constexpr, ACC: tl.constexpr,
):
    """One BN input's per-channel backward: the affine gradients and the coefficients of
    ``dx = coef_g*g + coef_xc*(x - mean) + coef_c`` (fusedres.ops.backward_coefficients)."""
    tl.store(SUM_G_ptr + offs_c, sum_g, mask=valid_c)
    tl.store(SUM_GXC_ptr + offs_c, sum_gxc, mask=valid_c)
    if WRITE_DW or WRITE_DB or COEFS:
        var = tl.load(VAR_ptr + offs_c, mask=valid_c, other=1.0)
        invstd, scale, shift = _channel_affine(W_ptr, B_ptr, var, eps, offs_c, valid_c, HAS_W,
                                               HAS_B, ACC)
        if WRITE_DW:
            tl.store(DW_ptr + offs_c, (sum_gxc * invstd).to(DW_ptr.dtype.element_ty),
                     mask=valid_c)
        if WRITE_DB:
            tl.store(DB_ptr + offs_c, sum_g.to(DB_ptr.dtype.element_ty), mask=valid_c)
        if COEFS:
            tl.store(COEF_G_ptr + offs_c, scale, mask=valid_c)
            tl.store(SHIFT_ptr + offs_c, shift, mask=valid_c)
            if TRAINING:
                coef_xc = -scale * invstd * invstd * sum_gxc / count
                coef_c = -scale * sum_g / count
            else:
                coef_xc = tl.zeros(scale.shape, ACC)
                coef_c = tl.zeros(scale.shape, ACC)
            tl.store(COEF_XC_ptr + offs_c, coef_xc, mask=valid_c)
            tl.store(COEF_C_ptr + offs_c, coef_c, mask=valid_c)


@triton.jit
def _bn_bwd_finalize_kernel(
    SUM_G_P_ptr, SUM_GXC_P_ptr, SUM_GXC2_P_ptr,  # (C, P) partial sums (the last if HAS_X2)
    P,  # number of partials
    C,  # channels
    SUM_G_ptr, SUM_GXC_ptr, SUM_GXC2_ptr,  # (C,) acc dtype totals
    W_ptr, B_ptr, VAR_ptr, DW_ptr, DB_ptr,  # (C,) first BN (see _input_grad_coefficients)
    COEF_G_ptr, COEF_XC_ptr, COEF_C_ptr, SHIFT_ptr,
    W2_ptr, B2_ptr, VAR2_ptr, DW2_ptr, DB2_ptr,  # (C,) second BN (HAS_X2)
    COEF_G2_ptr, COEF_XC2_ptr, COEF_C2_ptr, SHIFT2_ptr,
    eps_hi, eps_lo,  # eps, see _exact_scalar
    count_hi, count_lo,  # M = N*S, values per channel
    HAS_X2: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, WRITE_DW: tl.constexpr, WRITE_DB: tl.constexpr,
    HAS_W2: tl.constexpr, HAS_B2: tl.constexpr, WRITE_DW2: tl.constexpr,
    WRITE_DB2: tl.constexpr,
    COEFS: tl.constexpr,  # write the input-gradient coefficients (else only the sums)
    COEFS2: tl.constexpr,  # the same for the second BN
    TRAINING: tl.constexpr,  # batch statistics: dx has the mean and variance terms
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_P: tl.constexpr,  # partials per tile (the launcher's _finalize_block_p)
    BLOCK_C: tl.constexpr,  # channels per program
):
    """Everything per channel between the backward reduction and the input-gradient pass,
    in ONE launch: merge the partial sums, the affine gradients, the coefficients."""
    pid = tl.program_id(0).to(tl.int64)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    valid_c = offs_c < C
    eps = _exact_scalar(eps_hi, eps_lo, ACC)
    count = _exact_scalar(count_hi, count_lo, ACC)
    sum_g = _merge_sums(SUM_G_P_ptr, P, C, offs_c, valid_c, ACC, BLOCK_P, BLOCK_C)
    sum_gxc = _merge_sums(SUM_GXC_P_ptr, P, C, offs_c, valid_c, ACC, BLOCK_P, BLOCK_C)
    _input_grad_coefficients(SUM_G_ptr, SUM_GXC_ptr, W_ptr, B_ptr, VAR_ptr, DW_ptr, DB_ptr,
                             COEF_G_ptr, COEF_XC_ptr, COEF_C_ptr, SHIFT_ptr, sum_g, sum_gxc,
                             eps, count, offs_c, valid_c, HAS_W, HAS_B, WRITE_DW, WRITE_DB,
                             COEFS, TRAINING, ACC)
    if HAS_X2:  # the same g: sum(g) is shared
        sum_gxc2 = _merge_sums(SUM_GXC2_P_ptr, P, C, offs_c, valid_c, ACC, BLOCK_P, BLOCK_C)
        _input_grad_coefficients(SUM_G_ptr, SUM_GXC2_ptr, W2_ptr, B2_ptr, VAR2_ptr, DW2_ptr,
                                 DB2_ptr, COEF_G2_ptr, COEF_XC2_ptr, COEF_C2_ptr, SHIFT2_ptr,
                                 sum_g, sum_gxc2, eps, count, offs_c, valid_c, HAS_W2, HAS_B2,
                                 WRITE_DW2, WRITE_DB2, COEFS2, TRAINING, ACC)


# Autotuned versions (plain kernels under the interpreter).
_bn_apply = _autotune(_elementwise_configs, key=["C", "S", "CHANNELS_LAST", "HAS_RESIDUAL",
                                                  "HAS_X2", "SAVE_MASK", "X_DENSE"])(
    _bn_apply_kernel)
_bn_bwd_apply = _autotune(_elementwise_configs, key=["C", "S", "CHANNELS_LAST", "HAS_MASK",
                                                      "WRITE_GRAD_RESIDUAL", "HAS_X2",
                                                      "X_DENSE"])(_bn_bwd_apply_kernel)
_bn_stats_partial = _autotune(_reduce_configs, key=["C", "S", "N_CHUNK", "S_CHUNK",
                                                     "stride_xc", "HAS_X2"])(
    _bn_stats_partial_kernel)
_bn_bwd_reduce_partial = _autotune(_reduce_configs, key=["C", "S", "N_CHUNK", "S_CHUNK",
                                                          "stride_xc", "HAS_MASK", "HAS_X2"])(
    _bn_bwd_reduce_partial_kernel)
_bn_stats_finalize = _autotune(_merge_configs, key=["P", "C", "HAS_X2", "FROM_RUNNING"])(
    _bn_stats_finalize_kernel)
_bn_bwd_finalize = _autotune(_merge_configs, key=["P", "C", "HAS_X2"])(_bn_bwd_finalize_kernel)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_activation(name: str, t: torch.Tensor, like: torch.Tensor | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fusedres triton bn: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"fusedres triton bn: {name} must be 3-D (N, C, S), got shape "
                         f"{tuple(t.shape)}")
    if t.dtype not in _SUPPORTED:
        raise TypeError(f"fusedres triton bn: {name} has dtype {t.dtype}; supported: "
                        f"{', '.join(str(d) for d in _SUPPORTED)}")
    if like is None:
        if t.device.type == "cpu" and not _INTERPRET:
            raise RuntimeError(f"fusedres triton bn: {name} is a CPU tensor; Triton runs on "
                               "CPU tensors only with TRITON_INTERPRET=1 set before triton "
                               "is imported")
        if t.device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"fusedres triton bn: {name} is on {t.device}; expected a CUDA "
                               "tensor (or CPU under TRITON_INTERPRET=1)")
        return
    if t.shape != like.shape:
        raise ValueError(f"fusedres triton bn: {name} has shape {tuple(t.shape)}, expected "
                         f"{tuple(like.shape)} (the shape of x)")
    if t.device != like.device:
        raise RuntimeError(f"fusedres triton bn: {name} is on {t.device} but x is on "
                           f"{like.device}")


def _channel_vector(name: str, v, x: torch.Tensor) -> torch.Tensor:
    """A (C,) per-channel vector as a contiguous tensor in x's accumulation dtype."""
    c = x.shape[1]
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"fusedres triton bn: {name} must be a tensor, got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != c:
        raise ValueError(f"fusedres triton bn: {name} must have shape ({c},) (one value per "
                         f"channel of x), got {tuple(v.shape)}")
    if v.device != x.device:
        raise RuntimeError(f"fusedres triton bn: {name} is on {v.device} but x is on {x.device}")
    if not v.is_floating_point():
        raise TypeError(f"fusedres triton bn: {name} must be floating point, got {v.dtype}")
    return v.to(acc_dtype(x.dtype)).contiguous()


def _check_mask(mask, x: torch.Tensor):
    """The mask if one is given (non-empty), else None."""
    if mask is None or mask.numel() == 0:
        return None
    nbytes = (x.numel() + 7) // 8
    if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != nbytes:
        raise ValueError(f"fusedres triton bn: mask must be a 1-D uint8 tensor of "
                         f"ceil(N*C*S/8) = {nbytes} bytes, got {mask.dtype} of shape "
                         f"{tuple(mask.shape)}")
    if mask.device != x.device:
        raise RuntimeError(f"fusedres triton bn: mask is on {mask.device} but x is on "
                           f"{x.device}")
    return mask.contiguous()


def _is_dense(t: torch.Tensor, channels_last: bool) -> bool:
    """t has the strides of the dense output in this layout (size-1 dims don't count)."""
    n, c, s = t.shape
    want = (s * c, 1, c) if channels_last else (c * s, s, 1)
    return all(size == 1 or st == w for size, st, w in zip(t.shape, t.stride(), want))


def _wide(c: int, s: int) -> bool:
    # per-element index math relative to the block start stays below 2**31 otherwise
    return max(c, s) + 8192 >= 2**31


def _big(total: int) -> bool:
    # the block start (program id * BLOCK) and its division stay in int32 otherwise
    return total + 8192 >= 2**31


def _split(v: float) -> tuple[float, float]:
    """A host double as two floats Triton passes as fp32 (hi + lo: the double to ~2**-48,
    see _exact_scalar): fp64 pipelines need eps and counts as doubles."""
    hi = float(np.float32(v))
    lo = float(np.float32(v - hi)) if math.isfinite(v) else 0.0
    return hi, lo


# Where the statistics pass puts its programs.  An H100/H200 has 132 SMs; a reduction is
# memory-bound, so each SM needs enough loads in flight to cover the latency (~13 KB/SM
# for 85% of copy bandwidth on H100, 1.4x that on H200).  A program with the default
# channels-last tile (64 channels x 32 positions, 4 warps) has one 4 KB bf16 tile (8 KB
# fp32) in flight per loop step, so >= 8 programs per SM (~1056) give >= 32 KB/SM.
# Chunks of at least 8K elements keep the [C, P] partials (3 values per chunk and channel)
# at <= 1/700 of the input read.  Two bounds (issue 22): P <= _MAX_PARTS partials per
# channel, so the finalize (whose grid is the channel blocks only: 1-2 programs at C = 64
# with the old merge configs) merges one tile of them, all loads issued at once, instead
# of looping over up to 2048 partials; and even the widest tile of _reduce_configs gets
# >= _MIN_PROGRAMS programs (2 per SM).  _MAX_PARTS = 1024, not 512: at C = 64 the 64-
# channel tile's grid is P programs, and 1024 keeps the >= 5 per SM that loads in flight
# need (issue 12; 512 would give 3.9).  A finalize tile of 1024 x BLOCK_C is still one
# round trip.
_TARGET_PROGRAMS = 2048
_MIN_CHUNK_ELEMS = 8192
_MIN_PROGRAMS = 2 * 132
_MAX_PARTS = 1024


def _reduction_chunks(n: int, c: int, s: int, channels_fast: bool):
    """Split the (N, S) reduction domain into P chunks (N_CHUNK rows x S_CHUNK positions)
    so that about _TARGET_PROGRAMS programs of at least _MIN_CHUNK_ELEMS elements run, at
    least _MIN_PROGRAMS with any tile, and P <= _MAX_PARTS.  Independent of the autotuned
    tile, so the [C, P] workspace is known before the launch."""
    return _plan_chunks(n, c, s, channels_fast, _INTERPRET)


@functools.lru_cache(maxsize=4096)
def _plan_chunks(n, c, s, channels_fast, interpret):
    if interpret:
        target_programs, min_elems, min_programs = 8, 64, 1
    else:
        target_programs, min_elems, min_programs = (_TARGET_PROGRAMS, _MIN_CHUNK_ELEMS,
                                                    _MIN_PROGRAMS)
    nominal_bc = 64 if channels_fast else 4
    widest_bc = max(cfg.kwargs["BLOCK_C"] for cfg in _reduce_configs())
    elems = n * s * min(nominal_bc, c)
    p = min(triton.cdiv(target_programs, triton.cdiv(c, nominal_bc)), elems // min_elems)
    p = max(p, triton.cdiv(min_programs, triton.cdiv(c, widest_bc)))
    p = max(1, min(p, _MAX_PARTS))
    # round towards at least p chunks, never past _MAX_PARTS
    if p <= n:
        n_chunk, s_chunk = max(n // p, triton.cdiv(n, _MAX_PARTS)), s
    else:
        n_chunk = 1
        per_row = min(triton.cdiv(p, n), _MAX_PARTS // n)
        s_chunk = min(triton.cdiv(triton.cdiv(s, per_row), 64) * 64, s)
    num_s_chunks = triton.cdiv(s, s_chunk)
    num_p = triton.cdiv(n, n_chunk) * num_s_chunks
    return n_chunk, s_chunk, num_s_chunks, num_p


def _finalize_block_p(num_p: int) -> int:
    """Partials per finalize tile: on GPU all of them (P <= _MAX_PARTS): one tile, every
    load in flight at once, no serial loop; 8 under the interpreter, so that its tests
    cross tile boundaries (the running Chan merge of _merge_welford)."""
    if _INTERPRET:
        return 8
    return min(triton.next_power_of_2(max(num_p, 16)), _MAX_PARTS)


def _chunks_of(x, channels_last):
    n, c, s = x.shape
    channels_fast = x.stride(1) < x.stride(2) if s > 1 else channels_last
    return _reduction_chunks(n, c, s, channels_fast)


def _stats_partials(x, x2, channels_last):
    """The statistics pass (one launch, both inputs): (P, [C, P] partials)."""
    n, c, s = x.shape
    n_chunk, s_chunk, num_s_chunks, num_p = _chunks_of(x, channels_last)
    parts = [torch.empty((c, num_p), dtype=acc_dtype(x.dtype), device=x.device)
             for _ in range(5 if x2 is not None else 3)]
    cnt, mean_p, m2_p = parts[:3]
    mean2_p, m22_p = parts[3:] if x2 is not None else (mean_p, m2_p)
    y2 = x2 if x2 is not None else x
    _launch(_bn_stats_partial, "reduce",
            lambda META: (num_p * triton.cdiv(c, META["BLOCK_C"]),),
            x, x.stride(0), x.stride(1), x.stride(2),
            y2, y2.stride(0), y2.stride(1), y2.stride(2),
            cnt, mean_p, m2_p, mean2_p, m22_p,
            n, c, s, n_chunk, s_chunk, num_s_chunks,
            HAS_X2=x2 is not None, ACC=_tl_acc(x.dtype))
    return num_p, cnt, mean_p, m2_p, mean2_p, m22_p


def _finalize_stats(x, partials, x2, weight, bias, weight2, bias2, running, eps, scale_shift):
    """The per-channel forward work in one launch: returns (mean, var, scale, shift) and
    the same for x2 (None without x2; scale/shift None unless scale_shift).  partials None:
    eval, from the running statistics."""
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    outs = [torch.empty(c, dtype=acc, device=x.device)
            for _ in range((4 if scale_shift else 2) * (2 if x2 is not None else 1))]
    k = len(outs) // (2 if x2 is not None else 1)
    first, second = outs[:k], outs[k:] or outs[:k]
    num_p, cnt, mean_p, m2_p, mean2_p, m22_p = partials or (0,) + (first[0],) * 5
    rm, rv, rm2, rv2 = (r if r is not None else first[0] for r in running)
    pad = lambda v: v + [v[0]] * (4 - len(v))  # noqa: E731  (unused pointers)
    y2 = x2 if x2 is not None else x
    _launch(_bn_stats_finalize, "merge", lambda META: (triton.cdiv(c, META["BLOCK_C"]),),
            cnt, mean_p, m2_p, mean2_p, m22_p, x, x.stride(1), y2, y2.stride(1), num_p, c,
            *(t if t is not None else first[0] for t in (weight, bias, weight2, bias2)),
            rm, rv, rm2, rv2, *pad(first), *pad(second), *_split(eps),
            HAS_X2=x2 is not None, FROM_RUNNING=partials is None, SCALE_SHIFT=scale_shift,
            HAS_W=weight is not None, HAS_B=bias is not None,
            HAS_W2=weight2 is not None, HAS_B2=bias2 is not None, ACC=_tl_acc(x.dtype),
            BLOCK_P=_finalize_block_p(num_p))
    first = tuple(first) + (None,) * (4 - k)
    return first, (tuple(second) + (None,) * (4 - k) if x2 is not None else None)


def bn_stats(x: torch.Tensor, channels_last: bool = False):
    """Per-channel mean and biased variance of x (N, C, S) over (N, S), in acc dtype.
    See fusedres.reference.bn_stats."""
    _check_activation("x", x)
    n, c, s = x.shape
    acc = acc_dtype(x.dtype)
    if c == 0 or n * s == 0:
        nan = torch.full((c,), float("nan"), dtype=acc, device=x.device)
        return nan, nan.clone()
    (mean, var, _, _), _ = _finalize_stats(x, _stats_partials(x, None, channels_last), None,
                                           None, None, None, None, (None,) * 4, 0.0, False)
    return mean, var


def _apply_launch(x, mean, scale, shift, residual, x2, mean2, scale2, shift2, relu, save_mask,
                  channels_last):
    n, c, s = x.shape
    out = empty_ncs(n, c, s, channels_last, x.dtype, x.device)
    total = x.numel()
    mask = torch.empty((total + 7) // 8 if save_mask else 0, dtype=torch.uint8,
                       device=x.device)
    if total == 0:
        return out, mask
    r = residual if residual is not None else x
    x2_ = x2 if x2 is not None else x
    second = (mean2, scale2, shift2) if x2 is not None else (mean, scale, shift)
    _launch(_bn_apply, "elementwise", lambda META: (triton.cdiv(total, META["BLOCK"]),),
            x, x.stride(0), x.stride(1), x.stride(2),
            mean, scale, shift,
            r, r.stride(0), r.stride(1), r.stride(2),
            x2_, x2_.stride(0), x2_.stride(1), x2_.stride(2),
            *second,
            out, mask if save_mask else out,
            c, s, total,
            HAS_RESIDUAL=residual is not None, HAS_X2=x2 is not None,
            APPLY_RELU=bool(relu), SAVE_MASK=bool(save_mask),
            CHANNELS_LAST=bool(channels_last),
            X_DENSE=_is_dense(x, channels_last),
            R_DENSE=residual is not None and _is_dense(residual, channels_last),
            X2_DENSE=x2 is not None and _is_dense(x2, channels_last),
            WIDE=_wide(c, s), BIG=_big(total), ACC=_tl_acc(x.dtype))
    return out, mask


def bn_apply(x, mean, scale, shift, residual, x2, mean2, scale2, shift2, relu, save_mask,
             channels_last):
    """out = [relu]((x - mean)*scale + shift [+ (x2 - mean2)*scale2 + shift2] [+ residual])
    and the packed ReLU mask (empty unless save_mask); shift is beta.
    See fusedres.reference.bn_apply."""
    _check_activation("x", x)
    mean = _channel_vector("mean", mean, x)
    scale = _channel_vector("scale", scale, x)
    shift = _channel_vector("shift", shift, x)
    if residual is not None:
        _check_activation("residual", residual, x)
    if x2 is not None:
        _check_activation("x2", x2, x)
        if mean2 is None or scale2 is None or shift2 is None:
            raise ValueError("fusedres triton bn: x2 needs mean2, scale2 and shift2")
        mean2 = _channel_vector("mean2", mean2, x)
        scale2 = _channel_vector("scale2", scale2, x)
        shift2 = _channel_vector("shift2", shift2, x)
    return _apply_launch(x, mean, scale, shift, residual, x2, mean2, scale2, shift2, relu,
                         save_mask, channels_last)


def _reduce_partials(dout, x, mean, mask, recompute, affine, x2, mean2, channels_last):
    """The backward reduction pass (one launch, both inputs): (P, [C, P] partial sums).
    ``affine`` = (scale, shift) given, or (weight, bias, var, eps) to derive them from."""
    n, c, s = x.shape
    n_chunk, s_chunk, num_s_chunks, num_p = _chunks_of(x, channels_last)
    parts = [torch.empty((c, num_p), dtype=acc_dtype(x.dtype), device=x.device)
             for _ in range(3 if x2 is not None else 2)]
    from_var = len(affine) == 4
    w, b, var, eps = affine if from_var else (*affine, None, 0.0)
    y2 = x2 if x2 is not None else x
    _launch(_bn_bwd_reduce_partial, "reduce",
            lambda META: (num_p * triton.cdiv(c, META["BLOCK_C"]),),
            dout, dout.stride(0), dout.stride(1), dout.stride(2),
            x, x.stride(0), x.stride(1), x.stride(2),
            mean, *(t if t is not None else mean for t in (w, b, var)), *_split(eps),
            mask if mask is not None else mean,
            y2, y2.stride(0), y2.stride(1), y2.stride(2),
            mean2 if mean2 is not None else mean,
            parts[0], parts[1], parts[-1],
            n, c, s, n_chunk, s_chunk, num_s_chunks,
            HAS_MASK=mask is not None, APPLY_RELU=recompute, AFFINE_FROM_VAR=from_var,
            HAS_W=w is not None, HAS_B=b is not None, HAS_X2=x2 is not None,
            CHANNELS_LAST=bool(channels_last), ACC=_tl_acc(x.dtype))
    return num_p, parts


def _backward_inputs(dout, x, mean, scale, shift, mask, relu):
    """Checked inputs of the backward primitives: (mean, scale, shift, mask or None,
    whether the ReLU mask is recomputed); scale/shift only read when it is."""
    _check_activation("x", x)
    _check_activation("dout", dout, x)
    mean = _channel_vector("mean", mean, x)
    mask = _check_mask(mask, x)
    recompute = mask is None and bool(relu)
    if recompute:
        return (mean, _channel_vector("scale", scale, x), _channel_vector("shift", shift, x),
                mask, True)
    return mean, mean, mean, mask, False


def bn_backward_reduce(dout, x, mean, scale, shift, mask, relu, channels_last):
    """Per-channel sum(g) and sum(g*(x - mean)), g = dout * passes (mask bit if a mask is
    given, else recomputed when relu as not ((x - mean)*scale + shift <= 0)).
    See fusedres.reference.bn_backward_reduce."""
    mean, scale, shift, mask, recompute = _backward_inputs(dout, x, mean, scale, shift, mask,
                                                           relu)
    n, c, s = x.shape
    acc = acc_dtype(x.dtype)
    if c == 0 or n * s == 0:
        z = torch.zeros(c, dtype=acc, device=x.device)
        return z, z.clone()
    num_p, (sum_g_p, sum_gxc_p) = _reduce_partials(dout, x, mean, mask, recompute,
                                                   (scale, shift), None, None, channels_last)
    sum_g = torch.empty(c, dtype=acc, device=x.device)
    sum_gxc = torch.empty_like(sum_g)
    _finalize_sums(x, num_p, (sum_g_p, sum_gxc_p, sum_gxc_p), (sum_g, sum_gxc, sum_gxc),
                   None, None, 0.0, False)
    return sum_g, sum_gxc


def _finalize_sums(x, num_p, partials, totals, first, second, eps, training):
    """The per-channel backward work in one launch.  ``first``/``second``: None (only the
    totals) or (weight, bias, var, dweight, dbias, coefs) of each BN input, where coefs is
    None or the (coef_g, coef_xc, coef_c, shift) outputs."""
    c = x.shape[1]
    spare = totals[0]
    unpack = lambda bn: bn if bn is not None else (None,) * 5 + (None,)  # noqa: E731
    w, b, var, dw, db, coefs = unpack(first)
    w2, b2, var2, dw2, db2, coefs2 = unpack(second)
    ptr = lambda t: t if t is not None else spare  # noqa: E731  (unused pointers)
    _launch(_bn_bwd_finalize, "merge", lambda META: (triton.cdiv(c, META["BLOCK_C"]),),
            *partials, num_p, c, *totals,
            *map(ptr, (w, b, var, dw, db)), *map(ptr, coefs or (None,) * 4),
            *map(ptr, (w2, b2, var2, dw2, db2)), *map(ptr, coefs2 or (None,) * 4),
            *_split(eps), *_split(float(x.shape[0] * x.shape[2])),
            HAS_X2=second is not None,
            HAS_W=w is not None, HAS_B=b is not None, WRITE_DW=dw is not None,
            WRITE_DB=db is not None, HAS_W2=w2 is not None, HAS_B2=b2 is not None,
            WRITE_DW2=dw2 is not None, WRITE_DB2=db2 is not None,
            COEFS=coefs is not None, COEFS2=coefs2 is not None, TRAINING=bool(training),
            ACC=_tl_acc(x.dtype), BLOCK_P=_finalize_block_p(num_p))


def _bwd_apply_launch(dout, x, mean, scale, shift, mask, coefs, recompute, need_dx,
                      write_grad_residual, x2, mean2, coefs2, channels_last):
    n, c, s = x.shape
    dx = empty_ncs(n, c, s, channels_last, x.dtype, x.device)
    if write_grad_residual:
        dres = empty_ncs(n, c, s, channels_last, x.dtype, x.device)
    else:
        dres = torch.empty(0, dtype=x.dtype, device=x.device)
    dx2 = empty_ncs(n, c, s, channels_last, x.dtype, x.device) if x2 is not None else None
    total = x.numel()
    if total == 0:
        return dx, dres, dx2
    y2 = x2 if x2 is not None else x
    _launch(_bn_bwd_apply, "elementwise", lambda META: (triton.cdiv(total, META["BLOCK"]),),
            dout, dout.stride(0), dout.stride(1), dout.stride(2),
            x, x.stride(0), x.stride(1), x.stride(2),
            mean, scale, shift,
            mask if mask is not None else dx,
            *coefs,
            y2, y2.stride(0), y2.stride(1), y2.stride(2),
            mean2 if x2 is not None else mean, *(coefs2 if x2 is not None else coefs),
            dx, dres if write_grad_residual else dx, dx2 if x2 is not None else dx,
            c, s, total,
            HAS_MASK=mask is not None, APPLY_RELU=recompute, NEED_DX=bool(need_dx),
            WRITE_GRAD_RESIDUAL=bool(write_grad_residual), HAS_X2=x2 is not None,
            CHANNELS_LAST=bool(channels_last),
            DOUT_DENSE=_is_dense(dout, channels_last), X_DENSE=_is_dense(x, channels_last),
            X2_DENSE=x2 is not None and _is_dense(x2, channels_last),
            WIDE=_wide(c, s), BIG=_big(total), ACC=_tl_acc(x.dtype))
    return dx, dres, dx2


def bn_backward_apply(dout, x, mean, scale, shift, mask, coef_g, coef_xc, coef_c, relu,
                      write_grad_residual, channels_last):
    """dx = coef_g*g + coef_xc*(x - mean) + coef_c and, if asked, dres = g.
    See fusedres.reference.bn_backward_apply."""
    mean, scale, shift, mask, recompute = _backward_inputs(dout, x, mean, scale, shift, mask,
                                                           relu)
    coefs = tuple(_channel_vector(name, v, x) for name, v in
                  (("coef_g", coef_g), ("coef_xc", coef_xc), ("coef_c", coef_c)))
    dx, dres, _ = _bwd_apply_launch(dout, x, mean, scale, shift, mask, coefs, recompute, True,
                                    write_grad_residual, None, None, None, channels_last)
    return dx, dres


# --------------------------------------------------------------------------------------
# The fused op's two directions (fusedres.ops.batch_norm_act / _backward, backend="triton")
# --------------------------------------------------------------------------------------


def batch_norm_act_forward(x, weight, bias, running_mean, running_var, residual, x2, weight2,
                           bias2, running_mean2, running_var2, training, eps, relu,
                           channels_last):
    """``fusedres::batch_norm_act`` in three launches in training (statistics pass of both
    inputs, one per-channel finalize, the apply) and two in eval: returns (out, mean, var,
    mean2, var2, mask) as the op does.  The per-channel vectors are written once, in acc
    dtype, by the finalize kernel."""
    partials = _stats_partials(x, x2, channels_last) if training else None
    first, second = _finalize_stats(
        x, partials, x2, weight, bias, weight2, bias2,
        (running_mean, running_var, running_mean2, running_var2), eps, True)
    mean, var, scale, shift = first
    mean2, var2, scale2, shift2 = second or (None,) * 4
    save_mask = relu and (residual is not None or x2 is not None)
    out, mask = _apply_launch(x, mean, scale, shift, residual, x2, mean2, scale2, shift2,
                              relu, save_mask, channels_last)
    if x2 is None:  # outputs of a custom op may not alias each other: two distinct empties
        mean2, var2 = mean.new_empty(0), mean.new_empty(0)
    return out, mean, var, mean2, var2, mask


def batch_norm_act_backward(dout, x, weight, bias, mean, var, mask, x2, weight2, bias2, mean2,
                            var2, training, eps, relu, has_residual, channels_last, needs):
    """``fusedres::batch_norm_act_backward`` in three launches (reduction of both inputs,
    one per-channel finalize: sums, affine gradients, coefficients; the input-gradient
    pass writing dx, dres and dx2 from one read of dout and the mask).  In eval without
    affine gradients, no reduction: two."""
    need_dx, need_affine, need_res, need_dx2, need_affine2 = needs
    need_dx2 = need_dx2 and x2 is not None
    need_affine2 = need_affine2 and x2 is not None
    write_res = need_res and has_residual
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    empty = lambda: x.new_empty(0)  # noqa: E731
    vec = lambda: torch.empty(c, dtype=acc, device=x.device)  # noqa: E731
    mask = mask if mask is not None and mask.numel() else None
    recompute = mask is None and bool(relu)
    use_x2 = x2 is not None and (need_dx2 or need_affine2)
    reduce = training or need_affine or need_affine2
    affine = (weight, bias, var, eps)
    if reduce:
        num_p, parts = _reduce_partials(dout, x, mean, mask, recompute, affine,
                                        x2 if use_x2 else None, mean2, channels_last)
    else:
        num_p, parts = 0, [vec()]
    parts = (parts[0], parts[1 % len(parts)], parts[-1])
    want_dx = need_dx or write_res
    coefs = (vec(), vec(), vec(), vec()) if want_dx else None
    coefs2 = (vec(), vec(), vec(), vec()) if need_dx2 else None
    grads = lambda w, b, need: (  # noqa: E731
        torch.empty_like(w) if need and w is not None else None,
        torch.empty_like(b) if need and b is not None else None)
    dw, db = grads(weight, bias, need_affine)
    dw2, db2 = grads(weight2, bias2, need_affine2)
    totals = (vec(), vec(), vec())
    _finalize_sums(x, num_p, parts, totals, (weight, bias, var, dw, db, coefs),
                   (weight2, bias2, var2, dw2, db2, coefs2) if use_x2 else None, eps,
                   training)
    dx = dres = dx2 = None
    if want_dx or need_dx2:
        coef_g, coef_xc, coef_c, shift = coefs or coefs2
        dx, dres, dx2 = _bwd_apply_launch(
            dout, x, mean, coef_g, shift, mask, (coef_g, coef_xc, coef_c), recompute,
            want_dx, write_res, x2 if need_dx2 else None, mean2, coefs2[:3] if coefs2 else None,
            channels_last)
    return (dx if need_dx or write_res else empty(),
            dw if dw is not None else empty(), db if db is not None else empty(),
            dres if write_res else empty(),
            dx2 if need_dx2 else empty(),
            dw2 if dw2 is not None else empty(), db2 if db2 is not None else empty())

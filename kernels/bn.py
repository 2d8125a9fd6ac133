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
# Kernels.
#   _bn_stats_partial_kernel     per (reduction chunk, channel block): per-lane Welford,
#                                merged into one (count, mean, M2) per channel and chunk
#   _bn_bwd_reduce_partial_kernel  per (chunk, channel block): sum(g), sum(g*(x-mean))
#   _merge_partials_kernel       merges the [P, C] partials in a fixed order: Chan's
#                                formula (n=0 guarded) or plain sums.  Deterministic,
#                                no atomics.
#   _bn_apply_kernel             out = [relu]((x-mean)*scale+shift [+ (x2-mean2)*scale2
#                                + shift2] [+ r]), optional 1-bit ReLU mask (shift = beta:
#                                the centred form, exact for a large mean, see _centred)
#   _bn_bwd_apply_kernel         dx = coef_g*g + coef_xc*(x-mean) + coef_c, optional dres=g
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
# fixed config per kernel; on GPU each kernel is autotuned over a handful of configs.
# References: DESIGN.md sections 1-2; Chan, Golub & LeVeque (1979) for the merge.
import os

import torch
import triton
import triton.language as tl

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
    return [
        triton.Config({"BLOCK_P": 32, "BLOCK_C": 64}, num_warps=4),
        triton.Config({"BLOCK_P": 64, "BLOCK_C": 32}, num_warps=4),
        triton.Config({"BLOCK_P": 16, "BLOCK_C": 128}, num_warps=4),
    ]


# Fixed configs used under the interpreter. It runs each program instance in Python with
# numpy vector ops, so its cost is per program and per loop step: big blocks are fast.
_INTERPRETER_CONFIGS = {
    "elementwise": triton.Config({"BLOCK": 1024}, num_warps=4),
    "reduce": triton.Config({"BLOCK_C": 16, "BLOCK_S": 128}, num_warps=4),
    "merge": triton.Config({"BLOCK_P": 8, "BLOCK_C": 32}, num_warps=4),
}


def _autotune(configs, key):
    """triton.autotune on GPU; under the interpreter (no driver) the kernel is left bare
    and the launcher passes the fixed config of _INTERPRETER_CONFIGS."""
    if _INTERPRET:
        return lambda fn: fn
    return triton.autotune(configs=configs(), key=key)


def _launch(kernel, family, grid, *args, **constexprs):
    if _INTERPRET:
        cfg = _INTERPRETER_CONFIGS[family]
        kernel[grid](*args, **constexprs, **cfg.kwargs, num_warps=cfg.num_warps)
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
    # o = (n*mid + m)*inner + i, split relative to the block start
    row0 = base // inner
    col0 = base - row0 * inner
    n0 = row0 // mid
    m0 = row0 - n0 * mid
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
    ACC: tl.constexpr,  # accumulation dtype (tl.float32 or tl.float64)
    BLOCK: tl.constexpr,  # elements per program, multiple of 8
):
    pid = tl.program_id(0).to(tl.int64)
    o, n, c, s, valid = _dense_block_index(pid, C, S, total, CHANNELS_LAST, WIDE, BLOCK)
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
    DX_ptr,  # (N, C, S) output, dense in the CHANNELS_LAST order
    DRES_ptr,  # (N, C, S) output g, dense (written if WRITE_GRAD_RESIDUAL)
    C,  # channels
    S,  # spatial size
    total,  # N*C*S
    HAS_MASK: tl.constexpr,  # g = dout * mask bit
    APPLY_RELU: tl.constexpr,  # without a mask: g = dout * not (_centred(x) <= 0)
    WRITE_GRAD_RESIDUAL: tl.constexpr,  # write DRES = g
    CHANNELS_LAST: tl.constexpr,  # layout of the outputs and of the mask
    DOUT_DENSE: tl.constexpr,  # DOUT has DX's strides
    X_DENSE: tl.constexpr,  # X has DX's strides
    WIDE: tl.constexpr,  # int64 per-element index math
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK: tl.constexpr,  # elements per program, multiple of 8
):
    pid = tl.program_id(0).to(tl.int64)
    o, n, c, s, valid = _dense_block_index(pid, C, S, total, CHANNELS_LAST, WIDE, BLOCK)
    dout = tl.load(DOUT_ptr + _gather_offsets(o, n, c, s, stride_dn, stride_dc, stride_ds,
                                              DOUT_DENSE), mask=valid, other=0.0)
    x = tl.load(X_ptr + _gather_offsets(o, n, c, s, stride_xn, stride_xc, stride_xs, X_DENSE),
                mask=valid, other=0.0).to(ACC)
    g = dout.to(ACC)
    if HAS_MASK:
        byte_idx = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8).to(tl.int64)
        byte = tl.load(MASK_ptr + byte_idx, mask=byte_idx * 8 < total, other=0).to(tl.int32)
        bit = (byte[:, None] >> tl.arange(0, 8)[None, :]) & 1
        g = tl.where(bit != 0, g, 0.0)
    mean = tl.load(MEAN_ptr + c, mask=valid, other=0.0)
    if not HAS_MASK:
        if APPLY_RELU:
            scale = tl.load(SCALE_ptr + c, mask=valid, other=0.0)
            shift = tl.load(SHIFT_ptr + c, mask=valid, other=0.0)
            g = tl.where(_centred(x, mean, scale, shift) <= 0, 0.0, g)
    coef_g = tl.load(COEF_G_ptr + c, mask=valid, other=0.0)
    coef_xc = tl.load(COEF_XC_ptr + c, mask=valid, other=0.0)
    coef_c = tl.load(COEF_C_ptr + c, mask=valid, other=0.0)
    dx = coef_g * g + coef_xc * (x - mean) + coef_c
    tl.store(DX_ptr + o, dx.to(DX_ptr.dtype.element_ty), mask=valid)
    if WRITE_GRAD_RESIDUAL:
        tl.store(DRES_ptr + o, g.to(DRES_ptr.dtype.element_ty), mask=valid)


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
def _bn_stats_partial_kernel(
    X_ptr,  # (N, C, S) input, any strides
    stride_xn, stride_xc, stride_xs,  # strides of X
    CNT_ptr,  # (P, C) acc dtype: element count of each chunk
    MEAN_ptr,  # (P, C) acc dtype: mean of each chunk
    M2_ptr,  # (P, C) acc dtype: sum of squared deviations of each chunk
    N,  # batch
    C,  # channels
    S,  # spatial size
    N_CHUNK,  # batch rows per chunk
    S_CHUNK,  # spatial positions per chunk
    NUM_S_CHUNKS,  # ceil(S / S_CHUNK)
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_S: tl.constexpr,  # spatial positions per tile
):
    pid = tl.program_id(0).to(tl.int64)
    p, offs_c, n_start, n_end, s_start, s_end = _chunk_bounds(
        pid, N, S, C, N_CHUNK, S_CHUNK, NUM_S_CHUNKS, BLOCK_C)
    valid_c = offs_c < C
    c_off = offs_c.to(tl.int64) * stride_xc
    # per-lane Welford: lane (c, j) sees the spatial positions s = j (mod BLOCK_S)
    cnt = tl.zeros([BLOCK_S], dtype=ACC)
    mean = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    m2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    for n in range(n_start, n_end):
        n_off = n * stride_xn  # n is int64: the bounds derive from the int64 pid
        for s0 in range(s_start, s_end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            valid_s = offs_s < s_end
            ptrs = X_ptr + n_off + c_off[:, None] + offs_s.to(tl.int64)[None, :] * stride_xs
            x = tl.load(ptrs, mask=valid_c[:, None] & valid_s[None, :], other=0.0).to(ACC)
            cnt = cnt + valid_s.to(ACC)
            inv = 1.0 / tl.maximum(cnt, 1.0)
            d = x - mean
            upd = valid_s[None, :]
            mean = tl.where(upd, mean + d * inv[None, :], mean)
            m2 = tl.where(upd, m2 + d * (x - mean), m2)
    # merge the lanes (Chan's formula for many groups, closed form)
    total = tl.sum(cnt, axis=0)
    tot = tl.maximum(total, 1.0)
    mean_c = tl.sum(mean * cnt[None, :], axis=1) / tot
    dev = mean - mean_c[:, None]
    m2_c = tl.sum(m2, axis=1) + tl.sum(dev * dev * cnt[None, :], axis=1)
    out = p * C + offs_c
    tl.store(CNT_ptr + out, tl.zeros([BLOCK_C], dtype=ACC) + total, mask=valid_c)
    tl.store(MEAN_ptr + out, mean_c, mask=valid_c)
    tl.store(M2_ptr + out, m2_c, mask=valid_c)


@triton.jit
def _bn_bwd_reduce_partial_kernel(
    DOUT_ptr,  # (N, C, S) gradient of the output, any strides
    stride_dn, stride_dc, stride_ds,  # strides of DOUT
    X_ptr,  # (N, C, S) BN input, any strides
    stride_xn, stride_xc, stride_xs,  # strides of X
    MEAN_ptr,  # (C,) acc dtype
    SCALE_ptr,  # (C,) acc dtype (read if APPLY_RELU and not HAS_MASK)
    SHIFT_ptr,  # (C,) acc dtype, beta (read if APPLY_RELU and not HAS_MASK)
    MASK_ptr,  # (ceil(N*C*S/8),) uint8 packed mask, CHANNELS_LAST order (if HAS_MASK)
    SUM_G_ptr,  # (P, C) acc dtype: partial sum(g)
    SUM_GXC_ptr,  # (P, C) acc dtype: partial sum(g * (x - mean))
    N,  # batch
    C,  # channels
    S,  # spatial size
    N_CHUNK,  # batch rows per chunk
    S_CHUNK,  # spatial positions per chunk
    NUM_S_CHUNKS,  # ceil(S / S_CHUNK)
    HAS_MASK: tl.constexpr,  # g = dout * mask bit
    APPLY_RELU: tl.constexpr,  # without a mask: g = dout * not (_centred(x) <= 0)
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
    if not HAS_MASK:
        if APPLY_RELU:
            scale = tl.load(SCALE_ptr + offs_c, mask=valid_c, other=0.0)
            shift = tl.load(SHIFT_ptr + offs_c, mask=valid_c, other=0.0)
    acc_g = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    acc_gxc = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    for n in range(n_start, n_end):
        n64 = n  # int64: the loop bounds derive from the int64 pid
        for s0 in range(s_start, s_end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s64 = offs_s.to(tl.int64)
            valid = valid_c[:, None] & (offs_s < s_end)[None, :]
            dout = tl.load(DOUT_ptr + n64 * stride_dn + c64[:, None] * stride_dc
                           + s64[None, :] * stride_ds, mask=valid, other=0.0)
            x = tl.load(X_ptr + n64 * stride_xn + c64[:, None] * stride_xc
                        + s64[None, :] * stride_xs, mask=valid, other=0.0).to(ACC)
            g = dout.to(ACC)
            if HAS_MASK:
                if CHANNELS_LAST:
                    o = (n64 * S + s64[None, :]) * C + c64[:, None]
                else:
                    o = (n64 * C + c64[:, None]) * S + s64[None, :]
                byte = tl.load(MASK_ptr + (o >> 3), mask=valid, other=0).to(tl.int32)
                bit = (byte >> (o & 7).to(tl.int32)) & 1
                g = tl.where(bit != 0, g, 0.0)
            elif APPLY_RELU:
                g = tl.where(_centred(x, mean[:, None], scale[:, None], shift[:, None]) <= 0,
                             0.0, g)
            g = tl.where(valid, g, 0.0)
            acc_g += g
            acc_gxc += g * (x - mean[:, None])
    out = p * C + offs_c
    tl.store(SUM_G_ptr + out, tl.sum(acc_g, axis=1), mask=valid_c)
    tl.store(SUM_GXC_ptr + out, tl.sum(acc_gxc, axis=1), mask=valid_c)


@triton.jit
def _merge_partials_kernel(
    CNT_ptr,  # (P, C) acc dtype: counts (read if WELFORD)
    A_ptr,  # (P, C) acc dtype: means (WELFORD) or first sums
    B_ptr,  # (P, C) acc dtype: M2 (WELFORD) or second sums
    OUT_A_ptr,  # (C,) acc dtype: mean, or total of A
    OUT_B_ptr,  # (C,) acc dtype: biased variance, or total of B
    P,  # number of partials
    C,  # channels
    WELFORD: tl.constexpr,  # Chan merge of (count, mean, M2); else plain sums
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_P: tl.constexpr,  # partials per tile
    BLOCK_C: tl.constexpr,  # channels per program
):
    pid = tl.program_id(0).to(tl.int64)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    valid_c = offs_c < C
    n_a = tl.zeros([BLOCK_C], dtype=ACC)
    a = tl.zeros([BLOCK_C], dtype=ACC)
    b = tl.zeros([BLOCK_C], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        valid = (offs_p < P)[:, None] & valid_c[None, :]
        idx = offs_p[:, None] * C + offs_c[None, :]
        ta = tl.load(A_ptr + idx, mask=valid, other=0.0)
        tb = tl.load(B_ptr + idx, mask=valid, other=0.0)
        if WELFORD:
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
        else:
            a += tl.sum(ta, axis=0)
            b += tl.sum(tb, axis=0)
    if WELFORD:
        b = b / tl.where(valid_c, n_a, 1.0)  # every real channel has n_a > 0
    tl.store(OUT_A_ptr + offs_c, a, mask=valid_c)
    tl.store(OUT_B_ptr + offs_c, b, mask=valid_c)


# Autotuned versions (plain kernels under the interpreter).
_bn_apply = _autotune(_elementwise_configs, key=["C", "S", "CHANNELS_LAST", "HAS_RESIDUAL",
                                                  "HAS_X2", "SAVE_MASK", "X_DENSE"])(
    _bn_apply_kernel)
_bn_bwd_apply = _autotune(_elementwise_configs, key=["C", "S", "CHANNELS_LAST", "HAS_MASK",
                                                      "WRITE_GRAD_RESIDUAL", "X_DENSE"])(
    _bn_bwd_apply_kernel)
_bn_stats_partial = _autotune(_reduce_configs, key=["C", "S", "N_CHUNK", "S_CHUNK",
                                                     "stride_xc"])(_bn_stats_partial_kernel)
_bn_bwd_reduce_partial = _autotune(_reduce_configs, key=["C", "S", "N_CHUNK", "S_CHUNK",
                                                          "stride_xc", "HAS_MASK"])(
    _bn_bwd_reduce_partial_kernel)
_merge_partials = _autotune(_merge_configs, key=["P", "C", "WELFORD"])(_merge_partials_kernel)


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


def _reduction_chunks(n: int, c: int, s: int, channels_fast: bool):
    """Split the (N, S) reduction domain into P chunks (N_CHUNK rows x S_CHUNK positions)
    so that about a thousand programs of at least ~16K elements run.  Independent of the
    autotuned tile, so the [P, C] workspace is known before the launch."""
    if _INTERPRET:
        target_programs, min_elems = 8, 64
    else:
        target_programs, min_elems = 1024, 16384
    nominal_bc = 64 if channels_fast else 4
    programs_c = triton.cdiv(c, nominal_bc)
    elems = n * s * min(nominal_bc, c)
    p = max(1, min(triton.cdiv(target_programs, programs_c), elems // min_elems))
    if p <= n:
        n_chunk, s_chunk = triton.cdiv(n, p), s
    else:
        n_chunk = 1
        per_row = triton.cdiv(p, n)
        s_chunk = triton.cdiv(triton.cdiv(s, per_row), 64) * 64
        s_chunk = min(s_chunk, s)
    num_s_chunks = triton.cdiv(s, s_chunk)
    num_p = triton.cdiv(n, n_chunk) * num_s_chunks
    return n_chunk, s_chunk, num_s_chunks, num_p


def bn_stats(x: torch.Tensor, channels_last: bool = False):
    """Per-channel mean and biased variance of x (N, C, S) over (N, S), in acc dtype.
    See fusedres.reference.bn_stats."""
    _check_activation("x", x)
    n, c, s = x.shape
    acc = acc_dtype(x.dtype)
    if c == 0 or n * s == 0:
        nan = torch.full((c,), float("nan"), dtype=acc, device=x.device)
        return nan, nan.clone()
    channels_fast = x.stride(1) < x.stride(2) if s > 1 else channels_last
    n_chunk, s_chunk, num_s_chunks, num_p = _reduction_chunks(n, c, s, channels_fast)
    cnt = torch.empty((num_p, c), dtype=acc, device=x.device)
    mean_p = torch.empty_like(cnt)
    m2_p = torch.empty_like(cnt)
    _launch(_bn_stats_partial, "reduce",
            lambda META: (num_p * triton.cdiv(c, META["BLOCK_C"]),),
            x, x.stride(0), x.stride(1), x.stride(2),
            cnt, mean_p, m2_p,
            n, c, s, n_chunk, s_chunk, num_s_chunks,
            ACC=_tl_acc(x.dtype))
    mean = torch.empty(c, dtype=acc, device=x.device)
    var = torch.empty_like(mean)
    _launch(_merge_partials, "merge", lambda META: (triton.cdiv(c, META["BLOCK_C"]),),
            cnt, mean_p, m2_p, mean, var, num_p, c,
            WELFORD=True, ACC=_tl_acc(x.dtype))
    return mean, var


def bn_apply(x, mean, scale, shift, residual, x2, mean2, scale2, shift2, relu, save_mask,
             channels_last):
    """out = [relu]((x - mean)*scale + shift [+ (x2 - mean2)*scale2 + shift2] [+ residual])
    and the packed ReLU mask (empty unless save_mask); shift is beta.
    See fusedres.reference.bn_apply."""
    _check_activation("x", x)
    n, c, s = x.shape
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
    out = empty_ncs(n, c, s, channels_last, x.dtype, x.device)
    total = x.numel()
    if save_mask:
        mask = torch.empty((total + 7) // 8, dtype=torch.uint8, device=x.device)
    else:
        mask = torch.empty(0, dtype=torch.uint8, device=x.device)
    if total == 0:
        return out, mask
    r = residual if residual is not None else x
    x2_ = x2 if x2 is not None else x
    mn2 = mean2 if x2 is not None else mean
    sc2 = scale2 if x2 is not None else scale
    sh2 = shift2 if x2 is not None else shift
    _launch(_bn_apply, "elementwise", lambda META: (triton.cdiv(total, META["BLOCK"]),),
            x, x.stride(0), x.stride(1), x.stride(2),
            mean, scale, shift,
            r, r.stride(0), r.stride(1), r.stride(2),
            x2_, x2_.stride(0), x2_.stride(1), x2_.stride(2),
            mn2, sc2, sh2,
            out, mask if save_mask else out,
            c, s, total,
            HAS_RESIDUAL=residual is not None, HAS_X2=x2 is not None,
            APPLY_RELU=bool(relu), SAVE_MASK=bool(save_mask),
            CHANNELS_LAST=bool(channels_last),
            X_DENSE=_is_dense(x, channels_last),
            R_DENSE=residual is not None and _is_dense(residual, channels_last),
            X2_DENSE=x2 is not None and _is_dense(x2, channels_last),
            WIDE=_wide(c, s), ACC=_tl_acc(x.dtype))
    return out, mask


def bn_backward_reduce(dout, x, mean, scale, shift, mask, relu, channels_last):
    """Per-channel sum(g) and sum(g*(x - mean)), g = dout * passes (mask bit if a mask is
    given, else recomputed when relu as not ((x - mean)*scale + shift <= 0)).
    See fusedres.reference.bn_backward_reduce."""
    _check_activation("x", x)
    _check_activation("dout", dout, x)
    n, c, s = x.shape
    acc = acc_dtype(x.dtype)
    mean = _channel_vector("mean", mean, x)
    mask = _check_mask(mask, x)
    recompute = mask is None and bool(relu)
    if recompute:
        scale = _channel_vector("scale", scale, x)
        shift = _channel_vector("shift", shift, x)
    else:
        scale = shift = mean
    if c == 0 or n * s == 0:
        z = torch.zeros(c, dtype=acc, device=x.device)
        return z, z.clone()
    channels_fast = x.stride(1) < x.stride(2) if s > 1 else channels_last
    n_chunk, s_chunk, num_s_chunks, num_p = _reduction_chunks(n, c, s, channels_fast)
    sum_g_p = torch.empty((num_p, c), dtype=acc, device=x.device)
    sum_gxc_p = torch.empty_like(sum_g_p)
    _launch(_bn_bwd_reduce_partial, "reduce",
            lambda META: (num_p * triton.cdiv(c, META["BLOCK_C"]),),
            dout, dout.stride(0), dout.stride(1), dout.stride(2),
            x, x.stride(0), x.stride(1), x.stride(2),
            mean, scale, shift,
            mask if mask is not None else sum_g_p,
            sum_g_p, sum_gxc_p,
            n, c, s, n_chunk, s_chunk, num_s_chunks,
            HAS_MASK=mask is not None, APPLY_RELU=recompute,
            CHANNELS_LAST=bool(channels_last), ACC=_tl_acc(x.dtype))
    sum_g = torch.empty(c, dtype=acc, device=x.device)
    sum_gxc = torch.empty_like(sum_g)
    _launch(_merge_partials, "merge", lambda META: (triton.cdiv(c, META["BLOCK_C"]),),
            sum_g_p, sum_g_p, sum_gxc_p, sum_g, sum_gxc, num_p, c,
            WELFORD=False, ACC=_tl_acc(x.dtype))
    return sum_g, sum_gxc


def bn_backward_apply(dout, x, mean, scale, shift, mask, coef_g, coef_xc, coef_c, relu,
                      write_grad_residual, channels_last):
    """dx = coef_g*g + coef_xc*(x - mean) + coef_c and, if asked, dres = g.
    See fusedres.reference.bn_backward_apply."""
    _check_activation("x", x)
    _check_activation("dout", dout, x)
    n, c, s = x.shape
    mean = _channel_vector("mean", mean, x)
    coef_g = _channel_vector("coef_g", coef_g, x)
    coef_xc = _channel_vector("coef_xc", coef_xc, x)
    coef_c = _channel_vector("coef_c", coef_c, x)
    mask = _check_mask(mask, x)
    recompute = mask is None and bool(relu)
    if recompute:
        scale = _channel_vector("scale", scale, x)
        shift = _channel_vector("shift", shift, x)
    else:
        scale = shift = mean
    dx = empty_ncs(n, c, s, channels_last, x.dtype, x.device)
    if write_grad_residual:
        dres = empty_ncs(n, c, s, channels_last, x.dtype, x.device)
    else:
        dres = torch.empty(0, dtype=x.dtype, device=x.device)
    total = x.numel()
    if total == 0:
        return dx, dres
    _launch(_bn_bwd_apply, "elementwise", lambda META: (triton.cdiv(total, META["BLOCK"]),),
            dout, dout.stride(0), dout.stride(1), dout.stride(2),
            x, x.stride(0), x.stride(1), x.stride(2),
            mean, scale, shift,
            mask if mask is not None else dx,
            coef_g, coef_xc, coef_c,
            dx, dres if write_grad_residual else dx,
            c, s, total,
            HAS_MASK=mask is not None, APPLY_RELU=recompute,
            WRITE_GRAD_RESIDUAL=bool(write_grad_residual),
            CHANNELS_LAST=bool(channels_last),
            DOUT_DENSE=_is_dense(dout, channels_last), X_DENSE=_is_dense(x, channels_last),
            WIDE=_wide(c, s), ACC=_tl_acc(x.dtype))
    return dx, dres

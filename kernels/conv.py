"""Implicit-GEMM 2-D convolution in Triton with fused BN prologue and epilogues.

Layouts: activations are addressed as NHWC through their strides (a channels_last
tensor gives unit channel stride, the fast case; any strides are correct), weights as
KRSC (``weight.permute(0, 2, 3, 1)``; a channels_last weight is KRSC in memory).
Outputs are allocated channels_last. groups=1, dilation=1 only (the caller's legality
check sends the rest to cuDNN / F.conv2d).

GEMM view of the forward: M = N*P*Q output pixels, N = C_out, K = R*S*C_in with the
reduction index flattened as (r, s, c), c fastest, so a C=3 stem still fills K tiles of
>= 16 (the K tail is masked).

One kernel, ``_conv_kernel``, with constexpr switches:

* ``TRANSPOSED``: the data-gradient (dgrad) of a strided conv, i.e. a transposed conv
  of dy with the same weight read as [C_in, R, S, C_out] through its strides, split into
  stride_h*stride_w sub-pixel phases (grid axis 1) so each phase iterates only the taps
  that reach it (no multiply is wasted on stride holes). Within a phase it is a stride-1
  correlation of dy, so with ``A_TMA`` 2 its M tiles are boxes of the phase's dx pixels
  and each tap reads a box of dy [N, P, Q, C_out] (at any stride; stride 1: one phase).
* ``TAP_LOOP``: K tiles are (tap, channel block) with contiguous channels when
  C % BLOCK_K == 0, walked with counters (no division in the K loop); otherwise (r, s, c)
  is flattened (the C=3 stem).
* Operands by TMA on sm_90 (host ``TensorDescriptor``s; docs/triton_conv.md): ``W_TMA``
  reads the KRSC-dense weight as [C_out, R*S*C_in] (forward and dgrad); ``A_TMA`` reads
  the forward's activations: 1 = a 1x1 stride-1 conv as a GEMM on x as [N*H*W, C], 2 =
  stride 1, one box of x [N, H, W, C] per tap over spatial M tiles (TILE_N images x
  TILE_H x TILE_W; TMA zero-fills the padding), 3 = stride 2 (even H, W), boxes of x
  viewed as [N, H/2, 2, W/2, 2C]. Without TMA (sm_80, odd sizes, sparse strides, a
  Triton without host descriptors) both go through pointers (16-byte cp.async).
* ``PROLOGUE`` on the A operand while loading: 1 = ``relu(x*scale + shift)`` (the
  previous layer's BN-ReLU; fp32 math, rounded once to the operand dtype after the
  ReLU), 2 = ``x + (py - centre)*coef`` (dgrad's dBN term of the stats outputs'
  gradients, dy + dmean/M + dvar*2*(y - mean)/M, centred on y's mean so that no large
  constant is rounded into the operand, less its per-channel constant, whose part of dx
  the accumulator starts from: ``HAS_RESIDUAL`` in the transposed mode; so are the
  zero-filled taps' -centre*coef). Otherwise padded taps and the M/K tails contribute
  exactly 0 AFTER the prologue (DESIGN section 2, the padding pitfall).
* Epilogue: ``HAS_BIAS``, ``HAS_RESIDUAL``, ``EPILOGUE_RELU`` (NaN-propagating),
  ``STATS`` (per tile and output channel: mean, as an fp32 pair the merge adds in fp64,
  and M2 of the output as rounded to the output dtype, masked rows excluded; the count of
  a tile is min(BLOCK_M, M - t*BLOCK_M)
  and is recomputed by the merge kernel, or stored beside them for spatial tiles),
  ``DRELU`` (dgrad epilogue: g = dz * [ey*escale
  + eshift > 0] recomputed from the previous layer's conv output, stores g*escale and
  per-tile sums of g and g*(ey - centre), the partial sums of dshift and dscale, the
  latter about the previous BN's mean so that no large mean cancels out of it).

``_stats_merge_kernel`` combines the tile statistics with Chan's parallel formula
(n = 0 guarded), in two levels when there are many tiles (chunks in parallel, then one
pass over the chunks; fixed order). ``_conv_wgrad_kernel`` is the weight gradient: a
GEMM over the N*P*Q pixels walked as boxes of the output (TILE_N x TILE_H x TILE_W per K
step, counters, no division in the loop; dy and x by TMA on sm_90, ``TMA`` 2/3 as the
forward's A_TMA), N tiles tap-major when C_in fills them, split over that reduction
into a [splits, C_out, R*S*C_in] workspace summed afterwards in a fixed order, with both
prologues recomputed while loading (BN-ReLU of the input, dBN of dy); its grid is
persistent over (tile, split) items, like the plain forward's over tiles
(``PERSISTENT``). Deterministic:
no atomics anywhere in this file, so nothing needs reset_to_zero/restore_value.
No launcher syncs with the host. Under CUDA-graph capture, warm up first: the first
call of a new shape autotunes (benchmarks), which capture does not allow.

Accumulation is fp32 (fp64 for fp64 tensors, so gradcheck runs in the interpreter).
fp32 ``tl.dot`` uses TF32 iff ``torch.backends.cudnn.allow_tf32``. Index math is int32
(GEMM sizes < 2**31, checked); pointer offsets add the batch term in int64, so offsets
past 2**31 work.  Every launch runs under the input's CUDA device.
Autotuning: per kernel mode a few configs that do not spill on sm_90 (``conv_configs``,
pruned by C_out, the reduction channels, dtype and shared-memory budget; ``wgrad_configs``;
benchmarks/static/triton.md), keyed on the GEMM shape and the operand paths; one fixed
config under TRITON_INTERPRET=1.  Deterministic mode: under
``torch.use_deterministic_algorithms(True)`` each mode runs its first config, with no
timing-based choice, so results are bitwise reproducible across processes (no atomics
anywhere; the split of the weight-gradient reduction depends only on the shape and the
device's SM count). The launchers read back the chosen BLOCK_M (a cache
lookup, no host sync) to size the per-tile reductions.
"""
from __future__ import annotations

import functools
import os
import re

import torch
import triton
import triton.language as tl

from fusedres.kernels import autotune, device_guard, run_lock, tuner_for
from fusedres.kernels import capturing as _capturing

try:  # host-side TMA descriptors (triton >= 3.4; the GPU image's 3.6 has them)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older triton: every operand through pointers (cp.async)
    TensorDescriptor = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The persistent loops (plain forward, wgrad) as one flattened, pipelined tile x K loop:
# the next tile's first loads overlap this tile's epilogue (``FLATTEN``; where, see
# ``flatten_tiles``; docs/triton_conv.md, "Persistent pipeline"). False: never.
FLATTEN_PERSISTENT = True


def flatten_tiles(a_tma, residual):
    """Whether the persistent forward fuses its tile and K loops (``FLATTEN``): for the 1x1
    GEMM (``A_TMA`` 1) without a residual only. Its K loop is short (C_in / 64 steps), so
    the epilogue is a large share of a tile; on the 3x3 boxes the fused loop's
    bookkeeping adds 8-10 SASS per HGMMA on every K step (29-31 -> 38-40, over the bar of
    32; sm_90a static figures) to hide an epilogue that is at most 1/9 of the tile. A
    residual's load joins the pipeline (a third multi-buffered operand): 57.8 SASS per
    HGMMA, and 72 B spilled in the loop at 128x64."""
    return FLATTEN_PERSISTENT and a_tma == 1 and not residual


# wgrad's item x pixel loop flattened (``FLATTEN`` of ``_conv_wgrad_kernel``): off. Each
# item already runs >= 8 K steps (the split), and flattened the K step costs 7-9 more
# SASS per HGMMA (29.2-31.0 -> 36.8-39.8), the dBN + BN-ReLU row 140 -> 165, and the
# 128x256 config needs 262 KB of shared memory (sm_90a static figures, docs).
FLATTEN_WGRAD = False


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _x_tap_box(X_desc, n0, h0, w0, tap_r, tap_c, c0, PAD_H, PAD_W, CI, ROWS: tl.constexpr,
               COLS: tl.constexpr, VIEW: tl.constexpr):
    """The box of x that tap (tap_r, tap_c) reads for the output box at (n0, h0, w0), as
    [ROWS, COLS]. VIEW 2: x as [N, H, W, C] (stride 1; TMA zero-fills the padding); 3: the
    stride-2 view [N, H/2, 2, W/2, 2C], where input row 2*oh + dh is (oh + dh>>1, parity
    dh&1) and the column parity picks the channel half."""
    if VIEW == 2:
        box = X_desc.load([n0, h0 - PAD_H + tap_r, w0 - PAD_W + tap_c, c0])
    else:
        dh = tap_r - PAD_H
        dw = tap_c - PAD_W
        box = X_desc.load([n0, h0 + (dh >> 1), dh & 1, w0 + (dw >> 1), (dw & 1) * CI + c0])
    return tl.reshape(box, (ROWS, COLS))


@triton.jit
def _box_rows_in(LANES_ptr, th0, tw0, dh, dw, STRIDE_H, STRIDE_W, IH, IW,
                 ROWS: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Whether each row of a spatial M tile (output box at (th0, tw0), TILE_H x TILE_W per
    image) reads inside the image at input offset (dh, dw): [ROWS] booleans, the padding
    mask of a tap. The row ids come from a load of LANES_ptr (0, 1, 2, ...), not from
    tl.arange: Triton then builds the mask in the register layout of the wgmma A operand,
    and the prologue'd A tile goes from the TMA buffer (ldmatrix) to the wgmma without a
    shared-memory round trip; with tl.arange it is made in a blocked layout and A is
    stored to shared memory and reloaded every K step (docs/triton_conv.md)."""
    lane = tl.load(LANES_ptr + tl.arange(0, ROWS))
    ih = (th0 + lane // TILE_W % TILE_H) * STRIDE_H + dh
    iw = (tw0 + lane % TILE_W) * STRIDE_W + dw
    # 0 <= i < n as one unsigned compare (tl.cast, not IH.to: an int argument equal to 1
    # arrives as a constexpr, which has no methods)
    return ((ih.to(tl.uint32, bitcast=True) < tl.cast(IH, tl.uint32))
            & (iw.to(tl.uint32, bitcast=True) < tl.cast(IW, tl.uint32)))


@triton.jit
def _dgrad_phase(phase, OH, OW, R, S, STRIDE_H, STRIDE_W, PAD_H, PAD_W):
    """Sub-pixel phase ``phase`` (a, b) of dgrad (``TRANSPOSED``; OH x OW is dx): the dx
    pixels h = a - PAD_H + STRIDE_H*i for i in [i_min, i_min + h_cnt) (w likewise), which
    only the taps r = a + STRIDE_H*tr reach. Returns (a, b, i_min, j_min, h_cnt, w_cnt,
    tap_s, taps): taps per tap row and in all. Per tile, never in the K loop."""
    pa = phase // STRIDE_W
    pb = phase % STRIDE_W
    i_min = tl.maximum((PAD_H - pa + STRIDE_H - 1) // STRIDE_H, 0)
    j_min = tl.maximum((PAD_W - pb + STRIDE_W - 1) // STRIDE_W, 0)
    i_num = OH - 1 - pa + PAD_H
    j_num = OW - 1 - pb + PAD_W
    h_cnt = tl.where(i_num < 0, 0, tl.maximum(i_num // STRIDE_H - i_min + 1, 0))
    w_cnt = tl.where(j_num < 0, 0, tl.maximum(j_num // STRIDE_W - j_min + 1, 0))
    tap_s = tl.maximum((S - pb + STRIDE_W - 1) // STRIDE_W, 0)
    taps = tl.maximum((R - pa + STRIDE_H - 1) // STRIDE_H, 0) * tap_s
    return pa, pb, i_min, j_min, h_cnt, w_cnt, tap_s, taps


@triton.jit
def _add_pairs(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _as_f32(a):
    """``a`` in fp32. bf16 by its bits (exact: bf16 is the upper half of an fp32): one
    integer op per element, where the conversion costs two for the upper element of each
    packed pair (PRMT + SHF)."""
    if a.dtype == tl.bfloat16:
        return (a.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32,
                                                                     bitcast=True)
    else:
        return a.to(tl.float32)


@triton.jit
def _prologue_coefs(PCOEF_ptr, ci, CI, PROLOGUE: tl.constexpr, op_t: tl.constexpr,
                    acc_t: tl.constexpr):
    """The A prologue's per-channel coefficients of channels ``ci`` as [1, BLOCK_K] rows
    (c1, c2, c3). bf16 dBN: (3, CI) rows centre, coef_y's high and low bf16 parts
    (``_dbn_prologue_coefs``); otherwise (CI, 2) pairs, (scale, shift) or (coef_y, centre),
    interleaved: one 16-byte access gives a thread both for two channels, in ``acc_t`` (c3
    repeats c2). ci < CI always: the M/K tails are zeroed after the prologue or meet zero
    weights."""
    if PROLOGUE == 2 and op_t == tl.bfloat16 and acc_t != tl.float64:
        c1 = tl.load(PCOEF_ptr + ci)[None, :]
        c2 = tl.load(PCOEF_ptr + CI + ci)[None, :]
        c3 = tl.load(PCOEF_ptr + 2 * CI + ci)[None, :]
    else:
        c1, c2 = tl.split(tl.load(PCOEF_ptr + ci[:, None] * 2 + tl.arange(0, 2)[None, :]))
        c1 = c1.to(acc_t)[None, :]
        c2 = c2.to(acc_t)[None, :]
        c3 = c2
    return c1, c2, c3


@triton.jit
def _relu_rows_coefs(sc, sh, op_t: tl.constexpr):
    """Per-channel coefficients of wgrad's BN-ReLU prologue on x^T (``SWAP_AB``: x' is
    wgmma's A, one channel a row, computed in registers from the box): (centre, scale,
    shift, floor) such that x' = max((x - centre)*scale + shift, floor). bf16: packed bf16
    math (a HADD2, a HFMA2 and a HMNMX2 per pair of elements) centred on the ReLU's
    threshold -shift/scale rounded to bf16, the shift that remains being the small
    shift + centre*scale: each rounding is then of the size of the result, never of the
    mean that cancels in x*scale + shift (the uncentred packed form rounds shift =
    beta - mean*scale, docs/triton_conv.md); a non-finite centre (scale 0) is 0. Other
    16-bit: fp32 math (centre 0). ``floor`` is 0, or NaN where scale is not finite or
    shift is NaN: the max does not propagate NaN, so the TMA box's NaN fill of the padded
    taps gives exactly 0 while such a channel stays NaN; a shift of +-inf with a finite
    scale gives eager's relu, inf or 0."""
    floor = tl.where(sh == sh, sc * 0.0, sh)
    if op_t == tl.bfloat16:
        centre = (-sh / sc).to(op_t)
        centre = tl.where(centre.to(tl.float32) * 0.0 == 0.0, centre, 0.0).to(op_t)
        shift = tl.fma(centre.to(tl.float32), sc, sh).to(op_t)
        return centre, sc.to(op_t), shift, floor.to(op_t)
    else:
        return sh * 0.0, sc, sh, floor


@triton.jit
def _relu_rows(xt, centre, scale, shift, floor):
    """max((x - centre)*scale + shift, floor) of x^T's rows (``_relu_rows_coefs``): packed
    math in bf16, fp32 FMA otherwise; the max does not propagate NaN."""
    if xt.dtype == tl.bfloat16:
        v = (xt - centre[:, None]) * scale[:, None] + shift[:, None]
        # max.bf16x2 (HMNMX2) itself: triton 3.6 lowers the bf16 maximum to fp32 (unpack,
        # FMNMX, pack: 3.5 SASS per element instead of 0.5)
        v = tl.inline_asm_elementwise("max.bf16x2 $0, $1, $2;", "=r,r,r",
                                      [v, tl.broadcast_to(floor[:, None], v.shape)],
                                      dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        v = tl.fma(xt.to(tl.float32), scale[:, None], shift[:, None])
        v = tl.maximum(v, floor[:, None], propagate_nan=tl.PropagateNan.NONE)
    return v


@triton.jit
def _dbn_pairs_bf16(dy, y, coef_y, coef_c):
    """bf16(fma(y, coef_y, dy) + coef_c) in fp32 of bf16 ``dy`` and ``y`` (fp32 coefficients
    broadcast to their shape), by pairs: each element unpacked by one integer op (a shift
    or a mask: bf16 is the upper half of an fp32), FFMA, FADD, one pack per pair. Triton
    unpacks the upper element of a pair with two (PRMT, then a shift)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 d0, d1, y0, y1;
        shl.b32 d0, $1, 16;
        and.b32 d1, $1, 0xffff0000;
        shl.b32 y0, $2, 16;
        and.b32 y1, $2, 0xffff0000;
        fma.rn.f32 d0, y0, $3, d0;
        fma.rn.f32 d1, y1, $4, d1;
        add.f32 d0, d0, $5;
        add.f32 d1, d1, $6;
        cvt.rn.bf16x2.f32 $0, d1, d0;
        }""", "=r,r,r,r,r,r,r",
        [dy, y, tl.broadcast_to(coef_y, dy.shape), tl.broadcast_to(coef_c, dy.shape)],
        dtype=tl.bfloat16, is_pure=True, pack=2)


@triton.jit
def _conv_kernel(
    X_ptr,  # (N, IH, IW, CI) A source (x, or dy when TRANSPOSED), NHWC via strides
    W_ptr,  # weight addressed [CO, R, S, CI] through (swo, swr, sws, swi)
    Y_ptr,  # (N, OH, OW, CO) output, NHWC via strides
    BIAS_ptr,  # (CO,) conv bias                                  [HAS_BIAS]
    RES_ptr,  # (N, OH, OW, CO) residual [HAS_RESIDUAL]; dgrad's dBN: E (batch stride 0)
    PCOEF_ptr,  # (CI, 2) pairs: BN-ReLU (scale, shift); dBN (y coefficient, y centre)
    PY_ptr,  # (N, IH, IW, CI) forward output y, X's strides, for the dBN prologue [PROLOGUE 2]
    EY_ptr,  # (N, OH, OW, CO) previous conv output y_prev            [DRELU]
    ECOEF_ptr,  # (CO, 3) previous BN (scale, shift, centre of the dscale sums) [DRELU]
    WS1_ptr,  # (T, CO, 2) tile mean pairs [STATS] or (T, CO) tile sum(g) [DRELU], acc dtype
    WS2_ptr,  # (T, CO) tile M2 [STATS] or tile sum(g*(ey - centre)) [DRELU], acc dtype
    WS3_ptr,  # (T, CO) tile count                              [STATS and A_TMA >= 2]
    LANES_ptr,  # (>= BLOCK_M,) int32 0, 1, 2, ...: row ids of an M tile (``_box_rows_in``)
    W_desc,  # TMA descriptor of W as [CO, R*S*CI], block [BLOCK_N, BLOCK_K] [W_TMA]
    X_desc,  # TMA descriptor of X as [N*IH*IW, CI], block [BLOCK_M, BLOCK_K] [A_TMA]
    PY_desc,  # the same of PY (boxes like X_desc)                 [PROLOGUE == 2, A_TMA]
    Y_desc,  # TMA descriptor of Y, boxes of the output tile like X_desc's       [Y_TMA]
    IH, IW, CI,  # A-source spatial size and channels
    OH, OW, CO,  # output spatial size and channels
    R, S,  # kernel size
    STRIDE_H, STRIDE_W, PAD_H, PAD_W,
    sxn, sxh, sxw, sxc,  # strides of X
    swo, swr, sws, swi,  # strides of W as [CO, R, S, CI]
    syn, syh, syw, syc,  # strides of Y
    srn, srh, srw, src,  # strides of RES
    sen, seh, sew, sec,  # strides of EY
    GEMM_M, GEMM_N, GEMM_K,  # N*OH*OW (TRANSPOSED: largest phase), CO, R*S*CI
    BATCH,  # N
    WS_ROWS,  # workspace rows per phase (TRANSPOSED; else unused)
    TRANSPOSED: tl.constexpr,
    TAP_LOOP: tl.constexpr,  # K loop over (tap, channel tile); needs CI % BLOCK_K == 0
    W_TMA: tl.constexpr,  # B tiles by TMA from W_desc (KRSC-dense W, TAP_LOOP)
    A_TMA: tl.constexpr,  # A by TMA from X_desc: 1 GEMM [N*H*W, C] (1x1, stride 1, no
    #                       padding), 2 boxes of x [N, H, W, C] per tap (stride 1), 3 boxes
    #                       of x [N, H/2, 2, W/2, 2C] per tap (stride 2, even H and W)
    TILE_H: tl.constexpr,  # output rows of a spatial M tile                  [A_TMA >= 2]
    TILE_W: tl.constexpr,  # output columns of a spatial M tile (TILE_H*TILE_W | BLOCK_M)
    PROLOGUE: tl.constexpr,  # 0 none, 1 relu(x*scale+shift), 2 x + (py - centre)*coef
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    EPILOGUE_RELU: tl.constexpr,
    STATS: tl.constexpr,
    DRELU: tl.constexpr,
    PERSISTENT: tl.constexpr,  # programs loop over output tiles (grid: about one per SM)
    FLATTEN: tl.constexpr,  # the tile and K loops fused into one pipelined loop (PERSISTENT)
    Y_TMA: tl.constexpr,  # the output tile stored by TMA (forward with A_TMA; Y dense)
    ACC_FP64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee"
    PCOEF_ONCE: tl.constexpr,  # the prologue's coefficients loaded once: CI == BLOCK_K
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    op_t = W_ptr.dtype.element_ty
    acc_t = tl.float64 if ACC_FP64 else tl.float32
    if PCOEF_ONCE:  # A's channels are one K tile (TAP_LOOP; the launcher checks every
        # config): the same coefficients at every K step of every tile, loaded here once
        # rather than copied and read per K step (dgrad dBN, bf16, 128x128x64 at 8 warps:
        # 59.8 -> 51.8 SASS per HGMMA; scripts/static_triton.py, sm_90a, triton 3.8)
        pc1, pc2, pc3 = _prologue_coefs(PCOEF_ptr, tl.arange(0, BLOCK_K), CI, PROLOGUE, op_t,
                                        acc_t)
    num_pid_m = tl.cdiv(GEMM_M, BLOCK_M)
    num_pid_n = tl.cdiv(GEMM_N, BLOCK_N)
    width = GROUP_M * num_pid_n
    if PERSISTENT:  # a grid of about one program per SM walks the tiles in grouped order
        tile_end = num_pid_m * num_pid_n
        tile_step = tl.num_programs(0)
    else:  # one tile per program
        tile_end = pid + 1
        tile_step = 1
    # FLATTEN: Triton fuses the tile loop with the K loop (its bounds do not depend on the
    # tile) and pipelines the fused loop, so the next tile's first loads are issued before
    # this tile's epilogue runs (docs/triton_conv.md, "Persistent pipeline")
    for tile in tl.range(pid, tile_end, tile_step, flatten=FLATTEN):
        group_id = tile // width
        first_m = group_id * GROUP_M
        group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % width) % group_size
        pid_n = (tile % width) // group_size

        # int32 index math (GEMM_M, GEMM_K < 2**31: the launchers check); int64 only where a
        # pointer offset is formed (the batch term), so no 64-bit division routine anywhere
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < GEMM_N
        if TRANSPOSED and A_TMA == 0:
            # Sub-pixel (phase) decomposition of the strided transposed conv: grid axis 1 is
            # the phase (a, b) of the output pixel, (h + pad_h) % stride_h == a, and only the
            # taps r = a + j*stride_h (s likewise) reach it, from A row i - j where
            # h = a - pad_h + stride_h*i. No tap is wasted on a masked multiply.
            phase = tl.program_id(1)
            pa, pb, i_min, j_min, h_cnt, w_cnt, tap_s, taps = _dgrad_phase(
                phase, OH, OW, R, S, STRIDE_H, STRIDE_W, PAD_H, PAD_W)
            m_ok = offs_m < BATCH * h_cnt * w_cnt
            w_div = tl.maximum(w_cnt, 1)
            h_div = tl.maximum(h_cnt, 1)
            ii = offs_m // w_div
            jj = offs_m % w_div + j_min
            nb = ii // h_div
            ii = ii % h_div + i_min
            oh = pa - PAD_H + STRIDE_H * ii
            ow = pb - PAD_W + STRIDE_W * jj
            num_taps = taps
        elif A_TMA >= 2:
            # spatial M tiles: TILE_N images x TILE_H rows x TILE_W columns of the output (a
            # TMA box of x per tap); GEMM_M is the tile count times BLOCK_M. Transposed: of
            # one phase's pixels (below), the largest phase's ceil(OH/stride) rows
            tile_n: tl.constexpr = BLOCK_M // (TILE_H * TILE_W)
            if TRANSPOSED:
                tiles_w = tl.cdiv(tl.cdiv(OW, STRIDE_W), TILE_W)
                tiles_h = tl.cdiv(tl.cdiv(OH, STRIDE_H), TILE_H)
            else:
                tiles_w = tl.cdiv(OW, TILE_W)
                tiles_h = tl.cdiv(OH, TILE_H)
            tw0 = (pid_m % tiles_w) * TILE_W
            th0 = (pid_m // tiles_w % tiles_h) * TILE_H
            tn0 = pid_m // (tiles_w * tiles_h) * tile_n
            i = tl.arange(0, BLOCK_M)
            ow = tw0 + i % TILE_W
            oh = th0 + i // TILE_W % TILE_H
            nb = tn0 + i // (TILE_W * TILE_H)
            if TRANSPOSED:
                # dgrad by boxes of one phase (a, b) (grid axis 1; the pointer path's
                # decomposition): dx pixel (a - pad + stride*ii, b - pad + stride*jj) with
                # ii = i_min + (row of the box), jj likewise, gets tap (a + stride*tr,
                # b + stride*ts) from dy at (ii - tr, jj - ts): within the phase a stride-1
                # correlation, so tap (tr, ts) reads the box of dy at (box_h0 - tr,
                # box_w0 - ts), zero-filled outside dy (exactly the taps that miss). Stride
                # 1: one phase, i_min = pad, box_h0 = th0 + pad
                if STRIDE_H * STRIDE_W == 1:  # the JIT pins 1s: phase 0 a constant, so the
                    # weight's column needs no phase term per K step (0.2-0.3 SASS per HGMMA)
                    phase = tl.full((), 0, tl.int32)
                else:
                    phase = tl.program_id(1)
                pa, pb, i_min, j_min, h_cnt, w_cnt, tap_s, taps = _dgrad_phase(
                    phase, OH, OW, R, S, STRIDE_H, STRIDE_W, PAD_H, PAD_W)
                m_ok = (ow < w_cnt) & (oh < h_cnt) & (nb < BATCH)
                box_h0 = th0 + i_min
                box_w0 = tw0 + j_min
                ii = oh + i_min
                jj = ow + j_min
                oh = pa - PAD_H + STRIDE_H * ii
                ow = pb - PAD_W + STRIDE_W * jj
                # a box wholly outside its phase (the smaller phases of an odd size) or
                # past the batch runs no K step and stores nothing
                num_taps = tl.where((tn0 < BATCH) & (th0 < h_cnt) & (tw0 < w_cnt), taps, 0)
            else:
                phase = 0
                m_ok = (ow < OW) & (oh < OH) & (nb < BATCH)
                tap_s = S
                # a tile wholly past the batch (GEMM_M rounds the images up to the largest
                # config's TILE_N, so a smaller config has such tiles where the batch is not
                # a multiple of it: n = 1 doubles the tiles) runs no K step: it stores
                # nothing and counts 0 (the statistics merge skips it). A trip count that
                # depends on the tile: Triton cannot flatten this loop nest
                # (``flatten_tiles``: not the boxes' anyway)
                num_taps = tl.where(tn0 < BATCH, R * S, 0)
        else:
            phase = 0
            m_ok = offs_m < GEMM_M
            ow = offs_m % OW
            t = offs_m // OW
            oh = t % OH
            nb = t // OH
            tap_s = S
            num_taps = R * S

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
        if HAS_RESIDUAL and TRANSPOSED:
            # dgrad's dBN constant part E (fp32, batch stride 0): the accumulator starts from
            # it. Added in the epilogue, its fp32 tile beside acc and the dReLU's operands
            # made the 128x128 tiles spill (24-204 B at 255 registers)
            acc += tl.load(RES_ptr + ((oh * srh + ow * srw)[:, None] + offs_n[None, :] * src),
                           mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(acc.dtype)

        x_row = nb.to(tl.int64) * sxn
        if TRANSPOSED:  # A row of tap (tr, ts): (ii - tr, jj - ts)
            ih0 = ii
            iw0 = jj
            tap_sign = -1
        else:  # A row of tap (r, s): (oh*stride - pad + r, ow*stride - pad + s)
            ih0 = oh * STRIDE_H - PAD_H
            iw0 = ow * STRIDE_W - PAD_W
            tap_sign = 1
        # row bases hoisted out of the K loop: a K step adds one scalar tap offset
        a_row = x_row + ih0 * sxh + iw0 * sxw
        k_total = num_taps * CI
        if TAP_LOOP:
            num_k_tiles = num_taps * (CI // BLOCK_K)
        else:
            num_k_tiles = tl.cdiv(k_total, BLOCK_K)
        # TAP_LOOP walks (tap row tr, tap column ts, channel c0) with counters: no division
        # in the loop. The stride-2 view's counters start at the input row and column of
        # the box's first pixel, 2*th0 - PAD_H (tw0 alike), so that its box coordinates are
        # tr >> 1 and tr & 1, no subtraction per K step (sm_90a, the plain 128x128 tile:
        # 31.5 -> 30.0 SASS per HGMMA under triton 3.8, 32.2 -> 31.2 under 3.6)
        if A_TMA == 3:
            tap0_r = 2 * th0 - PAD_H
            tap0_c = 2 * tw0 - PAD_W
        else:
            tap0_r = 0
            tap0_c = 0
        tap_end = tap0_c + tap_s
        tr = tl.full((), 0, tl.int32) + tap0_r
        ts = tl.full((), 0, tl.int32) + tap0_c
        c0 = tl.full((), 0, tl.int32)
        for kt in range(0, num_k_tiles):
            if TAP_LOOP:  # one tap (scalar tap_r, tap_c) per K tile
                ci = c0 + tl.arange(0, BLOCK_K)
                k_ok = ci < CI  # all true (CI % BLOCK_K == 0); folds into the row test
                tap_r = tr
                tap_c = ts
            else:
                # (tap, c) flattened, c fastest: a C=3 stem still fills K tiles
                offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
                k_ok = offs_k < k_total
                ci = offs_k % CI
                tap = offs_k // CI
                tap_r = tap // tap_s
                tap_c = tap % tap_s
            if TRANSPOSED:
                r = pa + tap_r * STRIDE_H
                s = pb + tap_c * STRIDE_W
            else:
                r = tap_r - tap0_r
                s = tap_c - tap0_c
            if TAP_LOOP:
                ih = ih0 + tap_sign * (tr - tap0_r)
                iw = iw0 + tap_sign * (ts - tap0_c)
                row_ok = m_ok & (ih >= 0) & (ih < IH) & (iw >= 0) & (iw < IW)
                ok = row_ok[:, None]
                a_off = (a_row + tap_sign * (tr * sxh + ts * sxw))[:, None] + ci[None, :] * sxc
            else:
                ih = ih0[:, None] + tap_sign * tap_r[None, :]
                iw = iw0[:, None] + tap_sign * tap_c[None, :]
                ok = (ih >= 0) & (ih < IH) & (iw >= 0) & (iw < IW) & m_ok[:, None] & k_ok[None, :]
                a_off = x_row[:, None] + ih * sxh + iw * sxw + ci[None, :] * sxc
            if A_TMA == 1:  # the 1x1 conv is a GEMM on X as [N*H*W, C]: TMA zero-fills the M tail
                a = X_desc.load([pid_m * BLOCK_M, c0])
            elif A_TMA == 3:  # the stride-2 view: the counters are the box's input row and
                # column (its origin, 2*oh, and the padding are in them)
                a = _x_tap_box(X_desc, tn0, 0, 0, tr, ts, c0, 0, 0, CI, BLOCK_M, BLOCK_K, 3)
            elif A_TMA == 2 and TRANSPOSED:  # the box of dy of tap (tr, ts) in the phase
                a = _x_tap_box(X_desc, tn0, box_h0, box_w0, -tr, -ts, c0, 0, 0, CI, BLOCK_M,
                               BLOCK_K, A_TMA)
            elif A_TMA == 2:  # one box of x per tap (stride 1)
                a = _x_tap_box(X_desc, tn0, th0, tw0, tr, ts, c0, PAD_H, PAD_W, CI, BLOCK_M,
                               BLOCK_K, A_TMA)
            else:
                a = tl.load(X_ptr + a_off, mask=ok, other=0.0)
            if PCOEF_ONCE:
                c1, c2, c3 = pc1, pc2, pc3
            elif PROLOGUE >= 1:
                c1, c2, c3 = _prologue_coefs(PCOEF_ptr, ci, CI, PROLOGUE, op_t, acc_t)
            if PROLOGUE == 1:
                if A_TMA >= 2:  # the tap's padded rows (rows past M are never stored or
                    # counted); the stride-2 view is stride 2 by construction: a constant
                    stride: tl.constexpr = 2 if A_TMA == 3 else 1
                    pad_ok = _box_rows_in(LANES_ptr, th0, tw0,
                                          tap_sign * (tr - (tap0_r + PAD_H)),
                                          tap_sign * (ts - (tap0_c + PAD_W)), stride, stride,
                                          IH, IW, BLOCK_M, TILE_H, TILE_W)
                    ok = pad_ok[:, None]
            if PROLOGUE == 1:
                # relu(x*scale + shift) in fp32, rounded once to the operand dtype after the
                # ReLU: a packed 16-bit FMA rounds shift = beta - mean*scale to 8 bits, 7x
                # torch's error at mean/std = 20 (docs/triton_conv.md); NaN-propagating like
                # torch.relu. Padded taps (a = 0 there) exactly 0 after it: a multiply by the
                # 0/1 row mask (packed) rather than a per-element select
                if ACC_FP64:
                    v = tl.fma(a.to(acc.dtype), c1, c2)
                else:
                    v = tl.fma(_as_f32(a), c1, c2)
                v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL).to(op_t)
                if A_TMA == 1:  # no padded taps; rows past M are never stored nor counted
                    a = v
                else:
                    a = v * ok.to(op_t)
            elif PROLOGUE == 2:
                # dy + (y - centre)*coef_y (bf16: packed math; else fp32, rounded once):
                # centred on y's mean, so a large mean is never rounded into the 16-bit
                # operand. The dBN constant is not added here: its part of dx, E
                # (``_dbn_constant_dx``), is the same for every image and the accumulator
                # starts from it (HAS_RESIDUAL). No tap mask either: where dy and y are 0
                # (TMA zero fill, masked loads: the taps that miss dy) the operand is the
                # rounded -centre*coef_y, and E cancels it
                if A_TMA >= 2:  # y's box of the same tap
                    py = _x_tap_box(PY_desc, tn0, box_h0, box_w0, -tr, -ts, c0, 0, 0, CI,
                                    BLOCK_M, BLOCK_K, A_TMA)
                else:  # y has dy's strides (the launcher makes it so): one offset for both
                    py = tl.load(PY_ptr + a_off, mask=ok, other=0.0)
                if ACC_FP64:
                    a = tl.fma(py.to(acc.dtype) - c2, c1, a.to(acc.dtype)).to(op_t)
                elif op_t == tl.bfloat16:  # packed bf16 math (``_dbn_prologue_coefs``):
                    d = py - c1  # y - centre, then coef_y's high and low parts
                    a = tl.fma(d, c3, tl.fma(d, c2, a))
                else:  # y - centre in the operand dtype (fp16: HADD2, exact where y is
                    # within 2x of the centre; fp16 keeps cy in fp32: 2*dvar/M can fall
                    # below its range), then the FMA in fp32, rounded once
                    a = tl.fma(_as_f32(py - c2.to(op_t)), c1, _as_f32(a)).to(op_t)
                    if op_t == tl.float32 and INPUT_PRECISION == "tf32":
                        # cut to tf32's bits (the MMA reads no more) so that the fill at
                        # the zero-filled taps is what E cancels, however the MMA rounds
                        a = (a.to(tl.int32, bitcast=True) & -8192).to(tl.float32,
                                                                      bitcast=True)
            else:
                a = a.to(op_t)
            if W_TMA and TRANSPOSED:  # B[(tap, co), ci] = W[co, r, s, ci]: a box of [CO, RSC]
                # (columns past C_in fall in the next tap or the zero fill: masked outputs)
                b = W_desc.load([c0, (r * S + s) * GEMM_N + pid_n * BLOCK_N])
            elif W_TMA:  # forward: the K tile kt is columns kt*BLOCK_K.. of W as [CO, RSC]
                b = W_desc.load([pid_n * BLOCK_N, kt * BLOCK_K]).T
            elif TAP_LOOP:
                b = tl.load(W_ptr + (offs_n[None, :] * swo + (r * swr + s * sws)
                                     + ci[:, None] * swi), mask=n_ok[None, :], other=0.0)
            else:
                b = tl.load(W_ptr + (offs_n[None, :] * swo + r[:, None] * swr + s[:, None] * sws
                                     + ci[:, None] * swi),
                            mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
            if TAP_LOOP:  # next (tap, channel tile)
                c0 += BLOCK_K
                next_tap = c0 >= CI
                c0 = tl.where(next_tap, 0, c0)
                ts = tl.where(next_tap, ts + 1, ts)
                next_row = ts >= tap_end
                ts = tl.where(next_row, tap0_c, ts)
                tr = tl.where(next_row, tr + 1, tr)

        out_ok = m_ok[:, None] & n_ok[None, :]
        if HAS_BIAS:
            bias = tl.load(BIAS_ptr + offs_n, mask=n_ok, other=0.0).to(acc.dtype)
            acc = acc + bias[None, :]
        if HAS_RESIDUAL and not TRANSPOSED:
            res = tl.load(RES_ptr + ((nb.to(tl.int64) * srn + oh * srh + ow * srw)[:, None]
                                     + offs_n[None, :] * src),
                          mask=out_ok, other=0.0)
            acc = acc + res.to(acc.dtype)
        if EPILOGUE_RELU:
            acc = tl.where(acc < 0, 0.0, acc)
        ws_off = (phase * WS_ROWS + pid_m).to(tl.int64) * GEMM_N + offs_n
        if DRELU:
            ey = tl.load(EY_ptr + ((nb.to(tl.int64) * sen + oh * seh + ow * sew)[:, None]
                                   + offs_n[None, :] * sec),
                         mask=out_ok, other=0.0)
            # one base address for the three (separate pointers: the triton 3.6 4-warp
            # 128x64x128 tiles spilled 4-8 B across the K loop)
            esc = tl.load(ECOEF_ptr + 3 * offs_n, mask=n_ok, other=0.0).to(acc.dtype)
            esh = tl.load(ECOEF_ptr + 3 * offs_n + 1, mask=n_ok, other=0.0).to(acc.dtype)
            ctr = tl.load(ECOEF_ptr + 3 * offs_n + 2, mask=n_ok, other=0.0).to(acc.dtype)
            # ey kept in its 16-bit dtype and widened at each use: an fp32 copy beside
            # acc, escale and eshift (32 columns each per thread in the wgmma layout) made
            # the strided 128x128 tile spill (255 registers; 244 without it)
            pre = ey.to(acc.dtype) * esc[None, :] + esh[None, :]
            g = tl.where(pre <= 0, 0.0, acc)
            g = tl.where(out_ok, g, 0.0)
            tl.store(WS1_ptr + ws_off, tl.sum(g, axis=0), mask=n_ok)
            # dscale's sum about the centre (the BN mean): sum(g*ey) at a mean 100x the
            # spread, less mean*sum(g) afterwards, cancelled (dgamma 14x torch's error)
            tl.store(WS2_ptr + ws_off, tl.sum(g * (ey.to(acc.dtype) - ctr[None, :]), axis=0),
                     mask=n_ok)
            acc = g * esc[None, :]
        out = acc.to(Y_ptr.dtype.element_ty)
        if Y_TMA == 1:  # Y as [N*OH*OW, CO]: TMA drops the rows and columns past the end
            Y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], out)
        elif Y_TMA == 2:  # the output box [TILE_N, TILE_H, TILE_W, BLOCK_N], clipped
            Y_desc.store([tn0, th0, tw0, pid_n * BLOCK_N],
                         tl.reshape(out, (BLOCK_M // (TILE_H * TILE_W), TILE_H, TILE_W,
                                          BLOCK_N)))
        else:
            tl.store(Y_ptr + ((nb.to(tl.int64) * syn + oh * syh + ow * syw)[:, None]
                              + offs_n[None, :] * syc), out, mask=out_ok)
        if STATS:
            v = tl.where(m_ok[:, None], out.to(acc.dtype), 0.0)
            if A_TMA >= 2:  # spatial tiles: the count of valid rows, stored for the merge
                cnt = tl.sum(m_ok.to(acc.dtype), axis=0)
                tl.store(WS3_ptr + ws_off, tl.zeros((BLOCK_N,), acc.dtype) + cnt, mask=n_ok)
                cnt = tl.maximum(cnt, 1.0)
            else:
                cnt = tl.minimum(GEMM_M - pid_m * BLOCK_M, BLOCK_M).to(acc.dtype)
            # the tile mean as a pair (mean1, the mean of v - mean1), WS1 is (T, C, 2): the
            # merge adds them in fp64 (exact differences near a large mean). Rounded to fp32
            # at the mean's magnitude, the merge's between-tile term cnt*(mean_t - mean)^2
            # carried that rounding: var error ~ eps*mean/(std*sqrt(M)), 60x torch's at
            # mean/std = 100, M = 256. (Added in fp64 here, the 128x256 tile spilled 508 B.)
            mean1 = tl.sum(v, axis=0) / cnt
            d = tl.where(m_ok[:, None], v - mean1[None, :], 0.0)
            # sum(d) and sum(d*d) in one reduction (two kept d live: the 128x256 tile spilled)
            sum_d, sum_dd = tl.reduce((d, d * d), 0, _add_pairs)
            r = sum_d / cnt
            tl.store(WS1_ptr + 2 * ws_off, mean1, mask=n_ok)
            tl.store(WS1_ptr + 2 * ws_off + 1, r, mask=n_ok)
            tl.store(WS2_ptr + ws_off, sum_dd - cnt * r * r, mask=n_ok)


@triton.jit
def _stats_merge_kernel(
    WS_MEAN_ptr,  # (T, C) partial means, or (T, C, 2) pairs summed in fp64 [MEAN_PAIRS]
    WS_M2_ptr,  # (T, C) partial M2, acc dtype
    WS_CNT_ptr,  # (T, C) partial counts, acc dtype                     [HAS_COUNT]
    OUT_MEAN_ptr,  # (P, C) merged mean of each chunk of rows (P = grid axis 1)
    OUT_M2_ptr,  # (P, C) merged M2, or the biased variance when FINAL
    OUT_CNT_ptr,  # (P, C) merged count                                  [not FINAL]
    T, C,  # rows (tiles), channels
    M, TILE_M,  # without HAS_COUNT, row t counts min(TILE_M, M - t*TILE_M) elements
    ROWS_PER_PROG,  # rows merged by one program (multiple of BLOCK_T)
    HAS_COUNT: tl.constexpr,
    FINAL: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    MEAN_PAIRS: tl.constexpr = False,  # the forward's STATS epilogue: (mean1, residual)
):
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    if ACC_FP64:
        n_a = tl.zeros((BLOCK_C,), dtype=tl.float64)
    else:
        n_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean_a = n_a
    m2_a = n_a
    t_begin = pid_p * ROWS_PER_PROG
    for t0 in range(0, ROWS_PER_PROG, BLOCK_T):
        offs_t = t_begin + t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        row_ok = (offs_t < T) & (offs_t < t_begin + ROWS_PER_PROG)
        ok = row_ok[:, None] & c_ok[None, :]
        off = offs_t[:, None] * C + offs_c[None, :]
        if HAS_COUNT:
            cnt = tl.load(WS_CNT_ptr + off, mask=ok, other=0.0).to(n_a.dtype)
        else:
            cnt_t = tl.minimum(M - offs_t * TILE_M, TILE_M)
            cnt_t = tl.where(row_ok & (cnt_t > 0), cnt_t, 0).to(n_a.dtype)
            cnt = cnt_t[:, None] + tl.zeros((BLOCK_T, BLOCK_C), dtype=n_a.dtype)
        ok = ok & (cnt > 0)
        cnt = tl.where(ok, cnt, 0.0)
        if MEAN_PAIRS:
            mt = (tl.load(WS_MEAN_ptr + 2 * off, mask=ok, other=0.0).to(n_a.dtype)
                  + tl.load(WS_MEAN_ptr + 2 * off + 1, mask=ok, other=0.0).to(n_a.dtype))
        else:
            mt = tl.load(WS_MEAN_ptr + off, mask=ok, other=0.0).to(n_a.dtype)
        mt = tl.where(ok, mt, 0.0)
        m2t = tl.where(ok, tl.load(WS_M2_ptr + off, mask=ok, other=0.0).to(n_a.dtype), 0.0)
        # merge the block of rows at once, then into the running (n, mean, M2) (Chan)
        n_b = tl.sum(cnt, axis=0)
        n_b_safe = tl.where(n_b > 0, n_b, 1.0)
        mean_b = tl.sum(cnt * mt, axis=0) / n_b_safe
        dev = tl.where(ok, mt - mean_b[None, :], 0.0)
        m2_b = tl.sum(m2t, axis=0) + tl.sum(cnt * dev * dev, axis=0)
        n = n_a + n_b
        n_safe = tl.where(n > 0, n, 1.0)
        delta = mean_b - mean_a
        mean_a = mean_a + delta * (n_b / n_safe)
        m2_a = m2_a + m2_b + delta * delta * (n_a * n_b / n_safe)
        n_a = n
    out = pid_p * C + offs_c
    tl.store(OUT_MEAN_ptr + out, mean_a, mask=c_ok)
    if FINAL:
        tl.store(OUT_M2_ptr + out, m2_a / tl.where(n_a > 0, n_a, 1.0), mask=c_ok)
    else:
        tl.store(OUT_M2_ptr + out, m2_a, mask=c_ok)
        tl.store(OUT_CNT_ptr + out, n_a, mask=c_ok)


@triton.jit
def _conv_wgrad_kernel(
    DY_ptr,  # (N, OH, OW, CO) output gradient, NHWC via strides
    X_ptr,  # (N, IH, IW, CI) forward input (before the prologue), NHWC via strides
    DW_ptr,  # (SPLITS, CO, R*S*CI) partial weight gradients, acc dtype
    PY_ptr,  # (N, OH, OW, CO) forward output y for the dBN prologue on dy  [DBN]
    DCY_ptr,  # (CO,) dBN y-coefficient                                     [DBN]
    DCC_ptr,  # (CO,) dBN constant (32/64-bit operands: of the centred form)  [DBN]
    DCEN_ptr,  # (CO,) y's centre (its mean), 32/64-bit operands             [DBN]
    SCALE_ptr,  # (CI,) BN scale of the input prologue                      [PROLOGUE]
    SHIFT_ptr,  # (CI,) BN shift of the input prologue                      [PROLOGUE]
    DY_desc,  # TMA descriptor of dy [N, OH, OW, CO], box [TN, TILE_H, TILE_W, BLOCK_M] [TMA]
    PY_desc,  # the same of y                                              [TMA and DBN]
    X_desc,  # TMA of x: [N, IH, IW, CI] (TMA 2) or [N, IH/2, 2, IW/2, 2CI] (TMA 3) [TMA]
    IH, IW, CI,
    OH, OW, CO,
    R, S,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W,
    sdn, sdh, sdw, sdc,  # strides of DY
    sxn, sxh, sxw, sxc,  # strides of X
    spn, sph, spw, spc,  # strides of PY
    BATCH,  # N
    GEMM_M, GEMM_N,  # CO, R*S*CI
    TILES_PER_SPLIT,  # pixel tiles (K steps) of one split of the N*OH*OW reduction
    TAP_N: tl.constexpr,  # N tiles over (tap, channel block) instead of flattened (r, s, c)
    TMA: tl.constexpr,  # 0 pointers, 2 boxes of x per tap (stride 1), 3 boxes of the
    #                     stride-2 view of x (even H, W); dy (and y) by boxes in both
    TILE_H: tl.constexpr,  # output rows of a pixel tile (TILE_N x TILE_H x TILE_W = BLOCK_K)
    TILE_W: tl.constexpr,  # output columns of a pixel tile
    DBN: tl.constexpr,
    MASK_DY: tl.constexpr,  # dy' zeroed at pixels past the output where x' may not be
    #                         (``wgrad_mask_dy``), and in fp16
    PROLOGUE: tl.constexpr,
    FLATTEN: tl.constexpr,  # the item and pixel loops fused into one pipelined loop
    ACC_FP64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SWAP_AB: tl.constexpr,  # the MMA as dW^T = x'^T dy': dy' is its B, x' its A (a config
    #                         switch: ``_wgrad_swap``; with the BN-ReLU prologue the TMA box of
    #                         x fills the padding with NaN, ``_wgrad_tma_blocks``)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # GEMM view: dW[co, (r, s, ci)] = sum over output pixels of dy[pix, co] * x[pix + tap,
    # ci]. The reduction walks pixel tiles, boxes of TILE_N images x TILE_H rows x TILE_W
    # columns of the output, with counters (no division in the loop), split into runs of
    # TILES_PER_SPLIT tiles, each stored to its own partial (summed in a fixed order
    # afterwards: deterministic, no atomics).
    # a persistent grid: each program walks work items (output tile, split) in order
    if TAP_N:
        # N tiles are (tap, channel block): contiguous channels, one x box per K step
        c_tiles = tl.cdiv(CI, BLOCK_N)
        num_pid_n = R * S * c_tiles
    else:
        num_pid_n = tl.cdiv(GEMM_N, BLOCK_N)
    tiles_mn = tl.cdiv(GEMM_M, BLOCK_M) * num_pid_n
    # the pixel tile's lanes: (image, row, column) offsets inside the box (constexpr
    # divisors: shifts), added to the box origin each K step
    tile_n: tl.constexpr = BLOCK_K // (TILE_H * TILE_W)
    lane = tl.arange(0, BLOCK_K)
    lane_w = lane % TILE_W
    lane_h = lane // TILE_W % TILE_H
    lane_n = lane // (TILE_W * TILE_H)
    tiles_w = tl.cdiv(OW, TILE_W)
    tiles_h = tl.cdiv(OH, TILE_H)
    num_tiles = tl.cdiv(BATCH, tile_n) * tiles_h * tiles_w
    splits = tl.cdiv(num_tiles, TILES_PER_SPLIT)
    # prologue math in fp32 (fp64 for fp64 tensors)
    cdt: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    op_t = X_ptr.dtype.element_ty
    # dy' zeroed past the output: ``MASK_DY``, and where the BN-ReLU prologue runs
    # unswapped on TMA boxes (relu(shift) of x's zero fill past the batch)
    mask_dy: tl.constexpr = MASK_DY or (PROLOGUE and TMA and not SWAP_AB)
    # FLATTEN: as the forward's tile loop, fused with the pixel loop (whose trip count must
    # then not depend on the item: every split walks TILES_PER_SPLIT boxes, the last one's
    # boxes past the batch are zero-filled / masked, so they add 0)
    for work in tl.range(tl.program_id(0), tiles_mn * splits, tl.num_programs(0),
                         flatten=FLATTEN):
        pid_k = work // tiles_mn
        pid = work % tiles_mn
        pid_m = pid // num_pid_n
        pid_n = pid % num_pid_n
        offs_co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        co_ok = offs_co < GEMM_M
        if TAP_N:
            tap = pid_n // c_tiles
            c0 = (pid_n % c_tiles) * BLOCK_N
            ci = c0 + tl.arange(0, BLOCK_N)
            j_ok = ci < CI
            offs_j = tap * CI + ci
            tap_r = tap // S
            tap_s = tap % S
            r = tl.zeros((BLOCK_N,), dtype=tl.int32) + tap_r
            s = tl.zeros((BLOCK_N,), dtype=tl.int32) + tap_s
        else:
            offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            j_ok = offs_j < GEMM_N
            ci = offs_j % CI
            rs = offs_j // CI
            s = rs % S
            r = rs // S
        if PROLOGUE:
            sc = tl.load(SCALE_ptr + ci, mask=j_ok, other=0.0).to(cdt)
            sh = tl.load(SHIFT_ptr + ci, mask=j_ok, other=0.0).to(cdt)
            if SWAP_AB:
                r_cen, r_sc, r_sh, r_floor = _relu_rows_coefs(sc, sh, op_t)
        if DBN:
            cy = tl.load(DCY_ptr + offs_co, mask=co_ok, other=0.0).to(cdt)
            cc = tl.load(DCC_ptr + offs_co, mask=co_ok, other=0.0).to(cdt)
            if op_t == tl.float32 or ACC_FP64:
                centre = tl.load(DCEN_ptr + offs_co, mask=co_ok, other=0.0).to(cdt)
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=cdt)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=cdt)
        t_begin = pid_k * TILES_PER_SPLIT
        if FLATTEN:
            n_steps = TILES_PER_SPLIT
        else:
            n_steps = tl.minimum(TILES_PER_SPLIT, num_tiles - t_begin)
        # the first box's origin (divisions once, before the loop)
        tw0 = (t_begin % tiles_w) * TILE_W
        th0 = (t_begin // tiles_w % tiles_h) * TILE_H
        tn0 = t_begin // (tiles_w * tiles_h) * tile_n
        for _ in range(0, n_steps):
            oh = th0 + lane_h
            ow = tw0 + lane_w
            nb = tn0 + lane_n
            pix_ok = (oh < OH) & (ow < OW) & (nb < BATCH)
            if TMA:
                # dy box [TN, TH, TW, BLOCK_M] -> [BLOCK_K, BLOCK_M]; past the image: zeros
                a = tl.reshape(DY_desc.load([tn0, th0, tw0, pid_m * BLOCK_M]),
                               (BLOCK_K, BLOCK_M)).T
                if DBN:
                    py = tl.reshape(PY_desc.load([tn0, th0, tw0, pid_m * BLOCK_M]),
                                    (BLOCK_K, BLOCK_M)).T
            else:
                d_pix = nb.to(tl.int64) * sdn + oh * sdh + ow * sdw
                a_ok = co_ok[:, None] & pix_ok[None, :]
                a = tl.load(DY_ptr + (offs_co[:, None] * sdc + d_pix[None, :]), mask=a_ok,
                            other=0.0)
                if DBN:
                    p_pix = nb.to(tl.int64) * spn + oh * sph + ow * spw
                    py = tl.load(PY_ptr + (offs_co[:, None] * spc + p_pix[None, :]), mask=a_ok,
                                 other=0.0)
            if DBN:  # dy + y*cy + cc in fp32, rounded once (bf16: by pairs), as eager's
                # materialised dy' is: packed bf16 math rounds more often, the same way at
                # many pixels, which the sum over N*H*W pixels adds up (docs/triton_conv.md,
                # "wgrad's dBN operand"). 32/64-bit operands keep that precision: centred,
                # (dy + cc) + (y - centre)*cy, y's and dy's means cancel before the FMA
                # (16-bit: the operand's rounding dominates). 0 past the output where x'
                # may not be (``mask_dy``): bf16, a multiply of the rounded pairs by the 0/1
                # mask; otherwise a select before the rounding (there dy' is the constant
                # alone, which fp16 can overflow: inf times the mask is NaN)
                if op_t == tl.bfloat16:
                    a = _dbn_pairs_bf16(a, py, cy[:, None], cc[:, None])
                    if mask_dy:
                        a = a * pix_ok[None, :].to(op_t)
                else:
                    if op_t == tl.float32 or ACC_FP64:
                        v = tl.fma(py.to(cdt) - centre[:, None], cy[:, None],
                                   a.to(cdt) + cc[:, None])
                    else:
                        v = tl.fma(py.to(cdt), cy[:, None], a.to(cdt)) + cc[:, None]
                    if mask_dy:
                        v = tl.where(pix_ok[None, :], v, 0.0)
                    a = v.to(op_t)
            else:
                a = a.to(op_t)
            if TAP_N and TMA:  # one box of x per K step (stride 1, or the stride-2 view)
                b = _x_tap_box(X_desc, tn0, th0, tw0, tap_r, tap_s, c0, PAD_H, PAD_W, CI,
                               BLOCK_K, BLOCK_N, TMA)
            else:
                ih = (oh * STRIDE_H - PAD_H)[:, None] + r[None, :]
                iw = (ow * STRIDE_W - PAD_W)[:, None] + s[None, :]
                b_ok = ((ih >= 0) & (ih < IH) & (iw >= 0) & (iw < IW) & pix_ok[:, None]
                        & j_ok[None, :])
                b = tl.load(X_ptr + ((nb.to(tl.int64) * sxn)[:, None] + ih * sxh + iw * sxw
                                     + ci[None, :] * sxc), mask=b_ok, other=0.0)
            if PROLOGUE and SWAP_AB:  # x'^T, wgmma's A, from the box by ldmatrix: one
                # channel a row (``_relu_rows_coefs``). Padded taps: NaN from the box
                # (``_wgrad_tma_blocks``), 0 after the max; a mask of the pixels here (the
                # K dimension of A) would make Triton store A to shared memory and reload
                # it every K step. The pointer path masks after the prologue.
                v = _relu_rows(b.T, r_cen, r_sc, r_sh, r_floor)
                if not (TAP_N and TMA):
                    v = tl.where(b_ok.T, v, 0.0)
                b = v.to(op_t).T
            elif PROLOGUE:  # relu(x*scale + shift) in fp32; padded taps exactly 0 after it
                v = tl.fma(b.to(cdt), sc[None, :], sh[None, :])
                v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
                if TMA:  # one tap per N tile: the padding is a mask of the pixels (rows),
                    # applied to the rounded pairs
                    ih = oh * STRIDE_H - PAD_H + tap_r
                    iw = ow * STRIDE_W - PAD_W + tap_s
                    pad_ok = (ih >= 0) & (ih < IH) & (iw >= 0) & (iw < IW)
                    b = v.to(op_t) * pad_ok[:, None].to(op_t)
                else:
                    b = tl.where(b_ok, v, 0.0).to(op_t)
            else:
                b = b.to(op_t)
            if SWAP_AB:  # the prologue'd dy' as wgmma's B, which every row of the
                # MMA shares: with BLOCK_N 256 (C_in >= 256) two warpgroups of 128 MMA rows
                # spread its per-K-step prologue over 8 HGMMA per warp, where dy' as A is
                # computed per warpgroup (sm_90a, bf16, 3x3 s1, dBN alone: 98.2 SASS per
                # HGMMA at 128x128 -> 45.4 swapped at 128x256; scripts/static_triton.py)
                acc = tl.dot(b.T, a.T, acc, input_precision=INPUT_PRECISION,
                             out_dtype=acc.dtype)
            else:
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
            # next pixel tile: column, then row, then image (counters, no division)
            tw0 += TILE_W
            next_row = tw0 >= OW
            tw0 = tl.where(next_row, 0, tw0)
            th0 = tl.where(next_row, th0 + TILE_H, th0)
            next_img = th0 >= OH
            th0 = tl.where(next_img, 0, th0)
            tn0 = tl.where(next_img, tn0 + tile_n, tn0)
        off = (pid_k.to(tl.int64) * GEMM_M * GEMM_N + offs_co[:, None].to(tl.int64) * GEMM_N
               + offs_j[None, :])
        if SWAP_AB:
            tl.store(DW_ptr + off, acc.T, mask=co_ok[:, None] & j_ok[None, :])
        else:
            tl.store(DW_ptr + off, acc, mask=co_ok[:, None] & j_ok[None, :])


    # --------------------------------------------------------------------------------------


# Autotuning
# --------------------------------------------------------------------------------------


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per kernel mode, from the static
# check (scripts/static_triton.py, benchmarks/static/triton.md): none spills on sm_90.
# The first of each list is the one config of deterministic mode.
# 16-bit: BLOCK_K 64 (4 k16 wgmma per K step, 128-byte rows), 3-5 stages (120-144 KB of
# shared memory); 128x256 only where C_out >= 256, 128x64 only where C_out <= 64 (``_fits``).
# fp32 (TF32): 128-byte rows are BLOCK_K 32, the last tile.
_CONV_TILES = {
    "plain": [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 64, 64, 4, 5),
              (128, 128, 32, 8, 3)],
    # dgrad with the dBN prologue or the dReLU epilogue (and the forward prologue without
    # wgmma). BLOCK_K 128: dgrad's wide-K tiles (``_wide_k``), twice the HGMMA per K step
    # over which the fixed per-step cost of the dBN prologue (y's box, the coefficients'
    # copy and wait, the barrier, the fragment moves) is spread; the transposed mode with
    # dy by TMA only, 16-bit only, where C_out % 128 == 0. (128, 64, 128, 4, 3): at any
    # C_in (the 64-wide N rule of ``_fits`` does not apply to it), triton < 3.7 only
    # (``_BELOW_TRITON``: 3.8 spills), 39.2 / 39.3 SASS per HGMMA at stride 1 / 2 (sm_90a,
    # bf16, triton 3.6) against 39.2 (128x64x64); (128, 128, 128, 8, 2): 39.9 / 40.4
    # (triton 3.8), 43.2 / 43.6 (3.6) against 59.8-61.2 for 128x128x64 at 8 warps, no
    # spill, two stages (131 KB of shared memory)
    "fused": [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 64, 64, 4, 5),
              (128, 64, 128, 4, 3), (128, 128, 128, 8, 2), (128, 128, 32, 8, 3)],
    # the forward's BN-ReLU prologue: 128 rows per warpgroup, so that each thread's fixed
    # per-K-step work (barriers, TMA issue, the pairs' loads, the tap mask) is spread over 8
    # HGMMA instead of 4 (SASS per HGMMA: 46-48 against 61-78 at 8 warps, the prologue's
    # own ~24 the same); at 8 warps Triton also stores the prologue'd A to shared memory
    # and reloads it (docs/triton_conv.md). 256x128 at 8 warps: two warpgroups of 128 rows,
    # the same SASS per HGMMA (A in registers too) with two warps per scheduler; which of
    # the two is faster is for the autotuner to measure. Stride 1 only (``_fits``), Triton
    # >= 3.7 only (``_MIN_TRITON``).
    "prologue": [(128, 128, 64, 4, 4), (256, 128, 64, 8, 3), (128, 64, 64, 4, 5),
                 (128, 128, 32, 8, 3)],
    "stem": [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3)],  # flat (r, s, c) K loop: C_in = 3
    # dgrad with the dBN prologue where the device has wgmma: "fused"'s tiles, the 128x128
    # one also at 4 warps (``_dbn_tiles``)
    "dbn": [(128, 128, 64, 4, 4), (128, 64, 64, 4, 5), (128, 64, 128, 4, 3),
            (128, 128, 128, 8, 2), (128, 128, 64, 8, 4), (128, 128, 32, 8, 3)],
}
_SMEM_BUDGET = 160 * 1024  # operand pipeline bytes; leaves room for the epilogue's scratch
# On a device with less shared memory per block (A100 163 KB, sm_86/89 99 KB, against
# sm_90's 227 KB) the pipeline gets what is left after this reserve for the epilogue:
# each tile keeps as many stages as fit (at least 2), else the mode's smallest tile runs.
_EPILOGUE_RESERVE = 64 * 1024
_MAX_STAGES = 5
# wgrad (M = C_out, N = (tap, C_in), K = output pixels): BLOCK_K pixels per K step (the
# same in every config of a dtype: it sets the pixel box); 64-wide tiles only where C_out
# (M) or C_in (N) is 64 or less (but 128x64 at 4 warps for the BN-ReLU prologue alone,
# at any C_in), 128x256 only where C_in >= 256 (with a prologue: the dBN one, 16-bit),
# 256x128 only for the BN-ReLU prologue alone where C_out >= 256 (``_wgrad_fits``). Each
# list ends with its BLOCK_K 32 tile: the fallback where no tile has 128-byte rows (fp64).
# wgrad's dBN prologue alone at C_out, C_in <= 64: 256 pixels a K step, dy' as wgmma's A
# in registers (``_wgrad_fits``, ``_wgrad_swap``)
_WGRAD_DBN_64 = (64, 64, 256, 4, 2)
_WGRAD_TILES = {
    "plain": [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
              (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 8, 3)],
    "fused": [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
              (64, 64, 64, 4, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
              _WGRAD_DBN_64, (128, 128, 32, 8, 2)],
    "stem": [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 64, 32, 4, 3)],
}
_INTERPRETER_TILE = (32, 32, 16, 4, 1)
# The installed Triton's (major, minor)
TRITON_VERSION = tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])
# Tiles left out of a mode's autotune space below a Triton version: the static check
# (scripts/static_triton.py, sm_90a bf16 at the ResNet-50 shapes) finds them over issue
# 21's bar under the older Triton, for reasons of its code generation, not of the source;
# the autotuner measures the tiles that remain. (mode, BLOCK_M, BLOCK_N, BLOCK_K, warps):
# the first version that compiles the tile within the bar. The prologue's two-warpgroup
# 256x128 tile: 51.9 SASS per HGMMA at 3x3 stride 1 under triton 3.6 (bar 48; 3.8: 47.5):
# 3.6 lays the cp.async of the (scale, shift) pairs out like the wgmma A fragment, copied
# by all 8 warps (8 LDGSTS.64 and their address math per thread per K step; 3.8: one
# 32-bit copy), converts the tap mask with 4 byte loads and 4 I2F (3.8: one LDSM and one)
# and commits each wgmma as its own group (4 WARPGROUP.ARRIVE / DEPBAR, 3.8: 2). The
# 128-row prologue tiles meet the bar under both (docs/triton_conv.md, "Triton 3.6").
_MIN_TRITON = {("prologue", 256, 128, 64, 8): (3, 7)}
# And from a Triton version on: dgrad's wide-K tile (fused, 128x64x128, 4 warps) meets the
# bar under triton 3.6 (42.2-42.4 SASS per HGMMA at stride 1, 250 registers, no spill) but
# not under 3.8: 255 registers and 3 values spilled inside the K loop (6-7 STL/LDL, 16 B),
# results of the prologue's FFMAs, at 2 and 3 stages alike (a thread holds 128 A elements
# of the K step, the previous step's 64 registers of A in flight with the wgmma, 64 of
# accumulator and 32 coef_y values). 3.7 is unchecked (left out with 3.8).
_BELOW_TRITON = {("fused", 128, 64, 128, 4): (3, 7), ("dbn", 128, 64, 128, 4): (3, 7)}


def _triton_ok(mode, tile, version=None):
    """Whether ``tile`` of ``mode`` is autotuned under Triton ``version`` (default: the
    installed one), per ``_MIN_TRITON`` and ``_BELOW_TRITON``."""
    version = TRITON_VERSION if version is None else version
    need = _MIN_TRITON.get((mode, *tile[:4]))
    below = _BELOW_TRITON.get((mode, *tile[:4]))
    return (need is None or version >= need) and (below is None or version < below)


def _mode(stem, fused):
    return "stem" if stem else ("fused" if fused else "plain")


def _tma_blocks(nargs):
    """Autotune pre-hook: the TMA descriptors' block shapes follow the config's tiles."""
    if TensorDescriptor is None:
        return
    w_desc = nargs.get("W_desc")
    if isinstance(w_desc, TensorDescriptor):  # dgrad reads [BLOCK_K, BLOCK_N] boxes
        w_desc.block_shape = ([nargs["BLOCK_K"], nargs["BLOCK_N"]] if nargs["TRANSPOSED"]
                              else [nargs["BLOCK_N"], nargs["BLOCK_K"]])
    y_desc = nargs.get("Y_desc")
    if isinstance(y_desc, TensorDescriptor):  # the output tile: 2-D, or a box of [N,P,Q,C]
        th, tw = nargs["TILE_H"], nargs["TILE_W"]
        y_desc.block_shape = ([nargs["BLOCK_M"], nargs["BLOCK_N"]] if len(y_desc.shape) == 2
                              else [nargs["BLOCK_M"] // (th * tw), th, tw, nargs["BLOCK_N"]])
    for x_desc in (nargs.get("X_desc"), nargs.get("PY_desc")):
        if not isinstance(x_desc, TensorDescriptor):
            continue
        th, tw = nargs["TILE_H"], nargs["TILE_W"]
        tn = nargs["BLOCK_M"] // (th * tw)
        if len(x_desc.shape) == 4:  # spatial boxes (A_TMA == 2)
            x_desc.block_shape = [tn, th, tw, nargs["BLOCK_K"]]
        elif len(x_desc.shape) == 5:  # boxes of the stride-2 view (A_TMA == 3)
            x_desc.block_shape = [tn, th, 1, tw, nargs["BLOCK_K"]]
        else:
            x_desc.block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]


def _wgrad_tma_blocks(nargs):
    """Autotune pre-hook of the wgrad kernel: its descriptors' boxes follow the config."""
    if TensorDescriptor is None:
        return
    box = [nargs["BLOCK_K"] // (nargs["TILE_H"] * nargs["TILE_W"]), nargs["TILE_H"],
           nargs["TILE_W"]]
    for name, cols in (("DY_desc", "BLOCK_M"), ("PY_desc", "BLOCK_M"), ("X_desc", "BLOCK_N")):
        desc = nargs.get(name)
        if isinstance(desc, TensorDescriptor):  # 5-D: the stride-2 view of x
            desc.block_shape = (box[:2] + [1] + box[2:] if len(desc.shape) == 5 else box) \
                + [nargs[cols]]
    x_desc = nargs.get("X_desc")
    if isinstance(x_desc, TensorDescriptor):  # the swapped BN-ReLU prologue reads the
        # padding as NaN (``_relu_rows_coefs``); every other mode as 0
        x_desc.padding = "nan" if nargs["PROLOGUE"] and nargs["SWAP_AB"] else "zero"


def _configs(tiles, group_m=True, pre_hook=_tma_blocks):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k,
                           **({"GROUP_M": 8} if group_m else {})},
                          num_warps=w, num_stages=st, pre_hook=pre_hook)
            for m, n, k, w, st in tiles]


def _wgmma_ok(device) -> bool:
    """Whether ``device`` has Hopper's wgmma (sm_90 only), for which the forward BN-ReLU
    prologue's one-warpgroup tiles are made and checked (A in registers); with mma.sync
    (sm_80/86/89/120) they spill (bf16, sm_80 static: 128x128 at 4 warps 92 B, 256x128
    at 8 warps 144 B, both 255 registers) where the 8-warp ``fused`` tiles do not
    (128x128: 180 registers); sm_100's tcgen05 reads A from memory, not registers. Devices
    other than CUDA (the static check, the config tests) read the sm_90 lists."""
    device = torch.device(device)
    return device.type != "cuda" or _capability(device.index or 0)[0] == 9


def smem_budget(device=None) -> int:
    """Operand-pipeline bytes for ``device``: ``_SMEM_BUDGET``, less where the device's
    shared memory per block (opt-in) leaves under ``_EPILOGUE_RESERVE`` beside it."""
    if INTERPRET or device is None or torch.device(device).type != "cuda":
        return _SMEM_BUDGET
    return _device_smem_budget(torch.device(device).index or 0)


@functools.lru_cache(maxsize=None)
def _device_smem_budget(index):
    optin = torch.cuda.get_device_properties(index).shared_memory_per_block_optin
    return min(_SMEM_BUDGET, optin - _EPILOGUE_RESERVE)


def _in_budget(tiles, itemsize, budget):
    """The tiles with their stages cut to ``budget``, stages * (BLOCK_M + BLOCK_N) *
    BLOCK_K elements (a tile that 2 stages overflow is dropped); when none is left, the
    smallest tile at 2 stages (it must run somewhere)."""
    fit = []
    for m, n, k, w, stages in tiles:
        stages = min(stages, budget // ((m + n) * k * itemsize))
        if stages >= 2:
            fit.append((m, n, k, w, stages))
    if fit:
        return fit
    m, n, k, w, _ = min(tiles, key=lambda t: (t[0] + t[1]) * t[2])
    return [(m, n, k, w, 2)]


def _fits(tile, gemm_n, wide_ok, strided=False, narrow_ok=False):
    """Shape pruning: no 128x256 tile under 256 output columns (nor where the epilogue
    holds a second output-sized tile: it spills), no 64-wide one above 64 (but dgrad's
    wide-K tile, ``_wide_k``, and with ``narrow_ok`` the fused dgrad's where C_out is 64),
    no 256-row one at a stride > 1 (the prologue's 256x128 tile meets issue 21's 48 SASS
    per HGMMA at stride 1, 46.2-47.8, not with the stride-2 view's box coordinates:
    48.4)."""
    m, n, k = tile[:3]
    if n > 128 and not wide_ok or m > 128 and strided:
        return False
    return gemm_n is None or (n <= 128 or gemm_n >= 256) and (
        n >= 128 or gemm_n <= 64 or k == _WIDE_K or narrow_ok)


# dgrad's wide-K tile: BLOCK_K 128, 256-byte K rows in 16-bit, i.e. two 128-byte swizzle
# atoms (Triton clamps the descriptor's box to 64 channels and has two warps copy the two
# halves). Only where every K tile is whole: the tap loop walks C_out (dgrad's reduction
# channels) in BLOCK_K steps.
_WIDE_K = 128


def _wide_k(tile, transposed, itemsize, channels, a_tma):
    """Whether ``tile`` is one of dgrad's wide-K tiles and may run: the transposed mode with
    dy (and y) by TMA boxes (``a_tma``: sm_90, dense; stride 1, or stride 2 by boxes of a
    phase: 39.3-43.6 SASS per HGMMA, no spill, sm_90a, bf16), 16-bit operands,
    reduction ``channels`` (C_out) a multiple of its BLOCK_K (None: unknown, no). Not with
    dy and y through pointers (sm_80, sparse strides): at stride 2 that read 65-70 SASS per
    HGMMA and spilled 120-400 B (sm_90a, bf16, triton 3.6 / 3.8)."""
    return (tile[2] == _WIDE_K and transposed and a_tma and itemsize == 2
            and channels is not None and channels % _WIDE_K == 0)


def conv_configs(stem=False, transposed=False, fused=False, gemm_n=None, itemsize=2,
                 residual=False, budget=_SMEM_BUDGET, strided=False, wgmma=True,
                 triton_version=None, channels=None, a_tma=True, dbn=False, drelu=False):
    """The configs autotuned for one mode of ``_conv_kernel`` (``stem``: flat K loop;
    ``transposed``: dgrad; ``fused``: a prologue or the dReLU epilogue, the forward's
    BN-ReLU prologue with its own tiles, 128 rows per warpgroup, where the device has
    wgmma (``wgmma``: ``_wgmma_ok(device)``); ``residual``: an epilogue reading a
    residual; ``strided``: a stride > 1; ``a_tma``: A by TMA), pruned to the GEMM's N,
    the reduction channels (``channels``: the tap loop's, C_in of the forward, C_out of
    dgrad; None: unknown), the stride, the A path, the operands' element size, the
    device's shared memory (``budget``: ``smem_budget(device)``) and the Triton version
    (``_MIN_TRITON``, ``_BELOW_TRITON``; default the installed one); dgrad's ``dbn``
    (the dBN prologue) and ``drelu`` (the dReLU epilogue) pick its tiles (``_dbn_tiles``).
    The first is deterministic mode's config."""
    if INTERPRET:
        return _configs([_INTERPRETER_TILE])
    mode = _mode(stem, fused)
    if mode == "fused" and not transposed and wgmma:
        mode = "prologue"
    elif mode == "fused" and dbn and wgmma:
        mode = "dbn"
    tiles = [t for t in _CONV_TILES[mode] if _triton_ok(mode, t, triton_version)]
    if not stem:  # 128-byte K rows: BLOCK_K 64 in 16-bit, 32 in fp32 (TF32); 256-byte
        # rows for dgrad's wide-K tile where C_out allows it; fp64 has no 128-byte tile
        # (BLOCK_K 16): the mode's last, a BLOCK_K 32 one, as wgrad's lists fall back
        tiles = [t for t in tiles if t[2] * itemsize == 128
                 or _wide_k(t, transposed, itemsize, channels, a_tma)] or tiles[-1:]
    wide_ok = not (residual or fused)
    # the fused dgrad at C_out 64 (its K tile; no wide-K tile): also the 4-warp 128x64
    # tile at any C_in, whose K step carries 8 HGMMA per warp, as the dBN prologue's
    # 4-warp 128x128 one does (conv1's, sm_90a bf16, coefficients once: 33.2 and 32.9
    # SASS per HGMMA; ``_dbn_tiles``); which is faster is the autotuner's to measure
    narrow_ok = transposed and fused and channels is not None and channels * itemsize == 128
    tiles = [t for t in tiles if _fits(t, gemm_n, wide_ok, strided, narrow_ok)] or tiles[-1:]
    if mode == "dbn":
        tiles = _dbn_tiles(tiles, drelu, a_tma)
    return _configs(_in_budget(tiles, itemsize, budget))


_DBN_8_WARPS = (128, 128, 64, 8)
_DBN_4_WARPS = (128, 128, 64, 4)


def _dbn_tiles(tiles, drelu, a_tma=True):
    """dgrad's dBN prologue on a wgmma device: its 128x128x64 tile at 4 warps (one
    warpgroup of 128 rows: 8 HGMMA per warp per K step), not at 8 (two of 64 rows: 4,
    over which the prologue's fixed per-step cost of the y box, the coefficients and the
    fragment moves is spread: sm_90a bf16, 1x1 s1, 60.0 SASS per HGMMA, 51.2 with the
    coefficients once, against 37.0 / 32.9 at 4 warps; triton 3.6: 59.8 / 53.2 against
    37.5 / 33.9), except beside the dReLU epilogue, where it spills (336-548 B): there the
    8-warp one only where no other tile fits (the 4-warp 128x64 one at C_out 64 or
    C_in <= 64 and the wide-K ones at C_out % 128 == 0 meet the bar: 35.9-40.4); and with
    dy by pointers (``a_tma`` False), where it spills too (1x1, dBN alone: 436 B, 500 B
    and 2 spill instructions in the K loop with the coefficients once; 3.6: 404 B): there
    the 8-warp one (no spill), as the "fused" list has it."""
    if drelu or not a_tma:
        tiles = [t for t in tiles if t[:4] != _DBN_4_WARPS]
    keep_8 = not (drelu or a_tma)
    return [t for t in tiles if keep_8 or t[:4] != _DBN_8_WARPS] or tiles


def _wgrad_fits(tile, gemm_m, channels, itemsize, stem, fused, dbn=False, bn_relu=False,
                wide_dbn=True):
    """Shape pruning of wgrad's tiles. The prologues' 256-wide tiles put 256 rows of the
    MMA on the operand that has no prologue, so that the prologue'd one, wgmma's B, is
    shared by two warpgroups of 128 rows (8 HGMMA per warp per K step): 256 output
    channels (BLOCK_M) for the BN-ReLU prologue alone (x is B); 256 (tap, C_in) columns
    (BLOCK_N) with the dBN prologue (``SWAP_AB``: dy' is B), 16-bit. A thread's share of
    B's prologue per HGMMA is 8 * (B's columns) / (MMA rows) elements, so the BN-ReLU
    prologue alone also gets the 4-warp 128x64 tile at any C_in (one warpgroup of 128
    rows over 64 columns of x) where C_out >= 128. Static, sm_90a, bf16, 3x3 s1 (triton
    3.8, boxes of 1 x 2 x 32 pixels): BN-ReLU alone 60.2 SASS per HGMMA at 128x128 -> 32.1
    at 256x128, 30.9 at 128x64 (stride 2: 32.6), and 41.8 at 128x128 with x' as A
    (``_wgrad_swap``); dBN alone 98.2 -> 45.4 at 128x256 swapped; both (4 x 4 x 4 boxes,
    no dy' mask: ``pixel_box``) 79.5 at 128x128, 47.4 at 128x256. The dBN prologue alone
    at C_out and C_in <= 64 (layer1's first conv1) has B, or A, shared by 64 MMA rows
    only: dy' costs a thread 8 elements per HGMMA whatever the orientation, so its 64x64 tile
    (``_WGRAD_DBN_64``, ``bn_relu`` False; ``wide_dbn``: where 2 stages of it fit the
    device's shared memory, else the 64-pixel one) walks 256 pixels a K step, over which the
    step's fixed cost is spread (16 HGMMA), unswapped (bf16, 1x1: 91.5 SASS per HGMMA at
    64 pixels swapped, 49.0 at 256 swapped, 47.8 unswapped)."""
    m, n, k = tile[:3]
    if (m, n) == (64, 64) and dbn and not bn_relu and itemsize == 2 and not stem and wide_dbn:
        if tuple(tile[:3]) != _WGRAD_DBN_64[:3]:  # its 64x64 tile (``_WGRAD_DBN_64``)
            return False
    elif k * itemsize != 128:
        return False
    if gemm_m is not None and (m == 64) != (gemm_m <= 64):
        return False
    if m > 128 and not (fused and not dbn and (gemm_m is None or gemm_m >= 256)):
        return False
    if n > 128 and fused and not (dbn and itemsize == 2):
        return False
    if stem or channels is None:
        return True
    if fused and not dbn and (m, n, tile[3]) == (128, 64, 4):
        return True
    if dbn and itemsize == 2 and (m, n) == (128, 128) and channels >= 256:
        return False  # the 128x256 tile instead (B shared by 256 MMA rows: 46.6 SASS per
        # HGMMA at 1x1, against 91.2; sm_90a bf16, triton 3.8)
    return (n == 64) == (channels <= 64) and (n <= 128 or channels >= 256)


def _wgrad_swap(tile, fused, dbn, itemsize) -> bool:
    """``SWAP_AB`` of a wgrad tile: the MMA as dW^T = x'^T dy', in 16-bit only (wgmma
    reads a transposed shared-memory operand, x's box as A, only in 16-bit; TF32 keeps
    dy as A). With the dBN prologue always: dy' is then B, computed once for every row of
    the MMA. With the BN-ReLU prologue alone where the tile's x columns (BLOCK_N) are at
    least its output channels (BLOCK_M): x' as B costs a thread 8 * BLOCK_N / BLOCK_M
    elements per HGMMA, computed in fp32 and stored back to shared memory; as A, 8
    elements in registers (packed bf16 math in bf16). Static, sm_90a, bf16, 3x3 s1
    (triton 3.8 / 3.6): 64x64 and 128x128 60.2 / 59.8-60.0 SASS per HGMMA as B, 41.2 /
    42.5 and 41.8 / 43.5 as A; the 256x128 and 128x64 tiles stay as B (32.1, 30.9; as A
    41.8). docs/triton_conv.md, "The BN-ReLU prologue on x' as A"."""
    m, n = tile[:2]
    if tuple(tile[:3]) == _WGRAD_DBN_64[:3]:  # dy' as A in registers: no store of B to
        return False  # shared memory, no fence (``_wgrad_fits``)
    return itemsize == 2 and fused and (dbn or n >= m)


def wgrad_configs(stem=False, fused=False, gemm_m=None, channels=None, itemsize=2,
                  budget=_SMEM_BUDGET, dbn=False, bn_relu=None):
    """The configs autotuned for one mode of ``_conv_wgrad_kernel`` (``stem``: flat N
    tiles; ``fused``: the dBN or BN-ReLU prologue, ``dbn``: the dBN one among them,
    ``bn_relu``: the BN-ReLU one among them, by default where ``dbn`` is not), pruned to
    C_out (``gemm_m``), C_in (``channels``) and the element size (BLOCK_K 64 pixels in
    16-bit, 32 in fp32, but ``_WGRAD_DBN_64``; the first is deterministic mode's config)."""
    if bn_relu is None:
        bn_relu = fused and not dbn
    if INTERPRET:
        fit = [_INTERPRETER_TILE]
    else:
        tiles = _WGRAD_TILES[_mode(stem, fused)]
        m, n, k, _, _ = _WGRAD_DBN_64
        wide_dbn = 2 * (m + n) * k * itemsize <= budget
        fit = [t for t in tiles if _wgrad_fits(t, gemm_m, channels, itemsize, stem, fused, dbn,
                                               bn_relu, wide_dbn)]
        if not fit:  # the 128-byte rule alone
            fit = [t for t in tiles if t[2] * itemsize == 128][:1] or tiles[-1:]
        fit = _in_budget(fit, itemsize, budget)
    return _wgrad_swapped(_configs(fit, group_m=False, pre_hook=_wgrad_tma_blocks),
                          lambda c: _wgrad_swap(tuple(c.kwargs[b] for b in (
                              "BLOCK_M", "BLOCK_N", "BLOCK_K")), fused, dbn, itemsize))


def _wgrad_swapped(configs, swap):
    """``configs`` with their ``SWAP_AB`` switch set by ``swap(config)``."""
    for c in configs:
        c.kwargs["SWAP_AB"] = int(swap(c))
    return configs


def _key(cfg):
    return tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages


def _union(tiles):
    """Every tile of every mode at every stage count ``_in_budget`` can give it."""
    return sorted({(m, n, k, w, st) for mode in tiles.values() for m, n, k, w, _ in mode
                   for st in range(2, _MAX_STAGES + 1)})


def _conv_prune(configs, nargs, **kw):
    """Autotune only the configs of the launched mode."""
    want = {_key(c) for c in conv_configs(not kw["TAP_LOOP"], kw["TRANSPOSED"],
                                          bool(kw["PROLOGUE"] or kw["DRELU"]),
                                          nargs["GEMM_N"], nargs["X_ptr"].element_size(),
                                          kw["HAS_RESIDUAL"], smem_budget(nargs["X_ptr"].device),
                                          (nargs["STRIDE_H"], nargs["STRIDE_W"]) != (1, 1),
                                          _wgmma_ok(nargs["X_ptr"].device),
                                          channels=nargs.get("CI"),
                                          a_tma=bool(kw.get("A_TMA", 0)),
                                          dbn=kw["TRANSPOSED"] and kw["PROLOGUE"] == 2,
                                          drelu=bool(kw["DRELU"]))}
    return [c for c in configs if _key(c) in want]


def _wgrad_prune(configs, nargs, **kw):
    want = {_key(c) for c in wgrad_configs(not kw["TAP_N"], bool(kw["DBN"] or kw["PROLOGUE"]),
                                           nargs["GEMM_M"], nargs["CI"],
                                           nargs["X_ptr"].element_size(),
                                           smem_budget(nargs["X_ptr"].device),
                                           dbn=bool(kw["DBN"]), bn_relu=bool(kw["PROLOGUE"]))}
    return [c for c in configs if _key(c) in want]


# keyed on the GEMM shape plus the mode switches (fwd and dgrad tune apart), and on every
# argument ``_conv_prune`` reads (the dtypes: Triton adds them): a shape tuned once reuses
# its config, so two launches with one key must have one config list. The launcher sizes
# its workspaces from its own list (the smallest BLOCK_M): the stem's 64-row tile reused
# by a tap-loop conv of the same GEMM shape (TAP_LOOP) wrote statistics rows past them.
# INPUT_PRECISION: an fp32 launch's "tf32" and "ieee" dots differ in speed; without it a
# choice timed under one (and the disk store's record of it) was reused under the other.
_CONV_KEY = ["GEMM_M", "GEMM_N", "GEMM_K", "TRANSPOSED", "TAP_LOOP", "PROLOGUE", "STATS",
             "DRELU", "HAS_RESIDUAL", "STRIDE_H", "STRIDE_W", "W_TMA", "A_TMA", "TILE_H",
             "TILE_W", "PERSISTENT", "Y_TMA", "CI", "INPUT_PRECISION"]

_WGRAD_KEY = ["GEMM_M", "GEMM_N", "BATCH", "OH", "OW", "CI", "TILES_PER_SPLIT", "TAP_N", "TMA",
              "TILE_H", "TILE_W", "DBN", "PROLOGUE", "INPUT_PRECISION"]

def _wgrad_union(pre_hook=_wgrad_tma_blocks):
    """The wgrad autotuner's configs: every tile of every mode (``_union``) in both MMA
    orientations (``SWAP_AB``), pruned per launch to ``wgrad_configs``."""
    return [c for swap in (0, 1) for c in _wgrad_swapped(
        _configs(_union(_WGRAD_TILES), group_m=False, pre_hook=pre_hook),
        lambda c, swap=swap: swap)]


if INTERPRET:
    _conv_run = _conv_kernel
    _wgrad_run = _conv_wgrad_kernel
else:
    _conv_run = autotune(
        configs=_configs(_union(_CONV_TILES)),
        key=_CONV_KEY,
        prune_configs_by={"early_config_prune": _conv_prune},
    )(_conv_kernel)
    _wgrad_run = autotune(
        configs=_wgrad_union(),
        key=_WGRAD_KEY,
        prune_configs_by={"early_config_prune": _wgrad_prune},
    )(_conv_wgrad_kernel)


def _launch(run, configs, grid_fn, args, kwargs):
    """Launch on the input's device and return the config used (no host sync): autotuned
    over ``configs`` on a GPU; ``configs[0]`` under the interpreter and under
    torch.use_deterministic_algorithms(True) (one pinned config per mode, no timing:
    bitwise reproducible across processes)."""
    with device_guard(args[0]):
        if INTERPRET or torch.are_deterministic_algorithms_enabled():
            cfg = configs[0]
            fn = run if INTERPRET else run.fn
            if cfg.pre_hook is not None:  # TMA block shapes of the pinned config
                cfg.pre_hook({**dict(zip(getattr(fn, "arg_names", ()), args)), **kwargs,
                              **cfg.kwargs})
            fn[grid_fn(cfg.kwargs)](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps,
                                    num_stages=cfg.num_stages)
            return cfg.kwargs
        run = tuner_for(run, str(args[0].device))  # its own choices and best_config
        with run_lock(run):  # best_config is the last launch's: another thread's launch
            run[grid_fn](*args, **kwargs)  # in between would hand back its config
            return run.best_config.kwargs


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _nhwc_strides(t):
    """Strides of a 4-D (N, C, H, W)-shaped tensor in NHWC order."""
    return t.stride(0), t.stride(2), t.stride(3), t.stride(1)


def _input_precision(dtype):
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not INTERPRET:
        return "tf32"
    return "ieee"


def _tap_loop(channels):
    """Tap-major K loop when the reduction channels fill whole K tiles (the BLOCK_K of
    every config but dgrad's wide-K tile divides them; ``conv_configs`` keeps that one
    where they fill its K tiles too); the flattened (r, s, c) loop otherwise (the C=3
    stem)."""
    block_k = _INTERPRETER_TILE[2] if INTERPRET else max(
        t[2] for t in _union(_CONV_TILES) if t[2] != _WIDE_K)
    return channels % block_k == 0


def _pcoef_once(dbn, tap_loop, channels, configs) -> bool:
    """``PCOEF_ONCE`` for dgrad: the dBN prologue where its reduction channels (C_out) are
    one K tile in every config of ``configs``, the launch's list (the autotuner prunes to
    the same list: ``_conv_prune``), so its coefficients are the same at every K step.
    Not the forward's BN-ReLU prologue: its fp32 (scale, shift) held across the loop made
    the 1x1 GEMM tiles spill (bf16, sm_90a: 128x128 52 B, 256x128 32 B; triton 3.8). Nor
    where the list is dgrad's wide-K tiles alone (C_out 128 beside the dReLU epilogue,
    ``_dbn_tiles``): triton 3.6's 4-warp one then spills in fp16 (80-124 B)."""
    return bool(dbn) and tap_loop and all(c.kwargs["BLOCK_K"] == channels != _WIDE_K
                                          for c in configs)


@functools.lru_cache(maxsize=None)
def _capability(index):
    return torch.cuda.get_device_capability(index)


def _tma_ok(t):
    """Whether ``t`` may be read by TMA: a Triton with host descriptors, a 16/32-bit
    dtype, a 16-byte-aligned base, and sm_90+ (the interpreter emulates it, so the CPU
    tests run this path; sm_80 keeps the pointer path)."""
    if TensorDescriptor is None or t.dtype not in (torch.bfloat16, torch.float16,
                                                   torch.float32):
        return False
    if t.data_ptr() % 16:
        return False
    return INTERPRET or (t.is_cuda and _capability(t.device.index or 0)[0] >= 9)


def _lanes(device):
    """int32 0, 1, 2, ... on ``device``: the row ids ``_box_rows_in`` loads (longer than
    any BLOCK_M). One tensor per device, made outside CUDA-graph capture: a tensor made
    during capture is only written when the graph replays (its arange is recorded, not
    run), so a cached one would give later eager launches uninitialized row ids; there
    each call makes its own, written by the graph before the conv reads it."""
    if _capturing(device):
        return torch.arange(512, dtype=torch.int32, device=device)
    return _device_lanes(device)


@functools.lru_cache(maxsize=None)
def _device_lanes(device):
    # copied from the host and waited for (a blocking copy), so that a launch on any
    # stream may read it at once, not only one ordered after the current stream's copy
    return torch.arange(512, dtype=torch.int32).to(device)


def _dense_desc(t, shape, block):
    """A TMA descriptor over ``t`` (dense: the caller checked) read as a row-major array
    of ``shape``, or None where TMA cannot read it (rows not 16-byte multiples...)."""
    if not _tma_ok(t) or (shape[-1] * t.element_size()) % 16:
        return None
    strides = [1]
    for d in reversed(shape[1:]):
        strides.insert(0, strides[0] * d)
    return TensorDescriptor(t, list(shape), strides, list(block))


# The kernels' index math is int32 (no 64-bit division): GEMM sizes below this
_INDEX_LIMIT = 2**31


def _check_int32(**sizes):
    """GEMM sizes below ``_INDEX_LIMIT`` (fusedres.conv.conv_path sends larger problems to
    F.conv2d; a grid of TMA boxes, padded past the pixels, that reaches it falls back to
    the pointer path instead)."""
    for name, v in sizes.items():
        if v >= _INDEX_LIMIT:
            raise ValueError(f"fusedres triton conv: {name} = {v} >= {_INDEX_LIMIT}")


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pair(v):
    if isinstance(v, int):
        return (v, v)
    return tuple(int(i) for i in v)


def empty_channels_last(n, c, h, w, dtype, device):
    return torch.empty((n, h, w, c), dtype=dtype, device=device).permute(0, 3, 1, 2)


def out_size(h, w, r, s, stride, padding):
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    return (h + 2 * ph - r) // sh + 1, (w + 2 * pw - s) // sw + 1


def pixel_box(n, p, q, rows, min_pixels=1):
    """The pixel box (TILE_N, TILE_H, TILE_W) of ``rows`` pixels (a power of 2) that covers
    an N x P x Q output in the fewest boxes, with at least ``min_pixels`` pixels of an
    image. Each box is an M tile (forward, dgrad) or a K step (wgrad) whose pixels past
    the output are loaded and multiplied for nothing: powers of two that divide P and Q
    tile the output exactly (28x28 at 64 pixels: 4 x 4 x 4; 7x7 at 128: 128 x 1 x 1 from
    N = 128), where boxes of next_pow2(Q) columns waste 12.5% (56x56, 28x28) to 23%
    (14x14, 7x7) of the rows. Ties: the most columns, then rows, inside the output (longer
    contiguous runs), then the smaller box. ``FUSEDRES_PIXEL_BOX=pow2`` makes the boxes
    of before (next_pow2(Q) columns, then rows), to time the two on a GPU."""
    mode = os.environ.get("FUSEDRES_PIXEL_BOX", "fewest")
    if mode not in ("fewest", "pow2"):
        raise ValueError(f"FUSEDRES_PIXEL_BOX={mode!r}: 'fewest' (the default) or 'pow2'")
    if mode == "pow2":
        tw = min(triton.next_power_of_2(q), rows)
        th = min(triton.next_power_of_2(p), rows // tw)
        return rows // (tw * th), th, tw
    best, best_key = None, None
    tw = 1
    while tw <= rows:
        th = 1
        while tw * th < min_pixels:
            th *= 2
        while tw * th <= rows:
            tn = rows // (tw * th)
            boxes = triton.cdiv(n, tn) * triton.cdiv(p, th) * triton.cdiv(q, tw)
            key = (boxes, -min(tw, q), -min(th, p), tw, th)
            if best_key is None or key < best_key:
                best, best_key = (tn, th, tw), key
            th *= 2
        tw *= 2
    return best


def conv_fwd(x, weight, stride=1, padding=0, *, bias=None, residual=None, scale=None,
             shift=None, relu=False, stats=False):
    """Forward implicit-GEMM conv. Returns ``(y, mean, var)``.

    ``x`` (N, C_in, H, W) any strides (channels_last is fast), ``weight`` (C_out, C_in,
    R, S) any strides (channels_last = KRSC is fast). ``scale``/``shift`` (C_in,) apply
    ``relu(x*scale + shift)`` while loading. ``y`` is channels_last in ``x``'s dtype:
    ``[relu](conv + bias + residual)``. With ``stats``, ``mean``/``var`` (C_out,) are the
    per-channel mean and biased variance of ``y`` in the accumulation dtype; otherwise
    they are empty.
    """
    n, ci, h, w = x.shape
    co, ci_w, r, s = weight.shape
    assert ci == ci_w, "groups=1 only"
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    p, q = out_size(h, w, r, s, stride, padding)
    if residual is not None and tuple(residual.shape) != (n, co, p, q):
        raise ValueError(f"residual has shape {tuple(residual.shape)}, the conv output "
                         f"{(n, co, p, q)}")
    if bias is not None and tuple(bias.shape) != (co,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({co},)")
    if scale is not None and (tuple(scale.shape) != (ci,) or tuple(shift.shape) != (ci,)):
        raise ValueError(f"scale/shift must have shape ({ci},)")
    acc = _acc_dtype(x.dtype)
    y = empty_channels_last(n, co, p, q, x.dtype, x.device)
    gm, gn, gk = n * p * q, co, r * s * ci
    _check_int32(GEMM_M=gm, GEMM_K=gk)
    prologue = 1 if scale is not None else 0
    configs = conv_configs(stem=not _tap_loop(ci), fused=bool(prologue), gemm_n=co,
                           itemsize=x.element_size(), residual=residual is not None,
                           budget=smem_budget(x.device), strided=(sh, sw) != (1, 1),
                           wgmma=_wgmma_ok(x.device), channels=ci)
    tap_loop = _tap_loop(ci)
    block_m, block_k = configs[0].kwargs["BLOCK_M"], configs[0].kwargs["BLOCK_K"]
    # B by TMA: the weight KRSC-contiguous, read as [C_out, R*S*C_in]
    w_desc = None
    if tap_loop and weight.permute(0, 2, 3, 1).is_contiguous():
        w_desc = _dense_desc(weight.permute(0, 2, 3, 1), (co, gk),
                             (configs[0].kwargs["BLOCK_N"], block_k))
    # A by TMA (dense NHWC x): a 1x1 stride-1 unpadded conv is a GEMM on x as
    # [N*H*W, C_in]; otherwise (stride 1, or stride 2 with even H, W) M tiles are boxes of
    # the output, TILE_N images x TILE_H x TILE_W, and each tap loads the box of x it reads
    # (zero-filled padding). TILE_H x TILE_W is set by the smallest BLOCK_M of the configs
    # (the same for all: they are launch arguments); a config with k times the rows takes
    # k times the images (TILE_N = BLOCK_M / (TILE_H * TILE_W) in the kernel). GEMM_M is
    # then the tile count times BLOCK_M, the images rounded up to the largest config's
    # TILE_N (the smaller configs' extra tiles are empty: masked, counted 0). Other convs
    # read A through pointers.
    a_tma, tile_h, tile_w, x_desc, gm_grid = 0, 1, 1, None, gm
    min_bm = min(c.kwargs["BLOCK_M"] for c in configs)
    max_bm = max(c.kwargs["BLOCK_M"] for c in configs)
    if tap_loop and x.permute(0, 2, 3, 1).is_contiguous():
        xv = x.permute(0, 2, 3, 1)
        # (the BN-ReLU prologue: 2 pixels of an image at least, its tap mask a function of
        # the row: with one pixel of 128 images the mask does not depend on the row, and
        # Triton lays the prologue'd A out apart from the wgmma operand, stores it to
        # shared memory and reloads it, 54.8 SASS per HGMMA at 7x7 against 47.4 at 2 x 1;
        # sm_90a, bf16)
        _, tile_h, tile_w = pixel_box(n, p, q, min_bm, 2 if prologue else 1)
        tile_n = block_m // (tile_w * tile_h)
        if (r, s, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
            x_desc = _dense_desc(xv, (gm, ci), (block_m, block_k))
            a_tma = 1
        elif (sh, sw) == (1, 1):
            x_desc = _dense_desc(xv, (n, h, w, ci), (tile_n, tile_h, tile_w, block_k))
            a_tma = 2
        elif (sh, sw) == (2, 2) and h % 2 == 0 and w % 2 == 0:
            # x viewed as [N, H/2, 2, W/2, 2*C]: a stride-2 tap is a dense box of it
            x_desc = _dense_desc(xv, (n, h // 2, 2, w // 2, 2 * ci),
                                 (tile_n, tile_h, 1, tile_w, block_k))
            a_tma = 3
        if x_desc is not None and a_tma >= 2:
            max_tile_n = max_bm // (tile_w * tile_h)
            gm_grid = (triton.cdiv(n, max_tile_n) * triton.cdiv(p, tile_h)
                       * triton.cdiv(q, tile_w) * max_bm)
            if gm_grid >= _INDEX_LIMIT:  # the boxes' padding past int32 (not the pixels)
                x_desc, gm_grid = None, gm
        if x_desc is None:
            a_tma, tile_h, tile_w = 0, 1, 1
    # the output by TMA where A is: Y (dense, ours) as [N*P*Q, C_out] for the 1x1 GEMM, or
    # as [N, P, Q, C_out] boxes of the spatial tiles
    y_tma, y_desc = 0, None
    if a_tma:
        yv = y.permute(0, 2, 3, 1)
        bn0 = configs[0].kwargs["BLOCK_N"]
        y_desc = (_dense_desc(yv, (gm, co), (block_m, bn0)) if a_tma == 1 else
                  _dense_desc(yv, (n, p, q, co),
                              (block_m // (tile_h * tile_w), tile_h, tile_w, bn0)))
        y_tma = 0 if y_desc is None else (1 if a_tma == 1 else 2)
    tiles = triton.cdiv(gm_grid, min_bm)
    ws3 = y
    if stats:
        ws1 = torch.empty((tiles, co, 2), dtype=acc, device=x.device)  # tile means, pairs
        ws2 = torch.empty((tiles, co), dtype=acc, device=x.device)
        if a_tma >= 2:
            ws3 = torch.empty((tiles, co), dtype=acc, device=x.device)
    else:
        ws1 = ws2 = y
    # the plain forward (no prologue) runs persistent: about one program per SM walks
    # the output tiles in grouped order (fewer launches' worth of setup per tile)
    persistent = not prologue
    programs = _persistent_programs(x)
    res = residual if residual is not None else y
    # (scale, shift) interleaved as (C_in, 2): the kernel loads both in one access
    pcoef = torch.stack((scale, shift), 1) if prologue else y
    args = (x, weight, y, bias if bias is not None else y, res,
            pcoef, y, y, y, ws1, ws2, ws3, _lanes(x.device),
            w_desc if w_desc is not None else weight, x_desc if x_desc is not None else x, x,
            y_desc if y_desc is not None else y,
            h, w, ci, p, q, co, r, s, sh, sw, ph, pw,
            *_nhwc_strides(x), weight.stride(0), weight.stride(2), weight.stride(3),
            weight.stride(1), *_nhwc_strides(y), *_nhwc_strides(res), 0, 0, 0, 0,
            gm_grid, gn, gk, n, 0)
    kwargs = dict(TRANSPOSED=False, TAP_LOOP=tap_loop, W_TMA=w_desc is not None,
                  A_TMA=a_tma, TILE_H=tile_h, TILE_W=tile_w, PROLOGUE=prologue,
                  HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                  EPILOGUE_RELU=bool(relu), STATS=bool(stats), DRELU=False,
                  PERSISTENT=persistent,
                  FLATTEN=persistent and flatten_tiles(a_tma, residual is not None),
                  Y_TMA=y_tma, ACC_FP64=acc == torch.float64,
                  INPUT_PRECISION=_input_precision(x.dtype),
                  PCOEF_ONCE=False)

    def grid(meta):
        tiles = triton.cdiv(gm_grid, meta["BLOCK_M"]) * triton.cdiv(gn, meta["BLOCK_N"])
        return (min(tiles, programs) if persistent else tiles,)

    cfg = _launch(_conv_run, configs, grid, args, kwargs)
    if not stats:
        empty = torch.empty(0, dtype=acc, device=x.device)
        return y, empty, empty
    mean = torch.empty(co, dtype=acc, device=x.device)
    var = torch.empty(co, dtype=acc, device=x.device)
    merge_stats(ws1, ws2, mean, var, triton.cdiv(gm_grid, cfg["BLOCK_M"]), gm, cfg["BLOCK_M"],
                ws_cnt=ws3 if a_tma >= 2 else None)
    return y, mean, var


def merge_stats(ws_mean, ws_m2, mean, var, tiles, m, tile_m, rows_per_prog=None,
                ws_cnt=None):
    """Chan-merge ``tiles`` rows of per-tile (mean, M2) into ``mean``/``var`` (biased).

    Row t holds min(tile_m, m - t*tile_m) elements, or ``ws_cnt[t]`` when given. Two
    levels when there are many rows: chunks of ``rows_per_prog`` rows merged in parallel
    into a (P, C) workspace, then one pass over the P chunks (fixed order: deterministic).
    """
    c = ws_mean.shape[1]
    block_c = 32 if INTERPRET else 64
    block_t = 4 if INTERPRET else 64
    # tile means as (T, C, 2) pairs (the forward's epilogue) are merged in fp64: rounding
    # them to fp32 at the mean's magnitude is what they avoid
    fp64 = torch.float64 in (mean.dtype, ws_mean.dtype) or ws_mean.dim() == 3
    if rows_per_prog is None:
        rows_per_prog = 8 * block_t if INTERPRET else 16 * block_t
    rows_per_prog = triton.cdiv(rows_per_prog, block_t) * block_t
    p = triton.cdiv(tiles, rows_per_prog)
    grid_c = triton.cdiv(c, block_c)
    with device_guard(mean):
        _merge_stats_launch(ws_mean, ws_m2, mean, var, tiles, m, tile_m, rows_per_prog, p, c,
                            grid_c, block_t, block_c, fp64, ws_cnt)


def _merge_stats_launch(ws_mean, ws_m2, mean, var, tiles, m, tile_m, rows_per_prog, p, c,
                        grid_c, block_t, block_c, fp64, ws_cnt=None):
    has_cnt = ws_cnt is not None
    cnt = ws_cnt if has_cnt else ws_mean
    pairs = ws_mean.dim() == 3
    if p <= 1:
        _stats_merge_kernel[(grid_c, 1)](
            ws_mean, ws_m2, cnt, mean, var, mean, tiles, c, m, tile_m,
            triton.cdiv(max(tiles, 1), block_t) * block_t,
            HAS_COUNT=has_cnt, FINAL=True, ACC_FP64=fp64, BLOCK_T=block_t, BLOCK_C=block_c,
            MEAN_PAIRS=pairs)
        return
    part_mean, part_m2, part_cnt = torch.empty((3, p, c), dtype=torch.float64 if fp64 else
                                               mean.dtype, device=mean.device)
    _stats_merge_kernel[(grid_c, p)](
        ws_mean, ws_m2, cnt, part_mean, part_m2, part_cnt, tiles, c, m, tile_m,
        rows_per_prog,
        HAS_COUNT=has_cnt, FINAL=False, ACC_FP64=fp64, BLOCK_T=block_t, BLOCK_C=block_c,
        MEAN_PAIRS=pairs)
    _stats_merge_kernel[(grid_c, 1)](
        part_mean, part_m2, part_cnt, mean, var, mean, p, c, 0, 0,
        triton.cdiv(p, block_t) * block_t,
        HAS_COUNT=True, FINAL=True, ACC_FP64=fp64, BLOCK_T=block_t, BLOCK_C=block_c)


def conv_dgrad(dy, weight, input_hw, stride=1, padding=0, *, y=None, coef_y=None,
               coef_c=None, y_mean=None, y_prev=None, scale=None, shift=None,
               y_prev_centre=None):
    """Data gradient of the conv: a transposed implicit-GEMM conv of ``dy``.

    dBN (when ``y`` is given): the data gradient of ``dy + y*coef_y + coef_c`` (per output
    channel), the gradient reaching the conv output when its batch statistics are
    differentiable outputs: the kernel's prologue reads ``dy + (y - centre)*coef_y``,
    rounded once to the operand dtype, and its accumulator starts from the constant's part,
    E (``_dbn_constant_dx``, fp32, computed once per call). The centre is ``y_mean`` (y's
    per-channel batch mean; computed here, one pass over y, when not given) rounded to y's
    dtype: y's mean never enters the rounded operand (uncentred, a mean 20x the spread
    made dx's error 12-37x the materialised pass's in fp16). dReLU epilogue (when
    ``y_prev`` is given; the forward input was ``relu(y_prev*scale + shift)``): returns
    ``(g*scale, sum(g), sum(g*(y_prev - y_prev_centre)))`` with ``g = da * [y_prev*scale +
    shift > 0]`` -- the gradient of ``y_prev`` and of ``shift``/``scale`` (``y_prev_centre``:
    per channel, default 0; the previous BN's mean, with ``shift = beta - mean*scale``,
    makes the last sum the gradient of ``scale`` in the centred form ``(y_prev - mean)*scale
    + beta``, which does not cancel). Without it returns ``(da, None, None)``. Output
    channels_last.
    """
    n, co, p, q = dy.shape
    co_w, ci, r, s = weight.shape
    h, w = input_hw
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    acc = _acc_dtype(dy.dtype)
    dx = empty_channels_last(n, ci, h, w, dy.dtype, dy.device)
    phases = sh * sw
    # grid M: the pixels of the largest phase (each phase: output rows h = a - pad + sh*i)
    gm, gn, gk = n * triton.cdiv(h, sh) * triton.cdiv(w, sw), ci, r * s * co
    drelu = y_prev is not None
    dbn = y is not None
    if dbn and y.stride() != dy.stride():  # the kernel reads y at dy's offsets
        dy, y = (t.contiguous(memory_format=torch.channels_last) for t in (dy, y))
    _check_int32(GEMM_M=n * h * w, GEMM_K=gk)
    tap_loop = _tap_loop(co)

    def dgrad_configs(a_tma):
        return conv_configs(stem=not tap_loop, transposed=True, fused=dbn or drelu,
                            gemm_n=ci, itemsize=dy.element_size(),
                            budget=smem_budget(dy.device), strided=(sh, sw) != (1, 1),
                            channels=co, a_tma=a_tma, dbn=dbn, drelu=drelu,
                            wgmma=_wgmma_ok(dy.device))

    configs = dgrad_configs(True)
    # dy by TMA (sm_90, dense NHWC dy, whole K tiles): M tiles are boxes of one phase's
    # dx pixels (every stride-th row and column; at stride 1 all of dx), TILE_N images x
    # TILE_H x TILE_W, and each tap reads a box of dy (the kernel's A_TMA 2, TRANSPOSED)
    a_tma, tile_h, tile_w, x_desc, py_desc = 0, 1, 1, None, None
    block_m = configs[0].kwargs["BLOCK_M"]
    h_ph, w_ph = triton.cdiv(h, sh), triton.cdiv(w, sw)  # the largest phase's size
    if (tap_loop and dy.permute(0, 2, 3, 1).is_contiguous()
            and all(c.kwargs["BLOCK_M"] == block_m for c in configs)):
        tile_n, tile_h, tile_w = pixel_box(n, h_ph, w_ph, block_m)
        box = (tile_n, tile_h, tile_w, configs[0].kwargs["BLOCK_K"])
        x_desc = _dense_desc(dy.permute(0, 2, 3, 1), (n, p, q, co), box)
        if dbn:  # y, read beside dy by the dBN prologue
            py_desc = (_dense_desc(y.permute(0, 2, 3, 1), (n, p, q, co), box)
                       if y.permute(0, 2, 3, 1).is_contiguous() else None)
            x_desc = x_desc if py_desc is not None else None
        gm_box = (triton.cdiv(n, tile_n) * triton.cdiv(h_ph, tile_h)
                  * triton.cdiv(w_ph, tile_w) * block_m)
        if x_desc is not None and gm_box < _INDEX_LIMIT:  # else the boxes' padding is
            a_tma, gm = 2, gm_box  # past int32 (not the pixels): pointers
        else:
            x_desc, py_desc, tile_h, tile_w = None, None, 1, 1
    if not a_tma:  # dy through pointers: without the wide-K tile (``_wide_k``)
        configs = dgrad_configs(False)
    min_bm = min(c.kwargs["BLOCK_M"] for c in configs)
    rows = triton.cdiv(gm, min_bm)
    if drelu:
        ws1 = torch.empty((phases * rows, ci), dtype=acc, device=dy.device)
        ws2 = torch.empty((phases * rows, ci), dtype=acc, device=dy.device)
    else:
        ws1 = ws2 = dx
    py = y if dbn else dx
    ey = y_prev if drelu else dx
    if drelu:  # (scale, shift, centre of the dscale sums) interleaved as (C_in, 3)
        ecoef = torch.stack((scale.to(acc), shift.to(acc),
                             torch.zeros_like(scale, dtype=acc) if y_prev_centre is None
                             else y_prev_centre.to(acc)), 1)
    pcoef = cdx = None
    precision = _input_precision(dy.dtype)
    if dbn:  # the kernel's A is dy + (y - centre)*coef_y (``_dbn_prologue_coefs``),
        # no tap mask; the accumulator starts from the rest (a residual read with batch
        # stride 0)
        if y_mean is None:
            y_mean = y.mean((0, 2, 3), dtype=acc)
        centre = y_mean.to(y.dtype).to(acc)
        pcoef = _dbn_prologue_coefs(coef_y.to(acc), centre, dy.dtype)
        if precision == "tf32":  # the MMA reads tf32's bits of W too: E must cancel the
            # fill times the W the MMA reads (else up to 2^-10 of it per missed tap), so
            # the kernel and E both take W cut to them (a copy, once per call)
            weight = _tf32_bits(weight)
        f64 = torch.float64
        cdx = _dbn_constant_dx(weight, coef_c.to(f64) + centre.to(f64) * coef_y.to(f64),
                               (h, w), (p, q), (sh, sw), (ph, pw), acc,
                               fill=_dbn_prologue_fill(pcoef, dy.dtype, precision))
    res, res_strides = dx, (0, 0, 0, 0)
    if cdx is not None:
        res, res_strides = cdx, (0, *cdx.stride())
    # B by TMA: [BLOCK_K, BLOCK_N] boxes of the KRSC-dense weight as [C_out, R*S*C_in]
    w_desc = None
    if tap_loop and weight.permute(0, 2, 3, 1).is_contiguous():
        cfg0 = configs[0].kwargs
        w_desc = _dense_desc(weight.permute(0, 2, 3, 1), (co, r * s * ci),
                             (cfg0["BLOCK_K"], cfg0["BLOCK_N"]))
    args = (dy, weight, dx, dx, res, pcoef if dbn else dx, py,
            ey, ecoef if drelu else dx, ws1, ws2, dx, _lanes(dy.device),
            w_desc if w_desc is not None else weight, x_desc if x_desc is not None else dy,
            py_desc if py_desc is not None else dy, dx,
            p, q, co, h, w, ci, r, s, sh, sw, ph, pw,
            *_nhwc_strides(dy),
            # the weight read as [CI, R, S, CO]: gemm-N index is C_in, reduction is C_out
            weight.stride(1), weight.stride(2), weight.stride(3), weight.stride(0),
            *_nhwc_strides(dx), *res_strides, *_nhwc_strides(ey),
            gm, gn, gk, n, rows)
    kwargs = dict(TRANSPOSED=True, TAP_LOOP=tap_loop, W_TMA=w_desc is not None,
                  A_TMA=a_tma, TILE_H=tile_h, TILE_W=tile_w, PROLOGUE=2 if dbn else 0,
                  HAS_BIAS=False, HAS_RESIDUAL=dbn, EPILOGUE_RELU=False, STATS=False,
                  DRELU=drelu, PERSISTENT=False, FLATTEN=False, Y_TMA=0,
                  ACC_FP64=acc == torch.float64,
                  INPUT_PRECISION=precision,
                  PCOEF_ONCE=_pcoef_once(dbn, tap_loop, co, configs))

    def grid(meta):
        return (triton.cdiv(gm, meta["BLOCK_M"]) * triton.cdiv(gn, meta["BLOCK_N"]), phases)

    cfg = _launch(_conv_run, configs, grid, args, kwargs)
    if not drelu:
        return dx, None, None
    t = triton.cdiv(gm, cfg["BLOCK_M"])
    return (dx, ws1.view(phases, rows, ci)[:, :t].sum((0, 1)),
            ws2.view(phases, rows, ci)[:, :t].sum((0, 1)))


def wgrad_mask_dy(dbn, tma, unpadded_1x1, overhang, fp16) -> bool:
    """``MASK_DY`` of a wgrad launch (``conv_wgrad``; scripts/static_triton.py compiles
    its rows with it): whether dy' is zeroed at the pixels past the output, where dy and y
    are zero-filled and dy' is coef_c alone. Needed in bf16 and fp32 only where x' there
    may not be 0: where the pixel box reaches past the output's rows or columns
    (``overhang``: P % TILE_H or Q % TILE_W, ``pixel_box``) and a tap of any conv but a 1x1
    unpadded one may read x inside the image there. Past the batch every tap reads x's fill: 0, or NaN
    with the swapped BN-ReLU prologue, 0 after its max (unswapped, relu(shift): the
    kernel masks dy' there itself); x by pointers (``tma`` 0) is masked. In fp16 always:
    coef_c alone may be past fp16's range where y's large mean cancels it inside (inf
    times x's 0 is NaN)."""
    return bool(dbn) and (fp16 or bool(tma) and bool(overhang) and not unpadded_1x1)


def _dbn_prologue_coefs(coef_y, centre, dtype):
    """The dgrad dBN prologue's per-channel coefficients (its ``PCOEF_ptr``) for operands of
    ``dtype``. bf16: rows (centre, hi, lo) in bf16, coef_y = hi + lo to 16 bits, for packed
    math: ``d = y - centre`` (exact where y is within 2x of the centre), then
    ``fma(d, lo, fma(d, hi, dy))``, each rounded to bf16 (1.5 SASS per element where the
    fp32 math takes 4.5: two unpacks, FADD, FFMA, half a pack). coef_y to 8 bits alone
    would put 2^-9 of the y-term in dx. Otherwise (coef_y, centre) pairs in the
    accumulator dtype: ``fma(y - centre, coef_y, dy)``, the difference in the operand
    dtype (fp16: packed), the FMA in fp32 / fp64, rounded once."""
    if dtype == torch.bfloat16:
        hi = coef_y.to(torch.bfloat16)
        lo = (coef_y - hi.to(coef_y.dtype)).to(torch.bfloat16)
        return torch.stack([centre.to(torch.bfloat16), hi, lo]).contiguous()
    return torch.stack([coef_y, centre], 1).contiguous()


def _dbn_prologue_fill(pcoef, dtype, input_precision="ieee"):
    """Per channel, float64: the dgrad dBN prologue's operand where dy and y are zero-filled
    (``-centre*coef_y`` as the kernel rounds it), which E cancels."""
    if dtype == torch.bfloat16:  # d = -centre exactly; fma(d, lo, fma(d, hi, 0))
        d, hi, lo = -pcoef[0].double(), pcoef[1].double(), pcoef[2].double()
        return _round_bf16(d * lo + _round_bf16(d * hi))  # exact in float64 before each
    coef_y, centre = pcoef.unbind(1)
    fill = (-centre * coef_y).to(dtype)  # fma(-centre, coef_y, 0) in fp32 / fp64
    if dtype == torch.float32 and input_precision == "tf32":
        fill = _tf32_bits(fill)
    return fill.double()


def _tf32_bits(t):
    """fp32 ``t`` cut to tf32's bits (its low 13 mantissa bits cleared: what a TF32 MMA
    reads of it, however it rounds), a new tensor in ``t``'s layout."""
    return (t.view(torch.int32) & -8192).view(torch.float32)


def _round_bf16(x):
    """float64 ``x`` rounded once to bf16's 8 significant bits, to nearest even (a
    conversion through fp32 would round twice), as float64."""
    m, e = torch.frexp(x)
    return torch.ldexp(torch.round(m * 256) / 256, e)


def _dbn_constant_dx(weight, coef_c, input_hw, out_hw, stride, padding, dtype, fill=None):
    """E[ih, iw, ci] (H, W, C_in) in ``dtype``: the part of dgrad's dx that the dBN constant
    ``coef_c`` (per output channel, the same at every pixel of dy_total) contributes, i.e.
    conv_transpose(coef_c everywhere, W), less what the kernel's operand ``fill`` (per
    output channel; its value where dy and y are zero-filled) adds through the taps that
    miss dy. The same for every image; a function of the pixel because border pixels are
    reached by fewer taps: E[ih, iw] = the sum over the taps (r, s) that reach (ih, iw)
    from inside the output of V(coef_c)[r, s], V(u)[r, s] = sum_co u[co] * W[co, :, r, s],
    less the sum of V(fill) over the taps of (ih, iw)'s phase that miss it (the kernel
    visits every tap of the phase). Contractions in float64, rounded once to ``dtype``
    (fp32: more exact than the kernel's own sums, whatever the TF32 switches say; no
    autotuning, no timing-dependent choice: deterministic)."""
    co, ci, r, s = weight.shape
    f64 = torch.float64
    w64 = weight.to(f64).reshape(co, ci * r * s)

    def spread(u, inside):  # sum of V(u) over the taps of each pixel (inside dy or all)
        rh = _tap_reach(input_hw[0], out_hw[0], r, stride[0], padding[0], weight.device,
                        inside)
        rw = _tap_reach(input_hw[1], out_hw[1], s, stride[1], padding[1], weight.device,
                        inside)
        return torch.einsum("hr,ws,irs->hwi", rh, rw, (u.to(f64) @ w64).view(ci, r, s))

    if fill is None:
        e = spread(coef_c, True)
    else:  # reached: coef_c; missed: -fill, i.e. all taps -fill, reached coef_c + fill
        e = spread(coef_c.to(f64) + fill.to(f64), True) - spread(fill, False)
    return e.to(dtype).contiguous()


def _tap_reach(size, out, k, stride, pad, device, inside=True):
    """[size, k] float64 0/1: whether input row i is reached by tap t, from output row
    (i + pad - t) / stride (an integer, in [0, out) if ``inside``, else anywhere: the taps
    of i's phase). Cached per device, made outside CUDA-graph capture (as ``_lanes``: a
    tensor made during capture is only written when the graph replays); during capture
    each call makes its own on the device."""
    if _capturing(device):
        return _reach_matrix(size, out, k, stride, pad, device, inside)
    return _device_reach(size, out, k, stride, pad, device, inside)


def _reach_matrix(size, out, k, stride, pad, device, inside):
    t = (torch.arange(size, device=device)[:, None] + pad
         - torch.arange(k, device=device)[None, :])
    ok = t % stride == 0
    if inside:
        ok &= (t >= 0) & (t < out * stride)
    return ok.to(torch.float64)


@functools.lru_cache(maxsize=256)
def _device_reach(size, out, k, stride, pad, device, inside):
    # made on the host and copied with a blocking copy: readable from any stream at once
    return _reach_matrix(size, out, k, stride, pad, "cpu", inside).to(device)


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _persistent_programs(t):
    """Programs of a persistent launch: one per SM (3 in the interpreter, so that the
    CPU tests walk several tiles per program)."""
    return 3 if INTERPRET or not t.is_cuda else _sm_count(t.device.index or 0)


def conv_wgrad(dy, x, weight_shape, stride=1, padding=0, *, y=None, coef_y=None, coef_c=None,
               y_mean=None, scale=None, shift=None):
    """Weight gradient ``(C_out, C_in, R, S)`` (channels_last = KRSC memory, dtype of x).

    The A operand is ``dy`` (with the dBN prologue ``dy + y*coef_y + coef_c`` when ``y``
    is given; for fp32 / fp64 operands centred on ``y_mean``, y's per-channel mean,
    computed here when not given: ``(dy + coef_c + y_mean*coef_y) + (y - y_mean)*coef_y``,
    so that large means of y and dy cancel before the FMA), the B operand the im2col of
    ``x`` (with ``relu(x*scale + shift)`` recomputed when ``scale`` is given; padded taps
    are 0 after it). The reduction over
    the N*P*Q output pixels walks boxes of the output (TILE_N images x TILE_H x TILE_W =
    BLOCK_K pixels; a 1x1 stride-1 conv is one long row of N*H*W pixels), split over a
    grid axis into an fp32 (fp64) workspace summed in a fixed order. On sm_90 dy, y and
    x arrive by TMA (boxes of x per tap, as the forward's A_TMA 2/3); elsewhere through
    pointers.
    """
    n, co, p, q = dy.shape
    _, ci, h, w = x.shape
    co_w, ci_w, r, s = weight_shape
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    acc = _acc_dtype(x.dtype)
    gm, gn = co, r * s * ci
    _check_int32(GEMM_K=n * p * q, GEMM_N=gn)
    dbn = y is not None
    prologue = scale is not None
    # tap-major N tiles when the channels fill the smallest BLOCK_N (correct for any C)
    tap_n = ci % (_INTERPRETER_TILE[1] if INTERPRET else 64) == 0
    configs = wgrad_configs(stem=not tap_n, fused=dbn or prologue, gemm_m=co, channels=ci,
                            itemsize=x.element_size(), budget=smem_budget(x.device), dbn=dbn,
                            bn_relu=prologue)
    block_k = configs[0].kwargs["BLOCK_K"]
    dyv, xv = dy.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1)
    py = y if dbn else dy
    pyv = py.permute(0, 2, 3, 1)
    dense = all(t.is_contiguous() for t in (dyv, xv, pyv))
    # the pixel walk's shapes: a 1x1 stride-1 unpadded conv on dense tensors is one image
    # of one row of N*H*W pixels (no box wasted at the image edges), where that row's
    # offsets, column times channels, fit the pointer path's int32 math (else per image)
    flat = (dense and (r, s, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0)
            and n * p * q * max(co, ci) < _INDEX_LIMIT)
    shp = dict(n=1, p=1, q=n * p * q, h=1, w=n * h * w) if flat else dict(
        n=n, p=p, q=q, h=h, w=w)
    tile_n, tile_h, tile_w = pixel_box(shp["n"], shp["p"], shp["q"], block_k)
    # TMA (sm_90, dense NHWC, whole channel tiles of x): dy and y as boxes [TILE_N,
    # TILE_H, TILE_W, BLOCK_M]; x as a box per tap, stride 1 or the stride-2 view
    tma, dy_desc, py_desc, x_desc = 0, None, None, None
    if tap_n and dense and all(_tma_ok(t) for t in (dyv, xv, pyv)):
        if (sh, sw) == (1, 1):
            x_desc = _dense_desc(xv, (shp["n"], shp["h"], shp["w"], ci),
                                 (tile_n, tile_h, tile_w, 64))
            tma = 2
        elif (sh, sw) == (2, 2) and h % 2 == 0 and w % 2 == 0:
            x_desc = _dense_desc(xv, (n, h // 2, 2, w // 2, 2 * ci),
                                 (tile_n, tile_h, 1, tile_w, 64))
            tma = 3
        dy_box = (tile_n, tile_h, tile_w, 64)
        dy_desc = _dense_desc(dyv, (shp["n"], shp["p"], shp["q"], co), dy_box)
        py_desc = _dense_desc(pyv, (shp["n"], shp["p"], shp["q"], co), dy_box)
        if x_desc is None or dy_desc is None or py_desc is None:
            tma = 0
    tiles_k = (triton.cdiv(shp["n"], tile_n) * triton.cdiv(shp["p"], tile_h)
               * triton.cdiv(shp["q"], tile_w))
    if INTERPRET:
        splits = 2
    else:  # about two programs per SM, at least 8 K steps each
        out_tiles = triton.cdiv(gm, 128) * triton.cdiv(gn, 128)
        splits = max(1, min(2 * _sm_count(x.device.index or 0) // out_tiles,
                            triton.cdiv(tiles_k, 8)))
    tiles_per_split = triton.cdiv(tiles_k, splits)
    splits = triton.cdiv(tiles_k, tiles_per_split)
    part = torch.empty((splits, gm, gn), dtype=acc, device=x.device)
    d_str, x_str, p_str = _nhwc_strides(dy), _nhwc_strides(x), _nhwc_strides(py)
    if flat:  # one image, one row of dense pixels (size-1 dims may report any stride)
        d_str, x_str, p_str = (0, 0, co, 1), (0, 0, ci, 1), (0, 0, co, 1)
    centre = part
    if dbn and x.element_size() >= 4:  # the centred form (the kernel's DBN comment)
        if y_mean is None:
            y_mean = y.mean((0, 2, 3), dtype=acc)
        centre = y_mean.to(acc)
        coef_c = coef_c.to(torch.float64) + centre.to(torch.float64) * coef_y.to(
            torch.float64)
    if dbn:
        coef_c = coef_c.to(acc)
    mask_dy = wgrad_mask_dy(dbn, tma, (r, s, ph, pw) == (1, 1, 0, 0),
                            shp["p"] % tile_h or shp["q"] % tile_w, x.dtype == torch.float16)
    args = (dy, x, part, py, coef_y if dbn else part, coef_c if dbn else part, centre,
            scale if prologue else part, shift if prologue else part,
            dy_desc if tma else dy, py_desc if tma else dy, x_desc if tma else x,
            shp["h"], shp["w"], ci, shp["p"], shp["q"], co, r, s, sh, sw, ph, pw,
            *d_str, *x_str, *p_str, shp["n"], gm, gn, tiles_per_split)
    kwargs = dict(TAP_N=tap_n, TMA=tma, TILE_H=tile_h, TILE_W=tile_w, DBN=dbn, MASK_DY=mask_dy,
                  PROLOGUE=prologue, FLATTEN=FLATTEN_WGRAD, ACC_FP64=acc == torch.float64,
                  INPUT_PRECISION=_input_precision(x.dtype))

    def grid(meta):  # persistent: at most one program per SM over (tile, split) items
        n_tiles = (r * s * triton.cdiv(ci, meta["BLOCK_N"]) if tap_n
                   else triton.cdiv(gn, meta["BLOCK_N"]))
        return (min(triton.cdiv(gm, meta["BLOCK_M"]) * n_tiles * splits,
                    _persistent_programs(x)),)

    _launch(_wgrad_run, configs, grid, args, kwargs)
    # the partials summed in a fixed order (a deterministic reduction, no atomics)
    dw = part.sum(0) if splits > 1 else part[0]
    # (CO, R*S*CI) -> (CO, CI, R, S) view with KRSC memory
    return dw.view(co, r, s, ci).permute(0, 3, 1, 2).to(x.dtype)

"""The four primitives on the host emulation of the CUDA kernels (build/cuda_emu/libemu.so,
see build.py), called the way csrc/cuda/bn_cuda.cpp calls the launchers, on CPU tensors."""
import ctypes
import os

import torch

from fusedres import reference as ref

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
lib = ctypes.CDLL(os.environ.get("EMU_LIB", os.path.join(_ROOT, "build", "cuda_emu", "libemu.so")))
DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SMS = int(os.environ.get("EMU_SMS", "1"))
NULL = ctypes.c_void_p(0)


def P(t):
    return NULL if t is None or t.numel() == 0 else ctypes.c_void_p(t.data_ptr())


def A(vals):
    return (ctypes.c_int64 * 3)(*vals)


def st(t):
    return A((0, 0, 0) if t is None else t.stride())


def acc(x):
    return ref.acc_dtype(x.dtype)


def vec(v, x):
    assert v.dtype == acc(x) and v.shape == (x.shape[1],), (v.dtype, v.shape)
    return v.contiguous()


def _mask(m, x):
    if m is None or m.numel() == 0:
        return None
    assert m.dtype == torch.uint8 and m.numel() == (x.numel() + 7) // 8
    return m.contiguous()


def bn_stats(x, cl):
    c = x.shape[1]
    if x.numel() == 0:
        return (torch.full((c,), float("nan"), dtype=acc(x)),
                torch.full((c,), float("nan"), dtype=acc(x)))
    mean, var = torch.empty(c, dtype=acc(x)), torch.empty(c, dtype=acc(x))
    lib.emu_bn_stats(DT[x.dtype], P(x), st(x), A(x.shape), P(mean), P(var))
    return mean, var


def bn_apply(x, mean, scale, shift, res, x2, mean2, scale2, shift2, relu, save_mask, cl):
    assert not save_mask or relu
    n, c, s = x.shape
    mean, scale, shift = vec(mean, x), vec(scale, x), vec(shift, x)
    if x2 is None:
        mean2 = scale2 = shift2 = None
    else:
        mean2, scale2, shift2 = vec(mean2, x), vec(scale2, x), vec(shift2, x)
    for t in (res, x2):
        assert t is None or (t.shape == x.shape and t.dtype == x.dtype)
    out = ref.empty_ncs(n, c, s, cl, x.dtype, x.device)
    mask = torch.empty((x.numel() + 7) // 8 if save_mask else 0, dtype=torch.uint8)
    if x.numel():
        lib.emu_bn_apply(DT[x.dtype], P(x), st(x), P(mean), P(scale), P(shift), P(res), st(res),
                         P(x2), st(x2), P(mean2), P(scale2), P(shift2), int(relu), P(out), P(mask),
                         A(x.shape), int(cl), SMS)
    return out, mask


def bn_backward_reduce(dout, x, mean, scale, shift, mask, relu, cl):
    c = x.shape[1]
    mean, scale, shift = (vec(v, x) for v in (mean, scale, shift))
    m = _mask(mask, x)
    if x.numel() == 0:
        return torch.zeros(c, dtype=acc(x)), torch.zeros(c, dtype=acc(x))
    sg, sgx = torch.empty(c, dtype=acc(x)), torch.empty(c, dtype=acc(x))
    lib.emu_bn_backward_reduce(DT[x.dtype], P(dout), st(dout), P(x), st(x), P(mean), P(scale),
                               P(shift), P(m), int(relu), A(x.shape), int(cl), P(sg), P(sgx),
                               NULL, ctypes.c_double(0), 0)
    return sg, sgx


def bn_backward_apply(dout, x, mean, scale, shift, mask, cg, cxc, cc, relu, wres, cl):
    n, c, s = x.shape
    mean, scale, shift, cg, cxc, cc = (vec(v, x) for v in (mean, scale, shift, cg, cxc, cc))
    m = _mask(mask, x)
    dx = ref.empty_ncs(n, c, s, cl, x.dtype, x.device)
    dres = ref.empty_ncs(n, c, s, cl, x.dtype, x.device) if wres else torch.empty(0, dtype=x.dtype)
    if x.numel():
        lib.emu_bn_backward_apply(DT[x.dtype], P(dout), st(dout), P(x), st(x), P(mean), P(scale),
                                  P(shift), P(m), P(cg), P(cxc), P(cc), int(relu), P(dx),
                                  P(dres), A(x.shape), int(cl), SMS)
    return dx, dres


# ---- the per-channel steps of the CUDA pipeline (csrc/cuda/bn_cuda.cpp) ----------------

lib.emu_launches.restype = ctypes.c_longlong


PLAN_FIELDS = ("inner", "vec", "gx", "P", "tx", "ty", "per_part", "part_elems")


def reduce_plan(shape, strides, dtype=torch.bfloat16, backward=False) -> dict:
    """The launch geometry csrc/cuda/bn_kernels.cu's planner (plan_reduce) picks for a
    reduction over an (N, C, S) view with these strides and 16-byte-aligned pointers."""
    out = (ctypes.c_int64 * 8)()
    lib.emu_reduce_plan(DT[dtype], int(backward), A(strides), A(shape), out)
    return dict(zip(PLAN_FIELDS, out))


def launches() -> int:
    """Kernel launches the emulated launchers have made so far in this process."""
    return int(lib.emu_launches())


def _ptrs(*ts):
    return (ctypes.c_void_p * len(ts))(*(None if t is None else t.data_ptr() for t in ts))


def _finalize_outputs(like):
    return torch.empty_like(like), torch.empty_like(like), torch.empty_like(like)


def bn_stats_finalize(x, weight, bias, eps, cl):
    """As the CUDA op bn_stats_finalize: (mean, var, invstd, scale, shift)."""
    c = x.shape[1]
    mean, var = torch.empty(c, dtype=acc(x)), torch.empty(c, dtype=acc(x))
    inv, scale, shift = _finalize_outputs(mean)
    lib.emu_bn_stats_finalize(DT[x.dtype], P(x), st(x), A(x.shape), P(mean), P(var),
                              _ptrs(weight, bias, inv, scale, shift), ctypes.c_double(eps))
    return mean, var, inv, scale, shift


def bn_finalize(mean, var, weight, bias, eps):
    inv, scale, shift = _finalize_outputs(var)
    lib.emu_bn_finalize(int(var.dtype == torch.float64), P(var.contiguous()),
                        _ptrs(weight, bias, inv, scale, shift), ctypes.c_double(eps),
                        ctypes.c_int64(var.numel()))
    return inv, scale, shift


def bn_backward_reduce_finalize(dout, x, mean, scale, shift, mask, invstd, relu, cl, count,
                                training):
    c = x.shape[1]
    mean, scale, shift, invstd = (vec(v, x) for v in (mean, scale, shift, invstd))
    m = _mask(mask, x)
    out = [torch.empty(c, dtype=acc(x)) for _ in range(5)]
    lib.emu_bn_backward_reduce(DT[x.dtype], P(dout), st(dout), P(x), st(x), P(mean), P(scale),
                               P(shift), P(m), int(relu), A(x.shape), int(cl), P(out[0]),
                               P(out[1]), _ptrs(invstd, *out[2:]), ctypes.c_double(count),
                               int(training))
    return tuple(out)


def running_stats_update(rm, rv, mean, var, correction, momentum, nbt):
    lib.emu_running_stats_update(int(mean.dtype == torch.float64), P(rm), ctypes.c_int64(rm.stride(0)),
                                 P(rv), ctypes.c_int64(rv.stride(0)), P(mean), P(var),
                                 ctypes.c_double(correction), ctypes.c_double(momentum),
                                 NULL if nbt is None else ctypes.c_void_p(nbt.data_ptr()),
                                 ctypes.c_int64(mean.numel()))

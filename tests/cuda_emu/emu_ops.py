"""Host emulation of the CUDA ops: bn_kernels.cu compiled for the CPU (emu.h), driven
like bn_cuda.cpp does, on CPU tensors."""
import ctypes, math, os
import torch
from fusedres import reference as ref

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
lib = ctypes.CDLL(os.environ.get("EMU_LIB", os.path.join(_ROOT, "build", "cuda_emu", "libemu.so")))
DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SMS = int(os.environ.get("EMU_SMS", "1"))

def P(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() > 0 else 0) if t is not None else ctypes.c_void_p(0)

def A(vals):
    return (ctypes.c_int64 * 3)(*vals)

def st(t):
    return A(t.stride()) if t is not None else A((0, 0, 0))

def acc(x):
    return ref.acc_dtype(x.dtype)

def chk_vec(v, x):
    assert v.dtype == acc(x) and v.shape == (x.shape[1],), (v.dtype, v.shape)
    return v.contiguous()

def bn_stats(x, cl):
    c = x.shape[1]
    if x.numel() == 0:
        return torch.full((c,), float("nan"), dtype=acc(x)), torch.full((c,), float("nan"), dtype=acc(x))
    mean = torch.empty(c, dtype=acc(x)); var = torch.empty(c, dtype=acc(x))
    lib.emu_bn_stats(DT[x.dtype], P(x), st(x), A(x.shape), P(mean), P(var))
    return mean, var

def bn_apply(x, scale, shift, res, x2, scale2, shift2, relu, save_mask, cl):
    assert not save_mask or relu
    n, c, s = x.shape
    scale, shift = chk_vec(scale, x), chk_vec(shift, x)
    if x2 is not None:
        scale2, shift2 = chk_vec(scale2, x), chk_vec(shift2, x)
    for t in (res, x2):
        if t is not None:
            assert t.shape == x.shape and t.dtype == x.dtype
    out = ref.empty_ncs(n, c, s, cl, x.dtype, x.device)
    mask = torch.empty((x.numel() + 7) // 8 if save_mask else 0, dtype=torch.uint8)
    if x.numel() == 0:
        return out, mask
    lib.emu_bn_apply(DT[x.dtype], P(x), st(x), P(scale), P(shift), P(res), st(res), P(x2), st(x2),
                     P(scale2 if x2 is not None else None), P(shift2 if x2 is not None else None),
                     int(relu), P(out), P(mask) if save_mask else ctypes.c_void_p(0), A(x.shape), int(cl), SMS)
    return out, mask

def _mask(m, x):
    if m is None or m.numel() == 0:
        return None
    assert m.dtype == torch.uint8 and m.numel() == (x.numel() + 7) // 8
    return m.contiguous()

def bn_backward_reduce(dout, x, mean, scale, shift, mask, relu, cl):
    c = x.shape[1]
    mean, scale, shift = (chk_vec(v, x) for v in (mean, scale, shift))
    m = _mask(mask, x)
    if x.numel() == 0:
        return torch.zeros(c, dtype=acc(x)), torch.zeros(c, dtype=acc(x))
    sg = torch.empty(c, dtype=acc(x)); sgx = torch.empty(c, dtype=acc(x))
    lib.emu_bn_backward_reduce(DT[x.dtype], P(dout), st(dout), P(x), st(x), P(mean), P(scale), P(shift),
                               P(m), int(relu), A(x.shape), int(cl), P(sg), P(sgx))
    return sg, sgx

def bn_backward_apply(dout, x, mean, scale, shift, mask, cg, cxc, cc, relu, wres, cl):
    n, c, s = x.shape
    mean, scale, shift, cg, cxc, cc = (chk_vec(v, x) for v in (mean, scale, shift, cg, cxc, cc))
    m = _mask(mask, x)
    dx = ref.empty_ncs(n, c, s, cl, x.dtype, x.device)
    dres = ref.empty_ncs(n, c, s, cl, x.dtype, x.device) if wres else torch.empty(0, dtype=x.dtype)
    if x.numel() == 0:
        return dx, dres
    lib.emu_bn_backward_apply(DT[x.dtype], P(dout), st(dout), P(x), st(x), P(mean), P(scale), P(shift),
                              P(m), P(cg), P(cxc), P(cc), int(relu), P(dx), P(dres) if wres else ctypes.c_void_p(0),
                              A(x.shape), int(cl), SMS)
    return dx, dres

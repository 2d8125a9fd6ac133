"""Compile the kernels of kernels/bn.py for a GPU target without a GPU.

The interpreter accepts code the GPU compiler rejects (loop-carried type changes,
constexpr misuse...): this runs Triton's real pipeline (ttir -> ttgir -> llir -> ptx ->
cubin, with the ptxas shipped in the triton wheel) on every kernel, each constexpr switch
on and off, every config and dtype.  Nothing is launched.  Run in a process *without*
TRITON_INTERPRET (tests/test_triton_bn.py does it in a subprocess):

    python tests/triton_bn_compile.py [--arch 90] [--all]

It also reports whether the dense-path loads were vectorised (pointers and sizes
assumed 16-divisible, as the JIT specialises them at run time).
"""
import argparse
import importlib.util
import itertools
import os
import re
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter replaces the compiler")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

_spec = importlib.util.spec_from_file_location("_bn_compile_check", os.path.join(ROOT, "kernels", "bn.py"))
bn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bn)

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from static_triton import compile_kernel as _compile  # noqa: E402


# int arguments the JIT would see as multiples of 16 for usual ResNet shapes
_DIV16 = {"total", "S", "C", "N_CHUNK", "S_CHUNK", "stride_xn", "stride_xc", "stride_rn",
          "stride_rc", "stride_x2n", "stride_x2c", "stride_dn", "stride_dc", "stride_xs",
          "stride_rs", "stride_x2s", "stride_ds"}


def compile_kernel(fn, target, ptrs, consts, num_warps, ints64=()):
    return _compile(fn, ptrs, consts, num_warps, ints64=ints64, div16=_DIV16, target=target)


def _switches(names, exhaustive):
    combos = list(itertools.product([False, True], repeat=len(names)))
    if exhaustive is None:  # quick
        combos = [c for c in combos if sum(c) in (0, len(names))]
    elif not exhaustive:  # all off, all on, and each switch alone
        combos = [c for c in combos if sum(c) in (0, 1, len(names))]
    return [dict(zip(names, c)) for c in combos]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--all", action="store_true", help="every switch combination")
    ap.add_argument("--quick", action="store_true",
                    help="fp16 and fp64, one config per kernel, switches all off / all on")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    mode = None if args.quick else args.all
    count = 0
    vector_loads = {}
    dtypes = [("*fp16", tl.float32), ("*bf16", tl.float32), ("*fp32", tl.float32),
              ("*fp64", tl.float64)]
    if args.quick:
        dtypes = [dtypes[0], dtypes[3]]
    for dt, acc in dtypes:
        accp = "*fp64" if acc == tl.float64 else "*fp32"
        configs = bn._elementwise_configs() if args.all else bn._elementwise_configs()[:1]
        for cfg in configs:
            for sw in _switches(["HAS_RESIDUAL", "HAS_X2", "APPLY_RELU", "SAVE_MASK",
                                 "CHANNELS_LAST", "X_DENSE", "R_DENSE", "X2_DENSE", "WIDE", "BIG"],
                                mode):
                ptrs = dict(X_ptr=dt, R_ptr=dt, X2_ptr=dt, OUT_ptr=dt, MASK_ptr="*u8",
                            MEAN_ptr=accp, SCALE_ptr=accp, SHIFT_ptr=accp, MEAN2_ptr=accp,
                            SCALE2_ptr=accp, SHIFT2_ptr=accp)
                k = compile_kernel(bn._bn_apply_kernel, target, ptrs,
                                   dict(sw, ACC=acc, **cfg.kwargs), cfg.num_warps,
                                   ints64=("total",) if sw["WIDE"] or sw["BIG"] else ())
                count += 1
                if sw["X_DENSE"] and not sw["WIDE"]:
                    vector_loads[f"bn_apply {dt}"] = bool(re.search(r"ld\.global\.v\d", k.asm["ptx"]))
            for sw in _switches(["HAS_MASK", "APPLY_RELU", "NEED_DX", "WRITE_GRAD_RESIDUAL",
                                 "HAS_X2", "CHANNELS_LAST", "DOUT_DENSE", "X_DENSE",
                                 "X2_DENSE", "WIDE", "BIG"], mode):
                ptrs = {"DOUT_ptr": dt, "X_ptr": dt, "X2_ptr": dt, "DX_ptr": dt,
                        "DRES_ptr": dt, "DX2_ptr": dt, "MASK_ptr": "*u8", "*default": accp}
                compile_kernel(bn._bn_bwd_apply_kernel, target, ptrs,
                               dict(sw, ACC=acc, **cfg.kwargs), cfg.num_warps,
                               ints64=("total",) if sw["WIDE"] or sw["BIG"] else ())
                count += 1
        for cfg in bn._reduce_configs()[:1] if args.quick else bn._reduce_configs():
            for unit in ("stride_xs", "stride_xc"):  # NCHW / channels-last specialisation
                k = compile_kernel(bn._bn_stats_partial_kernel, target,
                                   {"X_ptr": dt, "X2_ptr": dt, "*default": accp},
                                   dict(ACC=acc, HAS_X2=False, **{unit: 1}, **cfg.kwargs),
                                   cfg.num_warps)
                count += 1
                vector_loads[f"bn_stats {dt} {unit}=1 {cfg.kwargs}"] = bool(
                    re.search(r"ld\.global\.v\d", k.asm["ptx"]))
            compile_kernel(bn._bn_stats_partial_kernel, target,
                           {"X_ptr": dt, "X2_ptr": dt, "*default": accp},
                           dict(ACC=acc, HAS_X2=True, **cfg.kwargs), cfg.num_warps)
            count += 1
            for sw in _switches(["HAS_MASK", "APPLY_RELU", "AFFINE_FROM_VAR", "HAS_W", "HAS_B",
                                 "HAS_X2", "CHANNELS_LAST"], None if args.quick else True):
                ptrs = {"DOUT_ptr": dt, "X_ptr": dt, "X2_ptr": dt, "MASK_ptr": "*u8",
                        "*default": accp}
                compile_kernel(bn._bn_bwd_reduce_partial_kernel, target, ptrs,
                               dict(sw, ACC=acc, **cfg.kwargs), cfg.num_warps)
                count += 1
        for cfg in bn._merge_configs()[:1] if args.quick else bn._merge_configs():
            for sw in _switches(["HAS_X2", "FROM_RUNNING", "SCALE_SHIFT", "HAS_W", "HAS_B",
                                 "HAS_W2", "HAS_B2"], mode):
                compile_kernel(bn._bn_stats_finalize_kernel, target, {"*default": accp},
                               dict(sw, ACC=acc, BLOCK_P=bn._MAX_PARTS, **cfg.kwargs),
                               cfg.num_warps)
                count += 1
            for sw in _switches(["HAS_X2", "HAS_W", "HAS_B", "WRITE_DW", "WRITE_DB", "HAS_W2",
                                 "HAS_B2", "WRITE_DW2", "WRITE_DB2", "COEFS", "COEFS2",
                                 "TRAINING"], mode):
                compile_kernel(bn._bn_bwd_finalize_kernel, target, {"*default": accp},
                               dict(sw, ACC=acc, BLOCK_P=bn._MAX_PARTS, **cfg.kwargs),
                               cfg.num_warps)
                count += 1
    scalar = sorted(k for k, v in vector_loads.items() if not v)
    print(f"compiled {count} kernel variants for sm_{args.arch}")
    print(f"vectorised loads: {sum(vector_loads.values())}/{len(vector_loads)} checked variants"
          + (f"; scalar: {scalar}" if scalar else ""))


if __name__ == "__main__":
    main()

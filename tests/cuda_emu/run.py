"""Runs the checks of tests/test_cuda_kernels.py on the host emulation of the CUDA
kernels (CPU tensors, no GPU): a way to check kernel index math, mask bits and merges
on a machine without a GPU. Slow (one std::thread per CUDA thread): small shapes.

    python tests/cuda_emu/build.py                 # build/cuda_emu/libemu.so
    PYTHONPATH=. python tests/cuda_emu/run.py [stats|apply|reduce|bapply|misc|grid|big|all]

EMU_SMS (default 1) is the SM count the elementwise launchers size their grid with: 1
makes every thread walk several chunks (the grid-stride odometer).
"""
import itertools
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import emu_ops  # noqa: E402
import test_cuda_kernels as T  # noqa: E402

T.DEVICE = "cpu"
T.OPS = emu_ops

D, L = T.DTYPES, T.LAYOUTS
SHAPES = [(2, 3, 5), (1, 65, 49), (4, 256, 1), (3, 1, 100), (2, 64, 24), (1, 1, 1), (2, 8, 64),
          (5, 16, 3)]
ODD = [(3, 7, 1000), (2, 65, 333), (5, 3, 4099), (1, 2051, 17)]
F32_BF16, F32_F16 = [torch.float32, torch.bfloat16], [torch.float32, torch.float16]
MIXED = [("nchw", "cl"), ("cl", "nchw"), ("cl", "strided")]

GROUPS = {
    "stats": [(T.test_bn_stats, [D, L, SHAPES]),
              # several row partitions (16-bit statistics take 1 step per thread, 32-bit 2)
              (T.test_bn_stats, [D, ["nchw", "cl"], ODD + [(4, 64, 300)]])],
    "apply": [
        (T.test_bn_apply_relu_mask, [D, L, SHAPES, [False, True]]),
        (T.test_bn_apply_variants, [D, ["nchw", "cl", "strided"],
                                    [(2, 3, 5), (1, 65, 9), (2, 16, 24)], list(T.VARIANTS),
                                    [False, True]]),
        (lambda d, lr: T.test_bn_apply_mixed_layouts(d, *lr), [F32_BF16, MIXED]),
    ],
    "reduce": [
        (T.test_bn_backward_reduce, [D, L, SHAPES, list(T.BWD_SOURCES)]),
        (T.test_bn_backward_reduce_mixed, [F32_F16, ["nchw", "cl"], ["nchw", "cl", "expanded"],
                                           [False, True]]),
    ],
    "bapply": [
        (T.test_bn_backward_apply, [D, L, SHAPES, list(T.BWD_SOURCES)]),
        (T.test_bn_backward_apply_mixed, [F32_BF16, ["nchw", "cl"], ["nchw", "cl", "expanded"],
                                          [False, True]]),
    ],
    "misc": [
        (T.test_nan_propagates, [D, ["nchw", "cl", "strided"]]),
        (T.test_empty, [[(0, 4, 5), (2, 4, 0), (2, 0, 5)]]),
        (T.test_bn_stats_large_mean, [["nchw", "cl", "s_major"]]),
    ],
    "grid": [
        (T.test_bn_apply_relu_mask, [D, ["nchw", "cl", "strided", "misaligned"], ODD,
                                     [False, True]]),
        (T._apply_case, [ODD, D, ["nchw", "cl"], ["res_relu_mask", "dual_res"], [False, True]]),
        (T.test_bn_backward_apply, [D, ["nchw", "cl", "s_major"], ODD, ["mask", "relu"]]),
        (T.test_bn_apply_grid_stride, [["nchw", "cl"], F32_F16]),
        (T.test_bn_backward_apply_grid_stride, [["nchw", "cl"]]),
    ],
    "big": [
        (T.test_bn_stats_many_partitions, [["nchw", "cl", "strided"]]),
        (T.test_bn_backward_reduce_many_partitions, [["nchw", "cl"]]),
        (T.test_deterministic, [F32_BF16, ["nchw", "cl", "s_major"]]),
    ],
}


def main(which):
    names = [n for n in GROUPS if n != "big"] if which == "all" else [which]
    cases = [(f, combo) for n in names for f, grid in GROUPS[n]
             for combo in itertools.product(*grid)]
    print(len(cases), "cases", flush=True)
    fails, t0 = 0, time.time()
    for f, combo in cases:
        try:
            f(*combo)
        except Exception as e:  # report every failure, keep going
            fails += 1
            print("FAIL", getattr(f, "__name__", "case"), combo, type(e).__name__, str(e)[:300],
                  flush=True)
    print(f"fails {fails} of {len(cases)} ({time.time() - t0:.0f}s)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "all"))

"""Builds the host emulation of csrc/cuda/bn_kernels.cu: build/cuda_emu/libemu.so.

The .cu is copied with each `kernel<<<grid, block, smem, stream>>>(args)` rewritten to
`emu::launch(&kernel, grid, block, smem, stream, args)` and compiled by g++ against the
CUDA headers with emu.h, which runs blocks one after another and the threads of a block
as std::threads (barriers for __syncthreads, an exchange buffer for warp shuffles).
"""
import importlib
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "build", "cuda_emu")


def cuda_include() -> str:
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", "/usr/local/cuda-13.0"):
        if base and os.path.exists(os.path.join(base, "include", "cuda_runtime.h")):
            return os.path.join(base, "include")
    sys.exit("no CUDA headers found (set CUDA_HOME)")


def build(lib_name: str = "libemu.so") -> str:
    os.makedirs(OUT, exist_ok=True)
    src = open(os.path.join(ROOT, "csrc", "cuda", "bn_kernels.cu")).read()
    src = src.replace('#include "cuda/bn_kernels.h"',
                      '#include "emu.h"\n#include "cuda/bn_kernels.h"')
    src, n = re.subn(r"(\w+<[^<>;]*>)\s*<<<([^;]*?)>>>\(([^;]*)\);",
                     r"emu::launch(&\1, \2, \3);", src)
    assert n > 0, "no kernel launches found"
    with open(os.path.join(OUT, "bn_kernels_emu.cpp"), "w") as f:
        f.write(src)
    lib = os.path.join(OUT, lib_name)
    cmd = ["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-I" + cuda_include(),
           "-I" + os.path.join(ROOT, "csrc"), "-I" + HERE, "-I" + OUT,
           os.path.join(HERE, "emu_api.cpp"), "-o", lib]
    subprocess.run(cmd, check=True)
    return lib


def load_emu_ops(lib_name: str):
    """Builds lib_name and imports emu_ops.py on it (a module caches its first library):
    the module, or None where g++ or the CUDA headers are missing (callers skip)."""
    if shutil.which("g++") is None:
        return None
    try:
        lib = build(lib_name)
    except SystemExit:
        return None
    os.environ["EMU_LIB"] = lib
    return importlib.import_module("emu_ops")


if __name__ == "__main__":
    print(build(*sys.argv[1:]))

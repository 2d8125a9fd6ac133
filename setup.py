"""Build fusedres._C: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA
build and nvcc is found (no GPU is needed to compile them). Prints what it built.

Environment:
  FUSEDRES_NO_CUDA=1      build the CPU kernels only
  TORCH_CUDA_ARCH_LIST    defaults to "8.0;9.0" (torch's builder fails without a GPU
                          when it is unset)
  MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import sys

from setuptools import setup


def _find_cuda_home():
    """The toolkit folder that has headers: the nvcc on PATH may be a wrapper script."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for path in candidates:
        if path and os.path.exists(os.path.join(path, "include", "cuda_runtime.h")) \
                and os.path.exists(os.path.join(path, "bin", "nvcc")):
            return path
    return None


cuda_home = _find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
rel = lambda pattern: sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, pattern)))  # noqa: E731

cpu_sources = ["csrc/ops.cpp", "csrc/bn_fused.cpp"] + rel("csrc/cpu/*.cpp")
cuda_sources = rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
with_cuda = (torch.version.cuda is not None and cuda_home is not None
             and os.environ.get("FUSEDRES_NO_CUDA", "0") != "1" and bool(cuda_sources))

cxx_flags = ["-O3"]  # torch adds the C++ standard it needs (c++17 or c++20)
if sys.platform.startswith("linux"):
    cxx_flags.append("-fopenmp")
extra = {"cxx": cxx_flags}
include_dirs = [os.path.join(here, "csrc")]
if with_cuda:
    # cusparse.h and friends (needed by ATen/cuda/CUDAContext.h) ship in torch's
    # nvidia-* wheels, not in every toolkit.
    import site
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        for sub in ("nvidia/cu13/include", "nvidia/cusparse/include", "nvidia/cublas/include"):
            if os.path.isdir(os.path.join(base, sub)):
                include_dirs.append(os.path.join(base, sub))
    extra["cxx"].append("-DFUSEDRES_WITH_CUDA")
    extra["nvcc"] = ["-O3", "-lineinfo", "-DFUSEDRES_WITH_CUDA"]
    ext = CUDAExtension("fusedres._C", cpu_sources + cuda_sources, include_dirs=include_dirs,
                        extra_compile_args=extra, extra_link_args=["-fopenmp"])
else:
    ext = CppExtension("fusedres._C", cpu_sources, include_dirs=include_dirs,
                       extra_compile_args=extra, extra_link_args=["-fopenmp"])

if with_cuda:
    why = f"CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
    print(f"fusedres setup: building CPU + CUDA kernels ({why})", flush=True)
else:
    why = ("FUSEDRES_NO_CUDA=1" if os.environ.get("FUSEDRES_NO_CUDA") == "1" else
           "torch is not a CUDA build" if torch.version.cuda is None else
           "no CUDA toolkit found" if cuda_home is None else "no CUDA sources")
    print(f"fusedres setup: building CPU kernels only ({why})", flush=True)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

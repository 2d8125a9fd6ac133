"""Build fusedres._C: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA
build and nvcc is found (no GPU is needed to compile them). Prints what it built.

The CUDA kernels are built by default only where a GPU is visible (torch sees one):
compiling them for a machine that cannot run them costs minutes for nothing.

Environment:
  FUSEDRES_BUILD_CUDA=1   build the CUDA kernels even without a GPU (CI, wheels for
                          GPU machines; needs a CUDA build of torch and nvcc)
  FUSEDRES_NO_CUDA=1      build the CPU kernels only, even where a GPU is visible
  TORCH_CUDA_ARCH_LIST    defaults to "8.0;9.0" without a GPU (torch's builder fails
                          when it is unset and no GPU is present); with a GPU, torch's
                          own default (the visible GPUs' architectures)
  MAX_JOBS                parallel compile jobs (ninja)
  FUSEDRES_CUDNN_FRONTEND_INCLUDE
                          the folder holding cudnn_frontend.h (header-only cudnn-frontend).
                          Default: .gl/cudnn_frontend-*/include (scripts/setup.sh extracts
                          the pinned nvidia-cudnn-frontend wheel there), then a pip-installed
                          nvidia-cudnn-frontend (site-packages/include). With it and cuDNN's
                          own headers (torch's nvidia-cudnn wheel), the CUDA build adds the
                          cuDNN graph path (csrc/cuda/cudnn_graph.cpp); without, it says so.
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


def _find_cudnn_graph_deps():
    """``(frontend include, cudnn include, cudnn lib)`` for the cuDNN graph path, or why
    not (a string)."""
    import site

    env = os.environ.get("FUSEDRES_CUDNN_FRONTEND_INCLUDE")
    bases = site.getsitepackages() + [site.getusersitepackages()]
    candidates = ([env] if env else []) + sorted(
        glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".gl",
                               "cudnn_frontend-*", "include")), reverse=True) + [
        os.path.join(b, "include") for b in bases]
    frontend = next((c for c in candidates if os.path.exists(os.path.join(c, "cudnn_frontend.h"))),
                    None)
    if frontend is None:
        return ("no cudnn_frontend.h: scripts/setup.sh fetches the pinned nvidia-cudnn-frontend "
                "headers into .gl/, or set FUSEDRES_CUDNN_FRONTEND_INCLUDE")
    for b in bases:
        inc, lib = (os.path.join(b, "nvidia", "cudnn", sub) for sub in ("include", "lib"))
        if os.path.exists(os.path.join(inc, "cudnn.h")) \
                and os.path.exists(os.path.join(lib, "libcudnn.so.9")):
            return frontend, inc, lib
    return "no cudnn.h + libcudnn.so.9 in site-packages/nvidia/cudnn (torch's nvidia-cudnn wheel)"


cuda_home = _find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
rel = lambda pattern: sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, pattern)))  # noqa: E731

cpu_sources = ["csrc/ops.cpp", "csrc/bn_fused.cpp"] + rel("csrc/cpu/*.cpp")
cuda_sources = rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
cudnn_graph_sources = rel("csrc/cuda/cudnn_*.cpp")  # only with the cudnn-frontend headers
cuda_sources = [s for s in cuda_sources if s not in cudnn_graph_sources]
gpu_visible = torch.version.cuda is not None and torch.cuda.is_available()
asked = os.environ.get("FUSEDRES_BUILD_CUDA", "0") == "1"
with_cuda = (torch.version.cuda is not None and cuda_home is not None
             and os.environ.get("FUSEDRES_NO_CUDA", "0") != "1" and bool(cuda_sources)
             and (gpu_visible or asked))
if with_cuda and not gpu_visible:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

cxx_flags = ["-O3"]  # torch adds the C++ standard it needs (c++17 or c++20)
link_flags = ["-fopenmp"]
if sys.platform.startswith("linux"):
    cxx_flags.append("-fopenmp")
    # libstdc++ from the shared library, even where the compiler driver links it statically
    # (a g++ wrapper adding -static-libstdc++, as on the H200 image of 2026-12-04): a second,
    # static copy in _C beside the one torch loads breaks std::ostream's locale facets, so
    # every error message that prints a number crashed the process there (or lost the
    # number). Named before the driver's own -lstdc++, the shared one resolves everything.
    link_flags += ["-Wl,--push-state,--no-as-needed", "-lstdc++", "-Wl,--pop-state"]
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
    cudnn_graph = _find_cudnn_graph_deps()
    if isinstance(cudnn_graph, str):
        print(f"fusedres setup: no cuDNN graph path ({cudnn_graph})", flush=True)
    else:
        frontend_inc, cudnn_inc, cudnn_lib = cudnn_graph
        include_dirs += [frontend_inc, cudnn_inc]
        cuda_sources += cudnn_graph_sources
        extra["cxx"].append("-DFUSEDRES_WITH_CUDNN_GRAPH")
        # libcudnn.so.9 is the one torch loads (the wheel has no unversioned libcudnn.so).
        link_flags += [f"-L{cudnn_lib}", "-l:libcudnn.so.9"]
        print(f"fusedres setup: building the cuDNN graph path (cudnn-frontend {frontend_inc}, "
              f"cuDNN {cudnn_inc})", flush=True)
    extra["nvcc"] = ["-O3", "-lineinfo", "-DFUSEDRES_WITH_CUDA"]
    ext = CUDAExtension("fusedres._C", cpu_sources + cuda_sources, include_dirs=include_dirs,
                        extra_compile_args=extra, extra_link_args=link_flags)
else:
    ext = CppExtension("fusedres._C", cpu_sources, include_dirs=include_dirs,
                       extra_compile_args=extra, extra_link_args=link_flags)

if with_cuda:
    why = (f"CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST="
           f"{os.environ.get('TORCH_CUDA_ARCH_LIST', 'the visible GPUs')}")
    print(f"fusedres setup: building CPU + CUDA kernels ({why})", flush=True)
else:
    why = ("FUSEDRES_NO_CUDA=1" if os.environ.get("FUSEDRES_NO_CUDA") == "1" else
           "torch is not a CUDA build" if torch.version.cuda is None else
           "no CUDA toolkit found" if cuda_home is None else
           "no GPU visible; FUSEDRES_BUILD_CUDA=1 builds them anyway" if not gpu_visible
           else "no CUDA sources")
    print(f"fusedres setup: building CPU kernels only ({why})", flush=True)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

#!/usr/bin/env bash
# Sets up a development environment from a clean clone: .venv with the pinned torch
# (2.14.1, CUDA build: it runs on CPU machines too) and torchvision, the build and test
# tools, and fusedres itself (editable; builds fusedres._C: C++ CPU kernels always, CUDA
# kernels where a GPU is visible or FUSEDRES_BUILD_CUDA=1 asks for them). Safe to run
# again: it only does what is missing, and says what it is doing as it goes. About 6
# minutes on a fresh idle 2-core machine with the packages in the local cache (installs
# ~1-2, the CPU kernels ~2-3 of the rest; the CUDA kernels add ~3 more per architecture);
# 16 min 19 s (MAX_JOBS=1) on the same 2-vCPU VM shared with five other builds and test
# runs (2026-12-06).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
t0=$(date +%s)
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
echo "[setup] installing torch 2.14.1, torchvision 0.29.1 and the build/test tools (timm: for its ResNets in the tests)"
.venv/bin/python -m pip install -q --disable-pip-version-check \
    torch==2.14.1 torchvision==0.29.1 ninja pybind11 pytest pytest-benchmark numpy timm tqdm expecttest \
    2> >(grep -v "^WARNING: Location 'file:" >&2)
echo "[setup] packages ready after $(( $(date +%s) - t0 )) s"
# The cuDNN graph path (csrc/cuda/cudnn_graph.cpp) compiles against the header-only
# cudnn-frontend C++ API: its headers are taken from the pinned nvidia-cudnn-frontend wheel
# (never copied into the repository), extracted into the ignored .gl/ where setup.py finds
# them. Without them (no network, no wheel) the build goes on without that path.
CUDNN_FE_VERSION=1.32.0
fe_dir=.gl/cudnn_frontend-$CUDNN_FE_VERSION
if [ ! -f "$fe_dir/include/cudnn_frontend.h" ]; then
    mkdir -p .gl
    if .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps \
            "nvidia-cudnn-frontend==$CUDNN_FE_VERSION" -d .gl 2>/dev/null && \
            .venv/bin/python -c "
import glob, sys, zipfile
whl = sorted(glob.glob('.gl/nvidia_cudnn_frontend-$CUDNN_FE_VERSION-*.whl'))[-1]
with zipfile.ZipFile(whl) as z:
    z.extractall('$fe_dir', [n for n in z.namelist() if n.startswith('include/')])
"; then
        echo "[setup] cudnn-frontend $CUDNN_FE_VERSION headers in $fe_dir/include"
    else
        echo "[setup] cudnn-frontend headers not fetched: the build has no cuDNN graph path"
    fi
fi
# Once a GPU's cuDNN device properties are committed (benchmarks/cudnn_device_properties/),
# tests/test_cudnn_deviceless.py checks the planned graphs with the same wheel's Python
# graph API: installed --no-deps (its kernel libraries' dependencies are not needed there).
if ls benchmarks/cudnn_device_properties/*.json > /dev/null 2>&1 && \
        ! .venv/bin/python -c "import cudnn" 2> /dev/null; then
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
        .gl/nvidia_cudnn_frontend-$CUDNN_FE_VERSION-*.whl \
        || echo "[setup] cudnn-frontend Python package not installed: deviceless checks skip"
fi
mkdir -p build
# What decides the build: rebuild when it changes (a CPU-only .so does not satisfy a
# FUSEDRES_BUILD_CUDA=1 run, and the other way round).
config="FUSEDRES_BUILD_CUDA=${FUSEDRES_BUILD_CUDA:-0} FUSEDRES_NO_CUDA=${FUSEDRES_NO_CUDA:-0} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}"
so=$(ls fusedres/_C*.so 2>/dev/null | head -n 1 || true)
if [ -n "$so" ] && [ -x .venv/bin/fusedres-bench ] && \
        [ "$(cat build/setup.config 2>/dev/null)" = "$config" ] && \
        [ -z "$(find csrc setup.py pyproject.toml -newer "$so" -type f 2>/dev/null)" ]; then
    echo "[setup] fusedres._C is up to date ($so)"
else
echo "[setup] building fusedres (fusedres._C: $config) -- minutes on 2 cores; log: build/setup.log"
MAX_JOBS=${MAX_JOBS:-$(nproc)} .venv/bin/python -m pip install -v --disable-pip-version-check \
    --no-deps --no-build-isolation -e . > build/setup.log 2>&1 &
build_pid=$!
# Progress while it builds: each compile step ninja reports ("[k/N] ... -c <source>"),
# and a line every minute when nothing new shows up
last=""; quiet=0
while kill -0 "$build_pid" 2>/dev/null; do
    sleep 5
    step=$(grep -E '^ *\[[0-9]+/[0-9]+\] ' build/setup.log 2>/dev/null | tail -n 1 |
           sed -E 's/^ *(\[[0-9]+\/[0-9]+\]).* -c ([^ ]*\/)?([^ /]+\.(cpp|cu)) .*/\1 \3/; t; s/^ *(\[[0-9]+\/[0-9]+\]) .*/\1/' || true)
    quiet=$((quiet + 5))
    if [ -n "$step" ] && [ "$step" != "$last" ]; then
        echo "[setup]   compiled $step ($(( $(date +%s) - t0 )) s)"; last=$step; quiet=0
    elif [ "$quiet" -ge 60 ]; then
        echo "[setup]   still building ($(( $(date +%s) - t0 )) s)"; quiet=0
    fi
done
if ! wait "$build_pid"; then
    tail -n 40 build/setup.log
    echo "[setup] building fusedres failed; the whole log is build/setup.log" >&2
    exit 1
fi
echo "$config" > build/setup.config
grep -h "fusedres setup:" build/setup.log | sort -u || true
fi
# The CPU kernels always build: a missing cpu backend is a broken build, not a skip.
.venv/bin/python -c "
import fusedres
b = fusedres.available_backends()
print('[setup] fusedres backends usable here:', b)
assert 'cpu' in b, f'fusedres._C did not load: {fusedres.extension_error}'
" 2> >(grep -v "cpp_extension.py.*No CUDA runtime" >&2)
echo "[setup] done in $(( $(date +%s) - t0 )) s"

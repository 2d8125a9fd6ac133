#!/usr/bin/env bash
# The Triton kernels under the GPU image's stack (python 3.12, torch 2.11, triton 3.6),
# checked without a GPU (docs/triton_conv.md, "Triton 3.6"): (a) every specialisation of
# scripts/static_triton.py compiled for sm_90a by triton 3.6, table in
# benchmarks/static/triton-3.6/ (or $OUT); (b) tests/test_conv.py and
# tests/test_triton_bn.py in the interpreter (fusedres._C is built for .venv's python and
# torch, so it is not loaded there: the Triton kernels need none of it).
#   bash scripts/triton36_check.sh [VENV]     (default VENV: .venv-triton36)
# Creates VENV when missing: ~4.7 GB (the PyPI torch 2.11 wheel pulls its CUDA libraries),
# a few minutes. numpy < 2.4: triton 3.6's interpreter turns a 1-element array into an
# int with int(), which numpy 2.4 refuses. The static run takes ~8 min, the tests ~4 min
# on 2 shared cores. Not run in CI (over its budget for a second stack); CI checks the
# committed table instead: it records the digests of the kernel sources it was compiled
# from, and tests/test_static_triton.py fails when they changed or a bar row misses the
# bar under 3.6. So after a kernel change, rerun this and commit benchmarks/static/triton-3.6/.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-triton36}
PY312=${PYTHON312:-python3.12}
if [ ! -x "$VENV/bin/python" ]; then
    echo "[triton36] creating $VENV with $($PY312 --version)"
    "$PY312" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        "torch==2.11.*" "triton==3.6.*" "numpy<2.4" pytest hypothesis
fi
"$VENV/bin/python" -c "import torch, triton; print('[triton36] torch', torch.__version__, 'triton', triton.__version__)"
echo "[triton36] (a) static compile for sm_90a"
rc=0
"$VENV/bin/python" scripts/static_triton.py --out "${OUT:-benchmarks/static/triton-3.6}" || rc=$?
echo "[triton36] (b) interpreter tests"
PYTHONPATH=$PWD "$VENV/bin/python" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
    tests/test_conv.py tests/test_triton_bn.py || rc=$?
exit $rc

#!/usr/bin/env bash
# Runs the test suite (CPU; Triton kernels through TRITON_INTERPRET=1 when no GPU is
# present; CUDA tests run only where a GPU is). Sets the environment up first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"

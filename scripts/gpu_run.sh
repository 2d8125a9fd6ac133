#!/usr/bin/env bash
# Build, test and benchmark fusedres on a fresh H100/H200 with no network.
#
#   OUT=/some/dir bash scripts/gpu_run.sh STEP      (from the repository root)
#
# STEP: build  pip install -e . (CUDA kernels for sm_90) + pytest tests -m "not slow"
#       ops    fusedres-bench ops + conv  (bf16, channels_last; JSON, markdown, log)
#       train  fusedres-bench blocks + train
#       all    the three above, in order (each fits in 9 minutes; "all" needs ~25)
#       report regenerate benchmarks/RESULTS.md from benchmarks/results/*/
# Results go to $OUT/<gpu>-<date>/ (e.g. $OUT/h100-2026-11-23/); copy that folder to
# benchmarks/results/ and commit it, then run `fusedres-bench report`.
#
# Each step works on a bare machine: it builds the extension first when `import
# fusedres._C` fails (the build is kept between steps of one machine). Knobs:
# PYTHON (default: python3), FUSEDRES_BENCH_DTYPE (bfloat16), FUSEDRES_BENCH_BATCH
# (256), FUSEDRES_BENCH_ARGS (extra fusedres-bench options), STEP_SECONDS (530).
set -uo pipefail

STEP=${1:-all}
PY=${PYTHON:-python3}
: "${OUT:?set OUT to the folder that receives the results}"
STEP_SECONDS=${STEP_SECONDS:-530}
DTYPE=${FUSEDRES_BENCH_DTYPE:-bfloat16}
BATCH=${FUSEDRES_BENCH_BATCH:-256}
EXTRA=${FUSEDRES_BENCH_ARGS:-}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # never benchmark or test the interpreter on a GPU machine

cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT"

gpu_tag() {
    # "NVIDIA H100 80GB HBM3" -> h100, "NVIDIA H200" -> h200
    local name
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    [ -z "$name" ] && name=$("$PY" -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null)
    echo "$name" | tr 'A-Z' 'a-z' | grep -oE '[a-z][0-9]{2,4}[a-z]*' | head -1 || echo gpu
}
TAG="$(gpu_tag)"; TAG=${TAG:-gpu}
RES="$OUT/${TAG}-$(date -u +%Y-%m-%d)"
mkdir -p "$RES"
export FUSEDRES_GIT_COMMIT=${FUSEDRES_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo -dirty)}

log() { echo "[gpu_run $(date -u +%H:%M:%S)] $*" | tee -a "$RES/gpu_run.log"; }

build() {
    log "build: pip install -e . (TORCH_CUDA_ARCH_LIST=9.0)"
    local nvcc_home
    if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
        nvcc_home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
        [ -f "$nvcc_home/include/cuda_runtime.h" ] && export CUDA_HOME="$nvcc_home"
    fi
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout $((STEP_SECONDS - 120)) \
        "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . \
        > "$RES/build.log" 2>&1
    local rc=$?
    tail -5 "$RES/build.log" | tee -a "$RES/gpu_run.log"
    log "build rc=$rc; backends: $("$PY" -c 'import fusedres; print(fusedres.available_backends())' 2>&1 | tail -1)"
    return $rc
}

ensure_built() {
    "$PY" -c 'import fusedres._C' 2>/dev/null || build || log "build failed: benchmarking what imports"
}

tests() {
    log "tests: pytest tests -m 'not slow'"
    timeout 300 "$PY" -m pytest tests -m "not slow" -q -x --junitxml="$RES/junit.xml" \
        > "$RES/pytest.log" 2>&1
    local rc=$?
    tail -15 "$RES/pytest.log" | tee -a "$RES/gpu_run.log"
    log "tests rc=$rc"
}

bench() {  # bench NAME BUDGET_SECONDS SUBCOMMAND [options]
    local name=$1 budget=$2; shift 2
    log "bench $name: fusedres-bench $* (budget ${budget}s)"
    # The internal budget stops starting cases; timeout is the backstop. The JSON is
    # rewritten after each provider, so a killed run still leaves its rows.
    timeout $((budget + 90)) "$PY" -m fusedres.bench "$@" --dtype "$DTYPE" \
        --batch-size "$BATCH" --time-budget "$budget" --json "$RES/$name.json" \
        --markdown "$RES/$name.md" --plot "$RES/$name.png" $EXTRA > "$RES/$name.log" 2>&1
    local rc=$?
    tail -8 "$RES/$name.log" | tee -a "$RES/gpu_run.log"
    log "bench $name rc=$rc"
}

step_build() { build; tests; }
step_ops() {
    ensure_built
    bench ops 200 ops --max-autotune
    bench conv 170 conv
}
step_train() {
    ensure_built
    bench blocks 120 blocks
    bench train 230 train
}

START=$(date +%s)
case "$STEP" in
    build) step_build ;;
    ops) step_ops ;;
    train) step_train ;;
    all) step_build; step_ops; step_train ;;
    report) "$PY" -m fusedres.bench report ;;
    *) echo "usage: OUT=DIR bash scripts/gpu_run.sh build|ops|train|all|report" >&2; exit 2 ;;
esac
log "step $STEP done in $(( $(date +%s) - START )) s; results in $RES"
ls -la "$RES"

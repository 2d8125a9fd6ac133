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
# Results go to $OUT/<gpu>-<date>/ (e.g. $OUT/h100-2026-11-23/): per step gpu_run.log
# (everything printed) and NAME.json/.md/.png per benchmark (build: junit.xml), at most
# 7 files a step. Copy that folder to benchmarks/results/ and commit it, then run
# `fusedres-bench report` (or this script's `report` step) to regenerate
# benchmarks/RESULTS.md.
#
# The device machine gets a copy of the working tree without .git: pass the commit,
#   FUSEDRES_GIT_COMMIT=$(git rev-parse HEAD) OUT=... bash scripts/gpu_run.sh ops
# so every row records it (otherwise `git rev-parse` is tried, then "unknown").
#
# Each step works on a bare machine: it builds the extension first when `import
# fusedres._C` fails (the build is kept between steps of one machine). Knobs:
# PYTHON (default: python3), FUSEDRES_BENCH_DTYPE (bfloat16), FUSEDRES_BENCH_BATCH
# (256), FUSEDRES_BENCH_ARGS (extra fusedres-bench options), STEP_SECONDS (530),
# SKIP_BUILD=1 (ops/train: do not build even when fusedres._C does not import).
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
if [ -z "${FUSEDRES_GIT_COMMIT:-}" ] && sha=$(git rev-parse HEAD 2>/dev/null); then
    git diff --quiet HEAD 2>/dev/null || sha="$sha-dirty"
    export FUSEDRES_GIT_COMMIT="$sha"
fi

START=$(date +%s)
log() { echo "[gpu_run $(date -u +%H:%M:%S)] $*" | tee -a "$RES/gpu_run.log"; }

elapsed() { echo $(( $(date +%s) - START )); }

build() {
    log "build: pip install -e . (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16)"
    local nvcc_home
    if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
        nvcc_home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
        [ -f "$nvcc_home/include/cuda_runtime.h" ] && export CUDA_HOME="$nvcc_home"
    fi
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout $((STEP_SECONDS - 150)) \
        "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . \
        >> "$RES/gpu_run.log" 2>&1
    local rc=$?
    log "build rc=$rc in $(elapsed) s; backends: $("$PY" -c 'import fusedres; print(fusedres.available_backends())' 2>&1 | tail -1)"
    return $rc
}

ensure_built() {
    [ "${SKIP_BUILD:-0}" = 1 ] && { log "SKIP_BUILD=1: not building"; return 0; }
    "$PY" -c 'import fusedres._C' 2>/dev/null || build || log "build failed: benchmarking what imports"
}

tests() {
    local left=$((STEP_SECONDS - $(elapsed) - 10))
    [ "$left" -lt 60 ] && left=60
    log "tests: pytest tests -m 'not slow' (timeout ${left}s)"
    timeout "$left" "$PY" -m pytest tests -m "not slow" -q -ra --junitxml="$RES/junit.xml" \
        >> "$RES/gpu_run.log" 2>&1
    log "tests rc=$? in $(elapsed) s"
}

bench() {  # bench NAME BUDGET_SECONDS SUBCOMMAND [options]
    local name=$1 budget=$2; shift 2
    log "bench $name: fusedres-bench $* (budget ${budget}s)"
    # The budget stops starting new cases (compile providers come last, so they are
    # the ones cut); timeout is the backstop. The JSON is rewritten after each
    # provider, so a killed run still leaves its rows.
    timeout $((budget + 55)) "$PY" -m fusedres.bench "$@" --dtype "$DTYPE" \
        --batch-size "$BATCH" --time-budget "$budget" --json "$RES/$name.json" \
        --markdown "$RES/$name.md" --plot "$RES/$name.png" $EXTRA >> "$RES/gpu_run.log" 2>&1
    log "bench $name rc=$? in $(elapsed) s"
}

step_build() { build; tests; }
# Budgets split what is left of the step after the (re)build: a fresh machine builds
# first. Each bench gets its share minus 60 s for the case in flight and the outputs.
share() {  # share PERCENT: that percentage of the seconds left, minus 60
    local b=$(( (STEP_SECONDS - $(elapsed)) * $1 / 100 - 60 ))
    [ "$b" -lt 30 ] && b=30
    echo "$b"
}
step_ops() {
    ensure_built
    bench ops "$(share 60)" ops --max-autotune
    bench conv "$(share 100)" conv
}
step_train() {
    ensure_built
    bench blocks "$(share 30)" blocks
    bench train "$(share 100)" train
}

case "$STEP" in
    build) step_build ;;
    ops) step_ops ;;
    train) step_train ;;
    all) step_build; START=$(date +%s); step_ops; START=$(date +%s); step_train ;;
    report) "$PY" -m fusedres.bench report ;;
    *) echo "usage: OUT=DIR bash scripts/gpu_run.sh build|ops|train|all|report" >&2; exit 2 ;;
esac
log "step $STEP done in $(( $(date +%s) - START )) s; results in $RES"
ls -la "$RES"

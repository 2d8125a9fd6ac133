#!/usr/bin/env bash
# One GPU evidence command: on a fresh H100/H200 with no network, in ONE call of at most
# 8 minutes, build fusedres, check every kernel and time what matters, in order of value.
#
# Through the device tool (the machine gets a copy of the working tree without .git, so
# pass the commit; the tool brings back what is under $OUT):
#     run   command:   OUT=$OUT FUSEDRES_GIT_COMMIT=<git rev-parse HEAD> bash scripts/gpu_run.sh
#           timeout_s: 540
# Anywhere else:
#     OUT=DIR bash scripts/gpu_run.sh              the GPU run
#     OUT=DIR bash scripts/gpu_run.sh --dry-run    the same stages on the CPU, tiny shapes
#                                                  (also DRY_RUN=1; CI runs it:
#                                                  tests/test_gpu_run.py)
#     bash scripts/gpu_run.sh report [DIR...]      DIR/{ops,conv,train}.jsonl -> .json
#                                                  (default: every benchmarks/results/*/
#                                                  with such files), then `fusedres-bench
#                                                  report` regenerates benchmarks/RESULTS.md
#
# Stages, in this order (each one's output file is written as it goes, JSON lines flushed
# per row, so a call killed at any point still returns what it did):
#   facts   nvidia-smi query, driver, torch/triton/nvcc/cuDNN versions, the commit, which
#           optional packages are missing and what that skips             -> run.jsonl
#   build   pip install -e . (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16), in the background
#           (dry run: `setup.py --name`, which loads setup.py and builds nothing) -> build.log
#   smoke   meanwhile: every Triton BN kernel and conv mode against fusedres.reference on
#           small shapes, one config per kernel (scripts/gpu_smoke.py)   -> smoke.jsonl
#   conv    if the build is still running then: see below (it needs no extension)
#   doctor  `fusedres-bench doctor`, when this checkout has it             -> checks.log
#   tests   pytest -v of the test files marked cuda (-x off)  -> checks.log, checks.xml
#   ops     every fused BN op at every ResNet-50 BN shape, eager / CUDA / Triton: GB/s and
#           % of the device-copy bandwidth measured in the same stage  -> ops.jsonl
#   conv    forward of every ResNet-50 conv: Triton vs cuDNN, TFLOP/s    -> conv.jsonl
#   train   ResNet-50 training step, eager vs converted (fused BN CUDA kernels, cuDNN
#           convs): ms per step, images/s, peak memory                  -> train.jsonl
#           (scripts/gpu_bench.py: fusedres-bench's cases and CUDA-graph timer)
# One deadline for the whole call, DEADLINE_S (default 450 s; dry run 240 s) from the
# start. Each stage may run up to its own maximum, less what the stages after it need at
# least (so a slow stage leaves the later ones their minimum), never past the deadline;
# a stage that cannot get its minimum is recorded as skipped. At its cap a stage gets
# SIGINT (pytest then prints its summary and writes the JUnit file; the Python stages
# write a last line and stop), and SIGKILL 10 s later. run.jsonl has one line per stage:
# status ok | failed | timed_out | killed | skipped, exit code, seconds, cap, why.
# The summary (scripts/gpu_summary.py DIR, which also reprints it later) comes last.
#
# Results: $OUT/<gpu>-<date>/ (e.g. h100-2026-12-04/; dryrun-<date>/ for the dry run), at
# most 8 files (what the device tool brings back): run.jsonl build.log smoke.jsonl
# checks.log checks.xml ops.jsonl conv.jsonl train.jsonl. Commit that folder under
# benchmarks/results/ and run `bash scripts/gpu_run.sh report`.
#
# Knobs: PYTHON (python3), DEADLINE_S, MAX_<STAGE> (a stage's own maximum in s, e.g.
# MAX_TRAIN=200), STAGES (comma-separated subset of facts,build,
# smoke,doctor,tests,ops,conv,train; e.g. STAGES=ops,conv for a second call on a machine
# that already built), FUSEDRES_BENCH_BATCH (256), FUSEDRES_BENCH_DTYPE (bfloat16),
# OPS_PROVIDERS / CONV_PROVIDERS / TRAIN_PROVIDERS (eager, auto, tuned and fusedres
# backends, e.g. TRAIN_PROVIDERS=eager,auto,cuda; defaults in scripts/gpu_bench.py).
# Not assumed on the machine: torchvision (the repository's ResNet-50 is used), ninja (the
# build is then serial), timm, pytest-benchmark; pytest is needed for the tests stage.
set -uo pipefail

DRY=${DRY_RUN:-0}
MODE=run
REPORT_DIRS=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        report) MODE=report ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) if [ "$MODE" = report ]; then REPORT_DIRS+=("$arg")
           else echo "gpu_run.sh: unknown argument $arg (see --help)" >&2; exit 2; fi ;;
    esac
done
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ "$MODE" = report ]; then
    if [ ${#REPORT_DIRS[@]} -eq 0 ]; then
        for d in benchmarks/results/*/; do
            ls "$d"*.jsonl >/dev/null 2>&1 && REPORT_DIRS+=("${d%/}")
        done
    fi
    if [ ${#REPORT_DIRS[@]} -gt 0 ]; then
        "$PY" scripts/gpu_summary.py to-json "${REPORT_DIRS[@]}" || exit 1
    fi
    exec "$PY" -m fusedres.bench report
fi

: "${OUT:?set OUT to the folder that receives the results (the device tool sets it)}"
T0=$(date +%s)
if [ "$DRY" = 1 ]; then
    DEADLINE_S=${DEADLINE_S:-240}
    export TRITON_INTERPRET=1
    DRYFLAG=(--dry-run)
    # stage:  facts build smoke doctor tests ops conv train
    declare -A MAX=([facts]=60 [build]=90 [smoke]=120 [doctor]=60 [tests]=90 [ops]=60
                    [conv]=60 [train]=90)
    declare -A MIN=([facts]=3 [build]=3 [smoke]=5 [doctor]=3 [tests]=5 [ops]=5 [conv]=5
                    [train]=10)
    FINAL_S=5 KILL_S=5 MARGIN_S=5
else
    DEADLINE_S=${DEADLINE_S:-450}
    unset TRITON_INTERPRET  # never test or time the interpreter on a GPU machine
    DRYFLAG=()
    declare -A MAX=([facts]=45 [build]=300 [smoke]=150 [doctor]=120 [tests]=90 [ops]=120
                    [conv]=90 [train]=120)
    declare -A MIN=([facts]=10 [build]=60 [smoke]=30 [doctor]=10 [tests]=30 [ops]=40
                    [conv]=30 [train]=60)
    FINAL_S=15 KILL_S=10 MARGIN_S=15
fi
for s in facts build smoke doctor tests ops conv train; do  # MAX_TRAIN=200 etc. override
    knob="MAX_${s^^}"
    [ -n "${!knob:-}" ] && MAX[$s]=${!knob}
done
BENCH_ARGS=()
[ -n "${FUSEDRES_BENCH_BATCH:-}" ] && BENCH_ARGS+=(--batch "$FUSEDRES_BENCH_BATCH")
[ -n "${FUSEDRES_BENCH_DTYPE:-}" ] && BENCH_ARGS+=(--dtype "$FUSEDRES_BENCH_DTYPE")
ALL_STAGES="facts build smoke doctor tests ops conv train"
STAGES=${STAGES:-${ALL_STAGES// /,}}
PLAN=""  # stages still to start, in order: what later stages reserve
for s in $ALL_STAGES; do
    case ",$STAGES," in *",$s,"*) PLAN="$PLAN $s" ;; esac
done

# The python that holds torch may live in a venv whose bin/ (ninja) is not on PATH.
PYBIN=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))' 2>/dev/null)
[ -n "$PYBIN" ] && export PATH="$PATH:$PYBIN"
if [ -z "${FUSEDRES_GIT_COMMIT:-}" ] && sha=$(git rev-parse HEAD 2>/dev/null); then
    git diff --quiet HEAD 2>/dev/null || sha="$sha-dirty"
    export FUSEDRES_GIT_COMMIT="$sha"
fi

gpu_tag() {  # "NVIDIA H100 80GB HBM3" -> h100, "NVIDIA H200" -> h200
    local name
    name=$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    echo "$name" | tr 'A-Z' 'a-z' | grep -oE '[a-z][0-9]{2,4}[a-z]*' | head -1
}
if [ "$DRY" = 1 ]; then TAG=dryrun; else TAG=$(gpu_tag); TAG=${TAG:-gpu}; fi
RES="$OUT/${TAG}-$(date -u +%Y-%m-%d)"
n=2
while [ -e "$RES" ]; do RES="$OUT/${TAG}-$(date -u +%Y-%m-%d)-$n"; n=$((n + 1)); done
mkdir -p "$RES" || exit 1
RUN="$RES/run.jsonl"

say() { echo "[gpu_run +$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( DEADLINE_S - ($(date +%s) - T0) )); }
in_plan() { case " $PLAN " in *" $1 "*) return 0 ;; esac; return 1; }
plan_drop() { PLAN=$(echo " $PLAN " | sed "s/ $1 / /; s/^ *//; s/ *$//"); }
json_str() {  # a shell string as the inside of a JSON string
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '%s' "$s" | tr '\n\t\r' '   '
}

record() {  # record STAGE STATUS RC WALL_S CAP_S REASON: one line of run.jsonl
    printf '{"kind": "stage", "stage": "%s", "status": "%s", "rc": %s, "wall_s": %s, "cap_s": %s, "left_s": %s, "reason": "%s"}\n' \
        "$1" "$2" "$3" "$4" "$5" "$(left)" "$(json_str "$6")" >> "$RUN"
    say "stage $1: $2 (rc $3, ${4} s of ${5} s)${6:+: $6}"
}

# stage_begin STAGE [PARALLEL_STAGE]: sets CAP, the seconds STAGE may run now: its
# maximum, less the minimum of every later stage still planned (but PARALLEL_STAGE, which
# runs beside it), never past the deadline. Returns 1 (and records the stage as skipped)
# when that is under the stage's minimum or the stage is not in STAGES.
stage_begin() {
    local stage=$1 parallel=${2:-} reserve=0 s avail
    if ! in_plan "$stage"; then
        record "$stage" skipped null 0 0 "not in STAGES=$STAGES"
        return 1
    fi
    plan_drop "$stage"
    for s in $PLAN; do [ "$s" != "$parallel" ] && reserve=$((reserve + MIN[$s])); done
    avail=$(( $(left) - FINAL_S - KILL_S ))
    CAP=$(( avail - reserve ))
    [ "$CAP" -lt "${MIN[$stage]}" ] && CAP=$avail  # then the later stages lose theirs
    [ "$CAP" -gt "${MAX[$stage]}" ] && CAP=${MAX[$stage]}
    if [ "$CAP" -lt "${MIN[$stage]}" ]; then
        record "$stage" skipped null 0 0 "deadline: $(left) s left of DEADLINE_S=$DEADLINE_S, the stage needs ${MIN[$stage]} s"
        return 1
    fi
    say "stage $stage: up to $CAP s ($(left) s left)"
    return 0
}

# stage_run STAGE LOG CMD...: CMD under CAP (SIGINT at the cap, SIGKILL KILL_S later),
# its output appended to LOG ("-": the console); records the outcome.
stage_run() {
    local stage=$1 log=$2 t rc status
    shift 2
    t=$(date +%s)
    if [ "$log" = - ]; then
        timeout -s INT -k "$KILL_S" "$CAP" "$@"
    else
        timeout -s INT -k "$KILL_S" "$CAP" "$@" >> "$log" 2>&1
    fi
    rc=$?
    case $rc in
        0) status=ok ;; 124) status=timed_out ;; 137) status=killed ;; *) status=failed ;;
    esac
    record "$stage" "$status" "$rc" $(( $(date +%s) - t )) "$CAP" "${NOTE:-}"
}

timed() {  # timed STAGE: a scripts/gpu_bench.py stage
    local providers=() knob
    knob="${1^^}_PROVIDERS"
    [ -n "${!knob:-}" ] && providers=(--providers "${!knob}")
    stage_begin "$1" || return 0
    stage_run "$1" - "$PY" scripts/gpu_bench.py "$1" --out "$RES/$1.jsonl" \
        --budget-s $((CAP - MARGIN_S)) "${DRYFLAG[@]}" "${BENCH_ARGS[@]}" "${providers[@]}"
}

say "fusedres GPU run$([ "$DRY" = 1 ] && echo " (dry run, CPU)"): DEADLINE_S=$DEADLINE_S, results in $RES"

# (a) machine facts
if stage_begin facts; then
    stage_run facts - "$PY" scripts/gpu_bench.py facts --out "$RUN" "${DRYFLAG[@]}"
fi

# (b) the extension build in the background, the Triton smoke test meanwhile
BUILD_PID=""
if stage_begin build smoke; then
    if [ "$DRY" = 1 ]; then
        stage_run build "$RES/build.log" "$PY" setup.py --name &
    else
        stage_run build "$RES/build.log" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
            "$PY" -m pip install -v --no-deps --no-build-isolation --no-index -e . &
    fi
    BUILD_PID=$!
fi
if stage_begin smoke build; then
    stage_run smoke - "$PY" scripts/gpu_smoke.py --out "$RES/smoke.jsonl" \
        --budget-s $((CAP - MARGIN_S)) "${DRYFLAG[@]}"
fi
if [ -n "$BUILD_PID" ] && kill -0 "$BUILD_PID" 2>/dev/null && in_plan conv; then
    say "the build is still running: the conv stage (no extension needed) runs meanwhile"
    NOTE="ran while the extension built (nvcc on the CPUs)" timed conv
    CONV_DONE=1
fi
if [ -n "$BUILD_PID" ]; then
    wait "$BUILD_PID"
    tail -n 3 "$RES/build.log" | sed 's/^/    build.log: /'
fi
if [ -n "$BUILD_PID" ] && [ "$(left)" -gt $((FINAL_S + KILL_S)) ]; then
    backends=$(timeout $(( $(left) - FINAL_S )) "$PY" -c 'import fusedres as f
print(",".join(f.available_backends()), "|", f.extension_error or "")' 2>/dev/null | tail -1)
    printf '{"kind": "backends", "backends": "%s"}\n' "$(json_str "$backends")" >> "$RUN"
    say "fusedres backends after the build: $backends"
fi

# (c) doctor, then the CUDA kernel tests
if stage_begin doctor; then
    if timeout 60 "$PY" -m fusedres.bench doctor --help > /dev/null 2>&1; then
        stage_run doctor "$RES/checks.log" "$PY" -m fusedres.bench doctor --verbose
        tail -n 5 "$RES/checks.log" | sed 's/^/    doctor: /'
    else
        record doctor skipped null 0 "$CAP" "fusedres-bench has no doctor subcommand here"
    fi
fi
if stage_begin tests; then
    mapfile -t CUDA_TESTS < <(grep -l "pytest.mark.cuda" tests/test_*.py)
    if ! "$PY" -c "import pytest" 2> /dev/null; then
        record tests skipped null 0 "$CAP" "pytest is not installed"
    elif [ ${#CUDA_TESTS[@]} -eq 0 ]; then
        record tests skipped null 0 "$CAP" "no test file is marked cuda"
    else
        NOTE="${CUDA_TESTS[*]}" stage_run tests "$RES/checks.log" "$PY" -m pytest -v -m cuda \
            -p no:cacheprovider --junitxml="$RES/checks.xml" "${CUDA_TESTS[@]}"
        tail -n 1 "$RES/checks.log" | sed 's/^/    pytest: /'
    fi
fi

# (d) memory-bound ops vs copy bandwidth, (e) conv forward, (f) training step
timed ops
[ -z "${CONV_DONE:-}" ] && timed conv
timed train

say "done in $(( $(date +%s) - T0 )) s of DEADLINE_S=$DEADLINE_S"
nfiles=$(find "$RES" -type f | wc -l)
[ "$nfiles" -gt 8 ] && say "WARNING: $nfiles files in $RES; the device tool brings back 8"
echo
timeout 60 "$PY" scripts/gpu_summary.py "$RES"
echo "results: $RES ($nfiles files: $(cd "$RES" && ls | tr '\n' ' '))"

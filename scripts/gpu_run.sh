#!/usr/bin/env bash
# One GPU evidence command: on a fresh H100/H200 with no network, in ONE call of at most
# 8 minutes, build fusedres, check every kernel and time what matters, in order of value.
#
# Through the device tool (the machine gets a copy of the working tree without .git, so
# pass the commit; the tool brings back what is under $OUT):
#     run   command:   OUT=$OUT FUSEDRES_GIT_COMMIT=<git rev-parse HEAD> bash scripts/gpu_run.sh
#           timeout_s: 540
#           carry:     [".gl/cudnn_frontend-1.32.0"]  (the cudnn-frontend headers that
#                      scripts/setup.sh extracted here; the GPU machine cannot fetch them,
#                      and without them the build has no cuDNN graph path: the doctor,
#                      the cuda tests and the train stage's cudnn-graph rows then say so)
#     a second call, after one that was cut short or ran out of time (copy what came back
#     to benchmarks/results/<gpu>-<date>/ first: it travels with the working tree):
#           OUT=$OUT FUSEDRES_GIT_COMMIT=... RESUME_FROM=benchmarks/results/<gpu>-<date> \
#               bash scripts/gpu_run.sh
#     (the checks and the finished train providers are skipped, the build too where the
#     machine still has it; ops and conv,
#     which the first call leaves to the second, run)
# Anywhere else:
#     OUT=DIR bash scripts/gpu_run.sh              the GPU run
#     OUT=DIR bash scripts/gpu_run.sh --dry-run    the same stages on the CPU, tiny shapes
#                                                  (also DRY_RUN=1; CI runs it:
#                                                  tests/test_gpu_run.py)
#     bash scripts/gpu_run.sh report [DIR...]      DIR/{ops,conv,train}.jsonl -> .json
#                                                  and DIR/train.md
#                                                  (default: every benchmarks/results/*/
#                                                  with such files), then `fusedres-bench
#                                                  report` regenerates benchmarks/RESULTS.md
#
# Stages, in this order (each one's output file is written as it goes, JSON lines flushed
# per row, so a call killed at any point still returns what it did):
#   facts   nvidia-smi query, driver, torch/triton/nvcc/cuDNN versions, the commit, which
#           optional packages are missing and what that skips             -> run.jsonl
#           then, beside the build, cuDNN's description of the GPU (its device-properties
#           JSON; no stage of its own), for CI's deviceless graph checks: a line
#           "kind": "cudnn_device_properties" (or its error)  -> run.jsonl; save it with
#           `python -m fusedres.cudnn_deviceless extract DIR/run.jsonl`; after the
#           doctor, BN finalize timed once (the project's against cuDNN's bn_finalize,
#           scripts/gpu_cudnn_sites.py --finalize): "kind": "cudnn_finalize" lines,
#           and the block tails (today's kernels against cuDNN's tail graph, --tails):
#           "kind": "cudnn_tail" lines
#   build   pip install -e . (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16), in the background
#           (dry run: `setup.py --name`, which loads setup.py and builds nothing); reused
#           when fusedres._C already loads with CUDA kernels built from this csrc/
#           (a stamp beside it)                      -> checks.log (appended when it ends)
#   smoke   meanwhile: every Triton BN kernel and conv mode against fusedres.reference on
#           small shapes, one config per kernel (scripts/gpu_smoke.py)   -> smoke.jsonl
#   prewarm meanwhile too: torch.compile of the training step (PREWARM_PROVIDERS, default
#           compile), bf16 and fp16, nothing recorded: Inductor's on-disk caches are warm
#           when the train stage compiles (stopped before the train stage starts)
#   doctor  `fusedres-bench doctor`, when this checkout has it             -> checks.log
#   tests   pytest -v of the test files marked cuda (-x off)  -> checks.log, checks.xml
#   train   ResNet-50 training step, batch 256, channels_last, synthetic data, SGD with
#           momentum, bf16 then fp16 (autocast; fp16 with a GradScaler): eager,
#           torch.compile, fusedres auto, tuned, auto under torch.compile and a row per
#           conv-fusion path (fusedres/bench/trainstep.py), built one by one (each under
#           a cap), timed interleaved in one process (a new group when memory runs out),
#           then each profiled: kernel time per category, idle time, the BN floor
#           (fusedres/bench/breakdown.py)                               -> train.jsonl
#   ops     every fused BN op at every ResNet-50 BN shape, eager / CUDA / Triton: GB/s and
#           % of the device-copy bandwidth measured in the same stage  -> ops.jsonl
#   conv    forward of every ResNet-50 conv: Triton vs cuDNN, TFLOP/s    -> conv.jsonl
# One deadline for the whole call, DEADLINE_S (default 465 s; dry run 240 s) from the
# start. Each stage may run up to its own maximum, less what the stages after it need at
# least (so a slow stage leaves the later ones their minimum), never past the deadline;
# a stage that cannot get its minimum is recorded as skipped. At its cap a stage gets
# SIGINT (pytest then prints its summary and writes the JUnit file; the Python stages
# write a last line and stop), and SIGKILL 10 s later. run.jsonl has one line per stage:
# status ok | failed | incomplete | timed_out | killed | skipped, exit code, seconds, cap,
# why. The summary (scripts/gpu_summary.py DIR, which also reprints it later) comes last.
#
# Losing the machine: state.json records each finished stage, and each train provider and
# breakdown as it finishes. A second run into the same results folder skips what is
# finished and goes on (the train stage re-times eager beside what it still has to time):
#     the same $OUT: the folder <gpu>-<date>/ there holding a state.json is resumed;
#     a fresh machine ($OUT is emptied): RESUME_FROM=DIR, the folder the last call
#     brought back (committed, or carried); its files are copied into $OUT/<its name>/.
# A folder from another GPU model is never resumed (a new folder is started). Failed
# units are not redone unless RETRY_FAILED=1. The first call fits facts, build, smoke,
# doctor, tests and the train stage into 8 minutes; ops and conv come in the next call.
#
# Results: $OUT/<gpu>-<date>/ (e.g. h100-2026-12-04/; dryrun-<date>/ for the dry run), at
# most 8 files (what the device tool brings back): run.jsonl state.json smoke.jsonl
# checks.log checks.xml train.jsonl ops.jsonl conv.jsonl. Commit that folder under
# benchmarks/results/ and run `bash scripts/gpu_run.sh report`.
#
# Knobs: PYTHON (python3), DEADLINE_S, MAX_<STAGE> (a stage's own maximum in s, e.g.
# MAX_TRAIN=200), STAGES (comma-separated subset of facts,build,smoke,doctor,tests,train,
# ops,conv; e.g. STAGES=ops,conv), RESUME_FROM, RETRY_FAILED=1, FUSEDRES_BENCH_BATCH
# (256), FUSEDRES_BENCH_DTYPE (ops/conv: bfloat16), TRAIN_DTYPES (bfloat16,float16),
# PREWARM_PROVIDERS (compile; "" for none), PREP_CAP_S (150: one train provider's most
# seconds to get ready), OPS_PROVIDERS / CONV_PROVIDERS / TRAIN_PROVIDERS (e.g.
# TRAIN_PROVIDERS=eager,compile,auto; defaults in scripts/gpu_bench.py and
# fusedres/bench/trainstep.py), OPS_CASES / CONV_CASES (a regex of the rows to time, e.g.
# CONV_CASES='dbn=': the Triton conv backward in both dBN modes).
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
    # stage:  facts build smoke doctor tests train ops conv
    declare -A MAX=([facts]=60 [build]=90 [smoke]=120 [doctor]=60 [tests]=90 [train]=150
                    [ops]=60 [conv]=60)
    declare -A MIN=([facts]=3 [build]=3 [smoke]=5 [doctor]=3 [tests]=5 [train]=10 [ops]=5
                    [conv]=5)
    FINAL_S=5 KILL_S=5 MARGIN_S=5
    PREWARM_PROVIDERS=${PREWARM_PROVIDERS-eager}
else
    DEADLINE_S=${DEADLINE_S:-465}
    unset TRITON_INTERPRET  # never test or time the interpreter on a GPU machine
    DRYFLAG=()
    declare -A MAX=([facts]=45 [build]=300 [smoke]=150 [doctor]=75 [tests]=75 [train]=300
                    [ops]=120 [conv]=90)
    declare -A MIN=([facts]=10 [build]=60 [smoke]=30 [doctor]=10 [tests]=30 [train]=60
                    [ops]=40 [conv]=30)
    FINAL_S=15 KILL_S=10 MARGIN_S=15
    PREWARM_PROVIDERS=${PREWARM_PROVIDERS-compile}
fi
for s in facts build smoke doctor tests train ops conv; do  # MAX_TRAIN=200 etc. override
    knob="MAX_${s^^}"
    [ -n "${!knob:-}" ] && MAX[$s]=${!knob}
done
BENCH_ARGS=()
[ -n "${FUSEDRES_BENCH_BATCH:-}" ] && BENCH_ARGS+=(--batch "$FUSEDRES_BENCH_BATCH")
[ -n "${FUSEDRES_BENCH_DTYPE:-}" ] && BENCH_ARGS+=(--dtype "$FUSEDRES_BENCH_DTYPE")
ALL_STAGES="facts build smoke doctor tests train ops conv"
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
if [ "$DRY" = 1 ]; then
    TAG=dryrun MACHINE="dry run ($(uname -m))"
else
    MACHINE=$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    TAG=$(gpu_tag); TAG=${TAG:-gpu} MACHINE=${MACHINE:-unknown GPU}
fi
# The results folder: RESUME_FROM's name (its files copied in), else <tag>-<date>; an
# existing folder with a state.json from the same machine model is resumed, any other
# existing one left alone (a -2, -3, ... folder instead).
RESULT_FILES="run.jsonl state.json smoke.jsonl checks.log checks.xml train.jsonl ops.jsonl conv.jsonl"
if [ -n "${RESUME_FROM:-}" ]; then
    was=$("$PY" scripts/gpu_summary.py state-get "${RESUME_FROM%/}/state.json" machine name)
    if [ "$was" != "$MACHINE" ]; then
        echo "[gpu_run] RESUME_FROM=$RESUME_FROM holds results of '$was', not $MACHINE: not resumed"
        RESUME_FROM=""
    fi
fi
if [ -n "${RESUME_FROM:-}" ]; then
    RES="$OUT/$(basename "${RESUME_FROM%/}")"
    mkdir -p "$RES" || exit 1
    for f in $RESULT_FILES; do  # the run's own files only: 8 come back from the device
        [ -f "${RESUME_FROM%/}/$f" ] && [ ! -e "$RES/$f" ] && cp "${RESUME_FROM%/}/$f" "$RES/"
    done
else
    RES="$OUT/${TAG}-$(date -u +%Y-%m-%d)"
fi
n=2
base=$RES
while [ -e "$RES" ]; do
    if [ -f "$RES/state.json" ]; then
        was=$("$PY" scripts/gpu_summary.py state-get "$RES/state.json" machine name)
        [ "$was" = "$MACHINE" ] && break
        echo "[gpu_run] $RES holds results of $was, not $MACHINE: not resumed"
    fi
    RES="$base-$n"; n=$((n + 1))
done
mkdir -p "$RES" || exit 1
RUN="$RES/run.jsonl"
STATE="$RES/state.json"
RESUMED=0
[ -f "$STATE" ] && RESUMED=1
"$PY" scripts/gpu_summary.py state-set "$STATE" machine ok name="$MACHINE"

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
    # a finished stage is not run again by a resumed run (the build is checked instead)
    if [ "$2" = ok ] && [ "$1" != build ] && [ "$1" != facts ] && [ "$1" != prewarm ]; then
        "$PY" scripts/gpu_summary.py state-set "$STATE" "stage/$1" ok
    fi
}
stage_complete() { "$PY" scripts/gpu_summary.py state-complete "$STATE" "stage/$1"; }

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
    if stage_complete "$stage"; then
        record "$stage" skipped null 0 0 "done in an earlier run (state.json)"
        return 1
    fi
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
        0) status=ok ;; 3) status=incomplete ;; 124) status=timed_out ;; 137) status=killed ;;
        *) status=failed ;;
    esac
    record "$stage" "$status" "$rc" $(( $(date +%s) - t )) "$CAP" "${NOTE:-}"
}

timed() {  # timed STAGE: a scripts/gpu_bench.py stage
    local providers=() knob
    knob="${1^^}_PROVIDERS"
    [ -n "${!knob:-}" ] && providers=(--providers "${!knob}")
    knob="${1^^}_CASES"  # e.g. CONV_CASES='dbn=': only the dBN backward rows
    [ -n "${!knob:-}" ] && providers+=(--cases "${!knob}")
    stage_begin "$1" || return 0
    local extra=("${BENCH_ARGS[@]}")
    if [ "$1" = train ]; then  # resumed unit by unit (state.json): its file is kept
        extra=(--state "$STATE" --prep-cap-s "${PREP_CAP_S:-150}"
               --deadline $(( $(date +%s) + CAP - MARGIN_S )))
        [ -n "${FUSEDRES_BENCH_BATCH:-}" ] && extra+=(--batch "$FUSEDRES_BENCH_BATCH")
        [ -n "${TRAIN_DTYPES:-}" ] && extra+=(--dtypes "$TRAIN_DTYPES")
    elif [ -s "$RES/$1.jsonl" ]; then  # an unfinished earlier attempt: started afresh
        say "stage $1: the unfinished $1.jsonl of an earlier run is replaced"
        : > "$RES/$1.jsonl"
    fi
    stage_run "$1" - "$PY" scripts/gpu_bench.py "$1" --out "$RES/$1.jsonl" \
        --budget-s $((CAP - MARGIN_S)) "${DRYFLAG[@]}" "${extra[@]}" "${providers[@]}"
}

say "fusedres GPU run$([ "$DRY" = 1 ] && echo " (dry run, CPU)"): DEADLINE_S=$DEADLINE_S, results in $RES$([ "$RESUMED" = 1 ] && echo " (resumed: state.json says what is done)")"

# (a) machine facts
if [ "$DRY" != 1 ] && ! ls .gl/cudnn_frontend-*/include/cudnn_frontend.h > /dev/null 2>&1; then
    say "WARNING: no .gl/cudnn_frontend-*/include here (carry it): no cuDNN graph path"
fi
if stage_begin facts; then
    stage_run facts - "$PY" scripts/gpu_bench.py facts --out "$RUN" "${DRYFLAG[@]}"
fi
# cuDNN's device properties, beside the build (no GPU in the dry run: the line then
# records the error); waited for before the doctor
CAPTURE_PID=""
if [ "$(left)" -gt $((FINAL_S + KILL_S + 60)) ]; then
    ( timeout -k 5 60 "$PY" -m fusedres.cudnn_deviceless capture --jsonl "$RUN" 2>&1 \
        | tail -n 1 | sed 's/^/    cudnn device properties: /' ) &
    CAPTURE_PID=$!
fi

# (b) the extension build in the background (unless the one in the tree is current), the
# Triton smoke test and the compile prewarm meanwhile
BUILD_STAMP=${BUILD_STAMP:-build/fusedres_build.stamp}
[ "$DRY" = 1 ] && BUILD_STAMP=${BUILD_STAMP_DRY:-$OUT/.dry_build.stamp}
SRC_HASH=$(cat setup.py $(find csrc -type f | sort) 2>/dev/null | sha1sum | cut -c1-16)
build_current() {  # the extension in the tree was built from this csrc/ and loads
    [ "$(cat "$BUILD_STAMP" 2>/dev/null)" = "$SRC_HASH" ] || return 1
    [ "$DRY" = 1 ] && return 0
    timeout 60 "$PY" -c 'import sys, fusedres._backend as b
sys.exit(0 if b.has_cuda_kernels() else 1)' 2>/dev/null
}
BUILD_PID=""
if stage_begin build smoke; then
    if build_current; then
        record build ok 0 0 "$CAP" "reused: fusedres._C in the tree is built from this csrc/ ($SRC_HASH)"
    else
        (
            if [ "$DRY" = 1 ]; then
                stage_run build "$RES/build.log" "$PY" setup.py --name
            else
                stage_run build "$RES/build.log" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
                    "$PY" -m pip install -v --no-deps --no-build-isolation --no-index -e .
            fi
            tail -n 1 "$RUN" | grep -q '"status": "ok"' && mkdir -p "$(dirname "$BUILD_STAMP")" \
                && echo "$SRC_HASH" > "$BUILD_STAMP"
        ) &
        BUILD_PID=$!
    fi
fi
PREWARM_PID=""
if [ -n "$PREWARM_PROVIDERS" ] && in_plan train && ! stage_complete train; then
    say "prewarm: ${PREWARM_PROVIDERS} built and run (caches only) beside the build"
    PREWARM_LOG=$(mktemp)
    ( t=$(date +%s)
      timeout -s INT -k "$KILL_S" "${MAX[build]}" "$PY" scripts/gpu_bench.py train --prewarm \
          --out /dev/null --providers "$PREWARM_PROVIDERS" --prep-cap-s "${MAX[build]}" \
          ${TRAIN_DTYPES:+--dtypes "$TRAIN_DTYPES"} "${DRYFLAG[@]}" > "$PREWARM_LOG" 2>&1 &
      echo $! > "$PREWARM_LOG.pid"
      wait $!
      rc=$?
      case $rc in 0) st=ok ;; 124) st=timed_out ;; *) st=failed ;; esac
      record prewarm $st "$rc" $(( $(date +%s) - t )) "${MAX[build]}" \
          "caches only, nothing recorded: $(grep -c 'ready in' "$PREWARM_LOG") provider(s) ready"
    ) &
    PREWARM_PID=$!
else
    record prewarm skipped null 0 0 "PREWARM_PROVIDERS is empty, or no train stage to run"
fi
if stage_begin smoke build; then
    [ -s "$RES/smoke.jsonl" ] && : > "$RES/smoke.jsonl"  # an unfinished earlier attempt
    stage_run smoke - "$PY" scripts/gpu_smoke.py --out "$RES/smoke.jsonl" \
        --budget-s $((CAP - MARGIN_S)) "${DRYFLAG[@]}"
fi
if [ -n "$BUILD_PID" ]; then
    wait "$BUILD_PID"
    tail -n 3 "$RES/build.log" | sed 's/^/    build.log: /'
    { echo "== build.log ($(date -u +%FT%TZ))"; cat "$RES/build.log"; } >> "$RES/checks.log"
    rm -f "$RES/build.log"  # at most 8 files come back: the build log lives in checks.log
fi
if [ "$(left)" -gt $((FINAL_S + KILL_S)) ]; then
    backends=$(timeout $(( $(left) - FINAL_S )) "$PY" -c 'import fusedres as f
print(",".join(f.available_backends()), "|", f.extension_error or "")' 2>/dev/null | tail -1)
    printf '{"kind": "backends", "backends": "%s"}\n' "$(json_str "$backends")" >> "$RUN"
    say "fusedres backends after the build: $backends"
fi

[ -n "$CAPTURE_PID" ] && wait "$CAPTURE_PID"
# (c) doctor, then the CUDA kernel tests
if stage_begin doctor; then
    if timeout 60 "$PY" -m fusedres.bench doctor --help > /dev/null 2>&1; then
        stage_run doctor "$RES/checks.log" "$PY" -m fusedres.bench doctor --verbose
        tail -n 5 "$RES/checks.log" | sed 's/^/    doctor: /'
    else
        record doctor skipped null 0 "$CAP" "fusedres-bench has no doctor subcommand here"
    fi
fi
# BN finalize after the cuDNN graphs' sums, timed once: the project's against cuDNN's
# bn_finalize, a "kind": "cudnn_finalize" line per BN width in run.jsonl (what
# fusedres.cudnn_graph.finalize's default waits for; no stage of its own, no new file)
if [ "$DRY" != 1 ] && [ "$(left)" -gt $((FINAL_S + KILL_S + 60)) ]; then
    timeout -k 5 45 "$PY" scripts/gpu_cudnn_sites.py --finalize --jsonl "$RUN" 2>&1 \
        | tail -n 1 | sed 's/^/    cudnn finalize: /'
fi
# The block tails, timed once: today's fused tail kernels against cuDNN's tail graph
# (BNAddReLU / DualBNAddReLU, the cudnn-graph-tail path that tune may pick), a "kind":
# "cudnn_tail" line per ResNet-50 tail shape, kind and dtype in run.jsonl, each as it is
# measured (a timeout keeps what was done; no stage of its own, no new file)
if [ "$DRY" != 1 ] && [ "$(left)" -gt $((FINAL_S + KILL_S + 75)) ]; then
    timeout -k 5 60 "$PY" scripts/gpu_cudnn_sites.py --tails --jsonl "$RUN" > /dev/null 2>&1
    echo "    cudnn tails: $(grep -c '"kind": "cudnn_tail"' "$RUN") rows"
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

# (d) the training step (first: the prewarm stops, nothing else then uses the GPU),
# (e) memory-bound ops vs copy bandwidth, (f) conv forward
if [ -n "$PREWARM_PID" ]; then
    # SIGINT to its timeout, which passes it on: gpu_bench.py stops where it is
    kill -INT "$(cat "$PREWARM_LOG.pid" 2>/dev/null)" 2>/dev/null
    wait "$PREWARM_PID"
    sed 's/^/    prewarm: /' "$PREWARM_LOG" | grep -v "^    prewarm: *$" | tail -n 6
    rm -f "$PREWARM_LOG" "$PREWARM_LOG.pid"
fi
timed train
timed ops
timed conv

say "done in $(( $(date +%s) - T0 )) s of DEADLINE_S=$DEADLINE_S"
nfiles=$(find "$RES" -type f | wc -l)
[ "$nfiles" -gt 8 ] && say "WARNING: $nfiles files in $RES; the device tool brings back 8"
echo
timeout 60 "$PY" scripts/gpu_summary.py "$RES"
echo "results: $RES ($nfiles files: $(cd "$RES" && ls | tr '\n' ' '))"

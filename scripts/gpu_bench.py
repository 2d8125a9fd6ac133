"""Stages of scripts/gpu_run.sh that import torch: the machine facts and the timings.

    python scripts/gpu_bench.py facts --out run.jsonl [--dry-run]
    python scripts/gpu_bench.py ops|conv --out FILE.jsonl [--budget-s S] [--dry-run]
        [--providers eager,cuda,triton] [--batch N] [--dtype bfloat16] [--cases REGEX]
    python scripts/gpu_bench.py train --out FILE.jsonl [--state state.json] [--dry-run]
        [--providers eager,compile,auto,...] [--dtypes bfloat16,float16] [--budget-s S]

Every stage appends JSON lines, one per row, flushed as it goes, so a stage stopped at
any point (its budget, SIGINT, SIGKILL) leaves what it measured:

* facts: one line {"kind": "facts", ...}: GPU (nvidia-smi query), driver, torch, triton,
  nvcc, cuDNN, the commit (FUSEDRES_GIT_COMMIT), the packages present and what each
  missing one skips.
* ops: the fused BN ops (BN+ReLU, BN+add+ReLU, dual BN+add+ReLU; forward and
  forward+backward, training mode) at every ResNet-50 BN shape; GB/s of the fused traffic
  model and its percentage of the device-copy bandwidth measured at the start of the
  stage (a 1 GiB device-to-device copy, bytes read + written).
* conv: the forward of every distinct ResNet-50 conv, the Triton conv against cuDNN
  (``F.conv2d``), TFLOP/s; then the Triton conv backward with the BN-statistics
  gradient at each bottleneck conv2/conv3 shape in both ``fusedres.conv.dbn_backward``
  modes (pass "bwd dbn=fused" / "bwd dbn=materialised", TFLOP/s of dgrad + wgrad) and the
  materialising pass alone ("bwd dbn=apply-pass"): Triton provider only.
* train: the ResNet-50 training step (batch 256, channels_last, synthetic data, SGD with
  momentum; the dry run: ``fusedres.bench.trainstep.TinyResNet``, batch 4, 32x32) per
  dtype (``--dtypes``, default bfloat16 then float16: autocast, fp16 with a GradScaler)
  and provider (``fusedres.bench.trainstep``: eager, compile, auto, tuned, auto+compile,
  one row per conv-fusion path). Each provider is built (convert, tune, torch.compile --
  ``aot_eager`` in the dry run --, the first steps) under a cap (``--prep-cap-s``), the
  built ones are timed interleaved (``trainstep.time_interleaved``; a new group where
  memory runs out), then each is profiled (``fusedres.bench.breakdown``: kernel time per
  category, busy and idle time; the header carries the BN traffic and its floor at the
  copy bandwidth measured first). Lines: "row" (ms per step, img/s, vs eager and vs
  compile of the same run, peak memory, seconds to get ready), "breakdown", "error" and
  "skipped" (a failed provider is reported with its error, the others go on). Each
  finished unit goes into ``--state`` (state.json); a second run skips finished units
  and times eager again beside what it still has to time. ``--prewarm``: build only,
  record nothing (fills the compile caches while the extension builds).

The cases, providers, timers and row format are fusedres-bench's (``fusedres/bench``):
a row line is {"kind": "row", <the keys of fusedres.bench.report.ROW_KEYS>}. Around the
rows: {"kind": "header", "stage", "machine", "settings", "copy"} first,
{"kind": "skipped" | "error", ...} as they happen, {"kind": "end", "complete", ...} last
("complete": false when the budget, SIGINT or a lost CUDA context stopped it).
``scripts/gpu_summary.py`` prints these files and turns them into fusedres-bench JSON.

GPU timing: CUDA events around CUDA-graph replays after a warm-up, the L2 flushed before
each repetition (``fusedres.bench.timing.time_cuda``), median of the repetitions. Triton
kernels autotune on their first call (outside the timed region). ``--dry-run`` runs the
same code on the CPU with tiny shapes (the Triton providers are then skipped: the
interpreter is never timed).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULT_PROVIDERS = {"ops": "eager,cuda,triton", "conv": "eager,triton"}
DRY_PROVIDERS = {"ops": "eager,cpu,triton", "conv": "eager,triton"}

# Packages this run may lack on a bare GPU image, and what a missing one costs here.
OPTIONAL = {
    "torchvision": "the training step uses fusedres/bench/resnet50.py (same structure and "
                   "state_dict keys as torchvision's resnet50)",
    "ninja": "the extension builds one file at a time (slower; MAX_JOBS has no effect)",
    "pytest": "the CUDA kernel tests cannot run",
    "timm": "nothing here (only tests outside this script's selection use it)",
    "pytest-benchmark": "nothing here (not used by this script)",
    "matplotlib": "nothing here (no plots are made)",
    "pybind11": "nothing expected (torch ships the pybind11 headers the build uses)",
}


class Emitter:
    """Append JSON lines to a file, one flushed write per row."""

    def __init__(self, path: str):
        self.f = open(path, "a")

    def __call__(self, row: dict) -> None:
        self.f.write(json.dumps(row, default=str) + "\n")
        self.f.flush()


def _cmd(argv: list, timeout: float = 30.0):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return (out.stdout.strip(), None) if out.returncode == 0 else (None, out.stderr.strip()[-300:])


# --------------------------------------------------------------------------------------
# facts
# --------------------------------------------------------------------------------------

SMI_FIELDS = ("name,driver_version,memory.total,memory.used,compute_cap,pstate,clocks.sm,"
              "clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,"
              "temperature.gpu,utilization.gpu,persistence_mode,mig.mode.current")


def nvidia_smi() -> dict:
    """nvidia-smi's view of GPU 0 (fewer fields if the long query is refused)."""
    if not shutil.which("nvidia-smi"):
        return {"error": "nvidia-smi not found"}
    for fields in (SMI_FIELDS, "name,driver_version,memory.total"):
        text, err = _cmd(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader",
                          "--id=0"])
        if text:
            return dict(zip(fields.split(","), (v.strip() for v in text.split(","))))
    return {"error": err}


def packages() -> tuple[dict, list]:
    import importlib.metadata

    found, missing = {}, []
    for name, skips in OPTIONAL.items():
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
        if name == "ninja":  # what torch's builder looks for is the program
            found["ninja (program)"] = shutil.which("ninja")
            if found["ninja (program)"] is None:
                missing.append({"package": "ninja", "skips": skips})
        elif found[name] is None:
            missing.append({"package": name, "skips": skips})
    return found, missing


def facts(args) -> int:
    import torch

    from fusedres.bench import report

    gpu = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if gpu else "cpu")
    row = {"kind": "facts", "dry_run": args.dry_run}
    row.update(report.machine_info(device))
    if gpu:
        row["nvidia_smi"] = nvidia_smi()
        props = torch.cuda.get_device_properties(0)
        row["gpu_l2_bytes"] = getattr(props, "L2_cache_size", None)
    else:
        row["nvidia_smi"] = "not queried (dry run or no GPU)"
    nvcc, err = _cmd(["nvcc", "--version"]) if shutil.which("nvcc") else (None, "not on PATH")
    row["nvcc"] = nvcc.splitlines()[-1] if nvcc else f"missing ({err})"
    row["packages"], row["missing"] = packages()
    if not nvcc:
        row["missing"].append({"package": "nvcc", "skips": "no CUDA kernels: the build "
                               "has the CPU kernels only (no cuda backend, no CUDA tests)"})
    row["deadline_s"] = os.environ.get("DEADLINE_S")
    Emitter(args.out)(row)
    smi = row["nvidia_smi"] if isinstance(row["nvidia_smi"], dict) else {}
    print(f"[facts] {row.get('gpu') or row['cpu']} | driver {row.get('driver')} | "
          f"torch {row['torch']} (CUDA {row['cuda_runtime']}, cuDNN {row.get('cudnn')}) | "
          f"triton {row['triton']} | {row['nvcc']} | commit {row['git_commit']}"
          + (f" | clocks sm {smi.get('clocks.sm')}/{smi.get('clocks.max.sm')}, "
             f"{smi.get('pstate')}, {smi.get('temperature.gpu')} C" if smi else ""), flush=True)
    for m in row["missing"]:
        print(f"[facts] missing {m['package']}: {m['skips']}", flush=True)
    return 0


# --------------------------------------------------------------------------------------
# timed stages
# --------------------------------------------------------------------------------------


def _settings(args, device):
    import torch

    from fusedres.bench import cases as C
    from fusedres.bench.cli import DTYPES

    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    batch = args.batch or (256 if gpu else 4)
    return C.Settings(device=device, dtype=dtype, layout="channels_last", batch=batch,
                      quick=not gpu, image_size=224)


def _providers(names: str, device):
    """The providers to time, and (provider, reason) for those that cannot run here."""
    import fusedres
    from fusedres._backend import backend_supports
    from fusedres.bench import cases as C

    avail = fusedres.available_backends()
    out, skipped = [], []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name == "eager":
            out.append(C.Provider("eager", "eager"))
            continue
        if name == "tuned":  # convert + fusedres.tune on the case's input (train only)
            out.append(C.Provider("fusedres-tuned", "tuned"))
            continue
        if name == "auto":  # convert's default: the BN backend auto picks, cuDNN convs
            out.append(C.Provider("fusedres-auto", "fusedres", backend="auto"))
            continue
        prov = f"fusedres-{name}"
        if name not in avail:
            why = f"backend not available here (available: {avail})"
            if name in ("cpu", "cuda") and fusedres.extension_error is not None:
                why += f"; fusedres._C: {fusedres.extension_error}"
            skipped.append((prov, why))
        elif name == "triton" and device.type != "cuda":
            skipped.append((prov, "the Triton interpreter is never timed (no GPU)"))
        elif not backend_supports(name, device):
            skipped.append((prov, f"backend {name!r} does not run on {device.type}"))
        else:
            out.append(C.Provider(prov, "fusedres", backend=name))
    return out, skipped


def _cases(stage: str, s, dry: bool) -> list:
    from fusedres.bench import cases as C

    shapes = "tiny" if dry else "full"
    if stage == "ops":  # forward+backward first: they autotune the forward kernels too
        return sorted(C.ops_cases(s, shapes), key=lambda c: c.pass_ != "fwd+bwd")
    forward = [c for c in C.conv_cases(s, shapes) if (c.name, c.pass_) == ("conv", "fwd")]
    # then the Triton conv backward in each fusedres.conv.dbn_backward mode (last: the
    # budget cuts these first; select them alone with --cases 'dbn=')
    return forward + C.dbn_backward_cases(s, shapes)


def _measure(fn, device, args):
    from fusedres.bench import timing

    if device.type == "cuda":
        return timing.time_cuda(fn, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                                use_graph=True)
    return timing.time_cpu(fn, min_run_time=0.05, min_blocks=1)  # the dry run: plumbing


def _context_lost(device) -> bool:
    import torch

    if device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize()
        return False
    except Exception:
        return True


def timed_stage(stage: str, args) -> int:
    import torch

    from fusedres.bench import report, timing
    from fusedres.bench.cases import Skip
    from fusedres.bench.cli import _row

    t0 = time.time()
    gpu = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    emit = Emitter(args.out)
    s = _settings(args, device)
    names = args.providers or (DEFAULT_PROVIDERS if gpu else DRY_PROVIDERS)[stage]
    providers, unavailable = _providers(names, device)
    cases = _cases(stage, s, args.dry_run)
    if args.cases:
        pattern = re.compile(args.cases)
        cases = [c for c in cases if pattern.search(f"{c.name} {c.pass_} {c.layer}")]
    copy = {}
    if stage == "ops":
        gbps, m, moved = timing.copy_bandwidth(device, quick=not gpu)
        copy = {"gbps": gbps, "bytes": moved, "time_ms": m.median_s * 1e3, "timer": m.timer}
        print(f"[{stage}] device-copy bandwidth {gbps:.1f} GB/s (read + write)", flush=True)
    commit = report.git_commit()
    emit({"kind": "header", "stage": stage, "machine": report.machine_info(device),
          "settings": {"device": device.type, "dtype": str(s.dtype).replace("torch.", ""),
                       "layout": s.layout, "batch": s.batch, "providers":
                       [p.name for p in providers], "cases": len(cases),
                       "budget_s": args.budget_s, "warmup_ms": args.warmup_ms,
                       "rep_ms": args.rep_ms, "dry_run": args.dry_run},
          "copy": copy})
    for prov, why in unavailable:
        emit({"kind": "skipped", "suite": stage, "provider": prov, "reason": why,
              "count": len(cases)})
        print(f"[{stage}] skipped {prov}: {why}", flush=True)

    done = errors = skipped = 0
    slowest = 0.0  # the longest row so far: no row is started that would not finish
    stopped = None
    eager_ms = {}
    try:
        for case in cases:
            for provider in providers:
                elapsed = time.time() - t0
                if stopped is None and args.budget_s is not None and \
                        elapsed + 0.8 * slowest > args.budget_s:
                    stopped = f"budget of {args.budget_s:.0f} s spent"
                if stopped is not None:
                    emit({"kind": "skipped", "suite": stage, "case": case.name,
                          "pass": case.pass_, "layer": case.layer,
                          "provider": provider.name, "reason": stopped})
                    skipped += 1
                    continue
                t_row = time.time()
                fn = None
                try:
                    fn = case.make(provider)
                    m = _measure(fn, device, args)
                    row = _row(case, provider, m, s, copy.get("gbps"), commit)
                    if case.peak_memory and gpu:
                        row["peak_mem_bytes"], row["peak_mem_kind"] = \
                            timing.peak_memory(fn, device)
                    key = (case.name, case.pass_, case.layer)
                    if provider.kind == "eager":
                        eager_ms[key] = row["time_ms"]
                    elif key in eager_ms:
                        row["speedup_vs_eager"] = eager_ms[key] / row["time_ms"]
                    emit(dict({"kind": "row"}, **row))
                    done += 1
                    print(f"[{stage}] {case.name} {case.pass_} {case.layer} "
                          f"{provider.name}: {row['time_ms']:.4g} ms"
                          + (f", {row['pct_copy_bw']:.0f}% copy" if row.get("pct_copy_bw")
                             else "")
                          + (f", {row['speedup_vs_eager']:.2f}x eager"
                             if row.get("speedup_vs_eager") else ""), flush=True)
                except Skip as sk:
                    emit({"kind": "skipped", "suite": stage, "case": case.name,
                          "pass": case.pass_, "layer": case.layer,
                          "provider": provider.name, "reason": str(sk)})
                    skipped += 1
                except Exception as exc:
                    text = str(exc).strip()
                    msg = f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
                    emit({"kind": "error", "suite": stage, "case": case.name,
                          "pass": case.pass_, "layer": case.layer, "provider": provider.name,
                          "error": msg, "traceback": traceback.format_exc(limit=8)})
                    errors += 1
                    print(f"[{stage}] ERROR {case.name} {case.pass_} {case.layer} "
                          f"{provider.name}: {msg}", flush=True)
                    if _context_lost(device):
                        stopped = "the CUDA context was lost (an earlier error)"
                finally:
                    del fn
                    if gpu and not _context_lost(device):
                        torch.cuda.empty_cache()
                slowest = max(slowest, time.time() - t_row)
    except KeyboardInterrupt:
        stopped = "SIGINT (the stage's time cap)"
        print(f"[{stage}] stopped by SIGINT", flush=True)
    emit({"kind": "end", "stage": stage, "complete": stopped is None, "stopped": stopped,
          "rows": done, "skipped": skipped, "errors": errors,
          "wall_s": round(time.time() - t0, 1)})
    print(f"[{stage}] {done} rows, {skipped} skipped, {errors} errors in "
          f"{time.time() - t0:.0f} s" + (f" ({stopped})" if stopped else ""), flush=True)
    return 1 if errors else 0


# --------------------------------------------------------------------------------------
# train: every provider of the training step, interleaved, and where each one's time goes
# --------------------------------------------------------------------------------------


class PrepTimeout(Exception):
    """A provider's preparation (convert, tune, compile, first steps) passed its cap."""


class _Cap:
    """Raise PrepTimeout in this (main) thread after ``seconds`` (SIGALRM)."""

    def __init__(self, seconds: float, what: str):
        self.seconds, self.what = max(float(seconds), 1.0), what

    def _fire(self, *_):
        raise PrepTimeout(f"{self.what} passed its cap of {self.seconds:.0f} s")

    def __enter__(self):
        import signal

        self.old = signal.signal(signal.SIGALRM, self._fire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        import signal

        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old)
        return False


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


# Seconds a GPU group needs after its last build: timing (~1.5 s per provider: rounds of
# 0.25 s blocks) and a profiled breakdown (~8 s: 3 steps, the trace exported and read).
TIME_PER_PROVIDER_S = {"cuda": 2.0, "cpu": 1.0}
BREAKDOWN_S = {"cuda": 8.0, "cpu": 2.0}
MIN_PREP_S = {"cuda": 20.0, "cpu": 1.0}


def train_stage(args) -> int:
    """The train stage: per dtype, every provider built (convert / tune / compile and the
    first steps, each under a cap), timed interleaved, then profiled; each result written
    and recorded in the state file as it finishes, so a second run goes on from there."""
    import torch

    import gpu_summary
    from fusedres.bench import breakdown as B
    from fusedres.bench import formulas, report, timing
    from fusedres.bench import trainstep as T
    from fusedres.bench.cli import DTYPES
    from fusedres.bench.resnet50 import torchvision_or_own

    t0 = time.time()
    if args.deadline is not None:  # the caller's clock: imports spent part of the budget
        args.budget_s = min(args.budget_s or float("inf"), args.deadline - t0)
    gpu = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if gpu else "cpu")
    kind = device.type
    if gpu:
        torch.backends.cudnn.benchmark = True
    emit = Emitter(args.out) if not args.prewarm else (lambda row: None)
    state_path = args.state
    state = gpu_summary.state_load(state_path) if state_path else {}
    retry = os.environ.get("RETRY_FAILED") == "1"

    def done(key):
        return gpu_summary.state_complete(state, key, retry)

    def mark(key, status, **info):
        state[key] = dict(info, status=status)
        if state_path and not args.prewarm:
            gpu_summary.state_set(state_path, key, status, **info)

    session = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0))
    batch = args.batch or (256 if gpu else 4)
    size = 224 if gpu else 32
    if args.dry_run:
        base, source = T.TinyResNet(), "fusedres.bench.trainstep.TinyResNet"
        model_name = "resnet-tiny"
    else:
        with torch.device("cpu"):
            base, source = torchvision_or_own("resnet50")
        model_name = "resnet50"
    make_model = T.clone_factory(base)
    shape = (batch, 3, size, size)
    probe = torch.empty(shape, device="meta")
    flops = formulas.model_flops(base, probe, "fwd+bwd", input_grad=False)
    sites = B.resnet_bn_sites(base, probe)
    names = args.providers or ",".join(T.default_providers())
    providers = []
    for n in (n.strip() for n in names.split(",") if n.strip()):
        try:
            providers.append(T.parse(n))
        except ValueError as exc:
            emit({"kind": "error", "suite": "train", "provider": n, "dtype": None,
                  "phase": "parse", "error": str(exc)})
    dtypes = [d.strip() for d in (args.dtypes or "bfloat16,float16").split(",") if d.strip()]
    copy = {}
    if not args.prewarm:
        gbps, m, moved = timing.copy_bandwidth(device, quick=not gpu)
        copy = {"gbps": gbps, "bytes": moved, "time_ms": m.median_s * 1e3, "timer": m.timer}
        print(f"[train] device-copy bandwidth {gbps:.1f} GB/s (read + write)", flush=True)
    commit = report.git_commit()
    traffic = {d: B.bn_traffic(sites, DTYPES[d]) for d in dtypes}
    emit({"kind": "header", "stage": "train", "session": session,
          "machine": report.machine_info(device),
          "settings": {"device": kind, "model": model_name, "model_source": source,
                       "batch": batch, "image_size": size, "layout": "channels_last",
                       "dtypes": dtypes, "providers": [p.name for p in providers],
                       "optimizer": "SGD(lr=0.01, momentum=0.9, weight_decay=1e-4)",
                       "budget_s": args.budget_s, "dry_run": args.dry_run,
                       "fp16": "autocast + torch.amp.GradScaler",
                       "compile": "aot_eager (dry run)" if args.dry_run else "default mode"},
          "copy": copy, "bn_sites": len(sites),
          "bn_bytes": traffic,
          "bn_floor_ms": {d: {k: B.floor_ms(v, copy.get("gbps")) for k, v in t.items()}
                          for d, t in traffic.items()}})

    def left():
        return float("inf") if args.budget_s is None else args.budget_s - (time.time() - t0)

    counts = {"rows": 0, "errors": 0, "skipped": 0, "breakdowns": 0}
    stopped = None

    def skip(p, dt, why, final=False, phase="build"):
        emit({"kind": "skipped", "suite": "train", "provider": p.name, "dtype": dt,
              "phase": phase, "reason": why})
        counts["skipped"] += 1
        print(f"[train] {dt} {p.name}: skipped ({why})", flush=True)
        if final:
            mark(f"train/{dt}/{p.name}", "unavailable", reason=why)
            mark(f"train/{dt}/{p.name}/breakdown", "unavailable", reason=why)

    def fail(p, dt, phase, exc, keys):
        msg = _error_text(exc)
        emit({"kind": "error", "suite": "train", "provider": p.name, "dtype": dt,
              "phase": phase, "error": msg, "traceback": traceback.format_exc(limit=8)})
        counts["errors"] += 1
        print(f"[train] {dt} {p.name}: FAILED in {phase}: {msg}", flush=True)
        for key in keys:
            mark(key, "failed", phase=phase, error=msg)

    def free(group):
        group.clear()
        import gc

        gc.collect()
        torch._dynamo.reset()  # nothing compiled is alive any more: a clean slate
        if gpu:
            torch.cuda.empty_cache()

    try:
        for dt in dtypes:
            dtype = DTYPES[dt]
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=g).to(device=device).contiguous(
                memory_format=torch.channels_last)
            y = torch.randint(0, 10 if args.dry_run else 1000, (batch,), generator=g).to(device)
            want_row = {p.name for p in providers if not done(f"train/{dt}/{p.name}")}
            want_bd = {p.name for p in providers
                       if not args.no_breakdown and not done(f"train/{dt}/{p.name}/breakdown")}
            todo = [p for p in providers if p.name in want_row | want_bd]
            if args.prewarm:
                todo, want_row, want_bd = providers, set(), set()
            if not todo:
                print(f"[train] {dt}: every provider done in an earlier run (state file)",
                      flush=True)
                continue
            baseline = None
            if want_row and "eager" not in want_row and not args.prewarm:
                # a resumed run times eager beside what it times: ratios from one run
                baseline = next((p for p in todo if p.name == "eager"), None)
                if baseline is None:
                    baseline = T.parse("eager")
                    todo = [baseline] + todo
            queue = list(todo)
            while queue and stopped is None:
                group: dict = {}  # built providers, timed together
                while queue and stopped is None:
                    p = queue[0]
                    why = T.unavailable(p, device)
                    if why:
                        queue.pop(0)
                        skip(p, dt, why, final=True)
                        continue
                    n_after = len(group) + 1
                    reserve = n_after * (TIME_PER_PROVIDER_S[kind] + BREAKDOWN_S[kind])
                    cap = min(left() - reserve, args.prep_cap_s)
                    if cap < MIN_PREP_S[kind]:
                        stopped = (f"budget: {max(left(), 0):.0f} s left of {args.budget_s:.0f}"
                                   f", {reserve:.0f} s kept to time and profile what is built")
                        break
                    queue.pop(0)
                    t_build = time.time()
                    try:
                        with _Cap(cap, f"preparing {p.name}"):
                            b = T.build(p, make_model, x, y, dtype, dry=args.dry_run)
                    except Exception as exc:
                        if _is_oom(exc) and group:
                            free_note = f"out of memory beside {len(group)} built providers"
                            print(f"[train] {dt} {p.name}: {free_note}: timed in a new group",
                                  flush=True)
                            queue.insert(0, p)
                            if gpu:
                                torch.cuda.empty_cache()
                            break
                        keys = [f"train/{dt}/{p.name}", f"train/{dt}/{p.name}/breakdown"]
                        fail(p, dt, "build", exc,
                             [k for k, w in zip(keys, (want_row, want_bd)) if p.name in w])
                        if _context_lost(device):
                            stopped = "the CUDA context was lost (an earlier error)"
                        continue
                    prep = {"convert_s": b.convert_s, "tune_s": b.tune_s,
                            "first_steps_s": b.first_steps_s,
                            "prep_s": time.time() - t_build, "cap_s": cap}
                    print(f"[train] {dt} {p.name}: ready in {prep['prep_s']:.1f} s (convert "
                          f"{b.convert_s:.1f}, tune {b.tune_s:.1f}, first steps "
                          f"{b.first_steps_s:.1f})" + (f"; {'; '.join(b.notes)}" if b.notes
                                                       else ""), flush=True)
                    group[p.name] = (p, b, prep)
                if not group:
                    break
                # interleaved timing of what this group must time
                timed = {n: v for n, v in group.items()
                         if n in want_row or (baseline is not None and v[0] is baseline)}
                if timed:
                    got, errors = T.time_interleaved(
                        {n: v[1].step for n, v in timed.items()}, device,
                        budget_s=max(left() - len(group) * BREAKDOWN_S[kind], 0))
                    for n, exc in errors.items():
                        p = timed[n][0]
                        fail(p, dt, "timing", exc, [f"train/{dt}/{n}"] if n in want_row
                             else [])
                    eager_ms = got.get("eager", {}).get("time_ms")
                    compile_ms = got.get("compile", {}).get("time_ms")
                    for n, m in got.items():
                        p, b, prep = timed[n]
                        secs = m["time_ms"] / 1e3
                        row = {"suite": "train", "case": model_name, "pass": "train_step",
                               "layer": f"{size}x{size}", "shape": list(shape), "dtype": dt,
                               "layout": "channels_last", "device": kind, "provider": n,
                               "time_iqr_ms": None, "timer_note": None, "bytes": None,
                               "bytes_eager": None, "gbps": None, "pct_copy_bw": None,
                               "flops": flops, "tflops": flops / secs / 1e12,
                               "images_per_s": batch / secs,
                               "peak_mem_bytes": b.peak_mem_bytes,
                               "peak_mem_kind": b.peak_mem_kind or None,
                               "retained_bytes": None, "retained_kind": None,
                               "retained_vs_eager": None, "page_faults_per_call": None,
                               "git_commit": commit, "session": session,
                               "baseline": n not in want_row,
                               "speedup_vs_eager": eager_ms / m["time_ms"] if eager_ms else None,
                               "speedup_vs_compile": (compile_ms / m["time_ms"]
                                                      if compile_ms else None),
                               "extra": dict(prep, model=source, notes=b.notes,
                                             tune_choices=b.tune_choices,
                                             resident_bytes=b.resident_bytes)}
                        row.update(m)
                        emit(dict({"kind": "row"}, **row))
                        counts["rows"] += 1
                        if n in want_row:
                            mark(f"train/{dt}/{n}", "ok", time_ms=m["time_ms"])
                        print(f"[train] {dt} {n}: {m['time_ms']:.4g} ms/step, "
                              f"{batch / secs:.0f} img/s"
                              + (f", {row['speedup_vs_eager']:.2f}x eager"
                                 if row["speedup_vs_eager"] else "")
                              + (f", {row['speedup_vs_compile']:.2f}x compile"
                                 if row["speedup_vs_compile"] else ""), flush=True)
                # where each one's time goes
                for n, (p, b, prep) in list(group.items()):
                    if n not in want_bd:
                        continue
                    if left() < BREAKDOWN_S[kind]:
                        stopped = stopped or f"budget: {max(left(), 0):.0f} s left"
                        break
                    try:
                        bd = B.profile_step(b.step, kind, steps=args.profile_steps)
                    except Exception as exc:
                        fail(p, dt, "breakdown", exc, [f"train/{dt}/{n}/breakdown"])
                        continue
                    emit({"kind": "breakdown", "provider": n, "dtype": dt,
                          "session": session, "git_commit": commit, **bd})
                    counts["breakdowns"] += 1
                    mark(f"train/{dt}/{n}/breakdown", "ok")
                    print(f"[train] {dt} {n}: profiled {bd['total_ms']:.4g} ms of kernels "
                          f"in {bd['wall_ms']:.4g} ms per step (idle {bd['idle_ms']:.3g})",
                          flush=True)
                free(group)
            if stopped is not None:
                for p in queue:
                    skip(p, dt, stopped)
    except KeyboardInterrupt:
        stopped = "SIGINT (the stage's time cap)"
        print("[train] stopped by SIGINT", flush=True)
    complete = stopped is None and all(
        done(f"train/{dt}/{p.name}") and (args.no_breakdown or
                                          done(f"train/{dt}/{p.name}/breakdown"))
        for dt in dtypes for p in providers)
    emit({"kind": "end", "stage": "train", "complete": complete, "stopped": stopped,
          **counts, "wall_s": round(time.time() - t0, 1)})
    print(f"[train] {counts['rows']} rows, {counts['breakdowns']} breakdowns, "
          f"{counts['skipped']} skipped, {counts['errors']} errors in {time.time() - t0:.0f} s"
          + (f" ({stopped})" if stopped else ""), flush=True)
    return 0 if complete or args.prewarm else 3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("facts", "ops", "conv", "train"))
    p.add_argument("--out", required=True, help="JSON-lines file (appended)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no row that would end after this many seconds")
    p.add_argument("--providers", default=None,
                   help="comma-separated: eager and fusedres backends (default: " +
                        "; ".join(f"{k}: {v}" for k, v in DEFAULT_PROVIDERS.items()) +
                        "; train: fusedres.bench.trainstep.default_providers(), names as "
                        "in that module's docstring)")
    p.add_argument("--batch", type=int, default=None, help="default: 256 on GPU, 2 on CPU")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--cases", default=None, metavar="REGEX",
                   help="only cases whose 'case pass layer' matches")
    p.add_argument("--dtypes", default=None,
                   help="train: comma-separated, in order (default bfloat16,float16)")
    p.add_argument("--state", default=None, help="train: the run's state file (resume)")
    p.add_argument("--deadline", type=float, default=None,
                   help="train: Unix time by which the stage ends (budget from the caller's "
                        "clock, imports included)")
    p.add_argument("--prep-cap-s", type=float, default=150.0,
                   help="train: most seconds one provider may take to get ready")
    p.add_argument("--profile-steps", type=int, default=2,
                   help="train: steps under torch.profiler per breakdown")
    p.add_argument("--no-breakdown", action="store_true", help="train: time only")
    p.add_argument("--prewarm", action="store_true",
                   help="train: build the providers (fill the compile caches), record nothing")
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=50.0)
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    if args.stage == "facts":
        return facts(args)
    if args.stage == "train":
        return train_stage(args)
    return timed_stage(args.stage, args)


if __name__ == "__main__":
    sys.exit(main())

"""Stages of scripts/gpu_run.sh that import torch: the machine facts and the timings.

    python scripts/gpu_bench.py facts --out run.jsonl [--dry-run]
    python scripts/gpu_bench.py ops|conv|train --out FILE.jsonl [--budget-s S] [--dry-run]
        [--providers eager,cuda,triton] [--batch N] [--dtype bfloat16] [--cases REGEX]

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
  (``F.conv2d``), TFLOP/s.
* train: one ResNet-50 training step (forward, backward, SGD; autocast to the dtype,
  channels_last), eager against ``fusedres.convert(model, backend=B)``: ``auto`` (the
  default: Triton BN kernels, cuDNN convs), ``cuda`` (CUDA C++ BN kernels, cuDNN convs),
  ``tuned`` (``auto`` plus ``fusedres.tune`` on the step's input); ``triton`` also runs
  the Triton conv where a BN-ReLU feeds a conv. torchvision's model when it imports, else
  ``fusedres.bench.resnet50`` (same structure and state_dict keys).

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

# The train stage times backend "auto" (the Triton BN kernels, cuDNN convs), not "triton":
# a model converted with backend="triton" also runs every conv in Triton (0.25-1.02x cuDNN
# on the H200, 2026-12-04), and autotuning those convs forward and backward took longer
# than one call can spare. "tuned" (convert + fusedres.tune) last: the budget may cut it.
DEFAULT_PROVIDERS = {"ops": "eager,cuda,triton", "conv": "eager,triton",
                     "train": "eager,auto,cuda,tuned"}
DRY_PROVIDERS = {"ops": "eager,cpu,triton", "conv": "eager,triton", "train": "eager,cpu"}

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
    batch = args.batch or (256 if gpu else 2)
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


def _train_case(s, dry: bool):
    """One ResNet-50 training-step case, built on cases._train_make; the model is
    torchvision's when it imports, else fusedres.bench.resnet50."""
    import torch

    from fusedres.bench import cases as C
    from fusedres.bench import formulas
    from fusedres.bench.resnet50 import resnet50, torchvision_or_own

    size = 32 if dry else s.image_size
    shape = (s.batch, 3, size, size)
    with torch.device("meta"):
        net, source = torchvision_or_own("resnet50")
    flops = formulas.model_flops(net, torch.empty(shape, device="meta"), "fwd+bwd",
                                 input_grad=False)
    if not source.startswith("torchvision"):
        # cases._train_make builds its model through cases._model (torchvision's)
        C._model = lambda name: resnet50()
    return C.Case(suite="train", name="resnet50", pass_="train_step", layer=f"{size}x{size}",
                  shape=shape, make=C._train_make("resnet50", shape, s), flops=flops,
                  images=s.batch, peak_memory=True, extra={"model": source})


def _cases(stage: str, s, dry: bool) -> list:
    from fusedres.bench import cases as C

    shapes = "tiny" if dry else "full"
    if stage == "ops":  # forward+backward first: they autotune the forward kernels too
        return sorted(C.ops_cases(s, shapes), key=lambda c: c.pass_ != "fwd+bwd")
    if stage == "conv":
        return [c for c in C.conv_cases(s, shapes) if (c.name, c.pass_) == ("conv", "fwd")]
    return [_train_case(s, dry)]


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("facts", "ops", "conv", "train"))
    p.add_argument("--out", required=True, help="JSON-lines file (appended)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no row that would end after this many seconds")
    p.add_argument("--providers", default=None,
                   help="comma-separated: eager and fusedres backends (default: " +
                        "; ".join(f"{k}: {v}" for k, v in DEFAULT_PROVIDERS.items()) + ")")
    p.add_argument("--batch", type=int, default=None, help="default: 256 on GPU, 2 on CPU")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--cases", default=None, metavar="REGEX",
                   help="only cases whose 'case pass layer' matches")
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=50.0)
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    if args.stage == "facts":
        return facts(args)
    return timed_stage(args.stage, args)


if __name__ == "__main__":
    sys.exit(main())

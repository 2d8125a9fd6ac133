"""``fusedres-bench`` / ``python -m fusedres.bench``: the command line.

    fusedres-bench ops|conv|blocks|train|all [options]
    fusedres-bench report [--results-dir benchmarks/results] [--output benchmarks/RESULTS.md]

Runs on whatever device is present and says what it skipped and why.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import shutil
import sys
import time
import traceback
from typing import Optional

import torch

# torch.utils.benchmark imports torch.utils.cpp_extension, whose import warns on every
# machine without a GPU ("No CUDA runtime is found"): noise above the table, not news.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

from . import cases as C  # noqa: E402
from . import doctor  # noqa: E402
from . import formulas, report, timing  # noqa: E402

SUITE_ORDER = ("ops", "conv", "blocks", "train")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


# Options that concern only some subcommands (every other option applies to all).
_IMAGE_SIZE_SUITES = ("conv", "train", "all")
_MEMORY_SAVING_SUITES = ("blocks", "train", "all")


def _common(p: argparse.ArgumentParser, command: str) -> None:
    where = p.add_argument_group("where and what")
    where.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where to run (auto: cuda when a GPU is present, else cpu)")
    where.add_argument("--dtype", default="auto", choices=("auto",) + tuple(DTYPES),
                       help="activation dtype (auto: bfloat16 on cuda, float32 on cpu); with "
                            "bfloat16/float16, BN parameters are fp32 and models run under "
                            "autocast")
    where.add_argument("--batch-size", type=int, default=None,
                       help="batch size (default: 256 on cuda; 8 on cpu, 4 with --quick)")
    where.add_argument("--layout", choices=("channels_last", "nchw"), default="channels_last")
    if command in _IMAGE_SIZE_SUITES:
        where.add_argument("--image-size", type=int, default=224,
                           help="image size for the conv shapes and the training step")
    where.add_argument("--threads", type=int, default=None,
                       help="CPU threads for torch (default on cpu: 1, steady figures per "
                            "core even on a machine shared with other work; 0: torch's own "
                            "choice)")
    where.add_argument("--seed", type=int, default=0)

    who = p.add_argument_group("providers")
    who.add_argument("--providers", default="eager,compile,fusedres",
                     help="comma-separated provider kinds: eager, compile, fusedres, tuned "
                          "(fusedres.convert + fusedres.tune on the case's input, blocks "
                          "and train only; its tuning is not timed and is cached)")
    who.add_argument("--backends", default="auto",
                     help="comma-separated fusedres backends to time (default: every "
                          "available backend that runs on the device; the Triton "
                          "interpreter never)")
    who.add_argument("--no-compile", action="store_true", help="skip torch.compile providers")
    who.add_argument("--max-autotune", action="store_true",
                     help="GPU: also time torch.compile(mode='max-autotune')")
    if command in _MEMORY_SAVING_SUITES:
        who.add_argument("--memory-saving", action="store_true",
                         help="also time fusedres.convert(..., memory_saving=True) "
                              "(providers fusedres-<backend>-memsave)")

    how = p.add_argument_group("cases and measurement")
    how.add_argument("--quick", action="store_true",
                     help="few shapes, short measurements (CI and smoke runs)")
    how.add_argument("--shapes", choices=("full", "quick", "tiny"), default=None,
                     help="shape set (default: quick with --quick, else full; tiny for "
                          "tests); also $FUSEDRES_BENCH_SHAPES")
    how.add_argument("--cases", metavar="REGEX", default=None,
                     help="only cases whose 'suite case pass layer' matches REGEX "
                          "(re.search), e.g. 'bn_add_relu fwd\\+bwd' or 'layer3'")
    how.add_argument("--time-budget", type=float, default=None,
                     help="seconds; cases not started by then are skipped (and reported)")
    how.add_argument("--no-graph", action="store_true", help="GPU: do not use CUDA graphs")

    out = p.add_argument_group("output")
    out.add_argument("--wide", action="store_true",
                     help="terminal table with every column on one line per row (p20-p80, "
                          "page faults, ...), however wide; the default fits 100 columns")
    out.add_argument("--json", metavar="PATH", help="write all rows and machine info as JSON")
    out.add_argument("--markdown", metavar="PATH", help="write a markdown report")
    out.add_argument("--plot", metavar="PATH", help="write a speedup-per-layer plot "
                                                    "(matplotlib)")
    out.add_argument("--strict", action="store_true",
                     help="exit with status 1 when a case raised an error (CI)")
    p.set_defaults(image_size=224, memory_saving=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedres-bench",
        description="Benchmark fusedres against eager PyTorch (cuDNN on GPU) and torch.compile.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {"ops": "memory-bound fused BN ops on the ResNet-50 activation shapes",
             "conv": "every distinct conv of ResNet-50, plain and fused",
             "blocks": "BasicBlock and Bottleneck forward+backward",
             "train": "resnet18/resnet50 training step and inference",
             "all": "ops, conv, blocks and train"}
    for name, text in helps.items():
        _common(sub.add_parser(name, help=text, description=text), name)
    rep = sub.add_parser("report", help="regenerate the results table from committed results",
                         description="Write a markdown table from the latest "
                                     "benchmarks/results/<gpu>-<date>/ JSON.")
    rep.add_argument("--results-dir", default="benchmarks/results")
    rep.add_argument("--output", default="benchmarks/RESULTS.md")
    doc = sub.add_parser("doctor", help="check every kernel of every backend here against "
                                        "the reference (run it first on a new machine)",
                         description=doctor.__doc__.split("\n\n")[0])
    doctor.add_arguments(doc)
    return parser


# --------------------------------------------------------------------------------------


class Progress:
    """Where the run is, on stderr: tqdm when it is installed and stderr is a terminal,
    else one line per case ("case k of N: ...", with the seconds so far)."""

    def __init__(self, total: int, cases: int = 0):
        self.bar = None
        self.cases, self.case_index, self.t0 = cases, 0, time.perf_counter()
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="case", dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def update(self, text: str):
        if self.bar is not None:
            self.bar.set_description_str(text[:60])
            self.bar.update(1)

    def case(self, label: str):
        self.case_index += 1
        text = (f"[fusedres-bench] case {self.case_index} of {self.cases}: {label} "
                f"({time.perf_counter() - self.t0:.0f} s)")
        if self.bar is not None:
            self.bar.set_postfix_str(f"case {self.case_index}/{self.cases}")
        else:
            self.write(text)

    def write(self, text: str):
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Run:
    def __init__(self, args):
        self.args = args
        self.skipped: list = []  # {"suite", "provider", "reason", "count"}
        self.errors: list = []
        self.notes: list = []
        self.rows: list = []

    def skip(self, suite: str, provider: str, reason: str) -> None:
        for s in self.skipped:
            if (s["suite"], s["provider"], s["reason"]) == (suite, provider, reason):
                s["count"] += 1
                return
        self.skipped.append({"suite": suite, "provider": provider, "reason": reason,
                             "count": 1})


def _device(args) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fusedres-bench: --device cuda but torch sees no GPU")
    return torch.device(args.device)


def _providers(args, device: torch.device, run: Run) -> list:
    """Providers in timing order: eager, fusedres backends, then torch.compile (the
    slowest to prepare), so a --time-budget cuts compile rows first."""
    from fusedres._backend import available_backends, backend_supports, triton_interpreted

    kinds = {k.strip() for k in args.providers.split(",") if k.strip()}
    unknown = kinds - {"eager", "compile", "fusedres", "tuned"}
    if unknown:
        raise SystemExit(f"fusedres-bench: unknown provider kind(s) {sorted(unknown)}")
    out = []
    if "eager" in kinds:
        out.append(C.Provider("eager", "eager"))
    if device.type == "cpu":
        run.notes.append("no GPU: cuda and triton providers not timed"
                         if not torch.cuda.is_available()
                         else "--device cpu: cuda and triton providers not timed")
    if "fusedres" in kinds:
        avail = available_backends()
        names = avail if args.backends == "auto" else [
            b.strip() for b in args.backends.split(",") if b.strip()]
        for b in names:
            prov = f"fusedres-{b}"
            if b == "triton" and device.type == "cpu":
                run.skip("all", prov, "Triton runs on the GPU: --device cpu"
                         if torch.cuda.is_available()
                         else "the Triton interpreter is never benchmarked"
                         + ("" if triton_interpreted() else " (and no GPU for Triton)"))
            elif b not in avail:
                run.skip("all", prov, f"backend not available here (available: {avail})")
            elif not backend_supports(b, device):
                run.skip("all", prov, f"backend {b!r} does not run on {device.type} tensors")
            else:
                out.append(C.Provider(prov, "fusedres", backend=b))
                if args.memory_saving:
                    out.append(C.Provider(prov + "-memsave", "fusedres", backend=b,
                                          memory_saving=True))
        if args.backends == "auto" and device.type == "cpu":
            for b in ("cuda", "triton"):
                if b not in names:
                    run.skip("all", f"fusedres-{b}", "no GPU" if not torch.cuda.is_available()
                             else "--device cpu")
    if "tuned" in kinds:
        out.append(C.Provider("fusedres-tuned", "tuned"))
    if "compile" in kinds:
        if args.no_compile:
            run.skip("all", "compile", "--no-compile")
        elif device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++")
                                           or shutil.which("clang++")):
            run.skip("all", "compile", "torch.compile on CPU needs a C++ compiler; none found")
        else:
            out.append(C.Provider("compile", "compile"))
        if args.max_autotune and not args.no_compile:
            if device.type == "cuda":
                out.append(C.Provider("compile-max-autotune", "compile", mode="max-autotune"))
            else:
                run.skip("all", "compile-max-autotune", "max-autotune is timed on GPU only")
    return out


def _dtype(args, device) -> torch.dtype:
    if args.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[args.dtype]


def _batch(args, device) -> int:
    if args.batch_size:
        return args.batch_size
    if device.type == "cuda":
        return 256
    return 4 if args.quick else 8


def _row(case: C.Case, provider: C.Provider, m: timing.Measurement, s: C.Settings,
         copy_gbps: Optional[float], commit: str) -> dict:
    secs = m.median_s
    derived = formulas.throughput(case.bytes if case.suite == "ops" else None,
                                  case.flops, secs, copy_gbps)
    return {
        "suite": case.suite, "case": case.name, "pass": case.pass_, "layer": case.layer,
        "shape": list(case.shape), "dtype": str(s.dtype).replace("torch.", ""),
        "layout": s.layout, "device": s.device.type, "provider": provider.name,
        "time_ms": secs * 1e3, "time_p20_ms": m.p20_s * 1e3, "time_p80_ms": m.p80_s * 1e3,
        "time_iqr_ms": m.iqr_s * 1e3, "samples": m.samples, "timer": m.timer,
        "timer_note": m.note or None,
        "bytes": case.bytes, "bytes_eager": case.bytes_eager,
        "gbps": derived["gbps"], "pct_copy_bw": derived["pct_copy_bw"],
        "copy_gbps": copy_gbps if case.suite == "ops" else None,
        "flops": case.flops, "tflops": derived["tflops"],
        "images_per_s": (case.images / secs) if case.images else None,
        "peak_mem_bytes": None, "peak_mem_kind": None,
        "retained_bytes": None, "retained_kind": None, "retained_vs_eager": None,
        "speedup_vs_eager": None, "page_faults_per_call": m.page_faults_per_call,
        "git_commit": commit, "extra": dict(case.extra),
    }


def _speedups(rows: list) -> None:
    eager = {}
    for r in rows:
        if r["provider"] == "eager":
            eager[(r["suite"], r["case"], r["pass"], r["layer"], tuple(r["shape"]))] = r
    for r in rows:
        e = eager.get((r["suite"], r["case"], r["pass"], r["layer"], tuple(r["shape"])))
        if e is not None and r["time_ms"] > 0:
            r["speedup_vs_eager"] = e["time_ms"] / r["time_ms"]
            r["speedup_range"] = [e["time_p20_ms"] / r["time_p80_ms"],
                                  e["time_p80_ms"] / r["time_p20_ms"]]
            r["speedup_clear"] = report.speedup_clear(r)
        if e is not None and r.get("retained_bytes") and e.get("retained_bytes"):
            r["retained_vs_eager"] = r["retained_bytes"] / e["retained_bytes"]


def _cleanup(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _result(run: Run, machine: dict, settings: dict, copy: dict, complete: bool) -> dict:
    return {"schema": report.SCHEMA, "complete": complete, "machine": machine,
            "settings": settings, "copy_bandwidth_gbps": copy.get("gbps"), "copy": copy,
            "notes": run.notes, "rows": run.rows, "skipped": run.skipped, "errors": run.errors}


def run_suites(args, suites: list) -> dict:
    t0 = time.perf_counter()
    device = _device(args)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    shapes = args.shapes or os.environ.get("FUSEDRES_BENCH_SHAPES") or (
        "quick" if args.quick else "full")
    s = C.Settings(device=device, dtype=_dtype(args, device), layout=args.layout,
                   batch=_batch(args, device), quick=args.quick, image_size=args.image_size,
                   compile_models_on_cpu=not args.quick)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    run = Run(args)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        run.notes.append("TRITON_INTERPRET=1: the Triton interpreter is never benchmarked")
    providers = _providers(args, device, run)
    all_cases = []
    for suite in suites:
        found = C.SUITES[suite](s, shapes)
        if not found and suite in ("blocks", "train"):
            run.skip(suite, "all", "torchvision is not installed")
        all_cases += found
    if args.cases:
        pattern = re.compile(args.cases)
        all_cases = [c for c in all_cases
                     if pattern.search(f"{c.suite} {c.name} {c.pass_} {c.layer}")]
    commit = report.git_commit()
    machine = report.machine_info(device, getattr(args, "argv", None))
    settings = {"device": device.type, "dtype": str(s.dtype).replace("torch.", ""),
                "layout": s.layout, "batch": s.batch, "quick": args.quick, "shapes": shapes,
                "image_size": s.image_size, "suites": suites,
                "providers": [p.name for p in providers], "time_budget_s": args.time_budget,
                "cuda_graphs": device.type == "cuda" and not args.no_graph}

    progress = Progress(len(all_cases) * len(providers) + 1, len(all_cases))
    copy = {}
    try:
        gbps, m, moved = timing.copy_bandwidth(device, quick=args.quick)
        copy = {"gbps": gbps, "bytes": moved, "time_ms": m.median_s * 1e3,
                "time_p20_ms": m.p20_s * 1e3, "time_p80_ms": m.p80_s * 1e3, "timer": m.timer}
    except Exception as exc:  # pragma: no cover - reported, not fatal
        run.errors.append({"suite": "copy", "case": "copy", "pass": "", "layer": "",
                           "provider": "torch", "error": f"{type(exc).__name__}: {exc}"})
    progress.update("copy bandwidth")

    progress.write(f"[fusedres-bench] {len(all_cases)} cases x {len(providers)} providers on "
                   f"{device.type} ({time.perf_counter() - t0:.0f} s so far)")
    def failed(case, provider, exc, label):
        if isinstance(exc, C.Skip):
            run.skip(case.suite, provider.name, str(exc))
            return
        text = str(exc).strip()
        msg = f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
        run.errors.append({"suite": case.suite, "case": case.name, "pass": case.pass_,
                           "layer": case.layer, "provider": provider.name, "error": msg,
                           "traceback": "".join(traceback.format_exception(
                               type(exc), exc, exc.__traceback__, limit=6))})
        progress.write(f"[fusedres-bench] error in {label}: {msg}")

    def copy_for(case):
        """ops: the bandwidth of a copy of one of the case's activations (same size, so
        the same caches help both); None when that cannot be measured."""
        if case.suite != "ops":
            return copy.get("gbps")
        n = 1
        for d in case.shape:
            n *= d
        try:
            return timing.copy_bandwidth_sized(n * s.dtype.itemsize, device, args.quick)
        except Exception:  # pragma: no cover - the row keeps GB/s without a percentage
            return None

    def add_row(case, provider, m, peak, retained):
        row = _row(case, provider, m, s, copy_for(case), commit)
        row["peak_mem_bytes"], row["peak_mem_kind"] = peak
        if retained is not None:  # blocks, training step: kept for backward
            row["retained_bytes"], row["retained_kind"] = retained
        run.rows.append(row)

    def save():
        if args.json:  # partial results survive a kill
            _speedups(run.rows)
            report.write_json(_result(run, machine, settings, copy, False), args.json)

    def label_of(case, provider):
        return f"{case.suite} {case.name} {case.pass_} {case.layer} / {provider.name}"

    def over_budget(case, provider):
        if args.time_budget is not None and time.perf_counter() - t0 > args.time_budget:
            run.skip(case.suite, provider.name, f"time budget of {args.time_budget:.0f} s spent")
            return True
        return False

    def memory_of(case, fn):
        """(peak, retained) of ``fn``, its first (warm-up) call included."""
        peak = timing.peak_memory(fn, device) if case.peak_memory else (None, None)
        retained = (timing.retained_bytes(fn.forward, device)
                    if hasattr(fn, "forward") else None)
        return peak, retained

    ours = [p for p in providers if p.kind in ("fusedres", "tuned")]
    theirs = [p for p in providers if p not in ours]

    def each_provider(case, work) -> bool:
        """``work(provider, fn)`` for each provider of ``case`` with a fresh ``fn``, one at
        a time (progress, time budget, errors reported, ``fn`` freed after), fusedres's
        first: when every one of them skips the case (nothing of fusedres runs it on this
        device), the others are not timed either and False says so."""
        skips = []  # (provider, Skip) of fusedres's: reported once it is known whether
        for provider in ours + theirs:  # the whole case is skipped
            if provider is (theirs[0] if theirs else None) and ours:
                if len(skips) == len(ours):
                    reason = "; ".join(dict.fromkeys(str(exc) for _, exc in skips))
                    run.skip(case.suite, "all", f"nothing of fusedres to compare on "
                             f"{device.type} ({reason})")
                    progress.write("[fusedres-bench]   skipped: nothing of fusedres runs it here")
                    return False
                for p, exc in skips:
                    failed(case, p, exc, label_of(case, p))
                skips = []
            progress.update(label_of(case, provider))
            if over_budget(case, provider):
                continue
            fn = None
            try:
                fn = case.make(provider)
                work(provider, fn)
            except C.Skip as exc:
                if provider in ours:
                    skips.append((provider, exc))
                else:
                    failed(case, provider, exc, label_of(case, provider))
            except Exception as exc:
                failed(case, provider, exc, label_of(case, provider))
            finally:
                del fn
                _cleanup(device)
        for p, exc in skips:  # no provider of another kind came after fusedres's
            failed(case, p, exc, label_of(case, p))
        return True

    def one_by_one(case):
        """GPU: each provider alone (CUDA events, graphs; its memory peak when warm)."""
        def work(provider, fn):
            m = timing.measure(fn, device, quick=args.quick,
                               use_graph=not args.no_graph and not provider.own_graphs)
            add_row(case, provider, m, *memory_of(case, fn))
            save()
        each_provider(case, work)

    def interleaved(case):
        """CPU: each provider's memory alone (peak RSS counts everything resident), then
        all of them built again and timed block by block in turn (timing.time_cpu_interleaved):
        ratios between rows of one case are measured under the same conditions."""
        memory = {}
        if not each_provider(case, lambda provider, fn: memory.__setitem__(
                provider.name, memory_of(case, fn))):
            return
        fns = {}
        for provider in providers:
            if provider.name in memory:
                try:
                    fns[provider.name] = case.make(provider)
                except Exception as exc:
                    failed(case, provider, exc, label_of(case, provider))
        min_time = float(os.environ.get("FUSEDRES_BENCH_CPU_MIN_TIME",
                                        0.1 if args.quick else 0.5))
        got, errors = timing.time_cpu_interleaved(fns, min_run_time=min_time)
        fns.clear()
        _cleanup(device)
        for provider in providers:
            if provider.name in got:
                add_row(case, provider, got[provider.name], *memory[provider.name])
            elif provider.name in errors:
                failed(case, provider, errors[provider.name], label_of(case, provider))
        save()

    # Case by case. On CPU the providers of a case are timed interleaved, block by block;
    # on GPU back to back (each with its own warm-up, graph capture and L2 flushes).
    for case in all_cases:
        progress.case(f"{case.suite} {case.name} {case.pass_} {case.layer}")
        (interleaved if device.type == "cpu" else one_by_one)(case)
    progress.close()

    order = {c.key: i for i, c in enumerate(all_cases)}
    porder = {p.name: i for i, p in enumerate(providers)}
    run.rows.sort(key=lambda r: (order.get((r["suite"], r["case"], r["pass"], r["layer"],
                                            tuple(r["shape"])), 0), porder[r["provider"]]))
    _speedups(run.rows)
    settings["wall_s"] = time.perf_counter() - t0
    return _result(run, machine, settings, copy, True)


def _print_summary(result: dict, wide: bool = False) -> None:
    m = result["machine"]
    say = (lambda text: print(text)) if wide else (lambda text: print(report.wrap(text)))
    say(f"fusedres-bench on {m['device_type']} ({m['device_name']}), torch {m['torch']}, "
        f"triton {m.get('triton')}, commit {m['git_commit'][:12]}, "
        f"{result['settings']['dtype']} {result['settings']['layout']} "
        f"batch {result['settings']['batch']}"
        + (f", {m['torch_threads']} CPU thread(s)" if m["device_type"] == "cpu" else ""))
    if result.get("copy_bandwidth_gbps"):
        say(f"device-copy bandwidth: {result['copy_bandwidth_gbps']:.1f} GB/s (read + write, "
            f"{result['copy']['bytes'] / 2**20:.0f} MiB); the ops' '% copy' is of a copy of "
            "one of their activations (same size)")
    print(report.text_table(result["rows"], wide=wide))
    over = [r for r in result["rows"] if (r.get("pct_copy_bw") or 0) > 100]
    if over:
        say(f"note: {len(over)} row(s) over 100% of a same-size copy: the bytes credited "
            "count each pass over a tensor (e.g. statistics, then normalise), and a tensor "
            "that fits in the cache is read again from there, which a copy's single pass "
            "cannot do")
    if any(r["provider"].startswith("compile") for r in result["rows"]):
        say("note: compile rows time torch.compile (default mode) of the same eager code, "
            "after compiling it" + (
                "; on CPU, Inductor's own kernels for one op's training forward and "
                "backward are the slow part, not per-call overhead (profiled in "
                "benchmarks/README.md)" if m["device_type"] == "cpu" else ""))
    for note in result["notes"]:
        say(f"note: {note}")
    for sk in result["skipped"]:
        n = f" ({sk['count']} cases)" if sk["count"] > 1 else ""
        say(f"skipped: {sk['suite']} / {sk['provider']}: {sk['reason']}{n}")
    for e in result["errors"]:
        say(f"error: {e['suite']} {e['case']} {e['pass']} {e['layer']} / {e['provider']}: "
            f"{e['error']}")
    unclear = report.unclear_rows(result["rows"])
    if unclear:
        say(f"note: {len(unclear)} of {sum(r['provider'] != 'eager' for r in result['rows'])}"
            f" ratios marked {report.unclear_note(result['settings'], m)}")
    say(f"{len(result['rows'])} rows, {sum(s['count'] for s in result['skipped'])} skipped, "
        f"{len(result['errors'])} errors in {result['settings']['wall_s']:.1f} s"
        + ("" if wide else "; --wide and --json give every column"))


def _report_cmd(args) -> int:
    text = report.results_markdown(args.results_dir)
    if report.NO_RESULTS in text:
        print(report.NO_RESULTS)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(text)
    print(f"wrote {args.output}")
    return 0


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = None if argv is None else [str(a) for a in argv]
    if args.command == "report":
        return _report_cmd(args)
    if args.command == "doctor":
        return doctor.main(args)
    suites = list(SUITE_ORDER) if args.command == "all" else [args.command]
    result = run_suites(args, suites)
    _print_summary(result, wide=args.wide)
    if args.json:
        report.write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(report.markdown(result))
        print(f"wrote {args.markdown}")
    if args.plot:
        why = report.plot(result, args.plot)
        print(f"--plot: {why}" if why else f"wrote {args.plot}")
    return 1 if args.strict and result["errors"] else 0

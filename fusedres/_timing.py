"""The timers that ``fusedres.tune`` decides with (the benchmark, ``fusedres.bench.timing``,
uses them too): part of the core package, so tuning never imports the benchmark.

``time_cuda``: CUDA events around each repetition, in the manner of
``triton.testing.do_bench`` (see its docstring). ``interleaved_samples``: repeated,
interleaved samples of several callables (CPU or GPU), from which ``tune`` takes a median
and a spread per candidate. ``spread``: the median and p20-p80 range of a list of samples.
"""
from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from typing import Callable, Optional

import torch


@dataclasses.dataclass
class Measurement:
    median_s: float
    p20_s: float
    p80_s: float
    iqr_s: float
    samples: int
    timer: str  # "cuda-events+graph", "cuda-events", "torch.utils.benchmark"
    note: str = ""
    # CPU: minor page faults per call while timed. Fresh memory (glibc hands large freed
    # buffers back to the OS) is faulted in page by page, which can double a row's time
    # between runs; this says how much of that a row paid.
    page_faults_per_call: Optional[float] = None


def _quantile(sorted_vals: list, q: float) -> float:
    """Linear-interpolation quantile of an already sorted list."""
    if not sorted_vals:
        return float("nan")
    pos = (len(sorted_vals) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _summary(times_s: list, timer: str, note: str = "") -> Measurement:
    t = sorted(times_s)
    return Measurement(median_s=statistics.median(t), p20_s=_quantile(t, 0.2),
                       p80_s=_quantile(t, 0.8), iqr_s=_quantile(t, 0.75) - _quantile(t, 0.25),
                       samples=len(t), timer=timer, note=note)


_FLUSH: dict = {}


def _l2_flush_buffer(device) -> torch.Tensor:
    """A buffer well over the L2 size (50 MB on H100, 60 MB on H200): 256 MiB."""
    key = str(device)
    if key not in _FLUSH:
        _FLUSH[key] = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)
    return _FLUSH[key]


def _capture(fn: Callable[[], object]):
    """A CUDA graph of ``fn`` and a replay callable, or (None, reason)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture needs
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        return graph, ""
    except Exception as exc:  # a host sync, a CPU scalar, an uncapturable library call
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        return None, f"no CUDA graph ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"


def time_cuda(fn: Callable[[], object], *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
              use_graph: bool = True, flush_l2: bool = True, min_reps: int = 10,
              max_reps: int = 1000) -> Measurement:
    """Median, p20 and p80 of ``fn`` on the current CUDA device, in seconds."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 3, 1e-3)

    run, timer, note = fn, "cuda-events", ""
    graph = None
    if use_graph:
        graph, note = _capture(fn)
        if graph is not None:
            run, timer = graph.replay, "cuda-events+graph"
    cache = _l2_flush_buffer(torch.device("cuda", torch.cuda.current_device())) \
        if flush_l2 else None

    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        run()
    torch.cuda.synchronize()
    reps = int(min(max(rep_ms / estimate_ms, min_reps), max_reps))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if cache is not None:
            cache.zero_()
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    del graph
    return _summary(times, timer, note)


def spread(samples) -> tuple[float, float, float]:
    """``(median, p20, p80)`` of a list of seconds (a single number: all three equal)."""
    if isinstance(samples, (int, float)):
        return float(samples), float(samples), float(samples)
    t = sorted(samples)
    return statistics.median(t), _quantile(t, 0.2), _quantile(t, 0.8)


def relative_spread(samples) -> float:
    """(p80 - p20) / median: how far one callable's own samples disagree."""
    med, lo, hi = spread(samples)
    return (hi - lo) / med if med > 0 else 0.0


def interleaved_samples(fns: dict, device: torch.device, *, rounds: int = 5,
                        max_rounds: int = 30, min_time: float = 0.02,
                        target_spread: float = 0.1, max_time: float = 1.0,
                        drop: float = 1.5, clock: Callable[[], float] = time.perf_counter
                        ) -> dict:
    """Samples (seconds) of each warm callable: ``{name: [s, ...]}``.

    Rounds run every live callable once, in a rotating order, so a machine whose speed
    drifts moves them alike. At least ``rounds`` rounds; more, up to ``max_rounds``,
    while a live callable's samples spread over ``target_spread`` of their median (a
    loaded machine) or it has run under ``min_time`` in all, until ``max_time`` seconds
    have gone. After three rounds a callable whose fastest sample is over ``drop`` x the
    slowest sample of the fastest one is dropped (slower beyond any noise seen; its
    samples are kept). GPU: each sample is the median of ``time_cuda``'s repetitions
    (CUDA events, no graph, no L2 flush: a site of a model runs warm and eagerly)."""
    samples: dict = {n: [] for n in fns}
    live = list(fns)
    t_start = clock()

    def one(name, r):
        if device.type == "cuda":
            # time_cuda's events and syncs are the current device's: on another device's
            # stream they would bracket none of the work (cuda:1 while cuda:0 is current)
            with torch.cuda.device(device):
                return time_cuda(fns[name], warmup_ms=5.0 if r == 0 else 1.0, rep_ms=5.0,
                                 use_graph=False, flush_l2=False, min_reps=5).median_s
        t0 = clock()
        fns[name]()
        return clock() - t0

    for r in range(max_rounds):
        shift = r % len(live)
        for name in live[shift:] + live[:shift]:
            samples[name].append(one(name, r))
        if r == 2 and len(live) > 1:
            fastest = min(live, key=lambda n: statistics.median(samples[n]))
            worst = max(samples[fastest])
            live = [n for n in live if min(samples[n]) <= drop * worst]
        if r + 1 < rounds:
            continue
        if clock() - t_start >= max_time:
            break
        if all(sum(samples[n]) >= min_time and relative_spread(samples[n]) <= target_spread
               for n in live):
            break
    return samples


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

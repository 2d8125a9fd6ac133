"""Timers: CUDA events on GPU, ``torch.utils.benchmark.Timer`` on CPU.

GPU (``time_cuda``), in the manner of ``triton.testing.do_bench``: the callable is run
until warm (compilation, autotuning, cuDNN/cuBLAS handles and workspaces stay out of
the numbers), captured into a CUDA graph when it can be (a host sync or anything else
that cannot be captured falls back to plain launches, and the row says so), then each
repetition is timed alone between two CUDA events, after zeroing a buffer larger than
the L2 cache (outside the events) so every repetition starts from a cold cache.
Reports the median with the 20th and 80th percentiles.

CPU (``time_cpu``): ``torch.utils.benchmark.Timer`` blocks (``Timer.timeit``) after one
warm-up call; median and interquartile range, plus the 20th/80th percentiles of the
blocks, and the minor page faults per call (``getrusage``) while timed.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Optional

import torch

# The timers live in the core package (fusedres.tune decides with them): re-exported here
from .._timing import (_FLUSH, Measurement, _capture, _l2_flush_buffer,  # noqa: F401
                       _quantile, _summary, time_cuda)


# Fewest timed blocks of a CPU row, however slow the call: a p20-p80 range (the noise
# a "vs eager" ratio is judged against) needs several samples.
MIN_CPU_SAMPLES = 3


def time_cpu(fn: Callable[[], object], *, min_run_time: float = 0.5, min_blocks: int = 5,
             max_run_time: Optional[float] = None, warm: bool = False) -> Measurement:
    """``torch.utils.benchmark.Timer`` median and IQR of ``fn`` on the CPU, in seconds.

    Blocks of ``number`` calls (enough for a block to last 1 ms) are timed with
    ``Timer.timeit`` until there are ``min_blocks`` of them and ``min_run_time`` has
    passed, or ``max_run_time`` has and there are ``MIN_CPU_SAMPLES`` blocks: the median
    of several blocks resists a machine shared with other work better than
    ``blocked_autorange``'s single block for slow calls.
    """
    got, errors = time_cpu_interleaved({"fn": fn}, min_run_time=min_run_time,
                                       min_blocks=min_blocks, max_run_time=max_run_time,
                                       warm=warm)
    if errors:
        raise errors["fn"]
    return got["fn"]


def time_cpu_interleaved(fns: dict, *, min_run_time: float = 0.5, min_blocks: int = 5,
                         max_run_time: Optional[float] = None, warm: bool = False
                         ) -> tuple[dict, dict]:
    """``time_cpu`` for several callables at once, their blocks in turn (round by round,
    every callable one block per round), so that a machine whose speed drifts (a shared
    VM, clocks, page-cache state) shifts all of them alike and a ratio between two of them
    means what it says; timed back to back instead, a few percent of drift between two
    rows is enough to invert a small speedup. Returns ``({name: Measurement}, {name:
    exception})``: a callable that raises is dropped from the rounds, the others go on.
    """
    from torch.utils.benchmark import Timer

    errors: dict = {}
    alive = dict(fns)

    def guarded(name, call):
        try:
            return call()
        except Exception as exc:  # reported per callable by the caller
            errors[name] = exc
            alive.pop(name, None)
            return None

    if not warm:
        for name, fn in list(alive.items()):
            guarded(name, fn)  # warm-up: first-call allocation, lazy init, compilation
    max_run_time = max(max_run_time or 4 * min_run_time, min_run_time)
    timers, number, times, total, calls, faults = {}, {}, {}, {}, {}, {}

    def block(name, n):
        f0 = _minor_faults()
        t = guarded(name, lambda: timers[name].timeit(n).mean)
        f1 = _minor_faults()
        if t is not None:
            calls[name] = calls.get(name, 0) + n
            total[name] = total.get(name, 0.0) + t * n
            if f0 is not None and f1 is not None:
                faults[name] = faults.get(name, 0) + f1 - f0
        return t

    for name in list(alive):
        timers[name] = Timer(stmt="fn()", globals={"fn": alive[name]},
                             num_threads=torch.get_num_threads())
        first = block(name, 1)
        if first is not None:
            number[name] = 1 if first >= 1e-3 else max(1, int(1e-3 / max(first, 1e-7)))
            times[name] = [first] if number[name] == 1 else []

    def done(name):
        k, spent = len(times[name]), total[name]
        return ((k >= min_blocks and spent >= min_run_time)
                or (k >= MIN_CPU_SAMPLES and spent >= max_run_time))

    while any(not done(name) for name in alive):
        for name in list(alive):  # a round: every callable, finished or not
            t = block(name, number[name])
            if t is not None:
                times[name].append(t)
    out = {}
    for name in alive:
        m = _summary(times[name], "torch.utils.benchmark"
                     + (f", interleaved with {len(fns) - 1} other(s)" if len(fns) > 1 else ""))
        if name in faults:
            m.page_faults_per_call = faults[name] / calls[name]
        out[name] = m
    return out, errors


def _minor_faults() -> Optional[int]:
    """Minor page faults of this process so far (None where getrusage is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(fn: Callable[[], object], device: torch.device, *, quick: bool = False,
            use_graph: bool = True, flush_l2: bool = True,
            cpu_min_run_time: Optional[float] = None, warm: bool = False,
            gpu_warmup_ms: Optional[float] = None) -> Measurement:
    """Time ``fn`` on ``device``; ``warm``: it has been called already (CPU: skip the
    warm-up call; the GPU timer always warms up, as capture needs, for ``gpu_warmup_ms``:
    default 25, 10 with ``quick``)."""
    if device.type == "cuda":
        if gpu_warmup_ms is None:
            gpu_warmup_ms = 10.0 if quick else 25.0
        return time_cuda(fn, warmup_ms=gpu_warmup_ms, rep_ms=40.0 if quick else 100.0,
                         use_graph=use_graph, flush_l2=flush_l2)
    if cpu_min_run_time is None:
        cpu_min_run_time = float(os.environ.get("FUSEDRES_BENCH_CPU_MIN_TIME",
                                                0.1 if quick else 0.5))
    return time_cpu(fn, min_run_time=cpu_min_run_time, warm=warm)


def copy_bandwidth(device: torch.device, quick: bool = False) -> tuple[float, Measurement, int]:
    """Device-copy bandwidth in GB/s (bytes read plus bytes written), measured now.

    GPU: a 1 GiB buffer copied into another (far over L2); CPU: 128 MiB (over any L3 of
    a machine this runs on; 64 MiB with --quick).
    """
    from .formulas import copy_bytes

    nbytes = (2**30 if device.type == "cuda" else (64 if quick else 128) * 2**20)
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_(-1, 1)
    dst = torch.empty_like(src)
    # GPU: copy for half a second before timing: an idle GPU's clocks ramp up over that
    # time, and the usual 25 ms warm-up measured an H200 at 2.76 TB/s, under what the BN
    # kernels timed right after it reached (2026-12-04 run)
    m = measure(lambda: dst.copy_(src), device, quick=quick, flush_l2=False,
                gpu_warmup_ms=500.0)
    moved = copy_bytes(n, torch.float32)
    del src, dst
    return moved / m.median_s / 1e9, m, moved


_SIZED_COPY: dict = {}


def copy_bandwidth_sized(nbytes: int, device: torch.device, quick: bool = False) -> float:
    """GB/s (read + written) of copying one buffer of ``nbytes``, timed as the ops are
    (GPU: the L2 flushed before each repetition; CPU: warm, caches as they are): the
    bandwidth an op on a tensor of that size is compared with. Measured once per size."""
    key = (device.type, nbytes)
    if key not in _SIZED_COPY:
        src = torch.empty(max(1, nbytes // 4), dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        m = measure(lambda: dst.copy_(src), device, quick=quick,
                    cpu_min_run_time=0.05 if quick else 0.2)
        _SIZED_COPY[key] = 2 * src.numel() * 4 / m.median_s / 1e9
        del src, dst
    return _SIZED_COPY[key]


# --------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------


def _rss_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[Optional[int], str]:
    """Peak memory of one call of ``fn``, in bytes, and what was measured.

    GPU: ``torch.cuda.max_memory_allocated`` (the caching allocator's peak of live
    tensors, the model and optimizer state included). CPU (Linux): the process's peak
    resident set during the call (VmHWM after resetting it through
    /proc/self/clear_refs), everything resident included.
    """
    if device.type == "cuda":
        _FLUSH.clear()  # the timer's L2-flush buffer is not the workload's memory
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        return None, "peak memory not measured on this CPU platform"
    fn()
    hwm = _rss_kib("VmHWM")
    if hwm is None:
        return None, "peak memory not measured on this CPU platform"
    return hwm * 1024, "process peak RSS (VmHWM)"


def retained_bytes(forward: Callable[[], object], device: torch.device
                   ) -> tuple[Optional[int], str]:
    """Bytes a forward pass leaves allocated: what autograd keeps for backward (saved
    activations, ReLU masks) plus the output. The number memory-saving fusion lowers,
    measured alike on every device: GPU, ``torch.cuda.memory_allocated`` after minus
    before; CPU, the net of the allocations torch's profiler records during the call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = forward()  # noqa: F841  (kept alive until measured)
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() - before, "torch.cuda.memory_allocated delta"
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU],
                                  profile_memory=True) as prof:
        out = forward()  # noqa: F841
    net = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_parent is None)
    return net, "net CPU allocations in the forward (torch.profiler)"


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null: the profiler's C++ side (kineto) prints start/stop
    lines there on every use, which no setting silences."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def wall(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t

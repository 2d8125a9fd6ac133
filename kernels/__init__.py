"""Triton kernels of fusedres, installed as ``fusedres.kernels``.

One file per fused-kernel family: ``bn.py`` (BN statistics, BN(+add)+ReLU apply and
their backward), ``conv.py`` (implicit-GEMM convolution with fused prologue/epilogue).
Importing this package does not import triton; each file does.
"""
import contextlib
import copy
import functools
import inspect
import json
import threading

import torch


def device_guard(t: torch.Tensor):
    """The current CUDA device set to ``t``'s for a launch (a Triton kernel launches on the
    current device: tensors on cuda:1 while cuda:0 is current would fault); nothing on
    CPU (the interpreter)."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def autotune(configs, key, **kwargs):
    """``triton.autotune`` with its choices kept on disk: each new shape (autotune key) is
    benchmarked once per machine rather than once per process -- a ResNet-50's first
    training step otherwise re-times every BN and conv kernel family at every layer
    shape -- and a later process runs the config the first one picked (the same bits,
    not a fresh timing-based choice). Triton (>= 3.3, ``cache_results``) calls the
    autotuner's ``check_disk_cache`` for each key it has no choice for; there are two
    stores, by the kind of config:

    * without a ``pre_hook`` (the BN kernels): Triton's own, in Triton's cache directory
      (``TRITON_CACHE_DIR``, else ``~/.triton/cache``);
    * with one (the conv and wgrad kernels: it sets the TMA descriptors' block shapes per
      config), which Triton does not keep ("We can't serialize prehooks"): fusedres's,
      ``_check_disk_cache``, in fusedres's cache directory (``fusedres._tune_cache``:
      ``$FUSEDRES_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusedres`` or
      ``~/.cache/fusedres``; ``FUSEDRES_CACHE=0`` turns it off), ``autotune-<hash>.json``.

    Neither runs under the interpreter (Triton turns ``cache_results`` off there)."""
    import triton

    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs.setdefault("cache_results", True)
    run = triton.autotune(configs=configs, key=key, **kwargs)
    if not any(c.pre_hook for c in configs):
        return run

    def decorator(fn):
        tuner = run(fn)
        tuner.check_disk_cache = functools.partial(_check_disk_cache, tuner)
        return tuner

    return decorator


# autotuner -> {device: the autotuner that launches there}; the first device: itself
_DEVICE_TUNERS: dict = {}


def tuner_for(tuner, device: str):
    """The autotuner of ``tuner``'s kernel for launches on ``device`` (its str): one table
    of choices per device. Triton keys a choice by the ``key=`` values and the dtypes
    only, but the configs offered depend on the device (the conv prune: its shared
    memory, wgmma) and the launchers size their workspaces from their own list: with one
    table a process with two kinds of GPU ran the first one's choice on the second, a
    config not offered there (and never asked the second one's disk store). The first
    device's is ``tuner``; the others', a shallow copy with an empty table, its own
    ``nargs``/``best_config`` and (``autotune``'s) disk store. Every conv/wgrad launch
    goes through ``conv._launch``, which runs and reads the device's own tuner."""
    tuners = _DEVICE_TUNERS.setdefault(tuner, {device: tuner})
    own = tuners.get(device)
    if own is None:
        own = copy.copy(tuner)
        own.cache = {}
        if isinstance(tuner.__dict__.get("check_disk_cache"), functools.partial):
            own.check_disk_cache = functools.partial(_check_disk_cache, own)
        tuners[device] = own
    return own


_TUNER_LOCKS: dict = {}  # autotuner -> its lock (``run_lock``)
_TUNER_LOCKS_GUARD = threading.Lock()


def run_lock(tuner) -> threading.Lock:
    """The lock under which a launch of ``tuner`` (a device's autotuner, ``tuner_for``)
    and the read of its ``best_config`` are one step: Triton's Autotuner keeps the last
    launch's choice in that one attribute and is not thread-safe, so two threads on one
    device could read each other's config (and size their workspaces by it)."""
    with _TUNER_LOCKS_GUARD:
        return _TUNER_LOCKS.setdefault(tuner, threading.Lock())


# (autotuner, device) -> its DecisionCache, or None where fusedres's cache is off
_AUTOTUNE_DISK: dict = {}


def _check_disk_cache(run, tuning_key, configs, bench_fn) -> bool:
    """``Autotuner.check_disk_cache`` for configs with a pre_hook (Triton 3.3-3.8 call it
    where ``run.cache`` has no choice for ``tuning_key``, with the configs left after
    pruning; True: ``run.cache[tuning_key]`` was filled from disk, no timing).

    The file (one per kernel and environment) is named by, and holds, the device name and
    capability, torch/CUDA/Triton versions, the fusedres build, the kernel's JIT cache
    key (its source and the ``@jit`` functions it calls) and every config it can run
    (``fusedres._tune_cache.environment``); an entry, by the key Triton formed (the
    values of the ``key=`` arguments and every tensor argument's dtype) and the configs
    offered. A hit whose config is not offered is a miss. A miss times the configs
    (``bench_fn``) and records the winner, except under CUDA-graph capture or
    torch.compile tracing. A damaged or foreign file is ignored with one warning and
    replaced by the next write; writes are atomic and merge with other processes'."""
    from fusedres import _tune_cache

    device = next((v.device for v in (run.nargs or {}).values() if isinstance(v, torch.Tensor)),
                  None)
    disk = _autotune_disk(run, device) if device is not None else None
    if disk is None:
        bench_fn()
        return False
    offered = {_config_name(c): c for c in configs}
    signature = {"op": run.base_fn.__name__, "shapes": [repr(v) for v in tuning_key],
                 "configs": _tune_cache.digest(sorted(offered))[:20]}
    entry = disk.get(signature)
    if entry is not None and entry["choice"] in offered:
        config = offered[entry["choice"]]
        run.cache[tuning_key] = config
        run.configs_timings = {config: entry.get("ms")}  # as Triton's own hit sets it
        return True
    bench_fn()
    if not tracing_or_capturing(device):
        best = run.cache[tuning_key]
        disk.put(signature, {"choice": _config_name(best),
                             "ms": getattr(run, "configs_timings", {}).get(best)})
        disk.save()
    return False


def _autotune_disk(run, device):
    """The DecisionCache of ``run`` on ``device`` (made once per process), None when
    fusedres's cache is off."""
    memo = (run, str(device))
    if memo not in _AUTOTUNE_DISK:
        from fusedres import _tune_cache

        directory = _tune_cache.cache_dir()
        disk = None
        if directory is not None:
            env = _tune_cache.environment(device, [_config_name(c) for c in run.configs])
            env.update(kernel=run.base_fn.__name__, source=_kernel_digest(run))
            disk = _tune_cache.DecisionCache(directory, env, owner="fusedres.kernels.autotune",
                                             prefix="autotune")
        _AUTOTUNE_DISK[memo] = disk
    return _AUTOTUNE_DISK[memo]


def _config_name(cfg) -> str:
    """What makes a config distinct to Triton (``Config.__eq__``: every launch option and
    the pre_hook), as text."""
    hook = cfg.pre_hook
    return json.dumps({**cfg.all_kwargs(), "pre_hook": getattr(hook, "__qualname__", hook)},
                      sort_keys=True, default=str)


def _kernel_digest(run) -> str:
    """The JIT function's cache key (its source and the ``@jit`` functions it calls);
    the source of the Python function where there is none (the interpreter)."""
    fn = run.fn
    while not hasattr(fn, "cache_key") and hasattr(fn, "fn"):
        fn = fn.fn
    text = getattr(fn, "cache_key", None)
    if isinstance(text, str):
        return text
    from fusedres import _tune_cache

    return _tune_cache.digest(inspect.getsource(run.base_fn))[:20]


def capturing(device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph (work made now only
    runs when the graph replays)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def tracing_or_capturing(device) -> bool:
    """Under torch.compile tracing or CUDA-graph capture: nothing is timed or recorded."""
    return torch.compiler.is_compiling() or capturing(device)

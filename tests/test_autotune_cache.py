"""The conv and wgrad autotuners' choices kept on disk (``fusedres.kernels.autotune``).

Triton keeps no autotune choice of configs with a ``pre_hook`` (``check_disk_cache``: "We
can't serialize prehooks"), and every conv/wgrad config has one (the TMA boxes), so
without fusedres's own store every process re-timed every conv shape. These tests run
Triton's real ``Autotuner`` (the installed Triton's) around a fake kernel on CPU, through
``kernels.conv._launch`` with the interpreter switched off: a "second process" is a fresh
autotuner with the module's memory cleared, over the same cache directory.
"""
import glob
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import KernelInterface

import fusedres.kernels as K
from fusedres.kernels import conv as kconv

ARG_NAMES = ["X", "GEMM_M", "MODE", "BLOCK_M", "BLOCK_N"]


class FakeKernel(KernelInterface):
    """What Triton's Autotuner reads of a JIT function: ``fn``, ``arg_names``, ``run`` and
    (on a GPU) ``cache_key``; ``run`` records each launch instead of running it."""

    def __init__(self, source="v1"):
        def kernel(X, GEMM_M, MODE, BLOCK_M, BLOCK_N):
            pass

        self.fn = kernel
        self.arg_names = ARG_NAMES
        self.cache_key = source
        self.launches = []

    def run(self, *args, grid, warmup, **kwargs):
        self.launches.append(dict(kwargs))


class Machine:
    """One process's kernel: a fresh autotuner (empty cache, the module's disk handles
    forgotten), its benchmark timings given by ``times`` per BLOCK_N."""

    def __init__(self, times, stages=(2, 3, 4), source="v1"):
        K._AUTOTUNE_DISK.clear()
        self.kernel = FakeKernel(source)
        self.hooked = []
        self.benched = []
        self.dropped = set()  # BLOCK_N the prune leaves out (as conv's prune by shape)
        self.configs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": n}, num_warps=4,
                                      num_stages=st, pre_hook=self.hook)
                        for n, st in zip((32, 64, 128), stages)]

        def bench(kernel_call, quantiles):
            kernel_call()
            block_n = self.kernel.launches[-1]["BLOCK_N"]
            self.benched.append(block_n)
            return [times[block_n]] * 3

        def prune(configs, nargs, **kwargs):
            return [c for c in configs if c.kwargs["BLOCK_N"] not in self.dropped]

        self.run = K.autotune(configs=self.configs, key=["GEMM_M", "MODE"], do_bench=bench,
                              prune_configs_by={"early_config_prune": prune})(self.kernel)
        assert isinstance(self.run, Autotuner)
        self.run.cache_results = True  # as on a GPU (Triton turns it off in the interpreter)

    def hook(self, nargs):  # as _tma_blocks: sets something from the config's tiles
        # (and when: the number of launches so far)
        self.hooked.append((nargs["BLOCK_M"], nargs["BLOCK_N"], len(self.kernel.launches)))

    def launch(self, gemm_m=256, mode=1, dtype=torch.float32, device="cpu"):
        self.kernel.launches.clear()
        x = torch.empty(4, dtype=dtype, device=device)
        return kconv._launch(self.run, self.configs, lambda meta: (1,), (x, gemm_m),
                             {"MODE": mode})


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setattr(kconv, "INTERPRET", False)
    monkeypatch.setenv("FUSEDRES_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FUSEDRES_CACHE", raising=False)
    yield tmp_path
    K._AUTOTUNE_DISK.clear()


FAST_64 = {32: 3.0, 64: 1.0, 128: 2.0}  # the autotuner picks BLOCK_N 64 (not the first)
FAST_128 = {32: 3.0, 64: 2.0, 128: 1.0}


def files(directory):
    return glob.glob(os.path.join(directory, "autotune-*.json"))


def test_second_process_runs_the_first_ones_choice(cache):
    first = Machine(FAST_64)
    got = first.launch()
    assert got == {"BLOCK_M": 64, "BLOCK_N": 64} and sorted(first.benched) == [32, 64, 128]
    (path,) = files(cache)
    (entry,) = json.load(open(path))["decisions"].values()
    assert json.loads(entry["choice"])["BLOCK_N"] == 64 and entry["ms"] == [1.0] * 3
    # recorded under the key Triton formed: the key= arguments' values, then the dtypes
    (key,) = first.run.cache
    assert key == (256, 1, "torch.float32") and entry["signature"]["shapes"] == [
        repr(v) for v in key]
    written = os.stat(path).st_mtime_ns
    first.launch()  # a tuned key in memory: no new timing, nothing rewritten
    assert len(first.benched) == 3 and os.stat(path).st_mtime_ns == written

    # another process, where the same timing would now pick BLOCK_N 128: it does not time,
    # and runs the recorded config, its pre_hook applied before the launch
    second = Machine(FAST_128)
    got = second.launch()
    assert second.benched == [] and got == {"BLOCK_M": 64, "BLOCK_N": 64}
    assert second.hooked == [(64, 64, 0)]  # before the one launch
    (launch,) = second.kernel.launches
    assert (launch["BLOCK_N"], launch["num_warps"], launch["num_stages"]) == (64, 4, 3)
    second.launch()  # and later launches of the key take it from memory
    assert second.benched == [] and second.hooked == [(64, 64, 0)] * 2
    # a new key (shape, mode or dtype) is timed there and added to the same file
    second.launch(gemm_m=512)
    second.launch(dtype=torch.float64)
    assert len(second.benched) == 6 and files(cache) == [path]
    assert len(json.load(open(path))["decisions"]) == 3


def test_each_device_keeps_its_own_choice(cache):
    """Two devices in one process (here cpu and meta) whose prunes offer different
    configs, as the conv prune does by the device's shared memory and wgmma: Triton keys
    its in-memory choices by the key= values and dtypes only, so the second device ran
    the first one's choice, a config not offered there (the launchers size workspaces
    from their own list). Each device now tunes (or reads its own disk store) apart."""
    m = Machine(FAST_64)
    m.run.early_config_prune = lambda configs, nargs, **kw: [
        c for c in configs if nargs["X"].device.type != "meta" or c.kwargs["BLOCK_N"] != 64]
    assert m.launch()["BLOCK_N"] == 64 and sorted(m.benched) == [32, 64, 128]
    assert m.launch(device="meta")["BLOCK_N"] == 128  # not offered 64: its own timing
    assert sorted(m.benched) == [32, 32, 64, 128, 128] and m.kernel.launches[-1]["BLOCK_N"] == 128
    assert m.launch()["BLOCK_N"] == 64 and m.launch(device="meta")["BLOCK_N"] == 128
    assert len(m.benched) == 5  # each device's choice kept in memory
    # a later process reads each device's choice from that device's store
    second = Machine(FAST_128)
    second.run.early_config_prune = m.run.early_config_prune
    assert second.launch(device="meta")["BLOCK_N"] == 128 and second.launch()["BLOCK_N"] == 64
    assert second.benched == [] and len(files(cache)) == 2


@pytest.mark.parametrize("change", ["config list", "kernel source", "choice not offered",
                                    "other configs offered"])
def test_a_changed_kernel_or_config_list_misses(cache, change):
    Machine(FAST_64).launch()
    same = Machine(FAST_128)  # unchanged: a hit
    assert same.launch()["BLOCK_N"] == 64 and same.benched == []
    # "config list": one config of the kernel's list changed (not the one chosen)
    again = Machine(FAST_128, stages=(2, 3, 5) if change == "config list" else (2, 3, 4),
                    source="v2" if change == "kernel source" else "v1")
    # what the prune offers this key changed: without the recorded BLOCK_N 64, or without
    # another one (a choice among other configs: timed again)
    again.dropped = {"choice not offered": {64}, "other configs offered": {32}}.get(change, set())
    got = again.launch()
    assert got["BLOCK_N"] == 128 and len(again.benched) == 3 - len(again.dropped)


@pytest.mark.parametrize("edit", ["unknown config", "config not offered"])
def test_never_a_config_that_is_not_offered(cache, edit):
    """A recorded choice (a hand-edited or foreign entry) that names a config this kernel
    does not have (ignored with a warning), or one its prune does not offer this key, is
    not run: the key is timed afresh."""
    first = Machine(FAST_64)
    first.dropped = {32}
    first.launch()
    (path,) = files(cache)
    data = json.load(open(path))
    for entry in data["decisions"].values():
        entry["choice"] = (entry["choice"].replace('"BLOCK_N": 64', '"BLOCK_N": 16')
                           if edit == "unknown config" else K._config_name(first.configs[0]))
    json.dump(data, open(path, "w"))
    again = Machine(FAST_128)
    again.dropped = {32}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert again.launch()["BLOCK_N"] == 128
    assert again.benched == [64, 128] and again.hooked[-1] == (64, 128, 2)
    stale = [w for w in seen if "stale cache entry" in str(w.message)]
    assert len(stale) == (edit == "unknown config")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong format"])
def test_corrupt_file_warns_once_and_autotunes(cache, damage):
    Machine(FAST_64).launch()
    (path,) = files(cache)
    text = open(path).read()
    with open(path, "w") as f:
        f.write({"garbage": "\x00 not json", "truncated": text[: len(text) // 2],
                 "wrong format": json.dumps({"format": 999})}[damage])
    again = Machine(FAST_128)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert again.launch()["BLOCK_N"] == 128
    assert len(again.benched) == 3
    (warned,) = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    assert "ignoring the decision cache" in warned
    third = Machine(FAST_64)  # the file was replaced whole: the next process hits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert third.launch()["BLOCK_N"] == 128 and third.benched == []


def test_off_switch_writes_nothing(cache, monkeypatch):
    monkeypatch.setenv("FUSEDRES_CACHE", "0")
    Machine(FAST_64).launch()
    assert os.listdir(cache) == []
    again = Machine(FAST_64)
    again.launch()
    assert len(again.benched) == 3
    monkeypatch.delenv("FUSEDRES_CACHE")  # on again: the same launch writes
    Machine(FAST_64).launch()
    assert len(files(cache)) == 1


def test_tracing_or_capture_reads_but_writes_nothing(cache, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    first = Machine(FAST_64)
    first.launch()
    assert len(first.benched) == 3 and files(cache) == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    Machine(FAST_64).launch()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    inside = Machine(FAST_128)
    assert inside.launch()["BLOCK_N"] == 64 and inside.benched == []


def test_deterministic_mode_and_interpreter_keep_the_pinned_config(cache, monkeypatch):
    """Neither reads nor writes the cache: the first config runs."""
    Machine(FAST_64).launch()  # a recorded choice: BLOCK_N 64
    old = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        pinned = Machine(FAST_128)
        assert pinned.launch(gemm_m=512)["BLOCK_N"] == 32 and pinned.launch()["BLOCK_N"] == 32
    finally:
        torch.use_deterministic_algorithms(old)
    assert pinned.benched == [] and pinned.run.cache == {}
    assert len(json.load(open(files(cache)[0]))["decisions"]) == 1


_REAL_AUTOTUNERS = """
import functools, sys
from triton.runtime.autotuner import Autotuner
import fusedres.kernels as K, fusedres.kernels.conv as c
for run in (c._conv_run, c._wgrad_run):
    assert isinstance(run, Autotuner) and isinstance(run.cache, dict), run
    assert run.cache_results is True, run
    assert isinstance(run.check_disk_cache, functools.partial), run
    assert set(run.keys) <= set(run.arg_names) and len(run.configs) > 1, run
    assert all(cfg.pre_hook is not None for cfg in run.configs), run
    assert len({K._config_name(cfg) for cfg in run.configs}) == len(run.configs), run
    assert K._kernel_digest(run) == run.fn.cache_key, run
    print(run.base_fn.__name__)
"""


def test_the_real_autotuners_use_this_cache():
    """``_conv_run`` / ``_wgrad_run`` as built on a GPU (a subprocess without the
    interpreter): Triton Autotuners whose every config has a pre_hook (why Triton keeps
    none of their choices) and whose check_disk_cache is fusedres's, with Triton's
    ``cache_results`` on (else Triton never calls it); their key arguments are all kernel
    arguments (else Triton drops them from its key silently) and their JIT function has
    the cache key the environment holds. The BN kernels' configs have no pre_hook: they
    keep Triton's own disk cache."""
    import inspect

    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", _REAL_AUTOTUNERS], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["_conv_kernel", "_conv_wgrad_kernel"], out.stdout
    plain = K.autotune(configs=[triton.Config({"BLOCK_N": n}) for n in (32, 64)],
                       key=["GEMM_M"])(FakeKernel())
    assert "check_disk_cache" not in vars(plain)
    # the installed Triton still gives up on pre_hooks (else this store duplicates its own)
    # and still asks check_disk_cache (else this store is never read)
    assert "pre_hook" in inspect.getsource(Autotuner.check_disk_cache)
    assert "self.check_disk_cache(" in inspect.getsource(Autotuner.run)

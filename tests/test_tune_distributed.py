"""fusedres.tune under torch.distributed (2 CPU processes, gloo): every rank runs the
recording forward (collectives stay matched), rank 0 alone decides, and every rank
installs rank 0's decisions (broadcast_object_list) -- even where the other ranks' own
timings would have chosen otherwise; a failure on rank 0 reaches every rank instead of
leaving them waiting in the broadcast.

One spawn of two workers runs every scenario (process start-up is most of the cost); each
test reads its scenario's results. A hang cannot outlive the process group's timeout
(``PG_TIMEOUT_S``) nor the parent's deadline (``DEADLINE_S``, then the workers are killed).
"""
import datetime
import multiprocessing
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist

import fusedres
from fusedres import nn as fnn
from models import CifarResNet

WORLD = 2
PG_TIMEOUT_S = 20  # a collective waiting longer than this raises on its rank
DEADLINE_S = 180  # the whole spawn; only reached when something hangs


def _timer(rank, calls, fail=False):
    """A fake timer (``tune(timer=...)``): the fastest candidate alternates with each
    timed signature, in opposite phase on rank 0 and rank 1, so the two ranks' own
    decisions would differ at every site."""
    def timer(fns, device):
        calls.append(sorted(fns))
        if fail:
            raise RuntimeError("the timer broke on rank 0")
        fast = "reference" if (len(calls) + rank) % 2 else "torch"
        return {n: (1.0 if n == fast else 2.0) for n in fns}
    return timer


def _model(**convert_kw):
    torch.manual_seed(0)
    return fusedres.convert(CifarResNet((1, 1, 1)).train(), **convert_kw)


def _state(model):
    """Per BN: the plan in force, and the tuned choice and source (None if untuned)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            info = getattr(m, "fusedres_tuning", None)
            out[name] = {"plan": repr(fnn.site_plan(m)),
                         "choice": info and info["choice"], "source": info and info["source"]}
    return out


def _scenario(results, name, fn):
    t0 = time.perf_counter()
    try:
        results[name] = dict(fn(), error=None)
    except Exception as exc:  # noqa: BLE001  (reported by the test that reads it)
        results[name] = {"error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()}
    results[name]["seconds"] = time.perf_counter() - t0


def _worker(rank, init_file, result_dir, sync_backend):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(rank))
    kw = dict(cache=False, verbose=False, candidates=("reference",))
    results = {}

    def plain():
        calls = []
        m = fusedres.tune(_model(), x, timer=_timer(rank, calls), **kw)
        return {"state": _state(m), "calls": len(calls)}

    def sync_bn():  # the recording forward all-gathers statistics: every rank must run it
        calls = []
        m = fusedres.tune(_model(backend=sync_backend, sync_bn=True), x,
                          timer=_timer(rank, calls), **kw)
        return {"state": _state(m), "calls": len(calls)}

    def rank0_fails():
        fusedres.tune(_model(), x, timer=_timer(rank, [], fail=rank == 0), **kw)
        return {}

    _scenario(results, "plain", plain)
    _scenario(results, "sync_bn", sync_bn)
    _scenario(results, "rank0_fails", rank0_fails)
    torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    # collectives still matched after all of it; then leave without gloo's racy
    # teardown (see tests/test_distributed.py, _leave)
    dist.barrier()
    os._exit(0)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Runs the workers once: ``{"results": [rank 0's, rank 1's] (None where a rank wrote
    none), "exitcodes": [...], "hung": [ranks killed at the deadline]}``."""
    tmp = tmp_path_factory.mktemp("tune_dist")
    sync_backend = "cpu" if "cpu" in fusedres.available_backends() else "reference_primitives"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(tmp / "init"), str(tmp), sync_backend))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    files = [tmp / f"rank{r}.pt" for r in range(WORLD)]
    return {"results": [torch.load(f) if f.exists() else None for f in files],
            "exitcodes": [p.exitcode for p in procs], "hung": hung}


@pytest.fixture
def ranks(spawned):
    missing = [r for r, res in enumerate(spawned["results"]) if res is None]
    assert not missing, f"ranks {missing} wrote no results (exit codes {spawned['exitcodes']})"
    return spawned["results"]


def _ok(result):
    assert result["error"] is None, result.get("traceback", result["error"])
    return result


def test_workers_finish_together(spawned):
    # no collective hung, and after every scenario the ranks still met at a barrier
    assert not spawned["hung"], \
        f"ranks {spawned['hung']} still running after {DEADLINE_S} s: a collective hung"
    assert spawned["exitcodes"] == [0] * WORLD, spawned["exitcodes"]


def test_every_rank_installs_rank0_decisions(ranks):
    r0, r1 = _ok(ranks[0]["plain"]), _ok(ranks[1]["plain"])
    tuned = {n: s for n, s in r0["state"].items() if s["choice"] is not None}
    # rank 0's timer made both candidates win somewhere: the decisions are per site
    assert {s["choice"] for s in tuned.values()} == {"torch", "reference"}, r0["state"]
    assert all(s["source"] == "measured" for s in tuned.values())
    assert r0["calls"] > 1
    # rank 1 decided nothing itself (its timer, which disagrees, never ran) and runs
    # exactly rank 0's plans, site by site
    assert r1["calls"] == 0
    assert r1["state"].keys() == r0["state"].keys()
    for name, s0 in r0["state"].items():
        s1 = r1["state"][name]
        assert (s1["plan"], s1["choice"]) == (s0["plan"], s0["choice"]), (name, s0, s1)
        if s0["choice"] is not None:
            assert s1["source"] == "rank 0" and s0["plan"] != repr(fnn.SitePlan()), name


def test_sync_bn_sites_record_on_every_rank(ranks):
    # rank 0's recording forward all-gathers with rank 1's: had rank 1 skipped it, rank 0
    # would have timed out; synchronised sites are never tuned, on any rank
    r0, r1 = _ok(ranks[0]["sync_bn"]), _ok(ranks[1]["sync_bn"])
    assert r0["calls"] == 0 and r1["calls"] == 0
    assert r0["state"] and r1["state"].keys() == r0["state"].keys()
    sites = {n for n, s in r0["state"].items() if s["source"] is not None}
    assert sites, r0["state"]
    for name in sites:
        assert r0["state"][name]["source"] == "not tuned: synchronised batch statistics"
        assert r1["state"][name]["source"] == "rank 0"
        assert r0["state"][name]["choice"] is None and r1["state"][name]["choice"] is None
        assert r1["state"][name]["plan"] == r0["state"][name]["plan"] == repr(fnn.SitePlan())


def test_rank0_failure_reaches_every_rank(ranks):
    r0, r1 = ranks[0]["rank0_fails"], ranks[1]["rank0_fails"]
    assert r0["error"] == "RuntimeError: the timer broke on rank 0", r0
    # rank 1 learns of it from the broadcast, at once, not from the group's timeout
    assert r1["error"] is not None and "rank 0" in r1["error"] \
        and "the timer broke" in r1["error"], r1
    assert r1["seconds"] < PG_TIMEOUT_S / 2, r1

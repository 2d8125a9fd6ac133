"""pytest-benchmark front end for the cases of ``fusedres.bench`` (the same cases as
``fusedres-bench``). Run: ``pytest benchmarks/ --benchmark-json out.json``.

Settings come from the environment (defaults in brackets):
FUSEDRES_BENCH_DEVICE [auto], FUSEDRES_BENCH_DTYPE [auto: bfloat16 on cuda, float32 on
cpu], FUSEDRES_BENCH_BATCH [256 on cuda, 4 on cpu], FUSEDRES_BENCH_LAYOUT
[channels_last], FUSEDRES_BENCH_SHAPES [quick; full or tiny], FUSEDRES_BENCH_PROVIDERS
[eager,compile,fusedres], FUSEDRES_BENCH_BACKENDS [auto].
"""
import os

import pytest
import torch

from fusedres.bench import cases as C
from fusedres.bench import cli, formulas

pytest.importorskip("pytest_benchmark")


def _args():
    argv = ["ops", "--device", os.environ.get("FUSEDRES_BENCH_DEVICE", "auto"),
            "--dtype", os.environ.get("FUSEDRES_BENCH_DTYPE", "auto"),
            "--layout", os.environ.get("FUSEDRES_BENCH_LAYOUT", "channels_last"),
            "--providers", os.environ.get("FUSEDRES_BENCH_PROVIDERS", "eager,compile,fusedres"),
            "--backends", os.environ.get("FUSEDRES_BENCH_BACKENDS", "auto"), "--quick"]
    if os.environ.get("FUSEDRES_BENCH_BATCH"):
        argv += ["--batch-size", os.environ["FUSEDRES_BENCH_BATCH"]]
    return cli.build_parser().parse_args(argv)


_ARGS = _args()
DEVICE = cli._device(_ARGS)
SETTINGS = C.Settings(device=DEVICE, dtype=cli._dtype(_ARGS, DEVICE), layout=_ARGS.layout,
                      batch=cli._batch(_ARGS, DEVICE), quick=True,
                      compile_models_on_cpu=DEVICE.type == "cuda")
SHAPES = os.environ.get("FUSEDRES_BENCH_SHAPES", "quick")
_RUN = cli.Run(_ARGS)
PROVIDERS = cli._providers(_ARGS, DEVICE, _RUN)
SKIPPED = {s["provider"]: s["reason"] for s in _RUN.skipped}


def params(suite):
    """(case, provider) pairs of a suite, with readable ids."""
    out = []
    for case in C.SUITES[suite](SETTINGS, SHAPES):
        for p in PROVIDERS:
            cid = f"{case.name}-{case.pass_}-{case.layer}-{'x'.join(map(str, case.shape))}"
            out.append(pytest.param(case, p, id=f"{cid}-{p.name}".replace(" ", "_")))
    return out


def run_case(benchmark, case, provider):
    try:
        fn = case.make(provider)
    except C.Skip as exc:
        pytest.skip(str(exc))
    if DEVICE.type == "cuda":
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()
    fn()  # warm-up: compilation, autotuning, first-call allocation
    benchmark.group = f"{case.suite} {case.name} {case.pass_} {case.layer}"
    benchmark.extra_info.update(
        suite=case.suite, case=case.name, pass_=case.pass_, layer=case.layer,
        shape=list(case.shape), provider=provider.name, dtype=str(SETTINGS.dtype),
        layout=SETTINGS.layout, device=DEVICE.type, bytes=case.bytes,
        bytes_eager=case.bytes_eager, flops=case.flops, images=case.images)
    slow = case.suite in ("blocks", "train")
    benchmark.pedantic(fn, rounds=(3 if DEVICE.type == "cpu" else 10) if slow else 20,
                       iterations=1, warmup_rounds=0 if slow else 1)
    if not getattr(benchmark, "stats", None):  # --benchmark-disable: ran once, no stats
        return
    median = benchmark.stats.stats.median
    d = formulas.throughput(case.bytes if case.suite == "ops" else None, case.flops, median,
                            None)
    benchmark.extra_info.update(gbps=d["gbps"], tflops=d["tflops"],
                                images_per_s=case.images / median if case.images else None)

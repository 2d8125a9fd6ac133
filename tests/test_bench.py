"""The benchmark suite: byte/FLOP formulas against hand counts, the JSON schema of very
short in-process runs, skip reasons, and the results-table generator. Fast (CPU, tiny
shapes, no torch.compile)."""
import contextlib
import io
import json
import mmap
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
import torch

import fusedres
from fusedres.bench import cases, formulas, main, report

# --------------------------------------------------------------------------------------
# Formulas against hand counts
# --------------------------------------------------------------------------------------


def test_bn_relu_bytes_hand_count():
    # (8, 64, 56, 56) fp32: S = 8*64*56*56 elements * 4 bytes = 6,422,528 bytes.
    shape, s = (8, 64, 56, 56), 6_422_528
    assert formulas.activation_bytes(shape, torch.float32) == s
    # fused fwd: stats 1R + apply 1R+1W = 3S; eager: stats, normalise, relu = 5S
    assert formulas.op_bytes("bn_relu", "fwd", shape, torch.float32) == 19_267_584 == 3 * s
    assert formulas.op_bytes("bn_relu", "fwd", shape, torch.float32, "eager") == 5 * s
    # fwd+bwd: fused 3S + (reduce 2R + elementwise 2R+1W = 5S); eager 5S + 8S
    assert formulas.op_bytes("bn_relu", "fwd+bwd", shape, torch.float32) == 8 * s
    assert formulas.op_bytes("bn_relu", "fwd+bwd", shape, torch.float32, "eager") == 13 * s


def test_residual_ops_bytes_hand_count():
    # (2, 256, 14, 14) fp16: 100,352 elements, S = 200,704 bytes, 1-bit mask 12,544 bytes
    shape, s, mask = (2, 256, 14, 14), 200_704, 12_544
    assert formulas.mask_bytes(shape) == mask
    assert formulas.op_bytes("bn_add_relu", "fwd", shape, torch.float16) == 4 * s
    assert formulas.op_bytes("bn_add_relu", "fwd", shape, torch.float16, "eager") == 8 * s
    # 4S fwd + 6S bwd, the mask written once and read once
    assert formulas.op_bytes("bn_add_relu", "fwd+bwd", shape, torch.float16) == \
        10 * s + 2 * mask == 2_032_128
    assert formulas.op_bytes("dual_bn_add_relu", "fwd", shape, torch.bfloat16) == 5 * s
    assert formulas.op_bytes("dual_bn_add_relu", "fwd", shape, torch.bfloat16, "eager") == 11 * s
    assert formulas.op_bytes("dual_bn_add_relu", "fwd+bwd", shape, torch.bfloat16) == \
        15 * s + 4 * mask
    with pytest.raises(ValueError):
        formulas.op_bytes("bn_tanh", "fwd", shape, torch.float32)


def test_conv_flops_hand_count():
    # 3x3 conv 64->64, pad 1, on (8, 64, 56, 56): 8*64*56*56 outputs x 64*9 MACs x 2
    assert formulas.conv_out_hw(56, 56, 3, 1, 1) == (56, 56)
    fwd = formulas.conv2d_flops(8, 64, 64, 56, 56, 3)
    assert fwd == 2 * 8 * 64 * 56 * 56 * 64 * 9 == 1_849_688_064
    assert formulas.conv2d_flops(8, 64, 64, 56, 56, 3, pass_="fwd+bwd") == 3 * fwd
    assert formulas.conv2d_flops(8, 64, 64, 56, 56, 3, pass_="fwd+bwd", input_grad=False) == \
        2 * fwd
    # the ResNet-50 stem: 7x7/2 3->64 on 224x224 -> 112x112, 118 M MACs per image
    assert formulas.conv_out_hw(224, 224, 7, 2, 3) == (112, 112)
    assert formulas.conv2d_flops(1, 3, 64, 112, 112, 7) == 236_027_904
    # least bytes: input + weight + output, fp16
    assert formulas.conv2d_bytes(1, 64, 64, 56, 56, 56, 56, 3, torch.float16) == \
        2 * (64 * 56 * 56 + 64 * 64 * 9 + 64 * 56 * 56)


def test_throughput_and_copy():
    assert formulas.copy_bytes(1000, torch.float32) == 8000
    d = formulas.throughput(2_000_000_000, None, 0.5, 8.0)
    assert d["gbps"] == pytest.approx(4.0) and d["pct_copy_bw"] == pytest.approx(50.0)
    assert d["tflops"] is None
    assert formulas.throughput(None, 3e12, 2.0, None)["tflops"] == pytest.approx(1.5)


def test_resnet50_convs_and_model_flops():
    convs = cases.resnet50_convs()
    assert sum(c.count for c in convs) == 53  # 1 stem + 16 blocks x 3 + 4 downsamples
    assert len(convs) == len({(c.c_in, c.c_out, c.kernel, c.stride, c.h) for c in convs})
    assert convs[0].layer == "conv1" and convs[0].h_out == 112
    assert {c.h_out for c in convs} == {112, 56, 28, 14, 7}
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        net = tv.models.resnet50()
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    assert n_convs == 53
    # torchvision quotes 4.09 G multiply-adds per 224x224 image for ResNet-50
    flops = formulas.model_flops(net, torch.empty(1, 3, 224, 224))
    assert 2 * 4.08e9 < flops < 2 * 4.12e9
    train = formulas.model_flops(net, torch.empty(1, 3, 224, 224), "fwd+bwd")
    stem = formulas.conv2d_flops(1, 3, 64, 112, 112, 7)
    assert train == 3 * flops - stem  # no data gradient for the images


def test_ops_shapes_cover_resnet50():
    ops = {(op, c, h) for op, _, c, h in cases.RESNET50_OPS}
    assert {c for _, c, _ in ops} == {64, 128, 256, 512, 1024, 2048}
    assert {h for _, _, h in ops} == {112, 56, 28, 14, 7}
    for op in formulas.OPS:
        assert any(o == op for o, _, _ in ops)


# --------------------------------------------------------------------------------------
# Very short runs, in process
# --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _short_cpu_timing():
    """Short CPU measurements: these tests check plumbing, not speed."""
    old = os.environ.get("FUSEDRES_BENCH_CPU_MIN_TIME")
    os.environ["FUSEDRES_BENCH_CPU_MIN_TIME"] = "0.02"
    yield
    if old is None:
        del os.environ["FUSEDRES_BENCH_CPU_MIN_TIME"]
    else:
        os.environ["FUSEDRES_BENCH_CPU_MIN_TIME"] = old


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    paths = {k: str(d / f"out.{k}") for k in ("json", "md", "png")}
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["all", "--quick", "--shapes", "tiny", "--device", "cpu", "--batch-size",
                   "2", "--no-compile", "--json", paths["json"], "--markdown", paths["md"],
                   "--plot", paths["png"]])
    assert rc == 0
    paths["stdout"], paths["stderr"] = out.getvalue(), err.getvalue()
    with open(paths["json"]) as f:
        return json.load(f), paths


def test_json_schema(tiny_run):
    data, paths = tiny_run
    assert data["schema"] == report.SCHEMA and data["complete"] is True
    m = data["machine"]
    for key in ("date", "command", "git_commit", "device_type", "device_name", "cpu", "gpu",
                "driver", "torch", "triton", "fusedres_backends", "cpu_isa"):
        assert key in m
    assert m["cpu_isa"] == fusedres.cpu_isa()
    assert m["torch"] == torch.__version__ and m["command"].startswith("fusedres-bench all")
    assert data["copy_bandwidth_gbps"] > 0
    rows = data["rows"]
    # on CPU nothing of fusedres runs a conv (its backends there run F.conv2d): the conv
    # suite is skipped with a line saying why, not timed as eager vs compile
    gpu = torch.cuda.is_available()
    assert {r["suite"] for r in rows} == {"ops", "blocks", "train"} | ({"conv"} if gpu else set())
    if not gpu:
        assert any(sk["suite"] == "conv" and sk["provider"] == "all"
                   and sk["reason"].startswith("nothing of fusedres to compare on cpu (")
                   for sk in data["skipped"]), data["skipped"]
        assert "skipped: conv / all: nothing of fusedres to compare on cpu" in paths["stdout"]
        assert not [sk for sk in data["skipped"] if sk["suite"] == "conv"
                    and sk["provider"].startswith("fusedres-")]  # said once, for the suite
    for r in rows:
        assert set(report.ROW_KEYS) <= set(r), set(report.ROW_KEYS) - set(r)
        assert r["time_ms"] > 0 and r["time_p20_ms"] <= r["time_p80_ms"]
        assert r["git_commit"] and r["device"] == "cpu" and r["dtype"] == "float32"
        if r["suite"] == "ops":
            assert r["gbps"] > 0 and r["pct_copy_bw"] > 0 and r["bytes"] > 0
            # % of a copy of one activation of this size, not of the 64 MiB copy
            assert r["copy_gbps"] > 0 and r["copy_gbps"] != data["copy_bandwidth_gbps"]
            assert r["pct_copy_bw"] == pytest.approx(100 * r["gbps"] / r["copy_gbps"])
        else:
            assert r["tflops"] > 0 and r["flops"] > 0
        if r["suite"] in ("blocks", "train"):
            assert r["images_per_s"] > 0
        if r["provider"] == "eager":
            assert r["speedup_vs_eager"] == pytest.approx(1.0)
        assert r["page_faults_per_call"] >= 0
    # one row per provider and case: eager everywhere, fusedres-reference on the ops
    keys = [(r["suite"], r["case"], r["pass"], r["layer"], r["provider"]) for r in rows]
    assert len(keys) == len(set(keys))
    ops = [r for r in rows if r["suite"] == "ops"]
    providers = {r["provider"] for r in ops}
    assert {"eager", "fusedres-reference"} <= providers  # and fusedres-cpu once built
    assert providers <= {"eager"} | {f"fusedres-{b}" for b in fusedres.available_backends()}
    assert len(ops) == 3 * 2 * len(providers)  # 3 ops x (fwd, fwd+bwd) x providers
    assert {r["pass"] for r in rows if r["suite"] == "train"} == {"train_step", "inference"}


def test_skip_reasons(tiny_run):
    data, _ = tiny_run
    reasons = [(s["suite"], s["provider"], s["reason"]) for s in data["skipped"]]
    assert ("all", "compile", "--no-compile") in reasons
    if not torch.cuda.is_available():
        assert "no GPU: cuda and triton providers not timed" in data["notes"]
        provs = {p for _, p, _ in reasons}
        assert {"fusedres-cuda", "fusedres-triton"} <= provs
    # the conv and converter are found at run time: rows, or a skip that says why
    for suite, module in (("conv", "fusedres.conv"), ("blocks", "fusedres.convert")):
        has_rows = any(r["suite"] == suite and r["provider"].startswith("fusedres-")
                       for r in data["rows"])
        said = any(s == suite and (p.startswith("fusedres-") or (
            p == "all" and r.startswith("nothing of fusedres"))) for s, p, r in reasons)
        assert has_rows or said, (suite, module)


def test_default_table_fits_100_columns_and_shows_progress(tiny_run):
    data, paths = tiny_run
    lines = paths["stdout"].splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    assert "page faults" not in paths["stdout"]  # behind --wide (and in the JSON)
    wide = report.text_table(data["rows"], wide=True)
    assert "page faults/call" in wide and "p20-p80 ms" in wide
    # "case k of N" on stderr as the run goes (not a terminal: one line per case)
    cases = re.findall(r"case (\d+) of (\d+):", paths["stderr"])
    n = int(cases[0][1])
    assert [int(k) for k, _ in cases] == list(range(1, n + 1)) and n >= 10, cases


def test_table_of_the_quick_shapes_fits_100_columns():
    """The --quick case names with the longest provider names and wide figures."""
    C = cases
    s = C.Settings(device=torch.device("cpu"), dtype=torch.float32, layout="channels_last",
                   batch=256, quick=True)
    rows = []
    for suite in ("ops", "conv", "blocks", "train"):
        for c in C.SUITES[suite](s, "quick"):
            for provider in ("eager", "fusedres-triton-memsave", "compile-max-autotune"):
                rows.append({
                    "suite": suite, "case": c.name, "pass": c.pass_, "layer": c.layer,
                    "shape": list(c.shape), "provider": provider, "time_ms": 12345.678,
                    "time_p20_ms": 12000.5, "time_p80_ms": 13000.25, "speedup_vs_eager": 0.5,
                    "speedup_clear": False, "gbps": 4321.5 if suite == "ops" else None,
                    "pct_copy_bw": 205.0 if suite == "ops" else None,
                    "tflops": 789.123, "images_per_s": 12345.6 if suite in ("blocks", "train")
                    else None, "peak_mem_bytes": 123456 * 2**20,
                    "retained_bytes": 65432 * 2**20, "retained_vs_eager": 0.75,
                    "page_faults_per_call": 123456})
    text = report.text_table(rows)
    assert max(len(line) for line in text.splitlines()) <= 100, max(text.splitlines(), key=len)
    assert "12345.6" in text and "205" in text and "0.50x?" in text


def test_footer_advice_matches_the_run():
    one = report.unclear_note({"quick": True}, {"device_type": "cpu", "torch_threads": 1})
    two = report.unclear_note({"quick": False}, {"device_type": "cpu", "torch_threads": 2})
    assert "--threads 1" not in one and "no --quick" in one
    assert "--threads 1" in two and "--quick" not in two


def test_markdown_and_plot(tiny_run, capsys):
    data, paths = tiny_run
    with open(paths["md"]) as f:
        text = f.read()
    assert "## ops" in text and "fusedres-reference" in text
    assert data["machine"]["git_commit"] in text
    try:
        import matplotlib  # noqa: F401
        assert os.path.exists(paths["png"])
    except ImportError:
        assert not os.path.exists(paths["png"])


def test_plot_without_matplotlib_says_so(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    why = report.plot({"rows": [], "machine": {}, "settings": {}}, str(tmp_path / "p.png"))
    assert "matplotlib is not installed" in why


# --------------------------------------------------------------------------------------
# Results table
# --------------------------------------------------------------------------------------


def test_report_without_results(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    assert main(["report", "--results-dir", str(tmp_path / "results"), "--output", str(out)]) == 0
    assert "no GPU results committed yet" in capsys.readouterr().out
    assert "no GPU results committed yet" in out.read_text()


def test_report_from_latest(tmp_path, tiny_run):
    data, _ = tiny_run
    results = tmp_path / "results"
    for name, date, ms in (("h100-2026-01-01", "2026-01-01T00:00:00+00:00", 1.5),
                           ("h100-2026-02-01", "2026-02-01T00:00:00+00:00", 0.25)):
        d = results / name
        d.mkdir(parents=True)
        fake = json.loads(json.dumps(data))
        fake["machine"].update(device_type="cuda", gpu="NVIDIA H100 80GB HBM3", date=date)
        for r in fake["rows"]:
            r["time_ms"] = ms
        (d / "ops.json").write_text(json.dumps(fake))
    (results / "cpu-run").mkdir()
    (results / "cpu-run" / "x.json").write_text(json.dumps(data))  # CPU: not GPU results
    out = tmp_path / "RESULTS.md"
    assert main(["report", "--results-dir", str(results), "--output", str(out)]) == 0
    text = out.read_text()
    assert "h100-2026-02-01" in text and "0.25 ms" in text and "1.5 ms" not in text


# --------------------------------------------------------------------------------------
# Run-time discovery of fusedres.conv and fusedres.convert (stand-ins here)
# --------------------------------------------------------------------------------------


def test_discovers_conv_and_convert(monkeypatch, tmp_path):
    import sys
    import types

    import fusedres
    import torch.nn.functional as F

    conv = types.ModuleType("fusedres.conv")
    calls = []

    def conv2d(x, w, bias=None, stride=1, padding=0, *, backend="auto"):
        calls.append(backend)
        return F.conv2d(x, w, bias, stride, padding)

    def conv2d_stats(x, w, stride=1, padding=0, *, backend="auto"):
        y = conv2d(x, w, None, stride, padding, backend=backend)
        var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
        return y, mean, var

    conv.conv2d, conv.conv2d_stats = conv2d, conv2d_stats
    monkeypatch.setitem(sys.modules, "fusedres.conv", conv)
    converted = []

    def convert(model, backend="auto"):
        converted.append(backend)
        return model

    monkeypatch.setattr(fusedres, "convert", convert, raising=False)
    path = tmp_path / "d.json"
    for suite in ("conv", "blocks", "train"):
        part = tmp_path / f"{suite}.json"
        assert main([suite, "--shapes", "tiny", "--quick", "--device", "cpu", "--batch-size",
                     "2", "--providers", "fusedres", "--backends", "reference",
                     "--json", str(part)]) == 0
        got = json.loads(part.read_text())
        if suite == "conv":
            data = got
        else:
            data["rows"] += got["rows"]
            data["skipped"] += got["skipped"]
            data["errors"] += got["errors"]
    path.write_text(json.dumps(data))
    data = json.loads(path.read_text())
    fused = {(r["suite"], r["case"], r["pass"]) for r in data["rows"]
             if r["provider"] == "fusedres-reference"}
    assert {("conv", "conv", "fwd"), ("conv", "conv", "fwd+bwd"), ("conv", "conv+stats", "fwd"),
            ("blocks", "BasicBlock", "fwd+bwd"), ("train", "resnet18", "train_step"),
            ("train", "resnet18", "inference")} <= fused
    assert set(calls) == {"reference"} and set(converted) == {"reference"}
    # no prologue entry point in the stand-in and no Triton conv on CPU: said, not crashed
    assert any(s["suite"] == "conv" and "bn_relu+conv+stats" not in s["reason"]
               for s in data["skipped"]) or not data["errors"]
    assert not data["errors"], data["errors"]


def test_timing_environment_recorded(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1234")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SOME_UNRELATED_VARIABLE", "x")
    m = report.machine_info(torch.device("cpu"), ["ops"])
    assert m["environment"]["MALLOC_TRIM_THRESHOLD_"] == "1234"
    assert m["environment"]["OMP_NUM_THREADS"] == "1"
    assert "SOME_UNRELATED_VARIABLE" not in m["environment"]
    text = report.markdown({"machine": m, "rows": [],
                            "settings": {"dtype": "float32", "layout": "cl", "batch": 8}})
    assert "`MALLOC_TRIM_THRESHOLD_=1234`" in text


def test_cpu_timer_counts_page_faults():
    from fusedres.bench import timing

    def fresh_pages():
        # 64 MiB of fresh anonymous memory, written, every call: a page fault per 4 KiB
        # page (or per 2 MiB huge page). Mapped here rather than by torch.empty, whose
        # memory the allocator may hand back already faulted in (seen once in a full CI
        # run: 0 faults, a 1.9 ms fill).
        pages = mmap.mmap(-1, 2**26)
        view = torch.frombuffer(pages, dtype=torch.uint8)
        view.fill_(1)
        del view
        pages.close()

    fresh = timing.time_cpu(fresh_pages, min_run_time=0.02, min_blocks=2)
    assert fresh.page_faults_per_call >= 16  # 4 KiB pages, or 2 MiB transparent huge pages
    kept = torch.empty(2**24)
    reused = timing.time_cpu(lambda: kept.fill_(1.0), min_run_time=0.02, min_blocks=2)
    assert reused.page_faults_per_call < 1


def test_kept_for_backward_column(tmp_path):
    """Blocks report the bytes a forward keeps for backward: the same as eager for the
    plain conversion (the fused ops keep what torch keeps, plus a 1-bit mask), less with
    memory_saving (the BN-ReLU output before conv2 is recomputed instead)."""
    out = str(tmp_path / "blocks.json")
    rc = main(["blocks", "--quick", "--shapes", "tiny", "--device", "cpu", "--batch-size", "2",
               "--no-compile", "--backends", "reference", "--memory-saving", "--json", out])
    assert rc == 0
    with open(out) as f:
        rows = [r for r in json.load(f)["rows"] if r["layer"] == "tiny"]
    by = {(r["case"], r["provider"]): r for r in rows}
    for case in ("BasicBlock", "Bottleneck"):
        eager = by[(case, "eager")]
        assert eager["retained_bytes"] > 0 and eager["retained_vs_eager"] == 1.0
        assert 0.99 < by[(case, "fusedres-reference")]["retained_vs_eager"] < 1.05
        assert by[(case, "fusedres-reference-memsave")]["retained_vs_eager"] < 0.95


def test_providers_of_a_case_timed_back_to_back(monkeypatch):
    """Each case's providers are timed one after another (then the next case), so a drift
    in the machine's speed moves both sides of a "vs eager" ratio alike."""
    from fusedres.bench import cli

    timed = []  # (case, provider) in the order they were measured
    real_row = cli._row

    def spy(case, provider, *args, **kwargs):
        timed.append(((case.name, case.pass_, case.layer), provider.name))
        return real_row(case, provider, *args, **kwargs)

    monkeypatch.setattr(cli, "_row", spy)
    monkeypatch.setenv("FUSEDRES_BENCH_CPU_MIN_TIME", "0.001")
    args = cli.build_parser().parse_args(
        ["ops", "--quick", "--shapes", "tiny", "--device", "cpu", "--batch-size", "2",
         "--no-compile", "--backends", "reference"])
    args.argv = ["ops"]
    cli.run_suites(args, ["ops"])
    case_order = [c for c, _ in timed]
    assert len(set(case_order)) >= 3 and len({p for _, p in timed}) == 2
    # every case's measurements are one contiguous run
    starts = [c for i, c in enumerate(case_order) if i == 0 or case_order[i - 1] != c]
    assert len(starts) == len(set(case_order)), case_order


def test_ratio_marked_when_inside_the_noise():
    """A "vs eager" ratio is only called a difference when the two p20-p80 ranges do not
    overlap; otherwise the tables mark it with '?' and the run says how many."""
    from fusedres.bench import cli

    def row(provider, p20, med, p80):
        return {"suite": "ops", "case": "c", "pass": "fwd", "layer": "l", "shape": [1],
                "provider": provider, "time_ms": med, "time_p20_ms": p20, "time_p80_ms": p80}

    rows = [row("eager", 1.9, 2.0, 2.1), row("clear", 0.9, 1.0, 1.1),
            row("noisy", 0.9, 1.0, 2.5), row("same", 1.95, 2.0, 2.05)]
    cli._speedups(rows)
    by = {r["provider"]: r for r in rows}
    assert by["clear"]["speedup_clear"] and report.speedup_text(by["clear"]) == "2.00x"
    assert not by["noisy"]["speedup_clear"] and report.speedup_text(by["noisy"]) == "2.00x?"
    assert not by["same"]["speedup_clear"]
    assert by["noisy"]["speedup_range"] == pytest.approx([1.9 / 2.5, 2.1 / 0.9])
    assert [r["provider"] for r in report.unclear_rows(rows)] == ["noisy", "same"]
    text = report.markdown({"machine": report.machine_info(torch.device("cpu"), ["ops"]),
                            "rows": rows, "settings": {"dtype": "float32", "layout": "cl",
                                                       "batch": 8}})
    assert "2.00x?" in text and "2 ratio(s) marked" in text


def test_slow_calls_still_get_several_samples():
    from fusedres.bench import timing

    m = timing.time_cpu(lambda: time.sleep(0.03), min_run_time=0.01, max_run_time=0.01)
    assert m.samples >= timing.MIN_CPU_SAMPLES >= 3


def test_command_line_keeps_quoting(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/x/fusedres-bench", "ops", "--cases", "bn_add_relu fwd\\+bwd"])
    line = report.command_line()
    assert line == "fusedres-bench ops --cases 'bn_add_relu fwd\\+bwd'"
    assert shlex.split(line)[1:] == sys.argv[1:]
    m = report.machine_info(torch.device("cpu"), ["ops", "--cases", "a b"])
    assert m["command"] == "fusedres-bench ops --cases 'a b'"


def test_help_lists_what_each_subcommand_takes():
    from fusedres.bench import cli

    def options(cmd):
        sub = cli.build_parser()._subparsers._group_actions[0].choices[cmd]
        return {o for a in sub._actions for o in a.option_strings}

    assert "--memory-saving" not in options("ops") and "--image-size" not in options("ops")
    assert "--memory-saving" in options("blocks") and "--image-size" in options("train")
    assert "--memory-saving" in options("all") and "--image-size" in options("all")


def test_cpu_default_is_one_thread_and_stderr_is_quiet(tmp_path):
    """The main job's table must be readable: one thread by default on CPU (steady per-core
    figures), and no profiler or cpp_extension chatter on stderr."""
    out = str(tmp_path / "b.json")
    env = dict(os.environ, FUSEDRES_BENCH_CPU_MIN_TIME="0.01")
    proc = subprocess.run([sys.executable, "-m", "fusedres.bench", "blocks", "--quick",
                           "--shapes", "tiny", "--device", "cpu", "--batch-size", "2",
                           "--backends", "reference", "--json", out],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(out) as f:
        data = json.load(f)
    assert data["machine"]["torch_threads"] == 1
    assert "1 CPU thread(s)" in proc.stdout
    noise = [line for line in proc.stderr.splitlines()
             if "profiler" in line.lower() or "cpp_extension" in line or "USDT" in line]
    assert not noise, noise


def test_cpu_timing_interleaves_providers():
    """CPU rows of one case are timed block by block in turn (a drifting machine shifts
    every provider alike); a provider that raises is dropped and reported, the others are
    still measured."""
    from fusedres.bench import timing

    order = []

    def make(name, seconds):
        def fn():
            order.append(name)
            time.sleep(seconds)
        return fn

    def broken():
        if len(order) > 4:
            raise RuntimeError("broken on purpose")
        order.append("broken")

    got, errors = timing.time_cpu_interleaved(
        {"a": make("a", 0.002), "b": make("b", 0.004), "broken": broken},
        min_run_time=0.05, min_blocks=5)
    assert set(got) == {"a", "b"} and isinstance(errors["broken"], RuntimeError)
    assert got["a"].samples >= 5 and got["b"].samples >= 5
    assert got["a"].median_s < got["b"].median_s
    assert "interleaved" in got["a"].timer
    # after the warm-up calls, no long run of one provider: they alternate
    timed = [n for n in order[3:] if n != "broken"]
    runs, last = 0, None
    for n in timed:
        runs += n != last
        last = n
    assert runs >= 10, order

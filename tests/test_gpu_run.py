"""scripts/gpu_run.sh cannot rot: its dry run (the same stages on the CPU, tiny shapes,
the Triton smoke test in the interpreter) runs here, and every stage must leave its file
with sane rows; a tiny deadline must cut the later stages, recorded as skipped, with
every file still parsing. Also: the smoke test fails on a wrong kernel, the repository's
ResNet-50 is torchvision's, and the summary reads files cut by a kill."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["facts", "build", "prewarm", "smoke", "doctor", "tests", "train", "ops", "conv"]


def _script_module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


summary_mod = _script_module("gpu_summary")


def _dry_run(out_dir, **env):
    t = time.time()
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_run.sh"), "--dry-run"],
                          env=dict(os.environ, OUT=str(out_dir), PYTHON=sys.executable, **env),
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    dirs = sorted(p for p in out_dir.iterdir() if p.is_dir())
    assert len(dirs) == 1, (dirs, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc, dirs[0], time.time() - t


def _lines(path):
    """Every line of a JSON-lines file, each of which must parse."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def _stages(res):
    rows = [r for r in _lines(res / "run.jsonl") if r["kind"] == "stage"]
    return {r["stage"]: r for r in rows}, [r["stage"] for r in rows]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    # bf16 only here (every provider, and the breakdown); fp16 and its GradScaler in
    # test_gpu_breakdown.py's resume test: the CPU dry run stays a few minutes in all
    return _dry_run(tmp_path_factory.mktemp("gpu_run"), DEADLINE_S="420", MAX_TRAIN="200",
                    TRAIN_DTYPES="bfloat16")


def test_dry_run_records_every_stage_once(dry_run):
    proc, res, _ = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages, order = _stages(res)
    assert sorted(order) == sorted(STAGES) and len(order) == len(STAGES), order
    for name in ("facts", "build", "prewarm", "smoke", "tests", "train", "ops", "conv"):
        assert stages[name]["status"] == "ok", stages[name]
    # the doctor checks every backend on the CPU: on a loaded 2-core machine it can meet
    # its 60 s cap, and then it says so
    assert stages["doctor"]["status"] in ("ok", "skipped", "timed_out", "killed")
    # every finished stage is in the state file (what a resumed run skips)
    state = summary_mod.state_load(str(res / "state.json"))
    for name in ("smoke", "tests", "train", "ops", "conv"):
        assert state[f"stage/{name}"]["status"] == "ok", state
    for r in stages.values():
        assert r["wall_s"] <= r["cap_s"] + 10, r
    # at most 8 files: what the device tool brings back
    assert len(list(res.iterdir())) <= 8
    # the summary comes last and names what ran
    tail = proc.stdout[proc.stdout.rindex("== fusedres GPU run"):]
    for word in ("smoke (Triton kernels", "CUDA kernel tests", "ops:", "conv:", "train (",
                 "Step breakdown, bfloat16"):
        assert word in tail, tail


def test_dry_run_facts(dry_run):
    _, res, _ = dry_run
    facts = [r for r in _lines(res / "run.jsonl") if r["kind"] == "facts"]
    assert len(facts) == 1
    f = facts[0]
    assert f["dry_run"] is True and f["torch"] == torch.__version__
    assert f["triton"] and f["git_commit"] and "packages" in f
    assert {m["package"] for m in f["missing"]} <= set(_script_module("gpu_bench").OPTIONAL) | {"nvcc"}
    # cuDNN's device properties: captured on a GPU, else the reason (here: no GPU)
    props = [r for r in _lines(res / "run.jsonl") if r["kind"] == "cudnn_device_properties"]
    assert len(props) == 1 and (props[0].get("properties") or props[0]["error"]), props


def test_dry_run_smoke_checks_every_kernel(dry_run):
    _, res, _ = dry_run
    rows = _lines(res / "smoke.jsonl")
    checks = [r for r in rows if r["kind"] == "check"]
    assert rows[-1]["kind"] == "end" and rows[-1]["complete"]
    assert all(r["status"] == "pass" and r["rel_err"] <= r["tol"] for r in checks), \
        [r for r in checks if r["status"] != "pass"]
    names = {r["check"] for r in checks if r["group"] == "bn"}
    smoke = _script_module("gpu_smoke")
    assert names == {c[0] for c in smoke.BN_CHECKS}
    fused = {r["check"].split()[0] for r in checks if r["group"] == "fused"}
    assert fused == set(smoke.FUSED_OPS)
    conv = {r["check"].split()[0] for r in checks if r["group"] == "conv"}
    assert conv == set(smoke.CONV_MODES)
    assert any(r["check"].endswith("bwd 3x3") for r in checks if r["group"] == "conv")


def test_dry_run_tests_stage_writes_junit(dry_run):
    _, res, _ = dry_run
    counts = summary_mod.junit(str(res / "checks.xml"))
    assert counts is not None and counts["tests"] > 100  # test_cuda_kernels.py, skipped here


def _timed(res, stage):
    rows = _lines(res / f"{stage}.jsonl")
    assert rows[0]["kind"] == "header" and rows[0]["stage"] == stage
    data = [r for r in rows if r["kind"] == "row"]
    assert data and all(r["time_ms"] > 0 and r["git_commit"] for r in data)
    return rows, data


def test_dry_run_ops_rows(dry_run):
    _, res, _ = dry_run
    rows, data = _timed(res, "ops")
    assert rows[0]["copy"]["gbps"] > 0
    assert rows[-1]["kind"] == "end" and rows[-1]["complete"]
    assert all(r["pct_copy_bw"] > 0 and r["gbps"] > 0 for r in data)
    providers = {r["provider"] for r in data}
    assert "eager" in providers
    import fusedres

    if "cpu" in fusedres.available_backends():
        assert "fusedres-cpu" in providers
        fused = [r for r in data if r["provider"] == "fusedres-cpu"]
        assert all(r["speedup_vs_eager"] > 0 for r in fused)
    assert {(r["case"], r["pass"]) for r in data} == {
        (op, p) for op in ("bn_relu", "bn_add_relu", "dual_bn_add_relu")
        for p in ("fwd", "fwd+bwd")}
    assert any(r["kind"] == "skipped" and r["provider"] == "fusedres-triton" for r in rows)


def test_dry_run_conv_rows(dry_run):
    _, res, _ = dry_run
    _, conv = _timed(res, "conv")
    assert all(r["case"] == "conv" and r["pass"] == "fwd" and r["tflops"] > 0 for r in conv)


def test_dry_run_train_every_provider_and_breakdown(dry_run):
    """A row and a breakdown per provider; the categories sum to the profiled total."""
    _, res, _ = dry_run
    from fusedres.bench import breakdown, trainstep

    rows, train = _timed(res, "train")
    providers = trainstep.default_providers()
    assert "compile" in providers and "tuned" in providers and "auto+compile" in providers
    assert rows[0]["settings"]["providers"] == providers
    assert [r["provider"] for r in train] == providers, [r["provider"] for r in train]
    for r in train:
        assert r["dtype"] == "bfloat16" and r["images_per_s"] > 0 and r["time_ms"] > 0
        assert r["speedup_vs_eager"] > 0 and r["speedup_vs_compile"] > 0
        assert r["extra"]["prep_s"] >= r["extra"]["first_steps_s"] > 0
    tuned = next(r for r in train if r["provider"] == "tuned")
    assert tuned["extra"]["tune_s"] > 0 and sum(tuned["extra"]["tune_choices"].values()) > 0
    bds = {r["provider"]: r for r in rows if r["kind"] == "breakdown"}
    assert list(bds) == providers
    for b in bds.values():
        cats = b["categories_ms"]
        assert set(cats) == set(breakdown.CATEGORIES)
        assert sum(cats.values()) == pytest.approx(b["total_ms"], rel=0.01)
        assert b["total_ms"] > 0 and b["wall_ms"] >= b["busy_ms"] > 0 and b["idle_ms"] >= 0
        assert cats[breakdown.CONV_FWD] > 0 and cats[breakdown.LOSS] > 0
    assert bds["eager"]["categories_ms"][breakdown.BN_TORCH] > 0
    assert bds["eager"]["categories_ms"][breakdown.BN_OURS] == 0
    assert bds["auto"]["categories_ms"][breakdown.BN_OURS] > 0
    assert rows[0]["bn_bytes"]["bfloat16"]["fused"] < rows[0]["bn_bytes"]["bfloat16"]["eager"]
    assert rows[-1]["kind"] == "end" and rows[-1]["complete"]


def test_report_conversion(dry_run, tmp_path):
    _, res, _ = dry_run
    import shutil

    copy = tmp_path / res.name
    shutil.copytree(res, copy)
    written = summary_mod.to_json([str(copy)])
    assert {os.path.basename(p) for p in written} == {"ops.json", "conv.json", "train.json",
                                                      "train.md"}
    md = (copy / "train.md").read_text()
    assert "| tuned |" in md and "Step breakdown, bfloat16" in md and "missing" not in md
    from fusedres.bench import report

    with open(copy / "ops.json") as f:
        data = json.load(f)
    assert data["schema"] == report.SCHEMA and data["rows"]
    assert set(report.ROW_KEYS) <= set(data["rows"][0])
    report.markdown(data)  # what fusedres-bench writes from such a file


def test_tiny_deadline_skips_later_stages(tmp_path):
    proc, res, wall = _dry_run(tmp_path, DEADLINE_S="20")
    stages, order = _stages(res)
    assert sorted(order) == sorted(STAGES), order
    for name in ("train", "ops", "conv"):
        assert stages[name]["status"] == "skipped" and "deadline" in stages[name]["reason"]
    assert stages["facts"]["status"] in ("ok", "timed_out")
    assert wall < 20 + 40, wall  # the deadline, the last kill grace and the summary
    for path in res.iterdir():  # whatever was written parses
        if path.suffix == ".jsonl":
            _lines(path)
    assert "== fusedres GPU run" in proc.stdout


def test_smoke_fails_on_a_wrong_kernel(monkeypatch):
    """The smoke checks can fail: a BN apply off by 1e-3 and a conv off by a scale."""
    smoke = _script_module("gpu_smoke")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("triton imported without the interpreter in this process")
    from fusedres.kernels import bn, conv

    device = "cuda" if torch.cuda.is_available() else "cpu"
    good, _ = smoke.check_bn("apply+relu", "bn_apply", {"relu": True}, (2, 8, 9),
                             torch.float32, True, device)
    assert good <= smoke.tolerance(torch.float32)
    apply = bn.bn_apply

    def wrong_apply(*args):
        out, mask = apply(*args)
        return out + 1e-3, mask

    monkeypatch.setattr(bn, "bn_apply", wrong_apply)
    bad, _ = smoke.check_bn("apply+relu", "bn_apply", {"relu": True}, (2, 8, 9),
                            torch.float32, True, device)
    assert bad > smoke.tolerance(torch.float32)

    fwd = conv.conv_fwd

    def wrong_fwd(*args, **kwargs):
        y, mean, var = fwd(*args, **kwargs)
        return y * 1.001, mean, var

    monkeypatch.setattr(conv, "conv_fwd", wrong_fwd)
    bad, _ = smoke.check_conv("fwd", smoke.CONV_SHAPES[1], torch.float32, False, device)
    assert bad > smoke.tolerance(torch.float32)


def test_repository_resnet50_is_torchvision_resnet50():
    torchvision = pytest.importorskip("torchvision")
    import fusedres
    from fusedres.bench.resnet50 import resnet50

    ours, theirs = resnet50(), torchvision.models.resnet50(weights=None)
    a = {k: v.shape for k, v in ours.state_dict().items()}
    b = {k: v.shape for k, v in theirs.state_dict().items()}
    assert list(a) == list(b) and a == b
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 64)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    assert str(fusedres.explain(ours)) == str(fusedres.explain(theirs))


def test_summary_reads_killed_files(tmp_path):
    rows = [{"kind": "header", "stage": "ops", "settings": {"dtype": "bfloat16"},
             "copy": {"gbps": 4000.0}},
            {"kind": "row", "case": "bn_relu", "pass": "fwd", "layer": "l1",
             "provider": "eager", "time_ms": 1.0, "pct_copy_bw": 50.0}]
    with open(tmp_path / "ops.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + '\n{"kind": "row", "case": "bn_')
    text = summary_mod.summary(str(tmp_path))
    assert "bn_relu" in text and "50%" in text and "killed" in text


def test_resume_skips_finished_stages(tmp_path):
    """RESUME_FROM a folder whose state.json says smoke finished: smoke is skipped and its
    file kept, tests run; a second run into the same $OUT resumes that folder and skips
    both. A folder of another machine is never resumed."""
    import platform
    import shutil

    name = f"dryrun-{time.strftime('%Y-%m-%d', time.gmtime())}"
    src = tmp_path / "prev" / name
    src.mkdir(parents=True)
    (src / "smoke.jsonl").write_text('{"kind": "end", "complete": true}\n')
    summary_mod.state_set(str(src / "state.json"), "machine", "ok",
                          name=f"dry run ({platform.machine()})")
    summary_mod.state_set(str(src / "state.json"), "stage/smoke", "ok")
    out = tmp_path / "out"
    out.mkdir()
    env = dict(STAGES="smoke,tests", DEADLINE_S="200")
    _, res, _ = _dry_run(out, RESUME_FROM=str(src), **env)
    assert res.name == name
    stages, _ = _stages(res)
    assert stages["smoke"]["status"] == "skipped" and "earlier run" in stages["smoke"]["reason"]
    assert stages["tests"]["status"] == "ok"
    assert _lines(res / "smoke.jsonl") == [{"kind": "end", "complete": True}]

    _, again, _ = _dry_run(out, **env)  # the same $OUT: that folder goes on
    assert again == res
    stages = [r for r in _lines(res / "run.jsonl") if r["kind"] == "stage"]
    assert [r["status"] for r in stages if r["stage"] == "tests"] == ["ok", "skipped"]

    other = tmp_path / "other"
    shutil.copytree(res, other / name)
    summary_mod.state_set(str(other / name / "state.json"), "machine", "ok", name="NVIDIA H200")
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_run.sh"), "--dry-run"],
                          env=dict(os.environ, OUT=str(other), PYTHON=sys.executable,
                                   STAGES="smoke", DEADLINE_S="60"),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "not resumed" in proc.stdout, proc.stdout[-2000:]
    assert (other / f"{name}-2" / "run.jsonl").exists()

"""Deviceless cuDNN graph checks (fusedres.cudnn_deviceless): which graphs the planner
plans at ResNet-50's conv sites, how a GPU run's capture is saved, how each graph is
built (a recording stand-in for the cudnn-frontend module), the capture's failure
without a GPU -- and, when a capture of a GPU is committed under
benchmarks/cudnn_device_properties/, cuDNN's own check_support of every planned graph
for that device, here, without a GPU."""
import json
import os
import types
import warnings

import pytest
import torch

from fusedres import cudnn_deviceless as D
from fusedres.bench.cases import resnet50_convs


def test_planned_graphs_cover_resnet50_with_the_padded_stem():
    cases = D.planned_graphs((9, 0), 92400, batch=256)
    convs = resnet50_convs()
    # every distinct conv, F0 and F1, two dtypes; the stem has no F1 (its input channels
    # are only padded for F0)
    assert len(cases) == len(convs) * 4 - 2
    stem = [c for c in cases if c.site == "conv1"]
    assert {c.kind for c in stem} == {"F0"}
    assert all(c.input_shape == (256, 8, 224, 224) and c.weight_shape == (64, 8, 7, 7)
               for c in stem)
    assert D.planned_graphs((7, 5), 92400) == []  # the planner plans nothing before sm_80


def test_every_planned_graph_covers_every_kind():
    """The C++ check's list: every graph kind the path plans (the conv graphs and the
    finalize), the backward graphs at exactly the convs planned as F1, a finalize per BN
    width of ResNet-50."""
    from fusedres import cudnn_graph

    cases = D.every_planned_graph((9, 0), 92400, batch=256)
    assert {c.kind for c in cases} == set(cudnn_graph.KINDS) | {cudnn_graph.FINALIZE_KIND} \
        | set(cudnn_graph.TAIL_KINDS)
    assert cases[:len(D.planned_graphs((9, 0), 92400))] == D.planned_graphs((9, 0), 92400)
    f1 = {c[1:] for c in cases if c.kind == "F1"}
    for kind in cudnn_graph.BACKWARD_KINDS:
        assert {c[1:] for c in cases if c.kind == kind} == f1
    finalize = [c for c in cases if c.kind == cudnn_graph.FINALIZE_KIND]
    assert sorted(c.input_shape[0] for c in finalize) == \
        sorted({spec.c_out for spec in resnet50_convs()}) == [64, 128, 256, 512, 1024, 2048]
    tails = {(c.kind, c.dtype, c.input_shape) for c in cases if not c.weight_shape
             and len(c.input_shape) == 4}  # both kinds, both dtypes, ResNet-50's 4 tails
    assert tails == {(k, d, (256, c, h, h)) for k in cudnn_graph.TAIL_KINDS
                     for d in (torch.float16, torch.bfloat16)
                     for c, h in ((256, 56), (512, 28), (1024, 14), (2048, 7))}, tails
    assert D.every_planned_graph((7, 5), 92400) == []


_NO_CPP = "fusedres._C was built without the cuDNN graph path (or before the C++ check)"


@pytest.mark.skipif(not D.cpp_entry(), reason=_NO_CPP)
def test_cpp_check_refuses_a_malformed_blob():
    """The C++ entry exists (CI's CUDA build has it) and, without a GPU, refuses what is
    no device description with a clear error, before any graph is built."""
    case = D.every_planned_graph((9, 0), 92400, batch=4)[0]
    with pytest.raises(ValueError, match="not JSON"):
        D.check_cpp("{truncated", case, (9, 0))
    with pytest.raises(ValueError, match="cuDNN cannot read these device properties"):
        D.check_cpp('{"deviceVer": 900}', case, (9, 0))
    with pytest.raises(RuntimeError, match="unknown graph kind"):
        D.check_cpp("{}", case._replace(kind="F7"), (9, 0))


def _run_jsonl(tmp_path, *rows):
    path = tmp_path / "run.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut by a ki')
    return str(path)


def test_extract_saves_the_capture(tmp_path):
    row = {"kind": "cudnn_device_properties", "device_name": "NVIDIA H100 80GB HBM3",
           "capability": [9, 0], "cudnn_version": 92400, "torch": "x",
           "properties": '{"deviceVer": 900}'}
    run = _run_jsonl(tmp_path, {"kind": "facts"}, row)
    path = D.extract(run, str(tmp_path / "props"))
    assert os.path.basename(path) == "h100.json"
    assert D.load(path) == row
    assert D.saved_files(str(tmp_path / "props")) == [path]
    failed = {"kind": "cudnn_device_properties", "error": "RuntimeError: no GPU"}
    assert D.extract(_run_jsonl(tmp_path, failed), str(tmp_path / "none")) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure without a GPU")
def test_capture_without_a_gpu_is_recorded_not_raised(tmp_path):
    run = tmp_path / "run.jsonl"
    assert D.main(["capture", "--jsonl", str(run)]) == 1
    row = json.loads(run.read_text())
    assert row["kind"] == "cudnn_device_properties" and "properties" not in row
    assert row["error"]


class _FakeFrontend:
    """Records the graph check() builds (the cudnn-frontend's Python API, faked)."""

    def __init__(self, refuse=None):
        self.calls, self.refuse = [], refuse
        self.data_type = types.SimpleNamespace(FLOAT="f32", HALF="f16", BFLOAT16="bf16")
        self.heur_mode = types.SimpleNamespace(A="A", FALLBACK="FALLBACK")
        fake = self

        class T:
            def __init__(self, name):
                self.name = name

            def set_output(self, v):
                return self

            def set_data_type(self, v):
                fake.calls.append(("dtype", self.name, v))
                return self

        class G:
            def __init__(self, **kw):
                fake.calls.append(("graph", kw["io_data_type"], kw["device_property"]))

            def tensor(self, name, dim, stride, data_type):
                fake.calls.append(("tensor", name, dim, stride, data_type))
                return T(name)

            def mul(self, a, b):
                fake.calls.append(("mul", a.name, b.name))
                return T("mul")

            def add(self, a, b):
                fake.calls.append(("add", a.name, b.name))
                return T("add")

            def relu(self, input):
                fake.calls.append(("relu", input.name))
                return T("relu")

            def conv_fprop(self, image, weight, padding, stride, dilation, compute_data_type):
                fake.calls.append(("conv", image.name, weight.name, padding, stride))
                return T("y")

            def genstats(self, input, compute_data_type):
                fake.calls.append(("genstats", input.name))
                return [T("sum"), T("sq_sum")]

            def validate(self):
                pass

            def build_operation_graph(self):
                pass

            def create_execution_plans(self, modes):
                fake.calls.append(("plans", modes))

            def check_support(self):
                if fake.refuse:
                    raise RuntimeError(fake.refuse + "\n  second line")

        self.pygraph = G
        self.create_device_properties = lambda text: ("props", text)


def test_check_builds_the_graphs_as_the_extension_does():
    case = next(c for c in D.planned_graphs((9, 0), 92400, batch=4)
                if c.site == "layer1.0.conv2" and c.kind == "F1" and c.dtype == torch.bfloat16)
    fe = _FakeFrontend()
    assert D.check('{"x": 1}', case, cudnn=fe) == ""
    names = [c[0] for c in fe.calls]
    assert names[:3] == ["graph", "tensor", "tensor"] and fe.calls[0][1:] == (
        "bf16", ("props", '{"x": 1}'))
    # NHWC strides: x (4, 64, 56, 56), w (64, 64, 3, 3)
    assert fe.calls[1][2:] == ([4, 64, 56, 56], [64 * 56 * 56, 1, 64 * 56, 64], "bf16")
    assert fe.calls[2][2:] == ([64, 64, 3, 3], [64 * 9, 1, 64 * 3, 64], "bf16")
    assert names.index("mul") < names.index("add") < names.index("relu") < names.index("conv")
    assert ("conv", "relu", "w", [1, 1], [1, 1]) in fe.calls
    assert ("genstats", "y") in fe.calls and ("plans", ["A", "FALLBACK"]) in fe.calls
    assert ("dtype", "sum", "f32") in fe.calls and ("dtype", "y", "bf16") in fe.calls
    stem = next(c for c in D.planned_graphs((9, 0), 92400, batch=4) if c.site == "conv1")
    fe = _FakeFrontend(refuse="cudnnGraphNotSupportedError: no engine")
    assert D.check("{}", stem, cudnn=fe) == "cudnnGraphNotSupportedError: no engine second line"
    assert fe.calls[1][2][1] == 8 and "mul" not in [c[0] for c in fe.calls]  # F0, padded


def _frontend():
    try:
        import cudnn
    except ImportError:
        return None
    return cudnn


CAPTURES = D.saved_files()


def _assert_supported(data, cases, check):
    """No case refused by ``check`` for the captured device; those this machine cannot
    decide (no CUDA driver: ``D.undetermined``) are listed in a warning, not failed."""
    refused, undecided = {}, []
    for case in cases:
        why = check(case)
        if why and D.undetermined(why):
            undecided.append(case.label)
        elif why:
            refused[case.label] = why
    assert not refused, (f"{len(refused)} planned graph(s) refused for {data['device_name']} "
                         f"(make them planner rules): " + json.dumps(refused, indent=1))
    if undecided:
        warnings.warn(f"{len(undecided)} graph(s) not decidable without the CUDA driver "
                      f"(runtime fusion): {', '.join(undecided)}")


@pytest.mark.skipif(not CAPTURES, reason=(
    "no captured cuDNN device properties under benchmarks/cudnn_device_properties/ yet: "
    "a GPU run of scripts/gpu_run.sh records them in run.jsonl, and `python -m "
    "fusedres.cudnn_deviceless extract DIR/run.jsonl` saves the file to commit"))
@pytest.mark.parametrize("path", CAPTURES, ids=os.path.basename)
def test_every_planned_graph_is_supported_deviceless(path):
    cudnn = _frontend()
    if cudnn is None:
        pytest.skip("the cudnn-frontend Python package (nvidia-cudnn-frontend) is not "
                    "installed: scripts/setup.sh installs the pinned wheel")
    version = int(cudnn.backend_version())
    if version < D.MIN_VERSION:
        pytest.skip(f"cuDNN {version} < 9.11: no deviceless support checks")
    data = D.load(path)
    _assert_supported(data, D.planned_graphs(data["capability"], data["cudnn_version"]),
                      lambda case: D.check(data["properties"], case, cudnn=cudnn))


@pytest.mark.skipif(not CAPTURES, reason=(
    "no captured cuDNN device properties under benchmarks/cudnn_device_properties/ yet "
    "(see test_every_planned_graph_is_supported_deviceless)"))
@pytest.mark.parametrize("path", CAPTURES, ids=os.path.basename)
def test_every_graph_kind_is_supported_deviceless_cpp(path):
    """The extension's own graphs, every kind (the backward graphs and the finalize too),
    checked by cuDNN for the captured device, here, without a GPU."""
    if not D.cpp_entry():
        pytest.skip(_NO_CPP)
    version = int(torch.backends.cudnn.version() or 0)
    if version < D.MIN_VERSION:
        pytest.skip(f"cuDNN {version} < 9.11: no deviceless support checks")
    data = D.load(path)
    _assert_supported(data, D.every_planned_graph(data["capability"], data["cudnn_version"]),
                      lambda case: D.check_cpp(data["properties"], case, data["capability"]))


_NO_DRIVER = ("create_execution_plans: No valid engine configs\n"
              "Warning: CUDNN_STATUS_NOT_SUPPORTED_RUNTIME_PREREQUISITE_MISSING; Reason: Cannot "
              "load CUDA driver library (libcuda.so.1 / libcuda.so).")


def test_a_check_this_machine_cannot_decide_is_not_a_refusal(tmp_path, monkeypatch, capsys):
    """cuDNN's runtime-fusion engines load the CUDA driver library even to answer a
    support check: on a machine without it (CI) every graph only they run (the block
    tails, bf16 F0/F1, the padded stem) comes back RUNTIME_PREREQUISITE_MISSING whatever
    the captured device (seen here with an H100-like stand-in). That says nothing of the
    GPU: the check lists them as undetermined and fails only on real refusals."""
    assert D.undetermined(_NO_DRIVER)
    assert not D.undetermined("check_support: CUDNN_STATUS_NOT_SUPPORTED_ARCH_MISMATCH")
    assert not D.undetermined("")
    path = tmp_path / "h100.json"
    path.write_text(json.dumps({"properties": "{}", "capability": [9, 0],
                                "cudnn_version": 92400, "device_name": "stand-in"}))
    from fusedres import cudnn_graph

    answer = {"refuse": None}

    def check_cpp(properties, case, capability):
        if case.kind in cudnn_graph.TAIL_KINDS:
            return _NO_DRIVER
        return answer["refuse"] if case.kind == "F1" and answer["refuse"] else ""

    monkeypatch.setattr(D, "check_cpp", check_cpp)
    assert D.main(["check", str(path), "--cpp", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("UNDETERMINED") == 16 and "REFUSED" not in out, out
    answer["refuse"] = "check_support: CUDNN_STATUS_NOT_SUPPORTED_ARCH_MISMATCH"
    assert D.main(["check", str(path), "--cpp", "--batch", "4"]) == 1
    assert "REFUSED: check_support" in capsys.readouterr().out

"""The cudnn-eval conv path on CPU: its rules with faked capabilities, the routing of a
converted model's eval folds into the fused call (ATen's cuDNN ops faked by float64
F.conv2d stand-ins that record what they receive), the fallback when the call raises,
explain, tune and doctor. The real cuDNN call runs only on a GPU (the tests marked cuda,
fusedres-bench doctor, scripts/gpu_cudnn_sites.py --eval)."""
import gc
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedres
from fusedres import conv_paths, cudnn_eval
from fusedres import nn as fnn

T = importlib.import_module("fusedres.tune")
CUDNN = cudnn_eval.Capabilities(True, 92400)


def _plan(**kw):
    args = dict(caps=CUDNN, dtype=torch.bfloat16, weight_dtype=torch.bfloat16,
                bias_dtype=torch.bfloat16, residual_dtype=None, relu=True)
    args.update(kw)
    return cudnn_eval.plan(**args)


def test_rules():
    assert _plan() is None
    assert _plan(dtype=torch.float16, weight_dtype=torch.float16, bias_dtype=None) is None
    assert _plan(dtype=torch.float32, weight_dtype=torch.float32, bias_dtype=torch.float32,
                 residual_dtype=torch.float32) is None
    assert "ReLU" in _plan(relu=False)
    assert "cuDNN is not available" in _plan(caps=CUDNN._replace(cudnn=False))
    assert "float16, bfloat16 or float32" in _plan(dtype=torch.float64)
    assert "dtype differs" in _plan(weight_dtype=torch.float32)
    assert "dtype differs" in _plan(bias_dtype=torch.float32)
    assert "residual" in _plan(residual_dtype=torch.float32)
    assert "residual" in _plan(residual_dtype=torch.bfloat16, residual_shape_ok=False)
    assert "groups" in _plan(groups=2)
    assert "padding" in _plan(padding="same")
    assert "padding" in _plan(padding_mode="reflect")
    assert "channels_last" in _plan(channels_last=False)


def test_problem_on_cpu_says_cuda_only():
    conv = nn.Conv2d(8, 8, 1)
    with torch.no_grad():
        assert "CUDA" in cudnn_eval.problem(conv, torch.randn(1, 8, 2, 2), True)
    assert "CUDA" in cudnn_eval.problem(conv, None, True)  # judged from the module


def test_registered_never_auto():
    assert "cudnn-eval" in conv_paths.conv_paths()
    assert fnn.conv_choice(fnn.SitePlan(conv="cudnn-eval"), "auto") == ("cudnn-eval", None)
    assert fnn.conv_choice(fnn.SitePlan(), "auto")[0] == "cudnn"  # auto never takes it
    assert T.plan_of("cudnn-eval") == fnn.SitePlan(conv="cudnn-eval")


# --------------------------------------------------------------------------------------
# A converted model in eval: the fused call faked on CPU (float64), recording its inputs
# --------------------------------------------------------------------------------------


class Net(nn.Module):
    """stem conv-bn-relu, then a bottleneck with a projection shortcut and one with an
    identity shortcut (conv biases on the stem: folded too)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.a1, self.ab1 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.a2, self.ab2 = nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)
        self.down, self.dbn = nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16)
        self.b1, self.bb1 = nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        out = F.relu(self.ab1(self.a1(x)))
        x = F.relu(self.ab2(self.a2(out)) + self.dbn(self.down(x)))
        return F.relu(self.bb1(self.b1(x)) + x)


def _randomise(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t, lo, hi in ((m.weight, 0.5, 1.5), (m.bias, -0.5, 0.5),
                              (m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0)):
                t.data.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * (hi - lo) + lo)
    return model


def _folded64(conv, bn):
    """The folded weight and bias in float64, from the modules (independent of nn.py)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = bn.bias.double() - bn.running_mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    return conv.weight.double() * scale.view(-1, 1, 1, 1), bias


@pytest.fixture
def fused_call(monkeypatch):
    """cuDNN faked on CPU: the rules run for real (with "cpu" a device and float64 a
    dtype), the two ATen ops are F.conv2d stand-ins recording (op, x, w, b, z)."""
    calls = []

    def add_relu(x, w, z, b, stride, padding, dilation, groups):
        calls.append(("add_relu", x, w, b, z))
        return torch.relu(F.conv2d(x, w, b, stride, padding, dilation, groups) + z)

    def relu(x, w, b, stride, padding, dilation, groups):
        calls.append(("relu", x, w, b, None))
        return torch.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))

    monkeypatch.setattr(cudnn_eval, "_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(cudnn_eval, "_DTYPES", cudnn_eval._DTYPES + (torch.float64,))
    monkeypatch.setattr(cudnn_eval, "capabilities", lambda device: CUDNN)
    monkeypatch.setattr(cudnn_eval, "_STATUS", {})
    monkeypatch.setattr(cudnn_eval, "_conv_add_relu", add_relu)
    monkeypatch.setattr(cudnn_eval, "_conv_relu", relu)
    return calls


def _models():
    torch.manual_seed(0)
    ref = _randomise(Net()).double().eval()
    fused = fusedres.convert(ref, backend="reference")
    for m in fused.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.fusedres_plan = fnn.SitePlan(conv="cudnn-eval")
    return ref, fused


def _input():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return x.contiguous(memory_format=torch.channels_last)


def test_eval_folds_run_in_one_call(fused_call):
    ref, fused = _models()
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    x = _input()
    with torch.no_grad():
        want = ref(x)
        got = fused(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert fnn.last_backend() == "folded-cudnn"
    # stem: conv+bias+ReLU; a1: its BN-ReLU (ab2 folds into a2 with no ReLU: today's
    # path); the projection tail: the shortcut conv runs last with the main branch as its
    # residual; b1 with the identity residual
    with torch.no_grad():
        h = torch.relu(ref.bn(ref.stem(x)))
        main = ref.ab2(ref.a2(torch.relu(ref.ab1(ref.a1(h)))))
        mid = torch.relu(main + ref.dbn(ref.down(h)))
    expect = {ref.stem.weight.shape: ("relu", ref.stem, ref.bn, None),
              ref.a1.weight.shape: ("relu", ref.a1, ref.ab1, None),
              ref.down.weight.shape: ("add_relu", ref.down, ref.dbn, main),
              ref.b1.weight.shape: ("add_relu", ref.b1, ref.bb1, mid)}
    assert sorted(c[2].shape for c in fused_call) == sorted(expect), fused_call
    for op, xx, w, b, z in fused_call:  # exactly the folded weight/bias and the residual
        want_op, conv, bn, res = expect[w.shape]
        assert op == want_op
        w64, b64 = _folded64(conv, bn)
        torch.testing.assert_close(w, w64, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, b64, rtol=1e-12, atol=1e-12)
        assert w.is_contiguous(memory_format=torch.channels_last)
        if res is not None:
            torch.testing.assert_close(z, res, rtol=1e-10, atol=1e-10)
    assert state.keys() == fused.state_dict().keys()
    for k, v in fused.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_default_plan_never_calls_it(fused_call):
    ref, fused = _models()
    for m in fused.modules():
        m.__dict__.pop("fusedres_plan", None)
    with torch.no_grad():
        torch.testing.assert_close(fused(_input()), ref(_input()), rtol=1e-10, atol=1e-10)
    assert fused_call == []
    assert fnn.last_backend() == "folded"


def test_not_in_training_or_with_autograd(fused_call):
    ref, fused = _models()
    fused(_input())  # eval with autograd: no fold, no call
    fused.train()
    fused(_input())
    assert fused_call == []


def test_nchw_input_keeps_todays_path(fused_call):
    ref, fused = _models()
    with torch.no_grad():
        fused(_input().contiguous())
    assert fused_call == []


def test_raising_call_falls_back_and_is_remembered(fused_call, monkeypatch):
    tried = []

    def raising(*args):
        tried.append(args[0].shape)
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED (faked)\nmore lines")

    monkeypatch.setattr(cudnn_eval, "_conv_add_relu", raising)
    monkeypatch.setattr(cudnn_eval, "_conv_relu", raising)
    ref, fused = _models()
    x = _input()
    for _ in range(2):
        with torch.no_grad():
            torch.testing.assert_close(fused(x), ref(x), rtol=1e-10, atol=1e-10)
    assert len(tried) == 4  # stem, a1, a2 (+shortcut), b1: each asked once, not twice
    assert fnn.last_backend() == "folded"
    failed = [s for s in cudnn_eval.statuses() if s["status"]]
    assert len(failed) == 4
    assert all(s["status"] == "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED (faked)" for s in failed)
    rows = {r["site"]: r for r in fusedres.explain(fused)}
    assert "CUDNN_STATUS_NOT_SUPPORTED" in rows["bn"]["reason"], rows["bn"]
    assert rows["bn"]["eval"] == "folded"


def test_explain_names_the_fused_eval(fused_call):
    ref, fused = _models()
    rows = {r["site"]: r for r in fusedres.explain(fused)}
    assert rows["bn"]["eval"] == "folded, cudnn conv+bias+add+relu", rows["bn"]
    for m in fused.modules():
        m.__dict__.pop("fusedres_plan", None)
    assert {r["eval"] for r in fusedres.explain(fused)} == {"folded"}


# --------------------------------------------------------------------------------------
# tune and doctor
# --------------------------------------------------------------------------------------


def test_tune_offers_it_on_cuda_only(monkeypatch):
    assert "cudnn-eval" not in T._candidates(torch.device("cpu"), None)
    monkeypatch.setattr(cudnn_eval, "capabilities", lambda device: CUDNN)
    assert "cudnn-eval" in T._candidates(torch.device("cuda"), None)
    monkeypatch.setattr(cudnn_eval, "capabilities", lambda device: CUDNN._replace(cudnn=False))
    assert "cudnn-eval" not in T._candidates(torch.device("cuda"), None)


def _tune(model, x, monkeypatch):
    monkeypatch.setattr(T, "_candidates", lambda device, only: ["torch", "cudnn-eval"])
    return fusedres.tune(model, x, cache=False, timer=lambda fns, device: {
        n: [1e-3 * (1.0 if n == "cudnn-eval" else 2.0)] * 5 for n in fns})


def test_tune_gates_and_times_it_in_eval(fused_call, monkeypatch):
    ref, fused = _models()
    fused = _tune(fused, _input(), monkeypatch)
    tuned = [m.fusedres_tuning for m in fused.modules() if hasattr(m, "fusedres_tuning")]
    assert tuned and all("cudnn-eval" in t["times_ms"] for t in tuned), tuned
    assert fused_call  # the candidate really made the (faked) fused call


def test_tune_rejects_a_wrong_fused_call(fused_call, monkeypatch):
    """A fused call that drops the bias fails tune's correctness gate: never chosen."""
    monkeypatch.setattr(cudnn_eval, "_conv_relu", lambda x, w, b, *g: torch.relu(
        F.conv2d(x, w, None, *g)))
    ref, fused = _models()
    with pytest.warns(RuntimeWarning, match="'cudnn-eval' failed its check"):
        fused = _tune(fused, _input(), monkeypatch)
    tunings = {n: m.fusedres_tuning for n, m in fused.named_modules()
               if hasattr(m, "fusedres_tuning")}
    assert any("cudnn-eval" in t["failed"] for t in tunings.values()), tunings
    assert all(t["choice"] != "cudnn-eval" for t in tunings.values()
               if "cudnn-eval" in t["failed"])


def test_tune_skips_it_in_training(fused_call, monkeypatch):
    ref, fused = _models()
    fused.train()
    fused = _tune(fused, _input(), monkeypatch)
    tuned = [m.fusedres_tuning for m in fused.modules() if hasattr(m, "fusedres_tuning")]
    assert tuned and all("cudnn-eval" not in t["times_ms"] for t in tuned)
    assert fused_call == []


def test_doctor_skips_with_a_reason_on_cpu():
    from fusedres.bench import doctor

    d = doctor.Doctor(torch.device("cpu"), quick=True, only="nothing-matches")
    d.run()
    assert ("cudnn-eval", "the fused cuDNN call runs on CUDA only") in d.skipped


# --------------------------------------------------------------------------------------
# On a GPU (skipped elsewhere): ATen's fused cuDNN op itself
# --------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_converted_model_eval(dtype):
    torch.manual_seed(0)
    ref = _randomise(Net()).cuda().to(memory_format=torch.channels_last).eval()
    fused = fusedres.convert(ref)
    for m in fused.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.fusedres_plan = fnn.SitePlan(conv="cudnn-eval")
    x = torch.randn(4, 3, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        got = fused(x)
    with torch.no_grad():
        want = ref.double()(x.double())
    # cuDNN may refuse the 3-channel stem (it then ran today's path); the others must run
    refused = [s for s in cudnn_eval.statuses() if s["status"] and s["input"][1] % 8 == 0]
    assert not refused, refused
    assert fnn.last_backend() == "folded-cudnn"
    err = (got.double() - want).norm() / want.norm()
    assert err < {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype], err


# --------------------------------------------------------------------------------------
# The folded weight's call form (autocast dtype, channels_last), made once per folded weight
# --------------------------------------------------------------------------------------


def test_fold_follows_data_assignment(fused_call):
    """``param.data = new`` (same Parameter, its version counter unchanged) and a buffer's
    ``.data = new``: the next eval run folds the new values (the output matches eager),
    and the fused call gets the new folded weight."""
    ref, fused = _models()
    x = _input()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(7)
    for name, attr in (("stem", "weight"), ("stem", "bias"), ("a1", "weight"),
                       ("ab1", "running_var")):
        old = getattr(ref.get_submodule(name), attr)
        new = torch.rand(old.shape, generator=g, dtype=old.dtype) + 0.5
        for model in (ref, fused):  # (one assignment if convert kept ref's tensors)
            getattr(model.get_submodule(name), attr).data = new.clone()
    fused_call.clear()
    with torch.no_grad():
        want, got = ref(x), fused(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    (stem,) = [c for c in fused_call if c[2].shape == ref.stem.weight.shape]
    for got_t, want_t in zip(stem[2:4], _folded64(ref.stem, ref.bn)):  # folded w and b
        torch.testing.assert_close(got_t, want_t, rtol=1e-12, atol=1e-12)


def test_call_weight_is_made_once_per_folded_weight(monkeypatch):
    monkeypatch.setattr(cudnn_eval, "_CALL_WEIGHTS", type(cudnn_eval._CALL_WEIGHTS)())
    x = _input()
    folded = torch.randn(4, 3, 3, 3, dtype=torch.float64)  # NCHW: converted
    w = cudnn_eval._call_weight(x, folded)
    assert w.is_contiguous(memory_format=torch.channels_last) and torch.equal(w, folded)
    assert cudnn_eval._call_weight(x, folded) is w  # cached, not converted again
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the autocast dtype: another form
        wb = cudnn_eval._call_weight(x, folded)
    assert wb.dtype == torch.bfloat16 and torch.equal(wb, folded.to(torch.bfloat16))
    assert wb.is_contiguous(memory_format=torch.channels_last)
    changed = folded * 2  # new weights: a new folded tensor, a new call form
    assert torch.equal(cudnn_eval._call_weight(x, changed), changed)
    ready = folded.contiguous(memory_format=torch.channels_last)
    assert cudnn_eval._call_weight(x, ready) is ready  # nothing to convert, nothing kept
    assert ready not in cudnn_eval._CALL_WEIGHTS
    del folded, changed, w, wb
    gc.collect()
    assert len(cudnn_eval._CALL_WEIGHTS) == 0  # entries go with their folded weights


def test_model_reuses_the_call_weights_until_its_weights_change(fused_call, monkeypatch):
    monkeypatch.setattr(cudnn_eval, "_CALL_WEIGHTS", type(cudnn_eval._CALL_WEIGHTS)())
    ref, fused = _models()
    x = _input()
    with torch.no_grad():
        fused(x)
        first = {c[2].shape: c[2] for c in fused_call}
        fused_call.clear()
        fused(x)
        assert all(c[2] is first[c[2].shape] for c in fused_call)  # no per-call conversion
        for m in (ref, fused):
            m.stem.weight.mul_(0.5)  # in place: the fold cache and the call form follow
        fused_call.clear()
        got, want = fused(x), ref(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    stem = [c[2] for c in fused_call if c[2].shape == ref.stem.weight.shape]
    assert stem and stem[0] is not first[ref.stem.weight.shape]

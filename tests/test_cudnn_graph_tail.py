"""The block tail's cuDNN graph (BNAddReLU, DualBNAddReLU: the (dual) BN-add-ReLU apply as
one pointwise graph, ``conv="cudnn-graph-tail"``) on CPU: its reference against torch's
composite and the BN kernels' apply in float64, the planner's rules with faked
capabilities, and the site wiring with the reference graphs standing in for cuDNN -- a
training step equals the unconverted model's (output, every gradient, running statistics:
the backward, the BN kernels', reads the graph's ReLU mask), a refused graph or one that
fails to execute falls back, explain and tune name it. cuDNN itself: GPU only (doctor rows
``cudnn_graph_BNAddReLU``, ``cudnn_graph_DualBNAddReLU``, ``cudnn_graph_tail_site``)."""
import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fusedres
from fusedres import cudnn_graph, ops
from fusedres import nn as fnn
from fusedres import reference as R
from test_cudnn_graph import _close, _fake_cudnn, _train_steps
from test_cudnn_graph_plain import _resnet as plain_resnet

T = importlib.import_module("fusedres.tune")
H100 = cudnn_graph.Capabilities(True, 92400, (9, 0))
CL = torch.channels_last


def _bn_inputs(shape, seed, mean_offset=0.0):
    """A BN input and its (mean, var, weight, bias), float64, channels_last."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + mean_offset
         ).contiguous(memory_format=CL)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    c = shape[1]
    weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(c, generator=g, dtype=torch.float64) * 0.5
    return x, mean, var, weight, bias


# --------------------------------------------------------------------------------------
# The reference graph
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("mean_offset", [0.0, 1e4])  # a large mean: the centred form holds
def test_reference_against_torch_composite(dual, mean_offset):
    eps = 1e-5
    x, mean, var, w, b = _bn_inputs((2, 16, 5, 3), 0, mean_offset)
    x2, mean2, var2, w2, b2 = _bn_inputs((2, 16, 5, 3), 1, -mean_offset)
    r = torch.randn(x.shape, dtype=torch.float64).contiguous(memory_format=CL)
    _, scale, shift = ops.centred_scale_shift(w, b, mean, var, eps)
    _, scale2, shift2 = ops.centred_scale_shift(w2, b2, mean2, var2, eps)
    if dual:
        out, mask = R.graph_bn_add_relu(x, mean, scale, shift, x2=x2, mean2=mean2,
                                        scale2=scale2, shift2=shift2, save_mask=True)
        other = F.batch_norm(x2, mean2, var2, w2, b2, False, 0.0, eps)
    else:
        out, mask = R.graph_bn_add_relu(x, mean, scale, shift, residual=r, save_mask=True)
        other = r
    pre = F.batch_norm(x, mean, var, w, b, False, 0.0, eps) + other
    torch.testing.assert_close(out, torch.relu(pre), rtol=1e-12, atol=1e-9)
    assert out.is_contiguous(memory_format=CL)
    passes = R.unpack_mask(mask, (2, 16, 15), True)
    assert torch.equal(passes, (pre > 0).reshape(2, 16, 15))
    assert 0 < passes.float().mean() < 1
    # the BN kernels' apply: the same output, and bit for bit the mask their backward reads
    want, want_mask = R.bn_apply(ops.ncs(x), mean, scale, shift, None if dual else ops.ncs(r),
                                 ops.ncs(x2) if dual else None, mean2 if dual else None,
                                 scale2 if dual else None, shift2 if dual else None, True, True,
                                 True)
    assert torch.equal(ops.ncs(out), want) and torch.equal(mask, want_mask)
    _, no_mask = R.graph_bn_add_relu(x, mean, scale, shift, residual=r)
    assert no_mask.numel() == 0


def test_reference_needs_one_second_operand():
    x, mean, var, w, b = _bn_inputs((1, 8, 2, 2), 0)
    with pytest.raises(ValueError):
        R.graph_bn_add_relu(x, mean, w, b)
    with pytest.raises(ValueError):
        R.graph_bn_add_relu(x, mean, w, b, residual=x, x2=x, mean2=mean, scale2=w, shift2=b)


# --------------------------------------------------------------------------------------
# Planner
# --------------------------------------------------------------------------------------


def _plan(caps=H100, dtype=torch.float16, shape=(32, 256, 56, 56), **kw):
    args = dict(other_dtype=dtype, other_shape=shape)
    args.update(kw)
    return cudnn_graph.tail_plan(caps, dtype, shape, **args)


def test_planner_rules():
    assert _plan() is None
    assert _plan(dtype=torch.bfloat16) is None
    assert _plan(caps=H100._replace(arch=(8, 0)), shape=(256, 2048, 7, 7)) is None
    assert "built without" in _plan(caps=H100._replace(built=False))
    assert "8.0" in _plan(caps=H100._replace(arch=(7, 5)))
    assert "float16 or bfloat16" in _plan(dtype=torch.float32)
    assert "multiples of 8" in _plan(shape=(32, 12, 56, 56))
    assert "differs" in _plan(other_dtype=torch.bfloat16)
    assert "differs" in _plan(other_shape=(32, 256, 28, 28))
    assert "channels_last" in _plan(channels_last=False)
    assert "aligned" in _plan(aligned=False)


def test_problem_outside_a_tail_and_on_cpu():
    x = torch.randn(2, 8, 4, 4)
    assert "not a block tail" in cudnn_graph.tail_problem(x, None, True)
    assert "not a block tail" in cudnn_graph.tail_problem(x, x, False)
    assert "CUDA" in cudnn_graph.tail_problem(x, x, True)


# --------------------------------------------------------------------------------------
# Sites: the reference graphs standing in for cuDNN
# --------------------------------------------------------------------------------------


def _fake_tail(monkeypatch, refuse=False, fail=False):
    """cuDNN's conv graphs and tail graph faked (CPU, float64): the tail graph planned
    under the real rules but dtype and device (``refuse``: refused by check_support;
    ``fail``: planned, raises when run), run by its reference; returns the tail kinds
    run with their mask flag."""
    _fake_cudnn(monkeypatch)
    seen = []

    def problem(x, other, relu):
        if not relu or other is None:
            return "not a block tail"
        return cudnn_graph.tail_plan(H100, torch.float16, tuple(x.shape), torch.float16,
                                     tuple(other.shape), x.is_contiguous(memory_format=CL)
                                     and other.is_contiguous(memory_format=CL))

    conv_ask = cudnn_graph._ask_cudnn  # _fake_cudnn's

    def ask(ops, *args):
        if ops != "cudnn_graph_tail":
            return conv_ask(ops, *args)
        return ("check_support: faked", None) if refuse else ("", "fake-tail-engine")

    def run(x, mean, scale, shift, residual, x2, mean2, scale2, shift2, save_mask):
        if fail:
            raise RuntimeError("fusedres cudnn_graph_bn_add_relu: execute failed: faked")
        seen.append((cudnn_graph.TAIL_KINDS[x2 is not None], save_mask))
        return R.graph_bn_add_relu(x, mean, scale, shift, residual, x2, mean2, scale2, shift2,
                                   save_mask)

    monkeypatch.setattr(cudnn_graph, "tail_problem", problem)
    monkeypatch.setattr(cudnn_graph, "_ask_cudnn", ask)
    monkeypatch.setattr(cudnn_graph, "_run_tail", run)
    return seen


def _resnet(name="resnet18", plan="cudnn-graph-tail", memory_format=CL):
    """test_cudnn_graph_plain's float64 torchvision ResNet and its conversion, in
    ``memory_format``, every site's plan ``plan``."""
    ref, fused = plain_resnet(name)
    ref.to(memory_format=memory_format), fused.to(memory_format=memory_format)
    for m in fused.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.fusedres_plan = fnn.SitePlan(conv=plan)
    return ref, fused


def _channels_last_steps(ref, fused, steps=1):
    orig = torch.randn

    def randn(*a, **k):  # _train_steps' inputs, channels_last as the model
        t = orig(*a, **k)
        return t.contiguous(memory_format=CL) if t.dim() == 4 else t

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "randn", randn)
        _train_steps(ref, fused, steps=steps, shape=(2, 3, 64, 64))


def _explained(model, monkeypatch):
    """explain's rows, the model's device taken for CUDA (explain judges from modules)."""
    monkeypatch.setattr(cudnn_graph, "_defined", lambda op: True)
    note = cudnn_graph.tail_note
    monkeypatch.setattr(cudnn_graph, "tail_note",
                        lambda kind, c, device: note(kind, c, torch.device("cuda")))
    return {r["site"]: r for r in fusedres.explain(model)}


def _tails(model):
    blocks = [m for m in model.modules() if isinstance(m, (torchvision.models.resnet.BasicBlock,
                                                            torchvision.models.resnet.Bottleneck))]
    dual = sum(1 for b in blocks if b.downsample is not None)
    return len(blocks) - dual, dual


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])  # (about a second each here)
def test_training_steps_on_the_tail_graph(monkeypatch, name):
    seen = _fake_tail(monkeypatch)
    ref, fused = _resnet(name)
    _channels_last_steps(ref, fused, steps=2)
    add, dual = _tails(ref)
    # every tail ran its apply as the graph, with the ReLU mask the backward read
    assert seen.count(("BNAddReLU", True)) == 2 * add, seen
    assert seen.count(("DualBNAddReLU", True)) == 2 * dual, seen
    assert len(seen) == 2 * (add + dual)
    assert fnn.last_backend() == "cudnn-graph-tail"
    rows = _explained(fused, monkeypatch)
    tail = rows["layer1.0.bn2" if name == "resnet18" else "layer1.1.bn3"]
    assert "cuDNN's BNAddReLU graph, on fake-tail-engine" in tail["reason"], tail
    dual = rows["layer2.0.downsample.1"]
    assert dual["pattern"].endswith("+bn-add-relu"), dual
    assert "cuDNN's DualBNAddReLU graph, on fake-tail-engine" in dual["reason"], dual
    assert {s["kind"] for s in cudnn_graph.statuses()} >= set(cudnn_graph.TAIL_KINDS)


def test_wrong_mask_fails_the_gradients(monkeypatch):
    """The step's gradients check the graph's mask: with every bit set, they differ."""
    seen = _fake_tail(monkeypatch)
    run = cudnn_graph._run_tail

    def all_pass(*args):
        out, mask = run(*args)
        return out, torch.full_like(mask, 255)

    monkeypatch.setattr(cudnn_graph, "_run_tail", all_pass)
    ref, fused = _resnet()
    with pytest.raises(AssertionError, match="grad"):
        _channels_last_steps(ref, fused)
    assert seen


def test_cudnn_graph_plan_keeps_the_kernels_apply(monkeypatch):
    """Plain ``cudnn-graph`` (what tune compares the tail path with) never runs it."""
    seen = _fake_tail(monkeypatch)
    ref, fused = _resnet(plan="cudnn-graph")
    _channels_last_steps(ref, fused)
    assert seen == [] and fnn.last_backend() == "cudnn-graph-stats"


@pytest.mark.parametrize("refuse,fail", [(True, False), (False, True)])
def test_refused_or_failing_graph_falls_back(monkeypatch, refuse, fail):
    """Refused by cuDNN or failing to execute: the BN kernels' apply, the same answers,
    remembered, named by statuses() and explain; no exception."""
    seen = _fake_tail(monkeypatch, refuse=refuse, fail=fail)
    ref, fused = _resnet()
    _channels_last_steps(ref, fused)
    assert seen == [] and fnn.last_backend() == "cudnn-graph-stats"
    why = "check_support: faked" if refuse else "execute failed: fusedres"
    tails = [s for s in cudnn_graph.statuses() if s["kind"] in cudnn_graph.TAIL_KINDS]
    assert tails and all(s["status"].startswith(why) for s in tails), tails
    rows = _explained(fused, monkeypatch)
    assert "cuDNN refused it at input" in rows["layer1.0.bn2"]["reason"], rows["layer1.0.bn2"]
    monkeypatch.undo()
    rows = {r["site"]: r for r in fusedres.explain(fused)}  # (on CPU: never planned)
    assert "runs on CUDA tensors only" in rows["layer1.0.bn2"]["reason"], rows["layer1.0.bn2"]


@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
def test_tail_with_given_statistics_against_torch(monkeypatch, dual, layout):
    """``bn_act_with_stats`` with the tail graph: out and every gradient equal torch's
    composite in float64; channels_last runs the graph, NCHW (the mask's layout would
    differ) the BN kernels' apply."""
    seen = _fake_tail(monkeypatch)
    y, _, _, w, b = _bn_inputs((2, 16, 5, 3), 0)
    s, _, _, w2, b2 = _bn_inputs((2, 16, 5, 3), 1)
    dout = torch.randn(y.shape, dtype=torch.float64)
    eps = 1e-5

    def run(fused):
        leaves = [t.clone().contiguous(memory_format=layout).requires_grad_() if t.dim() == 4
                  else t.clone().requires_grad_() for t in (y, s, w, b, w2, b2)]
        yy, ss, ww, bb, ww2, bb2 = leaves
        if fused and dual:
            out = cudnn_graph.bn_act_with_stats(
                yy, ww, bb, None, relu=True, shortcut=ss, shortcut_weight=ww2,
                shortcut_bias=bb2, eps=eps, backend="reference_primitives", tail_graph=True)[0]
        elif fused:
            out = cudnn_graph.bn_act_with_stats(yy, ww, bb, None, relu=True, residual=ss,
                                                eps=eps, backend="reference_primitives",
                                                tail_graph=True)[0]
        else:
            other = F.batch_norm(ss, None, None, ww2, bb2, True, 0.1, eps) if dual else ss
            out = torch.relu(F.batch_norm(yy, None, None, ww, bb, True, 0.1, eps) + other)
        used = leaves if dual else leaves[:4]
        return [out, *torch.autograd.grad(out, used, dout)]

    for name, got, want in zip(("out", "dy", "ds", "dw", "db", "dw2", "db2"), run(True),
                               run(False)):
        _close(got, want, name)
    assert len(seen) == (layout == CL) and cudnn_graph.tail_ran() == (layout == CL)


def test_eval_does_not_plan_it(monkeypatch):
    seen = _fake_tail(monkeypatch)
    ref, fused = _resnet()
    ref.eval(), fused.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=CL)
    _close(fused(x), ref(x), "eval output")
    assert seen == []


# --------------------------------------------------------------------------------------
# Registry, tune, fake kernel, doctor
# --------------------------------------------------------------------------------------


def test_registered_and_offered_at_tails_only(monkeypatch):
    assert "cudnn-graph-tail" in fnn.conv_paths.conv_paths()
    assert T.plan_of("cudnn-graph-tail") == fnn.SitePlan(conv="cudnn-graph-tail")
    assert T.RANK["cudnn-graph-tail"] > T.RANK["cudnn-graph"]
    conv, bn, short = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def site(tensors=(), **kwargs):
        return T._Site("bn", None, bn, kwargs, {n: None for n in tensors}, None)

    tail = site(("residual",), relu=True)
    dual = T._Site("bn", conv, bn, dict(relu=True, shortcut_conv=conv, shortcut_bn=short), {},
                   None)
    assert T._changes_site("cudnn-graph-tail", tail, train=True)
    assert T._changes_site("cudnn-graph-tail", dual, train=True)
    assert not T._changes_site("cudnn-graph-tail", tail, train=False)
    assert not T._changes_site("cudnn-graph-tail", site(relu=True), train=True)
    prologue = site(relu=True, next_conv=conv)  # elsewhere it is cudnn-graph ...
    assert T._changes_site("cudnn-graph-tail", prologue, train=True)
    both = ["torch", "cudnn-graph", "cudnn-graph-tail"]  # ... timed once where both are
    assert T._same_as_another("cudnn-graph-tail", prologue, True, both)
    assert not T._same_as_another("cudnn-graph-tail", prologue, True, both[::2])
    assert not T._same_as_another("cudnn-graph-tail", dual, True, both)
    assert T._same_as_another("cudnn-graph-tail", dual, False, both)
    assert "cudnn-graph-tail" not in T._candidates(torch.device("cpu"), None)
    monkeypatch.setattr(cudnn_graph, "built", lambda: True)
    monkeypatch.setattr(cudnn_graph, "_defined", lambda op: True)
    assert "cudnn-graph-tail" in T._candidates(torch.device("cuda"), None)


@pytest.mark.parametrize("wrong", [False, True])
def test_tune_gate_at_tails(monkeypatch, wrong):
    """tune (cuDNN faked, candidates as on a GPU with the path) times cudnn-graph-tail at
    the tails and picks it where fastest; a graph whose mask is wrong fails the
    correctness gate (the gradients) and is never chosen."""
    from test_tune import fake_timer

    seen = _fake_tail(monkeypatch)
    if wrong:
        run = cudnn_graph._run_tail
        monkeypatch.setattr(cudnn_graph, "_run_tail",
                            lambda *a: (lambda o, m: (o, torch.zeros_like(m)))(*run(*a)))
    real = T._candidates
    monkeypatch.setattr(T, "_candidates", lambda device, only: real(device, only) + [
        "cudnn-graph", "cudnn-graph-tail"])
    block = torchvision.models.resnet.BasicBlock
    torch.manual_seed(0)
    model = nn.Sequential(
        block(8, 16, 2, nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))),
        block(16, 16)).double().to(memory_format=CL)
    model = fusedres.convert(model, backend="reference")
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64).contiguous(memory_format=CL)
    timer = fake_timer({"torch": 3.0, "reference": 2.0, "cpu": 2.0, "cudnn-graph": 1.5,
                        "cudnn-graph-tail": 1.0})
    with pytest.warns(RuntimeWarning) if wrong else contextlib.nullcontext():
        T.tune(model, x, cache=False, verbose=False, timer=timer)
    for bn in (model[0].downsample[1], model[1].bn2):  # the dual tail, the identity tail
        tuning = bn.fusedres_tuning
        if wrong:
            assert tuning["choice"] != "cudnn-graph-tail", tuning
            assert "cudnn-graph-tail" in tuning["failed"], tuning
        else:
            assert tuning["choice"] == "cudnn-graph-tail", tuning
    assert {kind for kind, _ in seen} == set(cudnn_graph.TAIL_KINDS)
    # a BN-ReLU -> conv site: cudnn-graph-tail is cudnn-graph there, timed once
    assert "cudnn-graph-tail" not in model[1].bn1.fusedres_tuning["times_ms"]


def test_fake_kernel_shapes():
    x = torch.empty(4, 16, 7, 5, device="meta").contiguous(memory_format=CL)
    c = torch.empty(16, device="meta")
    out, mask = cudnn_graph._tail_fake(x, c, c, c, x, None, None, None, None, True)
    assert out.shape == x.shape and out.is_contiguous(memory_format=CL)
    assert mask.dtype == torch.uint8 and mask.shape == ((4 * 16 * 35 + 7) // 8,)
    assert cudnn_graph._tail_fake(x, c, c, c, x, None, None, None, None, False)[1].numel() == 0
    if cudnn_graph._defined(cudnn_graph._TAIL_OP):  # the op's registered fake
        out, mask = torch.ops.fusedres.cudnn_graph_bn_add_relu(x, c, c, c, None, x, c, c, c, True)
        assert out.shape == x.shape and mask.shape == ((4 * 16 * 35 + 7) // 8,)


def test_doctor_tail_rows_with_faked_cudnn(monkeypatch):
    """The doctor's tail rows run their checks (float64 on CPU, the reference standing in
    for cuDNN) and a wrong graph -- its output or its mask -- fails them."""
    from fusedres.bench import doctor

    _fake_tail(monkeypatch)

    def rows():
        d = doctor.Doctor(torch.device("cpu"), quick=True, progress=False)
        d._cudnn_tail_graphs(torch.float64, (2, 16, 6, 6), 0, "16x6x6")
        return {r.kernel: r for r in d.rows.values()}

    got = rows()
    assert set(got) == {"cudnn_graph_BNAddReLU", "cudnn_graph_DualBNAddReLU",
                        "cudnn_graph_tail_site"}
    assert all(r.ok and r.cases >= 1 for r in got.values()), got
    run = cudnn_graph._run_tail
    monkeypatch.setattr(cudnn_graph, "_run_tail",
                        lambda *a: (lambda o, m: (o, m ^ 1))(*run(*a)))  # one bit per byte
    got = rows()
    assert not got["cudnn_graph_DualBNAddReLU"].ok and "mask" in got[
        "cudnn_graph_DualBNAddReLU"].detail
    assert not got["cudnn_graph_tail_site"].ok
    monkeypatch.setattr(cudnn_graph, "_run_tail",
                        lambda *a: (lambda o, m: (o * 1.01, m))(*run(*a)))
    assert not rows()["cudnn_graph_BNAddReLU"].ok


# --------------------------------------------------------------------------------------
# On a GPU with the path built (skipped elsewhere): cuDNN itself
# --------------------------------------------------------------------------------------

_NEEDS_GPU = pytest.mark.skipif(
    not (torch.cuda.is_available() and cudnn_graph._defined(cudnn_graph._TAIL_OP)),
    reason="needs a GPU and fusedres._C built with the cuDNN graph path")


@pytest.mark.cuda
@_NEEDS_GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dual", [False, True])
def test_gpu_tail_graph_against_reference(dtype, dual):
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (8, 64, 14, 14)
    rand = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    x, other = (rand(*shape).to(dtype).contiguous(memory_format=CL) for _ in range(2))
    mean, scale, shift, mean2, scale2, shift2 = (rand(64) for _ in range(6))
    kind = cudnn_graph.TAIL_KINDS[dual]
    status = cudnn_graph.tail_status(kind, x, True)
    if status:
        pytest.skip(f"cuDNN refused the graph here: {status}")
    args = (other, None, None, None, None) if not dual else (None, other, mean2, scale2, shift2)
    out, mask = torch.ops.fusedres.cudnn_graph_bn_add_relu(x, mean, scale, shift, *args, True)
    d = torch.float64
    want, want_mask = R.graph_bn_add_relu(
        x.to(d), mean.to(d), scale.to(d), shift.to(d),
        *(t if t is None else t.to(d) for t in args), save_mask=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out.to(d), want, rtol=tol, atol=tol)
    bits = R.unpack_mask(mask, (8, 64, 196), True) ^ R.unpack_mask(want_mask, (8, 64, 196), True)
    assert bits.float().mean() < 1e-3


@pytest.mark.cuda
@_NEEDS_GPU
@pytest.mark.parametrize("dual", [False, True])
def test_gpu_tail_opcheck(dual):
    shape = (4, 16, 6, 6)
    x, other = (torch.randn(shape, device="cuda").half().contiguous(memory_format=CL)
                for _ in range(2))
    vec = [torch.randn(16, device="cuda") for _ in range(6)]
    status = cudnn_graph.tail_status(cudnn_graph.TAIL_KINDS[dual], x, True)
    if status:
        pytest.skip(f"cuDNN refused the graph here: {status}")
    rest = (None, other, *vec[3:]) if dual else (other, None, None, None, None)
    torch.library.opcheck(torch.ops.fusedres.cudnn_graph_bn_add_relu, (x, *vec[:3], *rest, True))


def test_each_graph_asks_its_own_planner_ops(monkeypatch):
    """plan_status, tail_status and finalize_status ask the C++ planner through one path
    (``_ask_cudnn``): ``fusedres::<graph>_plan`` with the graph's arguments (the stem's
    input and weight padded to 8 channels), ``<graph>_engine`` only where it plans the
    graph, once per graph; the answers are remembered with the engine."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(cudnn_graph, "_STATUS", {})
    monkeypatch.setattr(cudnn_graph, "_ENGINE", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    calls = []

    def fake(op, answer):
        def run(*args):
            calls.append((op, args))
            return answer
        monkeypatch.setattr(torch.ops.fusedres, op, run, raising=False)

    fake("cudnn_graph_plan", "")
    fake("cudnn_graph_engine", "conv-engine")
    fake("cudnn_graph_tail_plan", "check_support: faked")
    fake("cudnn_graph_tail_engine", "never asked")
    fake("cudnn_graph_bn_finalize_plan", "")
    fake("cudnn_graph_bn_finalize_engine", "finalize-engine")
    with FakeTensorMode():  # CUDA tensors without a GPU (only shapes, strides, device)
        def cuda(*shape):
            return torch.empty(*shape, device="cuda", dtype=torch.float16).contiguous(
                memory_format=CL)
        x, w, xt = cuda(2, 3, 8, 8), cuda(16, 3, 3, 3), cuda(2, 16, 4, 4)
        sums = torch.empty(16, device="cuda")
        for _ in range(2):  # the second time: remembered, nothing asked
            assert cudnn_graph.plan_status(x, w, "F0", 1, 1) == ""
            assert cudnn_graph.tail_status("BNAddReLU", xt, True) == "check_support: faked"
            assert cudnn_graph.finalize_status(sums) == ""
    assert [op for op, _ in calls] == ["cudnn_graph_plan", "cudnn_graph_engine",
                                       "cudnn_graph_tail_plan", "cudnn_graph_bn_finalize_plan",
                                       "cudnn_graph_bn_finalize_engine"]
    conv_args = calls[0][1]
    assert conv_args[0] == "F0" and conv_args[3:] == ([1, 1], [1, 1])
    assert conv_args[1].shape == (2, 8, 8, 8) and conv_args[2].shape == (16, 8, 3, 3)
    assert calls[1][1][1].shape == (2, 8, 8, 8)  # the engine of the same padded graph
    assert calls[2][1] == ("BNAddReLU", xt, True) and calls[3][1] == (sums,)
    assert cudnn_graph.engine(x, w, "F0", 1, 1) == "conv-engine"
    assert cudnn_graph.tail_engine("BNAddReLU", xt, True) is None
    assert cudnn_graph.engine_of_finalize(sums) == "finalize-engine"


# --------------------------------------------------------------------------------------
# CUDA-graph capture: nothing is planned inside one
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tail", "finalize", "conv"])
def test_nothing_is_planned_during_cuda_graph_capture(monkeypatch, which):
    """cuDNN builds a plan (heuristics, NVRTC, support checks) on a graph's first call:
    never inside a CUDA-graph capture, where a failure would be remembered as cuDNN's
    refusal for the whole process (and could invalidate the capture). The caller's
    fallback is captured, nothing is remembered, the next eager call plans it, and a
    planned graph runs inside later captures."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(cudnn_graph, "_STATUS", {})
    monkeypatch.setattr(cudnn_graph, "_ENGINE", {})
    asked = []

    def ask(*args):
        asked.append(args)
        return "", "fake-engine"

    monkeypatch.setattr(cudnn_graph, "_ask_cudnn", ask)  # every graph's planner
    with FakeTensorMode():  # CUDA tensors without a GPU (only shapes, strides, device)
        x = torch.empty(2, 16, 4, 4, device="cuda", dtype=torch.float16).contiguous(
            memory_format=CL)
        w = torch.empty(16, 16, 1, 1, device="cuda", dtype=torch.float16).contiguous(
            memory_format=CL)
        sums = torch.empty(16, device="cuda")
    status = {"tail": lambda: cudnn_graph.tail_status("BNAddReLU", x, True),
              "finalize": lambda: cudnn_graph.finalize_status(sums),
              "conv": lambda: cudnn_graph.plan_status(x, w, "F1", 1, 0)}[which]

    def capturing(now):
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: now)

    capturing(True)
    assert "CUDA-graph capture" in status()
    assert asked == [] and cudnn_graph._STATUS == {}
    capturing(False)
    assert status() == "" and len(asked) == 1  # planned at the next eager call
    capturing(True)
    assert status() == "" and len(asked) == 1  # and used inside a later capture


def test_explain_note_states_the_rules_it_knows(monkeypatch):
    """explain's tail note, before any call: a width the planner refuses is named as such
    (not 'planned at the first training call'), and an unplanned tail says which inputs
    the graph takes (a float32 or NCHW model never runs it)."""
    monkeypatch.setattr(cudnn_graph, "_STATUS", {})
    monkeypatch.setattr(cudnn_graph, "_defined", lambda op: True)
    cuda = torch.device("cuda")
    odd = cudnn_graph.tail_note("BNAddReLU", 12, cuda)
    assert odd.startswith("the BN kernels' apply") and "multiples of 8" in odd, odd
    fresh = cudnn_graph.tail_note("DualBNAddReLU", 16, cuda)
    assert "planned at the first training call" in fresh, fresh
    assert "float16/bfloat16" in fresh and "channels_last" in fresh, fresh

"""The two ways the Triton conv backward reads the BN-statistics gradient
(``fusedres.conv.dbn_backward``): "fused" (prologues of dgrad and wgrad), "materialised"
(one elementwise pass, then the plain kernels), and "auto" (timed once per shape on CUDA,
cached; "fused" on CPU, under capture / tracing / deterministic mode).

Gradients are judged against float64 autograd of the reference composite; the timing
logic of "auto" runs here with a fake timer (the interpreter is never timed).
"""
import itertools
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import fusedres  # noqa: E402,F401
from fusedres import _timing  # noqa: E402
from fusedres import conv as fconv  # noqa: E402

pytest.importorskip("triton")
from fusedres.kernels import bn as bn_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K = fconv.kernels()
MODES = ("fused", "materialised")

# (name, N, C_in, H, W, C_out, kernel, stride, padding)
CASES = [
    ("3x3s1", 2, 5, 7, 7, 6, 3, 1, 1),
    ("3x3s2", 1, 8, 9, 8, 65, 3, 2, 1),
    ("1x1s2", 2, 16, 6, 7, 8, 1, 2, 0),
    ("stem7x7s2", 1, 3, 13, 11, 8, 7, 2, 3),
]
IDS = [c[0] for c in CASES]


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch, tmp_path):
    """IEEE fp32 (no TF32), an empty choice table and a private decision cache."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(fconv, "_DBN_CHOICES", {})
    monkeypatch.setattr(fconv, "_DBN_DISK", {})
    monkeypatch.setattr(fconv, "_LAST_DBN_BACKWARD", None)
    monkeypatch.setenv("FUSEDRES_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FUSEDRES_CACHE", raising=False)


def _make(case, dtype=torch.float64):
    _, n, ci, h, w, co, k, st, pd = case
    g = torch.Generator().manual_seed(sum(map(ord, case[0])))
    x = torch.randn(n, ci, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(co, ci, k, k, generator=g, dtype=torch.float64) / (ci * k * k) ** 0.5
    scale = torch.rand(ci, generator=g, dtype=torch.float64) + 0.5
    scale[::2] *= -1
    shift = torch.rand(ci, generator=g, dtype=torch.float64) * 0.5 + 0.1
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cl = torch.channels_last
    return (x.contiguous(memory_format=cl).to(DEVICE, dtype).requires_grad_(),
            wt.contiguous(memory_format=cl).to(DEVICE, dtype).requires_grad_(),
            scale.to(DEVICE, acc).requires_grad_(), shift.to(DEVICE, acc).requires_grad_(),
            st, pd)


def _loss(y, mean, var, dy_format=torch.contiguous_format):
    """Every output matters: a non-uniform dy (in ``dy_format``), and dmean/dvar that
    differ per channel."""
    c = torch.arange(1, y.shape[1] + 1, dtype=mean.dtype, device=y.device)
    ramp = torch.cos(torch.arange(y.numel(), device=y.device).view_as(y).to(y.dtype))
    ramp = ramp.contiguous(memory_format=dy_format)
    return (y * ramp).sum() + (mean * c).sum() + (var * c.flip(0)).sum()


def _grads(x, w, scale, shift, st, pd, prologue, backend, dy_format=torch.contiguous_format):
    if prologue:
        out = fconv.bn_relu_conv2d_stats(x, scale, shift, w, st, pd, backend=backend)
        return torch.autograd.grad(_loss(*out, dy_format), [x, scale, shift, w])
    return torch.autograd.grad(
        _loss(*fconv.conv2d_stats(x, w, st, pd, backend=backend), dy_format), [x, w])


def _float64_grads(x, w, scale, shift, st, pd, prologue):
    leaves = [t.detach().double().requires_grad_() for t in (x, w, scale, shift)]
    return _grads(*leaves, st, pd, prologue, "reference")


@pytest.mark.parametrize("prologue", [True, False], ids=["bn_relu+conv+stats", "conv+stats"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("mode", MODES)
def test_grads_against_float64(monkeypatch, mode, case, prologue):
    """Input, weight (and scale/shift) gradients through (y, mean, var) in float64, in
    each mode, and the mode is the one that ran."""
    monkeypatch.setattr(fconv, "dbn_backward", mode)
    x, w, scale, shift, st, pd = _make(case)
    got = _grads(x, w, scale, shift, st, pd, prologue, "triton")
    want = _float64_grads(x, w, scale, shift, st, pd, prologue)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert fconv.last_dbn_backward() == mode


@pytest.mark.parametrize("mode", MODES)
def test_fp16_grads_as_accurate_as_fused(monkeypatch, mode):
    """fp16: every gradient within the fused path's tolerance of float64, and the two
    modes within one fp16 rounding of each other (dy_total is rounded once to fp16 in
    both: as the A operand of the fused kernels, at the store of the materialised pass)."""
    x, w, scale, shift, st, pd = _make(CASES[0], torch.float16)
    want = _float64_grads(x, w, scale, shift, st, pd, True)
    got = {}
    for m in MODES:
        monkeypatch.setattr(fconv, "dbn_backward", m)
        got[m] = _grads(x, w, scale, shift, st, pd, True, "triton")
    for a, b, other in zip(got[mode], want, got[MODES[1 - MODES.index(mode)]]):
        assert a.dtype == (torch.float16 if b.dim() == 4 else torch.float32)
        tol = 2e-2 * b.abs().max().item()
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=tol)
        torch.testing.assert_close(a.double(), other.double(), rtol=4e-3, atol=tol / 4)


TMA_CASES = [("tma3x3s1", 2, 64, 6, 6, 64, 3, 1, 1), ("tma1x1s1", 2, 64, 4, 4, 64, 1, 1, 0),
             # stride 2: dgrad by boxes of a phase (odd sizes: phases of unequal size)
             ("tma3x3s2_odd", 3, 16, 7, 5, 32, 3, 2, 1),
             ("tma1x1s2_even", 1, 32, 6, 4, 16, 1, 2, 0)]


@pytest.mark.parametrize("case", TMA_CASES, ids=[c[0] for c in TMA_CASES])
@pytest.mark.parametrize("mode", MODES)
def test_tma_shapes_fp32(monkeypatch, mode, case):
    """Shapes with whole channel tiles, where dgrad (stride 1, and stride 2 by boxes of a
    phase) and wgrad read dy (and the fused mode y) by TMA boxes: fp32 gradients against
    float64 (IEEE fp32, no TF32)."""
    monkeypatch.setattr(fconv, "dbn_backward", mode)
    seen = []
    launch = K._launch
    monkeypatch.setattr(K, "_launch", lambda run, cfgs, grid, args, kw: seen.append(kw)
                        or launch(run, cfgs, grid, args, kw))
    x, w, scale, shift, st, pd = _make(case, torch.float32)
    got = _grads(x, w, scale, shift, st, pd, True, "triton")
    if K.TensorDescriptor is not None:  # dgrad (fused: with the dBN prologue) by TMA boxes
        dgrad = [kw for kw in seen if kw.get("TRANSPOSED")]
        assert dgrad and all(kw["A_TMA"] == 2 for kw in dgrad), dgrad
        assert any(kw["PROLOGUE"] == 2 for kw in dgrad) == (mode == "fused"), dgrad
    want = _float64_grads(x, w, scale, shift, st, pd, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    assert fconv.last_dbn_backward() == mode


def test_materialised_is_one_pass_then_plain_kernels(monkeypatch):
    """One elementwise pass (the BN backward's apply kernel) per backward, and dgrad and
    wgrad then run without the dBN prologue (no y, no coefficients); "fused" is the
    other way round."""
    calls = {"apply": 0, "dbn_kernels": 0, "plain_kernels": 0}
    apply = bn_kernels.bn_backward_apply
    dgrad, wgrad = K.conv_dgrad, K.conv_wgrad

    def counted_apply(*a, **kw):
        calls["apply"] += 1
        return apply(*a, **kw)

    def counted(fn):
        def run(*a, **kw):
            calls["dbn_kernels" if kw.get("y") is not None else "plain_kernels"] += 1
            return fn(*a, **kw)
        return run

    monkeypatch.setattr(bn_kernels, "bn_backward_apply", counted_apply)
    monkeypatch.setattr(K, "conv_dgrad", counted(dgrad))
    monkeypatch.setattr(K, "conv_wgrad", counted(wgrad))
    x, w, scale, shift, st, pd = _make(CASES[0])
    for mode, want in (("materialised", {"apply": 1, "dbn_kernels": 0, "plain_kernels": 2}),
                       ("fused", {"apply": 0, "dbn_kernels": 2, "plain_kernels": 0})):
        monkeypatch.setattr(fconv, "dbn_backward", mode)
        calls.update(dict.fromkeys(calls, 0))
        _grads(x, w, scale, shift, st, pd, True, "triton")
        assert calls == want, mode


def test_auto_is_fused_on_cpu_and_invalid_mode_raises(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("the CPU rule: on CUDA auto measures")
    timed = []
    monkeypatch.setattr(_timing, "interleaved_samples", lambda *a, **k: timed.append(a))
    monkeypatch.setattr(fconv, "dbn_backward", "auto")
    x, w, scale, shift, st, pd = _make(CASES[2])
    _grads(x, w, scale, shift, st, pd, False, "triton")
    assert fconv.last_dbn_backward() == "fused" and not timed
    assert fconv.dbn_backward_choices() == []
    monkeypatch.setattr(fconv, "dbn_backward", "materialized")
    with pytest.raises(ValueError, match="dbn_backward"):
        _grads(x, w, scale, shift, st, pd, False, "triton")


def _fake_timer(times, log):
    """interleaved_samples that runs each candidate once (so both must work) and returns
    the given samples (seconds)."""
    def samples(fns, device, **options):
        log.append(sorted(fns))
        for fn in fns.values():
            fn()
        return {name: list(times[name]) for name in fns}
    return samples


def _timed_auto(monkeypatch, times):
    """dbn_backward="auto", timed on CPU too by the fake timer giving ``times``; returns
    the timer's log."""
    log = []
    monkeypatch.setattr(fconv, "_TIMED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(_timing, "interleaved_samples", _fake_timer(times, log))
    monkeypatch.setattr(fconv, "dbn_backward", "auto")
    return log


@pytest.mark.parametrize("winner", MODES)
def test_auto_times_once_and_caches(monkeypatch, winner):
    """auto (the timed device types widened to CPU): both modes timed on the first call
    of a shape, the winner kept -- materialised only when clearly faster -- and run, the
    second call not timed, a new process (empty table) reads the disk cache."""
    fast, slow = [1.0e-3, 1.01e-3, 1.02e-3], [2.0e-3, 2.02e-3, 2.04e-3]
    close = [0.99e-3, 1.03e-3, 1.06e-3]  # not clearly slower than `fast`: the simpler wins
    times = {"materialised": fast, "fused": slow if winner == "materialised" else close}
    log = _timed_auto(monkeypatch, times)
    x, w, scale, shift, st, pd = _make(CASES[1])
    want = _float64_grads(x, w, scale, shift, st, pd, True)
    for _ in range(2):
        got = _grads(x, w, scale, shift, st, pd, True, "triton")
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        assert fconv.last_dbn_backward() == winner
    assert log == [["fused", "materialised"]]
    (entry,) = fconv.dbn_backward_choices()
    assert entry["choice"] == winner and entry["source"] == "timed"
    assert entry["shapes"][1] == list(x.shape) and entry["stride"] == [st, st]
    assert entry["prologue"] is True
    assert entry["fused_ms"] == pytest.approx(times["fused"][1] * 1e3)

    monkeypatch.setattr(fconv, "_DBN_CHOICES", {})
    monkeypatch.setattr(fconv, "_DBN_DISK", {})
    _grads(x, w, scale, shift, st, pd, True, "triton")
    assert log == [["fused", "materialised"]]  # not timed again
    (entry,) = fconv.dbn_backward_choices()
    assert entry["choice"] == winner and entry["source"] == "disk cache"
    assert fconv.last_dbn_backward() == winner

    # another shape (no prologue here) is a new decision
    _grads(x, w, scale, shift, st, pd, False, "triton")
    assert len(log) == 2 and len(fconv.dbn_backward_choices()) == 2


@pytest.mark.parametrize("winner", MODES)
def test_auto_keeps_the_timed_result(monkeypatch, winner):
    """The first backward of a new shape runs each mode only as often as the timer does
    (here once): its result is the chosen mode's timed output, not one more backward,
    and equal to what that mode gives when run alone."""
    times = {"materialised": [1e-3] * 3, "fused": [1e-3 if winner == "fused" else 2e-3] * 3}
    ran = []
    backward = fconv._conv_backward

    def counted(mode, *args):
        ran.append(mode)
        return backward(mode, *args)

    monkeypatch.setattr(fconv, "_conv_backward", counted)
    x, w, scale, shift, st, pd = _make(CASES[1])
    monkeypatch.setattr(fconv, "dbn_backward", winner)
    alone = _grads(x, w, scale, shift, st, pd, True, "triton")
    assert ran == [winner]
    ran.clear()
    _timed_auto(monkeypatch, times)
    got = _grads(x, w, scale, shift, st, pd, True, "triton")
    assert sorted(ran) == ["fused", "materialised"]  # the timed runs, nothing after
    assert fconv.last_dbn_backward() == winner
    for a, b in zip(got, alone):
        assert torch.equal(a, b)
    ran.clear()
    _grads(x, w, scale, shift, st, pd, True, "triton")  # decided: one run of the winner
    assert ran == [winner]


def test_auto_cache_warnings_name_dbn_backward(monkeypatch, tmp_path):
    """A damaged decision cache of dbn_backward is ignored with a warning that names
    dbn_backward (whose switch it is), not fusedres.tune, and the shape is timed again."""
    log = _timed_auto(monkeypatch, {"materialised": [1e-3] * 3, "fused": [2e-3] * 3})
    x, w, scale, shift, st, pd = _make(CASES[2])
    _grads(x, w, scale, shift, st, pd, False, "triton")
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    path.write_text("not json")
    monkeypatch.setattr(fconv, "_DBN_CHOICES", {})
    monkeypatch.setattr(fconv, "_DBN_DISK", {})
    with pytest.warns(RuntimeWarning) as caught:
        _grads(x, w, scale, shift, st, pd, False, "triton")
    texts = [str(c.message) for c in caught]
    assert any(t.startswith("fusedres.conv.dbn_backward: ignoring the decision cache")
               for t in texts), texts
    assert not any("fusedres.tune" in t for t in texts), texts
    assert len(log) == 2


@pytest.mark.parametrize("blocker", ["compiling", "deterministic"])
def test_auto_never_times_while_tracing_or_deterministic(monkeypatch, blocker):
    """Under torch.compile tracing (and CUDA-graph capture, the same branch) nothing is
    timed: the cached choice, else fused; deterministic mode is always fused."""
    log = _timed_auto(monkeypatch, {"materialised": [1e-3] * 3, "fused": [2e-3] * 3})
    x, w, scale, shift, st, pd = _make(CASES[2])
    if blocker == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        _grads(x, w, scale, shift, st, pd, False, "triton")
        assert not log and fconv.last_dbn_backward() == "fused"
        assert fconv.dbn_backward_choices() == []
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
        _grads(x, w, scale, shift, st, pd, False, "triton")  # eager: timed and cached
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        _grads(x, w, scale, shift, st, pd, False, "triton")
        assert len(log) == 1 and fconv.last_dbn_backward() == "materialised"
    else:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
            _grads(x, w, scale, shift, st, pd, False, "triton")
        assert not log and fconv.last_dbn_backward() == "fused"


def test_bench_rows_run_each_mode(monkeypatch):
    """The GPU run's dBN backward rows (fusedres.bench.cases.dbn_backward_cases): each
    callable runs its own mode and leaves the switch as it was; both modes agree; only
    the Triton provider has these rows."""
    from fusedres.bench import cases as C

    s = C.Settings(device=torch.device(DEVICE), dtype=torch.float64, layout="channels_last",
                   batch=2, quick=True)
    cases = C.dbn_backward_cases(s, "tiny", interpreter=True)
    assert [c.pass_ for c in cases] == list(C.DBN_BACKWARD_PASSES)
    triton = C.Provider("fusedres-triton", "fusedres", backend="triton")
    monkeypatch.setattr(fconv, "dbn_backward", "auto")
    got = {}
    for case in cases:
        torch.manual_seed(0)  # the same tensors for every row
        got[case.pass_] = case.make(triton)()
        assert fconv.dbn_backward == "auto"
        if case.pass_ != "bwd dbn=apply-pass":
            assert fconv.last_dbn_backward() == case.pass_.split("=")[1]
    fused, materialised = got["bwd dbn=fused"], got["bwd dbn=materialised"]
    assert all(t.numel() > 0 for t in fused)
    for a, b in zip(fused, materialised):
        torch.testing.assert_close(a, b)
    with pytest.raises(C.Skip):
        cases[0].make(C.Provider("eager", "eager"))


def test_explain_names_the_dbn_backward_where_a_conv_computes_the_statistics(monkeypatch):
    """explain's note on a Triton stats+prologue site says how the dBN term runs (the
    current switch), and says nothing of it where the BN's statistics come from torch."""
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    import models
    from fusedres.convert import convert, explain

    def notes(stride):
        rows = explain(convert(models.PreActBlock(8, 16 if stride > 1 else 8, stride),
                               backend="triton"))
        return {r["site"]: (r["conv"], r["reason"]) for r in rows}

    strided = notes(2)  # conv1's epilogue computes bn2's statistics
    assert strided["bn2"][0] == "triton stats+prologue"
    assert "dbn_backward='auto'" in strided["bn2"][1]
    monkeypatch.setattr(fconv, "dbn_backward", "materialised")
    assert "the dBN term materialised" in notes(2)["bn2"][1]
    plain = notes(1)  # statistics from torch.var_mean: no dBN term in the conv backward
    assert plain["bn2"][0] == "triton prologue"
    assert "dBN" not in plain["bn2"][1]


# dgrad's dBN constant: dx = conv_transpose(dy + y*coef_y + coef_c, W), where the prologue
# reads dy + y*coef_y and the constant's part E = conv_transpose(coef_c everywhere, W) (the
# same for every image, smaller at the border: fewer taps reach it) starts the accumulator
# (kernels/conv.py ``_dbn_constant_dx``)
# (name, N, C_in, H, W, C_out, kernel, stride, padding)
E_CASES = [("3x3s1p1", 1, 5, 7, 6, 32, 3, 1, 1),  # fp32: dy and y by TMA boxes
           ("3x3s2p1_odd", 2, 6, 9, 7, 16, 3, 2, 1),  # phases, pointers
           ("5x5s2p2", 1, 3, 8, 9, 16, 5, 2, 2),
           ("3x3s2p0", 2, 4, 8, 6, 16, 3, 2, 0),  # the last row/column reached by no tap
           ("1x1s2", 1, 4, 6, 5, 16, 1, 2, 0)]  # odd rows/columns reached by no tap


def _constant_dx_ref(w, coef_c, n, h, w_in, st, pd):
    """conv_transpose of a field equal to coef_c at every output pixel, float64."""
    co = w.shape[0]
    p = (h + 2 * pd - w.shape[2]) // st + 1
    q = (w_in + 2 * pd - w.shape[3]) // st + 1
    field = coef_c.double().view(1, co, 1, 1).expand(n, co, p, q)
    return torch.nn.grad.conv2d_input((n, w.shape[1], h, w_in), w.double(), field, st, pd)


@pytest.mark.parametrize("case", E_CASES, ids=[c[0] for c in E_CASES])
def test_constant_dx_is_the_constant_fields_transposed_conv(case):
    """E from the two contractions equals torch's transposed conv of the constant field
    (float64), border pixels and pixels that no tap reaches included."""
    _, n, ci, h, w_in, co, k, st, pd = case
    g = torch.Generator().manual_seed(5)
    w = torch.randn(co, ci, k, k, generator=g, dtype=torch.float64)
    cc = torch.randn(co, generator=g, dtype=torch.float64)
    ref = _constant_dx_ref(w, cc, 1, h, w_in, st, pd)[0].permute(1, 2, 0)
    p, q = (h + 2 * pd - k) // st + 1, (w_in + 2 * pd - k) // st + 1
    got = K._dbn_constant_dx(w, cc, (h, w_in), (p, q), (st, st), (pd, pd), torch.float64)
    assert got.shape == (h, w_in, ci)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


# bf16 (the packed prologue) where it runs: the interpreter's bf16 arithmetic is wrong
BF16_ON_CUDA = [pytest.param(torch.bfloat16, marks=pytest.mark.cuda)] if DEVICE == "cuda" else []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, "tf32"] + BF16_ON_CUDA)
@pytest.mark.parametrize("case", E_CASES, ids=[c[0] for c in E_CASES])
def test_dgrad_dbn_constant_at_the_border(monkeypatch, case, dtype):
    """conv_dgrad with the dBN prologue against float64: dy = 0, y = 0 (only the constant:
    dx is E in every image, and the border pixels differ from the interior, so an E that
    is omitted or taken as the interior's everywhere fails), then all three terms. "tf32":
    fp32 with TF32 dots (the interpreter's dots are fp32: the kernel's operands are cut to
    tf32's bits there too, and E must cancel the cut fill; a far centre makes a mismatch
    show). The GPU's MMA also reads only tf32's bits of the weight: emulated here by
    cutting the launched weight in place, so E must cancel the fill times the weight as
    the MMA reads it (against float64 with that weight)."""
    _, n, ci, h, w_in, co, k, st, pd = case
    far = 1.0
    tf32 = dtype == "tf32"
    if tf32:
        monkeypatch.setattr(K, "_input_precision", lambda dt: "tf32")
        dtype, far = torch.float32, 50.0
    g = torch.Generator().manual_seed(7)
    w = torch.randn(co, ci, k, k, generator=g, dtype=torch.float64)
    p, q = (h + 2 * pd - k) // st + 1, (w_in + 2 * pd - k) // st + 1
    cy, cc = (torch.randn(co, generator=g, dtype=torch.float64) for _ in range(2))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cl = torch.channels_last
    seen = []
    launch = K._launch

    def mma_reads(args):  # what a TF32 MMA reads of W (B): tf32's bits (A is cut already)
        if tf32:
            args[1].view(torch.int32).bitwise_and_(-8192)
        return args

    monkeypatch.setattr(K, "_launch", lambda run, cfgs, grid, args, kw: seen.append(kw)
                        or launch(run, cfgs, grid, mma_reads(args), kw))
    ref_e = _constant_dx_ref(w, cc, n, h, w_in, st, pd)
    assert (ref_e - ref_e[:, :, h // 2: h // 2 + 1, w_in // 2: w_in // 2 + 1]).abs().max() > 0.1
    zeros = torch.zeros(n, co, p, q, dtype=torch.float64)
    # y's centre: its mean (computed by conv_dgrad), or given far from it, so that the
    # operand at the zero-filled taps (-centre*coef_y) is large and E must cancel it there
    centre = 4 * torch.randn(co, generator=g, dtype=torch.float64)
    cases = [(zeros, zeros, None), (zeros, zeros, centre),
             (torch.randn(n, co, p, q, generator=g, dtype=torch.float64),
              torch.randn(n, co, p, q, generator=g, dtype=torch.float64), centre)]
    if far != 1:  # y around a far centre (and coef_c = cc - centre*cy, BN's form): small
        # operands and dx, a large fill outside for E to cancel
        centre = (far * centre).float().double()
        cases = [(dy, y + centre.view(1, -1, 1, 1), centre) for dy, y, _ in cases[1:]]
        cc = cc - centre * cy
    for dy, y, y_mean in cases:
        dy_d, y_d = (t.to(DEVICE, dtype).contiguous(memory_format=cl) for t in (dy, y))
        dx, _, _ = K.conv_dgrad(dy_d, w.to(DEVICE, dtype).contiguous(memory_format=cl),
                                (h, w_in), st, pd, y=y_d, coef_y=cy.to(DEVICE, acc),
                                coef_c=cc.to(DEVICE, acc),
                                y_mean=None if y_mean is None else y_mean.to(DEVICE, acc))
        total = (dy_d.double() + y_d.double() * cy.to(DEVICE).view(1, -1, 1, 1)
                 + cc.to(DEVICE).view(1, -1, 1, 1))
        w_mma = w.to(dtype)
        if tf32:
            w_mma = (w_mma.view(torch.int32) & -8192).view(torch.float32)
        ref = torch.nn.grad.conv2d_input(dx.shape, w_mma.double().to(DEVICE), total, st, pd)
        tol = {torch.float64: 1e-10, torch.float32: 2e-5 if far == 1 else 2e-3}.get(dtype,
                                                                                  2e-2)
        torch.testing.assert_close(dx.double(), ref, rtol=tol, atol=tol * ref.abs().max())
    if dtype == torch.bfloat16:
        return
    # fp32 takes the TMA boxes at either stride (at stride 2 boxes of one phase; dy and y
    # zero-filled, no tap mask); fp64 (no TMA) the pointer path
    want_tma = 2 if dtype == torch.float32 and K.TensorDescriptor is not None else 0
    assert seen[-1]["A_TMA"] == want_tma and seen[-1]["HAS_RESIDUAL"], seen[-1]


# (id, n, C_in, H, W, C_out, k, stride, pad, dy dense): TMA boxes at stride 1 and 2, dy
# through pointers, the flat (r, s, c) K loop with its K tail (C_out 20)
FILL_CASES = [("tma3x3s1", 2, 8, 6, 7, 16, 3, 1, 1, True),
              ("tma5x5s2", 1, 3, 8, 9, 16, 5, 2, 2, True),
              ("ptr3x3s2", 2, 4, 8, 6, 16, 3, 2, 0, False),
              ("flat3x3s2", 2, 8, 7, 6, 20, 3, 2, 1, True)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32] + BF16_ON_CUDA)
@pytest.mark.parametrize("case", FILL_CASES, ids=[c[0] for c in FILL_CASES])
def test_dgrad_dbn_fill_cancelled_exactly(case, dtype):
    """y equal to its far centre and dy = 0, coef_c = -centre*coef_y: dy_total is 0, the
    operand is exactly 0 at the taps that reach dy and the rounded fill at those that
    miss it, so dx is E's cancellation error alone: within fp32 accumulation of the fill
    (fp16: a fill E rounded otherwise than the kernel, e.g. to fp32 only, leaves 2^-11)."""
    _, n, ci, h, w_in, co, k, st, pd, dense = case
    g = torch.Generator().manual_seed(13)
    f64, cl = torch.float64, torch.channels_last
    acc = torch.float32
    w = torch.randn(co, ci, k, k, generator=g, dtype=f64).to(dtype)
    p, q = (h + 2 * pd - k) // st + 1, (w_in + 2 * pd - k) // st + 1
    cy = torch.randn(co, generator=g, dtype=f64).to(acc)
    centre = (200 * torch.randn(co, generator=g, dtype=f64)).to(dtype).to(acc)
    y = centre.view(1, co, 1, 1).expand(n, co, p, q).to(dtype)
    dy = torch.zeros(n, co, p, q, dtype=dtype)
    if dense:
        y, dy = (t.contiguous(memory_format=cl) for t in (y, dy))
    else:  # every other column of a wider tensor: dy and y through pointers
        y, dy = (torch.cat([t, t], 3)[..., ::2] for t in (y, dy))
    dx, _, _ = K.conv_dgrad(dy.to(DEVICE), w.to(DEVICE).contiguous(memory_format=cl),
                            (h, w_in), st, pd, y=y.to(DEVICE), coef_y=cy.to(DEVICE),
                            coef_c=(-centre.double() * cy.double()).to(DEVICE),
                            y_mean=centre.to(DEVICE))
    scale = (centre.abs() * cy.abs()).max().item() * w.abs().max().item()
    assert dx.double().abs().max().item() <= 4e-6 * scale


@pytest.mark.parametrize("c", [64, K._INTERPRETER_TILE[2]],
                         ids=["coefficients per K step", "coefficients once"])
@pytest.mark.parametrize("dtype", [torch.float16] + BF16_ON_CUDA)
@pytest.mark.parametrize("st", [1, 2])
def test_dgrad_dbn_centres_a_large_mean(monkeypatch, st, dtype, c):
    """y's mean 20-30x its spread and dy correlated with y (a large dBN y-term): the fused
    dgrad's dx is within 2x the error of rounding dy_total once (the materialised pass),
    against float64 of the same 16-bit inputs. Centring y on its mean keeps the mean out
    of the rounded operand; uncentred (``y_mean`` = 0) this was 12-37x in fp16. With C_out
    one K tile (the interpreter's 16) the kernel loads the coefficients once
    (``PCOEF_ONCE``), which a wrong channel in that load fails."""
    launches = []
    launch = K._launch
    monkeypatch.setattr(K, "_launch", lambda *a: launches.append(a[4]) or launch(*a))
    n, h, k = 2, 6, 3
    g = torch.Generator().manual_seed(11)
    f64, cl = torch.float64, torch.channels_last
    wt = torch.randn(c, c, k, k, generator=g, dtype=f64) / (c * k * k) ** 0.5
    wt = wt.to(dtype).double()
    p = (h + 2 - k) // st + 1
    for mean_over_std, corr in ((20.0, 0.5), (30.0, 0.8)):
        mu = torch.full((c,), mean_over_std, dtype=f64)
        mu[::2] *= -1
        y = (mu.view(1, c, 1, 1) + torch.randn(n, c, p, p, generator=g, dtype=f64)).to(dtype)
        yd = y.double()
        mean = yd.mean((0, 2, 3))
        yc = yd - mean.view(1, c, 1, 1)
        dy = (corr * yc + (1 - corr ** 2) ** 0.5 * torch.randn(n, c, p, p, generator=g,
                                                               dtype=f64) + 0.3).to(dtype)
        dyd = dy.double()
        cy = -(dyd * yc).mean((0, 2, 3)) / (yc ** 2).mean((0, 2, 3))
        cm = -dyd.mean((0, 2, 3))  # dy_total = dy + (y - mean)*cy + cm: BN's backward form
        total = dyd + yc * cy.view(1, c, 1, 1) + cm.view(1, c, 1, 1)
        ref = torch.nn.grad.conv2d_input((n, c, h, h), wt, total, st, 1)
        once = torch.nn.grad.conv2d_input((n, c, h, h), wt, total.to(dtype).double(), st, 1)
        dx, _, _ = K.conv_dgrad(
            dy.to(DEVICE).contiguous(memory_format=cl),
            wt.to(dtype).to(DEVICE).contiguous(memory_format=cl), (h, h), st, 1,
            y=y.to(DEVICE).contiguous(memory_format=cl), coef_y=cy.float().to(DEVICE),
            coef_c=(cm - cy * mean).float().to(DEVICE), y_mean=mean.float().to(DEVICE))

        def err(t):
            return ((t.double().cpu() - ref).norm() / ref.norm()).item()

        assert err(dx) <= 2 * err(once), (mean_over_std, corr, err(dx), err(once))
    if DEVICE == "cpu":  # the interpreter's tile; a GPU's configs decide for themselves
        assert {kw["PCOEF_ONCE"] for kw in launches} == {c == K._INTERPRETER_TILE[2]}


def _bf16_operand(dy, y, pcoef):
    """The bf16 dBN prologue as the kernel computes it (``_dbn_prologue_coefs``), emulated
    in float64 with one bf16 rounding per operation: d = y - centre, fma(d, lo, fma(d, hi,
    dy))."""
    centre, hi, lo = (t.double().view(1, -1, 1, 1) for t in pcoef)
    d = K._round_bf16(y - centre)
    return K._round_bf16(d * lo + K._round_bf16(d * hi + dy))


def test_round_bf16_is_one_rounding_to_nearest_even():
    """``_round_bf16`` (E's model of the kernel's bf16 arithmetic): torch's conversion
    wherever fp32 holds the value exactly, ties to even, and one rounding where the
    conversion through fp32 rounds twice."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-40, 40, (4096,),
                                                                  generator=g).float())
    assert torch.equal(K._round_bf16(x.double()), x.bfloat16().double())
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8)], dtype=torch.float64)
    assert K._round_bf16(ties).tolist() == [1.0, 1 + 2 ** -6, -1.0]
    above_tie = torch.tensor([1 + 2 ** -8 + 2 ** -30], dtype=torch.float64)  # fp32: the tie
    assert K._round_bf16(above_tie).item() == 1 + 2 ** -7 != above_tie.float().bfloat16().item()


@pytest.mark.parametrize("mean_over_std", [0.0, 20.0, 1000.0])
def test_bf16_prologue_is_near_rounding_once(mean_over_std):
    """The packed bf16 prologue (centring, then coef_y as hi + lo), emulated in float64 on
    bf16 inputs: dy_total's relative error at most 1.5x that of rounding it once (the
    materialised pass) where dy's correlation with y is up to 0.6, 3x at 0.9 (y - centre
    is rounded where y is not within 2x of the centre: at a small mean, a second rounding
    of the y-term), y's mean up to 1000x its spread (docs/triton_conv.md has the grid).
    The fill E cancels (``_dbn_prologue_fill``) is that operand at y = dy = 0. Uncentred
    it is over 4x at a large mean (so this test can tell)."""
    g = torch.Generator().manual_seed(int(mean_over_std) + 1)
    n, c = 64, 8
    for corr, bound in ((0.3, 1.5), (0.6, 1.5), (0.9, 3.0)):
        y = (mean_over_std + torch.randn(n, c, 4, 4, generator=g, dtype=torch.float64)
             ).bfloat16().double()
        mean = y.mean((0, 2, 3))
        yc = y - mean.view(1, c, 1, 1)
        dy = (corr * yc + (1 - corr ** 2) ** 0.5 * torch.randn(y.shape, generator=g,
                                                               dtype=torch.float64)
              ).bfloat16().double()
        cy = -(dy * yc).mean((0, 2, 3)) / (yc ** 2).mean((0, 2, 3))
        total = dy + yc * cy.view(1, c, 1, 1)

        def err(centre, coef=cy):
            pcoef = K._dbn_prologue_coefs(coef.float(), centre.bfloat16().float(),
                                          torch.bfloat16)
            assert pcoef.dtype == torch.bfloat16 and pcoef.shape == (3, c)
            zero = torch.zeros(1, c, 1, 1, dtype=torch.float64)
            torch.testing.assert_close(_bf16_operand(zero, zero, pcoef).view(c),
                                       K._dbn_prologue_fill(pcoef, torch.bfloat16),
                                       rtol=0, atol=0)
            got = _bf16_operand(dy, y, pcoef) + ((pcoef[0].double() - mean) * cy).view(
                1, c, 1, 1)
            return ((got - total).norm() / total.norm()).item()

        once = ((total.bfloat16().double() - total).norm() / total.norm()).item()
        packed = err(mean)
        assert packed <= bound * once, (corr, packed, once)
        if mean_over_std >= 20 and corr > 0.5:
            assert err(torch.zeros(c)) > 4 * once  # uncentred


# dgrad's wide-K tiles (kernels/conv.py ``_wide_k``): BLOCK_K 128, for the fused transposed
# mode where C_out (the reduction channels) % 128 == 0 and dy comes by TMA: 128x64 at 4
# warps (triton < 3.7) and 128x128 at 8 warps (any triton)
WIDE = (128, 64, 128, 4)
WIDE_8 = (128, 128, 128, 8)


def _tiles(configs):
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps)
            for c in configs}


def test_dgrad_wide_k_tile_is_pruned_by_shape(monkeypatch):
    """The wide-K tiles are autotuned (conv_configs and the autotuner's prune alike) only
    for the fused transposed mode, C_out % 128 == 0 (at any C_in), 16-bit, dy by TMA; the
    4-warp one under triton < 3.7 only; the tap loop's K unit stays 64, so the 64-channel
    layers keep it; C_out is in the autotune key (the prune reads it); deterministic
    mode's first config stays the BLOCK_K 64 one. And the 4-warp 128x64 tile where C_out
    is 64 (fused) or C_in is."""
    monkeypatch.setattr(K, "INTERPRET", False)
    assert K._tap_loop(64) and K._tap_loop(192) and not K._tap_loop(96)
    assert "CI" in K._CONV_KEY
    every = K._configs(K._union(K._CONV_TILES))
    for version, ci, co, fused, size, a_tma in itertools.product(
            ((3, 6), (3, 8)), (64, 128, 2048), (64, 128, 192, 256, 2048), (False, True),
            (2, 4), (False, True)):
        monkeypatch.setattr(K, "TRITON_VERSION", version)
        kw = dict(transposed=True, fused=fused, gemm_n=ci, itemsize=size, channels=co,
                  a_tma=a_tma, dbn=fused)
        got = K.conv_configs(**kw)
        want = fused and co % 128 == 0 and size == 2 and a_tma
        assert (WIDE in _tiles(got)) == (want and version < (3, 7)), (
            version, ci, co, fused, size, a_tma)
        assert (WIDE_8 in _tiles(got)) == want, (version, ci, co, fused, size, a_tma)
        assert got[0].kwargs["BLOCK_K"] * size == 128
        nargs = dict(GEMM_N=ci, CI=co, STRIDE_H=1, STRIDE_W=1,
                     X_ptr=torch.empty(0, dtype=torch.bfloat16 if size == 2 else torch.float32))
        pruned = K._conv_prune(every, nargs, TAP_LOOP=True, TRANSPOSED=True,
                               PROLOGUE=2 if fused else 0, DRELU=False, HAS_RESIDUAL=fused,
                               A_TMA=2 if a_tma else 0)
        assert {K._key(c) for c in pruned} == {K._key(c) for c in got}
        # at C_out 64 (no wide-K tile) the fused dgrad also offers 128x64 at 4 warps at any
        # C_in (8 HGMMA per warp per K step); elsewhere 64-wide tiles only up to C_in 64
        narrow = (128, 64, 64, 4) in _tiles(got)
        assert narrow == (size == 2 and (ci <= 64 or fused and co == 64)), (ci, co, fused)
        # the dBN prologue's 128x128x64 tile at 4 warps, not 8 (``_dbn_tiles``), with dy by
        # TMA; with dy by pointers at 8 (the 4-warp one spills there, 436-500 B, in the K
        # loop with the coefficients once); beside the dReLU epilogue at neither where
        # another 16-bit tile fits, else at 8
        tiles = _tiles(got)
        if fused and size == 2:
            assert ((128, 128, 64, 4) in tiles) == a_tma, (tiles, a_tma)
            assert ((128, 128, 64, 8) in tiles) != a_tma, (tiles, a_tma)
            both = _tiles(K.conv_configs(**kw, drelu=True))
            alone = not (narrow or want)
            assert (128, 128, 64, 4) not in both and ((128, 128, 64, 8) in both) == alone, (
                both, ci, co, a_tma)
            pruned = K._conv_prune(every, nargs, TAP_LOOP=True, TRANSPOSED=True, PROLOGUE=2,
                                   DRELU=True, HAS_RESIDUAL=True, A_TMA=2 if a_tma else 0)
            assert _tiles(pruned) == both
        elif size == 2:
            assert (128, 128, 64, 8) in tiles and (128, 128, 64, 4) not in tiles, tiles
    # never in the forward, whatever its channels
    monkeypatch.setattr(K, "TRITON_VERSION", (3, 6))
    for fused, wgmma in itertools.product((False, True), repeat=2):
        tiles = _tiles(K.conv_configs(fused=fused, gemm_n=128, channels=128, wgmma=wgmma))
        assert WIDE not in tiles and WIDE_8 not in tiles


@pytest.mark.parametrize("what", ["c_out 256", "c_out 64", "sparse dy", "stride 2", "fp32"])
def test_dgrad_launcher_offers_the_wide_k_tile(monkeypatch, what):
    """conv_dgrad (sm_90 as the autotuner sees it: TMA allowed, triton 3.6) hands the
    wide-K tile to the autotuner where dy and y go by TMA boxes and C_out % 128 == 0, with
    the box and weight-tile shapes of each config set by the pre-hook (the 256-byte K rows
    of dy, y and the [128, 64] weight box), at stride 2 too (boxes of a phase); not at
    C_out 64, not with dy through pointers (sparse strides), not in fp32."""
    monkeypatch.setattr(K, "INTERPRET", False)
    monkeypatch.setattr(K, "TRITON_VERSION", (3, 6))
    monkeypatch.setattr(K, "_tma_ok", lambda t: K.TensorDescriptor is not None)
    if K.TensorDescriptor is None:
        pytest.skip("no host TMA descriptors in this triton")
    seen = {}

    def launch(run, configs, grid, args, kwargs):
        seen.update(configs=configs, args=args, kwargs=kwargs)
        return configs[0].kwargs

    monkeypatch.setattr(K, "_launch", launch)
    n, ci, h, co, st = 2, 64, 6, (64 if what == "c_out 64" else 256), 1
    st = 2 if what == "stride 2" else 1
    dtype = torch.float32 if what == "fp32" else torch.bfloat16
    p = (h + 2 - 3) // st + 1
    g = torch.Generator().manual_seed(3)
    cl = torch.channels_last
    dy, y = (torch.randn(n, co, p, p, generator=g).to(dtype).contiguous(memory_format=cl)
             for _ in range(2))
    if what == "sparse dy":
        dy, y = dy.contiguous(), y.contiguous()
    w = torch.randn(co, ci, 3, 3, generator=g).to(dtype).contiguous(memory_format=cl)
    coef = torch.randn(co, generator=g)
    K.conv_dgrad(dy, w, (h, h), st, 1, y=y, coef_y=coef, coef_c=coef)
    tiles = _tiles(seen["configs"])
    assert (WIDE in tiles) == (what in ("c_out 256", "stride 2")), (what, tiles)
    assert (WIDE_8 in tiles) == (what in ("c_out 256", "stride 2")), (what, tiles)
    assert seen["kwargs"]["A_TMA"] == (0 if what == "sparse dy" else 2)
    # the coefficients loaded once where every config's K tile is C_out's 64 channels
    assert seen["kwargs"]["PCOEF_ONCE"] == (what == "c_out 64"), what
    if what not in ("c_out 256", "stride 2"):
        return
    names = K._conv_kernel.arg_names
    for cfg in seen["configs"]:
        nargs = {**dict(zip(names, seen["args"])), **seen["kwargs"], **cfg.kwargs}
        cfg.pre_hook(nargs)
        bm, bn, bk = (cfg.kwargs[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        th, tw = seen["kwargs"]["TILE_H"], seen["kwargs"]["TILE_W"]
        for name in ("X_desc", "PY_desc"):
            assert nargs[name].block_shape == [bm // (th * tw), th, tw, bk], (name, cfg)
        assert nargs["W_desc"].block_shape == [bk, bn], cfg
        assert nargs["CI"] == co  # the reduction channels the prune reads


@pytest.mark.parametrize("tile", [WIDE, WIDE_8], ids=["128x64x128", "128x128x128"])
@pytest.mark.parametrize("st", [1, 2])
def test_dgrad_wide_k_tile_runs(monkeypatch, st, tile):
    """The dBN prologue + dReLU epilogue dgrad run with each wide-K tile (128 rows, 64 or
    128 columns, BLOCK_K 128: two channel tiles per tap at C_out 256; at C_in 96 a partial
    N tile), dy and y by TMA boxes (at stride 2 boxes of a phase, dx 7x7: phases of
    unequal size), against float64: in the interpreter (its one tile set to the wide-K
    blocks; fp32, IEEE), and on CUDA in bf16 with the autotuner given that config alone
    (whatever the installed Triton)."""
    cuda = DEVICE == "cuda"
    if cuda:
        monkeypatch.setattr(K, "TRITON_VERSION", (3, 6))
        full = K.conv_configs

        def only(*a, **kw):
            mine = [c for c in full(*a, **kw) if (
                c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps)
                == tile]
            return mine or full(*a, **kw)

        monkeypatch.setattr(K, "conv_configs", only)
    else:
        monkeypatch.setattr(K, "_INTERPRETER_TILE", tile + (1,))
    dtype = torch.bfloat16 if cuda else torch.float32
    n, ci, h, co = 2, 96, (6 if st == 1 else 7), 256
    p = (h + 2 - 3) // st + 1
    g = torch.Generator().manual_seed(11)
    cl = torch.channels_last
    dy, y = (torch.randn(n, co, p, p, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(co, ci, 3, 3, generator=g, dtype=torch.float64) / (9 * co) ** 0.5
    y_prev = torch.randn(n, ci, h, h, generator=g, dtype=torch.float64)
    cy, cc = (torch.randn(co, generator=g, dtype=torch.float64) for _ in range(2))
    scale = torch.rand(ci, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(ci, generator=g, dtype=torch.float64) * 0.3
    seen = []
    launch = K._launch
    monkeypatch.setattr(K, "_launch", lambda run, cfgs, grid, args, kw: seen.append(
        (kw, cfgs[0].kwargs)) or launch(run, cfgs, grid, args, kw))
    dy, y, w, y_prev = (t.to(dtype).double() for t in (dy, y, w, y_prev))  # as rounded
    dev = [t.to(DEVICE, dtype).contiguous(memory_format=cl) for t in (dy, y, w, y_prev)]
    coefs = [t.to(DEVICE, torch.float32) for t in (cy, cc, scale, shift)]
    got, sum_g, sum_gy = K.conv_dgrad(dev[0], dev[2], (h, h), st, 1, y=dev[1],
                                      coef_y=coefs[0], coef_c=coefs[1], y_prev=dev[3],
                                      scale=coefs[2], shift=coefs[3])
    kw, cfg = seen[-1]
    assert kw["A_TMA"] == 2 and kw["PROLOGUE"] == 2 and kw["DRELU"], kw
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) == tile[:3]
    total = dy + y * cy.view(1, -1, 1, 1) + cc.view(1, -1, 1, 1)
    da = torch.nn.grad.conv2d_input((n, ci, h, h), w, total, st, 1)
    gate = (y_prev * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)) > 0
    gg = torch.where(gate, da, torch.zeros_like(da))
    # bf16: dy + y*cy is rounded to bf16 as the operand (and dx at its store)
    rtol = 2e-2 if cuda else 2e-5
    tol = rtol * da.abs().max().item()
    torch.testing.assert_close(got.double().cpu(), gg * scale.view(1, -1, 1, 1), rtol=rtol,
                               atol=tol)
    torch.testing.assert_close(sum_g.double().cpu(), gg.sum((0, 2, 3)), rtol=rtol * 5,
                               atol=tol * 10)
    torch.testing.assert_close(sum_gy.double().cpu(), (gg * y_prev).sum((0, 2, 3)),
                               rtol=rtol * 5, atol=tol * 10)


# wgrad's pixel boxes (``pixel_box``: BLOCK_K 16 pixels under the interpreter) against its
# dy' mask (``wgrad_mask_dy``): 2x2 images tile 4 images a box exactly, the third image's
# box reaches past the batch (dy, y zero-filled: dy' is coef_c alone there, x's taps read
# its fill); 5x5 images overhang the box's rows and columns, where a 3x3 tap reads x
# inside the image (the mask is needed)
MASK_CASES = [("exact_past_batch", 3, 32, 2, 2, 32, 3, 1, 1),
              ("overhang", 2, 32, 5, 5, 32, 3, 1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("prologue", [True, False], ids=["bn_relu+conv+stats", "conv+stats"])
@pytest.mark.parametrize("case", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_wgrad_dbn_mask_where_the_box_overhangs(monkeypatch, case, prologue, dtype):
    """The fused wgrad's dy' is masked exactly where the pixel box reaches past the
    output's rows or columns (and always in fp16); past the batch it is not, and dW is
    still right: x' there is 0 (x's fill), also with the BN-ReLU prologue in fp32, which
    runs unswapped (relu(shift) of the fill: the kernel masks dy' there itself)."""
    monkeypatch.setattr(fconv, "dbn_backward", "fused")
    seen = []
    launch = K._launch
    monkeypatch.setattr(K, "_launch", lambda run, cfgs, grid, args, kw: seen.append(kw)
                        or launch(run, cfgs, grid, args, kw))
    x, w, scale, shift, st, pd = _make(case, dtype)
    # dy channels_last, as in a channels_last model: wgrad reads it (and y, x) by TMA
    got = _grads(x, w, scale, shift, st, pd, prologue, "triton", torch.channels_last)
    wgrad = [kw for kw in seen if "TAP_N" in kw and kw["DBN"]]
    assert len(wgrad) == 1, seen
    kw = wgrad[0]
    n, h = case[1], case[3]
    assert kw["TMA"] == (2 if K.TensorDescriptor is not None else 0)
    overhang = bool(h % kw["TILE_H"] or h % kw["TILE_W"])
    assert overhang == (case[0] == "overhang"), kw
    if case[0] == "exact_past_batch":  # a box holds more images than the batch has left
        assert n % (16 // (kw["TILE_H"] * kw["TILE_W"])), kw
    assert kw["MASK_DY"] == (dtype == torch.float16 or (overhang and kw["TMA"] != 0))
    want = _float64_grads(x, w, scale, shift, st, pd, prologue)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * b.abs().max().item())

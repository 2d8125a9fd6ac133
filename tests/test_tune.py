"""fusedres.tune: selection with a fake timer, the decision cache, and real tuning on CPU
whose tuned model computes what the original does."""
import copy
import importlib
import json
import multiprocessing
import os
import pickle
import warnings

import pytest
import torch

import fusedres
from fusedres import _tune_cache as tc
from fusedres import nn as fnn
from models import CifarResNet

T = importlib.import_module("fusedres.tune")  # the module: fusedres.tune is the function
tune = T.tune


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("FUSEDRES_CACHE_DIR", str(d))
    monkeypatch.delenv("FUSEDRES_CACHE", raising=False)
    return d


def small(train=True, seed=0):
    torch.manual_seed(seed)
    m = CifarResNet((1, 1, 1))
    return m.train(train)


def fake_timer(table, calls=None):
    """Times from ``table`` (name -> seconds, or a callable of the call index)."""
    def timer(fns, device):
        if calls is not None:
            calls.append(sorted(fns))
        for fn in fns.values():
            fn()  # the candidates still run: a broken one must not break the timer
        n = len(calls) if calls is not None else 0
        return {k: (table[k](n) if callable(table[k]) else table[k]) for k in fns}
    return timer


def sites(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "fusedres_tuning")}


# --------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------


def test_select_fastest_and_ties():
    assert T.select({"torch": 3.0, "reference": 2.0, "cpu": 1.0}) == "cpu"
    # within the 3% margin the simpler path wins: torch < reference < cpu/cuda < triton
    assert T.select({"torch": 1.0, "cpu": 0.99}) == "torch"
    assert T.select({"torch": 1.0, "cpu": 0.99}, margin=0.0) == "cpu"
    assert T.select({"cuda": 1.0, "triton": 0.98, "torch": 1.2}) == "cuda"
    assert T.select({"reference": 1.0, "cpu": 0.995, "torch": 1.5}) == "reference"
    assert T.select({}) is None


def test_fake_timer_fastest_passing_wins():
    x = torch.randn(4, 3, 16, 16)
    calls = []
    m = tune(fusedres.convert(small()), x, cache=False, verbose=False,
             timer=fake_timer({"torch": 3.0, "reference": 1.0, "cpu": 2.0}, calls))
    assert calls and all("torch" in c and "reference" in c for c in calls)
    chosen = {n: b.fusedres_tuning["choice"] for n, b in sites(m).items()}
    assert chosen and set(chosen.values()) == {"reference"}, chosen
    assert m.fusedres_tune_report.measured == len(calls)


def test_wrong_candidate_never_chosen(monkeypatch):
    real = fnn.bn_act

    def wrong(bn, y, **kw):  # the "reference" backend is off by 1%
        out = real(bn, y, **kw)
        return out * 1.01 if kw.get("backend") == "reference" else out

    monkeypatch.setattr(fnn, "bn_act", wrong)
    x = torch.randn(4, 3, 16, 16)
    calls = []
    with pytest.warns(RuntimeWarning, match="candidate 'reference' failed its check"):
        m = tune(fusedres.convert(small()), x, cache=False, verbose=False,
                 timer=fake_timer({"torch": 3.0, "reference": 0.1, "cpu": 2.0}, calls))
    assert all("reference" not in c for c in calls)  # never even timed
    for name, bn in sites(m).items():
        assert bn.fusedres_tuning["choice"] != "reference", name
        assert "output" in bn.fusedres_tuning["failed"]["reference"]
    text = str(fusedres.explain(m))
    assert "reference FAILED: output: relative L2 error" in text


class _TwoValuesPerChannel(torch.nn.Module):
    """conv-BN-ReLU twice on 2x64x1x1: each BN normalises two values per channel, whose
    input gradient is exactly 0 in exact arithmetic (ResNet-50's layer4 at batch 2)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c1, self.b1 = nn.Conv2d(64, 64, 1, bias=False), nn.BatchNorm2d(64)
        self.c2, self.b2 = nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


@pytest.mark.parametrize("off_by", [1.0, 1.1])
def test_rounding_noise_is_judged_against_float64(monkeypatch, off_by):
    """Where torch's own bf16 result is rounding noise (the conv weight gradient behind a
    BN over 2 values), a correct kernel differs from it by ~20%: the float64 judge lets it
    pass; a kernel off by 10% (bf16's tolerance is 5%) still fails."""
    real = fnn.bn_act

    def maybe_wrong(bn, y, **kw):
        out = real(bn, y, **kw)
        return out * off_by if kw.get("backend") == "cpu" else out

    monkeypatch.setattr(fnn, "bn_act", maybe_wrong)
    torch.manual_seed(0)
    m = fusedres.convert(_TwoValuesPerChannel()).train()
    x = torch.randn(2, 64, 1, 1).to(memory_format=torch.channels_last)
    with warnings.catch_warnings(record=True), torch.autocast("cpu", dtype=torch.bfloat16):
        tune(m, x, cache=False, verbose=False, candidates=["cpu"],
             timer=fake_timer({"torch": 3.0, "cpu": 1.0}))
    failed = {n: b.fusedres_tuning["failed"] for n, b in sites(m).items()}
    if off_by == 1.0:
        assert failed == {"b1": {}, "b2": {}}, failed
    else:
        assert all("cpu" in f for f in failed.values()), failed


def test_candidate_that_raises_is_reported(monkeypatch):
    real = fnn.bn_act

    def broken(bn, y, **kw):
        if kw.get("backend") == "reference":
            raise RuntimeError("kernel exploded")
        return real(bn, y, **kw)

    monkeypatch.setattr(fnn, "bn_act", broken)
    with pytest.warns(RuntimeWarning, match="kernel exploded"):
        m = tune(fusedres.convert(small()), torch.randn(2, 3, 8, 8), cache=False,
                 verbose=False, timer=fake_timer({"torch": 3.0, "reference": 0.1, "cpu": 2.0}))
    assert all(b.fusedres_tuning["choice"] != "reference" for b in sites(m).values())


def test_ties_go_to_the_simpler_path():
    x = torch.randn(4, 3, 16, 16)
    table = {"torch": 1.0, "reference": 0.99, "cpu": 0.98}
    m = tune(fusedres.convert(small()), x, cache=False, verbose=False, timer=fake_timer(table))
    assert {b.fusedres_tuning["choice"] for b in sites(m).values()} == {"torch"}
    m = tune(fusedres.convert(small()), x, cache=False, verbose=False, margin=0.0,
             timer=fake_timer(table))
    assert {b.fusedres_tuning["choice"] for b in sites(m).values()} == {"cpu" if "cpu" in
                                                               fusedres.available_backends()
                                                               else "reference"}


# --------------------------------------------------------------------------------------
# Tuned models compute what the original computes; state is untouched
# --------------------------------------------------------------------------------------


def step(model, x, seed=3):
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(g)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    return out.detach(), x.grad, grads, bufs


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_same_step(a, b, tol=1e-4):
    """Output, input gradient, every parameter gradient and buffer: relative L2 error
    (a sum over many pixels, such as a weight gradient, has large elements with small
    relative errors and small ones with large relative errors)."""
    assert rel_l2(a[0], b[0]) <= tol and rel_l2(a[1], b[1]) <= tol, \
        (rel_l2(a[0], b[0]), rel_l2(a[1], b[1]))
    for d, e in zip(a[2:], b[2:]):
        assert d.keys() == e.keys()
        for k in d:
            assert rel_l2(d[k], e[k]) <= tol, (k, rel_l2(d[k], e[k]))


def backends_run(model, x, monkeypatch):
    """{main BN's name: the backend its site ran} over one training step of ``model``."""
    names = {id(m): n for n, m in model.named_modules()}
    ran = {}

    def spy(fn, bn_arg, get_backend):
        def wrapped(*args, **kw):
            out = fn(*args, **kw)
            ran[names[id(args[bn_arg])]] = get_backend()
            return out
        return wrapped

    with monkeypatch.context() as mp:
        # conv_bn_act (each site) calls these by their module-level names
        mp.setattr(fnn, "_torch_site", spy(fnn._torch_site, 2, lambda: "torch"))
        for name in ("bn_act", "bn_relu_conv2d"):
            mp.setattr(fnn, name, spy(getattr(fnn, name), 0, fnn.last_backend))
        step(model, x)
    return ran


def check_tuned_equals_original(original, x, monkeypatch, timer=None, **kw):
    """Tunes a conversion of ``original`` on ``x`` (float32) and checks its step against
    the original's: the output in float32, then the whole step (output, every gradient,
    every buffer) in float64 with the tuned paths -- each site is checked to run its
    choice. Why the gradients in float64: a ReLU or max-pool input within float32
    rounding of a tie sends the gradient another way (seen on torchvision's resnet18 at
    2x3x64x64: the float64 step's x.grad moves 2.4% when x moves by 1e-7), so two
    correct float32 paths can differ by percents; in float64 no input is that close."""
    converted = fusedres.convert(original)
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    tuned = tune(converted, x, verbose=False, timer=timer, **kw)
    after = tuned.state_dict()
    assert before.keys() == after.keys()
    for k in before:  # tuning leaves the state_dict as it was
        assert torch.equal(before[k], after[k]), k
    assert all(p.grad is None for p in tuned.parameters())
    a, b = step(copy.deepcopy(original), x), step(copy.deepcopy(tuned), x)
    assert rel_l2(b[0], a[0]) <= 1e-4, rel_l2(b[0], a[0])
    tuned64 = copy.deepcopy(tuned).double()
    choices = {n: m.fusedres_tuning["choice"] for n, m in sites(tuned64).items()}
    ran = backends_run(copy.deepcopy(tuned64), x.double(), monkeypatch)
    # a site too noisy to decide (a loaded machine) runs its default: any backend
    assert ran.keys() == choices.keys() and \
        all(ran[n] == c for n, c in choices.items() if c is not None), (ran, choices)
    assert_same_step(step(copy.deepcopy(original).double(), x.double()),
                     step(tuned64, x.double()), tol=1e-10)
    return tuned


def test_tuned_small_resnet_equals_original_mixed_choices(monkeypatch):
    # alternate which candidate is fastest per signature: every path runs in one model
    names = ["torch", "reference", "cpu"]
    table = {n: (lambda i, n=n: 1.0 if names[i % 3] == n else 2.0) for n in names}
    original = small()
    tuned = check_tuned_equals_original(original, torch.randn(4, 3, 16, 16), monkeypatch,
                                        timer=fake_timer(table, []), cache=False)
    choices = {b.fusedres_tuning["choice"] for b in sites(tuned).values()}
    assert "torch" in choices and len(choices) >= 2, choices
    # eval mode, then the decisions survive deepcopy and pickling
    ev = small().eval()
    tuned_ev = tune(fusedres.convert(ev), torch.randn(2, 3, 16, 16), verbose=False,
                    cache=False, timer=fake_timer(table, []))
    assert tuned_ev.fusedres_tune_report.mode == "eval"
    for m in (tuned_ev, copy.deepcopy(tuned_ev), pickle.loads(pickle.dumps(tuned_ev))):
        with torch.no_grad():
            x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
            torch.testing.assert_close(m(x), ev(x), rtol=1e-4, atol=1e-5)
        assert {b.fusedres_tuning["choice"] for b in sites(m).values()} == \
            {b.fusedres_tuning["choice"] for b in sites(tuned_ev).values()}


def test_real_tune_resnet18_and_cache(cache_dir, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=10).train().to(
        memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    tuned = check_tuned_equals_original(original, x, monkeypatch)
    rep = tuned.fusedres_tune_report
    assert rep.measured > 0 and rep.cached == 0 and len(rep.sites) == len(sites(tuned))
    assert os.path.exists(rep.cache_path) and rep.cache_path.startswith(str(cache_dir))
    for bn in sites(tuned).values():
        info = bn.fusedres_tuning
        assert "torch" in info["times_ms"] and info["threads"] == torch.get_num_threads()
        assert info["choice"] in info["times_ms"] or info["source"].startswith("not decided")
        assert not info["failed"], info["failed"]
    # a second run reads every decision from the cache: only the signatures the first run
    # could not decide (a loaded machine) are timed again (here: stay undecided)
    calls = []

    def wild_timer(fns, device):
        calls.append(sorted(fns))
        return {n: [1e-3, 3e-2, 1e-3, 2.5e-2, 1e-3] for n in fns}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = tune(fusedres.convert(original), x, verbose=False, timer=wild_timer)
    rep2 = again.fusedres_tune_report
    assert len(calls) == rep2.measured == rep.undecided
    assert rep2.cached == rep.measured - rep.undecided
    assert {n: b.fusedres_tuning["choice"] for n, b in sites(again).items()} == \
        {n: b.fusedres_tuning["choice"] for n, b in sites(tuned).items()}
    if rep2.cached:
        assert "[cache]" in str(fusedres.explain(again))


def test_convert_with_tune_equals_tune_of_convert(monkeypatch):
    # convert(m, tune=x) is tune(convert(m), x) with tune's defaults: the default timer is
    # T.measure (swapped for the fake one here), the cache off so both really measure
    monkeypatch.setenv("FUSEDRES_CACHE", "0")
    names = ["torch", "reference", "cpu"]
    table = {n: (lambda i, n=n: 1.0 if names[i % 3] == n else 2.0) for n in names}
    original = small()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    x = torch.randn(4, 3, 16, 16)

    def plans(model):
        return {n: (fnn.site_plan(m), getattr(m, "fusedres_tuning", {}).get("choice"))
                for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}

    calls_a, calls_b = [], []
    monkeypatch.setattr(T, "measure", fake_timer(table, calls_a))
    a = fusedres.convert(original, tune=x)
    monkeypatch.setattr(T, "measure", fake_timer(table, calls_b))
    b = tune(fusedres.convert(original), x)
    assert calls_a and calls_a == calls_b
    assert plans(a) == plans(b)
    assert len({c for _, c in plans(a).values() if c}) >= 2, plans(a)  # mixed choices
    assert a is not original and a.fusedres_tune_report.measured == len(calls_a)
    after = original.state_dict()
    assert before.keys() == after.keys()
    for k in before:  # bitwise: the original is neither converted nor tuned
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    assert not any(hasattr(m, "fusedres_tuning") for m in original.modules())
    # a tuple is several example inputs; inplace=True tunes the model itself
    calls_c = []
    monkeypatch.setattr(T, "measure", fake_timer(table, calls_c))
    c = copy.deepcopy(original)
    assert fusedres.convert(c, inplace=True, tune=(x,)) is c
    assert plans(c) == plans(b) and calls_c == calls_b


def test_refuses_inside_compile_and_unconverted(monkeypatch):
    with pytest.raises(ValueError, match="converted model"):
        tune(small(), torch.randn(2, 3, 8, 8))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match="torch.compile"):
        tune(fusedres.convert(small()), torch.randn(2, 3, 8, 8))


# --------------------------------------------------------------------------------------
# Noise: decide only on differences the run can tell apart, and never cache noise
# --------------------------------------------------------------------------------------

# samples in seconds: cpu's median is 5% under torch's (over the 3% margin), yet their
# p20-p80 ranges overlap; CLEAR: cpu beats torch beyond the spread; WILD: torch's own
# samples disagree 30-fold (a machine too loaded to measure)
TORCH = [1.00, 0.90, 1.10, 1.05, 0.95]
OVERLAP = [0.95, 0.86, 1.05, 1.00, 0.90]
CLEAR = [0.50, 0.52, 0.48, 0.51, 0.49]
WILD = [1.0, 30.0, 1.0, 25.0, 1.2]


def sample_timer(table, calls=None):
    def timer(fns, device):
        if calls is not None:
            calls.append(sorted(fns))
        return {n: list(table.get(n, [9.0] * 5)) for n in fns}
    return timer


def test_select_only_beyond_the_spread():
    assert T.select({"torch": TORCH, "cpu": OVERLAP}) == "torch"
    assert T.select({"torch": TORCH, "cpu": CLEAR}) == "cpu"
    assert T.clearly_faster(CLEAR, TORCH) and not T.clearly_faster(OVERLAP, TORCH)
    # the fastest of three beats torch clearly but not reference: the simpler of the two
    assert T.select({"torch": TORCH, "reference": [0.50, 0.45, 0.60, 0.55, 0.40],
                     "cpu": CLEAR}) == "reference"
    assert T.too_noisy({"torch": TORCH, "cpu": CLEAR}) is None
    why = T.too_noisy({"torch": WILD, "cpu": CLEAR})
    assert why and "too loaded" in why and "torch" in why


def test_noise_keeps_the_simpler_candidate_and_explain_shows_spread():
    x = torch.randn(4, 3, 16, 16)
    m = tune(fusedres.convert(small()), x, cache=False, verbose=False,
             timer=sample_timer({"torch": TORCH, "reference": OVERLAP, "cpu": OVERLAP}))
    assert {b.fusedres_tuning["choice"] for b in sites(m).values()} == {"torch"}
    info = next(iter(sites(m).values())).fusedres_tuning
    assert info["spread_ms"]["torch"] == pytest.approx([940.0, 1060.0])
    text = str(fusedres.explain(m))
    assert "torch 1e+03 [940-1.06e+03] ms" in text and "5 samples" in text, text
    m = tune(fusedres.convert(small()), x, cache=False, verbose=False,
             timer=sample_timer({"torch": TORCH, "reference": OVERLAP, "cpu": CLEAR}))
    want = "cpu" if "cpu" in fusedres.available_backends() else "torch"
    assert {b.fusedres_tuning["choice"] for b in sites(m).values()} == {want}


def test_a_machine_too_loaded_keeps_defaults_and_caches_nothing(cache_dir):
    x = torch.randn(4, 3, 16, 16)
    converted = fusedres.convert(small())
    default = {n: fnn.site_plan(b) for n, b in sites_of(converted).items()}
    with pytest.warns(RuntimeWarning, match="not decided"):
        m = tune(converted, x, verbose=False,
                 timer=sample_timer({"torch": WILD, "reference": CLEAR, "cpu": CLEAR}))
    rep = m.fusedres_tune_report
    assert rep.undecided == rep.measured > 0 and "NOT decided" in rep.summary()
    for n, b in sites(m).items():
        assert b.fusedres_tuning["choice"] is None, n
        assert "too loaded" in b.fusedres_tuning["source"]
        assert fnn.site_plan(b) == default[n]  # the default path stays
    assert "too loaded to measure" in str(fusedres.explain(m))
    # nothing was cached: the next run (idle) measures every signature again
    calls = []
    again = tune(fusedres.convert(small()), x, verbose=False,
                 timer=sample_timer({"torch": TORCH, "reference": OVERLAP, "cpu": OVERLAP},
                                    calls))
    assert again.fusedres_tune_report.cached == 0 and len(calls) == rep.measured
    assert {b.fusedres_tuning["choice"] for b in sites(again).values()} == {"torch"}


def sites_of(model):
    """Every site's main BN of a converted model (tuned or not), by name."""
    return {r["site"]: model.get_submodule(r["site"]) for r in fusedres.explain(model)
            if r["status"] == "fused"}


def test_thread_count_is_part_of_the_cache_key_and_report(cache_dir):
    x = torch.randn(2, 3, 8, 8)
    table = {"torch": TORCH, "reference": CLEAR, "cpu": OVERLAP}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tune(fusedres.convert(small()), x, verbose=False, timer=sample_timer(table))
        assert one.fusedres_tune_report.threads == 1 and "1 thread(s)" in \
            one.fusedres_tune_report.summary()
        assert "1 thread(s)" in str(fusedres.explain(one))
        torch.set_num_threads(2)
        calls = []
        two = tune(fusedres.convert(small()), x, verbose=False,
                   timer=sample_timer(table, calls))
        assert two.fusedres_tune_report.cached == 0 and calls  # not the 1-thread answers
        torch.set_num_threads(1)
        again = tune(fusedres.convert(small()), x, verbose=False, timer=sample_timer(table))
        assert again.fusedres_tune_report.measured == 0
    finally:
        torch.set_num_threads(threads)


def test_a_loaded_machine_cannot_fool_tune(monkeypatch):
    """The real timer, the torch candidate made clearly slower (20 ms of sleep more per
    call: a delay the load cannot shrink or blur, unlike extra compute, which a loaded
    CI machine once slowed for both candidates until the difference sat inside the
    spread and the simpler torch was rightly kept): idle, and again with a busy thread
    beside it (Python work holding the GIL and matmuls competing for the cores), every
    site either picks the fused candidate or reports that it could not decide -- never
    the slower path -- and a site decided in both runs is decided alike."""
    import threading
    import time

    fused = "cpu" if "cpu" in fusedres.available_backends() else "reference"
    real = fnn._torch_site
    def slow_torch_site(*args, **kw):
        time.sleep(0.02)
        return real(*args, **kw)

    monkeypatch.setattr(fnn, "_torch_site", slow_torch_site)
    x = torch.randn(2, 3, 16, 16)

    def decisions():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "not decided" is an allowed answer
            m = tune(fusedres.convert(small()), x, cache=False, verbose=False,
                     candidates=[fused])
        return {n: b.fusedres_tuning["choice"] for n, b in sites(m).items()}

    idle = decisions()
    stop = threading.Event()

    def busy():
        a = torch.randn(192, 192)
        while not stop.is_set():
            a = torch.tanh(a @ a)
            sum(range(20000))

    worker = threading.Thread(target=busy, daemon=True)
    worker.start()
    try:
        loaded = decisions()
    finally:
        stop.set()
        worker.join()
    # "idle" is only as idle as the machine running the tests: it may not decide either
    assert loaded.keys() == idle.keys()
    assert set(idle.values()) | set(loaded.values()) <= {fused, None}, (idle, loaded)
    assert all(loaded[n] == idle[n] for n in idle if None not in (idle[n], loaded[n]))
    assert fused in list(idle.values()) + list(loaded.values()), (idle, loaded)


def test_interleaved_samples_rounds_and_drop():
    from fusedres import _timing

    now = [0.0]
    cost = {"fast": 1.0, "slow": 3.0}
    order = []

    def fn(name):
        def run():
            order.append(name)
            now[0] += cost[name]
        return run

    got = _timing.interleaved_samples({n: fn(n) for n in cost}, torch.device("cpu"),
                                      rounds=5, max_time=1e9, clock=lambda: now[0])
    assert got["fast"] == [1.0] * 5  # steady samples: the minimum number of rounds
    assert got["slow"] == [3.0] * 3  # dropped after three rounds: 3x beyond any noise
    assert order[:4] == ["fast", "slow", "slow", "fast"]  # a rotating order


def test_tune_without_example_inputs_is_one_clear_line():
    with pytest.raises(TypeError) as err:
        tune(fusedres.convert(small()))
    text = str(err.value)
    assert "\n" not in text and "example input" in text and "fusedres.tune(model, x)" in text
    assert err.traceback[-1].path.name == "tune.py"  # raised where the call is checked


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_backend_that_cannot_run_here_is_one_line_at_the_first_forward():
    m = fusedres.convert(small(), backend="cuda")  # converted on a machine without a GPU
    with pytest.raises(RuntimeError) as err:
        m(torch.randn(2, 3, 8, 8))
    text = str(err.value)
    assert "\n" not in text and "fused site 'bn1'" in text and "backend='auto'" in text, text
    assert err.traceback[-1].path.name == "_backend.py"  # the check, not a kernel's guts
    # a decision tuned elsewhere (as if on a GPU): the remedy is to tune again here
    m = fusedres.convert(small())
    m.bn1.fusedres_plan, m.bn1.fusedres_tuning = T.plan_of("cuda"), {"choice": "cuda"}
    with pytest.raises(RuntimeError, match="'bn1' cannot run.*tune the model again on cpu"):
        m(torch.randn(2, 3, 8, 8))


# --------------------------------------------------------------------------------------
# The decision cache
# --------------------------------------------------------------------------------------


def env(**change):
    e = tc.environment(torch.device("cpu"), ["torch", "cpu", "reference"])
    e.update(change)
    return e


SIG = {"op": "conv-bn-relu", "shapes": {"x": {"shape": [2, 3, 8, 8], "stride": [192, 64, 8, 1],
                                            "dtype": "float32", "grad": True}},
       "mode": "train"}
ENTRY = {"choice": "cpu", "times_ms": {"cpu": 1.0, "torch": 2.0}, "failed": {},
         "source": "measured"}


def test_cache_dir_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSEDRES_CACHE_DIR", str(tmp_path / "a"))
    assert tc.cache_dir() == str(tmp_path / "a")
    assert tc.cache_dir(str(tmp_path / "b")) == str(tmp_path / "b")
    assert tc.cache_dir(False) is None
    monkeypatch.setenv("FUSEDRES_CACHE", "0")
    assert tc.cache_dir() is None
    monkeypatch.delenv("FUSEDRES_CACHE")
    monkeypatch.delenv("FUSEDRES_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tc.cache_dir() == str(tmp_path / "xdg" / "fusedres")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tc.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "fusedres")


def test_cache_round_trip_and_invalidation(cache_dir):
    c = tc.DecisionCache(str(cache_dir), env())
    c.put(SIG, ENTRY)
    c.save()
    again = tc.DecisionCache(str(cache_dir), env())
    assert again.get(SIG)["choice"] == "cpu"
    # any part of the environment changes: another file, nothing found
    for key, value in [("device", "another cpu"), ("torch", "0.0"), ("triton", "0.0"),
                       ("cuda", "99.0"), ("fusedres", "9.9"), ("build", "rebuilt"),
                       ("threads", 999), ("cpu_isa", "other"), ("capability", [9, 0]),
                       ("candidates", ["torch"])]:
        other = tc.DecisionCache(str(cache_dir), env(**{key: value}))
        assert other.path != c.path and other.get(SIG) is None, key
    # any part of the site signature changes: not found
    for change in [{"op": "bn-relu"}, {"mode": "eval"},
                   {"shapes": {"x": dict(SIG["shapes"]["x"], shape=[4, 3, 8, 8])}},
                   {"shapes": {"x": dict(SIG["shapes"]["x"], stride=[192, 1, 24, 3])}},
                   {"shapes": {"x": dict(SIG["shapes"]["x"], dtype="bfloat16")}}]:
        assert again.get(dict(SIG, **change)) is None, change
    # a foreign file under this environment's name is ignored with a warning
    data = json.load(open(c.path))
    data["env"] = env(device="someone else's")
    json.dump(data, open(c.path, "w"))
    with pytest.warns(RuntimeWarning, match="^fusedres.tune: ignoring .*another device"):
        assert tc.DecisionCache(str(cache_dir), env()).get(SIG) is None
    with pytest.warns(RuntimeWarning, match="^its owner: ignoring .*another device"):
        assert tc.DecisionCache(str(cache_dir), env(), owner="its owner").get(SIG) is None
    # a stale entry (its choice is no candidate here) is ignored with a warning
    c2 = tc.DecisionCache(str(cache_dir), env())
    c2.entries[tc.digest(SIG)] = dict(ENTRY, choice="triton", signature=SIG)
    with pytest.warns(RuntimeWarning, match="^fusedres.tune: ignoring a stale"):
        assert c2.get(SIG) is None


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "wrong format", "list"])
def test_corrupt_cache_is_ignored_then_replaced(cache_dir, damage):
    x = torch.randn(2, 3, 8, 8)
    table = {"torch": 2.0, "reference": 1.0, "cpu": 3.0}
    first = tune(fusedres.convert(small()), x, verbose=False, timer=fake_timer(table))
    path = first.fusedres_tune_report.cache_path
    text = open(path).read()
    bad = {"truncated": text[: len(text) // 2], "garbage": "\x00\xff not json",
           "empty": "", "wrong format": json.dumps({"format": 999}),
           "list": json.dumps([1, 2])}[damage]
    with open(path, "w") as f:
        f.write(bad)
    with pytest.warns(RuntimeWarning, match="ignoring the decision cache"):
        m = tune(fusedres.convert(small()), x, verbose=False, timer=fake_timer(table))
    assert m.fusedres_tune_report.cached == 0 and m.fusedres_tune_report.measured > 0
    assert {b.fusedres_tuning["choice"] for b in sites(m).values()} == {"reference"}
    assert json.load(open(path))["format"] == tc.FORMAT  # rewritten whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = tune(fusedres.convert(small()), x, verbose=False, timer=fake_timer(table))
    assert m.fusedres_tune_report.measured == 0


def _writer(directory, env_, worker, count):
    c = tc.DecisionCache(directory, env_)
    for i in range(count):
        c.put(dict(SIG, op=f"w{worker}-{i}"), ENTRY)
        c.save()


def test_two_processes_writing_at_once(cache_dir):
    e = env()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(cache_dir), e, w, 25)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    c = tc.DecisionCache(str(cache_dir), e)
    assert len(c.entries) == 50  # every entry of both, none lost, the file whole
    assert all(c.get(dict(SIG, op=f"w{w}-{i}")) for w in range(2) for i in range(25))
    assert not [f for f in os.listdir(cache_dir) if f.endswith(".tmp")]

"""BN finalize after the cuDNN graphs' sums (fusedres.cudnn_graph.bn_finalize): cuDNN's
bn_finalize graph (its reference, reference.graph_bn_finalize, against torch's BN in
float64), the project's finalize against the same, and the switch between them with cuDNN
faked on CPU (planned, refused, failing to execute: remembered, never an exception). The
graph itself runs only on a GPU (fusedres-bench doctor's cudnn_graph_BNFinalize row,
scripts/gpu_cudnn_sites.py --finalize)."""
import pytest
import torch
import torch.nn.functional as F

from fusedres import cudnn_graph
from fusedres import reference as R

D = torch.float64


def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}")


def _batch(seed=0, c=6, offset=3.0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(4, c, 5, 5, generator=gen, dtype=D) * 0.7 + offset  # |mean| > std
    gamma = torch.rand(c, generator=gen, dtype=D) + 0.5
    beta = torch.randn(c, generator=gen, dtype=D)
    rm = torch.randn(c, generator=gen, dtype=D)
    rv = torch.rand(c, generator=gen, dtype=D) + 0.5
    return y, gamma, beta, rm, rv


def _sums(y):
    return y.sum(dim=(0, 2, 3)), (y * y).sum(dim=(0, 2, 3)), y.numel() // y.shape[1]


@pytest.mark.parametrize("momentum", [0.1, 0.7, 1.0])
def test_graph_bn_finalize_is_torch_batch_norm(momentum):
    """cuDNN's outputs as the reference models them: y*eq_scale + eq_bias is torch's BN
    in training, the saved mean and inverse std are the batch's (biased variance), the
    next running statistics torch's (momentum = the exponential-average factor, unbiased
    variance); the given running statistics are left alone."""
    y, gamma, beta, rm0, rv0 = _batch()
    s1, s2, count = _sums(y)
    rm, rv = rm0.clone(), rv0.clone()
    scale, shift, mean, invstd, next_rm, next_rv = R.graph_bn_finalize(
        s1, s2, gamma, beta, 1e-5, rm, rv, momentum, count)
    rm_t, rv_t = rm0.clone(), rv0.clone()
    out_t = F.batch_norm(y, rm_t, rv_t, gamma, beta, True, momentum, 1e-5)
    _close(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), out_t, "bn(y)")
    var_t, mean_t = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    _close(mean, mean_t, "saved mean")
    _close(invstd, torch.rsqrt(var_t + 1e-5), "saved inv std")
    _close(shift, beta - mean_t * scale, "eq_bias")
    _close(next_rm, rm_t, "next running mean")
    _close(next_rv, rv_t, "next running var (unbiased)")
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_project_finalize_matches_the_reference_and_torch(momentum):
    """The project's finalize (the default) gives the reference's four outputs and
    updates the running statistics in place as torch does (momentum=None: the cumulative
    average over num_batches_tracked, incremented by the caller)."""
    y, gamma, beta, rm0, rv0 = _batch(1)
    s1, s2, count = _sums(y)
    nbt = torch.tensor(3) if momentum is None else None
    factor = 1 / 3 if momentum is None else momentum
    rm, rv = rm0.clone(), rv0.clone()
    got = cudnn_graph.bn_finalize(s1, s2, count, gamma, beta, 1e-5, rm, rv, momentum, nbt)
    want = R.graph_bn_finalize(s1, s2, gamma, beta, 1e-5, rm0, rv0, factor, count)
    for g, w, name in zip(got, want, ("scale", "shift", "mean", "invstd")):
        _close(g, w, name)
    rm_t, rv_t = rm0.clone(), rv0.clone()
    F.batch_norm(y, rm_t, rv_t, gamma, beta, True, factor, 1e-5)
    _close(rm, rm_t, "running mean")
    _close(rv, rv_t, "running var")


def test_finalize_rules():
    ok = dict(on_cuda=True, built_op=True, sums_dtype=torch.float32,
              running_dtype=torch.float32, momentum=0.1)
    plan = lambda **kw: cudnn_graph.finalize_plan(**{**ok, **kw})  # noqa: E731
    assert plan() is None and plan(running_dtype=None) is None
    assert "CUDA" in plan(on_cuda=False)
    assert "built without" in plan(built_op=False)
    assert "float32" in plan(sums_dtype=torch.float64)
    assert "momentum=None" in plan(momentum=None)
    assert "running statistics" in plan(running_dtype=torch.float16)
    assert "CUDA" in cudnn_graph.finalize_problem(torch.zeros(4), None, 0.1)


@pytest.fixture
def fake_cudnn(monkeypatch):
    """cuDNN's bn_finalize faked on CPU: the rules pass (but momentum=None), the planner
    answers ``state["status"]``, the graph is its reference (or raises
    ``state["raise"]``). Returns the state with the calls made."""
    state = {"status": "", "raise": None, "asked": 0, "ran": 0}
    monkeypatch.setattr(cudnn_graph, "_STATUS", {})
    monkeypatch.setattr(cudnn_graph, "_ENGINE", {})
    monkeypatch.setattr(cudnn_graph, "finalize_problem", lambda s, rm, m: cudnn_graph.finalize_plan(
        True, True, torch.float32, None, m))

    real_ask = cudnn_graph._ask_cudnn

    def ask(ops, *args):
        if ops != "cudnn_graph_bn_finalize":  # the conv and tail graphs: not faked here
            return real_ask(ops, *args)
        state["asked"] += 1
        return state["status"], (None if state["status"] else "fake-engine")

    def run(*args):
        state["ran"] += 1
        if state["raise"]:
            raise RuntimeError(state["raise"])
        return R.graph_bn_finalize(*args[:4], args[6], args[4], args[5], args[7], args[8])

    monkeypatch.setattr(cudnn_graph, "_ask_cudnn", ask)
    monkeypatch.setattr(cudnn_graph, "_run_bn_finalize", run)
    return state


def _finalize_both(impl, momentum=0.1):
    y, gamma, beta, rm0, rv0 = _batch(2)
    s1, s2, count = _sums(y)
    rm, rv = rm0.clone(), rv0.clone()
    got = cudnn_graph.bn_finalize(s1, s2, count, gamma, beta, 1e-5, rm, rv, momentum,
                                  torch.tensor(2), impl=impl)
    factor = 0.5 if momentum is None else momentum
    want = R.graph_bn_finalize(s1, s2, gamma, beta, 1e-5, rm0, rv0, factor, count)
    for g, w, name in zip(got, want, ("scale", "shift", "mean", "invstd")):
        _close(g, w, name)
    _close(rm, want[4], "running mean updated once")
    _close(rv, want[5], "running var updated once")


def test_default_is_the_project_finalize(fake_cudnn):
    assert cudnn_graph.finalize == "fusedres"
    _finalize_both(None)
    assert fake_cudnn["asked"] == 0 and fake_cudnn["ran"] == 0


def test_cudnn_finalize_runs_where_planned(fake_cudnn):
    _finalize_both("cudnn")
    _finalize_both("cudnn")
    assert fake_cudnn["asked"] == 1 and fake_cudnn["ran"] == 2  # planned once
    row, = [r for r in cudnn_graph.statuses() if r["kind"] == "BNFinalize"]
    assert row["status"] == "" and row["engine"] == "fake-engine" and row["input"] == (6,)


def test_refused_finalize_falls_back_and_is_remembered(fake_cudnn):
    fake_cudnn["status"] = "check_support: no engine"
    _finalize_both("cudnn")
    _finalize_both("cudnn")
    assert fake_cudnn["asked"] == 1 and fake_cudnn["ran"] == 0
    row, = cudnn_graph.statuses()
    assert row["status"] == "check_support: no engine" and row["engine"] is None


def test_finalize_failing_to_execute_falls_back_and_is_remembered(fake_cudnn):
    fake_cudnn["raise"] = "CUDNN_STATUS_EXECUTION_FAILED\nmore"
    _finalize_both("cudnn")  # no exception; the running statistics updated once
    _finalize_both("cudnn")
    assert fake_cudnn["ran"] == 1
    row, = cudnn_graph.statuses()
    assert row["status"] == "execute failed: CUDNN_STATUS_EXECUTION_FAILED"


def test_cumulative_average_stays_with_the_project(fake_cudnn):
    _finalize_both("cudnn", momentum=None)
    assert fake_cudnn["asked"] == 0 and fake_cudnn["ran"] == 0


def test_unknown_finalize_is_an_error():
    with pytest.raises(ValueError, match="unknown BN finalize"):
        cudnn_graph.bn_finalize(torch.ones(2), torch.ones(2), 4, None, None, 1e-5, impl="x")


def _doctor_finalize_rows():
    from fusedres.bench.doctor import Doctor

    doc = Doctor(torch.device("cpu"), quick=True, progress=False)
    doc._cudnn_finalize()
    return doc


def test_doctor_row_checks_cudnn_against_the_project(fake_cudnn, monkeypatch):
    """The doctor's cudnn_graph_BNFinalize row (float32 graph against the project's
    finalize in float64) passes for the reference standing in for cuDNN, and fails for a
    finalize with the biased variance in its running statistics."""
    doc = _doctor_finalize_rows()
    row, = doc.rows.values()
    assert row.ok and row.cases == 3 and fake_cudnn["ran"] == 3, row.detail

    def biased(*args):
        out = list(R.graph_bn_finalize(*args[:4], args[6], args[4], args[5], args[7], args[8]))
        prev, m, count = args[5], args[7], args[8]
        out[5] = out[5] - (out[5] - (1 - m) * prev) / count  # (1-m)*prev + m*biased var
        return tuple(out)

    monkeypatch.setattr(cudnn_graph, "_run_bn_finalize", biased)
    row, = _doctor_finalize_rows().rows.values()
    assert not row.ok and "running_var" in row.detail


def test_doctor_row_lists_a_refusal_as_skipped(fake_cudnn):
    fake_cudnn["status"] = "check_support: no engine"
    doc = _doctor_finalize_rows()
    assert not doc.rows and len(doc.skipped) == 3
    assert all(k == "cudnn_graph_BNFinalize" and "no engine" in why for k, why in doc.skipped)


@pytest.mark.skipif(not cudnn_graph.built(), reason="fusedres._C without the cuDNN graph path")
def test_the_extension_op_takes_what_the_python_side_passes():
    """CI's CUDA build has the op, with the argument order _run_bn_finalize passes and the
    six outputs _finalize_cudnn unpacks (the CPU tests fake the op by its reference)."""
    schema = torch.ops.fusedres.cudnn_graph_bn_finalize.default._schema
    assert [a.name for a in schema.arguments] == [
        "sum", "sq_sum", "gamma", "beta", "running_mean", "running_var", "eps", "momentum",
        "count"]
    assert [r.name for r in schema.returns] == [
        "scale", "shift", "mean", "invstd", "next_running_mean", "next_running_var"]
    for op in ("cudnn_graph_bn_finalize_plan", "cudnn_graph_bn_finalize_engine"):
        assert cudnn_graph._defined(op)


@pytest.mark.skipif(not cudnn_graph._defined("cudnn_graph_bn_finalize"),
                    reason="fusedres._C without cuDNN's bn_finalize op")
def test_the_extension_op_has_a_fake_kernel():
    """torch.compile traces ``bn_finalize(impl="cudnn")`` once its graph was planned in an
    eager step: the op then needs a fake kernel (six float32 (C,) tensors), as the other
    graph ops have."""
    c = torch.empty(16, device="meta")
    outs = torch.ops.fusedres.cudnn_graph_bn_finalize(c, c, c, c, c, c, 1e-5, 0.1, 10)
    assert len(outs) == 6
    assert all(t.shape == (16,) and t.dtype == torch.float32 and t.device.type == "meta"
               for t in outs)

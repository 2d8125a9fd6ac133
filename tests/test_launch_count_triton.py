"""Kernel launches of one training-mode forward + backward of the fused BN ops with
``backend="triton"`` (issue 12: at most 8; small layers are launch-bound on a GPU).

Runs on CPU tensors under the Triton interpreter and counts what would be a launch on a
GPU: every Triton kernel launch (the interpreter's grid executor, whose own host copies
are not counted), plus every aten op dispatched on the tensors outside a kernel launch
(TorchDispatchMode) except those that launch nothing on CUDA either: allocations and
views. The Python custom ops of ``fusedres`` are entered (their aten ops count); a C++
``fusedres`` op counts as one launch: that is ``fusedres::update_running_stats``, one per
BN, whose CUDA kernel count tests/test_launch_count_cuda.py checks.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fusedres  # noqa: E402
from fusedres import functional as FF  # noqa: E402

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="counts interpreted launches on CPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1"
                       or "triton" not in fusedres.available_backends(),
                       reason="needs the Triton interpreter"),
]

MAX_LAUNCHES = 8

# aten ops that launch no kernel on CUDA: allocations and metadata
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
              "detach", "alias", "lift_fresh", "set_"}


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches = []  # names, in order
        self._in_kernel = 0
        self._entered = 0

    def __enter__(self):
        self._entered += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._entered -= 1
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._in_kernel:  # the interpreter's host copies of a launch
            return func(*args, **kwargs)
        if func.namespace == "fusedres":
            opdef = torch._library.custom_ops.OPDEFS.get(func._schema.name)
            if opdef is not None:  # a Python custom op: count what it runs
                with self:
                    return opdef._init_fn(*args, **kwargs)
            self.launches.append(str(func))
            return func(*args, **kwargs)
        if not (func.is_view or func._schema.name.split("::")[-1] in _NO_KERNEL):
            self.launches.append(str(func))
        return func(*args, **kwargs)

    def triton_launch(self, name):
        if self._entered:
            self.launches.append(f"triton:{name}")
        self._in_kernel += 1

    def triton_done(self):
        self._in_kernel -= 1


@pytest.fixture
def counter(monkeypatch):
    from triton.runtime import interpreter

    mode = LaunchCounter()
    run = interpreter.GridExecutor.__call__

    def counted(self, *args, **kwargs):
        mode.triton_launch(self.fn.__name__)
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.triton_done()

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", counted)
    return mode


def _inputs(variant, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 8, 4, 4)

    def act():
        t = torch.randn(shape, generator=g)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_()

    def params():
        return ((torch.rand(8, generator=g) + 0.5).requires_grad_(),
                torch.randn(8, generator=g).requires_grad_(), torch.zeros(8), torch.ones(8))

    x, (w, b, rm, rv) = act(), params()
    if variant == "relu":
        return (lambda: FF.batch_norm_relu(x, rm, rv, w, b, True, backend="triton"),
                [x, w, b])
    if variant == "add":
        r = act()
        return (lambda: FF.batch_norm_add_relu(x, r, rm, rv, w, b, True, backend="triton"),
                [x, r, w, b])
    x2, (w2, b2, rm2, rv2) = act(), params()
    return (lambda: _dual(x, x2, rm, rv, w, b, rm2, rv2, w2, b2), [x, w, b, x2, w2, b2])


def _dual(x, x2, rm, rv, w, b, rm2, rv2, w2, b2):
    """dual_batch_norm_add_relu whichever argument order functional.py has."""
    try:
        return FF.dual_batch_norm_add_relu(x, x2, rm, rv, w, b, rm2, rv2, w2, b2, True,
                                           backend="triton")
    except TypeError:
        return FF.dual_batch_norm_add_relu(x, rm, rv, w, b, x2, rm2, rv2, w2, b2, True,
                                           backend="triton")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("variant", ["relu", "add", "dual"])
def test_training_forward_backward_launches(counter, variant, channels_last):
    run, leaves = _inputs(variant, channels_last)
    out = run()  # warm-up: imports, first-call caches
    dout = torch.randn_like(out)
    torch.autograd.grad(out, leaves, dout)
    with counter:
        out = run()
        grads = torch.autograd.grad(out, leaves, dout)
    assert all(g is not None for g in grads)
    triton = [n for n in counter.launches if n.startswith("triton:")]
    assert len(triton) >= 6, counter.launches  # the kernels did run (not a fallback)
    assert len(counter.launches) <= MAX_LAUNCHES, (
        f"{len(counter.launches)} launches: {counter.launches}")


def test_counter_sees_tensor_ops(counter):
    """The counter can fail: the per-channel math as tensor ops (the reference_primitives
    pipeline, today's finalize) is counted op by op."""
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    w, b = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    rm, rv = torch.zeros(8), torch.ones(8)
    with counter:
        out = FF.batch_norm_relu(x, rm, rv, w, b, True, backend="reference_primitives")
        torch.autograd.grad(out, [x, w, b], torch.ones_like(out))
    assert len(counter.launches) > MAX_LAUNCHES, counter.launches

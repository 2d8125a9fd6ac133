"""fusedres.convert / fusedres.explain on torchvision, hand-written and timm ResNets."""
import collections
import copy
import os

import pytest
import torch

import fusedres
import torchvision
from torch import nn

import fusedres.nn as fnn
import models
from _cases import device_backends, ids
from fusedres.convert import FusedForward, convert, explain

FUSED = device_backends(include_reference=False)


def slow(fn):
    """Long tests: marked ``slow`` and run only with FUSEDRES_SLOW=1."""
    return pytest.mark.slow(pytest.mark.skipif(
        os.environ.get("FUSEDRES_SLOW") != "1", reason="slow: set FUSEDRES_SLOW=1")(fn))

MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None),
    "resnet50": lambda: torchvision.models.resnet50(weights=None),
    "densenet121": lambda: torchvision.models.densenet121(weights=None),
    "cifar_resnet_option_a": models.CifarResNet,
    "cifar_resnet_inline_pad": lambda: models.CifarResNet(inline_pad=True),
    "preact_resnet": models.PreActResNet,
    "tiny_resnet": models.TinyResNet,
}

# (status, kernel) -> count, for every model above
EXPECTED = {
    "resnet18": {("fused", "batch_norm_relu"): 9, ("fused", "batch_norm_add_relu"): 5,
                 ("fused", "dual_batch_norm_add_relu"): 3},
    "resnet50": {("fused", "batch_norm_relu"): 33, ("fused", "batch_norm_add_relu"): 12,
                 ("fused", "dual_batch_norm_add_relu"): 4},
    "densenet121": {("fused", "batch_norm_relu"): 121},
    "cifar_resnet_option_a": {("fused", "batch_norm_relu"): 4,
                              ("fused", "batch_norm_add_relu"): 3},
    "cifar_resnet_inline_pad": {("fused", "batch_norm_relu"): 4,
                                ("fused", "batch_norm_add_relu"): 3},
    "preact_resnet": {("fused", "batch_norm_relu"): 7},
    # block2's BNs have momentum=None: no dual kernel, the shortcut conv-BN on its own
    "tiny_resnet": {("fused", "batch_norm_relu"): 4, ("fused", "batch_norm_add_relu"): 3,
                    ("fused", "batch_norm"): 1},
}
# of those BN-ReLUs, the ones whose only consumer is a conv: BN-ReLU -> conv sites (kernel
# "bn_relu_prologue" where the conv runs on Triton). Not: stems (max-pool or a block
# after them), pre-activation BNs that also feed a shortcut conv, final BN-ReLUs.
NEXT_SITES = {"resnet18": 8, "resnet50": 32, "densenet121": 119, "cifar_resnet_option_a": 3,
              "cifar_resnet_inline_pad": 3, "preact_resnet": 4, "tiny_resnet": 3}


def _randomize(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _pair(build, device, backend, dtype=torch.float64):
    torch.manual_seed(0)
    ref = _randomize(build()).to(device, dtype)
    fused = convert(ref, backend=backend)
    return ref, fused


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-7, atol=1e-9, msg=lambda m: f"{k}: {m}")


def _check_equivalent(ref, fused, device, dtype=torch.float64, tol=1e-6, backend=None):
    def close(a, b, what):  # relative to the tensor's scale: float64 rounding only
        atol = tol * max(float(a.detach().abs().max()), 1.0)
        torch.testing.assert_close(b, a, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")

    torch.manual_seed(2)
    x = torch.randn(4, 3, 32, 32, device=device, dtype=dtype)
    ref.train()
    fused.train()
    out_r, out_f = ref(x), fused(x)
    close(out_r, out_f, "train output")
    if backend is not None:  # the last site ran the fused path, not a fallback
        assert fnn.last_backend() == backend
    g = torch.randn_like(out_r)
    out_r.backward(g)
    out_f.backward(g)
    for (n, p), q in zip(ref.named_parameters(), fused.parameters()):
        close(p.grad, q.grad, f"grad of {n}")
    _assert_same_state(ref, fused)
    ref.eval()
    fused.eval()
    with torch.no_grad():
        close(ref(x), fused(x), "eval output")


# resnet18 and the small models run in the interpreter in CI; these only with FUSEDRES_SLOW=1
INTERPRETER_TOO_SLOW = ("resnet50", "densenet121")


@pytest.mark.parametrize("device,backend", FUSED, ids=ids(FUSED))
@pytest.mark.parametrize("name", list(MODELS))
def test_model_equivalent(name, device, backend, monkeypatch):
    interpreted = backend == "triton" and device == "cpu"
    if interpreted and name in INTERPRETER_TOO_SLOW and os.environ.get("FUSEDRES_SLOW") != "1":
        pytest.skip(f"{name} in the Triton interpreter takes minutes: set FUSEDRES_SLOW=1")
    if interpreted and os.environ.get("FUSEDRES_SLOW") != "1":
        # Triton convs at these sizes take minutes in the interpreter: the BN kernels
        # here, the prologue on small models in test_prologue.py
        monkeypatch.setattr(fnn, "conv_prologue", False)
    ref, fused = _pair(MODELS[name], device, backend)
    rows = explain(fused)
    counts = collections.Counter((r["status"], r["kernel"]) for r in rows)
    prologue = NEXT_SITES[name] if backend == "triton" and fnn.conv_prologue else 0
    assert counts.pop(("fused", "bn_relu_prologue"), 0) == prologue, str(rows)
    counts[("fused", "batch_norm_relu")] += prologue
    assert dict(counts) == EXPECTED[name], str(rows)
    assert sum(r["pattern"].startswith(("bn-relu-conv", "conv-bn-relu-conv")) for r in rows) \
        == NEXT_SITES[name], str(rows)
    assert all(r["backend"] == backend for r in rows if r["status"] == "fused")
    assert not any(isinstance(m.__dict__.get("forward"), FusedForward) for m in ref.modules())
    _check_equivalent(ref, fused, device, backend=backend)


@pytest.mark.parametrize("name", ["resnet18", "tiny_resnet", "cifar_resnet_option_a"])
def test_state_dict_and_structure_kept(name):
    ref, fused = _pair(MODELS[name], "cpu", "reference_primitives", torch.float32)
    _assert_same_state(ref, fused)
    assert [n for n, _ in ref.named_modules()] == [n for n, _ in fused.named_modules()]
    assert [type(m) for m in ref.modules()] == [type(m) for m in fused.modules()]
    assert [n for n, _ in ref.named_buffers()] == [n for n, _ in fused.named_buffers()]
    # checkpoints load both ways, strictly
    other = copy.deepcopy(ref)
    _randomize(other).load_state_dict(fused.state_dict())
    fused.load_state_dict(_randomize(copy.deepcopy(ref)).state_dict())
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 32, 32)
    ref.eval(), fused.eval()
    torch.testing.assert_close(fused(x), ref(x))


def test_methods_and_unreferenced_buffers_survive():
    ref, fused = _pair(models.TinyResNet, "cpu", "reference_primitives", torch.float32)
    assert "calls" in dict(fused.named_buffers())
    x = torch.randn(2, 3, 32, 32)
    ref.eval(), fused.eval()
    torch.testing.assert_close(fused.forward_features(x), ref.forward_features(x))
    # the blocks' forwards were rewritten, the model class is untouched
    assert type(fused) is models.TinyResNet
    assert isinstance(fused.block1.forward, FusedForward)
    assert "fusedres_nn_conv_bn_act" in fused.block1.forward.code()


@pytest.mark.parametrize("name", ["resnet18", "tiny_resnet", "preact_resnet"])
def test_save_load_whole_model(name, tmp_path):
    ref, fused = _pair(MODELS[name], "cpu", "reference_primitives", torch.float32)
    path = tmp_path / "model.pt"
    torch.save(fused, path)
    loaded = torch.load(path, weights_only=False)
    assert isinstance(next(m for m in loaded.modules() if isinstance(
        m.__dict__.get("forward"), FusedForward)).forward, FusedForward)
    _assert_same_state(fused, loaded)
    _check_equivalent(ref.double(), loaded.double(), "cpu")
    # deepcopy keeps each generated forward bound to its own copy
    twin = copy.deepcopy(loaded)
    for m in twin.modules():
        f = m.__dict__.get("forward")
        if isinstance(f, FusedForward):
            assert f.module is m


def test_inplace_and_idempotent():
    torch.manual_seed(0)
    m = models.CifarResNet()
    same = convert(m, inplace=True, backend="reference_primitives")
    assert same is m
    again = convert(same, backend="reference_primitives")
    assert len(explain(again).fused()) == len(explain(same).fused()) == 7


def test_explain_unconverted_and_table():
    m = torchvision.models.resnet18(weights=None)
    rows = explain(m)
    assert {r["status"] for r in rows} == {"fusable"}
    assert "forward" not in m.layer1[0].__dict__  # nothing changed
    fused = convert(m, backend="reference_primitives")
    table = str(explain(fused))
    assert "dual_batch_norm_add_relu" in table
    assert table.splitlines()[-1].startswith("17 sites fused, 0 BNs left unfused")
    first = explain(fused)[0]
    assert first["site"] == "bn1" and first["pattern"] == "conv-bn-relu"
    # every BN of resnet18 follows a conv: all fold in eval (bn2 into the conv2 of the
    # conv1-bn1-relu-conv2 site before it)
    assert {r["eval"] for r in explain(fused)} == {"folded"}


def test_no_fusable_pattern():
    m = models.NoBN()
    c = convert(m, backend="reference_primitives")
    assert len(explain(c)) == 0
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(c(x), m(x))
    assert not any(isinstance(mod.__dict__.get("forward"), FusedForward) for mod in c.modules())


def test_unsupported_left_unfused_with_reason():
    ref, fused = _pair(models.Awkward, "cpu", "reference_primitives")
    rows = {r["site"]: r for r in explain(fused)}
    expect = {
        "bn_twice": ("unfused", "used 2 times"),
        "bn_sub": ("unfused", "overrides BatchNorm2d.forward"),
        "bn_relu6": ("unfused", "nothing to fuse"),
        "bn_hooked": ("unfused", "hooks"),
        "child.bn": ("unfused", "untraceable"),
        "bn_nostats": ("fused", ""),
        "bn_main": ("fused", ""),
        "bn_short": ("fused", "computed separately"),
    }
    for site, (status, reason) in expect.items():
        assert rows[site]["status"] == status, rows[site]
        assert reason in rows[site]["reason"], rows[site]
    # never wrong: same outputs, gradients, running statistics
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for training in (True, False):
        ref.train(training), fused.train(training)
        torch.testing.assert_close(fused(x), ref(x))
    _assert_same_state(ref, fused)


def test_shared_relu_and_functional_relu_sites():
    m = models.TinyResNet()
    rows = {r["site"]: r for r in explain(convert(m, backend="reference_primitives"))}
    assert rows["block1.bn1"]["kernel"] == "batch_norm_relu"  # shared self.relu, 1st call
    assert rows["block1.bn2"]["kernel"] == "batch_norm_add_relu"  # `+=` then self.relu
    assert rows["stem.1"]["pattern"] == "conv-bn-relu"  # nn.Sequential stem
    assert rows["block2.downsample.1"]["pattern"] == "conv-bn"


def test_mixed_dtype_residual_falls_back():
    """A residual of another dtype is added with torch's type promotion."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, 1, 1, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + x.double())

    ref = Block()
    fused = convert(ref, backend="reference_primitives")
    assert explain(fused)[0]["status"] == "fused"
    x = torch.randn(2, 4, 5, 5)
    out = fused(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref(x))


def test_convergence_fused_vs_unfused():
    """20 SGD steps from the same seed: per-step losses equal within tolerance."""
    torch.manual_seed(0)
    ref = models.CifarResNet()
    fused = convert(ref, backend=FUSED[0][1])
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, fused)]
    g = torch.Generator().manual_seed(3)
    data = torch.randn(4, 3, 32, 32, generator=g)
    target = torch.randint(0, 10, (4,), generator=g)
    losses = [[], []]
    for step in range(20):
        for i, (m, opt) in enumerate(zip((ref, fused), opts)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(data), target)
            loss.backward()
            opt.step()
            losses[i].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-3,
                               atol=1e-4)
    assert losses[0][-1] < losses[0][0]


@pytest.mark.parametrize("arch", ["resnet50", "resnet50d"])
def test_timm(arch):
    timm = pytest.importorskip("timm")
    ref, fused = _pair(lambda: timm.create_model(arch, pretrained=False), "cpu",
                       FUSED[0][1])
    rows = explain(fused)
    kernels = collections.Counter(r["kernel"] for r in rows if r["status"] == "fused")
    assert kernels["dual_batch_norm_add_relu"] == 4 and kernels["batch_norm_add_relu"] == 12
    _check_equivalent(ref, fused, "cpu")


def test_bad_arguments():
    with pytest.raises(ValueError):
        convert(models.NoBN(), backend="nope")
    with pytest.raises(TypeError):
        convert(lambda x: x)


def test_eval_folding_cache_follows_updates():
    ref, fused = _pair(models.TinyResNet, "cpu", "reference_primitives")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1)
    for step in range(3):
        for m in (ref, fused):
            m.eval()
        with torch.no_grad():
            torch.testing.assert_close(fused(x), ref(x), rtol=1e-9, atol=1e-9)
            # the block's conv1-bn1 ran folded, from weights of this step's tensors
            conv, bn = fused.block3.conv1, fused.block3.bn1
            assert fnn._FOLDED[conv][0] == fnn._fold_key(conv, bn)
        for m, opt in ((ref, opt_r), (fused, opt_f)):  # weights and running stats change
            m.train()
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    # eval with autograd on: not folded, still the same function
    ref.eval(), fused.eval()
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-9, atol=1e-9)
    # load_state_dict replaces values in place: the cache notices
    fused.load_state_dict(_randomize(copy.deepcopy(ref)).state_dict())
    ref.load_state_dict(fused.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-9, atol=1e-9)


def test_eval_fold_cache_keeps_no_replaced_storage():
    """``.to()`` replaces every source's storage (``param.data = new``, new buffers): the
    fold cache must not keep the old ones alive (a model moved off a GPU would keep its
    weights there until its next eval run), and the next eval run folds the new values."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    ref, fused = _pair(models.TinyResNet, "cpu", "reference_primitives")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ref.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-9, atol=1e-9)
    conv, bn = fused.block3.conv1, fused.block3.bn1
    assert conv in fnn._FOLDED
    old = [StorageWeakRef(t.untyped_storage()) for t in fnn._fold_sources(conv, bn)
           if t is not None]
    fused.float(), ref.float()
    gc.collect()
    assert all(r.expired() for r in old), [r.expired() for r in old]
    with torch.no_grad():
        torch.testing.assert_close(fused(x.float()), ref(x.float()), rtol=1e-4, atol=1e-4)
    assert fnn._FOLDED[conv][0] == fnn._fold_key(conv, bn)


def test_no_folding_without_running_stats():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=True)
            self.bn = nn.BatchNorm2d(4, track_running_stats=False)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    ref = Block().eval()
    fused = convert(ref, backend="reference_primitives")
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x))
    assert fnn.last_backend() == "reference_primitives"  # batch statistics, not folded


@pytest.mark.parametrize("device,backend", FUSED[:1], ids=ids(FUSED[:1]))
def test_channels_last_and_autocast(device, backend):
    ref, fused = _pair(models.TinyResNet, device, backend, torch.float32)
    x = torch.randn(4, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    ref, fused = ref.to(memory_format=torch.channels_last), fused.to(
        memory_format=torch.channels_last)
    feat = fused.forward_features(x)
    assert feat.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=dtype):
        out_r, out_f = ref(x), fused(x)
    assert out_f.dtype == out_r.dtype
    torch.testing.assert_close(out_f.float(), out_r.float(), rtol=3e-2, atol=3e-2)


@slow
def test_torch_compile():
    ref, fused = _pair(lambda: models.CifarResNet((1, 1, 1)), "cpu", "reference_primitives",
                       torch.float32)
    compiled = torch.compile(fused)
    x = torch.randn(4, 3, 32, 32)
    out_f, out_r = compiled(x), ref(x)
    torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-4)
    out_f.sum().backward()
    out_r.sum().backward()
    for p, q in zip(ref.parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(fused.bn1.running_var, ref.bn1.running_var)


def _saved_bytes(model, x):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, total[0]


@pytest.mark.parametrize("name", ["tiny_resnet", "preact_resnet"])
def test_memory_saving(name):
    torch.manual_seed(0)
    ref = _randomize(MODELS[name]()).double()
    plain = convert(ref, backend=FUSED[0][1])
    saving = convert(ref, backend=FUSED[0][1], memory_saving=True)
    rows = explain(saving)
    assert any("recomputed" in r["pattern"] for r in rows)
    _check_equivalent(ref, saving, "cpu")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    _, b_plain = _saved_bytes(plain.train(), x)
    _, b_saving = _saved_bytes(saving.train(), x)
    assert b_saving < b_plain
    # the recomputation in backward does not update running statistics twice
    out = saving(x)
    before = copy.deepcopy(saving.state_dict())
    out.sum().backward()
    _assert_same_state_dict(before, saving.state_dict())


@pytest.mark.parametrize("backend", ["reference", "cpu", "reference_primitives"])
def test_memory_saving_gradients_every_backend(backend):
    """The recomputation must replay exactly the first call (torch's own BN included)."""
    if backend not in fusedres.available_backends() + ["reference_primitives"]:
        pytest.skip(f"{backend} not available")
    torch.manual_seed(0)
    ref = _randomize(MODELS["tiny_resnet"]()).double()
    saving = convert(ref, backend=backend, memory_saving=True)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ref(x).sum().backward()
    saving(x).sum().backward()
    for (k, p), q in zip(ref.named_parameters(), saving.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=k)


def _assert_same_state_dict(a, b):
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


class _TrainOnlyScale(nn.Module):
    """A forward that differs between train and eval at trace time."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        out = self.bn(self.conv(x))
        if self.training:
            out = out * 0.5
        return torch.relu(out)


def test_training_dependent_forward():
    ref = _TrainOnlyScale().double()
    fused = convert(ref, backend="reference_primitives")
    assert set(fused.forward.sources) == {True, False}
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for training in (True, False, True):
        ref.train(training), fused.train(training)
        torch.testing.assert_close(fused(x), ref(x))
    _assert_same_state(ref, fused)


def test_shared_block_and_fused_modules_inside():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = models.TinyBlock(4, 4, 1)
            self.again = self.block  # the same block at two paths
            self.bnrelu = fnn.BatchNormReLU2d(4)  # its ReLU must not be lost
            self.bn = fnn.BatchNorm2d(4)

        def forward(self, x):
            x = self.again(self.block(x))
            return torch.relu(self.bn(self.bnrelu(x))) - 0.1

    torch.manual_seed(0)
    ref = Net().double()
    fused = convert(ref, backend="reference_primitives")
    rows = {r["site"]: r for r in explain(fused)}
    assert rows["bnrelu"]["status"] == "unfused" and "overrides" in rows["bnrelu"]["reason"]
    assert rows["bn"]["kernel"] == "batch_norm_relu"
    assert fused.again is fused.block
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for training in (True, False):
        ref.train(training), fused.train(training)
        torch.testing.assert_close(fused(x), ref(x))
    _assert_same_state(ref, fused)


# The other torchvision ResNets: same blocks, so every BN must be fused; counts from the
# architecture (stem + 2 or 3 BN-ReLU per block, one tail per block, one dual per stage
# after the first, and the first stage too for bottlenecks).
OTHER = {
    "resnet34": (16, "basic"), "resnet101": (33, "bottleneck"),
    "resnet152": (50, "bottleneck"), "wide_resnet50_2": (16, "bottleneck"),
    "resnext50_32x4d": (16, "bottleneck"),
}


@pytest.mark.parametrize("arch", list(OTHER))
def test_other_torchvision_resnets_fully_fused(arch):
    blocks, kind = OTHER[arch]
    model = getattr(torchvision.models, arch)(weights=None)
    fused = convert(model, inplace=True, backend="reference_primitives")
    kernels = collections.Counter((r["status"], r["kernel"]) for r in explain(fused))
    duals = 3 if kind == "basic" else 4
    per_block = 1 if kind == "basic" else 2
    assert dict(kernels) == {("fused", "batch_norm_relu"): 1 + per_block * blocks,
                             ("fused", "batch_norm_add_relu"): blocks - duals,
                             ("fused", "dual_batch_norm_add_relu"): duals}


@slow
@pytest.mark.parametrize("arch", ["resnext50_32x4d", "wide_resnet50_2", "resnet34"])
def test_other_torchvision_resnets_equivalent(arch):
    ref, fused = _pair(lambda: getattr(torchvision.models, arch)(weights=None), "cpu",
                       FUSED[0][1])
    _check_equivalent(ref, fused, "cpu")


@pytest.mark.skipif("cpu" not in fusedres.available_backends(), reason="fusedres._C not built")
def test_torch_compile_fullgraph_cpu_backend():
    """A converted torchvision block on the compiled cpu backend (C++ ops and autograd)
    compiles as one graph and matches the unconverted block: output, input and parameter
    gradients, running statistics."""
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    block = BasicBlock(8, 8).train()
    ref = copy.deepcopy(block)
    fused = fusedres.convert(block, backend="cpu")
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = compiled(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    for p, q in zip(ref.parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4)
    for name in ("bn1", "bn2"):
        torch.testing.assert_close(getattr(fused, name).running_mean,
                                   getattr(ref, name).running_mean)
        torch.testing.assert_close(getattr(fused, name).running_var,
                                   getattr(ref, name).running_var)


# --------------------------------------------------------------------------------------
# convert and explain never change the model's state (issue 14.0)
# --------------------------------------------------------------------------------------


class StepCounter(nn.Module):
    """A forward that updates a buffer in place in training (as timm's BatchNormAct2d
    updates num_batches_tracked)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.steps.add_(1)
        return torch.relu(self.bn(self.conv(x)))


def _timm(arch):
    timm = pytest.importorskip("timm")
    return lambda: timm.create_model(arch, pretrained=False)


STATE_MODELS = dict(MODELS, step_counter=StepCounter, awkward=models.Awkward,
                    **{f"timm_{a}": _timm(a) for a in ("resnet18", "resnet50", "resnetv2_50",
                                                       "resnetv2_50d", "densenet121")})


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}, \
        [m.training for m in model.modules()]


def _assert_bitwise(before, model):
    state, flags = before
    now = model.state_dict(keep_vars=True)
    assert list(now) == list(state)
    changed = [k for k in state if not torch.equal(now[k], state[k])]
    assert not changed, f"state changed by convert/explain: {changed}"
    assert [m.training for m in model.modules()] == flags


@pytest.mark.parametrize("name", list(STATE_MODELS))
def test_convert_and_explain_leave_state_bitwise_unchanged(name):
    torch.manual_seed(0)
    model = _randomize(STATE_MODELS[name]())
    model.train()
    before = _snapshot(model)
    explain(model)
    _assert_bitwise(before, model)
    copy_ = convert(model, backend="reference_primitives")
    _assert_bitwise(before, model)
    _assert_bitwise(before, copy_)
    explain(copy_)
    _assert_bitwise(before, copy_)
    convert(model, inplace=True, backend="reference_primitives")
    _assert_bitwise(before, model)
    explain(model)
    _assert_bitwise(before, model)


def test_forward_side_effects_kept_not_run_at_conversion():
    """The in-place update is recorded in the converted forward, not run by tracing."""
    m = StepCounter()
    fused = convert(m, backend="reference_primitives")
    assert int(m.steps) == 0 and int(fused.steps) == 0
    assert explain(fused)[0]["status"] == "fused"
    x = torch.randn(2, 3, 5, 5)
    fused(x)
    m(x)
    assert int(fused.steps) == int(m.steps) == 1
    fused.eval()
    fused(x)
    assert int(fused.steps) == 1


# --------------------------------------------------------------------------------------
# eval: every BN that follows a conv folds into it (issue 14.9)
# --------------------------------------------------------------------------------------


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _bn_ops(counter):
    return {k: n for k, n in counter.ops.items() if "batch_norm" in k or "fusedres" in k
            or k.startswith("fusedres")}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("backend", ["auto", "triton", "reference_primitives"])
def test_eval_folds_every_bn(arch, backend):
    """In eval under no_grad no BN runs on its own: each folds into the conv before it,
    whichever path the site takes in training (the next conv of a BN-ReLU -> conv site
    included); outputs equal the unconverted model's."""
    if backend == "triton" and "triton" not in fusedres.available_backends():
        pytest.skip("triton not available")
    torch.manual_seed(0)
    ref = _randomize(getattr(torchvision.models, arch)(weights=None)).double().eval()
    fused = convert(ref, backend=backend)
    assert {r["eval"] for r in explain(fused)} == {"folded"}
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want = ref(x)
        fused(x)  # builds the folded weights
        with _OpCounter() as counter:
            got = fused(x)
    assert _bn_ops(counter) == {}, _bn_ops(counter)
    assert counter.ops["aten.convolution"] == sum(
        isinstance(m, nn.Conv2d) for m in ref.modules())
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_eval_fp32_cpu_rides_on_the_convs(layout):
    """fp32 CPU eval of a converted resnet50: the ReLUs and projection adds are oneDNN
    post-ops of the folded convs (the next site's ReLU too, next_relu), the identity
    add+ReLU one in-place pass: 53 convs, 12 add+ReLU, no BN or ReLU op; outputs equal the
    unconverted model's. With oneDNN turned off: plain convs and in-place ops, same
    output."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    torch.manual_seed(0)
    ref = _randomize(torchvision.models.resnet50(weights=None)).eval()
    fused = convert(ref)
    x = torch.randn(2, 3, 64, 64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = ref(x)
        fused(x)
        with _OpCounter() as counter:
            got = fused(x)
        with torch.backends.mkldnn.flags(enabled=False):
            plain = fused(x)
    ops = counter.ops
    assert ops["mkldnn._convolution_pointwise"] == 53, ops
    assert ops["aten._add_relu_"] == 12, ops
    assert not any("relu" in k and k != "aten._add_relu_" or "batch_norm" in k
                   or "convolution" in k and "mkldnn" not in k for k in ops), ops
    scale = want.abs().max()
    torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=2e-5)
    torch.testing.assert_close(plain / scale, want / scale, rtol=0, atol=2e-5)


def test_eval_fold_handoff_respects_plans():
    """A BN folded into the previous site's conv is not applied twice, and a plan that
    turns folding off at that BN keeps it separate (still the same function)."""
    torch.manual_seed(0)
    ref = _randomize(torchvision.models.resnet50(weights=None)).double().eval()
    fused = convert(ref, backend="reference_primitives")
    fused.layer1[0].bn2.fusedres_plan = fnn.SitePlan(fold=False)  # bn2-relu-conv3 site
    fused.layer1[0].bn3.fusedres_plan = fnn.SitePlan(fold=False)  # dual's shortcut BN
    fused.layer2[0].bn1.fusedres_plan = fnn.SitePlan(backend="torch")
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-9, atol=1e-9)
        with _OpCounter() as counter:
            fused(x)
    assert sum(_bn_ops(counter).values()) >= 2  # the three BNs that may not fold
    rows = {r["site"]: r for r in explain(fused)}
    assert rows["layer1.0.bn2"]["eval"] == "running stats"
    assert rows["layer2.0.bn1"]["kernel"] == "torch"


# --------------------------------------------------------------------------------------
# the untuned default on CUDA: every conv in cuDNN (issue 13.1)
# --------------------------------------------------------------------------------------


def _triton_conv_calls(monkeypatch):
    from fusedres import conv as fconv

    calls = []
    for name in ("conv2d_bias_add_relu", "conv2d_stats"):
        orig = getattr(fconv, name)
        monkeypatch.setattr(fconv, name, lambda *a, _o=orig, _n=name, **k: calls.append(_n)
                            or _o(*a, **k))
    return calls


@pytest.mark.skipif(not fusedres._backend.has_triton(), reason="triton not installed")
def test_untuned_cuda_default_never_picks_the_triton_conv(monkeypatch):
    """resnet50 on (fake) CUDA tensors: converted with backend="auto", no site runs the
    Triton conv and explain says F.conv2d; with backend="triton", or a plan naming it at
    one site, the Triton conv runs there."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = _triton_conv_calls(monkeypatch)
    with FakeTensorMode(), torch.device("cuda"):
        model = torchvision.models.resnet50(weights=None)
        fused = convert(model, inplace=True)
        rows = explain(fused)
        assert {r["conv"] for r in rows} == {"conv2d", ""}
        assert not any(r["kernel"] == "bn_relu_prologue" for r in rows)
        assert all("untuned default is F.conv2d" in r["reason"] for r in rows
                   if r["pattern"].endswith("-conv"))
        x = torch.randn(2, 3, 64, 64)
        fused(x)
        assert calls == []
        fused.layer1[0].bn1.fusedres_plan = fnn.SitePlan(conv="triton")
        assert explain(fused)[1]["conv"] == "triton stats+prologue"
        fused(x)
        assert calls == ["conv2d_stats", "conv2d_bias_add_relu"]
        del calls[:]
        triton = convert(torchvision.models.resnet50(weights=None), inplace=True,
                         backend="triton")
        assert sum(r["kernel"] == "bn_relu_prologue" for r in explain(triton)) == 32
        triton(x)
        assert calls.count("conv2d_bias_add_relu") == 32


# --------------------------------------------------------------------------------------
# explain reads at a glance (issue 14.11)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("build,backend", [
    (lambda: torchvision.models.resnet50(weights=None), "auto"),
    (lambda: torchvision.models.densenet121(weights=None), "auto"),
    (lambda: torchvision.models.densenet121(weights=None), "reference"),
    (models.Awkward, "reference_primitives"),
], ids=["resnet50", "densenet121", "densenet121-reference", "awkward"])
def test_explain_table_fits_and_groups_reasons(build, backend):
    model = build()
    for m in (model, convert(model, backend=backend)):
        rows = explain(m)
        table = str(rows)
        lines = table.splitlines()
        assert max(map(len, lines)) <= 100, max(lines, key=len)
        assert len(lines) <= len(rows) + 2 + 3 * len(rows.notes())
        for reason, sites in rows.notes():  # each distinct reason once
            assert sum(reason[:40] in line for line in lines) == 1, reason
            assert sites == [r["site"] for r in rows if r["reason"] == reason]
        statuses = collections.Counter(r["status"] for r in rows)
        summary = lines[-1]
        if m is model and statuses["fusable"]:
            assert "fused" not in summary.split(",")[0] and \
                f"{statuses['fusable']} fusable" in summary
        else:
            assert summary.startswith(f"{statuses['fused']} sites fused")
        assert f"{statuses['unfused']} BNs left unfused" in summary


def test_explain_resnet50_one_note_for_the_conv_choice():
    rows = explain(convert(torchvision.models.resnet50(weights=None)))
    notes = rows.notes()
    assert len(notes) == 1 and len(notes[0][1]) == 32
    assert "interpreter" not in notes[0][0] and len(notes[0][0]) < 200


def test_explain_tuned_detail_on_its_own_lines():
    """fusedres.tune's per-site detail (times, failed candidates) goes under the row, one
    failed candidate a line, so rows stay within 100 columns and errors stay searchable."""
    from fusedres.convert import Explanation

    rows = explain(convert(models.TinyResNet(), backend="reference_primitives"))
    failure = "reference FAILED: output: relative L2 error 0.5 > tolerance 0.0001"
    tuned = Explanation(dict(r, tuned=f"cpu (cpu 1.2 ms, torch 1.3 ms) {failure} "
                                      f"triton-conv FAILED: some error") for r in rows)
    lines = str(tuned).splitlines()
    assert max(map(len, lines)) <= 100
    assert sum(failure in line for line in lines) == len(rows)
    assert sum(line.strip() == "triton-conv FAILED: some error" for line in lines) == len(rows)


# --------------------------------------------------------------------------------------
# timm's BatchNormAct2d: BN + ReLU (or no activation) in one module (issue 23)
# --------------------------------------------------------------------------------------

def _bn_count(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_timm_features_and_feature_extraction():
    """timm's forward_features / forward_head and features_only models keep working on a
    converted ResNet-v2 and DenseNet (fused), with the original's values."""
    timm = pytest.importorskip("timm")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for arch in ("resnetv2_50", "densenet121"):
        torch.manual_seed(0)
        ref = _randomize(timm.create_model(arch, pretrained=False, num_classes=10)).double()
        fused = convert(ref).eval()
        ref.eval()
        with torch.no_grad():
            feats = fused.forward_features(x)
            torch.testing.assert_close(feats, ref.forward_features(x))
            torch.testing.assert_close(fused.forward_head(feats), ref(x))
            torch.testing.assert_close(fused.forward_head(feats, pre_logits=True),
                                       ref.forward_head(ref.forward_features(x), True))
        torch.manual_seed(0)
        ref = _randomize(timm.create_model(arch, pretrained=False, features_only=True,
                                           out_indices=(1, 2, 3))).double()
        fused = convert(ref)
        assert len(explain(fused).fused()) >= 0.8 * _bn_count(ref), str(explain(fused))
        for training in (True, False):
            ref.train(training), fused.train(training)
            outs_r, outs_f = ref(x), fused(x)
            assert len(outs_f) == len(outs_r) == 3
            for a, b in zip(outs_f, outs_r):
                torch.testing.assert_close(a, b)


def _norm_act(**kwargs):
    timm = pytest.importorskip("timm")
    return timm.layers.BatchNormAct2d(4, **kwargs)


class _NormActBlock(nn.Module):
    """conv -> BatchNormAct2d -> conv -> BatchNormAct2d (no act) -> + x, then a norm-only
    BatchNormAct2d that has nothing to fuse (no conv before it)."""

    def __init__(self, norm1, norm2=None, norm3=None):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, 1, 1, bias=False)
        self.norm1 = norm1
        self.conv2 = nn.Conv2d(4, 4, 3, 1, 1, bias=False)
        self.norm2 = norm2 if norm2 is not None else _norm_act(apply_act=False)
        self.norm3 = norm3 if norm3 is not None else _norm_act(apply_act=False)

    def forward(self, x):
        out = self.norm2(self.conv2(self.norm1(self.conv1(x)))) + x
        return self.norm3(out * 2)


def _sub_norm_act(overrides):
    timm = pytest.importorskip("timm")

    class Keeps(timm.layers.BatchNormAct2d):
        """A subclass with its own method, BatchNormAct2d.forward kept."""

        def describe(self):
            return "keeps"

    class Overrides(timm.layers.BatchNormAct2d):
        def forward(self, x):
            return super().forward(x) * 0.5

    return (Overrides if overrides else Keeps)(4)


def _drop_block():
    timm = pytest.importorskip("timm")
    return timm.layers.DropBlock2d(0.5, 3)


@pytest.mark.parametrize("case,train_reason,eval_reason", [
    ("relu", None, None),
    ("identity", None, None),
    ("subclass", None, None),
    ("gelu", "only ReLU or none fuse", "only ReLU or none fuse"),
    ("drop_block", "drop layer DropBlock2d is active in training", None),
    ("overrides", "overrides BatchNormAct2d.forward", "overrides BatchNormAct2d.forward"),
])
def test_timm_norm_act_what_fuses(case, train_reason, eval_reason):
    """BatchNormAct2d fuses with a ReLU or no activation and no active drop layer (a
    subclass keeping its forward too); a GELU, an active drop (DropBlock2d in training),
    an overridden forward stay one unfused module call with the reason in explain. The
    converted block computes the original's outputs, gradients and running statistics in
    both modes, the norm-only BatchNormAct2d left unfused included."""
    norm1 = {"relu": lambda: _norm_act(), "identity": lambda: _norm_act(apply_act=False),
             "subclass": lambda: _sub_norm_act(False),
             "gelu": lambda: _norm_act(act_layer=nn.GELU),
             "drop_block": lambda: _norm_act(drop_layer=_drop_block),
             "overrides": lambda: _sub_norm_act(True)}[case]()
    torch.manual_seed(0)
    ref = _randomize(_NormActBlock(norm1)).double()
    before = _snapshot(ref)
    fused = convert(ref)
    _assert_bitwise(before, ref)
    for training, reason in ((True, train_reason), (False, eval_reason)):
        ref.train(training), fused.train(training)
        rows = {r["site"]: r for r in explain(fused) if
                (r.get("reason") or "").endswith("(eval-mode trace)") == (
                    not training and train_reason != eval_reason)}
        if reason is None:
            assert rows["norm1"]["status"] == "fused", rows["norm1"]
            assert rows["norm1"]["kernel"] == ("batch_norm" if case == "identity"
                                               else "batch_norm_relu"), rows["norm1"]
        else:
            assert rows["norm1"]["status"] == "unfused" and reason in rows["norm1"]["reason"]
        # norm2 (no act) is conv-bn, or, when norm1's site claims conv2, nothing to fuse;
        # norm3 (no act, no conv before): its BN part alone, unfused, in a converted block
        assert rows["norm2"]["status"] == "fused" or "nothing to fuse" in rows["norm2"]["reason"]
        assert rows["norm3"]["status"] == "unfused" and "nothing to fuse" in \
            rows["norm3"]["reason"]
        x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(5)
        out_r = ref(xr)
        torch.manual_seed(5)  # the same drop mask
        out_f = fused(xf)
        torch.testing.assert_close(out_f, out_r)
        out_r.sum().backward()
        out_f.sum().backward()
        torch.testing.assert_close(xf.grad, xr.grad)
        _assert_same_state(ref, fused)


def test_timm_preact_sites_same_as_hand_written():
    """A pre-activation ResNet built from timm's BatchNormAct2d gets the fused sites (and,
    on the Triton conv path, the BN-ReLU prologue paths) the hand-written one gets, with the
    same results."""
    pytest.importorskip("timm")
    for backend in ("auto", "triton"):
        torch.manual_seed(0)
        hand = explain(convert(models.PreActResNet(), backend=backend))
        torch.manual_seed(0)
        ref = models.NormActPreActResNet()
        timm_rows = explain(convert(ref, backend=backend))
        key = lambda r: (r["site"], r["status"], r["pattern"], r["kernel"], r["conv"],  # noqa
                         r["eval"])
        assert [key(r) for r in timm_rows] == [key(r) for r in hand], str(timm_rows)
        if backend == "triton":
            assert sum(r["kernel"] == "bn_relu_prologue" for r in timm_rows) == \
                NEXT_SITES["preact_resnet"]
    ref, fused = _pair(models.NormActPreActResNet, "cpu", FUSED[0][1])
    _check_equivalent(ref, fused, "cpu", backend=FUSED[0][1])


def test_timm_norm_act_sync_bn_refuses_an_unfused_one(tmp_path):
    """sync_bn=True: a BatchNormAct2d left unfused would run its own forward with local
    statistics, silently: convert raises and names it; fused ones synchronise."""
    import torch.distributed as dist

    pytest.importorskip("timm")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised here")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        with pytest.raises(ValueError, match="norm1.*convert_sync_batchnorm"):
            convert(_NormActBlock(_norm_act(act_layer=nn.GELU)), sync_bn=True)
        fused = convert(_NormActBlock(_norm_act()), sync_bn=True)
        assert fnn.process_group_of(fused.norm1) is dist.group.WORLD
    finally:
        dist.destroy_process_group()

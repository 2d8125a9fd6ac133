"""Code that only a GPU runs, driven on CPU (docs/coverage.md lists what CI leaves out).

On a GPU the Triton conv launchers autotune: Triton's ``Autotuner`` prunes the union of
the tiles with ``_conv_prune`` / ``_wgrad_prune``, runs each offered config's
``pre_hook`` (``_tma_blocks``: the TMA descriptors' boxes) and times it, then runs the
winner, and the launcher reads ``best_config`` back to size and merge its per-tile
statistics. Under the interpreter none of that runs (one fixed 32x32x16 tile, no
autotuner), and deterministic mode pins the first config. Here the real ``Autotuner`` of
the installed Triton wraps the interpreted kernels with the module switched to its GPU
branch (``INTERPRET`` False: the sm_90 config lists, TMA as on sm_90, or sm_80's lists
without TMA), and its benchmark is replaced by one that runs each config in the
interpreter, checks that config's output against float64, and makes the launcher's
last config win (its first is what deterministic mode and the other tests run).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fusedres  # noqa: E402,F401
from fusedres import conv as fconv  # noqa: E402

pytest.importorskip("triton")
# the kernels on CPU tensors: the interpreter (a GPU runs the real launch path)
interpreted = pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernels in "
                                 "Triton's interpreter; a GPU runs the real launch path")

K = fconv.kernels()
CL = torch.channels_last
DT = torch.float16  # 16-bit: the GPU's bf16 config lists (the interpreter has no bf16 dot)


@pytest.fixture
def gpu(monkeypatch):
    """``kernels.conv`` on its GPU branch, its kernels still interpreted: ``gpu(check,
    arch, triton_version)`` sets the device (``"sm_90"``: TMA, wgmma, 160 KB of
    pipeline; ``"sm_80"``: neither, an A100's 99 KB of pipeline), the Triton version the
    lists are pruned for, and ``check(nargs)``, run after each timed config on Triton's
    full arguments; it returns the record of each launch: ``offered`` (the launcher's
    list), ``hooks`` (every config whose pre_hook ran, in order: the timed ones, then
    the winner before its launch), ``timed`` (configs timed), ``kwargs`` (the
    launcher's constexprs) and ``chosen`` (what the launcher read back)."""
    if K.TensorDescriptor is None:
        pytest.skip("this triton has no host TMA descriptors")
    from triton.runtime.autotuner import Autotuner

    def setup(check, arch="sm_90", triton_version=None):
        record = {"hooks": [], "timed": 0}
        real_tma_ok = K._tma_ok

        def tma_ok(t):  # _tma_ok's dtype and alignment tests; the device is an sm_90
            with monkeypatch.context() as m:
                m.setattr(K, "INTERPRET", True)
                return real_tma_ok(t)

        def empty(*args, **kwargs):  # as a GPU's caching allocator: old data, not zeros
            t = real_empty(*args, **kwargs)
            return t.fill_(1e4) if t.is_floating_point() and t.numel() else t

        real_empty = torch.empty
        monkeypatch.setattr(torch, "empty", empty)
        monkeypatch.setattr(K, "INTERPRET", False)
        monkeypatch.setattr(K, "_sm_count", lambda index: 4)
        monkeypatch.setenv("FUSEDRES_CACHE", "0")
        if triton_version is not None:
            monkeypatch.setattr(K, "TRITON_VERSION", triton_version)
        if arch == "sm_90":
            monkeypatch.setattr(K, "_tma_ok", tma_ok)
        else:
            monkeypatch.setattr(K, "_tma_ok", lambda t: False)
            monkeypatch.setattr(K, "_wgmma_ok", lambda device: False)
            monkeypatch.setattr(K, "smem_budget", lambda device=None: 99 * 1024)

        def recorded(pre_hook):
            def hook(nargs):  # Triton's full nargs: arguments, constexprs, the config
                record["hooks"].append((_tile(nargs), nargs))
                pre_hook(nargs)
            return hook

        def bench(kernel_call, quantiles):
            kernel_call()  # the config's pre_hook, then the kernel, in the interpreter
            check(record["hooks"][-1][1])
            record["timed"] += 1
            # the launcher's last config wins (deterministic mode runs its first)
            return [1.0 if record["hooks"][-1][0] == record["offered"][-1] else 2.0] * 3

        def tuner(kernel, configs, key, prune):
            run = K.autotune(configs=configs, key=key, do_bench=bench,
                             prune_configs_by={"early_config_prune": prune})(kernel)
            assert isinstance(run, Autotuner)
            return run

        monkeypatch.setattr(K, "_conv_run", tuner(
            K._conv_kernel, K._configs(K._union(K._CONV_TILES),
                                       pre_hook=recorded(K._tma_blocks)),
            K._CONV_KEY, K._conv_prune))
        monkeypatch.setattr(K, "_wgrad_run", tuner(
            K._conv_wgrad_kernel, K._wgrad_union(recorded(K._wgrad_tma_blocks)),
            K._WGRAD_KEY, K._wgrad_prune))
        launch = K._launch

        def spy(run, configs, grid, args, kwargs):
            record.update(offered=[_tile(c) for c in configs], kwargs=kwargs)
            record["chosen"] = launch(run, configs, grid, args, kwargs)
            return record["chosen"]

        monkeypatch.setattr(K, "_launch", spy)
        return record

    return setup


def _tile(c):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of a Config or of Triton's full nargs."""
    kw = c if isinstance(c, dict) else {**c.kwargs, "num_warps": c.num_warps,
                                         "num_stages": c.num_stages}
    return tuple(kw[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _cl(t):
    """``t`` rounded to the operand dtype, channels_last (4-D), as the kernels take it."""
    t = t.to(DT)
    return t.contiguous(memory_format=CL) if t.dim() == 4 else t


def _bn_relu(x, scale, shift):
    """The prologue's operand: relu(x*scale + shift) in fp32, rounded once to x's dtype."""
    view = (1, -1, 1, 1)
    return torch.relu(x.float() * scale.view(view) + shift.view(view)).to(x.dtype)


def _close(got, ref, rel):
    torch.testing.assert_close(got.double(), ref, rtol=rel, atol=rel * ref.abs().max().item())


def _autotuned_twice(record, launch, a_tma):
    """``launch()`` twice: the first call times exactly the launcher's list (its prune
    agrees with it; a list of one is not timed), each config's pre_hook before its run,
    then runs the winner (the list's last), which the launcher reads back; the second
    (the key tuned: Triton's cached choice, nothing timed, the workspaces not written by
    the other configs first, a GPU's steady state) runs the winner alone. Returns the
    second call's outputs."""
    launch()
    offered = record["offered"]
    tiles = [tile for tile, _ in record["hooks"]]
    timed = len(offered) if len(offered) > 1 else 0
    assert sorted(tiles[:-1]) == sorted(offered[:timed]) and record["timed"] == timed, (
        tiles, offered)
    assert tiles[-1] == offered[-1]
    assert tuple(record["chosen"][k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) == \
        offered[-1][:3]
    got_tma = record["kwargs"].get("A_TMA", record["kwargs"].get("TMA"))
    assert got_tma == a_tma, record["kwargs"]
    record["hooks"].clear()
    out = launch()
    assert [tile for tile, _ in record["hooks"]] == offered[-1:] and record["timed"] == timed
    return out


# (name, N, C_in, H=W, C_out, kernel, stride, padding, BN-ReLU prologue, statistics, device,
#  Triton version the lists are for (None: the installed one), A_TMA expected)
FWD_CASES = [
    # the 1x1 TMA GEMM, persistent and flattened: 128x128 and 128x256, 4 tiles, 3 programs
    ("1x1s1_gemm", 4, 64, 8, 256, 1, 1, 0, False, False, "sm_90", None, 1),
    # boxes of x per tap, statistics: 128x128 and 128x64 (C_out 64)
    ("3x3s1_stats", 2, 64, 6, 64, 3, 1, 1, False, True, "sm_90", None, 2),
    # the prologue's 128-row and 256-row tiles (Triton >= 3.7): one image, so the
    # 256-row winner's GEMM_M holds empty boxes past the batch
    ("3x3s1_prologue", 1, 64, 8, 128, 3, 1, 1, True, True, "sm_90", (3, 8), 2),
    # the stride-2 view's boxes with the prologue (128-row tiles only)
    ("3x3s2_prologue", 2, 64, 8, 64, 3, 2, 1, True, True, "sm_90", None, 3),
    # sm_80: no TMA, no wgmma (the prologue takes the 8-warp list), 99 KB of pipeline
    ("3x3s1_prologue_sm80", 2, 64, 6, 64, 3, 1, 1, True, True, "sm_80", None, 0),
    # the stem (C_in 3: the flattened (r, s, c) loop, pointers): 128x64 and 64x64
    ("7x7s2_stem", 2, 3, 16, 64, 7, 2, 3, False, True, "sm_90", None, 0),
]


@interpreted
@pytest.mark.parametrize("case", FWD_CASES, ids=[c[0] for c in FWD_CASES])
def test_forward_autotunes_every_offered_config(gpu, case):
    """conv_fwd through Triton's Autotuner with the GPU's config lists: every offered
    config's y is right (against float64 of the rounded operands), the launcher's last wins,
    and y and the statistics merged with its BLOCK_M are right."""
    _, n, ci, h, co, k, st, pd, prologue, stats, arch, version, a_tma = case
    x = _cl(_rand(n, ci, h, h, seed=1))
    w = _cl(_rand(co, ci, k, k, seed=2) / (ci * k * k) ** 0.5)
    scale = shift = None
    a = x
    if prologue:
        scale = (torch.rand(ci, generator=torch.Generator().manual_seed(3)) + 0.5).float()
        scale[::2] *= -1
        shift = _rand(ci, seed=4).float() * 0.3
        a = _bn_relu(x, scale, shift)
    ref = F.conv2d(a.double(), w.double(), None, st, pd)
    record = gpu(lambda nargs: _close(nargs["Y_ptr"], ref, 2e-3), arch, version)
    y, mean, var = _autotuned_twice(record, lambda: K.conv_fwd(
        x, w, st, pd, scale=scale, shift=shift, stats=stats), a_tma)
    assert record["kwargs"]["Y_TMA"] == min(a_tma, 2)
    assert record["kwargs"]["FLATTEN"] == (a_tma == 1)
    _close(y, ref, 2e-3)
    if stats:
        v, m = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
        torch.testing.assert_close(mean.double(), m, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var.double(), v, rtol=1e-5, atol=1e-5)


# (name, N, C_in, H=W, C_out, kernel, stride, padding, dBN prologue + dReLU epilogue, device,
#  Triton version, A_TMA expected)
DGRAD_CASES = [
    # Triton 3.6 (the GPU image's) offers the wide-K tile (BLOCK_K 128, C_out % 128 == 0)
    # beside 128x128 and 128x64; boxes of each stride-2 phase
    ("3x3s2_dbn_drelu", 2, 64, 8, 128, 3, 2, 1, True, "sm_90", (3, 6), 2),
    ("3x3s1_plain", 2, 256, 6, 64, 3, 1, 1, False, "sm_90", None, 2),  # 128x128, 128x256
    ("3x3s2_dbn_drelu_sm80", 2, 64, 7, 128, 3, 2, 1, True, "sm_80", (3, 6), 0),
    # C_out 64, one K tile in every config: the dBN coefficients loaded once (PCOEF_ONCE),
    # by boxes (128x128 and 128x64) and through pointers (sm_80)
    ("3x3s1_dbn_drelu_co64", 2, 64, 6, 64, 3, 1, 1, True, "sm_90", None, 2),
    ("3x3s1_dbn_drelu_co64_sm80", 2, 64, 6, 64, 3, 1, 1, True, "sm_80", None, 0),
    # the dBN prologue alone (conv1 in "fused" dbn mode): 128x128 at 4 warps, 128x64
    ("1x1s1_dbn_co64", 2, 256, 6, 64, 1, 1, 0, "dbn", "sm_90", None, 2),
]


@interpreted
@pytest.mark.parametrize("case", DGRAD_CASES, ids=[c[0] for c in DGRAD_CASES])
def test_dgrad_autotunes_every_offered_config(gpu, case):
    """conv_dgrad (with the dBN prologue and the dReLU epilogue, or plain) through the
    Autotuner: every offered config's dx is right, the last wins, and dx, sum(g) and
    sum(g*y_prev) (rows sized by the launcher's list, read with the winner's BLOCK_M)
    are right."""
    _, n, ci, h, co, k, st, pd, fused, arch, version, a_tma = case
    p = (h + 2 * pd - k) // st + 1
    dy, y = _cl(_rand(n, co, p, p, seed=5)), _cl(_rand(n, co, p, p, seed=6))
    w = _cl(_rand(co, ci, k, k, seed=7) / (co * k * k) ** 0.5)
    y_prev = _cl(_rand(n, ci, h, h, seed=8))
    cy, cc = _rand(co, seed=9).float() * 0.1, _rand(co, seed=10).float() * 0.1
    scale, shift = _rand(ci, seed=11).float(), _rand(ci, seed=12).float() * 0.3
    view = (1, -1, 1, 1)
    total = dy.double()
    if fused:  # the dBN prologue's operand, dy + y*coef_y (fp32, one rounding)
        total = (dy.float() + y.float() * cy.view(view)).to(DT).double() + cc.double().view(view)
    da = torch.nn.grad.conv2d_input((n, ci, h, h), w.double(), total, st, pd)
    gate = (y_prev.float() * scale.view(view) + shift.view(view)) > 0
    g = torch.where(gate, da, torch.zeros_like(da))
    ref = g * scale.double().view(view) if fused is True else da

    def check(nargs):  # PCOEF_ONCE: the K tile is all of C_out in the config that ran
        assert not nargs["PCOEF_ONCE"] or nargs["BLOCK_K"] == nargs["CI"], _tile(nargs)
        _close(nargs["Y_ptr"], ref, 4e-3)

    record = gpu(check, arch, version)
    kw = dict(y=y, coef_y=cy, coef_c=cc) if fused else {}
    if fused is True:
        kw.update(y_prev=y_prev, scale=scale, shift=shift)
    out = _autotuned_twice(record, lambda: K.conv_dgrad(dy, w, (h, h), st, pd, **kw), a_tma)
    assert record["kwargs"]["PCOEF_ONCE"] == (bool(fused) and co == 64), record["offered"]
    dx, sum_g, sum_gy = out
    _close(dx, ref, 4e-3)
    if fused == "dbn":  # the 128x128x64 tile at 4 warps, not 8 (``_dbn_tiles``)
        assert {t[:4] for t in record["offered"]} == {(128, 128, 64, 4), (128, 64, 64, 4)}
    if fused is True:
        _close(sum_g, g.sum((0, 2, 3)), 4e-3)
        _close(sum_gy, (g * y_prev.double()).sum((0, 2, 3)), 4e-3)


# (name, N, C_in, H=W, C_out, kernel, stride, padding, prologues (False, "dbn", "bn_relu",
#  "both"), device, TMA expected)
WGRAD_CASES = [
    ("3x3s1", 2, 256, 6, 128, 3, 1, 1, False, "sm_90", 2),  # 128x128 and 128x256
    ("3x3s2_sm80", 2, 256, 8, 128, 3, 2, 1, False, "sm_80", 0),  # the same, fewer stages
    ("1x1s2", 2, 256, 8, 128, 1, 2, 0, False, "sm_90", 3),  # the stride-2 view of x
    # one config each: 64x64, 64x128, 128x64 (by C_out and C_in), the stem's two
    ("3x3s1_co64", 2, 64, 6, 64, 3, 1, 1, False, "sm_90", 2),
    ("1x1s1_co64_ci128", 2, 128, 6, 64, 1, 1, 0, False, "sm_90", 2),
    ("3x3s2_ci64", 2, 64, 8, 128, 3, 2, 1, False, "sm_90", 3),
    ("stem7x7s2", 2, 3, 12, 64, 7, 2, 3, False, "sm_90", 0),  # flat N tiles (C_in 3)
    ("stem7x7s2_co128", 2, 3, 12, 128, 7, 2, 3, False, "sm_90", 0),
    # dy + y*coef_y + coef_c and relu(x*scale + shift) recomputed while loading
    ("3x3s1_dbn_prologue", 2, 128, 6, 128, 3, 1, 1, "both", "sm_90", 2),
    # the prologues' 256-wide tiles: dBN (dy' as wgmma's B, SWAP_AB) 128x256 at C_in 256,
    # alone and with BN-ReLU; BN-ReLU alone 256x128 at C_out 256
    ("3x3s1_dbn_ci256", 2, 256, 6, 128, 3, 1, 1, "dbn", "sm_90", 2),
    # dBN alone at C_out = C_in = 64: 256 pixels a K step, dy' as A (``_WGRAD_DBN_64``;
    # in fp16, DT here, dy' is masked past the output on every path); sm_80: 64 pixels
    ("1x1s1_dbn_64", 2, 64, 6, 64, 1, 1, 0, "dbn", "sm_90", 2),
    ("3x3s1_dbn_64", 2, 64, 6, 64, 3, 1, 1, "dbn", "sm_90", 2),
    ("1x1s1_dbn_64_sm80", 2, 64, 6, 64, 1, 1, 0, "dbn", "sm_80", 0),
    ("3x3s1_both_ci256", 2, 256, 6, 128, 3, 1, 1, "both", "sm_90", 2),
    ("1x1s1_bn_relu_co256", 2, 128, 6, 256, 1, 1, 0, "bn_relu", "sm_90", 2),
    # BN-ReLU alone at C_out 128: the 4-warp 128x64 tile at any C_in
    ("3x3s2_bn_relu_co128", 2, 128, 8, 128, 3, 2, 1, "bn_relu", "sm_90", 3),
]


@interpreted
@pytest.mark.parametrize("case", WGRAD_CASES, ids=[c[0] for c in WGRAD_CASES])
def test_wgrad_autotunes_every_offered_config(gpu, case):
    """conv_wgrad through the Autotuner: every offered config's split partials sum to dw
    (one pixel box for all: BLOCK_K is the launcher's), the last wins, dw is right."""
    _, n, ci, h, co, k, st, pd, fused, arch, tma = case
    p = (h + 2 * pd - k) // st + 1
    dy, x = _cl(_rand(n, co, p, p, seed=13)), _cl(_rand(n, ci, h, h, seed=14))
    total, a, kw = dy.double(), x.double(), {}
    if fused in ("dbn", "both"):  # dy + y*coef_y + coef_c
        y = _cl(_rand(n, co, p, p, seed=15))
        cy, cc = _rand(co, seed=16).float() * 0.1, _rand(co, seed=17).float() * 0.1
        view = (1, -1, 1, 1)
        total = total + y.double() * cy.double().view(view) + cc.double().view(view)
        kw.update(y=y, coef_y=cy, coef_c=cc)
    if fused in ("bn_relu", "both"):  # relu(x*scale + shift) recomputed
        scale, shift = _rand(ci, seed=18).float(), _rand(ci, seed=19).float() * 0.3
        a = _bn_relu(x, scale, shift).double()
        kw.update(scale=scale, shift=shift)
    ref = torch.nn.grad.conv2d_weight(a, (co, ci, k, k), total, st, pd)

    swaps = set()

    def check(nargs):  # [splits, C_out, R*S*C_in] partials, summed as the launcher does
        dw = nargs["DW_ptr"].sum(0).view(co, k, k, ci).permute(0, 3, 1, 2)
        _close(dw, ref, 4e-3)
        # the MMA's orientation (``_wgrad_swap``): dy' as B with the dBN prologue (as A in
        # its 64x64 256-pixel tile); x' as A with the BN-ReLU one alone where BLOCK_N >=
        # BLOCK_M, its padding NaN-filled
        m, n = nargs["BLOCK_M"], nargs["BLOCK_N"]
        swap = DT != torch.float32 and bool(fused) and (fused != "bn_relu" or n >= m) and (
            m, n, nargs["BLOCK_K"]) != K._WGRAD_DBN_64[:3]
        assert nargs["SWAP_AB"] == swap, (m, n, fused)
        if tma:
            assert nargs["X_desc"].padding == ("nan" if swap and fused != "dbn" else "zero")
        swaps.add(nargs["SWAP_AB"])

    record = gpu(check, arch)
    dw = _autotuned_twice(record, lambda: K.conv_wgrad(dy, x, (co, ci, k, k), st, pd, **kw),
                          tma)
    _close(dw, ref, 4e-3)
    wide = {"dbn": (128, 256), "both": (128, 256), "bn_relu": (256, 128)}.get(fused)
    if wide and "256" in case[0]:  # the prologue's 256-wide tile is offered, and ran
        assert wide in {t[:2] for t in record["offered"]}, record["offered"]
    if fused == "bn_relu":  # and its 4-warp 128x64 one, B's columns over 128 MMA rows
        assert (128, 64, 64, 4) in {t[:4] for t in record["offered"]}, record["offered"]
    if fused in ("dbn", "both") and ci >= 256:  # the dBN prologue's 128x256 tile, not
        # 128x128 (``_wgrad_fits``)
        assert (128, 128) not in {t[:2] for t in record["offered"]}, record["offered"]
    if fused == "bn_relu":  # both orientations were timed and checked
        assert swaps == {0, 1}, record["offered"]
    if fused == "dbn" and ci == co == 64:  # the 256-pixel tile where 2 stages of it fit
        assert [t[:3] for t in record["offered"]] == (
            [K._WGRAD_DBN_64[:3]] if arch == "sm_90" else [(64, 64, 64)]), record["offered"]


# --------------------------------------------------------------------------------------
# The BN kernels with each of the GPU's configs
# --------------------------------------------------------------------------------------


def _bn_reference(x, w, b, x2, w2, b2, dout, eps):
    """relu(bn(x) + bn2(x2)) in float64 with batch statistics: the output, each BN's
    (mean, biased var) and the gradients of x, w, b, x2, w2, b2."""
    leaves = [t.double().requires_grad_() for t in (x, w, b, x2, w2, b2)]
    x, w, b, x2, w2, b2 = leaves
    view = (1, -1, 1)

    def norm(t, weight, bias):
        var, mean = torch.var_mean(t, dim=(0, 2), correction=0)
        return ((t - mean.view(view)) * torch.rsqrt(var.view(view) + eps) * weight.view(view)
                + bias.view(view)), mean, var

    y, mean, var = norm(x, w, b)
    y2, mean2, var2 = norm(x2, w2, b2)
    out = torch.relu(y + y2)
    grads = torch.autograd.grad(out, leaves, dout.double())
    return out.detach(), (mean, var, mean2, var2), grads


@interpreted
@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
@pytest.mark.parametrize("pick", range(6))
def test_bn_kernels_run_each_gpu_config(monkeypatch, pick, channels_last):
    """The BN kernels run in CI with the interpreter's fixed configs only; a GPU
    autotunes over ``_elementwise_configs`` (4), ``_reduce_configs`` (6) and
    ``_merge_configs`` (3), with the GPU's reduction plan (``_plan_chunks``) and
    finalize tile (``_finalize_block_p``). Here ``bn`` is on its GPU branch, its kernels
    wrapped in Triton's real Autotuner pruned to config ``pick`` of each family (modulo
    its size): the dual BN-add-ReLU forward (statistics, finalize, apply with the mask)
    and its backward (reduction, finalize, apply: dx, dx2 and the affine gradients)
    against float64."""
    from fusedres.kernels import bn

    real_check = bn._check_activation

    def check_activation(*args, **kwargs):  # CPU tensors are the interpreter's here
        with monkeypatch.context() as m:
            m.setattr(bn, "_INTERPRET", True)
            return real_check(*args, **kwargs)

    monkeypatch.setattr(bn, "_INTERPRET", False)
    monkeypatch.setattr(bn, "_check_activation", check_activation)
    ran = []
    for name, family in (("_bn_apply", "elementwise"), ("_bn_bwd_apply", "elementwise"),
                         ("_bn_stats_partial", "reduce"), ("_bn_bwd_reduce_partial", "reduce"),
                         ("_bn_stats_finalize", "merge"), ("_bn_bwd_finalize", "merge")):
        configs = bn._FAMILY_CONFIGS[family]()
        chosen = configs[pick % len(configs)]

        def prune(configs, nargs, chosen=chosen, name=name, **kw):
            ran.append((name, chosen.kwargs))
            return [chosen]

        monkeypatch.setattr(bn, name, K.autotune(
            configs=configs, key=["C"], prune_configs_by={"early_config_prune": prune})(
            getattr(bn, name + "_kernel")))
    n, c, s, eps = 2, 20, 50, 1e-5  # C 20: partial channel blocks
    g = torch.Generator().manual_seed(pick)

    def act():
        t = torch.randn(n, s, c, generator=g).permute(0, 2, 1) if channels_last \
            else torch.randn(n, c, s, generator=g)
        return t

    x, x2, dout = act(), act() * 2 + 1, act()
    w, b, w2, b2 = (torch.randn(c, generator=g) for _ in range(4))
    out, mean, var, mean2, var2, mask = bn.batch_norm_act_forward(
        x, w, b, None, None, None, x2, w2, b2, None, None, True, eps, True, channels_last)
    grads = bn.batch_norm_act_backward(dout, x, w, b, mean, var, mask, x2, w2, b2, mean2, var2,
                                       True, eps, True, False, channels_last,
                                       [True, True, False, True, True])
    assert sorted({name for name, _ in ran}) == sorted(
        ["_bn_apply", "_bn_bwd_apply", "_bn_stats_partial", "_bn_bwd_reduce_partial",
         "_bn_stats_finalize", "_bn_bwd_finalize"]), ran
    ref_out, ref_stats, ref_grads = _bn_reference(x, w, b, x2, w2, b2, dout, eps)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    for got, want in zip((mean, var, mean2, var2), ref_stats):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    dx, dw, db, _, dx2, dw2, db2 = grads
    for got, want in zip((dx, dw, db, dx2, dw2, db2), ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# What never reaches the kernels, and what must not be cached during CUDA-graph capture
# --------------------------------------------------------------------------------------


@interpreted
def test_conv_path_sends_what_the_kernels_do_not_cover_to_f_conv2d():
    """Each legality reason of ``conv_path`` (``backend="triton"``) that CI did not reach
    sends the call to F.conv2d (the kernel would read these operands wrongly): the same
    result, or F.conv2d's own error."""
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)
    huge = torch.empty(1, 4, 1, 1).expand(2**12, 4, 2**10, 2**10)  # N*H*W >= 2**31, no memory
    cases = [  # (reason, input, weight, bias, stride, padding)
        ("is not supported", x.long(), w.long(), None, 1, 1),
        ("bfloat16", x.bfloat16(), w.bfloat16(), None, 1, 1),
        ("dtypes differ", x, w.double(), None, 1, 1),
        ("dtypes differ", x, w, torch.randn(6, dtype=torch.float64), 1, 1),
        ("different devices", x, w.to("meta"), None, 1, 1),
        ("channel mismatch", x, w[:, :3], None, 1, 1),
        ("invalid stride", x, w, None, 0, 1),
        ("invalid stride", x, w, None, 1, -1),
        ("empty", x[:0], w, None, 1, 1),
        ("empty", x[..., :2, :2], w, None, 1, 0),
        (">= 2**31", huge, w, None, 1, 1),  # F.conv2d not run: 2**32 outputs
    ]

    def outcome(conv, *args):
        try:
            return conv(*args)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            return type(exc)

    for reason, inp, wt, bias, st, pd in cases:
        path, why = fconv.conv_path(inp, wt, bias, st, pd, backend="triton")
        assert path == "reference" and reason in why, (reason, why)
        if inp is huge:
            continue
        want = outcome(F.conv2d, inp, wt, bias, st, pd)
        got = outcome(lambda *a: fconv.conv2d(*a, backend="triton"), inp, wt, bias, st, pd)
        if isinstance(want, type):
            assert got is want, (reason, got, want)
        elif wt.is_meta:  # a meta weight: F.conv2d's values mean nothing
            assert (got.shape, got.device) == (want.shape, want.device), reason
        else:
            torch.testing.assert_close(got, want, msg=reason)


@interpreted
def test_conv_launcher_rejects_misshapen_operands():
    """``kernels.conv.conv_fwd`` checks the epilogue and prologue operands' shapes (a
    kernel would read past them) and the int32 index limit of its GEMM sizes."""
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="residual has shape"):
        K.conv_fwd(x, w, 1, 1, residual=torch.randn(2, 6, 4, 4))
    with pytest.raises(ValueError, match="bias has shape"):
        K.conv_fwd(x, w, 1, 1, bias=torch.randn(4))
    with pytest.raises(ValueError, match="scale/shift must have shape"):
        K.conv_fwd(x, w, 1, 1, scale=torch.randn(4), shift=torch.randn(6))
    with pytest.raises(ValueError, match="GEMM_K = 2147483648"):
        K._check_int32(GEMM_M=5, GEMM_K=2**31)
    K._check_int32(GEMM_M=2**31 - 1)


def test_tap_reach_is_not_cached_during_capture(monkeypatch):
    """``_tap_reach`` (dgrad's dBN constant) keeps one tensor per shape and device, made
    outside CUDA-graph capture; during capture a tensor made now is only written when the
    graph replays, so each call makes its own and the cache is left alone."""
    K._device_reach.cache_clear()
    monkeypatch.setattr(K, "_capturing", lambda device: True)
    during = K._tap_reach(7, 4, 3, 2, 1, torch.device("cpu"))
    assert K._device_reach.cache_info().currsize == 0
    monkeypatch.setattr(K, "_capturing", lambda device: False)
    outside = K._tap_reach(7, 4, 3, 2, 1, torch.device("cpu"))
    assert K._device_reach.cache_info().currsize == 1
    torch.testing.assert_close(during, outside)
    # row i is reached by tap t from output row (i + 1 - t) / 2 in [0, 4)
    want = torch.tensor([[float(0 <= i + 1 - t < 8 and (i + 1 - t) % 2 == 0) for t in range(3)]
                         for i in range(7)], dtype=torch.float64)
    torch.testing.assert_close(outside, want)


def test_eval_fold_is_not_rebuilt_during_capture(monkeypatch):
    """Eval folds BN into the conv and caches the folded weights; a stale cache (a
    running statistic changed) is rebuilt, but never during CUDA-graph capture
    (``folded_weights`` gives None there: the folded tensors would only be written when
    the graph replays). Then the site runs conv and BN apart: still right, and the stale
    entry is neither used nor replaced."""
    from fusedres import nn as fnn

    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False).double()
    bn = torch.nn.BatchNorm2d(6).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(6, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(6, generator=g, dtype=torch.float64) + 0.5)
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)

    def run():
        with torch.no_grad():
            got = fnn.conv_bn_act(x, conv, bn, relu=True)
            return got, torch.relu(bn(conv(x))), fnn.last_backend()

    got, want, _ = run()  # folded and cached
    torch.testing.assert_close(got, want)
    assert fnn.last_backend() == "folded"
    cached = fnn._FOLDED[conv]
    with torch.no_grad():
        bn.running_mean.add_(1.0)  # the cache is stale now
    monkeypatch.setattr(fnn, "_capturing", lambda device: True)
    assert fnn.folded_weights(conv, bn) is None
    got, want, backend = run()
    torch.testing.assert_close(got, want)
    assert backend != "folded" and fnn._FOLDED[conv] is cached
    monkeypatch.setattr(fnn, "_capturing", lambda device: False)
    got, want, backend = run()  # outside capture: rebuilt
    torch.testing.assert_close(got, want)
    assert backend == "folded" and fnn._FOLDED[conv] is not cached


def test_gpu_timing_runs_on_the_timed_device(monkeypatch):
    """``interleaved_samples`` (what ``tune`` and ``dbn_backward="auto"`` decide with) times
    a GPU callable with ``time_cuda``, whose CUDA events and synchronizations are the
    current device's: timing work on cuda:1 while cuda:0 is current bracketed none of it
    (a choice by noise). Each sample is taken with the timed device current."""
    import contextlib

    from fusedres import _timing

    current = ["cuda:0"]

    @contextlib.contextmanager
    def device(d):  # torch.cuda.device, without a driver
        before, current[0] = current[0], str(d)
        try:
            yield
        finally:
            current[0] = before

    seen = []

    def time_cuda(fn, **kwargs):
        fn()
        seen.append(current[0])
        return _timing._summary([1e-3], "cuda-events")

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(_timing, "time_cuda", time_cuda)
    got = _timing.interleaved_samples({"a": lambda: None, "b": lambda: None},
                                      torch.device("cuda", 1), rounds=3, max_rounds=3)
    assert got == {"a": [1e-3] * 3, "b": [1e-3] * 3}
    assert seen == ["cuda:1"] * 6 and current == ["cuda:0"]


def test_tune_correctness_gate_rejects_each_kind_of_difference():
    """``fusedres.tune`` runs a candidate only after ``_compare`` found its results equal
    to torch's: on a GPU it is what keeps a wrong kernel from being chosen. Each way a
    result can differ is caught, with a reason; a result over the tolerance passes only
    when float64 says torch's own error is as large (the ``exact`` judge)."""
    import importlib

    T = importlib.import_module("fusedres.tune")  # (fusedres.tune is the function)
    a = torch.tensor([1.0, 2.0, 3.0])
    ok = [("out", a), ("grad", None), ("count", torch.tensor([3]))]
    assert T._compare(ok, ok, 1e-3) is None
    cases = [  # (got, reason)
        ([("out", a)], "different results"),
        ([("out", a), ("grad", a), ("count", torch.tensor([3]))], "grad: unexpected"),
        ([("out", a[:2]), ("grad", None), ("count", torch.tensor([3]))], "instead of"),
        ([("out", a.double()), ("grad", None), ("count", torch.tensor([3]))], "instead of"),
        ([("out", a), ("grad", None), ("count", torch.tensor([4]))], "[4] instead of [3]"),
        ([("out", torch.tensor([1.0, float("nan"), 3.0])), ("grad", None),
          ("count", torch.tensor([3]))], "NaN"),
        ([("out", a * 1.01), ("grad", None), ("count", torch.tensor([3]))], "relative L2"),
    ]
    for got, reason in cases:
        why = T._compare(got, ok, 1e-3)
        assert why is not None and reason in why, (reason, why)
    assert "missing" in T._compare(ok, [("out", a), ("grad", a), ok[2]], 1e-3)
    # over the tolerance: float64 decides. torch's result is 1% off the exact one; a
    # candidate as far from it passes, one 10x farther does not
    exact = lambda: [("out", a.double() * 1.01)]  # noqa: E731
    close = [("out", a * 1.02), ok[1], ok[2]]
    far = [("out", a * 1.2), ok[1], ok[2]]
    assert T._compare(close, ok, 1e-3, exact) is None
    assert "against float64" in T._compare(far, ok, 1e-3, exact)

    def broken():
        raise RuntimeError("no float64 here")
    assert "relative L2" in T._compare(close, ok, 1e-3, broken)


@interpreted
def test_launch_and_its_best_config_read_hold_the_tuner_lock(monkeypatch):
    """``conv._launch`` launches the device's autotuner and reads its ``best_config`` (the
    config the launcher sizes workspaces by) under that tuner's lock (``run_lock``):
    Triton keeps only the last launch's choice, so another thread's launch in between
    would hand back its config."""
    from triton import Config

    from fusedres.kernels import run_lock

    class Tuner:  # records whether its lock is held when launched and when read
        def __init__(self):
            self.held = []

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.held.append(run_lock(self).locked())

        @property
        def best_config(self):
            self.held.append(run_lock(self).locked())
            return Config({"BLOCK_M": 64})

    tuner = Tuner()
    monkeypatch.setattr(K, "INTERPRET", False)
    monkeypatch.setattr(K, "tuner_for", lambda run, device: run)
    chosen = K._launch(tuner, [Config({"BLOCK_M": 128})], lambda meta: (1,),
                       (torch.zeros(1),), {})
    assert chosen == {"BLOCK_M": 64} and tuner.held == [True, True]
    assert not run_lock(tuner).locked()


def test_deterministic_mode_runs_the_first_gpu_config_untimed(gpu):
    """Under ``torch.use_deterministic_algorithms(True)`` the GPU launch path skips the
    autotuner: the launcher's first config (``run.fn``, its TMA boxes set by its own
    pre_hook) runs untimed; here the prologue + statistics forward whose list also holds
    the 256-row tile, with the images rounded up for it (empty boxes past the batch)."""
    x = _cl(_rand(1, 64, 8, 8, seed=1))
    w = _cl(_rand(128, 64, 3, 3, seed=2) / 24)
    scale, shift = _rand(64, seed=3).float(), _rand(64, seed=4).float() * 0.3
    record = gpu(None, "sm_90", (3, 8))
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        y, mean, var = K.conv_fwd(x, w, 1, 1, scale=scale, shift=shift, stats=True)
    finally:
        torch.use_deterministic_algorithms(old)
    assert record["timed"] == 0 and record["hooks"] == []  # not the autotuner's configs
    assert [t[0] for t in record["offered"]] == [128, 256]
    assert record["chosen"]["BLOCK_M"] == 128 and record["kwargs"]["A_TMA"] == 2
    ref = F.conv2d(_bn_relu(x, scale, shift).double(), w.double(), None, 1, 1)
    _close(y, ref, 2e-3)
    v, m = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), v, rtol=1e-5, atol=1e-5)


@interpreted
def test_fp32_lists_run(gpu, monkeypatch):
    """fp32 operands have their own tiles on a GPU (BLOCK_K 32, 128-byte rows: TF32 dots
    where ``allow_tf32``; off here, so the interpreter's IEEE dot is the reference's):
    the forward with the prologue and statistics, dgrad and wgrad through the
    autotuner, each against float64."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cl = torch.channels_last
    x = _rand(2, 64, 6, 6, seed=1).float().contiguous(memory_format=cl)
    w = (_rand(64, 64, 3, 3, seed=2) / 24).float().contiguous(memory_format=cl)
    dy = _rand(2, 64, 6, 6, seed=3).float().contiguous(memory_format=cl)
    scale, shift = _rand(64, seed=4).float(), _rand(64, seed=5).float() * 0.3
    a = torch.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    ref = F.conv2d(a.double(), w.double(), None, 1, 1)
    record = gpu(lambda nargs: _close(nargs["Y_ptr"], ref, 1e-5))
    y, mean, var = _autotuned_twice(record, lambda: K.conv_fwd(
        x, w, 1, 1, scale=scale, shift=shift, stats=True), 2)
    assert [t[2] for t in record["offered"]] == [32]
    _close(y, ref, 1e-5)
    v, m = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), v, rtol=1e-6, atol=1e-6)
    ref_dx = torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double(), 1, 1)
    record = gpu(lambda nargs: _close(nargs["Y_ptr"], ref_dx, 1e-5))
    dx, _, _ = _autotuned_twice(record, lambda: K.conv_dgrad(dy, w, (6, 6), 1, 1), 2)
    _close(dx, ref_dx, 1e-5)
    ref_dw = torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double(), 1, 1)
    record = gpu(lambda nargs: None)
    dw = _autotuned_twice(record, lambda: K.conv_wgrad(dy, x, tuple(w.shape), 1, 1), 2)
    assert [t[2] for t in record["offered"]] == [32]
    _close(dw, ref_dw, 1e-5)


@interpreted
def test_tf32_and_ieee_are_tuned_apart(gpu, monkeypatch, tmp_path):
    """An fp32 launch's ``INPUT_PRECISION`` ("tf32" where ``cudnn.allow_tf32``, else
    "ieee") is in the conv and wgrad autotune keys, so in Triton's table of choices and in
    fusedres's disk store: the fp32 stem (two configs; the fp32 lists of the other modes
    offer one) tuned under TF32 is timed again under IEEE, not handed TF32's choice, and a
    second process (memory cleared, the same cache directory) takes each precision's own
    record from disk, timing nothing."""
    from fusedres import kernels as kernels_pkg

    x = _rand(2, 3, 16, 16, seed=1).float().contiguous(memory_format=CL)
    w = (_rand(64, 3, 7, 7, seed=2) / 12).float().contiguous(memory_format=CL)
    ref = F.conv2d(x.double(), w.double(), None, 2, 3)
    record = gpu(lambda nargs: None)
    monkeypatch.setenv("FUSEDRES_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FUSEDRES_CACHE")
    monkeypatch.setattr(kernels_pkg, "_AUTOTUNE_DISK", {})
    K._conv_run.cache_results = True  # as on a GPU (Triton turns it off in the interpreter)

    def launch(tf32):
        """The number of configs timed so far, after one launch."""
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
        y, _, _ = K.conv_fwd(x, w, 2, 3)
        assert record["kwargs"]["INPUT_PRECISION"] == ("tf32" if tf32 else "ieee")
        assert len(record["offered"]) == 2
        _close(y, ref, 2e-3)
        return record["timed"]

    assert [launch(True), launch(False)] == [2, 4]  # IEEE is timed: a key of its own
    assert [launch(True), launch(False)] == [4, 4]  # each tuned: from memory
    assert sorted(key[len(K._CONV_KEY) - 1] for key in K._conv_run.cache) == ["ieee", "tf32"]
    K._conv_run.cache.clear()  # a second process, the same directory
    kernels_pkg._AUTOTUNE_DISK.clear()
    assert [launch(False), launch(True)] == [4, 4]  # each precision's record, from disk
    dy = _rand(2, 64, 8, 8, seed=3).float().contiguous(memory_format=CL)
    for tf32 in (True, False):  # wgrad's fp32 list is one config: a key each, untimed
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
        K.conv_wgrad(dy, x, tuple(w.shape), 2, 3)
    assert sorted(key[len(K._WGRAD_KEY) - 1] for key in K._wgrad_run.cache) == ["ieee", "tf32"]


def test_cudnn_graphs_are_not_planned_while_tracing_or_capturing(monkeypatch):
    """A cuDNN graph not planned yet is refused (the caller falls back, nothing is
    remembered) during torch.compile tracing and CUDA-graph capture: planning queries the
    device and compiles kernels, and a failure there would be remembered as cuDNN's
    refusal for the whole process. Once outside, the planner is asked and remembered."""
    from fusedres import cudnn_graph as G

    key, t, asked = ("test-gpu-paths",), torch.empty(1), []
    monkeypatch.setattr(G, "_STATUS", {})
    monkeypatch.setattr(G, "_ENGINE", {})
    monkeypatch.setattr(G, "_ask_cudnn", lambda ops, *a: asked.append(ops) or ("", "engine 0"))
    for compiling, capturing, why in ((True, False, "torch.compile"),
                                      (False, True, "CUDA-graph capture")):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        monkeypatch.setattr(G, "capturing", lambda device: capturing)
        assert why in G._planned_status(key, t, "cudnn_graph", lambda: ())
        assert asked == [] and G._STATUS == {}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(G, "capturing", lambda device: False)
    assert G._planned_status(key, t, "cudnn_graph", lambda: ()) == ""
    assert asked == ["cudnn_graph"] and key in G._STATUS
    monkeypatch.setattr(G, "capturing", lambda device: True)  # planned: capture may use it
    assert G._planned_status(key, t, "cudnn_graph", lambda: ()) == "" and len(asked) == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32],
                         ids=["no-onednn", "onednn"])
def test_eval_dual_site_folds_both_convs(dtype):
    """``conv_bn_act`` called with a projection shortcut in eval without autograd folds
    both BNs into their convs: the shortcut conv first, then the main conv with the add
    and ReLU (float64 takes the path a GPU takes, without oneDNN's post-ops; converted
    models fold these BNs into the previous site instead, so CI reached it only here).
    Against torch's modules."""
    from fusedres import nn as fnn

    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False).to(dtype)
    conv_d = torch.nn.Conv2d(4, 8, 1, bias=False).to(dtype)
    bns = [torch.nn.BatchNorm2d(8).to(dtype).eval() for _ in range(2)]
    with torch.no_grad():
        for bn in bns:
            bn.running_mean.copy_(torch.randn(8, generator=g))
            bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)
            bn.weight.copy_(torch.randn(8, generator=g))
            bn.bias.copy_(torch.randn(8, generator=g))
        x = torch.randn(2, 4, 6, 6, generator=g).to(dtype)
        got = fnn.conv_bn_act(x, conv, bns[0], relu=True, shortcut_x=x, shortcut_conv=conv_d,
                              shortcut_bn=bns[1])
        assert fnn.last_backend() == "folded"
        want = torch.relu(bns[0](conv(x)) + bns[1](conv_d(x)))
    torch.testing.assert_close(got, want)

"""The references of the cuDNN graphs (fusedres.reference: graph_f0, graph_f1,
bn_finalize, dgrad_drelu, dbn_weight, dbn_apply) against torch's composite, float64 on
CPU: outputs, every gradient, running statistics."""
import pytest
import torch
import torch.nn.functional as F

from fusedres import reference as R

D = torch.float64


def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}")


def _bn_params(c, gen):
    gamma = (torch.rand(c, generator=gen, dtype=D) + 0.5).requires_grad_()
    beta = torch.randn(c, generator=gen, dtype=D).requires_grad_()
    return gamma, beta


@pytest.mark.parametrize("stride,padding,ksize", [(1, 0, 1), (1, 1, 3), (2, 1, 3), (2, 3, 7)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_f0_finalize_is_conv_bn_relu(stride, padding, ksize, momentum):
    """F0's sums through bn_finalize give torch's conv -> BN (training) -> ReLU: output,
    the gradients of x, w, gamma, beta (through the sums: the -dbeta/M and
    -xhat*dgamma/M terms), and the running statistics (unbiased var, momentum or the
    cumulative average)."""
    gen = torch.Generator().manual_seed(0)
    n, ci, co, h = 3, 5, 6, 9
    x = torch.randn(n, ci, h, h, generator=gen, dtype=D).requires_grad_()
    w = torch.randn(co, ci, ksize, ksize, generator=gen, dtype=D).requires_grad_()
    gamma, beta = _bn_params(co, gen)
    rm0 = torch.randn(co, generator=gen, dtype=D)
    rv0 = torch.rand(co, generator=gen, dtype=D) + 0.5
    nbt = 3  # num_batches_tracked after torch's increment: momentum=None uses 1/nbt
    factor = 1.0 / nbt if momentum is None else momentum
    eps = 1e-5

    y, s1, s2 = R.graph_f0(x, w, stride, padding)
    count = y.numel() // y.shape[1]
    scale, shift, mean, invstd, rm, rv = R.bn_finalize(s1, s2, count, gamma, beta, eps,
                                                       rm0, rv0, factor)
    out = torch.relu(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))

    rm_t, rv_t = rm0.clone(), rv0.clone()
    y_t = F.conv2d(x, w, None, stride, padding)
    out_t = torch.relu(F.batch_norm(y_t, rm_t, rv_t, gamma, beta, True, factor, eps))
    _close(out, out_t, "output")
    _close(rm, rm_t, "running_mean")
    _close(rv, rv_t, "running_var (unbiased)")
    var_t, mean_t = torch.var_mean(y_t, dim=(0, 2, 3), correction=0)
    _close(mean, mean_t, "mean")
    _close(invstd, torch.rsqrt(var_t + eps), "invstd")

    dout = torch.randn(out.shape, generator=gen, dtype=D)
    got = torch.autograd.grad(out, (x, w, gamma, beta), dout)
    want = torch.autograd.grad(out_t, (x, w, gamma, beta), dout)
    for g, wt, name in zip(got, want, ("x", "w", "gamma", "beta")):
        _close(g, wt, f"grad {name}")


def test_finalize_without_affine_or_running_stats():
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(2, 4, 3, 3, generator=gen, dtype=D)
    s1, s2 = y.sum(dim=(0, 2, 3)), (y * y).sum(dim=(0, 2, 3))
    scale, shift, *_, rm, rv = R.bn_finalize(s1, s2, 18, None, None, 1e-5)
    assert rm is None and rv is None
    _close(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1),
           F.batch_norm(y, None, None, None, None, True, 0.1, 1e-5), "bn(y)")


@pytest.mark.parametrize("stride,padding,ksize", [(1, 1, 3), (2, 1, 3), (1, 0, 1)])
def test_f1_is_bn_relu_then_conv(stride, padding, ksize):
    """F1 equals conv(relu(x*scale + shift)) with torch's padding *after* the ReLU: with
    a positive shift a padded tap would otherwise contribute relu(shift) > 0 (checked to
    differ, so the test can fail). Gradients of x, scale, shift and w."""
    gen = torch.Generator().manual_seed(2)
    n, ci, co, h = 2, 4, 5, 7
    x = torch.randn(n, ci, h, h, generator=gen, dtype=D).requires_grad_()
    w = torch.randn(co, ci, ksize, ksize, generator=gen, dtype=D).requires_grad_()
    scale = (torch.rand(ci, generator=gen, dtype=D) + 0.5).requires_grad_()
    shift = (torch.rand(ci, generator=gen, dtype=D) + 0.5).requires_grad_()  # positive

    y, s1, s2 = R.graph_f1(x, scale, shift, w, stride, padding)
    a = torch.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    y_t = F.conv2d(a, w, None, stride, padding)
    _close(y, y_t, "y")
    _close(s1, y_t.sum(dim=(0, 2, 3)), "sum")
    _close(s2, (y_t * y_t).sum(dim=(0, 2, 3)), "sum of squares")
    if padding:  # the wrong order (pad, then the prologue) gives another answer
        xp = F.pad(x, [padding] * 4)
        wrong = F.conv2d(torch.relu(xp * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)),
                         w, None, stride, 0)
        assert not torch.allclose(wrong, y_t)
    dy = torch.randn(y.shape, generator=gen, dtype=D)
    got = torch.autograd.grad((y * dy).sum() + s1.sum() + 0.01 * s2.sum(), (x, scale, shift, w))
    want = torch.autograd.grad((y_t * dy).sum() + y_t.sum() + 0.01 * (y_t * y_t).sum(),
                               (x, scale, shift, w))
    for g, wt, name in zip(got, want, ("x", "scale", "shift", "w")):
        _close(g, wt, f"grad {name}")


@pytest.mark.parametrize("stride,padding,ksize", [(1, 1, 3), (2, 1, 3), (1, 0, 1)])
def test_backward_terms_are_bn_relu_conv_backward(stride, padding, ksize):
    """dgrad_drelu -> dbn_weight -> dbn_apply give the gradients torch's autograd gives
    through conv(relu(bn(x))) (BN in training): dx, dgamma, dbeta."""
    gen = torch.Generator().manual_seed(3)
    n, c, co, h = 3, 4, 6, 8
    x = torch.randn(n, c, h, h, generator=gen, dtype=D).requires_grad_()
    w = torch.randn(co, c, ksize, ksize, generator=gen, dtype=D)
    gamma, beta = _bn_params(c, gen)
    eps = 1e-5
    out = F.conv2d(torch.relu(F.batch_norm(x, None, None, gamma, beta, True, 0.1, eps)),
                   w, None, stride, padding)
    dout = torch.randn(out.shape, generator=gen, dtype=D)
    dx_t, dgamma_t, dbeta_t = torch.autograd.grad(out, (x, gamma, beta), dout)

    xd = x.detach()
    var, mean = torch.var_mean(xd, dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + eps)
    scale = gamma.detach() * invstd
    shift = beta.detach() - mean * scale
    g = R.dgrad_drelu(dout, w, stride, padding, xd, scale, shift)
    dgamma, dbeta, a, b, c_ = R.dbn_weight(g, xd, mean, invstd, gamma.detach())
    dx = R.dbn_apply(g, xd, a, b, c_)
    _close(dgamma, dgamma_t, "dgamma")
    _close(dbeta, dbeta_t, "dbeta")
    _close(dx, dx_t, "dx")


def test_sums_are_of_the_stored_output():
    """genstats sums the conv output as stored (rounded to fp16), in fp32."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 6, 6, generator=gen).half()
    w = torch.randn(8, 8, 3, 3, generator=gen).half() * 0.2
    y, s1, s2 = R.graph_f0(x, w, 1, 1)
    assert y.dtype == torch.float16 and s1.dtype == s2.dtype == torch.float32
    yf = y.float()
    _close(s1.double(), yf.sum(dim=(0, 2, 3)).double(), "sum")
    torch.testing.assert_close(s2, (yf * yf).sum(dim=(0, 2, 3)))


@pytest.mark.parametrize("stride,padding,ksize", [(1, 1, 3), (2, 1, 3), (1, 0, 1), (2, 0, 1)])
@pytest.mark.parametrize("affine", [True, False])
def test_backward_graphs_are_bn_relu_conv_backward(stride, padding, ksize, affine):
    """DgradDreluDBN (graph_dgrad_drelu_dbn) -> dBNApply (dbn_apply with dbn_weight's
    coefficients) and ConvBNwgrad (graph_wgrad) give torch's gradients through
    conv(relu(bn(x))), BN in training: dx, dgamma, dbeta, dw. The wgrad's zero padding is
    of the prologue's output (a positive shift: checked to differ from the wrong order)."""
    gen = torch.Generator().manual_seed(6)
    n, c, co, h = 3, 4, 6, 8
    x = torch.randn(n, c, h, h, generator=gen, dtype=D).requires_grad_()
    w = torch.randn(co, c, ksize, ksize, generator=gen, dtype=D).requires_grad_()
    gamma, beta = _bn_params(c, gen) if affine else (None, None)
    eps = 1e-5
    out = F.conv2d(torch.relu(F.batch_norm(x, None, None, gamma, beta, True, 0.1, eps)),
                   w, None, stride, padding)
    dout = torch.randn(out.shape, generator=gen, dtype=D)
    wrt = (x, w) + ((gamma, beta) if affine else ())
    want = torch.autograd.grad(out, wrt, dout)

    xd = x.detach()
    var, mean = torch.var_mean(xd, dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + eps)
    gam = gamma.detach() if affine else torch.ones(c, dtype=D)
    bet = beta.detach() if affine else torch.zeros(c, dtype=D)
    g, dgamma, dbeta = R.graph_dgrad_drelu_dbn(dout, w.detach(), stride, padding, xd, mean,
                                               invstd, gam, bet)
    _close(g, R.dgrad_drelu(dout, w.detach(), stride, padding, xd, gam * invstd,
                            bet - mean * gam * invstd), "g (the centred mask = the forward's)")
    _, _, a, b, c_ = R.dbn_weight(g, xd, mean, invstd, gam)
    dx = R.dbn_apply(g, xd, a, b, c_)
    scale, shift = gam * invstd, bet - mean * gam * invstd
    dw = R.graph_wgrad(dout, xd, scale, shift, w.shape, stride, padding)
    got = (dx, dw) + ((dgamma, dbeta) if affine else ())
    for a_, b_, name in zip(got, want, ("dx", "dw", "dgamma", "dbeta")):
        _close(a_, b_, name)
    if padding:
        xp = F.pad(xd, [padding] * 4)
        wrong = torch.nn.grad.conv2d_weight(
            torch.relu(xp * scale.view(1, -1, 1, 1) + 1.0 + shift.view(1, -1, 1, 1)),
            w.shape, dout, stride, 0)
        right = R.graph_wgrad(dout, xd, scale, shift + 1.0, w.shape, stride, padding)
        assert not torch.allclose(wrong, right)

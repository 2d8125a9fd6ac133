"""``fusedres-bench doctor``: every kernel of every backend that runs here, checked against
the reference on a small battery of awkward and ResNet-50 shapes, before anything is timed.

Checked, per backend available on the device (``cpu``, ``cuda``, ``triton``):

* the four kernel primitives (``bn_stats``, ``bn_apply`` -- plain, residual, dual --,
  ``bn_backward_reduce`` with and without a ReLU mask, ``bn_backward_apply``) against
  their contract in ``fusedres.reference``, called with the same inputs; masks bit by bit;
* the fused functions (``batch_norm``, ``batch_norm_relu``, ``batch_norm_add_relu``,
  ``dual_batch_norm_add_relu``; training forward and backward, eval forward, running
  statistics) against torch's composite computed in float64 (also ``reference``);
* the running-statistics update op against ``ops.update_running_stats_reference``;
* with Triton, the conv entry points (``conv2d``, ``conv2d_stats``,
  ``bn_relu_conv2d_stats``, ``conv2d_bias_add_relu``) against ``F.conv2d`` in float64;
* on CUDA, where fusedres._C has the cuDNN graph path, every graph kind (``cudnn_graph_F0``:
  conv + statistics, ``cudnn_graph_F1``: BN-ReLU prologue + conv + statistics; float16 and
  bfloat16, ResNet-50 conv shapes, F0 also at the stem, 3 input channels padded to 8):
  output, mean, var and the gradients of input, weight, scale and shift against
  ``fusedres.reference.graph_f0``/``graph_f1`` in float64; the backward graphs
  (``cudnn_graph_DgradDreluDBN``, ``cudnn_graph_ConvBNwgrad``) against
  ``graph_dgrad_drelu_dbn``/``graph_wgrad``, and a BN-ReLU -> conv site with its fused
  backward (``cudnn_graph_site``: y, dx, dw, dgamma, dbeta) against torch's composite in
  float64; cuDNN's bn_finalize (``cudnn_graph_BNFinalize``: scale, shift, mean, invstd,
  next running statistics) against the project's finalize in float64 from the same sums;
  the block tail's pointwise graphs (``cudnn_graph_BNAddReLU``,
  ``cudnn_graph_DualBNAddReLU``: output and ReLU mask against
  ``reference.graph_bn_add_relu``, ResNet-50 tail shapes) and a dual tail through them
  with the BN kernels' backward (``cudnn_graph_tail_site``: out and every gradient against
  torch's composite in float64). A graph cuDNN refuses is listed under "skipped" with
  cuDNN's reason (the site falls back); a failing case names the engine cuDNN chose;
* on CUDA, the ``cudnn-eval`` path's fused call (``cudnn_eval_add_relu``: relu(conv + bias
  + residual), ``cudnn_eval_relu``: relu(conv + bias); float32, float16, bfloat16,
  channels_last, ResNet-50 conv shapes) against F.conv2d in float64; a call that raises
  is listed under "skipped" with the error (the site keeps today's eval path).

Shapes: C=3, C=65, H=W=1, N=1 with H*W>1, odd sizes, and ResNet-50 activation shapes
(batch 32 on GPU, all five; batch 2 on CPU, 64x56x56 and 2048x7x7); NCHW and channels_last; float32, float64 (CPU), float16 and
bfloat16 (parameters fp32). Errors are relative L2 errors; a fused function may be off
by its dtype's tolerance or by 4x torch's own error at that dtype, whichever is larger (``|a - b| / |b|`` over the
tensor: a rare ReLU boundary decided the other way by rounding is not a failure, a wrong
kernel is); masks are compared bit by bit (at most 0.01% of the bits may differ, the
rounding cases). The Triton interpreter (CPU, ``TRITON_INTERPRET=1``) and the ``reference``
backend (torch's own composite) get two tiny shapes in float32 only; without the
interpreter Triton is skipped on CPU with the reason.

Output: a table (kernel, backend, dtype, pass/fail, worst error vs tolerance, cases),
``--out PATH`` writes the rows as JSON; the exit status is 1 when any check failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import re
import sys
import time
import traceback
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# Relative L2 error allowed against the reference (float64 for the fused functions and
# the convs; the same-dtype contract for the primitives), by activation dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3,
             torch.bfloat16: 2e-2}
MASK_FRACTION = 1e-4  # bits of a ReLU mask that may differ (pre-activation rounding at 0)
AWKWARD = ((2, 3, 5, 7), (1, 65, 3, 3), (4, 8, 1, 1), (1, 16, 4, 4), (3, 40, 9, 11))
TINY = ((2, 3, 5, 7), (1, 16, 4, 4))
RESNET50 = ((64, 56), (256, 56), (512, 28), (1024, 14), (2048, 7))
# a few conv problems: (C_in, C_out, kernel, stride, padding, H)
CONVS_TINY = ((3, 8, 3, 1, 1, 5), (8, 16, 1, 2, 0, 6))
CONVS_RESNET50 = ((64, 64, 3, 1, 1, 56), (256, 128, 1, 1, 0, 56), (128, 128, 3, 2, 1, 56),
                  (512, 2048, 1, 2, 0, 14))
STEM = (3, 64, 7, 2, 3, 224)  # the cuDNN graphs' F0 runs it with the input padded to 8


@dataclasses.dataclass
class Row:
    kernel: str
    backend: str
    dtype: str
    ok: bool = True
    error: float = 0.0  # worst relative error seen
    tolerance: float = 0.0
    cases: int = 0
    detail: str = ""  # the first failure: shape, layout, what differed


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    if a64.shape != b64.shape:
        return float("inf")
    nan = torch.isnan(b64)
    if not torch.equal(torch.isnan(a64), nan):
        return float("inf")
    a64, b64 = torch.where(nan, 0.0, a64), torch.where(nan, 0.0, b64)
    den = torch.linalg.vector_norm(b64).item()
    num = torch.linalg.vector_norm(a64 - b64).item()
    return num / den if den > 0 else num


class Doctor:
    def __init__(self, device: torch.device, quick: bool = False, progress: bool = True,
                 only: Optional[str] = None, verbose: bool = False):
        self.device = device
        self.verbose = verbose
        self.quick = quick
        self.only = re.compile(only) if only else None
        self.progress = progress
        self.rows: dict = {}
        self.skipped: list = []

    # bookkeeping ---------------------------------------------------------------------

    def row(self, kernel: str, backend: str, dtype: torch.dtype) -> Row:
        key = (kernel, backend, str(dtype).replace("torch.", ""))
        if key not in self.rows:
            self.rows[key] = Row(*key, tolerance=TOLERANCE[dtype])
        return self.rows[key]

    def check(self, kernel: str, backend: str, dtype: torch.dtype, where: str,
              fn: Callable[[], list]) -> None:
        """``fn()`` returns ``[(name, got, want, tolerance or None), ...]``."""
        if self.only is not None and not self.only.search(f"{kernel} {backend}"):
            return
        row = self.row(kernel, backend, dtype)
        row.cases += 1
        try:
            pairs = fn()
        except Exception as exc:  # noqa: BLE001  (a kernel that raises fails its check)
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self._fail(row, float("inf"), f"{where}: raised {type(exc).__name__}: {msg[:200]}")
            return
        for name, got, want, tol in pairs:
            if name.endswith("mask"):
                err = self._mask_error(got, want)
                tol = MASK_FRACTION
            else:
                err = _rel(got, want)
                tol = tol if tol is not None else row.tolerance
            row.error = max(row.error, err) if err == err else float("inf")
            if not err <= tol:
                self._fail(row, err, f"{where}: {name} error {err:.3g} > {tol:.1g}")

    @staticmethod
    def _mask_error(got, want) -> float:
        if got.shape != want.shape or got.dtype != want.dtype:
            return float("inf")
        if got.numel() == 0:
            return 0.0
        bits = torch.bitwise_xor(got, want)
        diff = sum(int(((bits >> k) & 1).sum()) for k in range(8))
        return diff / (8 * got.numel())

    @staticmethod
    def _fail(row: Row, err: float, detail: str) -> None:
        row.ok = False
        row.error = max(row.error, err)
        if not row.detail:
            row.detail = detail

    # inputs --------------------------------------------------------------------------

    def shapes(self, backend: str) -> list:
        if (backend == "triton" and self.device.type != "cuda") or backend == "reference":
            return list(TINY)  # the interpreter; reference: torch's own composite
        n = 32 if self.device.type == "cuda" else 2
        big = [(n, c, h, h) for c, h in RESNET50]
        if self.quick or self.device.type == "cpu" or backend == "reference":
            big = big[:1] + big[-1:]  # the largest plane and the most channels
        return list(AWKWARD) + big

    def dtypes(self, backend: str) -> list:
        if (backend == "triton" and self.device.type != "cuda") or backend == "reference":
            return [torch.float32]
        out = [torch.float32, torch.float16, torch.bfloat16]
        return out + [torch.float64] if self.device.type == "cpu" else out

    def rand(self, shape, dtype, channels_last, seed, scale=1.0, offset=0.0):
        # drawn on the device: on a GPU, drawing the batch-32 ResNet-50 inputs in float64
        # on the CPU took most of the doctor's first 30 s (H200 run, 2026-12-04)
        g = torch.Generator(device=self.device).manual_seed(seed)
        t = torch.randn(shape, generator=g, dtype=torch.float64, device=self.device)
        t = (t * scale + offset).to(dtype)
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    # the primitives ------------------------------------------------------------------

    def primitives(self, backend: str) -> None:
        from fusedres import ops
        from fusedres import reference as ref

        prims = ops.primitives(backend)
        for dtype in self.dtypes(backend):
            acc = ref.acc_dtype(dtype)
            for i, shape in enumerate(self.shapes(backend)):
                for cl in (False, True):
                    where = f"{tuple(shape)} {'channels_last' if cl else 'nchw'}"
                    n, c = shape[:2]

                    def ncs(t):
                        return t.reshape(n, c, -1)

                    x = ncs(self.rand(shape, dtype, cl, i, 2.0, 0.5))
                    v = {"x": x, "dout": ncs(self.rand(shape, dtype, cl, i + 100)),
                         "residual": ncs(self.rand(shape, dtype, cl, i + 200)),
                         "x2": ncs(self.rand(shape, dtype, cl, i + 300, 1.5, -0.2)),
                         "channels_last": bool(cl and shape[2] * shape[3] > 1 and c > 1),
                         "relu": True}
                    mean, var = ref.bn_stats(x)
                    invstd = torch.rsqrt(var + 1e-5)
                    g = torch.Generator().manual_seed(i + 400)
                    weight = (1 + 0.1 * torch.randn(c, generator=g, dtype=torch.float64))
                    beta = 0.1 * torch.randn(c, generator=g, dtype=torch.float64)
                    v.update(mean=mean, scale=(weight.to(acc).to(self.device) * invstd),
                             shift=beta.to(acc).to(self.device))
                    mean2, var2 = ref.bn_stats(v["x2"])
                    v.update(mean2=mean2, scale2=torch.rsqrt(var2 + 1e-5),
                             shift2=torch.zeros_like(mean2))
                    v.update(coef_g=v["scale"], coef_xc=-v["scale"] * invstd * invstd * 0.01,
                             coef_c=torch.full_like(mean, 0.05))
                    self._primitive_cases(prims, ref, backend, dtype, where, v)

    def _primitive_cases(self, prims, ref, backend, dtype, where, v) -> None:
        def call(kernel, reference, **over):
            names = list(inspect.signature(reference).parameters)
            args = [over.get(n, v.get(n)) for n in names]
            return kernel(*args), reference(*args)

        def stats():
            (m, s), (rm, rs) = call(prims.stats, ref.bn_stats)
            tol = TOLERANCE[torch.float64] if dtype == torch.float64 else 1e-5
            return [("mean", m, rm, tol), ("var", s, rs, 1e3 * tol)]

        self.check("bn_stats", backend, dtype, where, stats)
        variants = {"": dict(residual=None, x2=None, mean2=None, scale2=None, shift2=None,
                             save_mask=False),
                    "+residual": dict(x2=None, mean2=None, scale2=None, shift2=None,
                                      save_mask=True),
                    "+dual": dict(residual=None, save_mask=True)}
        masks = {}
        for name, over in variants.items():
            def apply(over=over, name=name):
                (out, mask), (rout, rmask) = call(prims.apply, ref.bn_apply, **over)
                masks[name] = rmask
                return [("out", out, rout, None), ("mask", mask, rmask, None)]

            self.check(f"bn_apply{name}", backend, dtype, where, apply)
        for name, mask in (("", None), ("+mask", masks.get("+residual"))):
            def reduce(mask=mask):
                (a, b), (ra, rb) = call(prims.backward_reduce, ref.bn_backward_reduce,
                                        mask=mask)
                tol = TOLERANCE[torch.float64] if dtype == torch.float64 else 1e-5
                return [("sum_g", a, ra, tol), ("sum_g_xc", b, rb, tol)]

            self.check(f"bn_backward_reduce{name}", backend, dtype, where, reduce)

        def backward_apply():
            (dx, dres), (rdx, rdres) = call(prims.backward_apply, ref.bn_backward_apply,
                                            mask=masks.get("+residual"),
                                            write_grad_residual=True)
            return [("dx", dx, rdx, None), ("dres", dres, rdres, None)]

        self.check("bn_backward_apply", backend, dtype, where, backward_apply)

    # the fused functions -------------------------------------------------------------

    def fused(self, backend: str) -> None:
        for dtype in self.dtypes(backend):
            for i, shape in enumerate(self.shapes(backend)):
                for cl in (False, True):
                    where = f"{tuple(shape)} {'channels_last' if cl else 'nchw'}"
                    for op in ("batch_norm", "batch_norm_relu", "batch_norm_add_relu",
                               "dual_batch_norm_add_relu"):
                        for training in (True, False):
                            self.check(f"{op} ({'train fwd+bwd' if training else 'eval'})",
                                       backend, dtype, where,
                                       lambda op=op, training=training, i=i, shape=shape,
                                       cl=cl: self._fused_case(op, backend, dtype, shape, cl,
                                                               training, i))

    def _fused_case(self, op, backend, dtype, shape, cl, training, seed) -> list:
        from fusedres import functional as fn

        c = shape[1]
        pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        x = self.rand(shape, dtype, cl, seed, 2.0, 0.5)
        other = self.rand(shape, dtype, cl, seed + 1, 1.5, -0.2)
        dout = self.rand(shape, dtype, cl, seed + 2)
        g = torch.Generator().manual_seed(seed + 3)
        vec = lambda s, o: (torch.randn(c, generator=g, dtype=torch.float64) * s + o)  # noqa: E731
        params = [vec(0.1, 1.0), vec(0.1, 0.0), vec(0.1, 0.0), vec(0.1, 1.0).abs() + 0.1]
        params2 = [vec(0.1, 1.0), vec(0.1, 0.0), vec(0.1, 0.0), vec(0.1, 1.0).abs() + 0.1]

        def run(inputs, p, p2, use_ref, cast=True):
            w, b, rm, rv = [t.clone().to(self.device) for t in p]
            w2, b2, rm2, rv2 = [t.clone().to(self.device) for t in p2]
            if cast:
                w, b, rm, rv, w2, b2, rm2, rv2 = [t.to(pdtype) for t in
                                                  (w, b, rm, rv, w2, b2, rm2, rv2)]
            leaves = [t.detach().clone().requires_grad_(training) for t in
                      (inputs[0], inputs[1], w, b, w2, b2)]
            xx, oo, w, b, w2, b2 = leaves
            kw = dict(training=training, momentum=0.1, eps=1e-5)
            if op == "dual_batch_norm_add_relu":
                kw.update(input=xx, shortcut=oo, running_mean=rm, running_var=rv, weight=w,
                          bias=b, shortcut_running_mean=rm2, shortcut_running_var=rv2,
                          shortcut_weight=w2, shortcut_bias=b2)
                out = (reference_dual(**kw) if use_ref else
                       fn.dual_batch_norm_add_relu(**kw, backend=backend))
                used = [xx, oo, w, b, w2, b2]
            else:
                relu = op != "batch_norm"
                residual = oo if op == "batch_norm_add_relu" else None
                if use_ref:
                    out = F.batch_norm(xx, rm, rv, w, b, **kw)
                    out = out + residual if residual is not None else out
                    out = torch.relu(out) if relu else out
                else:
                    out = fn.batch_norm(xx, rm, rv, w, b, **kw, relu=relu, residual=residual,
                                        backend=backend)
                used = [xx, w, b] + ([oo] if residual is not None else [])
            res = [("out", out.detach())]
            if training:
                grads = torch.autograd.grad(out, used, dout.to(out.dtype))
                res += [(f"grad {k}", gr) for k, gr in zip(("x", "other", "w", "b", "w2",
                                                              "b2") if len(used) == 6 else
                                                             ("x", "w", "b", "residual"), grads)]
                res += [("running_mean", rm), ("running_var", rv)]
                if op == "dual_batch_norm_add_relu":
                    res += [("shortcut running_mean", rm2), ("shortcut running_var", rv2)]
            return res

        got = run((x, other), params, params2, use_ref=False)
        want = run((x.double(), other.double()), params, params2, use_ref=True, cast=False)
        torch_own = run((x, other), params, params2, use_ref=True)
        # allowed: the dtype's tolerance, or 4x torch's own error at this dtype (half
        # precision gradients: torch's composite is itself 1e-2 away from float64)
        return [(n, a, b, max(TOLERANCE[dtype], 4 * _rel(t, b)))
                for (n, a), (_, b), (_, t) in zip(got, want, torch_own)]

    def running_stats(self, backend: str) -> None:
        from fusedres import ops

        for dtype in (torch.float32, torch.float64):
            def case(dtype=dtype):
                out = []
                for momentum, nbt in ((0.1, None), (0.0, 3), (0.7, None)):
                    rm = self.rand((37,), dtype, False, 1)
                    rv = self.rand((37,), dtype, False, 2).abs()
                    mean = self.rand((37,), dtype, False, 3)
                    var = self.rand((37,), dtype, False, 4).abs()
                    t = None if nbt is None else torch.tensor(nbt, device=self.device)
                    a = (rm.clone(), rv.clone())
                    b = (rm.clone(), rv.clone())
                    ops.update_running_stats(*a, mean, var, 1.25, momentum, t)
                    ops.update_running_stats_reference(*b, mean, var, 1.25, momentum, t)
                    out += [("running_mean", a[0], b[0], None), ("running_var", a[1], b[1], None)]
                return out

            self.check("update_running_stats", backend, dtype, f"C=37 on {self.device.type}",
                       case)

    # convs (Triton) -------------------------------------------------------------------

    def convs(self, backend: str = "triton") -> None:  # backend: a doctor step's signature
        from fusedres import conv as fconv

        problems = CONVS_TINY if self.device.type != "cuda" else CONVS_TINY + CONVS_RESNET50
        n = 2 if self.device.type != "cuda" else 32
        dtypes = [torch.float32] if self.device.type != "cuda" else \
            [torch.float32, torch.float16, torch.bfloat16]
        for dtype in dtypes:
            for i, (cin, cout, k, st, pad, h) in enumerate(problems):
                where = f"{cin}->{cout} {k}x{k}/{st} @{h} batch {n}"
                x = self.rand((n, cin, h, h), dtype, True, i, 1.0, 0.3)
                w = self.rand((cout, cin, k, k), dtype, True, i + 1, (cin * k * k) ** -0.5)
                scale = (self.rand((cin,), torch.float32, False, i + 2, 0.1, 1.0))
                shift = self.rand((cin,), torch.float32, False, i + 3, 0.1)
                bias = self.rand((cout,), dtype, False, i + 4, 0.1)
                ho = (h + 2 * pad - k) // st + 1
                res = self.rand((n, cout, ho, ho), dtype, True, i + 5)
                x64, w64 = x.double(), w.double()

                def stats(y):
                    var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
                    return y, mean, var

                def triton_only():
                    path, why = fconv.conv_path(x, w, None, st, pad, 1, 1, "triton")
                    if path != "triton":
                        raise RuntimeError(f"the Triton conv does not take it: {why}")

                cases = {
                    "conv2d": (lambda: [fconv.conv2d(x, w, None, st, pad, backend="triton")],
                               lambda: [F.conv2d(x64, w64, None, st, pad)]),
                    "conv2d_stats": (lambda: list(fconv.conv2d_stats(x, w, st, pad,
                                                                     backend="triton")),
                                     lambda: list(stats(F.conv2d(x64, w64, None, st, pad)))),
                    "bn_relu_conv2d_stats": (
                        lambda: list(fconv.bn_relu_conv2d_stats(x, scale, shift, w, st, pad,
                                                                backend="triton")),
                        lambda: list(stats(F.conv2d(torch.relu(
                            x64 * scale.double().view(1, -1, 1, 1)
                            + shift.double().view(1, -1, 1, 1)), w64, None, st, pad)))),
                    "conv2d_bias_add_relu": (
                        lambda: [fconv.conv2d_bias_add_relu(x, w, bias, res, st, pad, True,
                                                            backend="triton")],
                        lambda: [torch.relu(F.conv2d(x64, w64, bias.double(), st, pad)
                                            + res.double())]),
                }
                tol = {torch.float32: 5e-3 if torch.backends.cuda.matmul.allow_tf32
                       or torch.backends.cudnn.allow_tf32 else 1e-4,
                       torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
                for name, (got, want) in cases.items():
                    def case(got=got, want=want):
                        triton_only()
                        return [(f"output {j}", a, b, tol)
                                for j, (a, b) in enumerate(zip(got(), want()))]

                    self.check(name, "triton", dtype, where, case)

    # cuDNN graphs ---------------------------------------------------------------------

    def cudnn_graphs(self, backend: str = "cudnn-graph") -> None:  # likewise
        from fusedres import cudnn_graph
        from fusedres import reference as R

        n = 2 if self.quick else 32
        for dtype in (torch.float16, torch.bfloat16):
            for i, (cin, cout, k, st, pad, h) in enumerate(CONVS_RESNET50 + (STEM,)):
                x = self.rand((n, cin, h, h), dtype, True, i, 1.0, 0.3)
                w = self.rand((cout, cin, k, k), dtype, True, i + 1, (cin * k * k) ** -0.5)
                scale = self.rand((cin,), torch.float32, False, i + 2, 0.1, 1.0)
                shift = self.rand((cin,), torch.float32, False, i + 3, 0.1)
                for kind, prologue in (("F0", False), ("F1", True)):
                    where = f"{kind} {cin}->{cout} {k}x{k}/{st} @{h} batch {n}"
                    if prologue and (cin, cout, k, st, pad, h) == STEM:
                        continue  # (never an F1 site: the image is no BN output)
                    why = cudnn_graph.problem(x, w, None, st, pad, 1, 1, prologue=prologue) \
                        or cudnn_graph.plan_status(x, w, prologue, st, pad)
                    if why:
                        self.skipped.append((f"cudnn_graph_{kind}", f"{dtype} {where}: {why}"))
                        continue

                    def case(prologue=prologue):
                        ins = [t.detach().requires_grad_() for t in (x, w, scale, shift)]
                        ref = [t.detach().double().requires_grad_() for t in (x, w, scale, shift)]
                        outs = []
                        for (xx, ww, ss, tt), graph in ((ins, True), (ref, False)):
                            if graph:
                                y, mean, var = cudnn_graph.conv_stats(
                                    xx, ww, st, pad, ss if prologue else None,
                                    tt if prologue else None)
                            else:
                                y, s1, s2 = (R.graph_f1(xx, ss, tt, ww, st, pad) if prologue
                                             else R.graph_f0(xx, ww, st, pad))
                                m = y.numel() // y.shape[1]
                                mean, var = s1 / m, s2 / m - (s1 / m) ** 2
                            # a loss reaching y, mean and var: every backward term is used
                            loss = (y.double() * 1e-3).square().sum() + mean.double().sum() \
                                + var.double().sum()
                            wrt = [xx, ww] + ([ss, tt] if prologue else [])
                            outs.append([y, mean, var, *torch.autograd.grad(loss, wrt)])
                        names = ["y", "mean", "var", "dx", "dw", "dscale", "dshift"]
                        return [(nm, a, b, None) for nm, a, b in zip(names, *outs)]

                    engine = cudnn_graph.engine(x, w, kind, st, pad)
                    self.check(f"cudnn_graph_{kind}", "cudnn-graph", dtype,
                               f"{where} on {engine}", case)
                if (cin, cout, k, st, pad, h) != STEM:  # (the stem is no BN-ReLU -> conv site)
                    self._cudnn_backward_graphs(dtype, i, x, w, st, pad,
                                                f"{cin}->{cout} {k}x{k}/{st} @{h} batch {n}")
        self._cudnn_finalize()

    def _cudnn_finalize(self):
        """cuDNN's bn_finalize (``cudnn_graph_BNFinalize``) against the project's finalize
        in float64 from the same float32 sums: scale, shift, mean, invstd and the next
        running statistics (torch's momentum and unbiased variance), at ResNet-50's BN
        widths."""
        from fusedres import cudnn_graph

        for i, c in enumerate((64, 256, 2048)):
            y = self.rand((8, c, 7, 7), torch.float32, False, 50 + i, 1.0, 0.5)
            sums, sq_sums = y.sum(dim=(0, 2, 3)), (y * y).sum(dim=(0, 2, 3))
            count = y.numel() // c
            gamma = self.rand((c,), torch.float32, False, 60 + i, 0.1, 1.0)
            beta = self.rand((c,), torch.float32, False, 70 + i, 0.1)
            rm = self.rand((c,), torch.float32, False, 80 + i, 0.1)
            rv = self.rand((c,), torch.float32, False, 90 + i, 0.1, 1.0).abs()
            where = f"C={c} count {count}"
            why = cudnn_graph.finalize_problem(sums, rm, 0.1) or cudnn_graph.finalize_status(sums)
            if why:
                self.skipped.append(("cudnn_graph_BNFinalize", f"{where}: {why}"))
                continue

            def case(sums=sums, sq_sums=sq_sums, count=count, gamma=gamma, beta=beta, rm=rm,
                     rv=rv):
                got_rm, got_rv = rm.clone(), rv.clone()
                got = cudnn_graph._finalize_cudnn(sums, sq_sums, count, gamma, beta, 1e-5,
                                                  got_rm, got_rv, 0.1)
                d = lambda t: t.double()  # noqa: E731
                want_rm, want_rv = d(rm), d(rv)
                want = cudnn_graph._finalize_fusedres(d(sums), d(sq_sums), count, d(gamma),
                                                      d(beta), 1e-5, want_rm, want_rv, 0.1, None)
                names = ("scale", "shift", "mean", "invstd", "running_mean", "running_var")
                return [(nm, a, b, None) for nm, a, b in
                        zip(names, (*got, got_rm, got_rv), (*want, want_rm, want_rv))]

            engine = cudnn_graph.engine_of_finalize(sums)
            self.check("cudnn_graph_BNFinalize", "cudnn-graph", torch.float32,
                       f"{where} on {engine}", case)

    def _cudnn_backward_graphs(self, dtype, seed, x, w, st, pad, where):
        """The backward of a BN-ReLU -> conv site whose BN normalises ``x`` with its batch
        statistics: DgradDreluDBN and ConvBNwgrad against their references, and the whole
        site op (``cudnn_graph.bn_relu_conv``: y and the gradients of x, w, gamma, beta)
        against torch's conv(relu(batch_norm(x))), all in float64."""
        from fusedres import cudnn_graph
        from fusedres import reference as R

        d, acc, eps = torch.float64, R.acc_dtype(x.dtype), 1e-5
        var, mean = torch.var_mean(x.to(acc), dim=(0, 2, 3), correction=0)
        invstd = torch.rsqrt(var + eps)
        gamma = self.rand((x.shape[1],), acc, False, seed + 5, 0.1, 1.0)
        beta = self.rand((x.shape[1],), acc, False, seed + 6, 0.1)
        scale, shift = cudnn_graph.prologue_scale_shift(gamma, beta, mean, invstd)
        y_shape = F.conv2d(torch.empty(x.shape, device="meta"), torch.empty(w.shape, device="meta"),
                           None, st, pad).shape
        dy = self.rand(tuple(y_shape), dtype, True, seed + 7, 0.1)
        st2, pad2 = [st, st], [pad, pad]
        f64 = lambda *ts: [t.to(d) for t in ts]  # noqa: E731

        def dgrad_case():
            got = cudnn_graph._run_dgrad_drelu_dbn(dy, w, x, mean, invstd, gamma, beta, st2, pad2)
            want = R.graph_dgrad_drelu_dbn(*f64(dy, w), st, pad, *f64(x, mean, invstd, gamma, beta))
            return [(nm, a, b, None) for nm, a, b in zip(("g", "dgamma", "dbeta"), got, want)]

        def wgrad_case():
            got = cudnn_graph._run_wgrad(dy, x, scale, shift, w, st2, pad2)
            want = R.graph_wgrad(*f64(dy, x, scale, shift), w.shape, st, pad)
            return [("dw", got, want, None)]

        def site_case():
            ins = [t.detach().requires_grad_() for t in (x, w, gamma, beta)]
            ref = [t.detach().to(d).requires_grad_() for t in (x, w, gamma, beta)]
            y, _, _ = cudnn_graph.bn_relu_conv(*ins, mean, invstd, True, st2, pad2)
            xr, wr, gr, br = ref
            yr = F.conv2d(torch.relu(F.batch_norm(xr, None, None, gr, br, True, 0.1, eps)), wr,
                          None, st, pad)
            got = torch.autograd.grad(y, ins, dy)
            want = torch.autograd.grad(yr, ref, dy.to(d))
            names = ("y", "dx", "dw", "dgamma", "dbeta")
            return [(nm, a, b, None) for nm, a, b in zip(names, (y, *got), (yr, *want))]

        cases = {"DgradDreluDBN": dgrad_case, "ConvBNwgrad": wgrad_case, "site": site_case}
        for kind, case in cases.items():
            # the site needs F1; its backward runs whichever backward graphs cuDNN plans
            graph = "F1" if kind == "site" else kind
            why = cudnn_graph.problem(x, w, None, st, pad, 1, 1, prologue=True) \
                or cudnn_graph.plan_status(x, w, graph, st, pad)
            if why:
                self.skipped.append((f"cudnn_graph_{kind}", f"{dtype} {where}: {why}"))
                continue
            engine = cudnn_graph.engine(x, w, graph, st, pad)
            self.check(f"cudnn_graph_{kind}", "cudnn-graph", dtype, f"{where} on {engine}", case)

    def cudnn_tail_graphs(self, backend: str = "cudnn-graph") -> None:  # likewise
        """The block tail's graphs at ResNet-50's tail shapes (``_cudnn_tail_graphs``)."""
        n = 2 if self.quick else 32
        for dtype in (torch.float16, torch.bfloat16):
            for i, (c, h) in enumerate(RESNET50[1:]):  # (64 channels: no tail there)
                self._cudnn_tail_graphs(dtype, (n, c, h, h), 10 * i, f"{c}x{h}x{h} batch {n}")

    def _cudnn_tail_graphs(self, dtype, shape, seed, where):
        """BNAddReLU and DualBNAddReLU (with and without the ReLU mask: output, mask bit by
        bit) against ``reference.graph_bn_add_relu`` in float64, and a dual tail through
        ``cudnn_graph.bn_act_with_stats`` with the graph (training forward and the BN
        kernels' backward reading its mask: out and every gradient) against torch's
        composite in float64 (``cudnn_graph_tail_site``)."""
        from fusedres import cudnn_graph
        from fusedres import reference as R

        d, acc, c = torch.float64, R.acc_dtype(dtype), shape[1]
        x, x2, r = (self.rand(shape, dtype, True, seed + k, 1.0, 0.3) for k in range(3))
        vec = lambda k, s, o=0.0: self.rand((c,), acc, False, seed + k, s, o)  # noqa: E731
        mean, scale, shift, mean2, scale2, shift2 = (vec(3, 0.1, 0.3), vec(4, 0.1, 1.0),
                                                     vec(5, 0.5), vec(6, 0.1, 0.3),
                                                     vec(7, 0.1, 1.0), vec(8, 0.5))
        f64 = lambda t: None if t is None else t.to(d)  # noqa: E731
        for kind in cudnn_graph.TAIL_KINDS:
            dual = kind == "DualBNAddReLU"
            args = (None, x2, mean2, scale2, shift2) if dual else (r, None, None, None, None)
            for save_mask in (True, False):
                at = f"{where}{', with the mask' if save_mask else ''}"
                why = cudnn_graph.tail_problem(x, x2 if dual else r, True) \
                    or cudnn_graph.tail_status(kind, x, save_mask)
                if why:
                    self.skipped.append((f"cudnn_graph_{kind}", f"{dtype} {at}: {why}"))
                    continue

                def case(args=args, save_mask=save_mask):
                    out, mask = cudnn_graph._run_tail(x, mean, scale, shift, *args, save_mask)
                    want, want_mask = R.graph_bn_add_relu(
                        *map(f64, (x, mean, scale, shift, *args)), save_mask=save_mask)
                    return [("out", out, want, None)] + \
                        ([("mask", mask, want_mask, None)] if save_mask else [])

                self.check(f"cudnn_graph_{kind}", "cudnn-graph", dtype,
                           f"{at} on {cudnn_graph.tail_engine(kind, x, save_mask)}", case)
        if cudnn_graph.tail_problem(x, x2, True) \
                or cudnn_graph.tail_status("DualBNAddReLU", x, True):
            return  # (skipped above, with the reason)
        weights = [vec(k, 0.1, o) for k, o in ((9, 1.0), (10, 0.0), (11, 1.0), (12, 0.0))]
        dout = self.rand(shape, dtype, True, seed + 13)
        prims = "cuda" if self.device.type == "cuda" else "reference_primitives"

        def tail(leaves, composite):
            y, s, w, b, w2, b2 = leaves
            if composite:
                out = torch.relu(F.batch_norm(y, None, None, w, b, True, 0.1, 1e-5)
                                 + F.batch_norm(s, None, None, w2, b2, True, 0.1, 1e-5))
            else:
                out, _, _ = cudnn_graph.bn_act_with_stats(
                    y, w, b, None, relu=True, shortcut=s, shortcut_weight=w2,
                    shortcut_bias=b2, eps=1e-5, backend=prims, tail_graph=True)
                if not cudnn_graph.tail_ran():
                    raise RuntimeError("the tail graph did not run (fell back)")
            return [out, *torch.autograd.grad(out, leaves, dout.to(out.dtype))]

        def site_case():
            ins = (x, x2, *weights)
            got = tail([t.detach().requires_grad_() for t in ins], False)
            want = tail([t.detach().to(d).requires_grad_() for t in ins], True)
            own = tail([t.detach().requires_grad_() for t in ins], True)  # torch's, in dtype
            names = ("out", "dy", "dy2", "dgamma", "dbeta", "dgamma2", "dbeta2")
            return [(nm, a, b, max(TOLERANCE[dtype], 4 * _rel(t, b)))
                    for nm, a, b, t in zip(names, got, want, own)]

        self.check("cudnn_graph_tail_site", "cudnn-graph", dtype, f"dual {where}", site_case)

    # cuDNN's fused eval call (the cudnn-eval conv path) --------------------------------

    def cudnn_eval(self, backend: str = "cudnn-eval") -> None:  # likewise
        from fusedres import cudnn_eval

        n = 2 if self.quick else 32
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            tol = {torch.float32: 5e-3 if torch.backends.cudnn.allow_tf32 else 1e-4,
                   torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
            for i, (cin, cout, k, st, pad, h) in enumerate(CONVS_RESNET50):
                conv = torch.nn.Conv2d(cin, cout, k, st, pad, bias=False, device="meta")
                x = self.rand((n, cin, h, h), dtype, True, i, 1.0, 0.3)
                w = self.rand((cout, cin, k, k), dtype, True, i + 1, (cin * k * k) ** -0.5)
                b = self.rand((cout,), dtype, False, i + 2, 0.1)
                ho = (h + 2 * pad - k) // st + 1
                z = self.rand((n, cout, ho, ho), dtype, True, i + 3)
                for kind, res in (("cudnn_eval_add_relu", z), ("cudnn_eval_relu", None)):
                    where = f"{cin}->{cout} {k}x{k}/{st} @{h} batch {n}"
                    with torch.no_grad():
                        why = cudnn_eval.problem(conv, x, True, res, w, b)
                        out = None if why else cudnn_eval.run(conv, x, w, b, res)
                        if out is None:  # refused here, or raised (remembered: the error)
                            why = why or cudnn_eval.problem(conv, x, True, res, w, b)
                    if out is None:
                        self.skipped.append((kind, f"{dtype} {where}: {why}"))
                        continue

                    def case(out=out, res=res):
                        want = F.conv2d(x.double(), w.double(), b.double(), st, pad)
                        if res is not None:
                            want = want + res.double()
                        return [("output", out, torch.relu(want), tol)]

                    self.check(kind, "cudnn-eval", dtype, where, case)

    # ---------------------------------------------------------------------------------

    def run(self) -> list:
        from fusedres._backend import backend_supports, has_triton, triton_interpreted

        backends = []
        for b in ("cpu", "cuda", "triton"):
            if backend_supports(b, self.device):
                backends.append(b)
            elif b == "triton" and self.device.type == "cpu" and has_triton() \
                    and not triton_interpreted():
                self.skipped.append(("triton", "on CPU it needs TRITON_INTERPRET=1 set "
                                               "before fusedres is imported"))
            elif b != "triton" or has_triton():
                self.skipped.append((b, f"does not run on {self.device.type} here"))
        steps = [("reference", self.fused)] + [(b, f) for b in backends
                                               for f in (self.primitives, self.fused)]
        steps += [(b, self.running_stats) for b in backends if b in ("cpu", "cuda")]
        if "triton" in backends:
            steps.append(("triton", self.convs))
        from fusedres import cudnn_graph
        if self.device.type != "cuda":
            self.skipped.append(("cudnn-graph", "the cuDNN graphs run on CUDA only"))
        elif not cudnn_graph.built():
            self.skipped.append(("cudnn-graph", "fusedres._C was built without the cuDNN "
                                                "graph path (no cudnn-frontend headers)"))
        else:
            steps.append(("cudnn-graph", self.cudnn_graphs))
            steps.append(("cudnn-graph", self.cudnn_tail_graphs))
        if self.device.type != "cuda":
            self.skipped.append(("cudnn-eval", "the fused cuDNN call runs on CUDA only"))
        else:
            steps.append(("cudnn-eval", self.cudnn_eval))
        start = time.perf_counter()
        for k, (backend, step) in enumerate(steps):
            t0 = time.perf_counter()
            name = step.__name__
            if self.progress:
                self._say(f"step {k + 1} of {len(steps)}: {backend} {name} "
                          f"({t0 - start:.0f} s so far)")
            before = {key: r.cases for key, r in self.rows.items()}
            step(backend)
            for key, r in self.rows.items():  # the rows this step checked, as they finish
                if r.cases != before.get(key) and self.progress:
                    self._say(f"  {r.kernel} / {r.backend} / {r.dtype}: "
                              f"{'pass' if r.ok else 'FAIL'} (max error {r.error:.2e}, "
                              f"tolerance {r.tolerance:.0e}, {r.cases} cases)")
            if self.progress and self.verbose:
                self._say(f"  {backend} {name}: {time.perf_counter() - t0:.1f} s")
        return list(self.rows.values())

    @staticmethod
    def _say(text: str) -> None:
        print(f"[doctor] {text}", file=sys.stderr, flush=True)


def reference_dual(input, shortcut, running_mean, running_var, weight, bias,
                   shortcut_running_mean, shortcut_running_var, shortcut_weight,
                   shortcut_bias, training, momentum, eps):
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    r = F.batch_norm(shortcut, shortcut_running_mean, shortcut_running_var, shortcut_weight,
                     shortcut_bias, training, momentum, eps)
    return torch.relu(y + r)


def table(rows: list) -> str:
    cols = ("kernel", "backend", "dtype", "result", "max error", "tolerance", "cases")
    lines = [[r.kernel, r.backend, r.dtype, "pass" if r.ok else "FAIL",
              f"{r.error:.2e}", f"{r.tolerance:.0e}", str(r.cases)] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in lines)) if lines else len(c)
              for i, c in enumerate(cols)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(cols), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to check (auto: cuda when a GPU is present, else cpu)")
    p.add_argument("--out", metavar="PATH", help="write the rows as JSON")
    p.add_argument("--quick", action="store_true",
                   help="two ResNet-50 shapes instead of five (always on CPU)")
    p.add_argument("--only", metavar="REGEX", default=None,
                   help="only the checks whose 'kernel backend' matches REGEX")
    p.add_argument("--verbose", action="store_true", help="also each step's seconds")
    p.add_argument("--quiet", action="store_true",
                   help="no progress on stderr (by default: each step, and its rows as they "
                        "finish)")


def main(args) -> int:
    import fusedres

    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fusedres-bench doctor: --device cuda but torch sees no GPU")
    t0 = time.perf_counter()
    doctor = Doctor(device, quick=args.quick, progress=not args.quiet, only=args.only,
                    verbose=args.verbose)
    try:
        rows = doctor.run()
    except Exception:  # noqa: BLE001  (the doctor itself broke: say so, fail)
        traceback.print_exc()
        return 2
    wall = time.perf_counter() - t0
    failed = [r for r in rows if not r.ok]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"fusedres-bench doctor on {device.type} ({name}), torch {torch.__version__}, "
          f"backends {fusedres.available_backends()}")
    print(table(rows))
    for backend, why in doctor.skipped:
        print(f"skipped: {backend}: {why}")
    for r in failed:
        print(f"FAIL {r.kernel} / {r.backend} / {r.dtype}: {r.detail}")
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed "
          f"({sum(r.cases for r in rows)} cases) in {wall:.1f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device.type, "device_name": name, "torch": torch.__version__,
                       "backends": fusedres.available_backends(), "wall_s": wall,
                       "passed": not failed, "skipped": doctor.skipped,
                       "rows": [dict(dataclasses.asdict(r), error=r.error
                                     if math.isfinite(r.error) else None) for r in rows]},
                      f, indent=1)
        print(f"wrote {args.out}")
    return 1 if failed else 0

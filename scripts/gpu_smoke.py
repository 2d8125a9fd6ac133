"""Smoke test of every Triton kernel against fusedres.reference, one config per kernel.

    python scripts/gpu_smoke.py --out smoke.jsonl [--budget-s S] [--dry-run]

Stage "smoke" of scripts/gpu_run.sh: on a fresh GPU it runs while the C++/CUDA extension
builds, so it needs neither fusedres._C nor an installed fusedres (it imports the
checkout). What it checks, on small shapes with fresh random data:

* every BN primitive of the triton backend (``torch.ops.fusedres.triton_bn_*``): stats;
  apply without ReLU, with ReLU, with the ReLU mask, with a residual, with a second BN
  (projection shortcut), with both; backward reduce with the gradient passed through,
  gated by a recomputed ReLU and by the saved mask; backward apply the same three ways
  and with the residual gradient written;
* every fused BN op of ``fusedres.functional`` (BN, BN+ReLU, BN+add+ReLU, dual
  BN+add+ReLU) with backend "triton", training and eval: output, every gradient and the
  updated running statistics (the finalize kernels and the fused launches models run);
* every conv mode (``fusedres.conv``, backend "triton"): plain forward, the BN-statistics
  epilogue, the BN-ReLU prologue (+ statistics), the bias/residual/ReLU epilogue, and the
  backward of each (dgrad and wgrad kernels, with the dBN prologue and dReLU epilogue).

Each check compares with the same primitive or function of ``fusedres.reference`` (conv:
``backend="reference"``) computed in float64 from the same inputs, by
``||got - want|| / ||want||`` per output (ReLU masks: the count of differing bits, a few
allowed where the float64 pre-activation is within rounding of 0). One config per
kernel: ``torch.use_deterministic_algorithms(True)`` (meant to pin one config per
kernel, issue 12), and any autotuner still holding several configs is cut to its first,
so nothing is timed and each kernel specialisation compiles once.

One JSON line per check, flushed: {"kind": "check", "group", "check", "dtype", "layout",
"shape", "status": "pass" | "fail" | "error", "rel_err", "tol", "detail", "seconds"}; checks
not started within the budget get "status": "skipped"; the last line is
{"kind": "end", "passed", "failed", "errors", "skipped", "complete", "wall_s"}.

Without a GPU (``--dry-run``, or no CUDA device) the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set here before triton is imported) on CPU tensors, float32 only
(the interpreter has no bfloat16 arithmetic). Exit status: 0 when every check that ran
passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_env(dry_run: bool) -> None:
    import torch

    if dry_run or not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


# --------------------------------------------------------------------------------------
# One config per kernel
# --------------------------------------------------------------------------------------


def pin_one_config() -> str:
    """Deterministic mode, then cut every autotuner left with several configs to its
    first (no timing, one compile per specialisation). Returns what was done."""
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter: one fixed config per kernel"
    from triton.runtime.autotuner import Autotuner

    from fusedres.kernels import bn, conv

    cut = []
    for mod in (bn, conv):
        for name, obj in sorted(vars(mod).items()):
            if isinstance(obj, Autotuner) and len(obj.configs) > 1:
                obj.configs = obj.configs[:1]
                cut.append(f"{mod.__name__.rsplit('.', 1)[-1]}.{name}")
    return ("deterministic mode; first config of " + ", ".join(cut)) if cut else \
        "deterministic mode (every kernel already on one config)"


# --------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------


def rel_err(got, want) -> float:
    """||got - want|| / ||want|| in float64 (inf for NaN or a shape mismatch)."""
    import torch

    if tuple(got.shape) != tuple(want.shape):
        return float("inf")
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(g).all() and torch.isfinite(w).all():
        return float("inf")
    den = w.norm().item()
    num = (g - w).norm().item()
    return num / den if den > 0 else num


def tolerance(dtype) -> float:
    """Bound on the relative error of one output against float64: rounding of the
    output in its dtype plus float32 accumulation (TF32 is switched off here)."""
    import torch

    return {torch.float32: 1e-4, torch.float64: 1e-10}.get(dtype, 2e-2)


# --------------------------------------------------------------------------------------
# BN primitives
# --------------------------------------------------------------------------------------

# (check name, primitive, flags): every residual/dual/ReLU/mask variant of the apply and
# every gradient source of the two backward passes.
BN_CHECKS = (
    ("stats", "bn_stats", {}),
    ("apply", "bn_apply", {"relu": False}),
    ("apply+relu", "bn_apply", {"relu": True}),
    ("apply+relu+mask", "bn_apply", {"relu": True, "save_mask": True}),
    ("apply+residual+relu+mask", "bn_apply", {"relu": True, "save_mask": True,
                                              "residual": True}),
    ("apply+dual+relu+mask", "bn_apply", {"relu": True, "save_mask": True, "dual": True}),
    ("apply+dual+residual+relu", "bn_apply", {"relu": True, "dual": True, "residual": True}),
    ("backward_reduce", "bn_backward_reduce", {"relu": False}),
    ("backward_reduce+relu", "bn_backward_reduce", {"relu": True}),
    ("backward_reduce+mask", "bn_backward_reduce", {"relu": True, "mask": True}),
    ("backward_apply", "bn_backward_apply", {"relu": False}),
    ("backward_apply+relu", "bn_backward_apply", {"relu": True}),
    ("backward_apply+mask", "bn_backward_apply", {"relu": True, "mask": True}),
    ("backward_apply+mask+dres", "bn_backward_apply", {"relu": True, "mask": True,
                                                       "write_grad_residual": True}),
)


def _ncs(shape, channels_last, dtype, device, scale=1.0, offset=0.0):
    import torch

    n, c, s = shape
    if channels_last:
        t = torch.randn(n, s, c, device=device).permute(0, 2, 1)
    else:
        t = torch.randn(n, c, s, device=device)
    return (t * scale + offset).to(dtype)


def _bn_values(shape, dtype, channels_last, device, flags) -> dict:
    """Every named input any primitive takes, for one check (fresh random data)."""
    import torch

    from fusedres import reference as ref

    acc = ref.acc_dtype(dtype)
    c = shape[1]

    def chan(scale=1.0, offset=0.0, positive=False):
        v = torch.randn(c, device=device, dtype=acc) * scale + offset
        return v.abs() + 0.5 if positive else v

    x = _ncs(shape, channels_last, dtype, device, 2.0, 0.5)
    mean, _ = ref.bn_stats(x, channels_last)
    v = {"x": x, "mean": mean, "scale": chan(0.5, positive=True), "shift": chan(0.3),
         "residual": None, "x2": None, "mean2": None, "scale2": None, "shift2": None,
         "mask": None, "relu": flags.get("relu", False), "save_mask": flags.get("save_mask", False),
         "write_grad_residual": flags.get("write_grad_residual", False),
         "channels_last": channels_last,
         "dout": _ncs(shape, channels_last, dtype, device),
         "coef_g": chan(0.5), "coef_xc": chan(0.2), "coef_c": chan(0.1)}
    if flags.get("residual"):
        v["residual"] = _ncs(shape, channels_last, dtype, device)
    if flags.get("dual"):
        v["x2"] = _ncs(shape, channels_last, dtype, device, 1.5, -0.2)
        v["mean2"], _ = ref.bn_stats(v["x2"], channels_last)
        v["scale2"], v["shift2"] = chan(0.5, positive=True), chan(0.3)
    if flags.get("mask"):  # the mask a forward with ReLU saved
        names = inspect.signature(ref.bn_apply).parameters
        fwd = dict(v, relu=True, save_mask=True, residual=None, x2=None)
        v["mask"] = ref.bn_apply(**{k: fwd[k] for k in names})[1]
    return v


def _as64(v):
    import torch

    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.double()
    return v


def _mask_bits_off(got, want, pre64, shape, channels_last) -> tuple[int, int]:
    """(bits that differ, of them those where the float64 pre-activation is not within
    float32 rounding of 0): only the second count is a failure."""
    from fusedres import reference as ref

    g = ref.unpack_mask(got.cpu(), shape, channels_last)
    w = ref.unpack_mask(want.cpu(), shape, channels_last)
    off = g != w
    near_zero = pre64.abs().cpu() <= 1e-5 * (1 + pre64.abs().max().cpu())
    return int(off.sum()), int((off & ~near_zero).sum())


def check_bn(name, prim, flags, shape, dtype, channels_last, device):
    """Run one triton primitive and its reference; returns (rel_err, detail)."""
    import torch

    from fusedres import ops  # noqa: F401  (registers the triton ops)
    from fusedres import reference as ref

    v = _bn_values(shape, dtype, channels_last, device, flags)
    names = list(inspect.signature(getattr(ref, prim)).parameters)
    got = getattr(torch.ops.fusedres, "triton_" + prim)(**{k: v[k] for k in names})
    want = getattr(ref, prim)(**{k: _as64(v[k]) for k in names})
    errs, details = [], []
    for i, (g, w) in enumerate(zip(got, want)):
        if g.numel() == 0 and w.numel() == 0:  # an output not asked for
            continue
        if g.dtype == torch.uint8:  # the ReLU mask
            if g.numel() != w.numel():
                errs.append(float("inf"))
                details.append(f"mask has {g.numel()} bytes, want {w.numel()}")
                continue
            pre = ref.centred(_as64(v["x"]), v["mean"].double(), v["scale"].double(),
                              v["shift"].double())
            if v["x2"] is not None:
                pre = pre + ref.centred(v["x2"].double(), v["mean2"].double(),
                                        v["scale2"].double(), v["shift2"].double())
            if v["residual"] is not None:
                pre = pre + v["residual"].double()
            off, bad = _mask_bits_off(g, w, pre, shape, channels_last)
            errs.append(0.0 if bad == 0 else float("inf"))
            details.append(f"mask: {off} bits differ ({bad} away from 0)")
            continue
        errs.append(rel_err(g, w))
        details.append(f"out{i} {errs[-1]:.2e}")
    return max(errs) if errs else 0.0, "; ".join(details)


# --------------------------------------------------------------------------------------
# Fused BN ops (what a model runs: the triton backend's own fused launches, finalize
# kernels and the shortcut's x2 riding in the same launches, not only the primitives)
# --------------------------------------------------------------------------------------

FUSED_OPS = ("batch_norm", "batch_norm_relu", "batch_norm_add_relu", "dual_batch_norm_add_relu")


def check_fused(op, training, shape, dtype, device):
    """``fusedres.functional.<op>`` with backend "triton": output, every gradient and
    (training) the updated running statistics, against backend "reference" in float64.
    Returns (rel_err, detail)."""
    import torch

    from fusedres import functional as fn

    n, c, h = shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def act(scale=1.0, offset=0.0):
        t = torch.randn(n, c, h, h, device=device) * scale + offset
        return t.to(dtype).contiguous(memory_format=torch.channels_last)

    def bn_params(prefix):
        return {prefix + "weight": 1 + 0.2 * torch.randn(c, device=device, dtype=acc),
                prefix + "bias": 0.2 * torch.randn(c, device=device, dtype=acc),
                prefix + "running_mean": 0.1 * torch.randn(c, device=device, dtype=acc),
                prefix + "running_var": 1 + torch.rand(c, device=device, dtype=acc)}

    t = {"input": act(1.5, 0.3), **bn_params("")}
    kwargs = {}
    if op == "batch_norm_add_relu":
        t["residual"] = act()
    if op == "dual_batch_norm_add_relu":
        t["shortcut"] = act(1.2, -0.2)
        t.update(bn_params("shortcut_"))
    if op == "batch_norm":
        kwargs["relu"] = False
    leaves = [k for k in t if "running" not in k]

    def run(backend, tensors):
        for k in leaves:
            tensors[k].requires_grad_(True)
        return getattr(fn, op)(**tensors, training=training, momentum=0.1, eps=1e-5,
                               backend=backend, **kwargs)

    ref_t = {k: v.detach().double().cpu() for k, v in t.items()}
    got = run("triton", t)
    want = run("reference", ref_t)
    errs, details = [rel_err(got, want)], [f"out {rel_err(got, want):.2e}"]
    up = torch.randn(want.shape, dtype=torch.float64)
    grads_g = torch.autograd.grad((got.double() * up.to(got.device)).sum(),
                                  [t[k] for k in leaves])
    grads_w = torch.autograd.grad((want * up).sum(), [ref_t[k] for k in leaves])
    for k, g, w in zip(leaves, grads_g, grads_w):
        errs.append(rel_err(g, w))
        details.append(f"d{k} {errs[-1]:.2e}")
    if training:
        for k in t:
            if "running" in k:
                errs.append(rel_err(t[k], ref_t[k]))
                details.append(f"{k} {errs[-1]:.2e}")
    return max(errs), "; ".join(details)


# --------------------------------------------------------------------------------------
# Conv modes
# --------------------------------------------------------------------------------------

# (label, C_in, C_out, kernel, stride, padding, H): a 3x3 (tap-major K loop), a strided
# 1x1 and the C=3 stem (flattened K loop).
CONV_SHAPES = (("3x3", 16, 32, 3, 1, 1, 9), ("1x1/2", 32, 16, 1, 2, 0, 8),
               ("stem7x7/2", 3, 16, 7, 2, 3, 16))
CONV_MODES = ("fwd", "fwd+stats", "bn_relu+fwd+stats", "fwd+bias+add+relu")


def _conv_call(mode, backend, x, w, scale, shift, bias, res, stride, pad):
    """The fusedres.conv function of ``mode``; returns its outputs as a tuple."""
    from fusedres import conv

    if mode == "fwd":
        return (conv.conv2d(x, w, None, stride, pad, backend=backend),)
    if mode == "fwd+stats":
        return conv.conv2d_stats(x, w, stride, pad, backend=backend)
    if mode == "bn_relu+fwd+stats":
        return conv.bn_relu_conv2d_stats(x, scale, shift, w, stride, pad, backend=backend)
    return (conv.conv2d_bias_add_relu(x, w, bias, res, stride, pad, True, backend=backend),)


def check_conv(mode, spec, dtype, backward, device, batch=2):
    """Forward (and with ``backward`` every input gradient) of one conv mode, triton vs
    the reference in float64 on the CPU. Returns (rel_err, detail)."""
    import torch

    _, cin, cout, k, stride, pad, h = spec
    oh = (h + 2 * pad - k) // stride + 1
    cl = torch.channels_last
    x = torch.randn(batch, cin, h, h, device=device).to(dtype).contiguous(memory_format=cl)
    w = (torch.randn(cout, cin, k, k, device=device) * (cin * k * k) ** -0.5).to(dtype) \
        .contiguous(memory_format=cl)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = (torch.rand(cin, device=device, dtype=acc) + 0.5)
    shift = 0.3 * torch.randn(cin, device=device, dtype=acc)
    bias = (0.1 * torch.randn(cout, device=device)).to(dtype)
    res = torch.randn(batch, cout, oh, oh, device=device).to(dtype).contiguous(memory_format=cl)
    inputs = {"x": x, "w": w, "scale": scale, "shift": shift, "bias": bias, "res": res}
    used = {"fwd": ("x", "w"), "fwd+stats": ("x", "w"),
            "bn_relu+fwd+stats": ("x", "w", "scale", "shift"),
            "fwd+bias+add+relu": ("x", "w", "bias", "res")}[mode]

    def run(backend, tensors):
        if backward:
            for key in used:
                tensors[key].requires_grad_(True)
        outs = _conv_call(mode, backend, tensors["x"], tensors["w"], tensors["scale"],
                          tensors["shift"], tensors["bias"], tensors["res"], stride, pad)
        return outs

    got = run("triton", dict(inputs))
    ref_in = {k: t.detach().double().cpu() for k, t in inputs.items()}
    want = run("reference", ref_in)
    errs, details = [], []
    names = ("y", "mean", "var")
    for name, g, wnt in zip(names, got, want):
        errs.append(rel_err(g, wnt))
        details.append(f"{name} {errs[-1]:.2e}")
    if backward:  # random upstream gradients on every output, the same on both sides
        ups = [torch.randn(o.shape, dtype=torch.float64) for o in want]
        loss_g = sum((o.double() * u.to(o.device)).sum() for o, u in zip(got, ups))
        loss_w = sum((o * u).sum() for o, u in zip(want, ups))
        grads_g = torch.autograd.grad(loss_g, [inputs[k] for k in used])
        grads_w = torch.autograd.grad(loss_w, [ref_in[k] for k in used])
        for key, g, wnt in zip(used, grads_g, grads_w):
            errs.append(rel_err(g, wnt))
            details.append(f"d{key} {errs[-1]:.2e}")
    return max(errs), "; ".join(details)


# --------------------------------------------------------------------------------------
# Plan and run
# --------------------------------------------------------------------------------------


def plan(device_type: str) -> list:
    """(group, check, dtype, layout, shape, callable) in order of value: the dtype and
    layout the benchmarks use first. On CPU (the interpreter, seconds per conv backward)
    a subset: every check once, not every shape."""
    import torch

    conv_shapes = CONV_SHAPES
    if device_type == "cuda":
        bn_runs = [(torch.bfloat16, True, (4, 64, 49)), (torch.float32, True, (4, 64, 49)),
                   (torch.float32, False, (4, 64, 49)), (torch.float32, True, (3, 5, 37))]
        conv_dtypes = [torch.bfloat16, torch.float32]
    else:
        bn_runs = [(torch.float32, True, (4, 64, 49)), (torch.float32, False, (3, 5, 37))]
        conv_dtypes = [torch.float32]
        conv_shapes = CONV_SHAPES[:1]
    out = []
    for dtype, cl, shape in bn_runs:
        for name, prim, flags in BN_CHECKS:
            out.append(("bn", name, dtype, "channels_last" if cl else "nchw", list(shape),
                        lambda n=name, p=prim, f=flags, s=shape, d=dtype, c=cl:
                        check_bn(n, p, f, s, d, c, device_type)))
    for dtype in conv_dtypes:  # the BN dtypes: bf16 (GPU) and fp32
        for op in FUSED_OPS:
            for training in (True, False):
                label = f"{op} {'train' if training else 'eval'} fwd+bwd"
                out.append(("fused", label, dtype, "channels_last", [4, 32, 7, 7],
                            lambda o=op, tr=training, d=dtype:
                            check_fused(o, tr, (4, 32, 7), d, device_type)))
    for dtype in conv_dtypes:
        for spec in conv_shapes:
            for mode in CONV_MODES:
                for backward in (False, True):
                    if backward and mode == "fwd+bias+add+relu" and spec[0] != "3x3":
                        continue  # the epilogue's backward is plain torch + dgrad/wgrad
                    label = f"{mode}{' bwd' if backward else ''} {spec[0]}"
                    shape = [2, spec[1], spec[6], spec[6], spec[2]]
                    out.append(("conv", label, dtype, "channels_last", shape,
                                lambda m=mode, sp=spec, d=dtype, b=backward:
                                check_conv(m, sp, d, b, device_type)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON-lines file (appended)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no check after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="CPU: Triton interpreter, fp32")
    args = p.parse_args(argv)
    t0 = time.time()
    _setup_env(args.dry_run)
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    torch.backends.cudnn.allow_tf32 = False  # the Triton conv follows it: IEEE fp32 here
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    counts = {"pass": 0, "fail": 0, "error": 0, "skipped": 0}
    with open(args.out, "a") as f:
        def emit(row):
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()

        try:
            pinned = pin_one_config()
        except Exception as exc:  # the kernels do not import: every check is an error
            pinned = f"pinning failed: {type(exc).__name__}: {exc}"
        emit({"kind": "header", "device": device, "pinning": pinned,
              "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
              "torch": torch.__version__})
        print(f"[smoke] {device}: {pinned}", flush=True)
        complete = True
        try:
            for group, name, dtype, layout, shape, fn in plan(device):
                row = {"kind": "check", "group": group, "check": name,
                       "dtype": str(dtype).replace("torch.", ""), "layout": layout,
                       "shape": shape}
                if args.budget_s is not None and time.time() - t0 > args.budget_s:
                    complete = False
                    row.update(status="skipped", detail=f"budget of {args.budget_s:.0f} s spent")
                    counts["skipped"] += 1
                    emit(row)
                    continue
                t = time.time()
                try:
                    err, detail = fn()
                    tol = tolerance(dtype)
                    status = "pass" if err <= tol else "fail"
                    row.update(status=status, rel_err=err, tol=tol, detail=detail)
                except Exception as exc:
                    row.update(status="error", detail=f"{type(exc).__name__}: {exc}"[:500],
                               traceback=traceback.format_exc(limit=8))
                row["seconds"] = round(time.time() - t, 3)
                counts[row["status"]] += 1
                emit(row)
                if row["status"] != "pass":
                    print(f"[smoke] {row['status'].upper()} {group} {name} {row['dtype']} "
                          f"{layout} {shape}: {row.get('detail')}", flush=True)
        except KeyboardInterrupt:
            complete = False
            print("[smoke] stopped by SIGINT", flush=True)
        emit({"kind": "end", "passed": counts["pass"], "failed": counts["fail"],
              "errors": counts["error"], "skipped": counts["skipped"], "complete": complete,
              "wall_s": round(time.time() - t0, 1)})
    print(f"[smoke] {counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, "
          f"{counts['skipped']} skipped in {time.time() - t0:.0f} s", flush=True)
    return 0 if counts["fail"] == counts["error"] == 0 and complete else 1


if __name__ == "__main__":
    sys.exit(main())

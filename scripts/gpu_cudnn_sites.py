"""Times cuDNN's fused conv graphs (fusedres.cudnn_graph) at every ResNet-50 conv site, and
optionally a ResNet-50 training step with the graph path. For the one-call GPU script.

Per conv site (batch 256 by default, channels_last, float16 and bfloat16), forward and
forward+backward, CUDA events (fusedres.bench.timing.time_cuda):

    conv          F.conv2d alone (cuDNN)
    conv+bn       F0's work unfused: F.conv2d, then the fused BN statistics kernel
                  (F1's: the fused BN-ReLU kernel, then F.conv2d and the statistics)
    graph         the cuDNN graph (F0, or F1 with the BN-ReLU prologue)

Per block-tail shape (ResNet-50's, the same batch and dtypes; ``--no-tails`` skips them),
the (dual) BN-add-ReLU in training, forward and forward+backward:

    kernels       today's fused op (functional.batch_norm_add_relu /
                  dual_batch_norm_add_relu, backend cuda: statistics, apply, backward)
    given_stats   the graph path's tail with today's apply: the BN kernels' apply and
                  backward with the statistics given (cudnn_graph.bn_act_with_stats)
    tail_graph    the same with the apply as cuDNN's tail graph (BNAddReLU /
                  DualBNAddReLU, its ReLU mask read by the BN kernels' backward)
    apply_kernel / apply_graph   the apply alone (forward): the BN kernel's bn_apply
                  against the graph, both writing the output and the ReLU mask

A site the planner or cuDNN refuses prints its reason instead of a time. ``--train``
adds a ResNet-50 training step (torchvision, SGD, autocast): eager against the converted
model with every BN-ReLU -> conv site on the graph path (img/s), also with every tail's
apply as the tail graph (``cudnn-graph-tail``). ``--eval`` adds the
ResNet-50 eval forward (torch.no_grad, channels_last; float32 and each dtype under
autocast): eager, the converted model's folded convs (today's eval path) and the same
with every site's plan ``cudnn-eval`` (the fold's conv, bias, residual and ReLU in one
cuDNN call), img/s and the largest output difference from eager.

    python3 scripts/gpu_cudnn_sites.py [--batch 256] [--dtypes float16,bfloat16]
                                       [--sites 1,2,6] [--no-tails] [--train] [--eval]
                                       [--out results.json]
    python3 scripts/gpu_cudnn_sites.py --finalize [--jsonl run.jsonl]
    python3 scripts/gpu_cudnn_sites.py --tails [--batch 256] [--dtypes ...] [--jsonl run.jsonl]

``--finalize`` times only BN finalize after the graphs' sums at each ResNet-50 BN width
(batch 256 at 56x56): the project's finalize against cuDNN's bn_finalize graph, with
their largest output difference (scripts/gpu_run.sh appends these rows to run.jsonl).
``--tails`` times only the block tails ("kind": "cudnn_tail" rows; scripts/gpu_run.sh
appends them to run.jsonl, each as it is measured).

Needs a GPU and fusedres._C built with the cuDNN graph path (docs/cudnn_graph.md); with
``--eval`` and no graph path, only the eval rows run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

# (C_in, C_out, kernel, stride, padding, H): every distinct ResNet-50 conv (torchvision v1.5:
# the stride on the 3x3), the stem first (F0 with its 3 input channels padded to 8; F1
# refused by the planner)
SITES = [(3, 64, 7, 2, 3, 224),
         (64, 64, 1, 1, 0, 56), (64, 64, 3, 1, 1, 56), (64, 256, 1, 1, 0, 56),
         (256, 64, 1, 1, 0, 56), (256, 128, 1, 1, 0, 56), (128, 128, 3, 2, 1, 56),
         (128, 512, 1, 1, 0, 28), (256, 512, 1, 2, 0, 56), (512, 128, 1, 1, 0, 28),
         (128, 128, 3, 1, 1, 28), (512, 256, 1, 1, 0, 28), (256, 256, 3, 2, 1, 28),
         (256, 1024, 1, 1, 0, 14), (512, 1024, 1, 2, 0, 28), (1024, 256, 1, 1, 0, 14),
         (256, 256, 3, 1, 1, 14), (1024, 512, 1, 1, 0, 14), (512, 512, 3, 2, 1, 14),
         (512, 2048, 1, 1, 0, 7), (1024, 2048, 1, 2, 0, 14), (2048, 512, 1, 1, 0, 7),
         (512, 512, 3, 1, 1, 7)]


def _ms(fn) -> float:
    from fusedres.bench.timing import time_cuda

    return time_cuda(fn, use_graph=False).median_s * 1e3


def time_site(site, batch, dtype, backward):
    from fusedres import cudnn_graph, functional

    cin, cout, k, st, pad, h = site
    cl = torch.channels_last
    x = torch.randn(batch, cin, h, h, device="cuda", dtype=dtype).contiguous(memory_format=cl)
    w = (torch.randn(cout, cin, k, k, device="cuda", dtype=dtype) * (cin * k * k) ** -0.5
         ).contiguous(memory_format=cl)
    gamma, beta = torch.rand(cin, device="cuda") + 0.5, torch.randn(cin, device="cuda") * 0.1
    rm, rv = torch.zeros(cin, device="cuda"), torch.ones(cin, device="cuda")
    scale, shift = gamma.clone(), beta.clone()
    for t in (x, w, gamma, beta, scale, shift):
        t.requires_grad_(backward)
    rows = []
    for kind, prologue in (("F0", False), ("F1", True)):
        row = dict(site=f"{cin}->{cout} {k}x{k}/{st} @{h}", kind=kind, batch=batch,
                   dtype=str(dtype).replace("torch.", ""), pass_="fwd+bwd" if backward else "fwd")
        why = cudnn_graph.problem(x, w, None, st, pad, 1, 1, prologue=prologue) or \
            cudnn_graph.plan_status(x, w, prologue, st, pad)

        def run(loss):
            if backward:
                loss.float().sum().backward()

        def conv():
            run(F.conv2d(x, w, None, st, pad))

        def unfused():
            inp = functional.batch_norm_relu(x, rm, rv, gamma, beta, True, 0.1, 1e-5) \
                if prologue else x
            y = F.conv2d(inp, w, None, st, pad)
            var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
            run(y.float().mean() + mean.sum() + var.sum())

        def graph():
            y, mean, var = cudnn_graph.conv_stats(x, w, st, pad, scale if prologue else None,
                                                  shift if prologue else None)
            run(y.float().mean() + mean.sum() + var.sum())

        try:  # one site that breaks is recorded, the others still run
            row["conv_ms"] = _ms(conv)
            row["conv_bn_ms"] = _ms(unfused)
            if why:
                row["graph"] = f"refused: {why}"
            else:
                row["graph_ms"] = _ms(graph)
                row["speedup_vs_conv_bn"] = row["conv_bn_ms"] / row["graph_ms"]
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def finalize_times(count=256 * 56 * 56):
    """BN finalize after the graphs' sums at each ResNet-50 BN width: the project's
    (``cudnn_graph.bn_finalize(impl="fusedres")``) against cuDNN's bn_finalize graph, with
    running statistics (momentum 0.1), and the largest relative difference of their
    outputs: the measurement ``cudnn_graph.finalize``'s default waits for."""
    from fusedres import cudnn_graph

    rows = []
    for c in (64, 128, 256, 512, 1024, 2048):
        g = torch.Generator(device="cuda").manual_seed(c)
        r = lambda *a: torch.rand(c, device="cuda", generator=g).mul(a[0]).add(a[1])  # noqa: E731
        sums = r(count * 0.2, -count * 0.1)
        sq = sums * sums / count + r(count, count * 0.5)
        gamma, beta, rm, rv = r(1, 0.5), r(0.2, -0.1), r(0.2, -0.1), r(1, 0.5)
        row = dict(kind="cudnn_finalize", channels=c, count=count)
        why = cudnn_graph.finalize_problem(sums, rm, 0.1) or cudnn_graph.finalize_status(sums)
        args = (sums, sq, count, gamma, beta, 1e-5)

        def project():
            return cudnn_graph._finalize_fusedres(*args, rm.clone(), rv.clone(), 0.1, None)

        def cudnn():
            return cudnn_graph._finalize_cudnn(*args, rm.clone(), rv.clone(), 0.1)

        try:
            row["fusedres_ms"] = _ms(project)
            if why:
                row["cudnn"] = f"refused: {why}"
            else:
                row["cudnn_ms"] = _ms(cudnn)
                row["engine"] = cudnn_graph.engine_of_finalize(sums)
                row["speedup"] = row["fusedres_ms"] / row["cudnn_ms"]
                row["max_rel_diff"] = max(float(((a - b).abs() / b.abs().clamp_min(1e-30)).max())
                                          for a, b in zip(cudnn(), project()))
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# (C, H) of ResNet-50's block tails (the output of each stage's blocks)
TAILS = [(256, 56), (512, 28), (1024, 14), (2048, 7)]


def time_tail(tail, batch, dtype, backward, emit=None):
    """The block tail's rows (module docstring), BNAddReLU and DualBNAddReLU; each also
    passed to ``emit`` as it is measured."""
    from fusedres import cudnn_graph, functional, ops

    c, h = tail
    cl = torch.channels_last
    rand = lambda *s: torch.randn(*s, device="cuda")  # noqa: E731
    y, s = (rand(batch, c, h, h).to(dtype).contiguous(memory_format=cl) for _ in range(2))
    w, b, w2, b2 = rand(c) * 0.1 + 1, rand(c) * 0.1, rand(c) * 0.1 + 1, rand(c) * 0.1
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    for t in (y, s, w, b, w2, b2):
        t.requires_grad_(backward)
    stats = [ops.primitives("cuda").stats(ops.ncs(t.detach()), True) for t in (y, s)]
    rows = []
    for kind in cudnn_graph.TAIL_KINDS:
        dual = kind == "DualBNAddReLU"
        row = dict(kind="cudnn_tail", graph=kind, tail=f"{c}x{h}x{h}", batch=batch,
                   dtype=str(dtype).replace("torch.", ""), pass_="fwd+bwd" if backward else "fwd")
        why = cudnn_graph.tail_problem(y, s, True) or cudnn_graph.tail_status(kind, y, True)

        def run(out):
            if backward:
                out.float().sum().backward()

        def kernels():
            if dual:
                run(functional.dual_batch_norm_add_relu(y, s, rm, rv, w, b, rm, rv, w2, b2, True,
                                                        0.1, 1e-5, backend="cuda"))
            else:
                run(functional.batch_norm_add_relu(y, s, rm, rv, w, b, True, 0.1, 1e-5,
                                                   backend="cuda"))

        def given_stats(graph=False):
            extra = dict(shortcut=s, shortcut_weight=w2, shortcut_bias=b2,
                         shortcut_stats=stats[1]) if dual else dict(residual=s)
            run(cudnn_graph.bn_act_with_stats(y, w, b, stats[0], relu=True, eps=1e-5,
                                              backend="cuda", tail_graph=graph, **extra)[0])

        mean, scale, shift = stats[0][0], w.detach(), b.detach()
        mean2 = stats[1][0]
        x3, s3 = ops.ncs(y.detach()), ops.ncs(s.detach())
        args = (None, s3, mean2, w2.detach(), b2.detach()) if dual else (s3, None, None, None,
                                                                         None)
        gargs = (None, s.detach(), mean2, w2.detach(), b2.detach()) if dual else \
            (s.detach(), None, None, None, None)

        try:
            row["kernels_ms"] = _ms(kernels)
            row["given_stats_ms"] = _ms(given_stats)
            row["apply_kernel_ms"] = _ms(lambda: ops.primitives("cuda").apply(
                x3, mean, scale, shift, *args, True, True, True))
            if why:
                row["status"] = f"refused: {why}"
            else:
                row["tail_graph_ms"] = _ms(lambda: given_stats(True))
                row["engine"] = cudnn_graph.tail_engine(kind, y, True)
                if not cudnn_graph.tail_ran():
                    row["status"] = "fell back: " + cudnn_graph.tail_status(kind, y, True)
                row["apply_graph_ms"] = _ms(lambda: cudnn_graph._run_tail(
                    y.detach(), mean, scale, shift, *gargs, True))
                row["speedup_vs_given_stats"] = row["given_stats_ms"] / row["tail_graph_ms"]
                row["speedup_vs_kernels"] = row["kernels_ms"] / row["tail_graph_ms"]
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        if emit is not None:
            emit(row)
    return rows


def train_step_rates(batch, dtype, steps=20):
    """img/s of eager and of the graph path (every BN site's plan conv="cudnn-graph"), the
    latter also with the unfused backward (``cudnn_graph.fused_backward = False``) and
    with every tail's apply as the tail graph (conv="cudnn-graph-tail")."""
    import torchvision

    import fusedres
    from fusedres import cudnn_graph

    out = {}
    for name in ("eager", "cudnn-graph", "cudnn-graph-unfused-backward", "cudnn-graph-tail"):
        cudnn_graph.fused_backward = name != "cudnn-graph-unfused-backward"
        torch.manual_seed(0)
        model = torchvision.models.resnet50().cuda().to(memory_format=torch.channels_last)
        if name != "eager":
            model = fusedres.convert(model)
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.fusedres_plan = fusedres.nn.SitePlan(
                        conv="cudnn-graph-tail" if name == "cudnn-graph-tail" else "cudnn-graph")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(
            memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (batch,), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=dtype):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(3):  # plans, autotune, warm
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        out[name] = batch * steps / (time.perf_counter() - t0)
    cudnn_graph.fused_backward = True
    out["speedup"] = out["cudnn-graph"] / out["eager"]
    out["fused_backward_speedup"] = out["cudnn-graph"] / out["cudnn-graph-unfused-backward"]
    out["tail_graph_speedup"] = out["cudnn-graph-tail"] / out["cudnn-graph"]
    return out


def eval_rates(batch, dtype, steps=20, device="cuda"):
    """img/s of a ResNet-50 eval forward: eager, folded (the converted model, default
    plans) and cudnn-eval (every site's plan), with each one's max |difference| from
    eager's output and the fused calls cuDNN refused."""
    from fusedres import cudnn_eval
    from fusedres.bench.resnet50 import torchvision_or_own

    import fusedres

    torch.manual_seed(0)
    model, _ = torchvision_or_own("resnet50")
    cl = torch.channels_last
    model = model.to(device, memory_format=cl).eval()
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=cl)
    amp = dtype != torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out, ref = {}, None
    for name in ("eager", "folded", "cudnn-eval"):
        if name == "folded":
            model = fusedres.convert(model)
        if name == "cudnn-eval":
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.fusedres_plan = fusedres.nn.SitePlan(conv="cudnn-eval")

        def fwd():
            with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=amp):
                return model(x)

        y = fwd().float()  # warm (cuDNN plans, folded weights)
        ref = y if ref is None else ref
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fwd()
        sync()
        out[name] = batch * steps / (time.perf_counter() - t0)
        out[f"{name}_max_abs_diff"] = float((y - ref).abs().max())
    out["speedup_vs_folded"] = out["cudnn-eval"] / out["folded"]
    out["refused"] = [s for s in cudnn_eval.statuses() if s["status"]]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--sites", help="comma-separated indices into SITES (default: all)")
    p.add_argument("--no-tails", action="store_true", help="skip the block-tail rows")
    p.add_argument("--train", action="store_true")
    p.add_argument("--eval", action="store_true", help="also the ResNet-50 eval forward")
    p.add_argument("--finalize", action="store_true",
                   help="only time BN finalize: the project's against cuDNN's bn_finalize")
    p.add_argument("--tails", action="store_true",
                   help="only time the block tails: today's kernels against the tail graph")
    p.add_argument("--jsonl", help="with --finalize or --tails: append its rows to this "
                                   "JSON-lines file (--tails: each as it is measured)")
    p.add_argument("--out")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_cudnn_sites.py: needs a GPU", file=sys.stderr)
        return 2
    from fusedres import cudnn_graph

    if args.finalize:
        if not cudnn_graph.built():
            print("gpu_cudnn_sites.py: fusedres._C has no cuDNN graph path", file=sys.stderr)
            return 2
        rows = finalize_times()
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
        return 0
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    if args.tails:
        if not cudnn_graph.built():
            print("gpu_cudnn_sites.py: fusedres._C has no cuDNN graph path", file=sys.stderr)
            return 2

        def emit(row):
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")

        for dtype in dtypes:
            for tail in TAILS:
                time_tail(tail, args.batch, dtype, not args.no_backward, emit)
        return 0
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  cudnn=torch.backends.cudnn.version(), sites=[], tails=[], train={},
                  eval={})
    if args.eval:
        for dtype in [torch.float32] + dtypes:
            rates = eval_rates(args.batch, dtype)
            result["eval"][str(dtype)] = rates
            print(json.dumps({"eval": str(dtype), **rates}), flush=True)
    if not cudnn_graph.built():
        print("gpu_cudnn_sites.py: fusedres._C has no cuDNN graph path", file=sys.stderr)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return 0 if args.eval else 2
    for dtype in dtypes:
        for site in ([SITES[int(i)] for i in args.sites.split(",")] if args.sites else SITES):
            result["sites"] += time_site(site, args.batch, dtype, not args.no_backward)
        for tail in ([] if args.no_tails else TAILS):
            result["tails"] += time_tail(tail, args.batch, dtype, not args.no_backward)
    if args.train:
        for dtype in dtypes:
            rates = train_step_rates(args.batch, dtype)
            result["train"][str(dtype)] = rates
            print(json.dumps({"train": str(dtype), **rates}), flush=True)
    result["statuses"] = cudnn_graph.statuses()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

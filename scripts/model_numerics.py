"""Model-level numerics of the C++ CPU backend (issue 22): one fp32 training step of a
converted timm resnet50d and torchvision wide_resnet50_2, judged against a float64 copy.

For each model (random init, one seed) the same inputs and targets go through
  * the truth: the unconverted model in float64 (NCHW),
  * torch in float32, NCHW and channels_last (the yardstick: the worse of the two),
  * ``fusedres.convert(model, backend=BACKEND)`` in float32, NCHW and channels_last.
For each parameter the relative L2 error of its gradient against the truth; the figure is
the geometric mean over parameters (zero-gradient parameters skipped). The target: fused
<= 1.5x the worse of torch's two layouts, in each layout.

    PYTHONPATH=. python scripts/model_numerics.py [--batch 4] [--size 112] [--backend cpu]

CPU only, a few minutes on 2 cores. Exit status 1 when a fused run misses the target.
"""
import argparse
import copy
import math
import sys

import torch

import fusedres


def models():
    import timm
    import torchvision
    return {"timm resnet50d": lambda: timm.create_model("resnet50d", pretrained=False),
            "torchvision wide_resnet50_2": lambda: torchvision.models.wide_resnet50_2()}


def step_grads(model, x, y, dtype, channels_last):
    """Parameter gradients (float64) of one training step's loss."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dtype=dtype, memory_format=fmt).train()
    model.zero_grad(set_to_none=True)
    out = model(x.to(dtype).contiguous(memory_format=fmt))
    torch.nn.functional.cross_entropy(out.float() if dtype != torch.float64 else out,
                                      y).backward()
    return {n: p.grad.detach().double() for n, p in model.named_parameters()
            if p.grad is not None}


def geo_mean_error(grads, truth):
    logs = []
    for name, g in grads.items():
        t = truth[name]
        den = t.norm().item()
        if den > 0:
            logs.append(math.log(max((g - t).norm().item() / den, 1e-300)))
    return math.exp(sum(logs) / len(logs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"fusedres cpu_isa={fusedres.cpu_isa()}, backend {args.backend}, batch {args.batch}, "
          f"{args.size}x{args.size}, threads {torch.get_num_threads()}")
    ok = True
    for name, make in models().items():
        torch.manual_seed(args.seed)
        base = make()
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.batch, 3, args.size, args.size, generator=g, dtype=torch.float64)
        y = torch.randint(0, 1000, (args.batch,), generator=g)
        truth = step_grads(copy.deepcopy(base), x, y, torch.float64, False)
        err = {}
        for cl in (False, True):
            lay = "channels_last" if cl else "nchw"
            err[f"torch {lay}"] = geo_mean_error(
                step_grads(copy.deepcopy(base), x, y, torch.float32, cl), truth)
            fused = fusedres.convert(copy.deepcopy(base), backend=args.backend)
            err[f"fused {lay}"] = geo_mean_error(
                step_grads(fused, x, y, torch.float32, cl), truth)
        worse = max(err["torch nchw"], err["torch channels_last"])
        print(f"{name}: geometric-mean relative L2 error of the parameter gradients")
        for k, v in err.items():
            print(f"  {k:22s} {v:.3e}  ({v / worse:.2f}x the worse torch layout)")
            if k.startswith("fused") and v > 1.5 * worse:
                ok = False
    print("target (fused <= 1.5x the worse torch layout):", "met" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where a fused BN op's GPU time goes, kernel by kernel: ``torch.profiler`` over a few
training forward+backward calls of ``fusedres.functional.batch_norm_relu`` per backend
(and eager's ``relu(F.batch_norm)``) at ResNet-50 shapes, bf16 channels_last.

Written after the first H200 run (2026-12-04), where the CUDA extension's BN ops were
slower than eager at 7x7 and 14x14 while the Triton ones were faster everywhere: this
names the kernels (and their count) behind each backend's time.

    python3 scripts/gpu_profile.py [--shapes 256x512x7x7,...] [--iters 5]

Needs a GPU; prints one table per (shape, backend), CUDA time per kernel name.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

DEFAULT_SHAPES = "256x512x7x7,256x256x14x14,256x128x28x28,256x64x56x56"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES)
    p.add_argument("--backends", default="eager,cuda,triton")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_profile.py: needs a GPU", file=sys.stderr)
        return 2
    import fusedres
    from fusedres import functional as ffn
    from torch.profiler import ProfilerActivity, profile

    avail = fusedres.available_backends()
    for spec in args.shapes.split(","):
        shape = tuple(int(v) for v in spec.split("x"))
        c = shape[1]
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        dout = torch.randn_like(x)
        w = torch.rand(c, device="cuda") + 0.5
        b = torch.randn(c, device="cuda") * 0.1
        w.requires_grad_(), b.requires_grad_()
        rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
        for backend in args.backends.split(","):
            if backend != "eager" and backend not in avail:
                print(f"== {spec} {backend}: not available ({avail})")
                continue

            def step():
                if backend == "eager":
                    y = torch.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))
                else:
                    y = ffn.batch_norm_relu(x, rm, rv, w, b, True, 0.1, 1e-5, backend=backend)
                y.backward(dout)

            for _ in range(3):  # compile, autotune, warm
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.iters):
                    step()
                torch.cuda.synchronize()
            rows = [e for e in prof.key_averages() if e.device_time_total > 0]
            rows.sort(key=lambda e: -e.device_time_total)
            total = sum(e.device_time_total for e in rows) / args.iters
            launches = sum(e.count for e in rows) / args.iters
            print(f"== {spec} {backend}: {total:.1f} us of GPU time per fwd+bwd, "
                  f"{launches:.0f} kernels")
            for e in rows[:10]:
                print(f"   {e.device_time_total / args.iters:9.1f} us  x{e.count / args.iters:4.1f}"
                      f"  {e.key[:110]}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

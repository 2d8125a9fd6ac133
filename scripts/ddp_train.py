"""Train a converted torchvision resnet18 with synchronised BN under DDP, on synthetic
data, for a few steps: CPU with gloo, or GPUs with NCCL.

    torchrun --nproc-per-node=2 scripts/ddp_train.py               # CPU (gloo)
    torchrun --nproc-per-node=2 scripts/ddp_train.py --device cuda # one GPU per process

Each process gets its own slice of every global batch; fusedres.convert(sync_bn=True)
makes every BN normalise over the global batch (one all_gather of per-channel
(count, mean, M2) forward, one all_reduce backward) inside the fused kernels.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torchvision

import fusedres


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8, help="per process")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--backend", default="auto", help="fusedres backend")
    args = ap.parse_args()

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(device)
    model = model.to(memory_format=torch.channels_last)
    model = fusedres.convert(model, backend=args.backend, sync_bn=True)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(1234 + rank)  # each rank its own synthetic data
    for step in range(args.steps):
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen)
        y = torch.randint(0, 10, (args.batch_size,), generator=gen)
        x = x.to(device).to(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(ddp(x), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        dist.all_reduce(loss.detach())
        if rank == 0:
            print(f"step {step}: loss {loss.item() / world:.4f}, "
                  f"{args.batch_size * world / dt:.1f} images/s ({world} processes, "
                  f"backend {fusedres.nn.last_backend()})", flush=True)
    dist.barrier()  # gloo aborts a rank whose peer tears the group down first
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

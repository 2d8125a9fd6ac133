"""Triton kernels of fusedres, installed as ``fusedres.kernels``.

One file per fused-kernel family: ``bn.py`` (BN statistics, BN(+add)+ReLU apply and
their backward), ``conv.py`` (implicit-GEMM convolution with fused prologue/epilogue).
Importing this package does not import triton; each file does.
"""
import contextlib

import torch


def device_guard(t: torch.Tensor):
    """The current CUDA device set to ``t``'s for a launch (a Triton kernel launches on the
    current device: tensors on cuda:1 while cuda:0 is current would fault); nothing on
    CPU (the interpreter)."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)

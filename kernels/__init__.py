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


def autotune(configs, key, **kwargs):
    """``triton.autotune`` with its choices kept on disk where this Triton can
    (``cache_results``, Triton >= 3.3): each new shape is benchmarked once per machine
    rather than once per process -- a ResNet-50's first training step otherwise re-times
    every BN and conv kernel family at every layer shape -- and a second process runs the
    configs the first one picked (the same bits, not a fresh timing-based choice)."""
    import inspect

    import triton

    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs.setdefault("cache_results", True)
    return triton.autotune(configs=configs, key=key, **kwargs)

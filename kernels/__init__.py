"""Triton kernels of fusedres, installed as ``fusedres.kernels``.

One file per fused-kernel family: ``bn.py`` (BN statistics, BN(+add)+ReLU apply and
their backward), ``conv.py`` (implicit-GEMM convolution with fused prologue/epilogue).
Importing this package does not import triton; each file does.
"""

"""Which backends exist in this process, and which one an op call uses.

The backend is resolved in Python before an op is called, from a fixed table by
device (never by timing, never the Triton interpreter unless asked for by name):

    device   auto picks, in order        also accepted by name
    cpu      cpu, reference              triton (only under TRITON_INTERPRET=1)
    cuda     triton, cuda, reference

On CUDA the Triton BN kernels come first because they were measured faster: on an H200
(bf16, channels_last, batch 256, every ResNet-50 BN shape; benchmarks/results/
h200-2026-12-04/ops.jsonl) they ran 1.29-3.46x eager on all 32 rows, the CUDA C++ kernels
0.56-2.72x (slower than eager at 7x7 and 14x14, where their reductions are slow).
Convs are not chosen here: untuned, every conv is F.conv2d (cuDNN), whatever the BN
backend (``fusedres.nn.conv_choice``).

Nothing here queries the GPU at import time.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Optional

import torch

logger = logging.getLogger("fusedres")

BACKENDS = ("reference", "cpu", "cuda", "triton")
# Runs the fused-op pipeline on fusedres.reference's pure-PyTorch primitives: tests the
# plumbing (finalize math, autograd) apart from any kernel. Never chosen by "auto".
PLUMBING_BACKEND = "reference_primitives"

try:
    from . import _C  # noqa: F401  (registers the C++/CUDA ops)

    extension_error = None
except ImportError as exc:  # the package works without the compiled extension
    extension_error = exc
    logger.info("fusedres._C not loaded (%s): the cpu and cuda backends are unavailable", exc)


def _has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedres::{op}", key)
    except RuntimeError:  # the op is not defined at all
        return False


def _find_triton() -> bool:
    try:
        return (importlib.util.find_spec("triton") is not None
                and importlib.util.find_spec("fusedres.kernels.bn") is not None)
    except ModuleNotFoundError:
        return False


# Fixed for the life of the process once fusedres._C is loaded (above); read once here so
# that resolving a backend is plain Python that torch.compile traces without a break.
_CPU_KERNELS = _has_kernel("bn_stats", "CPU")
_CUDA_KERNELS = _has_kernel("bn_stats", "CUDA")
_TRITON = _find_triton()
_TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_cpu_kernels() -> bool:
    return _CPU_KERNELS


def has_cuda_kernels() -> bool:
    return _CUDA_KERNELS


def cpu_isa() -> Optional[str]:
    """The vector instruction set the ``cpu`` backend's kernels run with in this process:
    ``"avx512"``, ``"avx2"`` or ``"default"`` (the build's baseline); None without
    ``fusedres._C``. The widest the processor has, capped by torch's own CPU capability
    (``ATEN_CPU_CAPABILITY``) and by ``FUSEDRES_CPU_ISA=default|avx2|avx512``."""
    return torch.ops.fusedres.cpu_isa() if has_cpu_kernels() else None


def triton_interpreted() -> bool:
    """TRITON_INTERPRET=1 was set when fusedres was imported (triton reads it once too)."""
    return _TRITON_INTERPRETED


def has_triton() -> bool:
    """triton is installed and the Triton BN kernels ship with this copy of fusedres."""
    return _TRITON


def available_backends() -> list[str]:
    """The backends usable in this process (on some device that is present)."""
    out = ["reference"]
    if has_cpu_kernels():
        out.append("cpu")
    gpu = torch.cuda.is_available()
    if gpu and has_cuda_kernels():
        out.append("cuda")
    if has_triton() and (gpu or triton_interpreted()):
        out.append("triton")
    return out


def backend_supports(backend: str, device: torch.device) -> bool:
    if backend in ("reference", PLUMBING_BACKEND):
        return True
    if backend == "cpu":
        return device.type == "cpu" and has_cpu_kernels()
    if backend == "cuda":
        return device.type == "cuda" and has_cuda_kernels()
    if backend == "triton":
        if not has_triton():
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    return False


_AUTO = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}


def resolve_backend(device: torch.device, backend: str = "auto") -> str:
    """The backend an op on ``device`` runs with; raises if a named one cannot run there."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    resolved = _RESOLVED.get((device_type, backend)) if isinstance(backend, str) else None
    return resolved if resolved is not None else _resolve(torch.device(device), backend)


def _resolve(device: torch.device, backend: str) -> str:
    if backend == "auto":
        for name in _AUTO.get(device.type, ("reference",)):
            if backend_supports(name, device):
                return name
        return "reference"
    if backend not in BACKENDS + (PLUMBING_BACKEND,):
        raise ValueError(f"unknown fusedres backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if not backend_supports(backend, device):
        reason = {
            "cpu": "fusedres._C with CPU kernels is not loaded" if not has_cpu_kernels()
            else "it runs on CPU tensors only",
            "cuda": "fusedres._C was built without CUDA kernels" if not has_cuda_kernels()
            else "it runs on CUDA tensors only",
            "triton": "triton is not installed" if not has_triton()
            else "on CPU tensors it needs TRITON_INTERPRET=1 set before triton is imported",
        }[backend]
        raise RuntimeError(f"fusedres backend {backend!r} cannot run on {device.type} tensors: "
                           f"{reason}. Available here: {available_backends()}")
    return backend


def _resolvable(device_type: str, backend: str) -> bool:
    """_resolve would answer (not raise): without building its error message, which asks
    torch.cuda whether a GPU is present."""
    return backend == "auto" or backend_supports(backend, torch.device(device_type))


# Every answer depends on the device type and the facts read once above, so the common
# ones are looked up (a call per fused op: the resolution above cost ~10 us per training
# step of a 7x7 layer on CPU, its Python cold in the cache after the layer's data). Never
# changed after import: torch.compile traces the lookup as a constant.
_RESOLVED = {(device_type, backend): _resolve(torch.device(device_type), backend)
             for device_type in ("cpu", "cuda")
             for backend in ("auto",) + BACKENDS + (PLUMBING_BACKEND,)
             if _resolvable(device_type, backend)}


def check_site_backend(backend: str, device: torch.device, bn) -> None:
    """At a fused site's forward (``fusedres.nn.conv_bn_act``): a ``backend`` fixed at
    convert or tune time that can never run on the tensors' ``device`` raises here, one
    line naming the site (``bn.fusedres_site``, set by ``convert``) and the remedy,
    instead of an error from deep inside the op. The common case is one dict lookup."""
    if backend == "torch" or (device.type, backend) in _RESOLVED:
        return
    try:
        _resolve(device, backend)
        return
    except RuntimeError as exc:
        why = str(exc).splitlines()[0]
    site = getattr(bn, "fusedres_site", None) or type(bn).__name__
    if getattr(bn, "fusedres_tuning", None) is not None:
        remedy = (f"tune the model again on {device.type} (fusedres.tune(model, x) with x on "
                  f"{device.type}), or move model and inputs back to the device it was "
                  "tuned on")
    else:
        remedy = (f"convert with backend='auto' (picks what runs on {device.type}), or move "
                  f"model and inputs to a device {backend!r} runs on")
    raise RuntimeError(f"fusedres: fused site {site!r} cannot run: {why}. Remedy: {remedy}")

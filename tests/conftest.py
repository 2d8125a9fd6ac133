"""Test setup: without a GPU, Triton kernels run in its interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is imported (a GPU machine must never set
it, or GPU tests silently run in the interpreter)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fusedres  # noqa: E402


def kernel_backends():
    """Backends with fused kernels usable here, plus the plumbing backend, each with the
    device its tests run on."""
    out = [("reference_primitives", "cpu")]
    avail = fusedres.available_backends()
    if "cpu" in avail:
        out.append(("cpu", "cpu"))
    if "cuda" in avail:
        out.append(("cuda", "cuda"))
    if "triton" in avail:
        out.append(("triton", "cuda" if torch.cuda.is_available() else "cpu"))
    return out


def pytest_report_header(config):
    return (f"fusedres backends: {fusedres.available_backends()}; "
            f"_C: {'loaded' if fusedres.extension_error is None else fusedres.extension_error}; "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")


@pytest.fixture(params=kernel_backends(), ids=lambda p: p[0])
def backend_device(request):
    return request.param

"""How fusedres._C was linked: one libstdc++ in the process.

The first H200 run (2026-12-04) built _C with a g++ wrapper that links libstdc++
statically. The static copy's std::ostream then met the locale facets of the shared
libstdc++ that torch loads, and every error message printing a number crashed the process
(SIGSEGV in the first check of tests/test_cuda_kernels.py::test_errors); here, with the
same wrapper, the number was silently dropped. setup.py now names the shared libstdc++
on the link line; these tests fail on an extension built the old way (checked with
``CXX`` set to a wrapper that appends -static-libstdc++).
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

import fusedres
from fusedres._backend import has_cpu_kernels

pytestmark = pytest.mark.skipif(not has_cpu_kernels(),
                                reason=f"fusedres._C not loaded: {fusedres.extension_error}")


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="reads the ELF dynamic section with readelf (Linux)")
def test_extension_needs_the_shared_libstdcxx():
    from fusedres import _C

    out = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True,
                         check=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in out.splitlines()
              if "(NEEDED)" in line]
    assert any(n.startswith("libstdc++.so") for n in needed), needed


def test_error_messages_keep_their_numbers():
    with pytest.raises(RuntimeError, match=r"got 2 dims"):
        torch.ops.fusedres.bn_stats(torch.randn(2, 20), False)
    x = torch.randn(2, 4, 5)
    with pytest.raises(RuntimeError, match=r"C = 4, got shape \[3\]"):
        torch.ops.fusedres.bn_apply(x, torch.zeros(3), torch.ones(4), torch.zeros(4), None,
                                    None, None, None, None, True, False, False)

"""Every ```python block of README.md and docs/*.md runs as written (on CPU).

A block that needs what this machine may lack says so in a comment line of its own:

    # doctest: +GPU        needs a CUDA device (run where one is present)
    # doctest: +TORCHRUN   needs an initialised torch.distributed process group

and is skipped here with that reason; no other block may be skipped. Each block runs in a
fresh namespace, in its own subprocess (an example may set global state: backends,
process-wide flags), from the repository root.
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
MARKERS = {
    "+GPU": ("a CUDA device", torch.cuda.is_available),
    "+TORCHRUN": ("torchrun (an initialised process group)", lambda: False),
}
_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
_MARKER = re.compile(r"^\s*# doctest: (\+\w+)", re.M)


def blocks():
    out = []
    for path in FILES:
        text = path.read_text()
        for m in _BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            out.append(pytest.param(path, line, m.group(1),
                                    id=f"{path.relative_to(ROOT)}:{line}"))
    return out


BLOCKS = blocks()


def test_blocks_found():
    """The extraction sees the examples (the README's and docs/convert.md's at least)."""
    names = {p.values[0].name for p in BLOCKS}
    assert {"README.md", "convert.md"} <= names
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("path,line,code", BLOCKS)
def test_example_runs(path, line, code, tmp_path):
    for marker in _MARKER.findall(code):
        if marker not in MARKERS:
            pytest.fail(f"unknown doctest marker {marker} (known: {sorted(MARKERS)})")
        need, present = MARKERS[marker]
        if not present():
            pytest.skip(f"needs {need}")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               FUSEDRES_CACHE_DIR=str(tmp_path))  # the tune examples: not the user's cache
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (
        f"{path.name}:{line} failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}")

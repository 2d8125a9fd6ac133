"""fusedres-bench doctor on CPU: every check passes on the built kernels, and a broken
kernel makes it fail (exit status 1, the kernel named)."""
import json

import pytest
import torch

import fusedres
from fusedres import ops
from fusedres.bench import cli


def test_doctor_passes_on_this_machine(tmp_path, capsys):
    out = tmp_path / "doctor.json"
    assert cli.main(["doctor", "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["passed"] and data["rows"]
    kernels = {(r["kernel"], r["backend"]) for r in data["rows"]}
    for backend in fusedres.available_backends():
        if backend in ("cpu", "triton"):  # triton: under the interpreter (conftest)
            assert ("bn_apply+dual", backend) in kernels
            assert ("batch_norm_add_relu (train fwd+bwd)", backend) in kernels
    if "triton" in fusedres.available_backends():
        assert ("conv2d_stats", "triton") in kernels
    assert all(r["ok"] and r["error"] <= r["tolerance"] for r in data["rows"])
    captured = capsys.readouterr()
    assert "bn_stats" in captured.out and "FAIL" not in captured.out
    # progress by default (no --verbose): each step, then its rows as they finish
    progress = [line for line in captured.err.splitlines() if line.startswith("[doctor]")]
    assert progress[0].startswith("[doctor] step 1 of ")
    finished = [line for line in progress if ": pass (max error" in line]
    assert len(finished) >= len(data["rows"]), progress


@pytest.mark.skipif("cpu" not in fusedres.available_backends(),
                    reason="fusedres._C has no CPU kernels (not built)")
def test_doctor_fails_on_a_broken_kernel(monkeypatch, tmp_path, capsys):
    real = ops.primitives

    def primitives(backend):
        p = real(backend)
        if backend != "cpu":
            return p

        def apply(*args):  # one channel off by 1%
            out, mask = p.apply(*args)
            out = out.clone()
            out[:, 0] *= 1.01
            return out, mask

        return p._replace(apply=apply)

    monkeypatch.setattr(ops, "primitives", primitives)
    out = tmp_path / "doctor.json"
    assert cli.main(["doctor", "--device", "cpu", "--only", "^bn_apply.* cpu$",
                     "--out", str(out)]) == 1
    data = json.loads(out.read_text())
    failed = {r["kernel"] for r in data["rows"] if not r["ok"]}
    assert failed == {"bn_apply", "bn_apply+residual", "bn_apply+dual"}
    captured = capsys.readouterr()
    assert "FAIL bn_apply" in captured.out
    assert "[doctor]   bn_apply / cpu / float32: FAIL" in captured.err  # as it finished

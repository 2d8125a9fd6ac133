"""The static check of the CUDA kernels (scripts/static_cuda.py) as a test: every .cu
compiled for sm_90 and read back from SASS; fails when a memory-bound kernel's vector
path takes more than 24 instructions per element (fp32, bf16) or any kernel spills.
Needs nvcc and cuobjdump (no GPU); skipped without them."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("static_cuda",
                                               os.path.join(ROOT, "scripts", "static_cuda.py"))
static_cuda = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(static_cuda)

NVCC, CUOBJDUMP = static_cuda.find_tool("nvcc"), static_cuda.find_tool("cuobjdump")
pytestmark = pytest.mark.skipif(not (NVCC and CUOBJDUMP),
                                reason=f"needs nvcc and cuobjdump (found {NVCC}, {CUOBJDUMP})")


@pytest.fixture(scope="module")
def rows():
    import glob
    files = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
    return static_cuda.analyse(files, NVCC, CUOBJDUMP)


def test_every_kernel_read(rows):
    kernels = {r["kernel"].split("<")[0] for r in rows}
    assert {"bn_apply_kernel", "bn_backward_apply_kernel", "reduce_outer_kernel",
            "reduce_inner_kernel", "merge_partials_kernel"} <= kernels
    targeted = [r for r in rows if r["target"]]
    assert len(targeted) >= 16, "the vector paths of fp32/bf16 were not all found"
    assert all("instr_per_element" in r for r in targeted)


def test_targets(rows):
    assert static_cuda.check(rows) == []


def test_known_exceptions_still_exist(rows):
    # An exception that no longer applies must leave KNOWN_OVER (it would hide a regression).
    over = {r["kernel"] for r in rows
            if r.get("instr_per_element", 0) > static_cuda.MAX_INSTR_PER_ELEM}
    assert set(static_cuda.KNOWN_OVER) <= over


def test_counting_sees_a_slow_loop(rows):
    # The method can fail: the generic (strided, element by element) paths of the same
    # kernels take far more than 24 instructions per element.
    generic = [r for r in rows if r["kernel"].startswith("bn_backward_apply_kernel<float, 1,")]
    assert len(generic) == 3 and all(r["instr_per_element"] > 24 for r in generic)


def test_planes_boundary_pass_reported(rows):
    # kPlanesPath (NCHW) runs the chunks across two channel planes in a pass of their own:
    # the table must show it beside the main pass, not only the faster loop.
    planes = [r for r in rows if r["target"] and r["kernel"].startswith(
        ("bn_apply_kernel", "bn_backward_apply_kernel")) and ", 3," in r["kernel"]]
    assert len(planes) == 10
    assert all(r.get("other_loop_instr_per_element", 0) > r["instr_per_element"]
               for r in planes)


def test_small_shape_reductions_keep_enough_in_flight(rows):
    # Issue 12 finding 5: reduce_inner at 7x7x512 (batch 64) keeps >= 13 KiB/SM of loads in
    # flight in every mode and type (the launcher's grid: min_steps_inner). The figure can
    # fail: with 4 steps per thread (the old grid) the bf16 statistics fall under it.
    entries = static_cuda.small_shape_in_flight(rows)
    assert len(entries) == 8 and static_cuda.check(rows) == []
    assert min(e["kib_per_sm"] for e in entries) >= static_cuda.MIN_KIB_IN_FLIGHT
    old = static_cuda.small_shape_in_flight(rows, min_steps=4)
    assert any(e["kib_per_sm"] < static_cuda.MIN_KIB_IN_FLIGHT for e in old)


def test_no_kernel_spills(rows):
    # Issue 22: no spills in any kernel, not only the vector paths of fp32/bf16 (ptxas,
    # left to its own register target, spilled in reduce_inner's scalar mask-any backward
    # and its double statistics; min_blocks_inner in bn_kernels.cu caps them instead).
    assert all("spill_bytes" in r for r in rows), "ptxas -v output not read for every kernel"
    assert [(r["kernel"], r["spill_bytes"]) for r in rows if r["spill_bytes"]] == []


def test_ptxas_spills_are_read():
    # The check above can fail: a spill in ptxas -v's report reaches the row.
    text = ("ptxas info    : Function properties for _Z1kv\n"
            "    16 bytes stack frame, 20 bytes spill stores, 24 bytes spill loads\n"
            "ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem\n")
    info = static_cuda.parse_ptxas(text)["_Z1kv"]
    assert info["spill_bytes"] == 44 and info["registers"] == 40 and info["smem_bytes"] == 2048


def test_uniform_registers_are_not_uses():
    # Issue 22: the R12 inside a load's UR12 descriptor is not a use of R12 (that misreading
    # cut reduce_inner's 8 loads in flight to 2 in the table).
    instrs = [(0, "LDG.E.128.CONSTANT R12, desc[UR4][R2.64] ;"),
              (16, "LDG.E.128.CONSTANT R16, desc[UR12][R4.64] ;"),
              (32, "FADD R20, R12, R16 ;")]
    assert static_cuda.bytes_before_first_use(instrs, [0, 1, 2]) == 32
    instrs[1] = (16, "LDG.E.128.CONSTANT R16, desc[UR4][R12.64] ;")  # a real use
    assert static_cuda.bytes_before_first_use(instrs, [0, 1, 2]) == 16

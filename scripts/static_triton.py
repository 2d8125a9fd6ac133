"""Static GPU check of every Triton kernel: compile for sm_90 without a GPU and read what
the compiler produced.

For every kernel specialisation the ResNet-50 shapes produce (kernels/bn.py: the BN
statistics, finalize, apply and backward kernels in their channels-last / NCHW and
shortcut variants; kernels/conv.py: forward, statistics, BN-ReLU prologue, eval
epilogue, dgrad with and without the dBN prologue / dReLU epilogue, wgrad with and
without the dBN and BN-ReLU prologues; each in bf16, fp16 and fp32 (TF32), each
autotuning config), Triton's real pipeline runs
(ttir -> ttgir -> llir -> ptx -> cubin for GPUTarget("cuda", 90, 32), i.e. sm_90a), and
the cubin is read with the tools shipped in the triton wheel (ptxas -v, cuobjdump -sass):

* registers, spill stores/loads (bytes), shared memory (bytes);
* global load / store instructions by width (LDG/STG .128, .64, 32-bit, 16, 8);
* the hot loop (the innermost backward branch that holds the main work: the tensor-core
  instructions for conv, the global loads for reductions): its SASS instruction count,
  and for memory-bound kernels the instructions per element (loop instructions per
  thread / elements a thread handles per iteration; kernels without a loop: all
  instructions per element of the program);
* tensor-core instructions (HGMMA = wgmma, HMMA = mma.sync) in the kernel;
* 64-bit integer division (div/rem .s64/.u64 in the PTX: a ~84-instruction SASS routine
  per use, called with CALL);
* conv kernels (issue 21): cp.async copies (LDGSTS, by width) and their commit groups
  (LDGDEPBAR) apart from LDG; TMA tile loads/stores (UTMALDG/UTMASTG); the HGMMA shapes;
  HGMMA per hot-loop iteration and hot-loop SASS per HGMMA; the WARPGROUP.DEPBAR.LE
  immediates in the hot loop (wgmma groups left in flight); integer div/rem of any
  width (TTGIR and PTX) and CALL in the hot loop; ptxas warnings; and ``hopper_gaps``,
  the figures by which a bf16 forward row misses issue 21's bar (HOPPER_BAR).

Writes benchmarks/static/triton.json and triton.md (the table).  Regenerate with

    .venv/bin/python scripts/static_triton.py            # every specialisation (~15 min)
    .venv/bin/python scripts/static_triton.py --quick    # a representative subset
    .venv/bin/python scripts/static_triton.py --only conv --keep-others  # conv rows only
    .venv/bin/python scripts/static_triton.py --only conv --dtype bf16 --match fwd \
        --out /tmp/x                                     # a few rows, elsewhere
    .venv/bin/python scripts/static_triton.py --python /work/venv36/bin/python \
        --out benchmarks/static/triton-3.6               # under another Triton (venv)
    .venv/bin/python scripts/static_triton.py --only conv --dtype bf16 --match 'VARIANT' \
        --out /tmp/x --dump /tmp/x/code                  # + each row's TTGIR/PTX/SASS and
                                                         # hot loop, to compare Tritons

triton.json records the sha256 of the kernel sources its rows came from (``sources``):
tests/test_static_triton.py fails when the committed Triton 3.6 table is older than them.

Run without TRITON_INTERPRET=1 (the interpreter replaces the compiler).  No GPU, driver
or CUDA toolkit is needed beyond the triton wheel.  tests/test_static_triton.py compiles
the representative subset and fails on spills in memory-bound kernels or conv main
loops, and on 64-bit division in the conv kernels.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter replaces the compiler")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _load(name):
    """kernels/<name>.py as a module, without importing fusedres (no torch.ops needed)."""
    spec = importlib.util.spec_from_file_location(f"_static_{name}",
                                                  os.path.join(ROOT, "kernels", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, ROOT)
    spec.loader.exec_module(mod)
    return mod


def row_source(kernel: str) -> str:
    """The kernel source file a row of ``kernel`` is compiled from (repository path)."""
    return "kernels/conv.py" if kernel.startswith("conv") else "kernels/bn.py"


def source_digest(path: str) -> str:
    """sha256 of a kernel source file (repository path): triton.json records the digests
    of the sources its rows were compiled from, so that a committed table older than its
    kernels is seen (tests/test_static_triton.py, for the Triton 3.6 table CI cannot
    regenerate)."""
    with open(os.path.join(ROOT, path), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# --------------------------------------------------------------------------------------
# Compile and read
# --------------------------------------------------------------------------------------


@dataclass
class Result:
    kernel: str
    variant: str
    dtype: str
    config: str
    memory_bound: bool
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    loads: dict = field(default_factory=dict)
    stores: dict = field(default_factory=dict)
    hot_spills: int = 0  # STL/LDL in a loop (memory-bound: any; conv: the main loop)
    loop_instructions: int = 0
    elements_per_thread: float = 0.0
    instructions_per_element: float = 0.0
    hgmma: int = 0
    hmma: int = 0
    div64: int = 0
    # cp.async / TMA / wgmma reading (issue 21); conv kernels only, 0/{} elsewhere
    ldgsts: dict = field(default_factory=dict)  # cp.async by width in bits
    ldgdepbar: int = 0  # cp.async commit groups (LDGDEPBAR), not loads
    utmaldg: int = 0  # TMA tile loads (cp.async.bulk.tensor global -> shared)
    utmastg: int = 0  # TMA tile stores
    hgmma_shapes: dict = field(default_factory=dict)  # "64x128x16": count, whole kernel
    loop_hgmma: int = 0  # HGMMA in the hot loop (one K step per iteration)
    per_tile_instructions: int = 0  # hot-loop SASS in per-tile branches (flattened loops)
    epilogue_overlap: bool = False  # the hot loop issues operand loads before the epilogue
    sass_per_hgmma: float = 0.0  # hot-loop SASS instructions / hot-loop HGMMA
    wgmma_wait: list = field(default_factory=list)  # WARPGROUP.DEPBAR.LE immediates, loop
    loop_div: int = 0  # integer div/rem (any width) in the hot loop: TTGIR + PTX
    loop_calls: int = 0  # CALL in the hot loop (a division or other routine)
    ptxas_warnings: list = field(default_factory=list)  # e.g. C7510 wgmma serialised
    compile_s: float = 0.0
    error: str = ""


# int arguments the JIT sees as multiples of 16 at ResNet-50 shapes (channels 64..2048,
# channels-last strides are multiples of C, N*C*S of them too); a stride of 1 the JIT
# specialises as a constant: the specs pass those as constexprs.
DIV16 = {"total", "C", "N_CHUNK", "S_CHUNK", "P",
         "stride_xn", "stride_xs", "stride_rn", "stride_rs", "stride_x2n", "stride_x2s",
         "stride_dn", "stride_ds",
         "CI", "CO", "GEMM_N", "sxn", "sxh", "sxw", "swo", "swr", "sws", "syn", "syh", "syw",
         "srn", "srh", "srw", "spn", "sph", "spw", "sen", "seh", "sew", "sdn", "sdh", "sdw"}


def compile_kernel(fn, ptrs, consts, num_warps, num_stages=3, ints64=(), floats=(),
                   div16=DIV16, target=TARGET):
    """triton.compile of a @triton.jit kernel (sm_90 by default).  ``ptrs`` maps pointer
    argument names to their type ("*bf16"...; key "*default" for the rest); other
    arguments are i32 (i64 if in ``ints64``, fp32 if in ``floats`` or named *_hi/*_lo),
    16-divisible where named in ``div16``, like the JIT's specialisation."""
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in consts:
            sig[a] = "constexpr"
        elif a.endswith("_ptr"):
            sig[a] = ptrs.get(a, ptrs.get("*default"))
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif a.endswith("_desc"):  # "tensordesc<bf16[128, 64]>", or a pointer when unused
            sig[a] = ptrs.get(a, ptrs.get("*default"))
            if sig[a].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif a in floats or a.endswith(("_hi", "_lo")):
            sig[a] = "fp32"
        else:
            sig[a] = "i64" if a in ints64 else "i32"
            if a in div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v
                                         for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=target,
                          options={"num_warps": num_warps, "num_stages": num_stages})


# LDG/STG only: cp.async (LDGSTS) and its commit (LDGDEPBAR) are counted apart
_LDG = re.compile(r"\b(LDG|STG)\b(?:\.E)?((?:\.[A-Z0-9_]+)*)")
_LDGSTS = re.compile(r"\bLDGSTS((?:\.[A-Z0-9_]+)*)")
_HGMMA_SHAPE = re.compile(r"\bHGMMA\.(\d+x\d+x\d+)")
_DEPBAR = re.compile(r"\bWARPGROUP\.DEPBAR\.LE\s+gsb0\s*,\s*(0x[0-9a-f]+)")
_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", re.M)


def _width(mods: str) -> str:
    """Access width in bits from the SASS modifiers (whole tokens: ``.LTC128B`` is a cache
    hint, not a width); no width modifier means 32 bits."""
    tokens = mods.split(".")
    for w in ("128", "64", "U16", "S16", "U8", "S8"):
        if w in tokens:
            return w.lstrip("US")
    return "32"


def _loops_by_line(lines, label_re, branch_re):
    """(first, last) line ranges of the backward branches of a listing whose labels match
    ``label_re`` (group 1 the name) and branches ``branch_re`` (group 1 the target)."""
    where, loops = {}, []
    for i, line in enumerate(lines):
        m = re.match(label_re, line)
        if m:
            where[m.group(1)] = i
        m = re.search(branch_re, line)
        if m and m.group(1) in where and where[m.group(1)] < i:
            loops.append((where[m.group(1)], i))
    return loops


_DIV = r"\b(?:div|rem)\.(?:s|u)(?:16|32|64)\b"


def ptx_loop_divisions(ptx: str, hot=r"\bwgmma\.mma_async|\bmma\.sync"):
    """Integer div/rem of any width in the innermost PTX loop holding ``hot``."""
    lines = ptx.splitlines()
    loops = _loops_by_line(lines, r"^\s*(\$L__\w+):", r"\bbra(?:\.uni)?\s+(\$L__\w+);")
    best = None
    for a, b in loops:
        body = lines[a:b + 1]
        if any(re.search(hot, t) for t in body) and (best is None or len(body) < len(best)):
            best = body
    # less the per-tile branches of a flattened tile x K loop (as per_tile_branches): a
    # conditional forward branch over code with no MMA and no operand load
    k_step = re.compile(hot + r"|\bcp\.async")
    body, keep = best or [], []
    labels = {m.group(1): i for i, t in enumerate(body)
              for m in [re.match(r"^\s*(\$L__\w+):", t)] if m}
    skip_to = -1
    for i, t in enumerate(body):
        m = re.search(r"@%\w+\s+bra(?:\.uni)?\s+(\$L__\w+);", t)
        if i > skip_to and m and labels.get(m.group(1), -1) > i and not any(
                k_step.search(u) for u in body[i + 1:labels[m.group(1)]]):
            skip_to = labels[m.group(1)] - 1
        if i <= skip_to and not m:
            continue
        keep.append(t)
    return sum(len(re.findall(_DIV, t)) for t in keep)


def ttgir_loop_divisions(ttgir: str):
    """``arith.{div,rem}{si,ui}`` inside the innermost ``scf.for`` bodies that hold a dot
    (the K loop; the setup's and a persistent tile loop's per-tile divisions are not
    per K step)."""
    lines = ttgir.splitlines()
    fors, ifs, stack, depth = [], [], [], 0
    for i, line in enumerate(lines):
        m = re.search(r"\bscf\.(for|if)\b", line)
        if m and line.rstrip().endswith("{"):
            stack.append((i, depth, m.group(1)))
        depth += line.count("{") - line.count("}")
        while stack and depth <= stack[-1][1]:
            a, _, kind = stack.pop()
            (fors if kind == "for" else ifs).append((a, i))
    dot = re.compile(r"warp_group_dot\b|\btt\.dot\b|\bttng\.\w*mma\b")
    div = re.compile(r"arith\.(?:div|rem)[su]i\b")
    with_dot = [(a, b) for a, b in fors if any(dot.search(t) for t in lines[a:b + 1])]
    hot = set()
    for a, b in with_dot:
        if not any(a < c and d <= b for c, d in with_dot if (c, d) != (a, b)):
            hot.update(range(a + 1, b + 1))
    # a flattened tile x K loop computes the next tile's indices in an scf.if (once per
    # tile, no dot in it): not per K step
    for a, b in ifs:
        if not any(dot.search(t) for t in lines[a:b + 1]):
            hot.difference_update(range(a, b + 1))
    return sum(bool(div.search(lines[i])) for i in hot)


def _ptxas_warnings(info: str):
    """ptxas warnings and performance notes, one line each (the C75xx "Potential
    Performance Loss" infos say why wgmma was serialised)."""
    out = set()
    for line in info.splitlines():
        if "warning" in line:
            out.add(line.split("warning", 1)[1].strip(" :")[:160])
        elif re.search(r"\(C75\d\d\)", line):
            out.add(line[line.index("(C75"):][:160])
    return sorted(out)


def read_sass(sass: str, hot: str):
    """(instructions by address of the kernel's own body, loops as (start, end) address
    ranges).  The body ends at the first self-branch (``BRA`` to itself, the padding
    after the last EXIT); called routines (e.g. 64-bit division) come after it and are
    left out, as their calls are counted (div64)."""
    instrs = [(int(a, 16), text.strip()) for a, text in _INSTR.findall(sass)]
    for i, (addr, text) in enumerate(instrs):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) == addr:
            instrs = instrs[:i]
            break
    loops = []
    exits = [a for a, t in instrs if re.match(r"EXIT\b", t)]
    # unconditional backward jumps (address, target): an outer loop's back edge
    back = [(a, _branch_target(t)) for a, t in instrs if re.match(r"BRA\b", t)]
    back = [(a, b) for a, b in back if b is not None and b < a]
    for addr, text in instrs:
        target = _branch_target(text)
        # a backward jump over an EXIT is no loop: the return from out-of-line code (a
        # barrier's retry wait after the kernel's end) into the middle of the body; nor
        # one over an outer loop's back edge (an unconditional jump to before ``target``:
        # falling through from ``target`` never reaches it), the return of such a wait
        # placed after a persistent kernel's tile loop (it made a K loop's tail and the
        # epilogue read as the hot loop)
        if target is not None and target < addr and not any(
                target < e < addr for e in exits) and not any(
                target < a < addr and b < target for a, b in back):
            loops.append((target, addr))
    return instrs, loops


def _branch_target(text):
    m = re.search(r"\bBRA(?:\.\S+)?\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
    if m is None:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
    return int(m.group(1), 16) if m else None


def hot_loop(instrs, loops, hot: str, addresses=False):
    """The innermost loop that holds a ``hot`` instruction (regex): its instructions
    (``(address, text)`` pairs with ``addresses``)."""
    best = None
    for start, end in loops:
        body = [(a, t) for a, t in instrs if start <= a <= end]
        if any(re.search(hot, t) for _, t in body) and (best is None or len(body) < len(best)):
            best = body
    return (best or []) if addresses else [t for _, t in best or []]


# the work of a K step: the MMAs and the loads that feed them (TMA, cp.async)
_K_STEP = re.compile(r"\b(?:[HQ]GMMA|HMMA|UTMALDG|LDGSTS)\b")
# the epilogue's output stores (TMA, global, and the stage into shared memory for TMA)
_TILE_STORE = re.compile(r"\b(?:UTMASTG|STG|STSM)\b")


def per_tile_branches(body):
    """The instructions of ``body`` (a loop as ``(address, text)``) that a forward branch
    skips and that hold no K-step work (no MMA, no operand load): the per-tile code of a
    flattened tile x K loop (the next tile's index math, the epilogue), run on one K step
    in num_k_tiles. Returns (the K-step path: the loop less those, their addresses)."""
    where = {a: i for i, (a, _) in enumerate(body)}
    skipped = set()
    for i, (addr, text) in enumerate(body):
        target = _branch_target(text)
        if target is None or target <= addr or target not in where or not text.startswith("@"):
            continue
        region = body[i + 1:where[target]]
        if region and not any(_K_STEP.search(t) for _, t in region):
            skipped.update(a for a, _ in region)
    return [(a, t) for a, t in body if a not in skipped], skipped


def overlaps_epilogue(body):
    """Whether the loop issues a K step's operand loads (UTMALDG / LDGSTS) before the
    epilogue's output stores in the same iteration: in a pipelined loop those loads are
    num_stages - 1 steps ahead, so on a tile's last K step they are the next tile's."""
    loads = [a for a, t in body if re.search(r"\b(?:UTMALDG|LDGSTS)\b", t)]
    stores = [a for a, t in body if re.search(r"\b(?:UTMASTG|STG)\b", t)]
    return bool(loads and stores and min(loads) < min(stores))


def analyse(fn, ptrs, consts, num_warps, num_stages=3, *, kernel, variant, dtype,
            memory_bound, elements=None, ints64=(), floats=(), dump=None):
    """Compile and read one specialisation.  ``elements``: elements a program handles per
    loop iteration (memory-bound kernels; per program when there is no loop); ``dump``: a
    file prefix under which the TTGIR, PTX, SASS and the hot loop's SASS are written."""
    cfg = ", ".join(f"{k}={v}" for k, v in consts.items() if k.startswith(("BLOCK", "GROUP")))
    cfg += f", warps={num_warps}" + (f", stages={num_stages}" if not memory_bound else "")
    cfg += ", coefficients once" if consts.get("PCOEF_ONCE") else ""
    res = Result(kernel, variant, dtype, cfg, memory_bound)
    t0 = time.time()
    try:
        k = compile_kernel(fn, ptrs, consts, num_warps, num_stages, ints64, floats)
    except Exception as exc:  # reported in the table: the check fails on it
        res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return res
    res.compile_s = round(time.time() - t0, 2)
    ptx = k.asm["ptx"]
    res.shared = int(getattr(k.metadata, "shared", 0))
    res.div64 = len(re.findall(r"\b(?:div|rem)\.[su]64\b", ptx))
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(ptx)
        with open(os.path.join(d, "k.cubin"), "wb") as f:
            f.write(k.asm["cubin"])
        arch = re.search(r"\.target\s+(\w+)", ptx).group(1)
        # the cubin's figures: ptxas with the flags triton's make_cubin uses
        info = subprocess.run([os.path.join(BIN, "ptxas"), "-lineinfo", "-v",
                               "--regAllocOptLevel=2", f"--gpu-name={arch}",
                               os.path.join(d, "k.ptx"), "-o", os.path.join(d, "v.cubin")],
                              capture_output=True, text=True).stderr
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass",
                               os.path.join(d, "k.cubin")], capture_output=True, text=True).stdout
    if dump:
        for ext, text in (("ttgir", k.asm["ttgir"]), ("ptx", ptx), ("sass", sass)):
            with open(f"{dump}.{ext}", "w") as f:
                f.write(text)
    m = re.search(r"Used (\d+) registers", info)
    res.registers = int(m.group(1)) if m else -1
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    res.spill_stores, res.spill_loads = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
    res.ptxas_warnings = _ptxas_warnings(info)
    instrs, loops = read_sass(sass, "")
    body_text = "\n".join(t for _, t in instrs)
    for op, mods in _LDG.findall(body_text):
        d = res.loads if op == "LDG" else res.stores
        w = _width(mods)
        d[w] = d.get(w, 0) + 1
    for mods in _LDGSTS.findall(body_text):
        w = _width(mods)
        res.ldgsts[w] = res.ldgsts.get(w, 0) + 1
    res.ldgdepbar = len(re.findall(r"\bLDGDEPBAR\b", body_text))
    res.utmaldg = len(re.findall(r"\bUTMALDG\b", body_text))
    res.utmastg = len(re.findall(r"\bUTMASTG\b", body_text))
    for shape in _HGMMA_SHAPE.findall(body_text):
        res.hgmma_shapes[shape] = res.hgmma_shapes.get(shape, 0) + 1
    res.hgmma = sum("HGMMA" in t for _, t in instrs)
    res.hmma = sum(re.search(r"\bHMMA\b", t) is not None for _, t in instrs)
    threads = 32 * num_warps
    spill = re.compile(r"\b(?:STL|LDL)\b")
    if memory_bound:
        body = hot_loop(instrs, loops, r"\bLDG\b")
        if body:
            res.loop_instructions = len(body)
            res.hot_spills = sum(bool(spill.search(t)) for a, t in instrs
                                 if any(lo <= a <= hi for lo, hi in loops))
        else:  # no loop: the whole program
            res.loop_instructions = len(instrs)
            res.hot_spills = sum(bool(spill.search(t)) for _, t in instrs)
        if elements:
            res.elements_per_thread = elements / threads
            res.instructions_per_element = round(res.loop_instructions
                                                 / res.elements_per_thread, 2)
    else:
        loop = hot_loop(instrs, loops, r"HGMMA|HMMA", addresses=True)
        res.loop_instructions = len(loop)
        res.hot_spills = sum(bool(spill.search(t)) for _, t in loop)
        res.epilogue_overlap = overlaps_epilogue(loop)
        # the per-K-step figures on the K-step path (the same as the loop unless the tile
        # loop was flattened into it: then its per-tile branches are left out)
        path, skipped = per_tile_branches(loop)
        body = [t for _, t in path]
        res.per_tile_instructions = len(skipped)
        res.loop_hgmma = sum(bool(re.search(r"\b[HQ]GMMA\b", t)) for t in body)
        res.sass_per_hgmma = round(len(body) / res.loop_hgmma, 1) if res.loop_hgmma else 0.0
        res.wgmma_wait = sorted({int(m, 16) for t in body for m in _DEPBAR.findall(t)})
        res.loop_calls = sum(bool(re.search(r"\bCALL\b", t)) for t in body)
        res.loop_div = ttgir_loop_divisions(k.asm["ttgir"]) + ptx_loop_divisions(ptx)
        if dump:  # the K-step path as counted (per-tile branches marked "skip")
            with open(f"{dump}.loop.sass", "w") as f:
                f.writelines(f"{'skip ' if a in skipped else ''}/*{a:04x}*/ {t}\n"
                             for a, t in loop)
    return res


# --------------------------------------------------------------------------------------
# The specialisations
# --------------------------------------------------------------------------------------

DTYPES = {"bf16": (tl.float32, "*fp32"), "fp16": (tl.float32, "*fp32"),
          "fp32": (tl.float32, "*fp32")}


def bn_specs(quick: bool):
    """(fn, ptrs, consts, warps, stages, meta) of every BN kernel specialisation."""
    bn = _load("bn")
    specs = []
    for dt, (acc, accp) in DTYPES.items():
        act = f"*{dt}"
        ptrs = {"X_ptr": act, "X2_ptr": act, "R_ptr": act, "OUT_ptr": act, "DOUT_ptr": act,
                "DX_ptr": act, "DRES_ptr": act, "DX2_ptr": act, "MASK_ptr": "*u8",
                "*default": accp}
        ew = bn._elementwise_configs()[:1] if quick else bn._elementwise_configs()
        off = dict(HAS_RESIDUAL=False, HAS_X2=False, APPLY_RELU=True, SAVE_MASK=False,
                   CHANNELS_LAST=True, X_DENSE=True, R_DENSE=True, X2_DENSE=True, WIDE=False,
                   BIG=False, ACC=acc)
        apply_variants = {"bn_relu": {}, "bn_add_relu": dict(HAS_RESIDUAL=True, SAVE_MASK=True),
                          "dual_add_relu": dict(HAS_RESIDUAL=True, HAS_X2=True, SAVE_MASK=True),
                          "bn_relu nchw": dict(CHANNELS_LAST=False)}
        bwd_off = dict(HAS_MASK=False, APPLY_RELU=True, NEED_DX=True,
                       WRITE_GRAD_RESIDUAL=False, HAS_X2=False, CHANNELS_LAST=True,
                       DOUT_DENSE=True, X_DENSE=True, X2_DENSE=True, WIDE=False, BIG=False,
                       ACC=acc)
        bwd_variants = {"relu (recomputed mask)": {},
                        "add (mask, dres)": dict(HAS_MASK=True, WRITE_GRAD_RESIDUAL=True),
                        "dual (mask, dres, dx2)": dict(HAS_MASK=True, WRITE_GRAD_RESIDUAL=True,
                                                       HAS_X2=True)}
        for cfg in ew:
            block = cfg.kwargs["BLOCK"]
            for name, sw in (apply_variants if not quick else
                             {k: v for k, v in apply_variants.items() if k != "bn_relu nchw"}
                             ).items():
                specs.append((bn._bn_apply_kernel, ptrs, dict(off, **sw, **cfg.kwargs),
                              cfg.num_warps, 1, dict(kernel="bn_apply", variant=name, dtype=dt,
                                                     memory_bound=True, elements=block)))
            for name, sw in bwd_variants.items():
                specs.append((bn._bn_bwd_apply_kernel, ptrs, dict(bwd_off, **sw, **cfg.kwargs),
                              cfg.num_warps, 1,
                              dict(kernel="bn_bwd_apply", variant=name, dtype=dt,
                                   memory_bound=True, elements=block)))
        red = bn._reduce_configs()[:2] if quick else bn._reduce_configs()
        for cfg in red:
            tile = cfg.kwargs["BLOCK_C"] * cfg.kwargs["BLOCK_S"]
            layout = "channels_last" if cfg.kwargs["BLOCK_C"] >= 32 else "nchw"
            unit = ({"stride_xc": 1, "stride_x2c": 1} if layout == "channels_last"
                    else {"stride_xs": 1, "stride_x2s": 1})
            for x2 in (False, True):
                specs.append((bn._bn_stats_partial_kernel, ptrs,
                              dict(ACC=acc, HAS_X2=x2, **unit, **cfg.kwargs), cfg.num_warps, 1,
                              dict(kernel="bn_stats_partial",
                                   variant=f"{layout}{' +x2' if x2 else ''}", dtype=dt,
                                   memory_bound=True, elements=tile)))
            runit = ({"stride_xc": 1, "stride_dc": 1, "stride_x2c": 1}
                     if layout == "channels_last"
                     else {"stride_xs": 1, "stride_ds": 1, "stride_x2s": 1})
            for name, sw in {"relu (recomputed mask)": dict(HAS_MASK=False, APPLY_RELU=True,
                                                            AFFINE_FROM_VAR=True),
                             "add (mask)": dict(HAS_MASK=True, APPLY_RELU=True),
                             "dual (mask, x2)": dict(HAS_MASK=True, APPLY_RELU=True,
                                                     HAS_X2=True)}.items():
                consts = dict(HAS_MASK=False, APPLY_RELU=False, AFFINE_FROM_VAR=False,
                              HAS_W=True, HAS_B=True, HAS_X2=False,
                              CHANNELS_LAST=layout == "channels_last",  # the mask's order
                              ACC=acc, **runit, **cfg.kwargs)
                consts.update(sw)
                specs.append((bn._bn_bwd_reduce_partial_kernel, ptrs, consts, cfg.num_warps, 1,
                              dict(kernel="bn_bwd_reduce_partial", variant=f"{name} {layout}",
                                   dtype=dt, memory_bound=True, elements=tile)))
    # per-channel kernels: fp32 vectors whatever the activations
    for cfg in bn._merge_configs()[:1] if quick else bn._merge_configs():
        # the GPU tile at the largest P (one tile of every partial: the most registers)
        merge_tile = dict(cfg.kwargs, BLOCK_P=bn._MAX_PARTS)
        for name, sw in {"train": {}, "train +x2": dict(HAS_X2=True),
                         "eval": dict(FROM_RUNNING=True)}.items():
            consts = dict(HAS_X2=False, FROM_RUNNING=False, SCALE_SHIFT=True, HAS_W=True,
                          HAS_B=True, HAS_W2=True, HAS_B2=True, ACC=tl.float32,
                          **merge_tile)
            consts.update(sw)
            specs.append((bn._bn_stats_finalize_kernel, {"*default": "*fp32"}, consts,
                          cfg.num_warps, 1, dict(kernel="bn_stats_finalize", variant=name,
                                                 dtype="fp32", memory_bound=True,
                                                 elements=merge_tile["BLOCK_P"]
                                                 * merge_tile["BLOCK_C"])))
            consts = dict(HAS_X2="x2" in name, HAS_W=True, HAS_B=True, WRITE_DW=True,
                          WRITE_DB=True, HAS_W2=True, HAS_B2=True, WRITE_DW2=True,
                          WRITE_DB2=True, COEFS=True, COEFS2=True, TRAINING=name != "eval",
                          ACC=tl.float32, **merge_tile)
            specs.append((bn._bn_bwd_finalize_kernel, {"*default": "*fp32"}, consts,
                          cfg.num_warps, 1, dict(kernel="bn_bwd_finalize", variant=name,
                                                 dtype="fp32", memory_bound=True,
                                                 elements=merge_tile["BLOCK_P"]
                                                 * merge_tile["BLOCK_C"])))
    return specs


# The output channels (the GEMM's N) of the ResNet-50 convs each forward variant runs
# (torchvision's v1.5: stride 2 in the 3x3 conv2 and the 1x1 downsample; a BN-ReLU
# prologue on conv2 and conv3, whose input is bn1/bn2-relu; conv1's input is the block's
# output): issue 21's bar is judged on the configs the launcher can pick at those shapes
# (``conv_configs`` prunes by N: e.g. no 64-wide tile above 64 channels). Variants not
# named here (pointers, stem, dgrad) compile every config of their mode.
FWD_C_OUT = {
    "fwd 3x3 s1 (TMA boxes)": (64, 128, 256, 512),
    "fwd 1x1 s1 (TMA GEMM)": (64, 128, 256, 512, 1024, 2048),
    "fwd 3x3/1x1 s2 (TMA boxes of the stride-2 view)": (128, 256, 512, 1024, 2048),
    "fwd 3x3 s1 (TMA boxes) +stats": (64, 128, 256, 512),
    "fwd 3x3 s1 (TMA boxes) bn-relu prologue +stats": (64, 128, 256, 512),
    "fwd 1x1 s1 (TMA GEMM) bn-relu prologue +stats": (256, 512, 1024, 2048),
    "fwd 3x3/1x1 s2 (TMA boxes of the stride-2 view) bn-relu prologue +stats":
        (128, 256, 512),
    "fwd eval 1x1 s1 bias+residual+relu": (256, 512, 1024, 2048),
}

# dgrad's (C_in, C_out) at the ResNet-50 convs each dgrad variant runs in training, the
# model converted with the Triton conv path (tests/test_static_triton.py records
# ``conv_dgrad``'s launches in a converted torchvision resnet50, in both dbn_backward
# modes): conv1 (1x1 s1, its statistics from its epilogue for bn1; its input the block's
# output, no BN-ReLU before it) with the dBN prologue alone in "fused" mode, plain after
# the materialising pass; conv2 (3x3, s1 or s2) and conv3 (1x1 s1), the BN-ReLU before
# them in their forward's prologue, with the dReLU epilogue alone in either mode (their
# outputs' BNs compute their own statistics: no dBN term). The downsample conv and the
# stem run F.conv2d. ``conv_configs`` prunes dgrad by its GEMM N, C_in (no 64-wide tile
# above 64 but the wide-K one), and by its reduction channels, C_out (the wide-K tile,
# BLOCK_K 128, only where C_out % 128 == 0; ``_pcoef_once``: the dBN coefficients loaded
# once where C_out is one K tile, 64).
_DGRAD_CONV1 = ((64, 64), (256, 64), (256, 128), (512, 128), (512, 256), (1024, 256),
                (1024, 512), (2048, 512))
_DGRAD_CONV2 = ((64, 64), (128, 128), (256, 256), (512, 512))
_DGRAD_CONV2_S2 = ((128, 128), (256, 256), (512, 512))
DGRAD_CHANNELS = {
    "dgrad 1x1 s1 (TMA boxes)": _DGRAD_CONV1,
    "dgrad 1x1 s1 (TMA boxes) dBN prologue": _DGRAD_CONV1,
    "dgrad 3x3 s1 (TMA boxes) dReLU epilogue": _DGRAD_CONV2,
    "dgrad 1x1 s1 (TMA boxes) dReLU epilogue": ((64, 256), (128, 512), (256, 1024),
                                                (512, 2048)),
    "dgrad s2 (TMA boxes of a phase) dReLU epilogue": _DGRAD_CONV2_S2,
}
# dgrad variants a converted ResNet-50 does not run on sm_90, at the shapes of ResNet-50's
# 3x3 convs: the functions' (``conv2d``: plain; ``bn_relu_conv2d_stats``: the dBN prologue
# and the dReLU epilogue together, "fused" mode), and the sm_80 / sparse-dy fallback of
# stride 2 (outside the bar, as the forward's; its dReLU row is what the strided conv2
# runs there); and conv1's dBN prologue with dy by pointers (sm_90 where dy or y cannot be
# read by TMA: a base not 16-byte aligned, boxes past int32; ``_dbn_tiles``' list there)
DGRAD_OTHER_CHANNELS = {
    "dgrad 1x1 s1 (dy by pointers: sparse dy) dBN prologue": _DGRAD_CONV1,
    "dgrad 3x3 s1 (TMA boxes)": _DGRAD_CONV2,
    "dgrad 3x3 s1 (TMA boxes) dBN prologue + dReLU epilogue": _DGRAD_CONV2,
    "dgrad s2 (TMA boxes of a phase)": _DGRAD_CONV2_S2,
    "dgrad s2 (TMA boxes of a phase) dBN prologue + dReLU epilogue": _DGRAD_CONV2_S2,
    "dgrad s2 (dy by pointers: sparse dy, sm_80)": _DGRAD_CONV2_S2,
    "dgrad s2 (dy by pointers: sparse dy, sm_80) dReLU epilogue": _DGRAD_CONV2_S2,
    "dgrad s2 (dy by pointers: sparse dy, sm_80) dBN prologue + dReLU epilogue":
        _DGRAD_CONV2_S2,
}


# the batch the static rows' pixel boxes are made for (``pixel_box``: ResNet-50 training)
BATCH = 256
# the output size (H = W) the pixel-box rows are compiled at, where not the defaults
# (56x56 for the stride-1 forward, 28x28 for the rest): ``--size``
SIZE = None


# wgrad's (C_out, C_in) at the ResNet-50 convs each wgrad variant runs in training, the
# model converted with the Triton conv path (fusedres.nn.conv_bn_act; tests/
# test_static_triton.py reads it from a converted torchvision resnet50): conv1 (1x1 s1,
# its statistics from its epilogue for bn1) with the dBN prologue alone in
# dbn_backward="fused" mode, plain in "materialised" mode; conv2 (3x3, s1 or s2) and
# conv3 (1x1 s1) with the BN-ReLU prologue alone in either mode (their outputs' BNs
# compute their own statistics: no dBN term). The downsample conv and the stem run
# F.conv2d. ``wgrad_configs`` prunes by C_out (64-row tiles iff C_out <= 64; the BN-ReLU
# prologue's 256x128 from 256) and C_in (64-wide tiles iff C_in <= 64; the plain and the
# dBN prologue's 128x256 from 256).
_WGRAD_CONV1 = ((64, 64), (64, 256), (128, 256), (128, 512), (256, 512), (256, 1024),
                (512, 1024), (512, 2048))
WGRAD_CHANNELS = {
    "wgrad 1x1 s1 (TMA, one row of pixels)": _WGRAD_CONV1,
    "wgrad 1x1 s1 (TMA, one row of pixels) dBN prologue": _WGRAD_CONV1,
    "wgrad 3x3 s1 (TMA boxes) bn-relu prologue": ((64, 64), (128, 128), (256, 256),
                                                  (512, 512)),
    "wgrad 3x3/1x1 s2 (TMA boxes of the stride-2 view) bn-relu prologue": (
        (128, 128), (256, 256), (512, 512)),
    "wgrad 1x1 s1 (TMA, one row of pixels) bn-relu prologue": ((256, 64), (512, 128),
                                                               (1024, 256), (2048, 512)),
}


DGRAD_SHAPES = {**DGRAD_CHANNELS, **DGRAD_OTHER_CHANNELS}


def _union_of(configs_of, shapes):
    """The union of ``configs_of(shape)`` over ``shapes``, in first-seen order."""
    seen, out = set(), []
    for shape in shapes:
        for cfg in configs_of(shape):
            key = (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages)
            if key not in seen:
                seen.add(key)
                out.append(cfg)
    return out


def _configs_at(kc, shapes, **kw):
    """The union of ``conv_configs(gemm_n=c, **kw)`` over ``shapes``, in first-seen order
    (``(None,)``: every config of the mode; a pair (gemm_n, channels) also gives the
    reduction channels)."""
    def configs_of(c):
        n, ch = c if isinstance(c, tuple) else (c, None)
        return kc.conv_configs(gemm_n=n, channels=ch, **kw)
    return _union_of(configs_of, shapes)


def _conv_rows(kc, variants, itemsize):
    """(variant, switches, config, PCOEF_ONCE) of every ``_conv_kernel`` row: each variant's
    configs at its ResNet-50 shapes, and with a prologue, again with the coefficients
    loaded once where the reduction channels are one K tile in every config (as
    ``_pcoef_once`` decides at launch: dgrad's dBN prologue at C_out 64 in 16-bit)."""
    for name, sw in variants.items():
        stem = not sw.get("TAP_LOOP", True)
        shapes = FWD_C_OUT.get(name) or DGRAD_SHAPES.get(name) or (None,)
        kw = dict(stem=stem, transposed=sw.get("TRANSPOSED", False),
                  fused=bool(sw.get("PROLOGUE") or sw.get("DRELU")), itemsize=itemsize,
                  residual=sw.get("HAS_RESIDUAL", False),
                  strided=sw.get("A_TMA") == 3 or (sw.get("TRANSPOSED") and " s2 " in name),
                  a_tma=bool(sw.get("A_TMA")),
                  dbn=bool(sw.get("TRANSPOSED")) and sw.get("PROLOGUE") == 2,
                  drelu=bool(sw.get("DRELU")))
        for cfg in _configs_at(kc, shapes, **kw):
            yield name, sw, cfg, False
        once = [c for c in DGRAD_SHAPES.get(name, ()) if sw.get("PROLOGUE") == 2
                and kc._pcoef_once(True, True, c[1], kc.conv_configs(gemm_n=c[0],
                                                                      channels=c[1], **kw))]
        yield from ((name, sw, cfg, True) for cfg in _configs_at(kc, once, **kw) if once)


def conv_specs(quick: bool):
    """Every conv kernel mode ResNet-50 training and inference use, each config."""
    kc = _load("conv")
    specs = []
    dtypes = {"bf16": "ieee", "fp16": "ieee", "fp32": "tf32"}
    off = dict(HAS_BIAS=False, HAS_RESIDUAL=False, EPILOGUE_RELU=False, STATS=False,
               DRELU=False, ACC_FP64=False, TRANSPOSED=False, TAP_LOOP=True, PROLOGUE=0,
               W_TMA=True, A_TMA=0, TILE_H=1, TILE_W=1, PCOEF_ONCE=False)
    gemm1x1 = dict(A_TMA=1, R=1, S=1, STRIDE_H=1, STRIDE_W=1)  # the JIT pins 1s
    # pixel boxes as the launchers make them at batch 256 (``pixel_box``: the fewest boxes,
    # 128 pixels in the forward and dgrad; the BN-ReLU prologue's 2 pixels of an image at
    # least), at ``SIZE`` where given. 3x3 stride 1 at 56x56: 2 images x 8 rows x 8 columns
    def box(size, least=1, **kw):
        _, th, tw = kc.pixel_box(BATCH, SIZE or size, SIZE or size, 128, least)
        return dict(kw, TILE_H=th, TILE_W=tw)

    boxes = box(56, A_TMA=2, STRIDE_H=1, STRIDE_W=1)
    pboxes = box(56, 2, A_TMA=2, STRIDE_H=1, STRIDE_W=1)
    # stride 2 from 56x56 to 28x28: 8 images x 4 rows x 4 columns
    boxes2, pboxes2 = box(28, A_TMA=3), box(28, 2, A_TMA=3)
    # dgrad: dy by boxes per tap over boxes of dx pixels, as conv_dgrad makes them for
    # every conv with C_out % 64 == 0 and dense dy, 1x1 ones too (28x28: 8 x 4 x 4), at
    # stride 2 boxes of one phase's dx pixels (56x56 -> phases of 28x28: 8 x 4 x 4) with
    # dy by a box per tap of the phase; a 1x1 conv's R = S = 1 pinned by the JIT (3x3 and
    # stride 2: runtime ints). dBN: the constant's part of dx (E, fp32) starts the
    # accumulator (HAS_RESIDUAL)
    dbox = box(28, TRANSPOSED=True, A_TMA=2)
    d3x3 = dict(dbox, STRIDE_H=1, STRIDE_W=1)
    d1x1 = dict(d3x3, R=1, S=1)
    dbn, drelu = dict(PROLOGUE=2, HAS_RESIDUAL=True), dict(DRELU=True)
    dptr = dict(TRANSPOSED=True)
    dgrad = {"dgrad 1x1 s1 (TMA boxes)": d1x1,
             "dgrad 1x1 s1 (TMA boxes) dBN prologue": dict(d1x1, **dbn),
             "dgrad 3x3 s1 (TMA boxes) dReLU epilogue": dict(d3x3, **drelu),
             "dgrad 1x1 s1 (TMA boxes) dReLU epilogue": dict(d1x1, **drelu),
             "dgrad s2 (TMA boxes of a phase) dReLU epilogue": dict(dbox, **drelu),
             "dgrad 3x3 s1 (TMA boxes)": d3x3,
             "dgrad 3x3 s1 (TMA boxes) dBN prologue + dReLU epilogue": dict(d3x3, **dbn,
                                                                            **drelu),
             "dgrad s2 (TMA boxes of a phase)": dbox,
             "dgrad s2 (TMA boxes of a phase) dBN prologue + dReLU epilogue": dict(
                 dbox, **dbn, **drelu),
             "dgrad s2 (dy by pointers: sparse dy, sm_80)": dptr,
             "dgrad s2 (dy by pointers: sparse dy, sm_80) dReLU epilogue": dict(dptr,
                                                                               **drelu),
             "dgrad s2 (dy by pointers: sparse dy, sm_80) dBN prologue + dReLU epilogue":
                 dict(dptr, **dbn, **drelu),
             "dgrad 1x1 s1 (dy by pointers: sparse dy) dBN prologue": dict(
                 dptr, **dbn, R=1, S=1, STRIDE_H=1, STRIDE_W=1)}
    fwd = {"fwd 3x3 s1 (TMA boxes)": dict(boxes),
           "fwd 1x1 s1 (TMA GEMM)": dict(gemm1x1),
           "fwd 3x3/1x1 s2 (TMA boxes of the stride-2 view)": dict(boxes2),
           "fwd 3x3 s1 (TMA boxes) +stats": dict(boxes, STATS=True),
           "fwd 3x3 s1 (TMA boxes) bn-relu prologue +stats": dict(pboxes, PROLOGUE=1,
                                                                   STATS=True),
           "fwd 1x1 s1 (TMA GEMM) bn-relu prologue +stats": dict(gemm1x1, PROLOGUE=1,
                                                                  STATS=True),
           "fwd 3x3/1x1 s2 (TMA boxes of the stride-2 view) bn-relu prologue +stats":
               dict(pboxes2, PROLOGUE=1, STATS=True),
           "fwd A by pointers (odd H/W, sparse x, sm_80)": {},
           "fwd A by pointers (odd H/W, sparse x, sm_80) bn-relu prologue +stats":
               dict(PROLOGUE=1, STATS=True),
           "fwd eval 1x1 s1 bias+residual+relu": dict(gemm1x1, HAS_BIAS=True,
                                                      HAS_RESIDUAL=True, EPILOGUE_RELU=True),
           "fwd stem C=3 (flat K) +stats": dict(TAP_LOOP=False, STATS=True, W_TMA=False),
           **dgrad}
    assert set(FWD_C_OUT) <= set(fwd), set(FWD_C_OUT) - set(fwd)
    assert set(DGRAD_SHAPES) == {k for k in fwd if k.startswith("dgrad")}, set(
        DGRAD_SHAPES) ^ {k for k in fwd if k.startswith("dgrad")}
    if quick:
        fwd = {k: v for k, v in fwd.items() if k in (
            "fwd 3x3 s1 (TMA boxes) bn-relu prologue +stats", "fwd stem C=3 (flat K) +stats",
            "fwd 1x1 s1 (TMA GEMM) bn-relu prologue +stats",
            "dgrad 1x1 s1 (TMA boxes) dBN prologue")}
    # wgrad: (switches, (C_out, C_in) shapes): those of ``WGRAD_CHANNELS`` (given as ())
    # for the variants ResNet-50 training runs, one ResNet-50 layer's for those only the
    # functions run (``conv2d``, ``conv2d_stats`` on a 3x3 or strided conv,
    # ``bn_relu_conv2d_stats``); pixel boxes as the launcher makes them (``pixel_box`` of
    # BLOCK_K pixels over OUTPUT, below) at 28x28 (BLOCK_K 64: 4 images x 4 rows x 4
    # columns), the 1x1 stride-1 conv as one row of N*H*W pixels (a box of BLOCK_K of them,
    # 256 at ``_WGRAD_DBN_64``)
    wbox = dict(TAP_N=True, TMA=2, STRIDE_H=1, STRIDE_W=1, DBN=False, PROLOGUE=False,
                OUTPUT=(BATCH, SIZE or 28, SIZE or 28))
    wrow = dict(wbox, R=1, S=1, OUTPUT=(1, 1, BATCH * 28 * 28))
    wview = dict(wbox, TMA=3, STRIDE_H=None, STRIDE_W=None)
    wgrad = {"wgrad 3x3 s1 (TMA boxes)": (wbox, ((256, 256),)),
             "wgrad 1x1 s1 (TMA, one row of pixels)": (wrow, ()),
             "wgrad 3x3/1x1 s2 (TMA boxes of the stride-2 view)": (wview, ((128, 128),)),
             "wgrad 1x1 s1 (TMA, one row of pixels) dBN prologue": (dict(wrow, DBN=True), ()),
             "wgrad 3x3 s1 (TMA boxes) bn-relu prologue": (dict(wbox, PROLOGUE=True), ()),
             "wgrad 1x1 s1 (TMA, one row of pixels) bn-relu prologue": (
                 dict(wrow, PROLOGUE=True), ()),
             "wgrad 3x3/1x1 s2 (TMA boxes of the stride-2 view) bn-relu prologue": (
                 dict(wview, PROLOGUE=True), ()),
             # C_in 128 and 256: the 128x128 tile and the 128x256 one
             "wgrad 3x3 s1 (TMA boxes) dBN + bn-relu prologues": (dict(wbox, DBN=True,
                                                                     PROLOGUE=True),
                                                                ((128, 128), (256, 256))),
             "wgrad pointers (odd H/W, sm_80)": (dict(wbox, TMA=0, STRIDE_H=None,
                                                      STRIDE_W=None), ((128, 128),)),
             "wgrad stem C=3 (flat N)": (dict(wbox, TAP_N=False, TMA=0,
                                              OUTPUT=(BATCH, 112, 112), STRIDE_H=None,
                                              STRIDE_W=None, DBN=True),
                                         ((64, 3),))}
    wgrad = {k: (sw, WGRAD_CHANNELS.get(k, shapes)) for k, (sw, shapes) in wgrad.items()}
    assert all(shapes for _, shapes in wgrad.values())
    assert set(WGRAD_CHANNELS) <= set(wgrad), set(WGRAD_CHANNELS) - set(wgrad)
    if quick:
        wgrad = {k: v for k, v in wgrad.items() if "prologues" in k or "stem" in k}
    for dt, prec in dtypes.items():
        if quick and dt != "bf16":
            continue
        act = f"*{dt}"
        ptrs = {"X_ptr": act, "W_ptr": act, "Y_ptr": act, "BIAS_ptr": act, "RES_ptr": act,
                "PY_ptr": act, "EY_ptr": act, "DY_ptr": act, "LANES_ptr": "*i32",
                "*default": "*fp32"}
        fwd_ptrs = ptrs  # the BN-ReLU prologue's scale/shift: fp32, as the BN makes them
        unit = dict(sxc=1, swi=1, syc=1, src=1, sec=1)  # channels_last, KRSC
        itemsize = 4 if dt == "fp32" else 2
        for name, sw, cfg, once in _conv_rows(kc, fwd, itemsize):
            consts = dict(off, **sw, INPUT_PRECISION=prec, **unit, **cfg.kwargs,
                          PCOEF_ONCE=once)
            # as conv_fwd launches it: the forward without a prologue is persistent
            consts["PERSISTENT"] = not consts["TRANSPOSED"] and not consts["PROLOGUE"]
            consts["FLATTEN"] = consts["PERSISTENT"] and kc.flatten_tiles(
                consts["A_TMA"], consts["HAS_RESIDUAL"])
            # and the output by TMA where A is (Y as [M, C_out] or boxes of [N, P, Q, C])
            consts["Y_TMA"] = 0 if consts["TRANSPOSED"] else min(consts["A_TMA"], 2)
            bm, bn, bk = (cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            th, tw = consts["TILE_H"], consts["TILE_W"]
            x_box = {0: act, 1: f"tensordesc<{dt}[{bm}, {bk}]>",
                     2: f"tensordesc<{dt}[{bm // (th * tw)}, {th}, {tw}, {bk}]>",
                     3: f"tensordesc<{dt}[{bm // (th * tw)}, {th}, 1, {tw}, {bk}]>"}
            base = ptrs if sw.get("TRANSPOSED") else fwd_ptrs
            if consts["PROLOGUE"] == 2:  # E, the dBN constant's part of dx: fp32; the
                # coefficients: bf16 rows (centre, hi, lo) for the packed bf16 math, else
                # fp32 (coef_y, centre) pairs (kernels/conv.py conv_dgrad)
                base = dict(base, RES_ptr="*fp32",
                            PCOEF_ptr="*bf16" if dt == "bf16" else "*fp32")
            w_box = f"[{bk}, {bn}]" if sw.get("TRANSPOSED") else f"[{bn}, {bk}]"
            kptrs = dict(base, W_desc=f"tensordesc<{dt}{w_box}>" if consts["W_TMA"]
                         else act, X_desc=x_box[consts["A_TMA"]],
                         PY_desc=x_box[consts["A_TMA"]] if consts["PROLOGUE"] == 2
                         else act,
                         Y_desc={0: act, 1: f"tensordesc<{dt}[{bm}, {bn}]>",
                                 2: f"tensordesc<{dt}[{bm // (th * tw)}, {th}, {tw}, "
                                    f"{bn}]>"}[consts["Y_TMA"]])
            if sw.get("TRANSPOSED"):  # the weight read as [CI, R, S, CO]: CO is unit
                consts.update(swi=None, swo=1)
                consts = {k: v for k, v in consts.items() if v is not None}
            specs.append((kc._conv_kernel, kptrs, consts, cfg.num_warps, cfg.num_stages,
                          dict(kernel="conv", variant=name, dtype=dt, memory_bound=False)))
        for name, (sw, shapes) in wgrad.items():
            for cfg in _union_of(lambda c, sw=sw: kc.wgrad_configs(
                    stem=not sw["TAP_N"], fused=sw["DBN"] or sw["PROLOGUE"], gemm_m=c[0],
                    channels=c[1], itemsize=itemsize, dbn=sw["DBN"],
                    bn_relu=sw["PROLOGUE"]), shapes):
                output = sw["OUTPUT"]
                consts = dict(sw, ACC_FP64=False, INPUT_PRECISION=prec, sdc=1, sxc=1, spc=1,
                              FLATTEN=kc.FLATTEN_WGRAD, **cfg.kwargs, OUTPUT=None)
                consts = {k: v for k, v in consts.items() if v is not None}
                bm, bn, bk = (cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                _, th, tw = kc.pixel_box(*output, bk)  # as conv_wgrad (fp32: 32 pixels)
                consts.update(TILE_H=th, TILE_W=tw)
                # as conv_wgrad (the 1x1 variants are unpadded)
                consts["MASK_DY"] = kc.wgrad_mask_dy(
                    sw["DBN"], sw["TMA"], sw.get("R") == 1,
                    output[1] % th or output[2] % tw, dt == "fp16")
                box = f"{bk // (th * tw)}, {th}, {tw}"
                tma = sw["TMA"]
                wptrs = dict(ptrs, DY_desc=f"tensordesc<{dt}[{box}, {bm}]>" if tma else act,
                             PY_desc=f"tensordesc<{dt}[{box}, {bm}]>" if tma else act,
                             X_desc={0: act, 2: f"tensordesc<{dt}[{box}, {bn}]>",
                                     3: f"tensordesc<{dt}[{bk // (th * tw)}, {th}, 1, {tw}, "
                                        f"{bn}]>"}[tma])
                specs.append((kc._conv_wgrad_kernel, wptrs, consts, cfg.num_warps,
                              cfg.num_stages, dict(kernel="conv_wgrad", variant=name, dtype=dt,
                                                   memory_bound=False)))
    return specs


# --------------------------------------------------------------------------------------
# The checks (tests/test_static_triton.py) and the table
# --------------------------------------------------------------------------------------


def problems(results):
    """What breaks the targets of issue 12: spill instructions on the hot path (a memory-
    bound kernel's loops, or all of it without a loop; a conv's main loop), 64-bit
    division in a conv kernel, a compile error.  (ptxas sometimes parks a few values of
    the setup or the final reduction in local memory, outside every loop, even at ~70
    registers: the table shows those bytes; they cost nothing per element.)"""
    out = []
    for r in results:
        where = f"{r.kernel} [{r.variant}] {r.dtype} ({r.config})"
        if r.error:
            out.append(f"{where}: does not compile: {r.error}")
        if r.hot_spills:
            out.append(f"{where}: {r.hot_spills} spill instructions on the hot path "
                       f"({r.spill_stores} B stored, {r.spill_loads} B loaded in all, "
                       f"{r.registers} registers)")
        if r.kernel.startswith("conv") and r.div64:
            out.append(f"{where}: {r.div64} 64-bit integer divisions")
    return out


# Issue 21's static bar for the forward conv kernels on sm_90a (bf16, ResNet-50 shapes)
HOPPER_BAR = dict(min_loop_hgmma=4, min_hgmma_n=128, max_sass_per_hgmma=32,
                  max_sass_per_hgmma_fused=48, min_wgmma_in_flight=1,
                  min_shared=96 * 1024)


def forward_row(r):
    """A forward conv row the bar applies to: bf16 at the ResNet-50 shapes; not the C=3
    stem (its 147-wide reduction rows are not 16-byte aligned: no TMA, and K = 147 < 4 K
    steps of 64), nor the pointer path (no ResNet-50 conv takes it on sm_90: its inputs
    are dense channels_last with even H and W at every stride 2)."""
    return r.kernel == "conv" and r.variant.startswith("fwd") and "stem" not in r.variant \
        and "pointers" not in r.variant and r.dtype == "bf16"


def hgmma_n(shape: str) -> int:
    """N of an HGMMA shape "64x128x16"."""
    return int(shape.split("x")[1])


def hopper_gaps(r, bar=HOPPER_BAR):
    """The figures by which one conv row misses the Hopper bar (empty: it meets it)."""
    fused = "prologue" in r.variant or "stats" in r.variant or "dReLU" in r.variant
    limit = bar["max_sass_per_hgmma_fused" if fused else "max_sass_per_hgmma"]
    widest = max((hgmma_n(k) for k in r.hgmma_shapes), default=0)
    # a 64-wide tile runs only where C_out <= 64 (kernels/conv.py prunes it elsewhere):
    # its 64x64 HGMMA is the widest those output channels allow
    m = re.search(r"BLOCK_N=(\d+)", r.config)
    want_n = min(bar["min_hgmma_n"], int(m.group(1))) if m else bar["min_hgmma_n"]
    gaps = []
    if r.error:
        return [f"does not compile: {r.error}"]
    if r.utmaldg < 1:
        gaps.append("no TMA load (UTMALDG 0)")
    if r.loop_hgmma < bar["min_loop_hgmma"]:
        gaps.append(f"{r.loop_hgmma} HGMMA per K step < {bar['min_loop_hgmma']}")
    if widest < want_n:
        gaps.append(f"widest HGMMA 64x{widest} < 64x{want_n}")
    if not r.loop_hgmma or r.sass_per_hgmma > limit:
        gaps.append(f"{r.sass_per_hgmma} SASS per HGMMA in the hot loop > {limit}")
    if not r.wgmma_wait or min(r.wgmma_wait) < bar["min_wgmma_in_flight"]:
        why = sorted({w[:7] for w in r.ptxas_warnings if w.startswith("(C75")})
        gaps.append(f"wgmma waited with {r.wgmma_wait or 'no'} groups in flight "
                    f"(WARPGROUP.DEPBAR.LE immediate) < {bar['min_wgmma_in_flight']}"
                    + (f", ptxas {' '.join(why)}" if why else ""))
    if r.loop_div or r.loop_calls:
        gaps.append(f"{r.loop_div} integer divisions, {r.loop_calls} CALL in the hot loop")
    if r.spill_stores or r.spill_loads or r.hot_spills:
        gaps.append(f"spills {r.spill_stores}/{r.spill_loads} B")
    # the output tile by TMA or 16-byte stores (32-bit STG: the statistics' per-channel
    # vectors, outside the tile)
    narrow = {w: n for w, n in r.stores.items() if w not in ("128", "32")}
    if not (r.utmastg or r.stores.get("128")) or narrow:
        gaps.append(f"output not stored by UTMASTG or STG.128 (STG {r.stores})")
    if r.shared < bar["min_shared"]:
        gaps.append(f"{r.shared} B of shared memory < {bar['min_shared']}")
    return gaps


def backward_gaps(r, max_sass_per_hgmma=48):
    """Issue 21's bar for dgrad and wgrad (bf16): TMA, at most 48 SASS per HGMMA in the
    hot loop, no division or CALL there, no spills in it."""
    if r.error:
        return [f"does not compile: {r.error}"]
    gaps = []
    if r.utmaldg < 1:
        gaps.append("no TMA load (UTMALDG 0)")
    if not r.loop_hgmma or r.sass_per_hgmma > max_sass_per_hgmma:
        gaps.append(f"{r.sass_per_hgmma} SASS per HGMMA in the hot loop > "
                    f"{max_sass_per_hgmma}")
    if r.loop_div or r.loop_calls:
        gaps.append(f"{r.loop_div} integer divisions, {r.loop_calls} CALL in the hot loop")
    if r.hot_spills:
        gaps.append(f"{r.hot_spills} spill instructions in the hot loop")
    return gaps


def backward_row(r):
    """A dgrad/wgrad row the bar applies to: bf16, not the C=3 stem."""
    return (r.kernel == "conv_wgrad" or r.variant.startswith("dgrad")) \
        and "stem" not in r.variant and "pointers" not in r.variant and r.dtype == "bf16"


def _gaps_cell(r):
    if forward_row(r):
        return "; ".join(hopper_gaps(r)) or "meets the bar"
    if backward_row(r):
        return "; ".join(backward_gaps(r)) or "meets the bar"
    return "-"


def _loop_cell(r):
    if not r.per_tile_instructions:
        return str(r.loop_instructions)
    return (f"{r.loop_instructions} ({r.per_tile_instructions} per tile"
            + (", overlap)" if r.epilogue_overlap else ")"))


def markdown(results, command, seconds):
    lines = [
        "# Static check of the Triton kernels for sm_90 (no GPU)",
        "",
        f"Generated by `{command}` with triton {triton.__version__} for "
        f"GPUTarget('cuda', 90, 32) (sm_90a), {len(results)} specialisations in "
        f"{seconds:.0f} s. Nothing here was measured on a GPU: these are the compiler's "
        "figures (ptxas -v, cuobjdump -sass of the cubin).",
        "",
        "Columns: registers per thread; spill: bytes stored/loaded by the whole kernel "
        "[spill instructions on the hot path]; shared memory (bytes); "
        "global loads/stores by width in bits (count of SASS instructions); hot loop: SASS "
        "instructions of the innermost loop holding the main work (memory-bound: the loads; "
        "conv: the tensor-core instructions), per element for memory-bound kernels (whole "
        "program when there is no loop); HGMMA/HMMA: tensor-core instructions; div64: "
        "64-bit integer divisions in the PTX (a CALLed routine).",
        "",
        "Conv columns (issue 21): LDGSTS: cp.async copies by width in bits (not loads "
        "into registers; their commit groups, LDGDEPBAR, are counted apart as dep); TMA: "
        "UTMALDG/UTMASTG tile loads/stores; HGMMA shapes in the kernel; loop HGMMA: HGMMA "
        "of one warp in the hot loop (one K step); SASS/HGMMA: hot-loop instructions per "
        "HGMMA (where the tile loop is flattened into the K loop, `hot loop` reads `N (P "
        "per tile, overlap)`: P of its N instructions sit in branches taken once per tile, "
        "the next tile's index math and the epilogue, and are left out of SASS/HGMMA, "
        "wait, div and CALL; overlap: the loop issues the operand loads, which the "
        "pipeline runs stages - 1 steps ahead, before the epilogue's stores); "
        "wait: the WARPGROUP.DEPBAR.LE immediates in the hot loop (wgmma groups "
        "left in flight); div: integer div/rem of any width in the hot loop (TTGIR "
        "arith.div/rem in the innermost scf.for holding the dot + PTX div/rem in the "
        "innermost PTX loop holding the wgmma), CALL: calls in it; gaps: what misses "
        "issue 21's bar (`hopper_gaps` for bf16 forward rows, `backward_gaps` for bf16 "
        "dgrad/wgrad rows; '-': the bar does not apply).",
        "",
        "| kernel | variant | dtype | config | regs | spill | smem | LDG | STG | hot loop "
        "| instr/elem | HGMMA | HMMA | div64 | LDGSTS (dep) | TMA ld/st | HGMMA shapes "
        "| loop HGMMA | SASS/HGMMA | wait | div/CALL | gaps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        "---|---|",
    ]
    widths = lambda d: " ".join(f"{k}:{v}" for k, v in sorted(d.items())) or "-"  # noqa: E731
    for r in results:
        if r.error:
            lines.append(f"| {r.kernel} | {r.variant} | {r.dtype} | {r.config} | "
                         f"compile error: {r.error} |||||||||||||||||")
            continue
        ipe = f"{r.instructions_per_element:.1f}" if r.memory_bound and r.elements_per_thread \
            else "-"
        lines.append(f"| {r.kernel} | {r.variant} | {r.dtype} | {r.config} | {r.registers} | "
                     f"{r.spill_stores}/{r.spill_loads} [{r.hot_spills}] | {r.shared} | "
                     f"{widths(r.loads)} | "
                     f"{widths(r.stores)} | {_loop_cell(r)} | {ipe} | {r.hgmma} | "
                     f"{r.hmma} | {r.div64} | " + (
                         "- | - | - | - | - | - | - | - |" if r.memory_bound else
                         f"{widths(r.ldgsts)} ({r.ldgdepbar}) | {r.utmaldg}/{r.utmastg} | "
                         f"{widths(r.hgmma_shapes)} | {r.loop_hgmma} | {r.sass_per_hgmma} | "
                         f"{','.join(map(str, r.wgmma_wait)) or '-'} | "
                         f"{r.loop_div}/{r.loop_calls} | "
                         f"{_gaps_cell(r)} |"))
    bad = problems(results)
    lines += ["", "## Problems", ""] + ([f"- {p}" for p in bad] or ["None."])
    return "\n".join(lines) + "\n"


def ci_specs():
    """The CI subset (tests/test_static_triton.py, ~1-2 min on 2 cores): bf16 (the
    per-channel finalize kernels: fp32), the first (deterministic-mode) config of each
    kernel variant, the conv modes most likely to spill."""
    seen, out = set(), []
    for spec in bn_specs(True) + conv_specs(True):
        meta = spec[-1]
        key = (meta["kernel"], meta["variant"])
        if key not in seen and meta["dtype"] == ("fp32" if meta["kernel"].endswith("finalize")
                                                 else "bf16"):
            seen.add(key)
            out.append(spec)
    return out


def run(quick=False, only=None, log=print, ci=False, match=None, dtype=None, dump=None):
    """Compile and read the specialisations; ``match``: a regex on "kernel [variant]",
    ``dtype``: one dtype (e.g. ``--only conv --dtype bf16 --match fwd``); ``dump``: a
    folder for each row's TTGIR, PTX, SASS and hot loop (files named by row)."""
    specs = []
    if ci:
        specs = ci_specs()
    if only in (None, "bn") and not ci:
        specs += bn_specs(quick)
    if only in (None, "conv") and not ci:
        specs += conv_specs(quick)
    if match:
        specs = [sp for sp in specs
                 if re.search(match, f"{sp[-1]['kernel']} [{sp[-1]['variant']}]")]
    if dtype:
        specs = [sp for sp in specs if sp[-1]["dtype"] == dtype]
    results = []
    if dump:
        os.makedirs(dump, exist_ok=True)
    for i, (fn, ptrs, consts, warps, stages, meta) in enumerate(specs):
        name = re.sub(r"[^A-Za-z0-9]+", "_", f"{meta['kernel']} {meta['variant']} "
                      f"{meta['dtype']} {consts.get('BLOCK_M')}x{consts.get('BLOCK_N')}x"
                      f"{consts.get('BLOCK_K')} w{warps} s{stages}").strip("_")
        r = analyse(fn, ptrs, consts, warps, stages, **meta,
                    dump=os.path.join(dump, f"{i:03d}_{name}") if dump else None)
        log(f"{r.kernel:24s} {r.variant:36s} {r.dtype:5s} {r.config:58s} regs={r.registers:3d} "
            f"spill={r.spill_stores}/{r.spill_loads} loop={r.loop_instructions} "
            f"ipe={r.instructions_per_element} hgmma={r.hgmma} div64={r.div64} "
            + ("" if r.memory_bound else
               f"ldgsts={r.ldgsts} depbar={r.ldgdepbar} tma={r.utmaldg}/{r.utmastg} "
               f"shapes={r.hgmma_shapes} loop_hgmma={r.loop_hgmma} "
               f"sass/hgmma={r.sass_per_hgmma} wait={r.wgmma_wait} div={r.loop_div} "
               f"per_tile={r.per_tile_instructions} overlap={r.epilogue_overlap} "
               f"call={r.loop_calls} smem={r.shared} {r.ptxas_warnings} ")
            + r.error)
        results.append(r)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a representative subset")
    ap.add_argument("--ci", action="store_true", help="the CI subset (first config, bf16)")
    ap.add_argument("--only", choices=["bn", "conv"])
    ap.add_argument("--match", help="regex on 'kernel [variant]': only those")
    ap.add_argument("--dtype", choices=list(DTYPES), help="only this dtype")
    ap.add_argument("--keep-others", action="store_true",
                    help="keep the rows of the existing triton.json that this run did not "
                         "select (e.g. regenerate the conv rows only)")
    ap.add_argument("--out", help="the folder of triton.json and triton.md (default: "
                    "benchmarks/static)")
    ap.add_argument("--dump", help="write each row's TTGIR, PTX, SASS and hot-loop SASS "
                    "(the K-step path as counted) into this folder, to compare compilers")
    ap.add_argument("--size", type=int, help="compile the pixel-box rows at this output "
                    "size (H = W; the launchers' boxes there, batch 256) instead of 56x56 "
                    "(the stride-1 forward) and 28x28 (the rest); needs --out")
    ap.add_argument("--python", help="run the check under this interpreter instead (e.g. a "
                    "venv with another Triton: the GPU image's 3.6, docs/triton_conv.md)")
    args = ap.parse_args(argv)
    if args.size is not None and (args.size < 1 or args.out is None):
        ap.error("--size needs a positive size and --out (benchmarks/static holds the "
                 "default sizes' rows)")
    args.out = args.out or os.path.join(ROOT, "benchmarks", "static")
    global SIZE
    SIZE = args.size
    if args.python and os.path.realpath(args.python) != os.path.realpath(sys.executable):
        rest = list(sys.argv[1:] if argv is None else argv)
        i = rest.index("--python") if "--python" in rest else None
        rest = rest[:i] + rest[i + 2:] if i is not None else [a for a in rest if not
                                                             a.startswith("--python=")]
        return subprocess.run([args.python, os.path.abspath(__file__), *rest]).returncode
    t0 = time.time()
    results = run(args.quick, args.only, ci=args.ci, match=args.match, dtype=args.dtype,
                  dump=args.dump and os.path.abspath(args.dump))
    seconds = time.time() - t0
    command = "python scripts/static_triton.py" + (" --quick" if args.quick else "") + \
        (" --ci" if args.ci else "") + (f" --only {args.only}" if args.only else "") + \
        (f" --match '{args.match}'" if args.match else "") + \
        (f" --dtype {args.dtype}" if args.dtype else "") + \
        (f" --size {args.size}" if args.size else "") + \
        (" --keep-others" if args.keep_others else "")
    path = os.path.join(args.out, "triton.json")
    sources = {row_source(r.kernel): source_digest(row_source(r.kernel)) for r in results}
    if args.keep_others and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        fresh = {r.kernel for r in results}
        known = set(Result.__dataclass_fields__)
        kept = [Result(**{k: v for k, v in row.items() if k in known})
                for row in old["results"] if row["kernel"] not in fresh]
        results = kept + results
        # a kept row's source digest is its run's; a file with rows of two versions has
        # none (e.g. conv_wgrad rows kept beside fresh conv rows after a change)
        mixed = set()
        for r in kept:
            f = row_source(r.kernel)
            was = old.get("sources", {}).get(f)
            if f in sources and sources[f] != was:
                mixed.add(f)
            sources.setdefault(f, was)
        for f in mixed:
            print(f"warning: {f} has rows compiled from two versions of it; regenerate them "
                  "all (its digest is left out)")
            sources[f] = None
        source = old["command"]  # the run that made the kept rows (not a chain of runs)
        while "(other kernels' rows from `" in source:
            source = source.split("(other kernels' rows from `", 1)[1]
        command += f" (other kernels' rows from `{source.rstrip(')`')}`)"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "triton.json"), "w") as f:
        json.dump({"command": command, "triton": triton.__version__, "target": "sm_90a",
                   "sources": dict(sorted(sources.items())), "seconds": round(seconds), "results": [asdict(r) for r in results],
                   "problems": problems(results)}, f, indent=1)
    with open(os.path.join(args.out, "triton.md"), "w") as f:
        f.write(markdown(results, command, seconds))
    bad = problems(results)
    print(f"{len(results)} specialisations, {len(bad)} problems, {seconds:.0f} s")
    for p in bad:
        print("  " + p)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

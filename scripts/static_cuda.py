"""Static check of the CUDA kernels for sm_90: what the compiler made of each one.

Every ``.cu`` under ``csrc/`` is compiled with ``nvcc -arch=sm_90 -cubin -Xptxas -v``
(plain CUDA C++, no torch headers: seconds) and disassembled with ``cuobjdump -sass``.
Per kernel (one row per template instantiation) the table gives:

* registers, spill bytes (stores + loads), stack frame and shared memory (ptxas);
* the widths of its global loads and stores (``LDG.E.128`` ... ``STG.E.U8``);
* for the memory-bound kernels (bn_apply, bn_backward_apply and the two reductions),
  SASS instructions per element of the hot loop on the vector path, and for the
  reductions the bytes of global loads a thread has in flight before it first waits.

Counting method (instructions per element). The hot loop is the backward branch (a
``BRA`` to a lower address) whose body [target, branch] holds the most 16-byte global
memory instructions. Within that body the forward branches form a DAG; the count is the
number of instructions on the LONGEST path from the loop head to the backward branch
that stays on the vector path -- it never passes an instruction that moves activation
elements one at a time (a global load, for reductions, or store, for elementwise
kernels, of 2, 4 or 8 bytes; mask bytes, ``.U8``, are allowed) -- divided by the
elements one iteration handles (``kUnit`` = 8 for the elementwise kernels and
``reduce_outer``, ``kRows * V`` for ``reduce_inner``; read from bn_kernels.cu), times the
times nvcc unrolled a reduction's loop (its 16-byte loads on the path over those of one
step: 1 or 2 tensors of 16-byte vectors).
Predicated instructions count as issued. The longest path is the vector path with every
optional input on (residual, second BN, mask): an upper bound for the others. Ties on
16-byte instructions go to the shorter loop; the other loops with as many 16-byte
instructions are reported beside it (``other_loop_instr_per_element``, the longest): for
the NCHW elementwise path (kPlanesPath) that is the pass over the chunks that span two
channel planes, at most 8/S of the chunks (1/7 at S = 49, 7x7), each element selecting
its channel's values; the table also gives the two loops blended at S = 49.

Bytes in flight (reductions): along that path, the bytes of the global loads issued
before the first instruction that reads a register one of them writes (a thread stalls
there until the data arrives). Per SM, for a shape: that times the threads resident on
an SM (the register limit, and the grid: a small grid leaves SMs with fewer blocks).
Figures are for H100/H200 (132 SMs, 64K registers and 2048 threads per SM).

Targets (issues 12, 22): the vector path of every memory-bound kernel <= 24 instructions
per element (fp32 and bf16; other dtypes reported), no spills in any kernel (every
instantiation, every dtype and path), and no local-memory traffic in the hot loop of any
memory-bound kernel. Regenerate the committed table with

    python scripts/static_cuda.py        # writes benchmarks/static/cuda.json and cuda.md

``--check`` exits 1 when a target is broken (tests/test_static_cuda.py runs it).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "benchmarks", "static")
ARCH = "sm_90"
MAX_INSTR_PER_ELEM = 24
TARGET_DTYPES = ("float", "__nv_bfloat16")  # issue 12: fp32 and bf16 (others reported)
# Vector paths known to miss the instruction target, with the reason; listed as "not met"
# in the table, never silently. Empty since the NCHW path (kPlanesPath) moved the chunks
# that span two channels (per-element selects) to a pass of their own.
KNOWN_OVER: dict[str, str] = {}
BLEND_S = 49  # the plane size the two kPlanesPath loops are blended at (7x7, ResNet-50)
SMS, REGS_PER_SM, THREADS_PER_SM = 132, 65536, 2048
# reduce_inner at 7x7x512, batch 64: ~13 KiB/SM of loads in flight give 85% of H100's
# copy bandwidth (issue 12, finding 5)
MIN_KIB_IN_FLIGHT = 13
COMMAND = "python scripts/static_cuda.py"


def find_tool(name: str) -> str | None:
    """nvcc / cuobjdump from CUDA_HOME, /usr/local/cuda, PATH, or triton's bundled copy."""
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and os.path.exists(os.path.join(base, "bin", name)):
            return os.path.join(base, "bin", name)
    found = shutil.which(name)
    if found:
        return found
    try:
        import triton  # its wheel ships cuobjdump / nvdisasm
        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        return p if os.path.exists(p) else None
    except ImportError:
        return None


# ---- compiling and reading ---------------------------------------------------------------


def compile_cu(nvcc: str, src: str, cubin: str) -> str:
    cmd = [nvcc, f"-arch={ARCH}", "-cubin", "-Xptxas", "-v", "-std=c++17",
           "-I", os.path.join(ROOT, "csrc"), "-o", cubin, src]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src}:\n{r.stderr[-4000:]}")
    return r.stderr


def parse_ptxas(text: str) -> dict:
    """mangled name -> {registers, spill_bytes, stack_bytes, smem_bytes}."""
    res, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$]+)'?", line)
        if m:
            cur = res.setdefault(m.group(1), {"registers": 0, "spill_bytes": 0,
                                              "stack_bytes": 0, "smem_bytes": 0})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            cur["stack_bytes"] = int(m.group(1))
            cur["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem_bytes"] = int(s.group(1)) if s else 0
    return res


def parse_sass(text: str) -> dict:
    """mangled name -> [(address, instruction text without predicate)... , with pred]."""
    funcs, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2).strip()))
    return funcs


def demangle(names):
    r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines() if r.returncode == 0 else list(names)
    short = []
    for d in out:
        d = re.sub(r"fusedres::cuda::\(anonymous namespace\)::", "", d)
        d = re.sub(r"^void ", "", d)
        short.append(re.sub(r"\(.*\)$", "", d))
    return dict(zip(names, short))


# ---- instruction analysis ----------------------------------------------------------------

WIDTH = re.compile(r"^(LDG|STG)\.E((?:\.\w+)*)")


def mem_op(ins: str):
    """('LDG'|'STG', bytes) of a global load/store, else None."""
    m = WIDTH.match(ins.split(" ")[0] if not ins.startswith("@") else ins.split(" ")[1])
    if not m:
        return None
    mods = m.group(2).split(".")
    size = 4
    for mod in mods:
        if mod in ("128", "64"):
            size = int(mod) // 8
        elif mod in ("U8", "S8"):
            size = 1
        elif mod in ("U16", "S16"):
            size = 2
    return m.group(1), size


def opcode(ins: str) -> str:
    parts = ins.split()
    return parts[1] if parts[0].startswith("@") else parts[0]


def predicated(ins: str) -> bool:
    return ins.startswith("@")


def branch_target(ins: str):
    m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", ins)
    return int(m.group(1), 16) if m and opcode(ins) == "BRA" else None


def hot_loop(instrs):
    """(head index, branch index) of the loop with the most 16-byte global memory ops."""
    index = {a: i for i, (a, _) in enumerate(instrs)}
    best = None
    for t, (addr, ins) in enumerate(instrs):
        tgt = branch_target(ins)
        if tgt is None or tgt >= addr or tgt not in index:
            continue
        h = index[tgt]
        wide = sum(1 for _, x in instrs[h:t + 1] if (mem_op(x) or ("", 0))[1] == 16)
        key = (wide, -(t - h))
        if wide and (best is None or key > best[0]):
            best = (key, h, t)
    return None if best is None else (best[1], best[2])


def loops_like(instrs, h, t):
    """(head, branch) of the other loops, outside [h, t], with as many 16-byte global
    memory instructions as the loop [h, t]."""
    index = {a: i for i, (a, _) in enumerate(instrs)}
    wide_of = lambda a, b: sum(1 for _, x in instrs[a:b + 1]  # noqa
                               if (mem_op(x) or ("", 0))[1] == 16)
    want, res = wide_of(h, t), []
    for j, (addr, ins) in enumerate(instrs):
        tgt = branch_target(ins)
        if tgt is None or tgt >= addr or tgt not in index:
            continue
        i = index[tgt]
        if (j < h or i > t) and wide_of(i, j) == want:
            res.append((i, j))
    return res


def longest_vector_path(instrs, h, t, forbidden):
    """Instructions on the longest path head -> backward branch avoiding `forbidden`."""
    index = {a: i for i, (a, _) in enumerate(instrs)}
    NEG = -(10 ** 9)
    best = [NEG] * (t + 2)
    nxt = [None] * (t + 2)
    best[t] = 1
    for i in range(t - 1, h - 1, -1):
        ins = instrs[i][1]
        if forbidden(ins) or (opcode(ins) == "EXIT" and not predicated(ins)):
            continue
        succ = []
        tgt = branch_target(ins)
        if tgt is not None:
            j = index.get(tgt)
            if j is not None and h <= j <= t and j > i:
                succ.append(j)
            if predicated(ins):
                succ.append(i + 1)
        else:
            succ.append(i + 1)
        cands = [(best[s], s) for s in succ if s <= t and best[s] > NEG]
        if cands:
            b, s = max(cands)
            best[i], nxt[i] = 1 + b, s
    path, i = [], h
    if best[h] <= NEG:
        return []
    while i is not None and i <= t:
        path.append(i)
        i = nxt[i] if i != t else None
    return path


def regs_of(token: str, size: int):
    m = re.match(r"R(\d+)", token)
    if not m:
        return set()
    r = int(m.group(1))
    return {f"R{r + k}" for k in range(max(1, size // 4))}


def bytes_before_first_use(instrs, path):
    loaded, total = set(), 0
    for i in path:
        ins = instrs[i][1]
        op = mem_op(ins)
        body = ins.split(" ", 2 if predicated(ins) else 1)[-1]
        operands = [o.strip() for o in body.split(",")]
        if op and op[0] == "LDG":
            srcs = " ".join(operands[1:])
            if loaded & set(re.findall(r"\bR\d+\b", srcs)):  # not the R12 of UR12
                break
            loaded |= regs_of(operands[0], op[1])
            total += op[1]
            continue
        srcs = " ".join(operands[1:]) if operands else ""
        if opcode(ins).startswith("ST"):
            srcs = " ".join(operands)
        if loaded & set(re.findall(r"\bR\d+\b", srcs)):
            break
    return total


# ---- kernels -------------------------------------------------------------------------------

def kunit_of():
    return source_constants()[0]


def source_constants():
    src = open(os.path.join(ROOT, "csrc", "cuda", "bn_kernels.cu")).read()
    get = lambda name: int(re.search(rf"constexpr int {name} = (\d+);", src).group(1))  # noqa
    return get("kUnit"), get("kRows")


def classify(short: str, kunit: int, krows: int):
    """(kind, vector_path, elements per iteration, forbidden-instruction predicate)."""
    args = re.search(r"<(.*)>", short)
    targs = [a.strip() for a in args.group(1).split(",")] if args else []
    scalar_store = lambda ins: (mem_op(ins) or ("", 0))[0] == "STG" and mem_op(ins)[1] in (2, 4, 8)  # noqa
    scalar_load = lambda ins: (mem_op(ins) or ("", 0))[0] == "LDG" and mem_op(ins)[1] in (2, 4, 8)  # noqa
    if short.startswith(("bn_apply_kernel", "bn_backward_apply_kernel")):
        path = int(targs[1])  # Path: 0 generic, 1 generic vec, 2 rows, 3 planes
        return "elementwise", path in (2, 3), kunit, scalar_store
    # Reductions' 4th argument is the gate; 3 (kMaskAnyGate: a mask in the other layout,
    # read bit by bit) is not a vector path.
    if short.startswith("reduce_outer_kernel"):
        return "reduction", targs[2] == "true" and targs[3] != "3", kunit, scalar_load
    if short.startswith("reduce_inner_kernel"):
        v = int(targs[2])
        return "reduction", v > 1 and targs[3] != "3", krows * v, scalar_load
    return "per-channel", False, None, None


ESIZE = {"float": 4, "double": 8, "__half": 2, "__nv_bfloat16": 2}


def unrolled(short, instrs, path, kunit, krows):
    """How many steps of a reduction one iteration of its hot loop does: its 16-byte loads
    on the path over those of one step (x, and dout in backward: MODE 1)."""
    targs = [a.strip() for a in re.search(r"<(.*)>", short).group(1).split(",")]
    tensors = 2 if targs[1] == "1" else 1
    if short.startswith("reduce_outer_kernel"):
        per_step = tensors * max(1, kunit * ESIZE[targs[0]] // 16)
    else:
        per_step = tensors * krows
    wide = sum(1 for i in path if mem_op(instrs[i][1]) == ("LDG", 16))
    return max(1, wide // per_step)


def analyse(cu_files, nvcc, cuobjdump):
    kunit, krows = source_constants()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in cu_files:
            cubin = os.path.join(tmp, os.path.basename(src) + ".cubin")
            ptx = parse_ptxas(compile_cu(nvcc, src, cubin))
            sass = parse_sass(subprocess.run([cuobjdump, "-sass", cubin], capture_output=True,
                                             text=True, check=True).stdout)
            names = demangle(sorted(sass))
            for mangled, instrs in sorted(sass.items(), key=lambda kv: names[kv[0]]):
                short = names[mangled]
                info = ptx.get(mangled, {})
                kind, vector, elems, forbidden = classify(short, kunit, krows)
                widths = sorted({f"{op}.{8 * size}" for op, size in
                                 filter(None, (mem_op(x) for _, x in instrs))})
                dtype = re.search(r"<([\w:]+)", short)
                target = vector and bool(dtype) and dtype.group(1) in TARGET_DTYPES
                row = {"file": os.path.relpath(src, ROOT), "kernel": short, "kind": kind,
                       "vector_path": vector, "target": target, **info, "global_mem": widths,
                       "instructions": len(instrs)}
                if elems:
                    loop = hot_loop(instrs)
                    if loop:
                        path = longest_vector_path(instrs, *loop, forbidden)
                        if kind == "reduction":
                            elems = classify(short, kunit, krows)[2] * unrolled(
                                short, instrs, path, kunit, krows)
                        row["loop_instructions"] = len(path)
                        row["loop_local_memory"] = sum(
                            1 for _, x in instrs[loop[0]:loop[1] + 1]
                            if opcode(x).startswith(("LDL", "STL")))
                        row["elements_per_iteration"] = elems
                        row["instr_per_element"] = round(len(path) / elems, 2)
                        others = [len(longest_vector_path(instrs, i, j, forbidden))
                                  for i, j in loops_like(instrs, *loop)]
                        if others:
                            row["other_loop_instr_per_element"] = round(max(others) / elems, 2)
                        if kind == "reduction":
                            row["load_bytes_before_first_use"] = bytes_before_first_use(
                                instrs, path)
                rows.append(row)
    return rows


# ---- the small-shape reduction: bytes in flight per SM ---------------------------------------

def reduce_inner_in_flight(row, n, c, s, elem_bytes, min_steps=None):
    """Bytes in flight per SM of reduce_inner on an (n, c, s) channels-last tensor: the
    launcher's grid (launch_reduce) times the row's bytes before the first use.
    ``min_steps``: the least steps per thread (default: bn_kernels.cu's min_steps_inner)."""
    src = open(os.path.join(ROOT, "csrc", "cuda", "bn_kernels.cu")).read()
    get = lambda name: int(re.search(rf"constexpr int(?:64_t)? {name} = (\d+);", src).group(1))  # noqa
    threads, krows, target = get("kThreads"), get("kRows"), get("kTargetBlocks")
    max_parts = get("kMaxParts")
    if min_steps is None:  # min_steps_inner(MODE, sizeof(T)), read from its source
        rule = re.search(r"return mode == kStats && elem_bytes < (\d+) \? (\d+) : "
                         r"kMinStepsInner;", src)
        assert rule, "min_steps_inner in bn_kernels.cu changed: update this replica"
        mode = int(row["kernel"].split("<")[1].split(",")[1])
        small = mode == 0 and elem_bytes < int(rule.group(1))
        min_steps = int(rule.group(2)) if small else get("kMinStepsInner")
    v = 16 // elem_bytes
    groups = math.ceil(c / v)
    tx = 1
    while tx < 32 and tx < groups:
        tx <<= 1
    ty = threads // tx
    gx = math.ceil(groups / tx)
    m = n * s
    step = ty * krows  # rows of one block step; partitions are whole steps (plan_reduce)
    steps = math.ceil(m / step)
    p = max(1, min(math.ceil(target / gx), math.ceil(steps / min_steps), max_parts))
    per_part = math.ceil(steps / p) * step
    p = math.ceil(m / per_part)
    blocks = gx * p
    by_regs = THREADS_PER_SM
    if row.get("registers"):
        by_regs = min(THREADS_PER_SM, REGS_PER_SM // (row["registers"] * threads) * threads)
    resident = min(by_regs, blocks * threads / SMS)
    return {"shape": [n, c, s], "blocks": blocks, "threads_per_sm": round(resident),
            "kib_per_sm": round(resident * row["load_bytes_before_first_use"] / 1024, 1)}


# ---- output --------------------------------------------------------------------------------

def small_shape_in_flight(rows, min_steps=None):
    """reduce_inner's loads in flight at the small shape of issue 12 point 5 (7x7x512,
    batch 64), one entry per targeted reduce_inner kernel."""
    return [{"kernel": r["kernel"], **reduce_inner_in_flight(
                r, 64, 512, 49, 2 if "bfloat16" in r["kernel"] else 4, min_steps)}
            for r in rows if r["kernel"].startswith("reduce_inner_kernel") and r.get("target")]


def check(rows):
    """Broken targets, as messages."""
    bad = [f"{e['kernel']}: {e['kib_per_sm']} KiB/SM of loads in flight at {e['shape']} "
           f"(< {MIN_KIB_IN_FLIGHT})" for e in small_shape_in_flight(rows)
           if e["kib_per_sm"] < MIN_KIB_IN_FLIGHT]
    for r in rows:
        if r.get("spill_bytes"):  # any kernel: a spill is a ptxas choice, never needed here
            bad.append(f"{r['kernel']}: {r['spill_bytes']} bytes of spills")
        if r.get("loop_local_memory"):
            bad.append(f"{r['kernel']}: {r['loop_local_memory']} local-memory instructions "
                       "(spills) in its hot loop")
        if r["target"] and r.get("instr_per_element", 0) > MAX_INSTR_PER_ELEM and \
                r["kernel"] not in KNOWN_OVER:
            bad.append(f"{r['kernel']}: {r['instr_per_element']} SASS instructions per element "
                       f"on its vector path (> {MAX_INSTR_PER_ELEM})")
        if r["target"] and not r.get("instr_per_element"):
            bad.append(f"{r['kernel']}: no hot loop found (the counting method needs a look)")
    return bad


def markdown(rows, extra):
    lines = [
        "# Static check of the CUDA kernels (sm_90)", "",
        f"Generated by `{COMMAND}` (nvcc + cuobjdump, no GPU). Method: see the script's "
        "docstring. `instr/elem`: SASS instructions per element on the hot loop's vector "
        "path (longest path, every optional input on); target <= "
        f"{MAX_INSTR_PER_ELEM} for the vector-path rows of fp32 and bf16 (`vec` = target), "
        "reported for the others; no spills in any kernel, no local memory in any hot "
        "loop. Not measured on a GPU.", "",
        "| kernel | kind | vec | regs | spill B | smem B | global ld/st | instr/elem | "
        "other loop | ld B before 1st use |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['kernel']}` | {r['kind']} | "
            f"{'target' if r['target'] else 'yes' if r['vector_path'] else ''} | "
            f"{r.get('registers', '')} | {r.get('spill_bytes', '')} | {r.get('smem_bytes', '')} | "
            f"{' '.join(r['global_mem'])} | {r.get('instr_per_element', '')} | "
            f"{r.get('other_loop_instr_per_element', '')} | "
            f"{r.get('load_bytes_before_first_use', '')} |")
    if extra:
        lines += ["", "## reduce_inner: loads in flight per SM at small shapes", "",
                  "Bytes of loads a thread issues before its first wait, times the threads "
                  "resident per SM for the launcher's grid on 132 SMs (figures from the "
                  "launcher's formulas; ~13 KiB/SM is needed for 85% of copy bandwidth on "
                  f"H100, ~1.4x that on H200; target, checked: every row >= "
                  f"{MIN_KIB_IN_FLIGHT}).", "",
                  "| kernel | (N, C, S) | blocks | threads/SM | KiB/SM |", "|---|---|---|---|---|"]
        for e in extra:
            lines.append(f"| `{e['kernel']}` | {tuple(e['shape'])} | {e['blocks']} | "
                         f"{e['threads_per_sm']} | {e['kib_per_sm']} |")
    planes = [r for r in rows if r["target"] and r.get("other_loop_instr_per_element")
              and r["kind"] == "elementwise"]
    if planes:
        f = (kunit_of() - 1) / BLEND_S  # boundary chunks per chunk, S odd
        lines += ["", f"## NCHW elementwise path: the two passes blended at S = {BLEND_S}", "",
                  "`other loop`: the pass over the chunks that span two channel planes "
                  f"(each element selects its channel's values), {kunit_of() - 1}/{BLEND_S} of "
                  f"the chunks at S = {BLEND_S}; instructions issued per element, both passes:",
                  "", "| kernel | main pass | boundary pass | blended |", "|---|---|---|---|"]
        lines += [f"| `{r['kernel']}` | {r['instr_per_element']} | "
                  f"{r['other_loop_instr_per_element']} | "
                  f"{round(r['instr_per_element'] + f * r['other_loop_instr_per_element'], 2)} |"
                  for r in planes]
    known = [r for r in rows if r["kernel"] in KNOWN_OVER]
    if known:
        lines += ["", "Known, not met (see KNOWN_OVER in the script):"]
        lines += [f"- `{r['kernel']}`: {r.get('instr_per_element')} instr/elem -- "
                  f"{KNOWN_OVER[r['kernel']]}" for r in known]
    bad = check(rows)
    lines += ["", "Targets: " + (("all met, except the known rows above." if known else
                                  "all met.") if not bad else "BROKEN:")]
    lines += [f"- {b}" for b in bad]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is broken")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/static")
    ap.add_argument("--out", default=OUT_DIR)
    args = ap.parse_args(argv)
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    if not nvcc or not cuobjdump:
        print(f"static_cuda: needs nvcc and cuobjdump (found {nvcc}, {cuobjdump})")
        return 2
    cu_files = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
    rows = analyse(cu_files, nvcc, cuobjdump)
    extra = small_shape_in_flight(rows)
    if not args.no_write:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cuda.json"), "w") as f:
            json.dump({"arch": ARCH, "command": COMMAND, "kernels": rows,
                       "reduce_inner_in_flight": extra}, f, indent=1)
        with open(os.path.join(args.out, "cuda.md"), "w") as f:
            f.write(markdown(rows, extra))
    bad = check(rows)
    for r in rows:
        if r["vector_path"]:
            print(f"{r['kernel']:80s} regs {r.get('registers')} spill {r.get('spill_bytes')} "
                  f"instr/elem {r.get('instr_per_element')}")
    for b in bad:
        print("BROKEN:", b)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a training step's time goes: profiler kernels grouped into a fixed table.

``categorize(kernel, ops)`` is a pure function of names: a device kernel's name (cuDNN,
cuBLAS, torch, Inductor, fusedres Triton or CUDA C++) and the names of the profiler ranges
that launched it, innermost first (``aten::convolution_backward``,
``fusedres::triton_conv_backward``, ``Optimizer.step#SGD.step``, ...). The first rule of
``RULES`` that matches wins; a rule matches on the kernel name or on any enclosing range.
On the CPU (the dry run) the "kernels" are the operators of the step (``aten::...``),
named alike, so the same table and the same code run end to end without a GPU.

``kernels_from_trace(trace)`` reads a Chrome trace as ``torch.profiler`` exports it
(``export_chrome_trace``): on a GPU every ``kernel`` / ``gpu_memcpy`` / ``gpu_memset``
event, linked to the CPU range that launched it by its ``External id``; on the CPU every
``cpu_op`` inside the ``fusedres_step`` ranges, with its self time. ``summarize`` adds them up per
category: the categories sum to the total kernel time by construction, and the step's
wall time minus the time the device was busy (the union of the kernel intervals) is its
idle time: launches or the host holding the device back.

The BN floor (``bn_traffic``): the bytes the BN work of a ResNet must move per training
step under the fused traffic model of ``formulas`` (each BN site forward and backward),
and under the eager one; over the copy bandwidth measured in the same run, the least time
a BN / elementwise category could take.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from typing import Callable, Iterable, Optional

from . import formulas

STEP_RANGE = "fusedres_step"  # the record_function range around each profiled step

CONV_FWD, DGRAD, WGRAD, CONV_BWD = "conv fwd", "conv dgrad", "conv wgrad", \
    "conv bwd (dgrad+wgrad not split)"
BN_OURS, BN_TORCH, BN_INDUCTOR = "BN/elementwise: fusedres", "BN/elementwise: torch", \
    "BN/elementwise: Inductor"
POOL, GEMM, LOSS, OPTIM, COPIES, OTHER = "pooling", "FC/GEMM", "loss", "optimizer", \
    "copies/fills", "other"
# The fixed table, in display order. "conv bwd (not split)" only where the names cannot
# tell dgrad from wgrad (the CPU's one convolution_backward operator).
CATEGORIES = (CONV_FWD, DGRAD, WGRAD, CONV_BWD, BN_OURS, BN_TORCH, BN_INDUCTOR, POOL, GEMM,
              LOSS, OPTIM, COPIES, OTHER)
BN_CATEGORIES = (BN_OURS, BN_TORCH, BN_INDUCTOR)

_CONV_OP = r"aten::(_|cudnn_|mkldnn_|miopen_)?convolution\b|aten::conv2d\b"
_CONV_BWD_OP = r"aten::(cudnn_|mkldnn_|miopen_)?convolution_backward"
# (category, regex on the kernel name or None, regex on an enclosing range or None[,
# "both": the two must match]); the first rule with a match wins. Conv kernels of
# cuDNN/CUTLASS carry "gemm" too, so the conv rules come before FC/GEMM; fusedres's
# Triton conv ("_conv_kernel") computes the forward and the data gradient, told apart by
# the custom op that launched it.
RULES = (
    (COPIES, r"^Memcpy|^Memset|memcpy|memset|copy_kernel|[Cc]opy[A-Z_]|CatArrayBatchedCopy|"
             r"nchwToNhwc|nhwcToNchw|FillFunctor|fill_kernel|^aten::(copy_|_to_copy|clone|"
             r"fill_|zero_|cat|contiguous)$", None),
    (DGRAD, r"dgrad|bwd_data|convolve_dgrad", None),
    (WGRAD, r"wgrad|bwd_filter|convolve_wgrad", None),
    (CONV_FWD, r"fprop|fwd_implicit|implicit_convolve|winograd_fwd|conv2d_fwd|"
               r"convolve_common_engine", None),
    (DGRAD, r"^_conv_kernel$", r"fusedres::\w*conv\w*backward", "both"),
    (CONV_FWD, r"^_conv_kernel$", None),
    (CONV_BWD, None, _CONV_BWD_OP),
    (CONV_FWD, None, _CONV_OP),
    (BN_OURS, r"^_bn_|fusedres::|^_stats_merge_kernel$", r"^fusedres::"),
    (POOL, r"pool", r"pool"),
    (LOSS, r"[Ss]oft[Mm]ax|nll_loss|cross_entropy", r"cross_entropy|nll_loss|log_softmax"),
    (OPTIM, r"multi_tensor_apply|foreach|sgd|unscale|non_finite",
            r"^Optimizer\.|aten::_foreach|_amp_|GradScaler"),
    (BN_INDUCTOR, r"^triton_(poi|red|per)_", None),
    (GEMM, r"gemm|gemv|nvjet|cublas|cutlass|splitKreduce|^aten::(addmm|mm|bmm|matmul)$",
           r"aten::(addmm|mm|bmm|linear|matmul)\b"),
    (BN_TORCH, r"batch_norm|batchnorm|bn_fw|bn_bw|welford|elementwise|reduce_kernel|"
               r"threshold|relu|clamp|^aten::(add|add_|mul|mul_|sum|mean|div_?|sub_?)$",
               r"batch_norm|aten::(relu|threshold|clamp_min|add|add_|mul|sum|mean)\b"),
)
_COMPILED = tuple((r[0], re.compile(r[1]) if r[1] else None, re.compile(r[2]) if r[2] else None,
                   r[3:] == ("both",)) for r in RULES)


def categorize(kernel: str, ops: Iterable[str] = ()) -> str:
    """The category of one kernel: the first rule whose kernel regex matches ``kernel``
    or whose range regex matches ``kernel`` or one of ``ops`` (the enclosing profiler
    ranges, innermost first)."""
    names = (kernel,) + tuple(ops)  # a CPU "kernel" is an operator: its own name counts
    for cat, k, o, both in _COMPILED:
        hit_k = k is not None and k.search(kernel) is not None
        hit_o = o is not None and any(o.search(op) for op in names)
        if (hit_k and hit_o) if both else (hit_k or hit_o):
            return cat
    return OTHER


# --------------------------------------------------------------------------------------
# Chrome trace -> kernels
# --------------------------------------------------------------------------------------

_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
# Host ranges: operators, record_function ranges, and the CUDA runtime calls (a launch
# names its kernel by "correlation" where the kernel carries no "External id").
_RANGE_CATS = ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver")


def _ranges_by_thread(events: list) -> dict:
    """{(pid, tid): [range]} with each range a dict: ts, end, name, cat, ext (its
    ``External id``), parent (index of the innermost range containing it), leaf (no
    ``cpu_op`` inside it). Sorted by start, an outer range before the inner ones."""
    out: dict = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in _RANGE_CATS:
            ts = float(e["ts"])
            out.setdefault((e.get("pid"), e.get("tid")), []).append(
                {"ts": ts, "end": ts + float(e.get("dur", 0)), "name": e["name"],
                 "cat": e["cat"], "ext": (e.get("args") or {}).get("External id"),
                 "corr": (e.get("args") or {}).get("correlation"),
                 "parent": None, "leaf": True})
    for ranges in out.values():
        ranges.sort(key=lambda r: (r["ts"], -r["end"]))
        stack: list = []
        for i, r in enumerate(ranges):
            while stack and not (ranges[stack[-1]]["ts"] <= r["ts"]
                                 and r["end"] <= ranges[stack[-1]]["end"]):
                stack.pop()
            if stack:
                r["parent"] = stack[-1]
                if r["cat"] == "cpu_op":
                    for j in reversed(stack):  # every enclosing range is not a leaf
                        if not ranges[j]["leaf"]:
                            break
                        ranges[j]["leaf"] = False
            stack.append(i)
    return out


def _chain(ranges: list, i: Optional[int]) -> list:
    """Names of range ``i`` and of the ranges enclosing it, innermost first."""
    out = []
    while i is not None:
        out.append(ranges[i]["name"])
        i = ranges[i]["parent"]
    return out


def kernels_from_trace(trace: dict) -> tuple[list, dict]:
    """``([{"name", "ops", "ts", "dur"}], window)`` from an exported Chrome trace.

    Device events when there are any (GPU): each linked through its ``External id`` to
    the CPU range that launched it (else through its ``correlation`` to the runtime call
    that launched it), whose enclosing ranges follow it in ``ops``; the
    window is the first kernel's start to the last one's end. Otherwise (CPU) every
    operator inside the ``STEP_RANGE`` ranges with its self time (its duration less its
    operators'), the window the steps' summed duration, busy the time under a top-level
    operator. ``window``: {"device": "cuda" | "cpu", "wall_us", "steps"[, "busy_us"]}.
    """
    events = [e for e in trace.get("traceEvents", []) if isinstance(e, dict)]
    threads = _ranges_by_thread(events)
    steps = [e for e in events if e.get("ph") == "X" and e.get("name") == STEP_RANGE
             and e.get("cat") == "user_annotation"]
    device = [e for e in events if e.get("ph") == "X" and e.get("cat") in _DEVICE_CATS]
    if device:
        by_ext: dict = {}
        by_corr: dict = {}
        for ranges in threads.values():
            for i, r in enumerate(ranges):
                if r["ext"] is not None and r["cat"] == "cpu_op":
                    by_ext[r["ext"]] = (ranges, i)
                if r["corr"] is not None and r["cat"] in ("cuda_runtime", "cuda_driver"):
                    by_corr[r["corr"]] = (ranges, r["parent"])
        kernels = []
        for ev in device:
            args = ev.get("args") or {}
            found = by_ext.get(args.get("External id")) or by_corr.get(args.get("correlation"))
            kernels.append({"name": ev["name"], "ops": _chain(*found) if found else [],
                            "ts": float(ev["ts"]), "dur": float(ev.get("dur", 0))})
        start = min(k["ts"] for k in kernels)
        end = max(k["ts"] + k["dur"] for k in kernels)
        return kernels, {"device": "cuda", "wall_us": end - start, "steps": len(steps)}
    spans = [(float(st["ts"]), float(st["ts"]) + float(st.get("dur", 0))) for st in steps]
    kernels, tops = [], []
    for ranges in threads.values():
        inside = [i for i, r in enumerate(ranges) if r["cat"] == "cpu_op"
                  and any(s <= r["ts"] and r["end"] <= e for s, e in spans)]
        children = {i: 0.0 for i in inside}
        for i in inside:  # each operator's time goes to its nearest enclosing operator
            a = ranges[i]["parent"]
            while a is not None and ranges[a]["cat"] != "cpu_op":
                a = ranges[a]["parent"]
            if a in children:
                children[a] += ranges[i]["end"] - ranges[i]["ts"]
            else:
                tops.append({"ts": ranges[i]["ts"], "dur": ranges[i]["end"] - ranges[i]["ts"]})
        for i in inside:  # an operator's own (self) time, named by it and its ranges
            r = ranges[i]
            kernels.append({"name": r["name"], "ops": _chain(ranges, r["parent"]),
                            "ts": r["ts"], "dur": max(r["end"] - r["ts"] - children[i], 0.0)})
    return kernels, {"device": "cpu", "wall_us": sum(e - s for s, e in spans),
                     "busy_us": busy_us(tops), "steps": len(steps)}


def busy_us(kernels: list) -> float:
    """Time covered by at least one kernel (kernels overlapping on streams count once)."""
    total, cur_s, cur_e = 0.0, None, None
    for k in sorted(kernels, key=lambda k: k["ts"]):
        s, e = k["ts"], k["ts"] + k["dur"]
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def summarize(kernels: list, window: dict, top: int = 3) -> dict:
    """Per-step milliseconds per category, the total, the busy and idle time, and the
    longest kernels of each category (what to look at first)."""
    steps = max(int(window.get("steps") or 1), 1)
    per_cat = {c: 0.0 for c in CATEGORIES}
    names: dict = {}
    for k in kernels:
        cat = categorize(k["name"], k["ops"])
        per_cat[cat] += k["dur"]
        names.setdefault(cat, {}).setdefault(k["name"][:160], [0.0, 0])
        names[cat][k["name"][:160]][0] += k["dur"]
        names[cat][k["name"][:160]][1] += 1
    total = sum(k["dur"] for k in kernels)
    busy = window["busy_us"] if window.get("busy_us") is not None else busy_us(kernels)
    wall = float(window.get("wall_us") or 0.0)
    return {
        "device": window.get("device"), "steps": steps, "kernels": len(kernels) / steps,
        "categories_ms": {c: v / steps / 1e3 for c, v in per_cat.items()},
        "total_ms": total / steps / 1e3, "busy_ms": busy / steps / 1e3,
        "wall_ms": wall / steps / 1e3, "idle_ms": max(wall - busy, 0.0) / steps / 1e3,
        "top": {c: [{"name": n, "ms": d / steps / 1e3, "count": cnt / steps}
                    for n, (d, cnt) in sorted(v.items(), key=lambda kv: -kv[1][0])[:top]]
                for c, v in names.items()},
    }


# --------------------------------------------------------------------------------------
# Profiling a step
# --------------------------------------------------------------------------------------


def profile_step(step: Callable[[], object], device_type: str, steps: int = 3) -> dict:
    """``summarize`` of ``steps`` calls of ``step`` under ``torch.profiler`` (CUDA kernels
    on a GPU, CPU operators otherwise); ``profile_s``: what profiling cost."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from .timing import _quiet_stderr

    t0 = time.perf_counter()
    cuda = device_type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with _quiet_stderr(), profile(activities=acts) as prof:
        for _ in range(steps):
            with record_function(STEP_RANGE):
                step()
        if cuda:
            torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.unlink(path)
    kernels, window = kernels_from_trace(trace)
    out = summarize(kernels, window)
    out["profile_s"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------
# The BN floor
# --------------------------------------------------------------------------------------


def resnet_bn_sites(model, example) -> list:
    """``[(op, shape)]``: every fused BN site of a torchvision-style ResNet on ``example``
    (shapes from a forward on the meta device): ``bn1``/``bn2`` of a block and the stem's
    ``bn1`` are BN+ReLU; ``bn3`` (``bn2`` of a BasicBlock) with the residual is
    BN+add+ReLU, or the dual form when the block has a ``downsample`` BN."""
    import copy

    import torch

    meta = copy.deepcopy(model).to("meta")
    shapes: dict = {}
    hooks = [m.register_forward_hook(
        lambda mod, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
        for name, m in meta.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            meta(example.to("meta"))
    finally:
        for h in hooks:
            h.remove()
    blocks = {name for name, m in meta.named_modules() if hasattr(m, "downsample")}
    last_bn = {}
    for name in shapes:
        block, _, leaf = name.rpartition(".")
        if block in blocks and leaf.startswith("bn"):
            last_bn[block] = max(last_bn.get(block, ""), leaf)
    sites = []
    for name, shape in shapes.items():
        block, _, leaf = name.rpartition(".")
        if name.endswith("downsample.1"):
            continue  # counted with its block's last BN, the dual form
        if block in blocks and leaf == last_bn[block]:
            dual = getattr(dict(meta.named_modules())[block], "downsample", None) is not None
            sites.append(("dual_bn_add_relu" if dual else "bn_add_relu", shape))
        else:
            sites.append(("bn_relu", shape))
    return sites


def bn_traffic(sites: list, dtype) -> dict:
    """Bytes per training step of every BN site, forward and backward: ``fused`` (what
    fusedres's kernels must move) and ``eager`` (torch's separate BN, add and ReLU)."""
    return {model: sum(formulas.op_bytes(op, "fwd+bwd", shape, dtype, model)
                       for op, shape in sites) for model in ("fused", "eager")}


def floor_ms(nbytes: Optional[int], copy_gbps: Optional[float]) -> Optional[float]:
    if not nbytes or not copy_gbps:
        return None
    return nbytes / (copy_gbps * 1e9) * 1e3


# --------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------

MISSING = "missing"


def _ms(v: Optional[float]) -> str:
    return MISSING if v is None else f"{v:.3g}"


def markdown(breakdowns: dict, floor: Optional[dict] = None) -> list:
    """Lines of a table: one column per provider (``{provider: summarize(...) or None}``;
    None renders as missing), a row per category, then the total, the busy, wall and
    idle time; ``floor`` ({"fused_ms", "eager_ms", ...}) adds the BN rows' floor."""
    provs = list(breakdowns)
    head = "| ms per step | " + " | ".join(provs) + " |"
    lines = [head, "|" + "---|" * (len(provs) + 1)]

    def row(label, get):
        cells = []
        for p in provs:
            b = breakdowns[p]
            cells.append(MISSING if b is None else _ms(get(b)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for cat in CATEGORIES:
        if all(b is None or b["categories_ms"].get(cat, 0.0) == 0.0
               for b in breakdowns.values()):
            continue  # a category no provider spent time in: left out of the table
        label = cat
        if cat in BN_CATEGORIES and floor and floor.get("fused_ms") is not None:
            label += f" (floor {floor['fused_ms']:.3g})"
        row(label, lambda b, cat=cat: b["categories_ms"].get(cat))
    row("**kernel total**", lambda b: b["total_ms"])
    row("device busy", lambda b: b["busy_ms"])
    row("step wall (profiled)", lambda b: b["wall_ms"])
    row("**idle** (wall - busy)", lambda b: b["idle_ms"])
    return lines


# --------------------------------------------------------------------------------------
# The train stage's report: rows, breakdowns and what is missing, from train.jsonl lines
# --------------------------------------------------------------------------------------


def _gib(v) -> str:
    return MISSING if v is None else f"{v / 2**30:.1f} GiB"


def _x(v) -> str:
    return MISSING if v is None else f"{v:.2f}x"


def _why_missing(records: list, provider: str, dtype: str, what: str) -> str:
    """Why a provider has no row / breakdown for a dtype, from the stage's own lines."""
    for r in reversed(records):
        if r.get("provider") != provider or r.get("dtype") != dtype:
            continue
        if r.get("kind") == "error" and (what == "row" or r.get("phase") in
                                         ("build", "breakdown")):
            return f"failed in {r.get('phase')}: {r.get('error')}"
        if r.get("kind") == "skipped":
            return f"skipped: {r.get('reason')}"
    ends = [r for r in records if r.get("kind") == "end"]
    if not records:
        return "not measured: no run of this train stage yet"
    if not ends:
        return "not reached: the stage was killed before it (no end line)"
    if ends[-1].get("stopped"):
        return f"not reached: {ends[-1]['stopped']}"
    return "not measured in any run"


def train_markdown(records: list, providers: Optional[list] = None,
                   dtypes: Optional[list] = None) -> list:
    """Markdown lines: per dtype, one row per provider (ms per step, img/s, vs eager and
    vs torch.compile of the same run, peak memory, the seconds spent getting ready) and
    the step breakdown with the BN floor. A figure that was not measured reads
    ``missing`` with the reason (failed, skipped, not reached), never 0."""
    headers = [r for r in records if r.get("kind") == "header"]
    st = headers[-1]["settings"] if headers else {}
    providers = providers or list(dict.fromkeys(
        p for h in headers for p in h["settings"].get("providers", [])))
    dtypes = dtypes or list(dict.fromkeys(d for h in headers for d in h["settings"]["dtypes"]))
    sessions = list(dict.fromkeys(h.get("session") for h in headers))
    out = []
    if headers:
        m = headers[-1].get("machine", {})
        out += [f"{st.get('model')} ({st.get('model_source')}), batch {st.get('batch')}, "
                f"{st.get('image_size')}x{st.get('image_size')}, {st.get('layout')}, "
                f"synthetic data, {st.get('optimizer')}; fp16: {st.get('fp16')}; "
                f"torch.compile: {st.get('compile')}.",
                "",
                f"{m.get('gpu') or m.get('cpu')}, torch {m.get('torch')}, triton "
                f"{m.get('triton')}, driver {m.get('driver')}; "
                + "; ".join(f"call {i + 1}: {h.get('session')}, commit "
                            f"`{h.get('machine', {}).get('git_commit')}`, `"
                            f"{h.get('machine', {}).get('command')}`"
                            for i, h in enumerate(headers)) + ".", ""]
    for dt in dtypes:
        rows = {}
        for r in records:  # the last measurement of each provider (a resumed run's
            if r.get("kind") == "row" and r.get("dtype") == dt:  # baseline not over it)
                if r["provider"] not in rows or not r.get("baseline"):
                    rows[r["provider"]] = r
        out += [f"**{dt}**", "",
                "| provider | ms per step | img/s | vs eager | vs torch.compile | peak memory "
                "| ready in (convert + tune + first steps) | call |",
                "|---|---|---|---|---|---|---|---|"]
        for p in providers:
            r = rows.get(p)
            if r is None:
                out.append(f"| {p} | {MISSING} ({_why_missing(records, p, dt, 'row')}) "
                           "| | | | | | |")
                continue
            e = r.get("extra") or {}
            call = sessions.index(r.get("session")) + 1 if r.get("session") in sessions else "?"
            ready = (f"{e.get('prep_s', 0):.0f} s ({e.get('convert_s', 0):.1f} + "
                     f"{e.get('tune_s', 0):.1f} + {e.get('first_steps_s', 0):.1f})")
            note = "; ".join(e.get("notes") or [])
            out.append(f"| {p} | {r['time_ms']:.4g} (p20-p80 {r['time_p20_ms']:.4g}-"
                       f"{r['time_p80_ms']:.4g}) | {r['images_per_s']:.0f} | "
                       f"{_x(r.get('speedup_vs_eager'))} | "
                       + (_x(r["speedup_vs_compile"]) if r.get("speedup_vs_compile")
                          else f"{MISSING} (no torch.compile row in call {call})") + " "
                       f"| {_gib(r.get('peak_mem_bytes'))} | {ready}"
                       + (f"; {note}" if note else "") + f" | {call} |")
        out.append("")
        bds = {}
        for r in records:
            if r.get("kind") == "breakdown" and r.get("dtype") == dt:
                bds[r["provider"]] = r
        floor = None
        if headers:
            floor_ms = (headers[-1].get("bn_floor_ms") or {}).get(dt) or {}
            nbytes = (headers[-1].get("bn_bytes") or {}).get(dt) or {}
            floor = {"fused_ms": floor_ms.get("fused"), "eager_ms": floor_ms.get("eager")}
            gbps = (headers[-1].get("copy") or {}).get("gbps")
            if nbytes:
                out += [f"BN floor ({headers[-1].get('bn_sites')} BN sites, forward and "
                        f"backward, at the copy bandwidth measured in the run, "
                        + (f"{gbps:.0f} GB/s" if gbps else MISSING) + "): fused traffic "
                        f"{nbytes['fused'] / 1e9:.2f} GB = {_ms(floor['fused_ms'])} ms; "
                        f"eager's {nbytes['eager'] / 1e9:.2f} GB = {_ms(floor['eager_ms'])} "
                        "ms.", ""]
        table = {p: (bds.get(p) if p in bds else None) for p in providers}
        out += [f"Step breakdown, {dt} (ms per step, `torch.profiler` over "
                f"{next((b['steps'] for b in bds.values()), 'a few')} steps):", ""]
        out += markdown(table, floor)
        for p in providers:
            if p not in bds:
                out.append(f"- {p}: breakdown {MISSING} "
                           f"({_why_missing(records, p, dt, 'breakdown')})")
        out.append("")
    return out


def train_results_section(results_dir: str, files: list) -> list:
    """benchmarks/RESULTS.md's training-step section: ``train.md`` of the results folder
    (written by ``scripts/gpu_summary.py to-json`` from train.jsonl), or, where that
    folder has none, every provider and dtype as missing and why."""
    title = "## Training step per provider, and where its time goes"
    path = os.path.join(results_dir, "train.md")
    if os.path.exists(path):
        with open(path) as f:
            return [title, "", f"From `{os.path.basename(os.path.normpath(results_dir))}/"
                    "train.jsonl` (`scripts/gpu_run.sh`, train stage).", ""] + \
                f.read().rstrip("\n").splitlines() + [""]
    from .trainstep import default_providers

    why = ("this folder predates the per-provider train stage of scripts/gpu_run.sh"
           + (" (its train.json, below, has the older eager / converted rows only)"
              if "train.json" in files else ""))
    dtypes = ("bfloat16", "float16")
    return [title, "", f"Every figure of this section is **missing**: {why}. The next GPU "
            "call of `scripts/gpu_run.sh` measures them (ms per step, img/s, vs eager and vs "
            "torch.compile, peak memory, seconds to get ready; the step breakdown by kernel "
            "category with the GPU's idle time and the BN floor).", "",
            "| provider | " + " | ".join(f"{d} row | {d} breakdown" for d in dtypes) + " |",
            "|---|" + "---|---|" * len(dtypes)] + \
        [f"| {p} | " + " | ".join([MISSING] * 2 * len(dtypes)) + " |"
         for p in default_providers()] + [""]

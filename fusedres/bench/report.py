"""Machine information and the outputs: terminal table, JSON, markdown, plot, and the
results table regenerated from committed GPU results (``fusedres-bench report``)."""
from __future__ import annotations

import datetime
import glob
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from typing import Optional

import torch

from .._timing import cpu_name  # noqa: F401  (fusedres.tune's cache key uses it too)

SCHEMA = "fusedres-bench/1"

# Settings outside the command line that change timings: recorded with every run (the
# prefixes MALLOC_, FUSEDRES_, TORCHINDUCTOR_ and CUDA_ too).
TIMING_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "LD_PRELOAD",
              "GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE", "TRITON_INTERPRET",
              "PYTORCH_CUDA_ALLOC_CONF")

# Every row carries these keys (value may be null where it does not apply).
ROW_KEYS = (
    "suite", "case", "pass", "layer", "shape", "dtype", "layout", "device", "provider",
    "time_ms", "time_p20_ms", "time_p80_ms", "time_iqr_ms", "samples", "timer", "timer_note",
    "bytes", "bytes_eager", "gbps", "pct_copy_bw", "copy_gbps", "flops", "tflops", "images_per_s",
    "peak_mem_bytes", "peak_mem_kind", "retained_bytes", "retained_kind", "retained_vs_eager",
    "speedup_vs_eager", "page_faults_per_call", "git_commit", "extra",
)


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list, cwd: Optional[str] = None) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """The commit of the fusedres checkout this runs from (``-dirty`` when it has
    uncommitted changes), else $FUSEDRES_GIT_COMMIT, else "unknown"."""
    env = os.environ.get("FUSEDRES_GIT_COMMIT")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    sha = _run(["git", "rev-parse", "HEAD"], cwd=here)
    if not sha:
        return "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here)
    return sha + ("-dirty" if dirty else "")


def command_line() -> str:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fusedres-bench"
    if prog in ("__main__.py", "-m", "-c", ""):
        return " ".join(["python -m fusedres.bench", shlex.join(sys.argv[1:])]).strip()
    return shlex.join([prog] + sys.argv[1:])  # quoted: the line can be pasted back


def machine_info(device: torch.device, argv: Optional[list] = None) -> dict:
    import fusedres

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line() if argv is None else shlex.join(["fusedres-bench"] + argv),
        "git_commit": git_commit(),
        "device_type": device.type,
        "device_name": cpu_name(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
        "driver": None,
        "cuda_runtime": torch.version.cuda,
        "cudnn": None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "torchvision": _version("torchvision"),
        "fusedres": getattr(fusedres, "__version__", None),
        "fusedres_backends": fusedres.available_backends(),
        "cpu_isa": fusedres.cpu_isa(),
        "environment": {k: os.environ[k] for k in sorted(os.environ) if k in TIMING_ENV
                        or k.startswith(("MALLOC_", "FUSEDRES_", "TORCHINDUCTOR_", "CUDA_"))},
        "fusedres_extension_error": (str(fusedres.extension_error)
                                     if getattr(fusedres, "extension_error", None) else None),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["device_name"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
        info["gpu_sms"] = props.multi_processor_count
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["cudnn"] = torch.backends.cudnn.version()
        info["allow_tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32,
                              "matmul": torch.backends.cuda.matmul.allow_tf32}
        if shutil.which("nvidia-smi"):
            info["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version",
                                   "--format=csv,noheader", f"--id={device.index or 0}"])
    return info


# --------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)


def _num(v, fmt="{:.2f}") -> str:
    return "" if v is None else fmt.format(v)


def _throughput(row) -> str:
    if row.get("images_per_s") is not None:
        return f"{row['images_per_s']:.1f} img/s"
    if row.get("tflops") is not None:
        return f"{row['tflops']:.3f} TFLOP/s"
    if row.get("gbps") is not None:
        pct = row.get("pct_copy_bw")
        return f"{row['gbps']:.1f} GB/s" + (f" ({pct:.0f}% copy)" if pct is not None else "")
    return ""


def _retained(row) -> str:
    kept = row.get("retained_bytes")
    if kept is None:
        return ""
    ratio = row.get("retained_vs_eager")
    return f"{kept / 2**20:.1f}" + (f" ({ratio:.2f}x)" if ratio is not None else "")


TABLE_COLUMNS = ("suite", "case", "pass", "layer", "shape", "provider", "median ms",
                 "p20-p80 ms", "throughput", "vs eager", "peak MiB",
                 "kept for bwd MiB (vs eager)", "page faults/call")
# The default terminal table fits this many columns (--wide: every column, any width).
TABLE_WIDTH = 100


def speedup_clear(row) -> bool:
    """Whether a row's "vs eager" ratio says more than this run's noise: the p20-p80
    ranges of the two times do not overlap (the ratio's range, eager p20/p80 over this
    row's p80/p20, lies on one side of 1). Eager's own row is always clear."""
    lo, hi = row.get("speedup_range") or (None, None)
    if row.get("provider") == "eager" or lo is None:
        return True
    return lo > 1.0 or hi < 1.0


UNCLEAR_MARK = "?"
UNCLEAR_NOTE = ("'?' after a ratio: the p20-p80 ranges of the two times overlap, so this "
                "run cannot tell the two apart")


def unclear_note(settings: Optional[dict] = None, machine: Optional[dict] = None) -> str:
    """UNCLEAR_NOTE with the advice that fits the run: no "--threads 1" to a run that used
    one thread, no "without --quick" to a run that did not use it."""
    settings, machine = settings or {}, machine or {}
    advice = ["rerun on an idle machine"]
    if settings.get("quick", True):
        advice.append("with more time (no --quick)")
    if machine.get("device_type", "cpu") == "cpu" and machine.get("torch_threads") != 1:
        advice.append("with --threads 1")
    return UNCLEAR_NOTE + "; " + ", ".join(advice) + " before concluding"


def unclear_rows(rows: list) -> list:
    return [r for r in rows if r.get("speedup_vs_eager") is not None
            and not r.get("speedup_clear", True)]


def speedup_text(row) -> str:
    v = row.get("speedup_vs_eager")
    if v is None:
        return ""
    return f"{v:.2f}x" + ("" if row.get("speedup_clear", True) else UNCLEAR_MARK)


def table_rows(rows: list) -> list:
    out = []
    for r in rows:
        peak = r.get("peak_mem_bytes")
        out.append([
            r["suite"], r["case"], r["pass"], r["layer"], _shape(r["shape"]), r["provider"],
            f"{r['time_ms']:.4g}", f"{r['time_p20_ms']:.4g}-{r['time_p80_ms']:.4g}",
            _throughput(r), speedup_text(r),
            "" if peak is None else f"{peak / 2**20:.0f}",
            _retained(r), _num(r.get("page_faults_per_call"), "{:.0f}"),
        ])
    return out


def _columns(header, body) -> list:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
            for line in [header, ["-" * w for w in widths]] + body]


SUITE_TITLES = {
    "ops": "fused BN ops, training mode (GB/s; % of a copy of one activation, same size)",
    "conv": "ResNet-50 convolutions (TFLOP/s)",
    "blocks": "ResNet blocks, forward+backward (img/s, peak memory, bytes kept for backward)",
    "train": "whole models (img/s, peak memory, bytes kept for backward)",
}


def _spread(r) -> str:
    """Half the p20-p80 range, as a percentage of the median."""
    if not r["time_ms"]:
        return ""
    return f"{50 * (r['time_p80_ms'] - r['time_p20_ms']) / r['time_ms']:.0f}%"


def _narrow(suite: str, rows: list, width: int) -> list:
    """One suite: a line per case (case, pass, layer, shape), then a line per provider
    with the columns this suite fills; the rest is in --wide and the JSON."""
    cols = [("provider", lambda r: r["provider"]),
            ("median ms", lambda r: f"{r['time_ms']:.4g}"),
            ("+-", _spread),
            ("GB/s", lambda r: _num(r.get("gbps"), "{:.1f}")),
            ("% copy", lambda r: _num(r.get("pct_copy_bw"), "{:.0f}")),
            ("TFLOP/s", lambda r: "" if r.get("images_per_s") is not None or r.get("gbps")
             is not None else _num(r.get("tflops"), "{:.3f}")),
            ("img/s", lambda r: _num(r.get("images_per_s"), "{:.1f}")),
            ("vs eager", speedup_text),
            ("peak MiB", lambda r: "" if r.get("peak_mem_bytes") is None
             else f"{r['peak_mem_bytes'] / 2**20:.0f}"),
            ("kept MiB", _retained)]
    cells = [[f(r) for _, f in cols] for r in rows]
    keep = [i for i in range(len(cols)) if any(c[i] for c in cells)]
    header = [cols[i][0] for i in keep]
    lines = _columns(header, [[c[i] for i in keep] for c in cells])  # aligned across the suite
    out = [f"== {suite}: {SUITE_TITLES.get(suite, '')}"[:width], "  " + lines[0]]
    last = None
    for r, line in zip(rows, lines[2:]):
        key = (r["case"], r["pass"], r["layer"], _shape(r["shape"]))
        if key != last:
            out.append(" ".join(key)[:width])
            last = key
        out.append("  " + line)
    return out


def text_table(rows: list, wide: bool = False, width: int = TABLE_WIDTH) -> str:
    """The terminal table: by default per suite, at most ``width`` columns (the columns a
    suite leaves empty dropped, the p20-p80 range as +-% of the median); ``wide``: every
    column of every row on one line."""
    if not rows:
        return "(no rows)"
    if wide:
        return "\n".join(_columns(list(TABLE_COLUMNS), table_rows(rows)))
    out = []
    for suite in dict.fromkeys(r["suite"] for r in rows):
        out += _narrow(suite, [r for r in rows if r["suite"] == suite], width)
    return "\n".join(out)


def wrap(text: str, width: int = TABLE_WIDTH, indent: str = "    ") -> str:
    """A footer line wrapped to the table's width."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width=width, subsequent_indent=indent,
                                    break_on_hyphens=False)) or text


def _md_escape(s) -> str:
    return str(s).replace("|", "\\|")


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# fusedres-bench results: {m.get('gpu') or m.get('cpu')}",
        "",
        f"- date: {m['date']}; git commit: `{m['git_commit']}`",
        f"- device: {m['device_type']} ({m['device_name']}); driver: {m.get('driver')}; "
        f"CUDA {m.get('cuda_runtime')}; cuDNN {m.get('cudnn')}",
        f"- torch {m['torch']}, triton {m.get('triton')}, torchvision {m.get('torchvision')}, "
        f"fusedres backends {m.get('fusedres_backends')} (cpu kernels: {m.get('cpu_isa')})",
        f"- command: `{m['command']}`"
        + (" with " + " ".join(f"`{k}={v}`" for k, v in m["environment"].items())
           if m.get("environment") else ""),
        f"- settings: dtype {result['settings']['dtype']}, layout "
        f"{result['settings']['layout']}, batch {result['settings']['batch']}"
        + (f", {m['torch_threads']} CPU thread(s)" if m.get("device_type") == "cpu" else ""),
    ]
    bw = result.get("copy_bandwidth_gbps")
    if bw:
        lines.append(f"- device-copy bandwidth measured in this run: {bw:.1f} GB/s "
                     "(bytes read + written); memory-bound rows give % of it")
    lines.append("")
    for suite in ("ops", "conv", "blocks", "train"):
        rows = [r for r in result["rows"] if r["suite"] == suite]
        if not rows:
            continue
        lines += [f"## {suite}", "", "| " + " | ".join(TABLE_COLUMNS[1:]) + " |",
                  "|" + "---|" * (len(TABLE_COLUMNS) - 1)]
        for line in table_rows(rows):
            lines.append("| " + " | ".join(_md_escape(c) for c in line[1:]) + " |")
        lines.append("")
    unclear = unclear_rows(result["rows"])
    if unclear:
        lines += [f"{len(unclear)} ratio(s) marked "
                  f"{unclear_note(result.get('settings'), result.get('machine'))}.", ""]
    if result.get("skipped"):
        lines += ["## skipped", ""]
        for s in result["skipped"]:
            lines.append(f"- {s['suite']} / {s['provider']}: {s['reason']}"
                         + (f" ({s['count']} cases)" if s.get("count", 1) > 1 else ""))
        lines.append("")
    if result.get("errors"):
        lines += ["## errors", ""]
        for e in result["errors"]:
            lines.append(f"- {e['suite']} {e['case']} {e['pass']} {e['layer']} / "
                         f"{e['provider']}: {_md_escape(e['error'])}")
        lines.append("")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


def plot(result: dict, path: str) -> Optional[str]:
    """Speedup vs eager per layer, one bar per provider, one panel per suite and pass.
    Returns None, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written"
    rows = [r for r in result["rows"] if r.get("speedup_vs_eager") is not None
            and r["provider"] != "eager"]
    if not rows:
        return "no rows with a speedup vs eager: no plot written"
    panels = []
    for r in rows:
        key = (r["suite"], r["case"], r["pass"])
        if key not in panels:
            panels.append(key)
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.2 * len(panels)), squeeze=False)
    for ax, (suite, case, pass_) in zip(axes[:, 0], panels):
        sel = [r for r in rows if (r["suite"], r["case"], r["pass"]) == (suite, case, pass_)]
        layers = list(dict.fromkeys(f"{r['layer']}\n{_shape(r['shape'])}" for r in sel))
        providers = list(dict.fromkeys(r["provider"] for r in sel))
        width = 0.8 / max(1, len(providers))
        for i, p in enumerate(providers):
            xs, ys = [], []
            for r in sel:
                if r["provider"] == p:
                    xs.append(layers.index(f"{r['layer']}\n{_shape(r['shape'])}") + i * width)
                    ys.append(r["speedup_vs_eager"])
            ax.bar(xs, ys, width=width, label=p)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))])
        ax.set_xticklabels(layers, fontsize=6, rotation=30, ha="right")
        ax.set_ylabel("speedup vs eager")
        ax.set_title(f"{suite}: {case} {pass_}", fontsize=9)
        ax.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"fusedres-bench on {m.get('gpu') or m.get('cpu')}, {m['date'][:10]}, "
                 f"{result['settings']['dtype']}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------------------
# Committed results -> benchmarks/RESULTS.md
# --------------------------------------------------------------------------------------

NO_RESULTS = "no GPU results committed yet"


def latest_results(results_dir: str) -> tuple[Optional[str], list]:
    """The newest ``results_dir/<gpu>-<date>/`` holding GPU result JSON, and its files.
    Newest by the machine date recorded in the JSON (not file times, which git resets)."""
    best, best_date = None, ""
    for d in sorted(glob.glob(os.path.join(results_dir, "*", ""))):
        files = []
        date = ""
        for path in sorted(glob.glob(os.path.join(d, "*.json"))):
            try:
                with open(path) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                continue
            if data.get("schema") != SCHEMA or data["machine"].get("device_type") != "cuda":
                continue
            files.append((path, data))
            date = max(date, data["machine"].get("date", ""))
        if files and date >= best_date:
            best, best_date = (d, files), date
    if best is None:
        return None, []
    return best


def results_markdown(results_dir: str) -> str:
    d, files = latest_results(results_dir)
    if d is None:
        return f"# fusedres benchmark results\n\n{NO_RESULTS}.\n"
    rel = os.path.relpath(d, os.path.dirname(os.path.abspath(results_dir)))
    lines = ["# fusedres benchmark results", "",
             f"Generated by `fusedres-bench report` from `{rel}` (the latest committed GPU "
             "results); every figure below is in those files.", ""]
    from .breakdown import train_results_section

    lines += train_results_section(d, [os.path.basename(p) for p, _ in files])
    for path, data in files:
        if os.path.basename(path) == "train.json" and os.path.exists(
                os.path.join(d, "train.md")):
            continue  # shown above, with the breakdown and what is missing
        m = data["machine"]
        lines += [f"## {os.path.basename(path)}: {m.get('gpu')}, {m['date']}", "",
                  f"commit `{m['git_commit']}`, torch {m['torch']}, triton {m.get('triton')}, "
                  f"driver {m.get('driver')}, dtype {data['settings']['dtype']}, layout "
                  f"{data['settings']['layout']}, batch {data['settings']['batch']}"
                  + (f", copy bandwidth {data['copy_bandwidth_gbps']:.0f} GB/s"
                     if data.get("copy_bandwidth_gbps") else ""), ""]
        lines += summary_table(data["rows"])
        lines.append("")
    return "\n".join(lines)


def summary_table(rows: list) -> list:
    """One line per case (suite, case, pass, layer): each provider's median and speedup."""
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    cases = list(dict.fromkeys((r["suite"], r["case"], r["pass"], r["layer"]) for r in rows))
    by = {(r["suite"], r["case"], r["pass"], r["layer"], r["provider"]): r for r in rows}
    out = ["| suite | case | pass | layer | " + " | ".join(providers) + " |",
           "|" + "---|" * (4 + len(providers))]
    for key in cases:
        cells = []
        for p in providers:
            r = by.get(key + (p,))
            if r is None:
                cells.append("")
                continue
            cell = f"{r['time_ms']:.3g} ms"
            if r.get("speedup_vs_eager") is not None and p != "eager":
                cell += f" ({speedup_text(r)})"
            cells.append(cell)
        out.append("| " + " | ".join(_md_escape(k) for k in key) + " | " + " | ".join(cells)
                   + " |")
    return out

"""Read what scripts/gpu_run.sh wrote: print the short summary, or convert the timing
stages to fusedres-bench JSON for ``fusedres-bench report``.

    python scripts/gpu_summary.py DIR              the summary table (imports torch only
                                                   for a train stage's tables)
    python scripts/gpu_summary.py to-json DIR...   DIR/{ops,conv,train}.jsonl ->
                                                   DIR/{ops,conv,train}.json, and
                                                   DIR/train.md (providers, breakdown,
                                                   what is missing and why)
    python scripts/gpu_summary.py state-complete|state-set|state-get FILE KEY ...
                                                   the run's state.json (gpu_run.sh)

Files of a run (all optional: a stage that did not run left none):
  run.jsonl    the machine facts, then one line per stage: status ok | failed |
               incomplete | timed_out | skipped, rc, wall_s, cap_s, reason
  state.json   what is finished: stage/<name>, train/<dtype>/<provider>[/breakdown]
  smoke.jsonl  one line per Triton kernel check (scripts/gpu_smoke.py)
  checks.xml   JUnit XML of the CUDA kernel tests (checks.log: their -v output and
               `fusedres-bench doctor`'s)
  ops.jsonl, conv.jsonl, train.jsonl  timings (scripts/gpu_bench.py); train.jsonl
               also the step breakdowns ("kind": "breakdown")
  build.log    the extension build (appended to checks.log once it ends)
Every file is read line by line: a line cut by a kill is ignored.
"""
from __future__ import annotations

import json
import os
import sys
import time
import xml.etree.ElementTree as ET

TIMED = ("ops", "conv", "train")


def read_jsonl(path: str) -> list:
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:  # the last line of a killed writer
                    pass
    except OSError:
        pass
    return rows


# --------------------------------------------------------------------------------------
# state.json: what a run finished, so that a second run into the same folder goes on
# --------------------------------------------------------------------------------------

STATE = "state.json"
# A unit with one of these statuses is not redone; "failed" is, with RETRY_FAILED=1.
FINAL = ("ok", "failed", "unavailable")


def state_load(path: str) -> dict:
    """{key: {"status", "at", ...}}; {} if the file is absent or unreadable (a torn file
    cannot happen: it is replaced whole)."""
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def state_set(path: str, key: str, status: str, **info) -> None:
    """Record one unit (a stage, or a train stage's provider / breakdown) atomically."""
    data = state_load(path)
    data[key] = dict(info, status=status, at=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                            time.gmtime()))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def state_complete(data: dict, key: str, retry_failed: bool = False) -> bool:
    """Is ``key`` finished (so a resumed run skips it)?"""
    status = (data.get(key) or {}).get("status")
    if status == "failed" and retry_failed:
        return False
    return status in FINAL


def junit(path: str) -> dict | None:
    """Counts and failing test ids of a JUnit XML file (None if absent or unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {k: sum(int(s.get(k, 0)) for s in suites)
           for k in ("tests", "failures", "errors", "skipped")}
    out["time_s"] = sum(float(s.get("time", 0)) for s in suites)
    out["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                     if c.find("failure") is not None or c.find("error") is not None]
    return out


def _ms(r) -> str:
    return f"{r['time_ms']:.3g} ms"


def _cell(stage: str, r: dict | None) -> str:
    if r is None:
        return "-"
    text = _ms(r)
    if stage == "ops" and r.get("pct_copy_bw") is not None:
        text += f" {r['pct_copy_bw']:.0f}%"
    elif stage == "conv" and r.get("tflops") is not None:
        text += f" {r['tflops']:.0f}TF"
    elif stage == "train" and r.get("images_per_s") is not None:
        text += f" {r['images_per_s']:.0f}img/s"
    if r.get("speedup_vs_eager") is not None:
        text += f" {r['speedup_vs_eager']:.2f}x"
    return text


def _table(lines: list) -> list:
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]


def timed_summary(stage: str, rows: list) -> list:
    """One line per case, one column per provider."""
    header = next((r for r in rows if r.get("kind") == "header"), {})
    data = [r for r in rows if r.get("kind") == "row"]
    end = next((r for r in rows if r.get("kind") == "end"), None)
    skipped = [r for r in rows if r.get("kind") == "skipped"]
    errors = [r for r in rows if r.get("kind") == "error"]
    st = header.get("settings", {})
    title = f"{stage}: {st.get('dtype')} {st.get('layout')} batch {st.get('batch')}"
    if header.get("copy", {}).get("gbps"):
        title += f"; device copy {header['copy']['gbps']:.0f} GB/s (read+write), % of it per row"
    unit = {"ops": "ms, % of copy bandwidth", "conv": "ms, TFLOP/s",
            "train": "ms per step, images/s"}[stage]
    out = [f"{title} ({unit}; x = vs eager)"]
    providers = list(dict.fromkeys(r["provider"] for r in data))
    cases = list(dict.fromkeys((r["case"], r["pass"], r["layer"]) for r in data))
    by = {(r["case"], r["pass"], r["layer"], r["provider"]): r for r in data}
    if cases:
        lines = [["case", "pass", "layer"] + providers]
        for key in cases:
            lines.append(list(key) + [_cell(stage, by.get(key + (p,))) for p in providers])
        out += ["  " + line for line in _table(lines)]
    reasons = {}
    for r in skipped:
        reasons.setdefault((r["provider"], r["reason"]), 0)
        reasons[(r["provider"], r["reason"])] += r.get("count", 1)
    for (prov, why), n in reasons.items():
        out.append(f"  skipped {prov} ({n}): {why}")
    for e in errors[:5]:
        out.append(f"  ERROR {e['case']} {e['pass']} {e['layer']} {e['provider']}: {e['error']}")
    if len(errors) > 5:
        out.append(f"  ... {len(errors) - 5} more errors in {stage}.jsonl")
    if end is None:
        out.append(f"  (no end line: {stage} was killed; {len(data)} rows kept)")
    elif not end.get("complete"):
        out.append(f"  (stopped: {end.get('stopped')})")
    return out


def summary(d: str) -> str:
    run = read_jsonl(os.path.join(d, "run.jsonl"))
    facts = next((r for r in run if r.get("kind") == "facts"), {})
    stages = [r for r in run if r.get("kind") == "stage"]
    out = [f"== fusedres GPU run: {facts.get('gpu') or facts.get('cpu')} | "
           f"{facts.get('date')} | commit {facts.get('git_commit')} | {d}"]
    if facts:
        out.append(f"   torch {facts.get('torch')}, triton {facts.get('triton')}, "
                   f"{facts.get('nvcc')}, driver {facts.get('driver')}, "
                   f"cuDNN {facts.get('cudnn')}")
        for m in facts.get("missing", []):
            out.append(f"   missing {m['package']}: {m['skips']}")
    if stages:
        lines = [["stage", "status", "rc", "wall_s", "cap_s", "note"]]
        for r in stages:
            rc = r.get("rc")
            lines.append([r["stage"], r["status"], "" if rc is None else str(rc),
                          str(r.get("wall_s", "")), str(r.get("cap_s", "")),
                          str(r.get("reason") or "")[:90]])
        out += ["   " + line for line in _table(lines)]
    for r in run:
        if r.get("kind") == "backends":
            out.append(f"   fusedres backends after the build: {r['backends']}")
        if r.get("kind") == "cudnn_device_properties":  # for CI's deviceless graph checks
            out.append("   cuDNN device properties: " + (
                f"captured ({len(r['properties'])} bytes; `python -m fusedres.cudnn_deviceless "
                "extract DIR/run.jsonl` saves them under benchmarks/)" if r.get("properties")
                else f"not captured: {str(r.get('error'))[:120]}"))
    smoke = read_jsonl(os.path.join(d, "smoke.jsonl"))
    if smoke:
        checks = [r for r in smoke if r.get("kind") == "check"]
        counts = {s: sum(r["status"] == s for r in checks)
                  for s in ("pass", "fail", "error", "skipped")}
        out.append(f"smoke (Triton kernels vs reference, one config each): {counts['pass']} "
                   f"passed, {counts['fail']} failed, {counts['error']} errors, "
                   f"{counts['skipped']} skipped"
                   + ("" if any(r.get("kind") == "end" for r in smoke) else " (killed)"))
        bad = [r for r in checks if r["status"] in ("fail", "error")]
        for r in bad[:8]:
            out.append(f"  {r['status'].upper()} {r['group']} {r['check']} {r['dtype']} "
                       f"{r['layout']} {r['shape']}: {str(r.get('detail'))[:150]}")
        if len(bad) > 8:
            out.append(f"  ... {len(bad) - 8} more in smoke.jsonl")
    tests = junit(os.path.join(d, "checks.xml"))
    if tests is not None:
        out.append(f"CUDA kernel tests: {tests['tests']} run, {tests['failures']} failed, "
                   f"{tests['errors']} errors, {tests['skipped']} skipped in "
                   f"{tests['time_s']:.0f} s")
        for name in tests["failed"][:8]:
            out.append(f"  FAILED {name}")
        if len(tests["failed"]) > 8:
            out.append(f"  ... {len(tests['failed']) - 8} more in checks.xml")
    for stage in ("ops", "conv", "train"):  # train last: the reply's tail shows it
        rows = read_jsonl(os.path.join(d, f"{stage}.jsonl"))
        if stage == "train" and is_train_v2(rows):
            out += ["train (providers interleaved per dtype; breakdown per provider):"]
            out += train_markdown(rows)
        elif rows:
            out += timed_summary(stage, rows)
    return "\n".join(out)


def is_train_v2(rows: list) -> bool:
    """train.jsonl of the per-provider train stage (a header with a session)."""
    return any(r.get("kind") == "header" and "session" in r for r in rows)


def train_markdown(rows: list) -> list:
    """fusedres.bench.breakdown.train_markdown (this script then imports fusedres)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from fusedres.bench.breakdown import train_markdown as render

    return render(rows)


def to_bench_json(path: str) -> dict:
    """A fusedres-bench result (``fusedres/bench/cli.py``'s JSON) from a stage's lines."""
    from fusedres.bench import report

    rows = read_jsonl(path)
    header = next((r for r in rows if r.get("kind") == "header"), {})
    end = next((r for r in rows if r.get("kind") == "end"), {})
    if is_train_v2(rows):  # several calls may have appended: the last one decides
        header = [r for r in rows if r.get("kind") == "header"][-1]
        end = ([r for r in rows if r.get("kind") == "end"] or [{}])[-1]
        header = dict(header, settings=dict(header["settings"],
                                            dtype=",".join(header["settings"]["dtypes"])))
    data = [{k: v for k, v in r.items() if k != "kind"} for r in rows if r.get("kind") == "row"]
    copy = header.get("copy") or {}
    return {"schema": report.SCHEMA, "complete": bool(end.get("complete")),
            "machine": header.get("machine", {}),
            "settings": dict(header.get("settings", {}),
                             suites=[os.path.basename(path).split(".")[0]],
                             wall_s=end.get("wall_s")),
            "copy_bandwidth_gbps": copy.get("gbps"), "copy": copy,
            "notes": ["converted from " + os.path.basename(path) + " (scripts/gpu_run.sh)"],
            "rows": data,
            "skipped": [{"suite": r.get("suite"), "provider": r.get("provider"),
                         "reason": r.get("reason"), "count": r.get("count", 1)}
                        for r in rows if r.get("kind") == "skipped"],
            "errors": [{k: v for k, v in r.items() if k != "kind"}
                       for r in rows if r.get("kind") == "error"]}


def to_json(dirs: list) -> list:
    """Write DIR/<stage>.json beside every DIR/<stage>.jsonl; returns the paths."""
    from fusedres.bench import report

    written = []
    for d in dirs:
        for stage in TIMED:
            src = os.path.join(d, f"{stage}.jsonl")
            if os.path.exists(src):
                dst = os.path.join(d, f"{stage}.json")
                report.write_json(to_bench_json(src), dst)
                written.append(dst)
                rows = read_jsonl(src)
                if stage == "train" and is_train_v2(rows):
                    md = os.path.join(d, "train.md")  # what RESULTS.md shows of it
                    with open(md, "w") as f:
                        f.write("\n".join(train_markdown(rows)) + "\n")
                    written.append(md)
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "state-complete":  # FILE KEY: exit 0 if KEY is finished
        return 0 if state_complete(state_load(argv[1]), argv[2],
                                   os.environ.get("RETRY_FAILED") == "1") else 1
    if argv[0] == "state-set":  # FILE KEY STATUS [FIELD=VALUE ...]
        state_set(argv[1], argv[2], argv[3], **dict(a.split("=", 1) for a in argv[4:]))
        return 0
    if argv[0] == "state-get":  # FILE KEY FIELD: print the value ("" if none)
        print((state_load(argv[1]).get(argv[2]) or {}).get(argv[3], ""))
        return 0
    if argv[0] == "to-json":
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sys.path.insert(0, root)
        for path in to_json(argv[1:]):
            print(f"wrote {path}")
        return 0
    print(summary(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

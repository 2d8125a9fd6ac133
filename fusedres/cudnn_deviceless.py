"""Deviceless support checks of the cuDNN graphs: device properties captured once on a GPU,
then ``check_support`` for every planned graph on any machine (cuDNN >= 9.11).

cuDNN describes a device in a ``CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR`` (cuDNN >= 9.8) whose
JSON form (``CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION``: grid and block limits, SM
count, shared memory, registers, clocks, L2, ``deviceVer``, driver, name) can be saved
and read back without the device. A graph given such properties instead of a handle is
validated, lowered, offered engines by the heuristics and checked for support with no GPU
(the cudnn-frontend's "deviceless AoT" path).

* ``capture(index)`` (on the GPU; ``scripts/gpu_run.sh`` does it early, into run.jsonl):
  the descriptor through the libcudnn torch loaded, by ctypes -- no extra package.
* ``extract RUN.jsonl`` writes ``benchmarks/cudnn_device_properties/<gpu>.json`` from a
  GPU run's results; commit it, and CI (tests/test_cudnn_deviceless.py) checks every
  graph the planner plans at ResNet-50's conv sites (F0 and F1, the stem's F0 with its
  input channels padded) for that device, float16 and bfloat16.
* ``check`` builds those graphs with the cudnn-frontend Python package
  (``nvidia-cudnn-frontend``, the pinned wheel of scripts/setup.sh, ``--no-deps``; only
  its graph API is used) the way ``csrc/cuda/cudnn_graph.cpp`` builds them: NHWC
  tensors, fp32 intermediates and compute, heuristics modes A and FALLBACK.
* ``check_cpp`` asks the extension itself (``fusedres::cudnn_graph_check_deviceless``,
  callable without a GPU): the exact graphs the planner builds, every kind --
  ``every_planned_graph``: F0, F1, the backward graphs DgradDreluDBN and ConvBNwgrad
  (which the Python package cannot express: no ``dbn_weight``) at every F1 conv,
  BNFinalize per BN width, and the block tail's BNAddReLU / DualBNAddReLU (with the ReLU
  mask) at every ResNet-50 tail shape -- in every variant the planner tries.

    python -m fusedres.cudnn_deviceless capture [--index 0] [--out FILE | --jsonl RUN]
    python -m fusedres.cudnn_deviceless extract RUN.jsonl [--dir DIR]
    python -m fusedres.cudnn_deviceless check FILE [--batch 256] [--cpp]
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import sys
from typing import List, NamedTuple, Optional

import torch

__all__ = ["capture", "load", "saved_files", "GraphCase", "planned_graphs", "check",
           "every_planned_graph", "cpp_entry", "check_cpp", "PROPERTIES_DIR"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROPERTIES_DIR = os.path.join(ROOT, "benchmarks", "cudnn_device_properties")
MIN_VERSION = 91100  # deviceless support checks: cuDNN 9.11 (the frontend's own gate)

# cudnn_graph.h (cuDNN 9.8+)
_DEVICEPROP_DESCRIPTOR = 38
_ATTR_DEVICE_ID = 2700
_ATTR_JSON = 2702
_TYPE_INT32 = 23
_TYPE_CHAR = 24


def _libcudnn():
    """The libcudnn torch loaded (the nvidia-cudnn wheel's, else the system's)."""
    torch.backends.cudnn.version()  # loads it
    try:
        import nvidia.cudnn

        paths = sorted(glob.glob(os.path.join(list(nvidia.cudnn.__path__)[0], "lib",
                                              "libcudnn.so*")))
    except (ImportError, IndexError):
        paths = []
    return ctypes.CDLL(paths[0] if paths else "libcudnn.so.9")


def capture(index: int = 0) -> dict:
    """cuDNN's description of CUDA device ``index``, with what identifies it: needs the
    GPU (the descriptor reads its attributes)."""
    lib = _libcudnn()
    version = int(lib.cudnnGetVersion())
    if version < 90800:
        raise RuntimeError(f"cuDNN {version} has no device-properties descriptor (9.8+)")
    desc = ctypes.c_void_p()

    def ok(status, what):
        if status != 0:
            msg = lib.cudnnGetErrorString
            msg.restype = ctypes.c_char_p
            raise RuntimeError(f"{what}: {msg(status).decode()} ({status})")

    ok(lib.cudnnBackendCreateDescriptor(_DEVICEPROP_DESCRIPTOR, ctypes.byref(desc)),
       "cudnnBackendCreateDescriptor")
    try:
        dev = ctypes.c_int32(index)
        ok(lib.cudnnBackendSetAttribute(desc, _ATTR_DEVICE_ID, _TYPE_INT32, ctypes.c_int64(1),
                                        ctypes.byref(dev)), "set DEVICE_ID")
        ok(lib.cudnnBackendFinalize(desc), "cudnnBackendFinalize")
        n = ctypes.c_int64(0)
        ok(lib.cudnnBackendGetAttribute(desc, _ATTR_JSON, _TYPE_CHAR, ctypes.c_int64(0),
                                        ctypes.byref(n), None), "get JSON size")
        buf = ctypes.create_string_buffer(n.value)
        ok(lib.cudnnBackendGetAttribute(desc, _ATTR_JSON, _TYPE_CHAR, n, ctypes.byref(n), buf),
           "get JSON")
    finally:
        lib.cudnnBackendDestroyDescriptor(desc)
    text = buf.raw[:n.value].rstrip(b"\0").decode()
    json.loads(text)  # cuDNN's JSON: fail here, not in a later deviceless check
    return {"kind": "cudnn_device_properties", "device_name": torch.cuda.get_device_name(index),
            "capability": list(torch.cuda.get_device_capability(index)),
            "cudnn_version": version, "torch": torch.__version__, "properties": text}


def load(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if "properties" not in data or "capability" not in data:
        raise ValueError(f"{path}: not a captured cuDNN device description")
    return data


def saved_files(directory: str = PROPERTIES_DIR) -> List[str]:
    """The committed captures (``<gpu>.json``), sorted."""
    return sorted(glob.glob(os.path.join(directory, "*.json")))


def _tag(name: str) -> str:
    import re

    m = re.search(r"[a-z][0-9]{2,4}[a-z]*", name.lower())
    return m.group(0) if m else "gpu"


def extract(run_jsonl: str, directory: str = PROPERTIES_DIR) -> Optional[str]:
    """Write the capture a GPU run recorded in its run.jsonl to ``directory/<gpu>.json``;
    None when the run has none (or recorded why not)."""
    found = None
    with open(run_jsonl) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if row.get("kind") == "cudnn_device_properties" and row.get("properties"):
                found = row
    if found is None:
        return None
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{_tag(found['device_name'])}.json")
    with open(path, "w") as f:
        json.dump(found, f, indent=1)
        f.write("\n")
    return path


# --------------------------------------------------------------------------------------
# The graphs the planner plans, and their deviceless check
# --------------------------------------------------------------------------------------


class GraphCase(NamedTuple):
    kind: str  # one of cudnn_graph.KINDS, FINALIZE_KIND or TAIL_KINDS
    dtype: torch.dtype
    input_shape: tuple  # as the graph sees it (input channels padded where planned);
    weight_shape: tuple  # BNFinalize: input (C,), weight (); a tail: weight ()
    stride: int
    padding: int
    site: str

    @property
    def label(self) -> str:
        if len(self.input_shape) == 1:  # BNFinalize
            return f"{self.kind} {self.site} C={self.input_shape[0]}"
        n, c, h, _ = self.input_shape
        if not self.weight_shape:  # a block tail
            return (f"{self.kind} {str(self.dtype).replace('torch.', '')} {self.site} "
                    f"{c}x{h}x{h} batch {n}")
        k, _, r, _ = self.weight_shape
        return (f"{self.kind} {str(self.dtype).replace('torch.', '')} {self.site} "
                f"{c}->{k} {r}x{r}/{self.stride} @{h} batch {n}")


def planned_graphs(capability, cudnn_version: int, batch: int = 256) -> List[GraphCase]:
    """Every graph ``fusedres.cudnn_graph.plan`` plans at ResNet-50's conv sites (each
    distinct conv; F0 and F1; float16 and bfloat16) on a device of this capability."""
    from . import cudnn_graph
    from .bench.cases import resnet50_convs

    caps = cudnn_graph.Capabilities(True, cudnn_version, tuple(capability))
    out = []
    for spec in resnet50_convs():
        for dtype in (torch.float16, torch.bfloat16):
            for kind in ("F0", "F1"):
                prologue = kind == "F1"
                x = (batch, spec.c_in, spec.h, spec.h)
                w = (spec.c_out, spec.c_in, spec.kernel, spec.kernel)
                if cudnn_graph.plan(caps, dtype, dtype, False, x, w, padding=spec.padding,
                                    prologue=prologue) is not None:
                    continue
                pad = cudnn_graph.input_channel_padding(spec.c_in, prologue)
                out.append(GraphCase(kind, dtype, (batch, spec.c_in + pad, spec.h, spec.h),
                                     (spec.c_out, spec.c_in + pad, spec.kernel, spec.kernel),
                                     spec.stride, spec.padding, spec.layer))
    return out


def every_planned_graph(capability, cudnn_version: int, batch: int = 256) -> List[GraphCase]:
    """``planned_graphs`` and the rest of what the planner builds at ResNet-50's conv
    sites: the backward graphs (DgradDreluDBN, ConvBNwgrad) of every conv planned as F1,
    the BNFinalize graph of every BN width (float32), and the block tail's graphs (both
    kinds, with the ReLU mask, float16 and bfloat16) at every tail shape (a bottleneck's
    conv3 output) -- each graph kind once per distinct shape."""
    from . import cudnn_graph
    from .bench.cases import resnet50_convs

    out = planned_graphs(capability, cudnn_version, batch)
    out += [case._replace(kind=kind) for case in list(out) if case.kind == "F1"
            for kind in cudnn_graph.BACKWARD_KINDS]
    widths = sorted({case.weight_shape[0] for case in out})
    if widths:  # (nothing is planned before sm_80)
        out += [GraphCase(cudnn_graph.FINALIZE_KIND, torch.float32, (c,), (), 1, 0,
                          "the BN after a conv") for c in widths]
    caps = cudnn_graph.Capabilities(True, cudnn_version, tuple(capability))
    for spec in resnet50_convs():
        if not spec.layer.endswith("conv3"):
            continue
        shape = (batch, spec.c_out, spec.h, spec.h)
        for dtype in (torch.float16, torch.bfloat16):
            if cudnn_graph.tail_plan(caps, dtype, shape, dtype, shape) is None:
                out += [GraphCase(kind, dtype, shape, (), 1, 0, "the block tail")
                        for kind in cudnn_graph.TAIL_KINDS]
    return out


# cuDNN's runtime-fusion engines compile with NVRTC and load the CUDA driver library even
# to answer a support check: without a driver (CI, this project's CPU machines) they
# report this status for any device described -- the graphs only they run (the block
# tails, bf16 F0/F1, the padded stem) cannot be decided there.
NO_DRIVER = "CUDNN_STATUS_NOT_SUPPORTED_RUNTIME_PREREQUISITE_MISSING"


def undetermined(why: str) -> bool:
    """Is ``why`` (a check's refusal) one this machine cannot decide: an engine that
    could not be asked without the CUDA driver library, not a refusal of the device?"""
    return NO_DRIVER in why


def cpp_entry() -> bool:
    """Has the loaded fusedres._C the C++ deviceless check (the cuDNN graph path)?"""
    from . import cudnn_graph

    return cudnn_graph._defined("cudnn_graph_check_deviceless")


def check_cpp(properties: str, case: GraphCase, capability) -> str:
    """"" when cuDNN supports ``case`` on the described device (compute ``capability``),
    else cuDNN's reason per variant: the extension's own graphs, no GPU. A blob cuDNN
    cannot read raises ValueError."""
    sm = int(capability[0]) * 10 + int(capability[1])
    return str(torch.ops.fusedres.cudnn_graph_check_deviceless(
        properties, case.kind, str(case.dtype).replace("torch.", ""), list(case.input_shape),
        list(case.weight_shape), [case.stride] * 2, [case.padding] * 2, sm))


def _nhwc(d):
    n, c, h, w = d
    return [c * h * w, 1, c * w, c]


def check(properties: str, case: GraphCase, cudnn=None) -> str:
    """"" when cuDNN supports ``case`` on the described device, else cuDNN's reason.
    ``cudnn``: the frontend's Python module (imported when None; ImportError if absent)."""
    if cudnn is None:
        import cudnn  # noqa: F811  (nvidia-cudnn-frontend)
    f32 = cudnn.data_type.FLOAT
    io = {torch.float16: cudnn.data_type.HALF, torch.bfloat16: cudnn.data_type.BFLOAT16}[
        case.dtype]
    try:
        props = cudnn.create_device_properties(properties)
        g = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32,
                          device_property=props)
        x = g.tensor(name="x", dim=list(case.input_shape), stride=_nhwc(case.input_shape),
                     data_type=io)
        w = g.tensor(name="w", dim=list(case.weight_shape), stride=_nhwc(case.weight_shape),
                     data_type=io)
        conv_in = x
        if case.kind == "F1":
            c = case.input_shape[1]
            per_channel = [g.tensor(name=n, dim=[1, c, 1, 1], stride=[c, 1, c, c], data_type=f32)
                           for n in ("scale", "shift")]
            conv_in = g.relu(input=g.add(a=g.mul(a=x, b=per_channel[0]), b=per_channel[1]))
        y = g.conv_fprop(image=conv_in, weight=w, padding=[case.padding] * 2,
                         stride=[case.stride] * 2, dilation=[1, 1], compute_data_type=f32)
        y.set_output(True).set_data_type(io)
        for s in g.genstats(input=y, compute_data_type=f32):
            s.set_output(True).set_data_type(f32)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
    except Exception as exc:  # noqa: BLE001  (cuDNN's refusal, whatever its type)
        return " ".join(str(exc).split())[:300] or type(exc).__name__
    return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedres.cudnn_deviceless",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture", help="on a GPU: cuDNN's device properties, as JSON")
    c.add_argument("--index", type=int, default=0)
    c.add_argument("--out", help="write one JSON file")
    c.add_argument("--jsonl", help="append one line to this JSON-lines file (run.jsonl)")
    e = sub.add_parser("extract", help="a GPU run's capture -> benchmarks/cudnn_device_properties")
    e.add_argument("run_jsonl")
    e.add_argument("--dir", default=PROPERTIES_DIR)
    k = sub.add_parser("check", help="check every planned graph deviceless")
    k.add_argument("file")
    k.add_argument("--batch", type=int, default=256)
    k.add_argument("--cpp", action="store_true",
                   help="every graph kind through the extension's C++ check (no Python "
                        "cudnn package needed)")
    args = p.parse_args(argv)
    if args.cmd == "capture":
        try:
            row = capture(args.index)
            status = 0
        except Exception as exc:  # noqa: BLE001  (recorded: a GPU run goes on)
            row = {"kind": "cudnn_device_properties", "error": f"{type(exc).__name__}: {exc}"}
            status = 1
        text = json.dumps(row)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(text + "\n")
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        print(row.get("error") or f"captured cuDNN's description of {row['device_name']} "
              f"(cuDNN {row['cudnn_version']}, {len(row['properties'])} bytes of JSON)")
        return status
    if args.cmd == "extract":
        path = extract(args.run_jsonl, args.dir)
        print(path or f"{args.run_jsonl} holds no captured device properties")
        return 0 if path else 1
    data = load(args.file)
    bad = 0
    cases = (every_planned_graph if args.cpp else planned_graphs)(
        data["capability"], data["cudnn_version"], args.batch)
    for case in cases:
        why = check_cpp(data["properties"], case, data["capability"]) if args.cpp \
            else check(data["properties"], case)
        if why and undetermined(why):
            print(f"{case.label}: UNDETERMINED here (a runtime-fusion engine needs the CUDA "
                  "driver library to answer)")
            continue
        bad += bool(why)
        print(f"{case.label}: {'supported' if not why else 'REFUSED: ' + why}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

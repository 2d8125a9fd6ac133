"""``fusedres.tune(model, *example_inputs)``: every fused site of a converted model runs the
candidate that was checked and fastest on this device, for these shapes, in this mode.

A *site* is one fused call of a converted block's generated forward
(``fusedres.nn.conv_bn_act``: conv-BN-ReLU, BN-add-ReLU, the dual projection tail, a
BN-ReLU -> conv pair, ...), identified by its main BN module (the ``site`` column of
``fusedres.explain``). The decision is per site, not per block, and is installed as that
BN's ``fusedres.nn.SitePlan`` (``bn.fusedres_plan``, which ``conv_bn_act`` reads).
Candidates (name: plan):

    torch        SitePlan(backend="torch"): the original unfused computation (the block's
                 own conv/BN modules: F.conv2d -- cuDNN on GPU --, torch's BN, add, ReLU)
    reference    SitePlan(backend="reference", conv="cudnn"): the fused pipeline in
                 composite PyTorch
    cpu / cuda   SitePlan(backend=..., conv="cudnn"): the fused C++ / CUDA BN kernels,
                 for the tensors' device, convs in F.conv2d
    triton       SitePlan(backend="triton", conv="cudnn"): the Triton BN kernels (GPU)
    triton-conv  SitePlan(backend="triton", conv="triton"): also the Triton conv with the
                 BN-ReLU prologue / statistics epilogue, at BN-ReLU -> conv sites (GPU)
    cudnn-graph  SitePlan(conv="cudnn-graph"): cuDNN's fused graphs (conv + statistics,
                 BN-ReLU prologue; ``fusedres.cudnn_graph``) at BN-ReLU -> conv sites, the
                 BN kernels of the model's backend (CUDA, where _C was built with it)
    cudnn-graph-tail  SitePlan(conv="cudnn-graph-tail"): cudnn-graph, and the block
                 tail's (dual) BN-add-ReLU apply in training as cuDNN's pointwise tail
                 graph (its backward the BN kernels'); tried at other sites only when
                 cudnn-graph is not a candidate (there it is cudnn-graph)
    cudnn-eval   SitePlan(conv="cudnn-eval"): eval-mode tuning on CUDA only; the folded
                 conv with its bias, residual and ReLU in one cuDNN call
                 (``fusedres.cudnn_eval``) where the site folds and ends in a ReLU

Triton is never a candidate on CPU (the interpreter is not worth timing). In eval mode a
fused candidate folds conv and BN into one conv (``SitePlan.fold``, default True), so
"folded" is not a separate candidate: it is what a fused candidate runs there; the
``cudnn-eval`` candidate is the same fold with the conv's epilogue in one cuDNN call.

How a site is tuned. One forward of the model on ``example_inputs`` records every site's
inputs. Per distinct site signature (op, shapes, strides, dtypes, module options, mode:
training forward+backward when the model is in training mode, else an eval forward under
``torch.no_grad``), each candidate runs once on those inputs and is compared with the
``torch`` candidate on the same inputs -- output, input and parameter gradients, running
statistics, ``num_batches_tracked`` -- with a tolerance scaled to the dtype (relative L2
error; ``TOLERANCE``). A result over it is judged once more against a float64 run of the
site and passes if its error there is within twice torch's own (where torch's result is
rounding noise: a BN over two values per channel has an input gradient of exactly 0).
A candidate that raises or differs is never chosen: a warning, the
report and ``explain`` name it and the error found. The passing candidates are then
timed in repeated interleaved rounds (``fusedres._timing.interleaved_samples``: every
candidate once per round, in a rotating order; CPU: wall clock per call, GPU: CUDA
events), giving each a median and a spread (p20-p80). The decision is made only on
differences the run can tell from its noise (``select``): the simplest candidate (torch
< reference < cpu/cuda < triton, cudnn-eval < triton-conv < cudnn-graph < cudnn-graph-tail)
wins unless a faster one beats it beyond the spread -- its median over ``margin``
(default 3%) lower and its p80 under the other's p20. When a candidate's own
samples disagree wildly (p20-p80 over ``NOISE_LIMIT`` of its median: a machine too loaded
to measure), the site is not decided: it keeps its default path, nothing is cached, a
warning and the report say so (``too_noisy``). Sites with identical signatures share one
decision (torchvision ResNet-50: 49 sites, 21 signatures).

Nothing of the model's state changes: running statistics and ``num_batches_tracked`` are
restored (the state_dict after ``tune`` equals the one before), no ``.grad`` is written,
the RNG state is restored. The decisions are plain attributes on each site's main BN
(``bn.fusedres_plan``, and ``bn.fusedres_tuning``: choice, measured medians, failed
candidates, source), outside the state_dict; they survive ``copy.deepcopy`` and pickling.
A site whose BN synchronises its statistics across processes (``sync_bn``) is not tuned
(it keeps its plan: running it on one rank alone would hang).

Decisions are cached on disk (``fusedres._tune_cache``): a second ``tune`` of the same
model in the same environment loads them without running anything but the recording
forward. Under ``torch.distributed`` every rank records (collectives stay matched), rank 0
decides (or reads its cache), and every rank installs rank 0's decisions
(``broadcast_object_list``; an error on rank 0 is raised on every rank, which would
otherwise wait in the broadcast). ``tune`` refuses to run inside ``torch.compile``
tracing or CUDA-graph capture: tune first, then compile or capture (the installed plan is
a plain attribute read, fixed before either).

Cost: per distinct site signature, one checked run per candidate, then 5 to 30 timed
rounds of all of them (no new round after ~1 s once 5 are done); the returned model's
``fusedres_tune_report`` says what was spent, with how many threads
(``torch.get_num_threads()``, part of the cache's key).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import time
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from . import _timing, cudnn_eval, cudnn_graph
from . import nn as fnn
from ._backend import backend_supports, has_triton
from ._fx import FusedForward
from ._tune_cache import DecisionCache, cache_dir, environment

__all__ = ["tune", "select", "too_noisy", "measure", "plan_of", "TuneReport", "describe",
           "TOLERANCE", "RANK", "NOISE_LIMIT"]

# Simpler first: a tie within the margin goes to the lower rank.
RANK = {"torch": 0, "reference": 1, "cpu": 2, "cuda": 2, "triton": 3, "cudnn-eval": 3,
        "triton-conv": 4, "cudnn-graph": 5, "cudnn-graph-tail": 6}
# Candidates that change only the sites their conv path fuses (``_changes_site``).
_CONV_CANDIDATES = ("triton-conv", "cudnn-graph", "cudnn-graph-tail")
# Relative L2 error allowed against the torch candidate, by the site's compute dtype. Two
# correct float32 implementations differ by ~1e-3 in a BN input gradient at ResNet-50
# shapes (its three terms cancel); a wrong kernel (a 1% error) is far above.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 5e-3, torch.float16: 1e-2,
             torch.bfloat16: 5e-2}
TF32_TOLERANCE = 5e-3  # float32 on CUDA with TF32 convolutions allowed
# A candidate whose own p20-p80 range exceeds this fraction of its median was timed on a
# machine too loaded to measure: the site keeps its default and nothing is cached. On the
# shared 2-core VM this was written on (load average ~5), resnet18's sites at 2x3x64x64
# spread 25% (median over sites; worst 690%) at 1 thread and 78% (worst 3050%) at 2.
NOISE_LIMIT = 0.5
UNDECIDED = ("their timings were too noisy (a machine too loaded to measure), so those "
             "sites keep their default path and nothing about them was cached; tune again "
             "when the machine is idle (fewer threads, torch.set_num_threads(1), also help)")
_TENSOR_KWARGS = ("residual", "shortcut_x")
_MODULE_KWARGS = ("shortcut_conv", "shortcut_bn", "next_conv", "next_bn")

# --------------------------------------------------------------------------------------
# Candidates: each is a plan (fusedres.nn.SitePlan) set on the site's main BN
# --------------------------------------------------------------------------------------


def plan_of(choice: str) -> "fnn.SitePlan":
    """The ``fusedres.nn.SitePlan`` a candidate name stands for: ``"torch"`` (the original
    modules), a BN backend with F.conv2d (cuDNN on GPU), or ``"triton-conv"`` (the Triton
    BN kernels and the Triton conv with the BN-ReLU prologue / statistics epilogue where
    the site allows it)."""
    if choice == "torch":
        return fnn.SitePlan(backend="torch")
    if choice == "triton-conv":
        return fnn.SitePlan(conv="triton", backend="triton")
    if choice in ("cudnn-graph", "cudnn-graph-tail", "cudnn-eval"):
        return fnn.SitePlan(conv=choice)
    return fnn.SitePlan(conv="cudnn", backend=choice)


def _set_plan(bn: nn.Module, choice: Optional[str]) -> None:
    if choice is None:
        bn.__dict__.pop("fusedres_plan", None)
    else:
        bn.fusedres_plan = plan_of(choice)


def _converted_blocks(model: nn.Module):
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m.__dict__.get("forward"), FusedForward)]


@contextlib.contextmanager
def _recording(blocks, record):
    """While inside, every fused site call of the converted blocks first calls
    ``record(x, conv, bn, kwargs)``: the generated forwards' global that names
    ``fusedres.nn.conv_bn_act`` is pointed at a recording wrapper, then restored."""
    def wrapper(x, conv, bn, **kwargs):
        record(x, conv, bn, kwargs)
        return fnn.conv_bn_act(x, conv, bn, **kwargs)

    patched = []
    for _, block in blocks:
        for fn in block.forward._fns.values():
            for name, value in list(fn.__globals__.items()):
                if value is fnn.conv_bn_act:
                    fn.__globals__[name] = wrapper
                    patched.append((fn.__globals__, name, value))
    try:
        yield
    finally:
        for g, name, value in patched:
            g[name] = value


# --------------------------------------------------------------------------------------
# Selection (pure: tested with a fake timer)
# --------------------------------------------------------------------------------------


def clearly_faster(a, b, margin: float = 0.03) -> bool:
    """Whether samples ``a`` beat samples ``b`` beyond this run's noise: ``a``'s median is
    over ``margin`` under ``b``'s and ``a``'s p80 under ``b``'s p20 (the p20-p80 ranges do
    not overlap). Lists of seconds, or single numbers (no spread)."""
    med_a, _, hi_a = _timing.spread(a)
    med_b, lo_b, _ = _timing.spread(b)
    return med_a < med_b * (1 - margin) and hi_a < lo_b


def select(times: dict, margin: float = 0.03) -> Optional[str]:
    """The simplest candidate (``RANK``) of ``times`` (name -> samples in seconds, or one
    number; only candidates that passed their check) that no other candidate is
    ``clearly_faster`` than: the simpler one unless the faster wins beyond the spread."""
    if not times:
        return None
    unbeaten = [n for n in times
                if not any(clearly_faster(times[o], times[n], margin) for o in times if o != n)]
    return min(unbeaten, key=lambda n: (RANK.get(n, len(RANK)), _timing.spread(times[n])[0], n))


def too_noisy(times: dict, limit: Optional[float] = None) -> Optional[str]:
    """Why ``times`` cannot be decided on (None when they can): some candidate's own samples
    disagree wildly, p80 - p20 over ``limit`` (default ``NOISE_LIMIT``) of their median --
    a machine too loaded to measure."""
    limit = NOISE_LIMIT if limit is None else limit
    worst = max(((_timing.relative_spread(v), n) for n, v in times.items()
                 if not isinstance(v, (int, float)) and len(v) >= 3), default=None)
    if worst is None or worst[0] <= limit:
        return None
    v = times[worst[1]]
    return (f"the machine is too loaded to measure: {worst[1]}'s samples range "
            f"{min(v) * 1e3:.3g}-{max(v) * 1e3:.3g} ms (p20-p80 {worst[0]:.0%} of the "
            f"median, over the {limit:.0%} limit)")


# --------------------------------------------------------------------------------------
# Recording the sites
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Site:
    path: str  # the main BN's path in the model
    conv: Optional[nn.Module]
    bn: nn.Module
    kwargs: dict  # scalars and modules, as the generated forward passed them
    tensors: dict  # name -> (detached clone, requires_grad): x, residual, shortcut_x
    autocast: Optional[torch.dtype]
    signature: dict = dataclasses.field(default_factory=dict)


def _meta(t: Optional[Tensor]):
    if t is None:
        return None
    return {"shape": list(t.shape), "stride": list(t.stride()),
            "dtype": str(t.dtype).replace("torch.", ""), "grad": bool(t.requires_grad)}


def _conv_options(c: Optional[nn.Module]):
    if c is None:
        return None
    return [c.in_channels, c.out_channels, list(c.kernel_size), list(c.stride),
            c.padding if isinstance(c.padding, str) else list(c.padding), list(c.dilation),
            c.groups, c.bias is not None, c.padding_mode, str(c.weight.dtype),
            list(c.weight.stride())]


def _bn_options(b: Optional[nn.Module]):
    if b is None:
        return None
    t = b.weight if b.weight is not None else b.running_mean
    return [b.num_features, b.eps, b.momentum, b.affine, b.track_running_stats,
            b.running_mean is not None, bool(b.training),
            str(t.dtype) if t is not None else None]


def _op_name(conv, kwargs) -> str:
    parts = (["conv"] if conv is not None else []) + ["bn"]
    if kwargs.get("shortcut_bn") is not None:
        parts.append("add-bn" + ("(conv)" if kwargs.get("shortcut_conv") is not None else ""))
    elif kwargs.get("residual") is not None:
        parts.append("add")
    if kwargs.get("relu"):
        parts.append("relu")
    if kwargs.get("next_conv") is not None:
        parts.append("conv")
    return "-".join(parts)


def _signature(site: _Site, train: bool) -> dict:
    k = site.kwargs
    return {"op": _op_name(site.conv, dict(k, **{n: t for n, (t, _) in site.tensors.items()})),
            "shapes": {n: dict(_meta(t), grad=g) for n, (t, g) in sorted(site.tensors.items())},
            "modules": {"conv": _conv_options(site.conv), "bn": _bn_options(site.bn),
                        **{n: (_bn_options if n.endswith("bn") else _conv_options)(k.get(n))
                           for n in _MODULE_KWARGS}},
            "options": {"relu": bool(k.get("relu", False)),
                        "memory_saving": bool(k.get("memory_saving", False)),
                        "backend": k.get("backend", "auto")},
            "mode": "train" if train else "eval",
            "autocast": str(site.autocast).replace("torch.", "") if site.autocast else None}


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _record(model: nn.Module, blocks, inputs: tuple, train: bool, names: dict) -> list:
    """Run the model once; each site's inputs (first call of each site), in call order."""
    sites: dict = {}

    def record(x, conv, bn, kwargs):
        if id(bn) in sites or not isinstance(x, Tensor):
            return
        tensors = {"x": x}
        tensors.update({n: kwargs[n] for n in _TENSOR_KWARGS if kwargs.get(n) is not None})
        sites[id(bn)] = _Site(
            path=names.get(id(bn), "?"), conv=conv, bn=bn,
            kwargs={n: v for n, v in kwargs.items() if n not in _TENSOR_KWARGS},
            tensors={n: (t.detach().clone(memory_format=torch.preserve_format),
                         bool(t.requires_grad)) for n, t in tensors.items()},
            autocast=_autocast_dtype(x.device))

    with _recording(blocks, record), torch.set_grad_enabled(train):
        model(*inputs)
    return list(sites.values())


# --------------------------------------------------------------------------------------
# Running, checking and timing one site
# --------------------------------------------------------------------------------------


def _site_bns(site: _Site) -> list:
    return [b for b in (site.bn, site.kwargs.get("shortcut_bn")) if b is not None]


def _site_params(site: _Site) -> list:
    mods = [site.conv, site.bn] + [site.kwargs.get(n) for n in _MODULE_KWARGS]
    out, seen = [], set()
    for m in mods:
        if m is None:
            continue
        for p in m.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


class _Runner:
    """Runs one site with a given choice on its recorded inputs."""

    def __init__(self, site: _Site, train: bool):
        self.site, self.train = site, train
        self.leaves = {n: t.detach().requires_grad_(g and train)
                       for n, (t, g) in site.tensors.items()}
        self.wrt = [t for t in self.leaves.values() if t.requires_grad] + \
            (_site_params(site) if train else [])
        self.buffers = [t for b in _site_bns(site) for t in b.buffers(recurse=False)]
        self.saved = [t.detach().clone() for t in self.buffers]
        self.grad_out = None

    def restore(self) -> None:
        with torch.no_grad():
            for t, s in zip(self.buffers, self.saved):
                t.copy_(s)

    def __call__(self, choice: str):
        s = self.site
        _set_plan(s.bn, choice)
        kwargs = dict(s.kwargs, **{n: t for n, t in self.leaves.items() if n != "x"})
        ctx = (torch.autocast(self.leaves["x"].device.type, dtype=s.autocast) if s.autocast
               else contextlib.nullcontext())
        with torch.set_grad_enabled(self.train), ctx:
            out = fnn.conv_bn_act(self.leaves["x"], s.conv, s.bn, **kwargs)
        if not self.train or not self.wrt or not out.requires_grad:
            return out, ()
        if self.grad_out is None:
            g = torch.Generator(device=out.device).manual_seed(1234)
            self.grad_out = torch.randn(out.shape, generator=g, device=out.device,
                                        dtype=out.dtype)
        grads = torch.autograd.grad(out, self.wrt, self.grad_out, allow_unused=True)
        return out, grads

    def results(self, choice: str) -> list:
        """``(name, tensor)`` of everything a candidate must reproduce, from the saved
        running statistics."""
        self.restore()
        out, grads = self(choice)
        named = [("output", out.detach())]
        names = [n for n, t in self.leaves.items() if t.requires_grad] + \
            [f"grad of parameter {i}" for i in range(len(self.wrt))]
        named += [(f"grad {n}" if not n.startswith("grad") else n, g)
                  for n, g in zip(names, grads)]
        for b, bname in zip(_site_bns(self.site), ("bn", "shortcut bn")):
            named += [(f"{bname} {k}", t.detach().clone())
                      for k, t in b.named_buffers(recurse=False)]
        self.restore()
        return named


def _tolerance(site: _Site) -> float:
    x = site.tensors["x"][0]
    dtype = site.autocast or x.dtype
    tol = TOLERANCE.get(dtype, 1e-4)
    if (dtype == torch.float32 and x.device.type == "cuda"
            and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)):
        tol = TF32_TOLERANCE
    return tol


def _float64_results(site: _Site, train: bool) -> list:
    """The ``torch`` candidate's results on a float64 copy of the site (modules and inputs,
    no autocast): the judge when a candidate and torch disagree (``_compare``)."""
    modules = {n: site.kwargs.get(n) for n in _MODULE_KWARGS}
    conv, bn, modules = copy.deepcopy((site.conv, site.bn, modules))  # keeps shared modules
    for m in (conv, bn, *modules.values()):
        if m is not None:
            m.double()
    kwargs = dict(site.kwargs, **{n: m for n, m in modules.items() if m is not None})
    tensors = {n: (t.double() if t.is_floating_point() else t, g)
               for n, (t, g) in site.tensors.items()}
    runner = _Runner(dataclasses.replace(site, conv=conv, bn=bn, kwargs=kwargs,
                                         tensors=tensors, autocast=None), train)
    return runner.results("torch")


def _as64(t: Tensor) -> Tensor:
    """``t`` in float64, NaN as 0 (the caller compared where the NaNs are)."""
    return torch.nan_to_num(t.detach().double(), 0.0)


def _norm(t: Tensor) -> float:
    return torch.linalg.vector_norm(t).item()


def _compare(got: list, want: list, tol: float, exact=None) -> Optional[str]:
    """None when ``got`` matches ``want``; else the first difference found.

    ``exact``: a callable giving the float64 results of the same site, consulted only for a
    result over ``tol``. Such a result still passes when its error against float64 is
    within twice torch's own (or within ``tol`` of the float64 norm): where torch's result
    is itself mostly rounding -- a BN over two values per channel has an input gradient of
    exactly 0 in exact arithmetic -- two correct implementations differ by 100%."""
    if [n for n, _ in got] != [n for n, _ in want]:
        return f"different results: {[n for n, _ in got]} vs {[n for n, _ in want]}"
    for (name, a), (_, b) in zip(got, want):
        if (a is None) != (b is None):
            return f"{name}: {'missing' if a is None else 'unexpected'}"
        if a is None:
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{name}: {a.dtype} {tuple(a.shape)} instead of {b.dtype} {tuple(b.shape)}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return f"{name}: {a.tolist()} instead of {b.tolist()}"
            continue
        if not torch.equal(torch.isnan(a), torch.isnan(b)):
            return f"{name}: NaN where torch has none (or the reverse)"
        a64, b64 = _as64(a), _as64(b)
        err = _norm(a64 - b64) / max(_norm(b64), 1e-30)
        if err <= tol:
            continue
        why = f"{name}: relative L2 error {err:.3g} > tolerance {tol:.1g}"
        if exact is None:
            return why
        try:
            ref64 = _as64(dict(exact())[name])
        except Exception:  # noqa: BLE001  (no float64 judge here, e.g. a device without it)
            return why
        own, ours = _norm(b64 - ref64), _norm(a64 - ref64)
        if not (ours <= 2 * own or ours <= tol * _norm(ref64)):
            return (f"{why}; against float64 {ours:.3g} where torch's own error is "
                    f"{own:.3g} (L2)")
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: dict, device: torch.device, **options) -> dict:
    """Samples (seconds) of each warm callable, ``{name: [s, ...]}``: repeated interleaved
    rounds (``fusedres._timing.interleaved_samples``; ``options`` go to it)."""
    return _timing.interleaved_samples(fns, device, **options)


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class TuneReport:
    """What ``tune`` did: per site its decision, and the cost."""

    sites: list  # dicts: site, op, choice, source ("measured" | "cache" | "rank 0" | why not)
    wall_s: float = 0.0
    record_s: float = 0.0
    measured: int = 0  # distinct signatures checked and timed
    cached: int = 0  # distinct signatures read from the cache
    undecided: int = 0  # distinct signatures timed but too noisy to decide: defaults kept
    cache_path: Optional[str] = None
    mode: str = "train"
    threads: int = 0  # torch.get_num_threads() while timing (part of the cache's key on CPU)

    def summary(self) -> str:
        choices: dict = {}
        for s in self.sites:
            choices[s["choice"] or "default"] = choices.get(s["choice"] or "default", 0) + 1
        chosen = ", ".join(f"{k} x{v}" for k, v in sorted(choices.items()))
        text = (f"fusedres.tune ({self.mode}, {self.threads} thread(s)): {len(self.sites)} "
                f"sites, {self.measured} signatures measured, {self.cached} from the cache, in "
                f"{self.wall_s:.1f} s (recording forward {self.record_s:.1f} s); chosen: "
                f"{chosen}" + (f"; cache {self.cache_path}" if self.cache_path else ""))
        if self.undecided:
            text += (f"\nfusedres.tune: {self.undecided} signature(s) NOT decided: {UNDECIDED}")
        return text

    def __str__(self) -> str:
        return self.summary()


def describe(bn: nn.Module) -> str:
    """The tuned decision of the site whose main BN is ``bn`` (``explain``'s ``tuned``
    column): choice, source, the measured medians and any failed candidate."""
    return _describe(getattr(bn, "fusedres_tuning", None))


def describe_site(model: nn.Module, path: str) -> str:
    """``describe`` of the BN at ``path`` in ``model`` ("" when there is none)."""
    try:
        return describe(model.get_submodule(path))
    except AttributeError:
        return ""


def _describe(info: Optional[dict]) -> str:
    if not info:
        return ""
    times = info.get("times_ms") or {}
    spreads = info.get("spread_ms") or {}
    parts = [f"{info.get('choice') or 'default'}"]
    if times:
        def one(n, t):
            lo, hi = spreads.get(n) or (None, None)
            return f"{n} {t:.3g}" + (f" [{lo:.3g}-{hi:.3g}]" if lo is not None and hi != lo
                                     else "") + " ms"

        counts = set((info.get("samples") or {}).values())
        where = ([f"{max(counts)} samples"] if counts else []) + \
            ([f"{info['threads']} thread(s)"] if info.get("threads") else [])
        parts.append("(" + ", ".join(one(n, t) for n, t in
                                     sorted(times.items(), key=lambda kv: kv[1]))
                     + ("; median [p20-p80], " + ", ".join(where) if spreads else "") + ")")
    if info.get("source") and info["source"] != "measured":
        parts.append(f"[{info['source']}]")
    for n, err in (info.get("failed") or {}).items():
        parts.append(f"{n} FAILED: {err}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------
# tune()
# --------------------------------------------------------------------------------------


def _candidates(device: torch.device, only) -> list:
    names = ["torch"] + [b for b in ("reference", "cpu", "cuda", "triton")
                         if backend_supports(b, device)
                         and not (b == "triton" and (device.type != "cuda" or not has_triton()))]
    if "triton" in names:
        names.append("triton-conv")
    if device.type == "cuda" and cudnn_graph.built():
        names.append("cudnn-graph")
        if cudnn_graph._defined(cudnn_graph._TAIL_OP):  # (an extension built before it: no)
            names.append("cudnn-graph-tail")
    if device.type == "cuda" and cudnn_eval.capabilities(device).cudnn:
        names.append("cudnn-eval")  # (eval-mode tuning only: _tune_site)
    if only is not None:
        unknown = set(only) - set(RANK)
        if unknown:
            raise ValueError(f"unknown tune candidate(s) {sorted(unknown)}; expected some of "
                             f"{sorted(RANK)}")
        names = [n for n in names if n == "torch" or n in only]
    return names


def _changes_site(name: str, site: _Site, train: bool) -> bool:
    """Does conv-path candidate ``name`` change how ``site`` runs? Each changes a BN-ReLU
    -> conv site; a path that computes a plain site's conv statistics in its epilogue
    (cudnn-graph's F0) also a conv -> BN (-> add) (-> ReLU) site in training."""
    k = site.kwargs
    path = fnn.conv_paths.path_named(plan_of(name).conv)
    if train and path is not None and path.tail_graph and _is_tail(site):
        return True  # (cudnn-graph-tail: the tail's apply; elsewhere it is cudnn-graph)
    if k.get("next_conv") is not None:
        return True
    return (train and path is not None and path.plain_site_stats
            and (site.conv is not None or k.get("shortcut_conv") is not None))


def _is_tail(site: _Site) -> bool:
    """A block tail: ReLU after the BN plus a residual or a second BN."""
    k = site.kwargs
    residual = k.get("residual") is not None or "residual" in site.tensors
    return bool(k.get("relu")) and (residual or k.get("shortcut_bn") is not None)


def _same_as_another(name: str, site: _Site, train: bool, candidates: list) -> bool:
    """Would candidate ``name`` run ``site`` exactly as another candidate in the list does
    (``cudnn-graph-tail`` away from a tail in training is ``cudnn-graph``)? Not timed
    twice then."""
    return (name == "cudnn-graph-tail" and "cudnn-graph" in candidates
            and not (train and _is_tail(site)))


def _tune_site(site: _Site, train: bool, candidates: list, timer, margin: float) -> dict:
    runner = _Runner(site, train)
    tol = _tolerance(site)
    failed, fns = {}, {}
    try:
        want = runner.results("torch")
    except Exception as exc:  # noqa: BLE001  (the unfused code cannot run: leave as is)
        runner.restore()
        return {"choice": None, "times_ms": {}, "failed": {},
                "source": f"not tuned: torch raised {type(exc).__name__}: {exc}"}
    fns["torch"] = lambda: runner("torch")
    exact_results: list = []

    def exact() -> list:  # computed once per site, and only if some candidate needs it
        if not exact_results:
            exact_results.extend(_float64_results(site, train))
        return exact_results
    for name in candidates:
        if name == "torch" or (name in _CONV_CANDIDATES and not _changes_site(name, site, train)):
            continue  # the site runs as the cudnn candidate
        if _same_as_another(name, site, train, candidates):
            continue
        if name == "cudnn-eval" and train:
            continue  # it changes only the eval fold; in training it is "cudnn"
        try:
            why = _compare(runner.results(name), want, tol, exact)
        except Exception as exc:  # noqa: BLE001
            runner.restore()
            why = f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if why is None:
            fns[name] = (lambda n: lambda: runner(n))(name)
        else:
            failed[name] = why
    device = site.tensors["x"][0].device
    try:
        times = timer(fns, device)
    finally:
        runner.restore()
    times = {n: t for n, t in times.items() if n in fns}
    entry = {"times_ms": {}, "spread_ms": {}, "samples": {}, "failed": failed,
             "threads": torch.get_num_threads()}
    for n, t in times.items():
        med, lo, hi = _timing.spread(t)
        entry["times_ms"][n] = med * 1e3
        entry["spread_ms"][n] = [lo * 1e3, hi * 1e3]
        entry["samples"][n] = 1 if isinstance(t, (int, float)) else len(t)
    noise = too_noisy(times)
    if noise is not None:  # the default plan stays, and _tune_site's caller caches nothing
        return dict(entry, choice=None, source=f"not decided: {noise}")
    return dict(entry, choice=select(times, margin), source="measured")


def _apply(bn: nn.Module, entry: dict) -> None:
    if entry.get("choice") is not None:
        _set_plan(bn, entry["choice"])
    bn.fusedres_tuning = {k: entry.get(k) for k in ("choice", "times_ms", "spread_ms",
                                                     "samples", "threads", "failed", "source")}


def _distributed():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _check_context(inputs) -> None:
    if torch.compiler.is_compiling():
        raise RuntimeError("fusedres.tune cannot run inside torch.compile tracing: tune the "
                           "model first, then compile it (the tuned choice is fixed before)")
    if torch.cuda.is_available() and torch.cuda.is_initialized() and \
            torch.cuda.is_current_stream_capturing():
        raise RuntimeError("fusedres.tune cannot run during CUDA-graph capture: tune the "
                           "model first, then capture it")


def _check_inputs(model: nn.Module, inputs: tuple) -> None:
    """One clear line, here, instead of a TypeError from deep inside the recording forward."""
    import inspect

    try:
        # the class's forward: a converted model's own is a generated one taking *args
        inspect.signature(type(model).forward).bind(model, *inputs)
    except TypeError as exc:
        got = (f"{len(inputs)} example input(s)" if inputs else "no example input")
        raise TypeError(
            f"fusedres.tune got {got}, but {type(model).__name__}.forward does not take "
            f"them ({exc}): pass inputs of the real shape, dtype, layout and device, as "
            "the forward takes them, e.g. fusedres.tune(model, x)") from None
    except ValueError:  # no signature to read (a builtin): let the forward say
        pass


def _device_of(model: nn.Module, inputs) -> torch.device:
    for t in inputs:
        if isinstance(t, Tensor):
            return t.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def tune(model: nn.Module, *example_inputs, cache=True, margin: float = 0.03,
         candidates=None, timer: Optional[Callable] = None,
         verbose: Optional[bool] = None) -> nn.Module:
    """Check and time every fused site of a converted ``model`` on ``example_inputs``;
    install the fastest passing candidate per site. Returns ``model`` itself (changed in
    place: only the generated forwards and plain attributes of the BN modules; the
    state_dict is untouched).

    Call it in the mode the model will run (``model.train()``: training forward and
    backward are timed; ``model.eval()``: an eval forward under ``torch.no_grad``), on
    inputs of the real shape, dtype, layout and device (under ``torch.autocast`` if the
    model will run under it). See the module docstring for candidates and rules.

    ``cache``: True (``$FUSEDRES_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusedres``, else
    ``~/.cache/fusedres``; ``FUSEDRES_CACHE=0`` turns it off), False, or a directory.
    ``margin``: a simpler candidate within this fraction of the fastest wins.
    ``candidates``: restrict to these names (``"torch"`` is always one).
    ``timer``: ``timer({name: fn}, device) -> {name: [seconds, ...]}`` (samples; a single
    number per name is one sample without spread; default ``measure``).
    ``verbose``: None prints a one-line summary, True also a line per site, False nothing.
    The report is ``model.fusedres_tune_report`` (a ``TuneReport``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    _check_inputs(model, example_inputs)
    _check_context(example_inputs)
    blocks = _converted_blocks(model)
    if not blocks:
        raise ValueError("fusedres.tune needs a converted model (fusedres.convert(model)); "
                         "this one has no fused site")
    t0 = time.perf_counter()
    train = model.training
    device = _device_of(model, example_inputs)
    names = {id(m): n for n, m in model.named_modules()}
    names_back = {n: m for n, m in model.named_modules()}
    cands = _candidates(device, candidates)
    dist = _distributed()
    rank0 = dist is None or dist.get_rank() == 0
    timer = timer or measure
    store = DecisionCache(cache_dir(cache), environment(device, cands)) if rank0 else None

    buffers = [(t, t.detach().clone()) for t in model.buffers()]
    plans = [(m, m.__dict__.get("fusedres_plan")) for m in model.modules()
             if isinstance(m, nn.BatchNorm2d)]
    decisions: dict = {}  # bn path -> entry
    report = TuneReport(sites=[], mode="train" if train else "eval",
                        cache_path=store.path if store else None,
                        threads=torch.get_num_threads())
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            sites = _record(model, blocks, example_inputs, train, names)
            report.record_s = time.perf_counter() - t0
            failure = None  # rank 0's error, sent to every rank instead of its decisions
            if rank0:
                try:
                    by_signature: dict = {}
                    for i, site in enumerate(sites):
                        site.signature = _signature(site, train)
                        if fnn.process_group_of(site.bn) is not None:
                            entry = {"choice": None, "times_ms": {}, "failed": {},
                                     "source": "not tuned: synchronised batch statistics"}
                        else:
                            key = repr(sorted(site.signature.items()))
                            entry = by_signature.get(key)
                            if entry is None:
                                entry = store.get(site.signature)
                                if entry is not None:
                                    entry = dict(entry, source="cache")
                                    report.cached += 1
                                else:
                                    entry = _tune_site(site, train, cands, timer, margin)
                                    report.measured += 1
                                    report.undecided += entry["choice"] is None and \
                                        entry["source"].startswith("not decided")
                                    if entry["choice"] is not None:
                                        store.put(site.signature, entry)
                                    for n, why in entry["failed"].items():
                                        warnings.warn(f"fusedres.tune: candidate {n!r} failed its "
                                                      f"check at {site.path} "
                                                      f"({site.signature['op']}): {why}; it is "
                                                      "never chosen", RuntimeWarning, stacklevel=2)
                                by_signature[key] = entry
                        decisions[site.path] = {k: v for k, v in entry.items() if k != "signature"}
                        if verbose:
                            print(f"[fusedres.tune] {i + 1}/{len(sites)} {site.path} "
                                  f"{site.signature['op']}: {_describe(entry)} "
                                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr,
                                  flush=True)
                    store.save()
                except Exception as exc:  # noqa: BLE001  (re-raised below, on every rank)
                    if dist is None:
                        raise
                    failure = exc
            if dist is not None:  # the other ranks wait here: rank 0 always sends
                why = None if failure is None else f"{type(failure).__name__}: {failure}"
                box = [(decisions, why)]
                dist.broadcast_object_list(box, src=0)
                if failure is not None:
                    raise failure
                if box[0][1] is not None:
                    raise RuntimeError(f"fusedres.tune failed on rank 0: {box[0][1]}")
                if not rank0:
                    decisions = {p: dict(e, source="rank 0") for p, e in box[0][0].items()}
    finally:
        with torch.no_grad():
            for t, s in buffers:
                t.copy_(s)
        for m, plan in plans:  # the candidates' plans off again
            m.__dict__.pop("fusedres_plan", None)
            if plan is not None:
                m.fusedres_plan = plan
    for path, entry in decisions.items():
        bn = names_back.get(path)
        if bn is not None:
            _apply(bn, entry)
            report.sites.append({"site": path, "choice": entry.get("choice"),
                                 "source": entry.get("source"),
                                 "times_ms": entry.get("times_ms"),
                                 "spread_ms": entry.get("spread_ms"),
                                 "failed": entry.get("failed")})
    report.wall_s = time.perf_counter() - t0
    model.fusedres_tune_report = report
    if report.undecided:
        warnings.warn(f"fusedres.tune: {report.undecided} site signature(s) not decided: "
                      f"{UNDECIDED}", RuntimeWarning, stacklevel=2)
    if verbose is not False:
        print(report.summary(), file=sys.stderr, flush=True)
    return model


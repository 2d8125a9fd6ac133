"""The ResNet training step of the one-call GPU run (``scripts/gpu_bench.py train``):
providers, how each builds its step, and the interleaved timer.

A provider is named by a string (``parse``):

    eager            the original model (cuDNN convs, torch's BN)
    compile          torch.compile (default mode) of the original model
    auto             fusedres.convert(model) (backend "auto": on CUDA the Triton BN
                     kernels, cuDNN convs)
    <backend>        fusedres.convert(model, backend=<backend>): cuda, triton, cpu, ...,
                     and any backend a later conv-fusion path adds
    tuned            convert, then fusedres.tune on the step's input (every candidate)
    tuned:<c>[:<c>]  tune restricted to these candidates (and "torch"): a conv-fusion
                     path that lands as a tune candidate (today "triton-conv") gets its
                     own row this way
    <any>+compile    the above under torch.compile (default mode)

``default_providers`` lists eager, compile, auto, auto+compile, tuned, then one
``tuned:<c>`` per tune candidate that is not a plain BN backend and one row per
fusedres backend beyond the four of today: a conv-fusion path that lands in
``fusedres.tune.RANK`` or ``fusedres._backend.BACKENDS`` is timed without a change here.

The step: SGD with momentum and weight decay, ``zero_grad(set_to_none=True)``, forward
and cross-entropy under ``torch.autocast`` to bf16 or fp16, fp16 with a GradScaler (as
a user trains in fp16), channels_last, synthetic data. No CUDA graph: none of these
steps is captured by its users, and fp16's GradScaler syncs with the host.
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# The BN backends tune knows as plain candidates: anything else it offers changes the conv.
_BN_CANDIDATES = ("torch", "reference", "cpu", "cuda", "triton")
_KNOWN_BACKENDS = ("reference", "cpu", "cuda", "triton")


@dataclasses.dataclass(frozen=True)
class TrainProvider:
    name: str
    convert: Optional[str] = None  # fusedres.convert backend; None: the original model
    tune: Optional[tuple] = None  # None: not tuned; (): every candidate; else these
    compile: bool = False


def parse(name: str) -> TrainProvider:
    """The provider a name stands for (see the module docstring); ValueError if none."""
    base, plus, rest = name.partition("+")
    if plus and rest != "compile":
        raise ValueError(f"unknown train provider {name!r}: only '+compile' may follow")
    compiled = bool(plus)
    if base == "compile" and not compiled:
        return TrainProvider(name, compile=True)
    if base == "eager":
        return TrainProvider(name, compile=compiled)
    if base == "tuned" or base.startswith("tuned:"):
        cands = tuple(c for c in base.split(":")[1:] if c)
        return TrainProvider(name, convert="auto", tune=cands, compile=compiled)
    if base and base.replace("-", "_").isidentifier():
        return TrainProvider(name, convert=base, compile=compiled)
    raise ValueError(f"unknown train provider {name!r}")


def default_providers() -> list:
    """eager, compile, auto, auto+compile, tuned, and a row per conv-fusion path."""
    # cheapest to get ready first: a call that runs out of time loses the costly ones
    names = ["eager", "compile", "auto", "auto+compile", "tuned"]
    try:
        from fusedres.tune import RANK

        names += [f"tuned:{c}" for c in RANK if c not in _BN_CANDIDATES]
    except ImportError:
        pass
    from fusedres._backend import BACKENDS

    names += [b for b in BACKENDS if b not in _KNOWN_BACKENDS]
    return names


def unavailable(p: TrainProvider, device: torch.device) -> Optional[str]:
    """Why ``p`` cannot run here, or None."""
    if p.convert in (None, "auto"):
        return None
    import fusedres
    from fusedres._backend import BACKENDS, backend_supports

    if p.convert not in BACKENDS:
        return f"fusedres has no backend {p.convert!r} in this checkout (has {BACKENDS})"
    if p.convert not in fusedres.available_backends():
        why = f"backend {p.convert!r} not available here ({fusedres.available_backends()})"
        if fusedres.extension_error is not None:
            why += f"; fusedres._C: {fusedres.extension_error}"
        return why
    if not backend_supports(p.convert, device):
        return f"backend {p.convert!r} does not run on {device.type}"
    return None


@dataclasses.dataclass
class Built:
    """A provider's step, ready to time, and what getting it ready cost."""

    step: Callable[[], object]
    model: torch.nn.Module
    convert_s: float = 0.0
    tune_s: float = 0.0
    first_steps_s: float = 0.0  # the first steps: torch.compile, Triton autotune, cuDNN
    resident_bytes: Optional[int] = None  # params, grads, optimizer state (GPU)
    peak_mem_bytes: Optional[int] = None
    peak_mem_kind: str = ""
    notes: list = dataclasses.field(default_factory=list)
    tune_choices: Optional[dict] = None  # {candidate: sites}


def _compile(module, dry: bool):
    # no torch._dynamo.reset() here: it would drop the compiled code of the providers
    # built before this one, which the interleaved timing then recompiles
    if dry:  # the dry run checks tracing (dynamo + AOT autograd), not Inductor codegen
        return torch.compile(module, backend="aot_eager", dynamic=False)
    return torch.compile(module, dynamic=False)


def _one_call_timer(fns: dict, device) -> dict:
    """The dry run's tune timer: one call each (the choice is plumbing, not a claim)."""
    out = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()
        out[name] = time.perf_counter() - t
    return out


def build(p: TrainProvider, make_model: Callable[[], torch.nn.Module], x: torch.Tensor,
          y: torch.Tensor, dtype: torch.dtype, dry: bool = False,
          warm_steps: int = 3) -> Built:
    """The model, optimizer and step of ``p``, run ``warm_steps`` times (compilation and
    autotuning happen there, outside any timing); on a GPU also its peak memory."""
    import fusedres

    device = x.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    model = make_model().to(device).to(memory_format=torch.channels_last).train()
    notes = []
    t = time.perf_counter()
    if p.convert is not None:
        model = fusedres.convert(model, backend=p.convert)
    convert_s = time.perf_counter() - t
    tune_s, choices = 0.0, None
    if p.tune is not None:
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            model = fusedres.tune(model, x, candidates=list(p.tune) or None, verbose=None,
                                  timer=_one_call_timer if dry else None)
        tune_s = time.perf_counter() - t
        choices = {}
        offered = set()
        for site in model.fusedres_tune_report.sites:
            choices[site["choice"] or "none"] = choices.get(site["choice"] or "none", 0) + 1
            offered |= set(site.get("times_ms") or {}) | set(site.get("failed") or {})
        for c in p.tune:
            if c not in offered:
                notes.append(f"tune candidate {c!r} was not offered on {device.type}: no site "
                             "could take it")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    net = _compile(model, dry) if p.compile else model
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            loss = F.cross_entropy(net(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    t = time.perf_counter()
    for _ in range(warm_steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    built = Built(step=step, model=model, convert_s=convert_s, tune_s=tune_s,
                  first_steps_s=time.perf_counter() - t, notes=notes, tune_choices=choices)
    if cuda:
        resident = torch.cuda.memory_allocated() - before
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        # this provider's own state plus what its step allocates above it: the peak it
        # would reach alone, whatever the other providers built beside it hold
        built.resident_bytes = resident
        built.peak_mem_bytes = resident + torch.cuda.max_memory_allocated() - start
        built.peak_mem_kind = ("own resident (params, grads, optimizer state) + "
                               "torch.cuda.max_memory_allocated above it in one step")
    else:  # the dry run: the process's peak RSS over one step (every provider's state)
        from .timing import peak_memory

        built.peak_mem_bytes, built.peak_mem_kind = peak_memory(step, device)
    return built


def _stats(ms: list) -> dict:
    from .timing import _quantile

    s = sorted(ms)
    return {"time_ms": statistics.median(s), "time_p20_ms": _quantile(s, 0.2),
            "time_p80_ms": _quantile(s, 0.8), "samples": len(s)}


def time_interleaved(steps: dict, device: torch.device, *, rounds: int = 5,
                     block_ms: float = 250.0, budget_s: Optional[float] = None,
                     cpu_min_run_time: float = 0.05) -> tuple[dict, dict]:
    """Per-step milliseconds of every ``{name: step}``, timed in rounds: each round times
    one block of steps of every provider in turn, so clocks, temperature and other load
    shift them alike. GPU: CUDA events around a block of ``block_ms`` worth of steps,
    synchronised between blocks; ``rounds`` blocks each (fewer if ``budget_s`` runs
    out, at least 2). CPU: ``timing.time_cpu_interleaved``. Returns
    ``({name: {time_ms, time_p20_ms, time_p80_ms, samples, timer}}, {name: exception})``.
    """
    if device.type != "cuda":
        from .timing import time_cpu_interleaved

        got, errors = time_cpu_interleaved(steps, min_run_time=cpu_min_run_time,
                                           min_blocks=3, warm=True)
        return ({n: {"time_ms": m.median_s * 1e3, "time_p20_ms": m.p20_s * 1e3,
                     "time_p80_ms": m.p80_s * 1e3, "samples": m.samples, "timer": m.timer}
                 for n, m in got.items()}, errors)
    t0 = time.perf_counter()
    errors: dict = {}
    per_block: dict = {}
    samples: dict = {n: [] for n in steps}
    for r in range(rounds):
        if r >= 2 and budget_s is not None and time.perf_counter() - t0 > budget_s:
            break
        for name, fn in steps.items():
            if name in errors:
                continue
            try:
                if name not in per_block:  # one step alone sizes the block
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                        enable_timing=True)
                    s.record()
                    fn()
                    e.record()
                    torch.cuda.synchronize()
                    per_block[name] = max(1, int(block_ms / max(s.elapsed_time(e), 1e-3)))
                n = per_block[name]
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                for _ in range(n):
                    fn()
                e.record()
                torch.cuda.synchronize()
                samples[name].append(s.elapsed_time(e) / n)
            except Exception as exc:  # reported per provider; the others go on
                errors[name] = exc
    out = {}
    for name, ms in samples.items():
        if name not in errors and ms:
            out[name] = dict(_stats(ms), timer=f"cuda-events, {per_block[name]} steps per "
                             f"block, interleaved with {len(steps) - 1} other(s)")
    return out, errors


class TinyResNet(torch.nn.Module):
    """The dry run's network: a ResNet (stem, max-pool, two stages of one Bottleneck with
    a projection shortcut, average pool, FC) with torchvision's attribute names, a few
    channels wide: every fused site kind of ResNet-50 in milliseconds on a CPU."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        from .resnet50 import Bottleneck

        def down(c_in, c_out, stride):
            return torch.nn.Sequential(
                torch.nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                torch.nn.BatchNorm2d(c_out))

        self.conv1 = torch.nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(width)
        self.relu = torch.nn.ReLU(inplace=True)
        self.maxpool = torch.nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = torch.nn.Sequential(
            Bottleneck(width, width // 2, 1, down(width, width * 2, 1)))
        self.layer2 = torch.nn.Sequential(
            Bottleneck(width * 2, width, 2, down(width * 2, width * 4, 2)),
            Bottleneck(width * 4, width))
        self.avgpool = torch.nn.AdaptiveAvgPool2d((1, 1))
        self.fc = torch.nn.Linear(width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def clone_factory(model: torch.nn.Module) -> Callable[[], torch.nn.Module]:
    """Every provider starts from the same weights: a deep copy of one model."""
    return lambda: copy.deepcopy(model)

"""What is benchmarked: providers, cases per suite, and the callables that get timed.

A *provider* is one implementation: ``eager`` (PyTorch as written: cuDNN on GPU),
``compile`` (``torch.compile``, default mode), ``compile-max-autotune`` (GPU only, when
asked), and ``fusedres-<backend>`` for each fusedres backend that can run on the device.

A *case* is one piece of work on one shape: ``Case.make(provider)`` builds inputs and
returns a zero-argument callable to time, or raises ``Skip(reason)`` when the provider
cannot run it here. Work per suite:

* ops: the memory-bound fused ops (BN+ReLU, BN+add+ReLU, dual BN+add+ReLU), training
  mode, forward and forward+backward, on the ResNet-50 activation shapes.
* conv: every distinct conv of ResNet-50; plain forward and forward+backward, and the
  fused forwards (conv + BN statistics epilogue; BN-ReLU prologue + conv + statistics).
* blocks: torchvision's BasicBlock and Bottleneck, forward+backward, eager vs converted.
* train: resnet18/resnet50 training step (forward, backward, SGD) and inference.

The fusedres conv (``fusedres.conv``) and converter (``fusedres.convert``) are found at
run time; while missing, their rows are skipped with the reason.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import inspect
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from . import formulas

EPS = 1e-5
MOMENTUM = 0.1


class Skip(Exception):
    """A provider cannot run a case here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    kind: str  # "eager" | "compile" | "fusedres" | "tuned" (convert + fusedres.tune)
    backend: Optional[str] = None
    mode: Optional[str] = None  # torch.compile mode
    memory_saving: bool = False  # fusedres.convert(..., memory_saving=True): blocks/train

    @property
    def own_graphs(self) -> bool:
        """torch.compile's max-autotune captures CUDA graphs itself (graph trees): not
        captured again by the timer."""
        return bool(self.mode) and "max-autotune" in self.mode and \
            "no-cudagraphs" not in self.mode


@dataclasses.dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    layout: str  # "channels_last" | "nchw"
    batch: int
    quick: bool = False
    image_size: int = 224
    compile_models_on_cpu: bool = False  # torch.compile of blocks/models on CPU (slow)

    @property
    def memory_format(self):
        return torch.channels_last if self.layout == "channels_last" else torch.contiguous_format

    @property
    def param_dtype(self):
        """BN parameters: fp32 with half-precision activations (the autocast case)."""
        return torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype

    @property
    def autocast(self) -> bool:
        return self.dtype in (torch.float16, torch.bfloat16)


@dataclasses.dataclass
class Case:
    suite: str  # ops | conv | blocks | train
    name: str  # bn_relu, conv, conv+stats, BasicBlock, resnet50, ...
    pass_: str  # fwd | fwd+bwd | train_step | inference
    layer: str  # where in the network: "layer1.0.bn1", "layer3.0.conv2", ...
    shape: tuple  # input shape (N, C, H, W)
    make: Callable[[Provider], Callable[[], Any]]
    bytes: Optional[int] = None  # fused traffic model (formulas.op_bytes)
    bytes_eager: Optional[int] = None
    flops: Optional[int] = None
    images: Optional[int] = None  # images per call, for images/s
    peak_memory: bool = False
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (self.suite, self.name, self.pass_, self.layer, tuple(self.shape))


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _rand(shape, s: Settings, requires_grad=False, scale=1.0, offset=0.0) -> torch.Tensor:
    t = torch.randn(shape, device=s.device, dtype=torch.float32) * scale + offset
    t = t.to(s.dtype)
    if t.dim() == 4:
        t = t.contiguous(memory_format=s.memory_format)
    return t.requires_grad_(requires_grad)


def _compile(fn, provider: Provider):
    """A fresh ``torch.compile`` of ``fn``: the dynamo caches are reset first, so no case
    reuses (or is made dynamic by) another case's graph; shapes are static."""
    torch._dynamo.reset()
    kwargs = {"dynamic": False}
    if provider.mode:
        kwargs["mode"] = provider.mode
    return torch.compile(fn, **kwargs)


def _mark_step(provider: Provider):
    """max-autotune uses CUDA graph trees: mark each iteration as a new step."""
    mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
    if provider.mode and "max-autotune" in provider.mode and mark is not None:
        return mark
    return None


def _grad_fn(forward: Callable[[], torch.Tensor], inputs: list, provider: Provider):
    """Forward then backward: ``torch.autograd.grad`` (no accumulation into ``.grad``,
    so it can be captured in a CUDA graph) with a fixed random output gradient."""
    box = {}
    mark = _mark_step(provider)

    def run():
        if mark is not None:
            mark()
        out = forward()
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(o, torch.Tensor) and o.requires_grad]
        if "g" not in box:  # one gradient per differentiable output (y, mean, var, ...)
            box["g"] = [torch.randn_like(o) for o in outs]
        return torch.autograd.grad(outs, inputs, box["g"])

    return run


def _fwd_fn(forward: Callable[[], Any], provider: Provider):
    mark = _mark_step(provider)
    if mark is None:
        return forward

    def run():
        mark()
        return forward()

    return run


def _fusedres_backend_check(provider: Provider, s: Settings):
    from fusedres._backend import backend_supports

    if not backend_supports(provider.backend, s.device):
        raise Skip(f"fusedres backend {provider.backend!r} cannot run on {s.device.type}")


# --------------------------------------------------------------------------------------
# ops: memory-bound fused BN ops on the ResNet-50 activation shapes
# --------------------------------------------------------------------------------------

# (op, layer, C, H): every distinct BN+ReLU / BN+add+ReLU / dual BN+add+ReLU shape of
# torchvision's ResNet-50 (v1.5: stride on the 3x3), per image.
RESNET50_OPS = (
    ("bn_relu", "conv1.bn1 (stem)", 64, 112),
    ("bn_relu", "layer1.*.bn1/bn2", 64, 56),
    ("bn_relu", "layer2.0.bn1", 128, 56),
    ("bn_relu", "layer2.*.bn2", 128, 28),
    ("bn_relu", "layer3.0.bn1", 256, 28),
    ("bn_relu", "layer3.*.bn2", 256, 14),
    ("bn_relu", "layer4.0.bn1", 512, 14),
    ("bn_relu", "layer4.*.bn2", 512, 7),
    ("bn_add_relu", "layer1.1-2.bn3", 256, 56),
    ("bn_add_relu", "layer2.1-3.bn3", 512, 28),
    ("bn_add_relu", "layer3.1-5.bn3", 1024, 14),
    ("bn_add_relu", "layer4.1-2.bn3", 2048, 7),
    ("dual_bn_add_relu", "layer1.0.bn3+downsample", 256, 56),
    ("dual_bn_add_relu", "layer2.0.bn3+downsample", 512, 28),
    ("dual_bn_add_relu", "layer3.0.bn3+downsample", 1024, 14),
    ("dual_bn_add_relu", "layer4.0.bn3+downsample", 2048, 7),
)
QUICK_OPS = ("layer1.*.bn1/bn2", "layer3.1-5.bn3", "layer4.0.bn3+downsample")
TINY_OPS = (("bn_relu", "tiny", 8, 4), ("bn_add_relu", "tiny", 8, 4),
            ("dual_bn_add_relu", "tiny", 8, 4))


def _eager_op(op: str):
    if op == "bn_relu":
        def f(x, rm, rv, w, b):
            return torch.relu(F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS))
    elif op == "bn_add_relu":
        def f(x, r, rm, rv, w, b):
            return torch.relu(F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS) + r)
    else:
        def f(x, rm, rv, w, b, sc, rm2, rv2, w2, b2):
            return torch.relu(F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS)
                              + F.batch_norm(sc, rm2, rv2, w2, b2, True, MOMENTUM, EPS))
    return f


def _fusedres_op(op: str, backend: str):
    from fusedres import functional as fn

    if op == "bn_relu":
        def f(x, rm, rv, w, b):
            return fn.batch_norm_relu(x, rm, rv, w, b, True, MOMENTUM, EPS, backend=backend)
    elif op == "bn_add_relu":
        def f(x, r, rm, rv, w, b):
            return fn.batch_norm_add_relu(x, r, rm, rv, w, b, True, MOMENTUM, EPS,
                                          backend=backend)
    else:
        def f(x, rm, rv, w, b, sc, rm2, rv2, w2, b2):
            return fn.dual_batch_norm_add_relu(x, sc, rm, rv, w, b, rm2, rv2, w2, b2, True,
                                               MOMENTUM, EPS, backend=backend)
    return f


def _op_make(op: str, shape: tuple, pass_: str, s: Settings):
    c = shape[1]

    def params(grad):
        w = (1 + 0.1 * torch.randn(c, device=s.device)).to(s.param_dtype).requires_grad_(grad)
        b = (0.1 * torch.randn(c, device=s.device)).to(s.param_dtype).requires_grad_(grad)
        rm = torch.zeros(c, device=s.device, dtype=s.param_dtype)
        rv = torch.ones(c, device=s.device, dtype=s.param_dtype)
        return rm, rv, w, b

    def make(provider: Provider):
        grad = pass_ == "fwd+bwd"
        x = _rand(shape, s, grad, scale=2.0, offset=0.5)
        rm, rv, w, b = params(grad)
        if op == "bn_relu":
            args, grads = (x, rm, rv, w, b), [x, w, b]
        elif op == "bn_add_relu":
            r = _rand(shape, s, grad)
            args, grads = (x, r, rm, rv, w, b), [x, r, w, b]
        else:
            sc = _rand(shape, s, grad, scale=1.5, offset=-0.2)
            rm2, rv2, w2, b2 = params(grad)
            args, grads = (x, rm, rv, w, b, sc, rm2, rv2, w2, b2), [x, w, b, sc, w2, b2]
        _not_tuned(provider)
        if provider.kind == "fusedres":
            _no_memory_saving(provider)
            _fusedres_backend_check(provider, s)
            f = _fusedres_op(op, provider.backend)
        elif provider.kind == "compile":
            f = _compile(_eager_op(op), provider)
        else:
            f = _eager_op(op)
        forward = functools.partial(f, *args)
        return _grad_fn(forward, grads, provider) if grad else _fwd_fn(forward, provider)

    return make


def ops_cases(s: Settings, shapes: str = "full") -> list[Case]:
    if shapes == "tiny":
        table = TINY_OPS
    elif shapes == "quick":
        table = tuple(t for t in RESNET50_OPS if t[1] in QUICK_OPS)
    else:
        table = RESNET50_OPS
    out = []
    for op, layer, c, h in table:
        shape = (s.batch, c, h, h)
        for pass_ in formulas.PASSES:
            out.append(Case(
                suite="ops", name=op, pass_=pass_, layer=layer, shape=shape,
                make=_op_make(op, shape, pass_, s),
                bytes=formulas.op_bytes(op, pass_, shape, s.dtype, "fused"),
                bytes_eager=formulas.op_bytes(op, pass_, shape, s.dtype, "eager")))
    return out


# --------------------------------------------------------------------------------------
# conv: every distinct conv of ResNet-50
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    layer: str  # first layer with this conv; ``count`` layers share it
    c_in: int
    c_out: int
    kernel: int
    stride: int
    padding: int
    h: int  # input height = width (at 224x224 images)
    count: int = 1

    @property
    def h_out(self) -> int:
        return formulas.conv_out_hw(self.h, self.h, self.kernel, self.stride, self.padding)[0]

    @property
    def label(self) -> str:
        return (f"{self.layer} {self.kernel}x{self.kernel} {self.c_in}->{self.c_out}"
                f"{' s' + str(self.stride) if self.stride > 1 else ''} @{self.h}")


def resnet50_convs(image_size: int = 224) -> list[ConvSpec]:
    """The distinct convs of torchvision's ResNet-50 (stride on the 3x3, v1.5), in network
    order, each with the number of layers that share its shape."""
    layers = [("conv1", 3, 64, 7, 2, 3, image_size)]
    h = formulas.conv_out_hw(image_size, image_size, 7, 2, 3)[0]
    h = (h + 2 - 3) // 2 + 1  # 3x3/2 max-pool, padding 1
    c_in = 64
    for li, (blocks, width, stride) in enumerate(((3, 64, 1), (4, 128, 2), (6, 256, 2),
                                                  (3, 512, 2)), start=1):
        c_out = width * 4
        for bi in range(blocks):
            st = stride if bi == 0 else 1
            name = f"layer{li}.{bi}"
            h_out = formulas.conv_out_hw(h, h, 3, st, 1)[0]
            layers.append((f"{name}.conv1", c_in, width, 1, 1, 0, h))
            layers.append((f"{name}.conv2", width, width, 3, st, 1, h))
            layers.append((f"{name}.conv3", width, c_out, 1, 1, 0, h_out))
            if bi == 0:
                layers.append((f"{name}.downsample.0", c_in, c_out, 1, st, 0, h))
            c_in, h = c_out, h_out
    seen: dict = {}
    for layer, *key in layers:
        key = tuple(key)
        if key in seen:
            seen[key][1] += 1
        else:
            seen[key] = [layer, 1]
    return [ConvSpec(layer, *key, count=n) for key, (layer, n) in seen.items()]


QUICK_CONVS = ("layer1.0.conv2", "layer3.0.conv3")
TINY_CONV = ConvSpec("tiny", 8, 16, 3, 1, 1, 8)

CONV_VARIANTS = (("conv", "fwd"), ("conv", "fwd+bwd"),
                 ("conv+stats", "fwd"), ("conv+stats", "fwd+bwd"),
                 ("bn_relu+conv+stats", "fwd"), ("bn_relu+conv+stats", "fwd+bwd"),
                 ("conv+bias+add+relu", "fwd"))
# conv+stats: the training conv with a BN-statistics epilogue; bn_relu+conv+stats: the
# same with the previous layer's BN-ReLU applied while loading (the chain of DESIGN.md
# section 2); conv+bias+add+relu: the eval-mode block tail with BN folded into the conv.

# fusedres.conv entry points (fusedres/conv.py), all taking backend=:
#   conv2d(x, w, bias, stride, padding), conv2d_stats(x, w, stride, padding),
#   bn_relu_conv2d_stats(x, scale, shift, w, stride, padding),
#   conv2d_bias_add_relu(x, w, bias, residual, stride, padding, relu)
CONV_ENTRY_POINTS = {"conv": "conv2d", "conv+stats": "conv2d_stats",
                     "bn_relu+conv+stats": "bn_relu_conv2d_stats",
                     "conv+bias+add+relu": "conv2d_bias_add_relu"}


def _fusedres_conv_module():
    try:
        return importlib.import_module("fusedres.conv")
    except ImportError as exc:
        raise Skip(f"fusedres.conv not available ({exc})") from None


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _fusedres_conv_fn(variant: str, spec: ConvSpec, provider: Provider, s: Settings,
                      x: torch.Tensor, w: torch.Tensor):
    """``f(x, w, scale, shift, bias, residual)`` running the fusedres conv variant, or
    Skip. A backend whose call would only run ``F.conv2d`` (fusedres has no C++ conv;
    ``conv_path`` says so) is skipped rather than timed under a fusedres name."""
    mod = _fusedres_conv_module()
    name = CONV_ENTRY_POINTS[variant]
    entry = getattr(mod, name, None)
    if entry is None:
        raise Skip(f"fusedres.conv.{name} not available")
    b = provider.backend
    if b == "triton" and s.device.type != "cuda":
        raise Skip("the Triton conv is timed on GPU only (the interpreter is never "
                   "benchmarked)")
    conv_path = getattr(mod, "conv_path", None)
    if conv_path is not None:  # "reference" too: F.conv2d is already the eager row
        try:
            path, why = conv_path(x, w, None, spec.stride, spec.padding, 1, 1, b)
        except RuntimeError as exc:
            raise Skip(f"fusedres.conv backend {b!r}: {exc}") from None
        if path == "reference":
            raise Skip(f"fusedres.conv with backend {b!r} runs F.conv2d: {why}")
    st, pad = spec.stride, spec.padding
    if variant == "conv":
        return lambda x, w, scale, shift, bias, res: entry(x, w, None, st, pad, backend=b)
    if variant == "conv+stats":
        return lambda x, w, scale, shift, bias, res: entry(x, w, st, pad, backend=b)
    if variant == "bn_relu+conv+stats":
        return lambda x, w, scale, shift, bias, res: entry(x, scale, shift, w, st, pad,
                                                           backend=b)
    return lambda x, w, scale, shift, bias, res: entry(x, w, bias, res, st, pad, True,
                                                       backend=b)


def _eager_conv_fn(variant: str, spec: ConvSpec):
    """The unfused PyTorch equivalent of each variant (cuDNN conv on GPU)."""
    st, pad = spec.stride, spec.padding

    def stats(y):
        var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
        return y, mean, var

    if variant == "conv":
        return lambda x, w, scale, shift, bias, res: F.conv2d(x, w, None, st, pad)
    if variant == "conv+stats":
        return lambda x, w, scale, shift, bias, res: stats(F.conv2d(x, w, None, st, pad))
    if variant == "bn_relu+conv+stats":
        def prologue(x, w, scale, shift, bias, res):
            a = torch.relu(x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
            return stats(F.conv2d(a.to(x.dtype), w, None, st, pad))
        return prologue
    return lambda x, w, scale, shift, bias, res: torch.relu(F.conv2d(x, w, bias, st, pad) + res)


def _conv_make(spec: ConvSpec, variant: str, pass_: str, s: Settings):
    shape = (s.batch, spec.c_in, spec.h, spec.h)

    def make(provider: Provider):
        grad = pass_ == "fwd+bwd"
        x = _rand(shape, s, grad)
        fan_in = spec.c_in * spec.kernel * spec.kernel
        w = _rand((spec.c_out, spec.c_in, spec.kernel, spec.kernel), s, grad,
                  scale=fan_in ** -0.5)
        # BN-ReLU prologue coefficients, as a finalize kernel produces them (fp32 with
        # half-precision activations)
        scale = (1 + 0.1 * torch.randn(spec.c_in, device=s.device)).to(s.param_dtype)
        shift = (0.1 * torch.randn(spec.c_in, device=s.device)).to(s.param_dtype)
        bias = (0.1 * torch.randn(spec.c_out, device=s.device)).to(s.dtype)
        res = _rand((s.batch, spec.c_out, spec.h_out, spec.h_out), s)
        _not_tuned(provider)
        if provider.kind == "fusedres":
            _no_memory_saving(provider)
            f = _fusedres_conv_fn(variant, spec, provider, s, x, w)
        elif provider.kind == "compile":
            f = _compile(_eager_conv_fn(variant, spec), provider)
        else:
            f = _eager_conv_fn(variant, spec)
        forward = functools.partial(f, x, w, scale, shift, bias, res)
        if grad:
            if variant == "bn_relu+conv+stats":
                scale.requires_grad_(True)
                shift.requires_grad_(True)
                return _grad_fn(forward, [x, w, scale, shift], provider)
            return _grad_fn(forward, [x, w], provider)
        return _fwd_fn(forward, provider)

    return make


def conv_cases(s: Settings, shapes: str = "full") -> list[Case]:
    if shapes == "tiny":
        specs = [TINY_CONV]
    else:
        specs = resnet50_convs(s.image_size)
        if shapes == "quick":
            specs = [c for c in specs if c.layer in QUICK_CONVS]
    out = []
    for spec in specs:
        shape = (s.batch, spec.c_in, spec.h, spec.h)
        for variant, pass_ in CONV_VARIANTS:
            if variant == "conv+bias+add+relu" and not (spec.layer.endswith("conv3")
                                                        or spec is TINY_CONV):
                continue  # the eval block tail: only where a residual add follows
            out.append(Case(
                suite="conv", name=variant, pass_=pass_, layer=spec.label, shape=shape,
                make=_conv_make(spec, variant, pass_, s),
                flops=formulas.conv2d_flops(s.batch, spec.c_in, spec.c_out, spec.h_out,
                                            spec.h_out, spec.kernel, 1, pass_),
                bytes=formulas.conv2d_bytes(s.batch, spec.c_in, spec.c_out, spec.h, spec.h,
                                            spec.h_out, spec.h_out, spec.kernel, s.dtype),
                extra={"kernel": spec.kernel, "stride": spec.stride, "c_out": spec.c_out,
                       "layers_sharing_shape": spec.count}))
    return out


# The Triton conv backward with the BN-statistics gradient in each mode of
# ``fusedres.conv.dbn_backward`` (what its "auto" decides between, per shape): the
# backward op alone, at the convs that run behind a BN-ReLU in ResNet-50 (each
# bottleneck's conv2 and conv3), plus the materialising pass alone (its memory traffic).
DBN_BACKWARD_PASSES = ("bwd dbn=fused", "bwd dbn=materialised", "bwd dbn=apply-pass")


def _dbn_backward_make(spec: ConvSpec, pass_: str, s: Settings, interpreter: bool):
    mode = pass_.split("=", 1)[1]

    def make(provider: Provider):
        if provider.kind != "fusedres" or provider.backend != "triton":
            raise Skip("the dBN backward modes are the Triton conv's (fusedres.conv."
                       "dbn_backward): no other provider has them")
        if s.device.type != "cuda" and not interpreter:
            raise Skip("the Triton conv is timed on GPU only (the interpreter is never "
                       "benchmarked)")
        fconv = _fusedres_conv_module()
        x = _rand((s.batch, spec.c_in, spec.h, spec.h), s)
        fan_in = spec.c_in * spec.kernel * spec.kernel
        w = _rand((spec.c_out, spec.c_in, spec.kernel, spec.kernel), s, scale=fan_in ** -0.5)
        scale = (1 + 0.1 * torch.randn(spec.c_in, device=s.device)).to(s.param_dtype)
        shift = (0.1 * torch.randn(spec.c_in, device=s.device)).to(s.param_dtype)
        geometry = ([spec.stride] * 2, [spec.padding] * 2)
        with torch.no_grad():
            y, mean, var = torch.ops.fusedres.triton_conv_prologue_stats(x, scale, shift, w,
                                                                         *geometry)
        dy = torch.randn_like(y)
        dmean, dvar = torch.randn_like(mean), torch.randn_like(var)
        if mode == "apply-pass":
            return lambda: fconv._materialise_dy(dy, y, mean, dmean, dvar)

        def backward():
            old, fconv.dbn_backward = fconv.dbn_backward, mode
            try:
                return torch.ops.fusedres.triton_conv_backward(
                    dy, x, w, *geometry, scale, shift, y, mean, dmean, dvar, [True, True, True])
            finally:
                fconv.dbn_backward = old

        return backward

    return make


def dbn_backward_cases(s: Settings, shapes: str = "full", interpreter: bool = False
                       ) -> list[Case]:
    """``interpreter``: make the callables on CPU too (tests run them, nothing times them)."""
    if shapes == "tiny":
        specs = [TINY_CONV]
    else:
        specs = [c for c in resnet50_convs(s.image_size)
                 if c.layer.endswith((".conv2", ".conv3"))]
    out = []
    for spec in specs:
        elems_out = s.batch * spec.c_out * spec.h_out * spec.h_out
        bwd_flops = 2 * formulas.conv2d_flops(s.batch, spec.c_in, spec.c_out, spec.h_out,
                                              spec.h_out, spec.kernel, 1, "fwd")
        for pass_ in DBN_BACKWARD_PASSES:
            apply_pass = pass_.endswith("apply-pass")
            out.append(Case(
                suite="conv", name="bn_relu+conv+stats", pass_=pass_, layer=spec.label,
                shape=(s.batch, spec.c_in, spec.h, spec.h),
                make=_dbn_backward_make(spec, pass_, s, interpreter),
                flops=None if apply_pass else bwd_flops,
                # the pass: read dy and y, write dy_total
                bytes=3 * elems_out * formulas.element_size(s.dtype) if apply_pass else None,
                extra={"kernel": spec.kernel, "stride": spec.stride, "c_out": spec.c_out,
                       "layers_sharing_shape": spec.count}))
    return out


# --------------------------------------------------------------------------------------
# blocks and train: modules through fusedres.convert
# --------------------------------------------------------------------------------------


def find_convert() -> Callable:
    """``fusedres.convert(model, backend=...)``, or Skip."""
    import fusedres

    conv = getattr(fusedres, "convert", None)
    if conv is None:
        try:
            conv = importlib.import_module("fusedres.convert")
        except ImportError:
            conv = None
    if conv is not None and not callable(conv):  # the module, not the function
        conv = getattr(conv, "convert", None)
    if conv is None or not callable(conv):
        raise Skip("fusedres.convert not available")
    return conv


def _convert(module: torch.nn.Module, provider: Provider) -> torch.nn.Module:
    convert = find_convert()
    kw = {"backend": provider.backend or "auto"}
    if provider.memory_saving:
        if not _accepts(convert, "memory_saving"):
            raise Skip("fusedres.convert has no memory_saving option")
        kw["memory_saving"] = True
    m = copy.deepcopy(module)
    out = convert(m, **kw)
    return m if out is None else out


def _no_memory_saving(provider: Provider):
    if provider.memory_saving:
        raise Skip("memory saving is a fusedres.convert option: timed on blocks and train")


def _not_tuned(provider: Provider):
    if provider.kind == "tuned":
        raise Skip("the tuned model (fusedres.tune) is timed on blocks and train")


def _tuned(module: torch.nn.Module, s: Settings, provider: Provider, x: torch.Tensor):
    """The ``tuned`` provider's module: ``fusedres.tune`` on the case's own input, in the
    module's mode (not timed; its decisions are cached on disk for the next run)."""
    if provider.kind != "tuned":
        return module
    import fusedres

    with _autocast(s):
        return fusedres.tune(module, x, verbose=None)  # one summary line: what it cost


def _prepare_module(module: torch.nn.Module, s: Settings, provider: Provider):
    module = module.to(s.device).to(memory_format=s.memory_format)
    if not s.autocast:
        module = module.to(s.dtype)
    if provider.kind == "tuned":
        module = _convert(module, provider)  # backend "auto"; tuned once the input exists
    elif provider.kind == "fusedres":
        _fusedres_backend_check(provider, s)
        module = _convert(module, provider)
    elif provider.kind == "compile":
        if s.device.type == "cpu" and not s.compile_models_on_cpu:
            raise Skip("torch.compile of blocks and models on CPU is slow: not timed with "
                       "--quick (run without --quick to time it)")
        module = _compile(module, provider)
    return module


def _autocast(s: Settings):
    if s.autocast:
        return torch.autocast(s.device.type, dtype=s.dtype)
    import contextlib

    return contextlib.nullcontext()


# (block, layer, in_planes, planes, stride, H): torchvision blocks at network shapes.
BLOCKS = (
    ("BasicBlock", "resnet18.layer1.0", 64, 64, 1, 56),
    ("BasicBlock", "resnet18.layer2.0", 64, 128, 2, 56),
    ("Bottleneck", "resnet50.layer1.0", 64, 64, 1, 56),
    ("Bottleneck", "resnet50.layer3.1", 1024, 256, 1, 14),
)
QUICK_BLOCKS = ("resnet18.layer1.0", "resnet50.layer1.0")
TINY_BLOCKS = (("BasicBlock", "tiny", 8, 8, 1, 8), ("Bottleneck", "tiny", 32, 8, 1, 8))


def _block(kind: str, in_planes: int, planes: int, stride: int) -> torch.nn.Module:
    from torchvision.models import resnet

    cls = getattr(resnet, kind)
    out_planes = planes * cls.expansion
    down = None
    if stride != 1 or in_planes != out_planes:
        down = torch.nn.Sequential(resnet.conv1x1(in_planes, out_planes, stride),
                                   torch.nn.BatchNorm2d(out_planes))
    return cls(in_planes, planes, stride, down)


def _block_make(kind, in_planes, planes, stride, shape, s: Settings):
    def make(provider: Provider):
        torch.manual_seed(0)
        block = _prepare_module(_block(kind, in_planes, planes, stride).train(), s, provider)
        x = _rand(shape, s, True)
        block = _tuned(block, s, provider, x)
        params = [p for p in block.parameters() if p.requires_grad]

        def forward():
            with _autocast(s):
                return block(x)

        run = _grad_fn(forward, [x] + params, provider)
        run.forward = forward  # what the memory column measures
        return run

    return make


def blocks_cases(s: Settings, shapes: str = "full") -> list[Case]:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return []
    table = TINY_BLOCKS if shapes == "tiny" else BLOCKS
    if shapes == "quick":
        table = tuple(b for b in table if b[1] in QUICK_BLOCKS)
    out = []
    for kind, layer, in_planes, planes, stride, h in table:
        shape = (s.batch, in_planes, h, h)
        with torch.device("meta"):
            block = _block(kind, in_planes, planes, stride)
        flops = formulas.model_flops(block, torch.empty(shape, device="meta"), "fwd+bwd",
                                     input_grad=True)
        out.append(Case(suite="blocks", name=kind, pass_="fwd+bwd", layer=layer, shape=shape,
                        make=_block_make(kind, in_planes, planes, stride, shape, s),
                        flops=flops, images=s.batch, peak_memory=True))
    return out


MODELS = ("resnet18", "resnet50")


def _model(name: str) -> torch.nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


def _train_make(name: str, shape, s: Settings):
    def make(provider: Provider):
        torch.manual_seed(0)
        model = _prepare_module(_model(name).train(), s, provider)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        x = _rand(shape, s)
        model = _tuned(model, s, provider, x)
        y = torch.randint(0, 1000, (shape[0],), device=s.device)
        mark = _mark_step(provider)

        def step():
            if mark is not None:
                mark()
            opt.zero_grad(set_to_none=False)
            with _autocast(s):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

        def forward():
            with _autocast(s):
                return F.cross_entropy(model(x), y)

        step.forward = forward  # what the memory column measures
        return step

    return make


def _infer_make(name: str, shape, s: Settings):
    def make(provider: Provider):
        torch.manual_seed(0)
        model = _model(name).eval()
        # Converted in eval mode: the converter may fold BN into the convs.
        model = _prepare_module(model, s, provider)
        x = _rand(shape, s)
        model = _tuned(model, s, provider, x)
        mark = _mark_step(provider)

        def run():
            if mark is not None:
                mark()
            with torch.inference_mode(), _autocast(s):
                return model(x)

        return run

    return make


def train_cases(s: Settings, shapes: str = "full") -> list[Case]:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return []
    size = 32 if shapes == "tiny" else s.image_size
    names = ("resnet18",) if shapes == "tiny" else MODELS
    out = []
    for name in names:
        shape = (s.batch, 3, size, size)
        probe = torch.empty(shape, device="meta")
        with torch.device("meta"):  # shapes only: no weight initialisation
            net = _model(name)
        fwd = formulas.model_flops(net, probe, "fwd")
        train = formulas.model_flops(net, probe, "fwd+bwd", input_grad=False)
        out.append(Case(suite="train", name=name, pass_="train_step", layer=f"{size}x{size}",
                        shape=shape, make=_train_make(name, shape, s), flops=train,
                        images=s.batch, peak_memory=True))
        out.append(Case(suite="train", name=name, pass_="inference", layer=f"{size}x{size}",
                        shape=shape, make=_infer_make(name, shape, s), flops=fwd,
                        images=s.batch, peak_memory=True))
    return out


SUITES = {"ops": ops_cases, "conv": conv_cases, "blocks": blocks_cases, "train": train_cases}

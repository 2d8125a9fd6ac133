"""Drop-in fused modules, and the module-level fused calls that ``fusedres.convert`` uses.

Modules (all subclass ``torch.nn.BatchNorm2d``: same constructor, defaults,
``device``/``dtype`` keywords, state_dict keys, ``reset_parameters``; ``extra_repr`` is
torch's, plus ``backend=`` when it is not ``"auto"``):

    BatchNorm2d(C)                 bn(x)                      (the fused op, no ReLU)
    BatchNormReLU2d(C)             relu(bn(x))
    BatchNormAddReLU2d(C)          relu(bn(x) + residual)     forward(x, residual)
    DualBatchNormAddReLU2d(C)      relu(bn(x) + shortcut_bn(s))   forward(x, s)

and ``ConvBatchNormReLU2d`` (children ``conv`` and ``bn``: ``relu(bn(conv(x)))``, the
ReLU optional), whose convolution goes through one function, ``conv2d(conv, x)``
(``F.conv2d``). A BN-ReLU whose only consumer is a conv runs through
``bn_relu_conv2d``: on the Triton conv path the BN-ReLU is applied in that conv's
prologue and never stored (``prologue_problem`` says when not).

Every module has ``from_modules(...)`` (and the BN ones ``from_bn``): a fused module that
shares the given modules' parameters and buffers (the same tensors, no copies), and a
``backend`` attribute (``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``
or the plumbing backend ``"reference_primitives"``). ``module.last_backend`` (and
``fusedres.nn.last_backend()``) say which backend the last forward ran (``"torch"`` when
it fell back to torch's own modules, ``"folded"`` when an eval-mode conv+BN ran as one conv
with folded weights, ``"triton-prologue"`` when a BN-ReLU ran in a Triton conv's prologue).

``torch.fx.symbolic_trace`` records every fused module as one ``call_module`` node, as
it records torch's own BN (``fx_leaf_call``): the traced graph calls the module, which runs
fused. ``torch.jit.script`` compiles the modules to torch's own BN math (a TorchScript
module runs ``F.batch_norm``, unfused; ``last_backend`` is not updated there): use
``torch.compile`` or ``torch.jit.trace`` for fused kernels in a compiled or exported model.
Higher-order gradients (``create_graph=True``), forward-mode AD (``torch.func.jvp``) and
``meta`` tensors work as with torch's BN; see ``fusedres.functional`` for the path each
takes. ``eps <= 0`` raises ``ValueError`` in training (``eps < 0`` in eval), as torch.

Known deviations from ``nn.BatchNorm2d``, none of which changes a result (the list
``KNOWN_DEVIATIONS`` of ``tests/test_torch_suites.py``, which runs torch's own
BatchNorm2d module samples against these modules and checks each entry):

* ``torch.jit.script`` runs torch's BN math: TorchScript cannot compile the fused ops'
  Python glue; a scripted module computes ``F.batch_norm`` (unfused, saveable). Use
  ``torch.compile`` or ``torch.jit.trace`` for fused kernels in a compiled model.
* double backward runs through the reference composite: the fused backward kernels have
  no derivative; with ``create_graph=True`` the first-order gradients are fused, their
  derivative is torch's BN derivative (``last_backend()`` says "reference"), vmap included.
* third-order derivatives raise (``backend="reference"`` supports them).
* forward-mode AD and ``torch.func`` grad/jvp run the reference composite (no
  forward-mode formula; the C++ autograd does not run under functorch).

Semantics are ``nn.BatchNorm2d``'s: training/eval, running statistics with ``momentum``
or ``momentum=None`` (cumulative average through ``num_batches_tracked``, incremented
before the update as torch does), ``track_running_stats=False`` (batch statistics in
eval too), ``affine=False``, ``bias=False`` (torch >= 2.14). What the fused functions do
not cover (a parameter dtype other than the input's or float32, tensors on another
device, a residual of another shape or dtype, a BN subclass's own forward) runs through
torch itself: never a wrong answer.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef

from . import _timm
from .kernels import capturing as _capturing
from . import conv as fconv
from ._backend import check_site_backend, resolve_backend
from . import conv_paths, cudnn_graph, functional, ops
from .reference import acc_dtype

__all__ = ["BatchNorm2d", "BatchNormReLU2d", "BatchNormAddReLU2d", "DualBatchNormAddReLU2d",
           "ConvBatchNormReLU2d", "conv2d", "last_backend", "bn_act", "conv_bn_act", "fusable_bn",
           "fx_leaf_call", "SitePlan", "site_plan", "conv_choice",
           "folded_weights", "fold_eval", "bn_relu_conv2d", "prologue_problem",
           "prologue_conv_problem"]

_REDUCED = (torch.float16, torch.bfloat16)
_last = functional._module_last  # this module's store (a double backward writes it too)


def last_backend() -> Optional[str]:
    """The backend of the most recent fused BN call on this thread: a fusedres backend,
    ``"torch"`` when the call fell back to torch's own modules, ``"folded"`` (eval conv
    with folded weights) or ``"triton-prologue"`` (``bn_relu_conv2d``'s fused path);
    ``"reference"`` after a double backward (see ``fusedres.functional``)."""
    return getattr(_last, "backend", None)


_Proxy = torch.fx.Proxy


def fx_leaf_call(module: nn.Module, *args, **kwargs):
    """Under ``torch.fx`` symbolic tracing (an argument is an ``fx.Proxy``): record
    ``module(*args, **kwargs)`` as one ``call_module`` node, as fx records torch's own
    ``nn`` modules, and return its Proxy; otherwise None (eager, torch.compile).

    The fused modules (and converted blocks) are leaves of any fx tracer this way: the
    traced graph calls them at run time (fused, with their training flag of that time),
    and tracing never runs their forward on real buffers."""
    for a in args + tuple(kwargs.values()) if kwargs else args:
        if isinstance(a, _Proxy):
            tracer = a.tracer
            path = tracer.path_of_module(module)
            if not path:  # torch's own BN cannot be the root of a trace either
                raise torch.fx.proxy.TraceError(
                    f"{type(module).__name__} is the root of this symbolic trace: trace a "
                    "model that contains it (it is then one call_module node)")
            return tracer.create_proxy("call_module", path, args, kwargs)
    return None


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------
# Module-level fused calls (the generated forwards of fusedres.convert call these)
# --------------------------------------------------------------------------------------


def conv2d(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """The one place a fused site runs its convolution: today ``conv(x)``'s math
    (``F.conv2d`` with the module's padding mode) without the module's hooks."""
    return conv._conv_forward(x, conv.weight, conv.bias)


def fusable_bn(bn: nn.Module) -> Optional[str]:
    """``None`` when ``bn`` computes exactly ``nn.BatchNorm2d.forward``; else why not."""
    if not isinstance(bn, nn.BatchNorm2d):
        return f"{type(bn).__name__} is not a BatchNorm2d"
    fwd = type(bn).forward
    if fwd is nn.BatchNorm2d.forward or (fwd is BatchNorm2d.forward and not type(bn)._relu):
        return None
    return f"{type(bn).__name__} overrides BatchNorm2d.forward"


def _tensor_ok(t: Optional[Tensor], y: Tensor) -> bool:
    if t is None:
        return True
    if t.device != y.device:
        return False
    return t.dtype == y.dtype or (y.dtype in _REDUCED and t.dtype == torch.float32)


def _runtime_ok(bn: nn.BatchNorm2d, y: Tensor) -> bool:
    """Can the fused functions compute ``bn(y)`` exactly as torch would?"""
    if not isinstance(y, Tensor) or y.dtype not in _FLOATS or y.dim() != 4:
        return False
    return all(_tensor_ok(t, y) for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))


def _batch_stats(bn: nn.BatchNorm2d) -> bool:
    """Does ``bn`` normalise with batch statistics (as ``nn.BatchNorm2d.forward`` decides)?"""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _bn_state(bn: nn.BatchNorm2d):
    """What ``nn.BatchNorm2d.forward`` passes to ``F.batch_norm``, with its side effect
    (``num_batches_tracked += 1`` in training), for the fused functions."""
    nbt = None
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        nbt = bn.num_batches_tracked
    momentum = bn.momentum
    if momentum is None and nbt is None:
        momentum = 0.0  # torch: factor 0.0 when nothing is tracked
    training = _batch_stats(bn)
    use_running = not bn.training or bn.track_running_stats
    rm = bn.running_mean if use_running else None
    rv = bn.running_var if use_running else None
    return rm, rv, training, momentum, nbt


def process_group_of(bn: nn.Module):
    """The process group whose global batch ``bn`` normalises over (None: local), set by
    ``fusedres.convert(..., sync_bn=True)`` or the fused modules' ``process_group=``."""
    return getattr(bn, "fusedres_process_group", None)


def _torch_bn(bn: nn.BatchNorm2d, y: Tensor) -> Tensor:
    if process_group_of(bn) is not None and bn.training:
        raise RuntimeError(f"{type(bn).__name__} is set to synchronise its statistics across "
                           "processes, but this call is not one the fused kernels cover "
                           f"(input {y.dtype} {tuple(y.shape)} on {y.device}); torch's own "
                           "BN would silently use local statistics")
    return nn.BatchNorm2d.forward(bn, y)


def _dual_ok(bn, y, shortcut_bn, shortcut) -> bool:
    """Do the dual BN-add-ReLU kernels cover ``relu(bn(y) + shortcut_bn(shortcut))``?"""
    return (_runtime_ok(bn, y) and _runtime_ok(shortcut_bn, shortcut)
            and shortcut.shape == y.shape and shortcut.dtype == y.dtype
            and bn.momentum is not None and shortcut_bn.momentum == bn.momentum
            and shortcut_bn.eps == bn.eps and shortcut_bn.training == bn.training
            and shortcut_bn.track_running_stats == bn.track_running_stats
            and (shortcut_bn.running_mean is None) == (bn.running_mean is None))


def bn_act(bn: nn.BatchNorm2d, y: Tensor, *, relu: bool = False,
           residual: Optional[Tensor] = None, shortcut_bn: Optional[nn.BatchNorm2d] = None,
           shortcut: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """``[relu](bn(y) [+ residual | + shortcut_bn(shortcut)])`` through the fused
    functions, with ``bn``'s (and ``shortcut_bn``'s) running statistics and options.

    Anything the fused functions do not cover is computed by torch itself.
    """
    if shortcut_bn is not None:
        if not _dual_ok(bn, y, shortcut_bn, shortcut):
            # the shortcut BN on its own, then the one-BN tail
            residual = bn_act(shortcut_bn, shortcut, backend=backend)
        else:
            rm, rv, training, momentum, nbt = _bn_state(bn)
            rm2, rv2, _, _, _ = _bn_state(shortcut_bn)
            out = functional.dual_batch_norm_add_relu(
                y, shortcut, rm, rv, bn.weight, bn.bias, rm2, rv2, shortcut_bn.weight,
                shortcut_bn.bias, training, momentum, bn.eps, num_batches_tracked=nbt,
                backend=backend, process_group=process_group_of(bn))
            _last.backend = functional.last_backend()
            return out
    if residual is not None and not relu:
        raise ValueError("a residual is only fused with relu=True")
    ok = _runtime_ok(bn, y)
    if residual is not None:
        ok = ok and isinstance(residual, Tensor) and residual.shape == y.shape \
            and residual.dtype == y.dtype and residual.device == y.device
    if not ok:  # torch's own composition, type promotion and broadcasting included
        _last.backend = "torch"
        out = _torch_bn(bn, y)
        if residual is not None:
            out = out + residual
        return torch.relu(out) if relu else out
    rm, rv, training, momentum, nbt = _bn_state(bn)
    out = functional.batch_norm(y, rm, rv, bn.weight, bn.bias, training, momentum, bn.eps,
                                relu=relu, residual=residual, num_batches_tracked=nbt,
                                backend=backend, process_group=process_group_of(bn))
    _last.backend = functional.last_backend()
    return out


# Per-site plans and the conv paths they name live in fusedres.conv_paths (re-exported).
SitePlan, site_plan, conv_choice = conv_paths.SitePlan, conv_paths.site_plan, conv_paths.conv_choice
_DEFAULT_PLAN = conv_paths.DEFAULT_PLAN


# Eval-mode folding: bn(conv(x)) == conv(x, w*scale, (b - mean)*scale + beta) with constant
# scale = gamma/sqrt(running_var + eps). The folded weights are a cache keyed on the
# identity, version counter and storage address of every tensor they come from (so an
# optimizer step, a load_state_dict, .to() or ``param.data = new`` rebuilds them), held in
# a weak dictionary: nothing is added to the modules. Never rebuilt during CUDA-graph
# capture or under torch.compile.
_FOLDED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
fold_eval = True  # set False to keep conv and BN separate in eval mode too
# A site whose next conv feeds the BN of the following site folds that BN into the conv
# and marks the output tensor with it: the following site then skips its BN.
_NORMALISED_BY = "_fusedres_normalised_by"
_RELU_APPLIED = "_fusedres_relu_applied"  # ... and its ReLU (a BN-ReLU site's)
# A conv path whose prologue conv also computed its output's batch statistics (cuDNN's F1
# graph) marks the output with (mean, var): the next BN-ReLU -> conv site uses them.
_STATS_OF = "_fusedres_batch_stats"


def _carried_stats(y):
    """``(mean, var)`` of ``y`` computed by the conv that produced it, or None -- also
    when ``y`` was changed in place since (its version counter moved): stale statistics
    would be a wrong answer."""
    if torch.compiler.is_compiling():
        return None
    version, stats = getattr(y, _STATS_OF, (None, None))
    return stats if version == y._version else None


def _fold_sources(conv, bn):
    return (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)


def _fold_key(conv, bn):
    # ``param.data = new`` keeps the Parameter (its id) and its version counter: the
    # storage address tells the new data apart. The cache entry holds weak references to
    # the sources' storages, used only while they all live (``folded_weights``): a live
    # storage's address is no other tensor's, and a replaced storage is not kept alive
    return tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) if t is not None
                 else None for t in _fold_sources(conv, bn)) + (bn.eps, id(bn))


def _can_fold(conv, bn, x) -> bool:
    return (fold_eval and not bn.training and bn.running_mean is not None
            and bn.running_var is not None
            and (not torch.is_grad_enabled() or torch.jit.is_tracing())
            and isinstance(x, Tensor) and x.dim() == 4 and x.dtype in _FLOATS
            and not torch.compiler.is_compiling()
            and conv.weight.dtype in _FLOATS and conv.weight.device == x.device
            and bn.running_mean.device == x.device and site_plan(bn).fold)


def folded_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    """``(w', b')`` with ``conv(x, w', b') == bn(conv(x))`` in eval mode (cached), or None
    when the cache is stale and cannot be rebuilt now (CUDA-graph capture)."""
    # jit.trace records the fold itself, differentiable, whatever the grad mode (its check
    # run is under no_grad): the same graph on every run, which follows later parameter
    # changes; a cached tensor would be recorded as a constant.
    tracing = torch.jit.is_tracing()
    key = _fold_key(conv, bn)
    hit = None if tracing else _FOLDED.get(conv)
    if hit is not None and hit[0] == key and not any(r.expired() for r in hit[4]):
        return hit[1], hit[2]
    if _capturing(conv.weight.device):
        return None
    with contextlib.nullcontext() if tracing else torch.no_grad():
        acc = torch.float64 if conv.weight.dtype == torch.float64 else torch.float32
        scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(acc)
        shift = -bn.running_mean.to(acc) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(acc)
        if conv.bias is not None:
            shift = shift + conv.bias.to(acc) * scale
        w = (conv.weight.to(acc) * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype)
        b = shift.to(conv.weight.dtype)
    if not tracing:  # {}: w packed for oneDNN per input shape; then weak references to
        # the sources' storages (the key's addresses are theirs while none has expired)
        _FOLDED[conv] = (key, w, b, {}, tuple(StorageWeakRef(t.untyped_storage())
                                              for t in _fold_sources(conv, bn) if t is not None))
    return w, b


def _onednn_ok(conv, x, other) -> bool:
    """May ``conv(x) [+ other] [relu]`` run as one oneDNN convolution with the add and
    ReLU as post-ops (``torch.ops.mkldnn._convolution_pointwise``, what torch.compile's
    CPU freezing path emits)? fp32 CPU inference only: the op has no autograd and a trace
    should stay plain aten."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and conv.weight.dtype == torch.float32 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and not torch.is_grad_enabled()
            and not torch.jit.is_tracing()
            and (other is None or (other.dtype == torch.float32 and other.device == x.device
                                   and tuple(other.shape) == _conv_out_shape(conv, x))))


_conv_out_shape = conv_paths.conv_out_shape


def _eval_conv(conv, x, w, b, relu=False, other=None, packs=None, path=None):
    """``[relu](conv(x, w, b) [+ other])`` for eval with folded weights ``w``, ``b``: the
    site's conv ``path`` in one call where its ``eval_problem`` allows (``cudnn-eval``:
    one cuDNN call on CUDA); else one oneDNN call with post-ops where ``_onednn_ok``, else
    the conv and in-place ops on its fresh output (one pass for add+ReLU where autograd
    is off)."""
    if path is not None and path.eval_kernel \
            and path.eval_problem(conv, x, relu, other, w, b) is None:
        out = path.eval_conv(conv, x, w, b, relu, other)
        if out is not None:  # None: it raised, remembered; today's path below
            _last.backend = path.eval_name
            return out
    if _onednn_ok(conv, x, other):
        geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        args = (_packed_weight(packs, w, geometry, x), b, *geometry)
        if other is None:
            return torch.ops.mkldnn._convolution_pointwise(x, *args, "relu" if relu else "none",
                                                           [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, *args, "add", 1.0, "relu" if relu else None, [], "")
    return _add_act(conv._conv_forward(x, w, b), other, relu)


def _packed_weight(packs, w, geometry, x):
    """``w`` reordered once into oneDNN's blocked layout for ``x``'s shape, as
    torch.compile's CPU freezing path does: a plain weight is reordered on every call,
    which costs as much as the conv itself in ResNet-50's last stage (2048x512 1x1 at 4x4:
    4.3 ms vs 2.6 ms packed, batch 16, 2 threads). ``packs``: the fold cache entry's dict
    (None: no cache, no packing)."""
    if packs is None:
        return w
    key = (tuple(x.shape), *map(tuple, geometry[:3]), geometry[3])
    packed = packs.get(key)
    if packed is None:
        if len(packs) >= 4:  # a few input shapes per weight, not one per batch size
            packs.clear()
        packed = packs[key] = torch.ops.mkldnn._reorder_convolution_weight(
            w, *geometry, list(x.shape))
    return packed


def _add_act(y, other, relu):
    """``[relu](y [+ other])`` in place on ``y``, a fresh tensor only this site reads."""
    if other is not None:
        if relu and not torch.is_grad_enabled() and not torch.jit.is_tracing() \
                and y.device.type == "cpu" and other.shape == y.shape \
                and other.dtype == y.dtype:  # (a trace: one graph whatever the grad mode)
            return torch.ops.aten._add_relu_(y, other)  # one pass (no autograd formula)
        y = y.add_(other)
    return y.relu_() if relu else y


def _folded_conv(conv, bn, x, relu=False, other=None, path=None):
    """``[relu](bn(conv(x)) [+ other])`` as one conv with folded weights (``path``: the
    site's conv path, see ``_eval_conv``), or None when the site does not fold."""
    if not _can_fold(conv, bn, x):
        return None
    wb = folded_weights(conv, bn)
    if wb is None:
        return None
    _last.backend = "folded"
    entry = _FOLDED.get(conv)
    packs = entry[3] if entry is not None and entry[1] is wb[0] else None
    return _eval_conv(conv, x, wb[0], wb[1], relu, other, packs, path)


def _normalised(x, bn) -> bool:
    """Did the previous site already apply ``bn`` to ``x`` (folded into its conv)?"""
    return not torch.compiler.is_compiling() and getattr(x, _NORMALISED_BY, None) is bn


def _eval_site(x, conv, bn, relu, residual, shortcut_x, shortcut_conv, shortcut_bn,
               backend, path=None):
    """``[relu](bn(conv(x)) [+ residual | + shortcut_bn(shortcut_conv(shortcut_x))])`` in
    eval without autograd, with ``bn`` folded into ``conv`` (or already into the previous
    site's conv, which marked ``x``); None when it does not fold. The add and ReLU ride on
    the last conv to run (oneDNN post-ops on CPU) or run in place on a fresh conv output."""
    if conv is None:
        if not _normalised(x, bn):
            return None
        if getattr(x, _RELU_APPLIED, False):  # relu(bn(y)) entirely in the previous conv
            if not relu or residual is not None or shortcut_bn is not None:
                raise RuntimeError("fusedres: next_relu=True was passed for a site that is "
                                   "not a BN-ReLU (relu(bn(y)), no residual)")
            return x
        y = x  # the previous site's conv output, read by this site alone
    elif not _can_fold(conv, bn, x):
        return None
    else:
        y = None  # computed below, with the add and ReLU when it runs last
    if shortcut_bn is not None:
        if shortcut_conv is not None and y is None:
            s = _folded_conv(shortcut_conv, shortcut_bn, shortcut_x)
            residual = s if s is not None else bn_act(
                shortcut_bn, conv2d(shortcut_conv, shortcut_x), backend=backend)
        elif shortcut_conv is not None:  # y known: the shortcut conv runs last
            out = _folded_conv(shortcut_conv, shortcut_bn, shortcut_x, relu, other=y,
                               path=path)
            if out is not None:
                return out
            residual = bn_act(shortcut_bn, conv2d(shortcut_conv, shortcut_x), backend=backend)
        else:
            residual = bn_act(shortcut_bn, shortcut_x, backend=backend)
    if y is None:
        return _folded_conv(conv, bn, x, relu, other=residual, path=path)
    return _add_act(y, residual, relu)


def _conv_then_bn(conv, next_bn, h, next_relu=False, path=None):
    """``conv(h)``, with ``next_bn`` (the next site's BN) folded in when it can be, and
    the next site's ReLU too when ``next_relu`` (that site is a BN-ReLU: relu(bn(y)))."""
    y = _folded_conv(conv, next_bn, h, relu=next_relu, path=path) \
        if next_bn is not None else None
    if y is None:
        return conv2d(conv, h)
    setattr(y, _NORMALISED_BY, next_bn)
    if next_relu:
        setattr(y, _RELU_APPLIED, True)
    return y


# BN-ReLU -> conv sites. On the Triton conv path the BN-ReLU is applied while the conv
# loads its input (``relu(y*scale + shift)``, padded taps 0 after it) and never stored:
# scale/shift are differentiable torch functions of the batch statistics (from the previous
# conv's statistics epilogue, else torch.var_mean) or of the running ones, so autograd
# carries the whole BN backward, -dbeta/M and -xhat*dgamma/M terms included (DESIGN.md 2).
conv_prologue = True  # set False to run the BN-ReLU of every such site before its conv


def prologue_conv_problem(conv: nn.Conv2d, backend: str = "auto",
                          input: Optional[Tensor] = None) -> Optional[str]:
    """None when ``conv``'s path (``fusedres.conv_paths``) can apply a BN-ReLU in its
    prologue (the Triton implicit-GEMM conv, cuDNN's F1 graph); else why not.

    ``backend``: the conv path or backend (``conv_choice``): a registered conv path
    (``"triton"``, ``"cudnn-graph"``) may fuse; ``"auto"`` keeps F.conv2d (the untuned
    default). ``input``: the tensor the conv will
    read (under autocast it must already be in the autocast dtype). Without it the answer
    comes from the module alone, with an input of its weight's device and dtype (what
    ``explain`` shows).
    """
    if not conv_prologue:
        return "fusedres.nn.conv_prologue is False"
    path = conv_paths.path_named(backend)
    if path is None:
        return conv_choice(_DEFAULT_PLAN, backend)[1]
    return path.prologue_problem(conv, input)


def prologue_problem(bn: nn.BatchNorm2d, conv: nn.Conv2d, y: Tensor,
                     backend: str = "auto") -> Optional[str]:
    """None when ``bn_relu_conv2d(bn, conv, y, conv_backend=backend)`` runs the BN-ReLU in
    the conv's prologue; else why it runs the fused BN-ReLU, then the conv."""
    why = None if _timm.is_norm_act(bn) else fusable_bn(bn)  # convert runs its BN part
    if why:
        return why
    if not _runtime_ok(bn, y):
        return "an input or BN parameter the fused functions do not cover"
    if _batch_stats(bn):
        if process_group_of(bn) is not None:
            return "synchronised batch statistics run in the BN kernels"
        if y.numel() <= y.shape[1]:
            return "one value per channel (torch raises)"
    return prologue_conv_problem(conv, backend, y)


def _prologue_conv(bn, conv, y, stats, backend):
    rm, rv, batch, momentum, nbt = _bn_state(bn)
    if batch:
        mean, var = stats if stats is not None else fconv.batch_stats(y)
        ops.update_from_batch(rm, rv, mean, var, y.numel() // y.shape[1], momentum, nbt)
    else:
        acc = acc_dtype(y.dtype)
        mean, var = rm.to(acc), rv.to(acc)
    path = conv_paths.path_named(backend)
    _last.backend = path.prologue_name
    out, out_stats = path.bn_prologue_conv(conv, y, bn, mean, var, batch)
    if out_stats is not None and not torch.compiler.is_compiling():
        setattr(out, _STATS_OF, (out._version, out_stats))  # read by _carried_stats
    return out


def bn_relu_conv2d(bn: nn.BatchNorm2d, conv: nn.Conv2d, y: Tensor, *,
                   stats: Optional[tuple] = None, memory_saving: bool = False,
                   backend: str = "auto", conv_backend: Optional[str] = None) -> Tensor:
    """``conv(relu(bn(y)))``: the one place a BN-ReLU -> conv site runs.

    ``conv_backend`` (default ``backend``): ``"triton"`` lets the conv take the Triton
    path; where ``prologue_problem`` then finds none, one Triton conv applies the BN-ReLU
    while loading ``y`` (``last_backend() == "triton-prologue"``): nothing is stored but
    ``y``. ``stats``: ``(mean, var)`` of ``y`` (differentiable, e.g. ``conv2d_stats``'s
    epilogue), used when the BN normalises with batch statistics. Otherwise the fused
    BN-ReLU (on ``backend``), then ``conv2d``; with ``memory_saving`` its output is
    recomputed in backward, not kept.
    """
    cb = backend if conv_backend is None else conv_backend
    if prologue_problem(bn, conv, y, cb) is None:
        return _prologue_conv(bn, conv, y, stats, cb)
    if memory_saving and torch.is_grad_enabled() and isinstance(y, Tensor) and y.requires_grad:
        return _bn_relu_conv_recomputed(bn, conv, y, backend)
    return conv2d(conv, bn_act(bn, y, relu=True, backend=backend))


def _stats_epilogue_ok(conv, bn, next_conv, x, path) -> bool:
    """Should ``conv`` compute the batch statistics of its output in ``path``'s epilogue,
    for ``bn`` (and ``next_conv``'s BN-ReLU prologue, where there is one)? (Checked before
    ``y`` exists: from the modules.)"""
    return (_batch_stats(bn) and isinstance(x, Tensor)
            and path.stats_problem(conv, x) is None
            and (next_conv is None or prologue_conv_problem(next_conv, path.name) is None))


def _bn_relu_conv_recomputed(bn, conv, y, backend):
    """``conv(relu(bn(y)))`` under ``torch.utils.checkpoint``: only ``y`` is kept; the
    recomputation in backward uses batch statistics without touching the running ones."""
    from torch.utils.checkpoint import checkpoint

    state = {"first": True}

    def fn(t):
        if state["first"] or not (bn.training and bn.track_running_stats):
            state["first"] = False
            z = bn_act(bn, t, relu=True, backend=backend)
        else:
            # Recomputation: the same batch statistics, the running ones untouched. Throw-away
            # copies of the running stats keep the call identical to the first (torch's BN
            # saves a different set of tensors without them, which checkpoint rejects).
            rm, rv = bn.running_mean.clone(), bn.running_var.clone()
            if _runtime_ok(bn, t):
                z = functional.batch_norm_relu(t, rm, rv, bn.weight, bn.bias, True, 0.0,
                                               bn.eps, backend=backend)
            else:
                z = torch.relu(F.batch_norm(t, rm, rv, bn.weight, bn.bias, True, 0.0, bn.eps))
        return conv2d(conv, z)

    # No randomness inside: no RNG state to keep (5 KB per site on CPU).
    return checkpoint(fn, y, use_reentrant=False, preserve_rng_state=False)


# Plain conv -> BN (-> add) (-> ReLU) sites of a path with ``plain_site_stats`` (cuDNN's
# F0 graph) in training: each conv computes its output's batch statistics in its epilogue
# and the site's BN normalises with them (no statistics pass); the apply and the backward
# are the BN kernels' (``cudnn_graph.bn_act_with_stats``). A conv the path refuses runs
# F.conv2d, its BN computing its statistics as today.


def _conv_with_stats(path, conv, bn, x, next_conv=None):
    """``(conv(x), (mean, var) or None)``: the statistics from ``path``'s epilogue where
    ``_stats_epilogue_ok``; without a conv, ``x``'s carried ones (an F1 conv's output)."""
    if conv is None:
        return x, _carried_stats(x)
    if _stats_epilogue_ok(conv, bn, next_conv, x, path):
        y, mean, var = path.conv_stats(conv, x)
        return y, (mean, var)
    return conv2d(conv, x), None


def _given_stats_backend(bn, y, residual, shortcut_bn, s, backend) -> Optional[str]:
    """The BN primitives' backend that normalises this site with given statistics, or
    None when the site must run ``bn_act`` (what it does not cover: torch's fallbacks,
    a synchronised shortcut BN, forward AD/functorch, an empty or one-value batch)."""
    if shortcut_bn is not None:
        if not _dual_ok(bn, y, shortcut_bn, s) or process_group_of(shortcut_bn) is not None:
            return None
    elif not _runtime_ok(bn, y):
        return None
    if residual is not None and not (isinstance(residual, Tensor) and residual.shape == y.shape
                                     and residual.dtype == y.dtype
                                     and residual.device == y.device):
        return None
    if y.numel() <= y.shape[1] or functional._differentiating_transform():
        return None
    name = resolve_backend(y.device, backend)
    return name if name in ops.PRIMITIVE_BACKENDS else "reference_primitives"


def _plain_site_with_stats(x, conv, bn, relu, residual, shortcut_x, shortcut_conv,
                           shortcut_bn, backend, path):
    y, stats = _conv_with_stats(path, conv, bn, x)
    s = s_stats = None
    if shortcut_bn is not None:
        s, s_stats = _conv_with_stats(path, shortcut_conv, shortcut_bn, shortcut_x)
    prims = None
    # the tail graph (cudnn-graph-tail) where it runs, then also without given statistics
    tail = path.tail_graph and relu and (residual is not None or shortcut_bn is not None) \
        and cudnn_graph.tail_planned(y, residual, s, relu)
    if stats is not None or s_stats is not None or tail:
        prims = _given_stats_backend(bn, y, residual, shortcut_bn, s, backend)
    if prims is None:  # today's BN (its own statistics pass)
        return bn_act(bn, y, relu=relu, residual=residual, shortcut_bn=shortcut_bn,
                      shortcut=s, backend=backend)
    rm, rv, _, momentum, nbt = _bn_state(bn)
    count = y.numel() // y.shape[1]
    out, stats, s_stats = cudnn_graph.bn_act_with_stats(
        y, bn.weight, bn.bias, stats, relu=relu, residual=residual, shortcut=s,
        shortcut_weight=None if s is None else shortcut_bn.weight,
        shortcut_bias=None if s is None else shortcut_bn.bias, shortcut_stats=s_stats,
        eps=bn.eps, backend=prims, tail_graph=tail)
    ops.update_from_batch(rm, rv, *stats, count, momentum, nbt)
    if s is not None:
        rm2, rv2, _, momentum2, nbt2 = _bn_state(shortcut_bn)
        ops.update_from_batch(rm2, rv2, *s_stats, count, momentum2, nbt2)
    ran_tail = tail and not torch.compiler.is_compiling() and cudnn_graph.tail_ran()
    _last.backend = path.tail_name if ran_tail else path.stats_name
    return out


def _torch_site(x, conv, bn, relu, residual, shortcut_x, shortcut_conv, shortcut_bn,
                next_conv, next_bn, next_relu):
    """A site as the original modules compute it (``SitePlan(backend="torch")``)."""
    y = conv2d(conv, x) if conv is not None else x
    if not _normalised(y, bn):
        y = _torch_bn(bn, y)
    if shortcut_bn is not None:
        s = conv2d(shortcut_conv, shortcut_x) if shortcut_conv is not None else shortcut_x
        residual = _torch_bn(shortcut_bn, s)
    if residual is not None:
        y = y + residual
    if relu:
        y = torch.relu(y)
    return _conv_then_bn(next_conv, next_bn, y, next_relu) if next_conv is not None else y


def conv_bn_act(x: Tensor, conv: Optional[nn.Conv2d], bn: nn.BatchNorm2d, *,
                relu: bool = False, residual: Optional[Tensor] = None,
                shortcut_x: Optional[Tensor] = None,
                shortcut_conv: Optional[nn.Conv2d] = None,
                shortcut_bn: Optional[nn.BatchNorm2d] = None,
                next_conv: Optional[nn.Conv2d] = None,
                next_bn: Optional[nn.BatchNorm2d] = None, next_relu: bool = False,
                memory_saving: bool = False, backend: str = "auto") -> Tensor:
    """One fused site: ``[relu](bn(conv(x)) [+ residual | + shortcut_bn(shortcut_conv(s))])``.

    ``conv``/``shortcut_conv`` may be None (the BN reads ``x``/``shortcut_x`` directly).
    The convolutions go through ``conv2d``. In eval mode without autograd
    (``torch.no_grad()``/``inference_mode``) a conv followed by a BN that uses running
    statistics runs as one conv with folded weights (``fold_eval``). ``bn``'s
    ``SitePlan`` (``site_plan``) may change the backend, the conv path and folding.

    ``next_conv``: the site is ``next_conv(relu(bn(conv(x))))`` (a BN-ReLU whose only
    consumer is that conv), run by ``bn_relu_conv2d`` (the BN-ReLU in ``next_conv``'s
    prologue on the Triton path, with the batch statistics from ``conv``'s epilogue);
    ``memory_saving`` applies where it runs the BN-ReLU on its own. In eval mode without
    autograd, ``conv`` and ``bn`` fold as above, the ReLU runs before ``next_conv``, and
    ``next_bn`` (the BN that alone reads ``next_conv``'s output, in the next site) folds
    into ``next_conv``: that site then skips it, and its ReLU too when ``next_relu``
    (set by convert when that site is a BN-ReLU).
    """
    if isinstance(x, torch.fx.Proxy):  # torch.fx tracing a converted model: one leaf call
        return x.tracer.create_proxy("call_function", conv_bn_act, (x, conv, bn), dict(
            relu=relu, residual=residual, shortcut_x=shortcut_x, shortcut_conv=shortcut_conv,
            shortcut_bn=shortcut_bn, next_conv=next_conv, next_bn=next_bn,
            next_relu=next_relu, memory_saving=memory_saving, backend=backend))
    plan = site_plan(bn)
    backend = plan.backend or backend
    check_site_backend(backend, x.device, bn)  # one clear line if it can never run here
    if next_conv is not None and (residual is not None or shortcut_bn is not None or not relu):
        raise ValueError("next_conv is only for a BN-ReLU site")
    if shortcut_bn is not None and shortcut_conv is None and _normalised(shortcut_x, shortcut_bn):
        residual, shortcut_bn = shortcut_x, None  # folded into the previous site's conv
    if backend == "torch":
        return _torch_site(x, conv, bn, relu, residual, shortcut_x, shortcut_conv,
                           shortcut_bn, next_conv, next_bn, next_relu)
    path = conv_paths.path_named(conv_choice(plan, backend)[0])
    y = _eval_site(x, conv, bn, relu, residual, shortcut_x, shortcut_conv, shortcut_bn, backend,
                   path)
    if y is not None:  # eval, folded: conv + bias (+ shortcut) (+ relu) (+ next conv)
        return _conv_then_bn(next_conv, next_bn, y, next_relu, path) \
            if next_conv is not None else y
    if next_conv is not None:
        y, stats = _conv_with_stats(path, conv, bn, x, next_conv)
        return bn_relu_conv2d(bn, next_conv, y, stats=stats, memory_saving=memory_saving,
                              backend=backend, conv_backend=path.name)
    if path.plain_site_stats and _batch_stats(bn) and process_group_of(bn) is None:
        return _plain_site_with_stats(x, conv, bn, relu, residual, shortcut_x, shortcut_conv,
                                      shortcut_bn, backend, path)
    y = conv2d(conv, x) if conv is not None else x
    s = None
    if shortcut_bn is not None:
        s = conv2d(shortcut_conv, shortcut_x) if shortcut_conv is not None else shortcut_x
    return bn_act(bn, y, relu=relu, residual=residual, shortcut_bn=shortcut_bn, shortcut=s,
                  backend=backend)


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


def _share(cls, module: nn.Module, **attrs):
    """A ``cls`` instance sharing ``module``'s parameters, buffers and children."""
    new = cls.__new__(cls)
    state = {}
    for k, v in module.__dict__.items():
        state[k] = v.copy() if isinstance(v, (dict, set)) else v
    new.__dict__.update(state)
    for k, v in attrs.items():
        setattr(new, k, v)
    return new


def _declare_last_backend(cls):
    """``last_backend: Optional[str]`` as a type TorchScript reads (one attribute type
    whether a forward ran yet or not: torch.jit.trace's check re-traces after one). It
    reads the first class annotations up the MRO, and a class-body annotation is a string
    here (``from __future__ import annotations``): set them, inherited ones kept."""
    inherited = next((vars(c)["__annotations__"] for c in cls.__mro__[1:]
                      if vars(c).get("__annotations__")), {})
    cls.__annotations__ = {**inherited, "last_backend": Optional[str]}
    return cls


@_declare_last_backend
class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` through ``fusedres.functional`` (a drop-in replacement).

    Same constructor (plus keyword-only ``backend="auto"`` and ``process_group=None``:
    a ``torch.distributed`` group to normalise over the global batch in training, as
    ``nn.SyncBatchNorm``, CPU included), defaults, state_dict and semantics as
    ``nn.BatchNorm2d``; see the module docstring for what is covered (torch.fx: a leaf;
    TorchScript: torch's own BN math).
    """

    _relu = False
    __constants__ = nn.BatchNorm2d.__constants__ + ["_relu"]  # TorchScript reads _relu

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None, *, backend: str = "auto", process_group=None, **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **kwargs)
        self.backend = backend
        self.last_backend: Optional[str] = None
        if process_group is not None:  # synchronised statistics (fusedres.distributed)
            self.fusedres_process_group = process_group

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, *, backend: str = "auto"):
        """A fused module using ``bn``'s parameters and buffers (the same tensors)."""
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"expected an nn.BatchNorm2d, got {type(bn).__name__}")
        return _share(cls, bn, backend=backend, last_backend=None)

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm2d, *, backend: str = "auto"):
        return cls.from_bn(bn, backend=backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.backend == "auto" else f"{s}, backend={self.backend!r}"

    def _record(self) -> None:
        if not torch.compiler.is_compiling():
            self.last_backend = last_backend()

    def _torch_forward(self, input: Tensor) -> Tensor:
        """``nn.BatchNorm2d.forward``'s math (TorchScript's path; torch.jit.script cannot
        compile the fused one)."""
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_running = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if use_running else None,
                            self.running_var if use_running else None, self.weight, self.bias,
                            self.training or (self.running_mean is None
                                              and self.running_var is None),
                            factor, self.eps)

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            out = self._torch_forward(input)
            return torch.relu(out) if self._relu else out
        return self._fused_forward(input)

    @torch.jit.unused
    def _fused_forward(self, input: Tensor, residual: Optional[Tensor] = None,
                       shortcut: Optional[Tensor] = None) -> Tensor:
        """Every fused BN module's forward (the second activation, if any, by keyword)."""
        traced = fx_leaf_call(self, *(t for t in (input, residual, shortcut) if t is not None))
        if traced is not None:
            return traced
        self._check_input_dim(input)
        out = bn_act(self, input, relu=self._relu, residual=residual,
                     shortcut_bn=None if shortcut is None else self.shortcut_bn,
                     shortcut=shortcut, backend=self.backend)
        self._record()
        return out


class BatchNormReLU2d(BatchNorm2d):
    """``relu(bn(x))`` fused: statistics in one pass, normalise+ReLU in one pass."""

    _relu = True

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm2d, relu: Optional[nn.Module] = None, *,
                     backend: str = "auto"):
        if relu is not None and not isinstance(relu, nn.ReLU):
            raise TypeError(f"expected an nn.ReLU, got {type(relu).__name__}")
        return cls.from_bn(bn, backend=backend)


class BatchNormAddReLU2d(BatchNormReLU2d):
    """``relu(bn(x) + residual)``: the identity-shortcut block tail. ``forward(x, residual)``;
    ``from_modules(bn, relu)`` as ``BatchNormReLU2d``'s."""

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:  # type: ignore[override]
        if torch.jit.is_scripting():
            return torch.relu(self._torch_forward(input) + residual)
        return self._fused_forward(input, residual=residual)


class DualBatchNormAddReLU2d(BatchNorm2d):
    """``relu(bn(x) + shortcut_bn(s))``: the projection-shortcut tail, both BNs in one
    kernel. ``forward(x, s)``. The shortcut BN is the child ``shortcut_bn`` (state_dict keys
    ``shortcut_bn.*``). Both BNs must share ``momentum`` (a float) and ``eps`` to run in one
    kernel; otherwise the shortcut BN runs on its own first.
    """

    _relu = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None, *, backend: str = "auto", **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, backend=backend, **kwargs)
        self.shortcut_bn = nn.BatchNorm2d(num_features, eps, momentum, affine,
                                          track_running_stats, device=device, dtype=dtype,
                                          **kwargs)

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm2d, shortcut_bn: nn.BatchNorm2d,
                     relu: Optional[nn.Module] = None, *, backend: str = "auto"):
        if not isinstance(shortcut_bn, nn.BatchNorm2d):
            raise TypeError(f"expected an nn.BatchNorm2d, got {type(shortcut_bn).__name__}")
        new = cls.from_bn(bn, backend=backend)
        new.shortcut_bn = shortcut_bn
        return new

    def forward(self, input: Tensor, shortcut: Tensor) -> Tensor:  # type: ignore[override]
        if torch.jit.is_scripting():
            return torch.relu(self._torch_forward(input) + self.shortcut_bn(shortcut))
        return self._fused_forward(input, shortcut=shortcut)


@_declare_last_backend
class ConvBatchNormReLU2d(nn.Module):
    """``relu(bn(conv(x)))`` (``relu=False``: ``bn(conv(x))``) with children ``conv``
    (``nn.Conv2d``) and ``bn`` (``nn.BatchNorm2d``); state_dict keys ``conv.*``, ``bn.*``.

    The constructor takes ``nn.Conv2d``'s arguments, then ``eps``, ``momentum``,
    ``track_running_stats``, ``relu`` and ``backend`` keywords; ``from_modules(conv, bn,
    relu=True)`` wraps existing modules (the same tensors). ``relu`` defaults to True in
    both (the module's name); ``relu=False`` (or None) gives ``bn(conv(x))``, and an
    ``nn.ReLU`` instance counts as True.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros",
                 device=None, dtype=None, *, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, relu: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              dilation, groups, bias, padding_mode, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats,
                                 device=device, dtype=dtype)
        self.relu = relu
        self.backend = backend
        self.last_backend: Optional[str] = None

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                     relu: Optional[nn.Module] | bool = True, *, backend: str = "auto"):
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise TypeError("expected an nn.Conv2d and an nn.BatchNorm2d")
        if relu is not None and not isinstance(relu, (bool, nn.ReLU)):
            raise TypeError(f"relu must be an nn.ReLU, a bool or None, got {type(relu).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.conv, new.bn = conv, bn
        new.relu = bool(relu) if isinstance(relu, bool) else relu is not None
        new.backend, new.last_backend = backend, None
        return new

    def extra_repr(self) -> str:
        s = f"relu={self.relu}"
        return s if self.backend == "auto" else f"{s}, backend={self.backend!r}"

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        self.bn.reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # torch's own modules' math (see BatchNorm2d)
            out = self.bn(self.conv(input))
            return torch.relu(out) if self.relu else out
        return self._fused_forward(input)

    @torch.jit.unused
    def _fused_forward(self, input: Tensor) -> Tensor:
        traced = fx_leaf_call(self, input)
        if traced is not None:
            return traced
        out = conv_bn_act(input, self.conv, self.bn, relu=self.relu, backend=self.backend)
        if not torch.compiler.is_compiling():
            self.last_backend = last_backend()
        return out

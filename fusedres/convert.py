"""One-call model conversion: ``fusedres.convert(model)`` and ``fusedres.explain(model)``.

How it works. Every *block* (a module with children, other than a plain
``nn.Sequential``) is traced on its own with ``torch.fx``: its children are leaves,
except plain ``nn.Sequential`` containers, which are traced through (so ``downsample.0``,
``downsample.1`` appear in the block's graph). In that graph every ``nn.BatchNorm2d`` call
is matched, largest pattern first:

    tail     bn(conv(x)) + r -> relu           r: any tensor (identity, option-A padding, ...)
    dual     bn(conv(x)) + bn_d(conv_d(s)) -> relu    (projection shortcut, both BNs fused)
    bn_relu  bn(conv(x)) -> relu [-> conv2]     (conv optional: pre-activation, DenseNet)
    conv_bn  bn(conv(x))

(the conv only when its output has no other user; conv2 when it is the ReLU output's only
user: a BN-ReLU -> conv site, run by ``fusedres.nn.bn_relu_conv2d``, which applies the
BN-ReLU in conv2's prologue on the Triton conv path; ReLU as ``nn.ReLU`` — one shared module
called at several sites too —, ``F.relu``, ``torch.relu``, ``.relu()``, in-place or not;
add as ``+``, ``+=``, ``torch.add``, ``.add``). Each match becomes one call of
``fusedres.nn.conv_bn_act`` with the block's own conv/BN modules, read through
``self.<path>`` at call time. The rewritten forward is installed on the block instance
(an attribute ``forward``; the class is unchanged): no submodule, parameter or buffer is
added, moved or renamed, so the state_dict is identical and checkpoints load both ways,
methods like ``forward_features`` stay, and ``torch.save`` of the whole model works (the
generated source is pickled and recompiled on load). A block whose forward differs between
train and eval at trace time gets one generated forward per mode.

What is not matched, or cannot be traced, stays as it was and keeps working;
``explain(model)`` lists every fused site, and every BN left unfused with the reason. At
run time ``fusedres.nn.bn_act`` sends what the fused functions do not cover (dtype, device,
shape mismatches) to torch itself.
"""
from __future__ import annotations

import collections
import copy
import operator
import re
import textwrap
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import _timm
from . import cudnn_graph
from . import nn as fnn
from ._fx import FusedForward, picklable_globals, refuse_script
from ._backend import BACKENDS, PLUMBING_BACKEND, resolve_backend

__all__ = ["convert", "explain", "Explanation", "FusedForward"]

# the functions a converted block's generated forward calls; never compiled by TorchScript
for _fn in (fnn.conv_bn_act, _timm.batch_norm):
    refuse_script(_fn)

_RELU_FUNCS = {torch.relu, torch.relu_, F.relu, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_INPLACE_FUNCS = {operator.iadd, torch.relu_, F.relu_}

# --------------------------------------------------------------------------------------
# Tracing one block
# --------------------------------------------------------------------------------------


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _inlinable(m: nn.Module) -> bool:
    """Plain ``nn.Sequential`` containers and ``nn.Identity`` are traced through."""
    if _has_hooks(m):
        return False
    if type(m) is nn.Identity:
        return True
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


class _BlockTracer(fx.Tracer):
    """Children are leaves; plain ``nn.Sequential`` containers are traced through.
    Buffers are proxies too: an in-place update in a forward is recorded, not run."""

    proxy_buffer_attributes = True

    def __init__(self):
        super().__init__()
        self.inlined: set[str] = set()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return not _inlinable(m)

    def call_module(self, m, forward, args, kwargs):
        act = _timm.parts(m)
        if act is not None and len(args) == 1 and not kwargs:
            # timm's BatchNormAct2d: its BN part, then its ReLU child (see fusedres._timm)
            path = self.path_of_module(m)
            out = self.create_proxy("call_module", path, args, {})
            out.node.meta[_timm.NORM_ONLY] = True
            if act == "relu":
                out = self.create_proxy("call_module", f"{path}.act", (out,), {})
            return out
        if not self.is_leaf_module(m, ""):
            self.inlined.add(self.path_of_module(m))
        return super().call_module(m, forward, args, kwargs)


def _tracing_copy(block: nn.Module) -> nn.Module:
    """A copy of ``block`` whose parameters and buffers are meta tensors. Tracing runs the
    block's Python forward; whatever it does (a buffer updated in place, a counter, a
    mode flag), it does to the copy, never to the model's own state."""
    memo: dict = {}
    for m in block.modules():
        for p in m._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for b in m._buffers.values():
            if b is not None and id(b) not in memo:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(block, memo)


def _trace(block: nn.Module, training: bool):
    """``block``'s forward as an fx graph (traced on a meta copy in ``training`` mode),
    with the paths of the containers traced through and the tensor constants the trace
    created (the copy's, by target: a forward that builds a tensor from no input)."""
    twin = _tracing_copy(block)
    for m in twin.modules():
        m.training = training  # not .train(): a module may override it
    tracer = _BlockTracer()
    graph = tracer.trace(twin)
    constants = {}
    for n in graph.nodes:
        if n.op == "get_attr":
            try:
                _resolve(block, n.target)
            except AttributeError:
                constants[n.target] = _resolve(twin, n.target)
    return graph, tracer.inlined, constants


def _resolve(module: nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner), name)


# --------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------


def _module(block: nn.Module, node: fx.Node) -> Optional[nn.Module]:
    if node.op != "call_module":
        return None
    return block.get_submodule(node.target)


def _single_arg(node: fx.Node) -> bool:
    return len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node)


def _bn_problem(block, node, training: bool) -> Optional[str]:
    """None if ``node`` is a BatchNorm2d call the fused functions can replace (in a graph
    traced in ``training`` mode)."""
    m = _module(block, node)
    if node.meta.get(_timm.NORM_ONLY):
        why = None  # the BN part of a timm BatchNormAct2d (its act is a node of its own)
    elif _timm.is_norm_act(m):
        why = _timm.problem(m, training)
    else:
        why = fnn.fusable_bn(m)
    if why:
        return why
    if _has_hooks(m):
        return "the BN module has hooks"
    if not _single_arg(node):
        return "the BN is called with extra arguments"
    return None


def _is_any_bn(block, node) -> bool:
    m = _module(block, node)
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def _is_conv(block, node) -> bool:
    m = _module(block, node)
    return (isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward
            and not _has_hooks(m) and _single_arg(node))


def _relu_input(block, node) -> Optional[fx.Node]:
    """The tensor a ReLU node reads, or None if ``node`` is not a plain ReLU."""
    if node.op == "call_module":
        m = _module(block, node)
        if type(m) is nn.ReLU and not _has_hooks(m) and _single_arg(node):
            return node.args[0]
    elif node.op == "call_function" and node.target in _RELU_FUNCS:
        if len(node.args) == 1 and set(node.kwargs) <= {"inplace"}:
            return node.args[0]
        if len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], bool):
            return node.args[0]  # F.relu(x, True)
    elif node.op == "call_method" and node.target in _RELU_METHODS and _single_arg(node):
        return node.args[0]
    return None


def _add_operands(node) -> Optional[tuple]:
    if node.op == "call_function" and node.target in _ADD_FUNCS:
        pass
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        pass
    else:
        return None
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    return a, b


def _mutates(block, node) -> bool:
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCS or node.kwargs.get("inplace", False) is True
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_module":
        return getattr(_module(block, node), "inplace", False) is True
    return False


def _path(prefix: str, target: str) -> str:
    return f"{prefix}.{target}" if prefix else target


class _Site(dict):
    """One row of ``explain``."""


_VIEW_METHODS = {"view", "reshape", "transpose", "permute", "narrow", "select", "flatten",
                 "unsqueeze", "squeeze", "expand", "as_strided", "t", "contiguous", "view_as",
                 "unflatten", "split", "chunk", "unbind", "movedim", "detach"}


def _base(node):
    """The tensor ``node`` may be a view of (through getitem and view-like methods)."""
    while isinstance(node, fx.Node) and node.args and isinstance(node.args[0], fx.Node) and (
            (node.op == "call_function" and node.target is operator.getitem)
            or (node.op == "call_method" and node.target in _VIEW_METHODS)):
        node = node.args[0]
    return node


def _unfused(prefix, bn_path, reason):
    return _Site(block=prefix, site=bn_path, pattern="-", kernel="-", status="unfused",
                 reason=reason)


def _match(block: nn.Module, graph: fx.Graph, prefix: str, backend: str, rewrite: bool,
           memory_saving: bool = False, training: bool = True):
    """Find (and with ``rewrite``, replace) the fusable sites of one traced block.

    Patterns are matched on the unmodified graph, largest first (tails, then BN-ReLU,
    then conv-BN); the rewrite comes after.
    """
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    bns = [n for n in nodes if _is_any_bn(block, n)]
    problem = {b: _bn_problem(block, b, training) for b in bns}
    ok = {b for b in bns if problem[b] is None and len(b.users) == 1}
    done: set = set()
    notes: dict = {}
    sites = []  # (bn node, site dict)

    def exclusive_conv(b):
        x = b.args[0]
        return x if _is_conv(block, x) and len(x.users) == 1 and x not in done else None

    def inplace_problem(site):
        members = set(site["members"])
        inputs = {_base(n) for n in site["inputs"]}
        lo = min(order[n] for n in members)
        for n in nodes[lo:order[site["terminal"]]]:
            if n not in members and _mutates(block, n) and n.args and \
                    _base(n.args[0]) in inputs:
                return f"in-place op {n.name} writes an input of the pattern"
        return None

    def accept(b, site):
        conv = exclusive_conv(b)
        if conv is not None:
            site["conv"] = conv
            site["members"].append(conv)
        site["inputs"] = [conv.args[0] if conv is not None else b.args[0]]
        if "res" in site:
            site["inputs"].append(site["res"])
        if "bn2" in site:
            conv2 = exclusive_conv(site["bn2"])
            if conv2 is not None:
                site["conv2"] = conv2
                site["members"].append(conv2)
            site["inputs"].append(conv2.args[0] if conv2 is not None else site["bn2"].args[0])
        why = inplace_problem(site)
        if why:
            notes[b] = why
            return False
        done.update(site["members"])
        sites.append((b, site))
        return True

    # 0. a BN-ReLU whose output only feeds one conv claims that conv: bn_relu_conv2d runs
    #    the BN-ReLU in the conv's prologue (Triton path) or before it
    next_conv = {}
    for b in bns:
        if b not in ok:
            continue
        relu = next(iter(b.users))
        if _relu_input(block, relu) is not b or len(relu.users) != 1:
            continue
        c = next(iter(relu.users))
        if _is_conv(block, c) and c.args[0] is relu:
            next_conv[b] = c
            done.add(c)
    # 1. block tails: relu(bn(.) + r), relu(bn(.) + bn_d(.))
    for relu in nodes:
        add = _relu_input(block, relu)
        if add is None or len(add.users) != 1 or add in done:
            continue
        ops = _add_operands(add)
        if ops is None or ops[0] is ops[1]:
            continue
        cands = sorted((n for n in ops if n in ok and n not in done), key=order.get)
        if not cands:
            continue
        b = cands[-1]  # the later BN is the main one
        res = ops[1] if ops[0] is b else ops[0]
        if add.op == "call_method" and add.target == "add_" and ops[0] is not b:
            notes[b] = "an in-place add writes into the shortcut tensor"
            continue
        site = dict(kind="tail", terminal=relu, members=[b, add, relu], res=res)
        if len(cands) == 2:
            mb, ms = _module(block, b), _module(block, res)
            if mb.momentum is None or ms.momentum != mb.momentum or ms.eps != mb.eps \
                    or ms.track_running_stats != mb.track_running_stats:
                notes[b] = ("shortcut BN computed separately: one dual kernel needs the same "
                            "float momentum, eps and track_running_stats")
            else:
                del site["res"]
                site.update(kind="dual", bn2=res)
                site["members"].append(res)
        accept(b, site)
    # 2. bn -> relu
    for b in bns:
        if b in ok and b not in done:
            user = next(iter(b.users))
            if user not in done and _relu_input(block, user) is b:
                site = dict(kind="bn_relu", terminal=user, members=[b, user])
                if b in next_conv:
                    site.update(terminal=next_conv[b], next=next_conv[b])
                    site["members"].append(next_conv[b])
                if not accept(b, site) and b in next_conv:
                    done.discard(next_conv[b])  # free for a conv-BN site after it
    # 3. conv -> bn
    for b in bns:
        if b in ok and b not in done and exclusive_conv(b) is not None:
            accept(b, dict(kind="conv_bn", terminal=b, members=[b]))
    # 4. in eval without autograd, a site's next conv folds with the BN that alone reads
    #    its output when that BN's own site has no conv (the conv is this site's)
    by_bn = {b: (s, "conv", "folded_before") for b, s in sites}
    by_bn.update({s["bn2"]: (s, "conv2", "shortcut_folded_before") for _, s in sites
                  if s["kind"] == "dual"})
    for _, site in sites:
        c = site.get("next")
        b2 = next(iter(c.users)) if c is not None and len(c.users) == 1 else None
        if b2 in by_bn and by_bn[b2][1] not in by_bn[b2][0] and b2.args[0] is c:
            site["next_bn"] = b2
            site["next_relu"] = by_bn[b2][0]["kind"] == "bn_relu"  # relu(bn(y)), no add
            by_bn[b2][0][by_bn[b2][2]] = True
    # 5. what is left
    fused_bns = {b for b, _ in sites}
    rows = []
    for b in bns:
        bn_path = _path(prefix, b.target)
        if b in fused_bns:
            site = next(s for bb, s in sites if bb is b)
            rows.append(_describe(block, prefix, site, bn_path, backend, notes.get(b, ""),
                                  memory_saving))
        elif b in done:
            continue  # the shortcut BN of a dual site
        elif problem[b]:
            rows.append(_unfused(prefix, bn_path, problem[b]))
        elif len(b.users) != 1:
            rows.append(_unfused(prefix, bn_path, f"the BN output is used {len(b.users)} times"))
        else:
            user = next(iter(b.users))
            reason = notes.get(b) or (
                "its output is the residual of a fused tail; no conv before it" if user in done
                else "nothing to fuse: no ReLU or add-ReLU after it and no conv before it")
            rows.append(_unfused(prefix, bn_path, reason))
    if rewrite:
        left_norm_only = [b for b in bns if b.meta.get(_timm.NORM_ONLY) and b not in done]
        replaced: dict = {}
        for _, site in sorted(sites, key=lambda s: order[s[1]["terminal"]]):
            _rewrite(graph, site, backend, replaced, memory_saving)
        for b in left_norm_only:  # a timm BatchNormAct2d's BN part left unfused: BN math
            with graph.inserting_before(b):
                new = graph.call_function(_timm.batch_norm, (graph.get_attr(b.target),
                                                             b.args[0]))
            b.replace_all_uses_with(new)
            graph.erase_node(b)
    return rows


_KERNELS = {"tail": "batch_norm_add_relu", "dual": "dual_batch_norm_add_relu",
            "bn_relu": "batch_norm_relu", "conv_bn": "batch_norm"}  # + "bn_relu_prologue"


def _join(note: str, more: str) -> str:
    return f"{note}; {more}" if note and more else note or more


def _next_conv_path(block, site, backend):
    """``(kernel, conv column, why not in the prologue)`` of a BN-ReLU -> conv site, as
    ``fusedres.nn.bn_relu_conv2d`` will run it in training, judged from the modules (the
    dtype and device of their weights, the site's plan; at run time
    ``fusedres.nn.last_backend()`` says)."""
    bn = _module(block, site["members"][0])
    conv_backend, why = fnn.conv_choice(fnn.site_plan(bn), backend)
    if why is None:
        why = fnn.prologue_conv_problem(_module(block, site["next"]), conv_backend)
    if why is None and fnn.process_group_of(bn) is not None:
        why = "synchronised batch statistics run in the BN kernels"
    if why is not None:
        return "batch_norm_relu", "conv2d", why
    path = fnn.conv_paths.path_named(conv_backend).kernel_name  # "triton", "cudnn-graph"
    if "conv" not in site:
        return "bn_relu_prologue", f"{path} prologue", None
    conv = _module(block, site["conv"])
    stats = conv.bias is None and fnn.prologue_conv_problem(conv, conv_backend) is None
    return "bn_relu_prologue", f"{path} stats+prologue" if stats else f"{path} prologue", None


def _prologue_note(block, site, backend, stats) -> str:
    """What the conv path of a BN-ReLU -> conv site says of it (how its backward runs;
    ``stats``: the conv before the BN computes its statistics in the path)."""
    conv_backend, _ = fnn.conv_choice(fnn.site_plan(_module(block, site["members"][0])), backend)
    return fnn.conv_paths.path_named(conv_backend).prologue_note(_module(block, site["next"]),
                                                                 stats)


def _plain_conv_path(block, site, backend, column, note):
    """``(conv column, note)`` of a plain conv -> BN (-> add) (-> ReLU) site (no conv after
    it) whose conv path computes a conv's statistics there (cuDNN's F0), in training."""
    bn = _module(block, site["members"][0])
    name, why = fnn.conv_choice(fnn.site_plan(bn), backend)
    path = fnn.conv_paths.path_named(name)
    if why is not None or not path.plain_site_stats:
        return column, note
    note = _join(note, path.plain_site_note(site["kind"], bn))  # (the cuDNN tail graph)
    ran = []
    for key in ("conv", "conv2"):
        if key in site:
            conv = _module(block, site[key])
            why = path.stats_problem(conv, None)
            if why is not None:
                note = _join(note, f"{site[key].target}: F.conv2d and the BN's statistics "
                                   f"pass: {why}")
                continue
            pad = cudnn_graph.input_channel_padding(conv.in_channels, False)
            ran.append(site[key].target + (f" (input channels padded {conv.in_channels}->"
                                           f"{conv.in_channels + pad})" if pad else ""))
    conv_less = "conv" not in site or (site["kind"] == "dual" and "conv2" not in site)
    carried = ("; a BN without a conv normalises its input with the statistics an F1 conv "
               "computed for it, where it carries them") if conv_less else ""
    if not ran:
        return column, _join(note, carried[2:])
    return f"{path.kernel_name} stats", _join(
        note, f"F0 (conv + statistics) at {', '.join(ran)}: the BN normalises with them in "
              "training" + carried)


def _candidate_note(block, prefix, relu) -> str:
    """Why a BN-ReLU that feeds a conv is not a BN-ReLU -> conv site."""
    users = list(relu.users)
    convs = [_path(prefix, u.target) for u in users if _is_conv(block, u)]
    if any(u.op == "output" for u in users):
        return ("its output leaves the block: no BN-ReLU -> conv site crosses a block "
                "boundary (blocks are converted one at a time)")
    if convs and len(convs) == len(users):
        return (f"prologue candidate left: feeds {len(convs)} convs ({', '.join(convs)}); "
                "a prologue needs one conv as the only consumer")
    if convs:
        return (f"prologue candidate left: feeds conv {', '.join(convs)} and other ops, "
                "which need the stored output")
    blocks = [_path(prefix, u.target) for u in users
              if u.op == "call_module" and any(True for _ in _module(block, u).children())]
    if blocks:
        return (f"feeds block {', '.join(blocks)}, converted on its own: a BN-ReLU -> conv "
                "site never crosses a block boundary")
    return ""


def _describe(block, prefix, site, bn_path, backend, note, memory_saving=False):
    kind = site["kind"]
    parts = []
    if "conv" in site:
        parts.append("conv")
    parts.append("bn")
    if kind == "dual":
        parts = ["-".join(parts) + "+" + ("conv-bn" if "conv2" in site else "bn")]
    if kind in ("tail", "dual"):
        parts += ["add", "relu"]
    elif kind == "bn_relu":
        parts.append("relu")
    if "next" in site:
        parts.append("conv")
    pattern = "-".join(parts)
    bn = _module(block, site["members"][0])
    plan = fnn.site_plan(bn)
    kernel = _KERNELS[kind]
    conv = "conv2d" if "conv" in site or "conv2" in site or "next" in site else ""
    if "next" in site and plan.backend != "torch":
        kernel, conv, why = _next_conv_path(block, site, plan.backend or backend)
        if why is None:
            pattern += " (prologue)"
            note = _join(note, _prologue_note(block, site, plan.backend or backend,
                                              conv.endswith("stats+prologue")))
        else:
            note = _join(note, f"BN-ReLU runs before conv (not in its prologue): {why}")
            if memory_saving:
                pattern += " (recomputed)"
                note = _join(note, "memory_saving: the BN-ReLU output is recomputed in "
                                   "backward, not kept")
    elif plan.backend != "torch":
        conv, note = _plain_conv_path(block, site, plan.backend or backend, conv, note)
    if kind == "bn_relu" and "next" not in site:
        note = _join(note, _candidate_note(block, prefix, site["terminal"]))
    if plan.backend == "torch":
        kernel = "torch"
        note = _join(note, "the site's plan runs it as the original torch modules")
    modules = [_path(prefix, n.target) for n in site["members"] if n.op == "call_module"]
    if bn.running_mean is None:
        eval_mode = "batch stats"
    elif plan.fold and fnn.fold_eval and ("conv" in site or site.get("folded_before")) and (
            kind != "dual" or "conv2" in site or site.get("shortcut_folded_before")):
        eval_mode = "folded"  # under no_grad / inference_mode
        eval_mode, note = _fused_eval(block, site, plan, backend, eval_mode, note)
    else:
        eval_mode = "running stats"
    return _Site(block=prefix, site=bn_path, pattern=pattern, kernel=kernel, conv=conv,
                 modules=", ".join(sorted(set(modules))),
                 backend=_backend_name(bn, plan.backend or backend),
                 eval=eval_mode, status="fused", reason=note)


def _fused_eval(block, site, plan, backend, eval_mode, note):
    """``(eval column, note)`` of a folded site whose conv path makes the eval fold one
    call (``cudnn-eval``), judged from the site's conv module."""
    path = fnn.conv_paths.path_named(fnn.conv_choice(plan, plan.backend or backend)[0])
    if path is None or not path.eval_kernel or "conv" not in site:
        return eval_mode, note
    why = path.eval_problem(_module(block, site["conv"]), None, site["kind"] != "conv_bn")
    if why is None:
        return f"{eval_mode}, {path.eval_kernel}", note
    return eval_mode, _join(note, f"eval: the {path.name} fused call is not used: {why}")


def _backend_name(bn: nn.Module, backend: str) -> str:
    if backend != "auto":
        return backend
    t = bn.weight if bn.weight is not None else bn.running_mean
    device = t.device if t is not None else torch.device("cpu")
    try:
        return f"auto ({resolve_backend(device, 'auto')})"
    except Exception:  # noqa: BLE001
        return "auto"


def _rewrite(graph: fx.Graph, site: dict, backend: str, replaced: dict,
             memory_saving: bool) -> None:
    term = site["terminal"]
    b = site["members"][0]
    conv = site.get("conv")
    args = lambda n: replaced.get(n, n)  # noqa: E731  (a node an earlier rewrite replaced)
    with graph.inserting_before(term):
        bn_ref = graph.get_attr(b.target)
        conv_ref = graph.get_attr(conv.target) if conv is not None else None
        x = args(conv.args[0] if conv is not None else b.args[0])
        kwargs = dict(relu=site["kind"] != "conv_bn", backend=backend)
        if "next" in site:
            kwargs.update(next_conv=graph.get_attr(site["next"].target),
                          memory_saving=memory_saving)
            if "next_bn" in site:
                kwargs["next_bn"] = graph.get_attr(site["next_bn"].target)
                kwargs["next_relu"] = site["next_relu"]
        if site["kind"] == "tail":
            kwargs["residual"] = args(site["res"])
        elif site["kind"] == "dual":
            b2 = site["bn2"]
            conv2 = site.get("conv2")
            kwargs["shortcut_bn"] = graph.get_attr(b2.target)
            if conv2 is not None:
                kwargs["shortcut_conv"] = graph.get_attr(conv2.target)
                kwargs["shortcut_x"] = args(conv2.args[0])
            else:
                kwargs["shortcut_x"] = args(b2.args[0])
        new = graph.call_function(fnn.conv_bn_act, (x, conv_ref, bn_ref), kwargs)
    term.replace_all_uses_with(new)
    replaced[term] = new
    index = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(site["members"], key=lambda n: -index[n]):
        graph.erase_node(n)


# --------------------------------------------------------------------------------------
# The generated forward, installed on the block instance
# --------------------------------------------------------------------------------------

def _source(graph: fx.Graph):
    graph.lint()
    code = graph.python_code(root_module="self")
    return code.src, picklable_globals(code.globals)


# --------------------------------------------------------------------------------------
# Walking the model
# --------------------------------------------------------------------------------------


class _Walker:
    def __init__(self, backend: Optional[str], apply: bool, memory_saving: bool):
        self.backend = backend  # None (explain): each converted block's own
        self.apply = apply
        self.memory_saving = memory_saving
        self.rows: list = []
        self.seen: set = set()

    def block(self, module: nn.Module, path: str) -> None:
        if id(module) in self.seen:
            return
        self.seen.add(id(module))
        if not any(True for _ in module.children()) or \
                isinstance(module, nn.modules.batchnorm._BatchNorm):
            return  # a BN with children (timm's BatchNormAct2d) is a site of its parent
        inst = module.__dict__.get("forward")
        if inst is not None and not isinstance(inst, FusedForward):
            self._untraced(module, path, "the instance has its own forward attribute")
            return self._children(module, path, set())
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)) and \
                type(module).forward in (nn.ModuleList.forward, nn.ModuleDict.forward):
            return self._children(module, path, set())
        try:
            results = {}
            ms, backend = self.memory_saving, self.backend
            if not self.apply and isinstance(inst, FusedForward):
                ms = inst.memory_saving
                backend = backend or inst.backend
            constants = {}
            for training in (True, False):
                graph, inlined, consts = _trace(module, training)
                rows = _match(module, graph, path, backend or "auto", rewrite=self.apply,
                              memory_saving=ms, training=training)
                src = _source(graph) if self.apply else None
                results[training] = (graph, inlined, rows, src)
                constants.update(consts)
            if any(isinstance(t, torch.Tensor) and t.is_meta for t in constants.values()):
                raise TypeError("the forward reads a tensor that is not a parameter or buffer")
        except Exception as exc:  # noqa: BLE001  (anything fx cannot trace stays as it is)
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self._untraced(module, path, f"untraceable block ({msg[:120]})")
            return self._children(module, path, set())
        graph, inlined, rows, src = results[True]
        rows_eval = results[False][2]
        if [(r["site"], r["status"], r["kernel"]) for r in rows] != \
                [(r["site"], r["status"], r["kernel"]) for r in rows_eval]:
            for r in rows_eval:
                r["reason"] = (r.get("reason") or "") + " (eval-mode trace)"
            rows = rows + [r for r in rows_eval if r not in rows]
        self.rows.extend(rows)
        fused = [r for r in rows if r["status"] == "fused"]
        if self.apply and fused:
            for name, value in constants.items():  # tensors the traced forward created
                setattr(module, name, value)
            if results[False][3] == src:
                sources = {None: src}
            else:
                sources = {True: src, False: results[False][3]}
            module.forward = FusedForward(module, sources, self.backend, fused,
                                          self.memory_saving)
            module.__prepare_scriptable__ = module.forward.refuse_script
        elif self.apply and isinstance(inst, FusedForward):
            del module.forward
            module.__dict__.pop("__prepare_scriptable__", None)
        self._children(module, path, inlined | results[False][1])

    def _children(self, module, path, inlined, rel=""):
        for name, child in module.named_children():
            r = f"{rel}.{name}" if rel else name
            if r in inlined:
                self._children(child, path, inlined, r)
            else:
                self.block(child, _path(path, r))

    def _untraced(self, module, path, reason):
        bns = [n for n, m in module.named_children()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for n in bns:
            self.rows.append(_Site(block=path, site=_path(path, n), pattern="-", kernel="-",
                                   status="unfused", reason=reason, untraced=True))
        if not bns and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                           for m in module.modules()):
            self.rows.append(_Site(block=path, site=path or "(root)", pattern="-",
                                   kernel="-", status="unfused", reason=reason))


def convert(model: nn.Module, *, backend: str = "auto", inplace: bool = False,
            memory_saving: bool = False, sync_bn: bool = False,
            process_group=None, tune=None) -> nn.Module:
    """Fuse the conv/BN/ReLU/residual patterns of ``model``; see the module docstring.

    Returns ``model`` itself with ``inplace=True``, else a converted deep copy. The
    result has the same state_dict keys and values and computes the same function.
    ``backend`` is passed to every fused call (``"auto"``: chosen per call from the
    tensors' device). Where a BN-ReLU's output only feeds a conv and that conv runs on
    Triton (``backend="triton"``, or a plan ``fusedres.tune`` chose), the BN-ReLU is
    applied in the conv's prologue and its output never exists. ``memory_saving=True``: at
    such a site off the Triton path, the BN-ReLU output is not kept for backward but
    recomputed from the BN input (``torch.utils.checkpoint`` around BN-ReLU-conv; running statistics are
    updated once).
    ``sync_bn=True`` (over the default group) or ``process_group=pg``: every BatchNorm2d
    normalises with the statistics of the global batch across processes in training, as
    ``nn.SyncBatchNorm`` does, inside the fused kernels (CPU/gloo and GPU/NCCL). It needs
    an initialised ``torch.distributed``; a BN site the kernels cannot run then raises
    rather than silently using local statistics.
    ``tune=example_inputs`` (a tensor, or a tuple of the forward's inputs): the converted
    model is returned tuned, ``fusedres.tune(converted, *example_inputs)`` with its
    defaults (cache included), in the mode the model is in (see ``fusedres.tune``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if backend != "auto" and backend not in BACKENDS + (PLUMBING_BACKEND,):
        raise ValueError(f"unknown fusedres backend {backend!r}; expected 'auto' or one of "
                         f"{BACKENDS + (PLUMBING_BACKEND,)}")
    if sync_bn or process_group is not None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("sync_bn=True needs an initialised torch.distributed process "
                               "group (torch.distributed.init_process_group); none is")
        process_group = process_group if process_group is not None else dist.group.WORLD
    if not inplace:
        model = copy.deepcopy(model)
    walker = _Walker(backend, apply=True, memory_saving=memory_saving)
    walker.block(model, "")
    for name, m in model.named_modules():  # named in a site's one-line errors (_backend)
        if isinstance(m, nn.BatchNorm2d):
            m.fusedres_site = name
    if process_group is not None:
        # A timm BatchNormAct2d called whole (not taken apart in a training-mode trace)
        # runs its own forward: local statistics, silently.
        untraced = {r["site"] for r in walker.rows if r.get("untraced")}
        local = [n for n, m in model.named_modules() if _timm.is_norm_act(m) and (
            n in untraced or _timm.problem(m, training=True) is not None)]
        if local:
            raise ValueError(
                f"sync_bn: {len(local)} timm BatchNormAct2d module(s) are not fused "
                f"({', '.join(local[:4])}{', ...' if len(local) > 4 else ''}; "
                "fusedres.explain says why) and would normalise with local statistics: "
                "convert them first with timm.layers.convert_sync_batchnorm")
        for m in model.modules():
            if type(m) is nn.BatchNorm2d:
                # A BN left unfused is called as a module: make it the fused drop-in (a
                # subclass: same state_dict), so it synchronises too (or says why not).
                m.__class__ = fnn.BatchNorm2d
                m.backend, m.last_backend = backend, None
            if isinstance(m, nn.BatchNorm2d):
                m.fusedres_process_group = process_group  # a plain attribute, not state
    if tune is not None:
        from .tune import tune as tune_model

        tune_model(model, *(tune if isinstance(tune, tuple) else (tune,)))
    return model


class Explanation(list):
    """``explain``'s rows (dicts: ``block``, ``site``, ``pattern``, ``kernel``, ``conv``,
    ``modules``, ``backend``, ``eval``, ``status``, ``reason``); ``str()`` gives the table:
    one line per site within ``WIDTH`` columns, each distinct reason once below it (with
    the sites it applies to), and a summary."""

    COLUMNS = ("status", "site", "pattern", "kernel", "conv", "eval", "note")
    WIDTH = 100

    def fused(self):
        return [r for r in self if r["status"] == "fused"]

    def unfused(self):
        return [r for r in self if r["status"] == "unfused"]

    def notes(self) -> list:
        """``[(reason, [site, ...]), ...]``: each distinct reason once, in order."""
        groups: dict = {}
        for r in self:
            if r.get("reason"):
                groups.setdefault(r["reason"], []).append(r["site"])
        return list(groups.items())

    def summary(self) -> str:
        counts = collections.Counter(r["status"] for r in self)
        backends = sorted({r["backend"] for r in self if r.get("backend")})
        def n(count, one, many):
            return f"{count} {one if count == 1 else many}"

        out = [n(counts["fused"], "site fused", "sites fused")] \
            if counts["fused"] or not counts["fusable"] else []
        if counts["fusable"]:
            out.append(f"{counts['fusable']} fusable (not converted yet)")
        out.append(n(counts["unfused"], "BN left unfused", "BNs left unfused"))
        return ", ".join(out) + (f"; backend {', '.join(backends)}" if backends else "")

    def table(self) -> str:
        numbers = {reason: i + 1 for i, (reason, _) in enumerate(self.notes())}
        columns = self.COLUMNS
        rows = [[str(numbers.get(r.get("reason"), "")) if c == "note" else
                 str(r.get(c, "") or "") for c in columns] for r in self]
        widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in
                  enumerate(columns)]
        site = columns.index("site")
        over = sum(widths) + 2 * (len(widths) - 1) - self.WIDTH
        if over > 0 and widths[site] - over >= 16:  # long paths: keep their ends
            widths[site] -= over
            for row in rows:
                if len(row[site]) > widths[site]:
                    keep = widths[site] - 1
                    row[site] = row[site][:keep // 3] + "~" + row[site][-(keep - keep // 3):]

        def line(cells):
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        # "tuned": fusedres.tune's choice and measured times on a line of their own, each
        # failed candidate on the next (unwrapped: the error stays one searchable string)
        out = [line(columns)]
        for r, cells in zip(self, rows):
            out.append(line(cells))
            if r.get("tuned"):
                first, *failed = re.split(r" (?=[\w-]+ FAILED: )", r["tuned"])
                out += [" " * 8 + "tuned: " + first] + [" " * 15 + f for f in failed]
        wrap = textwrap.TextWrapper(width=self.WIDTH, subsequent_indent="     ",
                                    break_on_hyphens=False)
        for reason, sites in self.notes():
            where = ", ".join(sites) if len(sites) <= 4 else f"{len(sites)} sites"
            out += wrap.wrap(f"[{numbers[reason]}]  {reason} ({where})")
        out.append(self.summary())
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def explain(model: nn.Module, *, backend: Optional[str] = None) -> Explanation:
    """Every fused site of ``model`` (kernel, backend) and every BN left unfused, with
    the reason. On an unconverted model: what ``convert`` would do (status
    ``"fusable"``); nothing is changed."""
    from .tune import describe_site

    walker = _Walker(backend, apply=False, memory_saving=False)
    walker.block(model, "")
    rows = Explanation()
    for r in walker.rows:
        r = dict(r)
        if r["status"] == "fused":
            blk = model.get_submodule(r["block"]) if r["block"] else model
            if not isinstance(blk.__dict__.get("forward"), FusedForward):
                r["status"] = "fusable"
            r["tuned"] = describe_site(model, r["site"])
        rows.append(r)
    return rows


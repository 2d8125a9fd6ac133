"""The convolution paths of a fused site: one interface, one implementation per path.

A site of a converted model (``fusedres.nn.conv_bn_act``) runs its convolutions through
the ``ConvPath`` its plan names (``conv_choice``):

    cudnn        ``F.conv2d`` (cuDNN on CUDA): the conv alone; the BN statistics and the
                 BN-ReLU run in the BN kernels. The untuned default everywhere.
    triton       the Triton implicit-GEMM conv (``fusedres.conv``): a statistics epilogue
                 and a BN-ReLU prologue where ``prologue_problem``/``stats_problem`` find
                 none.
    cudnn-graph  cuDNN's graph API (``fusedres.cudnn_graph``): conv_fprop + genstats (F0)
                 and scale, bias, ReLU -> conv_fprop -> genstats (F1), where the extension
                 was built with it and cuDNN supports the graph on this device.
    cudnn-eval   ``F.conv2d`` in training; in eval with folded weights the conv, bias,
                 residual and ReLU in one cuDNN call (``fusedres.cudnn_eval``).
    cudnn-graph-tail
                 ``cudnn-graph``, and a block tail's (dual) BN-add-ReLU in training as
                 cuDNN's pointwise tail graph (``cudnn_graph.CudnnGraphTailConv``): only
                 where ``fusedres.tune`` measured it faster.

A path says what it cannot do (``prologue_problem``, ``stats_problem``: None or why not)
and does what it can (``conv``, ``conv_stats``, ``prologue_conv``; in eval with folded
weights ``eval_problem``/``eval_conv``). A site asks; what a
path cannot do runs as ``cudnn`` does (the BN kernels, then ``F.conv2d``): never an
exception, never a wrong answer. A new path is one subclass and one ``register`` call.

Plans (``SitePlan``) are plain attributes of a site's main BN, set by ``fusedres.tune``
or by hand and read on every call.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

from torch import Tensor, nn

from . import conv as fconv
from . import ops

__all__ = ["SitePlan", "site_plan", "conv_choice", "ConvPath", "CudnnConv", "TritonConv",
           "register", "path_named", "conv_paths"]


# --------------------------------------------------------------------------------------
# Per-site plan
# --------------------------------------------------------------------------------------


# Per-site plan: how one fused site of a converted model runs. Sites are named by their
# main BN module (``explain``'s ``site`` column); the plan is a plain attribute of that
# module (not state, kept by deepcopy/pickle), set by ``fusedres.tune`` or by hand, read
# on every call: nothing to re-convert.
class SitePlan(NamedTuple):
    """``conv``: ``"auto"`` (F.conv2d -- cuDNN on CUDA -- unless the site's backend is
    ``"triton"``), ``"triton"`` (the Triton conv with the BN-ReLU prologue / statistics
    epilogue where the site allows it), ``"cudnn"`` (F.conv2d always) or ``"cudnn-graph"``
    (cuDNN's fused graphs where they run, see ``fusedres.cudnn_graph``) or ``"cudnn-eval"``
    (F.conv2d; in eval the folded conv with bias, residual and ReLU in one cuDNN call,
    ``fusedres.cudnn_eval``). ``backend``: the
    BN kernels' backend for this site (None: the one given to ``convert``), or ``"torch"``:
    the site runs as the original unfused torch modules. ``fold``: eval without autograd
    runs conv+BN as one conv with folded weights."""

    conv: str = "auto"
    backend: Optional[str] = None
    fold: bool = True


_PLAN_ATTR = "fusedres_plan"
DEFAULT_PLAN = SitePlan()


def site_plan(bn: nn.Module) -> SitePlan:
    """The plan in force at the site whose main BN is ``bn`` (the default when none is set)."""
    plan = getattr(bn, _PLAN_ATTR, None)
    if plan is None:
        return DEFAULT_PLAN
    choices = ("auto",) + tuple(_PATHS)
    if not isinstance(plan, SitePlan) or plan.conv not in choices:
        raise TypeError(f"{_PLAN_ATTR} must be a fusedres.nn.SitePlan with conv in "
                        f"{choices}, got {plan!r}")
    return plan


def conv_choice(plan: SitePlan, backend: str) -> Tuple[str, Optional[str]]:
    """``(conv path, why)`` of a site's convs: the name of a registered ``ConvPath``
    (``"triton"``, ``"cudnn-graph"``: may fuse, why None) or ``"cudnn"`` (F.conv2d) and
    why it does not fuse."""
    if plan.conv == "cudnn" or backend == "cudnn":
        return "cudnn", "the site's plan says F.conv2d"
    if plan.conv in _PATHS:
        return plan.conv, None
    if backend in _PATHS:
        return backend, None
    if backend == "auto":
        return "cudnn", ("the untuned default is F.conv2d (cuDNN on CUDA); the Triton conv "
                         "runs where tuning or backend='triton' picks it")
    return "cudnn", f"backend={backend!r} has no conv kernel: F.conv2d"


# --------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------


class ConvPath:
    """One way to run a fused site's convolution (``conv`` is an ``nn.Conv2d``).

    ``name``: the plan's ``conv`` value; ``prologue_name``: what ``last_backend()`` says
    after a BN-ReLU ran in this path's prologue; ``kernel_name``: explain's conv column
    for a fused conv. The base class is the unfused conv: it fuses nothing.
    """

    name = "?"
    prologue_name = "?"
    kernel_name = "conv2d"
    eval_name = "folded"  # last_backend() after eval_conv ran
    eval_kernel = ""  # explain's eval column after "folded, " where eval_conv applies
    # Does a plain conv -> BN (-> add) (-> ReLU) site (no conv after it) run its conv(s)
    # with ``conv_stats`` in training, its BN normalising with those statistics? (cuDNN's
    # F0 graph: yes; the Triton conv: no, F.conv2d is faster where nothing else fuses.)
    plain_site_stats = False
    stats_name = "?"  # last_backend() after a plain site normalised with those statistics
    # Does such a site's block tail (BN + residual or second BN, ReLU) run its apply as
    # cuDNN's tail graph (``cudnn_graph.bn_act_with_stats``)? ``tail_name``: last_backend().
    tail_graph = False
    tail_name = "?"

    def conv(self, conv: nn.Conv2d, x: Tensor) -> Tensor:
        """``conv(x)``'s math (the module's padding mode) without its hooks."""
        return conv._conv_forward(x, conv.weight, conv.bias)

    def prologue_problem(self, conv: nn.Conv2d, input: Optional[Tensor] = None
                         ) -> Optional[str]:
        """None when ``prologue_conv(conv, input, ...)`` can apply a BN-ReLU while
        loading ``input`` (None: judged from the module, an input of its weight's device
        and dtype); else why not."""
        return f"the {self.name} conv path has no BN-ReLU prologue"

    def stats_problem(self, conv: nn.Conv2d, x: Tensor) -> Optional[str]:
        """None when ``conv_stats(conv, x)`` computes the batch statistics of the conv's
        output in its epilogue; else why not."""
        return f"the {self.name} conv path has no statistics epilogue"

    def conv_stats(self, conv: nn.Conv2d, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(y, mean, biased var)`` of ``y = conv(x)``, all differentiable."""
        raise NotImplementedError(self.stats_problem(conv, x))

    def prologue_conv(self, conv: nn.Conv2d, y: Tensor, scale: Tensor, shift: Tensor,
                      centre: Optional[Tensor] = None
                      ) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
        """``(conv(relu(y*scale + shift)), stats)`` (with a ``centre``: ``relu((y -
        centre)*scale + shift)``): the BN-ReLU applied while loading (padded taps 0 after
        it); ``stats``: ``(mean, var)`` of the output when the path computed them in the
        same kernel (differentiable), else None."""
        raise NotImplementedError(self.prologue_problem(conv, y))

    def bn_prologue_conv(self, conv: nn.Conv2d, y: Tensor, bn: nn.BatchNorm2d, mean: Tensor,
                         var: Tensor, batch_stats: bool
                         ) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
        """``prologue_conv`` given the BN itself: ``bn`` (affine parameters, eps) and the
        statistics it normalises with (``mean``, biased ``var``: ``y``'s batch statistics,
        differentiable, when ``batch_stats``; else the running ones). Here the BN becomes
        differentiable scale/shift, so autograd carries its backward; a path with a fused
        BN backward (cudnn-graph) overrides this.

        Centred on the BN's mean, ``relu((y - mean)*scale + beta)``: the gradient of scale
        is then ``sum(g*(y - mean))``, where the folded ``shift = beta - mean*scale`` leaves
        autograd ``sum(g*y) - mean*sum(g)``, which cancels at a large mean (fp32, mean/std
        100: dgamma 14x torch's error on the Triton path, 8.6x on cudnn-graph's unfused
        backward; tests/test_large_mean.py, tests/test_cudnn_graph_large_mean.py)."""
        _, scale, shift = ops.centred_scale_shift(bn.weight, bn.bias, mean, var, bn.eps)
        return self.prologue_conv(conv, y, scale, shift, centre=mean)

    def prologue_note(self, conv: nn.Conv2d, stats: bool = False) -> str:
        """What ``explain`` adds about a site whose BN-ReLU runs in this path's prologue
        of ``conv`` (e.g. how its backward runs; ``stats``: the conv before the BN computes
        its statistics in this path too); "" for nothing."""
        return ""

    def plain_site_note(self, kind: str, bn: nn.BatchNorm2d) -> str:
        """What ``explain`` adds about a plain site of ``kind`` (``"tail"``, ``"dual"``,
        ``"bn_relu"``, ``"conv_bn"``) whose main BN is ``bn`` on this path; "" for
        nothing."""
        return ""

    def eval_problem(self, conv: nn.Conv2d, x: Optional[Tensor] = None, relu: bool = True,
                     other: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                     bias: Optional[Tensor] = None) -> Optional[str]:
        """None when ``eval_conv`` runs an eval-mode folded conv ``[relu](conv(x, weight,
        bias) [+ other])`` in one call (``x`` None: judged from the module); else why not
        (then the site's eval path is today's: oneDNN post-ops on CPU, else the conv and
        in-place add/ReLU)."""
        return f"the {self.name} conv path has no fused eval conv"

    def eval_conv(self, conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                  relu: bool, other: Optional[Tensor]) -> Optional[Tensor]:
        """The fused eval call, or None when it raised (the path remembers it and says so
        in ``eval_problem`` from then on; the caller runs today's path)."""
        raise NotImplementedError(self.eval_problem(conv, x, relu, other, weight, bias))


class CudnnConv(ConvPath):
    """``F.conv2d`` (cuDNN on CUDA): the untuned default; fuses nothing."""

    name = "cudnn"

    def prologue_problem(self, conv, input=None):
        return "the site's plan says F.conv2d"


class TritonConv(ConvPath):
    """The Triton implicit-GEMM conv (``fusedres.conv``) with a BN-ReLU prologue and a
    statistics epilogue. Plain convs (no prologue, no statistics) stay ``F.conv2d``."""

    name = "triton"
    prologue_name = "triton-prologue"
    kernel_name = "triton"

    def prologue_problem(self, conv, input=None):
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r} goes to F.conv2d"
        weight, bias = conv.weight, conv.bias
        if input is None:
            input = weight.new_empty((1, conv.in_channels, *weight.shape[2:]))
        else:
            cast, weight, bias = fconv.autocast_inputs(input, weight, bias)  # what the op sees
            if cast is not input:
                return "under autocast, an input not in the autocast dtype goes to F.conv2d"
        try:
            path, why = fconv.conv_path(input, weight, bias, conv.stride, conv.padding,
                                        conv.dilation, conv.groups, self.name)
        except (RuntimeError, ValueError) as exc:  # a backend that cannot run here
            return str(exc)
        return None if path == "triton" else why

    def prologue_note(self, conv, stats=False):
        # the dBN term exists where the statistics came from the conv before the BN
        return fconv.dbn_backward_note() if stats else ""

    def stats_problem(self, conv, x):
        if conv.bias is not None:
            return "a conv bias (the statistics epilogue is for bias-free convs)"
        return self.prologue_problem(conv, x)

    def conv_stats(self, conv, x):
        return fconv.conv2d_stats(x, conv.weight, conv.stride, conv.padding, backend=self.name)

    def prologue_conv(self, conv, y, scale, shift, centre=None):
        out = fconv.conv2d_bias_add_relu(y, conv.weight, conv.bias, None, conv.stride,
                                         conv.padding, relu=False, scale=scale, shift=shift,
                                         centre=centre, backend=self.name)
        return out, None


def conv_out_shape(conv: nn.Conv2d, x: Tensor) -> tuple:
    """The shape of ``conv(x)`` (numeric padding)."""
    size = [(n + 2 * p - d * (k - 1) - 1) // st + 1 for n, p, d, k, st in zip(
        x.shape[2:], fconv._pair(conv.padding), fconv._pair(conv.dilation), conv.kernel_size,
        fconv._pair(conv.stride))]
    return (x.shape[0], conv.out_channels, *size)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


_PATHS: Dict[str, ConvPath] = {}


def register(path: ConvPath) -> ConvPath:
    """Make ``path`` a value of ``SitePlan.conv`` (and of ``conv_choice``)."""
    _PATHS[path.name] = path
    return path


def path_named(name: str) -> Optional[ConvPath]:
    """The registered path called ``name`` (None: not a conv path, e.g. ``"auto"``)."""
    return _PATHS.get(name)


def conv_paths() -> Tuple[str, ...]:
    """The names of the registered conv paths."""
    return tuple(_PATHS)


register(CudnnConv())
register(TritonConv())
from . import cudnn_graph  # noqa: E402,F401  (registers the cudnn-graph path)
from . import cudnn_eval  # noqa: E402,F401  (registers the cudnn-eval path)

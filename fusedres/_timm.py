"""timm's ``BatchNormAct2d`` (BN, then an optional drop layer, then an activation, in one
module that subclasses ``nn.BatchNorm2d``): how ``fusedres.convert`` takes it apart.

In a block's traced graph, a ``BatchNormAct2d`` call that ``parts`` accepts becomes two
nodes: the module itself marked ``NORM_ONLY`` (its BatchNorm2d part: ``batch_norm``) and,
for a ReLU activation, a call of its ``act`` child (an ``nn.ReLU``). The matcher then
fuses it as it fuses a hand-written ``bn -> relu`` (a pre-activation ``BN-ReLU -> conv``
site included); a ``NORM_ONLY`` node left unfused runs ``batch_norm``. Everything else
stays one call of the module (unfused) with the reason ``problem`` gives.

timm is never imported here: its class is found by name on the module's MRO.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

NORM_ONLY = "fusedres_norm_only"  # fx node meta key: the node computes the BN part only

# Drop layers that return their input unchanged when not training (timm's and torch's).
_EVAL_IDENTITY_DROPS = {"DropBlock2d", "DropPath", "Dropout", "Dropout2d", "Dropout1d",
                        "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"}


def _norm_act_class(m: nn.Module):
    """timm's ``BatchNormAct2d`` if ``m`` is one (a subclass included), else None."""
    for c in type(m).__mro__:
        if c.__name__ == "BatchNormAct2d" and c.__module__.startswith("timm."):
            return c
    return None


def is_norm_act(m: nn.Module) -> bool:
    return _norm_act_class(m) is not None


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def problem(m: nn.Module, training: Optional[bool] = None) -> Optional[str]:
    """None when ``m`` (a timm ``BatchNormAct2d``) computes ``act(bn(x))`` with a ReLU or
    identity ``act`` and no drop layer active in ``training`` mode (None: its drop's
    current mode); else why it stays one unfused module call."""
    cls = _norm_act_class(m)
    if cls is None:
        return f"{type(m).__name__} is not timm's BatchNormAct2d"
    name = type(m).__name__
    if type(m).forward is not cls.forward:
        return f"{name} overrides BatchNormAct2d.forward"
    if _hooked(m):
        return "the BN module has hooks"
    act, drop = getattr(m, "act", None), getattr(m, "drop", None)
    if type(act) not in (nn.ReLU, nn.Identity):
        return (f"timm {name} with activation {type(act).__name__}: only ReLU or none "
                "fuse (the BN part could, the activation would stay: not converted)")
    training = drop.training if training is None else training
    if type(drop) is not nn.Identity and (training or type(drop).__name__
                                          not in _EVAL_IDENTITY_DROPS):
        return (f"timm {name}: its drop layer {type(drop).__name__} is active in "
                f"{'training' if training else 'eval'} (it runs between the BN and the act)")
    if _hooked(act) or _hooked(drop):
        return f"timm {name}: its act or drop layer has hooks"
    return None


def parts(m: nn.Module) -> Optional[str]:
    """``"relu"`` or ``"identity"`` (the activation after the BN part) when ``problem(m)``
    is None, else None."""
    if problem(m) is not None:
        return None
    return "relu" if type(m.act) is nn.ReLU else "identity"


def batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """The BatchNorm2d part of a ``BatchNormAct2d`` (a ``NORM_ONLY`` node left unfused):
    ``nn.BatchNorm2d.forward``, which its forward copies. Under fx tracing: one node."""
    if isinstance(x, torch.fx.Proxy):
        return x.tracer.create_proxy("call_function", batch_norm, (bn, x), {})
    if getattr(bn, "fusedres_process_group", None) is not None:  # convert(sync_bn=True)
        from .nn import bn_act

        return bn_act(bn, x)  # synchronised statistics (or an error saying why not)
    return nn.BatchNorm2d.forward(bn, x)

"""GroupNorm fused with an activation, and activation lookup by name.

GN is the activation normalizer WS is paired with: it needs no batch statistics, so it behaves the
same at batch 1, in eval, and across devices without synchronization.
"""
from typing import Callable, Optional, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GroupNormAct", "get_act_layer", "create_act", "ACT_LAYERS"]

#: Activations by the names timm and the configs use.
ACT_LAYERS = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}

ActArg = Optional[Union[str, Type[nn.Module], Callable[..., nn.Module]]]


def get_act_layer(act: ActArg) -> Optional[Callable[..., nn.Module]]:
    """Resolve ``'relu'``-style names to module classes; classes and callables pass through."""
    if act is None or not isinstance(act, str):
        return act
    try:
        return ACT_LAYERS[act.lower()]
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; choose one of {', '.join(sorted(ACT_LAYERS))}") from None


def create_act(act: ActArg, inplace: bool = False) -> nn.Module:
    """An activation module by name or class; ``inplace`` where the activation supports it."""
    layer = get_act_layer(act)
    if layer is None:
        return nn.Identity()
    if layer in (nn.ReLU, nn.SiLU, nn.ELU):
        return layer(inplace=inplace)
    return layer()


class GroupNormAct(nn.GroupNorm):
    """``nn.GroupNorm`` followed by an activation; state-dict keys are GroupNorm's (``weight``, ``bias``).

    Argument order follows timm's ``GroupNormAct`` (``num_channels`` first) so norm layers can be built
    as ``norm_layer(channels)``.
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        affine: bool = True,
        apply_act: bool = True,
        act_layer: ActArg = "relu",
        inplace: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        if num_channels % num_groups != 0:
            raise ValueError(f"GroupNorm needs num_channels ({num_channels}) divisible by num_groups ({num_groups})")
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        self.act = create_act(act_layer, inplace) if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))

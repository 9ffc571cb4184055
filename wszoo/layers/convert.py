"""Swapping plain convolutions for WS ones in an existing module, in place, keeping parameters and
state-dict keys (so checkpoints of the original still load)."""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional

import torch.nn as nn

from .standardize import fan_in_of
from .ws_conv import WSConv2d

__all__ = ["convert_convs_to_ws", "replace_modules"]


def convert_convs_to_ws(
    module: nn.Module,
    style: str = "timm",
    eps: Optional[float] = None,
    min_fan_in: int = 2,
    skip_depthwise: bool = True,
    exclude: Iterable[str] = (),
) -> List[str]:
    """Replace every eligible ``nn.Conv2d`` under ``module`` by a :class:`WSConv2d` holding the same
    parameters; returns the converted names.

    Skipped: layers already standardized, fan-in below ``min_fan_in``, depthwise convs (their k*k
    fan-in is too small for stable statistics) unless ``skip_depthwise=False``, names in ``exclude``
    (e.g. final prediction convs, which GN+WS recipes keep plain).
    """
    excluded = set(exclude)

    def to_ws(name: str, conv: nn.Module) -> Optional[nn.Module]:
        if type(conv) is not nn.Conv2d or name in excluded:
            return None
        depthwise = conv.groups > 1 and conv.groups == conv.in_channels
        if fan_in_of(conv.weight) < min_fan_in or (skip_depthwise and depthwise):
            return None
        ws = WSConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                      bias=conv.bias is not None, style=style, eps=eps, device="meta")
        ws.padding_mode = conv.padding_mode
        ws.weight, ws.bias = conv.weight, conv.bias  # share, don't copy: keys and values unchanged
        return ws

    return replace_modules(module, to_ws)


def replace_modules(root: nn.Module, replace: Callable[[str, nn.Module], Optional[nn.Module]]) -> List[str]:
    """Call ``replace(name, child)`` on every module under ``root`` (not ``root`` itself) and put what it
    returns in the child's place (``None`` keeps the child); returns the replaced names, in order.

    A child shared by several parents is offered once per parent; the subtree of a replaced child is not
    visited."""
    replaced: List[str] = []
    for parent_name, parent in list(root.named_modules()):
        if any(parent_name == r or parent_name.startswith(r + ".") for r in replaced):
            continue
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            new = replace(full, child)
            if new is not None:
                setattr(parent, child_name, new)
                replaced.append(full)
    return replaced

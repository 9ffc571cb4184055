"""Swapping plain convolutions for WS ones in an existing module, in place, keeping parameters and
state-dict keys (so checkpoints of the original still load)."""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch.nn as nn

from .standardize import fan_in_of
from .ws_conv import WSConv2d, is_ws_layer

__all__ = ["convert_convs_to_ws"]


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
    converted: List[str] = []
    for name, child in list(module.named_modules()):
        for child_name, conv in list(child.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(conv) is not nn.Conv2d or is_ws_layer(conv) or full in excluded:
                continue
            depthwise = conv.groups > 1 and conv.groups == conv.in_channels
            if fan_in_of(conv.weight) < min_fan_in or (skip_depthwise and depthwise):
                continue
            ws = WSConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                          padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                          bias=conv.bias is not None, style=style, eps=eps, device="meta")
            ws.padding_mode = conv.padding_mode
            ws.weight, ws.bias = conv.weight, conv.bias  # share, don't copy: keys and values unchanged
            setattr(child, child_name, ws)
            converted.append(full)
    return converted

"""WS backbones with a GroupNorm + WS feature pyramid, in the form torchvision's detectors expect."""
from collections import OrderedDict
from functools import partial
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from ..factory import create_model
from ..layers import convert_convs_to_ws

__all__ = ["WSBackboneWithFPN", "create_backbone"]


def create_backbone(backbone: Union[str, nn.Module], out_indices: Sequence[int], pretrained: bool = False,
                    frozen_stages: int = -1, **kwargs) -> nn.Module:
    """A wszoo feature extractor (``features_only=True``) from a model name, or ``backbone`` as given."""
    if isinstance(backbone, str):
        return create_model(backbone, pretrained=pretrained, features_only=True, out_indices=tuple(out_indices),
                            frozen_stages=frozen_stages, **kwargs)
    if not hasattr(backbone, "feature_info") or not callable(getattr(backbone.feature_info, "channels", None)):
        raise TypeError("backbone must be a model name or a wszoo features_only model")
    return backbone


class WSBackboneWithFPN(nn.Module):
    """A wszoo backbone plus an FPN whose lateral and output convs are WS + GroupNorm (the GN+WS
    detection recipe). ``forward`` returns an ``OrderedDict`` of maps named ``'0', '1', ...`` (and
    ``'pool'`` or ``'p6', 'p7'``), all with ``out_channels`` channels, as torchvision's detectors take.

    Args:
        backbone: a registered model name (built with ``features_only=True``) or such a module.
        out_indices: backbone levels fed to the FPN; ``(1, 2, 3, 4)`` = strides 4-32.
        out_channels: FPN width.
        extra: ``'pool'`` (a stride-2 max pool on the top map, Faster/Mask R-CNN), ``'p6p7'`` (two extra
            stride-2 WS convs, RetinaNet) or ``None``.
        gn_groups, ws_style: the FPN's GroupNorm groups and standardization formula.
        pretrained, frozen_stages, **kwargs: passed to :func:`wszoo.create_model` for the backbone.
    """

    def __init__(self, backbone: Union[str, nn.Module], out_indices: Sequence[int] = (1, 2, 3, 4),
                 out_channels: int = 256, extra: Optional[str] = "pool", gn_groups: int = 32, ws_style: str = "timm",
                 pretrained: bool = False, frozen_stages: int = -1, **kwargs) -> None:
        super().__init__()
        self.body = create_backbone(backbone, out_indices, pretrained, frozen_stages, **kwargs)
        in_channels = list(self.body.feature_info.channels())
        if extra == "pool":
            extra_block = LastLevelMaxPool()
        elif extra == "p6p7":
            extra_block = LastLevelP6P7(out_channels, out_channels)
        elif extra is None:
            extra_block = None
        else:
            raise ValueError(f"extra must be 'pool', 'p6p7' or None, got {extra!r}")
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_block,
                                         norm_layer=partial(nn.GroupNorm, gn_groups))
        convert_convs_to_ws(self.fpn, style=ws_style)
        self.out_channels = out_channels
        self.pretrained_cfg = getattr(self.body, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))

"""The segmenter: DeepLabv3 with a WS backbone whose last stages are dilated (output stride 8 or 16) and
torchvision's ASPP head rebuilt with GroupNorm + WS (no batch statistics anywhere)."""
from typing import Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from .. import speed
from ..detection.backbone import create_backbone, ws_style_of
from ..detection.detectors import recipe_defaults
from ..layers import batchnorm_to_groupnorm, convert_convs_to_ws

__all__ = ["build_segmenter", "WSDeepLabV3", "batchnorm_to_groupnorm"]


class WSDeepLabV3(nn.Module):
    """``backbone -> GN+WS ASPP head -> bilinear upsampling``; returns ``{'out': logits}`` like torchvision."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.classifier = backbone, head
        self.pretrained_cfg = getattr(backbone, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.backbone(x)[-1]
        logits = self.classifier(features)
        return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def build_segmenter(kind: str, backbone: Union[str, nn.Module], num_classes: int, output_stride: int = 8,
                    pretrained_backbone: Optional[bool] = None, frozen_stages: int = -1,
                    ws_style: Optional[str] = None, group_ws: Union[bool, str] = "auto",
                    **backbone_kwargs) -> nn.Module:
    """``build_segmenter('deeplabv3', 'resnet50_gn_ws', 21)``: DeepLabv3 at output stride 8 or 16.

    The ASPP rates follow the paper: (12, 24, 36) at stride 8, (6, 12, 18) at stride 16. As
    :func:`build_detector`: the backbone's published weights by default when it has a tag, and the
    backbone's own WS formula (``ws_style=None``) in the ASPP head; every WS layer standardized together in
    training (``group_ws``, :func:`wszoo.group_ws`).
    """
    if kind != "deeplabv3":
        raise ValueError(f"unknown segmenter {kind!r}; 'deeplabv3' is available")
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    if isinstance(backbone, str):
        recipe = recipe_defaults(backbone, pretrained_backbone, frozen_stages)
        body = create_backbone(backbone, out_indices=(-1,), pretrained=recipe["pretrained"],
                               frozen_stages=frozen_stages, output_stride=output_stride, **backbone_kwargs)
    else:
        given = [k for k, v in (("pretrained_backbone", pretrained_backbone), ("backbone_kwargs", backbone_kwargs))
                 if v] + (["frozen_stages"] if frozen_stages != -1 else [])
        if given:
            raise ValueError(f"{', '.join(given)} configure a backbone built from a name; this one is built already")
        body = create_backbone(backbone, out_indices=(-1,))
    ws_eps = None
    if ws_style is None:
        ws_style, ws_eps = ws_style_of(body)
    rates = (12, 24, 36) if output_stride == 8 else (6, 12, 18)
    head = DeepLabHead(body.feature_info.channels()[-1], num_classes, atrous_rates=rates)
    batchnorm_to_groupnorm(head)
    # the classifier conv stays plain
    convert_convs_to_ws(head, style=ws_style, eps=ws_eps, exclude=(f"{len(head) - 1}",))
    return speed.group_ws(WSDeepLabV3(body, head), group_ws)

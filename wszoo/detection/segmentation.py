"""Semantic segmentation: DeepLabv3 with a WS backbone whose last stages are dilated (output stride 8
or 16) and torchvision's ASPP head rebuilt with GroupNorm + WS (no batch statistics anywhere)."""
from typing import Dict, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from ..layers import batchnorm_to_groupnorm, convert_convs_to_ws
from .backbone import create_backbone

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
                    pretrained_backbone: bool = False, frozen_stages: int = -1, ws_style: str = "timm",
                    **backbone_kwargs) -> nn.Module:
    """``build_segmenter('deeplabv3', 'resnet50_gn_ws', 21)``: DeepLabv3 at output stride 8 or 16.

    The ASPP rates follow the paper: (12, 24, 36) at stride 8, (6, 12, 18) at stride 16.
    """
    if kind != "deeplabv3":
        raise ValueError(f"unknown segmenter {kind!r}; 'deeplabv3' is available")
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    if isinstance(backbone, str):
        body = create_backbone(backbone, out_indices=(-1,), pretrained=pretrained_backbone,
                               frozen_stages=frozen_stages, output_stride=output_stride, **backbone_kwargs)
    else:
        body = create_backbone(backbone, out_indices=(-1,))
    rates = (12, 24, 36) if output_stride == 8 else (6, 12, 18)
    head = DeepLabHead(body.feature_info.channels()[-1], num_classes, atrous_rates=rates)
    batchnorm_to_groupnorm(head)
    convert_convs_to_ws(head, style=ws_style, exclude=(f"{len(head) - 1}",))  # the classifier conv stays plain
    return WSDeepLabV3(body, head)

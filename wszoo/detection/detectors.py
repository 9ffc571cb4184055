"""torchvision's Faster R-CNN, Mask R-CNN and RetinaNet with a WS backbone and GN+WS necks and heads.

As in the GN+WS detection recipes (Qiao et al. 2019; mmdetection's ``gn+ws`` configs): FPN lateral
and output convs are WS + GroupNorm(32); the Faster/Mask R-CNN box head is 4 convs (GN+WS) and one
fc (``Shared4Conv1FCBBoxHead``); the mask head's convs are GN+WS; RetinaNet's classification and
regression towers are GN+WS while their final prediction convs stay plain.
"""
from functools import partial
from typing import Any, Union

import torch.nn as nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.retinanet import RetinaNetHead

from ..layers import convert_convs_to_ws
from .backbone import WSBackboneWithFPN

__all__ = ["build_detector", "DETECTORS"]

DETECTORS = ("fasterrcnn", "maskrcnn", "retinanet")


def _gn(groups: int = 32):
    return partial(nn.GroupNorm, groups)


def _box_head(channels: int, ws_style: str) -> nn.Module:
    head = FastRCNNConvFCHead((channels, 7, 7), [256, 256, 256, 256], [1024], norm_layer=_gn())
    convert_convs_to_ws(head, style=ws_style)
    return head


def build_detector(kind: str, backbone: Union[str, nn.Module], num_classes: int, pretrained_backbone: bool = False,
                   frozen_stages: int = -1, ws_style: str = "timm", backbone_kwargs: dict = None,
                   **torchvision_kwargs: Any) -> nn.Module:
    """A torchvision detector on a wszoo backbone.

    Args:
        kind: ``'fasterrcnn'``, ``'maskrcnn'`` or ``'retinanet'``.
        backbone: a registered model name (e.g. ``'resnet50_gn_ws'``) or a :class:`WSBackboneWithFPN`.
        num_classes: including the background class for the R-CNNs, as torchvision counts.
        pretrained_backbone: load the backbone's published weights.
        frozen_stages: backbone stages to freeze (-1 none, 0 stem, k stem + stages 1..k).
        ws_style: standardization formula of the neck and heads.
        backbone_kwargs: more ``create_model`` arguments for the backbone (``output_stride`` ...).
        **torchvision_kwargs: passed to torchvision's class (``min_size``, ``max_size``, ...).

    The image mean/std of torchvision's transform come from the backbone's pretrained cfg.
    """
    if kind not in DETECTORS:
        raise ValueError(f"unknown detector {kind!r}; choose one of {', '.join(DETECTORS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if isinstance(backbone, WSBackboneWithFPN):
        neck = backbone
    else:
        levels = (2, 3, 4) if kind == "retinanet" else (1, 2, 3, 4)
        neck = WSBackboneWithFPN(backbone, out_indices=levels, extra="p6p7" if kind == "retinanet" else "pool",
                                 ws_style=ws_style, pretrained=pretrained_backbone, frozen_stages=frozen_stages,
                                 **(backbone_kwargs or {}))
    cfg = neck.pretrained_cfg or {}
    torchvision_kwargs.setdefault("image_mean", list(cfg.get("mean", (0.485, 0.456, 0.406))))
    torchvision_kwargs.setdefault("image_std", list(cfg.get("std", (0.229, 0.224, 0.225))))
    channels = neck.out_channels
    if kind == "fasterrcnn":
        return FasterRCNN(neck, num_classes=num_classes, box_head=_box_head(channels, ws_style), **torchvision_kwargs)
    if kind == "maskrcnn":
        mask_head = MaskRCNNHeads(channels, [256, 256, 256, 256], 1, norm_layer=_gn())
        convert_convs_to_ws(mask_head, style=ws_style)
        return MaskRCNN(neck, num_classes=num_classes, box_head=_box_head(channels, ws_style), mask_head=mask_head,
                        **torchvision_kwargs)
    model = RetinaNet(neck, num_classes=num_classes, **torchvision_kwargs)
    head = RetinaNetHead(channels, model.anchor_generator.num_anchors_per_location()[0], num_classes,
                         norm_layer=_gn())
    convert_convs_to_ws(head, style=ws_style,
                        exclude=("classification_head.cls_logits", "regression_head.bbox_reg"))
    model.head = head
    return model

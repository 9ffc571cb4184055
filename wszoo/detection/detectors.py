"""torchvision's Faster R-CNN, Mask R-CNN and RetinaNet with a WS backbone and GN+WS necks and heads.

As in the GN+WS detection recipes (Qiao et al. 2019; mmdetection's ``gn+ws`` configs; the WS authors'
maskrcnn-benchmark fork): FPN lateral and output convs are WS + GroupNorm(32); the Faster/Mask R-CNN box
head is 4 convs (GN+WS) and one fc (``Shared4Conv1FCBBoxHead``); the mask head's convs are GN+WS;
RetinaNet's classification and regression towers are GN+WS while their final prediction convs stay plain,
and its P6/P7 come from C5 through WS convs with GroupNorm. Necks and heads use the backbone's own WS
formula; training starts from the backbone's published weights with the stem and first stage frozen.
"""
import logging
from functools import partial
from typing import Any, Dict, Optional, Union

import torch.nn as nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.retinanet import RetinaNetHead

from .. import speed
from ..errors import Fix, UsageError
from ..hub import PretrainedWeightsError
from ..layers import convert_convs_to_ws
from .backbone import WSBackboneWithFPN, has_published_weights

__all__ = ["build_detector", "DETECTORS", "PYRAMID_STRIDES", "recipe_defaults"]

_logger = logging.getLogger("wszoo")

DETECTORS = ("fasterrcnn", "maskrcnn", "retinanet")
#: The strides each detector's anchors are made for (torchvision's defaults: sizes 32-512 over these levels).
PYRAMID_STRIDES = {"fasterrcnn": [4, 8, 16, 32, 64], "maskrcnn": [4, 8, 16, 32, 64],
                   "retinanet": [8, 16, 32, 64, 128]}
_LEVELS = {"fasterrcnn": ((1, 2, 3, 4), "pool"), "maskrcnn": ((1, 2, 3, 4), "pool"),
           "retinanet": ((2, 3, 4), "p6p7")}


def _gn(groups: int = 32):
    return partial(nn.GroupNorm, groups)


def _box_head(channels: int, ws_style: str, ws_eps: Optional[float]) -> nn.Module:
    head = FastRCNNConvFCHead((channels, 7, 7), [256, 256, 256, 256], [1024], norm_layer=_gn())
    convert_convs_to_ws(head, style=ws_style, eps=ws_eps)
    return head


#: The way out when a backbone's published weights cannot be had: train from random ones.
_RANDOM_BACKBONE = Fix("pretrained_backbone", "False", phrase="; to train from random ones pass {}",
                       call="build_detector")


def recipe_defaults(backbone: str, pretrained_backbone: Optional[bool], frozen_stages: Optional[int]
                    ) -> Dict[str, Any]:
    """The GN+WS recipe's choices for a named backbone: its published weights when it has a tag (and only
    then), and then the stem and first stage frozen (mmdetection's ``frozen_stages=1``, maskrcnn-benchmark's
    ``FREEZE_CONV_BODY_AT=2``); from random weights nothing is frozen."""
    published = has_published_weights(backbone)
    if pretrained_backbone is None:
        pretrained_backbone = published
    elif pretrained_backbone and not published:
        raise UsageError(f"{backbone} has no published weights (see wszoo.list_pretrained()){{pretrained_backbone}}",
                         _RANDOM_BACKBONE)
    if frozen_stages is None:
        frozen_stages = 1 if pretrained_backbone else -1
    return {"pretrained": pretrained_backbone, "frozen_stages": frozen_stages}


def _neck(kind: str, backbone: Union[str, nn.Module], pretrained_backbone: Optional[bool],
          frozen_stages: Optional[int], ws_style: Optional[str], backbone_kwargs: Optional[Dict[str, Any]],
          p6p7_from: str) -> WSBackboneWithFPN:
    """The backbone + FPN: built from a name with the recipe's defaults, or a given one checked against the
    detector (whose arguments then cannot apply: they are refused rather than ignored)."""
    if isinstance(backbone, WSBackboneWithFPN):
        given = {k: v for k, v in (("pretrained_backbone", pretrained_backbone), ("frozen_stages", frozen_stages),
                                   ("ws_style", ws_style), ("backbone_kwargs", backbone_kwargs)) if v is not None}
        if given or p6p7_from != "c5":
            names = ", ".join(list(given) + (["p6p7_from"] if p6p7_from != "c5" else []))
            raise ValueError(f"{names} configure a backbone built from a name, and this one is built already: "
                             "pass them to WSBackboneWithFPN(...) instead")
        if backbone.strides != PYRAMID_STRIDES[kind]:
            raise ValueError(f"a {kind} takes pyramid levels at strides {PYRAMID_STRIDES[kind]} (its anchors are made "
                             f"for them); this WSBackboneWithFPN gives {backbone.strides}: build it with "
                             f"out_indices={_LEVELS[kind][0]} and extra={_LEVELS[kind][1]!r}")
        return backbone
    if not isinstance(backbone, str):
        raise TypeError(f"backbone must be a model name or a WSBackboneWithFPN, got {type(backbone).__name__}")
    if p6p7_from not in ("c5", "p5"):
        raise ValueError(f"p6p7_from must be 'c5' (the default, as the references) or 'p5', got {p6p7_from!r}")
    if kind != "retinanet" and p6p7_from != "c5":
        raise ValueError("p6p7_from is for retinanet (the R-CNNs take a max-pooled top level)")
    recipe = recipe_defaults(backbone, pretrained_backbone, frozen_stages)
    levels, extra = _LEVELS[kind]
    if extra == "p6p7" and p6p7_from == "p5":
        extra = "p6p7_from_p5"
    try:
        neck = WSBackboneWithFPN(backbone, out_indices=levels, extra=extra, ws_style=ws_style,
                                 **recipe, **(backbone_kwargs or {}))
    except PretrainedWeightsError as e:  # (a backbone's checkpoint_path is no argument of the detector's)
        raise e.extended(f" The detection recipe starts from {backbone}'s published weights{{pretrained_backbone}}.",
                         _RANDOM_BACKBONE, drop=("checkpoint_path",)) from e
    frozen = sum(not p.requires_grad for p in neck.body.parameters())
    _logger.info("%s on %s: %s backbone weights, %s; neck and heads WS style %s (eps %s)", kind, backbone,
                 "published" if recipe["pretrained"] else "random",
                 f"stem + {recipe['frozen_stages']} stage(s) frozen ({frozen} tensors)"
                 if recipe["frozen_stages"] >= 0 else "nothing frozen", neck.ws_style, neck.ws_eps)
    return neck


def build_detector(kind: str, backbone: Union[str, nn.Module], num_classes: int,
                   pretrained_backbone: Optional[bool] = None, frozen_stages: Optional[int] = None,
                   ws_style: Optional[str] = None, backbone_kwargs: Optional[Dict[str, Any]] = None,
                   p6p7_from: str = "c5", group_ws: Union[bool, str] = "auto", **torchvision_kwargs: Any) -> nn.Module:
    """A torchvision detector on a wszoo backbone, by default as the GN+WS recipe trains it.

    Args:
        kind: ``'fasterrcnn'``, ``'maskrcnn'`` or ``'retinanet'``.
        backbone: a registered model name (e.g. ``'resnet50_gn_ws'``) or a :class:`WSBackboneWithFPN` (whose
            pyramid must match ``kind``: strides 4-64 for the R-CNNs, 8-128 for RetinaNet).
        num_classes: including the background class for the R-CNNs, as torchvision counts.
        pretrained_backbone: default (``None``): the backbone's published weights when it has a pretrained
            tag, random otherwise (a log line says which). Offline with nothing cached, the error says how to
            fetch them; ``False`` trains from random weights.
        frozen_stages: default: the stem and first stage (1) when the backbone is pretrained, nothing (-1)
            otherwise; 0 the stem, k the stem and stages 1..k.
        ws_style: WS formula of the neck and heads; default the backbone's (``qiao`` for the GN+WS ResNets,
            ``timm`` for BiT and, unscaled, for the NF models).
        backbone_kwargs: more ``create_model`` arguments for the backbone (``output_stride`` ...).
        p6p7_from: RetinaNet's P6 source, ``'c5'`` (the references) or ``'p5'``.
        group_ws: in training, standardize every WS layer of the detector (backbone, neck, heads) together
            (:func:`wszoo.group_ws`; ``'auto'``: on GPUs), ``True`` everywhere, ``False``: layer by layer.
        **torchvision_kwargs: passed to torchvision's class (``min_size``, ``max_size``, ...).

    The image mean/std of torchvision's transform come from the backbone's pretrained cfg. A backbone
    argument that cannot apply (a built :class:`WSBackboneWithFPN` with ``frozen_stages`` ...) is an error.
    """
    if kind not in DETECTORS:
        raise ValueError(f"unknown detector {kind!r}; choose one of {', '.join(DETECTORS)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    neck = _neck(kind, backbone, pretrained_backbone, frozen_stages, ws_style, backbone_kwargs, p6p7_from)
    cfg = neck.pretrained_cfg or {}
    torchvision_kwargs.setdefault("image_mean", list(cfg.get("mean", (0.485, 0.456, 0.406))))
    torchvision_kwargs.setdefault("image_std", list(cfg.get("std", (0.229, 0.224, 0.225))))
    channels, style, eps = neck.out_channels, neck.ws_style, neck.ws_eps
    if kind == "fasterrcnn":
        model = FasterRCNN(neck, num_classes=num_classes, box_head=_box_head(channels, style, eps),
                           **torchvision_kwargs)
    elif kind == "maskrcnn":
        mask_head = MaskRCNNHeads(channels, [256, 256, 256, 256], 1, norm_layer=_gn())
        convert_convs_to_ws(mask_head, style=style, eps=eps)
        model = MaskRCNN(neck, num_classes=num_classes, box_head=_box_head(channels, style, eps),
                         mask_head=mask_head, **torchvision_kwargs)
    else:
        model = RetinaNet(neck, num_classes=num_classes, **torchvision_kwargs)
        head = RetinaNetHead(channels, model.anchor_generator.num_anchors_per_location()[0], num_classes,
                             norm_layer=_gn())
        convert_convs_to_ws(head, style=style, eps=eps,
                            exclude=("classification_head.cls_logits", "regression_head.bbox_reg"))
        model.head = head
    return speed.group_ws(model, group_ws)


"""WS backbones with a GroupNorm + WS feature pyramid, in the form torchvision's detectors expect."""
import logging
from collections import OrderedDict
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from .. import registry
from ..factory import create_model
from ..layers import WSConv2d, convert_convs_to_ws, is_ws_layer

__all__ = ["WSBackboneWithFPN", "WSLastLevelP6P7", "create_backbone", "ws_style_of", "check_backbone_reach"]

_logger = logging.getLogger("wszoo")
#: The families whose models reach stride 32 (detection and segmentation backbones).
BACKBONE_FAMILIES = "the GN+WS ResNets/ResNeXts (resnet*_gn_ws), BiT (resnetv2_*_bit) and the NF models (nf*, *nfnet*)"


def check_backbone_reach(name: str, reductions: Sequence[int], needed: int = 32) -> None:
    """Detection and segmentation need features down to stride ``needed``: the 28 px minis stop at 4."""
    if max(reductions) < needed:
        raise ValueError(f"{name} reaches stride {max(reductions)} only (a small-image classifier); detection and "
                         f"segmentation backbones need stride {needed}: use {BACKBONE_FAMILIES}")


def create_backbone(backbone: Union[str, nn.Module], out_indices: Sequence[int], pretrained: bool = False,
                    frozen_stages: int = -1, **kwargs) -> nn.Module:
    """A wszoo feature extractor (``features_only=True``) from a model name, or ``backbone`` as given."""
    if isinstance(backbone, str):
        with torch.device("meta"):  # how far the architecture reaches, known before anything is built
            probe = create_model(backbone)
        check_backbone_reach(backbone, [f["reduction"] for f in probe.feature_info])
        return create_model(backbone, pretrained=pretrained, features_only=True, out_indices=tuple(out_indices),
                            frozen_stages=frozen_stages, **kwargs)
    if not hasattr(backbone, "feature_info") or not callable(getattr(backbone.feature_info, "channels", None)):
        raise TypeError("backbone must be a model name or a wszoo features_only model")
    return backbone


def ws_style_of(module: nn.Module) -> Tuple[str, float]:
    """The WS formula (style, eps) of ``module``'s first WS layer, for necks and heads that follow their
    backbone's numerics. Scaled WS maps to its unscaled formula (``timm``): the neck's GroupNorm follows."""
    layer = next((m for m in module.modules() if is_ws_layer(m)), None)
    if layer is None:
        return "timm", 1e-6
    if layer.ws_style in ("timm_scaled", "deepmind"):
        return "timm", 1e-5
    return layer.ws_style, layer.ws_eps


class WSLastLevelP6P7(ExtraFPNBlock):
    """RetinaNet's extra levels as the GN+WS references build them: P6 a stride-2 3x3 WS conv on C5 (or P5)
    and P7 one on relu(P6), each followed by GroupNorm. A WS conv without a norm after it scales its output
    by about sqrt(fan-in) (x48 for 256 x 3 x 3 filters): at init P6/P7 would dwarf P3-P5 (x45, x1,200) and
    overflow fp16; the GroupNorm keeps every level at the others' scale."""

    def __init__(self, in_channels: int, out_channels: int, gn_groups: int = 32, ws_style: str = "timm",
                 ws_eps: Optional[float] = None, use_p5: bool = False) -> None:
        super().__init__()
        conv = partial(WSConv2d, kernel_size=3, stride=2, padding=1, style=ws_style, eps=ws_eps)
        self.p6 = nn.Sequential(conv(in_channels, out_channels), nn.GroupNorm(gn_groups, out_channels))
        self.p7 = nn.Sequential(conv(out_channels, out_channels), nn.GroupNorm(gn_groups, out_channels))
        self.use_p5 = use_p5

    def forward(self, results: List[torch.Tensor], x: List[torch.Tensor], names: List[str]
                ) -> Tuple[List[torch.Tensor], List[str]]:
        p6 = self.p6(results[-1] if self.use_p5 else x[-1])
        p7 = self.p7(F.relu(p6))
        return results + [p6, p7], names + ["p6", "p7"]


EXTRAS = ("pool", "p6p7", "p6p7_from_p5", None)


class WSBackboneWithFPN(nn.Module):
    """A wszoo backbone plus an FPN whose lateral and output convs are WS + GroupNorm (the GN+WS detection
    recipe). ``forward`` returns an ``OrderedDict`` of maps named ``'0', '1', ...`` (and ``'pool'`` or
    ``'p6', 'p7'``), all with ``out_channels`` channels, as torchvision's detectors take; ``strides`` lists
    their output strides.

    Args:
        backbone: a registered model name (built with ``features_only=True``) or such a module.
        out_indices: backbone levels fed to the FPN; ``(1, 2, 3, 4)`` = strides 4-32.
        out_channels: FPN width.
        extra: ``'pool'`` (a stride-2 max pool on the top map: Faster/Mask R-CNN), ``'p6p7'`` (RetinaNet's
            P6 from C5 and P7, :class:`WSLastLevelP6P7`), ``'p6p7_from_p5'`` (P6 from P5) or ``None``.
        gn_groups: the FPN's GroupNorm groups.
        ws_style, ws_eps: the FPN's standardization formula; ``None`` takes the backbone's (:func:`ws_style_of`).
        pretrained, frozen_stages, **kwargs: passed to :func:`wszoo.create_model` for the backbone.
    """

    def __init__(self, backbone: Union[str, nn.Module], out_indices: Sequence[int] = (1, 2, 3, 4),
                 out_channels: int = 256, extra: Optional[str] = "pool", gn_groups: int = 32,
                 ws_style: Optional[str] = None, ws_eps: Optional[float] = None, pretrained: bool = False,
                 frozen_stages: int = -1, **kwargs) -> None:
        super().__init__()
        if extra not in EXTRAS:
            raise ValueError(f"extra must be one of {EXTRAS}, got {extra!r}")
        self.body = create_backbone(backbone, out_indices, pretrained, frozen_stages, **kwargs)
        if ws_style is None:
            ws_style, ws_eps = ws_style_of(self.body)
        self.ws_style, self.ws_eps = ws_style, ws_eps
        in_channels = list(self.body.feature_info.channels())
        reductions = list(self.body.feature_info.reduction())
        extra_block: Optional[ExtraFPNBlock] = None
        if extra == "pool":
            extra_block, reductions = LastLevelMaxPool(), reductions + [reductions[-1] * 2]
        elif extra in ("p6p7", "p6p7_from_p5"):
            use_p5 = extra == "p6p7_from_p5"
            extra_block = WSLastLevelP6P7(out_channels if use_p5 else in_channels[-1], out_channels, gn_groups,
                                          ws_style, ws_eps, use_p5=use_p5)
            reductions = reductions + [reductions[-1] * 2, reductions[-1] * 4]
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_block,
                                         norm_layer=partial(nn.GroupNorm, gn_groups))
        convert_convs_to_ws(self.fpn, style=ws_style, eps=ws_eps)  # (the extra block's convs already are)
        self.out_channels = out_channels
        self.strides = reductions
        self.pretrained_cfg = getattr(self.body, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def has_published_weights(name: str) -> bool:
    """True if ``name`` (``arch`` or ``arch.tag``) has a pretrained tag to load."""
    return bool(registry.get_pretrained_cfg(name).get("tag"))

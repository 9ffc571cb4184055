"""BiT: pre-activation ResNet-v2 with GroupNorm and Weight Standardization (Kolesnikov et al., "Big
Transfer (BiT): General Visual Representation Learning", arXiv:1912.11370).

Numerics follow Google's release as ported by timm: ``timm``-style WS, ``(W - mean) / sqrt(var + 1e-8)``,
GroupNorm(32) + ReLU before every conv (He et al. 2016, "Identity Mappings"), the stride on the 3x3
conv, and the 'fixed' stem (7x7/2 conv, zero pad 1, 3x3/2 max pool). Module names are key-for-key
those of timm's ``resnetv2_*_bit`` models, so the ``timm/`` Hub checkpoints load unchanged.
"""
from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import DropPath

from ..layers import GroupNormAct, WSConv2d
from ..registry import register_model
from .helpers import (
    ClassifierHeadApi,
    IntermediatesApi,
    checkpoint_blocks,
    init_conv_and_norm,
    make_classifier_head,
    stage_strides_and_dilations,
)

__all__ = ["ResNetV2", "PreActBottleneck"]


class Projection(nn.Module):
    """1x1 (strided) projection of the pre-activated input onto the shortcut: ``downsample.conv``."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, conv_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.conv = conv_layer(in_chs, out_chs, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PreActBottleneck(nn.Module):
    """``x + conv3(a(conv2(a(conv1(a(x))))))`` with ``a = relu . GN``; the shortcut takes ``proj(a(x))``
    when the block changes width or stride."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        first_dilation: int = 1,
        project: bool = False,
        conv_layer: Callable[..., nn.Module] = WSConv2d,
        norm_layer: Callable[[int], nn.Module] = GroupNormAct,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        mid_chs = out_chs // 4
        self.downsample = Projection(in_chs, out_chs, stride, conv_layer) if project else None
        self.norm1 = norm_layer(in_chs)
        self.conv1 = conv_layer(in_chs, mid_chs, 1)
        self.norm2 = norm_layer(mid_chs)
        self.conv2 = conv_layer(mid_chs, mid_chs, 3, stride=stride, dilation=first_dilation)
        self.norm3 = norm_layer(mid_chs)
        self.conv3 = conv_layer(mid_chs, out_chs, 1)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm1(x)
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        x = self.conv1(x_preact)
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        return self.drop_path(x) + shortcut


class ResNetStage(nn.Module):
    """A run of bottlenecks; the first projects the shortcut (``stages.i.blocks.j``)."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, stride: int, dilation: int, first_dilation: int,
                 block_rates: Sequence[float], **block_kwargs) -> None:
        super().__init__()
        self.grad_checkpointing = False
        blocks = []
        for i in range(depth):
            blocks.append(PreActBottleneck(
                in_chs if i == 0 else out_chs, out_chs, stride=stride if i == 0 else 1,
                first_dilation=first_dilation if i == 0 else dilation, project=i == 0,
                drop_path_rate=block_rates[i], **block_kwargs,
            ))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint_blocks(self.blocks, x)
        return self.blocks(x)


class ResNetV2(IntermediatesApi, ClassifierHeadApi, nn.Module):
    """BiT ResNet-v2 (pre-activation, GN+WS).

    Args:
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for R50.
        width_factor: channel multiplier (the ``x1``/``x3`` of ``resnetv2_50x3_bit``).
        num_classes: classifier outputs (a 1x1 conv, ``head.fc``); 0 for none.
        in_chans: input image channels.
        global_pool: ``'avg'``, ``'max'``, ``'avgmax'``, ``'catavgmax'`` or ``''``.
        output_stride: 32, or 16/8 to dilate the last stages.
        ws_style, ws_eps: the standardization formula; BiT was trained with ``timm`` / 1e-8.
        drop_rate: dropout before the classifier; drop_path_rate: stochastic depth (rate per stage
            rising linearly, as timm's).
    """

    # features_only: the taps sit inside Sequential containers ('stem.conv', 'stages.0'), which must be flattened
    feature_wrap_cfg = {"flatten_sequential": True}

    def __init__(
        self,
        layers: Sequence[int],
        width_factor: int = 1,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        output_stride: int = 32,
        gn_groups: int = 32,
        ws_style: str = "timm",
        ws_eps: Optional[float] = 1e-8,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 stage depths, got {tuple(layers)}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        conv_layer = partial(WSConv2d, style=ws_style, eps=ws_eps)
        norm_layer = partial(GroupNormAct, num_groups=gn_groups)

        stem_chs = 64 * width_factor
        self.stem = nn.Sequential(OrderedDict([
            ("conv", conv_layer(in_chans, stem_chs, 7, stride=2)),
            ("pad", nn.ConstantPad2d(1, 0.0)),  # BiT's fixed approximation of TF 'SAME' for the pool
            ("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=0)),
        ]))
        self.feature_info = [dict(num_chs=stem_chs, reduction=2, module="stem.conv")]

        all_rates = torch.linspace(0, drop_path_rate, sum(layers), device="cpu").split(list(layers))
        prev_chs, reduction = stem_chs, 4
        self.stages = nn.Sequential()
        strides = stage_strides_and_dilations((1, 2, 2, 2), output_stride)
        for idx, (depth, chs, (stride, dilation, first_dilation), rates) in enumerate(
            zip(layers, (256, 512, 1024, 2048), strides, all_rates, strict=True)
        ):
            out_chs = chs * width_factor
            self.stages.add_module(str(idx), ResNetStage(
                prev_chs, out_chs, depth, stride, dilation, first_dilation, rates.tolist(),
                conv_layer=conv_layer, norm_layer=norm_layer,
            ))
            prev_chs, reduction = out_chs, reduction * stride
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{idx}"))

        self.num_features = self.head_hidden_size = prev_chs
        self.norm = norm_layer(prev_chs)
        self.head = make_classifier_head(prev_chs, num_classes, global_pool, drop_rate, use_conv=True)
        init_conv_and_norm(self)

    # --- timm model API -------------------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise learning rates: the stem, each stage or block, the final norm last."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))])

    def _stem_parts(self) -> Tuple[List[nn.Module], int]:
        return list(self.stem), 0  # the stem feature is the conv's output, before the padded max pool

    def _stage_list(self) -> List[nn.Module]:
        return list(self.stages)

    def _last_stage_output(self, x: torch.Tensor, norm: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        return x, (self.norm(x) if norm else x)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def _prune_to(self, deepest: int, prune_norm: bool, prune_end: bool) -> None:
        self.stages = self.stages[:deepest]
        if deepest == 0:
            self.stem = self.stem[:1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for (and applied to) the last stage only

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(x)))


@register_model
def resnetv2_50x1_bit(**kwargs) -> ResNetV2:
    """BiT-M R50x1."""
    return ResNetV2((3, 4, 6, 3), width_factor=1, **kwargs)


@register_model
def resnetv2_50x3_bit(**kwargs) -> ResNetV2:
    """BiT-M R50x3."""
    return ResNetV2((3, 4, 6, 3), width_factor=3, **kwargs)


@register_model
def resnetv2_101x1_bit(**kwargs) -> ResNetV2:
    """BiT-M R101x1."""
    return ResNetV2((3, 4, 23, 3), width_factor=1, **kwargs)


@register_model
def resnetv2_101x3_bit(**kwargs) -> ResNetV2:
    """BiT-M R101x3."""
    return ResNetV2((3, 4, 23, 3), width_factor=3, **kwargs)


@register_model
def resnetv2_152x2_bit(**kwargs) -> ResNetV2:
    """BiT-M R152x2."""
    return ResNetV2((3, 8, 36, 3), width_factor=2, **kwargs)


@register_model
def resnetv2_152x4_bit(**kwargs) -> ResNetV2:
    """BiT-M R152x4."""
    return ResNetV2((3, 8, 36, 3), width_factor=4, **kwargs)

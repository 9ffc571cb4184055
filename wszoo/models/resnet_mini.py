"""A small ResNet for 28-32 px images (the embedded Fashion-MNIST default and the micro-batch study).

CIFAR-style (He et al. 2016, section 4.2): a 3x3 stem at full resolution, three stages of basic
blocks at strides 1, 2, 2, global pooling and a linear classifier. The normalizer is a choice so the
same network can be compared with BatchNorm, GroupNorm, GroupNorm + WS and Batch-Channel Norm + WS:

* ``resnet_mini_gn_ws``: GroupNorm + WS (``timm`` style), the embedded default's architecture;
* ``resnet_mini_bcn_ws``: Batch-Channel Norm with estimated batch statistics + WS (``bcn`` style),
  the BCN paper's micro-batch recipe;
* ``resnet_mini_gn``: GroupNorm, plain convs;
* ``resnet_mini_bn``: BatchNorm, plain convs.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers import BatchChannelNorm2d, WSConv2d
from ..registry import register_model
from .helpers import (
    ClassifierHeadApi,
    IntermediatesApi,
    check_global_pool,
    checkpoint_blocks,
    init_conv_and_norm,
    make_classifier_head,
)

__all__ = ["MiniResNet", "make_norm"]


def make_norm(kind: str, gn_groups: int = 8) -> Callable[[int], nn.Module]:
    """``'bn'`` -> BatchNorm2d, ``'gn'`` -> GroupNorm(gn_groups), ``'bcn'`` -> BatchChannelNorm2d(gn_groups)
    with estimated batch statistics (its micro-batch form: a batch of 1 trains like a batch of 32)."""
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "gn":
        return partial(nn.GroupNorm, gn_groups)
    if kind == "bcn":
        return partial(BatchChannelNorm2d, num_groups=gn_groups, estimate=True)
    raise ValueError(f"unknown norm {kind!r}; choose 'bn', 'gn' or 'bcn'")


class BasicBlock(nn.Module):
    """``relu(x' + norm(conv(relu(norm(conv(x))))))``, with a 1x1 projection when the shape changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, conv: Callable, norm: Callable) -> None:
        super().__init__()
        self.conv1 = conv(in_chs, out_chs, 3, stride=stride, padding=1)
        self.bn1 = norm(out_chs)
        self.conv2 = conv(out_chs, out_chs, 3, padding=1)
        self.bn2 = norm(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(conv(in_chs, out_chs, 1, stride=stride, padding=0), norm(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class MiniResNet(IntermediatesApi, ClassifierHeadApi, nn.Module):
    """Small CIFAR-style ResNet with a selectable normalizer and optional weight standardization."""

    # features_only: the stage taps ('stages.0') sit inside a Sequential, which must be flattened
    feature_wrap_cfg = {"flatten_sequential": True}

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        widths: Sequence[int] = (32, 64, 128),
        depths: Sequence[int] = (2, 2, 2),
        norm: str = "gn",
        ws: bool = True,
        ws_style: str = "timm",
        ws_eps: Optional[float] = 1e-5,
        gn_groups: int = 8,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError(f"widths {tuple(widths)} and depths {tuple(depths)} must have the same length")
        if drop_path_rate:
            raise ValueError("MiniResNet has no stochastic depth; use drop_rate")
        check_global_pool(global_pool, num_classes)  # before anything is built
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.grad_checkpointing = False
        conv = partial(WSConv2d, bias=False, style=ws_style, eps=ws_eps) if ws else partial(nn.Conv2d, bias=False)
        norm_layer = make_norm(norm, gn_groups)
        self.conv1 = conv(in_chans, widths[0], 3, stride=1, padding=1)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="relu")]
        stages, prev, reduction = [], widths[0], 1
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            stages.append(nn.Sequential(*[
                BasicBlock(prev if j == 0 else width, width, stride if j == 0 else 1, conv, norm_layer)
                for j in range(depth)
            ]))
            prev = width
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev
        self.head = make_classifier_head(prev, num_classes, global_pool, drop_rate)
        init_conv_and_norm(self)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise learning rates: the stem, then each stage or block."""
        return dict(stem=r"^conv1|bn1", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    def _stem_parts(self) -> Tuple[List[nn.Module], int]:
        return [self.conv1, self.bn1, self.relu], 2

    def _stage_list(self) -> List[nn.Module]:
        return list(self.stages)

    def _prune_to(self, deepest: int, prune_norm: bool, prune_end: bool) -> None:
        self.stages = self.stages[:deepest]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for stage in self.stages:
                x = checkpoint_blocks(stage, x)
        else:
            x = self.stages(x)
        return x


@register_model
def resnet_mini_gn_ws(**kwargs) -> MiniResNet:
    """Small ResNet (3 stages of 2 basic blocks, 32-64-128 wide) with GroupNorm(8) + WS: the embedded default."""
    return MiniResNet(norm="gn", ws=True, **kwargs)


@register_model
def resnet_mini_bcn_ws(**kwargs) -> MiniResNet:
    """The small ResNet with Batch-Channel Norm (estimated statistics, 8 groups) + WS in the BCN repo's
    ``bcn`` style (micro-batch study)."""
    kwargs.setdefault("ws_style", "bcn")
    return MiniResNet(norm="bcn", ws=True, **kwargs)


@register_model
def resnet_mini_gn(**kwargs) -> MiniResNet:
    """The small ResNet with GroupNorm(8) and plain convs (micro-batch study baseline)."""
    return MiniResNet(norm="gn", ws=False, **kwargs)


@register_model
def resnet_mini_bn(**kwargs) -> MiniResNet:
    """The small ResNet with BatchNorm and plain convs (micro-batch study baseline)."""
    return MiniResNet(norm="bn", ws=False, **kwargs)

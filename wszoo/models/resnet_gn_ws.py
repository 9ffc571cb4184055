"""GN+WS ResNet and ResNeXt (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and
Weight Standardization", arXiv:1903.10520): the authors' ImageNet models, and ResNet-18/34 with the same
numerics on basic blocks (no published weights: the small backbones for CPU-sized studies).

Every convolution (stem, blocks, projections) is weight-standardized in the ``qiao`` style
``(W - mean) / (std_unbiased + 1e-5)`` and every BatchNorm of ResNet-v1.5 is GroupNorm(32). Module
names are exactly torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``downsample.0/1``, ``fc``; the
``bn*`` modules hold GroupNorm), so the released checkpoints and torchvision-style tools need no
key remapping.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import DropPath, SelectAdaptivePool2d

from ..layers import WSConv2d
from ..registry import register_model
from .helpers import (
    IntermediatesApi,
    check_global_pool,
    checkpoint_blocks,
    init_classifier_,
    init_conv_and_norm,
    stage_strides_and_dilations,
)

__all__ = ["GNWSResNet", "Bottleneck", "BasicBlock"]


class BasicBlock(nn.Module):
    """ResNet basic block (ResNet-18/34): ``relu(x' + GN(conv2(relu(GN(conv1(x))))))``, two 3x3 convs, the
    stride on the first. ``dilation`` is the first conv's, ``next_dilation`` the second's (a dilated stage's
    first block still enters at the previous stage's dilation)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        next_dilation: Optional[int] = None,
        conv_layer: Callable[..., nn.Module] = WSConv2d,
        norm_layer: Callable[[int], nn.Module] = partial(nn.GroupNorm, 32),
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("basic blocks (ResNet-18/34) have no groups or width: pass groups=1, width_per_group=64")
        next_dilation = next_dilation or dilation
        self.conv1 = conv_layer(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv_layer(planes, planes, 3, padding=next_dilation, dilation=next_dilation)
        self.bn2 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.relu(self.drop_path(x) + shortcut)


class Bottleneck(nn.Module):
    """ResNet-v1.5 bottleneck: ``relu(x' + GN(conv3(relu(GN(conv2(relu(GN(conv1(x)))))))))``.

    The stride sits on the 3x3 conv (v1.5); ``groups``/``base_width`` make it a ResNeXt block.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        conv_layer: Callable[..., nn.Module] = WSConv2d,
        norm_layer: Callable[[int], nn.Module] = partial(nn.GroupNorm, 32),
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv_layer(inplanes, width, 1, padding=0)
        self.bn1 = norm_layer(width)
        self.conv2 = conv_layer(width, width, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups)
        self.bn2 = norm_layer(width)
        self.conv3 = conv_layer(width, planes * self.expansion, 1, padding=0)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.relu(self.drop_path(x) + shortcut)


class GNWSResNet(IntermediatesApi, nn.Module):
    """ResNet/ResNeXt with GroupNorm + Weight Standardization, in torchvision's module layout.

    Args:
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        block: :class:`Bottleneck` (ResNet-50 and deeper, ResNeXt) or :class:`BasicBlock` (ResNet-18/34).
        num_classes: classifier outputs; 0 gives no classifier (``forward`` returns pooled features).
        in_chans: input image channels.
        groups, width_per_group: ResNeXt cardinality and per-group width (1, 64 for plain ResNet).
        global_pool: ``'avg'``, ``'max'``, ``'avgmax'``, ``'catavgmax'`` or ``''`` (no pooling: the unpooled
            ``(N, C, H, W)`` map, with ``num_classes=0``).
        output_stride: 32, or 16/8 to dilate the last stages (dense prediction).
        gn_groups: GroupNorm groups (32 in the paper).
        ws_style, ws_eps: the standardization formula (:func:`wszoo.layers.standardize_weight`);
            the released checkpoints were trained with ``qiao`` / 1e-5.
        drop_rate: dropout before the classifier; drop_path_rate: stochastic depth, linear over blocks.
        zero_init_last: start every residual branch at zero (the last GN's scale), for training from scratch.
    """

    # features_only: the stages are top-level modules in torchvision's layout ('layer1'); keep them as they are
    feature_wrap_cfg = {"flatten_sequential": False}
    __jit_unused_properties__ = ["global_pool_type"]

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        groups: int = 1,
        width_per_group: int = 64,
        global_pool: str = "avg",
        output_stride: int = 32,
        gn_groups: int = 32,
        ws_style: str = "qiao",
        ws_eps: Optional[float] = 1e-5,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        zero_init_last: bool = False,
        block: type = Bottleneck,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 stage depths, got {tuple(layers)}")
        check_global_pool(global_pool, num_classes)  # before anything is built
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        conv_layer = partial(WSConv2d, bias=False, style=ws_style, eps=ws_eps)
        norm_layer = partial(nn.GroupNorm, gn_groups)

        self.conv1 = conv_layer(in_chans, 64, 7, stride=2, padding=3)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=64, reduction=2, module="relu")]

        block_rates = torch.linspace(0, drop_path_rate, sum(layers), device="cpu").tolist()
        inplanes, reduction, block_idx = 64, 4, 0
        strides = stage_strides_and_dilations((1, 2, 2, 2), output_stride)
        for stage_idx, (depth, planes, (stride, dilation, first_dilation)) in enumerate(
            zip(layers, (64, 128, 256, 512), strides, strict=True)
        ):
            blocks: List[nn.Module] = []
            for i in range(depth):
                downsample = None
                if i == 0 and (stride != 1 or inplanes != planes * block.expansion):
                    downsample = nn.Sequential(
                        conv_layer(inplanes, planes * block.expansion, 1, stride=stride, padding=0),
                        norm_layer(planes * block.expansion),
                    )
                dilations = {"dilation": first_dilation if i == 0 else dilation}
                if block is BasicBlock:
                    dilations["next_dilation"] = dilation
                blocks.append(block(
                    inplanes, planes, stride=stride if i == 0 else 1, downsample=downsample, groups=groups,
                    base_width=width_per_group, conv_layer=conv_layer, norm_layer=norm_layer,
                    drop_path_rate=block_rates[block_idx], **dilations,
                ))
                inplanes = planes * block.expansion
                block_idx += 1
            reduction *= stride
            name = f"layer{stage_idx + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=inplanes, reduction=reduction, module=name))

        self.num_features = self.head_hidden_size = inplanes
        self.avgpool = self._make_pool(global_pool, num_classes)
        self.fc = self._make_fc(num_classes)
        init_conv_and_norm(self)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, (Bottleneck, BasicBlock)):
                    nn.init.zeros_(m.bn3.weight if isinstance(m, Bottleneck) else m.bn2.weight)

    @staticmethod
    def _make_pool(global_pool: str, num_classes: int) -> nn.Module:
        """timm's pooling: ``''`` keeps the (N, C, H, W) map, which only a model without classifier can return."""
        check_global_pool(global_pool, num_classes)
        return SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))

    def _make_fc(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        return nn.Linear(self.num_features * self.avgpool.feat_mult(), num_classes)

    # --- timm model API -------------------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    @property
    def global_pool_type(self) -> str:
        """The global pooling now in use (``'avg'``, ``'max'``, ``''`` ...), as ``reset_classifier`` takes it."""
        return self.avgpool.pool_type

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (new random ``fc``, 0 for none), optionally with another pooling."""
        pool = self._make_pool(self.global_pool_type if global_pool is None else global_pool, num_classes)
        self.num_classes, self.avgpool = num_classes, pool
        device = next(self.parameters()).device
        self.fc = self._make_fc(num_classes).to(device)
        init_classifier_(self.fc)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise learning rates (timm's ``param_groups_layer_decay``): the stem,
        then each stage (``coarse``) or each block."""
        return dict(stem=r"^conv1|bn1|maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    def _stem_parts(self) -> Tuple[List[nn.Module], int]:
        return [self.conv1, self.bn1, self.relu, self.maxpool], 2

    def _stage_list(self) -> List[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _prune_to(self, deepest: int, prune_norm: bool, prune_end: bool) -> None:
        for i in range(deepest + 1, 5):
            setattr(self, f"layer{i}", nn.Sequential())  # empty: torchvision's names stay, nothing runs
        if deepest == 0:
            self.maxpool = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = checkpoint_blocks(stage, x)
        else:
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.avgpool(x)
        if self.drop_rate > 0:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def resnet18_gn_ws(**kwargs) -> GNWSResNet:
    """ResNet-18 with GN+WS on basic blocks (the authors' WS formula, GroupNorm(32)); no published weights."""
    return GNWSResNet((2, 2, 2, 2), block=BasicBlock, **kwargs)


@register_model
def resnet34_gn_ws(**kwargs) -> GNWSResNet:
    """ResNet-34 with GN+WS on basic blocks (the authors' WS formula, GroupNorm(32)); no published weights."""
    return GNWSResNet((3, 4, 6, 3), block=BasicBlock, **kwargs)


@register_model
def resnet50_gn_ws(**kwargs) -> GNWSResNet:
    """ResNet-50 with GN+WS (Qiao et al. 2019): 76.28% ImageNet top-1 for the authors' release."""
    return GNWSResNet((3, 4, 6, 3), **kwargs)


@register_model
def resnet101_gn_ws(**kwargs) -> GNWSResNet:
    """ResNet-101 with GN+WS (Qiao et al. 2019): 77.90% ImageNet top-1 for the authors' release."""
    return GNWSResNet((3, 4, 23, 3), **kwargs)


@register_model
def resnext50_32x4d_gn_ws(**kwargs) -> GNWSResNet:
    """ResNeXt-50 32x4d with GN+WS (Qiao et al. 2019): 77.29% ImageNet top-1 for the authors' release."""
    return GNWSResNet((3, 4, 6, 3), groups=32, width_per_group=4, **kwargs)


@register_model
def resnext101_32x4d_gn_ws(**kwargs) -> GNWSResNet:
    """ResNeXt-101 32x4d with GN+WS (Qiao et al. 2019): 78.20% ImageNet top-1 for the authors' release."""
    return GNWSResNet((3, 4, 23, 3), groups=32, width_per_group=4, **kwargs)

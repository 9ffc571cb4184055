"""R+ViT hybrids: a GN+WS ResNet whose feature map is the token grid of a Vision Transformer (Dosovitskiy et al.,
"An Image is Worth 16x16 Words", arXiv:2010.11929, section 3.1 "Hybrid Architecture"; the AugReg weights of
Steiner et al., "How to train your ViT?", arXiv:2106.10270).

The CNN is ours, on wszoo's WS layers, with the numerics of Google's release as timm ports it: ``timm``-style
WS with eps 1e-8, TensorFlow 'SAME' padding in every conv and in the stem's max pool, and *post*-activation
bottlenecks (``relu(x + GN(conv3(...)))``, GroupNorm(32) after every conv, the projection shortcut a WS conv
plus GroupNorm) unlike BiT's pre-activation ones, and no stochastic depth in the CNN (timm's hybrids have none;
``drop_path_rate`` is the transformer's). Its last map goes through timm's ``HybridEmbed`` (a 1x1
projection, or 8x8 patches for the tiny model) into timm's own ``VisionTransformer``, which this family
subclasses and does not rewrite. Module names are key-for-key timm's ``vit_*_r*`` models, so the
``timm/`` Hub checkpoints load unchanged.

Features: ``forward_intermediates`` and ``feature_info`` are timm's (transformer blocks, as in timm).
``features_only=True`` returns the CNN's maps (stem and stages, strides 2 to 16 or 32): the multi-scale WS
backbone that detection and segmentation heads take.
"""
from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import HybridEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from ..layers import GroupNormAct, MaxPool2dSame, WSConv2dSame, WSLayer
from ..registry import register_model
from .helpers import IntermediatesApi, checkpoint_blocks, init_conv_and_norm

__all__ = ["HybridViT", "HybridResNet", "HybridStem", "Bottleneck"]


class Bottleneck(nn.Module):
    """Post-activation bottleneck (ResNet v1.5, stride on the 3x3): ``relu(shortcut + GN(conv3(a(conv2(a(conv1
    (x)))))))`` with ``a = relu . GN``; the shortcut is ``GN(proj(x))`` when the block changes width or stride."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, project: bool, conv_layer: Callable[..., nn.Module],
                 norm_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        mid_chs = out_chs // 4
        self.downsample = Downsample(in_chs, out_chs, stride, conv_layer, norm_layer) if project else None
        self.conv1 = conv_layer(in_chs, mid_chs, 1)
        self.norm1 = norm_layer(mid_chs)
        self.conv2 = conv_layer(mid_chs, mid_chs, 3, stride=stride)
        self.norm2 = norm_layer(mid_chs)
        self.conv3 = conv_layer(mid_chs, out_chs, 1)
        self.norm3 = norm_layer(out_chs, apply_act=False)
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return self.act3(x + shortcut)


class Downsample(nn.Module):
    """The projection shortcut: a (strided) 1x1 WS conv and GroupNorm without activation (``downsample.conv``,
    ``downsample.norm``)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, conv_layer: Callable[..., nn.Module],
                 norm_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.conv = conv_layer(in_chs, out_chs, 1, stride=stride)
        self.norm = norm_layer(out_chs, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class ResNetStage(nn.Module):
    """A run of bottlenecks; the first one projects the shortcut (``stages.i.blocks.j``)."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, stride: int, conv_layer: Callable[..., nn.Module],
                 norm_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[
            Bottleneck(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1, project=i == 0,
                       conv_layer=conv_layer, norm_layer=norm_layer)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint_blocks(self.blocks, x)
        return self.blocks(x)


def _stem_layers(in_chans: int, out_chs: int, conv_layer: Callable[..., nn.Module],
                 norm_layer: Callable[..., nn.Module]) -> "OrderedDict[str, nn.Module]":
    """7x7/2 WS conv, GroupNorm + ReLU, 3x3/2 max pool, both with TF 'SAME' padding (timm's stem_type 'same')."""
    return OrderedDict([
        ("conv", conv_layer(in_chans, out_chs, 7, stride=2)),
        ("norm", norm_layer(out_chs)),
        ("pool", MaxPool2dSame(kernel_size=3, stride=2)),
    ])


class _CnnFeatures(IntermediatesApi):
    """The CNN's side of the feature API (its own ``forward_intermediates`` for ``feature_cls='getter'``); it has
    no classifier, so pruning only drops layers."""

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int = 0, global_pool: Optional[str] = None) -> None:
        if num_classes:
            raise ValueError("a hybrid's CNN has no classifier; reset the hybrid's (model.reset_classifier)")


class HybridStem(_CnnFeatures, nn.Sequential):
    """The tiny hybrid's whole CNN: the stem alone (``patch_embed.backbone.conv``/``.norm``, stride 4), whose
    map is cut into 8x8 patches."""

    def __init__(self, in_chans: int, out_chs: int, conv_layer: Callable[..., nn.Module],
                 norm_layer: Callable[..., nn.Module]) -> None:
        super().__init__(_stem_layers(in_chans, out_chs, conv_layer, norm_layer))
        self.num_features = out_chs
        self.feature_info = [dict(num_chs=out_chs, reduction=2, module="norm")]
        init_conv_and_norm(self)

    def _stem_parts(self) -> Tuple[List[nn.Module], int]:
        return list(self), 1

    def _stage_list(self) -> List[nn.Module]:
        return []

    def _prune_to(self, deepest: int, prune_norm: bool, prune_end: bool) -> None:
        pass


class HybridResNet(_CnnFeatures, nn.Module):
    """The ResNet of the R26/R50 hybrids: the stem, then stages of post-activation bottlenecks at widths 256,
    512, 1024, 2048 (the first stride 1, the others 2). Its output (no final norm, no head) is the token map."""

    feature_wrap_cfg = {"flatten_sequential": True}  # the taps sit inside Sequentials ('stem.norm', 'stages.0')

    def __init__(self, layers: Sequence[int], in_chans: int, conv_layer: Callable[..., nn.Module],
                 norm_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.stem = nn.Sequential(_stem_layers(in_chans, 64, conv_layer, norm_layer))
        self.feature_info = [dict(num_chs=64, reduction=2, module="stem.norm")]
        prev_chs, reduction = 64, 4
        self.stages = nn.Sequential()
        for idx, (depth, out_chs) in enumerate(zip(layers, (256, 512, 1024, 2048), strict=False)):
            stride = 1 if idx == 0 else 2
            self.stages.add_module(str(idx), ResNetStage(prev_chs, out_chs, depth, stride, conv_layer, norm_layer))
            prev_chs, reduction = out_chs, reduction * stride
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{idx}"))
        self.num_features = prev_chs
        init_conv_and_norm(self)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def _stem_parts(self) -> Tuple[List[nn.Module], int]:
        return list(self.stem), 1

    def _stage_list(self) -> List[nn.Module]:
        return list(self.stages)

    def _prune_to(self, deepest: int, prune_norm: bool, prune_end: bool) -> None:
        self.stages = self.stages[:deepest]
        if deepest == 0:
            self.stem = self.stem[:2]  # the stem feature is the activation, before the pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class HybridViT(VisionTransformer):
    """timm's ``VisionTransformer`` embedding a WS CNN's feature map (timm's ``HybridEmbed``).

    Args:
        layers: bottlenecks per CNN stage, e.g. ``(3, 4, 9)`` for the R50 of ViT-B/16 (three stages: stride
            16) or ``(2, 2, 2, 2)`` for R26 (stride 32); ``()`` for the stem alone (the tiny model).
        patch_size: patch size on the CNN's map (1: every map pixel is a token; 8 for the tiny model).
        img_size: the input size the position embedding is laid out for (loading a checkpoint made at
            another size resamples it, as timm does).
        ws_style, ws_eps: the CNN's standardization; the published weights were trained with ``timm`` / 1e-8.
        **kwargs: timm's ``VisionTransformer`` arguments (``embed_dim``, ``depth``, ``num_heads``,
            ``num_classes``, ``global_pool``, ``drop_rate``, ``drop_path_rate`` (transformer blocks), ...).
    """

    def __init__(self, layers: Sequence[int], patch_size: int = 1, img_size: int = 224, in_chans: int = 3,
                 ws_style: str = "timm", ws_eps: Optional[float] = 1e-8, **kwargs: Any) -> None:
        conv_layer = partial(WSConv2dSame, style=ws_style, eps=ws_eps)
        norm_layer = partial(GroupNormAct, num_groups=32)
        if layers:
            cnn: nn.Module = HybridResNet(layers, in_chans, conv_layer, norm_layer)
        else:
            cnn = HybridStem(in_chans, 64, conv_layer, norm_layer)
        # HybridEmbed runs the CNN once at img_size to size the token grid: with the WS eval cache, that would
        # leave a standardized copy of every CNN weight behind, so the cache is dropped right after
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                         embed_layer=partial(HybridEmbed, backbone=cnn), **kwargs)
        for module in cnn.modules():
            if isinstance(module, WSLayer):
                module.clear_ws_cache()

    @property
    def global_pool_type(self) -> str:
        """The pooling of the token sequence (``'token'``, ``'avg'``, ...; ``''`` none), as saved with the model."""
        return self.global_pool

    @torch.jit.ignore
    def feature_backbone(self) -> nn.Module:
        """What ``features_only=True`` wraps: the CNN (its stem and stage maps)."""
        return self.patch_embed.backbone

    @torch.jit.ignore
    def adapt_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """A checkpoint laid out for another token grid (another ``img_size``): its position embedding is
        resampled to this model's grid (bicubic, antialiased: timm's ``resample_abs_pos_embed``)."""
        pos = state_dict.get("pos_embed")
        if pos is not None and pos.shape != self.pos_embed.shape:
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            state_dict = dict(state_dict)
            state_dict["pos_embed"] = resample_abs_pos_embed(
                pos, new_size=list(self.patch_embed.grid_size), num_prefix_tokens=prefix, verbose=False)
        return state_dict


def _hybrid(layers: Sequence[int], arch_args: Dict[str, Any], kwargs: Dict[str, Any]) -> HybridViT:
    """The architecture's transformer arguments, any of which the caller's override (as timm's entrypoints)."""
    return HybridViT(layers, **{"img_size": 224, "patch_size": 1, **arch_args, **kwargs})


@register_model
def vit_tiny_r_s16_p8_224(**kwargs) -> HybridViT:
    """R+ViT-Ti/S16: the stem (stride 4), 8x8 patches, ViT-Ti; 224 x 224."""
    return _hybrid((), dict(embed_dim=192, depth=12, num_heads=3, patch_size=8), kwargs)


@register_model
def vit_tiny_r_s16_p8_384(**kwargs) -> HybridViT:
    """R+ViT-Ti/S16: the stem (stride 4), 8x8 patches, ViT-Ti; 384 x 384."""
    return _hybrid((), dict(embed_dim=192, depth=12, num_heads=3, patch_size=8, img_size=384), kwargs)


@register_model
def vit_small_r26_s32_224(**kwargs) -> HybridViT:
    """R26+ViT-S/S32 (stride 32 tokens); 224 x 224."""
    return _hybrid((2, 2, 2, 2), dict(embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model
def vit_small_r26_s32_384(**kwargs) -> HybridViT:
    """R26+ViT-S/S32 (stride 32 tokens); 384 x 384."""
    return _hybrid((2, 2, 2, 2), dict(embed_dim=384, depth=12, num_heads=6, img_size=384), kwargs)


@register_model
def vit_base_r50_s16_224(**kwargs) -> HybridViT:
    """R50+ViT-B/16 of the ViT paper (three ResNet stages: stride 16 tokens); 224 x 224."""
    return _hybrid((3, 4, 9), dict(embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model
def vit_base_r50_s16_384(**kwargs) -> HybridViT:
    """R50+ViT-B/16 of the ViT paper (three ResNet stages: stride 16 tokens); 384 x 384."""
    return _hybrid((3, 4, 9), dict(embed_dim=768, depth=12, num_heads=12, img_size=384), kwargs)


@register_model
def vit_large_r50_s32_224(**kwargs) -> HybridViT:
    """R50+ViT-L/S32 (stride 32 tokens); 224 x 224."""
    return _hybrid((3, 4, 6, 3), dict(embed_dim=1024, depth=24, num_heads=16), kwargs)


@register_model
def vit_large_r50_s32_384(**kwargs) -> HybridViT:
    """R50+ViT-L/S32 (stride 32 tokens); 384 x 384."""
    return _hybrid((3, 4, 6, 3), dict(embed_dim=1024, depth=24, num_heads=16, img_size=384), kwargs)

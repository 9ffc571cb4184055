"""Normalizer-free networks on Scaled Weight Standardization: NF-ResNets, NF-RegNets and NFNets.

Papers: Brock, De, Smith, "Characterizing signal propagation to close the performance gap in
unnormalized ResNets" (arXiv:2101.08692) and Brock, De, Smith, Simonyan, "High-Performance
Large-Scale Image Recognition Without Normalization" (arXiv:2102.06171).

There is no activation normalizer. Each residual block computes

    h_{l+1} = h_l + alpha * f_l(h_l / beta_l),    beta_l = sqrt(Var(h_l))

where the expected variance grows by ``alpha**2`` per block and is reset to 1 after each transition
(projecting) block, whose shortcut also sees ``h_l / beta_l``. Scaled WS convolutions and
variance-preserving activations (``gamma * act``) keep ``Var(f_l) ~ 1`` at initialization.

Module names are key-for-key timm's ``nfnet.py`` models, so the ``timm/`` Hub checkpoints load. The
``dm_`` models follow DeepMind's release: TF 'SAME' padding, gamma applied in the activation, and a
learnable ``skipinit_gain`` (initialised to 0) on every residual branch.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import AvgPool2dSame, ClassifierHead, DropPath, make_divisible

from ..layers import NONLIN_GAMMA, GammaAct, ScaledWSConv2d, ScaledWSConv2dSame, create_act
from ..layers.attention import create_attn
from ..registry import register_model
from ._helpers import ClassifierHeadApi, check_output_stride, checkpoint_blocks

__all__ = ["NFNetConfig", "NormFreeNet", "NormFreeBlock"]


@dataclass(frozen=True)
class NFNetConfig:
    """Everything that distinguishes one NF architecture from another (timm's ``NfCfg`` fields)."""

    depths: Tuple[int, int, int, int]
    channels: Tuple[int, int, int, int]
    alpha: float = 0.2
    stem_type: str = "3x3"  # '3x3' (RegNet), '7x7_pool' (ResNet), 'deep_quad' (NFNet)
    stem_chs: Optional[int] = None
    group_size: Optional[int] = None
    attn_layer: Optional[str] = None  # 'se', 'eca' or None
    attn_kwargs: Dict[str, Any] = field(default_factory=dict)
    attn_gain: float = 2.0  # restores the variance the sigmoid gate halves
    width_factor: float = 1.0
    bottle_ratio: float = 0.5
    num_features: int = 0  # width of a final 1x1 conv; 0 for none
    ch_div: int = 8
    reg: bool = False  # RegNet-style blocks: width from in_chs, attention before conv3
    extra_conv: bool = False  # NFNet's second 3x3 conv
    gamma_in_act: bool = False  # DeepMind: gamma * act(x); timm: gamma folded into the conv scale
    same_padding: bool = False  # TF 'SAME' padding (DeepMind checkpoints)
    std_conv_eps: float = 1e-5
    ws_style: str = "timm_scaled"  # 'deepmind' (with std_conv_eps=1e-4) reproduces the Haiku numerics exactly
    skipinit: bool = False
    act_layer: str = "silu"


class DownsampleAvg(nn.Module):
    """Transition shortcut: 2x2 average pool (ResNet-D) then a 1x1 Scaled WS conv."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, dilation: int, conv_layer: Callable) -> None:
        super().__init__()
        avg_stride = stride if dilation == 1 else 1
        if stride > 1 or dilation > 1:
            pool = AvgPool2dSame if avg_stride == 1 and dilation > 1 else nn.AvgPool2d
            self.pool = pool(2, avg_stride, ceil_mode=True, count_include_pad=False)
        else:
            self.pool = nn.Identity()
        self.conv = conv_layer(in_chs, out_chs, 1, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class NormFreeBlock(nn.Module):
    """One NF residual block: ``x + alpha * f(act(x) * beta)`` (see the module docstring).

    ``f`` is conv1 (1x1) -> conv2 (3x3, grouped, strided) [-> conv2b] [-> attention] -> conv3 (1x1)
    with an activation before each conv; a skipinit gain scales ``f`` when enabled.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: Optional[int] = None,
        alpha: float = 1.0,
        beta: float = 1.0,
        bottle_ratio: float = 0.25,
        group_size: Optional[int] = None,
        ch_div: int = 1,
        reg: bool = True,
        extra_conv: bool = False,
        skipinit: bool = False,
        attn: Optional[Callable[[int], nn.Module]] = None,
        attn_gain: float = 2.0,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        conv_layer: Callable[..., nn.Module] = ScaledWSConv2d,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        first_dilation = first_dilation or dilation
        mid_chs = make_divisible(in_chs * bottle_ratio if reg else out_chs * bottle_ratio, ch_div)
        groups = 1 if not group_size else mid_chs // group_size
        if group_size and group_size % ch_div == 0:
            mid_chs = group_size * groups
        self.alpha, self.beta, self.attn_gain = alpha, beta, attn_gain

        project = in_chs != out_chs or stride != 1 or dilation != first_dilation
        self.downsample = DownsampleAvg(in_chs, out_chs, stride, dilation, conv_layer) if project else None
        self.act1 = act_layer()
        self.conv1 = conv_layer(in_chs, mid_chs, 1)
        self.act2 = act_layer(inplace=True)
        self.conv2 = conv_layer(mid_chs, mid_chs, 3, stride=stride, dilation=first_dilation, groups=groups)
        if extra_conv:
            self.act2b = act_layer(inplace=True)
            self.conv2b = conv_layer(mid_chs, mid_chs, 3, stride=1, dilation=dilation, groups=groups)
        else:
            self.act2b = self.conv2b = None
        self.attn = attn(mid_chs) if reg and attn is not None else None
        self.act3 = act_layer()
        # conv3's gain starts at 0 (the branch is off) unless a skipinit gain does that job
        self.conv3 = conv_layer(mid_chs, out_chs, 1, gain_init=1.0 if skipinit else 0.0)
        self.attn_last = attn(out_chs) if not reg and attn is not None else None
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.skipinit_gain = nn.Parameter(torch.tensor(0.0)) if skipinit else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(x) * self.beta  # h / beta, pre-activated
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv2(self.act2(self.conv1(out)))
        if self.conv2b is not None:
            out = self.conv2b(self.act2b(out))
        if self.attn is not None:
            out = self.attn_gain * self.attn(out)
        out = self.conv3(self.act3(out))
        if self.attn_last is not None:
            out = self.attn_gain * self.attn_last(out)
        out = self.drop_path(out)
        if self.skipinit_gain is not None:
            out = out * self.skipinit_gain
        return out * self.alpha + shortcut


def _make_stem(in_chs: int, out_chs: int, stem_type: str, conv_layer: Callable, act_layer: Callable
               ) -> Tuple[nn.Sequential, int, Dict[str, Any]]:
    """The stem, its stride, and its feature tap (``stem.conv`` or, for deep stems, the last-but-one conv)."""
    stem: "OrderedDict[str, nn.Module]" = OrderedDict()
    if stem_type == "deep_quad":  # NFNet: four 3x3 convs, strides 2,1,1,2
        chs, strides = (out_chs // 8, out_chs // 4, out_chs // 2, out_chs), (2, 1, 1, 2)
        for i, (c, s) in enumerate(zip(chs, strides)):
            stem[f"conv{i + 1}"] = conv_layer(in_chs, c, kernel_size=3, stride=s)
            if i < len(chs) - 1:
                stem[f"act{i + 2}"] = act_layer(inplace=i < len(chs) - 2)
            in_chs = c
        return nn.Sequential(stem), 4, dict(num_chs=out_chs // 2, reduction=2, module="stem.conv3")
    if stem_type == "3x3":  # RegNet
        stem["conv"] = conv_layer(in_chs, out_chs, kernel_size=3, stride=2)
        return nn.Sequential(stem), 2, dict(num_chs=out_chs, reduction=2, module="stem.conv")
    if stem_type == "7x7_pool":  # ResNet
        stem["conv"] = conv_layer(in_chs, out_chs, kernel_size=7, stride=2)
        stem["pool"] = nn.MaxPool2d(3, stride=2, padding=1)
        return nn.Sequential(stem), 4, dict(num_chs=out_chs, reduction=2, module="stem.conv")
    raise ValueError(f"unknown stem_type {stem_type!r}; choose 'deep_quad', '3x3' or '7x7_pool'")


class NormFreeNet(ClassifierHeadApi, nn.Module):
    """A normalizer-free network built from an :class:`NFNetConfig`.

    Args:
        cfg: the architecture.
        num_classes, in_chans, global_pool, drop_rate, drop_path_rate: as every wszoo model.
        output_stride: 32, or 16/8 to dilate the last stages.
        **overrides: any :class:`NFNetConfig` field (e.g. ``act_layer='relu'``, ``std_conv_eps=1e-4``).
    """

    def __init__(
        self,
        cfg: NFNetConfig,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        output_stride: int = 32,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        **overrides: Any,
    ) -> None:
        super().__init__()
        cfg = replace(cfg, **overrides)
        check_output_stride(output_stride)
        if cfg.act_layer not in NONLIN_GAMMA:
            raise ValueError(f"no gamma constant for activation {cfg.act_layer!r}; known: {', '.join(NONLIN_GAMMA)}")
        self.cfg = cfg
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.grad_checkpointing = False

        gamma = NONLIN_GAMMA[cfg.act_layer]
        conv_cls = ScaledWSConv2dSame if cfg.same_padding else ScaledWSConv2d
        if cfg.gamma_in_act:  # DeepMind: gamma in the activation
            act_layer: Callable[..., nn.Module] = lambda inplace=False: GammaAct(cfg.act_layer, gamma)  # noqa: E731
            conv_layer = partial(conv_cls, eps=cfg.std_conv_eps, style=cfg.ws_style)
        else:  # timm: gamma folded into every conv's scale
            act_layer = partial(create_act, cfg.act_layer)
            conv_layer = partial(conv_cls, gamma=gamma, eps=cfg.std_conv_eps, style=cfg.ws_style)
        attn = partial(create_attn, cfg.attn_layer, **cfg.attn_kwargs) if cfg.attn_layer else None

        stem_chs = make_divisible((cfg.stem_chs or cfg.channels[0]) * cfg.width_factor, cfg.ch_div)
        self.stem, stem_stride, stem_feat = _make_stem(in_chans, stem_chs, cfg.stem_type, conv_layer, act_layer)
        self.feature_info: List[Dict[str, Any]] = [stem_feat]

        rates = torch.linspace(0, drop_path_rate, sum(cfg.depths), device="cpu").split(list(cfg.depths))
        prev_chs, net_stride, dilation, expected_var = stem_chs, stem_stride, 1, 1.0
        stages = []
        for stage_idx, depth in enumerate(cfg.depths):
            stride = 1 if stage_idx == 0 and stem_stride > 2 else 2
            if net_stride >= output_stride and stride > 1:
                dilation *= stride
                stride = 1
            net_stride *= stride
            first_dilation = 1 if dilation in (1, 2) else 2
            out_chs = make_divisible(cfg.channels[stage_idx] * cfg.width_factor, cfg.ch_div)
            blocks = []
            for block_idx in range(depth):
                first_block = block_idx == 0 and stage_idx == 0
                blocks.append(NormFreeBlock(
                    prev_chs, out_chs, stride=stride if block_idx == 0 else 1, dilation=dilation,
                    first_dilation=first_dilation, alpha=cfg.alpha, beta=expected_var ** -0.5,
                    bottle_ratio=1.0 if cfg.reg and first_block else cfg.bottle_ratio, group_size=cfg.group_size,
                    ch_div=cfg.ch_div, reg=cfg.reg, extra_conv=cfg.extra_conv, skipinit=cfg.skipinit,
                    attn=attn, attn_gain=cfg.attn_gain, act_layer=act_layer, conv_layer=conv_layer,
                    drop_path_rate=rates[stage_idx][block_idx].item(),
                ))
                if block_idx == 0:
                    expected_var = 1.0  # the transition block's shortcut carries unit variance
                expected_var += cfg.alpha ** 2
                first_dilation, prev_chs = dilation, out_chs
            self.feature_info.append(dict(num_chs=prev_chs, reduction=net_stride, module=f"stages.{stage_idx}"))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)

        if cfg.num_features:
            self.num_features = make_divisible(cfg.width_factor * cfg.num_features, cfg.ch_div)
            self.final_conv = conv_layer(prev_chs, self.num_features, 1)
            self.feature_info[-1] = dict(num_chs=self.num_features, reduction=net_stride, module="final_conv")
        else:
            self.num_features = prev_chs
            self.final_conv = nn.Identity()
        self.final_act = act_layer(inplace=False)
        self.head_hidden_size = self.num_features
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        # Scaled WS makes the conv scale irrelevant to the forward pass; fan-in init keeps step sizes sane.
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # --- timm model API -------------------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for stage in self.stages:
                x = checkpoint_blocks(stage, x)
        else:
            x = self.stages(x)
        return self.final_act(self.final_conv(x))


# --- architecture definitions ---------------------------------------------------------------------
_NFNET_DEPTHS = {i: (1 + i, 2 * (1 + i), 6 * (1 + i), 3 * (1 + i)) for i in range(8)}  # F0..F7: [1,2,6,3] * (i+1)


def _nfnet(depths, act_layer="gelu", group_size=128, bottle_ratio=0.5, feat_mult=2.0, attn_layer="se",
           attn_kwargs=None, channels=(256, 512, 1536, 1536), **extra) -> NFNetConfig:
    """NFNet-F (SE-ResNeXt-D-like, deep stem, two 3x3 convs per block) and its 'light' L variants."""
    return NFNetConfig(
        depths=depths, channels=channels, stem_type="deep_quad", stem_chs=128, group_size=group_size,
        bottle_ratio=bottle_ratio, extra_conv=True, num_features=int(channels[-1] * feat_mult),
        act_layer=act_layer, attn_layer=attn_layer,
        attn_kwargs=dict(rd_ratio=0.5) if attn_kwargs is None else attn_kwargs, **extra,
    )


def _dm_nfnet(depths) -> NFNetConfig:
    """NFNet-F as DeepMind released it: SAME padding, gamma in the activation, skipinit gains."""
    return _nfnet(depths, gamma_in_act=True, same_padding=True, skipinit=True)


def _nf_resnet(depths, attn_layer=None, attn_kwargs=None) -> NFNetConfig:
    return NFNetConfig(depths=depths, channels=(256, 512, 1024, 2048), stem_type="7x7_pool", stem_chs=64,
                       bottle_ratio=0.25, act_layer="relu", attn_layer=attn_layer, attn_kwargs=attn_kwargs or {})


def _nf_regnet(depths, channels=(48, 104, 208, 440)) -> NFNetConfig:
    return NFNetConfig(depths=depths, channels=channels, stem_type="3x3", group_size=8, width_factor=0.75,
                       bottle_ratio=2.25, num_features=1280 * channels[-1] // 440, reg=True, attn_layer="se",
                       attn_kwargs=dict(rd_ratio=0.5))


_L_VARIANT = dict(group_size=64, bottle_ratio=0.25, act_layer="silu")
_ECA = dict(attn_layer="eca", attn_kwargs={})

MODEL_CFGS: Dict[str, NFNetConfig] = {
    **{f"dm_nfnet_f{i}": _dm_nfnet(_NFNET_DEPTHS[i]) for i in range(7)},
    **{f"nfnet_f{i}": _nfnet(_NFNET_DEPTHS[i]) for i in range(8)},
    "nfnet_l0": _nfnet(_NFNET_DEPTHS[0], feat_mult=1.5, attn_kwargs=dict(rd_ratio=0.25, rd_divisor=8), **_L_VARIANT),
    "eca_nfnet_l0": _nfnet(_NFNET_DEPTHS[0], feat_mult=1.5, **_ECA, **_L_VARIANT),
    "eca_nfnet_l1": _nfnet(_NFNET_DEPTHS[1], **_ECA, **_L_VARIANT),
    "eca_nfnet_l2": _nfnet(_NFNET_DEPTHS[2], **_ECA, **_L_VARIANT),
    "eca_nfnet_l3": _nfnet(_NFNET_DEPTHS[3], **_ECA, **_L_VARIANT),
    "nf_regnet_b0": _nf_regnet((1, 3, 6, 6)),
    "nf_regnet_b1": _nf_regnet((2, 4, 7, 7)),
    "nf_regnet_b2": _nf_regnet((2, 4, 8, 8), channels=(56, 112, 232, 488)),
    "nf_regnet_b3": _nf_regnet((2, 5, 9, 9), channels=(56, 128, 248, 528)),
    "nf_regnet_b4": _nf_regnet((2, 6, 11, 11), channels=(64, 144, 288, 616)),
    "nf_regnet_b5": _nf_regnet((3, 7, 14, 14), channels=(80, 168, 336, 704)),
    **{f"nf_resnet{d}": _nf_resnet(depths) for d, depths in ((26, (2, 2, 2, 2)), (50, (3, 4, 6, 3)), (101, (3, 4, 23, 3)))},
    **{f"nf_seresnet{d}": _nf_resnet(depths, "se", dict(rd_ratio=1 / 16))
       for d, depths in ((26, (2, 2, 2, 2)), (50, (3, 4, 6, 3)), (101, (3, 4, 23, 3)))},
    **{f"nf_ecaresnet{d}": _nf_resnet(depths, "eca")
       for d, depths in ((26, (2, 2, 2, 2)), (50, (3, 4, 6, 3)), (101, (3, 4, 23, 3)))},
}


def _register(name: str) -> None:
    def entrypoint(**kwargs: Any) -> NormFreeNet:
        return NormFreeNet(MODEL_CFGS[name], **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{name}: a normalizer-free network ({MODEL_CFGS[name].attn_layer or 'no'} attention)."
    register_model(entrypoint)


for _name in MODEL_CFGS:
    _register(_name)

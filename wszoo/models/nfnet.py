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
import re
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from timm.layers import AvgPool2dSame, DropPath, make_divisible

from ..checkpoint import CheckpointError, check_state_dict
from ..layers import NONLIN_GAMMA, ScaledWSConv2d, ScaledWSConv2dSame, act_with_gamma, create_act
from ..layers.attention import create_attn
from ..registry import register_model
from .helpers import (
    ClassifierHeadApi,
    IntermediatesApi,
    check_global_pool,
    checkpoint_blocks,
    init_classifier_,
    make_classifier_head,
    stage_strides_and_dilations,
)

__all__ = ["NFNetConfig", "NormFreeNet", "NormFreeBlock", "MODEL_CFGS", "haiku_params_to_state_dict"]


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
    ws_eps: float = 1e-5  # timm calls it std_conv_eps
    ws_style: str = "timm_scaled"  # 'deepmind' (with ws_eps=1e-4) reproduces the Haiku numerics exactly
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
        for i, (c, s) in enumerate(zip(chs, strides, strict=True)):
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


def _with_overrides(cfg: NFNetConfig, overrides: Dict[str, Any]) -> NFNetConfig:
    """``cfg`` with the model arguments that change it (timm's ``std_conv_eps`` read as ``ws_eps``)."""
    if "std_conv_eps" in overrides:
        if "ws_eps" in overrides:
            raise ValueError("pass ws_eps or std_conv_eps (its timm name), not both")
        overrides["ws_eps"] = overrides.pop("std_conv_eps")
    cfg = replace(cfg, **overrides)
    if cfg.act_layer not in NONLIN_GAMMA:
        raise ValueError(f"no gamma constant for activation {cfg.act_layer!r}; known: {', '.join(NONLIN_GAMMA)}")
    return cfg


def _conv_and_act(cfg: NFNetConfig) -> Tuple[Callable[..., nn.Module], Callable[..., nn.Module]]:
    """The Scaled WS conv and the activation, with the activation's gamma where the source puts it."""
    gamma = NONLIN_GAMMA[cfg.act_layer]
    conv_cls = ScaledWSConv2dSame if cfg.same_padding else ScaledWSConv2d
    if cfg.gamma_in_act:  # DeepMind: gamma in the activation
        return partial(conv_cls, eps=cfg.ws_eps, style=cfg.ws_style), act_with_gamma(cfg.act_layer, gamma)
    # timm: gamma folded into every conv's scale
    return partial(conv_cls, gamma=gamma, eps=cfg.ws_eps, style=cfg.ws_style), partial(create_act, cfg.act_layer)


class NormFreeNet(IntermediatesApi, ClassifierHeadApi, nn.Module):
    """A normalizer-free network built from an :class:`NFNetConfig`.

    Args:
        cfg: the architecture.
        num_classes, in_chans, global_pool, drop_rate, drop_path_rate: as every wszoo model.
        output_stride: 32, or 16/8 to dilate the last stages.
        **overrides: any :class:`NFNetConfig` field (e.g. ``act_layer='relu'``, ``ws_eps=1e-4``);
            timm's name ``std_conv_eps`` is read as ``ws_eps`` (older saved configs use it).
    """

    # features_only: the taps sit inside Sequential containers ('stem.conv3', 'stages.0'), which must be flattened
    feature_wrap_cfg = {"flatten_sequential": True}

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
        check_global_pool(global_pool, num_classes)  # before anything is built
        self.cfg = cfg = _with_overrides(cfg, overrides)
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.grad_checkpointing = False
        conv_layer, act_layer = _conv_and_act(cfg)
        attn = partial(create_attn, cfg.attn_layer, **cfg.attn_kwargs) if cfg.attn_layer else None

        stem_chs = make_divisible((cfg.stem_chs or cfg.channels[0]) * cfg.width_factor, cfg.ch_div)
        self.stem, stem_stride, stem_feat = _make_stem(in_chans, stem_chs, cfg.stem_type, conv_layer, act_layer)
        self.feature_info: List[Dict[str, Any]] = [stem_feat]

        rates = torch.linspace(0, drop_path_rate, sum(cfg.depths), device="cpu").split(list(cfg.depths))
        # the first stage keeps the resolution when the stem already reduced by 4
        stage_strides = [1 if i == 0 and stem_stride > 2 else 2 for i in range(len(cfg.depths))]
        strides = stage_strides_and_dilations(stage_strides, output_stride, start_stride=stem_stride)
        prev_chs, net_stride, expected_var = stem_chs, stem_stride, 1.0
        stages = []
        for stage_idx, (depth, (stride, dilation, first_dilation)) in enumerate(zip(cfg.depths, strides, strict=True)):
            net_stride *= stride
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
        self.head = make_classifier_head(self.num_features, num_classes, global_pool, drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        # Scaled WS makes the conv scale irrelevant to the forward pass; fan-in init keeps step sizes sane.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init_classifier_(m)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # --- timm model API -------------------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise learning rates: the stem, each stage or block, the final conv last."""
        return dict(stem=r"^stem", blocks=[
            (r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)", None), (r"^final_conv", (99999,))])

    def _stem_parts(self) -> Tuple[List[nn.Module], int]:
        names = [name for name, _ in self.stem.named_children()]
        return list(self.stem), names.index(self.feature_info[0]["module"].split(".", 1)[1])

    def _stage_list(self) -> List[nn.Module]:
        return list(self.stages)

    def _last_stage_output(self, x: torch.Tensor, norm: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.final_conv(x)  # the last level is tapped after the final conv, before its activation
        return x, x

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_act(x)

    def _prune_to(self, deepest: int, prune_norm: bool, prune_end: bool) -> None:
        _, stem_tap = self._stem_parts()
        self.stages = self.stages[:deepest]
        if deepest == 0:
            self.stem = self.stem[:stem_tap + 1]  # deep stems are tapped before their last conv
        if prune_end:
            self.final_conv, self.final_act = nn.Identity(), nn.Identity()

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
    """NF-ResNet: a ResNet-D (7x7 stem and pool, 2x2 average-pool shortcuts), ReLU, 0.25 bottleneck."""
    return NFNetConfig(depths=depths, channels=(256, 512, 1024, 2048), stem_type="7x7_pool", stem_chs=64,
                       bottle_ratio=0.25, act_layer="relu", attn_layer=attn_layer, attn_kwargs=attn_kwargs or {})


def _nf_regnet(depths, channels=(48, 104, 208, 440)) -> NFNetConfig:
    """NF-RegNet: 3x3 stem, RegNet-style blocks (width from the input, attention before conv3), 0.75 width."""
    return NFNetConfig(depths=depths, channels=channels, stem_type="3x3", group_size=8, width_factor=0.75,
                       bottle_ratio=2.25, num_features=1280 * channels[-1] // 440, reg=True, attn_layer="se",
                       attn_kwargs=dict(rd_ratio=0.5))


_L_VARIANT = dict(group_size=64, bottle_ratio=0.25, act_layer="silu")
_ECA = dict(attn_layer="eca", attn_kwargs={})
_SE_RESNET = dict(attn_layer="se", attn_kwargs=dict(rd_ratio=1 / 16))
_DEPTHS_26, _DEPTHS_50, _DEPTHS_101 = (2, 2, 2, 2), (3, 4, 6, 3), (3, 4, 23, 3)


# --- DeepMind's Haiku checkpoints (F0..F6) onto these modules ------------------------------------
_STEM = re.compile(r"^NFNet/~/stem_conv(\d)/(w|b|gain)$")
_BLOCK = re.compile(r"^NFNet/~/nf_block(?:_(\d+))?(?:/~/(.+))?/(\w+)$")
_HEAD = re.compile(r"^NFNet/~/(final_conv|linear)/(w|b|gain)$")
_BLOCK_PARTS = {  # DeepMind's names -> ours (timm's)
    "conv0": "conv1", "conv1": "conv2", "conv1b": "conv2b", "conv2": "conv3", "conv_shortcut": "downsample.conv",
    "squeeze_excite/~/linear": "attn_last.fc1", "squeeze_excite/~/linear_1": "attn_last.fc2",
}
_PARAMS = {"w": "weight", "b": "bias", "gain": "gain"}


def _to_torch(array: np.ndarray, param: str, conv: bool) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array))
    if param == "w" and t.dim() == 4:  # HWIO -> OIHW
        t = t.permute(3, 2, 0, 1)
    elif param == "w" and t.dim() == 2:  # (in, out) -> (out, in), as a 1x1 conv when the target is one
        t = t.t()
        if conv:
            t = t[:, :, None, None]
    elif param == "gain":
        t = t.reshape(-1, 1, 1, 1)
    return t.contiguous().float()


def haiku_params_to_state_dict(params: Mapping[str, np.ndarray], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map DeepMind's Haiku NFNet parameters (``{"<module>/<param>": array}``, see
    :func:`wszoo.tools.convert_weights.read_haiku_params`) onto ``model``'s keys (a ``dm_nfnet_*``), checking every
    key and shape. HWIO kernels become OIHW, ``(in, out)`` linears ``(out, in)``, gains ``(out, 1, 1, 1)``."""
    block_names = [f"stages.{s}.{b}" for s, stage in enumerate(model.stages) for b in range(len(stage))]
    expected = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, array in params.items():
        target: Optional[str] = None
        param = key.rsplit("/", 1)[-1]
        if m := _STEM.match(key):
            target = f"stem.conv{int(m.group(1)) + 1}.{_PARAMS[m.group(2)]}"
        elif m := _HEAD.match(key):
            target = f"{'final_conv' if m.group(1) == 'final_conv' else 'head.fc'}.{_PARAMS[m.group(2)]}"
        elif m := _BLOCK.match(key):
            index = int(m.group(1) or 0)
            part, p = m.group(2), m.group(3)
            if index < len(block_names):
                if part is None and p == "skip_gain":
                    target = f"{block_names[index]}.skipinit_gain"
                elif part in _BLOCK_PARTS and p in _PARAMS:
                    target = f"{block_names[index]}.{_BLOCK_PARTS[part]}.{_PARAMS[p]}"
        if target is None or target not in expected:
            unknown.append(key)
            continue
        tensor = _to_torch(array, param, conv=expected[target].dim() == 4)
        out[target] = tensor.reshape(()) if expected[target].dim() == 0 else tensor
    if unknown:
        shown = ", ".join(sorted(unknown)[:10]) + (f" ... and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise CheckpointError(f"Haiku parameters with no place in {type(model).__name__}: {shown}")
    check_state_dict(model, out, source="converted DeepMind parameters")
    return out


#: Every NF architecture, as data (timm's ``model_cfgs``); the entrypoints below look their names up here.
MODEL_CFGS: Dict[str, NFNetConfig] = {
    "dm_nfnet_f0": _dm_nfnet(_NFNET_DEPTHS[0]),
    "dm_nfnet_f1": _dm_nfnet(_NFNET_DEPTHS[1]),
    "dm_nfnet_f2": _dm_nfnet(_NFNET_DEPTHS[2]),
    "dm_nfnet_f3": _dm_nfnet(_NFNET_DEPTHS[3]),
    "dm_nfnet_f4": _dm_nfnet(_NFNET_DEPTHS[4]),
    "dm_nfnet_f5": _dm_nfnet(_NFNET_DEPTHS[5]),
    "dm_nfnet_f6": _dm_nfnet(_NFNET_DEPTHS[6]),
    "nfnet_f0": _nfnet(_NFNET_DEPTHS[0]),
    "nfnet_f1": _nfnet(_NFNET_DEPTHS[1]),
    "nfnet_f2": _nfnet(_NFNET_DEPTHS[2]),
    "nfnet_f3": _nfnet(_NFNET_DEPTHS[3]),
    "nfnet_f4": _nfnet(_NFNET_DEPTHS[4]),
    "nfnet_f5": _nfnet(_NFNET_DEPTHS[5]),
    "nfnet_f6": _nfnet(_NFNET_DEPTHS[6]),
    "nfnet_f7": _nfnet(_NFNET_DEPTHS[7]),
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
    "nf_resnet26": _nf_resnet(_DEPTHS_26),
    "nf_resnet50": _nf_resnet(_DEPTHS_50),
    "nf_resnet101": _nf_resnet(_DEPTHS_101),
    "nf_seresnet26": _nf_resnet(_DEPTHS_26, **_SE_RESNET),
    "nf_seresnet50": _nf_resnet(_DEPTHS_50, **_SE_RESNET),
    "nf_seresnet101": _nf_resnet(_DEPTHS_101, **_SE_RESNET),
    "nf_ecaresnet26": _nf_resnet(_DEPTHS_26, **_ECA),
    "nf_ecaresnet50": _nf_resnet(_DEPTHS_50, **_ECA),
    "nf_ecaresnet101": _nf_resnet(_DEPTHS_101, **_ECA),
}


# --- NFNet-F as DeepMind released it (SAME padding, gamma in the activation, skipinit gains) --------------
@register_model
def dm_nfnet_f0(**kwargs: Any) -> NormFreeNet:
    """NFNet-F0 (DeepMind's release: SAME padding, gamma in the activation, skipinit gains); SE attention."""
    return NormFreeNet(MODEL_CFGS["dm_nfnet_f0"], **kwargs)


@register_model
def dm_nfnet_f1(**kwargs: Any) -> NormFreeNet:
    """NFNet-F1 (DeepMind's release); SE attention."""
    return NormFreeNet(MODEL_CFGS["dm_nfnet_f1"], **kwargs)


@register_model
def dm_nfnet_f2(**kwargs: Any) -> NormFreeNet:
    """NFNet-F2 (DeepMind's release); SE attention."""
    return NormFreeNet(MODEL_CFGS["dm_nfnet_f2"], **kwargs)


@register_model
def dm_nfnet_f3(**kwargs: Any) -> NormFreeNet:
    """NFNet-F3 (DeepMind's release); SE attention."""
    return NormFreeNet(MODEL_CFGS["dm_nfnet_f3"], **kwargs)


@register_model
def dm_nfnet_f4(**kwargs: Any) -> NormFreeNet:
    """NFNet-F4 (DeepMind's release); SE attention."""
    return NormFreeNet(MODEL_CFGS["dm_nfnet_f4"], **kwargs)


@register_model
def dm_nfnet_f5(**kwargs: Any) -> NormFreeNet:
    """NFNet-F5 (DeepMind's release); SE attention."""
    return NormFreeNet(MODEL_CFGS["dm_nfnet_f5"], **kwargs)


@register_model
def dm_nfnet_f6(**kwargs: Any) -> NormFreeNet:
    """NFNet-F6 (DeepMind's release); SE attention."""
    return NormFreeNet(MODEL_CFGS["dm_nfnet_f6"], **kwargs)


# --- NFNet-F in timm's form (gamma folded into the convs, symmetric padding) ----------------------
@register_model
def nfnet_f0(**kwargs: Any) -> NormFreeNet:
    """NFNet-F0 (timm's form: gamma in the Scaled WS convs, symmetric padding); SE attention."""
    return NormFreeNet(MODEL_CFGS["nfnet_f0"], **kwargs)


@register_model
def nfnet_f1(**kwargs: Any) -> NormFreeNet:
    """NFNet-F1 (timm's form); SE attention."""
    return NormFreeNet(MODEL_CFGS["nfnet_f1"], **kwargs)


@register_model
def nfnet_f2(**kwargs: Any) -> NormFreeNet:
    """NFNet-F2 (timm's form); SE attention."""
    return NormFreeNet(MODEL_CFGS["nfnet_f2"], **kwargs)


@register_model
def nfnet_f3(**kwargs: Any) -> NormFreeNet:
    """NFNet-F3 (timm's form); SE attention."""
    return NormFreeNet(MODEL_CFGS["nfnet_f3"], **kwargs)


@register_model
def nfnet_f4(**kwargs: Any) -> NormFreeNet:
    """NFNet-F4 (timm's form); SE attention."""
    return NormFreeNet(MODEL_CFGS["nfnet_f4"], **kwargs)


@register_model
def nfnet_f5(**kwargs: Any) -> NormFreeNet:
    """NFNet-F5 (timm's form); SE attention."""
    return NormFreeNet(MODEL_CFGS["nfnet_f5"], **kwargs)


@register_model
def nfnet_f6(**kwargs: Any) -> NormFreeNet:
    """NFNet-F6 (timm's form); SE attention."""
    return NormFreeNet(MODEL_CFGS["nfnet_f6"], **kwargs)


@register_model
def nfnet_f7(**kwargs: Any) -> NormFreeNet:
    """NFNet-F7 (timm's form; the paper's largest, no DeepMind release); SE attention."""
    return NormFreeNet(MODEL_CFGS["nfnet_f7"], **kwargs)


# --- light NFNets (timm's L variants: group width 64, bottleneck 0.25, SiLU) -----------------------
@register_model
def nfnet_l0(**kwargs: Any) -> NormFreeNet:
    """NFNet-L0: the F0 layout made light (group width 64, 0.25 bottleneck, SiLU, 1.5x final width); SE attention."""
    return NormFreeNet(MODEL_CFGS["nfnet_l0"], **kwargs)


@register_model
def eca_nfnet_l0(**kwargs: Any) -> NormFreeNet:
    """ECA-NFNet-L0: NFNet-L0 with Efficient Channel Attention instead of SE."""
    return NormFreeNet(MODEL_CFGS["eca_nfnet_l0"], **kwargs)


@register_model
def eca_nfnet_l1(**kwargs: Any) -> NormFreeNet:
    """ECA-NFNet-L1: the F1 depths, light, with Efficient Channel Attention."""
    return NormFreeNet(MODEL_CFGS["eca_nfnet_l1"], **kwargs)


@register_model
def eca_nfnet_l2(**kwargs: Any) -> NormFreeNet:
    """ECA-NFNet-L2: the F2 depths, light, with Efficient Channel Attention."""
    return NormFreeNet(MODEL_CFGS["eca_nfnet_l2"], **kwargs)


@register_model
def eca_nfnet_l3(**kwargs: Any) -> NormFreeNet:
    """ECA-NFNet-L3: the F3 depths, light, with Efficient Channel Attention."""
    return NormFreeNet(MODEL_CFGS["eca_nfnet_l3"], **kwargs)


# --- NF-RegNets (grouped 3x3 blocks of width 8, inverted-bottleneck ratio 2.25, SE) ------------------
@register_model
def nf_regnet_b0(**kwargs: Any) -> NormFreeNet:
    """NF-RegNet-B0 (EfficientNet-B0-like widths and depths); SE attention."""
    return NormFreeNet(MODEL_CFGS["nf_regnet_b0"], **kwargs)


@register_model
def nf_regnet_b1(**kwargs: Any) -> NormFreeNet:
    """NF-RegNet-B1; SE attention."""
    return NormFreeNet(MODEL_CFGS["nf_regnet_b1"], **kwargs)


@register_model
def nf_regnet_b2(**kwargs: Any) -> NormFreeNet:
    """NF-RegNet-B2; SE attention."""
    return NormFreeNet(MODEL_CFGS["nf_regnet_b2"], **kwargs)


@register_model
def nf_regnet_b3(**kwargs: Any) -> NormFreeNet:
    """NF-RegNet-B3; SE attention."""
    return NormFreeNet(MODEL_CFGS["nf_regnet_b3"], **kwargs)


@register_model
def nf_regnet_b4(**kwargs: Any) -> NormFreeNet:
    """NF-RegNet-B4; SE attention."""
    return NormFreeNet(MODEL_CFGS["nf_regnet_b4"], **kwargs)


@register_model
def nf_regnet_b5(**kwargs: Any) -> NormFreeNet:
    """NF-RegNet-B5; SE attention."""
    return NormFreeNet(MODEL_CFGS["nf_regnet_b5"], **kwargs)


# --- NF-ResNets (ResNet-D shortcuts, ReLU, no attention / SE / ECA) ---------------------------------
@register_model
def nf_resnet26(**kwargs: Any) -> NormFreeNet:
    """NF-ResNet-26: a normalizer-free ResNet-D, no attention."""
    return NormFreeNet(MODEL_CFGS["nf_resnet26"], **kwargs)


@register_model
def nf_resnet50(**kwargs: Any) -> NormFreeNet:
    """NF-ResNet-50: a normalizer-free ResNet-D, no attention."""
    return NormFreeNet(MODEL_CFGS["nf_resnet50"], **kwargs)


@register_model
def nf_resnet101(**kwargs: Any) -> NormFreeNet:
    """NF-ResNet-101: a normalizer-free ResNet-D, no attention."""
    return NormFreeNet(MODEL_CFGS["nf_resnet101"], **kwargs)


@register_model
def nf_seresnet26(**kwargs: Any) -> NormFreeNet:
    """NF-SE-ResNet-26: NF-ResNet-26 with Squeeze-and-Excitation (ratio 1/16)."""
    return NormFreeNet(MODEL_CFGS["nf_seresnet26"], **kwargs)


@register_model
def nf_seresnet50(**kwargs: Any) -> NormFreeNet:
    """NF-SE-ResNet-50: NF-ResNet-50 with Squeeze-and-Excitation (ratio 1/16)."""
    return NormFreeNet(MODEL_CFGS["nf_seresnet50"], **kwargs)


@register_model
def nf_seresnet101(**kwargs: Any) -> NormFreeNet:
    """NF-SE-ResNet-101: NF-ResNet-101 with Squeeze-and-Excitation (ratio 1/16)."""
    return NormFreeNet(MODEL_CFGS["nf_seresnet101"], **kwargs)


@register_model
def nf_ecaresnet26(**kwargs: Any) -> NormFreeNet:
    """NF-ECA-ResNet-26: NF-ResNet-26 with Efficient Channel Attention."""
    return NormFreeNet(MODEL_CFGS["nf_ecaresnet26"], **kwargs)


@register_model
def nf_ecaresnet50(**kwargs: Any) -> NormFreeNet:
    """NF-ECA-ResNet-50: NF-ResNet-50 with Efficient Channel Attention."""
    return NormFreeNet(MODEL_CFGS["nf_ecaresnet50"], **kwargs)


@register_model
def nf_ecaresnet101(**kwargs: Any) -> NormFreeNet:
    """NF-ECA-ResNet-101: NF-ResNet-101 with Efficient Channel Attention."""
    return NormFreeNet(MODEL_CFGS["nf_ecaresnet101"], **kwargs)

"""Retrofitting WS onto existing networks: swap plain convolutions (and optionally linears) for WS
layers holding the *same* parameters, so state-dict keys do not change and checkpoints of the
original still load; optionally swap BatchNorm for GroupNorm, WS's usual partner.

Which layers are standardized is a :class:`WSPolicy`: depthwise convs are skipped by default (their
fan-in is ``k*k``, e.g. 9 weights, too few for stable statistics; the WS-on-a-subset recipes keep
them plain), as is anything below ``min_fan_in`` or named in ``skip``.
"""
import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch.nn as nn
from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from timm.layers import GroupNormAct as TimmGroupNormAct
from timm.layers.norm_act import BatchNormAct2d as TimmBatchNormAct2d

from .affine_ws import AffineWSConv1d, AffineWSConv2d, AffineWSConv2dSame, AffineWSConv3d, AffineWSLinear
from .standardize import check_style, fan_in_of
from .ws_conv import WSConv2d, WSConv2dSame, WSLinear
from .ws_conv_nd import WSConv1d, WSConv3d, WSConvTranspose2d
from .ws_layer import is_ws_layer

__all__ = ["WSPolicy", "ConversionReport", "convert_to_ws", "convert_convs_to_ws", "batchnorm_to_groupnorm",
           "replace_modules"]

NORM_SWAPS = (None, "gn")


@dataclass(frozen=True)
class WSPolicy:
    """Where weight standardization applies.

    Args:
        min_fan_in: filters with fewer weights than this stay plain (at least 2: one weight
            standardizes to 0).
        skip_depthwise: keep depthwise convs (``groups == in_channels > 1``) plain.
        skip: layer names or shell-style patterns (``'fc'``, ``'classifier.*'``) to keep plain.
        linear: also standardize ``nn.Linear`` layers.
        skip_classifier: keep the model's classifier plain when the model names it (timm's
            ``get_classifier()``, e.g. a 1x1-conv ``head.fc``); other classifiers go in ``skip``.
        transposed: also standardize ``nn.ConvTranspose2d`` layers (decoders), over each output filter's
            fan-in (:class:`WSConvTranspose2d`).
    """

    min_fan_in: int = 2
    skip_depthwise: bool = True
    skip: Tuple[str, ...] = ()
    linear: bool = False
    skip_classifier: bool = True
    transposed: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.skip, str):
            object.__setattr__(self, "skip", (self.skip,))
        object.__setattr__(self, "skip", tuple(self.skip))
        if not all(isinstance(s, str) for s in self.skip):
            raise TypeError(f"skip takes layer names or patterns (strings), got {self.skip!r}")
        if not isinstance(self.min_fan_in, int) or self.min_fan_in < 2:
            raise ValueError(f"min_fan_in must be an int >= 2 (a single weight standardizes to 0), "
                             f"got {self.min_fan_in!r}")

    def reason_to_skip(self, name: str, layer: nn.Module) -> Optional[str]:
        """Why ``layer`` (a plain conv or linear) stays plain under this policy, or ``None`` to convert it."""
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.skip):
            return "named in policy.skip"
        if isinstance(layer, nn.Linear) and not self.linear:
            return "linear layer (policy.linear is False)"
        if isinstance(layer, nn.ConvTranspose2d) and not self.transposed:
            return "transposed conv (policy.transposed is False)"
        groups = getattr(layer, "groups", 1)
        if self.skip_depthwise and groups > 1 and groups == layer.in_channels:  # type: ignore[attr-defined]
            return "depthwise conv (policy.skip_depthwise)"
        fan_in = _fan_in(layer)
        if fan_in < self.min_fan_in:
            return f"fan-in {fan_in} < policy.min_fan_in {self.min_fan_in}"
        return None


@dataclass
class ConversionReport:
    """What :func:`convert_to_ws` changed. ``converted``/``norms``: name -> ``'old -> new'``;
    ``skipped``: name -> reason; ``dropped_keys``: state-dict keys that no longer exist (the replaced
    BatchNorms' running statistics), so a strict load of an old checkpoint needs ``strict=False``."""

    converted: Dict[str, str] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    norms: Dict[str, str] = field(default_factory=dict)
    dropped_keys: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s) to WS, kept {len(self.skipped)} plain, "
                 f"replaced {len(self.norms)} norm(s)"]
        lines += [f"  WS    {name}: {what}" for name, what in self.converted.items()]
        lines += [f"  plain {name}: {why}" for name, why in self.skipped.items()]
        lines += [f"  norm  {name}: {what}" for name, what in self.norms.items()]
        if self.dropped_keys:
            lines.append(f"  state-dict keys dropped: {len(self.dropped_keys)} (BatchNorm running statistics)")
        return "\n".join(lines)


def _fan_in(layer: nn.Module) -> int:
    """Weights per output filter: ``in / groups * prod(kernel)`` (a transposed conv's weight is ``(in, out/g, k)``)."""
    if isinstance(layer, nn.ConvTranspose2d):
        return layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
    return fan_in_of(layer.weight)  # type: ignore[arg-type]


#: The exact torch.nn (and timm) layer types convert_to_ws converts, and their WS twins (plain, function-preserving)
_TWINS = {nn.Conv1d: (WSConv1d, AffineWSConv1d), nn.Conv2d: (WSConv2d, AffineWSConv2d),
          Conv2dSame: (WSConv2dSame, AffineWSConv2dSame), nn.Conv3d: (WSConv3d, AffineWSConv3d),
          nn.Linear: (WSLinear, AffineWSLinear), nn.ConvTranspose2d: (WSConvTranspose2d, None)}


def _describe(layer: nn.Module) -> str:
    return f"{type(layer).__name__}({layer.extra_repr()})"


def _ws_twin(layer: nn.Module, style: str, eps: Optional[float], preserve_function: bool = False) -> nn.Module:
    """The WS layer computing ``layer``'s function on standardized weights, sharing its parameters; with
    ``preserve_function`` one whose per-filter affine makes it compute exactly ``layer``'s function now."""
    cls = _TWINS[type(layer)][1 if preserve_function else 0]
    if isinstance(layer, nn.Linear):
        ws: nn.Module = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, style=style,
                            eps=eps, device="meta")
    elif isinstance(layer, nn.ConvTranspose2d):
        ws = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                 output_padding=layer.output_padding, groups=layer.groups, bias=layer.bias is not None,
                 dilation=layer.dilation, style=style, eps=eps, device="meta")
    else:
        same = isinstance(layer, Conv2dSame)  # timm's dynamic TF 'SAME' padding
        ws = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                 padding="same" if same else layer.padding, dilation=layer.dilation, groups=layer.groups,
                 bias=layer.bias is not None, style=style, eps=eps, device="meta")
        ws.padding_mode = layer.padding_mode
    ws.weight, ws.bias = layer.weight, layer.bias  # share, don't copy: keys and values unchanged
    if preserve_function:
        ws.init_affine()
        ws.init_affine_from_weight()
    return ws.train(layer.training)


def _gn_groups(channels: int, wanted: int) -> int:
    """The largest group count <= ``wanted`` that divides ``channels`` (GroupNorm needs a divisor)."""
    return max(g for g in range(1, min(wanted, channels) + 1) if channels % g == 0)


def _groupnorm_twin(bn: nn.Module, groups: int) -> nn.Module:
    """GroupNorm of ``bn``'s width sharing its affine parameters; timm's BatchNormAct2d keeps its act/drop."""
    channels = bn.num_features
    g = _gn_groups(channels, groups)
    if isinstance(bn, TimmBatchNormAct2d):
        gn: nn.Module = TimmGroupNormAct(channels, g, eps=bn.eps, affine=bn.affine, apply_act=False, device="meta")
        gn.act, gn.drop = bn.act, bn.drop
    else:
        gn = nn.GroupNorm(g, channels, eps=bn.eps, affine=bn.affine, device="meta")
    if bn.affine:
        gn.weight, gn.bias = bn.weight, bn.bias
    return gn.train(bn.training)


def _is_swappable_batchnorm(module: nn.Module) -> bool:
    return type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm, TimmBatchNormAct2d)


def _has_hooks(module: nn.Module) -> bool:
    """Hooks (old-style weight_norm/spectral_norm, observers, users') would be lost with the module."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None) or module._state_dict_hooks
                or module._load_state_dict_pre_hooks)


def _already_standardized(module: nn.Module) -> bool:
    return is_ws_layer(module) or isinstance(module, (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame))


def convert_to_ws(
    model: nn.Module,
    style: str = "timm",
    policy: Optional[WSPolicy] = None,
    eps: Optional[float] = None,
    norm: Optional[str] = None,
    gn_groups: int = 32,
    preserve_function: bool = False,
) -> ConversionReport:
    """Retrofit weight standardization onto ``model`` in place and report what changed.

    Every ``nn.Conv2d`` (and timm's ``Conv2dSame``), ``nn.Conv1d`` and ``nn.Conv3d`` the ``policy`` allows
    becomes a :class:`WSConv2d` (:class:`WSConv2dSame`), :class:`WSConv1d`, :class:`WSConv3d`; every allowed
    ``nn.Linear`` a :class:`WSLinear` when ``policy.linear``, every ``nn.ConvTranspose2d`` a
    :class:`WSConvTranspose2d` when ``policy.transposed``. They hold the original parameter objects, so the
    state-dict keys and values are unchanged. ``norm='gn'`` also replaces ``BatchNorm2d``/``SyncBatchNorm``
    (and timm's ``BatchNormAct2d``, keeping its activation) by GroupNorm with ``gn_groups`` groups (the
    largest divisor of the width not above it), sharing the affine parameters; their running statistics
    leave the state dict (listed in the report). A BN-trained network computes a different function once
    standardized: fine-tune it, or pass ``preserve_function=True`` (mmcv's ``ConvAWS``): each converted
    layer gets a learnable per-filter ``weight_gamma`` and ``weight_beta`` after the standardization,
    initialised from the weights it converts, so the network computes exactly what it did (float rounding)
    and then trains in the WS parameterization; the state dict keeps every key and gains these two per layer
    (transposed convs are not offered it; ``norm='gn'`` cannot preserve the function and is refused with it).

    Everything is checked and built before anything is replaced, so an error leaves ``model`` as it was.
    Left alone and reported: layers already standardized, subclasses of ``nn.Conv2d``/``nn.Linear``,
    layers with hooks or computed weights (``weight_norm``, ``spectral_norm``), and what ``policy`` skips.

    Example (torchvision's ResNet-50 to GN+WS)::

        model = torchvision.models.resnet50()
        report = wszoo.convert_to_ws(model, style="qiao", norm="gn")
    """
    check_style(style)
    policy = WSPolicy() if policy is None else policy
    if not isinstance(policy, WSPolicy):
        raise TypeError(f"policy must be a wszoo.layers.WSPolicy, got {type(policy).__name__}")
    if norm not in NORM_SWAPS:
        raise ValueError(f"norm must be one of {NORM_SWAPS} (None keeps the norms), got {norm!r}")
    if not isinstance(gn_groups, int) or gn_groups < 1:
        raise ValueError(f"gn_groups must be a positive int, got {gn_groups!r}")
    if preserve_function and norm == "gn":
        raise ValueError("preserve_function=True keeps what the network computes, and norm='gn' changes it "
                         "(GroupNorm normalizes each image over channel groups where BatchNorm applied fixed "
                         "running statistics): use norm=None (the BatchNorms stay) with preserve_function")
    if isinstance(model, tuple(_TWINS)) or _is_swappable_batchnorm(model):
        raise ValueError("convert_to_ws replaces a model's layers in place; wrap a single layer in a module "
                         "(e.g. nn.Sequential(layer)) or build the WS layer directly")

    report = ConversionReport()
    classifier = model.get_classifier() if policy.skip_classifier and hasattr(model, "get_classifier") else None
    # id(old) -> new; named_modules() yields a layer registered in several places once, and replace_modules
    # then puts the same new layer in each of them
    planned: Dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if _already_standardized(module):
            report.skipped[name] = f"already weight-standardized ({type(module).__name__})"
        elif type(module) in _TWINS:
            if module is classifier:
                reason: Optional[str] = "the model's classifier (policy.skip_classifier)"
            elif _has_hooks(module) or not isinstance(module.weight, nn.Parameter):
                reason = "has hooks or a computed weight (e.g. weight_norm, spectral_norm); a WS twin would drop them"
            else:
                reason = policy.reason_to_skip(name, module)
            if reason is not None:
                report.skipped[name] = reason
                continue
            if preserve_function and isinstance(module, nn.ConvTranspose2d):
                report.skipped[name] = "transposed conv: no function-preserving WS twin (preserve_function)"
                continue
            planned[id(module)] = new = _ws_twin(module, style, eps, preserve_function)
            report.converted[name] = f"{_describe(module)} -> {_describe(new)}"
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d)):
            base = next(b.__name__ for b in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d)
                        if isinstance(module, b))
            report.skipped[name] = f"{type(module).__name__} is a subclass of {base}; only exact nn.{base} " \
                                   "layers are converted"
        elif norm == "gn" and _is_swappable_batchnorm(module):
            if _has_hooks(module):
                report.skipped[name] = "BatchNorm with hooks; a GroupNorm in its place would drop them"
                continue
            planned[id(module)] = new = _groupnorm_twin(module, gn_groups)
            report.norms[name] = f"{_describe(module)} -> {_describe(new)}"
            report.dropped_keys += [f"{name}.{key}" for key, _ in module.named_buffers(recurse=False)]
    replace_modules(model, lambda name, child: planned.get(id(child)))
    return report


def convert_convs_to_ws(
    module: nn.Module,
    style: str = "timm",
    eps: Optional[float] = None,
    min_fan_in: int = 2,
    skip_depthwise: bool = True,
    exclude: Iterable[str] = (),
) -> List[str]:
    """Shorthand for :func:`convert_to_ws` on convolutions only; returns the converted names."""
    policy = WSPolicy(min_fan_in=min_fan_in, skip_depthwise=skip_depthwise, skip=tuple(exclude))
    return list(convert_to_ws(module, style, policy, eps=eps).converted)


def batchnorm_to_groupnorm(module: nn.Module, groups: int = 32) -> int:
    """Replace every BatchNorm2d under ``module`` by GroupNorm (``groups``, or the largest divisor of the
    width below it) sharing its affine parameters; returns the count."""
    return len(replace_modules(module, lambda name, child: _groupnorm_twin(child, groups)
                               if _is_swappable_batchnorm(child) else None))


def replace_modules(root: nn.Module, replace: Callable[[str, nn.Module], Optional[nn.Module]]) -> List[str]:
    """Call ``replace(name, child)`` on every module under ``root`` (not ``root`` itself) and put what it
    returns in the child's place (``None`` keeps the child); returns the replaced names, in order.

    A child registered in several places is offered at each of them; the subtree of a replaced child is
    not visited."""
    replaced: List[str] = []
    for parent_name, parent in list(root.named_modules()):
        if any(parent_name == r or parent_name.startswith(r + ".") for r in replaced):
            continue
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            new = replace(full, child)
            if new is not None:
                setattr(parent, child_name, new)
                replaced.append(full)
    return replaced

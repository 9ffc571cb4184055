"""The one weight-standardization function every WS layer in wszoo calls.

A checkpoint is reproduced only by the exact formula it was trained with, and eps is not stored in a
state dict, so the formula is chosen explicitly by *style*. With ``W`` reshaped to
``(out_channels, fan_in)`` where ``fan_in = in_channels / groups * kh * kw``:

===============  ===========================================================  ==========================  =====
style            formula                                                      used by                     eps
===============  ===========================================================  ==========================  =====
``timm``         ``(W - mean) / sqrt(var_biased + eps)``                      timm ``StdConv2d`` (BiT)    1e-6
``qiao``         ``(W - mean) / (std_unbiased + eps)``                        original WS code, mmcv      1e-5
``bcn``          ``(W - mean) / sqrt(var_unbiased + eps)``                    Batch-Channel Norm repo     1e-5
``timm_scaled``  ``gain * gamma * fan_in**-0.5 * (W - mean) / sqrt(var_b + eps)``  timm ``ScaledStdConv2d``  1e-5
``deepmind``     ``gamma * gain * (W - mean) * rsqrt(max(var_b * fan_in, eps))``   official NFNets (Haiku)  1e-4
===============  ===========================================================  ==========================  =====

The two *scaled* styles (Scaled WS, Brock et al. 2021) take a per-filter ``gain`` and a constant
``gamma`` (the activation's variance-preserving gain, when it is folded into the conv); the others
take neither. (BiT models use ``timm`` with eps 1e-8.) The statistics are always computed in float32, also under
fp16/bf16 autocast (float64 weights in float64), and the result is returned in the weight's own dtype.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

__all__ = ["WS_STYLES", "SCALED_STYLES", "DEFAULT_EPS", "standardize_weight", "check_style", "fan_in_of"]


def _timm(w2d: torch.Tensor, eps: float) -> torch.Tensor:
    # batch_norm over a (1, out, fan_in) view: biased variance, eps inside the sqrt, one fused kernel.
    return F.batch_norm(w2d.unsqueeze(0), None, None, training=True, momentum=0.0, eps=eps).squeeze(0)


def _qiao(w2d: torch.Tensor, eps: float) -> torch.Tensor:
    var, mean = torch.var_mean(w2d, dim=1, correction=1, keepdim=True)
    # The clamp (at the dtype's smallest normal) only matters for a constant filter, where sqrt'(0) would
    # turn the zero upstream gradient into NaN; the output there is 0 either way.
    return (w2d - mean) / (var.clamp_min(torch.finfo(var.dtype).tiny).sqrt() + eps)


def _bcn(w2d: torch.Tensor, eps: float) -> torch.Tensor:
    # sqrt(var_u + eps) = sqrt(n/(n-1)) * sqrt(var_b + eps*(n-1)/n): the fused biased kernel, rescaled.
    n = w2d.shape[1]
    return _timm(w2d, eps * (n - 1) / n) * ((n - 1) / n) ** 0.5


def _timm_scaled(w2d: torch.Tensor, eps: float, scale: torch.Tensor) -> torch.Tensor:
    # timm's ScaledStdConv2d: the per-filter multiplier rides in batch_norm's affine weight.
    return F.batch_norm(w2d.unsqueeze(0), None, None, weight=scale, training=True, momentum=0.0, eps=eps).squeeze(0)


def _deepmind(w2d: torch.Tensor, eps: float, scale: torch.Tensor) -> torch.Tensor:
    # DeepMind's WSConv2D: W * s - mean * s with s = gain * rsqrt(max(var * fan_in, eps)).
    var, mean = torch.var_mean(w2d, dim=1, correction=0, keepdim=True)
    s = torch.rsqrt(torch.clamp(var * w2d.shape[1], min=eps)) * scale.unsqueeze(1)
    return w2d * s - mean * s


_STYLE_FNS: Dict[str, Callable[..., torch.Tensor]] = {
    "timm": _timm,
    "qiao": _qiao,
    "bcn": _bcn,
    "timm_scaled": _timm_scaled,
    "deepmind": _deepmind,
}
#: Styles that take a per-filter ``gain`` and a constant ``gamma`` (Scaled WS).
SCALED_STYLES = ("timm_scaled", "deepmind")

#: The styles :func:`standardize_weight` understands.
WS_STYLES = tuple(_STYLE_FNS)

#: Each style's eps in its upstream layer (``timm``: the StdConv2d default; BiT overrides it to 1e-8).
DEFAULT_EPS: Dict[str, float] = {"timm": 1e-6, "qiao": 1e-5, "bcn": 1e-5, "timm_scaled": 1e-5, "deepmind": 1e-4}


def check_style(style: str) -> str:
    """Return ``style`` if known, else raise a ValueError listing the known styles."""
    if style not in _STYLE_FNS:
        raise ValueError(f"unknown weight-standardization style {style!r}; choose one of {', '.join(WS_STYLES)}")
    return style


def fan_in_of(weight: torch.Tensor) -> int:
    """Number of weights each output filter is standardized over (``in/groups * kh * kw`` for a conv)."""
    return weight[0].numel()


def standardize_weight(
    weight: torch.Tensor,
    style: str = "timm",
    eps: Optional[float] = None,
    gain: Optional[torch.Tensor] = None,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Standardize each output filter of ``weight`` over its fan-in, by the formula of ``style``.

    Args:
        weight: a conv ``(out, in/groups, kh, kw)`` or linear ``(out, in)`` weight; dim 0 is the filter.
        style: one of :data:`WS_STYLES` (see the module docstring for the formulas).
        eps: numerical floor; ``None`` takes the style's upstream default from :data:`DEFAULT_EPS`.
        gain: scaled styles only: a learnable per-filter multiplier with ``out`` elements (any shape,
            e.g. timm's ``(out, 1, 1, 1)``); ``None`` means 1.
        gamma: scaled styles only: a constant multiplier (the activation's gamma).

    Returns:
        A tensor of ``weight``'s shape and dtype, differentiable with respect to ``weight``.
    """
    check_style(style)
    if weight.dim() < 2:
        raise ValueError(f"weight must have an output dim and a fan-in, got shape {tuple(weight.shape)}")
    fan_in = fan_in_of(weight)
    if fan_in < 2:
        raise ValueError(f"cannot standardize filters of fan-in {fan_in}: a single weight standardizes to 0")
    eps = DEFAULT_EPS[style] if eps is None else float(eps)
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it keeps constant filters finite), got {eps}")
    scaled = style in SCALED_STYLES
    if not scaled and (gain is not None or gamma != 1.0):
        raise ValueError(f"gain/gamma apply to the scaled styles {SCALED_STYLES}, not to {style!r}")
    if gain is not None and gain.numel() != weight.shape[0]:
        raise ValueError(f"gain must have one value per output filter ({weight.shape[0]}), got shape {tuple(gain.shape)}")
    w2d = weight.reshape(weight.shape[0], fan_in)
    # Statistics in float32 (float64 stays float64) whatever the autocast state or parameter dtype;
    # the caller's conv then runs in the autocast dtype.
    w2d = w2d.to(torch.promote_types(w2d.dtype, torch.float32))
    args = (w2d, eps)
    device_type = weight.device.type
    autocast_off = torch.amp.is_autocast_available(device_type)  # not on e.g. the meta device
    with torch.autocast(device_type=device_type, enabled=False) if autocast_off else contextlib.nullcontext():
        if scaled:
            # one python-float constant, as timm computes it (gamma * fan_in^-0.5), so results match bitwise
            const = gamma * fan_in ** -0.5 if style == "timm_scaled" else gamma
            scale = torch.full((weight.shape[0],), const, dtype=w2d.dtype, device=w2d.device) if gain is None \
                else gain.reshape(-1).to(w2d.dtype) * const
            args = (w2d, eps, scale)
        out = _STYLE_FNS[style](*args)
    return out.to(weight.dtype).reshape(weight.shape)

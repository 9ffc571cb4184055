"""The one weight-standardization function every WS layer in wszoo calls.

A checkpoint is reproduced only by the exact formula it was trained with, and eps is not stored in a
state dict, so the formula is chosen explicitly by *style*. With ``W`` reshaped to
``(out_channels, fan_in)`` where ``fan_in = in_channels / groups * kh * kw``:

=========  =====================================================  ============================  =======
style      formula                                                used by                       eps
=========  =====================================================  ============================  =======
``timm``   ``(W - mean) / sqrt(var_biased + eps)``                timm ``StdConv2d`` (BiT)      1e-6
``qiao``   ``(W - mean) / (std_unbiased + eps)``                  original WS code, mmcv/mmdet  1e-5
``bcn``    ``(W - mean) / sqrt(var_unbiased + eps)``              Batch-Channel Norm repo       1e-5
=========  =====================================================  ============================  =======

(BiT models use ``timm`` with eps 1e-8.) The statistics are always computed in float32, also under
fp16/bf16 autocast (float64 weights in float64), and the result is returned in the weight's own dtype.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

__all__ = ["WS_STYLES", "DEFAULT_EPS", "standardize_weight", "check_style", "fan_in_of"]


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


_STYLE_FNS: Dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "timm": _timm,
    "qiao": _qiao,
    "bcn": _bcn,
}

#: The styles :func:`standardize_weight` understands.
WS_STYLES = tuple(_STYLE_FNS)

#: Each style's eps in its upstream layer (``timm``: the StdConv2d default; BiT overrides it to 1e-8).
DEFAULT_EPS: Dict[str, float] = {"timm": 1e-6, "qiao": 1e-5, "bcn": 1e-5}


def check_style(style: str) -> str:
    """Return ``style`` if known, else raise a ValueError listing the known styles."""
    if style not in _STYLE_FNS:
        raise ValueError(f"unknown weight-standardization style {style!r}; choose one of {', '.join(WS_STYLES)}")
    return style


def fan_in_of(weight: torch.Tensor) -> int:
    """Number of weights each output filter is standardized over (``in/groups * kh * kw`` for a conv)."""
    return weight[0].numel()


def standardize_weight(weight: torch.Tensor, style: str = "timm", eps: Optional[float] = None) -> torch.Tensor:
    """Standardize each output filter of ``weight`` over its fan-in, by the formula of ``style``.

    Args:
        weight: a conv ``(out, in/groups, kh, kw)`` or linear ``(out, in)`` weight; dim 0 is the filter.
        style: one of :data:`WS_STYLES` (see the module docstring for the formulas).
        eps: numerical floor; ``None`` takes the style's upstream default from :data:`DEFAULT_EPS`.

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
    w2d = weight.reshape(weight.shape[0], fan_in)
    # Statistics in float32 (float64 stays float64) whatever the autocast state or parameter dtype;
    # the caller's conv then runs in the autocast dtype.
    w2d = w2d.to(torch.promote_types(w2d.dtype, torch.float32))
    device_type = weight.device.type
    if torch.amp.is_autocast_available(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            out = _STYLE_FNS[style](w2d, eps)
    else:  # e.g. the meta device, used to build large models without allocating them
        out = _STYLE_FNS[style](w2d, eps)
    return out.to(weight.dtype).reshape(weight.shape)

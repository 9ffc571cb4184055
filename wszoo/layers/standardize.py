"""The one weight-standardization function every WS layer in wszoo calls (for many weights at once, with the
same formulas: :mod:`wszoo.layers.grouped`).

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
``cwn``          ``gamma * gain * (W - mean) / sqrt(||W - mean||^2 + eps)``  Centered WN (Huang 2017)    1e-8
===============  ===========================================================  ==========================  =====

The two *scaled* styles (Scaled WS, Brock et al. 2021) take a per-filter ``gain`` and a constant
``gamma`` (the activation's variance-preserving gain, when it is folded into the conv); ``cwn`` takes
them too (its learnable per-filter scale and its fixed filter norm); the others take neither. (BiT models use
``timm`` with eps 1e-8.) The statistics are always computed in float32, also under
fp16/bf16 autocast (float64 weights in float64), and the result is returned in the weight's own dtype.
"""
import contextlib
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

# (row_scale, checked_eps, the layout and autocast helpers and the constants below are shared with the grouped
# path, wszoo.layers.grouped, which computes the same formulas for many weights at once)
__all__ = ["WS_STYLES", "SCALED_STYLES", "GAIN_STYLES", "DEFAULT_EPS", "standardize_weight",
           "standardize_weight_and_norms", "request_filter_norms", "filter_norms_wanted", "record_filter_norms",
           "recorded_filter_norms", "check_style", "fan_in_of"]


#: The styles :func:`standardize_weight` understands.
WS_STYLES = ("timm", "qiao", "bcn", "timm_scaled", "deepmind", "cwn")

# Styles whose per-row factor is exactly batch_norm's invstd (v + eps)^-1/2: they run as F.batch_norm
# itself (bitwise timm's StdConv2d / ScaledStdConv2d, forward and backward).
BATCH_NORM_STYLES = ("timm", "timm_scaled")


# Every other style is y = (W - mean) * b(v) * scale per row, with v the biased variance over the fan-in
# n and b a style-specific function of it. row_scale gives (b, db/dv) on the per-row (out, 1) statistics.
# (One if/elif function, not a dict of functions, so TorchScript can compile it.)
def row_scale(style: str, v: torch.Tensor, n: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    if style == "qiao":
        # 1 / (std_unbiased + eps). The variance is floored at the dtype's smallest normal before the sqrt, so
        # a constant filter gets a finite gradient (the original code's sqrt'(0) gives NaN there).
        tiny = 2.2250738585072014e-308 if v.dtype == torch.float64 else 1.1754943508222875e-38
        std = (v.clamp_min(tiny) * (n / (n - 1))).sqrt()
        b = (std + eps).reciprocal()
        return b, torch.where(v > tiny, -b.square() * (n / (n - 1)) / (2 * std), torch.zeros_like(b))
    if style == "bcn":
        b = torch.rsqrt(v * (n / (n - 1)) + eps)  # (var_unbiased + eps)^-1/2
        return b, -0.5 * (n / (n - 1)) * b ** 3
    if style == "deepmind":
        q = v * n  # Haiku's WSConv2D: rsqrt(max(var * fan_in, eps))
        b = torch.rsqrt(q.clamp_min(eps))
        return b, torch.where(q > eps, -0.5 * n * b ** 3, torch.zeros_like(b))
    if style == "cwn":
        b = torch.rsqrt(v * n + eps)  # 1 / sqrt(||W - mean||^2 + eps): centred filters of unit norm
        return b, -0.5 * n * b ** 3
    raise ValueError("no row scale for this style: " + style)


def _batch_norm_rows(w2d: torch.Tensor, eps: float, scale: Optional[torch.Tensor]) -> torch.Tensor:
    # batch_norm over a (1, out, fan_in) view: biased variance, eps inside the sqrt, the per-row scale
    # riding in the affine weight; one fused kernel each way.
    return F.batch_norm(w2d.unsqueeze(0), None, None, weight=scale, training=True, momentum=0.0, eps=eps).squeeze(0)


class _Standardize(torch.autograd.Function):
    """``y = (W - mean) * b(v) * scale`` per row of a 2-D weight, with an analytic, fused backward, for
    the styles batch_norm cannot express (eps outside the sqrt, unbiased variance, a clamp).

    Why not plain autograd: on CPU the ``qiao`` standardization of a ResNet-50's weights, forward plus
    backward, costs several times more through ``var_mean``/subtract/divide (timings: docs/speed.md).
    Forward: a mean, one centred copy, a row norm, an in-place scale. Backward: exactly one batch_norm backward.
    For ``y = c * a(v)`` (``c = W - mean``, ``a = b * scale``) the gradient is
    ``a (g - mean(g)) + 2 a'(v) / n * sum(g c) * c``; batch_norm's backward with ``invstd = rho`` and
    affine weight ``gamma`` gives ``gamma rho (g - mean(g)) - gamma rho^3 / n * sum(g c) * c``, so
    ``rho = sqrt(-2 b' / b)`` and ``gamma = a / rho`` make the two equal (where b' = 0, a clamp, a tiny
    rho gives the vanishing second term). Not twice differentiable: a double backward raises.
    """

    @staticmethod
    def forward(ctx, w2d: torch.Tensor, scale: Optional[torch.Tensor], style: str, eps: float,  # type: ignore[override]
                stats: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        n = w2d.shape[1]
        mean = w2d.mean(1, keepdim=True)
        y = w2d - mean
        v = torch.linalg.vector_norm(y, dim=1, keepdim=True).square_().div_(n)
        if stats is not None:  # the rows' mean and biased variance, for standardize_weight_and_norms
            stats += [mean.view(-1), v.view(-1)]
        b, db = row_scale(style, v, n, eps)
        a = b if scale is None else b * scale.unsqueeze(1)
        y.mul_(a)
        rho = torch.where(db < 0, (-2 * db / b).sqrt(), torch.full_like(b, RHO_FLOOR))
        ctx.save_for_backward(w2d, mean, rho, a / rho, b / rho)
        ctx.scaled = scale is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        w2d, mean, rho, gamma, b_over_rho = ctx.saved_tensors
        need_w, need_scale = ctx.needs_input_grad[0], ctx.scaled and ctx.needs_input_grad[1]
        grad_w, sum_g_xhat, _ = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous().unsqueeze(0), w2d.unsqueeze(0), gamma.view(-1), None, None, mean.view(-1),
            rho.view(-1), True, 0.0, [need_w, need_scale, False])
        # d y / d scale = c * b, and sum(g * c * b) = sum(g * x_hat) * b / rho with x_hat = c * rho
        grad_scale = sum_g_xhat * b_over_rho.view(-1) if need_scale else None
        return (grad_w.squeeze(0) if need_w else None), grad_scale, None, None, None


# rho where b'(v) = 0 (a clamp is active): small enough that rho^2 * sum(g c) vanishes, large enough that
# gamma = a / rho stays finite in float32 for any eps.
RHO_FLOOR = 1e-12


#: Styles that take a per-filter ``gain`` and a constant ``gamma`` (Scaled WS).
SCALED_STYLES = ("timm_scaled", "deepmind")

#: Styles that accept ``gain``/``gamma``: the scaled ones and Centered Weight Normalization.
GAIN_STYLES = SCALED_STYLES + ("cwn",)

#: Each style's eps in its upstream layer (``timm``: the StdConv2d default; BiT overrides it to 1e-8).
DEFAULT_EPS: Dict[str, float] = {
    "timm": 1e-6, "qiao": 1e-5, "bcn": 1e-5, "timm_scaled": 1e-5, "deepmind": 1e-4, "cwn": 1e-8,
}


def check_style(style: str) -> str:
    """Return ``style`` if known, else raise a ValueError listing the known styles."""
    if style not in WS_STYLES:
        raise ValueError(f"unknown weight-standardization style {style!r}; choose one of {', '.join(WS_STYLES)}")
    return style


def fan_in_of(weight: torch.Tensor) -> int:
    """Number of weights each output filter is standardized over (``in/groups * kh * kw`` for a conv)."""
    return math.prod(weight.shape[1:])  # (from the shape: no tensor op)


def is_channels_last(weight: torch.Tensor) -> bool:
    return weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)


def memory_order(tensor: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A channels-last conv weight as its memory holds it, (out, kh, kw, in): the statistics over the fan-in do
    not depend on the order, so no copy is made and the result keeps the layout the conv wants."""
    return tensor.permute(0, 2, 3, 1) if channels_last else tensor


def from_memory_order(tensor: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return tensor.permute(0, 3, 1, 2) if channels_last else tensor


def autocast_off(device_type: str):
    """Autocast disabled on ``device_type`` (the statistics stay float32), where autocast exists there (not on
    e.g. the meta device; cpu/cuda answered without the call, which torch.compile cannot trace)."""
    if device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def checked_eps(weight: torch.Tensor, style: str, eps: Optional[float], gain: Optional[torch.Tensor],
                 gamma: float) -> float:
    """The checks :func:`standardize_weight` and :func:`standardize_weights` make on each weight's arguments;
    returns the eps to use (the style's default for ``None``)."""
    check_style(style)
    if weight.dim() < 2:
        raise ValueError(f"weight must have an output dim and a fan-in, got shape {tuple(weight.shape)}")
    fan_in = fan_in_of(weight)
    if fan_in < 2:
        raise ValueError(f"cannot standardize filters of fan-in {fan_in}: a single weight standardizes to 0 "
                         "(filters need a fan-in of at least 2)")
    eps = DEFAULT_EPS[style] if eps is None else float(eps)
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it keeps constant filters finite), got {eps}")
    if style not in GAIN_STYLES and (gain is not None or gamma != 1.0):
        raise ValueError(f"gain/gamma apply to the styles {GAIN_STYLES}, not to {style!r}")
    if gain is not None and gain.numel() != weight.shape[0]:
        raise ValueError(f"gain must have one value per output filter ({weight.shape[0]}), "
                         f"got shape {tuple(gain.shape)}")
    return eps


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
        gain: :data:`GAIN_STYLES` only: a learnable per-filter multiplier with ``out`` elements (any shape,
            e.g. timm's ``(out, 1, 1, 1)``); ``None`` means 1.
        gamma: :data:`GAIN_STYLES` only: a constant multiplier (the activation's gamma; CWN's filter norm).

    Returns:
        A tensor of ``weight``'s shape and dtype, differentiable with respect to ``weight``.

    Eagerly, the non-``batch_norm`` styles run on a fused analytic backward (:class:`_Standardize`). Under
    TorchScript the same formulas run on plain differentiable ops (float rounding apart, the same numbers);
    under FX tracing this function is one leaf node (``torch.fx.wrap`` in :mod:`wszoo.layers.ws_layer`).
    """
    if torch.jit.is_scripting():
        if eps is None:  # (TorchScript cannot read the DEFAULT_EPS table; WS layers always pass theirs)
            raise ValueError("under TorchScript, standardize_weight needs an explicit eps (see DEFAULT_EPS)")
        return _standardize_plain(weight, style, eps, gain, gamma)
    return _standardize_fused(weight, style, eps, gain, gamma)


def _standardize_plain(weight: torch.Tensor, style: str, eps: float, gain: Optional[torch.Tensor],
                       gamma: float) -> torch.Tensor:
    """The formulas on plain ops, for TorchScript (no custom autograd, no autocast context, no layouts)."""
    out_channels = weight.shape[0]
    w2d = weight.reshape(out_channels, -1)
    if w2d.dtype != torch.float64:
        w2d = w2d.float()
    n = w2d.shape[1]
    scale: Optional[torch.Tensor] = None
    if style == "timm_scaled" or style == "deepmind" or style == "cwn":
        const = gamma * n ** -0.5 if style == "timm_scaled" else gamma
        scale = torch.full((out_channels,), const, dtype=w2d.dtype, device=w2d.device) if gain is None \
            else gain.reshape(-1).to(w2d.dtype) * const
    if style == "timm" or style == "timm_scaled":
        out = _batch_norm_rows(w2d, eps, scale)
    else:  # the fused forward's arithmetic, op for op (out of place, for autograd): the same numbers
        centred = w2d - w2d.mean(1, keepdim=True)
        b = row_scale(style, torch.linalg.vector_norm(centred, dim=1, keepdim=True).square() / n, n, eps)[0]
        out = centred * (b if scale is None else b * scale.unsqueeze(1))
    return out.to(weight.dtype).reshape(weight.shape)


def _standardize_fused(
    weight: torch.Tensor,
    style: str,
    eps: Optional[float],
    gain: Optional[torch.Tensor],
    gamma: float,
    stats: Optional[List[torch.Tensor]] = None,
) -> torch.Tensor:
    """The eager path: checks, channels-last layouts, float32 statistics under autocast, fused backward.
    ``stats``: a list that receives each row's mean and biased variance (from the standardization's own pass)."""
    eps = checked_eps(weight, style, eps, gain, gamma)
    fan_in = fan_in_of(weight)
    scaled = style in GAIN_STYLES
    # A channels-last conv weight is standardized in its memory order (the statistics don't care), so
    # no copy is made and the result keeps the layout the conv wants.
    channels_last = is_channels_last(weight)
    in_memory_order = memory_order(weight, channels_last)
    w2d = in_memory_order.reshape(weight.shape[0], fan_in)
    # Statistics in float32 (float64 stays float64) whatever the autocast state or parameter dtype;
    # the caller's conv then runs in the autocast dtype.
    w2d = w2d.to(torch.promote_types(w2d.dtype, torch.float32))
    scale = None
    if scaled:
        # one python-float constant, as timm computes it (gamma * fan_in^-0.5)
        const = gamma * fan_in ** -0.5 if style == "timm_scaled" else gamma
        scale = torch.full((weight.shape[0],), const, dtype=w2d.dtype, device=w2d.device) if gain is None \
            else gain.reshape(-1).to(w2d.dtype) * const
    with autocast_off(weight.device.type):
        if style in BATCH_NORM_STYLES and stats is None:
            out = _batch_norm_rows(w2d, eps, scale)
        elif style in BATCH_NORM_STYLES:  # batch_norm's own kernel, which also returns mean and 1/sqrt(var + eps)
            out, mean, invstd = torch.native_batch_norm(w2d.unsqueeze(0), scale, None, None, None, True, 0.0, eps)
            out = out.squeeze(0)
            with torch.no_grad():
                stats += [mean, invstd.pow(-2).sub_(eps).clamp_min_(0.0)]
        else:
            out = _Standardize.apply(w2d.contiguous(), scale, style, eps, stats)
    return from_memory_order(out.to(weight.dtype).reshape(in_memory_order.shape), channels_last)


def standardize_weight_and_norms(
    weight: torch.Tensor,
    style: str = "timm",
    eps: Optional[float] = None,
    gain: Optional[torch.Tensor] = None,
    gamma: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`standardize_weight`, and the L2 norm of each filter of ``weight`` as it is (not standardized),
    shaped ``(out, 1, ...)`` to broadcast over it, in the statistics' dtype (float32; float64 for float64).

    Why: adaptive gradient clipping (:mod:`wszoo.optim`) needs ``||W_i||`` at every step, and the
    standardization has just computed each filter's mean and biased variance over its ``n`` weights, so
    ``||W_i||^2 = n (var_i + mean_i^2)`` costs a few operators on ``out`` numbers instead of another pass
    over the weight. (For the ``batch_norm`` styles the variance comes back as ``invstd^-2 - eps``, which keeps
    the rounding of ``var + eps``: a filter's squared norm is then off by up to about ``n eps 2^-23``, which
    matters only for filters of norm near ``sqrt(n eps) * 3e-4``, far below AGC's eps of 1e-3 for any
    upstream eps.)
    """
    stats: List[torch.Tensor] = []
    out = _standardize_fused(weight, style, eps, gain, gamma, stats)
    mean, var = stats
    with torch.no_grad():
        norms = torch.addcmul(var, mean, mean).mul_(fan_in_of(weight)).sqrt_()
    return out, norms.view((-1,) + (1,) * (weight.dim() - 1))


# Weights whose filter norms an optimizer hook asked for (adaptive gradient clipping), each with the norms its
# last standardization recorded and the (storage, version) they hold for. Keyed by identity, held weakly:
# a weight that is freed leaves the table, and nothing is added to the parameter (nor to what pickles it).
_FILTER_NORMS = WeakIdKeyDictionary()


def request_filter_norms(weight: torch.Tensor) -> None:
    """Ask every later standardization of ``weight`` in training to record its filter norms
    (:func:`recorded_filter_norms`)."""
    if weight not in _FILTER_NORMS:
        _FILTER_NORMS[weight] = None


def filter_norms_wanted(weight: torch.Tensor) -> bool:
    """True if :func:`request_filter_norms` asked for ``weight``'s filter norms."""
    return weight in _FILTER_NORMS


def record_filter_norms(weight: torch.Tensor, norms: torch.Tensor) -> None:
    """Keep ``norms`` (from :func:`standardize_weight_and_norms`) for ``weight`` as it is now."""
    _FILTER_NORMS[weight] = ((weight.data_ptr(), weight._version), norms)


def recorded_filter_norms(weight: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The filter norms recorded for ``weight`` in ``dtype``, if they still describe it: neither its storage nor
    its version counter has moved since (every in-place change, optimizer step and ``load_state_dict`` moves
    the counter, as for the eval cache); else ``None``, and the caller computes them."""
    entry = _FILTER_NORMS.get(weight)
    if entry is None or entry[0] != (weight.data_ptr(), weight._version) or entry[1].dtype != dtype:
        return None
    return entry[1]

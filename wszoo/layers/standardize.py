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
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["WS_STYLES", "SCALED_STYLES", "GAIN_STYLES", "DEFAULT_EPS", "standardize_weight", "standardize_weights",
           "held_by_standardization",
           "check_style", "fan_in_of"]


#: The styles :func:`standardize_weight` understands.
WS_STYLES = ("timm", "qiao", "bcn", "timm_scaled", "deepmind", "cwn")

# Styles whose per-row factor is exactly batch_norm's invstd (v + eps)^-1/2: they run as F.batch_norm
# itself (bitwise timm's StdConv2d / ScaledStdConv2d, forward and backward).
_BATCH_NORM_EXACT = ("timm", "timm_scaled")


# Every other style is y = (W - mean) * b(v) * scale per row, with v the biased variance over the fan-in
# n and b a style-specific function of it. _row_scale gives (b, db/dv) on the per-row (out, 1) statistics.
# (One if/elif function, not a dict of functions, so TorchScript can compile it.)
def _row_scale(style: str, v: torch.Tensor, n: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
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

    Why not plain autograd: on CPU the ``qiao`` standardization of a ResNet-50's 23.5M weights, forward
    plus backward, costs ~340 ms through ``var_mean``/subtract/divide, against ~50 ms here. Forward: a
    mean, one centred copy, a row norm, an in-place scale. Backward: exactly one batch_norm backward.
    For ``y = c * a(v)`` (``c = W - mean``, ``a = b * scale``) the gradient is
    ``a (g - mean(g)) + 2 a'(v) / n * sum(g c) * c``; batch_norm's backward with ``invstd = rho`` and
    affine weight ``gamma`` gives ``gamma rho (g - mean(g)) - gamma rho^3 / n * sum(g c) * c``, so
    ``rho = sqrt(-2 b' / b)`` and ``gamma = a / rho`` make the two equal (where b' = 0, a clamp, a tiny
    rho gives the vanishing second term). Not twice differentiable: a double backward raises.
    """

    @staticmethod
    def forward(ctx, w2d: torch.Tensor, scale: Optional[torch.Tensor], style: str, eps: float) -> torch.Tensor:  # type: ignore[override]
        n = w2d.shape[1]
        mean = w2d.mean(1, keepdim=True)
        y = w2d - mean
        v = torch.linalg.vector_norm(y, dim=1, keepdim=True).square_().div_(n)
        b, db = _row_scale(style, v, n, eps)
        a = b if scale is None else b * scale.unsqueeze(1)
        y.mul_(a)
        rho = torch.where(db < 0, (-2 * db / b).sqrt(), torch.full_like(b, _RHO_FLOOR))
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
        return (grad_w.squeeze(0) if need_w else None), grad_scale, None, None


# rho where b'(v) = 0 (a clamp is active): small enough that rho^2 * sum(g c) vanishes, large enough that
# gamma = a / rho stays finite in float32 for any eps.
_RHO_FLOOR = 1e-12


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


def _is_channels_last(weight: torch.Tensor) -> bool:
    return weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)


def _memory_order(tensor: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A channels-last conv weight as its memory holds it, (out, kh, kw, in): the statistics over the fan-in do
    not depend on the order, so no copy is made and the result keeps the layout the conv wants."""
    return tensor.permute(0, 2, 3, 1) if channels_last else tensor


def _from_memory_order(tensor: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return tensor.permute(0, 3, 1, 2) if channels_last else tensor


def _autocast_off(device_type: str):
    """Autocast disabled on ``device_type`` (the statistics stay float32), where autocast exists there (not on
    e.g. the meta device; cpu/cuda answered without the call, which torch.compile cannot trace)."""
    if device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _checked_eps(weight: torch.Tensor, style: str, eps: Optional[float], gain: Optional[torch.Tensor],
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
        b = _row_scale(style, torch.linalg.vector_norm(centred, dim=1, keepdim=True).square() / n, n, eps)[0]
        out = centred * (b if scale is None else b * scale.unsqueeze(1))
    return out.to(weight.dtype).reshape(weight.shape)


def _standardize_fused(
    weight: torch.Tensor,
    style: str,
    eps: Optional[float],
    gain: Optional[torch.Tensor],
    gamma: float,
) -> torch.Tensor:
    """The eager path: checks, channels-last layouts, float32 statistics under autocast, fused backward."""
    eps = _checked_eps(weight, style, eps, gain, gamma)
    fan_in = fan_in_of(weight)
    scaled = style in GAIN_STYLES
    # A channels-last conv weight is standardized in its memory order (the statistics don't care), so
    # no copy is made and the result keeps the layout the conv wants.
    channels_last = _is_channels_last(weight)
    in_memory_order = _memory_order(weight, channels_last)
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
    with _autocast_off(weight.device.type):
        if style in _BATCH_NORM_EXACT:
            out = _batch_norm_rows(w2d, eps, scale)
        else:
            out = _Standardize.apply(w2d.contiguous(), scale, style, eps)
    return _from_memory_order(out.to(weight.dtype).reshape(in_memory_order.shape), channels_last)


# --- many weights at once ------------------------------------------------------------------------------
class _GroupedStandardize(torch.autograd.Function):
    """Many weights standardized together. The weights go into one flat buffer, ordered so that the filters of
    one formula and fan-in are adjacent rows of one 2-D view (a *group*). The ``timm`` styles run batch_norm's
    own kernel on each group (bitwise the per-layer path, as that is bitwise timm's). The other styles compute
    per group what needs the row length (mean, centred rows, row norm) and everything per row after that (the
    style's ``b(v)``, the backward's coefficients) once for all rows of a formula. Results are views into
    one buffer. Backward: one batch_norm backward per group (see :class:`_Standardize` for the algebra).
    Kernels grow with the groups (a ResNet-50 has 11), not with the layers."""

    @staticmethod
    def forward(ctx, plan: "_Plan", *tensors: torch.Tensor):  # type: ignore[override]
        weights, gains = tensors[:plan.count], tensors[plan.count:]
        layouts = [_is_channels_last(weights[i]) for i in plan.order]
        in_memory_order = [_memory_order(weights[i], cl) for i, cl in zip(plan.order, layouts, strict=True)]
        flat = torch._C._nn.flatten_dense_tensors(in_memory_order)
        stats = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        out = torch.empty_like(stats)
        scale_parts: List[Optional[torch.Tensor]] = [None] * len(plan.groups)
        if plan.row_const is not None:  # per row: gain * const (timm_scaled: gamma / sqrt(fan_in)), or const
            const = torch.tensor(plan.row_const, dtype=stats.dtype).to(stats.device, non_blocking=True)
            scale = const
            if gains:
                gain_rows = torch._C._nn.flatten_dense_tensors(list(gains)).to(stats.dtype)
                if plan.gain_rows_partial:  # some weights of a gain style have no gain: their rows keep const
                    index = torch.tensor(plan.gain_rows, device=stats.device)
                    scale = const.index_put((index,), gain_rows * const[index])
                else:
                    scale = gain_rows * const
            scale_parts = [part if g.scaled else None
                           for g, part in zip(plan.groups, torch.split(scale, plan.group_rows), strict=True)]
        rows_in = []
        saved: List[Tuple] = [()] * len(plan.groups)  # per group: (mean, invstd, batch_norm weight, b / rho)
        fused: Dict[int, Tuple] = {}  # group index -> (centred rows, mean, row norm)
        bn_stats = None
        if any(g.style in _BATCH_NORM_EXACT for g in plan.groups):  # batch_norm writes its statistics here
            bn_stats = torch.empty(2, sum(plan.group_rows), dtype=stats.dtype, device=stats.device)
            bn_means, bn_invstds = (torch.split(t, plan.group_rows) for t in bn_stats)
        # (one split per buffer, then a (1, rows, fan_in) view per group: batch_norm's layout)
        for k, (g, w_part, out_part) in enumerate(zip(plan.groups, torch.split(stats, plan.group_sizes),
                                                      torch.split(out, plan.group_sizes), strict=True)):
            w3d = w_part.view(1, g.rows, g.fan_in)
            rows_in.append(w3d)
            if g.style in _BATCH_NORM_EXACT:  # straight into the results' buffer
                torch.ops.aten.native_batch_norm.out(w3d, scale_parts[k], None, None, None, True, 0.0, g.eps,
                                                     out=out_part.view(1, g.rows, g.fan_in),
                                                     save_mean=bn_means[k], save_invstd=bn_invstds[k])
                saved[k] = (bn_means[k], bn_invstds[k], scale_parts[k], None)
            else:  # the statistics that need the row length
                mean = w3d.mean(2, keepdim=True)
                centred = torch.sub(w3d, mean, out=out_part.view(1, g.rows, g.fan_in))
                fused[k] = (centred, mean, torch.linalg.vector_norm(centred, dim=2, keepdim=True))
        for family in plan.families:  # the fused styles: everything per row, once per formula
            members = [k for k in family.groups if k in fused]
            if not members:
                continue
            v = torch.cat([fused[k][2] for k in members], 1).view(-1, 1).square_()
            fan_in = torch.tensor([plan.groups[k].fan_in for k in members for _ in range(plan.groups[k].rows)],
                                  dtype=v.dtype).to(v.device, non_blocking=True).unsqueeze(1)
            v = v.div_(fan_in)  # biased variance of every row, (rows, 1)
            b, db = _row_scale(family.style, v, fan_in, family.eps)  # type: ignore[arg-type]
            a = b
            if scale_parts[members[0]] is not None:
                a = b * torch.cat([scale_parts[k] for k in members]).unsqueeze(1)
            rho = torch.where(db < 0, (-2 * db / b).sqrt(), torch.full_like(b, _RHO_FLOOR))
            sizes = [plan.groups[k].rows for k in members]
            pieces = zip(torch.split(a.view(1, -1, 1), sizes, 1), torch.split(rho.view(-1), sizes),
                         torch.split((a / rho).view(-1), sizes), torch.split((b / rho).view(-1), sizes), strict=True)
            for k, (a_part, rho_part, gamma_part, b_over_rho_part) in zip(members, pieces, strict=True):
                centred, mean, _ = fused[k]
                centred.mul_(a_part)
                saved[k] = (mean.view(-1), rho_part, gamma_part, b_over_rho_part)
        ctx.plan, ctx.dtype, ctx.layouts = plan, flat.dtype, layouts
        ctx.like = in_memory_order  # (the weights or views of them: only their shapes, for backward)
        ctx.gains_like = list(gains)
        # Held on ctx, not by save_for_backward (which frees them after one backward): the results may serve
        # several forward passes (every micro-batch of one optimizer step), each with its own backward.
        ctx.buffers = (rows_in, saved)
        results = torch._C._nn.unflatten_dense_tensors(out if out.dtype == flat.dtype else out.to(flat.dtype),
                                                       in_memory_order)
        standardized: List[Optional[torch.Tensor]] = [None] * plan.count
        for i, result, cl in zip(plan.order, results, layouts, strict=True):
            standardized[i] = _from_memory_order(result, cl)
        return tuple(standardized)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        plan: _Plan = ctx.plan
        rows_in, saved = ctx.buffers
        need_w = any(ctx.needs_input_grad[1:1 + plan.count])
        need_gain = any(ctx.needs_input_grad[1 + plan.count:])
        grad_flat = torch._C._nn.flatten_dense_tensors([_memory_order(grads[i], cl)
                                                        for i, cl in zip(plan.order, ctx.layouts, strict=True)])
        if grad_flat.dtype != rows_in[0].dtype:
            grad_flat = grad_flat.to(rows_in[0].dtype)
        grad_rows, grad_scales = [], []
        for g, w3d, grad, (mean, invstd, weight, b_over_rho) in zip(
                plan.groups, rows_in, torch.split(grad_flat, plan.group_sizes), saved, strict=True):
            grad_w, grad_weight, _ = torch.ops.aten.native_batch_norm_backward(
                grad.view(1, g.rows, g.fan_in), w3d, weight, None, None, mean, invstd, True, g.eps,
                [need_w, need_gain and weight is not None, False])
            if need_w:
                grad_rows.append(grad_w.view(-1))
            if need_gain:
                # batch_norm styles: the scale is batch_norm's weight. Fused styles: d y / d scale = c * b, and
                # sum(g * c * b) = sum(g * x_hat) * b / rho with x_hat = c * rho
                grad_scales.append(torch.zeros(g.rows, dtype=w3d.dtype, device=w3d.device) if weight is None
                                   else grad_weight if b_over_rho is None else grad_weight * b_over_rho)
        grads_out: List[Optional[torch.Tensor]] = [None] * (plan.count + plan.gain_count)
        if need_w:
            grad_w_flat = torch.cat(grad_rows) if len(grad_rows) > 1 else grad_rows[0]
            pieces = torch._C._nn.unflatten_dense_tensors(grad_w_flat.to(ctx.dtype), ctx.like)
            for i, piece, cl in zip(plan.order, pieces, ctx.layouts, strict=True):
                grads_out[i] = _from_memory_order(piece, cl)
        if need_gain:  # the gain is scale / const
            grad_scale = torch.cat(grad_scales) if len(grad_scales) > 1 else grad_scales[0]
            const = torch.tensor(plan.row_const, dtype=grad_scale.dtype).to(grad_scale.device, non_blocking=True)
            grad_scale = grad_scale * const
            gain_grads = grad_scale[torch.tensor(plan.gain_rows, device=grad_scale.device)] \
                if plan.gain_rows_partial else grad_scale
            pieces = torch._C._nn.unflatten_dense_tensors(gain_grads, ctx.gains_like)
            for k, (piece, dtype) in enumerate(zip(pieces, plan.gain_dtypes, strict=True)):
                grads_out[plan.count + k] = piece if piece.dtype == dtype else piece.to(dtype)
        return (None, *grads_out)


class _Group:
    """Filters of one formula and fan-in: elements ``start:end`` of the flat buffer, ``rows`` filters."""

    def __init__(self, start: int, rows: int, fan_in: int, style: str, eps: float) -> None:
        self.start, self.end = start, start + rows * fan_in
        self.rows, self.fan_in, self.style, self.eps = rows, fan_in, style, eps
        self.scaled = style in GAIN_STYLES


class _Family:
    """Groups ``groups`` (indices) share a formula (style and eps)."""

    def __init__(self, style: str, eps: float) -> None:
        self.style, self.eps, self.groups = style, eps, []


class _Plan:
    """Where each weight goes in the flat buffer: its order, the groups and families of rows, and per row its
    constant multiplier and (for weights with a gain) the row of the gain."""

    def __init__(self, weights, styles, eps, gains, gammas) -> None:
        self.count = len(weights)
        fan_ins = [fan_in_of(w) for w in weights]
        self.order = sorted(range(self.count), key=lambda i: (styles[i], eps[i], fan_ins[i]))
        self.groups: List[_Group] = []
        self.families: List[_Family] = []
        consts: List[float] = []
        gain_rows: List[int] = []
        self.gain_dtypes = []
        start = row = 0
        for i in self.order:
            rows, n = weights[i].shape[0], fan_ins[i]
            if not self.families or (self.families[-1].style, self.families[-1].eps) != (styles[i], eps[i]):
                self.families.append(_Family(styles[i], eps[i]))
            if not self.groups or self.groups[-1].fan_in != n or len(self.families[-1].groups) == 0:
                self.families[-1].groups.append(len(self.groups))
                self.groups.append(_Group(start, rows, n, styles[i], eps[i]))
            else:
                last = self.groups[-1]
                last.rows, last.end = last.rows + rows, last.end + rows * n
            const = 1.0
            if styles[i] in GAIN_STYLES:
                const = gammas[i] * n ** -0.5 if styles[i] == "timm_scaled" else gammas[i]
            consts += [const] * rows
            if gains[i] is not None:
                gain_rows += range(row, row + rows)
                self.gain_dtypes.append(gains[i].dtype)
            start, row = start + rows * n, row + rows
        self.gain_count = len(self.gain_dtypes)
        self.row_const = consts if any(g.scaled for g in self.groups) else None
        self.gain_rows = gain_rows
        # the common case (every row has a gain: an NF model) needs no index
        self.gain_rows_partial = bool(gain_rows) and len(gain_rows) != row
        self.group_sizes = [g.end - g.start for g in self.groups]
        self.group_rows = [g.rows for g in self.groups]


def standardize_weights(weights: Sequence[torch.Tensor], styles: Sequence[str], eps: Sequence[Optional[float]],
                        gains: Optional[Sequence[Optional[torch.Tensor]]] = None,
                        gammas: Optional[Sequence[float]] = None) -> List[torch.Tensor]:
    """:func:`standardize_weight` of many weights at once, in a number of kernels that grows with the number of
    distinct fan-ins and formulas (a ResNet-50 has 11), not with the number of weights; differentiable.

    Same arguments as :func:`standardize_weight`, one entry per weight; the results are the same numbers up
    to float rounding (the ``timm`` styles: batch_norm's kernels on the grouped rows). Weights are bucketed by
    device, dtype and whether they need a gradient; each bucket is one autograd node. Float32 statistics
    whatever the autocast state; channels-last weights keep their layout. Unlike other autograd nodes, each
    node can be back-propagated through more than once (its buffers live as long as its results): results
    reused by several forward passes take each pass's backward separately.
    """
    count = len(weights)
    gains = list(gains) if gains is not None else [None] * count
    gammas = list(gammas) if gammas is not None else [1.0] * count
    if not (len(styles) == len(eps) == len(gains) == len(gammas) == count):
        raise ValueError("standardize_weights: weights, styles, eps, gains and gammas need one entry per weight")
    eps = [_checked_eps(*args) for args in zip(weights, styles, eps, gains, gammas, strict=True)]
    buckets: Dict[Tuple, List[int]] = {}
    for i, w in enumerate(weights):
        needs_grad = torch.is_grad_enabled() and (w.requires_grad or (gains[i] is not None and gains[i].requires_grad))
        buckets.setdefault((w.device, w.dtype, needs_grad), []).append(i)
    results: List[Optional[torch.Tensor]] = [None] * count
    for (device, _, _), members in buckets.items():
        plan = _Plan([weights[i] for i in members], [styles[i] for i in members], [eps[i] for i in members],
                     [gains[i] for i in members], [gammas[i] for i in members])
        ordered_gains = [gains[members[i]] for i in plan.order if gains[members[i]] is not None]
        with _autocast_off(device.type):
            outs = _GroupedStandardize.apply(plan, *[weights[i] for i in members], *ordered_gains)
        for i, out in zip(members, outs, strict=True):
            results[i] = out
    return results  # type: ignore[return-value]


def held_by_standardization(results: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The tensors that results of :func:`standardize_weights` keep alive: the results themselves and what their
    autograd nodes hold for backward (the flat copy of the weights, the per-row statistics). What grouping
    costs in memory; tensors of other origins are returned as they are."""
    held: List[torch.Tensor] = list(results)
    # each result's grad_fn is its bucket's node (channels-last results too: the node returns them as they are)
    nodes = {id(r.grad_fn): r.grad_fn for r in results if hasattr(r.grad_fn, "buffers")}
    for node in nodes.values():
        rows, saved = node.buffers
        held += list(rows) + [t for group in saved for t in group if isinstance(t, torch.Tensor)]
    return held

"""Many weights standardized at once, with the formulas of :mod:`wszoo.layers.standardize`, and the
:class:`LayerGroup` through which a model's WS layers use it in training (:func:`wszoo.group_ws`).

Why: standardized layer by layer, every WS layer costs a dozen or more dispatched operators per forward
and as many per backward; on a GPU each is a kernel launch. Here the weights go into one flat buffer,
ordered so that the filters of one formula and fan-in are adjacent rows of one 2-D view (a *group*), and
the number of kernels grows with the groups (a ResNet-50 has 11), not with the layers.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .standardize import (
    BATCH_NORM_STYLES,
    GAIN_STYLES,
    RHO_FLOOR,
    autocast_off,
    checked_eps,
    fan_in_of,
    from_memory_order,
    is_channels_last,
    memory_order,
    row_scale,
)
from .ws_layer import WSLayer

__all__ = ["standardize_weights", "held_by_standardization", "standardize_layers", "is_groupable", "LayerGroup"]


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




# --- the forward, step by step ------------------------------------------------------------------------
def _flat_weights(plan: _Plan, weights: Sequence[torch.Tensor]) -> Tuple[List[bool], List[torch.Tensor], torch.Tensor]:
    """Each weight in its memory order (channels-last ones too, without a copy), in the plan's order, and the
    flat buffer holding them all."""
    layouts = [is_channels_last(weights[i]) for i in plan.order]
    in_memory_order = [memory_order(weights[i], cl) for i, cl in zip(plan.order, layouts, strict=True)]
    return layouts, in_memory_order, torch._C._nn.flatten_dense_tensors(in_memory_order)


def _row_scales(plan: _Plan, stats: torch.Tensor, gains: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """Per group, the per-row multiplier of the scaled styles (gain * const, timm_scaled's const being
    gamma / sqrt(fan_in); const alone for a weight without gain), ``None`` for the unscaled styles."""
    if plan.row_const is None:
        return [None] * len(plan.groups)
    const = torch.tensor(plan.row_const, dtype=stats.dtype).to(stats.device, non_blocking=True)
    scale = const
    if gains:
        gain_rows = torch._C._nn.flatten_dense_tensors(list(gains)).to(stats.dtype)
        if plan.gain_rows_partial:  # some weights of a gain style have no gain: their rows keep const
            index = torch.tensor(plan.gain_rows, device=stats.device)
            scale = const.index_put((index,), gain_rows * const[index])
        else:
            scale = gain_rows * const
    return [part if g.scaled else None
            for g, part in zip(plan.groups, torch.split(scale, plan.group_rows), strict=True)]


def _standardize_groups(plan: _Plan, stats: torch.Tensor, out: torch.Tensor,
                        scale_parts: List[Optional[torch.Tensor]]) -> Tuple[List[torch.Tensor], List[Tuple], Dict]:
    """Per group, what needs the row length: the batch_norm styles run batch_norm's kernel straight into
    ``out``; the other styles write their centred rows into ``out`` and keep mean and row norm.
    Returns the groups' (1, rows, fan_in) input views, what backward needs per group (filled for the
    batch_norm styles), and ``{group: (centred rows, mean, row norm)}`` for the others."""
    rows_in: List[torch.Tensor] = []
    saved: List[Tuple] = [()] * len(plan.groups)  # per group: (mean, invstd, batch_norm weight, b / rho)
    centred: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    if any(g.style in BATCH_NORM_STYLES for g in plan.groups):  # batch_norm writes its statistics here
        bn_stats = torch.empty(2, sum(plan.group_rows), dtype=stats.dtype, device=stats.device)
        bn_means, bn_invstds = (torch.split(t, plan.group_rows) for t in bn_stats)
    for k, (g, w_part, out_part) in enumerate(zip(plan.groups, torch.split(stats, plan.group_sizes),
                                                  torch.split(out, plan.group_sizes), strict=True)):
        w3d, out3d = w_part.view(1, g.rows, g.fan_in), out_part.view(1, g.rows, g.fan_in)
        rows_in.append(w3d)
        if g.style in BATCH_NORM_STYLES:
            torch.ops.aten.native_batch_norm.out(w3d, scale_parts[k], None, None, None, True, 0.0, g.eps, out=out3d,
                                                 save_mean=bn_means[k], save_invstd=bn_invstds[k])
            saved[k] = (bn_means[k], bn_invstds[k], scale_parts[k], None)
        else:
            mean = w3d.mean(2, keepdim=True)
            rows = torch.sub(w3d, mean, out=out3d)
            centred[k] = (rows, mean, torch.linalg.vector_norm(rows, dim=2, keepdim=True))
    return rows_in, saved, centred


def _scale_families(plan: _Plan, centred: Dict, scale_parts: List[Optional[torch.Tensor]], saved: List[Tuple]) -> None:
    """The other styles, per row and once per formula: the style's ``b(v)`` times the row's scale multiplies the
    centred rows in place, and backward's batch_norm coefficients go into ``saved`` (see
    :class:`wszoo.layers.standardize` ``_Standardize`` for the algebra)."""
    for family in plan.families:
        members = [k for k in family.groups if k in centred]
        if not members:
            continue
        v = torch.cat([centred[k][2] for k in members], 1).view(-1, 1).square_()
        fan_in = torch.tensor([plan.groups[k].fan_in for k in members for _ in range(plan.groups[k].rows)],
                              dtype=v.dtype).to(v.device, non_blocking=True).unsqueeze(1)
        v = v.div_(fan_in)  # biased variance of every row, (rows, 1)
        b, db = row_scale(family.style, v, fan_in, family.eps)  # type: ignore[arg-type]
        a = b
        if scale_parts[members[0]] is not None:
            a = b * torch.cat([scale_parts[k] for k in members]).unsqueeze(1)
        rho = torch.where(db < 0, (-2 * db / b).sqrt(), torch.full_like(b, RHO_FLOOR))
        sizes = [plan.groups[k].rows for k in members]
        pieces = zip(torch.split(a.view(1, -1, 1), sizes, 1), torch.split(rho.view(-1), sizes),
                     torch.split((a / rho).view(-1), sizes), torch.split((b / rho).view(-1), sizes), strict=True)
        for k, (a_part, rho_part, gamma_part, b_over_rho_part) in zip(members, pieces, strict=True):
            rows, mean, _ = centred[k]
            rows.mul_(a_part)
            saved[k] = (mean.view(-1), rho_part, gamma_part, b_over_rho_part)


# --- the backward, step by step -----------------------------------------------------------------------
def _group_gradients(plan: _Plan, rows_in: List[torch.Tensor], saved: List[Tuple], grad_flat: torch.Tensor,
                     need_w: bool, need_gain: bool) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """One batch_norm backward per group: the weights' gradient rows and the per-row scales' gradients."""
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
    return grad_rows, grad_scales


def _gain_gradients(plan: _Plan, grad_scales: List[torch.Tensor], gains_like: List[torch.Tensor]
                    ) -> List[torch.Tensor]:
    """The gains' gradients from the per-row scales' (the gain is scale / const), in each gain's dtype."""
    grad_scale = torch.cat(grad_scales) if len(grad_scales) > 1 else grad_scales[0]
    const = torch.tensor(plan.row_const, dtype=grad_scale.dtype).to(grad_scale.device, non_blocking=True)
    grad_scale = grad_scale * const
    gain_grads = grad_scale[torch.tensor(plan.gain_rows, device=grad_scale.device)] \
        if plan.gain_rows_partial else grad_scale
    pieces = torch._C._nn.unflatten_dense_tensors(gain_grads, gains_like)
    return [piece if piece.dtype == dtype else piece.to(dtype)
            for piece, dtype in zip(pieces, plan.gain_dtypes, strict=True)]


class _GroupedStandardize(torch.autograd.Function):
    """Many weights standardized together in the groups of a :class:`_Plan`. The ``timm`` styles run
    batch_norm's own kernel on each group (bitwise the per-layer path, as that is bitwise timm's). The other
    styles compute per group what needs the row length (mean, centred rows, row norm) and everything per row
    after that (the style's ``b(v)``, the backward's coefficients) once for all rows of a formula. Results are
    views into one buffer. Backward: one batch_norm backward per group."""

    @staticmethod
    def forward(ctx, plan: _Plan, *tensors: torch.Tensor):  # type: ignore[override]
        weights, gains = tensors[:plan.count], tensors[plan.count:]
        layouts, in_memory_order, flat = _flat_weights(plan, weights)
        stats = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        out = torch.empty_like(stats)
        scale_parts = _row_scales(plan, stats, gains)
        rows_in, saved, centred = _standardize_groups(plan, stats, out, scale_parts)
        _scale_families(plan, centred, scale_parts, saved)
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
            standardized[i] = from_memory_order(result, cl)
        return tuple(standardized)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        plan: _Plan = ctx.plan
        rows_in, saved = ctx.buffers
        need_w = any(ctx.needs_input_grad[1:1 + plan.count])
        need_gain = any(ctx.needs_input_grad[1 + plan.count:])
        grad_flat = torch._C._nn.flatten_dense_tensors([memory_order(grads[i], cl)
                                                        for i, cl in zip(plan.order, ctx.layouts, strict=True)])
        if grad_flat.dtype != rows_in[0].dtype:
            grad_flat = grad_flat.to(rows_in[0].dtype)
        grad_rows, grad_scales = _group_gradients(plan, rows_in, saved, grad_flat, need_w, need_gain)
        grads_out: List[Optional[torch.Tensor]] = [None] * (plan.count + plan.gain_count)
        if need_w:
            grad_w_flat = torch.cat(grad_rows) if len(grad_rows) > 1 else grad_rows[0]
            pieces = torch._C._nn.unflatten_dense_tensors(grad_w_flat.to(ctx.dtype), ctx.like)
            for i, piece, cl in zip(plan.order, pieces, ctx.layouts, strict=True):
                grads_out[i] = from_memory_order(piece, cl)
        if need_gain:
            grads_out[plan.count:] = _gain_gradients(plan, grad_scales, ctx.gains_like)
        return (None, *grads_out)


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
    eps = [checked_eps(*args) for args in zip(weights, styles, eps, gains, gammas, strict=True)]
    buckets: Dict[Tuple, List[int]] = {}
    for i, w in enumerate(weights):
        needs_grad = torch.is_grad_enabled() and (w.requires_grad or (gains[i] is not None and gains[i].requires_grad))
        buckets.setdefault((w.device, w.dtype, needs_grad), []).append(i)
    results: List[Optional[torch.Tensor]] = [None] * count
    for (device, _, _), members in buckets.items():
        plan = _Plan([weights[i] for i in members], [styles[i] for i in members], [eps[i] for i in members],
                     [gains[i] for i in members], [gammas[i] for i in members])
        ordered_gains = [gains[members[i]] for i in plan.order if gains[members[i]] is not None]
        with autocast_off(device.type):
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


# --- a model's WS layers, standardized together -------------------------------------------------------
def standardize_layers(layers: Sequence[WSLayer]) -> List[torch.Tensor]:
    """Each layer's :meth:`~WSLayer.standardized_weight`, computed together (:func:`standardize_weights`: a
    number of kernels that grows with the distinct fan-ins and formulas, not with the layers)."""
    return standardize_weights([layer.weight for layer in layers], [layer.ws_style for layer in layers],
                               [layer.ws_eps for layer in layers], [layer.ws_gain() for layer in layers],
                               [layer.ws_gamma for layer in layers])


def is_groupable(layer: WSLayer) -> bool:
    """Whether ``layer``'s standardized weight is :class:`WSLayer`'s own (``weight`` standardized along dim 0),
    which :func:`standardize_layers` computes for many layers at once. Layers that compute it otherwise (a
    transposed conv's layout, a function-preserving affine, a user's subclass) standardize on their own."""
    return type(layer).standardized_weight is WSLayer.standardized_weight


#: Where a :class:`LayerGroup` standardizes its layers together: on every device, or only on accelerators
#: (GPUs ...), where per-layer standardization is bound by kernel launches (layer by layer on the CPU).
GROUP_DEVICES = ("all", "accelerators")


class LayerGroup:
    """WS layers whose training-mode weights are standardized together (see :func:`wszoo.group_ws`).

    The first training forward of any member after a weight changed standardizes every member at once
    (:func:`standardize_layers`) and keeps each member's result; the others' forwards then use theirs.
    Results stay valid until a member's weight or gain changes (an optimizer step, ``load_state_dict``, any
    in-place edit) or autograd needs a gradient path a result lacks, so all forward passes between two
    optimizer steps (micro-batches, several views of a batch, a checkpointed block's recomputation) share
    one standardization, and each backward takes its share of its gradient.

    Args:
        layers: the members (each :func:`is_groupable`).
        devices: ``'all'``, or ``'accelerators'`` to standardize members whose weights are on the CPU layer by
            layer (what ``group_ws='auto'`` asks for).
    """

    def __init__(self, layers: Sequence[WSLayer], devices: str = "all") -> None:
        if devices not in GROUP_DEVICES:
            raise ValueError(f"LayerGroup: devices must be one of {GROUP_DEVICES}, got {devices!r}")
        odd = [type(layer).__name__ for layer in layers if not is_groupable(layer)]
        if odd:
            raise ValueError(f"LayerGroup takes layers whose weight standardizes along dim 0; {', '.join(odd)} "
                             "compute theirs otherwise (see is_groupable)")
        self.devices = devices
        self.layers = list(layers)
        self._results: Dict[int, Tuple[Tuple, torch.Tensor]] = {}  # id(member) -> (its state key, its result)

    def __repr__(self) -> str:
        return f"LayerGroup({len(self.layers)} layers, devices={self.devices!r})"

    def __getstate__(self) -> Dict:
        # a copy (deepcopy, pickle) starts with no results: they belong to the original's weights
        return {**self.__dict__, "_results": {}}

    def applies_to(self, layer: WSLayer) -> bool:
        """Whether ``layer`` (a member) standardizes with the group where its weight is now."""
        return self.devices == "all" or layer.weight.device.type != "cpu"

    def result_for(self, layer: WSLayer) -> Optional[torch.Tensor]:
        """``layer``'s result of the group's last standardization, if it still applies (same weight and gain,
        and a gradient path where autograd needs one), else ``None``."""
        kept = self._results.get(id(layer))
        if kept is None or kept[0] != layer.ws_state_key():
            return None
        weight = kept[1]
        if torch.is_grad_enabled() and not weight.requires_grad and any(
                t.requires_grad for t in layer.ws_dependencies()[0]):
            return None  # computed under no_grad: it would cut the parameters off from the loss
        return weight

    def discard(self, layer: WSLayer) -> None:
        """Forget ``layer``'s result (its next training forward standardizes the group again)."""
        self._results.pop(id(layer), None)

    def weight_for(self, layer: WSLayer) -> torch.Tensor:
        """``layer``'s standardized weight for a training forward (standardizing the whole group if needed)."""
        if not self.applies_to(layer):
            return layer.fresh_weight()
        weight = self.result_for(layer)
        if weight is None:
            self.standardize()
            weight = self._results[id(layer)][1]
        return weight

    def held_tensors(self) -> List[torch.Tensor]:
        """The tensors the group's last standardization keeps alive for its backward and results (the flat
        copy of the weights, per-row statistics, the results' buffer): what it costs in memory."""
        # (held until the next standardization replaces them, whether or not the weights changed since)
        return held_by_standardization([weight for _, weight in self._results.values()])

    def standardize(self) -> None:
        """Standardize every member a gradient can reach now and keep the results. Frozen members (nothing
        they depend on requires grad) are left out: they serve their cached weight (see :class:`WSLayer`)."""
        self._results.clear()  # the old results go first (peak memory: one set, not two)
        trainable = [m for m in self.layers if any(t.requires_grad for t in m.ws_dependencies()[0])]
        for member, weight in zip(trainable, standardize_layers(trainable) if trainable else [], strict=True):
            self._results[id(member)] = (member.ws_state_key(), weight)

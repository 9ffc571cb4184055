"""Adaptive Gradient Clipping (AGC, Brock et al. 2021, "High-Performance Large-Scale Image Recognition
Without Normalization"): clip each unit's gradient relative to that unit's weight norm.

For a unit ``i`` (an output row of a weight: all dims but the first; a whole vector for biases and
gains), ``G_i <- G_i * lambda * max(||W_i||, eps) / ||G_i||`` whenever
``||G_i|| / max(||W_i||, eps) > lambda``. The paper clips every layer but the final classifier.
"""
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .layers.standardize import recorded_filter_norms, request_filter_norms

__all__ = ["unitwise_norm", "adaptive_clip_grad", "agc_parameters", "attach_agc"]

Params = Union[torch.Tensor, Iterable[torch.Tensor]]


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm per output unit (over all dims but the first, kept for broadcasting); scalars and vectors
    count as one unit."""
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


@torch.no_grad()
def adaptive_clip_grad(parameters: Params, clip_factor: float = 0.01, eps: float = 1e-3,
                       concatenate: Optional[bool] = None) -> None:
    """Clip the ``.grad`` of ``parameters`` in place, unit-wise, as AGC defines it (the module docstring).

    All parameters at once, in a few operators rather than ~14 per parameter (each a kernel launch on a GPU):
    vectors and scalars (one unit each) take one ``torch._foreach_norm``; every unit's clip factor is computed
    in one go per unit rank, in float32 (the definition's precision, also for fp16/bf16 gradients); one
    ``torch._foreach_mul_`` applies them. No host synchronization; parameters without a gradient are skipped.
    The weights' row norms are taken either on each weight where it lies (two operators per weight: what the
    CPU wants, where copying the weights costs more than the operators it saves) or, with ``concatenate``
    (default: on accelerators, where launches cost more than copies), on the weights of one unit shape
    concatenated (two operators per distinct ``shape[1:]``).

    A WS layer's weight is not read at all where the layer's training forward since its last change recorded
    the filter norms from its standardization's own mean and variance (``||W_i||^2 = n (var_i + mean_i^2)``,
    :func:`wszoo.layers.standardize.standardize_weight_and_norms`): the first call asks every weight for
    them, each later forward records them (a few operators on ``out`` numbers per layer), and a weight whose
    storage or version counter moved since (an optimizer step, an in-place edit, ``load_state_dict``) is
    measured again. Not recorded (so measured here): grouped standardization (``group_ws``, the GPU default),
    ``torch.compile``d forwards, transposed convs, plain layers.
    """
    if clip_factor <= 0:
        raise ValueError(f"clip_factor must be > 0, got {clip_factor}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    buckets: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for p in params:
        if p.dim() > 1:  # a WS layer's next standardization records its filter norms for the next call
            request_filter_norms(p)
        if p.grad is not None:
            buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p)
    for (device, dtype), members in buckets.items():
        concat = device.type != "cpu" if concatenate is None else concatenate
        groups = _unit_groups(members, concat)
        pieces: List[torch.Tensor] = []
        for group in groups:
            pieces += _group_factors(group, clip_factor, eps, dtype, concat)
        torch._foreach_mul_([p.grad for group in groups for p in group], pieces)


def _unit_groups(members: List[torch.Tensor], concatenate: bool) -> List[List[torch.Tensor]]:
    """Parameters whose units are handled together: the vectors and scalars; the weights of one unit shape
    (``shape[1:]``, to be concatenated) or of one rank."""
    groups: Dict[Any, List[torch.Tensor]] = {}
    for p in members:
        unit = "vectors" if p.dim() <= 1 else tuple(p.shape[1:]) if concatenate else p.dim()
        key = (unit, p.dtype)
        groups.setdefault(key, []).append(p)
    return list(groups.values())


def _group_factors(group: List[torch.Tensor], clip_factor: float, eps: float, dtype: torch.dtype,
                   concatenate: bool) -> List[torch.Tensor]:
    """Each parameter's clip factor (per row, shaped to broadcast over its gradient) for one group of
    :func:`_unit_groups`."""
    # float32 statistics (float64 stays float64); chosen in Python: torch.promote_types is a dispatched operator
    acc = torch.float64 if torch.float64 in (group[0].dtype, dtype) else torch.float32
    if group[0].dim() <= 1:  # one unit each: 0-d factors broadcast over the vectors
        weight_norm = torch.stack(torch._foreach_norm(group, 2, dtype=acc))
        grad_norm = torch.stack(torch._foreach_norm([p.grad for p in group], 2, dtype=acc))
    else:
        dims = tuple(range(1, group[0].dim()))
        # a WS weight's norms as its standardization recorded them this step, where they still hold
        recorded = [recorded_filter_norms(p, acc) for p in group]
        if concatenate:  # one copy of the group's weights and gradients, one norm each
            weight_norm = torch.cat(recorded) if all(r is not None for r in recorded) else \
                torch.linalg.vector_norm(torch.cat(group), dim=dims, keepdim=True, dtype=acc)
            grad_norm = torch.linalg.vector_norm(torch.cat([p.grad for p in group]), dim=dims, keepdim=True,
                                                 dtype=acc)
        else:  # each weight read where it lies
            weight_norm = torch.cat([torch.linalg.vector_norm(p, dim=dims, keepdim=True, dtype=acc) if r is None
                                     else r for p, r in zip(group, recorded, strict=True)])
            grad_norm = torch.cat([torch.linalg.vector_norm(p.grad, dim=dims, keepdim=True, dtype=acc)
                                   for p in group])
    factor = _clip_factor(weight_norm, grad_norm, clip_factor, eps)
    if dtype != acc:
        factor = factor.to(dtype)  # as the definition rounds it
    if group[0].dim() <= 1:
        return list(factor.unbind(0))
    return list(torch.split(factor, [p.shape[0] for p in group]))


def _clip_factor(weight_norm: torch.Tensor, grad_norm: torch.Tensor, clip_factor: float, eps: float
                 ) -> torch.Tensor:
    """``max_norm / ||G||`` where ``||G|| > max_norm = clip_factor * max(||W||, eps)``, else 1 (the norms are
    overwritten). The definition divides by ``max(||G||, 1e-6)``; as ``max_norm >= clip_factor * eps``, when
    that is at least 1e-6 the quotient is >= 1 exactly where ``||G|| <= max_norm`` (division and rounding are
    monotonic), so capping it at 1 is the same and one operator fewer."""
    max_norm = weight_norm.clamp_min_(eps).mul_(clip_factor)
    if clip_factor * eps >= 1e-6:
        return max_norm.div_(grad_norm.clamp_min_(1e-6)).clamp_max_(1.0)
    return torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp_min(1e-6), 1.0)


def agc_parameters(model: nn.Module) -> List[torch.Tensor]:
    """Every trainable parameter except the final classifier's (``model.get_classifier()``)."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    skip = {id(p) for p in classifier.parameters()} if isinstance(classifier, nn.Module) else set()
    return [p for p in model.parameters() if p.requires_grad and id(p) not in skip]


def attach_agc(optimizer: torch.optim.Optimizer, model: nn.Module, clip_factor: float = 0.01, eps: float = 1e-3):
    """Apply AGC to ``model`` (all but its classifier) right before every ``optimizer.step()``.

    Returns the hook handle; ``handle.remove()`` detaches it. Works with gradient accumulation, since it
    clips the accumulated gradient once per step.
    """
    if clip_factor <= 0 or eps <= 0:
        raise ValueError(f"clip_factor and eps must be > 0, got {clip_factor}, {eps}")
    params = agc_parameters(model)

    def hook(opt, args, kwargs):
        adaptive_clip_grad(params, clip_factor, eps)

    return optimizer.register_step_pre_hook(hook)

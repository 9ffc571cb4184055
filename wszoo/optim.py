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

__all__ = ["unitwise_norm", "adaptive_clip_grad", "agc_factors", "agc_parameters", "attach_agc",
           "request_weight_norms", "SGDWithAGC"]

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
    clipped, factors = agc_factors(parameters, clip_factor, eps, concatenate)
    if clipped:
        torch._foreach_mul_([p.grad for p in clipped], factors)


@torch.no_grad()
def agc_factors(parameters: Params, clip_factor: float = 0.01, eps: float = 1e-3,
                concatenate: Optional[bool] = None) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """What :func:`adaptive_clip_grad` multiplies the gradients by, without applying it: the parameters that
    have a gradient and, for each, its per-unit factor (shaped to broadcast over it, in the gradient's dtype;
    1 where a unit is within its limit). For an optimizer that applies them in its own pass
    (:class:`SGDWithAGC`)."""
    if clip_factor <= 0:
        raise ValueError(f"clip_factor must be > 0, got {clip_factor}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    buckets: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    request_weight_norms(params)
    for p in params:
        if p.grad is not None:
            buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p)
    clipped: List[torch.Tensor] = []
    factors: List[torch.Tensor] = []
    for (device, dtype), members in buckets.items():
        concat = device.type != "cpu" if concatenate is None else concatenate
        for group in _unit_groups(members, concat):
            clipped += group
            factors += _group_factors(group, clip_factor, eps, dtype, concat)
    return clipped, factors


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
    request_weight_norms(params)

    def hook(opt, args, kwargs):
        adaptive_clip_grad(params, clip_factor, eps)

    return optimizer.register_step_pre_hook(hook)


def request_weight_norms(params: Iterable[torch.Tensor]) -> None:
    """Ask the WS layers holding these weights to record their filter norms at every training forward from now
    on (:func:`adaptive_clip_grad` reads them). Done when a clip is set up (:func:`attach_agc`,
    :class:`SGDWithAGC`, the training engine), so that every step of a run, the first one and the first after a
    resume included, takes its norms the same way: a run resumed from its train state stays bit for bit the
    run left alone (the norms from the statistics and those measured on the weight differ in the last bit)."""
    for p in params:
        if p.dim() > 1:
            request_filter_norms(p)


class SGDWithAGC(torch.optim.SGD):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay; the same state, so checkpoints move
    between the two) that clips the gradients of ``agc_params`` by AGC inside its own update.

    Why: a separate clip reads every gradient for its norms and then reads and rewrites it to scale it, two
    passes over the gradients' memory beside SGD's five or so; on a CPU that is bound by memory. Here the
    factor ``f`` rides in the operators SGD runs anyway. With weight decay ``wd`` the clipped step is
    ``d = G f + wd W``, formed as ``e = W + G f / wd`` by one ``addcmul`` (the pass that was ``G + wd W``) and
    used as ``wd e`` through the ``alpha`` of the following operators; without decay, ``addcmul`` puts ``G f``
    straight into the momentum buffer and the parameter. What remains of AGC is its norm of each gradient
    (the weights' norms come from their WS standardization where recorded, see :func:`adaptive_clip_grad`).
    The numbers are those of :func:`adaptive_clip_grad` followed by ``torch.optim.SGD`` to float32 rounding;
    parameters outside ``agc_params`` take ``torch.optim.SGD``'s own operators, bit for bit. For the CPU, where
    the step is bound by memory: it updates parameter by parameter (as torch's SGD does there), while on a GPU
    torch's multi-tensor SGD after the separate clip launches far fewer kernels (the training engine picks this
    class on the CPU only).
    """

    def __init__(self, params: Any, agc_params: Iterable[torch.Tensor], lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 clip_factor: float = 0.01, eps: float = 1e-3) -> None:
        if clip_factor <= 0 or eps <= 0:
            raise ValueError(f"clip_factor and eps must be > 0, got {clip_factor}, {eps}")
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov)
        self.agc_params = list(agc_params)
        self.clip_factor, self.agc_eps = clip_factor, eps
        request_weight_norms(self.agc_params)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if any(group["maximize"] for group in self.param_groups) or any(
                p.grad is not None and p.grad.is_sparse for group in self.param_groups for p in group["params"]):
            raise ValueError("SGDWithAGC does not maximize and takes dense gradients (nothing was updated)")
        clipped, factors = agc_factors(self.agc_params, self.clip_factor, self.agc_eps)
        factor_of = {id(p): f for p, f in zip(clipped, factors, strict=True)}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, factor_of.get(id(p)))
        return loss

    def _update(self, p: torch.Tensor, group: Dict[str, Any], factor: Optional[torch.Tensor]) -> None:
        grad, lr, wd = p.grad, float(group["lr"]), group["weight_decay"]
        momentum, dampening, nesterov = group["momentum"], group["dampening"], group["nesterov"]
        if factor is None:  # torch.optim.SGD's single-tensor step, operator for operator
            d, d_scale = (grad.add(p, alpha=wd) if wd else grad), 1.0
        elif wd:  # e = W + G f / wd, so that wd e = G f + wd W (the clipped step with decay)
            d, d_scale = torch.addcmul(p, grad, factor, value=1.0 / wd), wd
        else:
            d, d_scale = torch.mul(grad, factor), 1.0
        if momentum:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d.mul(d_scale) if d_scale != 1.0 else d.detach().clone()
            else:
                buf.mul_(momentum).add_(d, alpha=(1 - dampening) * d_scale)
            if not nesterov:
                p.add_(buf, alpha=-lr)
                return
            if d_scale == 1.0:
                d = d.add(buf, alpha=momentum)
            else:  # W - lr (wd e + momentum buf), without forming wd e
                p.add_(d, alpha=-lr * d_scale).add_(buf, alpha=-lr * momentum)
                return
        p.add_(d, alpha=-lr * d_scale)

"""Adaptive Gradient Clipping (AGC, Brock et al. 2021, "High-Performance Large-Scale Image Recognition
Without Normalization"): clip each unit's gradient relative to that unit's weight norm.

For a unit ``i`` (an output row of a weight: all dims but the first; a whole vector for biases and
gains), ``G_i <- G_i * lambda * max(||W_i||, eps) / ||G_i||`` whenever
``||G_i|| / max(||W_i||, eps) > lambda``. The paper clips every layer but the final classifier.
"""
from typing import Iterable, List, Union

import torch
import torch.nn as nn

__all__ = ["unitwise_norm", "adaptive_clip_grad", "agc_parameters", "attach_agc"]

Params = Union[torch.Tensor, Iterable[torch.Tensor]]


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm per output unit (over all dims but the first, kept for broadcasting); scalars and vectors
    count as one unit."""
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


@torch.no_grad()
def adaptive_clip_grad(parameters: Params, clip_factor: float = 0.01, eps: float = 1e-3) -> None:
    """Clip the ``.grad`` of ``parameters`` in place, unit-wise, as AGC defines it."""
    if clip_factor <= 0:
        raise ValueError(f"clip_factor must be > 0, got {clip_factor}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    for p in parameters:
        if p.grad is None:
            continue
        grad = p.grad
        max_norm = unitwise_norm(p.detach().float()).clamp_min(eps) * clip_factor
        grad_norm = unitwise_norm(grad.float())
        factor = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp_min(1e-6), torch.ones_like(grad_norm))
        grad.mul_(factor.to(grad.dtype))


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

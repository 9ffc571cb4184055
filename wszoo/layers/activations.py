"""Activations multiplied by a constant gamma, as normalizer-free networks need.

Gamma is chosen so that ``gamma * act(z)`` has unit variance for ``z ~ N(0, 1)``; these constants are
the ones of the NF-ResNet paper (Brock et al. 2021) as published in timm's ``nfnet.py``.
"""
from typing import Callable, Optional

import torch
import torch.nn as nn

__all__ = ["NONLIN_GAMMA", "GammaAct", "act_with_gamma"]

NONLIN_GAMMA = {
    "identity": 1.0,
    "celu": 1.270926833152771,
    "elu": 1.2716004848480225,
    "gelu": 1.7015043497085571,
    "leaky_relu": 1.70590341091156,
    "log_sigmoid": 1.9193484783172607,
    "log_softmax": 1.0002083778381348,
    "relu": 1.7139588594436646,
    "relu6": 1.7131484746932983,
    "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291,
    "silu": 1.7881293296813965,
    "softsign": 2.338853120803833,
    "softplus": 1.9203323125839233,
    "tanh": 1.5939117670059204,
}

# each activation as a module (no parameters, so no state-dict keys), so GammaAct scripts and traces
_MODULES = {
    "identity": nn.Identity,
    "celu": nn.CELU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "log_sigmoid": nn.LogSigmoid,
    "log_softmax": lambda: nn.LogSoftmax(dim=1),
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "selu": nn.SELU,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "softsign": nn.Softsign,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
}
assert set(_MODULES) == set(NONLIN_GAMMA)


class GammaAct(nn.Module):
    """``gamma * act(x)``; ``gamma=None`` takes the activation's constant from :data:`NONLIN_GAMMA`."""

    def __init__(self, act: str = "relu", gamma: Optional[float] = None) -> None:
        super().__init__()
        if act not in _MODULES:
            raise ValueError(f"unknown activation {act!r}; choose one of {', '.join(sorted(_MODULES))}")
        self.act = act
        self.gamma = NONLIN_GAMMA[act] if gamma is None else float(gamma)
        self.fn = _MODULES[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) * self.gamma

    def extra_repr(self) -> str:
        return f"act={self.act}, gamma={self.gamma:g}"


def act_with_gamma(act: str, gamma: Optional[float] = None) -> Callable[..., GammaAct]:
    """A factory building :class:`GammaAct` modules (``inplace`` is accepted and ignored)."""

    def make(inplace: bool = False) -> GammaAct:
        return GammaAct(act, gamma)

    return make

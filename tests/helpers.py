"""Test helpers shared across test modules."""
import torch
import torch.nn as nn


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values (norm affines and gains too) so that every layer matters.

    Conv weights keep their scale; gains (Scaled WS ``gain``, ``skipinit_gain``, often initialised to 0,
    which would hide whole branches) get U(0.5, 1.5); other 1-D parameters (norm scales/biases, biases)
    get N(m, 0.2) around their usual value, so the network stays in a sane numeric range.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if name.endswith("gain"):
            p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype))
        elif p.dim() <= 1:
            base = 1.0 if name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * noise)
        else:
            p.copy_(noise * p.std().clamp_min(1e-3))
    return model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max()).item()

"""Channel attention used by the NF family: Squeeze-and-Excitation and Efficient Channel Attention.

Both rescale channels by ``sigmoid(g(mean_hw(x)))``; module and parameter names are timm's
(``fc1``/``fc2`` for SE, ``conv`` for ECA) so timm checkpoints load.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import make_divisible

__all__ = ["SEModule", "EcaModule", "create_attn"]


class SEModule(nn.Module):
    """Squeeze-and-Excitation (Hu et al. 2018): ``x * sigmoid(fc2(relu(fc1(mean(x)))))``, 1x1-conv FCs."""

    def __init__(self, channels: int, rd_ratio: float = 1.0 / 16, rd_divisor: int = 8,
                 rd_channels: Optional[int] = None) -> None:
        super().__init__()
        rd_channels = rd_channels or make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class EcaModule(nn.Module):
    """Efficient Channel Attention (Wang et al. 2020): a 1-D conv across the pooled channels, kernel
    size ``k = odd(|log2(C) + beta| / gamma)`` (at least 3) unless given."""

    def __init__(self, channels: int, kernel_size: Optional[int] = None, gamma: float = 2, beta: float = 1) -> None:
        super().__init__()
        if kernel_size is None:
            t = int(abs(math.log(channels, 2) + beta) / gamma)
            kernel_size = max(t if t % 2 else t + 1, 3)
        if kernel_size % 2 != 1:
            raise ValueError(f"ECA kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv1d(1, 1, kernel_size=kernel_size, padding=(kernel_size - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.mean((2, 3)).unsqueeze(1))  # (N, 1, C)
        return x * torch.sigmoid(y).view(x.shape[0], -1, 1, 1)


def create_attn(kind: Optional[str], channels: int, **kwargs) -> Optional[nn.Module]:
    """``'se'`` -> :class:`SEModule`, ``'eca'`` -> :class:`EcaModule`, ``None`` -> no attention."""
    if kind is None:
        return None
    if kind == "se":
        return SEModule(channels, **kwargs)
    if kind == "eca":
        return EcaModule(channels, **kwargs)
    raise ValueError(f"unknown attention {kind!r}; choose 'se', 'eca' or None")

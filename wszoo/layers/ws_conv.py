"""Weight-standardized convolution and linear layers.

Each layer is a drop-in subclass of its ``torch.nn`` twin: same parameters, same state-dict keys
(``weight``, ``bias``), so plain checkpoints load into them and :meth:`standardized_weight` folds back
into a plain layer exactly. The numerics live in :func:`wszoo.layers.standardize_weight`.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.padding import get_padding, get_padding_value, pad_same

from .standardize import DEFAULT_EPS, SCALED_STYLES, check_style, fan_in_of, standardize_weight

__all__ = ["WSConv2d", "WSConv2dSame", "WSLinear", "ScaledWSConv2d", "ScaledWSConv2dSame", "is_ws_layer"]

_IntOr2 = Union[int, Tuple[int, int]]


class _WSMixin:
    """Holds the style/eps pair and the one ``standardized_weight`` every WS layer exposes."""

    weight: torch.Tensor

    def _init_ws(self, style: str, eps: Optional[float]) -> None:
        self.ws_style = check_style(style)
        self.ws_eps = DEFAULT_EPS[style] if eps is None else float(eps)
        if not self.ws_eps > 0:
            raise ValueError(f"eps must be > 0 (it keeps constant filters finite), got {eps}")
        if fan_in_of(self.weight) < 2:
            raise ValueError(
                f"weight standardization needs a fan-in of at least 2 per filter; this layer's is "
                f"{fan_in_of(self.weight)} (use a plain layer here)"
            )

    def standardized_weight(self) -> torch.Tensor:
        """The effective weight this layer convolves (or multiplies) with."""
        return standardize_weight(self.weight, self.ws_style, self.ws_eps)

    def _ws_repr(self) -> str:
        return f", ws_style={self.ws_style}, ws_eps={self.ws_eps:g}"


class WSConv2d(_WSMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight is standardized per output filter on every forward.

    ``padding=None`` (the default) gives timm's symmetric padding ``((s - 1) + d * (k - 1)) // 2``,
    which keeps the spatial size for stride 1; an int, tuple, ``'same'`` or ``'valid'`` is passed
    through as ``nn.Conv2d`` takes it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntOr2,
        stride: _IntOr2 = 1,
        padding: Optional[Union[_IntOr2, str]] = None,
        dilation: _IntOr2 = 1,
        groups: int = 1,
        bias: bool = False,
        style: str = "timm",
        eps: Optional[float] = None,
        device=None,
        dtype=None,
    ) -> None:
        if padding is None:
            padding = get_padding(kernel_size, stride, dilation)
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
            groups=groups, bias=bias, device=device, dtype=dtype,
        )
        self._init_ws(style, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._ws_repr()


class _TFSamePadding:
    """TensorFlow 'SAME' padding for a WS conv (asymmetric, computed from the input size). When it can
    be static (stride 1 and an odd effective kernel) it is folded into the conv and costs nothing."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _IntOr2, stride: _IntOr2 = 1,
                 padding: str = "same", dilation: _IntOr2 = 1, **kwargs) -> None:
        if not isinstance(padding, str):
            raise TypeError(f"{type(self).__name__} takes a padding mode string ('same'), got {padding!r}")
        static_padding, dynamic = get_padding_value(padding, kernel_size, stride=stride, dilation=dilation)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=static_padding,
                         dilation=dilation, **kwargs)
        self.dynamic_same_pad = dynamic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return self._conv_forward(x, self.standardized_weight(), self.bias)


class WSConv2dSame(_TFSamePadding, WSConv2d):
    """:class:`WSConv2d` with TensorFlow 'SAME' padding, for checkpoints ported from TF/JAX.

    Takes :class:`WSConv2d`'s arguments, with ``padding`` a mode string (default ``'same'``).
    """


class WSLinear(_WSMixin, nn.Linear):
    """``nn.Linear`` whose weight rows are standardized over ``in_features`` on every forward."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        style: str = "timm",
        eps: Optional[float] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_ws(style, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._ws_repr()


def is_ws_layer(module: nn.Module) -> bool:
    """True for any wszoo layer that standardizes its weight (has ``standardized_weight``)."""
    return isinstance(module, _WSMixin)


class ScaledWSConv2d(WSConv2d):
    """Scaled Weight Standardization (Brock et al. 2021, NF-ResNets/NFNets): a WS conv whose
    standardized filters are scaled by ``gain * gamma`` and normalized by fan-in, so a unit-variance
    input gives a unit-variance output without any activation normalizer.

    ``gain`` is a learnable per-filter parameter of shape ``(out, 1, 1, 1)`` (timm's layout);
    ``gamma`` is a constant, the activation's gain when it is folded into the conv (timm's NFNets)
    rather than applied after the activation (DeepMind's). Styles: ``timm_scaled`` or ``deepmind``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntOr2,
        stride: _IntOr2 = 1,
        padding: Optional[Union[_IntOr2, str]] = None,
        dilation: _IntOr2 = 1,
        groups: int = 1,
        bias: bool = True,
        gamma: float = 1.0,
        eps: Optional[float] = None,
        gain_init: float = 1.0,
        style: str = "timm_scaled",
        device=None,
        dtype=None,
    ) -> None:
        if style not in SCALED_STYLES:
            raise ValueError(f"ScaledWSConv2d takes a scaled style {SCALED_STYLES}, got {style!r}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
            groups=groups, bias=bias, style=style, eps=eps, device=device, dtype=dtype,
        )
        self.gamma = float(gamma)
        self.gain_init = float(gain_init)
        self.gain = nn.Parameter(torch.full((out_channels, 1, 1, 1), self.gain_init, device=device, dtype=dtype))

    def standardized_weight(self) -> torch.Tensor:
        return standardize_weight(self.weight, self.ws_style, self.ws_eps, gain=self.gain, gamma=self.gamma)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma:g}"


class ScaledWSConv2dSame(_TFSamePadding, ScaledWSConv2d):
    """:class:`ScaledWSConv2d` with TensorFlow 'SAME' padding (DeepMind's NFNet checkpoints)."""

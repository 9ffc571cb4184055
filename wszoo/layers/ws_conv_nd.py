"""Weight standardization beyond 2-D: 1-D (audio, sequences) and 3-D (video, volumes) convolutions, and
transposed convolutions (decoders).

As :class:`wszoo.layers.WSConv2d`: drop-in subclasses of their ``torch.nn`` twins (same parameters and
state-dict keys), standardized per output filter over its fan-in by :func:`wszoo.layers.standardize_weight`
on every forward, with the eval cache, :func:`wszoo.accumulate_ws` and :meth:`folded`. A transposed
convolution stores its weight as ``(in, out / groups, *kernel)``: output filter ``o`` of group ``g`` is
``weight[g * in_g:(g + 1) * in_g, o]``, so its fan-in is ``in / groups * prod(kernel)`` and the statistics
run over the input-channel and kernel axes, not over dim 0.
"""
import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .standardize import SCALED_STYLES, standardize_weight
from .ws_layer import WSLayer

__all__ = ["WSConv1d", "WSConv3d", "ScaledWSConv1d", "ScaledWSConv3d", "WSConvTranspose2d"]

_IntOrTuple = Union[int, Tuple[int, ...]]


def _symmetric_padding(kernel_size: _IntOrTuple, stride: _IntOrTuple, dilation: _IntOrTuple, dims: int
                       ) -> Tuple[int, ...]:
    """timm's default padding per axis, ``((s - 1) + d * (k - 1)) // 2``: the size is kept at stride 1."""
    k, s, d = (tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims for v in (kernel_size, stride, dilation))
    return tuple(((si - 1) + di * (ki - 1)) // 2 for ki, si, di in zip(k, s, d, strict=True))


class _WSConvNd(WSLayer):
    """What the 1-D and 3-D WS convs share (their ``torch.nn`` twin supplies the convolution)."""

    _plain: type

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _IntOrTuple, stride: _IntOrTuple = 1,
                 padding: Optional[Union[_IntOrTuple, str]] = None, dilation: _IntOrTuple = 1, groups: int = 1,
                 bias: bool = False, style: str = "timm", eps: Optional[float] = None, device=None, dtype=None
                 ) -> None:
        dims = 1 if self._plain is nn.Conv1d else 3
        if padding is None:
            padding = _symmetric_padding(kernel_size, stride, dilation, dims)
        self._plain.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                             dilation=dilation, groups=groups, bias=bias, device=device, dtype=dtype)
        self.init_ws(style, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.forward_weight(), self.bias)  # type: ignore[attr-defined]

    def folded(self) -> nn.Module:
        plain = self._plain(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,  # type: ignore[attr-defined]
                            padding=self.padding, dilation=self.dilation, groups=self.groups, bias=False,  # type: ignore[attr-defined]
                            padding_mode=self.padding_mode, device="meta")  # type: ignore[attr-defined]
        return self.folded_params_into(plain)

    def extra_repr(self) -> str:
        return super().extra_repr() + self.ws_repr()  # type: ignore[misc]


class WSConv1d(_WSConvNd, nn.Conv1d):
    """``nn.Conv1d`` whose weight ``(out, in / groups, k)`` is standardized per output filter on every forward.
    ``padding=None`` (default) keeps the length at stride 1, as :class:`WSConv2d`."""

    _plain = nn.Conv1d


class WSConv3d(_WSConvNd, nn.Conv3d):
    """``nn.Conv3d`` whose weight ``(out, in / groups, kt, kh, kw)`` is standardized per output filter on every
    forward. ``padding=None`` (default) keeps the size at stride 1."""

    _plain = nn.Conv3d


class _ScaledWS:
    """Scaled WS (see :class:`wszoo.layers.ScaledWSConv2d`): a learnable per-filter ``gain`` (timm's layout,
    ``(out, 1, ...)``) and a constant ``gamma``; styles ``timm_scaled`` or ``deepmind``. Mixed in before a WS
    conv, whose ``__init__`` it completes."""

    __jit_unused_properties__ = ["is_accumulating"]

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _IntOrTuple, stride: _IntOrTuple = 1,
                 padding: Optional[Union[_IntOrTuple, str]] = None, dilation: _IntOrTuple = 1, groups: int = 1,
                 bias: bool = True, gamma: float = 1.0, eps: Optional[float] = None, gain_init: float = 1.0,
                 style: str = "timm_scaled", device=None, dtype=None) -> None:
        if style not in SCALED_STYLES:
            raise ValueError(f"{type(self).__name__} takes a scaled style {SCALED_STYLES}, got {style!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,  # type: ignore[call-arg]
                         style, eps, device, dtype)
        self.ws_gamma = float(gamma)
        shape = (out_channels,) + (1,) * (self.weight.dim() - 1)  # type: ignore[attr-defined]
        self.gain = nn.Parameter(torch.full(shape, float(gain_init), device=device, dtype=dtype))

    def ws_gain(self) -> Optional[torch.Tensor]:
        return self.gain

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.ws_gamma:g}"  # type: ignore[misc]


class ScaledWSConv1d(_ScaledWS, WSConv1d):
    """:class:`WSConv1d` with Scaled WS (NF networks' formula): ``gain * gamma`` per filter, fan-in scaled."""


class ScaledWSConv3d(_ScaledWS, WSConv3d):
    """:class:`WSConv3d` with Scaled WS (NF networks' formula): ``gain * gamma`` per filter, fan-in scaled."""


class WSConvTranspose2d(WSLayer, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with each *output* filter standardized over its fan-in (``in / groups * kh * kw``).

    The weight keeps ``nn.ConvTranspose2d``'s layout ``(in, out / groups, kh, kw)`` and state-dict key; the
    standardization views it as ``(out, in / groups * kh * kw)`` rows (group by group), standardizes those
    with :func:`standardize_weight` and puts the result back in the transposed layout.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Tuple[int, int]],
                 stride: Union[int, Tuple[int, int]] = 1, padding: Union[int, Tuple[int, int]] = 0,
                 output_padding: Union[int, Tuple[int, int]] = 0, groups: int = 1, bias: bool = True,
                 dilation: Union[int, Tuple[int, int]] = 1, style: str = "timm", eps: Optional[float] = None,
                 device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         output_padding=output_padding, groups=groups, bias=bias, dilation=dilation, device=device,
                         dtype=dtype)
        self.init_ws(style, eps)

    def ws_fan_in(self) -> int:
        return self.in_channels // self.groups * math.prod(self.kernel_size)

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        g, in_g, out_g = self.groups, w.shape[0] // self.groups, w.shape[1]
        # (in, out/g, kh, kw) -> (g, in/g, out/g, k...) -> (g, out/g, in/g, k...) -> rows (out, in/g * k...)
        rows = w.reshape([g, in_g, out_g] + list(w.shape[2:])).transpose(1, 2).reshape(g * out_g, -1)
        std = standardize_weight(rows, self.ws_style, self.ws_eps, self.ws_gain(), self.ws_gamma)
        return std.reshape([g, out_g, in_g] + list(w.shape[2:])).transpose(1, 2).reshape(w.shape)

    def forward(self, x: torch.Tensor, output_size: Optional[List[int]] = None) -> torch.Tensor:
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2,
                                              self.dilation)
        return F.conv_transpose2d(x, self.forward_weight(), self.bias, self.stride, self.padding, output_padding,
                                  self.groups, self.dilation)

    def folded(self) -> nn.Module:
        plain = nn.ConvTranspose2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                                   padding=self.padding, output_padding=self.output_padding, groups=self.groups,
                                   bias=False, dilation=self.dilation, device="meta")
        return self.folded_params_into(plain)

    def extra_repr(self) -> str:
        return super().extra_repr() + self.ws_repr()

"""Weight-standardized convolution and linear layers.

Each layer is a drop-in subclass of its ``torch.nn`` twin: same parameters, same state-dict keys
(``weight``, ``bias``), so plain checkpoints load into them and :meth:`standardized_weight` folds back
into a plain layer exactly. The numerics live in :func:`wszoo.layers.standardize_weight`.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import get_padding, get_padding_value, pad_same

from .standardize import SCALED_STYLES
from .ws_layer import WSLayer

__all__ = ["MaxPool2dSame", "WSConv2d", "WSConv2dSame", "WSLinear", "ScaledWSConv2d", "ScaledWSConv2dSame", "CWNConv2d",
           "CWNLinear"]

# TF 'SAME' padding depends on the input size: one FX leaf call, computed on the real input when the graph runs
torch.fx.wrap("pad_same")

_IntOr2 = Union[int, Tuple[int, int]]


class WSConv2d(WSLayer, nn.Conv2d):
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
        self.init_ws(style, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.forward_weight(), self.bias)

    def folded(self) -> nn.Module:
        plain = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                          padding=self.padding, dilation=self.dilation, groups=self.groups, bias=False,
                          padding_mode=self.padding_mode, device="meta")
        return self.folded_params_into(plain)

    def extra_repr(self) -> str:
        return super().extra_repr() + self.ws_repr()


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
        return self._conv_forward(x, self.forward_weight(), self.bias)

    def folded(self) -> nn.Module:
        if not self.dynamic_same_pad:
            return super().folded()  # type: ignore[misc]  (the padding is static: a plain nn.Conv2d)
        plain = Conv2dSame(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                           dilation=self.dilation, groups=self.groups, bias=False, device="meta")
        return self.folded_params_into(plain)  # type: ignore[attr-defined]


class MaxPool2dSame(nn.MaxPool2d):
    """Max pooling with TensorFlow 'SAME' padding (padded with -inf, computed from the input size): the stem
    pool of TF/JAX-trained WS networks (the ViT hybrids). The padding is the same FX leaf as the WS convs'."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__((kernel_size, kernel_size), (stride, stride), (0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, (1, 1), value=-float("inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride, (0, 0), 1)


class WSConv2dSame(_TFSamePadding, WSConv2d):
    """:class:`WSConv2d` with TensorFlow 'SAME' padding, for checkpoints ported from TF/JAX.

    Takes :class:`WSConv2d`'s arguments, with ``padding`` a mode string (default ``'same'``).
    """


class WSLinear(WSLayer, nn.Linear):
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
        self.init_ws(style, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.forward_weight(), self.bias)

    def folded(self) -> nn.Module:
        plain = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        return self.folded_params_into(plain)

    def extra_repr(self) -> str:
        return super().extra_repr() + self.ws_repr()


class ScaledWSConv2d(WSConv2d):
    """Scaled Weight Standardization (Brock et al. 2021, NF-ResNets/NFNets): a WS conv whose
    standardized filters are scaled by ``gain * gamma`` and normalized by fan-in, so a unit-variance
    input gives a unit-variance output without any activation normalizer.

    ``gain`` is a learnable per-filter parameter of shape ``(out, 1, 1, 1)`` (timm's layout);
    ``gamma`` is a constant, the activation's gain when it is folded into the conv (timm's NFNets)
    rather than applied after the activation (DeepMind's). Styles: ``timm_scaled`` or ``deepmind``.
    """

    __jit_unused_properties__ = ["is_accumulating", "gamma"]

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
        self.ws_gamma = float(gamma)
        self.gain = nn.Parameter(torch.full((out_channels, 1, 1, 1), float(gain_init), device=device, dtype=dtype))

    @property
    def gamma(self) -> float:
        """The constant multiplier (the activation's gamma when it is folded into the conv)."""
        return self.ws_gamma

    def ws_gain(self) -> Optional[torch.Tensor]:
        return self.gain

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.ws_gamma:g}"


class ScaledWSConv2dSame(_TFSamePadding, ScaledWSConv2d):
    """:class:`ScaledWSConv2d` with TensorFlow 'SAME' padding (DeepMind's NFNet checkpoints)."""


class _CenteredWN:
    """Centered Weight Normalization (Huang et al. 2017): every filter is centred and scaled to a fixed
    norm, ``norm * (W - mean) / ||W - mean||`` (style ``cwn``); with ``learnable_scale`` the norm is a
    per-filter parameter ``gain`` initialised to ``norm`` instead (the paper's optional scale ``g``)."""

    def _init_cwn(self, out_features: int, norm: float, learnable_scale: bool, device, dtype) -> None:
        if not norm > 0:
            raise ValueError(f"norm must be > 0 (the filters' fixed norm), got {norm}")
        self.cwn_norm = float(norm)
        gain = nn.Parameter(torch.full((out_features,) + (1,) * (self.weight.dim() - 1), self.cwn_norm,
                                       device=device, dtype=dtype)) if learnable_scale else None
        self.register_parameter("gain", gain)  # type: ignore[attr-defined]
        # a fixed norm is the constant gamma; a learnable one is the per-filter gain
        self.ws_gamma = 1.0 if learnable_scale else self.cwn_norm

    def ws_gain(self) -> Optional[torch.Tensor]:
        return self.gain  # type: ignore[attr-defined]

    def extra_repr(self) -> str:
        scale = "learnable" if self.gain is not None else "fixed"  # type: ignore[attr-defined]
        return super().extra_repr() + f", norm={self.cwn_norm:g} ({scale})"  # type: ignore[misc]


class CWNConv2d(_CenteredWN, WSConv2d):
    """``nn.Conv2d`` with Centered Weight Normalization: each output filter is centred over its fan-in
    and scaled to norm ``norm`` on every forward (a learnable per-filter norm ``gain`` with
    ``learnable_scale=True``). Takes :class:`WSConv2d`'s arguments; the style is always ``cwn``."""

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
        norm: float = 1.0,
        learnable_scale: bool = False,
        eps: Optional[float] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias, style="cwn", eps=eps, device=device, dtype=dtype)
        self._init_cwn(out_channels, norm, learnable_scale, device, dtype)


class CWNLinear(_CenteredWN, WSLinear):
    """``nn.Linear`` with Centered Weight Normalization (the paper's fully-connected case): each row is
    centred over ``in_features`` and scaled to norm ``norm`` (learnable per row with ``learnable_scale``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        norm: float = 1.0,
        learnable_scale: bool = False,
        eps: Optional[float] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, style="cwn", eps=eps, device=device, dtype=dtype)
        self._init_cwn(out_features, norm, learnable_scale, device, dtype)

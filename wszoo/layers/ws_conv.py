"""Weight-standardized convolution and linear layers.

Each layer is a drop-in subclass of its ``torch.nn`` twin: same parameters, same state-dict keys
(``weight``, ``bias``), so plain checkpoints load into them and :meth:`standardized_weight` folds back
into a plain layer exactly. The numerics live in :func:`wszoo.layers.standardize_weight`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import get_padding, get_padding_value, pad_same

from .standardize import DEFAULT_EPS, SCALED_STYLES, check_style, fan_in_of, standardize_weight

__all__ = ["WSConv2d", "WSConv2dSame", "WSLinear", "ScaledWSConv2d", "ScaledWSConv2dSame", "CWNConv2d", "CWNLinear",
           "is_ws_layer"]

_IntOr2 = Union[int, Tuple[int, int]]


class _WSMixin:
    """Holds the style/eps pair, the one ``standardized_weight`` every WS layer exposes, and the choice of
    which standardized weight a forward uses (:meth:`_forward_weight`):

    - inside :func:`wszoo.accumulate_ws`, the one computed when the context was entered;
    - in eval mode when no gradient reaches the WS parameters, a cached one, reused until any of
      :meth:`_ws_dependencies` changes (data pointer or version counter; the version counter moves on every
      in-place edit, optimizer step and ``load_state_dict``, ``.to()`` makes new storages), so it is
      never stale;
    - under ``torch.compile``, the traced standardization (no Python-side state in the graph);
    - otherwise (training) a fresh one, and no cache is kept.
    """

    weight: torch.Tensor
    training: bool

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
        """The effective weight this layer convolves (or multiplies) with, computed now."""
        return standardize_weight(self.weight, self.ws_style, self.ws_eps, **self._ws_scale_kwargs())

    def _ws_scale_kwargs(self) -> Dict[str, Any]:
        """``gain``/``gamma`` for :func:`standardize_weight` (layers of the :data:`GAIN_STYLES` override it)."""
        return {}

    def _ws_dependencies(self) -> Tuple[Tuple[torch.Tensor, ...], Tuple]:
        """What :meth:`standardized_weight` depends on: its tensors, and its other settings (the cache key)."""
        scale = self._ws_scale_kwargs().values()
        tensors = (self.weight,) + tuple(v for v in scale if isinstance(v, torch.Tensor))
        return tensors, (self.ws_style, self.ws_eps) + tuple(v for v in scale if not isinstance(v, torch.Tensor))

    def _forward_weight(self) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced: no Python-side state, the graph standardizes
            return self.standardized_weight()
        accumulated = self.__dict__.get("_ws_accumulated")
        if accumulated is not None:
            return accumulated
        if self.training:
            return self.standardized_weight()
        inputs, settings = self._ws_dependencies()
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            return self.standardized_weight()
        # dtype/device changes give a new storage, and the cache holds the old one alive, so the pointer
        # alone tells storages apart
        key = tuple((t.data_ptr(), t._version) for t in inputs) + settings
        cached = self.__dict__.get("_ws_cache")  # one read: another thread may swap it meanwhile
        # An inference tensor (made under inference_mode) must not be saved for backward: reuse it only
        # while autograd is off.
        if cached is not None and cached[0] == key and not (torch.is_grad_enabled() and cached[2].is_inference()):
            return cached[2]
        with torch.no_grad():
            weight = self.standardized_weight()
        # The detached inputs keep the old storages alive, so a freed address cannot be reused by a new
        # tensor and pass for the old one.
        self.__dict__["_ws_cache"] = (key, tuple(t.detach() for t in inputs), weight)
        return weight

    def folded(self) -> nn.Module:
        """A plain ``torch.nn`` layer computing the same function with the standardized weight baked in
        (for deployment: scriptable, exportable, no per-call standardization). See :func:`wszoo.fold_ws`."""
        raise NotImplementedError(f"{type(self).__name__} does not define folded()")

    def _folded_params_into(self, plain: nn.Module) -> nn.Module:
        with torch.no_grad():
            weight = self.standardized_weight()
        plain.weight = nn.Parameter(weight.detach().clone(), requires_grad=self.weight.requires_grad)
        bias = getattr(self, "bias", None)
        plain.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return plain.train(self.training)

    def clear_ws_cache(self) -> None:
        """Drop the cached eval-mode weight (it is also dropped by ``.train()`` and ``.to()``)."""
        self.__dict__.pop("_ws_cache", None)

    def train(self, mode: bool = True):
        if mode:
            self.clear_ws_cache()
        return super().train(mode)  # type: ignore[misc]

    def _apply(self, fn, *args, **kwargs):
        self.clear_ws_cache()
        return super()._apply(fn, *args, **kwargs)  # type: ignore[misc]

    def __getstate__(self):
        state = super().__getstate__()  # type: ignore[misc]
        return {k: v for k, v in state.items() if k not in ("_ws_cache", "_ws_accumulated")}

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
        return self._conv_forward(x, self._forward_weight(), self.bias)

    def folded(self) -> nn.Module:
        plain = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                          padding=self.padding, dilation=self.dilation, groups=self.groups, bias=False,
                          padding_mode=self.padding_mode, device="meta")
        return self._folded_params_into(plain)

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
        return self._conv_forward(x, self._forward_weight(), self.bias)

    def folded(self) -> nn.Module:
        if not self.dynamic_same_pad:
            return super().folded()  # type: ignore[misc]  (the padding is static: a plain nn.Conv2d)
        plain = Conv2dSame(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                           dilation=self.dilation, groups=self.groups, bias=False, device="meta")
        return self._folded_params_into(plain)  # type: ignore[attr-defined]


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
        return F.linear(x, self._forward_weight(), self.bias)

    def folded(self) -> nn.Module:
        plain = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        return self._folded_params_into(plain)

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

    def _ws_scale_kwargs(self) -> Dict[str, Any]:
        return {"gain": self.gain, "gamma": self.gamma}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma:g}"


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

    def _ws_scale_kwargs(self) -> Dict[str, Any]:
        if self.gain is None:  # type: ignore[attr-defined]
            return {"gamma": self.cwn_norm}
        return {"gain": self.gain}  # type: ignore[attr-defined]

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

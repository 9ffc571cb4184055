"""The base class of every weight-standardized layer: which standardized weight a forward uses, the
eval-mode cache, micro-batch accumulation and folding, in one place.

Writing your own WS layer: subclass :class:`WSLayer` together with the ``torch.nn`` layer it
standardizes (``class MyWSConv(WSLayer, nn.Conv2d)``), call :meth:`WSLayer.init_ws` at the end of
``__init__``, convolve with :meth:`WSLayer.forward_weight` in ``forward``, and implement
:meth:`WSLayer.folded`. A layer with a learnable per-filter scale overrides :meth:`WSLayer.ws_gain`
and sets ``ws_gamma`` (see :class:`wszoo.layers.ScaledWSConv2d`). Everything else (caching,
:func:`wszoo.accumulate_ws`, :func:`wszoo.fold_ws`) then works unchanged.
"""
from typing import Any, Optional, Tuple

import torch
import torch.nn as nn

from .standardize import (
    DEFAULT_EPS,
    check_style,
    fan_in_of,
    filter_norms_wanted,
    record_filter_norms,
    standardize_weight,
    standardize_weight_and_norms,
)

__all__ = ["WSLayer", "is_ws_layer"]

# FX records the standardization as one call (its shape checks and fused kernel do not trace); the traced
# graph calls it on the real weight, and TorchScript compiles it (its scripting path) when the graph is scripted.
torch.fx.wrap("standardize_weight")


class WSLayer:
    """Mixin for a layer whose ``weight`` is standardized per output filter on every forward.

    Attributes:
        ws_style: the formula (one of :data:`wszoo.layers.WS_STYLES`).
        ws_eps: its numerical floor.
        ws_gamma: a constant multiplier of the standardized weight (the scaled styles and ``cwn`` only).

    Which standardized weight :meth:`forward_weight` returns:

    - inside :func:`wszoo.accumulate_ws`, the one computed when accumulation started
      (:meth:`start_accumulation`);
    - in training, in a :class:`~wszoo.layers.LayerGroup` (:func:`wszoo.group_ws`), one computed together with
      the group's other layers by the first forward after any weight changed, reused until one changes again (an
      optimizer step) or autograd needs one where it was computed without;
    - when no gradient can reach what it depends on (eval mode under ``no_grad``, or a frozen layer, whose
      weight and gain do not require grad, in training too), a cached one, reused until the weight,
      the gain or a setting changes (data pointer or version counter: every in-place edit, optimizer
      step and ``load_state_dict`` moves the counter, ``.to()`` makes new storages), so it is never stale;
    - under ``torch.compile``, FX tracing or TorchScript, the standardization itself (no Python-side
      state in the graph);
    - otherwise (training) a fresh one, and no cache is kept.
    """

    weight: torch.Tensor
    training: bool
    ws_style: str
    ws_eps: float
    ws_gamma: float
    __jit_unused_properties__ = ["is_accumulating"]

    def init_ws(self, style: str, eps: Optional[float], gamma: float = 1.0) -> None:
        """Set the formula; call it once ``self.weight`` exists. Refuses filters of fan-in below 2."""
        self.ws_style = check_style(style)
        self.ws_eps = DEFAULT_EPS[style] if eps is None else float(eps)
        self.ws_gamma = float(gamma)
        if not self.ws_eps > 0:
            raise ValueError(f"eps must be > 0 (it keeps constant filters finite), got {eps}")
        if self.ws_fan_in() < 2:
            raise ValueError(
                f"weight standardization needs a fan-in of at least 2 per filter; this layer's is "
                f"{self.ws_fan_in()} (use a plain layer here)"
            )

    def ws_fan_in(self) -> int:
        """How many weights each output filter is standardized over (a transposed conv overrides it)."""
        return fan_in_of(self.weight)

    def ws_gain(self) -> Optional[torch.Tensor]:
        """The learnable per-filter scale of the scaled styles, or ``None`` (layers with a gain override it)."""
        return None

    def standardized_weight(self) -> torch.Tensor:
        """The effective weight this layer convolves (or multiplies) with, computed now."""
        return standardize_weight(self.weight, self.ws_style, self.ws_eps, self.ws_gain(), self.ws_gamma)

    def fresh_weight(self) -> torch.Tensor:
        """:meth:`standardized_weight` for a training step; where adaptive gradient clipping asked for this
        weight's filter norms (:func:`wszoo.layers.request_filter_norms`), they are recorded too, from the same
        statistics, so the clip does not read the weight again."""
        # (a layer that standardizes otherwise, e.g. a transposed conv's rows, is left to compute them)
        if type(self).standardized_weight is not WSLayer.standardized_weight or not filter_norms_wanted(self.weight):
            return self.standardized_weight()
        weight, norms = standardize_weight_and_norms(self.weight, self.ws_style, self.ws_eps, self.ws_gain(),
                                                     self.ws_gamma)
        record_filter_norms(self.weight, norms)
        return weight

    def forward_weight(self) -> torch.Tensor:
        """The standardized weight a forward pass uses now (see the class docstring for which)."""
        if torch.jit.is_scripting():  # TorchScript: recomputed, no Python-side state
            return self.standardized_weight()
        return self._eager_forward_weight()

    def _eager_forward_weight(self) -> torch.Tensor:
        # traced (torch.compile, or FX, where the weight is a Proxy): no Python-side state, the graph standardizes
        if torch.compiler.is_compiling() or isinstance(self.weight, torch.fx.Proxy):
            return self.standardized_weight()
        accumulated = self.__dict__.get("_ws_accumulated")
        if accumulated is not None:
            return accumulated
        tensors, settings = self.ws_dependencies()
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):  # a gradient must reach them
            group = self.__dict__.get("_ws_group")
            if self.training and group is not None:
                return group.weight_for(self)
            return self.fresh_weight()
        # Nothing it depends on can get a gradient here (eval under no_grad, frozen weights in training): the
        # standardized weight only changes with them, so it is computed once and reused.
        return self._cached_weight_for(tensors, settings)

    def _cached_weight_for(self, tensors: Tuple[torch.Tensor, ...], settings: Tuple) -> torch.Tensor:
        # dtype/device changes give a new storage, and the cache holds the old one alive, so the pointer
        # alone tells storages apart
        key = tuple((t.data_ptr(), t._version) for t in tensors) + settings
        cached = self.__dict__.get("_ws_cache")  # one read: another thread may swap it meanwhile
        # An inference tensor (made under inference_mode) must not be saved for backward: reuse it only
        # while autograd is off.
        if cached is not None and cached[0] == key and not (torch.is_grad_enabled() and cached[2].is_inference()):
            return cached[2]
        with torch.no_grad():
            weight = self.standardized_weight()
        # The detached inputs keep the old storages alive, so a freed address cannot be reused by a new
        # tensor and pass for the old one.
        self.__dict__["_ws_cache"] = (key, tuple(t.detach() for t in tensors), weight)
        return weight

    def ws_dependencies(self) -> Tuple[Tuple[torch.Tensor, ...], Tuple]:
        """What :meth:`standardized_weight` depends on: its tensors, and its other settings."""
        gain = self.ws_gain()
        tensors = (self.weight,) if gain is None else (self.weight, gain)
        return tensors, (self.ws_style, self.ws_eps, self.ws_gamma)

    def ws_state_key(self) -> Tuple:
        """Changes whenever the standardized weight may: each tensor's storage and version counter (every
        in-place edit, optimizer step and ``load_state_dict`` moves it), and the settings."""
        tensors, settings = self.ws_dependencies()
        return tuple((t.data_ptr(), t._version) for t in tensors) + settings

    # --- a weight standardized together with others (driven by wszoo.group_ws) --------------------
    @torch.jit.unused
    def join_group(self, group: Optional[Any]) -> None:
        """Standardize in training together with ``group``'s other layers (a :class:`~wszoo.layers.LayerGroup`;
        ``None``: on its own again). (Typed ``Any``: grouped.py builds on this module, not the reverse.)"""
        old = self.ws_group()
        if old is not None:
            old.discard(self)
        if group is None:
            self.__dict__.pop("_ws_group", None)
        else:
            self.__dict__["_ws_group"] = group

    @torch.jit.unused
    def ws_group(self) -> Optional[Any]:
        """The :class:`~wszoo.layers.LayerGroup` this layer standardizes with, if any."""
        return self.__dict__.get("_ws_group")

    @torch.jit.unused
    def grouped_weight(self) -> Optional[torch.Tensor]:
        """This layer's result of its group's last standardization, if it still applies, else ``None``."""
        group = self.ws_group()
        return None if group is None else group.result_for(self)

    # --- the eval cache ---------------------------------------------------------------------------
    @torch.jit.unused
    def cached_weight(self) -> Optional[torch.Tensor]:
        """The standardized weight the eval cache holds (``None`` if nothing is cached)."""
        cached = self.__dict__.get("_ws_cache")
        return None if cached is None else cached[2]

    @torch.jit.unused
    def clear_ws_cache(self) -> None:
        """Drop the cached eval-mode weight (it is also dropped by ``.train()`` and ``.to()``)."""
        self.__dict__.pop("_ws_cache", None)

    # --- micro-batch accumulation (driven by wszoo.accumulate_ws) ---------------------------------
    @property
    def is_accumulating(self) -> bool:
        """True between :meth:`start_accumulation` and :meth:`stop_accumulation`."""
        return "_ws_accumulated" in self.__dict__

    @torch.jit.unused
    def start_accumulation(self, weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Standardize once (with autograd) and forward with a detached stand-in until
        :meth:`stop_accumulation`; returns ``(weight, stand_in)``. Micro-batch backwards accumulate into
        ``stand_in.grad``; back-propagating it through ``weight`` once gives the parameters' gradients.
        ``weight``: this layer's standardized weight if already computed (:func:`standardize_layers`)."""
        if self.is_accumulating:
            raise RuntimeError(f"{type(self).__name__} is already accumulating (nested accumulate_ws?)")
        if weight is None:
            weight = self.fresh_weight()
        stand_in = weight.detach().requires_grad_(weight.requires_grad)
        self.__dict__["_ws_accumulated"] = stand_in
        return weight, stand_in

    @torch.jit.unused
    def stop_accumulation(self) -> None:
        """Forward with freshly standardized weights again."""
        self.__dict__.pop("_ws_accumulated", None)

    # --- deployment -------------------------------------------------------------------------------
    def folded(self) -> nn.Module:
        """A plain ``torch.nn`` layer computing the same function with the standardized weight baked in
        (for deployment: scriptable, exportable, no per-call standardization). See :func:`wszoo.fold_ws`."""
        raise NotImplementedError(f"{type(self).__name__} does not define folded()")

    def folded_params_into(self, plain: nn.Module) -> nn.Module:
        """Give ``plain`` (a layer built on the meta device) this layer's standardized weight and bias."""
        with torch.no_grad():
            weight = self.standardized_weight()
        plain.weight = nn.Parameter(weight.detach().clone(), requires_grad=self.weight.requires_grad)
        bias = getattr(self, "bias", None)
        plain.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return plain.train(self.training)

    # --- nn.Module hooks that must drop the cache -------------------------------------------------
    def _forget_grouped_weight(self) -> None:
        group = self.ws_group()
        if group is not None:
            group.discard(self)

    def train(self, mode: bool = True):
        if mode:
            self.clear_ws_cache()
        else:
            self._forget_grouped_weight()
        return super().train(mode)  # type: ignore[misc]

    def _apply(self, fn, *args, **kwargs):
        self.clear_ws_cache()
        self._forget_grouped_weight()
        return super()._apply(fn, *args, **kwargs)  # type: ignore[misc]

    def __getstate__(self):
        state = super().__getstate__()  # type: ignore[misc]
        return {k: v for k, v in state.items() if k not in ("_ws_cache", "_ws_accumulated")}

    def ws_repr(self) -> str:
        """The WS part of ``extra_repr``."""
        return f", ws_style={self.ws_style}, ws_eps={self.ws_eps:g}"


def is_ws_layer(module: nn.Module) -> bool:
    """True for any layer that standardizes its weight (a :class:`WSLayer`)."""
    return isinstance(module, WSLayer)

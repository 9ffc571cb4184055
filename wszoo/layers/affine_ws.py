"""Function-preserving WS layers (mmcv's ``ConvAWS``): a per-filter scale ``weight_gamma`` and shift
``weight_beta`` applied after the standardization, initialised so that the layer computes exactly the
convolution it replaces. ``convert_to_ws(model, preserve_function=True)`` builds them; training then moves
in the WS parameterization. Folding (:func:`wszoo.fold_ws`) bakes the affine in as well.
"""
import torch
import torch.nn as nn

from .standardize import standardize_weight
from .ws_conv import WSConv2d, WSConv2dSame, WSLinear
from .ws_conv_nd import WSConv1d, WSConv3d

__all__ = ["AffineWS", "AffineWSConv1d", "AffineWSConv2d", "AffineWSConv2dSame", "AffineWSConv3d",
           "AffineWSLinear"]


class AffineWS:
    """Mixin: ``W_eff = weight_gamma * standardize(W) + weight_beta``, per output filter.

    :meth:`init_affine_from_weight` sets ``weight_beta`` to each filter's mean and ``weight_gamma`` to the
    inverse of the factor the style's formula divides the centred filter by, so at that moment ``W_eff`` is
    ``W`` to float rounding, for every style (a constant filter keeps gamma 1: its standardized filter is 0
    and beta restores it)."""

    weight: torch.Tensor

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.init_affine()  # gamma 1, beta 0 (convert_to_ws then sets them from the weights it converts)

    def init_affine(self) -> None:
        """Create ``weight_gamma`` (ones) and ``weight_beta`` (zeros), one per output filter, like the weight."""
        shape = (self.weight.shape[0],) + (1,) * (self.weight.dim() - 1)
        self.weight_gamma = nn.Parameter(torch.ones(shape, dtype=self.weight.dtype, device=self.weight.device))
        self.weight_beta = nn.Parameter(torch.zeros(shape, dtype=self.weight.dtype, device=self.weight.device))

    @torch.no_grad()
    def init_affine_from_weight(self) -> None:
        """Make the layer compute its current ``weight`` exactly: beta the filters' means, gamma the inverse of
        the standardization's per-filter factor (measured from the standardized weight itself)."""
        rows = self.weight.reshape(self.weight.shape[0], -1).double()
        mean = rows.mean(1, keepdim=True)
        centred = rows - mean
        standardized = standardize_weight(self.weight.double(), self.ws_style, self.ws_eps, None if self.ws_gain()
                                          is None else self.ws_gain().double(), self.ws_gamma).reshape_as(rows)
        energy = (standardized * standardized).sum(1, keepdim=True)
        # standardized = centred * k per filter, so k^-1 = <centred, standardized> / <standardized, standardized>
        gamma = torch.where(energy > 0, (centred * standardized).sum(1, keepdim=True) / energy.clamp_min(1e-300),
                            torch.ones_like(energy))
        self.weight_gamma.copy_(gamma.reshape(self.weight_gamma.shape))
        self.weight_beta.copy_(mean.reshape(self.weight_beta.shape))

    def standardized_weight(self) -> torch.Tensor:
        w = standardize_weight(self.weight, self.ws_style, self.ws_eps, self.ws_gain(), self.ws_gamma)
        return torch.addcmul(self.weight_beta, w, self.weight_gamma)

    def ws_dependencies(self):
        tensors, settings = super().ws_dependencies()  # type: ignore[misc]
        return tensors + (self.weight_gamma, self.weight_beta), settings

    def extra_repr(self) -> str:
        return super().extra_repr() + ", affine (function-preserving)"  # type: ignore[misc]


class AffineWSConv2d(AffineWS, WSConv2d):
    """:class:`WSConv2d` with a function-preserving per-filter affine (mmcv's ``ConvAWS``)."""


class AffineWSConv2dSame(AffineWS, WSConv2dSame):
    """:class:`WSConv2dSame` with a function-preserving per-filter affine."""


class AffineWSConv1d(AffineWS, WSConv1d):
    """:class:`WSConv1d` with a function-preserving per-filter affine."""


class AffineWSConv3d(AffineWS, WSConv3d):
    """:class:`WSConv3d` with a function-preserving per-filter affine."""


class AffineWSLinear(AffineWS, WSLinear):
    """:class:`WSLinear` with a function-preserving per-row affine."""

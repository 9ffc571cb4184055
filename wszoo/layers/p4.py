"""Group convolutions over p4 (translations and 90-degree rotations, Cohen & Welling 2016), with
weight standardization that keeps them exactly equivariant.

A p4 feature map has an orientation axis: ``(N, C, 4, H, W)``. A *lifting* layer maps an ordinary
image ``(N, C, H, W)`` to it by correlating with the four rotated copies of each filter; a *group*
layer maps p4 maps to p4 maps with filters ``(out, in, 4, k, k)`` that are rotated spatially and
cyclically shifted along the orientation axis. Rotating the input by 90 degrees then rotates every
output map by 90 degrees and shifts the orientation axis by one.

Standardizing per output filter over its whole orbit fan-in (``in x 4 x k x k`` for a group layer,
``in x k x k`` for a lifting layer) uses statistics that the rotations and shifts only permute, so
standardizing commutes with building the rotated filter bank and the WS layer stays exactly
equivariant. GroupNorm over ``(N, C, 4, H, W)`` (``nn.GroupNorm`` takes it as is) pools its
statistics over the orientations too and keeps equivariance; :class:`P4OrientationPool` makes a
map invariant to the rotations.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ws_layer import WSLayer

__all__ = ["P4Conv2d", "P4WSConv2d", "P4OrientationPool", "p4_filter_bank", "rotate_p4"]

ORIENTATIONS = 4


@torch.fx.wrap  # one FX leaf: the rotations and rolls are shape bookkeeping, not graph structure
def p4_filter_bank(weight: torch.Tensor, lifting: bool, orientations: int = ORIENTATIONS) -> torch.Tensor:
    """The plain-conv filter bank of a p4 layer: ``(out * 4, in, k, k)`` for a lifting weight
    ``(out, in, k, k)``, ``(out * 4, in * 4, k, k)`` for a group weight ``(out, in, 4, k, k)``.

    Output orientation ``r`` uses the filter rotated by ``r`` quarter turns (``torch.rot90``) and, for a
    group weight, its orientation axis rolled by ``r`` (input orientation ``s`` reads filter slice
    ``(s - r) mod 4``). Output channels are ordered ``(out, orientation)``, input channels ``(in, orientation)``.
    """
    if lifting:
        bank = torch.stack([torch.rot90(weight, r, [-2, -1]) for r in range(orientations)], dim=1)
        return bank.reshape(weight.shape[0] * orientations, weight.shape[1], weight.shape[2], weight.shape[3])
    bank = torch.stack([torch.rot90(torch.roll(weight, r, 2), r, [-2, -1]) for r in range(orientations)], dim=1)
    return bank.reshape(weight.shape[0] * orientations, weight.shape[1] * orientations, weight.shape[3],
                        weight.shape[4])


def rotate_p4(x: torch.Tensor, quarter_turns: int = 1) -> torch.Tensor:
    """The p4 group acting on a feature map: rotate ``(N, C, H, W)`` images spatially; rotate
    ``(N, C, 4, H, W)`` maps spatially and shift their orientation axis by ``quarter_turns``."""
    rotated = torch.rot90(x, quarter_turns, dims=(-2, -1))
    if x.dim() == 5:
        rotated = torch.roll(rotated, quarter_turns, dims=2)
    return rotated


class P4Conv2d(nn.Module):
    """A p4 group convolution with plain weights (also what :meth:`P4WSConv2d.folded` gives).

    Args:
        in_channels, out_channels: channels per orientation.
        kernel_size: odd and square (an even kernel has no centre to rotate about, so equivariance
            would be lost).
        lifting: ``True`` for the first layer (input ``(N, C, H, W)``), ``False`` for p4 input
            ``(N, C, 4, H, W)``. The output is always ``(N, out_channels, 4, H', W')``.
        stride, padding, dilation: as for ``nn.Conv2d``; ``padding=None`` keeps the size at stride 1.
            Equivariance is exact when the sampling grid is symmetric under rotation: stride 1, or a
            stride that divides ``size - 1`` of a square input.
        bias: one bias per output channel, shared by the four orientations (a per-orientation bias
            would break equivariance).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        lifting: bool = False,
        stride: int = 1,
        padding: Optional[int] = None,
        dilation: int = 1,
        bias: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"p4 convolutions need an odd square kernel (an int), got kernel_size={kernel_size!r}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channels must be positive, got in_channels={in_channels}, out_channels={out_channels}")
        for arg, value, least in (("stride", stride, 1), ("dilation", dilation, 1), ("padding", padding, 0)):
            if value is not None and (not isinstance(value, int) or value < least):
                raise ValueError(f"{arg} must be an int >= {least} (the same along both axes, or rotations would "
                                 f"not map the sampling grid to itself), got {value!r}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.orientations = ORIENTATIONS  # an attribute: TorchScript reads no module globals
        self.lifting = bool(lifting)
        self.stride, self.dilation = stride, dilation
        self.padding = dilation * (kernel_size // 2) if padding is None else padding
        orient = () if self.lifting else (ORIENTATIONS,)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *orient, kernel_size, kernel_size,
                                               device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's init; the fan-in (dims 1+) includes the orientation axis of a group weight
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        if isinstance(x, torch.fx.Proxy):  # traced: shapes are not known, the graph is checked when it runs eagerly
            return
        if self.lifting and (x.dim() != 4 or x.shape[1] != self.in_channels):
            raise ValueError(f"a lifting p4 layer takes (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if not self.lifting and (x.dim() != 5 or x.shape[1] != self.in_channels or x.shape[2] != ORIENTATIONS):
            raise ValueError(f"a p4 group layer takes (N, {self.in_channels}, 4, H, W), got {tuple(x.shape)}"
                             + (" (use lifting=True for plain images)" if x.dim() == 4 else ""))

    def _p4_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self._check_input(x)
        flat = x if self.lifting else x.flatten(1, 2)
        bias = None if self.bias is None else self.bias.repeat_interleave(self.orientations)
        bank = p4_filter_bank(weight, self.lifting, self.orientations)
        out = F.conv2d(flat, bank, bias, self.stride, self.padding, self.dilation)
        return out.unflatten(1, [self.out_channels, self.orientations])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._p4_forward(x, self.weight)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, lifting={self.lifting}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}")


class P4WSConv2d(WSLayer, P4Conv2d):
    """:class:`P4Conv2d` whose base filters are standardized per output filter over the orbit fan-in
    before the rotated bank is built, so the layer stays exactly equivariant. Takes
    :class:`P4Conv2d`'s arguments plus ``style``/``eps`` (see :func:`wszoo.layers.standardize_weight`).
    :meth:`standardized_weight` returns the standardized base filters (the bank's generators)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        lifting: bool = False,
        stride: int = 1,
        padding: Optional[int] = None,
        dilation: int = 1,
        bias: bool = False,
        style: str = "timm",
        eps: Optional[float] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, lifting=lifting, stride=stride, padding=padding,
                         dilation=dilation, bias=bias, device=device, dtype=dtype)
        self.init_ws(style, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._p4_forward(x, self.forward_weight())

    def folded(self) -> nn.Module:
        plain = P4Conv2d(self.in_channels, self.out_channels, self.kernel_size, lifting=self.lifting,
                         stride=self.stride, padding=self.padding, dilation=self.dilation, bias=False, device="meta")
        return self.folded_params_into(plain)

    def extra_repr(self) -> str:
        return super().extra_repr() + self.ws_repr()


class P4OrientationPool(nn.Module):
    """Pool a p4 map ``(N, C, 4, H, W)`` over its orientations to ``(N, C, H, W)`` (``'max'`` or
    ``'mean'``): the result no longer shifts with a rotation, it only rotates; add a global spatial
    pool for a fully rotation-invariant feature."""

    def __init__(self, mode: str = "max") -> None:
        super().__init__()
        if mode not in ("max", "mean"):
            raise ValueError(f"mode must be 'max' or 'mean', got {mode!r}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not isinstance(x, torch.fx.Proxy) and (x.dim() != 5 or x.shape[2] != ORIENTATIONS):
                raise ValueError(f"P4OrientationPool takes (N, C, 4, H, W), got {tuple(x.shape)}")
        return x.amax(dim=2) if self.mode == "max" else x.mean(dim=2)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"

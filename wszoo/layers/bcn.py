"""Batch-Channel Normalization (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and
Weight Standardization", 2019/2020).

BCN normalizes twice: first each channel over the batch (BatchNorm, which keeps the network away
from the elimination singularities a channel-only norm lets it drift to), then each sample's channel
groups (GroupNorm-style), with an affine per group. Paired with WS it matches BatchNorm at large
batches and keeps working at micro-batches, where the batch step uses *estimated* statistics
(moving averages, ``estimate=True``) instead of the micro-batch's own.

State-dict layout follows the reference code (``bn.*`` plus per-group ``weight``/``bias`` of shape
``(1, num_groups, 1)``) so its checkpoints load.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BatchChannelNorm2d", "EstimatedBatchNorm2d"]


class EstimatedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that normalizes with its running estimates in training too (BCN's micro-batch form).

    In training each batch first moves the estimates by ``momentum`` (no gradient flows through
    them): the mean towards the batch mean, the variance towards the batch's mean squared deviation
    from the running mean before the move; then the batch is normalized with the moved estimates, as
    in the reference code. No image's output depends on the other images in its batch beyond that
    shared move. Keys are ``nn.BatchNorm2d``'s.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 device=None, dtype=None) -> None:
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] (the estimates' moving speed), got {momentum}")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True,
                         device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not isinstance(x, torch.fx.Proxy):  # FX cannot branch on shapes
                self._check_input_dim(x)
        if self.training:
            with torch.no_grad():
                per_channel = x.detach().transpose(0, 1).flatten(1).to(self.running_mean.dtype)
                batch_mean = per_channel.mean(1)
                batch_var = (per_channel - self.running_mean[:, None]).square().mean(1)
                self.running_mean.lerp_(batch_mean, self.momentum)
                self.running_var.lerp_(batch_var, self.momentum)
                self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            momentum=0.0, eps=self.eps)


class BatchChannelNorm2d(nn.Module):
    """``group_norm(batch_norm(x))`` with a per-group affine: Batch-Channel Normalization.

    Args:
        num_channels: input channels.
        num_groups: channel groups of the second (per-sample) step; must divide ``num_channels``.
        eps: the group step's eps (the batch step uses ``bn_eps``).
        momentum: the batch step's running-estimate momentum.
        estimate: normalize the batch step with the running estimates also in training
            (:class:`EstimatedBatchNorm2d`), for micro-batches; ``False`` uses each batch's statistics
            in training like ``nn.BatchNorm2d``. Either way eval uses the estimates, so batch 1 works.
        affine: learnable per-group scale and shift (and the batch step's per-channel affine).
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        momentum: float = 0.1,
        estimate: bool = False,
        affine: bool = True,
        bn_eps: float = 1e-5,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_groups < 1 or num_channels % num_groups != 0:
            raise ValueError(f"num_groups ({num_groups}) must divide num_channels ({num_channels})")
        self.num_channels, self.num_groups, self.eps, self.estimate = num_channels, num_groups, eps, estimate
        bn = EstimatedBatchNorm2d if estimate else nn.BatchNorm2d
        self.bn = bn(num_channels, eps=bn_eps, momentum=momentum, affine=affine, device=device, dtype=dtype)
        if affine:
            self.weight = nn.Parameter(torch.ones(1, num_groups, 1, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(1, num_groups, 1, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not isinstance(x, torch.fx.Proxy) and (x.dim() != 4 or x.shape[1] != self.num_channels):
                raise ValueError(f"BatchChannelNorm2d({self.num_channels}) takes (N, {self.num_channels}, H, W), "
                                 f"got {tuple(x.shape)}")
        out = self.bn(x)
        # the per-group affine, spread over each group's channels, rides in group_norm's per-channel affine
        per_group = self.num_channels // self.num_groups
        weight = None if self.weight is None else self.weight.reshape(-1).repeat_interleave(per_group)
        bias = None if self.bias is None else self.bias.reshape(-1).repeat_interleave(per_group)
        return F.group_norm(out, self.num_groups, weight, bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps:g}, estimate={self.estimate}"

"""Small pieces every model family shares: stage strides and dilations, block running, weight init,
timm's classifier API, and freezing the stem and first stages."""

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

__all__ = ["stage_strides_and_dilations", "checkpoint_blocks", "init_classifier_", "init_conv_and_norm",
           "check_output_stride", "ClassifierHeadApi", "freeze_stages"]


def check_output_stride(output_stride: int) -> int:
    """``output_stride`` if the families support it (8, 16, 32), else a ValueError."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    return output_stride


def stage_strides_and_dilations(
    stage_strides: Sequence[int], output_stride: int, start_stride: int = 4
) -> List[Tuple[int, int, int]]:
    """Per stage ``(stride, dilation, first_dilation)``: once the net reaches ``output_stride``, later strides
    become dilation (DeepLab's atrous stages: resolution kept, no new weights). ``first_dilation`` is the
    dilation of the stage's first strided conv, which still sees the previous stage's rate (1 or 2)."""
    check_output_stride(output_stride)
    out = []
    reduction, dilation = start_stride, 1
    for stride in stage_strides:
        if reduction >= output_stride and stride > 1:
            dilation *= stride
            stride = 1
        reduction *= stride
        out.append((stride, dilation, 1 if dilation in (1, 2) else 2))
    return out


def checkpoint_blocks(blocks: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Apply ``blocks`` in order, recomputing each block's activations in backward (gradient checkpointing).

    Models call it as ``if self.grad_checkpointing and torch.is_grad_enabled() and not
    torch.jit.is_scripting()``, so TorchScript never compiles it."""
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False)
    return x


def init_classifier_(layer: nn.Module, std: float = 0.01) -> None:
    """A classifier (``nn.Linear`` or 1x1 ``nn.Conv2d``) drawn from N(0, std), zero bias: small logits at start."""
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(layer.weight, 0.0, std)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def init_conv_and_norm(model: nn.Module, classifier_std: float = 0.01) -> None:
    """He-normal (fan-out) convs, unit/zero norm affines, small-normal classifiers (zero bias).

    Under WS the conv scale does not change the forward pass, only the effective learning rate, so the
    usual He init keeps weight norms, and thus step sizes, familiar to optimizer recipes.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and name.endswith("fc")):
            init_classifier_(module, classifier_std)
        elif isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.GroupNorm) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class ClassifierHeadApi:
    """timm's classifier API for models whose head is a ``timm.layers.ClassifierHead`` at ``self.head``."""

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    @property
    def global_pool_type(self) -> str:
        """The global pooling now in use (``'avg'``, ``'max'``, ``''`` ...), as ``reset_classifier`` takes it."""
        return self.head.global_pool.pool_type

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (new ``head.fc`` drawn from N(0, 0.01), zero bias; 0 classes for none),
        optionally with another global pooling."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)
        init_classifier_(self.head.fc)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _keep_eval(module: nn.Module, inputs) -> None:
    module.training = False  # a frozen BatchNorm keeps its running statistics, also after model.train()


def freeze_stages(model: nn.Module, stages: int) -> List[str]:
    """Stop training the stem (``stages=0``) or the stem and the first ``stages`` stages, as detection
    recipes' ``frozen_stages`` do: parameters get ``requires_grad=False`` and frozen BatchNorms use their
    running statistics. Stage boundaries come from ``model.feature_info``; everything registered
    before the first stage is the stem. Returns the frozen parameter names."""
    stage_modules = [f["module"] for f in model.feature_info[1:]]
    if not 0 <= stages <= len(stage_modules):
        raise ValueError(f"frozen stages must be between 0 and {len(stage_modules)}, got {stages}")
    first_stage = stage_modules[0] + "."
    frozen_prefixes = tuple(m + "." for m in stage_modules[:stages])
    frozen: List[str] = []
    reached_stages = False
    for name, param in model.named_parameters():
        reached_stages = reached_stages or name.startswith(first_stage)
        if not reached_stages or name.startswith(frozen_prefixes):
            param.requires_grad_(False)
            frozen.append(name)
    frozen_set = set(frozen)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and f"{name}.weight" in frozen_set:
            module.eval()
            module.register_forward_pre_hook(_keep_eval)
    return frozen

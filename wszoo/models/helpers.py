"""Small pieces every model family shares: stage strides and dilations, block running, weight init,
timm's classifier API, and freezing the stem and first stages."""

from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead
from torch.utils.checkpoint import checkpoint

__all__ = ["stage_strides_and_dilations", "checkpoint_blocks", "init_classifier_", "init_conv_and_norm",
           "check_output_stride", "check_global_pool", "make_classifier_head", "ClassifierHeadApi", "IntermediatesApi",
           "take_indices"]


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


def check_global_pool(global_pool: str, num_classes: int, use_conv: bool = False) -> str:
    """``global_pool=''`` keeps the unpooled (N, C, H, W) map: a linear classifier cannot take it (timm asserts;
    this says why), a 1x1-conv classifier (BiT) then gives a map of logits."""
    if not global_pool and num_classes > 0 and not use_conv:
        raise ValueError("global_pool='' (no pooling) needs num_classes=0: a linear classifier needs pooled "
                         "features")
    return global_pool


def make_classifier_head(num_features: int, num_classes: int, global_pool: str, drop_rate: float,
                         use_conv: bool = False) -> ClassifierHead:
    """timm's ``ClassifierHead`` (``head.global_pool``, ``head.fc``: timm's keys), after :func:`check_global_pool`."""
    check_global_pool(global_pool, num_classes, use_conv)
    return ClassifierHead(num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, use_conv=use_conv)


class ClassifierHeadApi:
    """timm's classifier API for models whose head is a ``timm.layers.ClassifierHead`` at ``self.head``."""

    __jit_unused_properties__ = ["global_pool_type"]

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
        check_global_pool(self.global_pool_type if global_pool is None else global_pool, num_classes,
                          self.head.use_conv)
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)
        init_classifier_(self.head.fc)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def take_indices(levels: int, indices: Optional[Union[int, Sequence[int]]]) -> Tuple[List[int], int]:
    """Which feature levels to take (timm's convention): ``None`` all, an int ``n`` the last ``n``, a sequence
    those levels (negative ones counted from the end). Returns the absolute indices, in level order (the
    order maps come out in), and the largest."""
    if indices is None:
        indices = levels
    if isinstance(indices, int):
        if not 0 < indices <= levels:
            raise ValueError(f"take the last n feature levels: n must be in 1..{levels}, got {indices}")
        taken = list(range(levels - indices, levels))
    else:
        taken = []
        for i in indices:
            if not -levels <= i < levels:
                raise ValueError(f"feature level {i} is out of range: this model has {levels} (0..{levels - 1})")
            taken.append(i % levels)
        if not taken:
            raise ValueError("no feature level asked for")
        taken = sorted(set(taken))
    return taken, max(taken)


class IntermediatesApi:
    """timm 1.0's feature API, ``forward_intermediates`` and ``prune_intermediate_layers``, for a family that
    describes its layout: ``_stem_parts()`` (stem modules in order, and the index after which the stem
    feature is tapped), ``_stage_list()``, and optionally ``_last_stage_output`` (what follows the last stage
    inside the features, e.g. NF's final conv), ``_finish`` (what ``forward_features`` applies after it, e.g.
    BiT's final norm) and ``_prune_to`` (drop the layers past a level). Level 0 is the stem feature, level
    ``i`` the output of stage ``i``, as ``feature_info`` lists them."""

    def _stem_parts(self) -> Tuple[List[nn.Module], int]:
        raise NotImplementedError

    def _stage_list(self) -> List[nn.Module]:
        raise NotImplementedError

    def _last_stage_output(self, x: torch.Tensor, norm: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the running tensor, the feature to return) after the last stage."""
        return x, x

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "grad_checkpointing", False) and torch.is_grad_enabled():
            return checkpoint_blocks(stage, x)
        return stage(x)

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The final features and the feature maps of the levels ``indices`` (see :func:`take_indices`).

        Args:
            norm: apply the final norm to the last level (BiT; the other families have none).
            stop_early: stop after the deepest level asked for (the final features are then not returned
                complete: use with ``intermediates_only``).
            output_fmt: ``'NCHW'`` (the only layout of these CNNs).
            intermediates_only: return the list of maps alone.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' for this CNN, got {output_fmt!r}")
        stem, stem_tap = self._stem_parts()
        stages = self._stage_list()
        taken, deepest = take_indices(len(stages) + 1, indices)
        intermediates: List[torch.Tensor] = []
        for i, layer in enumerate(stem):
            x = layer(x)
            if i == stem_tap and 0 in taken:
                intermediates.append(x)
        run = stages[:deepest] if stop_early else stages
        for level, stage in enumerate(run, start=1):
            x = self._run_stage(stage, x)
            feature = x
            if level == len(stages):
                x, feature = self._last_stage_output(x, norm)
            if level in taken:
                intermediates.append(feature)
        if intermediates_only:
            return intermediates
        if len(run) == len(stages):
            x = self._finish(x)
        return x, intermediates

    def _prune_to(self, deepest: int, prune_norm: bool, prune_end: bool) -> None:
        raise NotImplementedError

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        """Drop every layer past the deepest level in ``indices`` (and the classifier: ``prune_head``, or
        whenever the end is pruned, since the head is sized for the final features). Returns the levels."""
        stages = self._stage_list()
        taken, deepest = take_indices(len(stages) + 1, indices)
        prune_end = deepest < len(stages)
        self._prune_to(deepest, prune_norm, prune_end)
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[deepest]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return taken

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameters to train without weight decay beyond the 1-D ones timm already skips: the Scaled WS
        gains and skipinit gains (decaying them would fight the signal-propagation scaling)."""
        return {name for name, _ in self.named_parameters() if name.endswith("gain")}

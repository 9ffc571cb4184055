"""``features_only=True``: a model wrapped as a feature extractor, by timm's feature classes.

``feature_cls`` picks the wrapper, as timm's builder does: ``'list'`` (default, timm's ``FeatureListNet``),
``'dict'`` (``FeatureDictNet``), ``'hook'`` (``FeatureHookNet``, forward hooks on the tapped modules),
``'fx'`` (``FeatureGraphNet``, an FX graph cut at the taps; scriptable) or ``'getter'``
(:class:`FeatureGetter`, the model's own ``forward_intermediates``, pruned to the deepest level asked for).
Each family says how its modules must be walked (``feature_wrap_cfg``, e.g. flattening Sequential stages); a
family with ``feature_backbone()`` (the ViT hybrids) is wrapped through that part of itself (their CNN).
"""
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.models import FeatureDictNet, FeatureGraphNet, FeatureHookNet, FeatureInfo, FeatureListNet

__all__ = ["FEATURE_CLASSES", "FeatureGetter", "wrap_features", "freeze_stages"]


class FeatureGetter(nn.Module):
    """Feature maps from ``model.forward_intermediates`` (timm's 'getter' extraction): the model is pruned
    past the deepest level asked for, then each call returns the list of maps."""

    def __init__(self, model: nn.Module, out_indices: Sequence[int], norm: bool = False, prune: bool = True,
                 output_fmt: str = "NCHW") -> None:
        super().__init__()
        indices = list(out_indices)
        if prune:
            indices = model.prune_intermediate_layers(indices, prune_norm=not norm)
        self.model = model
        self.feature_info = FeatureInfo(model.feature_info, indices)
        self.out_indices, self.norm, self.output_fmt = indices, norm, output_fmt

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices, norm=self.norm, stop_early=True,
                                                output_fmt=self.output_fmt, intermediates_only=True)


#: ``feature_cls`` names, as timm's builder takes them.
FEATURE_CLASSES = {"list": FeatureListNet, "dict": FeatureDictNet, "hook": FeatureHookNet, "fx": FeatureGraphNet,
                   "getter": FeatureGetter}
# only these walk the model's modules, so only they take the family's flattening fact
_WALKING = (FeatureDictNet, FeatureHookNet)


def wrap_features(model: nn.Module, out_indices: Optional[Sequence[int]] = None,
                  feature_cls: Union[str, type, None] = None, feature_cfg: Optional[Dict[str, Any]] = None
                  ) -> nn.Module:
    """``model`` as a feature extractor over the levels ``out_indices`` of its ``feature_info`` (default all).

    ``feature_cfg`` holds more arguments for the wrapper (timm's name), and may name ``feature_cls`` and
    ``out_indices`` itself."""
    cfg = dict(feature_cfg or {})
    feature_cls = feature_cls or cfg.pop("feature_cls", "list")
    if out_indices is None:
        out_indices = cfg.pop("out_indices", None)
    cfg.pop("out_indices", None)
    if isinstance(feature_cls, str):
        if feature_cls.lower() not in FEATURE_CLASSES:
            raise ValueError(f"unknown feature_cls {feature_cls!r}; choose one of {', '.join(FEATURE_CLASSES)}")
        feature_cls = FEATURE_CLASSES[feature_cls.lower()]
    # a family may offer a part of itself as the feature extractor (a hybrid ViT: its CNN)
    source = model.feature_backbone() if hasattr(model, "feature_backbone") else model
    levels = len(source.feature_info)
    indices = tuple(out_indices) if out_indices is not None else tuple(range(levels))
    bad = [i for i in indices if not -levels <= i < levels]
    if bad:
        raise ValueError(f"out_indices {bad} out of range: {model.pretrained_cfg['architecture']} has {levels} "
                         "feature levels")
    if isinstance(feature_cls, type) and issubclass(feature_cls, _WALKING):
        cfg = {**getattr(source, "feature_wrap_cfg", {}), **cfg}
    pretrained_cfg, model_args = model.pretrained_cfg, model.model_args
    features = feature_cls(source, out_indices=indices, **cfg)
    features.pretrained_cfg = features.default_cfg = pretrained_cfg
    features.model_args = model_args
    return features


# --- what a backbone keeps fixed (detection recipes, linear probes) ----------------------------------
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

"""``create_model``: build a registered model by name, timm-style, in small steps (as timm splits
``_factory``/``_builder`` from ``_registry``): resolve where the model comes from, build it, load its
weights, freeze stages, wrap it as a feature extractor."""
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

import torch.nn as nn

# importing wszoo.models registers every architecture in the registry create_model reads
from . import models, registry, speed  # noqa: F401 (models: imported for its registrations)
from .checkpoint import CheckpointError, load_checkpoint, safetensors_metadata
from .features import freeze_stages, wrap_features
from .hub import CONFIG_NAME, load_pretrained, read_saved_config, resolve_saved_model, saved_weights_file
from .provenance import METADATA_KEY, loaded_weights, record_weights
from .saved_config import saved_model_args

__all__ = ["create_model", "ModelSource", "resolve_source", "check_create_args", "with_checkpoint_folder"]


@dataclass
class ModelSource:
    """Where a model comes from: its architecture, its pretrained cfg, the arguments a saved model was built
    with, and the local weights file of a ``local-dir:`` model."""

    arch: str
    pretrained_cfg: Dict[str, Any]
    saved_args: Dict[str, Any]
    local_weights: Optional[str] = None
    name: str = ""


def resolve_source(model_name: str) -> ModelSource:
    """``arch``, ``arch.tag``, ``hf-hub:org/repo[@rev]`` or ``local-dir:/path`` -> :class:`ModelSource`."""
    if model_name.startswith(("hf-hub:", "local-dir:")):
        cfg, args, weights = resolve_saved_model(model_name)
        registry.model_entrypoint(cfg["architecture"])  # an unknown architecture fails here, by name
        return ModelSource(cfg["architecture"], registry.normalize_cfg(cfg), args, weights, model_name)
    arch, _ = registry.split_model_name(model_name)
    registry.model_entrypoint(model_name)
    return ModelSource(arch, registry.get_pretrained_cfg(model_name), {}, name=model_name)


def with_checkpoint_folder(source: ModelSource, checkpoint_path: Optional[str]) -> Optional[str]:
    """A saved-model folder given as ``checkpoint_path`` brings its arguments (class count, input channels,
    ...; explicit arguments still win) into ``source``, as ``local-dir:`` does; returns its weights file."""
    if checkpoint_path is None or not os.path.isdir(checkpoint_path):
        return checkpoint_path
    weights = saved_weights_file(checkpoint_path)
    if not os.path.isfile(os.path.join(checkpoint_path, CONFIG_NAME)):
        return weights
    config = read_saved_config(checkpoint_path)
    if config["architecture"] != source.arch:
        raise CheckpointError(
            f"checkpoint {checkpoint_path!r} was saved from {config['architecture']}, not {source.arch}: load it "
            f"with --model {config['architecture']} (or create_model('local-dir:{checkpoint_path}', pretrained=True))")
    source.saved_args = {**source.saved_args, **saved_model_args(config)}
    return weights


def _require_int(name: str, value: Any, least: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _require_rate(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")


def check_create_args(num_classes: Any, in_chans: Any, drop_rate: Any, drop_path_rate: Any, frozen_stages: Any) -> None:
    """Refuse values no model can be built with, naming the valid range (before anything is built)."""
    _require_int("num_classes", num_classes, 0)
    _require_int("in_chans", in_chans, 1)
    _require_int("frozen_stages", frozen_stages, -1)
    _require_rate("drop_rate", drop_rate)
    _require_rate("drop_path_rate", drop_path_rate)


def _model_args(source: ModelSource, num_classes: Optional[int], in_chans: Optional[int],
                kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The constructor arguments: explicit ones win over a saved model's, which win over the cfg's."""
    saved = dict(source.saved_args)
    if num_classes is None:
        num_classes = saved.pop("num_classes", None)
    if num_classes is None:
        num_classes = source.pretrained_cfg.get("num_classes", 1000)
    if in_chans is None:
        in_chans = saved.pop("in_chans", None)
    if in_chans is None:
        in_chans = (source.pretrained_cfg.get("input_size") or (3,))[0]
    saved.pop("num_classes", None)
    saved.pop("in_chans", None)
    return {"num_classes": int(num_classes), "in_chans": int(in_chans), **saved, **kwargs}


def _load_weights(model: nn.Module, source: ModelSource, pretrained: bool, checkpoint_path: Optional[str]) -> None:
    """A local checkpoint replaces ``pretrained``; a ``local-dir:`` model's weights are its directory's. Records
    what the model's weights now are (:mod:`wszoo.provenance`)."""
    where = checkpoint_path
    if checkpoint_path is None and pretrained and source.local_weights is not None:
        checkpoint_path, where = source.local_weights, source.name
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
        recorded = safetensors_metadata(checkpoint_path).get(METADATA_KEY)
        description, sha256 = loaded_weights(recorded, model.state_dict(), str(where))
        record_weights(model, description, sha256=sha256)
    elif pretrained:
        load_pretrained(model, source.pretrained_cfg)
    elif all(not t.is_meta for t in model.state_dict().values()):  # (the model card counts on the meta device)
        record_weights(model, {"kind": "random"})


def create_model(
    model_name: str,
    pretrained: bool = False,
    num_classes: Optional[int] = None,
    in_chans: Optional[int] = None,
    checkpoint_path: Optional[str] = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    features_only: bool = False,
    out_indices: Optional[Sequence[int]] = None,
    frozen_stages: int = -1,
    feature_cls: Union[str, type, None] = None,
    feature_cfg: Optional[Dict[str, Any]] = None,
    group_ws: Union[bool, str] = "auto",
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model by name, timm-style.

    Args:
        model_name: ``arch``, ``arch.tag`` (the tag selects the pretrained config and its class count), or
            ``hf-hub:org/repo[@revision]`` for a repo written by :func:`wszoo.save_pretrained`, or
            ``local-dir:/path`` for such a directory on disk.
        pretrained: load the published weights of the tag (``arch`` alone: its default tag) through
            :func:`wszoo.hub.load_pretrained`: safetensors from the Hub, or an original pickle converted once.
        num_classes: classifier outputs; defaults to the pretrained config's (1000 for ImageNet-1k). A
            different count keeps a fresh classifier and loads everything else.
        in_chans: input channels; default the config's (3, or 1 for the Fashion-MNIST models). Pretrained
            first convs are adapted as timm does.
        checkpoint_path: a local ``.safetensors`` state dict to load strictly (checked before any copy), or a
            :func:`wszoo.save_pretrained` folder, whose class count, input channels and other arguments the
            model is then built with (explicit arguments win); it replaces ``pretrained``.
        drop_rate, drop_path_rate: classifier dropout and stochastic depth.
        features_only: return a feature extractor (timm's ``FeatureListNet``): ``model(x)`` is a list of
            maps, ``model.feature_info`` has ``channels()``, ``reduction()``, ``module_name()``.
        out_indices: which entries of ``feature_info`` to return (default all; ``(1, 2, 3, 4)`` gives
            strides 4, 8, 16, 32 on the ImageNet families).
        feature_cls: the feature wrapper, as timm names them: ``'list'`` (default), ``'dict'``, ``'hook'``,
            ``'fx'`` or ``'getter'`` (see :mod:`wszoo.features`); feature_cfg: more arguments for it.
        frozen_stages: -1 none; 0 the stem; k the stem and stages 1..k (``requires_grad=False``, frozen
            BatchNorms keep their statistics), as detection recipes use.
        group_ws: in training, standardize all WS layers together (:func:`wszoo.group_ws`: the same numbers
            in a few kernels instead of ~15 per layer): ``'auto'`` on GPUs (layer by layer on the CPU, where it
            is no faster), ``True`` everywhere, ``False`` nowhere.
        **kwargs: passed to the architecture (e.g. ``global_pool``, ``output_stride``, ``ws_style``).

    The model gets ``pretrained_cfg`` (a dict usable by ``timm.data.resolve_data_config``), ``model_args``
    (what it was built with) and ``weights_provenance`` (what its weights are, with their fingerprint:
    :mod:`wszoo.provenance`; :func:`wszoo.save_pretrained` claims a published tag only while they match).
    """
    for name, value in (("out_indices", out_indices), ("feature_cls", feature_cls), ("feature_cfg", feature_cfg)):
        if value is not None and not features_only:
            raise ValueError(f"{name} is for features_only=True")
    check_create_args(num_classes, in_chans, drop_rate, drop_path_rate, frozen_stages)
    source = resolve_source(model_name)
    checkpoint_path = with_checkpoint_folder(source, checkpoint_path)
    args = _model_args(source, num_classes, in_chans, kwargs)
    model = registry.model_entrypoint(source.arch)(drop_rate=drop_rate, drop_path_rate=drop_path_rate, **args)
    model.pretrained_cfg = model.default_cfg = source.pretrained_cfg  # older timm helpers read default_cfg
    model.model_args = args
    _load_weights(model, source, pretrained, checkpoint_path)
    if frozen_stages >= 0:
        freeze_stages(model, frozen_stages)
    if features_only:
        model = wrap_features(model, out_indices, feature_cls, feature_cfg)
    return speed.group_ws(model, group_ws)

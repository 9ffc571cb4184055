"""``config.json`` and ``README.md`` of a saved model, in timm's layout so that timm reads our folders.

timm's ``create_model('local-dir:...')`` / ``'hf-hub:...'`` read ``architecture``, ``num_classes``,
``label_names``, ``model_args`` (passed to timm's entrypoint) and ``pretrained_cfg`` (built into timm's
``PretrainedCfg``, which accepts only its own field names). So those keys hold only what timm accepts, and
everything of ours sits under a top-level ``"wszoo"`` object timm never looks at: the arguments only wszoo's
models take, the paper, and what the weights are (see :mod:`wszoo.provenance`) with their fingerprint.
"""
import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import timm
import torch
from safetensors.torch import save_file
from timm.models import PretrainedCfg

from .files import atomic_path, atomic_write_text
from .provenance import METADATA_KEY, TrainingRecord, describe_weights, weights_title

__all__ = ["TIMM_MODEL_ARGS", "TIMM_CFG_FIELDS", "CONFIG_NAME", "WEIGHTS_NAME", "CARD_NAME", "build_saved_config",
           "saved_model_args", "render_card", "write_saved_files"]

#: The three files of a saved model (a ``save_pretrained`` directory or a Hub repo).
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"

#: The model arguments that timm's entrypoints of the shared architectures (BiT, NF nets, ViT hybrids) take.
TIMM_MODEL_ARGS = ("num_classes", "in_chans", "global_pool", "img_size", "output_stride")
#: The field names of timm's ``PretrainedCfg`` (it refuses any other key)
TIMM_CFG_FIELDS = frozenset(f.name for f in dataclasses.fields(PretrainedCfg))
_SOURCE_FIELDS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source")
_ALWAYS_KEPT = ("pool_size", "first_conv", "classifier")  # timm keeps these even when null
_LABEL_FIELDS = ("label_names", "label_descriptions", "label_offset")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _with_channels(size: Any, in_chans: int) -> Any:
    return [in_chans, *list(size)[1:]] if size else size


def _timm_pretrained_cfg(cfg: Mapping[str, Any], num_classes: int, in_chans: int, published: bool,
                         training: Optional[TrainingRecord]) -> Dict[str, Any]:
    """timm's fields of ``cfg``, made true for the model as saved: its classes, channels and input size."""
    out = {k: v for k, v in cfg.items() if k in TIMM_CFG_FIELDS and k not in _SOURCE_FIELDS
           and k != "architecture" and (v is not None or k in _ALWAYS_KEPT)}
    if not published:
        out.pop("tag", None)  # a tag names a published checkpoint, and these weights are not it
    if training is not None or num_classes != cfg.get("num_classes"):
        for key in _LABEL_FIELDS:
            out.pop(key, None)
    if training is not None and training.label_names and len(training.label_names) == num_classes:
        out["label_names"] = list(training.label_names)
    out["num_classes"] = num_classes
    for key in ("input_size", "test_input_size", "min_input_size"):
        out[key] = _with_channels(out.get(key), in_chans)
    trained_size = list(training.input_size) if training is not None and training.input_size else None
    if trained_size and trained_size[1:] != list(out.get("input_size") or [])[1:]:
        out["input_size"] = _with_channels(trained_size, in_chans)
        out["pool_size"] = None
        out.pop("test_input_size", None)
        out.pop("test_pool_size", None)
    return _jsonable({k: v for k, v in out.items() if v is not None or k in _ALWAYS_KEPT})


def build_saved_config(cfg: Mapping[str, Any], weights: Mapping[str, Any], *, num_classes: int, in_chans: int,
                       num_features: Optional[int], model_args: Mapping[str, Any], global_pool: Optional[str] = None,
                       training: Optional[TrainingRecord] = None) -> Dict[str, Any]:
    """The ``config.json`` of a model with pretrained cfg ``cfg`` as it is now: its class count, input channels,
    global pooling and other constructor arguments, and what its weights are (``weights``:
    :func:`wszoo.provenance.saved_weights`)."""
    args = {**dict(model_args), "num_classes": num_classes, "in_chans": in_chans}
    if isinstance(global_pool, str):
        args["global_pool"] = global_pool
    args = {k: v for k, v in _jsonable(args).items() if v is not None}
    published = weights["weights"].get("kind") == "published"
    pretrained_cfg = _timm_pretrained_cfg(cfg, num_classes, in_chans, published, training)
    config: Dict[str, Any] = {"architecture": cfg["architecture"], "num_classes": num_classes,
                              "num_features": num_features}
    if global_pool:
        config["global_pool"] = global_pool
    if pretrained_cfg.get("label_names"):
        config["label_names"] = pretrained_cfg["label_names"]
    config["model_args"] = {k: v for k, v in args.items() if k in TIMM_MODEL_ARGS}
    config["pretrained_cfg"] = pretrained_cfg
    ours: Dict[str, Any] = {"weights": _jsonable(weights["weights"]), "sha256": weights["sha256"]}
    wszoo_args = {k: v for k, v in args.items() if k not in TIMM_MODEL_ARGS}
    if wszoo_args:
        ours["model_args"] = wszoo_args
    if cfg.get("paper"):
        ours["paper"] = cfg["paper"]
    config["wszoo"] = ours
    return config


def saved_model_args(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The arguments a saved model is rebuilt with: timm's ``model_args`` and ours, with the class count,
    input channels and global pooling recorded at the top level (older folders wrote them there) winning."""
    args = {**dict(config.get("model_args") or {}), **dict((config.get("wszoo") or {}).get("model_args") or {})}
    for key in ("num_classes", "in_chans"):
        if config.get(key) is not None:
            args[key] = int(config[key])
    if config.get("global_pool") is not None:
        args["global_pool"] = str(config["global_pool"])
    return args


def _accuracy_line(description: Mapping[str, Any]) -> str:
    kind = description.get("kind")
    if kind == "published" and description.get("top1") is not None:
        return (f"Published top-1: {description['top1']}% on {description.get('top1_dataset', 'a dataset not named')}"
                f" ({description.get('top1_source', 'source not given')}).")
    if kind == "fine-tuned" and description.get("val_top1") is not None:
        return (f"Top-1: {description['val_top1']:.2f}% on {description['val_dataset']}, measured by the training "
                "run on these exact weights.")
    return "No accuracy is claimed for these weights: none was measured on them."


def _timm_line(config: Mapping[str, Any]) -> str:
    arch = config["architecture"]
    if not timm.is_model(arch):
        return f"timm has no `{arch}`: load this model with wszoo."
    extra = (config.get("wszoo") or {}).get("model_args")
    if extra:
        return (f"Built with wszoo-only arguments {extra}: timm would build its own defaults instead, so load it "
                "with wszoo to reproduce these outputs.")
    return "timm reads it too: `timm.create_model('hf-hub:<this repo>', pretrained=True)` builds the same network."


def render_card(config: Mapping[str, Any], num_params: int, class_name: str) -> str:
    """The ``README.md`` of a saved model: what its weights are, and how to load them."""
    cfg, ours = config["pretrained_cfg"], config.get("wszoo") or {}
    description = ours.get("weights") or {"kind": "unknown"}
    size = "x".join(str(v) for v in cfg.get("input_size") or [])
    lines = [
        "---", "library_name: wszoo", "tags:", "- image-classification", "- weight-standardization",
        *(["- timm"] if timm.is_model(config["architecture"]) else []),
        f"license: {cfg.get('license', 'other')}", "---", "",
        f"# {weights_title(config['architecture'], description)}", "",
        f"Weights: {describe_weights(description)}.", "", _accuracy_line(description), "",
        f"A `{class_name}` saved by wszoo ({num_params / 1e6:.1f}M parameters, {config.get('num_classes')} classes, "
        f"input {size}).", "",
        "```python", "import wszoo",
        "model = wszoo.create_model('hf-hub:<this repo>', pretrained=True)  # or 'local-dir:<this folder>'", "```",
        "", _timm_line(config), "",
        f"Preprocessing: input {cfg.get('input_size')}, crop_pct {cfg.get('crop_pct')}, "
        f"{cfg.get('interpolation')} interpolation, mean {cfg.get('mean')}, std {cfg.get('std')}.",
    ]
    if ours.get("paper"):
        lines += ["", f"Paper: {ours['paper']}"]
    if ours.get("sha256"):
        lines += ["", f"Weights sha256 (every tensor's key, dtype, shape and bytes in key order; "
                      f"`wszoo.provenance.state_fingerprint`): `{ours['sha256']}`"]
    return "\n".join(lines) + "\n"


def write_saved_files(out: Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                      class_name: str) -> None:
    """``config.json``, the ``README.md`` card and ``model.safetensors`` (with what the weights are in its
    metadata), each written atomically, the weights last: a reader that sees the new weights sees the new
    config."""
    out.mkdir(parents=True, exist_ok=True)
    num_params = sum(v.numel() for v in tensors.values() if v.is_floating_point())
    ours = config.get("wszoo") or {}
    metadata = {"format": "pt", "architecture": config["architecture"],
                METADATA_KEY: json.dumps({"weights": ours.get("weights"), "sha256": ours.get("sha256")})}
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    atomic_write_text(out / CARD_NAME, render_card(config, num_params, class_name))
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(dict(tensors), tmp, metadata=metadata)

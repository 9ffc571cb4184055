"""What a model's weights are, recorded when they are loaded and checked when they are saved.

A published tag's name, hub id and accuracy describe a set of tensors, not an architecture: they hold for
a model only while its weights are exactly that checkpoint's. So :func:`wszoo.create_model` records on the
model (``model.weights_provenance``) a description of the weights it loaded together with a sha256
fingerprint of the resulting state dict, and :func:`wszoo.save_pretrained` recomputes the fingerprint: the
description is kept only while it matches. Otherwise the saved card says what is known: fine-tuned from X
on a dataset (with the accuracy that run measured, see :class:`TrainingRecord`), changed since loading X,
converted from a file, or random initialization.

A description is a small JSON-able dict with a ``kind``: ``published``, ``converted``, ``fine-tuned``,
``modified``, ``adapted``, ``random`` or ``unknown``; the last four may name their ``base``. Saved files
carry it (with the fingerprint) in ``config.json`` and in the safetensors metadata, so a folder or file
loaded again keeps its description as long as its tensors are unchanged.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["TrainingRecord", "finetune_record", "state_fingerprint", "record_weights", "saved_weights",
           "published_weights", "loaded_weights", "describe_weights", "weights_title", "METADATA_KEY"]

#: The safetensors metadata key holding the weights' description (JSON).
METADATA_KEY = "wszoo_weights"
_MAX_DEPTH = 8  # a chain of fine-tunes deeper than this is cut (its base is then 'unknown')


@dataclass
class TrainingRecord:
    """What a training run knows about the weights it saves, for :func:`wszoo.save_pretrained`.

    Args:
        dataset: what the weights were trained on, e.g. ``"Fashion-MNIST train (60,000 images)"``.
        epochs: how many epochs of training these weights have had.
        val_top1: top-1 (%) measured by the run on these exact weights, or ``None`` if it measured none.
        val_dataset: what ``val_top1`` was measured on, e.g. ``"ImageFolder 'pets' val (300 images)"``.
        label_names: the class names, in classifier order, when the dataset has them.
        input_size: ``(C, H, W)`` the run trained at, when it differs from the pretrained cfg's.
    """

    dataset: str
    epochs: int
    val_top1: Optional[float] = None
    val_dataset: Optional[str] = None
    label_names: Optional[Sequence[str]] = None
    input_size: Optional[Sequence[int]] = None

    def __post_init__(self) -> None:
        if self.val_top1 is not None and not self.val_dataset:
            raise ValueError("TrainingRecord: val_top1 needs val_dataset (every accuracy names its dataset)")


def state_fingerprint(state: Any) -> str:
    """sha256 over a state dict (or a module's): every tensor's key, dtype, shape and bytes, in key order."""
    state_dict = state.state_dict() if isinstance(state, nn.Module) else state
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def record_weights(model: nn.Module, description: Mapping[str, Any], changes: Sequence[str] = (),
                   sha256: Optional[str] = None) -> None:
    """Record on ``model`` what its weights are now (``changes``: what loading altered, e.g. a new head).
    ``sha256``: the fingerprint of exactly these weights if the caller has it already (it is not recomputed)."""
    if changes:
        description = {"kind": "adapted", "base": dict(description), "changes": list(changes)}
    model.weights_provenance = {"weights": dict(description), "sha256": sha256 or state_fingerprint(model)}


def published_weights(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The description of a registry tag's published checkpoint, with its accuracy and the dataset of it."""
    name = cfg["architecture"] + (f".{cfg['tag']}" if cfg.get("tag") else "")
    description: Dict[str, Any] = {"kind": "published", "name": name}
    for key in ("hf_hub_id", "revision", "url", "top1", "top1_dataset", "top1_source"):
        if cfg.get(key) is not None:
            description[key] = cfg[key]
    if cfg.get("package_dir"):
        description["packaged"] = f"wszoo/{cfg['package_dir']}"
    return description


def loaded_weights(recorded: Optional[str], state_dict: Mapping[str, torch.Tensor], where: str
                   ) -> Tuple[Dict[str, Any], Optional[str]]:
    """What weights read from ``where`` are: the description their file recorded (its metadata JSON), if the
    tensors are still the ones it was recorded for; else only where they came from. Also the fingerprint of
    ``state_dict`` where checking needed it (``None`` otherwise), so that recording them does not hash again."""
    if recorded:
        try:
            saved = json.loads(recorded)
        except json.JSONDecodeError:
            saved = None
        if isinstance(saved, dict) and isinstance(saved.get("weights"), dict):
            sha = state_fingerprint(state_dict)
            if saved.get("sha256") == sha:
                return saved["weights"], sha
            return {"kind": "unknown", "source": where,
                    "note": "its tensors differ from the ones its description was recorded for"}, sha
    return {"kind": "unknown", "source": where}, None


def _trim(description: Mapping[str, Any], depth: int = 0) -> Dict[str, Any]:
    out = dict(description)
    if isinstance(out.get("base"), Mapping):
        out["base"] = _trim(out["base"], depth + 1) if depth < _MAX_DEPTH else {"kind": "unknown"}
    return out


def saved_weights(model: nn.Module, training: Optional[TrainingRecord] = None) -> Dict[str, Any]:
    """What ``model``'s weights are at save time, with their fingerprint: ``{"weights": ..., "sha256": ...}``."""
    sha = state_fingerprint(model)
    recorded = getattr(model, "weights_provenance", None) or {}
    base = recorded.get("weights") or {"kind": "unknown", "source": "weights set outside wszoo.create_model"}
    if training is not None:
        description: Dict[str, Any] = {"kind": "fine-tuned", "base": base, "dataset": training.dataset,
                                       "epochs": int(training.epochs)}
        if training.val_top1 is not None:
            description.update(val_top1=round(float(training.val_top1), 4), val_dataset=training.val_dataset)
    elif recorded.get("sha256") == sha:
        description = dict(base)
    else:
        description = {"kind": "modified", "base": base}
    return {"weights": _trim(description), "sha256": sha}


def _base_phrase(description: Mapping[str, Any]) -> str:
    return describe_weights(description.get("base") or {"kind": "unknown"})


def describe_weights(description: Mapping[str, Any]) -> str:
    """One sentence-part saying what the weights are, e.g. ``fine-tuned from the published weights `x.y` on D``."""
    kind = description.get("kind")
    if kind == "published":
        where = description.get("hf_hub_id") or description.get("packaged") or description.get("url")
        return f"the published weights `{description['name']}`" + (f" ({where})" if where else "")
    if kind == "converted":
        return f"converted by `wszoo convert` from `{description['file']}`"
    if kind == "fine-tuned":
        epochs = int(description["epochs"])
        trained = f"on {description['dataset']} ({epochs} epoch{'' if epochs == 1 else 's'})"
        if (description.get("base") or {}).get("kind") == "random":  # not "fine-tuned from ..., not trained"
            return f"trained from random initialization {trained}"
        return f"fine-tuned from {_base_phrase(description)} {trained}"
    if kind == "modified":
        return f"changed after loading {_base_phrase(description)} (trained or edited; not evaluated by wszoo)"
    if kind == "adapted":
        return f"{_base_phrase(description)}, changed at load: {'; '.join(description.get('changes', []))}"
    if kind == "random":
        return "random initialization, not trained"
    source = description.get("source")
    note = f"; {description['note']}" if description.get("note") else ""
    return (f"weights from `{source}`" if source else "weights of unknown origin") + f" (no provenance recorded{note})"


def weights_title(architecture: str, description: Mapping[str, Any]) -> str:
    """A card title that claims a published tag only for that tag's unchanged weights."""
    kind = description.get("kind")
    if kind == "published":
        return description["name"]
    if kind == "fine-tuned":
        verb = "trained" if (description.get("base") or {}).get("kind") == "random" else "fine-tuned"
        return f"{architecture}, {verb} on {description['dataset']}"
    if kind == "converted":
        return f"{architecture}, converted from {description['file']}"
    if kind == "random":
        return f"{architecture} (random initialization, not trained)"
    return f"{architecture} ({kind or 'unknown'} weights)"


def _dataset_name(kind: str, data_dir: Optional[str]) -> str:
    key = kind.lower().replace("_", "-")
    if key == "imagefolder":
        return f"ImageFolder '{Path(data_dir or '.').resolve().name}'"
    return "Fashion-MNIST" if key == "fashion-mnist" else kind


def finetune_record(config: Any, train_set: Any, val_set: Any, epochs: int, val_top1: Optional[float],
                    in_chans: int) -> TrainingRecord:
    """The :class:`TrainingRecord` of a fine-tuning run (``config``: its :class:`wszoo.training.FinetuneConfig`)
    after ``epochs`` epochs; ``val_top1`` only for the model the run evaluated (the EMA copy when there is one)."""
    name = _dataset_name(config.dataset, config.data_dir)
    split = "val" if config.dataset.lower() == "imagefolder" else "test"
    val = f"{name} {split} split ({len(val_set):,} images)" if val_set is not None else None
    return TrainingRecord(
        dataset=f"{name} ({len(train_set):,} training images)", epochs=epochs,
        val_top1=val_top1 if val is not None else None, val_dataset=val,
        label_names=list(getattr(train_set, "classes", None) or []) or None,
        input_size=(in_chans, config.img_size, config.img_size) if config.img_size else None)

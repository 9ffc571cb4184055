"""Fine-tuning a classifier (``wszoo finetune``): any registered model, pretrained or from a checkpoint, on an
ImageFolder tree or Fashion-MNIST, with frozen stages, dropout/drop-path and timm's augmentation; each epoch's
``last/``, ``best/`` (``ema/``) are :func:`wszoo.save_pretrained` directories whose card names the data and the
accuracy measured on them. The loop itself (micro-batches, DDP, AMP, AGC, EMA, resume) is
:func:`wszoo.training.engine.train`.

Example (Fashion-MNIST in ``data/fm``; a few seconds on a CPU)::

    from wszoo.training import FinetuneConfig, finetune

    metrics = finetune(FinetuneConfig(model="resnet_mini_gn_ws", dataset="fashion-mnist", data_dir="data/fm",
                                      limit_train=256, limit_val=128, epochs=1, batch_size=32, output="runs/fm"))
    print(metrics["val_top1"])  # then wszoo.create_model("local-dir:runs/fm/best", pretrained=True)
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..errors import Fix, UsageError
from ..factory import create_model
from ..features import freeze_stages
from ..hub import save_pretrained
from ..provenance import finetune_record
from .config import TrainConfig
from .data import DataError, build_transforms, class_count, create_dataset, data_config_for
from .engine import Task, train
from .evaluate import evaluate

__all__ = ["FinetuneConfig", "ClassificationTask", "finetune"]


@dataclass(kw_only=True)
class FinetuneConfig(TrainConfig):
    """A fine-tuning run: :class:`TrainConfig`'s fields (defaults as ``wszoo finetune``'s flags) and these.

    Attributes:
        model: an architecture, ``arch.tag``, ``hf-hub:org/repo`` or ``local-dir:/path``.
        pretrained: start from the published weights.
        checkpoint: start from a ``.safetensors`` file or a ``save_pretrained`` directory.
        dataset: ``"imagefolder"`` (``data_dir/train``, ``data_dir/val``, or class folders), ``"fashion-mnist"``
            or a torchvision dataset class by name.
        data_dir: where the data is.
        num_classes: the classifier's classes (a new head); default the model's.
        in_chans: 1 or 3 input channels; default the model's.
        img_size: the input size; default the model's pretrained config's.
        warmup_epochs: epochs (a fraction is fine) of linear warmup.
        freeze_stages: -1: none; 0: the stem; k: the stem and stages 1..k.
        drop: dropout before the classifier.
        drop_path: stochastic depth.
        aug: ``"timm"``, ``"flip-crop"`` or ``"none"``.
        limit_train: use the first N training images.
        limit_val: use the first N validation images.
    """

    model: str
    pretrained: bool = False
    checkpoint: Optional[str] = None
    dataset: str = "imagefolder"
    data_dir: Optional[str] = None
    num_classes: Optional[int] = None
    in_chans: Optional[int] = None
    img_size: Optional[int] = None
    warmup_epochs: float = 0.5
    freeze_stages: int = -1
    drop: float = 0.0
    drop_path: float = 0.0
    aug: str = "timm"
    limit_train: Optional[int] = None
    limit_val: Optional[int] = None

    def warmup_steps(self, steps_per_epoch: int) -> int:
        return int(steps_per_epoch * self.warmup_epochs)


def _datasets(config: FinetuneConfig, in_chans: int, train_tf, eval_tf) -> Tuple[Dataset, Optional[Dataset]]:
    name, root = config.dataset, config.data_dir
    if name != "imagefolder":
        return (create_dataset(name, root, "train", train_tf, in_chans, config.limit_train),
                create_dataset(name, root, "test", eval_tf, in_chans, config.limit_val))
    if not root:
        raise DataError("no data to train on: pass --data-dir DIR (an ImageFolder tree: DIR/train/<class>/*, "
                        "DIR/val/<class>/*) or --dataset fashion-mnist")
    if not Path(root).is_dir():
        raise DataError(f"data directory {root} does not exist")
    train_split = "train" if (Path(root) / "train").is_dir() else None
    train_set = create_dataset(name, root, train_split, train_tf, in_chans, config.limit_train)
    val_set = (create_dataset(name, root, "val", eval_tf, in_chans, config.limit_val)
               if (Path(root) / "val").is_dir() else None)
    return train_set, val_set


class ClassificationTask(Task):
    """Images and class labels, cross-entropy, top-1 on the validation split picks ``best/``."""

    best_key = "best_top1"

    def __init__(self, config: FinetuneConfig) -> None:
        self.config = config
        self.model: Optional[nn.Module] = None
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.frozen: List[str] = []

    def build(self) -> Tuple[nn.Module, Dataset]:
        """The model (pretrained or from a checkpoint, stages frozen) and the train/val datasets."""
        config = self.config
        model = create_model(config.model, pretrained=config.pretrained, checkpoint_path=config.checkpoint,
                             num_classes=config.num_classes, in_chans=config.in_chans, drop_rate=config.drop,
                             drop_path_rate=config.drop_path)
        train_tf, eval_tf = build_transforms(data_config_for(model, config.img_size), config.aug)
        self.train_set, self.val_set = _datasets(config, model.in_chans, train_tf, eval_tf)
        n_classes = class_count(self.train_set)
        if n_classes and n_classes != model.num_classes:
            raise UsageError(f"the dataset has {n_classes} classes but the model's head has {model.num_classes}: "
                             "pass {num_classes}", Fix("num_classes", str(n_classes)))
        self.frozen = freeze_stages(model, config.freeze_stages) if config.freeze_stages >= 0 else []
        self.model = model
        return model, self.train_set

    def identity(self) -> Dict[str, Any]:
        return {"model": self.config.model, "architecture": self.model.pretrained_cfg["architecture"],
                "num_classes": self.model.num_classes}

    def check_same_run(self, saved: Dict[str, Any], resume_fix: Fix) -> None:
        arch = self.model.pretrained_cfg["architecture"]
        if saved.get("architecture", arch) != arch:
            raise UsageError(f"{{resume}}: that run trained {saved['architecture']} ({saved.get('model')}), not "
                             f"{arch}; pass {{model}}", resume_fix, Fix("model", repr(saved.get("model"))))

    def param_groups(self, model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
        """No decay on norms and biases (1-D) nor on what the model names (the Scaled WS gains)."""
        decay, no_decay = [], []
        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def to_device(self, batch: Any, device: torch.device) -> Any:
        images, targets = batch
        return images.to(device), targets.to(device)

    def loss(self, model: nn.Module, batch: Any) -> Tuple[torch.Tensor, int]:
        images, targets = batch
        return F.cross_entropy(model(images), targets), len(targets)

    def validate(self, model: nn.Module, device: torch.device) -> Dict[str, Any]:
        """Top-1/top-5/loss on the val set (on every rank: :func:`wszoo.training.evaluate.evaluate` shards it)."""
        if self.val_set is None:
            return {}
        config = self.config
        val = evaluate(model, self.val_set, batch_size=max(config.batch_size, 64), workers=config.workers,
                       device=device, amp=config.amp, progress=False)
        return {f"val_{k}": v for k, v in val.items() if k in ("top1", "top5", "loss")}

    def score(self, metrics: Dict[str, Any]) -> float:
        return metrics.get("val_top1", -metrics["train_loss"])

    def save_model(self, model: nn.Module, directory: Path, measured: Optional[Dict[str, Any]],
                   epochs_done: int) -> None:
        """A ``save_pretrained`` directory whose card names the data, and the accuracy where it was measured."""
        top1 = measured.get("val_top1") if measured is not None else None
        record = finetune_record(self.config, self.train_set, self.val_set, epochs_done, top1, model.in_chans)
        save_pretrained(model, str(directory), training=record)

    def describe(self, loader: DataLoader, world: int) -> str:
        config = self.config
        frozen = f", frozen {len(self.frozen)} tensors" if self.frozen else ""
        return (f"finetune {config.model}: {len(loader.dataset)} train images, "
                f"{len(self.val_set) if self.val_set is not None else 'no'} val, "
                f"{math.ceil(len(loader) / config.accum_steps)} steps/epoch of {config.batch_size} x "
                f"{config.accum_steps * world} images{frozen}")


def finetune(config: FinetuneConfig) -> Dict[str, Any]:
    """Fine-tune ``config.model`` as ``config`` says (``wszoo finetune``); returns the last epoch's metrics
    (``train_loss``, ``lr``, ``val_top1`` ...). Raises :class:`wszoo.training.TrainingInterrupted` on Ctrl-C
    and :class:`wszoo.training.TrainingDiverged` when the loss or the weights become non-finite."""
    return train(ClassificationTask(config), config)

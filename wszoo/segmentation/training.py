"""Training a segmenter (``wszoo segment train``): DeepLabv3 on a WS backbone (:func:`build_segmenter`) on
VOC-layout data, as a task of the training loop (:func:`wszoo.training.engine.train`: micro-batches, DDP,
AMP, resume). In the manner of torchvision's segmentation reference: SGD with momentum, weight decay on every
parameter, per-pixel cross-entropy ignoring 255, random rescale/flip/crop at ``img_size``; the learning rate
follows the shared loop's (optional) warmup and cosine where the reference decays polynomially. mIoU on the
val split after every epoch (every process scores a shard) picks ``best/``.

Example (a VOC-layout set in ``data/voc``; minutes on a CPU)::

    from wszoo.segmentation import SegmentTrainConfig, segment_eval, segment_train

    segment_train(SegmentTrainConfig(data_dir="data/voc", num_classes=21, backbone="resnet18_gn_ws",
                                     pretrained_backbone=False, img_size=64, epochs=1, output="runs/seg"))
    print(segment_eval("runs/seg/best", "data/voc")["mIoU"])
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..errors import Fix, UsageError
from ..training.config import DensePredictionConfig
from ..training.engine import Task, train
from .data import IGNORE_INDEX, EvalTransform, TrainTransform, VOCSegmentation
from .metrics import evaluate_segmenter
from .model import build_segmenter
from .saved import save_segmenter

__all__ = ["SegmentTrainConfig", "SegmentationTask", "segment_train"]


@dataclass(kw_only=True)
class SegmentTrainConfig(DensePredictionConfig):
    """A segmenter's training run: :class:`wszoo.training.TrainConfig`'s fields (defaults as
    ``wszoo segment train``'s flags, torchvision's reference recipe: SGD without Nesterov, lr 0.02, weight
    decay 1e-4 on every parameter, 30 epochs, crops of 480) and these.

    Attributes:
        data_dir: a VOC-layout root (:mod:`wszoo.segmentation.data`).
        num_classes: the classes, background included: mask labels are ``0 .. num_classes - 1`` (and 255).
        train_split: the split trained on (``ImageSets/Segmentation/<train_split>.txt``).
        val_split: the split scored after every epoch; ``None``: none (``best/`` is then the epoch of lowest
            training loss).
        backbone: a registered WS architecture that reaches stride 32.
        pretrained_backbone: start from the backbone's published weights; ``None``: when it has some.
        output_stride: 8 or 16 (the last stages dilated).
        img_size: the training crops' side; the val images' shorter side is resized to it.
        warmup_iters: optimizer steps of linear warmup.
    """

    data_dir: str
    num_classes: int
    train_split: str = "train"
    val_split: Optional[str] = "val"
    backbone: str = "resnet50_gn_ws"
    pretrained_backbone: Optional[bool] = None
    output_stride: int = 8
    img_size: int = 480
    warmup_iters: int = 0
    epochs: int = 30
    batch_size: int = 4


class SegmentationTask(Task):
    """Images and their masks; per-pixel cross-entropy; mIoU on the val split picks ``best/``."""

    best_key = "best_miou"

    def __init__(self, config: SegmentTrainConfig) -> None:
        self.config = config
        self.train_set: Optional[VOCSegmentation] = None
        self.val_set: Optional[VOCSegmentation] = None
        self.saved_config: Dict[str, Any] = {}

    def build(self) -> Tuple[nn.Module, VOCSegmentation]:
        """The data first (every mask checked: bad data costs no model build nor download), then the model."""
        config = self.config
        if config.num_classes < 2:
            raise UsageError(f"{{num_classes}} counts the background too: got {config.num_classes}",
                             Fix("num_classes", "2", phrase="pass at least {}"))
        self.train_set = VOCSegmentation(config.data_dir, config.train_split, config.num_classes)
        if config.val_split:
            self.val_set = VOCSegmentation(config.data_dir, config.val_split, config.num_classes)
        model = build_segmenter("deeplabv3", config.backbone, config.num_classes, output_stride=config.output_stride,
                                pretrained_backbone=config.pretrained_backbone)
        mean, std = list(model.pretrained_cfg["mean"]), list(model.pretrained_cfg["std"])
        self.train_set.transform = TrainTransform(config.img_size, mean, std)
        if self.val_set is not None:
            self.val_set.transform = EvalTransform(config.img_size, mean, std)
        self.saved_config = {"kind": "deeplabv3", "backbone": config.backbone, "num_classes": config.num_classes,
                             "output_stride": config.output_stride, "img_size": config.img_size, "mean": mean,
                             "std": std}
        return model, self.train_set

    def identity(self) -> Dict[str, Any]:
        config = self.config
        return {"backbone": config.backbone, "num_classes": config.num_classes, "output_stride": config.output_stride,
                "model": f"deeplabv3 on {config.backbone}"}

    def check_same_run(self, saved: Dict[str, Any], resume_fix: Fix) -> None:
        ours = self.identity()
        for key in ("backbone", "num_classes", "output_stride"):
            if saved.get(key, ours[key]) != ours[key]:
                raise UsageError(f"{{resume}}: that run trained {key} {saved[key]!r}, not {ours[key]!r}; pass "
                                 f"{{{key}}}", resume_fix, Fix(key, repr(saved[key])))

    def to_device(self, batch: Any, device: torch.device) -> Any:
        images, masks = batch
        return images.to(device), masks.to(device)

    def loss(self, model: nn.Module, batch: Any) -> Tuple[torch.Tensor, int]:
        """The mean cross-entropy over the pixels not labelled 255 (0 for a batch that has none)."""
        images, masks = batch
        logits = model(images)["out"].float()
        counted = (masks != IGNORE_INDEX).sum().clamp_min(1)
        return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum") / counted, len(images)

    def validate(self, model: nn.Module, device: torch.device) -> Dict[str, Any]:
        """mIoU, pixel accuracy and per-class IoU on the val split (on every rank: each scores a shard)."""
        if self.val_set is None:
            return {}
        config = self.config
        metrics = evaluate_segmenter(model, self.val_set, config.num_classes, device=device,
                                     batch_size=max(config.batch_size, 8), amp=config.amp)
        return {"val_mIoU": metrics["mIoU"], "val_pixel_acc": metrics["pixel_acc"],
                "val_IoU": [None if v is None else round(v, 2) for v in metrics["IoU"]]}

    def score(self, metrics: Dict[str, Any]) -> float:
        return metrics.get("val_mIoU", -metrics["train_loss"])

    def save_model(self, model: nn.Module, directory: Path, measured: Optional[Dict[str, Any]],
                   epochs_done: int) -> None:
        """The folder :func:`segment_eval` reads, saying what the weights were trained on and the mIoU measured
        on them (and on what), when it was."""
        miou = (measured or {}).get("val_mIoU")
        training = {"dataset": self.train_set.describe(), "epochs": epochs_done, "val_mIoU": miou,
                    "val_dataset": self.val_set.describe() if miou is not None else None}
        save_segmenter(model, directory, {**self.saved_config, "training": training})

    def describe(self, loader: DataLoader, world: int) -> str:
        config = self.config
        return (f"segment deeplabv3 on {config.backbone}: {len(loader.dataset)} train images, "
                f"{len(self.val_set) if self.val_set is not None else 'no'} val, "
                f"{math.ceil(len(loader) / config.accum_steps)} steps/epoch of {config.batch_size} x "
                f"{config.accum_steps * world} crops of {config.img_size} px")


def segment_train(config: SegmentTrainConfig) -> Dict[str, Any]:
    """Train a segmenter as ``config`` says (``wszoo segment train``); returns the last epoch's metrics (with
    ``val_mIoU``, ``val_pixel_acc``, ``val_IoU`` when there is a val split). Raises
    :class:`wszoo.training.TrainingInterrupted` on Ctrl-C and :class:`wszoo.training.TrainingDiverged` when the
    loss or the weights become non-finite."""
    return train(SegmentationTask(config), config)

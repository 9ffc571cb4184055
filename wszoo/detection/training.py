"""Training a detector (``wszoo detect train``): the GN+WS detection recipe on COCO-format data, as a task of
the training loop (:func:`wszoo.training.engine.train`: micro-batches, DDP, AMP, resume). In the manner of
torchvision's reference scripts: SGD with momentum, linear warmup from 1/1000 then a cosine, the detector's
own losses summed, COCO box (and mask) AP from pycocotools after every epoch, which picks ``best/``.

Example (a COCO-format set in ``data/shapes``; minutes on a CPU)::

    from wszoo.detection import DetectTrainConfig, detect_eval, detect_train

    detect_train(DetectTrainConfig(train_images="data/shapes/images", train_annotations="data/shapes/ann.json",
                                   backbone="nf_regnet_b0", pretrained_backbone=False, min_size=64, max_size=64,
                                   epochs=1, output="runs/det"))
    print(detect_eval("runs/det/best", "data/shapes/images", "data/shapes/ann.json"))
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import Fix, UsageError
from ..training.config import DensePredictionConfig
from ..training.distributed import is_main_process
from ..training.engine import Task, train
from ..training.run_dir import TrainingDiverged
from .coco import CocoDetection, coco_evaluate, collate
from .detectors import build_detector
from .saved import save_detector

__all__ = ["DetectTrainConfig", "DetectionTask", "detect_train", "DetectionDiverged"]

#: The name this error had before detection trained on the shared loop.
DetectionDiverged = TrainingDiverged


@dataclass(kw_only=True)
class DetectTrainConfig(DensePredictionConfig):
    """A detector's training run: :class:`wszoo.training.TrainConfig`'s fields (defaults as
    ``wszoo detect train``'s flags: SGD without Nesterov, decay on every parameter) and these.

    Attributes:
        train_images: the training images' folder.
        train_annotations: their COCO instances json.
        val_images: the validation images' folder; default ``train_images``.
        val_annotations: a COCO instances json: box (and mask) AP after every epoch; ``None``: no validation
            (``best/`` is then the epoch of lowest training loss).
        kind: ``"fasterrcnn"``, ``"maskrcnn"`` or ``"retinanet"``.
        backbone: a registered WS architecture.
        pretrained_backbone: start from the backbone's published weights; ``None``: when it has some.
        frozen_stages: backbone stages not trained; ``None``: 1 with published weights, else -1.
        warmup_iters: optimizer steps of linear warmup (from 1/1000 of ``lr``).
        min_size: the detector's resize (torchvision's default 800).
        max_size: (torchvision's default 1333).
        rois_per_image: R-CNN box head samples per image (torchvision's default 512).
        test_proposals: RPN proposals kept per image in evaluation, before and after NMS (torchvision's default
            1000; an image with a few objects needs far fewer, and the box head's time follows this count).
    """

    train_images: str
    train_annotations: str
    val_images: Optional[str] = None
    val_annotations: Optional[str] = None
    kind: str = "fasterrcnn"
    backbone: str = "resnet50_gn_ws"
    pretrained_backbone: Optional[bool] = None
    frozen_stages: Optional[int] = None
    warmup_iters: int = 100
    min_size: Optional[int] = None
    max_size: Optional[int] = None
    rois_per_image: Optional[int] = None
    test_proposals: Optional[int] = None
    epochs: int = 12
    batch_size: int = 2


class DetectionTask(Task):
    """Images with their instances; the detector's summed losses; COCO box AP on the val set picks ``best/``."""

    best_key = "best_ap"
    warmup_start = 0.001
    collate_fn = staticmethod(collate)

    def __init__(self, config: DetectTrainConfig) -> None:
        self.config = config
        self.build_args: Dict[str, Any] = {}
        self.val_set: Optional[CocoDetection] = None

    def _datasets(self) -> CocoDetection:
        config = self.config
        masks = config.kind == "maskrcnn"
        train_set = CocoDetection(config.train_images, config.train_annotations, masks=masks, flip=True)
        if config.val_annotations:
            self.val_set = CocoDetection(config.val_images or config.train_images, config.val_annotations,
                                         masks=masks)
            if self.val_set.category_ids != train_set.category_ids:
                raise ValueError(f"the validation categories {self.val_set.category_ids} differ from the training "
                                 f"ones {train_set.category_ids}")
        return train_set

    def detector_kwargs(self) -> Dict[str, Any]:
        """torchvision's detector arguments the config sets (saved with the detector, which they rebuild)."""
        config = self.config
        kwargs = {k: v for k, v in (("min_size", config.min_size), ("max_size", config.max_size)) if v}
        if config.kind == "retinanet" and (config.rois_per_image or config.test_proposals):
            raise ValueError("rois_per_image and test_proposals set the R-CNN heads (sampled RoIs, RPN proposals); "
                             "a retinanet has neither: leave them unset")
        if config.kind != "retinanet":  # the R-CNN heads' settings
            if config.rois_per_image:
                kwargs["box_batch_size_per_image"] = config.rois_per_image
            if config.test_proposals:
                kwargs["rpn_pre_nms_top_n_test"] = kwargs["rpn_post_nms_top_n_test"] = config.test_proposals
        return kwargs

    def build(self) -> Tuple[nn.Module, CocoDetection]:
        config = self.config
        train_set = self._datasets()
        detector_kwargs = self.detector_kwargs()
        categories = dict(zip(train_set.category_ids, train_set.classes, strict=True))
        self.build_args = {"kind": config.kind, "backbone": config.backbone, "num_classes": train_set.num_classes,
                           "detector_kwargs": detector_kwargs, "categories": categories}
        model = build_detector(config.kind, config.backbone, train_set.num_classes,
                               pretrained_backbone=config.pretrained_backbone, frozen_stages=config.frozen_stages,
                               **detector_kwargs)
        return model, train_set

    def identity(self) -> Dict[str, Any]:
        config = self.config
        return {"kind": config.kind, "backbone": config.backbone, "num_classes": self.build_args["num_classes"],
                "model": f"{config.kind} on {config.backbone}"}

    def check_same_run(self, saved: Dict[str, Any], resume_fix: Fix) -> None:
        for key in ("kind", "backbone", "num_classes"):
            if saved.get(key, self.build_args[key]) != self.build_args[key]:
                raise UsageError(f"{{resume}}: that run trained {key} {saved[key]!r}, not {self.build_args[key]!r}; "
                                 f"pass {{{key}}}", resume_fix, Fix(key, repr(saved[key])))

    def to_device(self, batch: Any, device: torch.device) -> Any:
        images, targets = batch
        return [image.to(device) for image in images], [{k: v.to(device) for k, v in t.items()} for t in targets]

    def loss(self, model: nn.Module, batch: Any) -> Tuple[torch.Tensor, int]:
        images, targets = batch
        return sum(model(images, targets).values()), len(images)

    def validate(self, model: nn.Module, device: torch.device) -> Dict[str, Any]:
        """COCO box (and mask) AP on the val set, on rank 0 (the others wait at the epoch's end)."""
        if self.val_set is None or not is_main_process():
            return {}
        return {f"{kind}_{k}": v for kind, stats in coco_evaluate(model, self.val_set, device).items()
                for k, v in stats.items()}

    def score(self, metrics: Dict[str, Any]) -> float:
        return metrics.get("bbox_AP", -metrics["train_loss"])

    def save_model(self, model: nn.Module, directory: Path, measured: Optional[Dict[str, Any]],
                   epochs_done: int) -> None:
        save_detector(model, directory, self.build_args)


def detect_train(config: DetectTrainConfig) -> Dict[str, Any]:
    """Train a detector as ``config`` says (``wszoo detect train``); returns the last epoch's metrics (with
    COCO AP, ``bbox_AP`` ..., when there is a val set). Raises :class:`wszoo.training.TrainingInterrupted` on
    Ctrl-C and :class:`wszoo.training.TrainingDiverged` when the loss or the weights become non-finite."""
    return train(DetectionTask(config), config)

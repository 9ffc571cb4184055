"""A trained segmenter on disk: ``model.safetensors`` with ``segmenter.json`` (the :func:`build_segmenter`
arguments that rebuild it, the input size and normalization it was trained with, and what it was trained on,
with the mIoU the run measured on these exact weights and the set it measured it on), so evaluating it
(``wszoo segment eval``, :func:`segment_eval`) needs only the folder."""
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..task_folder import WEIGHTS, load_task_folder, save_task_folder
from ..training.distributed import init_distributed
from .data import EvalTransform, VOCSegmentation
from .metrics import evaluate_segmenter
from .model import build_segmenter

__all__ = ["save_segmenter", "load_segmenter", "segment_eval", "SEGMENTER_CONFIG", "WEIGHTS"]

SEGMENTER_CONFIG = "segmenter.json"


def save_segmenter(model: nn.Module, directory: Path, config: Dict[str, Any]) -> None:
    """``model.safetensors`` and ``segmenter.json`` (``config``: the build arguments, ``img_size``, ``mean``,
    ``std``, ``training``), each written atomically."""
    save_task_folder(model, directory, SEGMENTER_CONFIG, config, "segmenter")


def load_segmenter(directory: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a segmenter saved by :func:`save_segmenter` (without published backbone weights, which the
    trained ones replace at once: their log lines are not shown) and load its trained weights."""
    return load_task_folder(directory, SEGMENTER_CONFIG, "segmenter", "wszoo segment train",
                            lambda config: build_segmenter(config["kind"], config["backbone"], config["num_classes"],
                                                           output_stride=config["output_stride"],
                                                           pretrained_backbone=False))


def segment_eval(checkpoint: str, data_dir: str, split: str = "val", batch_size: int = 8,
                 img_size: Optional[int] = None, amp: Optional[str] = None,
                 device: Optional[torch.device] = None) -> Dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU (percent, :mod:`wszoo.segmentation.metrics`) of the segmenter
    saved in the folder ``checkpoint`` (a run's ``best/`` or ``last/``) on the ``split`` of the VOC-layout
    ``data_dir``, each image's shorter side resized to ``img_size`` (default: the size it was trained at; 0:
    the images as they are), scored against the full-resolution masks (``wszoo segment eval``). Under
    ``torchrun`` every process scores a shard and the confusion matrices are summed."""
    if device is None:
        _, _, device = init_distributed()
    model, config = load_segmenter(checkpoint)
    size = config.get("img_size") if img_size is None else img_size or None
    dataset = VOCSegmentation(data_dir, split, config["num_classes"],
                              transform=EvalTransform(size, config["mean"], config["std"]))
    metrics = evaluate_segmenter(model, dataset, config["num_classes"], device=device, batch_size=batch_size,
                                 amp=amp)
    return {**metrics, "checkpoint": str(checkpoint), "dataset": dataset.describe(), "img_size": size}

"""Segmentation metrics from a confusion matrix, as torchvision's segmentation reference computes them: the
matrix counts each pixel whose label is in ``[0, num_classes)`` (255, ignored, is not) at (label,
prediction), by one ``bincount`` of ``num_classes * label + prediction``; pixel accuracy is its diagonal over
its sum, a class's IoU its diagonal entry over its row + column - that entry, mIoU their mean. Under
``torchrun`` each process counts a disjoint shard of the images and the matrices are summed
(``all_reduce``), so the figures are one process's exactly."""
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..training.evaluate import autocast_context

__all__ = ["confusion_matrix", "segmentation_metrics", "evaluate_segmenter", "format_metrics"]


def confusion_matrix(target: torch.Tensor, prediction: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The ``(num_classes, num_classes)`` int64 matrix whose entry ``[i, j]`` counts the pixels labelled ``i``
    and predicted ``j``; pixels labelled outside ``[0, num_classes)`` (255) are not counted."""
    target, prediction = target.reshape(-1), prediction.reshape(-1)
    counted = (target >= 0) & (target < num_classes)
    cells = num_classes * target[counted].to(torch.int64) + prediction[counted].to(torch.int64)
    return torch.bincount(cells, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(matrix: torch.Tensor) -> Dict[str, Any]:
    """``mIoU``, ``pixel_acc`` and the per-class ``IoU`` list (percent) and the ``pixels`` counted. A class that
    no pixel has, in the labels or the predictions, has no IoU (``None``, where torchvision's reference has NaN)
    and is left out of the mean."""
    h = matrix.double()
    correct = torch.diag(h)
    union = h.sum(1) + h.sum(0) - correct
    iou = correct / union
    present = union > 0
    pixels = int(h.sum().item())
    return {"mIoU": 100 * iou[present].mean().item() if bool(present.any()) else 0.0,
            "pixel_acc": 100 * (correct.sum() / h.sum()).item() if pixels else 0.0,
            "IoU": [100 * v if p else None for v, p in zip(iou.tolist(), present.tolist(), strict=True)],
            "pixels": pixels}


def _shape_runs(dataset: Dataset, indices: List[int], batch_size: int):
    """Consecutive items in batches of up to ``batch_size`` images of one size (images of other sizes start
    a new batch): full-image evaluation needs no padding."""
    batch: List[Any] = []
    for index in indices:
        item = dataset[index]
        if batch and (len(batch) == batch_size or item[0].shape != batch[0][0].shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, dataset: Dataset, num_classes: int, device: Optional[torch.device] = None,
                       batch_size: int = 8, amp: Optional[str] = None) -> Dict[str, Any]:
    """:func:`segmentation_metrics` of ``model`` (``{'out': logits}``) on ``dataset`` (``(image, mask)`` pairs,
    the mask at the labels' own resolution: the logits are resized to it). Sharded under ``torchrun``."""
    device = device or torch.device("cpu")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model.eval().to(device)
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for batch in _shape_runs(dataset, list(range(rank, len(dataset), world)), batch_size):
        images = torch.stack([image for image, _ in batch]).to(device)
        with autocast_context(amp, device):
            logits = model(images)["out"].float()
        for one, (_, mask) in zip(logits, batch, strict=True):
            if one.shape[-2:] != mask.shape:
                one = F.interpolate(one[None], size=mask.shape, mode="bilinear", align_corners=False)[0]
            matrix += confusion_matrix(mask.to(device), one.argmax(0), num_classes)
    if world > 1:
        dist.all_reduce(matrix)
    return segmentation_metrics(matrix.cpu())


def format_metrics(metrics: Dict[str, Any], class_names: Optional[List[str]] = None) -> str:
    """``mIoU 71.20  pixel_acc 93.10`` and a line per class: ``  3 cat  IoU 80.12``."""
    names = class_names or [str(i) for i in range(len(metrics["IoU"]))]
    lines = [f"mIoU {metrics['mIoU']:.2f}  pixel_acc {metrics['pixel_acc']:.2f}  ({metrics['pixels']:,} pixels)"]
    lines += [f"  {i:>3} {name}  IoU {'n/a' if v is None else format(v, '.2f')}"
              for i, (name, v) in enumerate(zip(names, metrics["IoU"], strict=True))]
    return "\n".join(lines)

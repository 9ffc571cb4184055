"""What exporting a detector needs to know: which models are detectors, and how close two detection sets are
(an exported detector may order tied detections differently)."""
import math
from typing import Sequence

import torch
import torch.nn as nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

__all__ = ["is_detector", "detection_output_diff"]


def is_detector(model: nn.Module) -> bool:
    """A torchvision detector (R-CNNs, RetinaNet): list-of-images input, detection-set outputs."""
    return isinstance(model, (GeneralizedRCNN, RetinaNet))


def detection_output_diff(out: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], names: Sequence[str],
                   image_size: float, tolerance: float) -> float:
    """How far apart two detection sets are, order aside: every reference detection must have a twin of the
    same label whose box (relative to the image size), score (and mask) lie within ``tolerance``. Scores
    tied within the tolerance may come out in either order, and at the tail (the lowest kept score) either
    one of a tie may be kept: only those may go unmatched. Returns the largest matched difference, or inf."""
    got, want = dict(zip(names, out, strict=True)), dict(zip(names, ref, strict=True))
    if got["boxes"].shape != want["boxes"].shape:
        return math.inf
    if not len(want["boxes"]):
        return 0.0
    box_diff = (got["boxes"].double()[:, None] - want["boxes"].double()[None]).abs().amax(-1) / image_size
    score_diff = (got["scores"].double()[:, None] - want["scores"].double()[None]).abs()
    candidates = (box_diff <= tolerance) & (score_diff <= tolerance) \
        & (got["labels"].long()[:, None] == want["labels"].long()[None])
    tail = want["scores"].double().min().item() + tolerance
    worst, taken = 0.0, torch.zeros(len(got["boxes"]), dtype=torch.bool)
    for j in torch.argsort(want["scores"], descending=True).tolist():
        free = torch.nonzero(candidates[:, j] & ~taken).flatten()
        if not len(free):
            if want["scores"][j].item() > tail:
                return math.inf
            continue
        i = free[torch.argmin(box_diff[free, j])].item()
        taken[i] = True
        diffs = [box_diff[i, j].item(), score_diff[i, j].item()]
        if "masks" in want:
            diffs.append((got["masks"][i].double() - want["masks"][j].double()).abs().max().item())
        worst = max(worst, *diffs)
    return worst

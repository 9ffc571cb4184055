"""COCO-format detection data (an image folder and an instances json) and COCO metrics, through
``pycocotools``: the dataset torchvision's detectors train on, and box / mask AP as COCO computes it."""
import contextlib
import io
import os
import random
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_tensor

from ..training.data import DataError

__all__ = ["CocoDetection", "collate", "coco_evaluate", "require_pycocotools"]


def require_pycocotools():
    """``pycocotools.coco.COCO``, or a DataError saying which extra installs it."""
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise DataError("COCO data and metrics need pycocotools: pip install 'wszoo[detection]'") from None
    return COCO


def _quiet(fn, *args):
    """pycocotools prints progress to stdout; keep the command's output to its own lines."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _check_instances(dataset: Any, path: str, masks: bool) -> None:
    """What training and COCOeval rely on, checked before any work: a clear error naming the first problem
    instead of a KeyError deep in pycocotools or an epoch in."""
    if not isinstance(dataset, dict):
        raise DataError(f"{path} is not a COCO instances file: a JSON object was expected")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(dataset.get(k), list)]
    if missing:
        raise DataError(f"{path} is not a COCO instances file: no {' / '.join(missing)} list")
    if not dataset["images"]:
        raise DataError(f"{path} lists no image")
    if not dataset["categories"]:
        raise DataError(f"{path} lists no category")
    for key, items, fields in (("images", dataset["images"], ("id", "file_name")),
                               ("categories", dataset["categories"], ("id", "name")),
                               ("annotations", dataset["annotations"], ("id", "image_id", "category_id", "bbox"))):
        for n, item in enumerate(items):
            absent = [f for f in fields if not isinstance(item, dict) or f not in item]
            if absent:
                raise DataError(f"{path}: {key}[{n}] has no {', '.join(absent)}")
    image_ids = {image["id"] for image in dataset["images"]}
    category_ids = {category["id"] for category in dataset["categories"]}
    for n, ann in enumerate(dataset["annotations"]):
        if ann["image_id"] not in image_ids:
            raise DataError(f"{path}: annotations[{n}] is for image_id {ann['image_id']}, which images does not list")
        if ann["category_id"] not in category_ids:
            raise DataError(f"{path}: annotations[{n}] has category_id {ann['category_id']}, which categories does "
                            "not list")
        if not (isinstance(ann["bbox"], list) and len(ann["bbox"]) == 4):
            raise DataError(f"{path}: annotations[{n}] bbox must be [x, y, width, height], got {ann['bbox']!r}")
        if masks and "segmentation" not in ann:
            raise DataError(f"{path}: annotations[{n}] has no segmentation, which a Mask R-CNN trains on")


class CocoDetection(Dataset):
    """Images and their instances as torchvision's detectors take them: a [0, 1] RGB tensor, and a target
    with ``boxes`` (xyxy, float), ``labels`` (1..K, the categories in id order; 0 is background),
    ``masks`` (N, H, W uint8, with ``masks=True``) and ``image_id``. Crowd annotations and empty boxes
    are left out, as torchvision's reference scripts do. ``flip`` mirrors images at random (training)."""

    def __init__(self, images: str, annotations: str, masks: bool = False, flip: bool = False) -> None:
        COCO = require_pycocotools()
        if not os.path.isdir(images):
            raise DataError(f"image folder {images} does not exist")
        if not os.path.isfile(annotations):
            raise DataError(f"annotation file {annotations} does not exist")
        try:
            self.coco = _quiet(COCO, annotations)
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            raise DataError(f"{annotations} is not a COCO instances file: {e}") from e
        _check_instances(self.coco.dataset, annotations, masks)
        self.images, self.with_masks, self.flip = images, masks, flip
        self.ids = sorted(self.coco.getImgIds())
        self.category_ids = sorted(self.coco.getCatIds())
        absent = [self.coco.imgs[i]["file_name"] for i in self.ids
                  if not os.path.isfile(os.path.join(images, self.coco.imgs[i]["file_name"]))]
        if absent:  # found now, not an epoch into training
            raise DataError(f"{len(absent)} of the {len(self.ids)} images {annotations} lists are not in {images} "
                            f"(first: {absent[0]})")
        self.label_of = {c: i + 1 for i, c in enumerate(self.category_ids)}
        self.classes = [self.coco.cats[c]["name"] for c in self.category_ids]

    @property
    def num_classes(self) -> int:
        """Categories + background, as torchvision's R-CNNs count (RetinaNet ignores label 0)."""
        return len(self.category_ids) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = os.path.join(self.images, info["file_name"])
        try:
            with Image.open(path) as img:
                image = to_tensor(img.convert("RGB"))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {path}: {e}") from e
        boxes, labels, masks = [], [], []
        for ann in self.coco.imgToAnns[image_id]:
            x, y, w, h = ann["bbox"]
            if ann.get("iscrowd", 0) or w < 1 or h < 1:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.label_of[ann["category_id"]])
            if self.with_masks:
                masks.append(torch.from_numpy(self.coco.annToMask(ann)))
        height, width = image.shape[-2:]
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(labels, dtype=torch.int64), "image_id": torch.tensor(image_id)}
        if self.with_masks:
            target["masks"] = torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.uint8)
        if self.flip and random.random() < 0.5:
            image = image.flip(-1)
            target["boxes"][:, [0, 2]] = width - target["boxes"][:, [2, 0]]
            if self.with_masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def collate(batch: List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]) -> Tuple[list, list]:
    """Detection batches are lists: images of different sizes, targets of different lengths."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def _coco_results(dataset: CocoDetection, image_id: int, output: Dict[str, torch.Tensor]) -> Tuple[list, list]:
    boxes = output["boxes"].detach().cpu().double()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    categories = [dataset.category_ids[int(label) - 1] for label in output["labels"].tolist()]
    scores = output["scores"].tolist()
    detections = [{"image_id": image_id, "category_id": c, "bbox": b, "score": s}
                  for c, b, s in zip(categories, xywh, scores, strict=True)]
    segments = []
    if "masks" in output:
        from pycocotools import mask as mask_utils

        binary = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        for m, c, s in zip(binary, categories, scores, strict=True):
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            segments.append({"image_id": image_id, "category_id": c, "segmentation": rle, "score": s})
    return detections, segments


_STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


@torch.no_grad()
def coco_evaluate(model: nn.Module, dataset: CocoDetection, device: Optional[torch.device] = None,
                  batch_size: int = 2) -> Dict[str, Dict[str, Optional[float]]]:
    """COCO box (and mask, for a Mask R-CNN on a dataset with masks) AP of ``model`` on ``dataset``, by
    pycocotools' COCOeval, in percent: ``{"bbox": {"AP": ..., "AP50": ..., ...}, "segm": {...}}``; None for a
    size range the dataset has no object of."""
    from pycocotools.cocoeval import COCOeval

    device = device or torch.device("cpu")
    model.eval().to(device)
    detections: List[Dict[str, Any]] = []
    segments: List[Dict[str, Any]] = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        outputs = model([image.to(device) for image, _ in items])
        for (_, target), output in zip(items, outputs, strict=True):
            d, s = _coco_results(dataset, int(target["image_id"]), output)
            detections += d
            segments += s
    results: Dict[str, Dict[str, Optional[float]]] = {}
    for kind, found in (("bbox", detections), ("segm", segments)):
        if kind == "segm" and not dataset.with_masks:
            continue
        if not found:
            results[kind] = {name: 0.0 for name in _STAT_NAMES}
            continue
        evaluator = COCOeval(dataset.coco, _quiet(dataset.coco.loadRes, found), kind)
        evaluator.params.imgIds = dataset.ids
        for step in (evaluator.evaluate, evaluator.accumulate, evaluator.summarize):
            _quiet(step)
        stats = evaluator.stats[:len(_STAT_NAMES)]  # (the recall figures that follow are left out)
        # COCOeval writes -1 for a size range with no ground-truth object: no figure, not a score of -100
        results[kind] = {name: None if v < 0 else round(100 * float(v), 2)
                         for name, v in zip(_STAT_NAMES, stats, strict=True)}
    return results

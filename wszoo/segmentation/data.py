"""Semantic segmentation data in the PASCAL VOC layout, and its transforms.

A root holds ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (a palette or 8-bit grayscale PNG
whose pixel values are class indices; 255 marks pixels that count for nothing, VOC's object borders) and
``ImageSets/Segmentation/<split>.txt`` (one id a line). The training transforms are those of torchvision's
segmentation reference: the shorter side rescaled at random to 0.5-2x the crop size, a random horizontal
flip, a random crop (padded with 0 in the image and 255 in the mask where the rescaled image is smaller).
For evaluation the image's shorter side is resized to a fixed size (or left as it is) and the mask is
kept at full resolution: the metrics are measured on the labels as given."""
import random
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..training.data import DataError

__all__ = ["IGNORE_INDEX", "VOCSegmentation", "TrainTransform", "EvalTransform", "read_split",
           "check_masks"]

#: The mask value of pixels that are neither trained on nor scored.
IGNORE_INDEX = 255
IMAGES, MASKS, SPLITS = "JPEGImages", "SegmentationClass", "ImageSets/Segmentation"
_INDEX_MODES = ("P", "L")  # palette and 8-bit grayscale PNGs hold class indices


def read_split(root: Path, split: str) -> List[str]:
    """The ids listed in ``ImageSets/Segmentation/<split>.txt``, each with its image and mask present."""
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    split_file = root / SPLITS / f"{split}.txt"
    if not split_file.is_file():
        raise DataError(f"{split_file} does not exist: a VOC-layout root lists the ids of its '{split}' split there")
    ids = [line.strip() for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{split_file} lists no image id")
    for folder, suffix in ((IMAGES, ".jpg"), (MASKS, ".png")):
        absent = [i for i in ids if not (root / folder / f"{i}{suffix}").is_file()]
        if absent:
            raise DataError(f"{len(absent)} of the {len(ids)} ids in {split_file} have no {folder}/<id>{suffix} "
                            f"(first: {root / folder / (absent[0] + suffix)})")
    return ids


def check_masks(root: Path, ids: Sequence[str], num_classes: int) -> None:
    """Refuse, naming the file, a mask that is not an index PNG, whose size differs from its image's, or
    with a label outside ``[0, num_classes)`` that is not 255. Every mask is read once (PIL and
    ``numpy.unique``: seconds for VOC's 2,913), so bad data stops the run before its first step, not an
    epoch in (or, worse, a label >= num_classes silently breaking the loss on a GPU)."""
    for image_id in ids:
        mask_path, image_path = root / MASKS / f"{image_id}.png", root / IMAGES / f"{image_id}.jpg"
        try:
            with Image.open(image_path) as image:
                image_size = image.size
            with Image.open(mask_path) as mask:
                if mask.mode not in _INDEX_MODES:
                    raise DataError(f"{mask_path} is a {mask.mode} image: masks must be palette or 8-bit grayscale "
                                    "PNGs whose values are class indices")
                mask_size, labels = mask.size, np.unique(np.asarray(mask))
        except OSError as e:
            raise DataError(f"cannot read {e.filename or mask_path}: {e}") from e
        if mask_size != image_size:
            raise DataError(f"{mask_path} is {mask_size[0]}x{mask_size[1]} but its image {image_path} is "
                            f"{image_size[0]}x{image_size[1]}: a mask labels its image's pixels one for one")
        bad = [int(v) for v in labels if v >= num_classes and v != IGNORE_INDEX]
        if bad:
            raise DataError(f"{mask_path} has label(s) {', '.join(map(str, bad))}: labels must be in [0, "
                            f"{num_classes}) for --num-classes {num_classes}, or {IGNORE_INDEX} (ignored)")


def _to_tensors(image: Image.Image, mask: Image.Image, mean: Sequence[float], std: Sequence[float]
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    pixels = TF.normalize(TF.pil_to_tensor(image).float().div_(255), mean, std)
    return pixels, torch.as_tensor(np.array(mask), dtype=torch.int64)


class TrainTransform:
    """torchvision's segmentation training preset at crop ``size``: random rescale (shorter side 0.5-2x
    ``size``), horizontal flip, random crop. Draws from Python's ``random`` (seeded per epoch and worker)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, image: Image.Image, mask: Image.Image) -> Tuple[torch.Tensor, torch.Tensor]:
        shorter = random.randint(self.size // 2, 2 * self.size)
        image = TF.resize(image, shorter, interpolation=InterpolationMode.BILINEAR)
        mask = TF.resize(mask, shorter, interpolation=InterpolationMode.NEAREST)
        if random.random() < 0.5:
            image, mask = TF.hflip(image), TF.hflip(mask)
        width, height = image.size
        pad_w, pad_h = max(self.size - width, 0), max(self.size - height, 0)
        if pad_w or pad_h:
            image = TF.pad(image, [0, 0, pad_w, pad_h], fill=0)
            mask = TF.pad(mask, [0, 0, pad_w, pad_h], fill=IGNORE_INDEX)
            width, height = image.size
        top, left = random.randint(0, height - self.size), random.randint(0, width - self.size)
        image = TF.crop(image, top, left, self.size, self.size)
        mask = TF.crop(mask, top, left, self.size, self.size)
        return _to_tensors(image, mask, self.mean, self.std)


class EvalTransform:
    """The image with its shorter side resized to ``size`` (``None``: as it is), the mask untouched."""

    def __init__(self, size: Optional[int], mean: Sequence[float], std: Sequence[float]) -> None:
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, image: Image.Image, mask: Image.Image) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.size:
            image = TF.resize(image, self.size, interpolation=InterpolationMode.BILINEAR)
        return _to_tensors(image, mask, self.mean, self.std)


class VOCSegmentation(Dataset):
    """The ``split`` of a VOC-layout ``root`` (see the module docstring), as ``(image, mask)`` pairs through
    ``transform``: a normalized float image and an int64 mask of class indices (255: ignored). Every mask is
    checked against ``num_classes`` when the dataset is made (:func:`check_masks`)."""

    def __init__(self, root: str, split: str, num_classes: int,
                 transform: Optional[Callable] = None) -> None:
        self.root, self.split, self.num_classes = Path(root), split, num_classes
        self.ids = read_split(self.root, split)
        check_masks(self.root, self.ids, num_classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def describe(self) -> str:
        """``VOC-layout 'name' val (1,449 images)``: what a metric measured on this set names."""
        return f"VOC-layout '{self.root.resolve().name}' {self.split} ({len(self):,} images)"

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image_id = self.ids[index]
        try:
            with Image.open(self.root / IMAGES / f"{image_id}.jpg") as img:
                image = img.convert("RGB")
            with Image.open(self.root / MASKS / f"{image_id}.png") as m:
                mask = Image.fromarray(np.array(m))  # the indices ("L"), without the palette
        except OSError as e:
            raise DataError(f"cannot read {e.filename or image_id}: {e}") from e
        if self.transform is None:
            return TF.pil_to_tensor(image), torch.as_tensor(np.array(mask), dtype=torch.int64)
        return self.transform(image, mask)


"""Datasets and preprocessing for evaluation and fine-tuning: ImageFolder trees, Fashion-MNIST's idx
files, torchvision's datasets by name, and the model's data config / transforms (timm's). Images are
returned as PIL images in the mode the model takes (``'L'``
for one input channel, ``'RGB'`` for three), so timm's transforms apply unchanged."""
import gzip
import os
import struct
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch.utils.data import Dataset, Subset
from torchvision import transforms

from ..errors import Fix, UsageError

__all__ = ["DataError", "FashionMNIST", "create_dataset", "class_count", "data_config_for", "build_transforms",
           "check_image_files", "fashion_mnist_check_image",
           "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES"]

#: Where Debian's ``dataset-fashion-mnist`` package puts the files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


class DataError(ValueError):
    """A dataset that cannot be used as asked (missing, empty, malformed)."""


def data_config_for(model: nn.Module, img_size: Optional[int] = None, **overrides: Any) -> Dict[str, Any]:
    """timm's data config for ``model``, at ``img_size`` and with mean/std matched to its input channels."""
    args: Dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    if img_size:
        args["input_size"] = (model.in_chans, img_size, img_size)
    cfg = resolve_data_config(args, model=model)
    cfg["input_size"] = (model.in_chans, *cfg["input_size"][1:])
    for key in ("mean", "std"):
        if len(cfg[key]) != model.in_chans:  # e.g. an RGB checkpoint fine-tuned on grayscale
            avg = float(sum(cfg[key]) / len(cfg[key]))
            cfg[key] = (avg,) * model.in_chans
    return cfg


def build_transforms(cfg: Dict[str, Any], aug: str) -> Tuple[Any, Any]:
    """(train, eval) transforms: ``timm`` (timm's training pipeline), ``flip-crop`` (pad-and-crop + flip,
    right for 28-32 px images), or ``none``."""
    eval_tf = create_transform(**cfg, is_training=False)
    size = cfg["input_size"][-1]
    if aug == "timm":
        train_tf = create_transform(**cfg, is_training=True)
    elif aug == "flip-crop":
        train_tf = transforms.Compose([
            transforms.Resize(size), transforms.RandomCrop(size, padding=max(1, size // 8)),
            transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(cfg["mean"], cfg["std"]),
        ])
    elif aug == "none":
        train_tf = eval_tf
    else:
        raise UsageError(f"unknown augmentation {aug!r}: pass {{aug}}",
                         Fix("aug", "'timm'", phrase="{}, flip-crop or none"))
    return train_tf, eval_tf


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format), gzipped or not: magic (2 zero bytes, dtype 0x08, ndim), dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {body.size} values")
    return body.reshape(dims)


class FashionMNIST(Dataset):
    """Fashion-MNIST (Xiao et al. 2017; MIT licence) from its four idx files in ``root``.

    ``split``: ``'train'`` (60,000 images) or ``'test'``/``'val'`` (10,000). ``limit`` keeps the first N.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str = FASHION_MNIST_DIR, split: str = "train", transform: Optional[Callable] = None,
                 limit: Optional[int] = None, mode: str = "L") -> None:
        prefix = {"train": "train", "test": "t10k", "val": "t10k", "validation": "t10k"}.get(split)
        if prefix is None:
            raise DataError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")
        root_path = Path(root)
        images = self._find(root_path, f"{prefix}-images-idx3-ubyte")
        labels = self._find(root_path, f"{prefix}-labels-idx1-ubyte")
        self.images, self.targets = _read_idx(images), _read_idx(labels).astype(np.int64)
        if len(self.images) != len(self.targets):
            raise DataError(f"{images} and {labels} disagree: {len(self.images)} images, {len(self.targets)} labels")
        if limit is not None:
            self.images, self.targets = self.images[:limit], self.targets[:limit]
        self.transform, self.mode = transform, mode

    @staticmethod
    def _find(root: Path, stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (root / name).is_file():
                return root / name
        hint = " (install Debian's dataset-fashion-mnist package)" if str(root) == FASHION_MNIST_DIR else ""
        raise DataError(f"{root} has no {stem}[.gz]: not a Fashion-MNIST directory{hint}")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[object, int]:
        img = Image.fromarray(self.images[index], mode="L")
        if self.mode != "L":
            img = img.convert(self.mode)
        return (self.transform(img) if self.transform else img), int(self.targets[index])


def _load_image(path: str, mode: str) -> Image.Image:
    """An image file in ``mode``; a file PIL cannot decode is a :class:`DataError` naming it."""
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for truncated / foreign files
        raise DataError(f"cannot read image {path}: {e}") from e


def _split_dirs(root: Path) -> List[str]:
    """Subfolders of ``root`` that hold folders themselves: the splits of a ``root/<split>/<class>/*`` tree."""
    return sorted(d.name for d in root.iterdir() if d.is_dir() and any(c.is_dir() for c in d.iterdir()))


def _image_folder(root: Path, split: Optional[str], transform, mode: str):
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    folder = root
    if split:
        splits = _split_dirs(root)
        if (root / split).is_dir():
            folder = root / split
        elif splits:  # a split tree without the asked split: never fall back to its root (splits as classes)
            raise DataError(f"{root} has no split {split!r}; the splits present are: {', '.join(splits)}")
    try:
        return ImageFolder(str(folder), transform=transform, loader=partial(_load_image, mode=mode))
    except FileNotFoundError as e:  # torchvision's words for "no class folders" / "no images"
        raise DataError(f"{folder}: {e}") from e


def _complete(path: str) -> None:
    """Raise unless ``path`` is an image whose data is all there: PIL parses the header (and for PNG checks
    every chunk's CRC up to IEND); a JPEG must end with its end-of-image marker. Cheap: no pixel decoding."""
    with Image.open(path) as img:
        fmt = img.format
        img.verify()
    if fmt == "JPEG":
        with open(path, "rb") as f:
            f.seek(-2, os.SEEK_END)
            if f.read(2) != b"\xff\xd9":
                raise OSError("the JPEG data is truncated (no end-of-image marker)")


def check_image_files(paths: Sequence[str]) -> None:
    """Find unreadable or truncated image files before any training or evaluation time is spent on them."""
    bad = []
    for path in paths:
        try:
            _complete(path)
        except (OSError, ValueError, SyntaxError) as e:
            bad.append(f"{path} ({e})")
    if bad:
        more = f" ... and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DataError(f"{len(bad)} unreadable image file(s): {'; '.join(bad[:3])}{more}. Remove or replace them")


def create_dataset(name: str, root: Optional[str], split: str = "val", transform: Optional[Callable] = None,
                   in_chans: int = 3, limit: Optional[int] = None, check_images: bool = True) -> Dataset:
    """``imagefolder`` (``root/<split>/<class>/*`` or ``root/<class>/*``), ``fashion-mnist``, or a
    torchvision dataset class by name (``cifar10``, ``stl10`` ...; files must already be in ``root``).

    The returned dataset has ``classes``. An image folder's files are checked first (:func:`check_image_files`)
    unless ``check_images=False``.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive number of images, got {limit!r}")
    if in_chans not in (1, 3):
        raise DataError(f"image datasets give 1-channel (L) or 3-channel (RGB) images, not {in_chans}: "
                        "use --in-chans 1 or 3")
    mode = "L" if in_chans == 1 else "RGB"
    key = name.lower().replace("_", "-")
    if key == "imagefolder":
        if not root:
            raise UsageError("an imagefolder dataset needs its folder: pass {data_dir}", Fix("data_dir", None))
        ds = _image_folder(Path(root), split, transform, mode)
    elif key == "fashion-mnist":
        ds = FashionMNIST(root or FASHION_MNIST_DIR, split=split, transform=transform, mode=mode, limit=limit)
    else:
        import torchvision.datasets as tvd

        classes = {n.lower(): getattr(tvd, n) for n in dir(tvd) if isinstance(getattr(tvd, n), type)}
        cls = classes.get(key.replace("-", ""))
        if cls is None:
            raise DataError(f"unknown dataset {name!r}: use imagefolder, fashion-mnist or a torchvision dataset name")
        if not root or not os.path.isdir(root):
            raise DataError(f"data directory {root} does not exist")
        try:
            kwargs = {"train": split == "train"} if "train" in cls.__init__.__code__.co_varnames else {"split": split}
            ds = cls(root, transform=None, download=False, **kwargs)
        except (RuntimeError, OSError) as e:
            raise DataError(f"{name} in {root}: {e}") from e
        ds = _ModeWrapper(ds, transform, mode)
    if limit is not None and not isinstance(ds, FashionMNIST):  # FashionMNIST applied it itself
        classes = ds.classes
        ds = Subset(ds, range(min(limit, len(ds))))
        ds.classes = classes
    if len(ds) == 0:
        raise DataError(f"dataset {name!r} at {root} ({split}) is empty")
    if check_images and key == "imagefolder":
        samples = ds.dataset.samples if isinstance(ds, Subset) else ds.samples
        check_image_files([samples[i][0] for i in range(len(ds))])
    return ds


class _ModeWrapper(Dataset):
    """Converts a torchvision dataset's images to the model's mode before the transform."""

    def __init__(self, ds, transform, mode: str) -> None:
        self.ds, self.transform, self.mode = ds, transform, mode
        self.classes: List[str] = list(getattr(ds, "classes", []))

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int):
        img, target = self.ds[index]
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        img = img.convert(self.mode)
        return (self.transform(img) if self.transform else img), int(target)


def class_count(ds: Dataset) -> int:
    classes: Sequence = getattr(ds, "classes", None) or []
    return len(classes)


def fashion_mnist_check_image(model: nn.Module) -> Optional[torch.Tensor]:
    """The first Fashion-MNIST test image through ``model``'s evaluation preprocessing, ``(1, 28, 28)``, for the
    models that take them (input size 1 x 28 x 28) where the data set is installed; else ``None``. A real image
    for :func:`wszoo.export`'s verification."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if tuple(cfg.get("input_size") or ()) != (1, 28, 28):
        return None
    try:
        images = FashionMNIST(FASHION_MNIST_DIR, "test", transform=build_transforms(data_config_for(model), "none")[1],
                              limit=1)
    except DataError:
        return None
    return images[0][0]

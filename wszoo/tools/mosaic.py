"""A real-image dense-prediction set made offline (``wszoo data mosaic``): Fashion-MNIST items, scaled and tinted,
placed on noisy canvases with little overlap, written both as COCO instances (boxes and RLE masks of each item's
visible silhouette, for ``wszoo detect``) and in the VOC segmentation layout (palette PNGs), from the same images.

Train canvases take their items from Fashion-MNIST's train split, val canvases from its test split, so the val
set holds items no training canvas shows. The same arguments give byte-identical files, and the first N
canvases of a split do not depend on how many are asked for (each split draws from its own random stream).

Layout of ``out_dir``::

    JPEGImages/<id>.jpg                      RGB canvases, ids train_000000 ..., val_000000 ...
    SegmentationClass/<id>.png               palette PNG: 0 background, 1..10 = Fashion-MNIST class + 1
    ImageSets/Segmentation/{train,val}.txt   one id per line
    annotations/instances_{train,val}.json   COCO instances, categories 1..10
    mosaic.json                              the parameters, counts and source files (sha256)
"""
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
from PIL import Image

from ..errors import Fix, UsageError
from ..files import check_writable_parent
from ..training.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, DataError, FashionMNIST

__all__ = ["write_mosaic", "SILHOUETTE_THRESHOLD", "SPLITS"]

#: A scaled item's pixels at or above this grey level (of 255) are its silhouette; fainter ones are not drawn.
SILHOUETTE_THRESHOLD = 16
#: mosaic split -> Fashion-MNIST split its items come from
SPLITS = {"train": "train", "val": "test"}
SCALE_RANGE = (1.0, 3.0)        # an item's side is 28 px times this (capped at 3/4 of the canvas)
MAX_ITEMS = 4                   # items tried per canvas: 1..MAX_ITEMS
MIN_VISIBLE = 0.75              # a placement that leaves an earlier item less of its silhouette is rejected
PLACEMENT_ATTEMPTS = 20         # positions tried per item before it is left out
JPEG_QUALITY = 95
MIN_SIZE, MAX_SIZE = 32, 4096
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass
class _Item:
    """One placed item: its source, where it lies, and its full silhouette (the visible part is in the owner map)."""

    label: int
    index: int
    top: int
    left: int
    silhouette: np.ndarray  # bool (side, side)


def _source_files(data_dir: str) -> Dict[str, Path]:
    """The four idx files (gzipped or not), or one line naming the Debian package and ``data_dir``."""
    found: Dict[str, Path] = {}
    for stems in _FILES.values():
        for stem in stems:
            path = next((Path(data_dir, n) for n in (stem + ".gz", stem) if Path(data_dir, n).is_file()), None)
            if path is None:
                raise UsageError(f"{data_dir} has no {stem}[.gz]: install Debian's dataset-fashion-mnist package "
                                 f"(it puts the files in {FASHION_MNIST_DIR}){{data_dir}}",
                                 Fix("data_dir", None, cli_value="DIR", phrase=" or pass {} with the four idx files"))
            found[stem] = path
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _voc_palette() -> List[int]:
    """PASCAL VOC's colour map (each label's bits spread over R, G, B from the high bit down), 256 entries."""
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


class _ItemPool:
    """Indices of a Fashion-MNIST split in a random order, each used once before any repeats."""

    def __init__(self, rng: np.random.Generator, count: int) -> None:
        self.rng, self.count, self.order, self.next = rng, count, np.empty(0, dtype=np.int64), 0

    def take(self) -> int:
        if self.next == len(self.order):
            self.order, self.next = self.rng.permutation(self.count), 0
        self.next += 1
        return int(self.order[self.next - 1])


def _silhouette(gray28: np.ndarray, side: int) -> Tuple[np.ndarray, np.ndarray]:
    """The item scaled to ``side`` px (bilinear) and its silhouette (pixels >= the threshold)."""
    scaled = np.asarray(Image.fromarray(gray28).resize((side, side), Image.BILINEAR))
    return scaled, scaled >= SILHOUETTE_THRESHOLD


def _fits(owner: np.ndarray, items: List[_Item], top: int, left: int, silhouette: np.ndarray) -> bool:
    """Whether putting ``silhouette`` on top at (top, left) leaves every earlier item MIN_VISIBLE of itself."""
    side = silhouette.shape[0]
    covered = owner[top:top + side, left:left + side][silhouette]
    counts = np.bincount(covered[covered >= 0], minlength=len(items))
    for j, item in enumerate(items):
        visible = int((owner == j).sum())
        if counts[j] and visible - counts[j] < MIN_VISIBLE * int(item.silhouette.sum()):
            return False
    return True


def _canvas(rng: np.random.Generator, size: int, pool: _ItemPool, images: np.ndarray, labels: np.ndarray
            ) -> Tuple[np.ndarray, np.ndarray, List[_Item]]:
    """One canvas: a dark noisy background, then 1..MAX_ITEMS tinted items, each on top of the earlier ones.
    Returns the RGB image, the owner map (the index of the item each pixel shows, -1 for background) and the items."""
    base = rng.integers(0, 60, 3)
    pixels = np.clip(base + rng.normal(0, 6, (size, size, 3)), 0, 255)
    owner = np.full((size, size), -1, dtype=np.int64)
    items: List[_Item] = []
    high = max(SCALE_RANGE[0], min(SCALE_RANGE[1], 0.75 * size / 28))
    for _ in range(int(rng.integers(1, MAX_ITEMS + 1))):
        index = pool.take()
        side = int(round(28 * rng.uniform(SCALE_RANGE[0], high)))
        scaled, silhouette = _silhouette(images[index], side)
        tint = rng.uniform(0.35, 1.0, 3)
        tint /= tint.max()
        for _attempt in range(PLACEMENT_ATTEMPTS):
            top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
            if _fits(owner, items, top, left, silhouette):
                break
        else:
            continue  # no place with little overlap: the item is left out
        region = (slice(top, top + side), slice(left, left + side))
        pixels[region][silhouette] = scaled[silhouette, None] * tint
        owner[region][silhouette] = len(items)
        items.append(_Item(int(labels[index]), index, top, left, silhouette))
    return np.round(pixels).astype(np.uint8), owner, items


def _annotations(owner: np.ndarray, items: List[_Item], image_id: int, first_id: int, source_split: str
                 ) -> List[Dict[str, Any]]:
    """COCO annotations of the items' visible silhouettes: tight box, pixel area, compressed RLE; and where each
    item came from (``fashion_mnist``: split, index, and the square ``placed`` [x, y, side] it was scaled into)."""
    from pycocotools import mask as mask_utils

    annotations = []
    for j, item in enumerate(items):
        visible = owner == j
        rows, cols = np.nonzero(visible)
        x0, y0 = int(cols.min()), int(rows.min())
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        annotations.append({
            "id": first_id + len(annotations), "image_id": image_id, "category_id": item.label + 1,
            "bbox": [float(x0), float(y0), float(cols.max() - x0 + 1), float(rows.max() - y0 + 1)],
            "area": float(visible.sum()), "iscrowd": 0,
            "segmentation": {"size": list(visible.shape), "counts": rle["counts"].decode("ascii")},
            "fashion_mnist": {"split": source_split, "index": item.index,
                              "placed": [item.left, item.top, item.silhouette.shape[0]]}})
    return annotations


def _write_split(root: Path, split: str, count: int, size: int, seed: int, data_dir: str) -> Dict[str, Any]:
    """The canvases of one split, their VOC masks and COCO file; returns the split's counts."""
    source_split = SPLITS[split]
    source = FashionMNIST(data_dir, source_split)
    rng = np.random.default_rng([seed, list(SPLITS).index(split)])
    pool = _ItemPool(rng, len(source.images))
    palette = _voc_palette()
    images, annotations, ids = [], [], []
    for n in range(count):
        name = f"{split}_{n:06d}"
        pixels, owner, items = _canvas(rng, size, pool, source.images, source.targets)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{name}.jpg", quality=JPEG_QUALITY)
        classes = np.zeros((size, size), dtype=np.uint8)
        for j, item in enumerate(items):
            classes[owner == j] = item.label + 1
        mask = Image.fromarray(classes, mode="P")
        mask.putpalette(palette)
        mask.save(root / "SegmentationClass" / f"{name}.png")
        images.append({"id": n + 1, "file_name": f"{name}.jpg", "width": size, "height": size})
        annotations += _annotations(owner, items, n + 1, len(annotations) + 1, source_split)
        ids.append(name)
    categories = [{"id": k + 1, "name": c, "supercategory": "fashion"} for k, c in enumerate(FASHION_MNIST_CLASSES)]
    coco = {"info": {"description": f"wszoo mosaic of Fashion-MNIST ({split}: items from its {source_split} split)"},
            "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco) + "\n")
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    per_category = {c["name"]: sum(a["category_id"] == c["id"] for a in annotations) for c in categories}
    return {"images": count, "instances": len(annotations), "fashion_mnist_split": source_split,
            "instances_per_category": per_category}


def _check_counts(train: Any, val: Any, size: Any, seed: Any) -> None:
    for name, value, least in (("train", train, 1), ("val", val, 1), ("size", size, MIN_SIZE), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if size > MAX_SIZE:
        raise ValueError(f"size must be at most {MAX_SIZE} px, got {size}")


@contextlib.contextmanager
def _staged(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``out`` that replaces it when the block ends normally, and is removed otherwise:
    ``out`` never holds half a set."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield staging
        if out.exists():
            if any(out.iterdir()) and not overwrite:  # filled while this one was written
                raise FileExistsError(f"{out} is not empty: pass overwrite=True to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "set")
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_mosaic(out_dir: Union[str, os.PathLike], train: int, val: int, size: int = 128, seed: int = 0,
                 data_dir: Optional[str] = None, overwrite: bool = False) -> Dict[str, Any]:
    """Write a mosaic set of ``train`` + ``val`` canvases of ``size`` x ``size`` px to ``out_dir`` (layout in the
    module docstring) and return its summary (what ``mosaic.json`` holds). An existing non-empty ``out_dir`` is
    refused unless ``overwrite``; nothing is left half-written."""
    _check_counts(train, val, size, seed)
    data_dir = data_dir or FASHION_MNIST_DIR
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder for the mosaic set")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} is not empty: choose another folder or pass {{overwrite}} to replace it",
                         Fix("overwrite", "True"))
    check_writable_parent(out, "the mosaic folder")
    sources = _source_files(data_dir)
    try:
        from pycocotools import mask as _  # noqa: F401  (the RLE encoder, before any canvas is drawn)
    except ImportError:
        raise DataError("the mosaic's COCO masks need pycocotools: pip install 'wszoo[detection]'") from None
    summary: Dict[str, Any] = {
        "made_by": "wszoo data mosaic",
        "parameters": {"train": train, "val": val, "size": size, "seed": seed, "scale_range": list(SCALE_RANGE),
                       "max_items_per_image": MAX_ITEMS, "min_visible_fraction": MIN_VISIBLE,
                       "silhouette_threshold": SILHOUETTE_THRESHOLD, "jpeg_quality": JPEG_QUALITY,
                       "ignore_label": "none (255 unused: the silhouettes are drawn exactly)"},
        "source_files": {p.name: _sha256(p) for p in sources.values()},
        "categories": {k + 1: c for k, c in enumerate(FASHION_MNIST_CLASSES)}}
    with _staged(out, overwrite) as root:
        for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "annotations"):
            (root / folder).mkdir(parents=True)
        summary["counts"] = {split: _write_split(root, split, n, size, seed, data_dir)
                             for split, n in (("train", train), ("val", val))}
        (root / "mosaic.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary

"""Small datasets made on the fly: idx files in Fashion-MNIST's layout and ImageFolder trees."""
import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from wszoo.training.data import FASHION_MNIST_DIR

#: Debian's dataset-fashion-mnist is installed (the real data; else tests make a stand-in)
HAS_FMNIST = Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file()


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fashion_mnist(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """Class k is a bright band at rows 2k..2k+6 on noise: learnable, so training visibly helps."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 2 * k:2 * k + 6, :] = 220
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def make_image_folder(root: Path, classes=("a", "b", "c"), per_class: int = 4, size: int = 32, seed: int = 0,
                      splits=(None,)) -> Path:
    """Each class has its own dominant colour (plus noise) so a model can learn it."""
    rng = np.random.default_rng(seed)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    for split in splits:
        base = root / split if split else root
        for c, name in enumerate(classes):
            (base / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = np.clip(np.array(colours[c % 4]) + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(base / name / f"{i}.png")
    return root


def make_coco_shapes(root: Path, n_images: int = 32, size: int = 64, seed: int = 0) -> tuple:
    """A COCO-format detection set: ``root/images/*.png`` and ``root/instances.json``. Each image is noise with
    one or two bright objects: squares (category 1, 'square') and plus signs (category 7, 'plus': category ids
    need not be contiguous), each with a box and a polygon mask. Returns (images folder, annotation file)."""
    import json

    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n_images):
        pixels = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        taken = []
        for _ in range(1 + i % 2):
            side = int(rng.integers(size // 4, size // 2))
            for _attempt in range(20):
                x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
                if all(x0 + side <= a or a + s <= x0 or y0 + side <= b or b + s <= y0 for a, b, s in taken):
                    break
            taken.append((x0, y0, side))
            square = rng.random() < 0.5
            colour = (230, 80, 80) if square else (80, 230, 80)
            if square:
                pixels[y0:y0 + side, x0:x0 + side] = colour
                polygon = [x0, y0, x0 + side, y0, x0 + side, y0 + side, x0, y0 + side]
                area = side * side
            else:  # a plus sign filling the box's middle thirds
                t = side // 3
                pixels[y0 + t:y0 + 2 * t, x0:x0 + side] = colour
                pixels[y0:y0 + side, x0 + t:x0 + 2 * t] = colour
                polygon = [x0 + t, y0, x0 + 2 * t, y0, x0 + 2 * t, y0 + t, x0 + side, y0 + t, x0 + side, y0 + 2 * t,
                           x0 + 2 * t, y0 + 2 * t, x0 + 2 * t, y0 + side, x0 + t, y0 + side, x0 + t, y0 + 2 * t,
                           x0, y0 + 2 * t, x0, y0 + t, x0 + t, y0 + t]
                area = 2 * side * t - t * t
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1 if square else 7,
                                "bbox": [x0, y0, side, side], "area": area, "iscrowd": 0,
                                "segmentation": [[float(v) for v in polygon]]})
        Image.fromarray(pixels).save(images_dir / f"{i:04d}.png")
        images.append({"id": i + 1, "file_name": f"{i:04d}.png", "width": size, "height": size})
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [
        {"id": 1, "name": "square"}, {"id": 7, "name": "plus"}]}))
    return images_dir, ann_file


#: One colour per segmentation class (class 0, the background, is dark noise).
SEGMENTATION_COLOURS = [(230, 60, 60), (60, 230, 60), (60, 60, 230), (230, 230, 60), (230, 60, 230), (60, 230, 230)]


def voc_palette() -> list:
    """A 256-entry palette: class k in a colour of its own, 255 (ignored) in white, as VOC's masks are drawn."""
    palette = [0, 0, 0] + [c for colour in SEGMENTATION_COLOURS for c in colour]
    palette += [128, 128, 128] * (255 - len(palette) // 3) + [255, 255, 255]
    return palette


def write_palette_mask(path: Path, mask: np.ndarray) -> None:
    """A palette PNG whose pixel values are ``mask``'s (class indices, 255 ignored), as VOC's masks are."""
    png = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.astype(np.uint8).tobytes())
    png.putpalette(voc_palette())
    png.save(path)


def make_voc_segmentation(root: Path, n_train: int = 16, n_val: int = 8, size: int = 48, num_classes: int = 4,
                          seed: int = 0) -> Path:
    """A VOC-layout semantic segmentation set: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette
    PNGs) and ``ImageSets/Segmentation/{train,val}.txt``. Each image is split at a random point into four
    rectangles, each of a random class: class 0 (the background) dark noise, class k the k-th colour; the
    lines between them are 2 px labelled 255 (ignored), as VOC outlines its objects. Every class covers a fair
    share of the pixels, so a few optimizer steps learn more than "all background". Odd images are 8 px
    shorter: not every image has one size."""
    assert 2 <= num_classes <= len(SEGMENTATION_COLOURS) + 1
    rng = np.random.default_rng(seed)
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        ids = [f"{split}_{i:04d}" for i in range(n)]
        for i, image_id in enumerate(ids):
            height = size - 8 * (i % 2)
            pixels = rng.integers(0, 60, (height, size, 3)).astype(np.uint8)
            mask = np.zeros((height, size), dtype=np.uint8)
            y, x = int(rng.integers(height // 3, 2 * height // 3)), int(rng.integers(size // 3, 2 * size // 3))
            for rows in (slice(0, y), slice(y, height)):
                for cols in (slice(0, x), slice(x, size)):
                    k = int(rng.integers(0, num_classes))
                    mask[rows, cols] = k
                    if k:
                        pixels[rows, cols] = SEGMENTATION_COLOURS[k - 1]
            mask[y - 1:y + 1, :] = mask[:, x - 1:x + 1] = 255
            Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            write_palette_mask(root / "SegmentationClass" / f"{image_id}.png", mask)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root

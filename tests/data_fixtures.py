"""Small datasets made on the fly: idx files in Fashion-MNIST's layout and ImageFolder trees."""
import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image


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

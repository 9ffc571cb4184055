"""What the two demo test files (tests/detection/test_demo.py, tests/segmentation/test_demo.py) check alike: the
figures line naming its dataset, a tiny run of the demo, the picture it draws and the refusal of a used folder."""
import re
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

from PIL import Image

from tests.helpers import run_cli


def figures_line(metrics: str) -> "re.Pattern[str]":
    """The line a demo prints: its val set (groups 1, 2: images, px), then ``metrics`` (a regex, groups 3, ...)."""
    return re.compile(r"^Fashion-MNIST mosaics, (\d+) val images of (\d+) px \(items from Fashion-MNIST's test "
                      r"split\): " + metrics + "$", re.M)


def run_tiny_demo(demo: Callable[..., Dict[str, Any]], out: Path, fmnist: Path) -> Tuple[Path, Dict[str, Any], str]:
    """``demo`` at 8 + 4 canvases of 32 px for one epoch: its folder, returned figures and printed lines."""
    lines = []
    result = demo(out, data_dir=fmnist, log=lines.append, train_images=8, val_images=4, epochs=1, img_size=32)
    return out, result, "\n".join(lines)


def assert_png_of_size(path: Path, size: Tuple[int, int]) -> None:
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size == size
        picture.load()


def assert_refuses_a_used_folder(command: str, out: Path) -> None:
    """``wszoo COMMAND demo --output OUT`` into the demo's own folder: one line, exit 2, nothing changed."""
    before = sorted(p.name for p in out.iterdir())
    code, stdout, stderr = run_cli([command, "demo", "--output", str(out)])
    assert code == 2 and stdout == ""
    assert stderr.strip() == (f"wszoo {command} demo: error: {out} is not empty: choose another folder or pass "
                              "--overwrite to replace the demo in it")
    assert sorted(p.name for p in out.iterdir()) == before

"""What ``wszoo detect demo`` and ``wszoo segment demo`` share: the output folder they refuse to fill twice, and
the picture of predictions beside the ground truth (PIL only: the demos need no plotting library)."""
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image, ImageDraw, ImageFont

from ..errors import Fix, UsageError
from ..files import check_writable_parent

__all__ = ["prepare_output", "label_font", "draw_boxes", "save_grid", "PANEL", "TITLE_HEIGHT", "grid_size"]

#: each image of the picture is scaled to this side (the mosaics are 64-96 px: too small to read labels on)
PANEL = 256
TITLE_HEIGHT = 22
_GAP = 4
#: box and label colours, one per class (cycled)
COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324", "#800000",
           "#000075"]


def prepare_output(output: Union[str, Path], overwrite: bool) -> Path:
    """``output`` as a folder to write into: a non-empty one is refused unless ``overwrite`` (its ``mosaic/``,
    ``run/`` and picture are then replaced, anything else in it is left)."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file, not a folder for the demo's output: choose another {{output}}",
                         Fix("output", None, cli_value="DIR"))
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} is not empty: choose another folder or pass {{overwrite}} to replace the demo in it",
                         Fix("overwrite", "True"))
    check_writable_parent(out, "the demo's output folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def label_font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw_boxes(image: Image.Image, boxes: Sequence[Sequence[float]], classes: Sequence[int], names: Sequence[str],
               scores: Optional[Sequence[float]] = None) -> Image.Image:
    """``image`` scaled to :data:`PANEL` px with each box (xyxy in ``image``'s pixels) drawn and labelled by its
    class name (``names[class]``) and score."""
    scale = PANEL / max(image.size)
    panel = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)
    draw, font = ImageDraw.Draw(panel), label_font(12)
    for n, (box, cls) in enumerate(zip(boxes, classes, strict=True)):
        colour = COLOURS[cls % len(COLOURS)]
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        text = names[cls] if scores is None else f"{names[cls]} {scores[n]:.2f}"
        left, top, right, bottom = draw.textbbox((x0 + 2, y0 + 1), text, font=font)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=colour)
        draw.text((x0 + 2, y0 + 1), text, fill="white", font=font)
    return panel


def grid_size(rows: int, columns: int) -> Tuple[int, int]:
    """The picture's (width, height) for ``rows`` x ``columns`` panels under a title line."""
    return columns * PANEL + (columns - 1) * _GAP, TITLE_HEIGHT + rows * PANEL + (rows - 1) * _GAP


def save_grid(rows: List[List[Image.Image]], titles: Sequence[str], path: Path) -> Path:
    """A PNG of ``rows`` of panels (each at most :data:`PANEL` px), one title per column above them."""
    columns = len(titles)
    picture = Image.new("RGB", grid_size(len(rows), columns), "white")
    draw, font = ImageDraw.Draw(picture), label_font(14)
    for c, title in enumerate(titles):
        draw.text((c * (PANEL + _GAP) + 4, 3), title, fill="black", font=font)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            picture.paste(panel, (c * (PANEL + _GAP), TITLE_HEIGHT + r * (PANEL + _GAP)))
    picture.save(path)
    return path


def start_demo(name: str, output: Union[str, Path], overwrite: bool, recipe: Dict[str, Any],
               recipe_changes: Dict[str, Any], seed: int, data_dir: Optional[str], log: Callable[[str], None]
               ) -> Tuple[Dict[str, Any], Path, Path, Path]:
    """A demo's first steps, the same for each task: check ``recipe_changes`` against the demo's ``recipe``,
    claim ``output`` and write the mosaics into ``output/mosaic``. Returns the recipe in force, the output
    folder, the mosaic folder and the run folder (``output/run``)."""
    from .mosaic import write_mosaic

    unknown = sorted(set(recipe_changes) - set(recipe))
    if unknown:
        raise TypeError(f"{name}() got unknown recipe entries {unknown}; known: {sorted(recipe)}")
    recipe = {**recipe, **recipe_changes}
    out = prepare_output(output, overwrite)
    mosaic, run = out / "mosaic", out / "run"
    log(f"writing {recipe['train_images']} + {recipe['val_images']} Fashion-MNIST mosaics of {recipe['img_size']} px "
        f"to {mosaic}")
    write_mosaic(mosaic, recipe["train_images"], recipe["val_images"], size=recipe["img_size"], seed=seed,
                 data_dir=data_dir, overwrite=True)
    return recipe, out, mosaic, run


def mosaic_description(recipe: Dict[str, Any]) -> str:
    """The val set a demo's figures were measured on, as its line and the card name it."""
    return (f"Fashion-MNIST mosaics, {recipe['val_images']} val images of {recipe['img_size']} px "
            "(items from Fashion-MNIST's test split)")

"""``wszoo segment demo``: a GN+WS DeepLabv3 trained here, in about two minutes on 2 CPU cores, and shown working.

No segmenter weights ship with wszoo (a useful one is far over the package's size budget: the demo's own
DeepLabv3 on ResNet-18 is a 64 MB safetensors file), so the demo makes
them: it writes a small Fashion-MNIST mosaic set (:func:`wszoo.tools.mosaic.write_mosaic`; 11 classes: the 10
Fashion-MNIST categories and the background), trains DeepLabv3 on a WS backbone from random weights on it with
the training engine (:func:`wszoo.segmentation.segment_train`) for a short fixed recipe, scores the trained
weights on the held-out val canvases (items from Fashion-MNIST's test split) and draws its masks on a few of
them beside the ground truth.

Example::

    from wszoo.segmentation.demo import segment_demo

    result = segment_demo("wszoo-segment-demo")   # about two minutes on 2 CPU cores
    result["mIoU"], result["picture"]
"""
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..tools.showcase import PANEL, label_font, mosaic_description, save_grid, start_demo
from ..training.data import FASHION_MNIST_CLASSES
from .data import IMAGES, MASKS, EvalTransform, read_split
from .saved import load_segmenter, segment_eval
from .training import SegmentTrainConfig, segment_train

__all__ = ["segment_demo", "DEMO_RECIPE", "PICTURE", "SHOWN", "CLASS_NAMES"]

#: the fixed recipe: canvases, their side, and the training run (DeepLabv3, random start)
DEMO_RECIPE: Dict[str, Any] = {"train_images": 400, "val_images": 100, "img_size": 64, "epochs": 8,
                               "batch_size": 8, "lr": 0.05, "warmup_iters": 10, "backbone": "resnet18_gn_ws",
                               "output_stride": 16}
PICTURE = "predictions.png"
SHOWN = 4
CLASS_NAMES = ["background"] + list(FASHION_MNIST_CLASSES)


def _train_config(mosaic: Path, run: Path, recipe: Dict[str, Any], seed: int) -> SegmentTrainConfig:
    """Trained without a val split (best/ is then the lowest-loss epoch): the demo scores ``last/`` once, at the end."""
    return SegmentTrainConfig(
        data_dir=str(mosaic), num_classes=len(CLASS_NAMES), val_split=None, backbone=recipe["backbone"],
        pretrained_backbone=False, output_stride=recipe["output_stride"], img_size=recipe["img_size"],
        epochs=recipe["epochs"], batch_size=recipe["batch_size"], lr=recipe["lr"],
        warmup_iters=recipe["warmup_iters"], seed=seed, output=str(run), overwrite=True, log_interval=0)


def _overlay(image: Image.Image, mask: np.ndarray, palette: List[int]) -> Image.Image:
    """``mask``'s classes in their palette colours over ``image`` (background left clear), each class named once."""
    coloured = Image.fromarray(mask.astype(np.uint8), "P")
    coloured.putpalette(palette)
    blended = Image.blend(image.convert("RGB"), coloured.convert("RGB"), 0.55)
    shown = Image.composite(blended, image.convert("RGB"), Image.fromarray((mask > 0).astype(np.uint8) * 255))
    panel = shown.resize((PANEL, PANEL), Image.NEAREST)
    draw, font, scale = ImageDraw.Draw(panel), label_font(12), PANEL / mask.shape[0]
    for cls in np.unique(mask):
        if cls == 0 or cls >= len(CLASS_NAMES):
            continue
        ys, xs = np.nonzero(mask == cls)
        draw.text((xs.mean() * scale, ys.mean() * scale), CLASS_NAMES[cls], fill="white", font=font, anchor="mm",
                  stroke_width=2, stroke_fill="black")
    return panel


@torch.no_grad()
def _picture(checkpoint: Path, mosaic: Path, path: Path, shown: int) -> Path:
    """Image | ground truth | prediction, on the first ``shown`` val canvases."""
    model, config = load_segmenter(str(checkpoint))
    model.eval()
    transform = EvalTransform(config["img_size"], config["mean"], config["std"])
    rows = []
    for image_id in read_split(mosaic, "val")[:shown]:
        with Image.open(mosaic / IMAGES / f"{image_id}.jpg") as img:
            image = img.convert("RGB")
        with Image.open(mosaic / MASKS / f"{image_id}.png") as m:
            truth, palette = np.array(m), m.getpalette()
        x, _ = transform(image, Image.fromarray(truth))
        logits = model(x[None])["out"]
        if logits.shape[-2:] != truth.shape:
            logits = torch.nn.functional.interpolate(logits, size=truth.shape, mode="bilinear", align_corners=False)
        predicted = logits[0].argmax(0).numpy()
        rows.append([image.resize((PANEL, PANEL), Image.NEAREST), _overlay(image, truth, palette),
                     _overlay(image, predicted, palette)])
    return save_grid(rows, ["image", "ground truth", "predicted"], path)


def segment_demo(output: Union[str, Path] = "wszoo-segment-demo", *, seed: int = 0, overwrite: bool = False,
                 data_dir: Optional[str] = None, log: Callable[[str], None] = print,
                 **recipe_changes: Any) -> Dict[str, Any]:
    """Write the mosaics to ``output/mosaic``, train the demo's segmenter into ``output/run``, score ``run/last``
    on the val canvases and draw ``output/predictions.png``; returns the figures (``mIoU``, ``pixel_acc``,
    ``IoU`` per class, percent), ``dataset``, ``picture``, ``checkpoint`` and ``seconds``. ``recipe_changes``
    override :data:`DEMO_RECIPE` entries (a smaller run for tests); ``data_dir``: where Fashion-MNIST lies."""
    start = time.perf_counter()
    recipe, out, mosaic, run = start_demo("segment_demo", output, overwrite, DEMO_RECIPE, recipe_changes, seed,
                                          data_dir, log)
    log(f"training DeepLabv3 on {recipe['backbone']} (output stride {recipe['output_stride']}) from random weights "
        f"for {recipe['epochs']} epochs into {run}")
    segment_train(_train_config(mosaic, run, recipe, seed))
    checkpoint = run / "last"
    metrics = segment_eval(str(checkpoint), str(mosaic), "val", device=torch.device("cpu"))
    picture = _picture(checkpoint, mosaic, out / PICTURE, SHOWN)
    dataset = mosaic_description(recipe)
    result = {"mIoU": metrics["mIoU"], "pixel_acc": metrics["pixel_acc"], "IoU": metrics["IoU"], "dataset": dataset,
              "picture": str(picture), "checkpoint": str(checkpoint),
              "seconds": round(time.perf_counter() - start, 1), "recipe": recipe}
    log(f"{dataset}: mIoU {metrics['mIoU']:.1f}, pixel accuracy {metrics['pixel_acc']:.1f}")
    log(f"picture of predictions on {min(SHOWN, recipe['val_images'])} val images: {picture}")
    log(f"score it again: wszoo segment eval --checkpoint {checkpoint} --data-dir {mosaic}")
    return result

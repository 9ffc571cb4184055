"""``wszoo detect demo``: a GN+WS detector trained here, in about two minutes on 2 CPU cores, and shown working.

No detector weights ship with wszoo (a useful one is far over the package's size budget: the demo's own Faster
R-CNN on ResNet-18 is a 119 MB safetensors file, 29.6M parameters in float32), so the demo makes them: it
writes a small Fashion-MNIST mosaic set (:func:`wszoo.tools.mosaic.write_mosaic`), trains a Faster R-CNN on
``resnet18_gn_ws`` from random weights on it with the training engine (as :func:`wszoo.detection.detect_train`
does) for a short fixed recipe, scores the trained weights on the held-out val canvases (items from
Fashion-MNIST's test split) with pycocotools, and draws its detections on a few of them beside the ground truth.

Example::

    from wszoo.detection.demo import detect_demo

    result = detect_demo("wszoo-detect-demo")     # about two minutes on 2 CPU cores
    result["bbox_AP50"], result["picture"]
"""
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch

from ..tools.showcase import draw_boxes, mosaic_description, save_grid, start_demo
from ..training.engine import train
from .coco import CocoDetection
from .saved import detect_eval, load_detector
from .training import DetectionTask, DetectTrainConfig

__all__ = ["detect_demo", "DEMO_RECIPE", "PICTURE", "SHOWN", "TOP_SHOWN", "MIN_SCORE"]

#: the fixed recipe: canvases, their side, and the training run (Faster R-CNN on resnet18_gn_ws, random start)
DEMO_RECIPE: Dict[str, Any] = {"train_images": 400, "val_images": 50, "img_size": 64, "epochs": 2,
                               "batch_size": 8, "lr": 0.02, "warmup_iters": 25, "rois_per_image": 32}
#: proposals the box head scores per image in evaluation (torchvision's 1000 cost 10x the time: a canvas holds <= 4)
TEST_PROPOSALS = 100
PICTURE = "predictions.png"
#: val images drawn in the picture, and the detections drawn on each: its best ones scored at least MIN_SCORE
SHOWN = 4
TOP_SHOWN = 3
MIN_SCORE = 0.05


def _train_config(mosaic: Path, run: Path, recipe: Dict[str, Any], seed: int) -> DetectTrainConfig:
    """Trained without a val set (best/ is then the lowest-loss epoch): the demo scores ``last/`` once, at the end."""
    return DetectTrainConfig(
        train_images=str(mosaic / "JPEGImages"), train_annotations=str(mosaic / "annotations/instances_train.json"),
        kind="fasterrcnn", backbone="resnet18_gn_ws", pretrained_backbone=False, frozen_stages=-1,
        min_size=recipe["img_size"], max_size=recipe["img_size"], rois_per_image=recipe["rois_per_image"],
        test_proposals=TEST_PROPOSALS,
        epochs=recipe["epochs"], batch_size=recipe["batch_size"], lr=recipe["lr"],
        warmup_iters=recipe["warmup_iters"], seed=seed, output=str(run), overwrite=True, log_interval=0)


@torch.no_grad()
def _picture(checkpoint: Path, mosaic: Path, path: Path, shown: int) -> Path:
    """Ground truth | the :data:`TOP_SHOWN` best detections (scored at least :data:`MIN_SCORE`), on the first
    ``shown`` val canvases."""
    from torchvision.transforms.functional import to_pil_image

    model, _ = load_detector(str(checkpoint))
    model.eval()
    val = CocoDetection(str(mosaic / "JPEGImages"), str(mosaic / "annotations/instances_val.json"))
    names = ["background"] + val.classes
    rows = []
    for index in range(min(shown, len(val))):
        image, target = val[index]
        output = model([image])[0]
        keep = (output["scores"] >= MIN_SCORE).nonzero()[:TOP_SHOWN, 0]  # (torchvision sorts them by score)
        pil = to_pil_image(image)
        rows.append([draw_boxes(pil, target["boxes"].tolist(), target["labels"].tolist(), names),
                     draw_boxes(pil, output["boxes"][keep].tolist(), output["labels"][keep].tolist(), names,
                                output["scores"][keep].tolist())])
    return save_grid(rows, ["ground truth", f"predicted: best {TOP_SHOWN} (score >= {MIN_SCORE})"], path)


def detect_demo(output: Union[str, Path] = "wszoo-detect-demo", *, seed: int = 0, overwrite: bool = False,
                data_dir: Optional[str] = None, log: Callable[[str], None] = print,
                **recipe_changes: Any) -> Dict[str, Any]:
    """Write the mosaics to ``output/mosaic``, train the demo's detector into ``output/run``, score ``run/last``
    on the val canvases and draw ``output/predictions.png``; returns the figures (``bbox_AP``, ``bbox_AP50``,
    percent), ``dataset``, ``picture``, ``checkpoint`` and ``seconds``. ``recipe_changes`` override
    :data:`DEMO_RECIPE` entries (a smaller run for tests); ``data_dir``: where Fashion-MNIST lies."""
    start = time.perf_counter()
    recipe, out, mosaic, run = start_demo("detect_demo", output, overwrite, DEMO_RECIPE, recipe_changes, seed, data_dir,
                                          log)
    log(f"training a Faster R-CNN on resnet18_gn_ws from random weights for {recipe['epochs']} epochs into {run}")
    config = _train_config(mosaic, run, recipe, seed)
    train(DetectionTask(config), config)
    checkpoint = run / "last"
    images, annotations = mosaic / "JPEGImages", mosaic / "annotations/instances_val.json"
    box = detect_eval(str(checkpoint), str(images), str(annotations))["bbox"]
    picture = _picture(checkpoint, mosaic, out / PICTURE, SHOWN)
    dataset = mosaic_description(recipe)
    result = {"bbox_AP": box["AP"], "bbox_AP50": box["AP50"], "dataset": dataset, "picture": str(picture),
              "checkpoint": str(checkpoint), "seconds": round(time.perf_counter() - start, 1), "recipe": recipe}
    log(f"{dataset}: box AP {box['AP']:.1f}, AP50 {box['AP50']:.1f}")
    log(f"picture of predictions on {min(SHOWN, recipe['val_images'])} val images: {picture}")
    log(f"score it again: wszoo detect eval --checkpoint {checkpoint} --images {images} --annotations {annotations}")
    return result

"""The micro-batch study for detection (``wszoo study detection``): the WS paper's central claim for detectors,
measured on the Fashion-MNIST mosaics (:mod:`wszoo.tools.mosaic`).

One detector (a Faster or Mask R-CNN on ResNet-18 with an FPN and the 4conv1fc box head, trained from random
weights) in three forms that differ only in normalization: BatchNorm (trainable, batch statistics in training,
running statistics in evaluation, in the backbone, the FPN and the heads, where torchvision's ``_v2`` detectors
put it), GroupNorm(32) in the same places, and GroupNorm + WS (``resnet18_gn_ws`` with wszoo's GN+WS neck and
heads, the authors' WS formula). The BN and GN forms are the GN+WS detector with every WS conv made a plain conv
on the same weights, and every GroupNorm a BatchNorm for BN: the three start from the same random weights.

Each form is trained at each batch size by the training engine (:func:`wszoo.training.engine.train`, through
:class:`wszoo.detection.DetectionTask`), every run seeing the same images, flips and order (the engine seeds an
epoch's shuffle and flips from the seed alone; each run records a digest of what it saw), for the same epochs,
with the learning rate scaled linearly from ``lr`` at 8 images a batch and the warmup counted in images. Box (and
mask) AP by pycocotools on the held-out val mosaics (items from Fashion-MNIST's test split) after the last epoch.
"""
import hashlib
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers import is_ws_layer, replace_modules
from ..training.data import FASHION_MNIST_DIR
from ..training.engine import train
from ..training.run_dir import TrainingDiverged
from .coco import CocoDetection
from .detectors import build_detector
from .training import DetectionTask, DetectTrainConfig

__all__ = ["NORMS", "BACKBONE", "REFERENCE_BATCH", "with_normalization", "detection_study", "format_table"]

NORMS = ("bn", "gn", "gn_ws")
BACKBONE = "resnet18_gn_ws"
#: ``lr`` is the learning rate at this many images a batch; other batch sizes scale it linearly
REFERENCE_BATCH = 8
#: proposals the box head scores per image in evaluation (torchvision's default 1000: a canvas holds at most 4 items)
TEST_PROPOSALS = 100


def _plain_conv(layer: nn.Conv2d) -> nn.Conv2d:
    """A plain conv of ``layer``'s shape computing on its raw weights (shared, not copied)."""
    plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                      padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                      bias=layer.bias is not None, padding_mode=layer.padding_mode, device="meta")
    plain.weight, plain.bias = layer.weight, layer.bias
    return plain.train(layer.training)


def _batchnorm(norm: nn.GroupNorm) -> nn.BatchNorm2d:
    """A trainable BatchNorm2d of ``norm``'s width sharing its affine parameters (both start at 1 and 0)."""
    bn = nn.BatchNorm2d(norm.num_channels, eps=norm.eps, affine=norm.affine)
    if norm.affine:
        bn.weight, bn.bias = norm.weight, norm.bias
    return bn.train(norm.training)


def with_normalization(model: nn.Module, norm: str) -> nn.Module:
    """``model`` (a GN+WS detector) in the study's form ``norm``: ``gn_ws`` as it is, ``gn`` with every WS conv a
    plain conv on the same weights, ``bn`` with that and every GroupNorm a BatchNorm2d. Changed in place."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")
    if norm in ("gn", "bn"):
        if any(is_ws_layer(m) and not isinstance(m, nn.Conv2d) for m in model.modules()):
            raise ValueError("with_normalization makes plain convs only: the model has WS layers other than convs")
        replace_modules(model, lambda name, m: _plain_conv(m) if is_ws_layer(m) else None)
    if norm == "bn":
        replace_modules(model, lambda name, m: _batchnorm(m) if isinstance(m, nn.GroupNorm) else None)
    return model


class _StudyTask(DetectionTask):
    """Detection with the study's detector in one normalization; records each micro-batch's loss and a digest
    of the images (ids and boxes, so flips count) in the order seen, and validates after the last epoch only."""

    def __init__(self, config: DetectTrainConfig, norm: str) -> None:
        super().__init__(config)
        self.norm = norm
        self.losses: List[Tuple[int, float]] = []
        self.seen = hashlib.sha256()
        self.epochs_validated = 0

    def build(self) -> Tuple[nn.Module, CocoDetection]:
        config = self.config
        train_set = self._datasets()
        detector_kwargs = self.detector_kwargs()
        categories = dict(zip(train_set.category_ids, train_set.classes, strict=True))
        self.build_args = {"kind": config.kind, "backbone": config.backbone, "num_classes": train_set.num_classes,
                           "detector_kwargs": detector_kwargs, "categories": categories, "norm": self.norm}
        model = build_detector(config.kind, config.backbone, train_set.num_classes, pretrained_backbone=False,
                               frozen_stages=-1, group_ws="auto" if self.norm == "gn_ws" else False,
                               **detector_kwargs)
        return with_normalization(model, self.norm), train_set

    def loss(self, model: nn.Module, batch: Any) -> Tuple[torch.Tensor, int]:
        for target in batch[1]:
            self.seen.update(f"{int(target['image_id'])}:".encode() + target["boxes"].cpu().numpy().tobytes())
        loss, samples = super().loss(model, batch)
        self.losses.append((samples, float(loss.detach())))
        return loss, samples

    def validate(self, model: nn.Module, device: torch.device) -> Dict[str, Any]:
        self.epochs_validated += 1
        return super().validate(model, device) if self.epochs_validated == self.config.epochs else {}


def _curve(losses: List[Tuple[int, float]], points: int) -> List[List[float]]:
    """[images seen, mean loss of the images since the previous point], about ``points`` of them."""
    total = sum(n for n, _ in losses)
    every = max(1, total // points)
    curve, seen, window, count = [], 0, 0.0, 0
    for n, loss in losses:
        seen, window, count = seen + n, window + loss * n, count + n
        if count >= every:
            curve.append([seen, window / count])
            window, count = 0.0, 0
    if count:
        curve.append([seen, window / count])
    return curve


def _run(norm: str, batch_size: int, settings: Dict[str, Any], mosaic: Path, work: Path) -> Dict[str, Any]:
    """Train one (norm, batch size) arm in ``work`` and return what the study reports of it."""
    annotations = mosaic / "annotations"
    lr = settings["lr_at_8"] * batch_size / REFERENCE_BATCH
    config = DetectTrainConfig(
        train_images=str(mosaic / "JPEGImages"), train_annotations=str(annotations / "instances_train.json"),
        val_annotations=str(annotations / "instances_val.json"), kind=settings["kind"], backbone=BACKBONE,
        pretrained_backbone=False, frozen_stages=-1, min_size=settings["img_size"], max_size=settings["img_size"],
        rois_per_image=settings["rois_per_image"], test_proposals=TEST_PROPOSALS, epochs=settings["epochs"],
        batch_size=batch_size, lr=lr,
        warmup_iters=math.ceil(settings["warmup_images"] / batch_size), seed=settings["seed"],
        output=str(work / f"{norm}_b{batch_size}"), log_interval=0)
    task = _StudyTask(config, norm)
    result: Dict[str, Any] = {"lr": lr, "diverged": None}
    try:
        metrics = train(task, config)
    except TrainingDiverged as e:  # BatchNorm at batch 1 may: a result of the study, not an error
        metrics = {}
        result["diverged"] = str(e)
    steps = settings["epochs"] * math.ceil(settings["train_images"] / batch_size)
    result.update({k: v for k, v in metrics.items() if k.startswith(("bbox_", "segm_"))})
    result.update({"train_loss": metrics.get("train_loss"), "steps": steps,
                   "images_seen": sum(n for n, _ in task.losses), "images_digest": task.seen.hexdigest(),
                   "train_seconds": round(sum(s for s in _epoch_seconds(config.output)), 1),
                   "val_seconds": metrics.get("val_seconds"), "curve": _curve(task.losses, 50)})
    return result


def _epoch_seconds(run_dir: str) -> List[float]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["train_seconds"] for line in path.read_text().splitlines() if line.strip()]


def detection_study(
    data_dir: str = FASHION_MNIST_DIR,
    batch_sizes: Sequence[int] = (1, 8),
    norms: Sequence[str] = NORMS,
    train_images: int = 800,
    val_images: int = 200,
    img_size: int = 64,
    epochs: int = 4,
    lr: float = 0.02,
    kind: str = "fasterrcnn",
    rois_per_image: int = 32,
    warmup_images: int = 200,
    seed: int = 0,
    output: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Make the mosaic set (``train_images`` + ``val_images`` canvases of ``img_size`` px from the Fashion-MNIST
    in ``data_dir``) and train every (norm, batch size) arm on it; returns ``{"settings": ..., "runs": {norm:
    {batch: result}}}`` with each arm's COCO AP (%), loss curve and the digest of the images it saw. With
    ``output``: ``detection.json``, ``detection.md`` (the table), ``detection_loss.png`` and the set (``mosaic/``)."""
    from ..tools.mosaic import write_mosaic

    unknown = [n for n in norms if n not in NORMS]
    if unknown:
        raise ValueError(f"unknown norms {unknown}; choose from {', '.join(NORMS)}")
    if kind not in ("fasterrcnn", "maskrcnn"):
        raise ValueError(f"the study trains a fasterrcnn or a maskrcnn (the R-CNN heads carry the norm), not {kind!r}")
    settings = {"train_images": train_images, "val_images": val_images, "img_size": img_size, "epochs": epochs,
                "lr_at_8": lr, "kind": kind, "backbone": BACKBONE, "rois_per_image": rois_per_image,
                "warmup_images": warmup_images, "seed": seed, "batch_sizes": list(batch_sizes), "norms": list(norms),
                "test_proposals": TEST_PROPOSALS}
    runs: Dict[str, Dict[int, Dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="wszoo-study-") as scratch:
        mosaic = Path(output) / "mosaic" if output else Path(scratch) / "mosaic"
        mosaic.parent.mkdir(parents=True, exist_ok=True)
        write_mosaic(mosaic, train_images, val_images, size=img_size, seed=seed, data_dir=data_dir, overwrite=True)
        for norm in norms:
            for bs in batch_sizes:
                res = runs.setdefault(norm, {})[bs] = _run(norm, bs, settings, mosaic, Path(scratch))
                ap = "diverged" if res["diverged"] else f"box AP {res['bbox_AP']:.2f} (AP50 {res['bbox_AP50']:.2f})"
                log(f"{norm:6s} batch {bs:2d}: {ap}  ({res['steps']} steps, {res['train_seconds']}s)")
                if output:  # arms so far, so that a stopped study keeps what it measured
                    _write_json(Path(output) / "detection.partial.json", {"settings": settings, "runs": runs})
    study = {"settings": settings, "runs": runs}
    if output:
        out = Path(output)
        _write_json(out / "detection.json", study)
        (out / "detection.partial.json").unlink(missing_ok=True)
        (out / "detection.md").write_text(format_table(study) + "\n")
        _plot(study, out / "detection_loss.png")
    return study


def _write_json(path: Path, study: Dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(study, indent=1) + "\n")
    tmp.replace(path)


def _cell(run: Dict[str, Any], kind: str) -> str:
    if run["diverged"]:
        return "diverged"
    return f"{run[f'{kind}_AP']:.1f} / {run[f'{kind}_AP50']:.1f}"


def format_table(study: Dict[str, Any]) -> str:
    """Markdown: one row per norm, one column per batch size, ``AP / AP50`` (%) of boxes (and masks)."""
    sizes = study["settings"]["batch_sizes"]
    kinds = ["bbox"] + (["segm"] if study["settings"]["kind"] == "maskrcnn" else [])
    header = [f"{'box' if k == 'bbox' else 'mask'} AP / AP50, batch {b}" for k in kinds for b in sizes]
    lines = ["| norm | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for norm, runs in study["runs"].items():
        lines.append(f"| {norm} | " + " | ".join(_cell(runs[b], k) for k in kinds for b in sizes) + " |")
    return "\n".join(lines)


def _plot(study: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = study["settings"]
    sizes = settings["batch_sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 3.6), sharey=True, squeeze=False)
    for ax, bs in zip(axes[0], sizes, strict=True):
        for norm, runs in study["runs"].items():
            curve = runs[bs]["curve"]
            label = "diverged" if runs[bs]["diverged"] else f"box AP {runs[bs]['bbox_AP']:.1f}"
            ax.plot([c[0] for c in curve], [c[1] for c in curve], label=f"{norm} ({label})")
        ax.set_title(f"batch {bs}")
        ax.set_xlabel("training images seen")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("training loss (detector's losses summed)")
    fig.suptitle(f"Fashion-MNIST mosaics, {settings['kind']} on ResNet-18 from scratch: loss by normalizer "
                 "(val box AP in legend)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

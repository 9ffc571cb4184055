"""A trained detector on disk: ``model.safetensors`` with ``detector.json`` (the :func:`build_detector`
arguments that rebuild it, and the dataset's categories), so evaluating it (``wszoo detect eval``,
:func:`detect_eval`) needs only the folder."""
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch.nn as nn

from ..task_folder import load_task_folder, save_task_folder
from .coco import CocoDetection, coco_evaluate
from .detectors import build_detector

__all__ = ["save_detector", "load_detector", "detect_eval", "format_ap", "DETECTOR_CONFIG"]

DETECTOR_CONFIG = "detector.json"


def save_detector(model: nn.Module, directory: Path, build_args: Dict[str, Any]) -> None:
    """``model.safetensors`` and ``detector.json`` (the :func:`build_detector` arguments), each atomically."""
    save_task_folder(model, directory, DETECTOR_CONFIG, build_args, "detector")


def load_detector(directory: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a detector saved by :func:`save_detector` and load its trained weights. The skeleton is built
    without published weights and without freezing; build_detector's line about that start is not logged
    (it would describe weights that are replaced at once), one line about the loaded ones is."""
    return load_task_folder(directory, DETECTOR_CONFIG, "detector", "wszoo detect train",
                            lambda build_args: _build_saved(build_args, pretrained_backbone=False))


def _build_saved(build_args: Dict[str, Any], pretrained_backbone: Optional[bool], frozen_stages: Optional[int] = -1
                ) -> nn.Module:
    """The detector that ``build_args`` (``detector.json``) describes."""
    return build_detector(build_args["kind"], build_args["backbone"], build_args["num_classes"],
                          pretrained_backbone=pretrained_backbone, frozen_stages=frozen_stages,
                          **build_args.get("detector_kwargs", {}))


def detect_eval(checkpoint: str, images: str, annotations: str, batch_size: int = 2
                ) -> Dict[str, Dict[str, Optional[float]]]:
    """COCO box (and mask) AP (%, by pycocotools) of the detector saved in the folder ``checkpoint`` (a run's
    ``best/`` or ``last/``) on the images in ``images`` with the COCO instances json ``annotations``
    (``wszoo detect eval``)."""
    model, build_args = load_detector(checkpoint)
    dataset = CocoDetection(images, annotations, masks=build_args["kind"] == "maskrcnn")
    saved = {int(k): v for k, v in build_args.get("categories", {}).items()}
    if saved and list(saved) != dataset.category_ids:
        raise ValueError(f"{annotations} has categories {dataset.category_ids}; the detector was trained on "
                         f"{list(saved)}")
    return coco_evaluate(model, dataset, batch_size=batch_size)


def format_ap(results: Dict[str, Dict[str, Optional[float]]]) -> str:
    """``bbox: AP 12.3  AP50 30.1 ...`` lines."""
    return "\n".join(f"{kind}: " + "  ".join(f"{k} {'n/a' if v is None else format(v, '.2f')}"
                                             for k, v in stats.items())
                     for kind, stats in results.items())


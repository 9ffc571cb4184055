"""A trained detector on disk: ``model.safetensors`` with ``detector.json`` (the :func:`build_detector`
arguments that rebuild it, and the dataset's categories), so evaluating it (``wszoo detect eval``,
:func:`detect_eval`) needs only the folder."""
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch.nn as nn
from safetensors.torch import save_file

from ..checkpoint import load_checkpoint, non_finite_tensors
from ..files import atomic_path, atomic_write_text
from .coco import CocoDetection, coco_evaluate
from .detectors import build_detector

__all__ = ["save_detector", "load_detector", "detect_eval", "format_ap", "DETECTOR_CONFIG"]

_logger = logging.getLogger("wszoo")
DETECTOR_CONFIG = "detector.json"
WEIGHTS = "model.safetensors"


def save_detector(model: nn.Module, directory: Path, build_args: Dict[str, Any]) -> None:
    """``model.safetensors`` and ``detector.json`` (the :func:`build_detector` arguments), each atomically."""
    bad = non_finite_tensors(model.state_dict())
    if bad:
        raise ValueError(f"refusing to save a detector with non-finite values (NaN/Inf) in {', '.join(bad[:5])}")
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / DETECTOR_CONFIG, json.dumps(build_args, indent=2) + "\n")
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp,
                  metadata={"format": "pt", "detector": build_args["kind"], "backbone": build_args["backbone"]})


class _Silenced(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def load_detector(directory: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a detector saved by :func:`save_detector` and load its trained weights. The skeleton is built
    without published weights and without freezing; build_detector's line about that start is not logged
    (it would describe weights that are replaced at once), one line about the loaded ones is."""
    config_path = Path(directory) / DETECTOR_CONFIG
    if not config_path.is_file():
        raise ValueError(f"{directory} has no {DETECTOR_CONFIG}: not a detector saved by wszoo detect train")
    try:
        build_args = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{config_path} is not readable JSON: {e}") from e
    silenced = _Silenced()
    _logger.addFilter(silenced)
    try:
        model = _build_saved(build_args, pretrained_backbone=False)
    finally:
        _logger.removeFilter(silenced)
    weights = Path(directory) / WEIGHTS
    load_checkpoint(model, str(weights))
    _logger.info("%s on %s: trained weights from %s", build_args["kind"], build_args["backbone"], weights)
    return model, build_args


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


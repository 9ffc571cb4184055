"""Detection with WS backbones: torchvision's detectors with GN+WS necks and heads. The segmenter
(``build_segmenter``, ``WSDeepLabV3``) lives in :mod:`wszoo.segmentation`; it is still importable from here."""
from typing import Any

from ..layers import batchnorm_to_groupnorm
from .backbone import WSBackboneWithFPN, create_backbone
from .detectors import DETECTORS, build_detector
from .saved import detect_eval, format_ap, load_detector, save_detector
from .training import DetectionTask, DetectTrainConfig, detect_train

__all__ = ["DETECTORS", "WSBackboneWithFPN", "WSDeepLabV3", "batchnorm_to_groupnorm", "build_detector",
           "build_segmenter", "create_backbone", "DetectTrainConfig", "DetectionTask", "detect_train", "detect_eval",
           "format_ap", "load_detector", "save_detector"]


def __getattr__(name: str) -> Any:
    """``from wszoo.detection import build_segmenter`` as before the segmenter moved: imported on first use
    (:mod:`wszoo.segmentation` builds on this package's backbones, so it cannot be imported at its top)."""
    if name in ("build_segmenter", "WSDeepLabV3"):
        from ..segmentation import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

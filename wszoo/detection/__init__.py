"""Detection and segmentation with WS backbones: torchvision's detectors with GN+WS necks and heads."""
from .backbone import WSBackboneWithFPN, create_backbone
from .detectors import DETECTORS, build_detector
from .saved import detect_eval, format_ap, load_detector, save_detector
from .segmentation import WSDeepLabV3, batchnorm_to_groupnorm, build_segmenter
from .training import DetectionTask, DetectTrainConfig, detect_train

__all__ = ["DETECTORS", "WSBackboneWithFPN", "WSDeepLabV3", "batchnorm_to_groupnorm", "build_detector",
           "build_segmenter", "create_backbone", "DetectTrainConfig", "DetectionTask", "detect_train", "detect_eval",
           "format_ap", "load_detector", "save_detector"]

"""Detection and segmentation with WS backbones: torchvision's detectors with GN+WS necks and heads."""
from .backbone import WSBackboneWithFPN, create_backbone
from .detectors import DETECTORS, build_detector
from .segmentation import WSDeepLabV3, batchnorm_to_groupnorm, build_segmenter

__all__ = ["DETECTORS", "WSBackboneWithFPN", "WSDeepLabV3", "batchnorm_to_groupnorm", "build_detector",
           "build_segmenter", "create_backbone"]

"""Semantic segmentation with WS backbones: DeepLabv3 with a GN+WS ASPP head (:func:`build_segmenter`),
VOC-layout data (:mod:`.data`), mIoU from a confusion matrix (:mod:`.metrics`), training on the shared loop
(:func:`segment_train`, ``wszoo segment train``) and a saved segmenter's evaluation (:func:`segment_eval`,
``wszoo segment eval``)."""
from .data import IGNORE_INDEX, EvalTransform, TrainTransform, VOCSegmentation, check_masks
from .metrics import confusion_matrix, evaluate_segmenter, format_metrics, segmentation_metrics
from .model import WSDeepLabV3, build_segmenter
from .saved import load_segmenter, save_segmenter, segment_eval
from .training import SegmentationTask, SegmentTrainConfig, segment_train

__all__ = ["build_segmenter", "WSDeepLabV3", "VOCSegmentation", "TrainTransform", "EvalTransform", "IGNORE_INDEX",
           "check_masks", "confusion_matrix", "segmentation_metrics", "evaluate_segmenter", "format_metrics",
           "SegmentTrainConfig", "SegmentationTask", "segment_train", "save_segmenter", "load_segmenter",
           "segment_eval"]

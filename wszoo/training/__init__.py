"""Training: one loop (:mod:`wszoo.training.engine`) for every task, configured by dataclasses
(:class:`TrainConfig` and each task's subclass). Classification is :func:`finetune`
(:class:`FinetuneConfig`); detection is :func:`wszoo.detection.detect_train`
(:class:`wszoo.detection.DetectTrainConfig`)."""
from ..run_dir import TrainingDiverged, TrainingInterrupted
from .classification import ClassificationTask, FinetuneConfig, finetune
from .config import TrainConfig
from .engine import Task, train, warmup_cosine

__all__ = ["TrainConfig", "FinetuneConfig", "ClassificationTask", "Task", "finetune", "train", "warmup_cosine",
           "TrainingDiverged", "TrainingInterrupted"]

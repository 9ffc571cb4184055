"""The training application: one loop (:mod:`wszoo.training.engine`) for every task, configured by dataclasses
(:class:`TrainConfig` and each task's subclass). Classification is :func:`finetune`
(:class:`FinetuneConfig`); detection is :func:`wszoo.detection.detect_train`
(:class:`wszoo.detection.DetectTrainConfig`). Beside it: ``state`` (resume checks, the epoch commit),
``run_dir`` (the run directory's atomic commits), ``epochs`` (per-epoch seeding), ``data`` (datasets and
transforms), ``evaluate``, ``distributed`` (torchrun helpers) and ``study`` (the micro-batch study)."""
from .classification import ClassificationTask, FinetuneConfig, finetune
from .config import DensePredictionConfig, TrainConfig
from .engine import Task, train, warmup_cosine
from .run_dir import TrainingDiverged, TrainingInterrupted

__all__ = ["TrainConfig", "DensePredictionConfig", "FinetuneConfig", "ClassificationTask", "Task", "finetune", "train",
           "warmup_cosine", "TrainingDiverged", "TrainingInterrupted"]

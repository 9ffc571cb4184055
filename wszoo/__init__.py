"""wszoo: a timm-style model zoo for Weight Standardization architectures.

Fine-tuning from Python (the ``wszoo finetune`` command's settings, as :class:`FinetuneConfig` fields)::

    import wszoo

    metrics = wszoo.finetune(wszoo.FinetuneConfig(
        model="resnet_mini_gn_ws", dataset="fashion-mnist", data_dir="/usr/share/datasets/fashion-mnist",
        limit_train=512, limit_val=256, epochs=1, output="runs/fm"))
    model = wszoo.create_model("local-dir:runs/fm/best", pretrained=True)

Detection: :func:`wszoo.detection.detect_train` with :class:`wszoo.detection.DetectTrainConfig`.
"""
from . import hub, layers, models, optim  # importing models registers every architecture
from .checkpoint import CheckpointError, load_checkpoint
from .factory import create_model
from .hub import PretrainedWeightsError, push_to_hub, save_pretrained
from .layers.retrofit import ConversionReport, WSPolicy, convert_to_ws
from .registry import (
    UnknownModelError,
    get_pretrained_cfg,
    is_model,
    list_models,
    list_pretrained,
    register_model,
)
from .speed import accumulate_ws, fold_ws, group_ws, is_grouped, tune_cpu_allocator
from .tools.deploy import ExportError, export

__version__ = "0.1.0"

#: What ``wszoo.<name>`` finds in :mod:`wszoo.training`, imported on first use (it brings the data pipeline).
_TRAINING = ("FinetuneConfig", "TrainConfig", "TrainingDiverged", "TrainingInterrupted", "finetune")


def __getattr__(name: str):
    if name in _TRAINING:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'wszoo' has no attribute {name!r}")

__all__ = [
    "CheckpointError", "PretrainedWeightsError", "UnknownModelError", "create_model", "get_pretrained_cfg", "hub",
    "is_model", "layers", "list_models", "list_pretrained", "load_checkpoint", "models", "optim", "push_to_hub",
    "register_model", "save_pretrained", "accumulate_ws", "fold_ws", "group_ws", "is_grouped", "tune_cpu_allocator",
    "convert_to_ws",
    "ConversionReport", "WSPolicy", "export", "ExportError",
    "FinetuneConfig", "TrainConfig", "TrainingDiverged", "TrainingInterrupted", "finetune",
]

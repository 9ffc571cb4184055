"""wszoo: a timm-style model zoo for Weight Standardization architectures."""
from . import hub, layers, models, optim  # importing models registers every architecture
from .checkpoint import CheckpointError, load_checkpoint
from .deploy import ExportError, export
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

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "PretrainedWeightsError", "UnknownModelError", "create_model", "get_pretrained_cfg", "hub",
    "is_model", "layers", "list_models", "list_pretrained", "load_checkpoint", "models", "optim", "push_to_hub",
    "register_model", "save_pretrained", "accumulate_ws", "fold_ws", "group_ws", "is_grouped", "tune_cpu_allocator",
    "convert_to_ws",
    "ConversionReport", "WSPolicy", "export", "ExportError",
]

"""wszoo: a timm-style model zoo for Weight Standardization architectures."""
from . import hub, layers, models, optim
from .checkpoint import CheckpointError, load_checkpoint
from .hub import PretrainedWeightsError, push_to_hub, save_pretrained
from .layers.convert import ConversionReport, WSPolicy, convert_to_ws
from .speed import accumulate_ws, fold_ws, tune_cpu_allocator
from .registry import (
    UnknownModelError,
    create_model,
    get_pretrained_cfg,
    is_model,
    list_models,
    list_pretrained,
    register_model,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "PretrainedWeightsError", "UnknownModelError", "create_model", "get_pretrained_cfg", "hub",
    "is_model", "layers", "list_models", "list_pretrained", "load_checkpoint", "models", "optim", "push_to_hub",
    "register_model", "save_pretrained", "accumulate_ws", "fold_ws", "tune_cpu_allocator", "convert_to_ws",
    "ConversionReport", "WSPolicy",
]

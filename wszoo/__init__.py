"""wszoo: a timm-style model zoo for Weight Standardization architectures."""
from . import layers, models
from .checkpoint import CheckpointError, load_checkpoint
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
    "CheckpointError", "UnknownModelError", "create_model", "get_pretrained_cfg", "is_model", "layers",
    "list_models", "list_pretrained", "load_checkpoint", "models", "register_model",
]

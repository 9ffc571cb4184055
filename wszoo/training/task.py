"""What a task tells the training loop (:func:`wszoo.training.engine.train`): its model and data, what a batch
is and its loss, how to validate, the score that picks ``best/``, how a model directory is written and what
identifies a run. Classification and detection subclass it; a segmentation task is one more subclass."""
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..errors import Fix

__all__ = ["Task"]


class Task:
    """What one kind of training is; :func:`train` runs its epochs. Subclasses set the attributes below and
    implement the methods that raise ``NotImplementedError``."""

    #: the train state's key for the best score so far (kept per task: older run directories name it so)
    best_key = "best_score"
    #: the learning-rate factor at the first warmup step, rising linearly to 1; ``None``: ``1 / warmup``,
    #: reaching 1 on the last warmup step
    warmup_start: Optional[float] = None
    #: how a list of samples becomes a batch (``None``: PyTorch's default)
    collate_fn: Optional[Callable] = None

    def build(self) -> Tuple[nn.Module, Dataset]:
        """The model (on the CPU, seeded by the run's seed) and the training set."""
        raise NotImplementedError

    def identity(self) -> Dict[str, Any]:
        """What the run trains (the architecture, its classes): saved with each epoch; ``identity()["model"]``
        names it in messages."""
        raise NotImplementedError

    def check_same_run(self, saved: Dict[str, Any], resume_fix: Fix) -> None:
        """Refuse (a :class:`wszoo.errors.UsageError`) to resume a run whose ``saved`` identity differs."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
        """The optimizer's parameter groups; by default every trainable parameter, with weight decay."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """A batch from the loader, on ``device``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> Tuple[torch.Tensor, int]:
        """The batch's mean loss (``model`` may be the DDP wrapper) and how many samples it averages."""
        raise NotImplementedError

    def validate(self, model: nn.Module, device: torch.device) -> Dict[str, Any]:
        """Metrics of ``model`` (the EMA copy when there is one) on the validation set; ``{}`` without one.
        Called on every rank."""
        return {}

    def score(self, metrics: Dict[str, Any]) -> float:
        """Higher is better: the epoch with the highest is saved as ``best/``."""
        return -metrics["train_loss"]

    def save_model(self, model: nn.Module, directory: Path, measured: Optional[Dict[str, Any]],
                   epochs_done: int) -> None:
        """Write ``model`` to ``directory``; ``measured`` is the epoch's metrics when they were measured on this
        model (``None`` for the raw weights when an EMA copy was the one validated)."""
        raise NotImplementedError

    def describe(self, loader: DataLoader, world: int) -> Optional[str]:
        """A line logged when the training starts, or ``None``."""
        return None

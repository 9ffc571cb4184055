"""A trained detector's or segmenter's folder: ``model.safetensors`` beside a json of the arguments that rebuild
the model (``detector.json``, ``segmenter.json``), each written atomically, so evaluating needs only the folder.
The task modules (:mod:`wszoo.detection.saved`, :mod:`wszoo.segmentation.saved`) say what goes in the json and
how it rebuilds the model; this module writes, reads and loads."""
import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Tuple

import torch.nn as nn
from safetensors.torch import save_file

from .checkpoint import load_checkpoint, non_finite_tensors
from .files import atomic_path, atomic_write_text

__all__ = ["WEIGHTS", "save_task_folder", "load_task_folder"]

WEIGHTS = "model.safetensors"
_logger = logging.getLogger("wszoo")


def save_task_folder(model: nn.Module, directory: Path, config_name: str, config: Dict[str, Any], what: str
                     ) -> None:
    """``model``'s weights and ``config`` (with its ``kind`` and ``backbone``) in ``directory``; a model with a
    non-finite value is refused before anything is written. ``what``: ``'detector'``, ``'segmenter'``."""
    bad = non_finite_tensors(model.state_dict())
    if bad:
        raise ValueError(f"refusing to save a {what} with non-finite values (NaN/Inf) in {', '.join(bad[:5])}")
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / config_name, json.dumps(config, indent=2) + "\n")
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp,
                  metadata={"format": "pt", what: config["kind"], "backbone": config["backbone"]})


def load_task_folder(directory: str, config_name: str, what: str, command: str,
                     build: Callable[[Dict[str, Any]], nn.Module]) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model ``build(config)`` makes from the folder's json, with the folder's trained weights; one log line
    names them. The lines the build logs about its starting weights are not shown: the trained ones replace
    them at once. ``command`` (``'wszoo detect train'``) names what writes such folders in the error."""
    config_path = Path(directory) / config_name
    if not config_path.is_file():
        raise ValueError(f"{directory} has no {config_name}: not a {what} saved by {command}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{config_path} is not readable JSON: {e}") from e
    with _silenced(_logger):
        model = build(config)
    weights = Path(directory) / WEIGHTS
    load_checkpoint(model, str(weights))
    _logger.info("%s on %s: trained weights from %s", config["kind"], config["backbone"], weights)
    return model, config


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def _silenced(logger: logging.Logger) -> Iterator[None]:
    """No record of ``logger`` is emitted inside the block."""
    drop_all = _DropAll()
    logger.addFilter(drop_all)
    try:
        yield
    finally:
        logger.removeFilter(drop_all)

"""What a run keeps between epochs and across a resume: each epoch committed as one unit (the models, the
metrics so far, the optimizer, schedule, gradient scaler and EMA state: :mod:`wszoo.training.run_dir`), and resuming
from the last committed epoch after checking that the run being continued is this one."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from ..checkpoint import load_checkpoint, non_finite_tensors
from ..errors import Fix, UsageError
from .config import TrainConfig
from .distributed import is_main_process
from .run_dir import RunDirectory, TrainingDiverged, load_train_state, resume_fix, save_train_state
from .task import Task

__all__ = ["Run", "resume", "commit_epoch", "WEIGHTS"]

#: The weights file in a saved model directory (``last/``, ``best/``, ``ema/``), whatever the task.
WEIGHTS = "model.safetensors"


@dataclass
class Run:
    """Everything the epochs of one training run share."""

    task: Task
    config: TrainConfig
    model: nn.Module
    train_model: nn.Module  # the model, or its DDP wrapper
    loader: DataLoader  # its sampler, under DDP a DistributedSampler, and generator are seeded per epoch
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: Any
    clip_params: List[torch.Tensor]
    device: torch.device
    rank: int
    world: int
    use_accumulate_ws: bool


def _train_state_meta(run: Run, epoch: int, best: float) -> Dict[str, Any]:
    """What the run is (the task's identity, optimizer, lr, EMA, seed) and where it stands."""
    config = run.config
    return {"epoch": epoch, run.task.best_key: best, **run.task.identity(), "opt": config.opt, "lr": config.lr,
            "clip_mode": config.clip_mode, "clip_grad": config.clip_grad, "ema": run.ema is not None,
            "seed": config.seed, "grad_scaler": run.scaler.state_dict()}


def _check_resumable(meta: Dict[str, Any], run: Run, src: Path) -> None:
    """The run being resumed must be this one: the same task identity, optimizer, lr (the restored optimizer and
    schedule would silently keep the old one), EMA and seed (resume is exact: :mod:`wszoo.training.epochs`), and epochs
    left to train."""
    config, where = run.config, resume_fix(src)
    run.task.check_same_run(meta, where)
    if meta.get("opt", config.opt) != config.opt:
        raise UsageError("{resume}: that run used {opt}; resume it with the same optimizer", where,
                         Fix("opt", repr(meta["opt"])))
    if meta.get("lr", config.lr) != config.lr:
        raise UsageError("{resume}: that run used {lr}; resume it with the same {lr}{checkpoint}", where,
                         Fix("lr", f"{meta['lr']:g}"), Fix("checkpoint", repr(str(src / "last")),
                                                           phrase=" (for another, start a new run from {})"))
    _check_clipping(meta, config, where)
    if meta.get("ema", run.ema is not None) != (run.ema is not None):
        raise UsageError(f"{{resume}}: that run {'used' if meta['ema'] else 'did not use'} EMA; pass the same "
                         "{ema_decay}", where, Fix("ema_decay", None))
    if "seed" in meta and meta["seed"] != config.seed:  # (an older train state has none: it resumes, not exactly)
        raise UsageError("{resume}: that run used {seed}; resume it with the same {seed}", where,
                         Fix("seed", repr(meta["seed"])))
    if int(meta["epoch"]) + 1 >= config.epochs:
        raise UsageError(f"{{resume}}: epochs 0..{meta['epoch']} are done; pass {{epochs}} above "
                         f"{int(meta['epoch']) + 1} to train more", where, Fix("epochs", None))


def _check_clipping(meta: Dict[str, Any], config: Any, where: Fix) -> None:
    """A resumed run clips its gradients as it did (older train states do not say: not checked)."""
    mode, factor = meta.get("clip_mode", config.clip_mode), meta.get("clip_grad", config.clip_grad)
    if mode == config.clip_mode and (mode == "none" or factor == config.clip_grad):
        return
    if mode == "none":
        raise UsageError("{resume}: that run did not clip its gradients; resume it with {clip_mode}", where,
                         Fix("clip_mode", "'none'"))
    raise UsageError("{resume}: that run clipped its gradients with {clip_mode}{clip_grad}; resume it with the same",
                     where, Fix("clip_mode", repr(mode)), Fix("clip_grad", f"{factor:g}", phrase=" and {}"))


def resume(run: Run, src: Path) -> Tuple[int, float, List[str]]:
    """Weights from ``src/last``, optimizer/scheduler/scaler/EMA state from ``src/train_state.*``, after
    finishing (rank 0) any epoch whose commit was interrupted. Returns the next epoch, the best score and the
    metrics rows so far."""
    where = resume_fix(src)
    if not src.is_dir():
        raise UsageError(f"{{resume}}: no last/{WEIGHTS} there (no such directory)", where)
    if is_main_process():
        RunDirectory(src).recover()
    if run.world > 1:
        dist.barrier()
    weights = src / "last" / WEIGHTS
    if not weights.is_file():
        raise UsageError(f"{{resume}}: no last/{WEIGHTS} there (not a wszoo training output?)", where)
    meta, tensors = load_train_state(src, run.optimizer, run.scheduler, lambda m: _check_resumable(m, run, src))
    if run.ema is not None:
        run.ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    load_checkpoint(run.model, str(weights))
    if run.scaler.is_enabled() and meta.get("grad_scaler"):  # fp16: the loss scale it had reached
        run.scaler.load_state_dict(meta["grad_scaler"])
    start = int(meta["epoch"]) + 1
    history = [r for r in RunDirectory(src).metrics() if r.strip() and json.loads(r).get("epoch", -1) < start]
    return start, float(meta[run.task.best_key]), history


def commit_epoch(run: Run, out: RunDirectory, epoch: int, metrics: Dict[str, Any], best: float, history: List[str],
                 replace_all: bool) -> float:
    """Commit the epoch as one unit (see :mod:`wszoo.training.run_dir`): metrics.jsonl, last/ (and ema/), best/ when the
    task's score improved, the train state. Returns the best score."""
    bad = non_finite_tensors(run.model.state_dict())
    if bad:
        raise TrainingDiverged(f"epoch {epoch} left non-finite weights ({', '.join(bad[:5])}): training diverged "
                               "and nothing of it is saved; lower {lr}{clip_mode}", Fix("lr", None),
                               Fix("clip_mode", "'agc'", phrase=" or clip gradients with {}"))
    history.append(json.dumps(metrics))
    score = run.task.score(metrics)
    improved = score > best
    best = max(best, score)
    meta = _train_state_meta(run, epoch, best)
    ema = run.ema.module if run.ema is not None else None

    def write(stage: Path) -> None:
        (stage / "metrics.jsonl").write_text("\n".join(history) + "\n")
        # the metrics only beside the model they were measured on (the EMA copy if any)
        run.task.save_model(run.model, stage / "last", metrics if ema is None else None, epoch + 1)
        if ema is not None:
            run.task.save_model(ema, stage / "ema", metrics, epoch + 1)
        if improved:
            run.task.save_model(ema if ema is not None else run.model, stage / "best", metrics, epoch + 1)
        tensors = {f"ema.{k}": v for k, v in ema.state_dict().items()} if ema is not None else None
        save_train_state(stage, run.optimizer, run.scheduler, meta, tensors)

    out.commit(write, replace_all=replace_all)
    return best

"""The training loop, once for every task: micro-batches with gradient accumulation (one standardization per
optimizer step through :func:`wszoo.accumulate_ws`), DDP under ``torchrun`` (``no_sync`` between steps),
autocast with a gradient scaler for fp16, gradient clipping, EMA, warmup + cosine, an epoch committed as one
unit, exact resume, and the two ways a run stops early: divergence and Ctrl-C.

A :class:`Task` says what is trained: the model and data, what a batch is and its loss, how to validate, the
score that picks ``best/`` and how a model directory is written. Classification
(:mod:`wszoo.training.classification`) and detection (:mod:`wszoo.detection.training`) are tasks; a
segmentation task is one more subclass.
"""
import logging
import math
import random
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import Fix, UsageError
from ..optim import SGDWithAGC, adaptive_clip_grad, agc_parameters, request_weight_norms
from ..speed import accumulate_ws, tune_cpu_allocator, ws_layers
from .config import TrainConfig
from .distributed import all_reduce_gradients, init_distributed, is_main_process
from .epochs import epoch_summary, seed_epoch
from .evaluate import autocast_context
from .run_dir import TrainingDiverged, TrainingInterrupted, check_output, interruption
from .state import Run, commit_epoch, resume
from .task import Task

__all__ = ["Task", "train", "warmup_cosine", "TrainingDiverged", "TrainingInterrupted"]

_logger = logging.getLogger("wszoo")


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0,
                  warmup_start: Optional[float] = None) -> Callable[[int], float]:
    """The learning-rate factor of each optimizer step: linear warmup (see :attr:`Task.warmup_start`), then a
    cosine from 1 down to ``min_ratio`` at ``total_steps``."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            if warmup_start is None:
                return (step + 1) / warmup_steps
            return warmup_start + (1 - warmup_start) * step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _optimizer(task: Task, model: nn.Module, config: TrainConfig, clip_params: List[torch.Tensor]
               ) -> torch.optim.Optimizer:
    groups = task.param_groups(model, config.weight_decay)
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    # on the CPU the clip goes inside SGD's own pass over the gradients (memory-bound there); on accelerators
    # torch's multi-tensor SGD and the separate clip launch fewer kernels
    if config.opt == "sgd" and config.clip_mode == "agc" and on_cpu:
        return SGDWithAGC(groups, clip_params, lr=config.lr, momentum=config.momentum,
                          nesterov=config.nesterov, clip_factor=config.clip_grad)
    if config.opt == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    if config.opt == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    raise UsageError(f"unknown optimizer {config.opt!r}: pass {{opt}}", Fix("opt", "'sgd'", phrase="{} or adamw"))


def _seed_everything(seed: int) -> None:
    """The model's initialisation (rank 0's is the one DDP broadcasts); each epoch seeds itself."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _prepare(task: Task, config: TrainConfig, rank: int, world: int, device: torch.device) -> Run:
    """The model on ``device`` (DDP-wrapped under torchrun), its loader, optimizer, schedule, scaler, EMA."""
    model, train_set = task.build()
    model.to(device)
    sampler = DistributedSampler(train_set, shuffle=True, seed=config.seed) if world > 1 else None
    loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=config.workers, collate_fn=task.collate_fn,
                        generator=torch.Generator())  # seeded per epoch (seed_epoch)
    steps_per_epoch = math.ceil(len(loader) / config.accum_steps)
    clip_params = agc_parameters(model) if config.clip_mode == "agc" else \
        [p for p in model.parameters() if p.requires_grad]
    if config.clip_mode == "agc":  # before the first forward, so that every step reads the norms the same way
        request_weight_norms(clip_params)
    optimizer = _optimizer(task, model, config, clip_params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        steps_per_epoch * config.epochs, config.warmup_steps(steps_per_epoch),
        config.min_lr / config.lr if config.lr else 0.0, task.warmup_start))
    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    ema = None
    if config.ema_decay:  # copied after DDP has given every rank rank 0's weights: each rank's EMA is the same
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=config.ema_decay, device=device)
    return Run(task=task, config=config, model=model, train_model=train_model, loader=loader,
               optimizer=optimizer, scheduler=scheduler, scaler=torch.amp.GradScaler(
                   device.type, enabled=config.amp == "fp16"), ema=ema, clip_params=clip_params, device=device,
               rank=rank, world=world,
               use_accumulate_ws=config.accum_steps > 1 and config.accumulate_ws and bool(ws_layers(model)))


def _optimizer_step(run: Run) -> None:
    config = run.config
    if config.clip_mode in ("agc", "norm"):
        run.scaler.unscale_(run.optimizer)  # nothing to undo without fp16's scaler
        if config.clip_mode == "agc" and not isinstance(run.optimizer, SGDWithAGC):  # (which clips in its step)
            adaptive_clip_grad(run.clip_params, config.clip_grad)
        else:
            torch.nn.utils.clip_grad_norm_(run.clip_params, config.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.model)


def _no_sync(run: Run, skip: bool):
    """DDP's ``no_sync()`` (a fresh context each time: a context manager can be entered once) or nothing."""
    return run.train_model.no_sync() if skip else nullcontext()


def _diverged(loss: torch.Tensor, epoch: int, batch: int, batches: int) -> TrainingDiverged:
    return TrainingDiverged(
        f"the loss became {loss.item()} at epoch {epoch}, batch {batch}/{batches}: training diverged (nothing of "
        "this epoch is saved); lower {lr}{clip_mode}", Fix("lr", None),
        Fix("clip_mode", "'agc'", phrase=", or clip gradients with {}"))


def _train_one_epoch(run: Run, epoch: int) -> Dict[str, Any]:
    """One pass over the loader: micro-batches of ``batch_size``, an optimizer step every ``accum_steps``."""
    config, model, batches = run.config, run.model, len(run.loader)
    seed_epoch(config.seed, run.rank, epoch, run.loader)
    run.train_model.train()
    start, loss_sum, seen = time.perf_counter(), 0.0, 0
    run.optimizer.zero_grad(set_to_none=True)
    accumulating = ExitStack()
    try:
        for i, batch in enumerate(run.loader):
            batch = run.task.to_device(batch, run.device)
            last_micro = (i + 1) % config.accum_steps == 0 or i + 1 == batches
            if run.use_accumulate_ws and i % config.accum_steps == 0:
                accumulating.enter_context(accumulate_ws(model))
            # Under accumulate_ws the parameters' gradients only appear on exit, where DDP's hooks don't
            # look: every micro-batch then runs in no_sync and the gradients are all-reduced by hand.
            skip_sync = run.world > 1 and (run.use_accumulate_ws or not last_micro)
            with _no_sync(run, skip_sync), autocast_context(config.amp, run.device):
                loss, samples = run.task.loss(run.train_model, batch)
            if not bool(torch.isfinite(loss)):
                raise _diverged(loss, epoch, i + 1, batches)
            with _no_sync(run, skip_sync):
                run.scaler.scale(loss / config.accum_steps).backward()
            loss_sum, seen = loss_sum + loss.item() * samples, seen + samples
            if last_micro:
                accumulating.close()  # back-propagates once through each standardization
                if run.world > 1 and run.use_accumulate_ws:
                    all_reduce_gradients(model)
                _optimizer_step(run)
            if is_main_process() and config.log_interval and (i + 1) % config.log_interval == 0:
                _logger.info("epoch %d  batch %d/%d  loss %.4f  lr %.5f", epoch, i + 1, batches,
                             loss_sum / max(seen, 1), run.optimizer.param_groups[0]["lr"])
    except BaseException as e:
        accumulating.__exit__(type(e), e, e.__traceback__)  # no half-accumulated gradient is applied
        raise
    totals = torch.tensor([loss_sum, seen], dtype=torch.float64)
    if run.world > 1:
        dist.all_reduce(totals)
    return {"epoch": epoch, "train_loss": totals[0].item() / max(totals[1].item(), 1),
            "lr": run.optimizer.param_groups[0]["lr"], "train_seconds": round(time.perf_counter() - start, 1)}


def _validate(run: Run) -> Dict[str, Any]:
    """The task's metrics of the EMA copy (or the model), and the seconds they took."""
    start = time.perf_counter()
    metrics = run.task.validate(run.ema.module if run.ema is not None else run.model, run.device)
    return {**metrics, "val_seconds": round(time.perf_counter() - start, 1)} if metrics else {}


def train(task: Task, config: TrainConfig) -> Dict[str, Any]:
    """Train ``task`` for ``config.epochs`` (continuing ``config.resume``); returns the last epoch's metrics.

    Raises :class:`TrainingInterrupted` on Ctrl-C (the last committed epoch stays resumable) and
    :class:`TrainingDiverged` when the loss or the weights become non-finite."""
    rank, world, device = init_distributed()
    _seed_everything(config.seed + rank)
    out = check_output(config.output, config.resume, config.overwrite)
    run = _prepare(task, config, rank, world, device)
    start, best, history = resume(run, Path(config.resume)) if config.resume else (0, -1.0, [])
    if device.type == "cpu" and config.tune_allocator:
        tune_cpu_allocator()
    main = is_main_process()
    line = task.describe(run.loader, world)
    if main and line:
        _logger.info("%s", line)
    metrics: Dict[str, Any] = {}
    # where the last complete epoch is: nowhere yet, or the run being resumed until this one commits
    epoch, resumable = start, (Path(config.resume), start - 1) if config.resume else None
    try:
        for epoch in range(start, config.epochs):
            metrics = _train_one_epoch(run, epoch)
            metrics.update(_validate(run))
            if main:
                best = commit_epoch(run, out, epoch, metrics, best, history,
                                    replace_all=config.overwrite and epoch == start)
                _logger.info("%s", epoch_summary(metrics))
            if world > 1:
                dist.barrier()
            resumable = (out.path, epoch)
    except KeyboardInterrupt:
        raise interruption(epoch, resumable, out) from None
    return metrics


"""Fine-tuning (``wszoo finetune``): any registered model, pretrained or from a checkpoint, on an
ImageFolder tree or Fashion-MNIST, with micro-batches + gradient accumulation, SGD/AdamW with
warmup + cosine, frozen stages, AGC for NF models, bf16 autocast, EMA, safetensors checkpoints
and resume. With ``--accum-steps`` > 1 the micro-batches of one optimizer step share one
standardization of each WS weight (:func:`wszoo.accumulate_ws`). Runs under ``torchrun`` with DDP: GN/WS/NF
models have no batch statistics, so nothing
needs SyncBatchNorm and per-device batches of 1-2 images train exactly like one large batch.
"""
import argparse
import json
import logging
import math
import random
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from .checkpoint import load_checkpoint, non_finite_tensors
from .data import DataError, build_transforms, class_count, create_dataset, data_config_for
from .distributed import all_reduce_gradients, init_distributed, is_main_process
from .epochs import check_same_seed, epoch_summary, seed_epoch
from .evaluate import autocast_context, evaluate
from .factory import create_model
from .features import freeze_stages
from .hub import WEIGHTS_NAME, save_pretrained
from .optim import adaptive_clip_grad, agc_parameters
from .provenance import finetune_record
from .run_dir import RunDirectory, TrainingInterrupted, check_output, interruption, load_train_state, save_train_state
from .speed import accumulate_ws, tune_cpu_allocator, ws_layers

__all__ = ["finetune", "TrainingDiverged", "TrainingInterrupted"]

_logger = logging.getLogger("wszoo")


def _lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    def fn(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return fn


def _build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            # no decay on norms and biases (1-D) nor on what the model names (the Scaled WS gains)
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    if args.opt == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr)
    raise ValueError(f"unknown --opt {args.opt!r}; choose sgd or adamw")


def _save_train_state(out: Path, run: "_Run", epoch: int, best: float) -> None:
    """The optimizer, scheduler and EMA state, and what the run is (model, optimizer, lr), so a resume with
    other settings is refused."""
    meta = {"epoch": epoch, "best_top1": best, "model": run.args.model,
            "architecture": run.model.pretrained_cfg["architecture"], "num_classes": run.model.num_classes,
            "opt": run.args.opt, "lr": run.args.lr, "ema": run.ema is not None, "seed": run.args.seed}
    ema = {f"ema.{k}": v for k, v in run.ema.module.state_dict().items()} if run.ema is not None else None
    save_train_state(out, run.optimizer, run.scheduler, meta, ema)


def _check_resumable(meta: Dict[str, Any], run: "_Run", src: Path) -> None:
    """The run being resumed must be this one: same architecture, optimizer, EMA, seed, and epochs left to
    train."""
    args, arch = run.args, run.model.pretrained_cfg["architecture"]
    if meta.get("architecture", arch) != arch:
        raise DataError(f"--resume {src}: that run trained {meta['architecture']} ({meta.get('model')}), not {arch}; "
                        f"pass --model {meta.get('model')}")
    if meta.get("opt", args.opt) != args.opt:
        raise DataError(f"--resume {src}: that run used --opt {meta['opt']}; resume it with the same optimizer")
    if meta.get("lr", args.lr) != args.lr:  # the restored optimizer and schedule would silently keep the old one
        raise DataError(f"--resume {src}: that run used --lr {meta['lr']:g}; resume it with the same --lr (for "
                        f"another, start a new run from --checkpoint {src / 'last'})")
    if meta.get("ema", run.ema is not None) != (run.ema is not None):
        raise DataError(f"--resume {src}: that run {'used' if meta['ema'] else 'did not use'} EMA; pass the same "
                        "--ema-decay")
    other_seed = check_same_seed(meta, args.seed)
    if other_seed:
        raise DataError(f"--resume {src}: {other_seed}")
    if int(meta["epoch"]) + 1 >= args.epochs:
        raise DataError(f"--resume {src}: epochs 0..{meta['epoch']} are done; pass --epochs above "
                        f"{int(meta['epoch']) + 1} to train more")


def _load_train_state(src: Path, run: "_Run") -> Tuple[int, float]:
    meta, tensors = load_train_state(src, run.optimizer, run.scheduler, lambda m: _check_resumable(m, run, src))
    if run.ema is not None:
        run.ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    return int(meta["epoch"]) + 1, float(meta["best_top1"])


def _datasets(args: argparse.Namespace, in_chans: int, train_tf, eval_tf):
    name = args.dataset
    if name == "imagefolder":
        if not args.data_dir or not Path(args.data_dir).is_dir():
            raise DataError(f"data directory {args.data_dir} does not exist")
        root = Path(args.data_dir)
        train_split = "train" if (root / "train").is_dir() else None
        train = create_dataset(name, args.data_dir, train_split, train_tf, in_chans, args.limit_train)
        val = (create_dataset(name, args.data_dir, "val", eval_tf, in_chans, args.limit_val)
               if (root / "val").is_dir() else None)
    else:
        train = create_dataset(name, args.data_dir, "train", train_tf, in_chans, args.limit_train)
        val = create_dataset(name, args.data_dir, "test", eval_tf, in_chans, args.limit_val)
    return train, val


def _optimizer_step(args: argparse.Namespace, clip_params, optimizer, scheduler, ema, model: nn.Module) -> None:
    if args.clip_mode == "agc":
        adaptive_clip_grad(clip_params, args.clip_grad)
    elif args.clip_mode == "norm":
        torch.nn.utils.clip_grad_norm_(clip_params, args.clip_grad)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model)


@dataclass
class _Run:
    """Everything the epochs of one fine-tuning run share."""

    args: argparse.Namespace
    model: nn.Module
    train_model: nn.Module  # the model, or its DDP wrapper
    loader: DataLoader  # its sampler, under DDP a DistributedSampler, and generator are seeded per epoch
    val_set: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Any
    clip_params: List[torch.Tensor]
    device: torch.device
    rank: int
    world: int
    use_accumulate_ws: bool


def _seed_everything(seed: int) -> None:
    """The model's initialisation (rank 0's is the one DDP broadcasts); each epoch seeds itself."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _model_and_data(args: argparse.Namespace) -> Tuple[nn.Module, Any, Any, List[str]]:
    """The model (pretrained or from a checkpoint, stages frozen) and its train/val datasets."""
    model = create_model(
        args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint, num_classes=args.num_classes,
        in_chans=args.in_chans, drop_rate=args.drop, drop_path_rate=args.drop_path,
    )
    train_tf, eval_tf = build_transforms(data_config_for(model, args.img_size), args.aug)
    train_set, val_set = _datasets(args, model.in_chans, train_tf, eval_tf)
    n_classes = class_count(train_set)
    if n_classes and n_classes != model.num_classes:
        raise DataError(f"the dataset has {n_classes} classes but the model's head has {model.num_classes}: "
                        f"pass --num-classes {n_classes}")
    frozen = freeze_stages(model, args.freeze_stages) if args.freeze_stages >= 0 else []
    return model, train_set, val_set, frozen


def _prepare(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> Tuple[_Run, List[str]]:
    model, train_set, val_set, frozen = _model_and_data(args)
    model.to(device)
    sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed) if world > 1 else None
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=args.workers, drop_last=False,
                        generator=torch.Generator())  # seeded per epoch (seed_epoch)
    steps_per_epoch = math.ceil(len(loader) / args.accum_steps)
    optimizer = _build_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(steps_per_epoch * args.epochs, int(steps_per_epoch * args.warmup_epochs),
                              args.min_lr / args.lr if args.lr else 0.0))
    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    ema = None
    if args.ema_decay:  # copied after DDP has given every rank rank 0's weights: each rank's EMA is the same
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=args.ema_decay, device=device)
    clip_params = agc_parameters(model) if args.clip_mode == "agc" else \
        [p for p in model.parameters() if p.requires_grad]
    use_accumulate_ws = args.accum_steps > 1 and not args.no_accumulate_ws and bool(ws_layers(model))
    run = _Run(args, model, train_model, loader, val_set, optimizer, scheduler, ema, clip_params, device,
               rank, world, use_accumulate_ws)
    return run, frozen


def _resume(run: _Run, src: Path) -> Tuple[int, float]:
    """Weights from ``src/last``, optimizer/scheduler/EMA state from ``src/train_state.*``, after finishing
    (rank 0) any epoch whose commit was interrupted."""
    if not src.is_dir():
        raise DataError(f"--resume {src}: no last/{WEIGHTS_NAME} there (no such directory)")
    if is_main_process():
        RunDirectory(src).recover()
    if run.world > 1:
        dist.barrier()
    weights = src / "last" / WEIGHTS_NAME
    if not weights.is_file():
        raise DataError(f"--resume {src}: no last/{WEIGHTS_NAME} there (not a wszoo finetune output?)")
    start_epoch, best = _load_train_state(src, run)
    load_checkpoint(run.model, str(weights))
    return start_epoch, best


def _no_sync(run: _Run, skip: bool):
    """DDP's ``no_sync()`` (a fresh context each time: a context manager can be entered once) or nothing."""
    return run.train_model.no_sync() if skip else nullcontext()


def _train_one_epoch(run: _Run, epoch: int) -> Dict[str, Any]:
    """One pass over the loader: micro-batches of ``-b`` images, an optimizer step every ``--accum-steps``."""
    args, model = run.args, run.model
    seed_epoch(args.seed, run.rank, epoch, run.loader)
    run.train_model.train()
    start, loss_sum, seen = time.perf_counter(), 0.0, 0
    run.optimizer.zero_grad(set_to_none=True)
    accumulating = ExitStack()
    try:
        for i, (images, targets) in enumerate(run.loader):
            images, targets = images.to(run.device), targets.to(run.device)
            last_micro = (i + 1) % args.accum_steps == 0 or i + 1 == len(run.loader)
            if run.use_accumulate_ws and i % args.accum_steps == 0:
                accumulating.enter_context(accumulate_ws(model))
            # Under accumulate_ws the parameters' gradients only appear on exit, where DDP's hooks don't
            # look: every micro-batch then runs in no_sync and the gradients are all-reduced by hand.
            skip_sync = run.world > 1 and (run.use_accumulate_ws or not last_micro)
            with _no_sync(run, skip_sync), autocast_context(args.amp, run.device):
                loss = F.cross_entropy(run.train_model(images), targets)
            if not bool(torch.isfinite(loss)):
                raise TrainingDiverged(f"the loss became {loss.item()} at epoch {epoch}, batch {i + 1}/"
                                       f"{len(run.loader)}: training diverged (nothing of this epoch is saved); "
                                       "lower --lr, or clip gradients with --clip-mode norm/agc")
            with _no_sync(run, skip_sync):
                (loss / args.accum_steps).backward()
            loss_sum += loss.item() * len(targets)
            seen += len(targets)
            if last_micro:
                accumulating.close()  # back-propagates once through each standardization
                if run.world > 1 and run.use_accumulate_ws:
                    all_reduce_gradients(model)
                _optimizer_step(args, run.clip_params, run.optimizer, run.scheduler, run.ema, model)
            if is_main_process() and args.log_interval and (i + 1) % args.log_interval == 0:
                _logger.info("epoch %d  batch %d/%d  loss %.4f  lr %.5f", epoch, i + 1, len(run.loader),
                             loss_sum / max(seen, 1), run.optimizer.param_groups[0]["lr"])
    except BaseException as e:
        accumulating.__exit__(type(e), e, e.__traceback__)  # no half-accumulated gradient is applied
        raise
    train_loss = torch.tensor([loss_sum, seen], dtype=torch.float64)
    if run.world > 1:
        dist.all_reduce(train_loss)
    return {"epoch": epoch, "train_loss": train_loss[0].item() / max(train_loss[1].item(), 1),
            "lr": run.optimizer.param_groups[0]["lr"], "train_seconds": round(time.perf_counter() - start, 1)}


def _validate(run: _Run) -> Dict[str, Any]:
    """Top-1/top-5/loss of the EMA (or the model) on the val set, and the seconds that took."""
    if run.val_set is None:
        return {}
    start = time.perf_counter()
    eval_model = run.ema.module if run.ema is not None else run.model
    val = evaluate(eval_model, run.val_set, batch_size=max(run.args.batch_size, 64), workers=run.args.workers,
                   device=run.device, amp=run.args.amp, progress=False)
    return {**{f"val_{k}": v for k, v in val.items() if k in ("top1", "top5", "loss")},
            "val_seconds": round(time.perf_counter() - start, 1)}


def _save_epoch(run: _Run, out: RunDirectory, epoch: int, metrics: Dict[str, Any], best: float,
                history: List[str], replace_all: bool) -> float:
    """Commit the epoch as one unit (see :mod:`wszoo.run_dir`): metrics.jsonl, last/ (and ema/), best/ when it
    improved, the train state. Returns the best score."""
    bad = non_finite_tensors(run.model.state_dict())
    if bad:
        raise TrainingDiverged(f"epoch {epoch} left non-finite weights ({', '.join(bad[:5])}): training diverged "
                               "and nothing of it is saved; lower --lr or clip gradients")
    history.append(json.dumps(metrics))
    top1 = metrics.get("val_top1", -metrics["train_loss"])
    improved = top1 > best
    best = max(best, top1)
    eval_model = run.ema.module if run.ema is not None else run.model
    # what each saved model is; the accuracy only beside the model it was measured on (the EMA copy if any)
    evaluated, unevaluated = (finetune_record(run.args, run.loader.dataset, run.val_set, epoch + 1, top1_measured,
                                              run.model.in_chans) for top1_measured in (metrics.get("val_top1"), None))

    def write(stage: Path) -> None:
        (stage / "metrics.jsonl").write_text("\n".join(history) + "\n")
        save_pretrained(run.model, str(stage / "last"), training=unevaluated if run.ema is not None else evaluated)
        if run.ema is not None:
            save_pretrained(run.ema.module, str(stage / "ema"), training=evaluated)
        if improved:
            save_pretrained(eval_model, str(stage / "best"), training=evaluated)
        _save_train_state(stage, run, epoch, best)

    out.commit(write, replace_all=replace_all)
    _logger.info("%s", epoch_summary(metrics))
    return best


def _history(args: argparse.Namespace, start_epoch: int) -> List[str]:
    """The metrics rows of the epochs before ``start_epoch`` (of the run being resumed)."""
    if not args.resume:
        return []
    rows = RunDirectory(args.resume).metrics()
    return [r for r in rows if r.strip() and json.loads(r).get("epoch", -1) < start_epoch]


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/Inf: the run stops, and the diverged epoch is not saved."""


def finetune(args: argparse.Namespace) -> Dict[str, Any]:
    """Run ``wszoo finetune``; returns the final metrics (rank 0's view).

    Raises :class:`TrainingInterrupted` on Ctrl-C (the last committed epoch stays resumable) and
    :class:`TrainingDiverged` when the loss or the weights become non-finite."""
    rank, world, device = init_distributed()
    _seed_everything(args.seed + rank)
    out = check_output(args.output, args.resume, args.overwrite)
    run, frozen = _prepare(args, rank, world, device)
    start_epoch, best = _resume(run, Path(args.resume)) if args.resume else (0, -1.0)
    history = _history(args, start_epoch)
    if device.type == "cpu" and not args.no_tune_allocator:
        tune_cpu_allocator()
    main = is_main_process()
    if main:
        _logger.info("finetune %s: %d train images, %s val, %d steps/epoch of %d x %d images%s",
                     args.model, len(run.loader.dataset), len(run.val_set) if run.val_set is not None else "no",
                     math.ceil(len(run.loader) / args.accum_steps), args.batch_size, args.accum_steps * world,
                     f", frozen {len(frozen)} tensors" if frozen else "")
    metrics: Dict[str, Any] = {}
    # where the last complete epoch is: nowhere yet, or the run being resumed until this one commits
    epoch, resumable = start_epoch, (Path(args.resume), start_epoch - 1) if args.resume else None
    try:
        for epoch in range(start_epoch, args.epochs):
            metrics = _train_one_epoch(run, epoch)
            metrics.update(_validate(run))
            if main:
                best = _save_epoch(run, out, epoch, metrics, best, history,
                                   replace_all=args.overwrite and epoch == start_epoch)
            resumable = (out.path, epoch)
    except KeyboardInterrupt:
        raise interruption(epoch, resumable) from None
    if world > 1:
        dist.barrier()
    return metrics

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
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, DistributedSampler

from .checkpoint import load_checkpoint
from .data import DataError, build_transforms, class_count, create_dataset, data_config_for
from .distributed import all_reduce_gradients, init_distributed, is_main_process
from .evaluate import autocast_context, evaluate
from .factory import create_model
from .hub import WEIGHTS_NAME, save_pretrained
from .models.helpers import freeze_stages
from .optim import adaptive_clip_grad, agc_parameters
from .speed import accumulate_ws, tune_cpu_allocator, ws_layers

__all__ = ["finetune"]

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
    for p in model.parameters():
        if p.requires_grad:
            # no decay on norms, biases and Scaled-WS gains ((out, 1, 1, 1))
            (no_decay if p.ndim <= 1 or p.shape[1:] == (1, 1, 1) else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    if args.opt == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr)
    raise ValueError(f"unknown --opt {args.opt!r}; choose sgd or adamw")


def _save_train_state(out: Path, optimizer, scheduler, epoch: int, best: float, ema) -> None:
    """Optimizer tensors to safetensors, the rest to JSON: resuming never unpickles anything."""
    sd = optimizer.state_dict()
    tensors, state = {}, {}
    for pid, entry in sd["state"].items():
        state[str(pid)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                state[str(pid)][key] = value
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().contiguous().cpu() for k, v in ema.module.state_dict().items()})
    save_file(tensors, str(out / "train_state.safetensors"))
    meta = {"epoch": epoch, "best_top1": best, "param_groups": sd["param_groups"], "state": state,
            "scheduler": scheduler.state_dict()}
    (out / "train_state.json").write_text(json.dumps(meta, indent=1, default=float))


def _load_train_state(src: Path, optimizer, scheduler, ema) -> Tuple[int, float]:
    tensors = load_file(str(src / "train_state.safetensors"))
    meta = json.loads((src / "train_state.json").read_text())
    state: Dict[int, Dict[str, Any]] = {int(pid): dict(v) for pid, v in meta["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state[int(pid)][name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    if ema is not None:
        ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
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
    loader: DataLoader
    sampler: Optional[DistributedSampler]
    val_set: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Any
    clip_params: List[torch.Tensor]
    device: torch.device
    world: int
    use_accumulate_ws: bool


def _seed_everything(seed: int) -> None:
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


def _prepare(args: argparse.Namespace, world: int, device: torch.device) -> Tuple[_Run, List[str]]:
    model, train_set, val_set, frozen = _model_and_data(args)
    model.to(device)
    ema = None
    if args.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=args.ema_decay, device=device)
    sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed) if world > 1 else None
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=args.workers, drop_last=False,
                        generator=torch.Generator().manual_seed(args.seed))
    steps_per_epoch = math.ceil(len(loader) / args.accum_steps)
    optimizer = _build_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(steps_per_epoch * args.epochs, int(steps_per_epoch * args.warmup_epochs),
                              args.min_lr / args.lr if args.lr else 0.0))
    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    clip_params = agc_parameters(model) if args.clip_mode == "agc" else \
        [p for p in model.parameters() if p.requires_grad]
    use_accumulate_ws = args.accum_steps > 1 and not args.no_accumulate_ws and bool(ws_layers(model))
    run = _Run(args, model, train_model, loader, sampler, val_set, optimizer, scheduler, ema, clip_params, device,
               world, use_accumulate_ws)
    return run, frozen


def _resume(run: _Run, src: Path) -> Tuple[int, float]:
    """Weights from ``src/last``, optimizer/scheduler/EMA state from ``src/train_state.*``."""
    weights = src / "last" / WEIGHTS_NAME
    if not weights.is_file():
        raise DataError(f"--resume {src}: no last/{WEIGHTS_NAME} there (not a wszoo finetune output?)")
    load_checkpoint(run.model, str(weights))
    return _load_train_state(src, run.optimizer, run.scheduler, run.ema)


def _train_one_epoch(run: _Run, epoch: int) -> Dict[str, Any]:
    """One pass over the loader: micro-batches of ``-b`` images, an optimizer step every ``--accum-steps``."""
    args, model = run.args, run.model
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
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
            sync = run.train_model.no_sync() if skip_sync else nullcontext()
            with sync, autocast_context(args.amp, run.device):
                loss = F.cross_entropy(run.train_model(images), targets)
            with sync:
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
            "lr": run.optimizer.param_groups[0]["lr"], "epoch_seconds": round(time.perf_counter() - start, 1)}


def _validate(run: _Run) -> Dict[str, Any]:
    if run.val_set is None:
        return {}
    eval_model = run.ema.module if run.ema is not None else run.model
    val = evaluate(eval_model, run.val_set, batch_size=max(run.args.batch_size, 64), workers=run.args.workers,
                   device=run.device, amp=run.args.amp, progress=False)
    return {f"val_{k}": v for k, v in val.items() if k in ("top1", "top5", "loss")}


def _save_epoch(run: _Run, out: Path, epoch: int, metrics: Dict[str, Any], best: float) -> float:
    """metrics.jsonl, last/ (and ema/), best/ when it improved, and the train state; returns the best score."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    _logger.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in metrics.items()))
    save_pretrained(run.model, str(out / "last"))
    if run.ema is not None:
        save_pretrained(run.ema.module, str(out / "ema"))
    top1 = metrics.get("val_top1", -metrics["train_loss"])
    if top1 > best:
        best = top1
        save_pretrained(run.ema.module if run.ema is not None else run.model, str(out / "best"))
    _save_train_state(out, run.optimizer, run.scheduler, epoch, best, run.ema)
    return best


def finetune(args: argparse.Namespace) -> Dict[str, Any]:
    """Run ``wszoo finetune``; returns the final metrics (rank 0's view)."""
    rank, world, device = init_distributed()
    _seed_everything(args.seed + rank)
    out = Path(args.output)
    run, frozen = _prepare(args, world, device)
    start_epoch, best = _resume(run, Path(args.resume)) if args.resume else (0, -1.0)
    if device.type == "cpu" and not args.no_tune_allocator:
        tune_cpu_allocator()
    main = is_main_process()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _logger.info("finetune %s: %d train images, %s val, %d steps/epoch of %d x %d images%s",
                     args.model, len(run.loader.dataset), len(run.val_set) if run.val_set is not None else "no",
                     math.ceil(len(run.loader) / args.accum_steps), args.batch_size, args.accum_steps * world,
                     f", frozen {len(frozen)} tensors" if frozen else "")
    metrics: Dict[str, Any] = {}
    for epoch in range(start_epoch, args.epochs):
        metrics = _train_one_epoch(run, epoch)
        metrics.update(_validate(run))
        if main:
            best = _save_epoch(run, out, epoch, metrics, best)
    if world > 1:
        dist.barrier()
    return metrics

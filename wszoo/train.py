"""Fine-tuning (``wszoo finetune``): any registered model, pretrained or from a checkpoint, on an
ImageFolder tree or Fashion-MNIST, with micro-batches + gradient accumulation, SGD/AdamW with
warmup + cosine, frozen stages, AGC for NF models, bf16 autocast, EMA, safetensors checkpoints
and resume. With ``--accum-steps`` > 1 the micro-batches of one optimizer step share one
standardization of each WS weight (:func:`wszoo.accumulate_ws`). Runs under ``torchrun`` with DDP: GN/WS/NF models have no batch statistics, so nothing
needs SyncBatchNorm and per-device batches of 1-2 images train exactly like one large batch.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms

from . import registry
from .data import DataError, class_count, create_dataset
from .evaluate import autocast_context, evaluate, init_distributed, is_main_process
from .hub import save_pretrained
from .models._helpers import freeze_stages
from .optim import adaptive_clip_grad, agc_parameters
from .speed import accumulate_ws, tune_cpu_allocator, ws_layers

__all__ = ["finetune", "data_config_for", "build_transforms"]

_logger = logging.getLogger("wszoo")


def data_config_for(model: nn.Module, img_size: Optional[int] = None, **overrides: Any) -> Dict[str, Any]:
    """timm's data config for ``model``, at ``img_size`` and with mean/std matched to its input channels."""
    args: Dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    if img_size:
        args["input_size"] = (model.in_chans, img_size, img_size)
    cfg = resolve_data_config(args, model=model)
    cfg["input_size"] = (model.in_chans, *cfg["input_size"][1:])
    for key in ("mean", "std"):
        if len(cfg[key]) != model.in_chans:  # e.g. an RGB checkpoint fine-tuned on grayscale
            avg = float(sum(cfg[key]) / len(cfg[key]))
            cfg[key] = (avg,) * model.in_chans
    return cfg


def build_transforms(cfg: Dict[str, Any], aug: str) -> Tuple[Any, Any]:
    """(train, eval) transforms: ``timm`` (timm's training pipeline), ``flip-crop`` (pad-and-crop + flip,
    right for 28-32 px images), or ``none``."""
    eval_tf = create_transform(**cfg, is_training=False)
    size = cfg["input_size"][-1]
    if aug == "timm":
        train_tf = create_transform(**cfg, is_training=True)
    elif aug == "flip-crop":
        train_tf = transforms.Compose([
            transforms.Resize(size), transforms.RandomCrop(size, padding=max(1, size // 8)),
            transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(cfg["mean"], cfg["std"]),
        ])
    elif aug == "none":
        train_tf = eval_tf
    else:
        raise ValueError(f"unknown --aug {aug!r}; choose timm, flip-crop or none")
    return train_tf, eval_tf


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


def _all_reduce_gradients(model: nn.Module, world: int) -> None:
    """Average the parameters' gradients over the processes (one flat all-reduce)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


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


def finetune(args: argparse.Namespace) -> Dict[str, Any]:
    """Run ``wszoo finetune``; returns the final metrics (rank 0's view)."""
    rank, world, device = init_distributed()
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    out = Path(args.output)
    model = registry.create_model(
        args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint, num_classes=args.num_classes,
        in_chans=args.in_chans, drop_rate=args.drop, drop_path_rate=args.drop_path,
    )
    data_cfg = data_config_for(model, args.img_size)
    train_tf, eval_tf = build_transforms(data_cfg, args.aug)
    train_set, val_set = _datasets(args, model.in_chans, train_tf, eval_tf)
    n_classes = class_count(train_set)
    if n_classes and n_classes != model.num_classes:
        raise DataError(f"the dataset has {n_classes} classes but the model's head has {model.num_classes}: "
                        f"pass --num-classes {n_classes}")
    frozen = freeze_stages(model, args.freeze_stages) if args.freeze_stages >= 0 else []
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
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    start_epoch, best = 0, -1.0
    if args.resume:
        src = Path(args.resume)
        weights = src / "last" / "model.safetensors"
        if not weights.is_file():
            raise DataError(f"--resume {src}: no last/model.safetensors there (not a wszoo finetune output?)")
        from .checkpoint import load_checkpoint

        load_checkpoint(model, str(weights))
        start_epoch, best = _load_train_state(src, optimizer, scheduler, ema)
    use_accumulate_ws = args.accum_steps > 1 and not args.no_accumulate_ws and bool(ws_layers(model))
    if device.type == "cpu" and not args.no_tune_allocator:
        tune_cpu_allocator()
    clip_params = agc_parameters(model) if args.clip_mode == "agc" else [p for p in model.parameters() if p.requires_grad]
    main = is_main_process()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _logger.info("finetune %s: %d train images, %s val, %d steps/epoch of %d x %d images%s",
                     args.model, len(train_set), len(val_set) if val_set is not None else "no",
                     steps_per_epoch, args.batch_size, args.accum_steps * world,
                     f", frozen {len(frozen)} tensors" if frozen else "")
    metrics: Dict[str, Any] = {}
    for epoch in range(start_epoch, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_model.train()
        start, loss_sum, seen = time.perf_counter(), 0.0, 0
        optimizer.zero_grad(set_to_none=True)
        accumulating = ExitStack()
        try:
            for i, (images, targets) in enumerate(loader):
                images, targets = images.to(device), targets.to(device)
                last_micro = (i + 1) % args.accum_steps == 0 or i + 1 == len(loader)
                if use_accumulate_ws and i % args.accum_steps == 0:
                    accumulating.enter_context(accumulate_ws(model))
                # Under accumulate_ws the parameters' gradients only appear on exit, where DDP's hooks don't
                # look: every micro-batch then runs in no_sync and the gradients are all-reduced by hand.
                skip_sync = world > 1 and (use_accumulate_ws or not last_micro)
                sync = train_model.no_sync() if skip_sync else nullcontext()
                with sync, autocast_context(args.amp, device):
                    loss = F.cross_entropy(train_model(images), targets)
                with sync:
                    (loss / args.accum_steps).backward()
                loss_sum += loss.item() * len(targets)
                seen += len(targets)
                if last_micro:
                    accumulating.close()  # back-propagates once through each standardization
                    if world > 1 and use_accumulate_ws:
                        _all_reduce_gradients(model, world)
                    _optimizer_step(args, clip_params, optimizer, scheduler, ema, model)
                if main and args.log_interval and (i + 1) % args.log_interval == 0:
                    _logger.info("epoch %d  batch %d/%d  loss %.4f  lr %.5f", epoch, i + 1, len(loader),
                                 loss_sum / max(seen, 1), optimizer.param_groups[0]["lr"])
        except BaseException as e:
            accumulating.__exit__(type(e), e, e.__traceback__)  # no half-accumulated gradient is applied
            raise
        train_loss = torch.tensor([loss_sum, seen], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(train_loss)
        metrics = {"epoch": epoch, "train_loss": train_loss[0].item() / max(train_loss[1].item(), 1),
                   "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": round(time.perf_counter() - start, 1)}
        eval_model = ema.module if ema is not None else model
        if val_set is not None:
            val = evaluate(eval_model, val_set, batch_size=max(args.batch_size, 64), workers=args.workers,
                           device=device, amp=args.amp, progress=False)
            metrics.update({f"val_{k}": v for k, v in val.items() if k in ("top1", "top5", "loss")})
        if main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            _logger.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in metrics.items()))
            save_pretrained(model, str(out / "last"))
            if ema is not None:
                save_pretrained(ema.module, str(out / "ema"))
            top1 = metrics.get("val_top1", -metrics["train_loss"])
            if top1 > best:
                best = top1
                save_pretrained(eval_model, str(out / "best"))
            _save_train_state(out, optimizer, scheduler, epoch, best, ema)
    if world > 1:
        dist.barrier()
    return metrics

"""``wszoo detect train`` / ``wszoo detect eval``: the GN+WS detection recipe on COCO-format data.

A loop in the manner of torchvision's reference scripts (SGD with momentum, linear warmup then a cosine
schedule, the detector's own losses summed), with micro-batches (``--accum-steps``, one standardization
of each WS weight per optimizer step through :func:`wszoo.accumulate_ws`), autocast (``--amp``), DDP
under ``torchrun``, epochs committed as one unit (safetensors checkpoints, ``--resume``), and COCO box /
mask AP from pycocotools after every epoch and in ``detect eval``.

A detector is saved as ``model.safetensors`` with ``detector.json``: the :func:`build_detector`
arguments that rebuild it (and the dataset's categories), so ``detect eval`` needs only the folder.
"""
import argparse
import json
import logging
import math
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler

from ..checkpoint import load_checkpoint, non_finite_tensors
from ..distributed import all_reduce_gradients, init_distributed, is_main_process
from ..epochs import check_same_seed, epoch_summary, seed_epoch
from ..evaluate import autocast_context
from ..files import atomic_path, atomic_write_text
from ..run_dir import RunDirectory, check_output, interruption, load_train_state, save_train_state
from ..speed import accumulate_ws, ws_layers
from .coco import CocoDetection, coco_evaluate, collate
from .detectors import build_detector

__all__ = ["detect_train", "detect_eval", "save_detector", "load_detector", "format_ap", "DetectionDiverged",
           "DETECTOR_CONFIG"]

_logger = logging.getLogger("wszoo")
DETECTOR_CONFIG = "detector.json"
WEIGHTS = "model.safetensors"


class DetectionDiverged(RuntimeError):
    """A non-finite detection loss: the run stops and the diverged epoch is not saved."""


def save_detector(model: nn.Module, directory: Path, build_args: Dict[str, Any]) -> None:
    """``model.safetensors`` and ``detector.json`` (the :func:`build_detector` arguments), each atomically."""
    bad = non_finite_tensors(model.state_dict())
    if bad:
        raise ValueError(f"refusing to save a detector with non-finite values (NaN/Inf) in {', '.join(bad[:5])}")
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / DETECTOR_CONFIG, json.dumps(build_args, indent=2) + "\n")
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp,
                  metadata={"format": "pt", "detector": build_args["kind"], "backbone": build_args["backbone"]})


class _Silenced(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def load_detector(directory: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a detector saved by :func:`save_detector` and load its trained weights. The skeleton is built
    without published weights and without freezing; build_detector's line about that start is not logged
    (it would describe weights that are replaced at once), one line about the loaded ones is."""
    config_path = Path(directory) / DETECTOR_CONFIG
    if not config_path.is_file():
        raise ValueError(f"{directory} has no {DETECTOR_CONFIG}: not a detector saved by wszoo detect train")
    try:
        build_args = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{config_path} is not readable JSON: {e}") from e
    silenced = _Silenced()
    _logger.addFilter(silenced)
    try:
        model = _build(build_args, pretrained_backbone=False)
    finally:
        _logger.removeFilter(silenced)
    weights = Path(directory) / WEIGHTS
    load_checkpoint(model, str(weights))
    _logger.info("%s on %s: trained weights from %s", build_args["kind"], build_args["backbone"], weights)
    return model, build_args


def _build(build_args: Dict[str, Any], pretrained_backbone: Optional[bool], frozen_stages: Optional[int] = -1
           ) -> nn.Module:
    return build_detector(build_args["kind"], build_args["backbone"], build_args["num_classes"],
                          pretrained_backbone=pretrained_backbone, frozen_stages=frozen_stages,
                          **build_args.get("detector_kwargs", {}))


def _datasets(args: argparse.Namespace) -> Tuple[CocoDetection, Optional[CocoDetection]]:
    masks = args.kind == "maskrcnn"
    train = CocoDetection(args.train_images, args.train_annotations, masks=masks, flip=True)
    val = None
    if args.val_annotations:
        val = CocoDetection(args.val_images or args.train_images, args.val_annotations, masks=masks)
        if val.category_ids != train.category_ids:
            raise ValueError(f"the validation categories {val.category_ids} differ from the training ones "
                             f"{train.category_ids}")
    return train, val


def _schedule(total: int, warmup: int):
    """Linear warmup from 1/1000, then cosine to 0 (in optimizer steps)."""
    def factor(step: int) -> float:
        if step < warmup:
            return 0.001 + 0.999 * step / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


def _train_epoch(args, model, train_model, loader, optimizer, scheduler, scaler, device, rank, world, epoch,
                 use_accumulate_ws) -> Dict[str, Any]:
    """One pass: micro-batches of ``-b`` images, an optimizer step every ``--accum-steps``."""
    seed_epoch(args.seed, rank, epoch, loader)
    train_model.train()
    start, loss_sum, seen = time.perf_counter(), 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    accumulating = ExitStack()
    try:
        for i, (images, targets) in enumerate(loader):
            images = [image.to(device) for image in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            last_micro = (i + 1) % args.accum_steps == 0 or i + 1 == len(loader)
            if use_accumulate_ws and i % args.accum_steps == 0:
                accumulating.enter_context(accumulate_ws(model))
            skip_sync = world > 1 and (use_accumulate_ws or not last_micro)
            with train_model.no_sync() if skip_sync else nullcontext(), autocast_context(args.amp, device):
                loss = sum(train_model(images, targets).values())
            if not bool(torch.isfinite(loss)):
                raise DetectionDiverged(f"the loss became {loss.item()} at epoch {epoch}, batch {i + 1}/{len(loader)}: "
                                        "training diverged (nothing of this epoch is saved); lower --lr")
            with train_model.no_sync() if skip_sync else nullcontext():
                scaler.scale(loss / args.accum_steps).backward()
            loss_sum, seen = loss_sum + loss.item() * len(images), seen + len(images)
            if last_micro:
                accumulating.close()  # back-propagates once through each standardization
                if world > 1 and use_accumulate_ws:
                    all_reduce_gradients(model)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if is_main_process() and args.log_interval and (i + 1) % args.log_interval == 0:
                _logger.info("epoch %d  batch %d/%d  loss %.4f  lr %.5f", epoch, i + 1, len(loader),
                             loss_sum / max(seen, 1), optimizer.param_groups[0]["lr"])
    except BaseException as e:
        accumulating.__exit__(type(e), e, e.__traceback__)  # no half-accumulated gradient is applied
        raise
    totals = torch.tensor([loss_sum, seen], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(totals)
    return {"epoch": epoch, "train_loss": totals[0].item() / max(totals[1].item(), 1),
            "lr": optimizer.param_groups[0]["lr"], "train_seconds": round(time.perf_counter() - start, 1)}


def _check_resumable(meta: Dict[str, Any], build_args: Dict[str, Any], args: argparse.Namespace, src: Path) -> None:
    for key in ("kind", "backbone", "num_classes"):
        if meta.get(key, build_args[key]) != build_args[key]:
            raise ValueError(f"--resume {src}: that run trained {key} {meta[key]!r}, not {build_args[key]!r}")
    if meta.get("lr", args.lr) != args.lr:
        raise ValueError(f"--resume {src}: that run used --lr {meta['lr']:g}; resume it with the same --lr")
    other_seed = check_same_seed(meta, args.seed)
    if other_seed:
        raise ValueError(f"--resume {src}: {other_seed}")
    if int(meta["epoch"]) + 1 >= args.epochs:
        raise ValueError(f"--resume {src}: epochs 0..{meta['epoch']} are done; pass --epochs above "
                         f"{int(meta['epoch']) + 1} to train more")


def _resume(src: Path, model, optimizer, scheduler, scaler, build_args, args, world
            ) -> Tuple[int, float, List[str]]:
    """Weights, optimizer, schedule and gradient scale of ``src``'s last committed epoch (after finishing, on
    rank 0, a commit that was interrupted); returns the next epoch, the best AP and the metrics rows so far."""
    if not (src / "last" / WEIGHTS).is_file():
        raise ValueError(f"--resume {src}: no last/{WEIGHTS} there (not a wszoo detect train output?)")
    if is_main_process():
        RunDirectory(src).recover()
    if world > 1:
        dist.barrier()
    meta, _ = load_train_state(src, optimizer, scheduler, lambda m: _check_resumable(m, build_args, args, src))
    load_checkpoint(model, str(src / "last" / WEIGHTS))
    if scaler.is_enabled() and meta.get("grad_scaler"):  # --amp fp16: the loss scale it had reached
        scaler.load_state_dict(meta["grad_scaler"])
    start = int(meta["epoch"]) + 1
    history = [r for r in RunDirectory(src).metrics() if r.strip() and json.loads(r).get("epoch", -1) < start]
    return start, float(meta["best_ap"]), history


def detect_train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run ``wszoo detect train``; returns the last epoch's metrics (with COCO AP when there is a val set)."""
    rank, world, device = init_distributed()
    torch.manual_seed(args.seed + rank)
    out = check_output(args.output, args.resume, args.overwrite)
    train_set, val_set = _datasets(args)
    detector_kwargs = {k: v for k, v in (("min_size", args.min_size), ("max_size", args.max_size)) if v}
    if args.rois_per_image and args.kind != "retinanet":
        detector_kwargs["box_batch_size_per_image"] = args.rois_per_image
    categories = dict(zip(train_set.category_ids, train_set.classes, strict=True))
    build_args = {"kind": args.kind, "backbone": args.backbone, "num_classes": train_set.num_classes,
                  "detector_kwargs": detector_kwargs, "categories": categories}
    model = build_detector(args.kind, args.backbone, train_set.num_classes,
                           pretrained_backbone=args.pretrained_backbone, frozen_stages=args.frozen_stages,
                           **detector_kwargs).to(device)
    sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed) if world > 1 else None
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=args.workers, collate_fn=collate,
                        generator=torch.Generator())  # seeded per epoch (seed_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    steps = math.ceil(len(loader) / args.accum_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps * args.epochs, args.warmup_iters))
    train_model = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    start, best, history = 0, -1.0, []
    if args.resume:
        start, best, history = _resume(Path(args.resume), model, optimizer, scheduler, scaler, build_args, args,
                                       world)
    use_accumulate_ws = args.accum_steps > 1 and bool(ws_layers(model))
    metrics: Dict[str, Any] = {}
    # where the last complete epoch is: nowhere yet, or the run being resumed until this one commits
    epoch, resumable = start, (Path(args.resume), start - 1) if args.resume else None
    try:
        for epoch in range(start, args.epochs):
            metrics = _train_epoch(args, model, train_model, loader, optimizer, scheduler, scaler, device, rank,
                                   world, epoch, use_accumulate_ws)
            if val_set is not None and is_main_process():
                metrics.update(_validate(model, val_set, device))
            if is_main_process():
                best = _commit_epoch(out, model, optimizer, scheduler, scaler, build_args, args, epoch, metrics,
                                     best, history)
            if world > 1:
                dist.barrier()
            resumable = (out.path, epoch)
    except KeyboardInterrupt:
        raise interruption(epoch, resumable) from None
    return metrics


def _validate(model: nn.Module, val_set: CocoDetection, device: torch.device) -> Dict[str, Any]:
    """COCO box (and mask) AP on the val set, and the seconds that took."""
    start = time.perf_counter()
    metrics = {f"{kind}_{k}": v for kind, stats in coco_evaluate(model, val_set, device).items()
               for k, v in stats.items()}
    return {**metrics, "val_seconds": round(time.perf_counter() - start, 1)}


def _commit_epoch(out: RunDirectory, model, optimizer, scheduler, scaler, build_args, args, epoch, metrics, best,
                  history) -> float:
    """last/ (and best/ by val box AP, or by train loss without a val set), metrics.jsonl and the train state
    (the optimizer, scheduler and gradient scaler), committed as one unit."""
    history.append(json.dumps(metrics))
    score = metrics.get("bbox_AP", -metrics["train_loss"])
    improved = score > best
    best = max(best, score)
    meta = {"epoch": epoch, "best_ap": best, "kind": args.kind, "backbone": args.backbone,
            "num_classes": build_args["num_classes"], "lr": args.lr, "model": f"{args.kind} on {args.backbone}",
            "seed": args.seed, "grad_scaler": scaler.state_dict()}

    def write(stage: Path) -> None:
        (stage / "metrics.jsonl").write_text("\n".join(history) + "\n")
        save_detector(model, stage / "last", build_args)
        if improved:
            save_detector(model, stage / "best", build_args)
        save_train_state(stage, optimizer, scheduler, meta)

    out.commit(write, replace_all=args.overwrite and epoch == 0)
    _logger.info("%s", epoch_summary(metrics))
    return best


def detect_eval(args: argparse.Namespace) -> Dict[str, Dict[str, Optional[float]]]:
    """Run ``wszoo detect eval``: COCO box (and mask) AP of a saved detector on a COCO-format set."""
    model, build_args = load_detector(args.checkpoint)
    dataset = CocoDetection(args.images, args.annotations, masks=build_args["kind"] == "maskrcnn")
    saved = {int(k): v for k, v in build_args.get("categories", {}).items()}
    if saved and list(saved) != dataset.category_ids:
        raise ValueError(f"{args.annotations} has categories {dataset.category_ids}; the detector was trained on "
                         f"{list(saved)}")
    return coco_evaluate(model, dataset, batch_size=args.batch_size)


def format_ap(results: Dict[str, Dict[str, Optional[float]]]) -> str:
    """``bbox: AP 12.3  AP50 30.1 ...`` lines."""
    return "\n".join(f"{kind}: " + "  ".join(f"{k} {'n/a' if v is None else format(v, '.2f')}"
                                             for k, v in stats.items())
                     for kind, stats in results.items())


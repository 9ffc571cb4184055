"""Evaluation: top-1/top-5/loss of a model on a dataset, single process or sharded under ``torchrun``.

Under ``torchrun`` every rank evaluates the disjoint shard ``indices[rank::world_size]`` and the sums
(correct@1, correct@5, loss, count) are all-reduced, so the sample count equals the dataset size
exactly (no padding duplicates, unlike ``DistributedSampler``) and the result equals one process's.
"""
import logging
import sys
import time
from contextlib import nullcontext
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..errors import Fix, UsageError

__all__ = ["evaluate", "autocast_context"]

_logger = logging.getLogger("wszoo")


def autocast_context(amp: Optional[str], device: torch.device):
    """``'bf16'``/``'fp16'`` autocast on ``device``; ``None`` for full precision."""
    if not amp:
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        raise UsageError(f"autocast takes bf16 or fp16, got {amp!r}: pass {{amp}}",
                         Fix("amp", "'bf16'", phrase="{} or fp16"))
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    workers: int = 0,
    device: Optional[torch.device] = None,
    amp: Optional[str] = None,
    channels_last: bool = False,
    progress: Optional[bool] = None,
) -> Dict[str, Any]:
    """Top-1/top-5 (percent), mean cross-entropy and throughput of ``model`` on ``dataset``."""
    device = device or torch.device("cpu")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard = Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers)
    model.eval().to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    show_bar = sys.stderr.isatty() if progress is None else progress
    totals = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, loss_sum, count
    start = time.perf_counter()
    bar = tqdm(loader, desc="eval", disable=not (show_bar and rank == 0), leave=False)
    for step, (images, targets) in enumerate(bar):
        images, targets = images.to(device), targets.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(amp, device):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(targets[:, None])
        totals += torch.tensor([hits[:, 0].sum().item(), hits.any(dim=1).sum().item(),
                                F.cross_entropy(logits, targets, reduction="sum").item(), len(targets)],
                               dtype=torch.float64)
        if not show_bar and rank == 0 and (step + 1) % 50 == 0:
            _logger.info("eval %d/%d batches", step + 1, len(loader))
    seconds = time.perf_counter() - start
    if world > 1:
        dist.all_reduce(totals)
        elapsed = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        seconds = float(elapsed.item())
    correct1, correct5, loss_sum, count = totals.tolist()
    count = int(count)
    return {
        "top1": 100.0 * correct1 / count,
        "top5": 100.0 * correct5 / count,
        "loss": loss_sum / count,
        "num_samples": count,
        "img_per_sec": count / seconds if seconds > 0 else float("inf"),
    }

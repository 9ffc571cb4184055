"""What every training run (:mod:`wszoo.training.engine`) does at an epoch's start and end: the random
seeds it starts from and the line it logs.

Each epoch seeds torch (CPU and every CUDA device), Python's ``random``, NumPy and the DataLoader's
generator from the run's ``--seed``, the process's rank and the epoch number alone. The loader's
generator shuffles the data and seeds the DataLoader workers (which seed ``random``, torch and NumPy
from it for the transforms); the global generators drive dropout, drop-path and the transforms run in
the main process (``--workers 0``); a ``DistributedSampler`` takes ``set_epoch``. So what an epoch draws
depends on nothing that happened before it in the process, and a run resumed from a committed epoch
trains the next one exactly as the uninterrupted run did: restoring a saved generator state would only be
overwritten by the next epoch's seeding, so the train state records the seed instead, and a resume with
another one is refused (:mod:`wszoo.training.state`).
"""
import hashlib
import random
from typing import Any, Dict

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

__all__ = ["seed_epoch", "epoch_summary"]


def _derived_seed(seed: int, rank: int, epoch: int, stream: str) -> int:
    """A 63-bit seed for one stream; distinct streams (and ranks, epochs) never share a seed by arithmetic
    accident, as ``seed + epoch`` would (seed 1 epoch 0 = seed 0 epoch 1)."""
    digest = hashlib.sha256(f"{seed}/{rank}/{epoch}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_epoch(seed: int, rank: int, epoch: int, loader: DataLoader) -> None:
    """Seed every generator an epoch of training draws from (see the module docstring); call it before
    the epoch's first batch is asked for."""
    global_seed = _derived_seed(seed, rank, epoch, "global")
    torch.manual_seed(global_seed)  # the CPU generator and every CUDA device's
    random.seed(global_seed)
    np.random.seed(global_seed % 2**32)
    if loader.generator is None:
        raise ValueError("seed_epoch needs a DataLoader built with its own generator")
    loader.generator.manual_seed(_derived_seed(seed, rank, epoch, "loader"))
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


def epoch_summary(metrics: Dict[str, Any]) -> str:
    """``epoch 3: train_loss 0.412, lr 0.01, ...``: the log line of a finished epoch."""
    fields = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in metrics.items() if k != "epoch")
    return f"epoch {metrics['epoch']}: {fields}"

"""Multi-process helpers for ``torchrun`` (evaluation shards, DDP fine-tuning): start the process group,
know who is rank 0, average gradients by hand where DDP's hooks cannot see them."""
import os
from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["init_distributed", "is_main_process", "all_reduce_gradients", "leave_process_group"]


def init_distributed() -> Tuple[int, int, torch.device]:
    """(rank, world_size, device); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if world > 1:
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        return dist.get_rank(), dist.get_world_size(), device
    if torch.cuda.is_available():
        device = torch.device("cuda")
    return 0, 1, device


def leave_process_group() -> None:
    """End this process's part in the process group, if it has one: called when a command ends, after its last
    collective. A gloo process that exits with its group alive can abort at exit (SIGABRT, 'terminate called
    without an active exception': the group's threads are still running when the process tears down), more
    often the longer the other ranks keep working (rank 0 writing results, a loaded machine)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True outside torchrun, and on rank 0 under it."""
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_gradients(model: nn.Module) -> None:
    """Average the parameters' gradients over the processes, in one flat all-reduce. Used where the
    gradients appear outside DDP's backward hooks (after :func:`wszoo.accumulate_ws`)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()

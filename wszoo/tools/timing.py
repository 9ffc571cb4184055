"""Timing and counting what a step costs: variants timed interleaved (best of the repeats, medians kept),
ratios, the bytes autograd saves for backward, and the operators a step dispatches. Shared by
:mod:`wszoo.tools.bench`, :mod:`wszoo.detection.bench` and the GPU scripts."""
import contextlib
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..speed import ws_layers

__all__ = ["time_interleaved", "timing_entry", "ratio", "saved_bytes", "train_step_fn", "count_dispatches"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device,
                     medians: Optional[Dict[str, float]] = None,
                     setup: Optional[Callable[[], Any]] = None) -> Dict[str, float]:
    """Best-of-``repeats`` seconds per call of each fn, timing them round-robin so drift hits all alike;
    ``medians`` (if given) receives the medians; ``setup`` (if given) runs untimed before every call."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            if setup is not None:
                setup()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    if medians is not None:
        medians.update({k: statistics.median(v) for k, v in times.items()})
    return {k: min(v) for k, v in times.items()}


def timing_entry(best: Dict[str, float], medians: Dict[str, float], digits: int = 1) -> Dict[str, float]:
    """Best and median milliseconds per variant, as ``{name}_ms`` and ``{name}_median_ms``."""
    entry = {f"{k}_ms": round(v * 1e3, digits) for k, v in best.items()}
    entry.update({f"{k}_median_ms": round(v * 1e3, digits) for k, v in medians.items()})
    return entry


def saved_bytes(step: Callable[[], Any], model: Optional[nn.Module] = None) -> int:
    """Bytes of the tensors autograd saves for backward while ``step`` runs, and those the grouped
    standardization of ``model``'s WS layers keeps for its backward (distinct storages)."""
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    groups = {id(g): g for _, layer in ws_layers(model) if (g := layer.ws_group()) is not None} if model else {}
    for group in groups.values():
        for t in group.held_tensors():
            pack(t)
    return sum(seen.values())


def train_step_fn(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                  targets: torch.Tensor) -> Callable[[], None]:
    """One training step (forward, cross-entropy, backward, optimizer step) as a no-argument function."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), targets).backward()
        optimizer.step()
    return step


def ratio(a: float, b: float) -> float:
    """``a / b`` to three decimals."""
    return round(a / b, 3)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """The profiler's native library writes a start and a stop line to file descriptor 2 on every use:
    keep them out of the bench's output (Python's own errors still arrive as exceptions)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def count_dispatches(step: Callable[[], Any]) -> int:
    """The aten operators one call of ``step`` dispatches at the top level (not those an operator calls
    inside itself), by the torch profiler: each is at least one kernel launch (on GPU) and a round trip
    through the dispatcher. Run once before counting, so lazy initialisation is not counted."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    count = 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count

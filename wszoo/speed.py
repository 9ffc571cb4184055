"""Making WS cost nothing at inference and little in training.

- :func:`fold_ws`: bake the standardized weights into plain ``nn.Conv2d`` / ``nn.Linear`` layers for
  deployment (``torch.jit.script``, ``torch.export``, ONNX).
- Eval-mode caching needs nothing from the user: a WS layer in eval mode with no gradient reaching its
  weight reuses its standardized weight until the weight changes (see :class:`wszoo.layers.WSConv2d`).
- :func:`group_ws` (on for every model :func:`wszoo.create_model` builds): in training, standardize all WS
  layers of a model together, in a few kernels instead of ~15 per layer.
- :func:`accumulate_ws`: standardize once per optimizer step instead of once per micro-batch.
- :func:`tune_cpu_allocator`: keep glibc from handing large freed blocks back to the OS every step.
"""
import contextlib
import copy
import ctypes
import ctypes.util
import logging
from typing import Iterator, List, Tuple, Union

import torch
import torch.nn as nn

from .layers.grouped import LayerGroup, is_groupable, standardize_layers
from .layers.retrofit import replace_modules
from .layers.ws_layer import WSLayer, is_ws_layer

__all__ = ["fold_ws", "accumulate_ws", "group_ws", "is_grouped", "ws_layers", "tune_cpu_allocator"]

_logger = logging.getLogger(__name__)


def ws_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, layer)`` for every weight-standardized layer in ``model`` (``''`` for the model itself)."""
    return [(name, m) for name, m in model.named_modules() if is_ws_layer(m)]


def fold_ws(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every WS layer replaced by the plain layer its :meth:`folded` gives: an
    ``nn.Conv2d`` / ``nn.Linear`` (timm's ``Conv2dSame`` for dynamic TF 'SAME' padding) carrying the
    standardized and, for Scaled WS, gain-scaled weight. Outputs agree to float rounding; training the
    folded copy no longer standardizes (it is a deployment form). ``inplace=False`` leaves ``model`` as is.
    """
    if is_ws_layer(model):
        return model.folded()  # type: ignore[operator]
    target = model if inplace else copy.deepcopy(model)
    replace_modules(target, lambda name, layer: layer.folded() if is_ws_layer(layer) else None)  # type: ignore[operator]
    return target


@contextlib.contextmanager
def accumulate_ws(model: nn.Module) -> Iterator[nn.Module]:
    """Standardize each WS weight once for all the micro-batches of one optimizer step.

    On entry every WS layer computes its standardized weight (with autograd) and forwards with a
    detached copy of it; each micro-batch's ``backward()`` accumulates into that copy's ``.grad``. On a
    normal exit the accumulated gradient is back-propagated through the standardization once, adding to
    the parameters' ``.grad`` exactly what the micro-batch backwards would have (up to float rounding).
    The weights must not change inside the block (step the optimizer after it). On an exception nothing
    is back-propagated. Under DDP, run the micro-batches in ``no_sync()`` and all-reduce the gradients
    after the block (the parameters' gradients only appear on exit)::

        with wszoo.accumulate_ws(model):
            for images, targets in micro_batches:
                (loss_fn(model(images), targets) / len(micro_batches)).backward()
        optimizer.step()
    """
    layers: List[WSLayer] = [layer for _, layer in ws_layers(model)]  # type: ignore[misc]
    # frozen layers (nothing they depend on requires grad) accumulate nothing: they serve their cached weight
    trainable = [layer for layer in layers if any(t.requires_grad for t in layer.ws_dependencies()[0])]
    # the layers a group_ws group standardizes together on this device: together here too, in one go
    together = [layer for layer in trainable if (group := layer.ws_group()) is not None and group.applies_to(layer)]
    if any(layer.is_accumulating for layer in layers):
        raise RuntimeError("accumulate_ws: this model is already inside an accumulate_ws block")
    if not torch.is_grad_enabled():
        raise RuntimeError("accumulate_ws: gradients are disabled here (torch.no_grad?); nothing would accumulate")
    pairs = []
    try:
        for layer, weight in zip(together, standardize_layers(together) if together else [], strict=True):
            pairs.append(layer.start_accumulation(weight))
        chosen = {id(layer) for layer in together}
        for layer in trainable:
            if id(layer) not in chosen:
                pairs.append(layer.start_accumulation())
        yield model
        outputs = [w for w, s in pairs if s.grad is not None]
        grads = [s.grad for w, s in pairs if s.grad is not None]
        if outputs:
            torch.autograd.backward(outputs, grads)
    finally:
        for layer in layers:
            layer.stop_accumulation()


# --- grouped standardization -------------------------------------------------------------------------
def group_ws(model: nn.Module, enabled: Union[bool, str] = True) -> nn.Module:
    """Standardize all WS layers of ``model`` together in training. ``enabled``: ``True`` on every device;
    ``'auto'`` (what :func:`wszoo.create_model` and the detection builders set) on GPUs and other accelerators,
    where per-layer standardization is bound by kernel launches, but layer by layer on the CPU, where the
    grouped path's extra copies make it no faster (measured by ``wszoo bench``: docs/speed.md);
    ``False`` layer by layer everywhere.

    The layers join one :class:`wszoo.layers.LayerGroup`: the first training forward after any weight
    changed standardizes every layer's weight in one grouped computation (:func:`wszoo.layers.standardize_weights`:
    flat buffers, one batched standardization per distinct fan-in and formula, one autograd node) and the
    layers convolve with their slices. The same numbers as per-layer standardization (float rounding) and
    the same gradients, for far fewer dispatched operators (the counts per model: docs/speed.md). The results
    serve every forward until a weight changes (the optimizer step), so micro-batches and gradient checkpointing's
    recomputation reuse them; they stay in memory until then (about two copies of the WS weights). Eval mode
    (which caches), ``torch.compile`` (which fuses the per-layer form itself), TorchScript and FX are
    unaffected. Works with :func:`accumulate_ws`, AMP (float32 statistics), channels-last, frozen layers and
    DDP. Calling it again regroups (a model whose layers joined an inner model's group joins the outer one).
    Returns ``model``.
    """
    if enabled not in (True, False, "auto"):
        raise ValueError(f"group_ws: enabled must be True, False or 'auto', got {enabled!r}")
    layers = [layer for _, layer in ws_layers(model) if is_groupable(layer)]
    group = LayerGroup(layers, devices="all" if enabled is True else "accelerators") if enabled and layers else None
    for layer in layers:
        layer.join_group(group)
    return model


def is_grouped(model: nn.Module) -> bool:
    """Whether the WS layers of ``model`` standardize in one group (:func:`group_ws`; layers that compute their
    standardized weight their own way, see :func:`wszoo.layers.is_groupable`, always standardize alone)."""
    groups = {id(layer.ws_group()) for _, layer in ws_layers(model) if is_groupable(layer)}
    return len(groups) == 1 and id(None) not in groups


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_cpu_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 2**31 - 1) -> bool:
    """Make glibc keep large freed blocks for reuse instead of returning them to the OS.

    By default glibc ``mmap``s every block above a (dynamic) threshold and unmaps it on free, so a
    training step that allocates its standardized weights and their gradients afresh (~100 MB for a
    ResNet-50) page-faults all of it in again every step (what that costs: docs/speed.md). This sets
    ``M_MMAP_THRESHOLD`` (at most 32 MiB on 64-bit glibc) and ``M_TRIM_THRESHOLD`` for the whole process,
    like the environment variables
    ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647``. Plain-conv nets gain too.
    Returns False (and changes nothing) where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _logger.info("tune_cpu_allocator: no glibc mallopt here; allocator left as is")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, min(int(mmap_threshold), 32 << 20)))
    ok = bool(mallopt(_M_TRIM_THRESHOLD, min(int(trim_threshold), 2**31 - 1))) and ok
    _logger.info("tune_cpu_allocator: M_MMAP_THRESHOLD %d, M_TRIM_THRESHOLD %d (%s)", mmap_threshold, trim_threshold,
                 "set" if ok else "refused")
    return ok

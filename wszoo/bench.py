"""``wszoo bench``: what weight standardization costs, as ratios measured in one run.

Every figure is a ratio between variants timed *interleaved* in the same process (round-robin), each
variant's time being its best of the repeats (other tenants of a shared machine only ever add time;
the medians are in the JSON too), so drift moves numerator and denominator together:

- eval latency at batch 1 and batch N: the WS model (eval-mode cached weights), its :func:`fold_ws`
  copy, timm's model of the same name when timm has one (timm recomputes the standardization on
  every call), and the verified ONNX export in ONNX Runtime (CPU provider, torch's thread count);
- a training step (forward, backward, SGD step) at batch B: the WS model with its WS layers standardized
  together (:func:`wszoo.group_ws`) and layer by layer (``ws`` is the device's default: grouped on GPUs,
  per layer on the CPU), against its plain-conv copy (the folded copy, trained as plain convs),
  contiguous and channels-last;
- the aten operators one training step dispatches (torch profiler, top-level calls) beyond the plain
  copy's: the launches and Python round trips WS adds, grouped and layer by layer;
- one optimizer step over K micro-batches of one image: plain convs, WS, WS inside
  :func:`wszoo.accumulate_ws`;
- the standardization of all WS weights alone, forward + backward (milliseconds), grouped and per layer;
- memory: bytes autograd saves for backward in one training step (WS vs plain), bytes the eval cache
  holds, and on CUDA the peak allocated memory of each training step.
"""
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import registry
from .factory import create_model
from .files import atomic_write_text
from .layers.grouped import standardize_layers
from .speed import accumulate_ws, fold_ws, group_ws, tune_cpu_allocator, ws_layers

__all__ = ["benchmark_model", "benchmark_detector", "run_benchmarks", "format_report", "write_report",
           "time_interleaved", "train_step_fn", "count_dispatches", "DEFAULT_MODELS"]

#: The models the speed issue's targets are stated for.
DEFAULT_MODELS = ("resnetv2_50x1_bit", "nf_resnet50", "resnet50_gn_ws")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device,
                 medians: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    """Best-of-``repeats`` seconds per call of each fn, timing them round-robin so drift hits all alike;
    ``medians`` (if given) receives the medians."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    if medians is not None:
        medians.update({k: statistics.median(v) for k, v in times.items()})
    return {k: min(v) for k, v in times.items()}


def _entry(best: Dict[str, float], medians: Dict[str, float], digits: int = 1) -> Dict[str, float]:
    entry = {f"{k}_ms": round(v * 1e3, digits) for k, v in best.items()}
    entry.update({f"{k}_median_ms": round(v * 1e3, digits) for k, v in medians.items()})
    return entry


def _saved_bytes(step: Callable[[], Any], model: Optional[nn.Module] = None) -> int:
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


def _accum_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, targets: torch.Tensor,
                use_accumulate_ws: bool) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with accumulate_ws(model) if use_accumulate_ws else contextlib.nullcontext():
            for i in range(len(images)):
                (F.cross_entropy(model(images[i:i + 1]), targets[i:i + 1]) / len(images)).backward()
        optimizer.step()
    return step


def _cuda_peak(device: torch.device, fn: Callable[[], Any]) -> Optional[int]:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return int(torch.cuda.max_memory_allocated(device))


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3)


def _ort_session(model: nn.Module, size: int, tmp_dir: str):
    """An ONNX Runtime session (CPU provider, as many intra-op threads as torch uses) of ``model``'s verified
    export (dynamic batch), or None when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from .deploy import export

    path = f"{tmp_dir}/model.onnx"
    export(model, path, img_size=[size], dynamic_batch=True, force=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    # ORT's worker threads spin for a while after each run by default: timed interleaved, they would take the
    # cores from whichever variant runs next (measured: docs/measurements.md, 2026-12-02)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _bench_eval(model: nn.Module, plain: nn.Module, name: str, size: int, eval_batch: int, repeats: int,
                eval_repeats: int, warmup: int, compare_timm: bool, dev: torch.device,
                ratios: Dict[str, float]) -> Dict[str, Any]:
    """Eval latency at batch 1 and ``eval_batch``: cached WS vs folded vs timm's model of the same name, and
    (on CPU, with onnxruntime installed) the exported ONNX model in ONNX Runtime."""
    timm_model = None
    if compare_timm:
        import timm

        if timm.is_model(name):
            timm_model = timm.create_model(name, pretrained=False).to(dev).eval()
    model.eval()
    plain.eval()
    with tempfile.TemporaryDirectory() as tmp_dir:
        session = _ort_session(model, size, tmp_dir) if dev.type == "cpu" else None
    result: Dict[str, Any] = {"onnxruntime": "measured" if session is not None else "not measured (CPU and "
                              "onnxruntime only: pip install 'wszoo[export]')"}
    for batch in sorted({1, eval_batch}):
        x = torch.randn(batch, model.in_chans, size, size, device=dev)
        fns = {"ws": lambda x=x: model(x), "folded": lambda x=x: plain(x)}
        if timm_model is not None:
            fns["timm"] = lambda x=x: timm_model(x)
        if session is not None:
            feed = {session.get_inputs()[0].name: x.numpy()}
            fns["ort"] = lambda feed=feed: session.run(None, feed)
        med: Dict[str, float] = {}
        with torch.inference_mode():
            t = time_interleaved(fns, eval_repeats if batch == 1 else max(repeats, 5), warmup, dev, med)
        entry = _entry(t, med, 2)
        entry["ws_vs_folded"] = ratios[f"eval_b{batch}_ws_vs_folded"] = _ratio(t["ws"], t["folded"])
        if "timm" in t:
            entry["timm_vs_folded"] = ratios[f"eval_b{batch}_timm_vs_folded"] = _ratio(t["timm"], t["folded"])
        if "ort" in t:
            entry["ort_vs_folded"] = ratios[f"eval_b{batch}_ort_vs_folded"] = _ratio(t["ort"], t["folded"])
        result[f"batch{batch}"] = entry
    return result


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)


def _bench_train(model: nn.Module, plain: nn.Module, size: int, train_batch: int, repeats: int, warmup: int,
                 channels_last: bool, dev: torch.device, ratios: Dict[str, float]) -> Tuple[Dict[str, Any], Dict]:
    """A training step (SGD) of the WS model against its plain-conv copy, contiguous and channels-last;
    returns the timings and the memory each step saves for backward (and its CUDA peak)."""
    model.train()
    plain.train()
    x = torch.randn(train_batch, model.in_chans, size, size, device=dev)
    y = torch.randint(0, model.num_classes, (train_batch,), device=dev)
    grouped = group_ws(copy.deepcopy(model), enabled=True)
    per_layer = group_ws(copy.deepcopy(model), enabled=False)
    fns = {"ws_grouped": train_step_fn(grouped, _sgd(grouped), x, y),
           "ws_per_layer": train_step_fn(per_layer, _sgd(per_layer), x, y),
           "plain": train_step_fn(plain, _sgd(plain), x, y)}
    # the default ('auto'): grouped on accelerators, layer by layer on the CPU
    default = "ws_per_layer" if dev.type == "cpu" else "ws_grouped"
    if channels_last:
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        plain_cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        fns["ws_cl"] = train_step_fn(model_cl, _sgd(model_cl), x_cl, y)
        fns["plain_cl"] = train_step_fn(plain_cl, _sgd(plain_cl), x_cl, y)
    med: Dict[str, float] = {}
    t = time_interleaved(fns, repeats, warmup, dev, med)
    t["ws"], med["ws"] = t[default], med[default]
    fns["ws"] = fns[default]
    entry = _entry(t, med)
    entry["default"] = default
    entry["ws_vs_plain"] = ratios[f"train_b{train_batch}_ws_vs_plain"] = _ratio(t["ws"], t["plain"])
    entry["grouped_vs_plain"] = ratios[f"train_b{train_batch}_grouped_vs_plain"] = \
        _ratio(t["ws_grouped"], t["plain"])
    entry["grouped_vs_per_layer"] = ratios[f"train_b{train_batch}_grouped_vs_per_layer"] = \
        _ratio(t["ws_grouped"], t["ws_per_layer"])
    plain_ops = count_dispatches(fns["plain"])
    entry["extra_dispatches"] = {"grouped": count_dispatches(fns["ws_grouped"]) - plain_ops,
                                 "per_layer": count_dispatches(fns["ws_per_layer"]) - plain_ops,
                                 "plain_step": plain_ops}
    if channels_last:
        entry["ws_cl_vs_plain_cl"] = ratios[f"train_b{train_batch}_channels_last_ws_vs_plain"] = \
            _ratio(t["ws_cl"], t["plain_cl"])
        entry["ws_cl_vs_ws"] = ratios[f"train_b{train_batch}_ws_channels_last_vs_contiguous"] = \
            _ratio(t["ws_cl"], t["ws"])
    memory = {
        "train_saved_for_backward_mb_ws": round(_saved_bytes(fns["ws_per_layer"]) / 2**20, 1),
        "train_saved_for_backward_mb_ws_grouped": round(_saved_bytes(fns["ws_grouped"], grouped) / 2**20, 1),
        "train_saved_for_backward_mb_plain": round(_saved_bytes(fns["plain"]) / 2**20, 1),
    }
    peak_ws, peak_plain = _cuda_peak(dev, fns["ws"]), _cuda_peak(dev, fns["plain"])
    if peak_ws is not None and peak_plain is not None:
        memory["train_cuda_peak_mb_ws"] = round(peak_ws / 2**20, 1)
        memory["train_cuda_peak_mb_plain"] = round(peak_plain / 2**20, 1)
        ratios["train_cuda_peak_ws_vs_plain"] = _ratio(peak_ws, peak_plain)
    return entry, memory


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


def _bench_standardize(model: nn.Module, repeats: int, warmup: int, dev: torch.device) -> Dict[str, float]:
    """Milliseconds to standardize every WS weight of ``model``, forward + backward: layer by layer, and all
    together (:func:`wszoo.layers.standardize_layers`, what :func:`wszoo.group_ws` runs)."""
    layers = [layer for _, layer in ws_layers(model)]

    def backward(weights: List[torch.Tensor]) -> None:
        torch.autograd.backward(weights, [torch.ones_like(w) for w in weights])
        model.zero_grad(set_to_none=True)

    fns = {"per_layer": lambda: backward([layer.standardized_weight() for layer in layers]),
           "grouped": lambda: backward(standardize_layers(layers))}
    t = time_interleaved(fns, repeats, warmup, dev)
    return {k: round(v * 1e3, 2) for k, v in t.items()}


def _bench_accumulate(model: nn.Module, plain: nn.Module, size: int, accum_steps: int, repeats: int, warmup: int,
                      dev: torch.device, ratios: Dict[str, float]) -> Dict[str, Any]:
    """One optimizer step over ``accum_steps`` micro-batches of one image: plain, WS, WS in accumulate_ws."""
    xs = torch.randn(accum_steps, model.in_chans, size, size, device=dev)
    ys = torch.randint(0, model.num_classes, (accum_steps,), device=dev)
    opt_ws, opt_plain = _sgd(model), _sgd(plain)
    fns = {
        "plain": _accum_step(plain, opt_plain, xs, ys, False),
        "ws": _accum_step(model, opt_ws, xs, ys, False),
        "ws_accumulate": _accum_step(model, opt_ws, xs, ys, True),
    }
    med: Dict[str, float] = {}
    t = time_interleaved(fns, repeats, warmup, dev, med)
    entry = _entry(t, med)
    entry["ws_vs_plain"] = ratios[f"accum{accum_steps}x1_ws_vs_plain"] = _ratio(t["ws"], t["plain"])
    entry["ws_accumulate_vs_plain"] = ratios[f"accum{accum_steps}x1_ws_accumulate_vs_plain"] = \
        _ratio(t["ws_accumulate"], t["plain"])
    return entry


def benchmark_model(
    name: str,
    img_size: Optional[int] = None,
    eval_batch: int = 8,
    train_batch: int = 8,
    accum_steps: int = 8,
    repeats: int = 5,
    eval_repeats: int = 20,
    warmup: int = 2,
    compare_timm: bool = True,
    channels_last: bool = True,
    device: str = "cpu",
    seed: int = 0,
) -> Dict[str, Any]:
    """Measure one architecture (random weights: speed does not depend on their values); see the
    module docstring for what is measured. Returns a JSON-ready dict whose ``ratios`` are the headline."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = create_model(name).to(dev)
    size = img_size or model.pretrained_cfg["input_size"][-1]
    plain = fold_ws(model)  # plain convs holding the standardized weights: a healthy plain-conv net
    result: Dict[str, Any] = {"model": name, "img_size": size, "ws_layers": len(ws_layers(model)),
                              "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
    ratios: Dict[str, float] = {}
    result["eval"] = _bench_eval(model, plain, name, size, eval_batch, repeats, eval_repeats, warmup, compare_timm,
                                 dev, ratios)
    cached = [layer.cached_weight() for _, layer in ws_layers(model)]
    cache_bytes = sum(w.numel() * w.element_size() for w in cached if w is not None)
    result["train"], memory = _bench_train(model, plain, size, train_batch, repeats, warmup, channels_last, dev,
                                           ratios)
    memory["eval_cache_mb"] = round(cache_bytes / 2**20, 1)
    memory["params_mb"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1)
    standardize = _bench_standardize(model, repeats, warmup, dev)
    result["standardize_fwd_bwd_ms"] = standardize["grouped"]
    result["standardize_fwd_bwd_ms_per_layer"] = standardize["per_layer"]
    ratios["standardize_grouped_vs_per_layer"] = _ratio(standardize["grouped"], standardize["per_layer"])
    result["accumulate"] = _bench_accumulate(model, plain, size, accum_steps, repeats, warmup, dev, ratios)
    result["memory"] = memory
    result["ratios"] = ratios
    return result


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device, or a ValueError saying why it cannot be used here."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a device torch knows ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available on this machine "
                         "(torch.cuda.is_available() is False); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _detection_batch(batch: int, size: int, masks: bool, dev: torch.device) -> Tuple[list, list]:
    """``batch`` images with three boxes (and masks) each: a fixed training input for the detector step."""
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=gen).to(dev) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.4, 0.3, 0.9, 0.8], [0.2, 0.6, 0.6, 0.95]]) * size
        target = {"boxes": boxes.to(dev), "labels": torch.tensor([1, 2, 3], device=dev)}
        if masks:
            grid = torch.zeros(3, size, size, dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                grid[k, y0:y1, x0:x1] = 1
            target["masks"] = grid.to(dev)
        targets.append(target)
    return images, targets


def benchmark_detector(kind: str = "maskrcnn", backbone: str = "resnet50_gn_ws", img_size: int = 320,
                       batch: int = 2, rois: Sequence[int] = (512, 32), repeats: int = 3, warmup: int = 1,
                       device: str = "cpu") -> Dict[str, Any]:
    """A detector's training step (SGD, batch ``batch`` at ``img_size``): the GN+WS detector (as built: the
    device's default standardization; and with grouping forced on) against the same detector folded (plain
    convs: what WS itself costs) and torchvision's ResNet-50 FPN detector of the kind,
    at each box-head sample count in ``rois`` (the 4conv1fc GN+WS box head's cost grows with it)."""
    from torchvision.models import detection as tv

    from .detection import build_detector

    dev = torch.device(device)
    images, targets = _detection_batch(batch, img_size, kind == "maskrcnn", dev)
    result: Dict[str, Any] = {"detector": kind, "backbone": backbone, "img_size": img_size, "batch": batch}
    ratios: Dict[str, float] = {}
    for n in rois:
        size = dict(min_size=img_size, max_size=img_size)
        per_rois = {} if kind == "retinanet" else {"box_batch_size_per_image": n}
        torch.manual_seed(0)
        ws = build_detector(kind, backbone, 91, pretrained_backbone=False, **size, **per_rois).to(dev)
        folded = fold_ws(ws)
        reference = getattr(tv, f"{kind}_resnet50_fpn")(weights=None, weights_backbone=None, num_classes=91, **size,
                                                          **per_rois).to(dev)
        grouped = group_ws(copy.deepcopy(ws), enabled=True)
        fns = {}
        for name, model in (("ws", ws), ("ws_grouped", grouped), ("folded", folded), ("torchvision", reference)):
            model.train()
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

            def step(model=model, opt=opt) -> None:
                opt.zero_grad(set_to_none=True)
                sum(model(images, targets).values()).backward()
                opt.step()
            fns[name] = step
        med: Dict[str, float] = {}
        t = time_interleaved(fns, repeats, warmup, dev, med)
        entry = _entry(t, med)
        entry["ws_vs_torchvision"] = ratios[f"{kind}_rois{n}_ws_vs_torchvision"] = _ratio(t["ws"], t["torchvision"])
        entry["ws_vs_folded"] = ratios[f"{kind}_rois{n}_ws_vs_folded"] = _ratio(t["ws"], t["folded"])
        entry["ws_grouped_vs_folded"] = ratios[f"{kind}_rois{n}_ws_grouped_vs_folded"] = \
            _ratio(t["ws_grouped"], t["folded"])
        entry["saved_for_backward_mb"] = {k: round(_saved_bytes(fns[k], m) / 2**20, 1)
                                         for k, m in (("ws", ws), ("torchvision", None))}
        result[f"rois{n}"] = entry
        if kind == "retinanet":
            break
    result["ratios"] = ratios
    result["model"] = f"{kind} ({backbone})"
    return result


def _machine(device: str, tuned: bool) -> Dict[str, Any]:
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
               "allocator_tuned": tuned}
    if device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name()
    return machine


def run_benchmarks(models: Sequence[str] = DEFAULT_MODELS, tune_allocator: bool = True, threads: Optional[int] = None,
                   detector: Optional[str] = None, backbone: str = "resnet50_gn_ws", **kwargs: Any) -> Dict[str, Any]:
    """Benchmark each of ``models`` (kwargs as :func:`benchmark_model`), or with ``detector`` that detector's
    training step (:func:`benchmark_detector`), and describe the machine."""
    if detector is None:
        for name in models:
            registry.get_pretrained_cfg(name.split(".")[0])  # fail fast on an unknown name, before any timing
    else:
        registry.get_pretrained_cfg(backbone)
    device = str(kwargs.get("device", "cpu"))
    check_device(device)
    if threads:
        torch.set_num_threads(threads)
    tuned = tune_cpu_allocator() if tune_allocator else False
    report: Dict[str, Any] = {"machine": _machine(device, tuned), "results": []}
    if detector is not None:
        report["results"].append(benchmark_detector(
            detector, backbone, img_size=kwargs.get("img_size") or 320, batch=kwargs.get("train_batch", 2),
            repeats=kwargs.get("repeats", 3), warmup=kwargs.get("warmup", 1), device=device))
        return report
    for name in models:
        report["results"].append(benchmark_model(name, **kwargs))
    return report


def format_report(report: Dict[str, Any]) -> str:
    """The headline ratios as a Markdown table (one column per model)."""
    results = report["results"]
    keys: List[str] = []
    for r in results:
        keys += [k for k in r["ratios"] if k not in keys]
    lines = ["| ratio | " + " | ".join(r["model"] for r in results) + " |",
             "|---|" + "---:|" * len(results)]
    for k in keys:
        cells = (f"{r['ratios'][k]:.3f}x" if k in r["ratios"] else "-" for r in results)
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if all("train" in r for r in results):  # the counts and milliseconds behind the ratios
        def dispatches(r: Dict[str, Any]) -> str:
            counts = r["train"]["extra_dispatches"]
            return f"{counts['grouped']} ({counts['per_layer']})"

        for label, cell in (
                ("extra aten dispatches / training step, grouped (per layer)", dispatches),
                ("standardize all WS weights fwd+bwd ms, grouped (per layer)",
                 lambda r: f"{r['standardize_fwd_bwd_ms']:g} ({r['standardize_fwd_bwd_ms_per_layer']:g})")):
            lines.append(f"| {label} | " + " | ".join(cell(r) for r in results) + " |")
    m = report["machine"]
    lines.append("")
    lines.append(f"{m['processor']}, {m['threads']} threads, torch {m['torch']}, device {m['device']}"
                 f"{', ' + m['gpu'] if 'gpu' in m else ''}, allocator tuned: {m['allocator_tuned']}")
    return "\n".join(lines)


def write_report(report: Dict[str, Any], path: str) -> None:
    """The full report as JSON, written atomically."""
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")

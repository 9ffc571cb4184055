"""``wszoo bench``: what weight standardization costs, as ratios measured in one run.

Every figure is a ratio between variants timed *interleaved* in the same process (round-robin), each
variant's time being its best of the repeats (other tenants of a shared machine only ever add time;
the medians are in the JSON too), so drift moves numerator and denominator together:

- eval latency at batch 1 and batch N: the WS model (eval-mode cached weights), its :func:`fold_ws`
  copy, and timm's model of the same name when timm has one (timm recomputes the standardization on
  every call);
- a training step (forward, backward, SGD step) at batch B: the WS model against its plain-conv copy
  (the folded copy, trained as plain convs), contiguous and channels-last;
- one optimizer step over K micro-batches of one image: plain convs, WS, WS inside
  :func:`wszoo.accumulate_ws`;
- the standardization of all WS weights alone, forward + backward (milliseconds);
- memory: bytes autograd saves for backward in one training step (WS vs plain), bytes the eval cache
  holds, and on CUDA the peak allocated memory of each training step.
"""
import contextlib
import copy
import json
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import registry
from .factory import create_model
from .files import atomic_write_text
from .speed import accumulate_ws, fold_ws, tune_cpu_allocator, ws_layers

__all__ = ["benchmark_model", "run_benchmarks", "format_report", "write_report", "time_interleaved", "train_step_fn",
           "DEFAULT_MODELS"]

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


def _saved_bytes(step: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd saves for backward while ``step`` runs (distinct storages)."""
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
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


def _bench_eval(model: nn.Module, plain: nn.Module, name: str, size: int, eval_batch: int, repeats: int,
                eval_repeats: int, warmup: int, compare_timm: bool, dev: torch.device,
                ratios: Dict[str, float]) -> Dict[str, Any]:
    """Eval latency at batch 1 and ``eval_batch``: cached WS vs folded vs timm's model of the same name."""
    timm_model = None
    if compare_timm:
        import timm

        if timm.is_model(name):
            timm_model = timm.create_model(name, pretrained=False).to(dev).eval()
    model.eval()
    plain.eval()
    result = {}
    for batch in sorted({1, eval_batch}):
        x = torch.randn(batch, model.in_chans, size, size, device=dev)
        fns = {"ws": lambda x=x: model(x), "folded": lambda x=x: plain(x)}
        if timm_model is not None:
            fns["timm"] = lambda x=x: timm_model(x)
        med: Dict[str, float] = {}
        with torch.inference_mode():
            t = time_interleaved(fns, eval_repeats if batch == 1 else max(repeats, 5), warmup, dev, med)
        entry = _entry(t, med, 2)
        entry["ws_vs_folded"] = ratios[f"eval_b{batch}_ws_vs_folded"] = _ratio(t["ws"], t["folded"])
        if "timm" in t:
            entry["timm_vs_folded"] = ratios[f"eval_b{batch}_timm_vs_folded"] = _ratio(t["timm"], t["folded"])
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
    fns = {"ws": train_step_fn(model, _sgd(model), x, y), "plain": train_step_fn(plain, _sgd(plain), x, y)}
    if channels_last:
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        plain_cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        fns["ws_cl"] = train_step_fn(model_cl, _sgd(model_cl), x_cl, y)
        fns["plain_cl"] = train_step_fn(plain_cl, _sgd(plain_cl), x_cl, y)
    med: Dict[str, float] = {}
    t = time_interleaved(fns, repeats, warmup, dev, med)
    entry = _entry(t, med)
    entry["ws_vs_plain"] = ratios[f"train_b{train_batch}_ws_vs_plain"] = _ratio(t["ws"], t["plain"])
    if channels_last:
        entry["ws_cl_vs_plain_cl"] = ratios[f"train_b{train_batch}_channels_last_ws_vs_plain"] = \
            _ratio(t["ws_cl"], t["plain_cl"])
        entry["ws_cl_vs_ws"] = ratios[f"train_b{train_batch}_ws_channels_last_vs_contiguous"] = \
            _ratio(t["ws_cl"], t["ws"])
    memory = {
        "train_saved_for_backward_mb_ws": round(_saved_bytes(fns["ws"]) / 2**20, 1),
        "train_saved_for_backward_mb_plain": round(_saved_bytes(fns["plain"]) / 2**20, 1),
    }
    peak_ws, peak_plain = _cuda_peak(dev, fns["ws"]), _cuda_peak(dev, fns["plain"])
    if peak_ws is not None and peak_plain is not None:
        memory["train_cuda_peak_mb_ws"] = round(peak_ws / 2**20, 1)
        memory["train_cuda_peak_mb_plain"] = round(peak_plain / 2**20, 1)
        ratios["train_cuda_peak_ws_vs_plain"] = _ratio(peak_ws, peak_plain)
    return entry, memory


def _bench_standardize(model: nn.Module, repeats: int, warmup: int, dev: torch.device) -> float:
    """Milliseconds to standardize every WS weight of ``model``, forward + backward."""
    layers = [layer for _, layer in ws_layers(model)]

    def standardize_all() -> None:
        weights = [layer.standardized_weight() for layer in layers]
        torch.autograd.backward(weights, [torch.ones_like(w) for w in weights])
        model.zero_grad(set_to_none=True)

    t = time_interleaved({"standardize": standardize_all}, repeats, warmup, dev)
    return round(t["standardize"] * 1e3, 1)


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
    result["standardize_fwd_bwd_ms"] = _bench_standardize(model, repeats, warmup, dev)
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


def run_benchmarks(models: Sequence[str] = DEFAULT_MODELS, tune_allocator: bool = True, threads: Optional[int] = None,
                   **kwargs: Any) -> Dict[str, Any]:
    """Benchmark each of ``models`` (kwargs as :func:`benchmark_model`) and describe the machine."""
    for name in models:
        registry.get_pretrained_cfg(name.split(".")[0])  # fail fast on an unknown name, before any timing
    check_device(kwargs.get("device", "cpu"))
    if threads:
        torch.set_num_threads(threads)
    tuned = tune_cpu_allocator() if tune_allocator else False
    report: Dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": kwargs.get("device", "cpu"), "allocator_tuned": tuned},
        "results": [],
    }
    if str(kwargs.get("device", "cpu")).startswith("cuda"):
        report["machine"]["gpu"] = torch.cuda.get_device_name()
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
    m = report["machine"]
    lines.append("")
    lines.append(f"{m['processor']}, {m['threads']} threads, torch {m['torch']}, device {m['device']}"
                 f"{', ' + m['gpu'] if 'gpu' in m else ''}, allocator tuned: {m['allocator_tuned']}")
    return "\n".join(lines)


def write_report(report: Dict[str, Any], path: str) -> None:
    """The full report as JSON, written atomically."""
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")

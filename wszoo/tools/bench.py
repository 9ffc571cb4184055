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
  holds, and on CUDA the peak allocated memory of each training step;
- a linear probe's training step at batch min(B, 2) (everything but the classifier frozen: frozen WS layers
  serve their cached weights) against its folded copy;
- an optimizer step with adaptive gradient clipping against the same step without, and the operators one
  AGC call dispatches (ours, all parameters at once; timm's, parameter by parameter).
"""
import contextlib
import copy
import json
import platform
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import registry
from ..factory import create_model
from ..files import atomic_write_text
from ..layers.grouped import standardize_layers
from ..optim import SGDWithAGC, adaptive_clip_grad, agc_parameters
from ..speed import accumulate_ws, fold_ws, group_ws, tune_cpu_allocator, ws_layers
from .timing import count_dispatches, ratio, saved_bytes, time_interleaved, timing_entry, train_step_fn

__all__ = ["benchmark_model", "run_benchmarks", "format_report", "write_report",
           "time_interleaved", "train_step_fn", "count_dispatches", "DEFAULT_MODELS", "timing_entry", "ratio",
           "saved_bytes", "machine_info", "prepare_run", "check_device"]

#: The models the speed issue's targets are stated for.
DEFAULT_MODELS = ("resnetv2_50x1_bit", "nf_resnet50", "resnet50_gn_ws")


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
        entry = timing_entry(t, med, 2)
        entry["ws_vs_folded"] = ratios[f"eval_b{batch}_ws_vs_folded"] = ratio(t["ws"], t["folded"])
        if "timm" in t:
            entry["timm_vs_folded"] = ratios[f"eval_b{batch}_timm_vs_folded"] = ratio(t["timm"], t["folded"])
        if "ort" in t:
            entry["ort_vs_folded"] = ratios[f"eval_b{batch}_ort_vs_folded"] = ratio(t["ort"], t["folded"])
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
    entry = timing_entry(t, med)
    entry["default"] = default
    entry["ws_vs_plain"] = ratios[f"train_b{train_batch}_ws_vs_plain"] = ratio(t["ws"], t["plain"])
    entry["grouped_vs_plain"] = ratios[f"train_b{train_batch}_grouped_vs_plain"] = \
        ratio(t["ws_grouped"], t["plain"])
    entry["grouped_vs_per_layer"] = ratios[f"train_b{train_batch}_grouped_vs_per_layer"] = \
        ratio(t["ws_grouped"], t["ws_per_layer"])
    plain_ops = count_dispatches(fns["plain"])
    entry["extra_dispatches"] = {"grouped": count_dispatches(fns["ws_grouped"]) - plain_ops,
                                 "per_layer": count_dispatches(fns["ws_per_layer"]) - plain_ops,
                                 "plain_step": plain_ops}
    if channels_last:
        entry["ws_cl_vs_plain_cl"] = ratios[f"train_b{train_batch}_channels_last_ws_vs_plain"] = \
            ratio(t["ws_cl"], t["plain_cl"])
        entry["ws_cl_vs_ws"] = ratios[f"train_b{train_batch}_ws_channels_last_vs_contiguous"] = \
            ratio(t["ws_cl"], t["ws"])
    memory = {
        "train_saved_for_backward_mb_ws": round(saved_bytes(fns["ws_per_layer"]) / 2**20, 1),
        "train_saved_for_backward_mb_ws_grouped": round(saved_bytes(fns["ws_grouped"], grouped) / 2**20, 1),
        "train_saved_for_backward_mb_plain": round(saved_bytes(fns["plain"]) / 2**20, 1),
    }
    peak_ws, peak_plain = _cuda_peak(dev, fns["ws"]), _cuda_peak(dev, fns["plain"])
    if peak_ws is not None and peak_plain is not None:
        memory["train_cuda_peak_mb_ws"] = round(peak_ws / 2**20, 1)
        memory["train_cuda_peak_mb_plain"] = round(peak_plain / 2**20, 1)
        ratios["train_cuda_peak_ws_vs_plain"] = ratio(peak_ws, peak_plain)
    return entry, memory


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
    entry = timing_entry(t, med)
    entry["ws_vs_plain"] = ratios[f"accum{accum_steps}x1_ws_vs_plain"] = ratio(t["ws"], t["plain"])
    entry["ws_accumulate_vs_plain"] = ratios[f"accum{accum_steps}x1_ws_accumulate_vs_plain"] = \
        ratio(t["ws_accumulate"], t["plain"])
    return entry


def _bench_frozen(model: nn.Module, size: int, train_batch: int, repeats: int, warmup: int, dev: torch.device,
                  ratios: Dict[str, float]) -> Dict[str, Any]:
    """A linear probe's training step (everything but the classifier frozen, as ``finetune --freeze-stages``
    and detection's frozen stages are in part): the WS model, whose frozen layers serve their cached
    standardized weights, against its folded copy (plain convs)."""
    probe = copy.deepcopy(model).train()
    head = {id(p) for p in probe.get_classifier().parameters()}
    for p in probe.parameters():
        p.requires_grad_(id(p) in head)
    folded = fold_ws(probe).train()
    x = torch.randn(train_batch, model.in_chans, size, size, device=dev)
    y = torch.randint(0, model.num_classes, (train_batch,), device=dev)

    def sgd(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    fns = {"ws": train_step_fn(probe, sgd(probe), x, y), "folded": train_step_fn(folded, sgd(folded), x, y)}
    med: Dict[str, float] = {}
    t = time_interleaved(fns, repeats, warmup, dev, med)
    entry = timing_entry(t, med)
    entry["ws_vs_folded"] = ratios[f"train_b{train_batch}_frozen_backbone_ws_vs_folded"] = ratio(t["ws"], t["folded"])
    return entry


def _bench_agc(model: nn.Module, size: int, repeats: int, warmup: int, dev: torch.device, ratios: Dict[str, float]
               ) -> Dict[str, Any]:
    """One optimizer step (SGD, Nesterov momentum, weight decay: finetune's) with adaptive gradient clipping on
    every parameter but the classifier, against the same step without: the clip inside the step
    (:class:`SGDWithAGC`, what ``--clip-mode agc`` runs with SGD) and as a separate pass before it
    (:func:`adaptive_clip_grad`, what other optimizers get), each timed right after a forward and backward (one
    image) as in training, where the WS layers' standardization has just recorded the filter norms the clip
    reads; and the operators one AGC call dispatches, ours (all parameters at once) and timm's
    ``adaptive_clip_grad`` (parameter by parameter)."""
    from timm.utils.agc import adaptive_clip_grad as timm_agc

    net = copy.deepcopy(model).train()
    params = agc_parameters(net)
    opt = torch.optim.SGD(net.parameters(), lr=1e-6, momentum=0.9, nesterov=True, weight_decay=1e-5)
    x = torch.randn(1, model.in_chans, size, size, device=dev)

    def forward_backward() -> None:
        opt.zero_grad(set_to_none=False)
        net(x).float().square().mean().backward()

    fused = SGDWithAGC(net.parameters(), params, lr=1e-6, momentum=0.9, nesterov=True, weight_decay=1e-5,
                       clip_factor=0.01)
    fns = {"sgd": opt.step, "sgd_with_agc": fused.step,
           "sgd_agc_separate": lambda: (adaptive_clip_grad(params, 0.01), opt.step())}
    med: Dict[str, float] = {}
    t = time_interleaved(fns, repeats, max(warmup, 1), dev, med, setup=forward_backward)
    entry = timing_entry(t, med, 2)
    entry["sgd_with_agc_vs_sgd"] = ratios["optimizer_step_agc_vs_none"] = ratio(t["sgd_with_agc"], t["sgd"])
    entry["sgd_agc_separate_vs_sgd"] = ratios["optimizer_step_separate_agc_vs_none"] = \
        ratio(t["sgd_agc_separate"], t["sgd"])
    forward_backward()
    entry["dispatches"] = {"agc": count_dispatches(lambda: adaptive_clip_grad(params, 0.01)),
                           "timm_agc": count_dispatches(lambda: timm_agc(params, 0.01)),
                           "sgd_step": count_dispatches(opt.step), "sgd_with_agc_step": count_dispatches(fused.step),
                           "parameters": len(params)}
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
    ratios["standardize_grouped_vs_per_layer"] = ratio(standardize["grouped"], standardize["per_layer"])
    result["accumulate"] = _bench_accumulate(model, plain, size, accum_steps, repeats, warmup, dev, ratios)
    result["frozen_backbone"] = _bench_frozen(model, size, min(train_batch, 2), repeats, warmup, dev, ratios)
    result["agc"] = _bench_agc(model, size, repeats, warmup, dev, ratios)
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


def machine_info(device: str, tuned: bool) -> Dict[str, Any]:
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
               "allocator_tuned": tuned}
    if device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name()
    return machine


def prepare_run(device: str, tune_allocator: bool, threads: Optional[int]) -> Dict[str, Any]:
    """Check the device, set the threads and the allocator; returns an empty report describing the machine."""
    check_device(device)
    if threads:
        torch.set_num_threads(threads)
    tuned = tune_cpu_allocator() if tune_allocator else False
    return {"machine": machine_info(device, tuned), "results": []}


def run_benchmarks(models: Sequence[str] = DEFAULT_MODELS, tune_allocator: bool = True, threads: Optional[int] = None,
                   **kwargs: Any) -> Dict[str, Any]:
    """Benchmark each of ``models`` (kwargs as :func:`benchmark_model`) and describe the machine. (A detector's
    training step: :func:`wszoo.detection.bench.run_detector_benchmark`.)"""
    for name in models:
        registry.get_pretrained_cfg(name.split(".")[0])  # fail fast on an unknown name, before any timing
    report = prepare_run(str(kwargs.get("device", "cpu")), tune_allocator, threads)
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
                 lambda r: f"{r['standardize_fwd_bwd_ms']:g} ({r['standardize_fwd_bwd_ms_per_layer']:g})"),
                ("aten dispatches of one AGC call, ours (timm's)",
                 lambda r: f"{r['agc']['dispatches']['agc']} ({r['agc']['dispatches']['timm_agc']})")):
            lines.append(f"| {label} | " + " | ".join(cell(r) for r in results) + " |")
    m = report["machine"]
    lines.append("")
    lines.append(f"{m['processor']}, {m['threads']} threads, torch {m['torch']}, device {m['device']}"
                 f"{', ' + m['gpu'] if 'gpu' in m else ''}, allocator tuned: {m['allocator_tuned']}")
    return "\n".join(lines)


def write_report(report: Dict[str, Any], path: str) -> None:
    """The full report as JSON, written atomically."""
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")

"""The ``wszoo`` command line (also ``python -m wszoo``).

Subcommands: ``list`` (the registry), ``info`` (one model: parameters, preprocessing, features, and an
optional timed forward pass), ``eval`` and ``finetune``, ``convert`` (original checkpoints to safetensors),
``export`` (ONNX / ExportedProgram / TorchScript, verified), ``bench``, ``study``, ``card`` (MODEL_CARD.md
from configs/), ``demo``.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch

from . import registry
from .distributed import leave_process_group
from .errors import Fix, FixableError
from .factory import create_model
from .hub import PretrainedWeightsError

__all__ = ["main", "build_parser"]

#: timm's interpolation names (``timm.data.transforms.str_to_interp_mode``), 'random' aside (training only)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos")


@dataclass(frozen=True)
class _Range:
    """A numeric flag's valid range, checked after parsing so a bad value is one line and exit code 2."""

    flag: str
    dest: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def check(self, value: Any) -> None:
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is None:
                continue
            bad = not math.isfinite(v) or (self.low is not None and (v < self.low or (self.low_open and v == self.low)))
            bad = bad or (self.high is not None and (v > self.high or (self.high_open and v == self.high)))
            if bad:
                raise ValueError(f"{self.flag} must be {self.describe()}, got {v:g}")


def _ranged(p: argparse.ArgumentParser, *flags: str, low: Optional[float] = None, high: Optional[float] = None,
            low_open: bool = False, high_open: bool = False, **kwargs: Any) -> None:
    """``p.add_argument`` plus a valid range, checked by :func:`main` before the command runs."""
    action = p.add_argument(*flags, **kwargs)
    ranges = list(p.get_default("ranges") or [])
    ranges.append(_Range(next((f for f in flags if f.startswith("--")), flags[0]), action.dest, low, high,
                         low_open, high_open))
    p.set_defaults(ranges=ranges)


def _count_arg(p: argparse.ArgumentParser, *flags: str, least: int = 1, **kwargs: Any) -> None:
    _ranged(p, *flags, type=int, low=least, **kwargs)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="arch, arch.tag, hf-hub:org/repo or local-dir:/path")
    p.add_argument("--pretrained", action="store_true", help="load the published weights")
    p.add_argument("--checkpoint", default=None, help="a .safetensors file or a save_pretrained directory")
    p.add_argument("--data-dir", default=None)
    _count_arg(p, "--num-classes", default=None)
    p.add_argument("--in-chans", type=int, choices=[1, 3], default=None,
                   help="1 (grayscale) or 3 (RGB) input channels; default the model's")
    _count_arg(p, "--img-size", default=None, help="input size (default: the model's pretrained cfg)")
    _count_arg(p, "-b", "--batch-size", default=64)
    _count_arg(p, "-j", "--workers", least=0, default=0)
    p.add_argument("--amp", nargs="?", const="bf16", default=None, choices=["bf16", "fp16"],
                   help="autocast dtype: bf16 (default) or fp16")


def _count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cmd_list(args: argparse.Namespace) -> int:
    names = registry.list_models(args.filter or "", pretrained=args.pretrained)
    if not names:
        print(f"no model matches {args.filter!r}", file=sys.stderr)
        return 1
    for name in names:
        print(name)
    return 0


def _forward_report(model: torch.nn.Module, img_size: Sequence[int], batch_size: int) -> dict:
    model.eval()
    x = torch.randn(batch_size, *img_size)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(x)
        seconds = time.perf_counter() - start
    if not torch.isfinite(out).all():
        raise RuntimeError("forward pass produced non-finite outputs")
    return {"input_shape": list(x.shape), "output_shape": list(out.shape), "seconds": round(seconds, 3)}


def _cmd_info(args: argparse.Namespace) -> int:
    """Print one model's parameters, preprocessing and feature levels (and time a forward pass)."""
    fixed = registry.get_pretrained_cfg(args.model).get("fixed_input_size") \
        if not args.model.startswith(("hf-hub:", "local-dir:")) else False
    kwargs = {"img_size": args.img_size} if fixed and args.forward and args.img_size else {}  # a ViT's token grid
    model = create_model(args.model, num_classes=args.num_classes, checkpoint_path=args.checkpoint, **kwargs)
    cfg = model.pretrained_cfg
    info = {
        "model": args.model,
        "class": type(model).__name__,
        "param_count": _count_params(model),
        "num_features": model.num_features,
        "num_classes": model.num_classes,
        "feature_info": model.feature_info,
        "pretrained_cfg": cfg,
    }
    if args.forward:
        size = [model.in_chans, args.img_size, args.img_size] if args.img_size else list(cfg["input_size"])
        info["forward"] = _forward_report(model, size, args.batch_size)
    if args.json:
        print(json.dumps(info, indent=2, default=list))
    else:
        for key, value in info.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for k, v in value.items():
                    print(f"  {k}: {v}")
            elif key == "feature_info":
                print(f"{key}: " + ", ".join(f"{f['module']} ({f['num_chs']} ch, /{f['reduction']})" for f in value))
            else:
                print(f"{key}: {value:,}" if isinstance(value, int) else f"{key}: {value}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """List the registry, then build the smallest model of each family and run it on a random image."""
    from .card import param_count

    names = registry.list_models()
    print(f"{len(names)} registered models:")
    for name in names:
        print(f"  {name}")
    smallest = {}
    for name in names:
        size = param_count(name)  # built on the meta device: nothing allocated
        family = registry.model_family(name)
        if family not in smallest or size < smallest[family][0]:
            smallest[family] = (size, name)
    families = {family: name for family, (_, name) in smallest.items()}
    torch.manual_seed(0)
    for family, name in sorted(families.items()):
        model = create_model(name)
        fixed = model.in_chans != 3 or model.pretrained_cfg.get("fixed_input_size")  # (a ViT's token grid)
        size = model.pretrained_cfg["input_size"][-1] if fixed else args.img_size
        report = _forward_report(model, [model.in_chans, size, size], 1)
        print(
            f"{family}: {name} ({_count_params(model) / 1e6:.1f}M params) "
            f"input {report['input_shape']} -> logits {report['output_shape']} in {report['seconds']:.2f}s"
        )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert_weights import convert_deepmind_nfnet, convert_torch_checkpoint

    overrides = {}
    if args.ws_style:
        overrides["ws_style"] = args.ws_style
    if args.ws_eps is not None:
        overrides["ws_eps"] = args.ws_eps
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    convert = convert_deepmind_nfnet if args.source == "deepmind-nfnet" else convert_torch_checkpoint
    model = convert(args.src, args.model, out=args.output, force=args.force, **overrides)
    print(f"converted {args.src} -> {args.output} ({type(model).__name__} {args.model}, "
          f"{_count_params(model):,} parameters)")
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    from .card import render_model_card
    from .files import atomic_write_text

    text = render_model_card()
    path = Path(args.output)
    if args.check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            print(f"{path} is out of date: run `wszoo card -o {path}`", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    atomic_write_text(path, text)
    print(f"wrote {path}")
    return 0


def _model_for_export(args: argparse.Namespace) -> torch.nn.Module:
    """A registry model (any name create_model takes), or one of the dense-prediction builders on --backbone."""
    from .detection import DETECTORS, build_detector, build_segmenter

    if args.model in DETECTORS or args.model == "deeplabv3":
        if args.checkpoint:
            raise ValueError(f"--checkpoint loads classifiers; {args.model} is built on --backbone "
                             "(--pretrained loads the backbone's published weights)")
        sizes = dict(min_size=min(args.img_size), max_size=max(args.img_size)) if args.img_size else {}
        if args.model == "deeplabv3":
            return build_segmenter("deeplabv3", args.backbone, args.num_classes or 21, output_stride=16,
                                   pretrained_backbone=args.pretrained)
        return build_detector(args.model, args.backbone, args.num_classes or 91,
                              pretrained_backbone=args.pretrained, **sizes)
    return create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint,
                        num_classes=args.num_classes, in_chans=args.in_chans)


def _cmd_export(args: argparse.Namespace) -> int:
    from .deploy import export

    model = _model_for_export(args)
    report = export(model, args.output, format=args.format, img_size=args.img_size, batch_size=args.batch_size,
                    dynamic_batch=args.dynamic_batch, dynamic_size=args.dynamic_size, opset=args.opset,
                    dtype=args.dtype, tolerance=args.tolerance, force=args.force)
    dynamic = [d for d, on in (("batch", args.dynamic_batch), ("height/width", args.dynamic_size)) if on]
    print(f"exported {args.model} to {report.path} ({report.format}"
          + (f" opset {report.opset}" if report.opset else "") + f", {report.dtype}, input "
          f"{report.inputs[0]['shape']}" + (f", dynamic {' and '.join(dynamic)}" if dynamic else "") + ")")
    print(f"verified: largest relative difference to PyTorch {report.max_rel_diff:.2g} (tolerance "
          f"{report.tolerance:g}; " + ", ".join(f"{k} {v:.2g}" for k, v in report.checks.items()) + ")")
    print(f"metadata: {report.metadata_path}")
    return 0


def _cmd_detect(args: argparse.Namespace) -> int:
    import logging

    from .detection.engine import detect_eval, detect_train, format_ap

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action == "train":
        _output_defaults_to_resume(args)
        metrics = detect_train(args)
        if _rank0():  # every rank returns the metrics; one copy of them on stdout
            print(json.dumps(metrics))
    else:
        print(format_ap(detect_eval(args)))
    return 0


def _output_defaults_to_resume(args: argparse.Namespace) -> None:
    """``--resume runs/x`` alone continues the run in runs/x; without either flag there is no run directory."""
    if args.output is None:
        if not args.resume:
            raise ValueError("--output DIR is required: where the run is written (or --resume DIR alone, to "
                             "continue the run in DIR)")
        args.output = args.resume


def _format_results(result: dict, fmt: str) -> str:
    """JSON (valid: a NaN/Inf loss becomes null) or one CSV row with a header."""
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(result))
        writer.writeheader()
        writer.writerow(result)
        return buf.getvalue()
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
    return json.dumps(clean, indent=2, allow_nan=False) + "\n"


def _check_mean_std(args: argparse.Namespace, in_chans: int) -> None:
    for flag, values in (("--mean", args.mean), ("--std", args.std)):
        if values and len(values) not in (1, in_chans):
            raise ValueError(f"{flag} takes 1 or {in_chans} values (the model's input channels), got {len(values)}")
    if args.std and min(args.std) <= 0:
        raise ValueError(f"--std values must be > 0, got {args.std}")


def _cmd_eval(args: argparse.Namespace) -> int:
    import logging

    from timm.data import create_transform

    from .data import class_count, create_dataset, data_config_for
    from .distributed import init_distributed, is_main_process
    from .evaluate import evaluate
    from .files import atomic_write_text, check_writable_parent

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.results_file:  # before any work: a typo in the path must not cost an evaluation
        check_writable_parent(args.results_file, "--results-file")
    rank, world, device = init_distributed()
    model = create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint,
                         num_classes=args.num_classes, in_chans=args.in_chans)
    _check_mean_std(args, model.in_chans)
    cfg = data_config_for(model, args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation,
                          mean=tuple(args.mean) if args.mean else None, std=tuple(args.std) if args.std else None)
    dataset = create_dataset(args.dataset, args.data_dir, args.split, create_transform(**cfg), model.in_chans)
    n_classes = class_count(dataset)
    if n_classes and n_classes != model.num_classes:
        raise ValueError(f"the dataset has {n_classes} classes but {args.model} has {model.num_classes} outputs "
                         f"(pass --num-classes {n_classes} with a matching --checkpoint)")
    random_weights = not args.pretrained and not args.checkpoint
    if random_weights and is_main_process():
        print(f"wszoo eval: warning: {args.model} has random weights (no --pretrained or --checkpoint): its "
              "accuracy is chance level", file=sys.stderr)
    result = evaluate(model, dataset, batch_size=args.batch_size, workers=args.workers, device=device,
                      amp=args.amp, channels_last=args.channels_last)
    result.update({
        "model": args.model, "weights": "random" if random_weights else "pretrained" if not args.checkpoint
        else str(args.checkpoint), "param_count": _count_params(model), "img_size": cfg["input_size"][-1],
        "crop_pct": cfg["crop_pct"], "interpolation": cfg["interpolation"], "world_size": world,
    })
    if not is_main_process():
        return 0
    text = _format_results(result, args.results_format)
    print(f"{args.model}: top1 {result['top1']:.2f}%  top5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
          f"({result['num_samples']} images, {result['img_per_sec']:.0f} img/s)")
    if args.results_file:
        atomic_write_text(args.results_file, text)
    else:
        print(text, end="")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    import logging

    from .train import finetune

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _output_defaults_to_resume(args)
    metrics = finetune(args)
    if _rank0():  # every rank returns the metrics; one copy of them on stdout
        print(json.dumps(metrics))
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from .study import NORMS, format_table, microbatch_study

    study = microbatch_study(
        data_dir=args.data_dir, batch_sizes=args.batch_sizes, norms=args.norms or tuple(NORMS),
        train_images=args.train_images,
        test_images=args.test_images, epochs=args.epochs, lr=args.lr, seed=args.seed, output=args.output,
    )
    print(format_table(study))
    if args.output:
        print(f"results, table and loss plot in {args.output}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_report, run_benchmarks, write_report
    from .files import check_writable_parent

    if args.output:
        check_writable_parent(args.output, "--output")
    report = run_benchmarks(
        args.models, tune_allocator=not args.no_tune_allocator, threads=args.threads, img_size=args.img_size,
        eval_batch=args.eval_batch, train_batch=args.train_batch, accum_steps=args.accum_steps,
        repeats=args.repeats, eval_repeats=args.eval_repeats, warmup=args.warmup, compare_timm=not args.no_timm,
        channels_last=not args.no_channels_last, device=args.device, detector=args.detector, backbone=args.backbone,
    )
    print(format_report(report))
    if args.output:
        write_report(report, args.output)
        print(f"full results in {args.output}")
    return 0


def _add_list_parser(sub) -> None:
    p = sub.add_parser("list", help="list registered models")
    p.add_argument("filter", nargs="?", default="", help="shell wildcard, e.g. 'resnetv2_*'")
    p.add_argument("--pretrained", action="store_true", help="only names with weights, as arch.tag")
    p.set_defaults(func=_cmd_list)


def _add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="describe one model (parameters, preprocessing, features)")
    p.add_argument("model", help="arch or arch.tag")
    _count_arg(p, "--num-classes", least=0, default=None)
    p.add_argument("--checkpoint", default=None, help="local .safetensors state dict to load")
    p.add_argument("--forward", action="store_true", help="also run one forward pass on a random image")
    _count_arg(p, "--img-size", default=None, help="forward input size (default: the cfg's input_size)")
    _count_arg(p, "-b", "--batch-size", default=1)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a dataset (flags as timm's validate.py)")
    _model_args(p)
    p.add_argument("--dataset", default="imagefolder", help="imagefolder, fashion-mnist, or a torchvision dataset name")
    p.add_argument("--split", default="val", help="subfolder / split to evaluate (default val; test for fashion-mnist)")
    _ranged(p, "--crop-pct", type=float, default=None, low=0, high=1, low_open=True)
    p.add_argument("--interpolation", default=None, choices=INTERPOLATIONS)
    p.add_argument("--mean", type=float, nargs="+", default=None)
    p.add_argument("--std", type=float, nargs="+", default=None)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--results-file", default=None, help="write the results here (its directory must exist)")
    p.add_argument("--results-format", choices=["json", "csv"], default="json")
    p.set_defaults(func=_cmd_eval)


def _add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model on an ImageFolder tree or Fashion-MNIST")
    _model_args(p)
    p.set_defaults(batch_size=32)
    p.add_argument("--dataset", default="imagefolder")
    _count_arg(p, "--epochs", default=10)
    _count_arg(p, "--accum-steps", default=1, help="micro-batches per optimizer step")
    p.add_argument("--no-accumulate-ws", action="store_true",
                   help="standardize the WS weights in every micro-batch instead of once per optimizer step")
    p.add_argument("--no-tune-allocator", action="store_true",
                   help="on CPU, leave glibc's malloc thresholds alone (see wszoo.tune_cpu_allocator)")
    p.add_argument("--opt", choices=["sgd", "adamw"], default="sgd")
    _ranged(p, "--lr", type=float, default=0.05, low=0, low_open=True)
    _ranged(p, "--min-lr", type=float, default=0.0, low=0)
    _ranged(p, "--momentum", type=float, default=0.9, low=0, high=1, high_open=True)
    _ranged(p, "--weight-decay", type=float, default=5e-4, low=0)
    _ranged(p, "--warmup-epochs", type=float, default=0.5, low=0)
    p.add_argument("--clip-mode", choices=["none", "norm", "agc"], default="none")
    _ranged(p, "--clip-grad", type=float, default=0.01, low=0, low_open=True,
            help="AGC clip factor, or the max grad norm")
    _count_arg(p, "--freeze-stages", least=-1, default=-1, help="0: stem, k: stem and stages 1..k; -1: none")
    _ranged(p, "--ema-decay", type=float, default=0.0, low=0, high=1, high_open=True,
            help="e.g. 0.999; 0 disables EMA")
    _ranged(p, "--drop", type=float, default=0.0, low=0, high=1, high_open=True)
    _ranged(p, "--drop-path", type=float, default=0.0, low=0, high=1, high_open=True)
    p.add_argument("--aug", choices=["timm", "flip-crop", "none"], default="timm")
    _count_arg(p, "--limit-train", default=None, help="use the first N training images")
    _count_arg(p, "--limit-val", default=None)
    p.add_argument("--seed", type=int, default=0)
    _count_arg(p, "--log-interval", least=0, default=50)
    p.add_argument("--output", default=None,
                   help="directory for checkpoints (last/, best/) and metrics.jsonl (default: the --resume directory)")
    p.add_argument("--resume", default=None, help="a previous --output directory to continue from")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output (by default an existing run is refused)")
    p.set_defaults(func=_cmd_finetune)


def _add_study_parser(sub) -> None:
    p = sub.add_parser("study", help="reproducible studies; 'microbatch': BN vs GN vs GN+WS vs BCN+WS at batch "
                                     "1, 2, 32")
    p.add_argument("name", choices=["microbatch"])
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    _count_arg(p, "--batch-sizes", nargs="+", default=[1, 2, 32])
    p.add_argument("--norms", nargs="+", default=None,
                   help="default all: bn, gn, gn_ws, bcn_ws (Batch-Channel Norm with estimated statistics + WS)")
    _count_arg(p, "--train-images", default=None, help="subset: first N training images (default all)")
    _count_arg(p, "--test-images", default=None)
    _count_arg(p, "--epochs", default=1)
    _ranged(p, "--lr", type=float, default=0.05, low=0, low_open=True,
            help="learning rate at batch 32 (scaled linearly)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="directory for microbatch.json/.md and microbatch_loss.png")
    p.set_defaults(func=_cmd_study)


def _add_bench_parser(sub) -> None:
    from .bench import DEFAULT_MODELS

    p = sub.add_parser("bench", help="what WS costs, as ratios: eval (cached vs folded vs timm), train step, "
                                     "micro-batch accumulation, memory")
    p.add_argument("models", nargs="*", default=list(DEFAULT_MODELS), help=f"default: {' '.join(DEFAULT_MODELS)}")
    _count_arg(p, "--img-size", default=None, help="default: each model's cfg input size")
    _count_arg(p, "--eval-batch", default=8, help="the larger eval batch (batch 1 is always timed)")
    _count_arg(p, "--train-batch", default=8)
    _count_arg(p, "--accum-steps", default=8, help="micro-batches of one image per optimizer step")
    _count_arg(p, "--repeats", default=5, help="timed training steps per variant (best of)")
    _count_arg(p, "--eval-repeats", default=20, help="timed batch-1 eval calls per variant (best of)")
    _count_arg(p, "--warmup", least=0, default=2)
    _count_arg(p, "--threads", default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--no-timm", action="store_true", help="skip timm's models")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--no-tune-allocator", action="store_true", help="leave glibc's malloc thresholds at their defaults")
    p.add_argument("--detector", choices=["fasterrcnn", "maskrcnn", "retinanet"], default=None,
                   help="time this detector's training step instead (GN+WS vs folded vs torchvision's, at 512 and "
                        "32 box-head samples per image; --img-size default 320, --train-batch 2 recommended)")
    p.add_argument("--backbone", default="resnet50_gn_ws", help="the --detector's backbone")
    p.add_argument("-o", "--output", default=None, help="write the full results as JSON here")
    p.set_defaults(func=_cmd_bench)


def _add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert an original checkpoint to a safetensors state dict")
    p.add_argument("src", help="the original file, e.g. F0_haiku.npz or R-50-GN-WS.pth.tar")
    p.add_argument("--source", choices=["deepmind-nfnet", "pth"], required=True,
                   help="layout of SRC: DeepMind's Haiku NFNet parameters, or a PyTorch pickle in the model's "
                        "own key layout (GN+WS authors' .pth.tar, mmdetection copies), read weights-only")
    p.add_argument("--model", required=True, help="target architecture, e.g. dm_nfnet_f0 or resnet50_gn_ws.jhu_in1k")
    p.add_argument("-o", "--output", required=True,
                   help="a .safetensors file, or a directory for save_pretrained (weights, config.json, card)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    _count_arg(p, "--num-classes", least=0, default=None)
    p.add_argument("--ws-style", default=None,
                   help="standardization formula of the built model (deepmind + --ws-eps 1e-4 = Haiku's)")
    _ranged(p, "--ws-eps", "--std-conv-eps", type=float, default=None, low=0, low_open=True,
            help="the standardization's eps (timm's name: --std-conv-eps)")
    p.set_defaults(func=_cmd_convert)


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="fold WS, export to ONNX / ExportedProgram / TorchScript, verify the artifact")
    p.add_argument("model", help="arch, arch.tag, hf-hub:..., local-dir:..., or fasterrcnn / maskrcnn / retinanet / "
                                 "deeplabv3 (built on --backbone)")
    p.add_argument("-o", "--output", required=True, help="out.onnx, out.pt2 or out.pt (the suffix gives the format)")
    p.add_argument("--format", choices=["onnx", "exported-program", "torchscript"], default=None)
    p.add_argument("--pretrained", action="store_true", help="load the published weights (a builder's backbone's)")
    p.add_argument("--checkpoint", default=None, help="a .safetensors file or a save_pretrained directory")
    p.add_argument("--backbone", default="resnet50_gn_ws", help="the builders' backbone (default resnet50_gn_ws)")
    _count_arg(p, "--num-classes", least=0, default=None)
    _count_arg(p, "--in-chans", default=None)
    _count_arg(p, "--img-size", nargs="+", default=None, help="H [W] of the example (default: the cfg's input size)")
    _count_arg(p, "-b", "--batch-size", default=1)
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (verified at 1 and 3)")
    p.add_argument("--dynamic-size", action="store_true", help="any image size, where the model allows it")
    _count_arg(p, "--opset", least=7, default=None, help="ONNX opset (default 21; 17 for detectors)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    _ranged(p, "--tolerance", type=float, default=None, low=0, low_open=True,
            help="largest relative difference to PyTorch accepted (default 1e-4 fp32, 1e-2 fp16, 5e-2 bf16)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd_export)


def _add_detect_parser(sub) -> None:
    p = sub.add_parser("detect", help="train / evaluate a GN+WS detector on COCO-format data (COCO AP by pycocotools)")
    actions = p.add_subparsers(dest="action", required=True)
    t = actions.add_parser("train", help="train a detector (the GN+WS recipe's defaults)")
    t.add_argument("--kind", choices=["fasterrcnn", "maskrcnn", "retinanet"], default="fasterrcnn")
    t.add_argument("--backbone", default="resnet50_gn_ws")
    t.add_argument("--train-images", required=True, help="the training images' folder")
    t.add_argument("--train-annotations", required=True, help="their COCO instances json")
    t.add_argument("--val-images", default=None, help="default: --train-images")
    t.add_argument("--val-annotations", default=None, help="a COCO instances json: box (and mask) AP every epoch")
    pretrained = t.add_mutually_exclusive_group()
    pretrained.add_argument("--pretrained-backbone", dest="pretrained_backbone", action="store_true", default=None,
                            help="start from the backbone's published weights (the default when it has some)")
    pretrained.add_argument("--no-pretrained-backbone", dest="pretrained_backbone", action="store_false")
    _count_arg(t, "--frozen-stages", least=-1, default=None, help="default: 1 with published weights, else -1")
    _count_arg(t, "--epochs", default=12)
    _count_arg(t, "-b", "--batch-size", default=2, help="images per micro-batch per process")
    _count_arg(t, "--accum-steps", default=1, help="micro-batches per optimizer step")
    _ranged(t, "--lr", type=float, default=0.02, low=0, low_open=True)
    _ranged(t, "--weight-decay", type=float, default=1e-4, low=0)
    _count_arg(t, "--warmup-iters", least=0, default=100, help="optimizer steps of linear warmup")
    t.add_argument("--amp", nargs="?", const="bf16", default=None, choices=["bf16", "fp16"])
    _count_arg(t, "--min-size", default=None, help="the detector's resize (torchvision's default 800)")
    _count_arg(t, "--max-size", default=None, help="(torchvision's default 1333)")
    _count_arg(t, "--rois-per-image", default=None,
               help="R-CNN box head samples per image (torchvision's default 512; the 4conv1fc GN+WS head's cost)")
    _count_arg(t, "-j", "--workers", least=0, default=0)
    t.add_argument("--seed", type=int, default=0)
    _count_arg(t, "--log-interval", least=0, default=20)
    t.add_argument("--output", default=None, help="directory for last/, best/, metrics.jsonl and the train state "
                                                  "(default: the --resume directory)")
    t.add_argument("--resume", default=None, help="a previous --output directory to continue from")
    t.add_argument("--overwrite", action="store_true", help="replace the run already in --output")
    t.set_defaults(func=_cmd_detect)
    e = actions.add_parser("eval", help="COCO AP of a saved detector")
    e.add_argument("--checkpoint", required=True, help="a detector folder (runs/x/best)")
    e.add_argument("--images", required=True)
    e.add_argument("--annotations", required=True)
    _count_arg(e, "-b", "--batch-size", default=2)
    e.set_defaults(func=_cmd_detect)


def _add_card_parser(sub) -> None:
    p = sub.add_parser("card", help="generate MODEL_CARD.md from configs/")
    p.add_argument("-o", "--output", default="MODEL_CARD.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    p.set_defaults(func=_cmd_card)


def _add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="list the registry and run one model of every family")
    _count_arg(p, "--img-size", default=224)
    p.set_defaults(func=_cmd_demo)


#: Library parameters whose flag has another name (the flag's ``dest``); any other parameter's flag is its own name.
_PARAM_DESTS = {"checkpoint_path": "checkpoint", "model_name": "model"}


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with usage errors on one line (the usage text is one ``-h`` away), and the flag that
    spells a library parameter in an error's remedy."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} -h`)\n")

    def flag_for(self, fix: Fix) -> Optional[str]:
        """``fix`` as this command's flag (``--no-pretrained-backbone``, ``--checkpoint DIR``), or ``None`` when
        the command has no flag for it. (argparse keeps its actions in ``_actions`` only.)"""
        dest = _PARAM_DESTS.get(fix.param, fix.param)
        for action in (a for a in self._actions if a.dest == dest and a.option_strings):
            flag = max(action.option_strings, key=len)
            if action.nargs != 0:
                return f"{flag} {fix.typed_value()}"
            if repr(action.const) == fix.value:  # a switch: the one that sets the value
                return flag
        return None

    def command_parser(self, args: argparse.Namespace) -> "_Parser":
        """The sub-parser of the command that ran (``detect train``'s for ``wszoo detect train``)."""
        parser = self
        for name in (args.command, getattr(args, "action", None)):
            subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            if not name or not subparsers:
                break
            parser = subparsers[0].choices[name]
        return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``wszoo`` argument parser: one sub-parser per command."""
    parser = _Parser(prog="wszoo", description="Weight Standardization model zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_list_parser(sub)
    _add_info_parser(sub)
    _add_eval_parser(sub)
    _add_finetune_parser(sub)
    _add_study_parser(sub)
    _add_bench_parser(sub)
    _add_convert_parser(sub)
    _add_export_parser(sub)
    _add_detect_parser(sub)
    _add_card_parser(sub)
    _add_demo_parser(sub)
    return parser


def _one_line(error: BaseException, parser: _Parser) -> str:
    """An expected error as one line, its remedies spelled as the command's flags. A DataLoader worker's error
    arrives with the worker's traceback in its message; the line that matters is the original error's, at the
    end."""
    text = error.render(parser.flag_for) if isinstance(error, FixableError) else str(error)
    text = text.strip() or type(error).__name__
    lines = text.splitlines()
    if "Original Traceback" in text:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return " ".join(line.strip() for line in lines)


def _rank0() -> bool:
    """True in a single process and in torchrun's rank 0 (read from the environment, so it holds before and
    after the process group exists)."""
    return os.environ.get("RANK", "0") == "0"


def _report(line: str) -> None:
    """Print a one-line outcome; under torchrun only rank 0 does (every rank meets the same input errors)."""
    if _rank0():
        print(line, file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one ``wszoo`` command. Expected errors (bad input, missing files, unknown models, unreachable
    weights) print one line and exit 2; Ctrl-C prints one line and exits 130; a diverged fine-tune exits 1.
    Only a bug prints a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = " ".join(["wszoo", args.command] + ([args.action] if getattr(args, "action", None) else []))
    try:
        for check in getattr(args, "ranges", None) or []:
            check.check(getattr(args, check.dest))
        return args.func(args)
    except KeyboardInterrupt:
        _report(f"{prefix}: interrupted")
        return 130
    except Exception as e:  # sorted below: our errors and the environment's are one line, the rest re-raised
        from .detection.engine import DetectionDiverged
        from .train import TrainingDiverged, TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            _report(f"{prefix}: {e}")
            return 130
        if isinstance(e, (TrainingDiverged, DetectionDiverged)):
            _report(f"{prefix}: error: {e}")
            return 1
        if isinstance(e, (ValueError, OSError, NotImplementedError, PretrainedWeightsError)):
            _report(f"{prefix}: error: {_one_line(e, parser.command_parser(args))}")
            return 2
        raise
    finally:
        leave_process_group()

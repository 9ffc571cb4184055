"""``wszoo eval``: top-1/top-5 of a model on a dataset (flags as timm's validate.py), also under torchrun."""
import argparse
import json
import math
import sys
from typing import Any

from ..factory import create_model
from .flags import INTERPOLATIONS, count_params, model_flags, ranged

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """The command's sub-parser, run by :func:`run`."""
    p = sub.add_parser("eval", help="evaluate a model on a dataset (flags as timm's validate.py)")
    model_flags(p)
    p.add_argument("--dataset", default="imagefolder", help="imagefolder, fashion-mnist, or a torchvision dataset name")
    p.add_argument("--split", default="val", help="subfolder / split to evaluate (default val; test for fashion-mnist)")
    ranged(p, "--crop-pct", type=float, default=None, low=0, high=1, low_open=True)
    p.add_argument("--interpolation", default=None, choices=INTERPOLATIONS)
    p.add_argument("--mean", type=float, nargs="+", default=None)
    p.add_argument("--std", type=float, nargs="+", default=None)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--results-file", default=None, help="write the results here (its directory must exist)")
    p.add_argument("--results-format", choices=["json", "csv"], default="json")
    p.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    import logging

    from timm.data import create_transform

    from ..files import atomic_write_text, check_writable_parent
    from ..training.data import class_count, create_dataset, data_config_for
    from ..training.distributed import init_distributed, is_main_process
    from ..training.evaluate import evaluate

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
        else str(args.checkpoint), "param_count": count_params(model), "img_size": cfg["input_size"][-1],
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

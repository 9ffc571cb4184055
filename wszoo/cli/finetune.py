"""``wszoo finetune``: fine-tune a model on an ImageFolder tree or Fashion-MNIST
(:func:`wszoo.training.finetune`, configured by :class:`wszoo.training.FinetuneConfig`)."""
import argparse
import json
from typing import Any

from .flags import (
    clip_flags,
    config_from_args,
    count_arg,
    model_flags,
    output_defaults_to_resume,
    ranged,
    rank0,
    resolved_clip_flags,
    run_dir_flags,
)

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """The command's sub-parser, run by :func:`run`."""
    p = sub.add_parser("finetune", help="fine-tune a model on an ImageFolder tree or Fashion-MNIST")
    model_flags(p)
    p.set_defaults(batch_size=32)
    p.add_argument("--dataset", default="imagefolder")
    count_arg(p, "--epochs", default=10)
    count_arg(p, "--accum-steps", default=1, help="micro-batches per optimizer step")
    p.add_argument("--no-accumulate-ws", action="store_true",
                   help="standardize the WS weights in every micro-batch instead of once per optimizer step")
    p.add_argument("--no-tune-allocator", action="store_true",
                   help="on CPU, leave glibc's malloc thresholds alone (see wszoo.tune_cpu_allocator)")
    p.add_argument("--opt", choices=["sgd", "adamw"], default="sgd")
    ranged(p, "--lr", type=float, default=0.05, low=0, low_open=True)
    ranged(p, "--min-lr", type=float, default=0.0, low=0)
    ranged(p, "--momentum", type=float, default=0.9, low=0, high=1, high_open=True)
    ranged(p, "--weight-decay", type=float, default=5e-4, low=0)
    ranged(p, "--warmup-epochs", type=float, default=0.5, low=0)
    clip_flags(p)
    count_arg(p, "--freeze-stages", least=-1, default=-1, help="0: stem, k: stem and stages 1..k; -1: none")
    ranged(p, "--ema-decay", type=float, default=0.0, low=0, high=1, high_open=True,
            help="e.g. 0.999; 0 disables EMA")
    ranged(p, "--drop", type=float, default=0.0, low=0, high=1, high_open=True)
    ranged(p, "--drop-path", type=float, default=0.0, low=0, high=1, high_open=True)
    p.add_argument("--aug", choices=["timm", "flip-crop", "none"], default="timm")
    count_arg(p, "--limit-train", default=None, help="use the first N training images")
    count_arg(p, "--limit-val", default=None)
    p.add_argument("--seed", type=int, default=0)
    count_arg(p, "--log-interval", least=0, default=50)
    run_dir_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from ..training import FinetuneConfig, finetune

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output_defaults_to_resume(args)
    config = config_from_args(FinetuneConfig, resolved_clip_flags(args), accumulate_ws=not args.no_accumulate_ws,
                              tune_allocator=not args.no_tune_allocator)
    metrics = finetune(config)
    if rank0():  # every rank returns the metrics; one copy of them on stdout
        print(json.dumps(metrics))
    return 0

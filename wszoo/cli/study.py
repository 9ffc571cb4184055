"""``wszoo study``: reproducible studies (``microbatch``: BN vs GN vs GN+WS vs BCN+WS)."""
import argparse
from typing import Any

from .flags import count_arg, ranged

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """The command's sub-parser, run by :func:`run`."""
    p = sub.add_parser("study", help="reproducible studies; 'microbatch': BN vs GN vs GN+WS vs BCN+WS at batch "
                                     "1, 2, 32")
    p.add_argument("name", choices=["microbatch"])
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    count_arg(p, "--batch-sizes", nargs="+", default=[1, 2, 32])
    p.add_argument("--norms", nargs="+", default=None,
                   help="default all: bn, gn, gn_ws, bcn_ws (Batch-Channel Norm with estimated statistics + WS)")
    count_arg(p, "--train-images", default=None, help="subset: first N training images (default all)")
    count_arg(p, "--test-images", default=None)
    count_arg(p, "--epochs", default=1)
    ranged(p, "--lr", type=float, default=0.05, low=0, low_open=True,
            help="learning rate at batch 32 (scaled linearly)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="directory for microbatch.json/.md and microbatch_loss.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..training.study import NORMS, format_table, microbatch_study

    study = microbatch_study(
        data_dir=args.data_dir, batch_sizes=args.batch_sizes, norms=args.norms or tuple(NORMS),
        train_images=args.train_images,
        test_images=args.test_images, epochs=args.epochs, lr=args.lr, seed=args.seed, output=args.output,
    )
    print(format_table(study))
    if args.output:
        print(f"results, table and loss plot in {args.output}")
    return 0

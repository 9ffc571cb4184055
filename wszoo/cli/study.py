"""``wszoo study``: reproducible studies. ``microbatch``: BN vs GN vs GN+WS vs BCN+WS classifiers on Fashion-MNIST;
``detection``: BN vs GN vs GN+WS detectors on the Fashion-MNIST mosaics, at micro- and larger batches."""
import argparse
from typing import Any

from .flags import count_arg, ranged

__all__ = ["add_parser", "run"]

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def _microbatch_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=FASHION_MNIST)
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


def _detection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=FASHION_MNIST, help="Fashion-MNIST's idx files, made into mosaics")
    count_arg(p, "--batch-sizes", nargs="+", default=[1, 8])
    p.add_argument("--norms", nargs="+", default=None, help="default all: bn, gn, gn_ws")
    p.add_argument("--kind", choices=["fasterrcnn", "maskrcnn"], default="fasterrcnn",
                   help="maskrcnn adds mask AP (about 1.5x the time)")
    count_arg(p, "--train-images", default=800, help="training mosaics (items from Fashion-MNIST's train split)")
    count_arg(p, "--val-images", default=200, help="validation mosaics (items from its test split)")
    count_arg(p, "--img-size", least=32, default=64, help="mosaic side in px (the detector's input size)")
    count_arg(p, "--epochs", default=4)
    ranged(p, "--lr", type=float, default=0.02, low=0, low_open=True,
           help="learning rate at batch 8 (scaled linearly)")
    count_arg(p, "--rois-per-image", default=32, help="R-CNN box head samples per image")
    count_arg(p, "--warmup-images", least=0, default=200, help="linear warmup over this many training images")
    count_arg(p, "--seed", least=0, default=0)
    p.add_argument("--output", default=None, help="directory for detection.json/.md, detection_loss.png and mosaic/")


def add_parser(sub: Any) -> None:
    """The command's sub-parser, run by :func:`run`."""
    p = sub.add_parser("study", help="reproducible studies: 'microbatch' (classifiers at batch 1, 2, 32) and "
                                     "'detection' (detectors at batch 1 and 8), BN vs GN vs GN+WS")
    studies = p.add_subparsers(dest="action", required=True)
    _microbatch_flags(studies.add_parser(
        "microbatch", help="BN vs GN vs GN+WS vs BCN+WS small ResNets on Fashion-MNIST at batch 1, 2, 32"))
    _detection_flags(studies.add_parser(
        "detection", help="BN vs GN vs GN+WS Faster/Mask R-CNNs from scratch on Fashion-MNIST mosaics at batch 1, 8"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "detection":
        import logging

        from ..detection.study import NORMS, detection_study, format_table

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        study = detection_study(
            data_dir=args.data_dir, batch_sizes=args.batch_sizes, norms=args.norms or NORMS,
            train_images=args.train_images, val_images=args.val_images, img_size=args.img_size, epochs=args.epochs,
            lr=args.lr, kind=args.kind, rois_per_image=args.rois_per_image, warmup_images=args.warmup_images,
            seed=args.seed, output=args.output)
        name = "detection"
    else:
        from ..training.study import NORMS, format_table, microbatch_study

        study = microbatch_study(
            data_dir=args.data_dir, batch_sizes=args.batch_sizes, norms=args.norms or tuple(NORMS),
            train_images=args.train_images, test_images=args.test_images, epochs=args.epochs, lr=args.lr,
            seed=args.seed, output=args.output)
        name = "microbatch"
    print(format_table(study))
    if args.output:
        print(f"results, table and loss plot in {args.output} ({name}.json, {name}.md, {name}_loss.png)")
    return 0

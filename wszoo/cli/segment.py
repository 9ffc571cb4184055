"""``wszoo segment train|eval|demo``: DeepLabv3 on a WS backbone, trained and scored on VOC-layout data
(:func:`wszoo.segmentation.segment_train`, configured by :class:`wszoo.segmentation.SegmentTrainConfig`;
:func:`wszoo.segmentation.segment_eval`;
:func:`wszoo.segmentation.demo.segment_demo`)."""
import argparse
import json
from typing import Any

from .detect import add_demo_parser
from .flags import config_from_args, count_arg, dense_train_flags, output_defaults_to_resume, rank0, resolved_clip_flags

__all__ = ["add_parser", "run"]


def _train_parser(actions: Any) -> None:
    t = actions.add_parser("train", help="train a segmenter (torchvision's reference recipe's defaults)")
    t.add_argument("--data-dir", required=True, help="a VOC-layout root: JPEGImages/, SegmentationClass/, "
                                                     "ImageSets/Segmentation/{train,val}.txt")
    count_arg(t, "--num-classes", least=2, required=True, help="classes with the background: labels 0..K-1 (255: "
                                                                "ignored)")
    t.add_argument("--train-split", default="train")
    t.add_argument("--val-split", default="val", help="mIoU on it after every epoch picks best/")
    t.add_argument("--backbone", default="resnet50_gn_ws")
    t.add_argument("--output-stride", type=int, choices=[8, 16], default=8)
    count_arg(t, "--img-size", default=480, help="the training crops' side; val images' shorter side")
    dense_train_flags(t, epochs=30, batch_size=4, warmup_iters=0)
    t.set_defaults(func=run)


def add_parser(sub: Any) -> None:
    """The command's sub-parser, run by :func:`run`."""
    p = sub.add_parser("segment", help="train / evaluate a GN+WS DeepLabv3 on VOC-layout data (mIoU)")
    actions = p.add_subparsers(dest="action", required=True)
    _train_parser(actions)
    e = actions.add_parser("eval", help="mIoU, pixel accuracy and per-class IoU of a saved segmenter")
    e.add_argument("--checkpoint", required=True, help="a segmenter folder (runs/x/best)")
    e.add_argument("--data-dir", required=True, help="a VOC-layout root")
    e.add_argument("--split", default="val")
    count_arg(e, "--img-size", least=0, default=None,
              help="resize each image's shorter side to this (default: the trained size; 0: as it is)")
    count_arg(e, "-b", "--batch-size", default=8)
    e.add_argument("--amp", nargs="?", const="bf16", default=None, choices=["bf16", "fp16"])
    e.add_argument("--results-file", default=None, help="write the metrics here as JSON (its directory must exist)")
    e.set_defaults(func=run)
    add_demo_parser(actions, "segment", "train a GN+WS DeepLabv3 on Fashion-MNIST mosaics here (about two minutes "
                                        "on 2 CPU cores), score it, draw its masks", run)


def _eval(args: argparse.Namespace) -> int:
    from ..files import atomic_write_text, check_writable_parent
    from ..segmentation import format_metrics, segment_eval

    if args.results_file:  # before any work: a typo in the path must not cost an evaluation
        check_writable_parent(args.results_file, "--results-file")
    results = segment_eval(args.checkpoint, args.data_dir, args.split, batch_size=args.batch_size,
                           img_size=args.img_size, amp=args.amp)
    if not rank0():  # every rank has the summed figures; one copy of them
        return 0
    print(f"{results['dataset']}, {args.checkpoint}:\n{format_metrics(results)}")
    if args.results_file:
        atomic_write_text(args.results_file, json.dumps(results, indent=2) + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    import logging

    from ..segmentation import SegmentTrainConfig, segment_train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action == "eval":
        return _eval(args)
    if args.action == "demo":
        from ..segmentation.demo import segment_demo

        segment_demo(args.output, seed=args.seed, overwrite=args.overwrite, data_dir=args.data_dir)
        return 0
    output_defaults_to_resume(args)
    metrics = segment_train(config_from_args(SegmentTrainConfig, resolved_clip_flags(args)))
    if rank0():  # every rank returns the metrics; one copy of them on stdout
        print(json.dumps(metrics))
    return 0

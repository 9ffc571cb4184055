"""``wszoo detect train|eval|demo``: the GN+WS detection recipe on COCO-format data
(:func:`wszoo.detection.detect_train`, configured by :class:`wszoo.detection.DetectTrainConfig`;
:func:`wszoo.detection.detect_eval`; :func:`wszoo.detection.demo.detect_demo`)."""
import argparse
import json
from typing import Any, Callable

from .flags import config_from_args, count_arg, dense_train_flags, output_defaults_to_resume, rank0, resolved_clip_flags

__all__ = ["add_parser", "run", "add_demo_parser"]


def add_parser(sub: Any) -> None:
    """The command's sub-parser, run by :func:`run`."""
    p = sub.add_parser("detect", help="train / evaluate a GN+WS detector on COCO-format data (COCO AP by pycocotools)")
    actions = p.add_subparsers(dest="action", required=True)
    t = actions.add_parser("train", help="train a detector (the GN+WS recipe's defaults)")
    t.add_argument("--kind", choices=["fasterrcnn", "maskrcnn", "retinanet"], default="fasterrcnn")
    t.add_argument("--backbone", default="resnet50_gn_ws")
    t.add_argument("--train-images", required=True, help="the training images' folder")
    t.add_argument("--train-annotations", required=True, help="their COCO instances json")
    t.add_argument("--val-images", default=None, help="default: --train-images")
    t.add_argument("--val-annotations", default=None, help="a COCO instances json: box (and mask) AP every epoch")
    dense_train_flags(t, epochs=12, batch_size=2, warmup_iters=100)
    count_arg(t, "--frozen-stages", least=-1, default=None, help="default: 1 with published weights, else -1")
    count_arg(t, "--min-size", default=None, help="the detector's resize (torchvision's default 800)")
    count_arg(t, "--max-size", default=None, help="(torchvision's default 1333)")
    count_arg(t, "--rois-per-image", default=None,
              help="R-CNN box head samples per image (torchvision's default 512; the 4conv1fc GN+WS head's cost)")
    count_arg(t, "--test-proposals", default=None,
              help="RPN proposals per image in evaluation (torchvision's default 1000; few objects need fewer)")
    t.set_defaults(func=run)
    e = actions.add_parser("eval", help="COCO AP of a saved detector")
    e.add_argument("--checkpoint", required=True, help="a detector folder (runs/x/best)")
    e.add_argument("--images", required=True)
    e.add_argument("--annotations", required=True)
    count_arg(e, "-b", "--batch-size", default=2)
    e.set_defaults(func=run)
    add_demo_parser(actions, "detect", "train a GN+WS Faster R-CNN on Fashion-MNIST mosaics here (about two minutes on "
                                    "2 CPU cores), score it, draw its detections", run)


def add_demo_parser(actions: Any, command: str, help_text: str, func: Callable[[argparse.Namespace], int]) -> None:
    """``wszoo detect demo`` / ``wszoo segment demo``: the same flags, run by the command's ``func``."""
    d = actions.add_parser("demo", help=help_text)
    d.add_argument("--output", default=f"wszoo-{command}-demo",
                   help="folder for the mosaics, the run and predictions.png (default: %(default)s)")
    d.add_argument("--overwrite", action="store_true", help="replace the demo already in --output")
    d.add_argument("--seed", type=int, default=0, help="the mosaics' and the training run's seed")
    d.add_argument("--data-dir", default=None, help="the Fashion-MNIST idx files (default: Debian's "
                                                    "dataset-fashion-mnist folder)")
    d.set_defaults(func=func)


def run(args: argparse.Namespace) -> int:
    import logging

    from ..detection import DetectTrainConfig, detect_eval, detect_train, format_ap

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action == "demo":
        from ..detection.demo import detect_demo

        detect_demo(args.output, seed=args.seed, overwrite=args.overwrite, data_dir=args.data_dir)
        return 0
    if args.action == "train":
        if args.kind == "retinanet" and (args.rois_per_image or args.test_proposals):
            raise ValueError("--rois-per-image and --test-proposals set the R-CNN heads (sampled RoIs, RPN "
                             "proposals); a retinanet has neither: drop them")
        output_defaults_to_resume(args)
        metrics = detect_train(config_from_args(DetectTrainConfig, resolved_clip_flags(args)))
        if rank0():  # every rank returns the metrics; one copy of them on stdout
            print(json.dumps(metrics))
    else:
        print(format_ap(detect_eval(args.checkpoint, args.images, args.annotations, batch_size=args.batch_size)))
    return 0

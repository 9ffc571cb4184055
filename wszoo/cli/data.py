"""``wszoo data mosaic``: a detection and segmentation set made offline from Fashion-MNIST
(:func:`wszoo.tools.mosaic.write_mosaic`)."""
import argparse
from typing import Any

from .flags import count_arg

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """The command's sub-parser, run by :func:`run`."""
    p = sub.add_parser("data", help="make datasets offline; 'mosaic': Fashion-MNIST items on canvases, as COCO "
                                    "instances and VOC segmentation")
    actions = p.add_subparsers(dest="action", required=True)
    m = actions.add_parser("mosaic", help="Fashion-MNIST items scaled and placed on canvases (train from its train "
                                          "split, val from its test split)")
    m.add_argument("-o", "--output", required=True, help="the set's folder (created; refused if not empty)")
    count_arg(m, "--train", required=True, help="training canvases")
    count_arg(m, "--val", required=True, help="validation canvases")
    count_arg(m, "--size", least=32, default=128, help="canvas side in px")
    count_arg(m, "--seed", least=0, default=0)
    m.add_argument("--data-dir", default=None,
                   help="Fashion-MNIST's idx files (default: Debian's /usr/share/datasets/fashion-mnist)")
    m.add_argument("--overwrite", action="store_true", help="replace the set already in --output")
    m.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tools.mosaic import write_mosaic

    summary = write_mosaic(args.output, args.train, args.val, size=args.size, seed=args.seed,
                           data_dir=args.data_dir, overwrite=args.overwrite)
    for split, counts in summary["counts"].items():
        print(f"{split}: {counts['images']} images, {counts['instances']} instances (Fashion-MNIST "
              f"{counts['fashion_mnist_split']} items)")
    print(f"COCO instances in {args.output}/annotations, VOC segmentation in {args.output}/SegmentationClass")
    return 0

"""``wszoo export``: fold WS, export to ONNX / ExportedProgram / TorchScript, verify the artifact."""
import argparse
from typing import Any

import torch

from ..factory import create_model
from .flags import count_arg, ranged

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """The command's sub-parser, run by :func:`run`."""
    p = sub.add_parser("export", help="fold WS, export to ONNX / ExportedProgram / TorchScript, verify the artifact")
    p.add_argument("model", help="arch, arch.tag, hf-hub:..., local-dir:..., or fasterrcnn / maskrcnn / retinanet / "
                                 "deeplabv3 (built on --backbone)")
    p.add_argument("-o", "--output", required=True, help="out.onnx, out.pt2 or out.pt (the suffix gives the format)")
    p.add_argument("--format", choices=["onnx", "exported-program", "torchscript"], default=None)
    p.add_argument("--pretrained", action="store_true", help="load the published weights (a builder's backbone's)")
    p.add_argument("--checkpoint", default=None, help="a .safetensors file or a save_pretrained directory")
    p.add_argument("--backbone", default="resnet50_gn_ws", help="the builders' backbone (default resnet50_gn_ws)")
    count_arg(p, "--num-classes", least=0, default=None)
    count_arg(p, "--in-chans", default=None)
    count_arg(p, "--img-size", nargs="+", default=None, help="H [W] of the example (default: the cfg's input size)")
    count_arg(p, "-b", "--batch-size", default=1)
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (verified at 1 and 3)")
    p.add_argument("--dynamic-size", action="store_true", help="any image size, where the model allows it")
    count_arg(p, "--opset", least=7, default=None, help="ONNX opset (default 21; 17 for detectors)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    ranged(p, "--tolerance", type=float, default=None, low=0, low_open=True,
            help="largest relative difference to PyTorch accepted (default 1e-4 fp32, 1e-2 fp16, 5e-2 bf16)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=run)


def _model_for_export(args: argparse.Namespace) -> torch.nn.Module:
    """A registry model (any name create_model takes), or one of the dense-prediction builders on --backbone."""
    from ..detection import DETECTORS, build_detector, build_segmenter

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


def run(args: argparse.Namespace) -> int:
    """Export and verify (also on a real Fashion-MNIST test image, for the models that take them)."""
    from ..tools.deploy import export
    from ..training.data import fashion_mnist_check_image

    model = _model_for_export(args)
    report = export(model, args.output, format=args.format, img_size=args.img_size, batch_size=args.batch_size,
                    dynamic_batch=args.dynamic_batch, dynamic_size=args.dynamic_size, opset=args.opset,
                    dtype=args.dtype, tolerance=args.tolerance, force=args.force,
                    check_image=fashion_mnist_check_image(model))
    dynamic = [d for d, on in (("batch", args.dynamic_batch), ("height/width", args.dynamic_size)) if on]
    print(f"exported {args.model} to {report.path} ({report.format}"
          + (f" opset {report.opset}" if report.opset else "") + f", {report.dtype}, input "
          f"{report.inputs[0]['shape']}" + (f", dynamic {' and '.join(dynamic)}" if dynamic else "") + ")")
    print(f"verified: largest relative difference to PyTorch {report.max_rel_diff:.2g} (tolerance "
          f"{report.tolerance:g}; " + ", ".join(f"{k} {v:.2g}" for k, v in report.checks.items()) + ")")
    print(f"metadata: {report.metadata_path}")
    return 0

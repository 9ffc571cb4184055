"""``wszoo convert``: an original checkpoint (Haiku NFNet, PyTorch pickle) to safetensors."""
import argparse
from typing import Any

from .flags import count_arg, count_params, ranged

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """The command's sub-parser, run by :func:`run`."""
    p = sub.add_parser("convert", help="convert an original checkpoint to a safetensors state dict")
    p.add_argument("src", help="the original file, e.g. F0_haiku.npz or R-50-GN-WS.pth.tar")
    p.add_argument("--source", choices=["deepmind-nfnet", "pth"], required=True,
                   help="layout of SRC: DeepMind's Haiku NFNet parameters, or a PyTorch pickle in the model's "
                        "own key layout (GN+WS authors' .pth.tar, mmdetection copies), read weights-only")
    p.add_argument("--model", required=True, help="target architecture, e.g. dm_nfnet_f0 or resnet50_gn_ws.jhu_in1k")
    p.add_argument("-o", "--output", required=True,
                   help="a .safetensors file, or a directory for save_pretrained (weights, config.json, card)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    count_arg(p, "--num-classes", least=0, default=None)
    p.add_argument("--ws-style", default=None,
                   help="standardization formula of the built model (deepmind + --ws-eps 1e-4 = Haiku's)")
    ranged(p, "--ws-eps", "--std-conv-eps", type=float, default=None, low=0, low_open=True,
            help="the standardization's eps (timm's name: --std-conv-eps)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tools.convert_weights import convert_deepmind_nfnet, convert_torch_checkpoint

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
          f"{count_params(model):,} parameters)")
    return 0

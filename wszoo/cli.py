"""The ``wszoo`` command line (also ``python -m wszoo``).

Subcommands: ``list`` (the registry), ``info`` (one model: parameters, preprocessing, features, and an
optional timed forward pass), ``convert`` (original checkpoints to safetensors), ``card``
(MODEL_CARD.md from configs/), ``demo`` (what ``make demo`` runs).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional, Sequence

import torch

from . import registry
from .hub import PretrainedWeightsError

__all__ = ["main", "build_parser"]


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
    model = registry.create_model(args.model, num_classes=args.num_classes, checkpoint_path=args.checkpoint)
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
    names = registry.list_models()
    print(f"{len(names)} registered models:")
    for name in names:
        print(f"  {name}")
    smallest = {}
    for name in names:
        with torch.device("meta"):  # count parameters without allocating them
            size = _count_params(registry.create_model(name))
        family = registry.model_family(name)
        if family not in smallest or size < smallest[family][0]:
            smallest[family] = (size, name)
    families = {family: name for family, (_, name) in smallest.items()}
    torch.manual_seed(0)
    for family, name in sorted(families.items()):
        model = registry.create_model(name)
        report = _forward_report(model, [3, args.img_size, args.img_size], 1)
        print(
            f"{family}: {name} ({_count_params(model) / 1e6:.1f}M params) "
            f"input {report['input_shape']} -> logits {report['output_shape']} in {report['seconds']:.2f}s"
        )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_deepmind_nfnet, convert_torch_checkpoint

    overrides = {}
    if args.ws_style:
        overrides["ws_style"] = args.ws_style
    if args.std_conv_eps is not None:
        overrides["std_conv_eps"] = args.std_conv_eps
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    convert = convert_deepmind_nfnet if args.source == "deepmind-nfnet" else convert_torch_checkpoint
    model = convert(args.src, args.model, out=args.output, **overrides)
    print(f"converted {args.src} -> {args.output} ({type(model).__name__} {args.model}, "
          f"{_count_params(model):,} parameters)")
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .card import render_model_card

    text = render_model_card()
    path = Path(args.output)
    if args.check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            print(f"{path} is out of date: run `wszoo card -o {path}`", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wszoo", description="Weight Standardization model zoo")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered models")
    p.add_argument("filter", nargs="?", default="", help="shell wildcard, e.g. 'resnetv2_*'")
    p.add_argument("--pretrained", action="store_true", help="only names with weights, as arch.tag")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="describe one model (parameters, preprocessing, features)")
    p.add_argument("model", help="arch or arch.tag")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--checkpoint", default=None, help="local .safetensors state dict to load")
    p.add_argument("--forward", action="store_true", help="also run one forward pass on a random image")
    p.add_argument("--img-size", type=int, default=None, help="forward input size (default: the cfg's input_size)")
    p.add_argument("-b", "--batch-size", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("convert", help="convert an original checkpoint to a safetensors state dict")
    p.add_argument("src", help="the original file, e.g. F0_haiku.npz or R-50-GN-WS.pth.tar")
    p.add_argument("--source", choices=["deepmind-nfnet", "pth"], required=True,
                   help="layout of SRC: DeepMind's Haiku NFNet parameters, or a PyTorch pickle in the model's "
                        "own key layout (GN+WS authors' .pth.tar, mmdetection copies), read weights-only")
    p.add_argument("--model", required=True, help="target architecture, e.g. dm_nfnet_f0 or resnet50_gn_ws.jhu_in1k")
    p.add_argument("-o", "--output", required=True,
                   help="a .safetensors file, or a directory for save_pretrained (weights, config.json, card)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--ws-style", default=None,
                   help="standardization formula of the built model (deepmind + --std-conv-eps 1e-4 = Haiku's)")
    p.add_argument("--std-conv-eps", type=float, default=None)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("card", help="generate MODEL_CARD.md from configs/")
    p.add_argument("-o", "--output", default="MODEL_CARD.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    p.set_defaults(func=_cmd_card)

    p = sub.add_parser("demo", help="list the registry and run one model of every family")
    p.add_argument("--img-size", type=int, default=224)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (registry.UnknownModelError, ValueError, OSError, NotImplementedError, PretrainedWeightsError) as e:
        print(f"wszoo {args.command}: error: {e}", file=sys.stderr)
        return 2

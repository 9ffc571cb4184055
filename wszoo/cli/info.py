"""``wszoo info``: one model's parameters, preprocessing and feature levels, and a timed forward pass."""
import argparse
import json
from typing import Any

from .. import registry
from ..factory import create_model
from .flags import count_arg, count_params, forward_report

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """The command's sub-parser, run by :func:`run`."""
    p = sub.add_parser("info", help="describe one model (parameters, preprocessing, features)")
    p.add_argument("model", help="arch or arch.tag")
    count_arg(p, "--num-classes", least=0, default=None)
    p.add_argument("--checkpoint", default=None, help="local .safetensors state dict to load")
    p.add_argument("--forward", action="store_true", help="also run one forward pass on a random image")
    count_arg(p, "--img-size", default=None, help="forward input size (default: the cfg's input_size)")
    count_arg(p, "-b", "--batch-size", default=1)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print one model's parameters, preprocessing and feature levels (and time a forward pass)."""
    fixed = registry.get_pretrained_cfg(args.model).get("fixed_input_size") \
        if not args.model.startswith(("hf-hub:", "local-dir:")) else False
    kwargs = {"img_size": args.img_size} if fixed and args.forward and args.img_size else {}  # a ViT's token grid
    model = create_model(args.model, num_classes=args.num_classes, checkpoint_path=args.checkpoint, **kwargs)
    cfg = model.pretrained_cfg
    info = {
        "model": args.model,
        "class": type(model).__name__,
        "param_count": count_params(model),
        "num_features": model.num_features,
        "num_classes": model.num_classes,
        "feature_info": model.feature_info,
        "pretrained_cfg": cfg,
    }
    if args.forward:
        size = [model.in_chans, args.img_size, args.img_size] if args.img_size else list(cfg["input_size"])
        info["forward"] = forward_report(model, size, args.batch_size)
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

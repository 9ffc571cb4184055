"""``wszoo demo``: the registry, and one model of every family run on a random image."""
import argparse
from typing import Any

import torch

from .. import registry
from ..factory import create_model
from .flags import count_arg, count_params, forward_report

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """The command's sub-parser, run by :func:`run`."""
    p = sub.add_parser("demo", help="list the registry and run one model of every family")
    count_arg(p, "--img-size", default=224)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """List the registry, then build the smallest model of each family and run it on a random image."""
    from ..tools.card import param_count

    names = registry.list_models()
    print(f"{len(names)} registered models:")
    for name in names:
        print(f"  {name}")
    smallest = {}
    for name in names:
        size = param_count(name)  # built on the meta device: nothing allocated
        family = registry.model_family(name)
        if family not in smallest or size < smallest[family][0]:
            smallest[family] = (size, name)
    families = {family: name for family, (_, name) in smallest.items()}
    torch.manual_seed(0)
    for family, name in sorted(families.items()):
        model = create_model(name)
        fixed = model.in_chans != 3 or model.pretrained_cfg.get("fixed_input_size")  # (a ViT's token grid)
        size = model.pretrained_cfg["input_size"][-1] if fixed else args.img_size
        report = forward_report(model, [model.in_chans, size, size], 1)
        print(
            f"{family}: {name} ({count_params(model) / 1e6:.1f}M params) "
            f"input {report['input_shape']} -> logits {report['output_shape']} in {report['seconds']:.2f}s"
        )
    return 0

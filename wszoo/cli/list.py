"""``wszoo list``: the registered models (with ``--pretrained``, the published weights as arch.tag)."""
import argparse
import sys
from typing import Any

from .. import registry

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """The command's sub-parser, run by :func:`run`."""
    p = sub.add_parser("list", help="list registered models")
    p.add_argument("filter", nargs="?", default="", help="shell wildcard, e.g. 'resnetv2_*'")
    p.add_argument("--pretrained", action="store_true", help="only names with weights, as arch.tag")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = registry.list_models(args.filter or "", pretrained=args.pretrained)
    if not names:
        print(f"no model matches {args.filter!r}", file=sys.stderr)
        return 1
    for name in names:
        print(name)
    return 0

"""``wszoo card``: MODEL_CARD.md generated from configs/."""
import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """The command's sub-parser, run by :func:`run`."""
    p = sub.add_parser("card", help="generate MODEL_CARD.md from configs/")
    p.add_argument("-o", "--output", default="MODEL_CARD.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..files import atomic_write_text
    from ..tools.card import render_model_card

    text = render_model_card()
    path = Path(args.output)
    if args.check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            print(f"{path} is out of date: run `wszoo card -o {path}`", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    atomic_write_text(path, text)
    print(f"wrote {path}")
    return 0

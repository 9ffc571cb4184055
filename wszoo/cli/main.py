"""The ``wszoo`` command line (also ``python -m wszoo``): one module per command in this package, each with
``add_parser(sub)`` and ``run(args)``; :func:`main` parses, checks the ranged flags, runs the command and turns
expected errors into one line (exit 2), Ctrl-C into one line (exit 130).

Commands: ``list``, ``info``, ``eval``, ``finetune``, ``study``, ``bench``, ``convert``, ``export``, ``detect``,
``segment``, ``data``, ``card``, ``demo``.
"""
import argparse
import sys
from typing import List, Optional

from ..errors import Fix, FixableError
from ..hub import PretrainedWeightsError
from ..training.distributed import leave_process_group
from . import bench, card, convert, data, demo, detect, export, finetune, info, segment, study
from . import eval as eval_command
from . import list as list_command
from .flags import rank0

__all__ = ["main", "build_parser"]

#: The commands in the order ``wszoo -h`` lists them.
COMMANDS = (list_command, info, eval_command, finetune, study, bench, convert, export, detect, segment, data,
            card, demo)


#: Library parameters whose flag has another name (the flag's ``dest``); any other parameter's flag is its own name.
_PARAM_DESTS = {"checkpoint_path": "checkpoint", "model_name": "model"}


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with usage errors on one line (the usage text is one ``-h`` away), and the flag that
    spells a library parameter in an error's remedy."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} -h`)\n")

    def flag_for(self, fix: Fix) -> Optional[str]:
        """``fix`` as this command's flag (``--no-pretrained-backbone``, ``--checkpoint DIR``), or ``None`` when
        the command has no flag for it. (argparse keeps its actions in ``_actions`` only.)"""
        dest = _PARAM_DESTS.get(fix.param, fix.param)
        for action in (a for a in self._actions if a.dest == dest and a.option_strings):
            flag = max(action.option_strings, key=len)
            if fix.value is None:  # the parameter named alone
                return flag
            if action.nargs != 0:
                return f"{flag} {fix.typed_value()}"
            if repr(action.const) == fix.value:  # a switch: the one that sets the value
                return flag
        return None

    def command_parser(self, args: argparse.Namespace) -> "_Parser":
        """The sub-parser of the command that ran (``detect train``'s for ``wszoo detect train``)."""
        parser = self
        for name in (args.command, getattr(args, "action", None)):
            subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            if not name or not subparsers:
                break
            parser = subparsers[0].choices[name]
        return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``wszoo`` argument parser: one sub-parser per command."""
    parser = _Parser(prog="wszoo", description="Weight Standardization model zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _one_line(error: BaseException, parser: _Parser) -> str:
    """An expected error as one line, its remedies spelled as the command's flags. A DataLoader worker's error
    arrives with the worker's traceback in its message; the line that matters is the original error's, at the
    end."""
    text = error.render(parser.flag_for) if isinstance(error, FixableError) else str(error)
    text = text.strip() or type(error).__name__
    lines = text.splitlines()
    if "Original Traceback" in text:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return " ".join(line.strip() for line in lines)


def _report(line: str) -> None:
    """Print a one-line outcome; under torchrun only rank 0 does (every rank meets the same input errors)."""
    if rank0():
        print(line, file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one ``wszoo`` command. Expected errors (bad input, missing files, unknown models, unreachable
    weights) print one line and exit 2; Ctrl-C prints one line and exits 130; a diverged fine-tune exits 1.
    Only a bug prints a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = " ".join(["wszoo", args.command] + ([args.action] if getattr(args, "action", None) else []))
    try:
        for check in getattr(args, "ranges", None) or []:
            check.check(getattr(args, check.dest))
        return args.func(args)
    except KeyboardInterrupt:
        _report(f"{prefix}: interrupted")
        return 130
    except Exception as e:  # sorted below: our errors and the environment's are one line, the rest re-raised
        from ..training.run_dir import TrainingDiverged, TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            _report(f"{prefix}: {_one_line(e, parser.command_parser(args))}")
            return 130
        if isinstance(e, TrainingDiverged):
            _report(f"{prefix}: error: {_one_line(e, parser.command_parser(args))}")
            return 1
        if isinstance(e, (ValueError, OSError, NotImplementedError, PretrainedWeightsError)):
            _report(f"{prefix}: error: {_one_line(e, parser.command_parser(args))}")
            return 2
        raise
    finally:
        leave_process_group()

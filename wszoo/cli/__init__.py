"""The ``wszoo`` command line: :func:`main` (see :mod:`wszoo.cli.main`) and one module per command."""
from .main import build_parser, main

__all__ = ["main", "build_parser"]

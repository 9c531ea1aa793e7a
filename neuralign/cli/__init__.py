"""The ``neuralign`` command line (also ``python -m neuralign``): thin commands over the library and the study.

:mod:`neuralign.cli.app` holds the entry point, :mod:`neuralign.cli.parser` the option groups the commands share,
:mod:`neuralign.cli.commands` one module per command (its sub-parser and its body, registered in the module's
``COMMANDS``), :mod:`neuralign.cli.runfolder` the command's side of the run-folder policy (skip, resume, refuse).
:func:`main` answers ``neuralign --version`` before torch or the library is imported and hands every other command
line to :func:`neuralign.cli.app.main`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from neuralign.cli.parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``neuralign`` and ``python -m neuralign``; returns the exit status."""
    if list(sys.argv[1:] if argv is None else argv)[:1] == ["--version"]:
        # the full parser stops at a leading --version too, whatever follows: same output, same SystemExit(0)
        from neuralign._version import __version__

        version = argparse.ArgumentParser(prog="neuralign")
        version.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
        version.parse_args(["--version"])
    from neuralign.cli.app import main as run

    return run(argv)

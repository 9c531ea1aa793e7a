"""The ``neuralign`` command line (also ``python -m neuralign``): thin commands over the library and the study.

:mod:`neuralign.cli.app` holds the entry point, :mod:`neuralign.cli.parser` the options, :mod:`neuralign.cli.commands`
one module per command, :mod:`neuralign.cli.runfolder` the skip / resume / refuse policy of an output folder.
"""

from neuralign.cli.app import main
from neuralign.cli.parser import build_parser

__all__ = ["build_parser", "main"]

"""Deprecated module paths of the top floor (before 0.2 everything lived in ``neuralign.experiments``).

Each old module is a two-line alias that warns once and hands out the new module itself, so that
``from neuralign.experiments.study import StudyConfig`` keeps working for one release. The new module is imported
by name (``importlib``), so these aliases add no import edge from ``experiments`` up to ``study`` or ``cli``.
"""

from __future__ import annotations

import importlib
import sys
import warnings

__all__ = ["alias_module"]


def alias_module(old: str, new: str) -> None:
    """Make the module ``old`` an alias of ``new``, with a :class:`DeprecationWarning` naming the new path."""
    warnings.warn(f"{old} moved to {new} in neuralign 0.2; the old path will be removed in 0.3",
                  DeprecationWarning, stacklevel=3)  # fmt: skip
    sys.modules[old] = importlib.import_module(new)

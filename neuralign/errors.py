"""Domain exceptions and warnings of neuralign, in one place.

Every exception derives from :class:`NeuralignError`. Those that signal a wrong value also derive from
:class:`ValueError`, so ``except ValueError`` keeps working for callers that do not know this package.
"""

from __future__ import annotations

__all__ = [
    "NeuralignError",
    "SpecError",
    "ShapeMismatchError",
    "NonFiniteError",
    "CheckpointError",
    "DataError",
    "ConvergenceWarning",
]


class NeuralignError(Exception):
    """Base class of every exception raised by neuralign."""


class SpecError(NeuralignError, ValueError):
    """A permutation spec cannot be traced, built or validated (names the fx node, group or parameter)."""


class ShapeMismatchError(NeuralignError, ValueError):
    """Two state dicts (models, end points, checkpoints) differ in keys or shapes (names the first one)."""


class NonFiniteError(NeuralignError, ValueError):
    """A loss, gradient or activation is NaN or infinite (names the layer, group or quantity)."""


class CheckpointError(NeuralignError, ValueError):
    """A checkpoint or result file is missing, unreadable, or does not hold what was expected."""


class DataError(NeuralignError, ValueError):
    """A dataset is missing, corrupt, or mislabelled (says where it looked and what is wrong)."""


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before meeting its tolerance; the result carries ``status`` and ``message``."""

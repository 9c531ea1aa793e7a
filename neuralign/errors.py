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
    "WriteError",
    "DataError",
    "MissingDependencyError",
    "JobError",
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
    """A checkpoint or result file is missing, unreadable, or does not hold what was expected.

    The message is always one line: the lines of a multi-line text (such as an error passed through from torch)
    are joined with ``"; "``.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__("; ".join(line.strip() for line in str(message).splitlines() if line.strip()))


class WriteError(NeuralignError, OSError):
    """A result or checkpoint file could not be written (names the file and the cause, e.g. "No space left on
    device"); the previous file of that name, if any, is left in place.

    It derives from :class:`OSError` (with the ``errno`` of the failure) so that ``except OSError`` still catches it.
    """


class DataError(NeuralignError, ValueError):
    """A dataset is missing, corrupt, or mislabelled (says where it looked and what is wrong)."""


class MissingDependencyError(NeuralignError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it
    (``pip install 'neuralign[timm]'``)."""


class JobError(NeuralignError, RuntimeError):
    """A job of a study (a local process or a Slurm job) failed or was cancelled; rerunning the same command
    reruns only the stages whose outputs are missing."""


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before meeting its tolerance; the result carries ``status`` and ``message``."""

"""The one status code of every neuralign result (``result.status``), after ``scipy.optimize``'s convention.

Every result dataclass has ``converged`` (``status == Status.SUCCESS``), ``status`` and ``message`` (why it
stopped, in words). :class:`Status` is an :class:`~enum.IntEnum`, so ``result.status == 0`` keeps working.

>>> Status(2).name, Status.SUCCESS == 0
('CALLBACK', True)
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["Status"]


class Status(IntEnum):
    """Why a solver or loop stopped.

    SUCCESS (0)
        Solved or converged (exact solvers; iterative ones met their tolerance; loops ran their whole budget of
        epochs).
    MAX_ITER (1)
        The iteration budget ran out before the tolerance was met (a :class:`~neuralign.errors.ConvergenceWarning`
        says so).
    CALLBACK (2)
        The callback asked to stop.
    INACCURATE (3)
        The solver ended without an accurate solution (e.g. an LP solver's "optimal_inaccurate" or failure).
    """

    SUCCESS = 0
    MAX_ITER = 1
    CALLBACK = 2
    INACCURATE = 3

"""The one place where tensors cross to numpy, to call scipy and cvxpy.

Every other module of neuralign (in :mod:`neuralign.optim` and elsewhere) calls the functions of
:mod:`neuralign.optim`, which call the functions here. Inputs are copied to float64 numpy arrays on the CPU
and the results come back as tensors on the input's device (index tensors as ``torch.int64``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "to_numpy",
    "linear_sum_assignment",
    "installed_lp_solvers",
    "solve_birkhoff_lp",
    "LPSolution",
    "LP_SOLVER_PREFERENCE",
]

logger = logging.getLogger(__name__)

#: Order in which :func:`solve_birkhoff_lp` picks an installed cvxpy solver when none is named. HiGHS
# (simplex)
#: returns a vertex and exact duals; Clarabel (interior point) is the fallback.
LP_SOLVER_PREFERENCE: tuple[str, ...] = ("HIGHS", "CLARABEL", "SCIPY", "SCS", "OSQP")


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A float64 numpy copy of ``tensor`` on the CPU (the input is never modified)."""
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy().copy()


def linear_sum_assignment(cost: torch.Tensor, maximize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``scipy.optimize.linear_sum_assignment`` on a 2-D tensor; returns ``(row_ind, col_ind)`` as int64
    tensors.

    The input must already be validated (2-D, finite). The indices live on ``cost``'s device.
    """
    from scipy.optimize import linear_sum_assignment as _lsa

    rows, cols = _lsa(to_numpy(cost), maximize=bool(maximize))
    device = cost.device
    return (
        torch.as_tensor(rows, dtype=torch.int64).to(device),
        torch.as_tensor(cols, dtype=torch.int64).to(device),
    )


def installed_lp_solvers() -> list[str]:
    """The cvxpy solvers installed here that can solve a linear programme, in order of preference."""
    import cvxpy as cp

    installed = set(cp.installed_solvers())
    return [name for name in LP_SOLVER_PREFERENCE if name in installed]


@dataclass(frozen=True)
class LPSolution:
    """Raw solution of the Birkhoff LP as numpy arrays (internal; see ``solve_assignment_lp``)."""

    x: np.ndarray | None
    u: np.ndarray | None
    v: np.ndarray | None
    fun: float
    status: str
    solver: str
    n_iter: int | None


@contextlib.contextmanager
def _quiet_stdout():
    """Silence C-level writes to standard output (HiGHS prints a licence banner on first use, whatever its
    options say), so that a command line's standard output stays clean."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # captured or replaced stdout: nothing to protect
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, fd)
        os.close(saved)


def solve_birkhoff_lp(cost: torch.Tensor, solver: str | None = None) -> LPSolution:
    r"""Solve :math:`\min_X \langle C, X\rangle` s.t. :math:`X \ge 0,\ X\mathbf 1 = \mathbf 1,\ X^\top\mathbf
    1 = \mathbf 1` with cvxpy.

    Returns the primal ``x`` and the duals ``u`` (rows) and ``v`` (columns) with the sign convention of the
    dual programme :math:`\max \mathbf 1^\top u + \mathbf 1^\top v` s.t. :math:`u_i + v_j \le C_{ij}`. The
    input must already be validated (square, finite) and ``solver`` must be one of
    :func:`installed_lp_solvers`.
    """
    import cvxpy as cp

    name = solver if solver is not None else installed_lp_solvers()[0]
    c = to_numpy(cost)
    n = c.shape[0]
    X = cp.Variable((n, n), nonneg=True)
    rows = cp.sum(X, axis=1) == np.ones(n)
    cols = cp.sum(X, axis=0) == np.ones(n)
    problem = cp.Problem(cp.Minimize(cp.sum(cp.multiply(c, X))), [rows, cols])
    try:
        with _quiet_stdout():
            problem.solve(solver=name)
    except cp.error.SolverError as exc:
        logger.warning("cvxpy solver %s failed: %s", name, exc)
        return LPSolution(None, None, None, float("nan"), f"solver_error: {exc}", name, None)
    stats = problem.solver_stats
    n_iter = None if stats is None or stats.num_iters is None else int(stats.num_iters)
    x = None if X.value is None else np.asarray(X.value, dtype=np.float64)
    # cvxpy's equality duals enter the Lagrangian with the opposite sign of the textbook dual above.
    u = None if rows.dual_value is None else -np.asarray(rows.dual_value, dtype=np.float64).reshape(n)
    v = None if cols.dual_value is None else -np.asarray(cols.dual_value, dtype=np.float64).reshape(n)
    fun = float(problem.value) if problem.value is not None else float("nan")
    return LPSolution(x, u, v, fun, str(problem.status), name, n_iter)

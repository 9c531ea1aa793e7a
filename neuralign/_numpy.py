"""The one place where tensors cross to numpy: to call scipy and cvxpy, and at the boundary of the public solvers.

Every other module of neuralign (in :mod:`neuralign.optim` and elsewhere) calls the functions of
:mod:`neuralign.optim`, which call the functions here. Inputs are copied to float64 numpy arrays on the CPU
and the results come back as tensors on the input's device (index tensors as ``torch.int64``).

The public solvers of :mod:`neuralign.optim` accept numpy arrays and other array-likes and answer in the
caller's kind, as POT's backends do: :func:`accepts_arrays` converts the named array arguments with
:func:`as_tensor` and, when none of them was a ``torch.Tensor``, converts the result back with
:func:`to_caller_kind` (every tensor in it, also inside result dataclasses, lists and dicts, becomes a numpy
array; floats and ints stay as they are).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = [
    "as_tensor",
    "to_caller_kind",
    "accepts_arrays",
    "to_numpy",
    "linear_sum_assignment",
    "installed_lp_solvers",
    "solve_birkhoff_lp",
    "LPSolution",
    "LP_SOLVER_PREFERENCE",
    "student_t_quantile",
]

logger = logging.getLogger(__name__)

#: Order in which :func:`solve_birkhoff_lp` picks an installed cvxpy solver when none is named. HiGHS
# (simplex)
#: returns a vertex and exact duals; Clarabel (interior point) is the fallback.
LP_SOLVER_PREFERENCE: tuple[str, ...] = ("HIGHS", "CLARABEL", "SCIPY", "SCS", "OSQP")


_F = TypeVar("_F", bound=Callable[..., Any])


def as_tensor(value: object, arg: str, *, device: torch.device | None = None) -> torch.Tensor:
    """``value`` as a tensor: a ``torch.Tensor`` is returned as it is; a numpy array or another array-like of
    booleans or real numbers (nested lists, scalars) is copied into a new CPU tensor of the same dtype (or onto
    ``device``), so that the caller's array is never shared or modified.

    Raises
    ------
    TypeError
        If ``value`` is not a tensor and numpy cannot read it as an array of booleans or real numbers; the
        message names the argument ``arg``.
    """
    if isinstance(value, torch.Tensor):
        return value
    try:
        array = np.array(value, copy=True)
    except (TypeError, ValueError) as exc:  # ragged nested lists, objects numpy cannot read
        raise TypeError(f"`{arg}` must be a torch.Tensor or a numeric array-like, got {type(value).__name__}: "
                        f"{exc}") from None
    if array.dtype.kind not in "biuf":
        raise TypeError(
            f"`{arg}` must be a torch.Tensor or a numeric array-like, got {type(value).__name__} of dtype "
            f"{array.dtype}"
        )
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor if device is None else tensor.to(device)


def to_caller_kind(value: Any) -> Any:
    """``value`` with every tensor replaced by a numpy array (detached, on the CPU, same dtype): tensors, frozen
    result dataclasses (rebuilt with :func:`dataclasses.replace`), lists, tuples and dicts, recursively; anything
    else is returned as it is."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().resolve_conj().numpy()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: to_caller_kind(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **fields)
    if isinstance(value, dict):
        return {k: to_caller_kind(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_caller_kind(v) for v in value)
    return value


def accepts_arrays(*names: str) -> Callable[[_F], _F]:
    """Decorate a public solver so that the arguments ``names`` may be numpy arrays or array-likes.

    The named arguments that are given (and not ``None``) are converted with :func:`as_tensor`; array-likes go to
    the device of the first named argument that is a tensor, if any. When at least one named argument is given
    and none of them is a ``torch.Tensor``, the result is converted with :func:`to_caller_kind` (numpy in, numpy
    out); otherwise it is returned as the solver made it (torch in, torch out).
    """

    def decorate(fn: _F) -> _F:
        signature = inspect.signature(fn)
        missing = [name for name in names if name not in signature.parameters]
        if missing:
            raise TypeError(f"{fn.__qualname__} has no parameters {missing}")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                return fn(*args, **kwargs)  # let Python report the wrong call as usual
            given = [bound.arguments[n] for n in names if bound.arguments.get(n) is not None]
            device = next((v.device for v in given if isinstance(v, torch.Tensor)), None)
            numpy_out = bool(given) and device is None
            for n in names:
                if bound.arguments.get(n) is not None:
                    bound.arguments[n] = as_tensor(bound.arguments[n], n, device=device)
            result = fn(*bound.args, **bound.kwargs)
            return to_caller_kind(result) if numpy_out else result

        return wrapper  # type: ignore[return-value]

    return decorate


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


def student_t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t distribution with ``df`` degrees of freedom (``scipy.special.stdtrit``,
    which ``scipy.stats.t.ppf`` calls: importing ``scipy.stats`` would cost ~0.2 s more, once per process)."""
    from scipy.special import stdtrit

    return float(stdtrit(df, q))

"""Taylor tests of gradients: checks that fail when a gradient is wrong (after pymanopt's ``check_gradient``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["TaylorResult", "taylor_test"]


@dataclass(frozen=True)
class TaylorResult:
    """Outcome of :func:`taylor_test`.

    Attributes
    ----------
    steps : list of float
        The step sizes :math:`\\varepsilon`.
    errors : list of float
        :math:`|f(\\varepsilon) - f(0) - \\varepsilon\\, d|` for each step.
    slope : float
        Median slope of :math:`\\log e` against :math:`\\log \\varepsilon` between consecutive steps, over the
        six smallest steps whose error is above the rounding floor (2 for a correct gradient of a smooth function,
        1 for a wrong one).
    used : list of int
        Indices of the steps used in the fit.
    passed : bool
        ``slope >= min_slope``.
    min_slope : float
    message : str
    """

    steps: list[float]
    errors: list[float]
    slope: float
    used: list[int]
    passed: bool
    min_slope: float
    message: str

    def to_dict(self) -> dict:
        """JSON-able fields."""
        return {
            "steps": self.steps,
            "errors": self.errors,
            "slope": self.slope,
            "used": self.used,
            "passed": self.passed,
            "min_slope": self.min_slope,
            "message": self.message,
        }


def taylor_test(
    f: Callable[[float], float],
    directional_derivative: float,
    *,
    steps: Sequence[float] | None = None,
    min_slope: float = 1.8,
    noise_floor: float | None = None,
) -> TaylorResult:
    """Check a directional derivative by the second-order decay of the Taylor remainder.

    For :math:`g(\\varepsilon) = F(P + \\varepsilon D)` and the claimed derivative
    :math:`d = \\langle \\nabla F(P), D\\rangle`, the remainder

    .. math::  e(\\varepsilon) = |g(\\varepsilon) - g(0) - \\varepsilon d|

    is :math:`O(\\varepsilon^2)` if and only if :math:`d` is correct; a wrong :math:`d` leaves
    :math:`e(\\varepsilon) \\approx \\varepsilon |d - g'(0)|`, slope 1 on a log-log plot.

    Parameters
    ----------
    f : callable
        :math:`\\varepsilon \\mapsto g(\\varepsilon)` (evaluate in float64 for a wide usable range).
    directional_derivative : float
        The claimed :math:`d`.
    steps : sequence of float, optional
        Default ``logspace(-6, 0, 13)``.
    min_slope : float
        Smallest fitted slope accepted as second order.
    noise_floor : float, optional
        Errors below this are rounding noise and left out of the fit (default :math:`10^{3}` ulp of
        :math:`|g(0)|`).

    Returns
    -------
    TaylorResult

    References
    ----------
    .. [1] J. Townsend, N. Koep, S. Weichwald, "Pymanopt: A Python Toolbox for Optimization on Manifolds using
       Automatic Differentiation", JMLR 17(137), 2016, arXiv:1603.03236 (``tools.diagnostics.check_gradient``).

    Examples
    --------
    >>> import math
    >>> taylor_test(lambda e: math.exp(1.0 + e), math.exp(1.0)).passed
    True
    >>> taylor_test(lambda e: math.exp(1.0 + e), 1.1 * math.exp(1.0)).passed
    False
    """
    eps = [float(s) for s in (steps if steps is not None else np.logspace(-6, 0, 13))]
    if len(eps) < 3 or any(s <= 0 for s in eps):
        raise ValueError(f"`steps` must hold at least 3 positive step sizes, got {eps}")
    f0 = float(f(0.0))
    if not math.isfinite(f0) or not math.isfinite(directional_derivative):
        raise ValueError(f"the function value {f0} or the derivative {directional_derivative} is not finite")
    floor = noise_floor if noise_floor is not None else 1e3 * np.finfo(np.float64).eps * max(1.0, abs(f0))
    errors = [abs(float(f(s)) - f0 - s * directional_derivative) for s in eps]
    used = [i for i, e in enumerate(errors) if e > floor]
    if len(used) < 3:
        slope = float("nan")
        message = "fewer than 3 steps have a remainder above the rounding floor: the test cannot judge"
        return TaylorResult(eps, errors, slope, used, False, min_slope, message)
    # the smallest steps above the floor are the asymptotic regime; the median of consecutive slopes there is
    # robust to one step that crosses a kink of a ReLU network
    used = used[:6]
    x = np.log([eps[i] for i in used])
    y = np.log([errors[i] for i in used])
    slope = float(np.median(np.diff(y) / np.diff(x)))
    passed = slope >= min_slope
    message = (
        f"remainder decays with slope {slope:.2f} on a log-log plot "
        f"({'second order: gradient consistent' if passed else 'below ' + str(min_slope) + ': gradient wrong'})"
    )
    return TaylorResult(eps, errors, slope, used, passed, min_slope, message)

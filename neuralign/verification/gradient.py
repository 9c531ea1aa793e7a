"""Taylor tests of gradients: checks that fail when a gradient is wrong (after pymanopt's ``check_gradient``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["TaylorResult", "taylor_test"]

_WINDOW = 4  # consecutive steps (one decade at the default spacing) over which the asymptotic slope is fitted


@dataclass(frozen=True)
class TaylorResult:
    """Outcome of :func:`taylor_test`.

    Attributes
    ----------
    steps : list of float
        The step sizes :math:`\\varepsilon`, ascending.
    errors : list of float
        :math:`|f(\\varepsilon) - f(0) - \\varepsilon\\, d|` for each step.
    slope : float
        Least-squares slope of :math:`\\log e` against :math:`\\log \\varepsilon` over ``used`` (2 for a correct
        gradient of a smooth function, 1 for a wrong one); NaN when no window exists.
    used : list of int
        Indices of the steps of the fit: the smallest consecutive steps whose remainder is above the noise floor.
    verdict : str
        ``"pass"``, ``"fail"`` or ``"inconclusive"`` (see :func:`taylor_test`).
    relative_error : float
        :math:`\\operatorname{median}_{\\text{used}} (e / \\varepsilon) / |d|`: the size of a first-order part of
        the remainder relative to the derivative (the relative error of :math:`d` if the remainder is first order).
    min_slope, max_relative_error : float
        The thresholds.
    message : str
    """

    steps: list[float]
    errors: list[float]
    slope: float
    used: list[int]
    verdict: str
    relative_error: float
    min_slope: float
    max_relative_error: float
    message: str

    @property
    def passed(self) -> bool:
        """``verdict == "pass"``."""
        return self.verdict == "pass"

    def to_dict(self) -> dict:
        """JSON-able fields."""
        return {
            "steps": self.steps,
            "errors": self.errors,
            "slope": self.slope,
            "used": self.used,
            "verdict": self.verdict,
            "passed": self.passed,
            "relative_error": self.relative_error,
            "min_slope": self.min_slope,
            "max_relative_error": self.max_relative_error,
            "message": self.message,
        }


def taylor_test(
    f: Callable[[float], float],
    directional_derivative: float,
    *,
    steps: Sequence[float] | None = None,
    min_slope: float = 1.8,
    max_relative_error: float = 1e-3,
    noise_floor: float | None = None,
) -> TaylorResult:
    """Check a directional derivative by the second-order decay of the Taylor remainder.

    For :math:`g(\\varepsilon) = F(P + \\varepsilon D)` and the claimed derivative
    :math:`d = \\langle \\nabla F(P), D\\rangle`, the remainder

    .. math::  e(\\varepsilon) = |g(\\varepsilon) - g(0) - \\varepsilon d|

    is :math:`O(\\varepsilon^2)` if :math:`d` is correct and :math:`g` is smooth on :math:`[0, \\varepsilon]`; a
    wrong :math:`d` leaves :math:`e(\\varepsilon) \\approx \\varepsilon |d - g'(0)|`, slope 1 on a log-log plot.

    The slope is fitted where it means something: over the ``4`` smallest consecutive steps whose remainder is
    above the noise floor (below it the remainder is rounding; at larger steps a ReLU or max-pool network crosses
    kinks, which add first-order pieces to the remainder of a correct gradient). Verdicts:

    * ``"pass"``: slope :math:`\\ge` ``min_slope`` there (second order).
    * ``"fail"``: the remainder is not second order and its first-order part
      :math:`\\operatorname{median}(e/\\varepsilon)` is more than ``max_relative_error`` of :math:`|d|`: the
      derivative is off by about that fraction.
    * ``"inconclusive"``: no 3 consecutive steps above the noise floor, or a remainder that is not second order but
      whose first-order part is at most ``max_relative_error`` of :math:`|d|` (a kink within the smallest
      resolvable step looks exactly like that; so does a gradient error below the tolerance).

    A correct gradient therefore never fails unless a kink within the smallest resolvable step changes the slope by
    more than ``max_relative_error`` of :math:`|d|`.

    Parameters
    ----------
    f : callable
        :math:`\\varepsilon \\mapsto g(\\varepsilon)` (evaluate in float64 for a wide usable range).
    directional_derivative : float
        The claimed :math:`d`.
    steps : sequence of float, optional
        Default ``logspace(-8, 0, 25)`` (three per decade); sorted ascending.
    min_slope : float
        Smallest fitted slope accepted as second order.
    max_relative_error : float
        Largest first-order part of the remainder, relative to :math:`|d|`, that is not called a wrong gradient.
    noise_floor : float, optional
        Errors at or below this are rounding noise and left out of the fit (default :math:`10^{4}` ulp of
        :math:`\\max(1, |g(0)|)`: a float64 network sums many rounded terms).

    Returns
    -------
    TaylorResult

    Raises
    ------
    ValueError
        Fewer than 3 steps, a step that is not positive, or a non-finite :math:`g(0)` or :math:`d`.

    References
    ----------
    .. [1] J. Townsend, N. Koep, S. Weichwald, "Pymanopt: A Python Toolbox for Optimization on Manifolds using
       Automatic Differentiation", JMLR 17(137), 2016, arXiv:1603.03236 (``tools.diagnostics.check_gradient``).

    Examples
    --------
    >>> import math
    >>> taylor_test(lambda e: math.exp(1.0 + e), math.exp(1.0)).verdict
    'pass'
    >>> taylor_test(lambda e: math.exp(1.0 + e), 1.1 * math.exp(1.0)).verdict
    'fail'
    >>> taylor_test(lambda e: 1.0 + 2.0 * e, 2.0).verdict     # linear: the remainder is rounding only
    'inconclusive'
    """
    eps = sorted(float(s) for s in (steps if steps is not None else np.logspace(-8, 0, 25)))
    if len(eps) < 3 or any(s <= 0 for s in eps):
        raise ValueError(f"`steps` must hold at least 3 positive step sizes, got {eps}")
    f0 = float(f(0.0))
    d = float(directional_derivative)
    if not math.isfinite(f0) or not math.isfinite(d):
        raise ValueError(f"the function value {f0} or the derivative {d} is not finite")
    floor = noise_floor if noise_floor is not None else 1e4 * np.finfo(np.float64).eps * max(1.0, abs(f0))
    errors = [abs(float(f(s)) - f0 - s * d) for s in eps]
    above = [e > floor and math.isfinite(e) for e in errors]
    start = next((i for i in range(len(eps) - 2) if all(above[i : i + 3])), None)
    if start is None:
        message = "fewer than 3 consecutive steps have a remainder above the noise floor: the test cannot judge"
        return TaylorResult(eps, errors, math.nan, [], "inconclusive", math.nan, min_slope, max_relative_error,
                            message)  # fmt: skip
    used = [start]
    while len(used) < _WINDOW and used[-1] + 1 < len(eps) and above[used[-1] + 1]:
        used.append(used[-1] + 1)
    x = np.log([eps[i] for i in used])
    y = np.log([errors[i] for i in used])
    slope = float(np.polyfit(x, y, 1)[0])
    relative = float(np.median([errors[i] / eps[i] for i in used])) / abs(d) if d else math.inf
    window = f"steps {eps[used[0]]:.2g}-{eps[used[-1]]:.2g}"
    if slope >= min_slope:
        verdict = "pass"
        message = f"remainder decays with slope {slope:.2f} over {window} (second order: gradient consistent)"
    elif relative > max_relative_error:
        verdict = "fail"
        message = (
            f"remainder decays with slope {slope:.2f} over {window}, below {min_slope}, and its first-order part "
            f"is {relative:.2g} of |d| (above {max_relative_error:g}): gradient wrong"
        )
    else:
        verdict = "inconclusive"
        message = (
            f"remainder decays with slope {slope:.2f} over {window}, below {min_slope}, but its first-order part "
            f"is only {relative:.2g} of |d| (at most {max_relative_error:g}): a kink within the smallest resolvable "
            "step, or a gradient error below the tolerance"
        )
    return TaylorResult(eps, errors, slope, used, verdict, relative, min_slope, max_relative_error, message)

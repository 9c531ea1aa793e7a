"""Taylor tests of gradients: checks that fail when a gradient is wrong (after pymanopt's ``check_gradient``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from neuralign.verification._verdict import Verdict

__all__ = ["TaylorResult", "taylor_test"]

_WINDOW = 4  # consecutive steps (one decade at the default spacing) over which the asymptotic slope is fitted
_FIRST_ORDER = 1.4  # a fitted slope at most this is first order (a wrong gradient); between it and min_slope: mixed
# a remainder rising faster than this between two consecutive steps is a kink coming in, not a Taylor remainder
# (second order, third where the curvature vanishes): the fitted window stops before it
_KINK_SLOPE = 3.5


@dataclass(frozen=True)
class TaylorResult(Verdict):
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
        :math:`\\min_{\\text{used}} (e / \\varepsilon) / |d|`: the size of a first-order part of the remainder
        relative to the derivative (the relative error of :math:`d` if the remainder is first order).
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


def _value_eps(values: Sequence[float]) -> float:
    """Machine epsilon of the precision ``f`` computes in, read off its values: float16 / bfloat16 / float32 when
    every value is exactly representable there (a float64 computation almost never is), else float64."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and all(abs(v) <= 65504.0 and float(np.float16(v)) == v for v in finite):
        return float(np.finfo(np.float16).eps)
    if finite and all(float(np.float32(v)) == v for v in finite):
        if all(int(np.array(v, dtype=np.float32).view(np.uint32)) & 0xFFFF == 0 for v in finite):
            return 2.0**-7  # bfloat16: float32 with the low 16 bits of the mantissa zero
        return float(np.finfo(np.float32).eps)
    return float(np.finfo(np.float64).eps)


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
    kinks, which add first-order pieces to the remainder of a correct gradient), up to the first of them after the
    third where the remainder jumps (rises faster than :math:`\\varepsilon^{3.5}` from the step before: a kink
    coming in) if it decays at second order (``min_slope``) before it, so that the cut can decide a pass but never
    a fail. The default floor follows the
    rounding of ``f`` itself: 10 times the larger of 8 ulp of :math:`|g(0)|` in the precision ``f``
    computes in (float16, bfloat16, float32 or float64, read off its values) and the remainder measured at three
    steps 10^3 to 10^5 times below the smallest (where even a first-order remainder is 1000 times smaller than
    at the smallest step tested),
    so rounding is at most a tenth of every remainder fitted. Verdicts:

    * ``"pass"``: slope :math:`\\ge` ``min_slope`` there (second order) and :math:`e/\\varepsilon` at every
      fitted step is at most ``max_relative_error`` of :math:`|d|`, so that a gradient error of that size would
      show (a curvature of the opposite sign can cancel an error at one step, not over the window): a pass bounds
      the relative error of :math:`d` by about 1.6 ``max_relative_error``. Else a large second-order part could
      hide it: inconclusive.
    * ``"fail"``: the remainder is first order (slope at most 1.4), ``f`` computes in float64 (in lower
      precision rounding hides the steps below the first kink: inconclusive) and its first-order part, the smallest
      :math:`e/\\varepsilon` over the fitted steps, is more than ``max_relative_error`` of :math:`|d|`: the
      derivative is off by at least about that fraction (a kink adds to :math:`e/\\varepsilon` only beyond it,
      so the smallest steps bound the error of :math:`d` best; with :math:`d = 0` the part is absolute).
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
        Default ``logspace(-8, 0, 25)`` (three per decade); distinct, positive, finite; sorted ascending.
    min_slope : float
        Smallest fitted slope accepted as second order, in (1, 2].
    max_relative_error : float
        Largest first-order part of the remainder, relative to :math:`|d|`, that is not called a wrong gradient
        (positive).
    noise_floor : float, optional
        Errors at or below this are rounding noise and left out of the fit (non-negative; default: measured, as
        above).

    Returns
    -------
    TaylorResult

    Raises
    ------
    ValueError
        Fewer than 3 steps, a step that is not positive and finite, repeated steps, ``min_slope`` outside (1, 2],
        ``max_relative_error`` not positive, a negative ``noise_floor``, or a non-finite :math:`g(0)` or :math:`d`.

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
    if len(eps) < 3 or any(not (0 < s < math.inf) for s in eps):
        raise ValueError(f"`steps` must hold at least 3 positive finite step sizes, got {eps}")
    if len(set(eps)) != len(eps):
        raise ValueError(f"`steps` must be distinct, got {eps}")
    if not 1.0 < float(min_slope) <= 2.0:
        raise ValueError(f"`min_slope` must be in (1, 2] (1: a wrong gradient, 2: a correct one), got {min_slope}")
    if not 0 < float(max_relative_error) < math.inf:
        raise ValueError(f"`max_relative_error` must be positive and finite, got {max_relative_error}")
    if noise_floor is not None and not 0 <= float(noise_floor) < math.inf:
        raise ValueError(f"`noise_floor` must be finite and >= 0, got {noise_floor}")
    f0 = float(f(0.0))
    d = float(directional_derivative)
    if not math.isfinite(f0) or not math.isfinite(d):
        raise ValueError(f"the function value {f0} or the derivative {d} is not finite")
    values = [float(f(s)) for s in eps]
    errors = [abs(v - f0 - s * d) for s, v in zip(eps, values)]
    probes = [eps[0] * 10.0**-k for k in (3, 4, 5)]
    probe_values = [float(f(s)) for s in probes]
    unit = _value_eps([f0, *values, *probe_values])
    if noise_floor is None:
        rounding = 8 * unit * abs(f0)
        measured = max((abs(v - f0 - s * d) for s, v in zip(probes, probe_values)), default=0.0)
        floor = 10.0 * max(rounding, measured if math.isfinite(measured) else math.inf)
    else:
        floor = float(noise_floor)
    # a step whose value rounds to g(0) itself (the perturbation vanished in f's precision) says nothing
    above = [e > floor and math.isfinite(e) and v != f0 for e, v in zip(errors, values)]
    start = next((i for i in range(len(eps) - 2) if all(above[i : i + 3])), None)
    if start is None:
        message = (f"fewer than 3 consecutive steps have a remainder above the noise floor {floor:.2g}: the test "
                   "cannot judge")  # fmt: skip
        return TaylorResult(eps, errors, math.nan, [], "inconclusive", math.nan, min_slope, max_relative_error,
                            message)  # fmt: skip
    used = [start]
    while len(used) < _WINDOW and used[-1] + 1 < len(eps) and above[used[-1] + 1]:
        used.append(used[-1] + 1)
    def fitted(window: list[int]) -> float:
        return float(np.polyfit(np.log([eps[i] for i in window]), np.log([errors[i] for i in window]), 1)[0])

    slope = fitted(used)
    jumps = [k for k in range(3, len(used)) if math.log(errors[used[k]] / errors[used[k - 1]])
             > _KINK_SLOPE * math.log(eps[used[k]] / eps[used[k - 1]])]  # fmt: skip
    if jumps and fitted(used[: jumps[0]]) >= min_slope:  # second order up to a jump: fit there (a pass or not)
        used = used[: jumps[0]]
        slope = fitted(used)
    # the first-order part relative to |d| (absolute when d = 0): to call a fail, the smallest e/eps over the fitted
    # steps (kinks add to it only beyond them); to call a pass, the largest (a curvature of the opposite sign can
    # cancel a gradient error at one step, never over a window whose steps span a factor >= 4.6: then a pass means
    # |d - g'(0)| < 1.6 max_relative_error |d|)
    scale = abs(d) if d else 1.0
    relative = min(errors[i] / eps[i] for i in used) / scale
    resolved = max(errors[i] / eps[i] for i in used) / scale
    window = f"steps {eps[used[0]]:.2g}-{eps[used[-1]]:.2g}"
    low = unit > np.finfo(np.float64).eps  # f computes in float32 or less
    if slope >= min_slope and resolved <= max_relative_error:
        verdict = "pass"
        message = f"remainder decays with slope {slope:.2f} over {window} (second order: gradient consistent)"
    elif slope >= min_slope:
        verdict = "inconclusive"
        message = (
            f"remainder decays with slope {slope:.2f} over {window}, but the resolvable steps are so large that "
            f"their second-order part (up to {resolved:.2g} of |d|) could hide a gradient error above "
            f"{max_relative_error:g} (rounding of a large |g(0)|, or low precision): evaluate f in float64"
        )
    elif slope <= _FIRST_ORDER and relative > max_relative_error and low:
        verdict = "inconclusive"
        message = (
            f"remainder decays with slope {slope:.2f} over {window}, first order, but f computes in float32 or "
            "less: its rounding hides the small steps below the first ReLU/max-pool kinks, where a correct "
            "gradient's remainder is second order; evaluate f in float64 to tell a wrong gradient from kinks"
        )
    elif slope <= _FIRST_ORDER and relative > max_relative_error:
        verdict = "fail"
        message = (
            f"remainder decays with slope {slope:.2f} over {window}, below {min_slope}, and its first-order part "
            f"is {relative:.2g} of |d| (above {max_relative_error:g}): gradient wrong"
        )
    else:
        verdict = "inconclusive"
        message = (
            f"remainder decays with slope {slope:.2f} over {window}, between first order ({_FIRST_ORDER}) and "
            f"{min_slope}: neither a wrong gradient nor a clean second-order decay (higher-order terms or kinks)"
        ) if slope > _FIRST_ORDER else (
            f"remainder decays with slope {slope:.2f} over {window}, below {min_slope}, but its first-order part "
            f"is only {relative:.2g} of |d| (at most {max_relative_error:g}): a kink within the smallest resolvable "
            "step, or a gradient error below the tolerance"
        )
    return TaylorResult(eps, errors, slope, used, verdict, relative, min_slope, max_relative_error, message)

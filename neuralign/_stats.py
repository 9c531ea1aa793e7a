"""Statistics shared by PAM's local search and the verification checks: paired changes over held-out batches,
their Bonferroni-corrected one-sided test with Student's t, and the Wilson interval of a proportion.

>>> round(bonferroni_quantile(0.05, 1, 2), 3)  # one test, 2 batches: the 95% quantile of t with 1 dof
6.314
"""

from __future__ import annotations

import math

import torch

from neuralign._numpy import student_t_quantile

__all__ = ["bonferroni_quantile", "paired_change", "wilson_interval"]


def bonferroni_quantile(alpha: float, tests: int, batches: int) -> float:
    """One-sided critical value for ``tests`` simultaneous paired tests at family-wise level ``alpha``.

    A change is significant when ``mean + q * se < 0``, with ``mean`` and ``se`` the mean and standard error of
    the per-batch differences over ``batches`` paired batches (:func:`paired_change`). Under the null hypothesis
    (no change, normal batch differences) ``mean / se`` follows Student's t with ``batches - 1`` degrees of
    freedom, so ``q`` is its ``1 - alpha / tests`` quantile: with 4 batches and 128 tests at 5% it is 10.2, where
    the normal quantile (3.4) would call several random swaps significant. ``inf`` for fewer than 2 batches
    (no spread to judge a change by: nothing is significant).
    """
    if batches < 2:
        return math.inf
    return student_t_quantile(1.0 - alpha / max(1, tests), batches - 1)


def paired_change(after: torch.Tensor, before: torch.Tensor) -> tuple[float, float]:
    """Mean of the per-batch differences ``after - before`` and its standard error."""
    d = after - before
    se = float(d.std(correction=1) / d.numel() ** 0.5) if d.numel() > 1 else 0.0
    return float(d.mean()), se


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% for ``z = 1.96``).

    >>> lo, hi = wilson_interval(0, 40)
    >>> lo, round(hi, 3)
    (0.0, 0.088)
    """
    if trials <= 0:
        return (0.0, 1.0)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))

"""Validation of options at the public boundary, one helper per kind of value, so that every function says the same
thing in the same words.

The wrong kind of value (a string for an int, a bool for a number) raises ``TypeError``; a value of the right kind
outside its range raises ``ValueError``. Both messages name the argument, what was received and what was expected,
on one line. NumPy scalars count as numbers; bools never do.

>>> check_int(3, "epochs", minimum=1)
3
>>> check_real(0.5, "max_moved", low=0.0, high=1.0, low_open=True)
0.5
>>> check_int(0, "epochs", minimum=1)
Traceback (most recent call last):
...
ValueError: `epochs` must be a positive int, got 0
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Mapping
from typing import Any

__all__ = ["check_bool", "check_choice", "check_int", "check_real", "is_real"]


def _is_bool(value: Any) -> bool:
    kind = type(value)  # numpy.bool_ (named "bool" in NumPy 2) without importing numpy
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"))


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Real) and not _is_bool(value)


def _int_range(minimum: int | None) -> str:
    if minimum == 1:
        return "a positive int"
    return "an int" if minimum is None else f"an int >= {minimum}"


def check_int(value: Any, name: str, *, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """``value`` as an ``int`` (``None`` passes with ``allow_none``).

    Raises
    ------
    TypeError
        If it is not an integer (a bool, a float, a string).
    ValueError
        If it is below ``minimum``.
    """
    if value is None and allow_none:
        return None
    expected = _int_range(minimum) + (" or None" if allow_none else "")
    if not isinstance(value, numbers.Integral) or _is_bool(value):
        raise TypeError(f"`{name}` must be {expected}, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be {expected}, got {value!r}")
    return int(value)


def _real_range(low: float | None, high: float | None, low_open: bool, high_open: bool, finite: bool) -> str:
    kind = "a finite number" if finite else "a number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high:g}"
    return kind


def check_real(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
    allow_none: bool = False,
    hint: str = "",
) -> float | None:
    """``value`` as a ``float`` within the given bounds (``None`` passes with ``allow_none``; ``math.inf`` with
    ``allow_inf``; NaN never).

    Raises
    ------
    TypeError
        If it is not a real number.
    ValueError
        If it is NaN, infinite (without ``allow_inf``) or outside the bounds.
    """
    if value is None and allow_none:
        return None
    expected = _real_range(low, high, low_open, high_open, not allow_inf) + (" or None" if allow_none else "")
    expected += f" ({hint})" if hint else ""
    if not is_real(value):
        raise TypeError(f"`{name}` must be {expected}, got {type(value).__name__} {value!r}")
    number = float(value)
    bad = math.isnan(number) or (math.isinf(number) and not allow_inf)
    if low is not None:
        bad = bad or number < low or (low_open and number == low)
    if high is not None:
        bad = bad or number > high or (high_open and number == high)
    if bad:
        raise ValueError(f"`{name}` must be {expected}, got {value!r}")
    return number


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is a bool (NumPy's included).

    Raises
    ------
    TypeError
        For anything else (``1``, ``"yes"``).
    """
    if not _is_bool(value):
        raise TypeError(f"`{name}` must be a bool (True or False), got {type(value).__name__} {value!r}")
    return bool(value)


def check_choice(value: Any, name: str, choices: Collection[str]) -> str:
    """``value`` if it is one of ``choices``.

    Raises
    ------
    ValueError
        ``unknown <name> 'x'; expected one of [...]``.
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {sorted(choices)}")
    return value


def require_key(mapping: Any, key: str, where: str) -> Any:
    """``mapping[key]``; a ``TypeError`` if ``mapping`` (named ``where``) is not a dict, a ``ValueError`` naming
    ``where`` if it lacks ``key``."""
    if not isinstance(mapping, Mapping):
        raise TypeError(f"`{where}` must be a dict, got {type(mapping).__name__}")
    if key not in mapping:
        raise ValueError(f"`{where}` lacks the key {key!r}")
    return mapping[key]

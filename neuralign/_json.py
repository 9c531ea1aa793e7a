"""The one JSON codec of neuralign's result files (``results.json``, verification reports, stage records).

Strict JSON has no NaN or infinity: :func:`dumps` writes them as the strings ``"nan"``, ``"inf"`` and ``"-inf"``
and :func:`loads` reads every string equal to one of these three back as a float, wherever it is. Tuples become
lists, numpy and torch values plain numbers or lists, paths strings.

>>> loads(dumps({"barrier": float("inf"), "t": (0.0, 0.5)}))
{'barrier': inf, 't': [0.0, 0.5]}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["decode", "dumps", "encode", "loads"]

_SPECIAL = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def encode(obj: Any, where: str = "value") -> Any:
    """``obj`` as plain JSON data (non-finite floats as strings).

    Raises
    ------
    TypeError
        For a value that cannot be written as JSON (names where it is, from ``where``).
    """
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Mapping):
        return {str(k): encode(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays, torch tensors
    if callable(tolist):
        return encode(tolist(), where)
    raise TypeError(f"`{where}` is a {type(obj).__name__}, which cannot be written as JSON")


def decode(obj: Any) -> Any:
    """Inverse of :func:`encode` on parsed JSON: ``"nan"``, ``"inf"``, ``"-inf"`` become floats."""
    if isinstance(obj, str):
        return _SPECIAL.get(obj, obj)
    if isinstance(obj, dict):
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


def dumps(obj: Any, *, indent: int | None = 1, where: str = "value") -> str:
    """Strict JSON text of ``obj`` (see :func:`encode`)."""
    return json.dumps(encode(obj, where), indent=indent, allow_nan=False, ensure_ascii=False)


def loads(text: str) -> Any:
    """Parse JSON text and decode the non-finite floats (see :func:`decode`)."""
    return decode(json.loads(text))

"""QAPLIB files: the instances' text format, their best known solutions, and the two instances shipped with
neuralign.

A ``.dat`` file holds :math:`n`, then the flow matrix :math:`A` and the distance matrix :math:`B` (:math:`n \\times
n` each); a ``.sln`` file holds :math:`n`, the best known objective and the permutation, 1-based, in the convention
:math:`\\sum_{i,j} A_{ij} B_{p(i)p(j)}` (Burkard, Karisch, Rendl 1997). Numbers may be separated by white space or
commas.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from neuralign._numpy import accepts_arrays
from neuralign.errors import DataError
from neuralign.optim.birkhoff import is_permutation
from neuralign.optim.qap import qap_objective

__all__ = ["load_qaplib", "load_qaplib_solution", "qaplib_path"]

logger = logging.getLogger(__name__)


def _read_numbers(path: Path, what: str) -> list[float]:
    if not path.is_file():
        raise DataError(f"{what} file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} file {str(path)!r} could not be read as text: {exc}") from exc
    tokens = text.replace(",", " ").split()
    values = []
    for k, tok in enumerate(tokens):
        try:
            values.append(float(tok))
        except ValueError:
            raise DataError(f"{what} file {str(path)!r}: token {k} ({tok!r}) is not a number") from None
    return values


def _size(values: list[float], path: Path, what: str) -> int:
    if not values:
        raise DataError(f"{what} file {str(path)!r} is empty")
    n = values[0]
    if n != int(n) or n < 1:
        raise DataError(f"{what} file {str(path)!r} starts with {n!r}, expected the size n (a positive integer)")
    return int(n)


#: QAPLIB instances shipped in ``neuralign/optim/_data/qaplib`` (terms and provenance in ``QAPLIB.md`` there).
SHIPPED_QAPLIB = ("chr12c", "nug12")


def qaplib_path(name: str, *, solution: bool = False) -> Path:
    """Path of a QAPLIB instance shipped with neuralign (``.dat``, or its ``.sln`` with ``solution=True``).

    Two small instances ship (``chr12c``, ``nug12``; Burkard, Karisch & Rendl 1997, see ``QAPLIB.md`` beside them
    for provenance and terms); read them with :func:`load_qaplib` and :func:`load_qaplib_solution`.

    Raises
    ------
    ValueError
        If ``name`` is not one of the shipped instances.

    Examples
    --------
    >>> A, B = load_qaplib(qaplib_path("chr12c"))
    >>> load_qaplib_solution(qaplib_path("chr12c", solution=True), A=A, B=B)[0]
    11156.0
    """
    stem = Path(str(name)).stem
    if stem not in SHIPPED_QAPLIB:
        raise ValueError(f"unknown shipped QAPLIB instance {name!r}; expected one of {list(SHIPPED_QAPLIB)}")
    return Path(__file__).resolve().parent / "_data" / "qaplib" / f"{stem}.{'sln' if solution else 'dat'}"


def load_qaplib(path: str | os.PathLike, *, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a QAPLIB instance (``.dat``): ``n``, then the ``n x n`` matrix ``A``, then ``B`` (whitespace separated).

    Returns
    -------
    A, B : torch.Tensor
        ``(n, n)`` tensors of ``dtype``, with the objective ``sum_ij A[i, j] * B[p[i], p[j]]``.

    Raises
    ------
    DataError
        If the file is missing, not numeric, or does not hold exactly ``1 + 2 n^2`` numbers.
    """
    path = Path(path)
    values = _read_numbers(path, "QAPLIB instance")
    n = _size(values, path, "QAPLIB instance")
    expected = 1 + 2 * n * n
    if len(values) != expected:
        raise DataError(
            f"QAPLIB instance file {str(path)!r} holds {len(values)} numbers, expected 1 + 2*{n}^2 = {expected}"
        )
    data = torch.tensor(values[1:], dtype=torch.float64)
    A = data[: n * n].reshape(n, n).to(dtype)
    B = data[n * n :].reshape(n, n).to(dtype)
    return A, B


@accepts_arrays("A", "B")
def load_qaplib_solution(
    path: str | os.PathLike, *, A: torch.Tensor | None = None, B: torch.Tensor | None = None
) -> tuple[float, torch.Tensor]:
    """Read a QAPLIB solution (``.sln``): ``n``, the objective, then the 1-based permutation.

    Distributed copies are not all in one convention: a permutation of ``0..n-1`` (as in some copies of
    ``tai40a.sln``) is read as 0-based, and when the instance ``A, B`` is given the permutation is checked against
    the stated objective; if only its inverse attains it (as in some copies of ``nug30``, ``tai60a``, ``tai80a``),
    the inverse is returned. Both cases are logged as warnings.

    Parameters
    ----------
    path : path-like
        The ``.sln`` file.
    A, B : torch.Tensor or array-like, optional
        The instance (from :func:`load_qaplib`), to validate the permutation against the objective.

    Returns
    -------
    fun : float
        The optimal or best known objective.
    perm : torch.Tensor
        The permutation, 0-based int64, with ``qap_objective(A, B, perm) == fun`` when ``A, B`` are given.

    Raises
    ------
    DataError
        If the file is missing or malformed, the permutation is not one of ``1..n``, or (with ``A, B``) neither
        the permutation nor its inverse attains the stated objective, or the sizes differ.
    """
    path = Path(path)
    values = _read_numbers(path, "QAPLIB solution")
    n = _size(values, path, "QAPLIB solution")
    if len(values) != n + 2:
        raise DataError(f"QAPLIB solution file {str(path)!r} holds {len(values)} numbers, expected 2 + {n}")
    raw = values[2:]
    if any(v != int(v) for v in raw):
        raise DataError(f"QAPLIB solution file {str(path)!r}: the permutation holds non-integers")
    perm = torch.tensor([int(v) for v in raw], dtype=torch.int64)
    if is_permutation(perm):
        # 0..n-1 and 1..n cannot be confused
        logger.warning("QAPLIB solution file %r holds a 0-based permutation; read it as such", str(path))
    elif is_permutation(perm - 1):
        perm = perm - 1
    else:
        raise DataError(f"QAPLIB solution file {str(path)!r}: the permutation is not one of 1..{n}")
    fun = float(values[1])
    if A is not None or B is not None:
        if A is None or B is None:
            raise ValueError("give both `A` and `B` to validate the solution, or neither")
        if A.shape[0] != n:
            raise DataError(f"QAPLIB solution file {str(path)!r} is for n={n}, the instance has n={A.shape[0]}")
        if qap_objective(A, B, perm) != fun:
            inverse = torch.argsort(perm)
            if qap_objective(A, B, inverse) != fun:
                raise DataError(
                    f"QAPLIB solution file {str(path)!r}: its permutation has objective "
                    f"{qap_objective(A, B, perm):.10g} (its inverse {qap_objective(A, B, inverse):.10g}), "
                    f"not the stated {fun:.10g}"
                )
            logger.warning("QAPLIB solution file %r lists the inverse permutation; returned its inverse", str(path))
            perm = inverse
    return fun, perm

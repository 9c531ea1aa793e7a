r"""The quadratic assignment problem (QAP), solved by PAM over one permutation plus a 2-opt local search.

.. math::

    \min_{p \in S_n} \sum_{i,j} A_{ij} B_{p(i) p(j)} \;=\; \min_{P \in \Pi_n} \langle A, P B P^\top\rangle,
    \qquad P_{i, p(i)} = 1,

in the QAPLIB convention (Burkard, Karisch, Rendl 1997): :math:`A` is the flow matrix, :math:`B` the distance
matrix and facility :math:`i` goes to location :math:`p(i)`. The gradient is
:math:`\nabla F(P) = A P B^\top + A^\top P B` and is Lipschitz with :math:`L \le 2\|A\|_2\|B\|_2`.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuralign._numpy import accepts_arrays
from neuralign._options import renamed_keywords
from neuralign._utils import as_generator, as_seed, stable_seed
from neuralign.errors import ConvergenceWarning, DataError
from neuralign.optim.birkhoff import is_permutation
from neuralign.optim.pam import PAM, PermutationProblem
from neuralign.status import Status

__all__ = [
    "QAPResult",
    "QAPProblem",
    "TwoOptResult",
    "qap_objective",
    "local_search_2opt",
    "solve_qap",
    "load_qaplib",
    "load_qaplib_solution",
    "qaplib_path",
    "QAP_METHODS",
]

logger = logging.getLogger(__name__)


def _check_qap(A: object, B: object) -> tuple[torch.Tensor, torch.Tensor]:
    for name, M in (("A", A), ("B", B)):
        if not isinstance(M, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(M).__name__}")
        if M.dim() != 2 or M.shape[0] != M.shape[1]:
            raise ValueError(f"`{name}` must be a square matrix, got shape {tuple(M.shape)}")
        if M.is_complex() or M.dtype == torch.bool:
            raise TypeError(f"`{name}` must be real, got dtype {M.dtype}")
        if M.is_floating_point() and not bool(torch.isfinite(M).all()):
            raise ValueError(f"`{name}` holds NaN or infinite entries")
    if A.shape != B.shape:
        raise ValueError(f"`A` and `B` must have the same shape, got {tuple(A.shape)} and {tuple(B.shape)}")
    dtype = torch.promote_types(A.dtype, B.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64
    return A.to(dtype), B.to(dtype=dtype, device=A.device)


@accepts_arrays("A", "B", "perm")
def qap_objective(A: torch.Tensor, B: torch.Tensor, perm: torch.Tensor) -> float:
    r""":math:`\sum_{i,j} A_{ij} B_{p(i)p(j)}` in float64.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.0, 1.0], [2.0, 0.0]]); B = torch.tensor([[0.0, 3.0], [5.0, 0.0]])
    >>> qap_objective(A, B, torch.tensor([0, 1])), qap_objective(A, B, torch.tensor([1, 0]))
    (13.0, 11.0)
    """
    A, B = _check_qap(A, B)
    if not is_permutation(perm) or perm.numel() != A.shape[0]:
        raise ValueError(f"`perm` must be a permutation of 0..{A.shape[0] - 1}")
    p = perm.to(device=A.device, dtype=torch.int64)
    return float((A.to(torch.float64) * B.to(torch.float64)[p][:, p]).sum().item())


class QAPProblem(PermutationProblem):
    r"""The QAP as a :class:`~neuralign.optim.PermutationProblem`: one group ``"p"``, no continuous variable.

    :math:`F(P) = \langle A, P B P^\top\rangle`, :math:`\nabla F(P) = A P B^\top + A^\top P B`.

    Examples
    --------
    >>> import torch
    >>> prob = QAPProblem(torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.tensor([[0.0, 3.0], [5.0, 0.0]]))
    >>> prob.value([], {"p": torch.tensor([[0.0, 1.0], [1.0, 0.0]])})
    11.0
    """

    @accepts_arrays("A", "B")
    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        self.A, self.B = _check_qap(A, B)
        self.sizes = {"p": self.A.shape[0]}
        self.dtype = self.A.dtype

    def loss(self, x, P):
        Pm = P["p"].to(self.A.dtype)
        return (self.A * (Pm @ self.B @ Pm.T)).sum()

    def value(self, x, P):
        Pm = P["p"].detach().to(self.A.dtype)
        return float((self.A * (Pm @ self.B @ Pm.T)).sum().item())

    def gradient_p(self, x, P):
        Pm = P["p"].detach().to(self.A.dtype)
        return {"p": self.A @ Pm @ self.B.T + self.A.T @ Pm @ self.B}

    def lipschitz(self) -> float:
        r""":math:`2\|A\|_2\|B\|_2`, a Lipschitz constant of :math:`\nabla F`."""
        norm = torch.linalg.matrix_norm
        return 2.0 * float(norm(self.A, ord=2).item()) * float(norm(self.B, ord=2).item())


@dataclass(frozen=True)
class TwoOptResult:
    """Result of :func:`local_search_2opt`.

    Attributes
    ----------
    perm : torch.Tensor
        2-opt local minimum (int64).
    fun : float
        Its objective.
    n_iter : int
        Swaps made.
    converged : bool
        ``True`` when no improving swap is left (``False`` if ``max_iter`` stopped it).
    """

    perm: torch.Tensor
    fun: float
    n_iter: int
    converged: bool


def _swap_deltas(A: torch.Tensor, At: torch.Tensor, SA: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    r"""All :math:`\Delta_{rs} = F(p \circ (r\,s)) - F(p)` at once, with :math:`Q = B[p][:, p]`.

    Swapping :math:`p(r)` and :math:`p(s)` swaps rows and columns :math:`r, s` of :math:`Q`. Summing the changed
    terms over all rows and columns gives, with :math:`K = AQ^\top + A^\top Q`,

    .. math::

        \Delta_{rs} = K_{rs} + K_{sr} - K_{rr} - K_{ss}
        + (A_{rr} + A_{ss} - A_{rs} - A_{sr})(Q_{rr} + Q_{ss} - Q_{rs} - Q_{sr}),

    where the last product corrects the four entries :math:`(i, j) \in \{r, s\}^2` counted by the first part.
    ``SA`` is the precomputed first factor.
    """
    K = A @ Q.T + At @ Q
    dK = torch.diagonal(K)
    q = torch.diagonal(Q)
    SQ = (q[:, None] + q[None, :]) - (Q + Q.T)
    return (K + K.T) - (dK[:, None] + dK[None, :]) + SA * SQ


def _pair_factor(A: torch.Tensor) -> torch.Tensor:
    a = torch.diagonal(A)
    return (a[:, None] + a[None, :]) - (A + A.T)


def _two_opt(
    A: torch.Tensor, At: torch.Tensor, SA: torch.Tensor, B: torch.Tensor, p: torch.Tensor, eps: float, limit: int
) -> tuple[torch.Tensor, int, bool]:
    """Best-improvement 2-opt on validated inputs; returns (perm, swaps, converged)."""
    p = p.clone()
    n = p.numel()
    swaps = 0
    while swaps < limit:
        Q = B[p][:, p]
        delta = _swap_deltas(A, At, SA, Q)
        flat = int(torch.argmin(delta).item())
        r, s = divmod(flat, n)
        if not float(delta[r, s].item()) < -eps:
            return p, swaps, True
        p[[r, s]] = p[[s, r]]
        swaps += 1
    return p, swaps, n < 2


def _two_opt_tolerance(A: torch.Tensor, B: torch.Tensor) -> float:
    scale = float((A.abs().sum() * B.abs().max()).item())
    return 1e-12 * max(scale, 1e-300)


@accepts_arrays("A", "B", "perm")
def local_search_2opt(
    A: torch.Tensor, B: torch.Tensor, perm: torch.Tensor, *, max_iter: int | None = None
) -> TwoOptResult:
    r"""Best-improvement 2-opt for the QAP: repeatedly apply the pair swap :math:`p(r) \leftrightarrow p(s)` that
    lowers :math:`\sum_{ij} A_{ij}B_{p(i)p(j)}` most, until no swap improves.

    Parameters
    ----------
    A, B : torch.Tensor or array-like
        ``(n, n)`` flow and distance matrices.
    perm : torch.Tensor or array-like
        Starting permutation (not modified).
    max_iter : int, optional
        Maximum number of swaps (default :math:`n^2`... unbounded until a local minimum, at most ``100 n^2``).

    Returns
    -------
    TwoOptResult

    Notes
    -----
    The :math:`n(n-1)/2` swap gains are evaluated together in :math:`O(n^3)` flops (two matrix products and
    :math:`O(n^2)` elementwise work), i.e. :math:`O(n)` per swap, instead of :math:`O(n^2)` each. A swap is taken
    only if it gains more than :math:`10^{-12}` times the scale of the objective, so rounding cannot cycle.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.0, 5.0, 1.0], [5.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    >>> B = torch.tensor([[0.0, 1.0, 4.0], [1.0, 0.0, 4.0], [4.0, 4.0, 0.0]])
    >>> res = local_search_2opt(A, B, torch.tensor([0, 2, 1]))
    >>> res.fun, res.converged
    (26.0, True)
    """
    A, B = _check_qap(A, B)
    n = A.shape[0]
    if not is_permutation(perm) or perm.numel() != n:
        raise ValueError(f"`perm` must be a permutation of 0..{n - 1}")
    limit = 100 * n * n + 1 if max_iter is None else int(max_iter)
    p0 = perm.to(device=A.device, dtype=torch.int64)
    if n < 2:
        p, swaps, converged = p0.clone(), 0, True
    else:
        At = A.T.contiguous()
        p, swaps, converged = _two_opt(A, At, _pair_factor(A), B, p0, _two_opt_tolerance(A, B), limit)
    return TwoOptResult(perm=p, fun=qap_objective(A, B, p), n_iter=swaps, converged=converged)


@dataclass(frozen=True)
class QAPResult:
    """Result of :func:`solve_qap`.

    Attributes
    ----------
    perm : torch.Tensor
        Best permutation found (0-based int64): facility ``i`` at location ``perm[i]``.
    fun : float
        :math:`\\sum_{ij} A_{ij} B_{p(i)p(j)}` at ``perm``.
    n_iter : int
        PAM iterations summed over restarts.
    converged : bool
        Whether the best restart's run ended by itself: an iteration changed nothing, or the (deterministic)
        iterates revisited a permutation and would cycle from then on; for ``"2opt"``, no improving swap is left.
    status : Status
        0 converged, 1 the best restart hit ``max_iter`` (with a
        :class:`~neuralign.errors.ConvergenceWarning`).
    message : str
        Summary.
    history : list[float]
        Best objective after each restart.
    """

    perm: torch.Tensor
    fun: float
    n_iter: int
    converged: bool
    status: Status
    message: str
    history: list[float]


#: Methods of :func:`solve_qap`.
QAP_METHODS = ("pam", "2opt")


@accepts_arrays("A", "B")
def solve_qap(
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    method: str = "pam",
    restarts: int = 1,
    generator: torch.Generator | int | None = None,
    max_iter: int = 100,
    local_search: bool = True,
    lam: float | None = None,
    **renamed: Any,
) -> QAPResult:
    r"""Minimise :math:`\sum_{i,j} A_{ij} B_{p(i)p(j)}` over permutations :math:`p` (QAPLIB convention).

    .. math::

        \min_{P \in \Pi_n} \langle A, P B P^\top \rangle .

    ``method="pam"`` runs, from each of ``restarts`` random permutations, :class:`~neuralign.optim.PAM` on
    :class:`QAPProblem` with no continuous variable (``x_steps=0``) and linearised proximal P-steps

    .. math:: P_{k+1} = \arg\min_{P \in \Pi_n} \langle \nabla F(P_k) - P_k/\lambda, P\rangle,

    each followed (``local_search=True``) by a best-improvement 2-opt (:func:`local_search_2opt`) as PAM's
    ``local_search`` hook ("a local search on the P-step"); it stops when an iteration changes nothing or when the
    deterministic iterates revisit a permutation (they would cycle from then on), and keeps the best iterate.
    Without ``local_search`` the 2-opt runs once on that best iterate. ``method="2opt"`` is the 2-opt alone from
    the same random starts. The best restart is returned.

    Parameters
    ----------
    A, B : torch.Tensor or array-like
        ``(n, n)`` real matrices (flow, distance).
    method : {"pam", "2opt"}
        Algorithm.
    restarts : int
        Number of random starts (at least 1); restart ``r`` starts from a permutation drawn with seed
        ``stable_seed("qap", generator, r)``.
    generator : torch.Generator or int, optional
        The base seed of the restarts: an int, a draw from the generator, or (default) a draw from torch's global
        RNG (``seed=`` before 0.2, still accepted with a :class:`DeprecationWarning`).
    max_iter : int
        PAM iterations per restart.
    local_search : bool
        Run the 2-opt after every P-step.
    lam : float, optional
        P proximal parameter. Default :math:`4/L` with :math:`L = 2\|A\|_2\|B\|_2`: beyond the monotone range
        :math:`\lambda < 1/L`, where the linearised step would hardly ever leave :math:`P_k`; the 2-opt restores
        descent and the best iterate is kept.

    Returns
    -------
    QAPResult

    Raises
    ------
    ValueError
        For non-square or mismatched matrices, an unknown ``method`` or ``restarts < 1``.

    References
    ----------
    .. [1] R. E. Burkard, S. E. Karisch, F. Rendl, "QAPLIB – a quadratic assignment problem library", J. Global
       Optim. 10, 1997.
    .. [2] J. Bolte, S. Sabach, M. Teboulle, "Proximal alternating linearized minimization for nonconvex and
       nonsmooth problems", Math. Program. 146, 2014.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.0, 5.0, 1.0], [5.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    >>> B = torch.tensor([[0.0, 1.0, 4.0], [1.0, 0.0, 4.0], [4.0, 4.0, 0.0]])
    >>> res = solve_qap(A, B, restarts=2, generator=0)
    >>> res.fun, res.status
    (26.0, <Status.SUCCESS: 0>)
    """
    A, B = _check_qap(A, B)
    if method not in QAP_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(QAP_METHODS)}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"`restarts` must be a positive int, got {restarts!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"`max_iter` must be a positive int, got {max_iter!r}")
    n = A.shape[0]
    problem = QAPProblem(A, B)
    if lam is None:
        L = problem.lipschitz()
        lam = 1000.0 * n / L if L > 0 else math.inf
    generator = renamed_keywords(renamed, {"seed": "generator"}, where="solve_qap").get("generator", generator)
    base = as_seed(generator)

    At, SA, eps = A.T.contiguous(), _pair_factor(A), _two_opt_tolerance(A, B)

    def hook(x, perms):
        return {"p": _two_opt(A, At, SA, B, perms["p"], eps, 100 * n * n + 1)[0]}

    best_perm: torch.Tensor | None = None
    best_fun = math.inf
    best_status = Status.SUCCESS
    total_iter = 0
    history: list[float] = []
    for r in range(restarts):
        gen = as_generator(stable_seed("qap", base, r))
        p0 = torch.randperm(n, generator=gen).to(A.device)
        if method == "2opt" or n < 2:
            two = local_search_2opt(A, B, p0)
            perm, fun, iters = two.perm, two.fun, two.n_iter
            status = Status.SUCCESS if two.converged else Status.MAX_ITER
        else:
            solver = PAM(problem, [], {"p": p0}, method="linearized", lam=lam, x_steps=0, generator=gen,
                         local_search=hook if local_search else None)
            # PAM's iterates need not decrease for lam > 1/L: keep the best one seen. The step is deterministic,
            # so revisiting a permutation means the iterates cycle from then on: stop there.
            seen = {"fun": solver.history[0], "perm": p0, "visited": {tuple(p0.tolist())}, "cycle": False}

            def track(state, seen=seen):
                if state.fun < seen["fun"]:
                    seen["fun"], seen["perm"] = state.fun, state.perms["p"]
                key = tuple(state.perms["p"].tolist())
                if key in seen["visited"]:
                    seen["cycle"] = True
                    return True
                seen["visited"].add(key)
                return False

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                res = solver.run(max_iter=max_iter, tol=0.0, callback=track)
            perm = seen["perm"]
            if not local_search:
                perm = local_search_2opt(A, B, perm).perm
            status = Status.SUCCESS if res.status == Status.SUCCESS or seen["cycle"] else Status.MAX_ITER
            fun, iters = qap_objective(A, B, perm), res.n_iter
        total_iter += iters
        logger.debug("QAP restart %d: %.6g (%d iterations)", r, fun, iters)
        if fun < best_fun:
            best_perm, best_fun, best_status = perm, fun, status
        history.append(best_fun)
    assert best_perm is not None
    message = f"best of {restarts} restart(s) of {method}: {best_fun:.10g}"
    if best_status == Status.MAX_ITER:
        message += f" (the best restart hit max_iter={max_iter})"
        warnings.warn(f"solve_qap: {message}; try a larger `max_iter` or a smaller `lam`", ConvergenceWarning,
                      stacklevel=2)
    return QAPResult(
        perm=best_perm,
        fun=best_fun,
        n_iter=total_iter,
        converged=best_status == 0,
        status=best_status,
        message=message,
        history=history,
    )


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

r"""The quadratic assignment problem (QAP): robust tabu search, 2-opt, and PAM over one permutation with a local
search on its P-step.

.. math::

    \min_{p \in S_n} \sum_{i,j} A_{ij} B_{p(i) p(j)} \;=\; \min_{P \in \Pi_n} \langle A, P B P^\top\rangle,
    \qquad P_{i, p(i)} = 1,

in the QAPLIB convention (Burkard, Karisch, Rendl 1997): :math:`A` is the flow matrix, :math:`B` the distance
matrix and facility :math:`i` goes to location :math:`p(i)`. The gradient is
:math:`\nabla F(P) = A P B^\top + A^\top P B` and is Lipschitz with :math:`L \le 2\|A\|_2\|B\|_2`.

The swap-move kernels of the tabu search and the 2-opt are compiled with numba (:mod:`neuralign.optim._swaps`,
which says why) and imported on first use.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from neuralign._numpy import accepts_arrays, to_numpy
from neuralign._options import renamed_keywords
from neuralign._utils import as_generator, as_seed, stable_seed
from neuralign._validate import check_choice, check_int, check_real
from neuralign.errors import ConvergenceWarning
from neuralign.optim.birkhoff import is_permutation
from neuralign.optim.pam import PAM, PermutationProblem
from neuralign.status import Status

__all__ = [
    "QAPResult",
    "QAPProblem",
    "TwoOptResult",
    "qap_objective",
    "local_search_2opt",
    "tabu_search",
    "solve_qap",
    "QAP_METHODS",
    "QAP_LOCAL_SEARCHES",
    "TABU_ITERATIONS",
]

logger = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])


#: Problems up to this size run their torch work on one thread (:func:`_small_on_one_thread`).
_SMALL = 512


def _small_on_one_thread(fn: _F) -> _F:
    """Run a public solver on a problem of at most :data:`_SMALL` units with torch on the calling thread only,
    restoring the setting after: torch's intra-op pool gains nothing on matrices this small and, when other work
    takes the cores, its threads spin. Not thread-safe: the setting is global to the process."""

    @functools.wraps(fn)
    def wrapper(A: Any, B: Any, *args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        n = A.shape[0] if isinstance(A, torch.Tensor) and A.dim() else 0
        if n > _SMALL or threads == 1:
            return fn(A, B, *args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(A, B, *args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper  # type: ignore[return-value]


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
    elif dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # no linear algebra below single precision
    if A.numel() and not math.isfinite(float(A.double().abs().sum()) * float(B.double().abs().max())):
        raise ValueError("`A` and `B` are too large: the objective's scale sum|A| * max|B| overflows float64; scale "
                         "them down")  # fmt: skip
    return A.to(dtype), B.to(dtype=dtype, device=A.device)


@accepts_arrays("A", "B", "perm")
@_small_on_one_thread
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


# The compiled kernels run in chunks of iterations, the clock read between them (numba cannot read it): the first
# chunk is _FIRST_CHUNK iterations, each next one as many as take about _CHUNK_SECONDS at the rate measured so far
# (fewer when the deadline is nearer), so that a time limit is overshot by a few milliseconds at most, whatever n.
_FIRST_CHUNK = 8
_CHUNK_SECONDS = 0.002


class _Chunks:
    """Sizes of successive kernel calls toward ``deadline`` (``time.perf_counter``)."""

    def __init__(self, deadline: float) -> None:
        self.deadline, self.size, self.rate = deadline, _FIRST_CHUNK, 0.0

    def late(self) -> bool:
        return time.perf_counter() >= self.deadline

    def next(self, remaining: int) -> int:
        steps = self.size
        if self.rate and math.isfinite(self.deadline):
            steps = min(steps, max(1, int(self.rate * (self.deadline - time.perf_counter()))))
        return max(1, min(steps, remaining))

    def run(self, kernel: Any, *args: Any, steps: int) -> int:
        start = time.perf_counter()
        made = kernel(*args, steps)
        if made:
            self.rate = made / max(time.perf_counter() - start, 1e-7)
            self.size = max(1, int(self.rate * _CHUNK_SECONDS))
        return made


def _kernels() -> Any:
    from neuralign.optim import _swaps  # numba compiles (or loads from its cache) on first use

    return _swaps


def _tolerance(A: np.ndarray, B: np.ndarray) -> float:
    """Moves must gain more than this to count as improving: :math:`10^{-12}` of the objective's scale, so that
    rounding cannot make a local search cycle."""
    return 1e-12 * max(float(np.abs(A).sum() * np.abs(B).max()), 1e-300)


_Matrices = tuple[np.ndarray, np.ndarray, np.ndarray]


def _as_arrays(A: torch.Tensor, B: torch.Tensor) -> _Matrices:
    """``(A, A^T, B)`` as C-contiguous float64 arrays, the form the kernels read."""
    An, Bn = to_numpy(A), to_numpy(B)
    return np.ascontiguousarray(An), np.ascontiguousarray(An.T), np.ascontiguousarray(Bn)


def _permuted(B: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:math:`Q = B_{p,p}` and its transpose, C-contiguous: the kernels keep them up to date with ``p``."""
    Q = B[np.ix_(p, p)]
    return Q, np.ascontiguousarray(Q.T)


def _two_opt(mats: _Matrices, p: np.ndarray, *, max_swaps: int, deadline: float) -> tuple[np.ndarray, int, str]:
    """Best-improvement 2-opt from ``p`` (not modified): ``(perm, swaps, why)``, ``why`` one of ``"converged"``
    (no improving swap left), ``"max_iter"`` and ``"time_limit"``."""
    K = _kernels()
    A, At, B = mats
    p = p.astype(np.int64, copy=True)
    n = p.size
    if n < 2:
        return p, 0, "converged"
    Q, Qt = _permuted(B, p)
    D = np.empty((n, n))
    K.all_values(A, At, Q, Qt, D)
    work = np.empty((4, n))
    eps = _tolerance(A, B)
    chunks = _Chunks(deadline)
    swaps = 0
    while swaps < max_swaps:
        if chunks.late():
            return p, swaps, "time_limit"
        steps = chunks.next(max_swaps - swaps)
        made = chunks.run(K.two_opt_chunk, A, At, p, Q, Qt, D, work, eps, steps=steps)
        swaps += made
        if made < steps:
            return p, swaps, "converged"
    return p, swaps, "max_iter" if D[np.triu_indices(n, 1)].min() < -eps else "converged"


def _tabu(
    mats: _Matrices,
    p: np.ndarray,
    *,
    rng: np.random.Generator,
    max_iter: int,
    tenure: tuple[int, int],
    aspiration: float,
    deadline: float,
    target: float,
) -> tuple[np.ndarray, float, int, str]:
    """Robust tabu search from ``p`` (not modified): ``(best perm, its objective, iterations, why)``, ``why`` one
    of ``"max_iter"``, ``"time_limit"`` and ``"target"``; see :func:`tabu_search`."""
    K = _kernels()
    A, At, B = mats
    p = p.astype(np.int64, copy=True)
    n = p.size
    Q, Qt = _permuted(B, p)
    current = K.objective(A, Q)
    if current <= target:
        return p, current, 0, "target"
    if n < 2:
        return p, current, 0, "max_iter"
    D = np.empty((n, n))
    K.all_values(A, At, Q, Qt, D)
    work, barred, left = np.empty((4, n)), np.zeros((n, n)), np.zeros((n, n))
    best_p = p.copy()
    state = np.array([0.0, current, current])
    t_min, t_max = tenure
    period = 2 * t_max
    lengths: list[int] = []  # the tenure of each block of `period` iterations, drawn in order
    eps = _tolerance(A, B)
    chunks = _Chunks(deadline)
    it, why = 0, "max_iter"
    while it < max_iter:
        if state[2] <= target:
            why = "target"
            break
        if chunks.late():
            why = "time_limit"
            break
        steps = chunks.next(max_iter - it)
        last = (it + steps - 1) // period
        lengths += [int(rng.integers(t_min, t_max + 1)) for _ in range(last + 1 - len(lengths))]
        blocks = np.array(lengths[it // period : last + 1], dtype=np.float64)
        chunks.run(K.tabu_chunk, A, At, p, Q, Qt, D, work, barred, left, best_p, state, blocks, period,
                   float(aspiration), eps, float(target), steps=steps)  # fmt: skip
        it = int(state[0])
    if why == "max_iter" and state[2] <= target:
        why = "target"
    return best_p, K.objective(A, _permuted(B, best_p)[0]), it, why


def _check_budget(max_iter: Any, time_limit: Any, target: Any) -> tuple[int | None, float, float]:
    max_iter = check_int(max_iter, "max_iter", minimum=1, allow_none=True)
    time_limit = check_real(time_limit, "time_limit", low=0.0, low_open=True, allow_none=True)
    target = check_real(target, "target", allow_none=True)
    deadline = math.inf if time_limit is None else time.perf_counter() + float(time_limit)
    return max_iter, deadline, -math.inf if target is None else float(target)


def _check_tenure(tenure: Any, aspiration: Any, n: int) -> tuple[tuple[int, int], float]:
    if tenure is None:
        tenure = (max(1, math.floor(0.9 * n)), max(1, math.ceil(1.1 * n)))
    if not isinstance(tenure, (tuple, list)) or len(tenure) != 2:
        raise TypeError(f"`tenure` must be a pair (t_min, t_max) of iterations, got {tenure!r}")
    t_min = check_int(tenure[0], "tenure[0]", minimum=1)
    t_max = check_int(tenure[1], "tenure[1]", minimum=1)
    if t_min > t_max:
        raise ValueError(f"`tenure` must have t_min <= t_max, got {tuple(tenure)!r}")
    aspiration = check_real(5.0 * n * n if aspiration is None else aspiration, "aspiration", low=0.0)
    return (t_min, t_max), float(aspiration)


def _check_perm(perm: torch.Tensor, n: int) -> np.ndarray:
    if not is_permutation(perm) or perm.numel() != n:
        raise ValueError(f"`perm` must be a permutation of 0..{n - 1}")
    return perm.detach().cpu().numpy().astype(np.int64)


def _as_perm(p: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(p, dtype=torch.int64).to(like.device)


@accepts_arrays("A", "B", "perm")
@_small_on_one_thread
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
        Maximum number of swaps (default :math:`100 n^2`).

    Returns
    -------
    TwoOptResult

    Raises
    ------
    ValueError
        For non-square or mismatched matrices, entries that are not finite or so large that the objective would
        overflow float64, or a ``perm`` that is not a permutation of ``0..n-1``.

    Notes
    -----
    The swap values are computed once in :math:`O(n^3)`, then kept up to date in :math:`O(n^2)` per swap
    (Taillard's :math:`O(1)` update of the moves disjoint from the last one, [1]_); a compiled loop on the calling
    thread. A swap is taken only if it gains more than :math:`10^{-12}` times the scale of the objective, so rounding
    cannot cycle; ties go to the first pair :math:`(r, s)`, :math:`r < s`, in row-major order.

    References
    ----------
    .. [1] E. Taillard, "Robust taboo search for the quadratic assignment problem", Parallel Computing 17, 1991.

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
    p0 = _check_perm(perm, n)
    limit = 100 * n * n if max_iter is None else check_int(max_iter, "max_iter", minimum=0)
    p, swaps, why = _two_opt(_as_arrays(A, B), p0, max_swaps=limit, deadline=math.inf)
    perm_out = _as_perm(p, A)
    return TwoOptResult(perm=perm_out, fun=qap_objective(A, B, perm_out), n_iter=swaps, converged=why == "converged")


@dataclass(frozen=True)
class QAPResult:
    """Result of :func:`solve_qap` and :func:`tabu_search`.

    Attributes
    ----------
    perm : torch.Tensor or numpy.ndarray
        Best permutation found (0-based int64): facility ``i`` at location ``perm[i]``; a numpy array when no
        matrix argument (nor ``perm`` of :func:`tabu_search`) was a tensor, on ``A``'s device otherwise.
    fun : float
        :math:`\\sum_{ij} A_{ij} B_{p(i)p(j)}` at ``perm``.
    n_iter : int
        Iterations summed over restarts: PAM iterations, 2-opt swaps or tabu-search iterations.
    converged : bool
        Whether the best restart ended by its own stopping rule: for ``"pam"``, an iteration changed nothing or the
        (deterministic) iterates revisited a permutation; for ``"2opt"``, no improving swap is left; for ``"tabu"``,
        which has no convergence test, always ``True`` (it ends on its budget or on ``target``).
    status : Status
        ``SUCCESS``, or ``MAX_ITER`` when ``max_iter`` or ``time_limit`` stopped the best restart of ``"pam"`` or
        ``"2opt"`` early (with a :class:`~neuralign.errors.ConvergenceWarning`).
    message : str
        Summary, saying when ``time_limit`` or ``target`` ended the call.
    history : list[float]
        Best objective after each restart run (fewer than ``restarts`` when ``time_limit`` or ``target`` ended the
        call).
    """

    perm: torch.Tensor
    fun: float
    n_iter: int
    converged: bool
    status: Status
    message: str
    history: list[float]


#: Default budget of the tabu search, in iterations per unit (:math:`500 n` per start): on the 52 QAPLIB instances
#: of ``benchmarks/bench_qap.py``, 4 starts reach a mean gap of about 0.5% to the best known values in less time than
#: scipy's 2-opt from the same starts (README, "Benchmarks").
TABU_ITERATIONS = 500

# How a run ended, as the end of a message.
_STOPS = {"max_iter": "", "converged": "", "time_limit": " (stopped by time_limit)", "target": " (target reached)"}

#: Methods of :func:`solve_qap`.
QAP_METHODS = ("tabu", "pam", "2opt")

#: Local searches of :func:`solve_qap`'s ``"pam"`` method, run after every P-step.
QAP_LOCAL_SEARCHES = ("2opt", "tabu", None)


@accepts_arrays("A", "B", "perm")
@_small_on_one_thread
def tabu_search(
    A: torch.Tensor,
    B: torch.Tensor,
    perm: torch.Tensor,
    *,
    max_iter: int | None = None,
    time_limit: float | None = None,
    target: float | None = None,
    tenure: tuple[int, int] | None = None,
    aspiration: float | None = None,
    generator: torch.Generator | int | None = None,
) -> QAPResult:
    r"""Robust tabu search for the QAP (Taillard 1991) from ``perm``: a local search over pair swaps that makes the
    best allowed swap at every iteration, improving or not, and keeps the best permutation seen.

    .. math::

        \min_{p \in S_n} \sum_{i,j} A_{ij} B_{p(i) p(j)}

    - **Tabu list.** When a swap moves unit :math:`i` off location :math:`l`, :math:`i` may not go back to
      :math:`l` for the current tenure; a swap is tabu when it would put *both* its units back on barred locations.
    - **Randomised tenure.** The tenure is drawn uniformly from ``tenure = (t_min, t_max)`` and drawn again every
      :math:`2 t_{max}` iterations.
    - **Aspiration.** A swap leading below the best objective so far is made even when tabu. Otherwise, a swap that
      puts both its units on locations they have not held for ``aspiration`` iterations is made first
      (diversification), whatever its value; otherwise the best swap that is not tabu (the best swap if all are).
    - **Move values** are computed once in :math:`O(n^3)` and then updated in :math:`O(n^2)` per iteration
      (:math:`O(1)` for each of the swaps disjoint from the last one); a compiled loop on the calling thread.

    Parameters
    ----------
    A, B : torch.Tensor or array-like
        ``(n, n)`` real matrices (flow, distance).
    perm : torch.Tensor or array-like
        Starting permutation (not modified).
    max_iter : int, optional
        Iterations (default :data:`TABU_ITERATIONS` :math:`\times n`).
    time_limit : float, optional
        Seconds of wall-clock time: the compiled loop runs in chunks of about 2 ms between readings of the clock,
        so the limit is overshot by about that much.
    target : float, optional
        Stop as soon as the objective is at most ``target`` (e.g. a known optimum: time-to-target studies).
    tenure : (int, int), optional
        Range of the tabu tenure in iterations, :math:`1 \le t_{min} \le t_{max}`; default
        :math:`(\lfloor 0.9 n\rfloor, \lceil 1.1 n\rceil)` ([1]_).
    aspiration : float, optional
        Iterations after which a location not held counts for the long-term aspiration; default :math:`5 n^2`.
    generator : torch.Generator or int, optional
        Seed of the tenure draws (an int, a draw from the generator, or a draw from torch's global RNG).

    Returns
    -------
    QAPResult
        ``history`` has one entry; ``converged`` is ``True`` and ``status`` ``SUCCESS``.

    Raises
    ------
    ValueError
        For non-square or mismatched matrices, entries that are not finite or so large that the objective would
        overflow float64, a ``perm`` that is not a permutation of ``0..n-1``, or budgets out of range
        (``max_iter < 1``, ``time_limit <= 0``, ``t_min > t_max``).
    TypeError
        For budgets of the wrong type.

    References
    ----------
    .. [1] E. Taillard, "Robust taboo search for the quadratic assignment problem", Parallel Computing 17, 1991.

    Examples
    --------
    >>> import numpy as np
    >>> from neuralign.optim import load_qaplib, qaplib_path
    >>> A, B = load_qaplib(qaplib_path("nug12"))
    >>> res = tabu_search(A.numpy(), B.numpy(), np.arange(12), max_iter=3000, generator=0)
    >>> res.fun  # the optimum of nug12
    578.0
    """
    A, B = _check_qap(A, B)
    n = A.shape[0]
    p0 = _check_perm(perm, n)
    max_iter, deadline, target_value = _check_budget(max_iter, time_limit, target)
    tenure, aspiration = _check_tenure(tenure, aspiration, n)
    rng = np.random.default_rng(as_seed(generator))
    budget = TABU_ITERATIONS * n if max_iter is None else max_iter
    p, fun, iters, why = _tabu(_as_arrays(A, B), p0, rng=rng, max_iter=budget, tenure=tenure, aspiration=aspiration,
                               deadline=deadline, target=target_value)  # fmt: skip
    perm_out = _as_perm(p, A)
    fun = qap_objective(A, B, perm_out)
    message = f"tabu search: {fun:.10g} after {iters} of {budget} iterations{_STOPS[why]}"
    return QAPResult(perm=perm_out, fun=fun, n_iter=iters, converged=True, status=Status.SUCCESS, message=message,
                     history=[fun])  # fmt: skip


@accepts_arrays("A", "B")
@_small_on_one_thread
def solve_qap(
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    method: str = "tabu",
    restarts: int = 1,
    generator: torch.Generator | int | None = None,
    max_iter: int | None = None,
    time_limit: float | None = None,
    target: float | None = None,
    local_search: str | None = "2opt",
    lam: float | None = None,
    tenure: tuple[int, int] | None = None,
    aspiration: float | None = None,
    **renamed: Any,
) -> QAPResult:
    r"""Minimise :math:`\sum_{i,j} A_{ij} B_{p(i)p(j)}` over permutations :math:`p` (QAPLIB convention).

    .. math::

        \min_{P \in \Pi_n} \langle A, P B P^\top \rangle .

    From each of ``restarts`` random permutations:

    - ``method="tabu"`` (default): robust tabu search (:func:`tabu_search`), ``max_iter`` iterations (default
      :data:`TABU_ITERATIONS` :math:`\times n`).
    - ``method="pam"``: :class:`~neuralign.optim.PAM` on :class:`QAPProblem` with no continuous variable
      (``x_steps=0``) and linearised proximal P-steps

      .. math:: P_{k+1} = \arg\min_{P \in \Pi_n} \langle \nabla F(P_k) - P_k/\lambda, P\rangle,

      each followed by ``local_search`` as PAM's local search on the P-step: ``"2opt"``
      (:func:`local_search_2opt`), ``"tabu"`` (a tabu search of :math:`10 n` iterations from the P-step's result)
      or ``None`` (then the 2-opt runs once, on the best iterate). It stops when an iteration changes nothing or
      when the deterministic iterates revisit a permutation (they would cycle from then on), after ``max_iter``
      iterations (default 100), and keeps the best iterate.
    - ``method="2opt"``: best-improvement 2-opt alone, at most ``max_iter`` swaps (default :math:`100 n^2`).

    The best restart is returned. PAM's torch work on problems up to :math:`n = 512` runs on one thread (restored
    after), and the 2-opt and tabu search are compiled loops on the calling thread, so that a machine busy with other
    work slows a call no more than it slows any single-threaded code.

    Parameters
    ----------
    A, B : torch.Tensor or array-like
        ``(n, n)`` real matrices (flow, distance).
    method : {"tabu", "pam", "2opt"}
        Algorithm (:data:`QAP_METHODS`).
    restarts : int
        Number of random starts (at least 1); restart ``r`` starts from a permutation drawn with seed
        ``stable_seed("qap", generator, r)``, which also seeds its tabu tenures.
    generator : torch.Generator or int, optional
        The base seed of the restarts: an int, a draw from the generator, or (default) a draw from torch's global
        RNG (``seed=`` before 0.2, still accepted with a :class:`DeprecationWarning`).
    max_iter : int, optional
        Budget of each restart, in the method's iterations (see above).
    time_limit : float, optional
        Seconds of wall-clock time for the whole call: a restart running at the limit stops (tabu search and 2-opt
        within about 2 ms, their compiled loops running in chunks between readings of the clock; PAM after its
        current iteration) and no further restart starts. The first call in a process also loads (or, the very
        first time, compiles) the compiled kernels, inside the limit.
    target : float, optional
        Stop as soon as a restart reaches an objective of at most ``target``.
    local_search : {"2opt", "tabu", None}
        PAM's local search on the P-step (``"pam"`` only). ``True`` and ``False`` (before 0.2) still mean
        ``"2opt"`` and ``None``, with a :class:`DeprecationWarning`.
    lam : float, optional
        P proximal parameter (``"pam"`` only). Default :math:`1000 n/L` with :math:`L = 2\|A\|_2\|B\|_2`: far beyond
        the monotone range :math:`\lambda < 1/L`, where the linearised step would hardly ever leave :math:`P_k`;
        the local search restores descent and the best iterate is kept.
    tenure, aspiration : optional
        Tabu-search settings (``"tabu"``, and ``"pam"`` with ``local_search="tabu"``); see :func:`tabu_search`.

    Returns
    -------
    QAPResult

    Raises
    ------
    ValueError
        For non-square or mismatched matrices, entries that are not finite or so large that the objective would
        overflow float64, an unknown ``method`` or ``local_search``, ``restarts < 1`` or budgets out of range.
    TypeError
        For options of the wrong type.

    References
    ----------
    .. [1] R. E. Burkard, S. E. Karisch, F. Rendl, "QAPLIB – a quadratic assignment problem library", J. Global
       Optim. 10, 1997.
    .. [2] E. Taillard, "Robust taboo search for the quadratic assignment problem", Parallel Computing 17, 1991.
    .. [3] J. Bolte, S. Sabach, M. Teboulle, "Proximal alternating linearized minimization for nonconvex and
       nonsmooth problems", Math. Program. 146, 2014.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.0, 5.0, 1.0], [5.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    >>> B = torch.tensor([[0.0, 1.0, 4.0], [1.0, 0.0, 4.0], [4.0, 4.0, 0.0]])
    >>> res = solve_qap(A, B, restarts=2, generator=0)
    >>> res.fun, res.status
    (26.0, <Status.SUCCESS: 0>)
    >>> solve_qap(A, B, method="pam", local_search="tabu", generator=0).fun
    26.0
    """
    A, B = _check_qap(A, B)
    method = check_choice(method, "method", QAP_METHODS)
    restarts = check_int(restarts, "restarts", minimum=1)
    max_iter, deadline, target_value = _check_budget(max_iter, time_limit, target)
    if isinstance(local_search, bool):
        warnings.warn("solve_qap(local_search=True/False) is deprecated; use local_search='2opt' or None",
                      DeprecationWarning, stacklevel=4)  # fmt: skip
        local_search = "2opt" if local_search else None
    if local_search not in QAP_LOCAL_SEARCHES:
        raise ValueError(f"unknown local_search {local_search!r}; expected one of {list(QAP_LOCAL_SEARCHES)}")
    n = A.shape[0]
    tenure, aspiration = _check_tenure(tenure, aspiration, n)
    generator = renamed_keywords(renamed, {"seed": "generator"}, where="solve_qap").get("generator", generator)
    base = as_seed(generator)
    mats = _as_arrays(A, B)
    if method == "pam":
        problem = QAPProblem(A, B)
        if lam is None:
            L = problem.lipschitz()
            lam = 1000.0 * n / L if L > 0 else math.inf

    best_perm: np.ndarray | None = None
    best_fun = math.inf
    best_why = "converged"
    total_iter = 0
    history: list[float] = []
    why = ""
    for r in range(restarts):
        if r > 0 and time.perf_counter() >= deadline:
            break
        seed = stable_seed("qap", base, r)
        gen = as_generator(seed)
        p0 = torch.randperm(n, generator=gen).numpy()
        rng = np.random.default_rng(seed)
        if method == "tabu":
            budget = TABU_ITERATIONS * n if max_iter is None else max_iter
            perm, _, iters, why = _tabu(mats, p0, rng=rng, max_iter=budget, tenure=tenure, aspiration=aspiration,
                                        deadline=deadline, target=target_value)  # fmt: skip
        elif method == "2opt" or n < 2:
            budget = 100 * n * n if max_iter is None else max_iter
            perm, iters, why = _two_opt(mats, p0, max_swaps=budget, deadline=deadline)
        else:
            budget = 100 if max_iter is None else max_iter
            perm, iters, why = _pam_restart(problem, mats, p0, gen=gen, rng=rng, lam=lam, max_iter=budget,
                                            local_search=local_search, tenure=tenure, aspiration=aspiration,
                                            deadline=deadline)  # fmt: skip
        fun = float(_kernels().objective(mats[0], _permuted(mats[2], perm)[0]))
        if why != "target" and fun <= target_value:
            why = "target"
        total_iter += iters
        logger.debug("QAP restart %d: %.6g (%d iterations, %s)", r, fun, iters, why)
        if fun < best_fun:
            best_perm, best_fun, best_why = perm, fun, why
        history.append(best_fun)
        if why == "target":
            break
    assert best_perm is not None
    perm_out = _as_perm(best_perm, A)
    best_fun = qap_objective(A, B, perm_out)
    message = f"best of {len(history)} restart(s) of {method}: {best_fun:.10g}"
    if why in ("time_limit", "target"):
        message += f"; {why} reached in restart {len(history)} of {restarts}"
    # a tabu search has no convergence test: its budget is its stopping rule
    cut = method != "tabu" and best_why in ("max_iter", "time_limit")
    status = Status.MAX_ITER if cut else Status.SUCCESS
    if cut:
        limit = f"max_iter={budget}" if best_why == "max_iter" else f"time_limit={time_limit}s"
        message += f" (the best restart was stopped by {limit})"
        warnings.warn(f"solve_qap: {message}; try a larger `max_iter` or `time_limit`", ConvergenceWarning,
                      stacklevel=4)  # fmt: skip
    return QAPResult(
        perm=perm_out,
        fun=best_fun,
        n_iter=total_iter,
        converged=not cut,
        status=status,
        message=message,
        history=history,
    )


def _pam_restart(
    problem: QAPProblem,
    mats: _Matrices,
    p0: np.ndarray,
    *,
    gen: torch.Generator,
    rng: np.random.Generator,
    lam: float,
    max_iter: int,
    local_search: str | None,
    tenure: tuple[int, int],
    aspiration: float,
    deadline: float,
) -> tuple[np.ndarray, int, str]:
    """One restart of :func:`solve_qap`'s ``"pam"`` method: ``(best perm, PAM iterations, why)``, ``why`` one of
    ``"converged"`` (a fixed point or a cycle), ``"max_iter"`` and ``"time_limit"``."""
    n = p0.size
    device = problem.A.device

    def hook(x, perms):
        p = perms["p"].cpu().numpy()
        if local_search == "2opt":
            p = _two_opt(mats, p, max_swaps=100 * n * n, deadline=deadline)[0]
        else:
            p = _tabu(mats, p, rng=rng, max_iter=10 * n, tenure=tenure, aspiration=aspiration, deadline=deadline,
                      target=-math.inf)[0]  # fmt: skip
        return {"p": torch.as_tensor(p).to(device)}

    start = torch.as_tensor(p0).to(device)
    solver = PAM(problem, [], {"p": start}, method="linearized", lam=lam, x_steps=0, generator=gen,
                 local_search=hook if local_search is not None else None)  # fmt: skip
    # PAM's iterates need not decrease for lam > 1/L: keep the best one seen. The step is deterministic (but for
    # a tabu local search's draws), so revisiting a permutation means the iterates cycle from then on: stop.
    seen = {"fun": solver.history[0], "perm": start, "visited": {tuple(p0.tolist())}, "cycle": False,
            "late": False}  # fmt: skip

    def track(state, seen=seen):
        if state.fun < seen["fun"]:
            seen["fun"], seen["perm"] = state.fun, state.perms["p"]
        key = tuple(state.perms["p"].tolist())
        if key in seen["visited"]:
            seen["cycle"] = True
            return True
        seen["visited"].add(key)
        if time.perf_counter() >= deadline:
            seen["late"] = True
            return True
        return False

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = solver.run(max_iter=max_iter, tol=0.0, callback=track)
    perm = seen["perm"].cpu().numpy().astype(np.int64)
    if local_search is None:
        perm = _two_opt(mats, perm, max_swaps=100 * n * n, deadline=math.inf)[0]
    if seen["late"]:
        return perm, res.n_iter, "time_limit"
    return perm, res.n_iter, "converged" if res.status == Status.SUCCESS or seen["cycle"] else "max_iter"

r"""Linear assignment: the exact solver (Hungarian / Jonker–Volgenant via scipy) and its LP relaxation
(cvxpy).

The linear assignment problem (LAP) over an :math:`n_r \times n_c` cost matrix :math:`C` is

.. math::

    \min_{\sigma} \sum_{i} C_{i, \sigma(i)}

over injective maps :math:`\sigma` from the smaller side to the larger one. For a square :math:`C` this is
:math:`\min_{P \in \Pi_n} \langle C, P \rangle` over the permutation matrices :math:`\Pi_n`, and by Birkhoff's
theorem it equals the linear programme over the doubly-stochastic matrices (the Birkhoff polytope
:math:`\mathcal B_n`), whose dual gives an optimality certificate: potentials :math:`u, v` with :math:`u_i +
v_j \le C_{ij}` and :math:`\sum_i u_i + \sum_j v_j = \langle C, P \rangle`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from neuralign import _numpy
from neuralign._numpy import accepts_arrays
from neuralign.errors import NonFiniteError
from neuralign.status import Status

__all__ = [
    "AssignmentResult",
    "AssignmentLPResult",
    "solve_assignment",
    "solve_assignments",
    "solve_assignment_lp",
    "assignment_duals",
    "StepBoundResult",
    "proximal_step_bound",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssignmentResult:
    r"""Solution of a linear assignment problem.

    Attributes
    ----------
    perm : torch.Tensor
        ``int64`` tensor of length ``n_rows`` on the cost's device: ``perm[i]`` is the column assigned to row
        ``i``. For a square cost it is a permutation (dense matrix ``P[i, perm[i]] = 1``). For ``n_rows <
        n_cols`` every row gets a distinct column and the other columns stay free. For ``n_rows > n_cols``
        only ``n_cols`` rows are assigned and the others hold ``-1``.
    fun : float
        Objective :math:`\sum_i C_{i, \mathrm{perm}[i]}` over the assigned rows (computed in float64).
    row_ind, col_ind : torch.Tensor
        The assigned pairs, as returned by ``scipy.optimize.linear_sum_assignment`` (``row_ind`` sorted).
    maximize : bool
        Whether the objective was maximised.
    u, v : torch.Tensor or None
        Dual potentials (float64, cost's device) when ``certificate=True`` was asked for a square cost:
        ``u[i] + v[j] <= C[i, j]`` for all ``i, j`` (``>=`` when maximising), with equality on the assigned
        pairs, and ``u.sum() + v.sum() == fun``. Together with ``perm`` they certify optimality (LP duality).
    converged, status, message, n_iter
        Common result fields; the solver is exact, so ``converged=True``, ``status=0``, ``n_iter=1``.
    """

    perm: torch.Tensor
    fun: float
    row_ind: torch.Tensor
    col_ind: torch.Tensor
    maximize: bool
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    converged: bool = True
    status: Status = Status.SUCCESS
    message: str = "optimal assignment"
    n_iter: int = 1

    def duality_gap(self) -> float:
        """``fun - (u.sum() + v.sum())`` (zero up to rounding for a certified optimum); needs
        ``certificate=True``."""
        if self.u is None or self.v is None:
            raise ValueError(
                "this result holds no dual potentials; call solve_assignment(..., certificate=True)"
            )
        return float(self.fun - (self.u.sum() + self.v.sum()).item())


@dataclass(frozen=True)
class AssignmentLPResult:
    r"""Solution of the Birkhoff-polytope LP relaxation of a square assignment problem.

    Attributes
    ----------
    x : torch.Tensor or None
        The optimal doubly-stochastic matrix (float64, cost's device); ``None`` if the solver failed.
    fun : float
        :math:`\langle C, X\rangle` as reported by the solver (``nan`` on failure).
    u, v : torch.Tensor or None
        Row and column duals: reduced costs :math:`C_{ij} - u_i - v_j \ge 0` and
        :math:`\mathbf 1^\top u + \mathbf 1^\top v = \mathrm{fun}` certify optimality.
    solver : str
        The cvxpy solver that ran.
    converged : bool
        ``True`` when the solver reported ``optimal``.
    status : int
        0 optimal, 1 optimal up to the solver's reduced accuracy, 2 failure.
    message : str
        cvxpy's status string.
    n_iter : int
        Solver iterations when the solver reports them (else 0).
    """

    x: torch.Tensor | None
    fun: float
    u: torch.Tensor | None
    v: torch.Tensor | None
    solver: str
    converged: bool
    status: Status
    message: str
    n_iter: int


def _prefix(name: str | None) -> str:
    return f"group `{name}`: " if name is not None else ""


def _check_cost(cost: object, name: str | None, *, arg: str = "cost") -> torch.Tensor:
    """Validate a cost matrix: a 2-D real tensor without NaN or inf."""
    if not isinstance(cost, torch.Tensor):
        raise TypeError(f"{_prefix(name)}`{arg}` must be a torch.Tensor, got {type(cost).__name__}")
    if cost.dim() != 2:
        raise ValueError(f"{_prefix(name)}`{arg}` must be a 2-D tensor, got shape {tuple(cost.shape)}")
    if cost.is_complex() or cost.dtype == torch.bool:
        raise TypeError(f"{_prefix(name)}`{arg}` must be a real tensor, got dtype {cost.dtype}")
    if cost.is_floating_point():
        n_nan = int(torch.isnan(cost).sum().item())
        if n_nan:
            raise NonFiniteError(f"{_prefix(name)}cost matrix has {n_nan} NaN entries")
        n_inf = int(torch.isinf(cost).sum().item())
        if n_inf:
            raise NonFiniteError(f"{_prefix(name)}cost matrix has {n_inf} infinite entries")
    return cost


@accepts_arrays("cost", "perm")
def assignment_duals(
    cost: torch.Tensor, perm: torch.Tensor, *, maximize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Dual potentials certifying that the permutation ``perm`` solves the square assignment problem on
    ``cost``.

    With :math:`\sigma = ` ``perm`` optimal for :math:`\min \sum_i C_{i\sigma(i)}`, the potentials are

    .. math::

        v_j = d_j, \qquad u_i = C_{i\sigma(i)} - d_{\sigma(i)},

    where :math:`d` are shortest-path distances (from a virtual source joined to every column by a 0 edge) in
    the exchange graph on the columns with edges :math:`\sigma(i) \to j` of length :math:`C_{ij} -
    C_{i\sigma(i)}` ("row :math:`i` moves from its column to :math:`j`"). They exist iff that graph has no
    negative cycle, i.e. iff ``perm`` is optimal; then :math:`u_i + v_j \le C_{ij}` with equality on
    :math:`(i, \sigma(i))` and :math:`\sum u + \sum v = \sum_i C_{i\sigma(i)}`.

    Parameters
    ----------
    cost : torch.Tensor or array-like
        Square ``(n, n)`` real cost matrix.
    perm : torch.Tensor or array-like
        ``int64`` permutation of length ``n`` (assumed optimal).
    maximize : bool
        When ``True`` the potentials satisfy ``u[i] + v[j] >= cost[i, j]`` instead.

    Returns
    -------
    u, v : torch.Tensor
        float64 tensors of length ``n`` on ``cost``'s device.

    Notes
    -----
    Bellman–Ford, vectorised: at most :math:`n` rounds of :math:`O(n^2)`, usually a handful. If ``perm`` is
    not optimal the rounds do not settle and the returned potentials violate dual feasibility (which a check
    detects).

    Examples
    --------
    >>> import torch
    >>> C = torch.tensor([[4.0, 1.0], [2.0, 3.0]])
    >>> u, v = assignment_duals(C, torch.tensor([1, 0]))
    >>> bool(((C - u[:, None] - v[None, :]) >= 0).all()), float(u.sum() + v.sum())
    (True, 3.0)
    """
    c = cost.detach().to(torch.float64)
    if maximize:
        c = -c
    n = c.shape[0]
    rows = torch.arange(n, device=c.device)
    assigned = c[rows, perm]
    w = c - assigned[:, None]
    d = torch.zeros(n, dtype=c.dtype, device=c.device)
    scale = float(c.abs().max().item()) if n else 0.0
    eps = 1e-13 * max(scale, 1.0)
    for _ in range(n + 1):
        candidate = (d[perm][:, None] + w).min(dim=0).values
        new = torch.minimum(d, candidate)
        if not bool((new < d - eps).any()):
            d = new
            break
        d = new
    u = assigned - d[perm]
    v = d
    if maximize:
        u, v = -u, -v
    return u, v


@accepts_arrays("cost")
def solve_assignment(
    cost: torch.Tensor, *, maximize: bool = False, name: str | None = None, certificate: bool = False
) -> AssignmentResult:
    r"""Solve the linear assignment problem :math:`\min_\sigma \sum_i C_{i,\sigma(i)}` exactly.

    .. math::

        \min_{P \in \Pi} \langle C, P \rangle, \qquad P_{i, \sigma(i)} = 1,

    where :math:`\Pi` is the set of (partial, for a rectangular :math:`C`) permutation matrices with one 1 in
    every row of the smaller side.

    Parameters
    ----------
    cost : torch.Tensor or array-like
        ``(n_rows, n_cols)`` real tensor (any float dtype, any device).
    maximize : bool
        Maximise :math:`\sum_i C_{i\sigma(i)}` instead.
    name : str, optional
        Name of the group the cost belongs to; error messages name it.
    certificate : bool
        Also compute dual potentials ``u, v`` (square costs only), see :func:`assignment_duals`.

    Returns
    -------
    AssignmentResult
        ``perm`` (int64, on ``cost``'s device), ``fun`` and the assigned pairs; see :class:`AssignmentResult`
        for the rectangular convention. Its tensors are numpy arrays when ``cost`` is not a tensor.

    Raises
    ------
    TypeError
        If ``cost`` is not a real tensor or numeric array-like.
    ValueError
        If ``cost`` is not 2-D, or ``certificate=True`` with a rectangular cost.
    NonFiniteError
        (a ``ValueError``) if ``cost`` holds NaN or infinite entries; the message names the group.

    Notes
    -----
    Calls ``scipy.optimize.linear_sum_assignment`` (a shortest augmenting path method, Crouse 2016),
    :math:`O(n^3)`.

    References
    ----------
    .. [1] D. F. Crouse, "On implementing 2D rectangular assignment algorithms", IEEE Trans. Aerospace and
       Electronic Systems 52(4), 2016.

    Examples
    --------
    >>> import torch
    >>> res = solve_assignment(torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]]))
    >>> res.perm.tolist(), res.fun
    ([1, 0, 2], 5.0)
    """
    cost = _check_cost(cost, name)
    if certificate and cost.shape[0] != cost.shape[1]:
        raise ValueError(
            f"{_prefix(name)}`certificate=True` needs a square cost matrix, got shape {tuple(cost.shape)}"
        )
    rows, cols = _numpy.linear_sum_assignment(cost, maximize=maximize)
    n_rows = cost.shape[0]
    if n_rows == cost.shape[1]:
        perm = cols
    else:
        perm = torch.full((n_rows,), -1, dtype=torch.int64, device=cost.device)
        perm[rows] = cols
    fun = float(cost.detach().to(torch.float64)[rows, cols].sum().item()) if rows.numel() else 0.0
    u = v = None
    if certificate:
        u, v = assignment_duals(cost, perm, maximize=maximize)
    return AssignmentResult(perm=perm, fun=fun, row_ind=rows, col_ind=cols, maximize=bool(maximize), u=u, v=v)


def solve_assignments(
    costs: Mapping[str, torch.Tensor], *, maximize: bool = False, certificate: bool = False
) -> dict[str, AssignmentResult]:
    """Solve one linear assignment problem per group, e.g. one per permutation group of a network.

    Parameters
    ----------
    costs : Mapping[str, torch.Tensor]
        Group name -> 2-D cost matrix (validated like :func:`solve_assignment`, errors name the group).
    maximize, certificate : bool
        As in :func:`solve_assignment`.

    Returns
    -------
    dict[str, AssignmentResult]
        Same keys, same order.

    Examples
    --------
    >>> import torch
    >>> out = solve_assignments({"a": torch.eye(2), "b": -torch.eye(2)})
    >>> out["a"].perm.tolist(), out["b"].perm.tolist()
    ([1, 0], [0, 1])
    """
    if not isinstance(costs, Mapping):
        raise TypeError(f"`costs` must be a mapping group -> tensor, got {type(costs).__name__}")
    return {
        str(g): solve_assignment(c, maximize=maximize, name=str(g), certificate=certificate)
        for g, c in costs.items()
    }


_LP_STATUS = {"optimal": Status.SUCCESS}


@accepts_arrays("cost")
def solve_assignment_lp(cost: torch.Tensor, *, solver: str | None = None) -> AssignmentLPResult:
    r"""Solve the Birkhoff-polytope LP relaxation of a square assignment problem with cvxpy.

    .. math::

        \min_{X \in \mathbb R^{n \times n}} \langle C, X \rangle \quad \text{s.t.} \quad X \ge 0,\;
        X \mathbf 1 = \mathbf 1,\; X^\top \mathbf 1 = \mathbf 1,

    with dual :math:`\max_{u, v} \mathbf 1^\top u + \mathbf 1^\top v` s.t. :math:`u_i + v_j \le C_{ij}`.
    The polytope's vertices are the permutation matrices (Birkhoff–von Neumann), so the optimum equals that of
    :func:`solve_assignment`; a simplex solver (HiGHS) returns such a vertex.

    Parameters
    ----------
    cost : torch.Tensor or array-like
        Square ``(n, n)`` real cost matrix.
    solver : str, optional
        A cvxpy solver name; by default the first installed of ``HIGHS, CLARABEL, SCIPY, SCS, OSQP``.

    Returns
    -------
    AssignmentLPResult
        ``x``, ``fun``, duals ``u, v``, the ``solver`` that ran and its status.

    Raises
    ------
    ValueError
        If ``cost`` is not square, or ``solver`` is not an installed LP solver.
    NonFiniteError
        If ``cost`` holds NaN or infinite entries.

    Notes
    -----
    Meant for certificates and small cross-checks (the dense LP has :math:`n^2` variables); use
    :func:`solve_assignment` to solve. HiGHS prints a one-line banner on its first use in a process.

    Examples
    --------
    >>> import torch
    >>> res = solve_assignment_lp(torch.tensor([[4.0, 1.0], [2.0, 3.0]]))
    >>> res.status, round(res.fun, 6)
    (<Status.SUCCESS: 0>, 3.0)
    """
    cost = _check_cost(cost, None)
    if cost.shape[0] != cost.shape[1]:
        raise ValueError(f"`cost` must be square for the Birkhoff LP, got shape {tuple(cost.shape)}")
    available = _numpy.installed_lp_solvers()
    if not available:
        raise RuntimeError("no cvxpy LP solver is installed (tried HIGHS, CLARABEL, SCIPY, SCS, OSQP)")
    if solver is not None:
        if not isinstance(solver, str) or solver.upper() not in available:
            raise ValueError(f"unknown or uninstalled LP solver {solver!r}; expected one of {available}")
        solver = solver.upper()
    sol = _numpy.solve_birkhoff_lp(cost, solver)
    status = _LP_STATUS.get(sol.status, Status.INACCURATE)
    device = cost.device

    def back(a):
        return None if a is None else torch.as_tensor(a, dtype=torch.float64).to(device)

    if status != Status.SUCCESS:
        logger.warning("Birkhoff LP with solver %s ended with status %s", sol.solver, sol.status)
    fun = sol.fun if math.isfinite(sol.fun) else float("nan")
    return AssignmentLPResult(
        x=back(sol.x),
        fun=fun,
        u=back(sol.u),
        v=back(sol.v),
        solver=sol.solver,
        converged=status == 0,
        status=status,
        message=sol.status,
        n_iter=sol.n_iter or 0,
    )


@dataclass(frozen=True)
class StepBoundResult:
    """Outcome of :func:`proximal_step_bound`.

    Attributes
    ----------
    lam : float
        The largest proximal step :math:`\\lambda^*` for which ``perm`` minimises the linearised proximal step
        (``inf``: ``perm`` minimises :math:`\\langle G, P\\rangle` itself).
    ratio : float
        :math:`1/\\lambda^* = \\max_{Q \\ne P} \\langle G, P - Q\\rangle / d(P, Q)` (:math:`\\le 0` when
        ``lam`` is inf), with :math:`d` the number of reassigned units.
    witness : Tensor
        A permutation attaining the ratio (``perm`` itself when ``lam`` is inf).
    moved : int
        Units the witness reassigns.
    n_iter : int
        Dinkelbach iterations (one assignment each).
    """

    lam: float
    ratio: float
    witness: torch.Tensor
    moved: int
    n_iter: int


@accepts_arrays("gradient", "perm")
def proximal_step_bound(gradient: torch.Tensor, perm: torch.Tensor, *, max_iter: int = 100) -> StepBoundResult:
    r"""The largest step for which a permutation is a fixed point of the linearised proximal P-step.

    The P-step :math:`\min_Q \langle G, Q\rangle + \frac{1}{2\lambda}\|Q - P\|_F^2` over permutation matrices keeps
    :math:`P` iff :math:`\langle G, P - Q\rangle \le d(P, Q)/\lambda` for every :math:`Q`, where
    :math:`\|Q - P\|_F^2 = 2 d(P, Q)` and :math:`d` counts the reassigned units. Hence

    .. math::  \frac{1}{\lambda^*} = \max_{Q \ne P} \frac{\langle G, P - Q\rangle}{d(P, Q)},

    a fractional assignment problem, solved exactly by Dinkelbach's method: with
    :math:`h(r) = \max_Q \langle G, P - Q\rangle - r\, d(P, Q)`, each iteration is one linear assignment with cost
    :math:`G - rP` and :math:`r_{k+1} = \langle G, P - Q_k\rangle / d(P, Q_k)`, until :math:`h(r_k) = 0`.

    Parameters
    ----------
    gradient : torch.Tensor or array-like (n, n)
        :math:`G = \nabla_P F`.
    perm : torch.Tensor or array-like (n,)
        The permutation :math:`P` (index form, ``P[i, perm[i]] = 1``).
    max_iter : int
        Cap on Dinkelbach iterations (it converges finitely, typically in a few).

    Returns
    -------
    StepBoundResult

    References
    ----------
    .. [1] W. Dinkelbach, "On nonlinear fractional programming", Management Science 13(7), 1967.

    Examples
    --------
    >>> import torch
    >>> G = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    >>> proximal_step_bound(G, torch.tensor([0, 1])).lam          # identity minimises <G, Q>
    inf
    >>> proximal_step_bound(G, torch.tensor([1, 0])).lam          # the swap gains 2 over 2 moved units
    1.0
    """
    G = gradient.detach().double().cpu()
    p = perm.detach().long().cpu()
    n = G.shape[0]
    if G.shape != (n, n) or p.shape != (n,):
        raise ValueError(f"`gradient` must be (n, n) and `perm` (n,), got {tuple(G.shape)} and {tuple(p.shape)}")
    rows = torch.arange(n)
    onehot = torch.zeros(n, n, dtype=torch.float64)
    onehot[rows, p] = 1.0
    base = float(G[rows, p].sum())
    scale = max(1.0, float(G.abs().max()) * n)
    r = 0.0
    witness, moved = p.clone(), 0
    for it in range(1, max_iter + 1):
        q = solve_assignment(G - r * onehot).perm.cpu()
        d = int((q != p).sum())
        gain = base - float(G[rows, q].sum())
        if d == 0 or gain - r * d <= 1e-12 * scale:
            if it == 1:
                return StepBoundResult(math.inf, min(0.0, r), p.clone(), 0, it)
            return StepBoundResult(1.0 / r if r > 0 else math.inf, r, witness, moved, it)
        r, witness, moved = gain / d, q, d
    return StepBoundResult(1.0 / r if r > 0 else math.inf, r, witness, moved, max_iter)

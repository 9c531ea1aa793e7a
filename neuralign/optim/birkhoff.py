r"""The Birkhoff polytope: permutation matrices, the Euclidean projection, Birkhoff–von Neumann decomposition.

The Birkhoff polytope :math:`\mathcal B_n = \{X \in \mathbb R^{n\times n} : X \ge 0,\ X\mathbf 1 = \mathbf 1,\
X^\top \mathbf 1 = \mathbf 1\}` is the convex hull of the :math:`n!` permutation matrices :math:`\Pi_n`
(Birkhoff 1946, von Neumann 1953). A permutation is stored as an index tensor ``perm`` with dense matrix
``P[i, perm[i]] = 1`` (so ``P @ B == B[perm]``).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from neuralign._numpy import accepts_arrays, as_tensor, to_caller_kind
from neuralign._utils import as_generator
from neuralign.errors import ConvergenceWarning, NonFiniteError
from neuralign.optim.assignment import solve_assignment

__all__ = [
    "BirkhoffDecomposition",
    "perm_to_matrix",
    "matrix_to_perm",
    "is_permutation",
    "nearest_permutation",
    "project_unit_marginals",
    "project_doubly_stochastic",
    "birkhoff_decomposition",
    "sample_permutations",
]

logger = logging.getLogger(__name__)


def is_permutation(perm: object) -> bool:
    """Whether ``perm`` is a 1-D integer tensor or array-like (numpy array, list) holding each of ``0 .. n-1``
    exactly once. Never raises: anything else gives ``False``.

    Examples
    --------
    >>> import numpy as np, torch
    >>> is_permutation(torch.tensor([2, 0, 1])), is_permutation(np.array([0, 0, 1])), is_permutation("ab")
    (True, False, False)
    """
    if not isinstance(perm, torch.Tensor):
        try:
            perm = as_tensor(perm, "perm")
        except TypeError:
            return False
    if perm.dim() != 1:
        return False
    if perm.is_floating_point() or perm.is_complex() or perm.dtype == torch.bool:
        return False
    n = perm.numel()
    if n == 0:
        return True
    p = perm.to(torch.int64)
    if int(p.min().item()) < 0 or int(p.max().item()) >= n:
        return False
    return bool((torch.bincount(p, minlength=n) == 1).all().item())


def _check_perm(perm: object, arg: str = "perm") -> torch.Tensor:
    if not isinstance(perm, torch.Tensor):
        raise TypeError(f"`{arg}` must be a torch.Tensor, got {type(perm).__name__}")
    if not is_permutation(perm):
        shown = perm.tolist() if perm.numel() <= 20 else f"a tensor of shape {tuple(perm.shape)}"
        raise ValueError(f"`{arg}` must be a 1-D integer permutation of 0..n-1, got {shown}")
    return perm.to(torch.int64)


@accepts_arrays("perm")
def perm_to_matrix(
    perm: torch.Tensor, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """The dense permutation matrix ``P`` with ``P[i, perm[i]] = 1``.

    Parameters
    ----------
    perm : torch.Tensor or array-like
        1-D integer permutation of length ``n``.
    dtype : torch.dtype, optional
        Default ``torch.get_default_dtype()``.
    device : torch.device, optional
        Default ``perm``'s device.

    Returns
    -------
    torch.Tensor
        ``(n, n)`` matrix with ``P @ B == B[perm]``.

    Raises
    ------
    ValueError
        If ``perm`` is not a permutation.

    Examples
    --------
    >>> import torch
    >>> perm_to_matrix(torch.tensor([1, 0]))
    tensor([[0., 1.],
            [1., 0.]])
    """
    perm = _check_perm(perm)
    n = perm.numel()
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    device = device if device is not None else perm.device
    P = torch.zeros(n, n, dtype=dtype, device=device)
    P[torch.arange(n, device=device), perm.to(device)] = 1
    return P


@accepts_arrays("P")
def matrix_to_perm(P: torch.Tensor, *, atol: float = 0.0) -> torch.Tensor:
    """The index tensor ``perm`` of a dense permutation matrix (``P[i, perm[i]] = 1``), after validating it.

    Parameters
    ----------
    P : torch.Tensor or array-like
        ``(n, n)`` matrix whose entries are 0 or 1 (within ``atol``), with one 1 per row and per column.
    atol : float
        Tolerance on the entries.

    Raises
    ------
    ValueError
        If ``P`` is not square or not a permutation matrix (the message says which row, column or entry
        fails).

    Examples
    --------
    >>> import torch
    >>> matrix_to_perm(torch.tensor([[0.0, 1.0], [1.0, 0.0]])).tolist()
    [1, 0]
    """
    if not isinstance(P, torch.Tensor):
        raise TypeError(f"`P` must be a torch.Tensor, got {type(P).__name__}")
    if P.dim() != 2 or P.shape[0] != P.shape[1]:
        raise ValueError(f"`P` must be a square matrix, got shape {tuple(P.shape)}")
    Pf = P.detach().to(torch.float64)
    is_one = (Pf - 1).abs() <= atol
    is_zero = Pf.abs() <= atol
    bad = ~(is_one | is_zero)
    if bool(bad.any()):
        i, j = (int(k) for k in bad.nonzero()[0].tolist())
        value = Pf[i, j].item()
        raise ValueError(f"`P` is not a permutation matrix: entry ({i}, {j}) is {value:g}, not 0 or 1")
    row_counts = is_one.sum(dim=1)
    col_counts = is_one.sum(dim=0)
    if bool((row_counts != 1).any()):
        i = int((row_counts != 1).nonzero()[0].item())
        count = int(row_counts[i])
        raise ValueError(f"`P` is not a permutation matrix: row {i} has {count} ones, expected 1")
    if bool((col_counts != 1).any()):
        j = int((col_counts != 1).nonzero()[0].item())
        count = int(col_counts[j])
        raise ValueError(f"`P` is not a permutation matrix: column {j} has {count} ones, expected 1")
    return is_one.to(torch.int64).argmax(dim=1)


@accepts_arrays("D")
def nearest_permutation(D: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    r"""Euclidean projection onto the permutation matrices: :math:`\arg\min_{P\in\Pi_n} \|P - D\|_F =
    \arg\max_{P\in\Pi_n} \langle P, D\rangle` (one linear assignment).

    Examples
    --------
    >>> import torch
    >>> nearest_permutation(torch.tensor([[0.2, 0.8], [0.7, 0.3]])).tolist()
    [1, 0]
    """
    if not isinstance(D, torch.Tensor) or D.dim() != 2 or D.shape[0] != D.shape[1]:
        shape = tuple(D.shape) if isinstance(D, torch.Tensor) else type(D).__name__
        raise ValueError(f"`D` must be a square matrix, got {shape}")
    return solve_assignment(D, maximize=True, name=name).perm


def _check_square_batch(M: object, arg: str = "M") -> torch.Tensor:
    if not isinstance(M, torch.Tensor):
        raise TypeError(f"`{arg}` must be a torch.Tensor, got {type(M).__name__}")
    if M.dim() < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"`{arg}` must have shape (..., n, n), got {tuple(M.shape)}")
    if not M.is_floating_point():
        raise TypeError(f"`{arg}` must be a floating-point tensor, got dtype {M.dtype}")
    return M


@accepts_arrays("M")
def project_unit_marginals(M: torch.Tensor) -> torch.Tensor:
    r"""Exact Euclidean projection onto the affine set :math:`\{X : X\mathbf 1 = \mathbf 1,\ X^\top\mathbf 1 =
    \mathbf 1\}`.

    .. math::

        \Pi_{\mathcal A}(M) = M - \tfrac1n (M\mathbf 1 - \mathbf 1)\mathbf 1^\top
        - \tfrac1n \mathbf 1 (\mathbf 1^\top M - \mathbf 1^\top)
        + \tfrac1{n^2} (\mathbf 1^\top M \mathbf 1 - n)\, \mathbf 1 \mathbf 1^\top .

    The correction lies in the span of :math:`\{a\mathbf 1^\top + \mathbf 1 b^\top\}`, the orthogonal
    complement of the set's direction :math:`\{X\mathbf 1 = 0, X^\top \mathbf 1 = 0\}`, and the result has
    unit row and column sums, hence it is the orthogonal projection. Works on batches ``(..., n, n)``; the
    input is not modified.

    Examples
    --------
    >>> import torch
    >>> X = project_unit_marginals(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    >>> X.sum(dim=0).tolist(), X.sum(dim=1).tolist()
    ([1.0, 1.0], [1.0, 1.0])
    """
    M = _check_square_batch(M)
    n = M.shape[-1]
    row = M.sum(dim=-1, keepdim=True)  # (..., n, 1)
    col = M.sum(dim=-2, keepdim=True)  # (..., 1, n)
    total = row.sum(dim=-2, keepdim=True)  # (..., 1, 1)
    return M - (row - 1) / n - (col - 1) / n + (total - n) / (n * n)


def _row_shifts(A: torch.Tensor) -> torch.Tensor:
    r"""For every row :math:`a` of ``A`` (``(..., m, n)``), the shift :math:`s` with :math:`\sum_j \max(a_j + s, 0)
    = 1` (the threshold of the Euclidean projection of :math:`a` onto the unit simplex); shape ``(..., m)``."""
    n = A.shape[-1]
    srt = torch.sort(A, dim=-1, descending=True).values
    k = torch.arange(1, n + 1, dtype=A.dtype, device=A.device)
    shifts = (1 - srt.cumsum(dim=-1)) / k
    # the candidate with the top-k entries is valid for a prefix k = 1..k*; take the last valid one
    last = ((srt + shifts) > 0).sum(dim=-1, keepdim=True).clamp(min=1) - 1
    return shifts.gather(-1, last)[..., 0]


def _dual_objective(M: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.relu(M + u[..., :, None] + v[..., None, :])
    return 0.5 * X.square().sum(dim=(-1, -2)) - u.sum(dim=-1) - v.sum(dim=-1), X


def _marginal_error(X: torch.Tensor) -> torch.Tensor:
    rows = (X.sum(dim=-1) - 1).abs().amax(dim=-1)
    cols = (X.sum(dim=-2) - 1).abs().amax(dim=-1)
    return torch.maximum(rows, cols)


#: Regularisation of the generalised Hessian in the Newton step (its entries are support counts, >= 1).
_NEWTON_REGULARISATION = 1e-4
_ARMIJO = 1e-4
_MAX_HALVINGS = 60


def _project_birkhoff(M: torch.Tensor, max_iter: int, tol: float) -> tuple[torch.Tensor, int, float]:
    """The dual Newton iteration of :func:`project_doubly_stochastic` on a float64 batch ``(b, n, n)``.

    Returns ``(X, n_iter, error)`` with ``error`` the largest marginal violation over the batch.
    """
    Mt = M.transpose(-1, -2)
    u = _row_shifts(M)
    v = _row_shifts(Mt + u[..., None, :])
    f, X = _dual_objective(M, u, v)
    error = _marginal_error(X)
    it = 0
    while it < max_iter and bool((error > tol).any()):
        it += 1
        # Newton step on the dual: (H + delta I) d = -g, with H = [[diag(r), Om], [Om^T, diag(c)]], solved through
        # the Schur complement on the column block.
        gu, gv = X.sum(dim=-1) - 1, X.sum(dim=-2) - 1
        Om = (X > 0).to(M.dtype)
        inv_r = 1.0 / (Om.sum(dim=-1) + _NEWTON_REGULARISATION)
        schur = torch.diag_embed(Om.sum(dim=-2) + _NEWTON_REGULARISATION) - Om.transpose(-1, -2) @ (
            inv_r[..., :, None] * Om
        )
        rhs = -gv + (Om.transpose(-1, -2) @ (inv_r * gu)[..., :, None])[..., 0]
        dv = torch.linalg.solve(schur, rhs)
        du = inv_r * (-gu - (Om @ dv[..., :, None])[..., 0])
        slope = (gu * du).sum(dim=-1) + (gv * dv).sum(dim=-1)
        # Armijo backtracking, per matrix of the batch; a step that never qualifies is not taken.
        step = torch.ones_like(f)
        pending = torch.ones_like(f, dtype=torch.bool)
        for _ in range(_MAX_HALVINGS):
            trial, _ = _dual_objective(M, u + step[..., None] * du, v + step[..., None] * dv)
            pending = pending & ~(trial <= f + _ARMIJO * step * slope)
            if not bool(pending.any()):
                break
            step = torch.where(pending, step / 2, step)
        step = torch.where(pending, torch.zeros_like(step), step)
        u = u + step[..., None] * du
        v = v + step[..., None] * dv
        # exact minimisation over the row block, then the column block (dual block coordinate descent)
        u = _row_shifts(M + v[..., None, :])
        v = _row_shifts(Mt + u[..., None, :])
        f, X = _dual_objective(M, u, v)
        error = _marginal_error(X)
    return X, it, float(error.max().item()) if error.numel() else 0.0


def _tangent_projection(X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    r"""Orthogonal projection of ``G`` onto :math:`\{Z : Z_{ij} = 0 \text{ off } \operatorname{supp} X,\ Z\mathbf 1
    = 0,\ Z^\top\mathbf 1 = 0\}`, the Jacobian of the projection at a point of strict complementarity."""
    Om = (X > 0).to(G.dtype)
    OG = Om * G
    H = torch.cat(
        [
            torch.cat([torch.diag_embed(Om.sum(dim=-1)), Om], dim=-1),
            torch.cat([Om.transpose(-1, -2), torch.diag_embed(Om.sum(dim=-2))], dim=-1),
        ],
        dim=-2,
    )
    rhs = torch.cat([OG.sum(dim=-1), OG.sum(dim=-2)], dim=-1)
    ab = (torch.linalg.pinv(H, hermitian=True) @ rhs[..., None])[..., 0]
    n = X.shape[-1]
    a, b = ab[..., :n], ab[..., n:]
    return Om * (G - a[..., :, None] - b[..., None, :])


class _BirkhoffJacobian(torch.autograd.Function):
    """Identity in the forward pass (``X``, already computed, is returned in ``M``'s dtype); the backward pass applies
    the Jacobian of the projection at ``X`` (symmetric, so it is its own adjoint)."""

    @staticmethod
    def forward(ctx, M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(X)
        return X.to(dtype=M.dtype, copy=True)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (X,) = ctx.saved_tensors
        return _tangent_projection(X, grad.to(X.dtype)).to(grad.dtype), None


@accepts_arrays("M")
def project_doubly_stochastic(M: torch.Tensor, *, max_iter: int = 1000, tol: float = 1e-9) -> torch.Tensor:
    r"""Euclidean projection onto the Birkhoff polytope of doubly-stochastic matrices.

    .. math::

        \Pi_{\mathcal B_n}(M) = \arg\min_{X \in \mathbb R^{n\times n}} \tfrac12 \|X - M\|_F^2 \quad \text{s.t.}
        \quad X \ge 0,\; X\mathbf 1 = \mathbf 1,\; X^\top \mathbf 1 = \mathbf 1,

    where :math:`M` is the input matrix and :math:`\mathbf 1` the all-ones vector of length :math:`n`.

    Parameters
    ----------
    M : torch.Tensor or array-like
        ``(..., n, n)`` real floating-point matrix or batch of matrices, finite. numpy input gives numpy output.
    max_iter : int
        Maximum number of Newton iterations (nonnegative). The default converges on inputs with entries up to
        :math:`10^4` and :math:`n` up to a few hundred (at most about 400 iterations were needed in the tests).
    tol : float
        Tolerance on the row and column sums: the result :math:`X` satisfies :math:`X \ge 0` exactly and
        :math:`\max(\|X\mathbf 1 - \mathbf 1\|_\infty, \|X^\top\mathbf 1 - \mathbf 1\|_\infty) \le` ``tol``, in the
        float64 arithmetic of the solver (a lower-precision input dtype adds its rounding, about half its machine
        epsilon per row sum, when the result is cast back). Entries of :math:`M + u\mathbf 1^\top + \mathbf 1
        v^\top` are resolved to about :math:`10^{-16}` times their magnitude, so inputs beyond about
        :math:`10^{6}` cannot meet the default and warn.

    Returns
    -------
    torch.Tensor or numpy.ndarray
        Same shape, dtype and device as ``M`` (same kind: numpy for numpy input). Differentiable: the backward
        pass applies the Jacobian of the projection (the orthogonal projection onto the matrices supported on
        the support of :math:`X` with zero row and column sums), exact wherever no entry of :math:`X` is at the
        boundary of its support.

    Raises
    ------
    TypeError
        If ``M`` is not real floating point.
    ValueError
        If ``M`` is not ``(..., n, n)``, ``max_iter`` is not a nonnegative int or ``tol`` is negative.
    NonFiniteError
        If ``M`` holds NaN or infinite entries.

    Warns
    -----
    ConvergenceWarning
        If ``max_iter`` iterations do not reach ``tol``; the last iterate (nonnegative, with row and column sums
        off by the stated error) is returned.

    Notes
    -----
    The dual of the problem is the unconstrained minimisation of the convex, piecewise quadratic

    .. math::

        \theta(u, v) = \tfrac12 \|\max(M + u\mathbf 1^\top + \mathbf 1 v^\top, 0)\|_F^2 - \mathbf 1^\top u
        - \mathbf 1^\top v,

    whose minimiser gives :math:`X = \max(M + u\mathbf 1^\top + \mathbf 1 v^\top, 0)`; every iterate of this
    form is nonnegative and satisfies the other optimality conditions, so the gradient
    :math:`\nabla\theta = (X\mathbf 1 - \mathbf 1, X^\top\mathbf 1 - \mathbf 1)` is the only residual and
    ``tol`` bounds it. Each iteration takes a regularised semismooth Newton step on :math:`\theta` (generalised
    Hessian :math:`\begin{pmatrix}\operatorname{diag}(\Omega\mathbf 1) & \Omega \\ \Omega^\top &
    \operatorname{diag}(\Omega^\top\mathbf 1)\end{pmatrix}` with :math:`\Omega` the support of :math:`X`, as in
    Li, Sun and Toh [1]_) with an Armijo line search, then minimises :math:`\theta` exactly over :math:`u` and then
    over :math:`v` (a projection of every row, then every column, onto the unit simplex). The block steps
    guarantee descent and keep every row and column supported; the Newton steps give fast local convergence.
    Cost per iteration :math:`O(n^3)` (one :math:`n \times n` linear solve). The computation runs in float64 on
    ``M``'s device.

    References
    ----------
    .. [1] X. Li, D. Sun, K.-C. Toh, "On the efficient computation of a generalized Jacobian of the projector
       over the Birkhoff polytope", Math. Program. 179, 2020, arXiv:1702.05934.
    .. [2] N. J. Tatro, P.-Y. Chen, P. Das, I. Melnyk, P. Sattigeri, R. Lai, "Optimizing Mode Connectivity via
       Neuron Alignment", NeurIPS 2020, arXiv:2009.02439 (projected gradient steps on the Birkhoff polytope).

    Examples
    --------
    >>> import torch
    >>> M = torch.tensor([[0.9, 0.3], [0.2, 0.4]], dtype=torch.float64)
    >>> project_doubly_stochastic(M).round(decimals=9).tolist()
    [[0.7, 0.3], [0.3, 0.7]]
    >>> project_doubly_stochastic(torch.tensor([[2.0, -1.0], [0.5, 0.5]])).round(decimals=6).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    M = _check_square_batch(M)
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 0:
        raise ValueError(f"`max_iter` must be a nonnegative int, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"`tol` must be a nonnegative number, got {tol!r}")
    n_nan = int(torch.isnan(M).sum().item())
    n_inf = int(torch.isinf(M).sum().item())
    if n_nan or n_inf:
        raise NonFiniteError(f"`M` holds {n_nan} NaN and {n_inf} infinite entries; the projection needs finite input")
    n = M.shape[-1]
    if n == 0 or M.numel() == 0:
        return M.detach().clone().requires_grad_(M.requires_grad)
    batch = M.detach().to(torch.float64).reshape(-1, n, n)
    X, n_iter, error = _project_birkhoff(batch, max_iter, float(tol))
    X = X.reshape(M.shape)
    logger.debug("project_doubly_stochastic: %d iterations, marginal error %.3g", n_iter, error)
    if error > tol:
        scale = float(M.detach().abs().max().item())
        warnings.warn(
            f"project_doubly_stochastic: max_iter={max_iter} reached with row/column sums off by {error:.3g} > "
            f"tol={tol:g} (input magnitude {scale:.3g}); try a larger `max_iter`, or a larger `tol` for inputs "
            "beyond about 1e6",
            ConvergenceWarning,
            stacklevel=2,
        )
    if M.requires_grad and torch.is_grad_enabled():
        return _BirkhoffJacobian.apply(M, X)
    return X.to(M.dtype)


@dataclass(frozen=True)
class BirkhoffDecomposition:
    r"""A (truncated) Birkhoff–von Neumann decomposition :math:`D \approx \sum_j c_j P_j`.

    The arrays are tensors, or numpy arrays when :func:`birkhoff_decomposition` was given numpy input.

    Attributes
    ----------
    coefficients : torch.Tensor or numpy.ndarray
        ``(k,)`` positive weights in the order they were found (greedy: usually decreasing), dtype of ``D``.
    perms : torch.Tensor or numpy.ndarray
        ``(k, n)`` int64; row ``j`` is the index form of :math:`P_j`.
    residual : float
        :math:`\|D - \sum_j c_j P_j\|_F`.
    n_iter : int
        Number of assignments solved.
    """

    coefficients: torch.Tensor | np.ndarray
    perms: torch.Tensor | np.ndarray
    residual: float
    n_iter: int

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(coefficients, perms, numpy_out)``: the arrays as tensors and whether they were numpy arrays."""
        numpy_out = not isinstance(self.coefficients, torch.Tensor)
        coef = as_tensor(self.coefficients, "decomposition.coefficients")
        perms = as_tensor(self.perms, "decomposition.perms", device=coef.device)
        return coef, perms, numpy_out

    def reconstruct(self) -> torch.Tensor | np.ndarray:
        r""":math:`\sum_j c_j P_j` as a dense ``(n, n)`` matrix (a numpy array when the fields are numpy arrays)."""
        coef, perms, numpy_out = self._tensors()
        n = perms.shape[1]
        out = torch.zeros(n, n, dtype=coef.dtype, device=coef.device)
        rows = torch.arange(n, device=out.device)
        for c, p in zip(coef, perms):
            out[rows, p] += c
        return to_caller_kind(out) if numpy_out else out


@accepts_arrays("D")
def birkhoff_decomposition(
    D: torch.Tensor, *, max_terms: int | None = None, tol: float = 5e-4
) -> BirkhoffDecomposition:
    r"""Greedy Birkhoff–von Neumann decomposition of a (nearly) doubly-stochastic matrix.

    .. math::

        D \approx \sum_{j=1}^k c_j P_j, \qquad c_j > 0,\ P_j \in \Pi_n .

    Starting from :math:`R = D` with entries below ``tol`` set to 0, repeat: find a permutation on the support
    of :math:`R` (a linear assignment maximising :math:`\sum_i R_{i\sigma(i)}` in which zero entries carry a
    penalty larger than any attainable sum, so that a perfect matching of the support is preferred whenever
    one exists), take :math:`c = \min_i R_{i\sigma(i)}`, subtract :math:`cP_\sigma`, zero the entries below
    ``tol``; stop when :math:`c = 0` (the support holds no perfect matching), :math:`R = 0`, or after
    ``max_terms`` terms.

    Parameters
    ----------
    D : torch.Tensor or array-like
        ``(n, n)`` floating-point matrix, ideally doubly stochastic (e.g. from
        :func:`project_doubly_stochastic`).
    max_terms : int, optional
        Maximum number of terms (default: no limit; at most :math:`n^2` since each step zeroes an entry).
    tol : float
        Entries below ``tol`` are treated as 0.

    Returns
    -------
    BirkhoffDecomposition

    Notes
    -----
    For an exactly doubly-stochastic :math:`D` and ``tol=0`` each remainder is a multiple of a
    doubly-stochastic matrix, whose support holds a perfect matching (Birkhoff's theorem via Hall's
    condition), so the procedure ends with :math:`R = 0` and :math:`\sum_j c_j = 1`. Entries dropped by
    ``tol`` make the remainder only approximately scaled-doubly-stochastic, so the coefficients then sum to
    slightly less than 1.

    Examples
    --------
    >>> import torch
    >>> D = 0.75 * torch.eye(3) + 0.25 * torch.eye(3)[[1, 2, 0]]
    >>> dec = birkhoff_decomposition(D)
    >>> dec.coefficients.tolist(), dec.perms.tolist()
    ([0.75, 0.25], [[0, 1, 2], [1, 2, 0]])
    """
    D = _check_square_batch(D, "D")
    if D.dim() != 2:
        raise ValueError(f"`D` must be a single (n, n) matrix, got shape {tuple(D.shape)}")
    if not torch.isfinite(D).all():
        raise ValueError("`D` holds NaN or infinite entries")
    if max_terms is not None and (not isinstance(max_terms, int) or max_terms < 1):
        raise ValueError(f"`max_terms` must be a positive int or None, got {max_terms!r}")
    if not tol >= 0:
        raise ValueError(f"`tol` must be nonnegative, got {tol!r}")
    n = D.shape[0]
    R = D.detach().clone()
    R[R < tol] = 0
    rows = torch.arange(n, device=R.device)
    coefficients: list[torch.Tensor] = []
    perms: list[torch.Tensor] = []
    limit = max_terms if max_terms is not None else n * n + 1
    n_iter = 0
    while len(perms) < limit and n > 0 and bool((R > 0).any()):
        penalty = n * float(R.max().item()) + 1.0
        score = torch.where(R > 0, R, torch.full_like(R, -penalty))
        perm = solve_assignment(score, maximize=True).perm
        n_iter += 1
        c = R[rows, perm].min()
        if not bool(c > 0):
            break
        R[rows, perm] -= c
        R[R < tol] = 0
        coefficients.append(c)
        perms.append(perm)
    coef = torch.stack(coefficients) if coefficients else torch.zeros(0, dtype=D.dtype, device=D.device)
    P = torch.stack(perms) if perms else torch.zeros(0, n, dtype=torch.int64, device=D.device)
    dec = BirkhoffDecomposition(coefficients=coef, perms=P, residual=0.0, n_iter=n_iter)
    residual = float(torch.linalg.norm((D.detach() - dec.reconstruct()).to(torch.float64)).item())
    return BirkhoffDecomposition(coefficients=coef, perms=P, residual=residual, n_iter=n_iter)


def sample_permutations(
    decomposition: BirkhoffDecomposition,
    k: int,
    *,
    generator: torch.Generator | int | None = None,
    max_terms: int | None = 11,
) -> torch.Tensor:
    r"""Draw ``k`` permutations from a Birkhoff–von Neumann decomposition, with probability proportional to
    the coefficients.

    As in Tatro et al.'s code, only the ``max_terms`` largest terms are kept (11 by default) and their
    coefficients are renormalised to a distribution; draws are independent (with replacement).

    Parameters
    ----------
    decomposition : BirkhoffDecomposition
        From :func:`birkhoff_decomposition`; must hold at least one term.
    k : int
        Number of draws (``0`` gives an empty ``(0, n)`` tensor).
    generator : torch.Generator or int or None
        Source of randomness (see :func:`neuralign._utils.as_generator`); a generator must live on the CPU.
    max_terms : int or None
        Keep this many largest terms (``None``: all).

    Returns
    -------
    torch.Tensor
        ``(k, n)`` int64 permutations on the decomposition's device.

    Raises
    ------
    ValueError
        If the decomposition is empty or ``k`` is negative.

    Examples
    --------
    >>> import torch
    >>> dec = birkhoff_decomposition(0.9 * torch.eye(3) + 0.1 * torch.eye(3)[[1, 2, 0]])
    >>> sample_permutations(dec, 4, generator=0).shape
    torch.Size([4, 3])
    """
    if not isinstance(decomposition, BirkhoffDecomposition):
        kind = type(decomposition).__name__
        raise TypeError(f"`decomposition` must be a BirkhoffDecomposition, got {kind}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"`k` must be a nonnegative int, got {k!r}")
    if max_terms is not None and (not isinstance(max_terms, int) or max_terms < 1):
        raise ValueError(f"`max_terms` must be a positive int or None, got {max_terms!r}")
    coef, all_perms, numpy_out = decomposition._tensors()
    if coef.numel() == 0:
        raise ValueError("`decomposition` holds no term to sample from")
    gen = as_generator(generator)
    order = torch.argsort(coef.detach().cpu().to(torch.float64), descending=True, stable=True)
    if max_terms is not None:
        order = order[:max_terms]
    weights = coef.detach().cpu().to(torch.float64)[order]
    if k == 0:
        draws = all_perms.new_zeros((0, all_perms.shape[1]))
    else:
        idx = torch.multinomial(weights / weights.sum(), k, replacement=True, generator=gen)
        draws = all_perms[order[idx].to(all_perms.device)]
    return to_caller_kind(draws) if numpy_out else draws

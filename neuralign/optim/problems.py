r"""Classic problems over permutations with known answers, as :class:`~neuralign.optim.PermutationProblem` s.

Shuffled (unlabeled) linear regression
--------------------------------------
Given :math:`A \in \mathbb R^{n\times d}` and :math:`y \in \mathbb R^{n}` (or :math:`\mathbb R^{n\times k}`) whose
rows were shuffled by an unknown permutation,

.. math::

    \min_{x \in \mathbb R^{d},\ P \in \Pi_n} \; \|y - P A x\|^2 + \alpha \|x\|^2 .

Because :math:`\|PAx\| = \|Ax\|`, for fixed :math:`x` the objective is linear in :math:`P`:
:math:`F(x, P) = \langle C(x), P\rangle + \|y\|^2 + \|Ax\|^2 + \alpha\|x\|^2` with :math:`C(x) = -2\, y (Ax)^\top`,
so the exact proximal P-step is one linear assignment (a sort when :math:`k = 1` and :math:`\lambda = \infty`).
The problem is NP-hard in general (Pananjady, Wainwright, Courtade 2018) and alternating minimisation finds the
planted solution only from a good start, hence restarts.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from neuralign._numpy import accepts_arrays
from neuralign._options import renamed_keywords
from neuralign._utils import as_generator, as_seed, stable_seed
from neuralign.errors import ConvergenceWarning
from neuralign.optim.pam import PAM, BirkhoffStep, PAMResult, PermutationProblem
from neuralign.status import Status

__all__ = ["ShuffledRegressionProblem", "solve_shuffled_regression"]

logger = logging.getLogger(__name__)


def _check_regression_data(A: object, y: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or not A.is_floating_point():
        shape = tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__
        raise ValueError(f"`A` must be a floating-point (n, d) tensor, got {shape}")
    if not isinstance(y, torch.Tensor) or y.dim() not in (1, 2) or y.shape[0] != A.shape[0]:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"`y` must have shape ({A.shape[0]},) or ({A.shape[0]}, k) to match `A`, got {shape}")
    if not (torch.isfinite(A).all() and torch.isfinite(y).all()):
        raise ValueError("`A` and `y` must be finite")
    return A, y.to(A.dtype)


class ShuffledRegressionProblem(PermutationProblem):
    r"""Shuffled linear regression :math:`\min_{x, P} \|y - PAx\|^2 + \alpha\|x\|^2` (one group, ``"rows"``).

    Parameters
    ----------
    A : torch.Tensor or array-like
        ``(n, d)`` design matrix.
    y : torch.Tensor or array-like
        ``(n,)`` or ``(n, k)`` shuffled responses; ``x`` is then ``[w]`` with ``w`` of shape ``(d,)`` or ``(d, k)``.
    l2 : float
        Ridge coefficient :math:`\alpha \ge 0`.
    extension : {"linear", "quadratic"}
        How :math:`F` is extended off the permutation matrices (to the doubly-stochastic matrices that the
        ``"birkhoff"`` step visits, and for the gradient of the ``"linearized"`` step). Both agree on
        :math:`\Pi_n`:

        * ``"linear"`` (default): :math:`F = \|y\|^2 - 2\langle y, PAx\rangle + \|Ax\|^2 + \alpha\|x\|^2`, linear
          in :math:`P` (:math:`L_P = 0`), so the ``"linearized"`` step equals the ``"exact"`` one for every
          :math:`\lambda`;
        * ``"quadratic"``: :math:`F = \|y - PAx\|^2 + \alpha\|x\|^2` with
          :math:`\nabla_P F = 2(PAx - y)(Ax)^\top` and :math:`L_P = 2\|Ax\|^2`. Its linearisation adds
          :math:`-\|(P - P_k)Ax\|^2` to the exact model (the curvature of a term that is constant on
          :math:`\Pi_n`), which the proximal term must outweigh: with :math:`\lambda < 1/L_P` the step is
          monotone but moves only by large improvements, and it stalls far from the planted solution.

    Notes
    -----
    :math:`L_x = 2\sigma_{\max}(A)^2 + 2\alpha` in :math:`x` (:math:`P` is orthogonal) for both extensions.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[1.0], [2.0]]); y = torch.tensor([4.0, 2.0])
    >>> prob = ShuffledRegressionProblem(A, y)
    >>> prob.value([torch.tensor([2.0])], {"rows": torch.tensor([[0.0, 1.0], [1.0, 0.0]])})
    0.0
    """

    @accepts_arrays("A", "y")
    def __init__(
        self, A: torch.Tensor, y: torch.Tensor, *, l2: float = 0.0, extension: str = "linear"
    ) -> None:
        self.A, self.y = _check_regression_data(A, y)
        if not l2 >= 0:
            raise ValueError(f"`l2` must be nonnegative, got {l2!r}")
        if extension not in ("linear", "quadratic"):
            raise ValueError(f"unknown extension {extension!r}; expected one of ['linear', 'quadratic']")
        self.extension = extension
        self.l2 = float(l2)
        self.sizes = {"rows": self.A.shape[0]}
        self.dtype = self.A.dtype

    def _fit(self, w: torch.Tensor) -> torch.Tensor:
        return self.A @ w

    def loss(self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor]) -> torch.Tensor:
        w = x[0]
        z = self._fit(w)
        if self.extension == "quadratic":
            out = (self.y - P["rows"] @ z).square().sum()
        else:
            out = self.y.square().sum() - 2 * (self.y * (P["rows"] @ z)).sum() + z.square().sum()
        if self.l2:
            out = out + self.l2 * w.square().sum()
        return out

    def gradient_p(self, x, P):
        if self.extension == "linear":
            return self.linear_cost(x)
        z = self._fit(x[0].detach())
        r = P["rows"] @ z - self.y
        z2, r2 = z.reshape(z.shape[0], -1), r.reshape(r.shape[0], -1)
        return {"rows": 2 * r2 @ z2.T}

    def linear_cost(self, x):
        z = self._fit(x[0].detach())
        z2, y2 = z.reshape(z.shape[0], -1), self.y.reshape(self.y.shape[0], -1)
        return {"rows": -2 * y2 @ z2.T}

    def lipschitz_x(self) -> float:
        """:math:`L_x = 2\\sigma_{\\max}(A)^2 + 2\\alpha`."""
        return 2 * float(torch.linalg.matrix_norm(self.A, ord=2).item()) ** 2 + 2 * self.l2

    def lipschitz_p(self, w: torch.Tensor) -> float:
        """:math:`L_P` at ``w``: 0 for the linear extension, :math:`2\\|Aw\\|_F^2` for the quadratic one."""
        if self.extension == "linear":
            return 0.0
        return 2 * float(self._fit(w.detach()).square().sum().item())


@accepts_arrays("A", "y")
def solve_shuffled_regression(
    A: torch.Tensor,
    y: torch.Tensor,
    *,
    method: str = "exact",
    restarts: int = 20,
    generator: torch.Generator | int | None = None,
    max_iter: int = 100,
    tol: float = 1e-9,
    lam: float = math.inf,
    x_steps: int = 10,
    l2: float = 0.0,
    **renamed: Any,
) -> PAMResult:
    r"""Shuffled linear regression :math:`\min_{x, P}\|y - PAx\|^2 + \alpha\|x\|^2` by PAM with random restarts.

    Each restart draws :math:`x_0 \sim \mathcal N(0, s^2 I)` with :math:`s = \|y\| / \|A\|_F`, starts from the
    identity permutation and runs :class:`PAM` on :class:`ShuffledRegressionProblem` (linear extension), with
    ``x_steps`` gradient steps of size :math:`1/L_x` per x-step; the restart with the lowest objective is returned.
    Restart ``r`` is seeded with ``stable_seed("shuffled_regression", generator, r)``.

    Parameters
    ----------
    A : torch.Tensor or array-like
        ``(n, d)`` design matrix.
    y : torch.Tensor or array-like
        ``(n,)`` or ``(n, k)`` shuffled responses.
    method : {"exact", "linearized", "birkhoff"}
        The PAM P-step (``"linearized"`` equals ``"exact"`` on the linear extension).
    restarts : int
        Number of random starts (at least 1). Alternating minimisation reaches the planted solution from a
        fraction of the starts only (about one in five for :math:`n = 12, d = 2`, fewer as :math:`d` grows).
    generator : torch.Generator or int, optional
        The base seed of the restarts: an int, a draw from the generator, or (default) a draw from torch's global
        RNG (``seed=`` before 0.2, still accepted with a :class:`DeprecationWarning`).
    max_iter, tol
        Per restart, as in :meth:`PAM.run`.
    lam : float
        P proximal parameter (default ``math.inf``: plain alternating minimisation). For ``"birkhoff"`` the
        relaxed step size is :math:`n / (2\|y\|^2)`.
    x_steps : int
        Gradient steps per x-step.
    l2 : float
        Ridge coefficient.

    Returns
    -------
    PAMResult
        The best restart (``x = [w]``, ``perms = {"rows": perm}`` with ``y ≈ (A w)[perm]``). If that restart hit
        ``max_iter`` it has ``status == 1`` and a :class:`~neuralign.errors.ConvergenceWarning` is issued.

    References
    ----------
    .. [1] A. Pananjady, M. J. Wainwright, T. A. Courtade, "Linear regression with shuffled data: statistical and
       computational limits of permutation recovery", IEEE Trans. Inf. Theory 64(5), 2018, arXiv:1608.02902.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> A = torch.randn(12, 2, generator=g, dtype=torch.float64)
    >>> perm = torch.randperm(12, generator=g)
    >>> y = (A @ torch.tensor([1.0, -2.0], dtype=torch.float64))[perm]
    >>> res = solve_shuffled_regression(A, y, generator=0)
    >>> bool(torch.equal(res.perms["rows"], perm)), res.x[0].round(decimals=4).tolist()
    (True, [1.0, -2.0])
    """
    prob = ShuffledRegressionProblem(A, y, l2=l2)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"`restarts` must be a positive int, got {restarts!r}")
    lr = 1.0 / prob.lipschitz_x()
    # relaxed ("birkhoff") steps: entries of C(x) = -2 y (Ax)^T are about 2 ||y||^2 / n at a fit
    birkhoff_lr = prob.A.shape[0] / max(2 * float(prob.y.square().sum().item()), 1e-300)
    old = renamed_keywords(renamed, {"seed": "generator"}, where="solve_shuffled_regression")
    generator = old.get("generator", generator)
    base = as_seed(generator)
    scale = float(prob.y.norm().item()) / max(float(prob.A.norm().item()), 1e-300)
    w_shape = (prob.A.shape[1],) if prob.y.dim() == 1 else (prob.A.shape[1], prob.y.shape[1])
    best: PAMResult | None = None
    for r in range(restarts):
        gen = as_generator(stable_seed("shuffled_regression", base, r))
        w0 = scale * torch.randn(w_shape, generator=gen, dtype=prob.A.dtype).to(prob.A.device)
        solver = PAM(
            prob,
            [w0],
            method=BirkhoffStep(lr=birkhoff_lr) if method == "birkhoff" else method,
            lam=lam,
            x_steps=x_steps,
            x_optimizer=lambda params: torch.optim.SGD(params, lr=lr),
            generator=gen,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            res = solver.run(max_iter=max_iter, tol=tol)
        logger.debug("shuffled regression restart %d: F=%.6g after %d iterations", r, res.fun, res.n_iter)
        if best is None or res.fun < best.fun:
            best = res
    if best.status == Status.MAX_ITER:
        warnings.warn(
            f"solve_shuffled_regression: the best restart did not converge ({best.message}); "
            "try a larger `max_iter` or `x_steps`",
            ConvergenceWarning,
            stacklevel=2,
        )
    return best

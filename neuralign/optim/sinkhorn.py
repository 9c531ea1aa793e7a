"""The Sinkhorn operator: a differentiable map from score matrices to doubly-stochastic matrices."""

from __future__ import annotations

import torch

from neuralign._numpy import accepts_arrays
from neuralign._validate import check_int, check_real
from neuralign.errors import NonFiniteError

__all__ = ["sinkhorn"]


@accepts_arrays("scores")
def sinkhorn(scores: torch.Tensor, *, tau: float = 1.0, n_iter: int = 20) -> torch.Tensor:
    r"""Log-domain Sinkhorn normalisation of :math:`\exp(S/\tau)` towards a doubly-stochastic matrix.

    .. math::

        \log X^{(0)} = S / \tau, \qquad
        \log X^{(k+\frac12)} = \log X^{(k)} - \operatorname{LSE}_{\text{row}}\big(\log X^{(k)}\big), \qquad
        \log X^{(k+1)} = \log X^{(k+\frac12)} - \operatorname{LSE}_{\text{col}}\big(\log X^{(k+\frac12)}\big),

    returning :math:`X^{(K)}` after :math:`K` = ``n_iter`` sweeps (rows normalised, then columns), where
    :math:`S` are the scores, :math:`\tau > 0` the temperature and :math:`\operatorname{LSE}` the log-sum-exp
    over each row (column), subtracted from every entry of that row (column). Every column of the result sums to
    1 exactly (up to rounding) and the rows to 1 within the error of the truncated iteration; as
    :math:`K \to \infty` it converges to the unique doubly-stochastic matrix :math:`\operatorname{diag}(u)
    e^{S/\tau} \operatorname{diag}(v)` (Sinkhorn 1964), and as :math:`\tau \to 0` to the permutation matrix of
    the linear assignment :math:`\max_P \langle S, P\rangle` (Mena et al. 2018).

    Parameters
    ----------
    scores : torch.Tensor or array-like
        ``(..., n, n)`` real floating-point scores :math:`S` (a batch of matrices over the leading dimensions),
        finite. numpy input gives numpy output (no gradient).
    tau : float
        Temperature :math:`\tau > 0` (default 1, as Peña et al. 2023).
    n_iter : int
        Sinkhorn sweeps :math:`K \ge 1` (default 20, as Peña et al. 2023).

    Returns
    -------
    torch.Tensor or numpy.ndarray
        ``(..., n, n)`` nonnegative matrices :math:`X^{(K)}` of the input's dtype and device (same kind as the
        input).

    Raises
    ------
    TypeError
        If ``scores`` is not real floating point.
    ValueError
        If ``scores`` is not ``(..., n, n)`` with ``n >= 1``, ``tau`` is not a finite number > 0, ``n_iter`` is not
        an int >= 1.
    NonFiniteError
        If ``scores`` holds NaN or infinite entries.

    Notes
    -----
    Gradients are **unrolled**: autograd differentiates through the :math:`K` log-sum-exp sweeps, so the
    backward pass is the exact derivative of the matrix the forward pass returned (the Taylor test of
    ``tests/optim/test_sinkhorn.py`` checks a remainder of order :math:`h^2`). Peña et al. differentiate the
    fixed point implicitly instead (a linear solve of order :math:`(2n-1)^3` per matrix); that is the derivative of
    the *limit* :math:`X^{(\infty)}`, which after 20 sweeps at :math:`\tau = 1` is not the matrix the forward pass
    used, whereas the unrolled gradient is, for :math:`O(Kn^2)` time and memory, cheaper than the solve at every
    :math:`n` we permute.

    References
    ----------
    .. [1] R. Sinkhorn, "A relationship between arbitrary positive matrices and doubly stochastic matrices",
       Ann. Math. Statist. 35(2), 1964.
    .. [2] G. Mena, D. Belanger, S. Linderman, J. Snoek, "Learning Latent Permutations with Gumbel-Sinkhorn
       Networks", ICLR 2018, arXiv:1802.08665.
    .. [3] F. A. G. Peña, H. R. Medeiros, T. Dubail, M. Aminbeidokhti, E. Granger, M. Pedersoli, "Re-basin via
       implicit Sinkhorn differentiation", CVPR 2023, arXiv:2212.12042.

    Examples
    --------
    >>> import torch
    >>> X = sinkhorn(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), n_iter=5)
    >>> torch.allclose(X.sum(0), torch.ones(2)), torch.allclose(X.sum(1), torch.ones(2)), round(float(X[0, 0]), 4)
    (True, True, 0.8808)
    """
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError(f"`scores` must be a real floating-point tensor, got "
                        f"{scores.dtype if isinstance(scores, torch.Tensor) else type(scores).__name__}")  # fmt: skip
    if scores.dim() < 2 or scores.shape[-1] != scores.shape[-2] or scores.shape[-1] < 1:
        raise ValueError(f"`scores` must be (..., n, n) with n >= 1, got shape {tuple(scores.shape)}")
    tau = check_real(tau, "tau", low=0.0, low_open=True)
    n_iter = check_int(n_iter, "n_iter", minimum=1)
    if not bool(torch.isfinite(scores).all()):
        raise NonFiniteError("`scores` holds NaN or infinite entries")
    log_x = scores / tau
    for _ in range(n_iter):
        log_x = log_x - torch.logsumexp(log_x, dim=-1, keepdim=True)
        log_x = log_x - torch.logsumexp(log_x, dim=-2, keepdim=True)
    return log_x.exp()

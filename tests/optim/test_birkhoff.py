"""Birkhoff polytope: permutation helpers, the Euclidean projection (checked against cvxpy), BvN decomposition."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuralign.errors import ConvergenceWarning, NonFiniteError
from neuralign.optim import (
    birkhoff_decomposition,
    is_permutation,
    matrix_to_perm,
    nearest_permutation,
    perm_to_matrix,
    project_doubly_stochastic,
    project_unit_marginals,
    sample_permutations,
)

seeds = st.integers(0, 2**31 - 1)


def random_perm(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=g)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), seed=seeds)
def test_perm_matrix_round_trip(n, seed):
    g = torch.Generator().manual_seed(seed)
    perm = random_perm(n, g)
    P = perm_to_matrix(perm, dtype=torch.float64)
    B = torch.randn(n, 3, generator=g, dtype=torch.float64)
    # the package's convention: B_new = P @ B = B[perm]
    torch.testing.assert_close(P @ B, B[perm], rtol=0, atol=0)
    assert matrix_to_perm(P).tolist() == perm.tolist()
    assert is_permutation(perm)


def test_is_permutation_rejects():
    assert not is_permutation(torch.tensor([0, 2]))
    assert not is_permutation(torch.tensor([0.0, 1.0]))
    assert not is_permutation(torch.tensor([[0, 1]]))
    assert is_permutation([1, 0]) and is_permutation(np.array([2, 0, 1]))  # array-likes are read too
    assert not is_permutation("ab") and not is_permutation(np.array([0.0, 1.0]))
    assert is_permutation(torch.zeros(0, dtype=torch.int64))


def test_matrix_to_perm_errors():
    with pytest.raises(ValueError, match=r"entry \(0, 0\) is 0.5, not 0 or 1"):
        matrix_to_perm(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"row 0 has 2 ones, expected 1"):
        matrix_to_perm(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"column 0 has 2 ones, expected 1"):
        matrix_to_perm(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"`P` must be a square matrix, got shape \(2, 3\)"):
        matrix_to_perm(torch.zeros(2, 3))
    assert matrix_to_perm(torch.tensor([[1e-9, 1.0], [1.0, 0.0]]), atol=1e-6).tolist() == [1, 0]


def test_perm_to_matrix_errors():
    with pytest.raises(ValueError, match=r"`perm` must be a 1-D integer permutation of 0..n-1, got \[0, 0\]"):
        perm_to_matrix(torch.tensor([0, 0]))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 10), seed=seeds)
def test_affine_step_is_the_orthogonal_projection(n, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=torch.float64) * 3
    X = project_unit_marginals(M)
    one = torch.ones(n, dtype=torch.float64)
    torch.testing.assert_close(X.sum(dim=1), one, atol=1e-12, rtol=0)
    torch.testing.assert_close(X.sum(dim=0), one, atol=1e-12, rtol=0)
    torch.testing.assert_close(project_unit_marginals(X), X, atol=1e-12, rtol=0)  # idempotent
    # the residual M - X is orthogonal to every direction of the affine set (zero row and column sums) ...
    Z = torch.randn(n, n, generator=g, dtype=torch.float64)
    Z = Z - Z.mean(dim=1, keepdim=True) - Z.mean(dim=0, keepdim=True) + Z.mean()
    assert float(((M - X) * Z).sum()) == pytest.approx(0.0, abs=1e-9)
    # ... hence X is the closest point of the set: any other point Y = X + Z is farther from M.
    assert float(torch.linalg.norm(M - X - Z)) >= float(torch.linalg.norm(M - X)) - 1e-12


def test_affine_projection_batches_and_keeps_input():
    M = torch.randn(4, 5, 5)
    before = M.clone()
    X = project_unit_marginals(M)
    torch.testing.assert_close(X[2], project_unit_marginals(M[2]), atol=1e-6, rtol=0)
    torch.testing.assert_close(M, before, rtol=0, atol=0)


# The projection meets tol=1e-9 on the marginals in float64 (its default); entries are exactly nonnegative.
PROJ_TOL = 1e-9


def marginal_error(X: torch.Tensor) -> float:
    return max(float((X.sum(dim=-1) - 1).abs().max()), float((X.sum(dim=-2) - 1).abs().max()))


def dual_certificate_error(M: torch.Tensor, X: torch.Tensor) -> float:
    """How far X is from satisfying the KKT conditions of the projection of M, relative to M's scale.

    X is the projection iff X = max(M + u 1^T + 1 v^T, 0) for some u, v: X_ij = M_ij + u_i + v_j on the support
    of X and M_ij + u_i + v_j <= 0 off it. The smallest violation t over all u, v is a linear programme (solved
    here with HiGHS, independently of the projection's own dual iterates).
    """
    cp = pytest.importorskip("cvxpy")
    n = M.shape[0]
    m, x = M.numpy(), X.numpy()
    u, v, t = cp.Variable(n), cp.Variable(n), cp.Variable()
    on = x > 0
    i, j = np.nonzero(on)
    k, l = np.nonzero(~on)
    constraints = [cp.abs(m[i, j] + u[i] + v[j] - x[i, j]) <= t, m[k, l] + u[k] + v[l] <= t]
    problem = cp.Problem(cp.Minimize(t), constraints)
    problem.solve(solver="HIGHS")
    assert problem.status == "optimal"
    return float(problem.value) / max(1.0, float(M.abs().max()))


@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4])
def test_projection_is_feasible_and_optimal_at_three_scales(scale):
    # issue #9 item 14: the former 20 rounds of ReLU + affine projection left entries of -0.04, -4.7 and -472 here
    g = torch.Generator().manual_seed(64)
    M = scale * torch.randn(64, 64, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        X = project_doubly_stochastic(M)
    assert float(X.min()) >= 0.0
    assert marginal_error(X) <= PROJ_TOL
    # X = max(M + u 1^T + 1 v^T, 0) holds up to rounding of entries of size ~scale (1e-16 relative, HiGHS's own
    # feasibility tolerance 1e-7 bounds what the LP can certify)
    assert dual_certificate_error(M, X) <= 1e-7


@pytest.mark.parametrize("seed", range(4))
def test_projection_matches_the_cvxpy_qp(seed):
    cp = pytest.importorskip("cvxpy")
    g = torch.Generator().manual_seed(seed)
    n = 2 + seed
    M = 2.0 * torch.randn(n, n, generator=g, dtype=torch.float64)
    X = project_doubly_stochastic(M)
    Y = cp.Variable((n, n), nonneg=True)
    problem = cp.Problem(
        cp.Minimize(0.5 * cp.sum_squares(Y - M.numpy())),
        [cp.sum(Y, axis=1) == 1, cp.sum(Y, axis=0) == 1],
    )
    problem.solve(solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    assert problem.status == "optimal"
    # The objective is 1-strongly convex, so a point within an optimality gap eps of the optimum lies within
    # sqrt(2 eps) of it: with Clarabel's gap tolerance 1e-10 (times the objective, here O(10)) that is ~5e-5.
    torch.testing.assert_close(X, torch.as_tensor(Y.value), atol=5e-5, rtol=0)
    assert 0.5 * float((X - M).square().sum()) <= problem.value + 1e-8


@pytest.mark.parametrize("seed", range(3))
def test_projected_pam_step_has_a_valid_decomposition(seed):
    # issue #9 item 14: a P-step of the relaxed PAM, P - 50 * gradient, whose former projection kept a -1.7 entry
    # and whose decomposition recovered one term with residual 54
    n = 16
    g = torch.Generator().manual_seed(seed)
    P = perm_to_matrix(torch.randperm(n, generator=g), dtype=torch.float64)
    gradient = torch.randn(n, n, generator=g, dtype=torch.float64)
    X = project_doubly_stochastic(P - 50.0 * gradient)
    assert float(X.min()) >= 0.0 and marginal_error(X) <= PROJ_TOL
    tol = 1e-7
    dec = birkhoff_decomposition(X, tol=tol)
    assert bool((dec.coefficients > 0).all())
    assert all(is_permutation(p) for p in dec.perms)
    # dropped entries are below tol each (at most n^2 of them) and the marginals are off by at most PROJ_TOL
    budget = n * n * tol + n * PROJ_TOL
    assert float(dec.coefficients.sum()) == pytest.approx(1.0, abs=budget)
    assert dec.residual <= budget
    torch.testing.assert_close(dec.reconstruct(), X, atol=budget, rtol=0)


def test_projection_fixed_points_batches_and_dtypes():
    n = 6
    D = 0.3 * perm_to_matrix(torch.tensor([1, 2, 3, 4, 5, 0]), dtype=torch.float64) + 0.7 / n
    torch.testing.assert_close(project_doubly_stochastic(D), D, atol=1e-12, rtol=0)
    g = torch.Generator().manual_seed(5)
    M = torch.randn(3, 2, n, n, generator=g, dtype=torch.float64)
    before = M.clone()
    X = project_doubly_stochastic(M)
    assert X.shape == M.shape and torch.equal(M, before)
    torch.testing.assert_close(X[2, 1], project_doubly_stochastic(M[2, 1]), atol=1e-9, rtol=0)
    # float32 in, float32 out: the float64 result rounded, so each row sum moves by at most ~n * eps32 / 2
    X32 = project_doubly_stochastic(M[0, 0].float())
    assert X32.dtype == torch.float32 and float(X32.min()) >= 0.0
    assert marginal_error(X32.double()) <= n * torch.finfo(torch.float32).eps
    one = project_doubly_stochastic(torch.tensor([[-3.0]], dtype=torch.float64))
    assert one.tolist() == [[1.0]]
    assert project_doubly_stochastic(torch.zeros(0, 0)).shape == (0, 0)


def test_projection_warns_when_max_iter_is_too_small():
    g = torch.Generator().manual_seed(1)
    M = 100.0 * torch.randn(32, 32, generator=g, dtype=torch.float64)
    with pytest.warns(ConvergenceWarning, match=r"max_iter=1 reached with row/column sums off by .* > tol=1e-09"):
        X = project_doubly_stochastic(M, max_iter=1)
    assert float(X.min()) >= 0.0  # the last iterate: nonnegative, marginals not yet within tol


def test_projection_gradient_is_the_jacobian():
    g = torch.Generator().manual_seed(2)
    M = torch.randn(5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    # the projection is piecewise affine; finite differences of 1e-6 stay on one piece for this seed
    assert torch.autograd.gradcheck(project_doubly_stochastic, (M,), eps=1e-6, atol=1e-6)
    project_doubly_stochastic(M).square().sum().backward()
    assert M.grad is not None and bool(torch.isfinite(M.grad).all())


def test_projection_validates():
    with pytest.raises(ValueError, match=r"`M` must have shape \(..., n, n\), got \(2, 3\)"):
        project_doubly_stochastic(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"`max_iter` must be a nonnegative int, got -1"):
        project_doubly_stochastic(torch.zeros(2, 2), max_iter=-1)
    with pytest.raises(ValueError, match=r"`tol` must be a nonnegative number, got -1.0"):
        project_doubly_stochastic(torch.zeros(2, 2), tol=-1.0)
    with pytest.raises(NonFiniteError, match=r"^`M` holds 9 NaN and 0 infinite entries; the projection needs"):
        project_doubly_stochastic(torch.full((3, 3), float("nan")))
    with pytest.raises(NonFiniteError, match=r"`M` holds 0 NaN and 1 infinite entries"):
        project_doubly_stochastic(torch.tensor([[0.0, float("inf")], [0.0, 0.0]]))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), k=st.integers(1, 5), seed=seeds)
def test_decomposition_reconstructs_a_convex_combination(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.05
    weights = weights / weights.sum()
    D = sum(w * perm_to_matrix(random_perm(n, g), dtype=torch.float64) for w in weights)
    dec = birkhoff_decomposition(D, tol=1e-9)
    torch.testing.assert_close(dec.reconstruct(), D, atol=1e-9, rtol=0)
    assert float(dec.coefficients.sum()) == pytest.approx(1.0, abs=1e-9)
    assert bool((dec.coefficients > 0).all())
    assert all(is_permutation(p) for p in dec.perms)
    assert dec.residual < 1e-9
    # each term zeroes at least one entry and the last one n entries
    assert dec.coefficients.shape[0] <= n * n - n + 1


def test_decomposition_of_projected_matrix_and_limits():
    g = torch.Generator().manual_seed(3)
    D = project_doubly_stochastic(torch.rand(8, 8, generator=g, dtype=torch.float64))
    dec = birkhoff_decomposition(D)
    assert 0.9 < float(dec.coefficients.sum()) <= 1.0 + 1e-9
    assert dec.residual < 0.1
    short = birkhoff_decomposition(D, max_terms=2)
    assert short.coefficients.shape == (2,) and short.perms.shape == (2, 8)
    with pytest.raises(ValueError, match=r"`max_terms` must be a positive int or None, got 0"):
        birkhoff_decomposition(D, max_terms=0)
    with pytest.raises(ValueError, match=r"`D` holds NaN or infinite entries"):
        birkhoff_decomposition(torch.full((2, 2), float("nan")))
    empty = birkhoff_decomposition(torch.zeros(3, 3))
    assert empty.coefficients.numel() == 0
    with pytest.raises(ValueError, match=r"`decomposition` holds no term to sample from"):
        sample_permutations(empty, 3)


def test_sampling_follows_coefficients_and_is_seeded():
    # disjoint supports (cyclic shifts), so the decomposition is unique
    perms = [torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 0]), torch.tensor([2, 3, 0, 1])]
    weights = [0.6, 0.3, 0.1]
    D = sum(w * perm_to_matrix(p, dtype=torch.float64) for w, p in zip(weights, perms))
    dec = birkhoff_decomposition(D)
    expected = torch.tensor(weights, dtype=torch.float64)
    torch.testing.assert_close(dec.coefficients, expected, atol=1e-12, rtol=0)
    draws = sample_permutations(dec, 20000, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (20000, 4) and draws.dtype == torch.int64
    for w, p in zip(weights, perms):
        freq = float((draws == p).all(dim=1).double().mean())
        assert freq == pytest.approx(w, abs=0.015)  # ~4.5 binomial std at 20000 draws
    again = sample_permutations(dec, 50, generator=7)
    assert torch.equal(again, sample_permutations(dec, 50, generator=7))
    top1 = sample_permutations(dec, 10, generator=1, max_terms=1)
    assert bool((top1 == perms[0]).all())
    assert sample_permutations(dec, 0).shape == (0, 4)
    with pytest.raises(ValueError, match=r"`k` must be a nonnegative int, got -2"):
        sample_permutations(dec, -2)


def test_nearest_permutation_is_the_hungarian_projection():
    g = torch.Generator().manual_seed(1)
    perm = random_perm(7, g)
    noise = torch.rand(7, 7, generator=g, dtype=torch.float64)
    D = 0.8 * perm_to_matrix(perm, dtype=torch.float64) + 0.2 * noise
    assert nearest_permutation(D).tolist() == perm.tolist()

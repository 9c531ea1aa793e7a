"""Birkhoff polytope: permutation helpers, the (approximate) DS projection, BvN decomposition and sampling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
    assert not is_permutation([0, 1])
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


@pytest.mark.parametrize("n", [3, 10, 40])
def test_projection_approaches_doubly_stochastic(n):
    g = torch.Generator().manual_seed(n)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    violations = []
    for n_iter in (1, 5, 20, 100):
        X = project_doubly_stochastic(M, n_iter=n_iter)
        torch.testing.assert_close(X.sum(dim=1), torch.ones(n, dtype=torch.float64), atol=1e-10, rtol=0)
        torch.testing.assert_close(X.sum(dim=0), torch.ones(n, dtype=torch.float64), atol=1e-10, rtol=0)
        violations.append(float((-X).clamp(min=0).max()))
    assert violations[-1] <= violations[0]
    assert violations[-1] < 1e-3
    # a doubly-stochastic input is a fixed point
    D = 0.3 * perm_to_matrix(torch.tensor(list(range(n))), dtype=torch.float64) + 0.7 / n
    torch.testing.assert_close(project_doubly_stochastic(D), D, atol=1e-12, rtol=0)


def test_projection_is_differentiable_and_validates():
    M = torch.randn(4, 4, requires_grad=True)
    project_doubly_stochastic(M, n_iter=3).square().sum().backward()
    assert M.grad is not None and torch.isfinite(M.grad).all()
    with pytest.raises(ValueError, match=r"`M` must have shape \(..., n, n\), got \(2, 3\)"):
        project_doubly_stochastic(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"`n_iter` must be a nonnegative int, got -1"):
        project_doubly_stochastic(torch.zeros(2, 2), n_iter=-1)


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
    D = project_doubly_stochastic(torch.rand(8, 8, generator=g, dtype=torch.float64), n_iter=100)
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

"""numpy in, numpy out: every public solver of neuralign.optim gives on numpy arrays what it gives on tensors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from neuralign._numpy import as_tensor, to_caller_kind
from neuralign.optim import (
    QAPProblem,
    ShuffledRegressionProblem,
    assignment_duals,
    birkhoff_decomposition,
    is_permutation,
    local_search_2opt,
    matrix_to_perm,
    nearest_permutation,
    perm_to_matrix,
    project_doubly_stochastic,
    project_unit_marginals,
    proximal_step_bound,
    qap_objective,
    sample_permutations,
    solve_assignment,
    solve_assignment_lp,
    solve_assignments,
    solve_qap,
    solve_shuffled_regression,
)


def assert_same(from_numpy, from_torch):
    """The numpy result equals the torch result field by field, with numpy arrays where the torch one has tensors.

    Both paths run the same float64 arithmetic on the same values, so the results are bitwise equal.
    """
    if isinstance(from_torch, torch.Tensor):
        assert isinstance(from_numpy, np.ndarray), type(from_numpy)
        assert from_numpy.dtype == from_torch.detach().cpu().numpy().dtype
        np.testing.assert_array_equal(from_numpy, from_torch.detach().cpu().numpy())
    elif dataclasses.is_dataclass(from_torch):
        assert type(from_numpy) is type(from_torch)
        for field in dataclasses.fields(from_torch):
            assert_same(getattr(from_numpy, field.name), getattr(from_torch, field.name))
    elif isinstance(from_torch, dict):
        assert from_numpy.keys() == from_torch.keys()
        for key in from_torch:
            assert_same(from_numpy[key], from_torch[key])
    elif isinstance(from_torch, (list, tuple)):
        assert type(from_numpy) is type(from_torch) and len(from_numpy) == len(from_torch)
        for a, b in zip(from_numpy, from_torch):
            assert_same(a, b)
    else:
        assert not isinstance(from_numpy, np.ndarray)
        assert from_numpy == from_torch or (from_numpy != from_numpy and from_torch != from_torch)  # NaN == NaN


def both(fn, *arrays, **options):
    """``fn`` on numpy arrays and on the same values as tensors; checks that the results agree."""
    from_numpy = fn(*arrays, **options)
    from_torch = fn(*(torch.from_numpy(np.array(a)) for a in arrays), **options)
    assert_same(from_numpy, from_torch)
    return from_numpy


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_assignment_solvers():
    cost = rng(0).normal(size=(6, 6))
    res = both(solve_assignment, cost, certificate=True)
    assert res.perm.dtype == np.int64 and res.u.dtype == np.float64
    both(solve_assignment, rng(1).normal(size=(4, 7)), maximize=True)
    both(assignment_duals, cost, res.perm)
    lp = both(solve_assignment_lp, cost)
    assert isinstance(lp.x, np.ndarray) and lp.fun == pytest.approx(res.fun, abs=1e-6)  # LP solver tolerance
    both(proximal_step_bound, cost, np.array([1, 0, 2, 3, 5, 4]))
    out = solve_assignments({"a": cost, "b": torch.from_numpy(cost)})
    assert isinstance(out["a"].perm, np.ndarray) and isinstance(out["b"].perm, torch.Tensor)
    assert out["a"].perm.tolist() == out["b"].perm.tolist()


def test_birkhoff_functions():
    perm = np.array([2, 0, 3, 1])
    P = both(perm_to_matrix, perm, dtype=torch.float64)
    both(matrix_to_perm, P)
    M = rng(2).normal(size=(5, 5))
    both(nearest_permutation, M)
    both(project_unit_marginals, rng(3).normal(size=(2, 5, 5)))
    X = both(project_doubly_stochastic, M)
    assert X.dtype == np.float64 and X.min() >= 0.0
    assert project_doubly_stochastic(M.astype(np.float32)).dtype == np.float32
    dec = both(birkhoff_decomposition, X, tol=1e-9)
    assert isinstance(dec.coefficients, np.ndarray) and dec.perms.dtype == np.int64
    np.testing.assert_allclose(dec.reconstruct(), X, atol=1e-8, rtol=0)  # n^2 tol + projection tol
    draws = sample_permutations(dec, 5, generator=0)
    tensor_dec = birkhoff_decomposition(torch.from_numpy(X), tol=1e-9)
    np.testing.assert_array_equal(draws, sample_permutations(tensor_dec, 5, generator=0).numpy())
    assert is_permutation(perm) and is_permutation(perm.tolist())


def test_qap_functions():
    r = rng(4)
    A, B = r.integers(0, 10, size=(7, 7)), r.integers(0, 10, size=(7, 7))  # integer matrices, as QAPLIB's
    start = np.array([6, 5, 4, 3, 2, 1, 0])
    assert both(qap_objective, A, B, start) == qap_objective(A.tolist(), B.tolist(), start.tolist())
    both(local_search_2opt, A, B, start)
    res = both(solve_qap, A, B, restarts=2, seed=0)
    assert isinstance(res.perm, np.ndarray) and res.perm.dtype == np.int64
    two = both(solve_qap, A, B, method="2opt", seed=1)
    assert is_permutation(two.perm) and two.fun == qap_objective(A, B, two.perm)
    assert QAPProblem(A, B).A.dtype == torch.float64  # the problem object holds tensors for PAM


def test_shuffled_regression():
    r = rng(5)
    A = r.normal(size=(12, 2))
    perm = r.permutation(12)
    y = (A @ np.array([1.0, -2.0]))[perm]
    res = both(solve_shuffled_regression, A, y, seed=0, restarts=5)
    assert isinstance(res.x[0], np.ndarray) and isinstance(res.perms["rows"], np.ndarray)
    # the fitted, unshuffled responses match y up to the residual the result reports
    fit = (A @ res.x[0])[res.perms["rows"]]
    assert float(((y - fit) ** 2).sum()) == pytest.approx(res.fun, rel=1e-9, abs=1e-12)
    assert isinstance(ShuffledRegressionProblem(A, y).A, torch.Tensor)


def test_kind_rules_and_errors():
    cost = rng(6).normal(size=(3, 3))
    # a tensor among the inputs makes the answer torch (array-likes join the tensor's device)
    assert isinstance(qap_objective(cost, torch.from_numpy(cost), np.arange(3)), float)
    assert isinstance(local_search_2opt(cost, torch.from_numpy(cost), [0, 1, 2]).perm, torch.Tensor)
    # nested lists are array-likes too, and answer in numpy
    assert isinstance(solve_assignment(cost.tolist()).perm, np.ndarray)
    # the caller's array is copied, never shared
    before = cost.copy()
    project_unit_marginals(cost)
    np.testing.assert_array_equal(cost, before)
    assert as_tensor(cost, "cost").data_ptr() != cost.ctypes.data
    with pytest.raises(TypeError, match=r"^`M` must be a torch.Tensor or a numeric array-like, got ndarray of dtype"):
        project_doubly_stochastic(np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(TypeError, match=r"^`A` must be a torch.Tensor or a numeric array-like, got dict"):
        solve_qap({"a": 1}, cost)
    assert to_caller_kind({"k": [torch.ones(2)], "f": 1.5}) == {"k": [pytest.approx(np.ones(2))], "f": 1.5}

"""Linear assignment: exact solver, dual certificates, LP relaxation (optimality conditions re-checked
here)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuralign.errors import NonFiniteError
from neuralign.optim import (
    assignment_duals,
    is_permutation,
    solve_assignment,
    solve_assignment_lp,
    solve_assignments,
)

# LP solvers return duals to about 1e-9 (interior point) or exactly (simplex); tolerances below say which.
LP_ATOL = 1e-6


def brute_force(cost: torch.Tensor, maximize: bool = False) -> float:
    n = cost.shape[0]
    values = [sum(cost[i, p[i]].item() for i in range(n)) for p in itertools.permutations(range(n))]
    return max(values) if maximize else min(values)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), maximize=st.booleans())
def test_matches_brute_force_and_certificate_holds(n, seed, maximize):
    g = torch.Generator().manual_seed(seed)
    cost = torch.randn(n, n, generator=g, dtype=torch.float64)
    res = solve_assignment(cost, maximize=maximize, certificate=True)
    assert is_permutation(res.perm) and res.perm.dtype == torch.int64
    assert res.fun == pytest.approx(brute_force(cost, maximize), abs=1e-12)
    assert res.fun == pytest.approx(cost[torch.arange(n), res.perm].sum().item(), abs=1e-12)
    reduced = cost - res.u[:, None] - res.v[None, :]
    if maximize:
        reduced = -reduced
    assert float(reduced.min()) >= -1e-12  # dual feasibility
    zeros = torch.zeros(n, dtype=torch.float64)
    # complementary slackness
    torch.testing.assert_close(reduced[torch.arange(n), res.perm], zeros, atol=1e-12, rtol=0)
    assert res.duality_gap() == pytest.approx(0.0, abs=1e-10)


def test_duals_of_a_suboptimal_perm_are_infeasible():
    cost = torch.tensor([[0.0, 10.0], [10.0, 0.0]], dtype=torch.float64)
    u, v = assignment_duals(cost, torch.tensor([1, 0]))  # cost 20, the optimum is 0
    assert float((cost - u[:, None] - v[None, :]).min()) < -1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64])
def test_dtypes_and_devices_follow_input(dtype):
    cost = torch.tensor([[3, 1, 2], [1, 3, 2], [2, 2, 0]]).to(dtype)
    res = solve_assignment(cost)
    assert res.perm.tolist() == [1, 0, 2] and res.fun == 2.0
    assert res.perm.device == cost.device and res.perm.dtype == torch.int64


def test_rectangular_conventions():
    wide = torch.tensor([[5.0, 1.0, 9.0, 0.5], [1.0, 5.0, 9.0, 7.0]])
    res = solve_assignment(wide)
    assert res.perm.tolist() == [3, 0] and res.fun == pytest.approx(1.5)
    tall = wide.T.contiguous()  # 4 rows, 2 columns: two rows stay unassigned (-1)
    res = solve_assignment(tall)
    assert res.perm.tolist() == [1, -1, -1, 0] and res.fun == pytest.approx(1.5)
    assert res.row_ind.tolist() == [0, 3] and res.col_ind.tolist() == [1, 0]


def test_empty_cost():
    res = solve_assignment(torch.zeros(0, 0))
    assert res.perm.numel() == 0 and res.fun == 0.0


def test_input_not_mutated():
    cost = torch.randn(5, 5)
    before = cost.clone()
    solve_assignment(cost, maximize=True, certificate=True)
    torch.testing.assert_close(cost, before, rtol=0, atol=0)


def test_nan_and_inf_are_named():
    cost = torch.zeros(4, 4)
    cost[0, 0] = cost[1, 2] = cost[3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"group `layer1.0.conv1`: cost matrix has 3 NaN entries"):
        solve_assignment(cost, name="layer1.0.conv1")
    cost = torch.zeros(3, 3)
    cost[0, 1] = float("inf")
    cost[2, 1] = -float("inf")
    with pytest.raises(ValueError, match=r"^cost matrix has 2 infinite entries"):
        solve_assignment(cost)


def test_bad_shapes_and_kinds():
    with pytest.raises(ValueError, match=r"`cost` must be a 2-D tensor, got shape \(2, 2, 2\)"):
        solve_assignment(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match=r"group `fc`: `cost` must be a 2-D tensor, got shape \(3,\)"):
        solve_assignment(torch.zeros(3), name="fc")
    with pytest.raises(TypeError, match=r"`cost` must be a torch.Tensor or a numeric array-like, got str of dtype"):
        solve_assignment("ab")
    with pytest.raises(TypeError, match=r"`cost` must be a torch.Tensor or a numeric array-like, got list: "):
        solve_assignment([[1.0], [1.0, 2.0]])
    with pytest.raises(TypeError, match=r"must be a real tensor, got dtype torch.bool"):
        solve_assignment(torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`certificate=True` needs a square cost matrix, got shape \(2, 3"):
        solve_assignment(torch.zeros(2, 3), certificate=True)


def test_solve_assignments_names_groups():
    g = torch.Generator().manual_seed(0)
    costs = {"a": torch.randn(4, 4, generator=g), "b": torch.randn(3, 3, generator=g)}
    out = solve_assignments(costs, maximize=True)
    assert list(out) == ["a", "b"]
    for key, res in out.items():
        assert res.perm.tolist() == solve_assignment(costs[key], maximize=True).perm.tolist()
    costs["b"] = torch.full((2, 2), float("nan"))
    with pytest.raises(NonFiniteError, match=r"group `b`: cost matrix has 4 NaN entries"):
        solve_assignments(costs)


@pytest.mark.parametrize("solver", [None, "HIGHS", "CLARABEL"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lp_relaxation_optimality_conditions(solver, seed):
    g = torch.Generator().manual_seed(seed)
    n = 8
    cost = torch.rand(n, n, generator=g, dtype=torch.float64)
    res = solve_assignment_lp(cost, solver=solver)
    assert res.status == 0 and res.converged and res.message == "optimal"
    assert res.solver == (solver or "HIGHS")
    X, u, v = res.x, res.u, res.v
    # primal feasibility
    assert float(X.min()) >= -LP_ATOL
    torch.testing.assert_close(X.sum(dim=0), torch.ones(n, dtype=torch.float64), atol=LP_ATOL, rtol=0)
    torch.testing.assert_close(X.sum(dim=1), torch.ones(n, dtype=torch.float64), atol=LP_ATOL, rtol=0)
    # dual feasibility: reduced costs are nonnegative
    reduced = cost - u[:, None] - v[None, :]
    assert float(reduced.min()) >= -LP_ATOL
    # complementary slackness and zero duality gap
    assert float((X * reduced).sum()) == pytest.approx(0.0, abs=LP_ATOL)
    assert float(u.sum() + v.sum()) == pytest.approx(res.fun, abs=LP_ATOL)
    assert float((cost * X).sum()) == pytest.approx(res.fun, abs=LP_ATOL)
    # the LP optimum is attained at a vertex: same objective as the exact assignment
    assert res.fun == pytest.approx(solve_assignment(cost).fun, abs=LP_ATOL)


def test_lp_simplex_returns_the_vertex():
    g = torch.Generator().manual_seed(5)
    cost = torch.rand(6, 6, generator=g, dtype=torch.float64)  # generic: unique optimum
    res = solve_assignment_lp(cost, solver="HIGHS")
    exact = solve_assignment(cost)
    dense = torch.zeros(6, 6, dtype=torch.float64)
    dense[torch.arange(6), exact.perm] = 1
    torch.testing.assert_close(res.x, dense, atol=1e-9, rtol=0)


def test_lp_errors():
    with pytest.raises(ValueError, match=r"`cost` must be square for the Birkhoff LP, got shape \(2, 3\)"):
        solve_assignment_lp(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"unknown or uninstalled LP solver 'GUROBI'; expected one of \["):
        solve_assignment_lp(torch.zeros(2, 2), solver="GUROBI")
    with pytest.raises(NonFiniteError, match=r"cost matrix has 1 NaN entries"):
        solve_assignment_lp(torch.tensor([[0.0, float("nan")], [0.0, 0.0]]))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 5))
def test_proximal_step_bound_matches_brute_force(seed, n):
    from neuralign.optim import proximal_step_bound

    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, n, generator=g, dtype=torch.float64)
    p = torch.randperm(n, generator=g)
    rows = torch.arange(n)
    base = float(G[rows, p].sum())
    best = -math.inf
    for q in itertools.permutations(range(n)):
        q = torch.tensor(q)
        d = int((q != p).sum())
        if d:
            best = max(best, (base - float(G[rows, q].sum())) / d)
    res = proximal_step_bound(G, p)
    if best <= 1e-12:
        assert res.lam == math.inf
    else:
        assert res.lam == pytest.approx(1.0 / best, rel=1e-9)
        onehot = torch.zeros(n, n, dtype=torch.float64)
        onehot[rows, p] = 1.0
        # just below lam*, the proximal step keeps p; just above, it moves
        keep = solve_assignment(G - onehot / (0.99 * res.lam)).perm
        move = solve_assignment(G - onehot / (1.01 * res.lam)).perm
        assert torch.equal(keep, p)
        assert not torch.equal(move, p)

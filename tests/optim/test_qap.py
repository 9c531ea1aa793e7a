"""QAP: swap gains, 2-opt local minima, QAPLIB optima, brute force on small instances, loaders."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuralign.errors import ConvergenceWarning, DataError
from neuralign.optim import PermutationProblem, perm_to_matrix
from neuralign.optim.qap import (
    QAPProblem,
    _pair_factor,
    _swap_deltas,
    load_qaplib,
    load_qaplib_solution,
    local_search_2opt,
    qap_objective,
    solve_qap,
)
from tests.conftest import shared_data

DT = torch.float64


def brute_force(A, B):
    n = A.shape[0]
    return min(qap_objective(A, B, torch.tensor(p)) for p in itertools.permutations(range(n)))


def random_instance(n, seed, symmetric=False):
    g = torch.Generator().manual_seed(seed)
    A = torch.randint(0, 10, (n, n), generator=g).to(DT)
    B = torch.randint(0, 10, (n, n), generator=g).to(DT)
    if symmetric:
        A, B = A + A.T, B + B.T
    return A, B


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 8), seed=st.integers(0, 2**31 - 1))
def test_swap_gains_match_direct_evaluation(n, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=DT)  # asymmetric, nonzero diagonals: every term of the formula
    B = torch.randn(n, n, generator=g, dtype=DT)
    p = torch.randperm(n, generator=g)
    delta = _swap_deltas(A, A.T.contiguous(), _pair_factor(A), B[p][:, p])
    f = qap_objective(A, B, p)
    direct = torch.zeros(n, n, dtype=DT)
    for r in range(n):
        for s in range(n):
            q = p.clone()
            q[[r, s]] = q[[s, r]]
            direct[r, s] = qap_objective(A, B, q) - f
    torch.testing.assert_close(delta, direct, atol=1e-10, rtol=0)


@pytest.mark.parametrize("seed", range(4))
def test_two_opt_ends_at_a_local_minimum(seed):
    A, B = random_instance(9, seed)
    start = torch.randperm(9, generator=torch.Generator().manual_seed(seed))
    res = local_search_2opt(A, B, start)
    assert res.converged and res.fun == qap_objective(A, B, res.perm)
    assert res.fun <= qap_objective(A, B, start)
    for r, s in itertools.combinations(range(9), 2):
        q = res.perm.clone()
        q[[r, s]] = q[[s, r]]
        assert qap_objective(A, B, q) >= res.fun
    capped = local_search_2opt(A, B, start, max_iter=1)
    assert capped.n_iter <= 1 and (capped.converged or capped.n_iter == 1)


@pytest.mark.parametrize("n,seed", [(4, 0), (5, 1), (6, 2), (7, 3), (7, 4), (6, 5)])
@pytest.mark.parametrize("method", ["pam", "2opt"])
def test_small_instances_reach_brute_force_optimum(n, seed, method):
    A, B = random_instance(n, seed, symmetric=seed % 2 == 0)
    res = solve_qap(A, B, method=method, restarts=8, generator=seed)
    assert res.fun == brute_force(A, B)
    assert res.fun == qap_objective(A, B, res.perm)
    assert res.perm.dtype == torch.int64 and sorted(res.perm.tolist()) == list(range(n))
    assert res.status == 0 and res.converged and len(res.history) == 8


@pytest.mark.parametrize("name", ["chr12c", "nug12"])
def test_qaplib_known_optimum(name):
    A, B = load_qaplib(shared_data(f"qaplib/{name}.dat"))
    opt, opt_perm = load_qaplib_solution(shared_data(f"qaplib/{name}.sln"))
    assert A.shape == B.shape == (12, 12)
    assert qap_objective(A, B, opt_perm) == opt  # the file's permutation attains the file's objective
    res = solve_qap(A, B, restarts=64, generator=0)  # chr12c: about one random start in 50 reaches the optimum
    assert res.fun == opt
    assert qap_objective(A, B, res.perm) == res.fun
    assert res.history == sorted(res.history, reverse=True)


def test_max_iter_warning_and_no_local_search():
    A, B = random_instance(9, 11)
    with pytest.warns(ConvergenceWarning, match=r"solve_qap: best of 1 restart\(s\) of pam.*hit max_iter=1"):
        res = solve_qap(A, B, generator=0, max_iter=1)
    assert res.status == 1 and not res.converged
    plain = solve_qap(A, B, generator=0, local_search=False, restarts=3)
    assert plain.fun == qap_objective(A, B, plain.perm)
    two = local_search_2opt(A, B, plain.perm)
    assert two.n_iter == 0  # the final 2-opt already ran on the best iterate


def test_qap_problem_gradient_and_value():
    A, B = random_instance(5, 7)
    prob = QAPProblem(A, B)
    perm = torch.tensor([3, 0, 4, 1, 2])
    P = {"p": perm_to_matrix(perm, dtype=DT)}
    assert prob.value([], P) == qap_objective(A, B, perm)
    autograd = PermutationProblem.gradient_p(prob, [], P)["p"]
    torch.testing.assert_close(prob.gradient_p([], P)["p"], autograd, atol=1e-12, rtol=0)
    D = torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=DT)
    # the gradient is L-Lipschitz with L = 2 ||A|| ||B||
    diff = prob.gradient_p([], {"p": P["p"] + D})["p"] - prob.gradient_p([], P)["p"]
    assert float(torch.linalg.norm(diff)) <= prob.lipschitz() * float(torch.linalg.norm(D)) + 1e-9


def test_solve_qap_errors():
    A, B = random_instance(4, 0)
    with pytest.raises(ValueError, match=r"unknown method 'faq'; expected one of \['pam', '2opt'\]"):
        solve_qap(A, B, method="faq")
    with pytest.raises(ValueError, match=r"`restarts` must be a positive int, got 0"):
        solve_qap(A, B, restarts=0)
    with pytest.raises(ValueError, match=r"`A` and `B` must have the same shape, got \(4, 4\) and \(3, 3\)"):
        solve_qap(A, B[:3, :3])
    with pytest.raises(ValueError, match=r"`B` must be a square matrix, got shape \(4, 3\)"):
        solve_qap(A, B[:, :3])
    with pytest.raises(ValueError, match=r"`perm` must be a permutation of 0..3"):
        qap_objective(A, B, torch.tensor([0, 1, 1, 2]))
    assert solve_qap(A[:1, :1], B[:1, :1]).perm.tolist() == [0]
    assert solve_qap(A.to(torch.int64), B.to(torch.int64), restarts=2, generator=1).fun == brute_force(A, B)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_loaders_round_trip_and_validation(tmp_path):
    ok = write(tmp_path, "tiny.dat", "2\n\n0 1\n2 0\n\n0 3\n5 0\n")
    A, B = load_qaplib(ok)
    assert A.tolist() == [[0, 1], [2, 0]] and B.tolist() == [[0, 3], [5, 0]] and A.dtype == DT
    fun, perm = load_qaplib_solution(write(tmp_path, "tiny.sln", "2   11\n2 1\n"))
    assert fun == 11.0 and perm.tolist() == [1, 0] and qap_objective(A, B, perm) == fun
    with pytest.raises(DataError, match=r"QAPLIB instance file .*missing.dat' does not exist"):
        load_qaplib(tmp_path / "missing.dat")
    with pytest.raises(DataError, match=r"holds 8 numbers, expected 1 \+ 2\*2\^2 = 9"):
        load_qaplib(write(tmp_path, "short.dat", "2\n0 1\n2 0\n0 3\n5\n"))
    with pytest.raises(DataError, match=r"token 3 \('x'\) is not a number"):
        load_qaplib(write(tmp_path, "text.dat", "2\n0 1 x 0 0 3 5 0\n"))
    with pytest.raises(DataError, match=r"starts with 2.5, expected the size n"):
        load_qaplib(write(tmp_path, "frac.dat", "2.5 0 0"))
    with pytest.raises(DataError, match=r"is empty"):
        load_qaplib(write(tmp_path, "empty.dat", "\n"))
    assert load_qaplib_solution(write(tmp_path, "zero.sln", "2 11\n1 0\n"))[1].tolist() == [1, 0]
    A3 = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 4.0], [0.0, 0.0, 0.0]])
    B3 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [3.0, 5.0, 0.0]])
    p3 = torch.tensor([1, 2, 0])  # objective 12; its inverse [2, 0, 1] has 17
    assert qap_objective(A3, B3, p3) == 12.0 and qap_objective(A3, B3, torch.argsort(p3)) == 17.0
    inv = write(tmp_path, "inv.sln", "3 12\n3 1 2\n")  # lists the inverse of p3 (1-based)
    assert load_qaplib_solution(inv)[1].tolist() == [2, 0, 1]
    assert load_qaplib_solution(inv, A=A3, B=B3)[1].tolist() == [1, 2, 0]
    with pytest.raises(DataError, match=r"its permutation has objective 17 \(its inverse 12\), not the stated 7"):
        load_qaplib_solution(write(tmp_path, "wrong.sln", "3 7\n3 1 2\n"), A=A3, B=B3)
    with pytest.raises(DataError, match=r"the permutation is not one of 1..3"):
        load_qaplib_solution(write(tmp_path, "dup.sln", "3 10\n1 1 2\n"))
    with pytest.raises(DataError, match=r"holds 4 numbers, expected 2 \+ 3"):
        load_qaplib_solution(write(tmp_path, "cut.sln", "3 10\n1 2\n"))

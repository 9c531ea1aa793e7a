"""QAP: move values and their O(1) updates against recomputation, robust tabu search against a plain reference,
2-opt local minima, brute-force and QAPLIB optima, budgets, determinism, loaders."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuralign.errors import ConvergenceWarning, DataError
from neuralign.optim import PermutationProblem, perm_to_matrix, qap
from neuralign.optim import _swaps as kernels
from neuralign.optim.qap import (
    QAPProblem,
    local_search_2opt,
    qap_objective,
    solve_qap,
    tabu_search,
)
from neuralign.optim.qaplib import load_qaplib, load_qaplib_solution, qaplib_path
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


def objective(A, B, p):
    return float((A * B[np.ix_(p, p)]).sum())


def swapped(p, r, s):
    q = p.copy()
    q[[r, s]] = q[[s, r]]
    return q


def values_from_scratch(A, B, p):
    """Every move value by evaluating the objective after the swap (the definition)."""
    n, f = p.size, objective(A, B, p)
    return {(r, s): objective(A, B, swapped(p, r, s)) - f for r in range(n) for s in range(r + 1, n)}


def kernel_state(A, B, p):
    Q = B[np.ix_(p, p)]
    Qt = np.ascontiguousarray(Q.T)
    D = np.zeros_like(A)
    kernels.all_values(A, np.ascontiguousarray(A.T), Q, Qt, D)
    return Q, Qt, D


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 9), seed=st.integers(0, 2**31 - 1))
def test_move_values_match_direct_evaluation(n, seed):
    r = np.random.default_rng(seed)
    A, B = r.normal(size=(n, n)), r.normal(size=(n, n))  # asymmetric, nonzero diagonals: every term of the formula
    p = r.permutation(n)
    D = kernel_state(A, B, p)[2]
    # a value sums O(n) products of N(0, 1) numbers: rounding is about n * 1e-16 of their size
    for (i, j), value in values_from_scratch(A, B, p).items():
        assert abs(D[i, j] - value) <= 1e-12 * n * (1 + abs(value))


@pytest.mark.parametrize("data", ["integer", "real"])
def test_move_value_updates_match_recomputation(data):
    """After every move the O(1)-updated values (and the rows recomputed in O(n)) equal a recomputation from
    scratch: exactly on integer data, to rounding on real data (one update adds O(1) rounded terms per move)."""
    r = np.random.default_rng(0)
    for n in (2, 3, 5, 9, 16):
        if data == "integer":
            A, B = r.integers(-9, 10, (n, n)).astype(float), r.integers(-9, 10, (n, n)).astype(float)
        else:
            A, B = r.normal(size=(n, n)), r.normal(size=(n, n))
        At = np.ascontiguousarray(A.T)
        p = r.permutation(n)
        Q, Qt, D = kernel_state(A, B, p)
        for step in range(60):
            u, v = sorted(r.choice(n, 2, replace=False).tolist())
            kernels.make_move(A, At, p, Q, Qt, D, np.empty((4, n)), u, v)
            assert np.array_equal(Q, B[np.ix_(p, p)]) and np.array_equal(Qt, Q.T)
            for (i, j), value in values_from_scratch(A, B, p).items():
                if data == "integer":
                    assert D[i, j] == value, (n, step, i, j)
                else:
                    assert abs(D[i, j] - value) <= 1e-12 * n * (step + 1) * (1 + abs(value)), (n, step, i, j)


def reference_tabu(A, B, p, rng, max_iter, tenure, aspiration, eps):
    """Robust tabu search as the docstring of :func:`tabu_search` states it, with every move value computed from
    its definition: a plain implementation to hold the compiled one to, move by move."""
    n = p.size
    p, barred, left = p.copy(), np.zeros((n, n)), np.zeros((n, n))
    current = best = objective(A, B, p)
    best_p = p.copy()
    for it in range(1, max_iter + 1):
        if (it - 1) % (2 * tenure[1]) == 0:
            length = int(rng.integers(tenure[0], tenure[1] + 1))
        moves = sorted((value, i, j) for (i, j), value in values_from_scratch(A, B, p).items())
        old = [m for m in moves if left[m[1], p[m[2]]] < it - aspiration and left[m[2], p[m[1]]] < it - aspiration]
        free = [m for m in moves if barred[m[1], p[m[2]]] <= it or barred[m[2], p[m[1]]] <= it]
        if current + moves[0][0] < best - eps:
            _, i, j = moves[0]
        else:
            _, i, j = (old or free or moves)[0]
        for unit in (i, j):
            barred[unit, p[unit]], left[unit, p[unit]] = it + length, it
        p = swapped(p, i, j)
        current = objective(A, B, p)
        if current < best - eps:
            best, best_p = current, p.copy()
    return best_p, best


@pytest.mark.parametrize("seed", range(12))
def test_tabu_search_follows_its_definition(seed, monkeypatch):
    """The compiled search makes the same moves as the plain reference (ties, tabu status, both aspirations and the
    tenure draws included), however the run is cut into chunks between clock checks."""
    r = np.random.default_rng(seed)
    n = int(r.integers(3, 9))
    A, B = r.integers(0, 20, (n, n)).astype(float), r.integers(0, 20, (n, n)).astype(float)
    p0, iters = r.permutation(n), int(r.integers(1, 250))
    aspiration, tenure = float(r.integers(5, 60)), (1, n)
    monkeypatch.setattr(qap, "_FIRST_CHUNK", int(r.integers(1, 40)))
    monkeypatch.setattr(qap, "_CHUNK_SECONDS", float(r.uniform(0, 2e-5)))
    mats = qap._as_arrays(torch.from_numpy(A), torch.from_numpy(B))
    got_p, got, done, _ = qap._tabu(mats, p0, rng=np.random.default_rng(seed), max_iter=iters, tenure=tenure,
                                 aspiration=aspiration, deadline=math.inf, target=-math.inf)  # fmt: skip
    want_p, want = reference_tabu(A, B, p0, np.random.default_rng(seed), iters, tenure, aspiration,
                                  qap._tolerance(A, B))  # fmt: skip
    assert done == iters and got == want and np.array_equal(got_p, want_p)


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


METHODS = [("tabu", None), ("pam", "2opt"), ("pam", "tabu"), ("pam", None), ("2opt", None)]


@pytest.mark.parametrize("n,seed", [(4, 0), (5, 1), (6, 2), (7, 3), (7, 4), (6, 5)])
@pytest.mark.parametrize("method,local", METHODS)
def test_small_instances_reach_brute_force_optimum(n, seed, method, local):
    A, B = random_instance(n, seed, symmetric=seed % 2 == 0)
    res = solve_qap(A, B, method=method, local_search=local, restarts=8, generator=seed)
    assert res.fun == brute_force(A, B)
    assert res.fun == qap_objective(A, B, res.perm)
    assert res.perm.dtype == torch.int64 and sorted(res.perm.tolist()) == list(range(n))
    assert res.status == 0 and res.converged and len(res.history) == 8


@pytest.mark.parametrize("name", ["chr12c", "nug12"])
def test_qaplib_known_optimum(name):
    """The shipped instances' optima: the tabu search from 4 random starts at its default budget, and PAM with a
    2-opt local search from 64 (chr12c: about one random start in 50 reaches the optimum)."""
    A, B = load_qaplib(qaplib_path(name))
    opt, opt_perm = load_qaplib_solution(qaplib_path(name, solution=True), A=A, B=B)
    assert qap_objective(A, B, opt_perm) == opt
    for res in (solve_qap(A, B, restarts=4, generator=0), solve_qap(A, B, method="pam", restarts=64, generator=0)):
        assert res.fun == opt and qap_objective(A, B, res.perm) == res.fun
        assert res.history == sorted(res.history, reverse=True)


def test_qaplib_shared_copy_matches_shipped():
    for name in ("chr12c", "nug12"):
        shared = load_qaplib(shared_data(f"qaplib/{name}.dat"))
        assert all(torch.equal(x, y) for x, y in zip(shared, load_qaplib(qaplib_path(name))))


def test_determinism_under_a_seed():
    A, B = load_qaplib(qaplib_path("chr12c"))
    for method, local in METHODS:
        runs = [solve_qap(A, B, method=method, local_search=local, restarts=3, generator=7, max_iter=50)
                for _ in range(2)]  # fmt: skip
        assert torch.equal(runs[0].perm, runs[1].perm) and runs[0].history == runs[1].history
        assert runs[0].n_iter == runs[1].n_iter
    a = tabu_search(A, B, torch.arange(12), max_iter=500, generator=torch.Generator().manual_seed(3))
    b = tabu_search(A, B, torch.arange(12), max_iter=500, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.perm, b.perm) and a.n_iter == b.n_iter == 500


def test_budgets_time_limit_and_target():
    A, B = load_qaplib(qaplib_path("nug12"))
    solve_qap(A, B, max_iter=10, generator=0)  # the kernels compiled or loaded: not part of the timings below
    for n, limit in ((2, 0.01), (12, 0.3), (60, 0.05)):
        r = np.random.default_rng(n)
        M = r.integers(0, 9, (n, n)).astype(float)
        start = time.perf_counter()
        res = solve_qap(M, M.T.copy(), restarts=50, max_iter=10**9, time_limit=limit, generator=0)
        elapsed = time.perf_counter() - start
        # the clock is read every ~2 ms of kernel work; allow a loaded machine 0.25 s more
        assert elapsed < limit + 0.25, (n, elapsed)
        assert len(res.history) == 1 and "time_limit reached in restart 1 of 50" in res.message
        assert res.status == 0 and res.fun == qap_objective(M, M.T.copy(), res.perm)
    hit = solve_qap(A, B, restarts=20, target=578.0, generator=0)  # nug12's optimum
    assert hit.fun == 578.0 and len(hit.history) < 20 and "target reached in restart" in hit.message
    one = tabu_search(A, B, torch.arange(12), max_iter=10**9, target=578.0, generator=0)
    assert one.fun == 578.0 and one.message.endswith("(target reached)")
    assert "(stopped by time_limit)" in tabu_search(A, B, torch.arange(12), max_iter=10**9, time_limit=0.01).message
    with pytest.warns(ConvergenceWarning, match=r"the best restart was stopped by max_iter=1"):
        late = solve_qap(A, B, method="2opt", max_iter=1, generator=0)
    assert late.status == 1 and not late.converged
    with pytest.warns(ConvergenceWarning, match=r"the best restart was stopped by time_limit=0.001s"):
        solve_qap(A, B, method="pam", max_iter=10**6, time_limit=0.001, generator=0)


def test_pam_local_searches_and_threads():
    A, B = random_instance(9, 11)
    with pytest.warns(ConvergenceWarning, match=r"solve_qap: best of 1 restart\(s\) of pam.*stopped by max_iter=1"):
        res = solve_qap(A, B, method="pam", generator=0, max_iter=1)
    assert res.status == 1 and not res.converged
    plain = solve_qap(A, B, method="pam", generator=0, local_search=None, restarts=3)
    assert plain.fun == qap_objective(A, B, plain.perm)
    assert local_search_2opt(A, B, plain.perm).n_iter == 0  # the final 2-opt already ran on the best iterate
    with pytest.warns(DeprecationWarning, match="local_search=True/False"):
        old = solve_qap(A, B, method="pam", generator=0, local_search=False, restarts=3)
    assert torch.equal(old.perm, plain.perm)
    threads = torch.get_num_threads()
    seen = []
    original = qap.PAM.run

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qap.PAM, "run", spy)
        solve_qap(A, B, method="pam", generator=0)
        big = torch.zeros(qap._SMALL + 1, qap._SMALL + 1, dtype=DT)
        solve_qap(big, big, method="pam", generator=0, max_iter=1, local_search=None)
    assert seen == [1, threads] and torch.get_num_threads() == threads  # one thread for a small problem only


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
    with pytest.raises(ValueError, match=r"unknown method 'faq'; expected one of \['2opt', 'pam', 'tabu'\]"):
        solve_qap(A, B, method="faq")
    with pytest.raises(ValueError, match=r"`restarts` must be a positive int, got 0"):
        solve_qap(A, B, restarts=0)
    with pytest.raises(ValueError, match=r"unknown local_search 'lbfgs'; expected one of \['2opt', 'tabu', None\]"):
        solve_qap(A, B, method="pam", local_search="lbfgs")
    with pytest.raises(ValueError, match=r"`time_limit` must be .*> 0"):
        solve_qap(A, B, time_limit=0)
    with pytest.raises(TypeError, match=r"`max_iter` must be a positive int"):
        solve_qap(A, B, max_iter=2.5)
    with pytest.raises(ValueError, match=r"`tenure` must have t_min <= t_max, got \(5, 2\)"):
        solve_qap(A, B, tenure=(5, 2))
    with pytest.raises(TypeError, match=r"`tenure` must be a pair \(t_min, t_max\)"):
        tabu_search(A, B, torch.arange(4), tenure=3)
    with pytest.raises(ValueError, match=r"`aspiration` must be .*>= 0"):
        tabu_search(A, B, torch.arange(4), aspiration=-1)
    with pytest.raises(ValueError, match=r"`A` and `B` must have the same shape, got \(4, 4\) and \(3, 3\)"):
        solve_qap(A, B[:3, :3])
    with pytest.raises(ValueError, match=r"`B` must be a square matrix, got shape \(4, 3\)"):
        solve_qap(A, B[:, :3])
    with pytest.raises(ValueError, match=r"`A` holds NaN or infinite entries"):
        solve_qap(torch.full((4, 4), math.nan), B)
    for method in ("tabu", "pam", "2opt"):
        with pytest.raises(ValueError, match=r"`A` and `B` are too large: .* overflows float64"):
            solve_qap(A * 1e200, B * 1e200, method=method)
    assert solve_qap(A.half(), B.bfloat16(), method="pam", restarts=2, generator=1).fun == brute_force(A, B)
    assert tabu_search(A, B, torch.arange(4), generator=np.int64(3)).fun == brute_force(A, B)
    with pytest.raises(ValueError, match=r"`perm` must be a permutation of 0..3"):
        qap_objective(A, B, torch.tensor([0, 1, 1, 2]))
    with pytest.raises(ValueError, match=r"`perm` must be a permutation of 0..3"):
        tabu_search(A, B, torch.tensor([0, 1, 1, 2]))
    for method, local in METHODS:
        assert solve_qap(A[:1, :1], B[:1, :1], method=method, local_search=local).perm.tolist() == [0]
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

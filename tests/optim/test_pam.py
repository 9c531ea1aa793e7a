"""PAM: sufficient decrease where theory says so, valid and tied permutations, resume, errors, known answers."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuralign.errors import ConvergenceWarning, NonFiniteError
from neuralign.optim import (
    PAM,
    BirkhoffStep,
    FunctionProblem,
    LinearizedStep,
    PermutationProblem,
    is_permutation,
    pam,
    perm_to_matrix,
    resolve_ties,
    solve_assignment,
)
from neuralign.optim.problems import ShuffledRegressionProblem, solve_shuffled_regression

seeds = st.integers(0, 2**31 - 1)
DT = torch.float64
# Floating-point slack for "does not increase": objectives are O(10..1e3) and computed in float64.
SLACK = 1e-9


def spectral(M: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(M, ord=2))


class QuadraticPermProblem(PermutationProblem):
    r"""F(P) = sum_g <A_g, P_g B_g P_g^T> + <C_g, P_g>, with optional ties (no x)."""

    def __init__(self, sizes, ties, g: torch.Generator, linear_scale: float):
        self.sizes = dict(sizes)
        self.ties = dict(ties)
        self.dtype = DT
        self.A = {k: torch.randn(n, n, generator=g, dtype=DT) for k, n in sizes.items()}
        self.B = {k: torch.randn(n, n, generator=g, dtype=DT) for k, n in sizes.items()}
        self.C = {k: linear_scale * torch.randn(n, n, generator=g, dtype=DT) for k, n in sizes.items()}

    def loss(self, x, P):
        return sum(((self.A[k] * (P[k] @ self.B[k] @ P[k].T)).sum() + (self.C[k] * P[k]).sum()) for k in self.sizes)

    def lipschitz(self) -> float:
        """A Lipschitz constant of grad F over the free variables (tied groups add up)."""
        reps = resolve_ties(self.sizes, self.ties)
        per_free: dict[str, float] = {}
        for k, r in reps.items():
            per_free[r] = per_free.get(r, 0.0) + 2 * spectral(self.A[k]) * spectral(self.B[k])
        return max(per_free.values())


def random_perms(sizes, g):
    return {k: torch.randperm(n, generator=g) for k, n in sizes.items()}


def sq_dist(p_new: dict, p_old: dict) -> float:
    """||P_new - P_old||_F^2 over the free groups = 2 * number of changed rows."""
    return float(sum(2 * int((p_new[k] != p_old[k]).sum()) for k in p_new))


# ----------------------------------------------------------------------------------------------- sufficient decrease
@settings(max_examples=25, deadline=None)
@given(seed=seeds, n=st.integers(2, 7), tied=st.booleans(), frac=st.floats(0.1, 0.99))
def test_linearized_sufficient_decrease_quadratic_in_p(seed, n, tied, frac):
    g = torch.Generator().manual_seed(seed)
    sizes = {"a": n, "b": n, "c": n + 1}
    ties = {"b": "a"} if tied else {}
    prob = QuadraticPermProblem(sizes, ties, g, linear_scale=8.0 * n)
    L = prob.lipschitz()
    lam = frac / L
    solver = PAM(prob, [], {k: v for k, v in random_perms(sizes, g).items() if not (tied and k == "b")}, lam=lam)
    moved = 0
    for _ in range(6):
        old, f_old = dict(solver.perms), solver.history[-1]
        solver.step()
        d2 = sq_dist(solver.perms, old)
        moved += d2 > 0
        # F(P_{k+1}) <= F(P_k) - (1/(2 lam) - L/2) ||P_{k+1} - P_k||^2
        assert solver.history[-1] <= f_old - (1 / (2 * lam) - L / 2) * d2 + SLACK * max(1.0, abs(f_old))
    assert all(is_permutation(p) for p in solver.perms.values())
    if tied:
        res = solver.result()
        assert torch.equal(res.perms["a"], res.perms["b"])


@settings(max_examples=25, deadline=None)
@given(
    seed=seeds,
    n=st.integers(2, 6),
    d=st.integers(1, 3),
    alpha=st.floats(0.1, 2.0),
    mu=st.sampled_from([0.05, 1.0, math.inf]),
    x_steps=st.integers(1, 4),
)
def test_pam_objective_never_increases_quadratic_regression(seed, n, d, alpha, mu, x_steps):
    """F(x, P) = ||P A x - y||^2 + alpha ||x||^2 + <C, P> with step sizes from the Lipschitz constants."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    C = 3.0 * torch.randn(n, n, generator=g, dtype=DT)

    def loss(x, P):
        w = x[0]
        return (P["p"] @ A @ w - y).square().sum() + alpha * w.square().sum() + (C * P["p"]).sum()

    prob = FunctionProblem({"p": n}, loss, dtype=DT)
    x0 = torch.randn(d, generator=g, dtype=DT)
    perm0 = torch.randperm(n, generator=g)
    # On the level set {F <= F0}: alpha ||x||^2 <= F0 - min <C, P> - 0, hence ||Ax||^2 <= ||A||^2 R and
    # L_P = 2 ||Ax||^2 is bounded along the whole (monotone) run.
    f0 = prob.value([x0], {"p": perm_to_matrix(perm0, dtype=DT)})
    c_min = solve_assignment(C).fun
    radius = max(f0 - c_min, 0.0) / alpha
    L_P = 2 * spectral(A) ** 2 * radius
    lam = 0.9 / max(L_P, 1e-12)
    L_x = 2 * spectral(A) ** 2 + 2 * alpha
    lr = 1.0 / (L_x + (0.0 if math.isinf(mu) else 1.0 / mu))
    solver = PAM(prob, [x0], {"p": perm0}, lam=lam, mu=mu, x_steps=x_steps,
                 x_optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    for _ in range(6):
        old, f_old = dict(solver.perms), solver.history[-1]
        solver.step()
        d2 = sq_dist(solver.perms, old)
        assert solver.history[-1] <= f_old - (1 / (2 * lam) - L_P / 2) * d2 + SLACK * max(1.0, abs(f_old))


@settings(max_examples=25, deadline=None)
@given(seed=seeds, n=st.integers(2, 8), lam=st.floats(1e-3, 1e3))
def test_exact_step_sufficient_decrease_for_any_lam(seed, n, lam):
    """For F linear in P: F(P_{k+1}) + ||P_{k+1} - P_k||^2 / (2 lam) <= F(P_k), for every lam > 0."""
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(n, n, generator=g, dtype=DT)
    prob = FunctionProblem({"p": n}, lambda x, P: (C * P["p"]).sum(), linear_cost=lambda x: {"p": C}, dtype=DT)
    solver = PAM(prob, [], {"p": torch.randperm(n, generator=g)}, method="exact", lam=lam)
    for _ in range(3):
        old, f_old = dict(solver.perms), solver.history[-1]
        solver.step()
        assert solver.history[-1] + sq_dist(solver.perms, old) / (2 * lam) <= f_old + SLACK
    # with lam = inf the exact step is the assignment itself
    res = pam(prob, [], method="exact", lam=math.inf, max_iter=3)
    assert res.fun == pytest.approx(solve_assignment(C).fun, abs=1e-12)


# ----------------------------------------------------------------------------------------------- validity and ties
@settings(max_examples=20, deadline=None)
@given(seed=seeds, n=st.integers(1, 6), method=st.sampled_from(["linearized", "exact", "birkhoff"]),
       lam=st.floats(1e-2, 1e2))
def test_p_step_returns_valid_tied_permutations(seed, n, method, lam):
    g = torch.Generator().manual_seed(seed)
    sizes = {"s1": n, "s2": n, "s3": n, "free": n + 2}
    ties = {"s2": "s1", "s3": "s2"}
    C = {k: torch.randn(m, m, generator=g, dtype=DT) for k, m in sizes.items()}
    M = {k: torch.randn(m, m, generator=g, dtype=DT) for k, m in sizes.items()}

    def loss(x, P):
        return sum((C[k] * P[k]).sum() + 0.1 * (M[k] @ P[k]).square().sum() for k in sizes)

    def linear_cost(x):
        return C  # only used by "exact" (a different problem than loss, but a linear one)

    prob = FunctionProblem(sizes, loss, ties=ties, linear_cost=linear_cost, dtype=DT)
    step = BirkhoffStep(steps=3, samples=4) if method == "birkhoff" else method
    solver = PAM(prob, [], method=step, lam=lam, generator=seed)
    for _ in range(3):
        state = solver.step()
        for k, m in sizes.items():
            assert is_permutation(state.perms[k]) and state.perms[k].numel() == m
            assert state.perms[k].dtype == torch.int64
        assert torch.equal(state.perms["s1"], state.perms["s2"])
        assert torch.equal(state.perms["s1"], state.perms["s3"])
        assert state.changed["s1"] == state.changed["s2"] == state.changed["s3"]


def test_tied_groups_share_one_assignment_of_the_summed_cost():
    g = torch.Generator().manual_seed(0)
    C1, C2 = torch.randn(5, 5, generator=g, dtype=DT), torch.randn(5, 5, generator=g, dtype=DT)
    prob = FunctionProblem(
        {"a": 5, "b": 5},
        lambda x, P: (C1 * P["a"]).sum() + (C2 * P["b"]).sum(),
        ties={"b": "a"},
        linear_cost=lambda x: {"a": C1, "b": C2},
        dtype=DT,
    )
    expected = solve_assignment(C1 + C2)
    for method in ("exact", "linearized"):
        res = pam(prob, [], method=method, lam=math.inf, max_iter=5)
        assert res.perms["a"].tolist() == expected.perm.tolist() == res.perms["b"].tolist()
        assert res.fun == pytest.approx(expected.fun, abs=1e-12)


def test_resolve_ties_errors():
    with pytest.raises(ValueError, match=r"`ties` names group `z`, which is not in `sizes`"):
        resolve_ties({"a": 2}, {"z": "a"})
    with pytest.raises(ValueError, match=r"`ties` ties group `a` to `q`, which is not in `sizes`"):
        resolve_ties({"a": 2}, {"a": "q"})
    with pytest.raises(ValueError, match=r"`ties` has a cycle: a -> b -> a"):
        resolve_ties({"a": 2, "b": 2}, {"a": "b", "b": "a"})
    with pytest.raises(ValueError, match=r"tied groups `b` \(size 3\) and `a` \(size 2\) have different sizes"):
        resolve_ties({"a": 2, "b": 3}, {"b": "a"})


# ----------------------------------------------------------------------------------------------- birkhoff
def test_birkhoff_rounding_never_accepts_a_worse_candidate():
    """An adversarial (ascent) gradient drives the relaxed step uphill: the projection and most BvN draws are worse
    than P_k. The official code's quirk (comparing later draws against the projection once P_k has won) would then
    accept draws worse than P_k; comparing against the best so far never does."""
    g = torch.Generator().manual_seed(1)
    n = 6
    C = torch.randn(n, n, generator=g, dtype=DT)
    prob = FunctionProblem({"p": n}, lambda x, P: (C * P["p"]).sum(), gradient_p=lambda x, P: {"p": -C}, dtype=DT)
    start = solve_assignment(C).perm  # the optimum: every other candidate is worse
    res = pam(prob, [], {"p": start}, method=BirkhoffStep(steps=5, samples=16), lam=0.5, generator=0, max_iter=4)
    assert res.perms["p"].tolist() == start.tolist()
    assert res.history == [res.history[0]] * 2
    assert res.converged and res.n_iter == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_birkhoff_monotone_and_improves_on_qap(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = {"p": 7}
    prob = QuadraticPermProblem(sizes, {}, g, linear_scale=10.0)
    worst = solve_assignment(prob.C["p"], maximize=True).perm  # a poor start that the linear part pulls away from
    res = pam(prob, [], {"p": worst}, method=BirkhoffStep(steps=10, samples=8), lam=0.05, generator=seed,
              max_iter=8, tol=0.0)
    h = torch.tensor(res.history)
    assert bool((h[1:] <= h[:-1] + SLACK).all())
    assert res.fun < res.history[0]


# ----------------------------------------------------------------------------------------------- resume
class NoisyProblem(PermutationProblem):
    """Stochastic loss: a mini-batch of rows drawn from the generator that PAM also holds."""

    def __init__(self, gen: torch.Generator):
        g = torch.Generator().manual_seed(5)
        self.sizes = {"p": 6, "q": 6}
        self.ties = {"q": "p"}
        self.dtype = DT
        self.gen = gen
        self.A = torch.randn(6, 3, generator=g, dtype=DT)
        self.Y = torch.randn(6, 3, generator=g, dtype=DT)

    def loss(self, x, P):
        rows = torch.randint(0, 6, (4,), generator=self.gen)
        fit = (P["p"] @ self.A * x[0] - self.Y)[rows]
        return fit.square().sum() + 0.1 * (P["q"] @ self.A).sum() * x[0].sum()

    def value(self, x, P):
        with torch.no_grad():
            return float((P["p"] @ self.A * x[0] - self.Y).square().sum() + 0.1 * (P["q"] @ self.A).sum()
                         * x[0].sum())


@pytest.mark.parametrize("method", ["birkhoff", "linearized"])
def test_resume_from_state_dict_equals_uninterrupted_run(method):
    def build(seed):
        gen = torch.Generator().manual_seed(seed)
        prob = NoisyProblem(gen)
        step = BirkhoffStep(steps=4, samples=6) if method == "birkhoff" else method
        return PAM(prob, [torch.ones(3, dtype=DT)], method=step, lam=0.3, x_steps=3, generator=gen,
                   x_optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))

    full = build(11)
    for _ in range(6):
        full.step()
    part = build(11)
    for _ in range(3):
        part.step()
    buffer = io.BytesIO()
    torch.save(part.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = build(999)  # another seed: everything random must come from the state
    resumed.load_state_dict(state)
    for _ in range(3):
        resumed.step()
    a, b = full.result(), resumed.result()
    torch.testing.assert_close(a.x[0], b.x[0], rtol=0, atol=0)
    assert {k: v.tolist() for k, v in a.perms.items()} == {k: v.tolist() for k, v in b.perms.items()}
    assert a.history == b.history and a.changed == b.changed and a.n_iter == b.n_iter == 6


def test_load_state_dict_errors():
    prob = FunctionProblem({"p": 3}, lambda x, P: (P["p"] * x[0]).sum())
    solver = PAM(prob, [torch.zeros(3, 3)])
    state = solver.state_dict()
    with pytest.raises(ValueError, match=r"`state` is not a PAM state dict"):
        solver.load_state_dict({"kind": "other"})
    other = PAM(prob, [torch.zeros(3, 3)], method="birkhoff")
    with pytest.raises(ValueError, match=r"`state` was made with method 'linearized', this solver uses 'birkhoff'"):
        other.load_state_dict(state)
    bad = dict(state, x=[torch.zeros(2, 3)])
    with pytest.raises(ValueError, match=r"`state` has x\[0\] of shape \(2, 3\), this solver has \(3, 3\)"):
        solver.load_state_dict(bad)


# ----------------------------------------------------------------------------------------------- run / results
def linear_problem(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(n, n, generator=g, dtype=DT)
    return C, FunctionProblem({"p": n}, lambda x, P: (C * P["p"]).sum(), linear_cost=lambda x: {"p": C}, dtype=DT)


def test_convergence_warning_and_status():
    g = torch.Generator().manual_seed(3)
    prob = QuadraticPermProblem({"p": 8}, {}, g, linear_scale=0.0)
    with pytest.warns(ConvergenceWarning, match=r"max_iter=1 reached before tol=1e-06 was met.*smaller `lam`"):
        res = pam(prob, [], method="linearized", lam=math.inf, max_iter=1)
    assert res.status == 1 and not res.converged and res.n_iter == 1
    assert "max_iter=1 reached" in res.message


def test_result_fields_callback_and_inputs_untouched():
    C, prob = linear_problem()
    perm0 = torch.tensor([3, 2, 1, 0])
    seen = []
    res = pam(prob, [], {"p": perm0}, method="exact", lam=math.inf, callback=lambda s: seen.append(s.n_iter))
    assert res.converged and res.status == 0 and "converged after 2 iterations" in res.message
    assert len(res.history) == res.n_iter + 1 == 3 and seen == [1, 2]
    assert res.changed["p"][1] == 0 and res.fun == pytest.approx(solve_assignment(C).fun)
    assert perm0.tolist() == [3, 2, 1, 0]
    stopped = pam(prob, [], {"p": perm0}, method="exact", lam=math.inf, callback=lambda s: True)
    assert stopped.status == 2 and stopped.n_iter == 1 and "callback" in stopped.message
    x0 = torch.ones(3)
    prob_x = FunctionProblem({"p": 2}, lambda x, P: x[0].square().sum() + P["p"][0, 1])
    with pytest.warns(ConvergenceWarning):
        out = pam(prob_x, [x0], max_iter=3, tol=0.0, x_steps=2)
    assert torch.equal(x0, torch.ones(3)) and not torch.equal(out.x[0], x0)
    assert pam(prob_x, [x0], x_steps=0, max_iter=2).x[0].tolist() == [1.0, 1.0, 1.0]


def test_finite_mu_pulls_x_towards_x_k():
    prob = FunctionProblem({"p": 2}, lambda x, P: (x[0] - 10.0).square().sum() + P["p"][0, 0])

    def run(x_steps, mu):
        # L = 2 + 1/mu = 12 for mu = 0.1, so lr = 0.05 is a descent step on the proximal objective
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return pam(prob, [torch.zeros(1)], x_steps=x_steps, max_iter=1, tol=0.0, mu=mu,
                       x_optimizer=lambda p: torch.optim.SGD(p, lr=0.05)).x[0].item()

    # one step from x_k: the proximal gradient vanishes there, so both move identically ...
    assert run(1, math.inf) == pytest.approx(run(1, 0.1))
    # ... over several steps the proximal term holds x near x_k (the minimiser of the prox objective is 10/6)
    assert 0 < run(40, 0.1) < 10 / 6 + 1e-3 < run(40, math.inf)


# ----------------------------------------------------------------------------------------------- errors
def test_option_errors():
    _, prob = linear_problem()
    no_lin = FunctionProblem({"p": 2}, lambda x, P: P["p"].sum())
    with pytest.raises(ValueError, match=r"unknown method 'newton'; expected one of \['birkhoff', 'exact', "
                                         r"'linearized'\]"):
        PAM(prob, method="newton")
    with pytest.raises(ValueError, match=r"^`lam` must be a number > 0 \(math.inf for no proximal term\), got 0$"):
        PAM(prob, lam=0)
    with pytest.raises(ValueError, match=r"`lam` must be a number > 0.*got -1.0"):
        PAM(prob, lam=-1.0)
    with pytest.raises(ValueError, match=r"^`mu` must be a number > 0 \(math.inf for no proximal term\), got 0.0$"):
        PAM(prob, mu=0.0)
    with pytest.raises(ValueError, match=r"^`lam` must be a number > 0 \(math.inf for no proximal term\), got nan$"):
        PAM(prob, lam=math.nan)
    with pytest.raises(ValueError, match=r"method 'exact' needs a problem linear in P that defines linear_cost"):
        PAM(no_lin, method="exact")
    with pytest.raises(ValueError, match=r"^`x_steps` must be an int >= 0, got -1$"):
        PAM(prob, x_steps=-1)
    with pytest.raises(TypeError, match=r"`problem` must be a PermutationProblem, got dict"):
        PAM({"p": 2})
    with pytest.raises(ValueError, match=r"`perms0\['p'\]` must be a permutation of 0..3, got \(3,\)"):
        PAM(prob, [], {"p": torch.tensor([0, 1, 2])})
    with pytest.raises(ValueError, match=r"`perms0` has group `q`, which the problem does not have"):
        PAM(prob, [], {"q": torch.tensor([0, 1])})
    with pytest.raises(TypeError, match=r"`x0\[0\]` must be a floating-point tensor, got torch.int64"):
        PAM(prob, [torch.tensor([1, 2])])
    with pytest.raises(ValueError, match=r"method 'birkhoff' needs a finite step: set BirkhoffStep\(lr=...\) when "
                                         r"`lam` is inf"):  # fmt: skip
        PAM(prob, method="birkhoff", lam=math.inf)
    tied = FunctionProblem({"a": 2, "b": 2}, lambda x, P: P["a"].sum(), ties={"b": "a"})
    with pytest.raises(ValueError, match=r"`perms0` gives tied groups `b` and `a` different permutations"):
        PAM(tied, [], {"a": torch.tensor([0, 1]), "b": torch.tensor([1, 0])})


def test_gradient_shape_and_non_finite_errors():
    bad_shape = FunctionProblem({"layer1": 3}, lambda x, P: P["layer1"].sum(),
                                gradient_p=lambda x, P: {"layer1": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match=r"group `layer1`: gradient dF/dP has shape \(3, 4\) but the group's "
                                         r"permutation matrix has shape \(3, 3\)"):
        pam(bad_shape, [], max_iter=1)
    nan_grad = FunctionProblem({"fc": 2}, lambda x, P: P["fc"].sum(),
                               gradient_p=lambda x, P: {"fc": torch.tensor([[0.0, float("nan")], [0.0, 0.0]])})
    with pytest.raises(NonFiniteError, match=r"group `fc`: gradient dF/dP has 1 non-finite entries"):
        pam(nan_grad, [], max_iter=1)
    missing = FunctionProblem({"a": 2, "b": 2}, lambda x, P: P["a"].sum(),
                              gradient_p=lambda x, P: {"a": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"gradient dF/dP has no entry for group `b`"):
        pam(missing, [], max_iter=1)
    nan_f = FunctionProblem({"p": 2}, lambda x, P: P["p"].sum() * float("nan"))
    with pytest.raises(NonFiniteError, match=r"objective F\(x, P\) is nan at the start"):
        PAM(nan_f)
    blow_up = FunctionProblem({"p": 2}, lambda x, P: (x[0] * P["p"]).sum() + torch.log(x[0].sum() - 1.5))
    with pytest.raises(NonFiniteError, match=r"objective F\(x, P\) is nan in the x-step of iteration 0"):
        pam(blow_up, [torch.ones(2, 2)], x_steps=50, x_optimizer=lambda p: torch.optim.SGD(p, lr=10.0), max_iter=1)
    inf_grad = FunctionProblem({"p": 2}, lambda x, P: P["p"].sum() + torch.sqrt(x[0]).sum())
    with pytest.raises(NonFiniteError, match=r"x\[0\]: gradient dF/dx has 1 non-finite entries"):
        pam(inf_grad, [torch.tensor([0.0, 1.0])], max_iter=1)
    linear_bad = FunctionProblem({"p": 2}, lambda x, P: P["p"].sum(),
                                 linear_cost=lambda x: {"p": torch.full((2, 2), float("inf"))})
    with pytest.raises(NonFiniteError, match=r"group `p`: linear cost C\(x\) has 4 non-finite entries"):
        pam(linear_bad, [], method="exact", max_iter=1)


def test_local_search_hook_is_applied_and_validated():
    C, prob = linear_problem(5, seed=2)
    best = solve_assignment(C).perm
    res = pam(prob, [], method="exact", lam=1e-9, local_search=lambda x, perms: {"p": best.clone()}, max_iter=3)
    assert res.perms["p"].tolist() == best.tolist()
    with pytest.raises(ValueError, match=r"`local_search` returned no valid permutation for group `p`"):
        pam(prob, [], local_search=lambda x, perms: {"p": torch.zeros(5, dtype=torch.int64)}, max_iter=1)


# ----------------------------------------------------------------------------------------------- known answers
def planted_regression(n, d, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, d, generator=g, dtype=DT)
    x_star = torch.randn(d, generator=g, dtype=DT)
    perm = torch.randperm(n, generator=g)
    y = (A @ x_star)[perm] + sigma * torch.randn(n, generator=g, dtype=DT)
    return A, y, x_star, perm


@pytest.mark.parametrize("method", ["exact", "linearized"])
@pytest.mark.parametrize("seed", [100, 103, 105])
def test_shuffled_regression_recovers_planted_solution(method, seed):
    """n = 12, d = 2, noise 0.002 (signal std ~1.4): about one restart in five reaches the planted solution, so 30
    seeded restarts are used. The solution found is also checked to be at least as good as the planted one."""
    A, y, x_star, perm = planted_regression(12, 2, 0.002, seed)
    res = solve_shuffled_regression(A, y, method=method, restarts=30, generator=0)
    assert res.perms["rows"].tolist() == perm.tolist()
    torch.testing.assert_close(res.x[0], x_star, atol=5e-3, rtol=0)  # noise-limited least-squares error
    fit = torch.linalg.lstsq(A[perm], y.unsqueeze(1)).solution.squeeze(1)
    assert res.fun <= float((y - A[perm] @ fit).square().sum()) + 1e-9


def test_linearized_on_the_quadratic_extension_is_monotone_but_stalls():
    """The documented limitation: with lam < 1/L_P on ||y - PAx||^2 the linearised step is safe but too timid."""
    A, y, _, perm = planted_regression(12, 2, 0.002, 100)
    prob = ShuffledRegressionProblem(A, y, extension="quadratic")
    x0 = torch.linalg.lstsq(A, y.unsqueeze(1)).solution.squeeze(1)
    L_P = prob.lipschitz_p(x0) * 4  # generous bound along the run
    lr = 1 / prob.lipschitz_x()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = pam(prob, [x0], method="linearized", lam=0.9 / L_P, x_steps=10, max_iter=20,
                  x_optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    h = torch.tensor(res.history)
    assert bool((h[1:] <= h[:-1] + SLACK).all())
    assert res.perms["rows"].tolist() != perm.tolist()


def test_shuffled_regression_problem_extensions_agree_on_permutations():
    A, y, x_star, perm = planted_regression(6, 2, 0.1, 1)
    P = {"rows": perm_to_matrix(perm, dtype=DT)}
    lin = ShuffledRegressionProblem(A, y)
    quad = ShuffledRegressionProblem(A, y, extension="quadratic")
    assert lin.value([x_star], P) == pytest.approx(quad.value([x_star], P), rel=1e-12)
    C = lin.linear_cost([x_star])["rows"]
    const = float(y.square().sum() + (A @ x_star).square().sum())
    assert float((C * P["rows"]).sum()) + const == pytest.approx(lin.value([x_star], P), rel=1e-12)
    with pytest.raises(ValueError, match=r"unknown extension 'cubic'; expected one of \['linear', 'quadratic'\]"):
        ShuffledRegressionProblem(A, y, extension="cubic")
    with pytest.raises(ValueError, match=r"`y` must have shape \(6,\) or \(6, k\) to match `A`, got \(5,\)"):
        ShuffledRegressionProblem(A, y[:5])


def test_custom_x_step_replaces_the_optimizer_and_is_validated():
    A, y, x_star, perm = planted_regression(8, 2, 0.0, 3)
    prob = ShuffledRegressionProblem(A, y)
    calls = []

    def exact_x_step(x, perms):  # least squares given P: the exact alternating minimisation step
        calls.append({g: p.clone() for g, p in perms.items()})
        Py = y[torch.argsort(perms["rows"])]  # P^T y
        return [torch.linalg.lstsq(A, Py.unsqueeze(-1)).solution.squeeze(-1)]

    res = pam(prob, [torch.zeros_like(x_star)], {"rows": perm}, method="exact", lam=1.0, x_step=exact_x_step,
              max_iter=5, tol=1e-9)
    assert res.converged and calls
    assert torch.equal(res.perms["rows"], perm)
    torch.testing.assert_close(res.x[0], x_star, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"`x_step` returned x\[0\] of shape \(3,\), expected \(2,\)"):
        pam(prob, [x_star], method="exact", x_step=lambda x, p: [torch.zeros(3)], max_iter=1)
    with pytest.raises(TypeError, match="`x_step` must be callable"):
        pam(prob, [x_star], method="exact", x_step=3, max_iter=1)


@settings(max_examples=25, deadline=None)
@given(seed=seeds, n=st.integers(3, 7))
def test_backtracking_keeps_the_objective_from_increasing_for_any_lam(seed, n):
    g = torch.Generator().manual_seed(seed)
    sizes = {"a": n, "b": n + 1}
    prob = QuadraticPermProblem(sizes, {}, g, linear_scale=1.0)
    start = random_perms(sizes, g)
    plain = PAM(prob, [], start, lam=1e6)
    tracked = PAM(prob, [], start, method=LinearizedStep(backtrack=True), lam=1e6)
    for _ in range(5):
        f_old = tracked.history[-1]
        tracked.step()
        plain.step()
        assert tracked.history[-1] <= f_old + SLACK * max(1.0, abs(f_old))
    assert len(tracked.backtracks) == 5


def test_backtracking_is_needed_somewhere():
    # with an enormous step the pure linearized step increases F on some instance; backtracking never does
    increased = False
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        prob = QuadraticPermProblem({"a": 6}, {}, g, linear_scale=0.5)
        start = random_perms({"a": 6}, g)
        plain = PAM(prob, [], start, lam=1e6)
        plain.step()
        increased |= plain.history[-1] > plain.history[0] + SLACK
    assert increased


def test_interrupted_x_step_resumes_without_a_new_p_step():
    A, y, x_star, perm = planted_regression(8, 2, 0.05, 5)
    prob = ShuffledRegressionProblem(A, y)
    saved = {}

    def make_x_step(interrupt):
        def x_step(x, perms):
            if interrupt and not saved:
                saved["state"] = solver.state_dict()
                raise KeyboardInterrupt
            Py = y[torch.argsort(perms["rows"])]
            return [torch.linalg.lstsq(A, Py.unsqueeze(-1)).solution.squeeze(-1)]

        return x_step

    x0 = [torch.zeros_like(x_star)]
    reference = PAM(prob, x0, method="exact", lam=0.5, x_step=make_x_step(False)).run(max_iter=3, tol=0)
    solver = PAM(prob, x0, method="exact", lam=0.5, x_step=make_x_step(True))
    with pytest.raises(KeyboardInterrupt):
        solver.step()
    buffer = io.BytesIO()
    torch.save(saved["state"], buffer)
    buffer.seek(0)
    resumed = PAM(prob, x0, method="exact", lam=0.5, x_step=make_x_step(False))
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    result = resumed.run(max_iter=3, tol=0)
    assert result.history == reference.history
    assert result.changed == reference.changed
    assert torch.equal(result.perms["rows"], reference.perms["rows"])


# ----------------------------------------------------------------------------------------------- bounded moves
@settings(max_examples=20, deadline=None)
@given(seed=seeds, n=st.integers(4, 12), frac=st.sampled_from([0.1, 0.25, 0.5]), p_steps=st.integers(1, 4))
def test_bounded_moves_per_linearized_step_and_monotone_objective(seed, n, frac, p_steps):
    g = torch.Generator().manual_seed(seed)
    sizes = {"a": n, "b": n + 3}
    prob = QuadraticPermProblem(sizes, {}, g, linear_scale=1.0)
    start = random_perms(sizes, g)
    solver = PAM(prob, [], start, method=LinearizedStep(max_moved=frac, p_steps=p_steps, backtrack=True), lam=1e6)
    steps: list[tuple[int, int, int]] = []  # (units moved, limit, units moved by a 1e-6 smaller step)
    bounded = solver._bounded_lam

    def spy(grad, anchor, perm):
        lam = bounded(grad, anchor, perm)

        def moved(step):
            return int((solve_assignment(grad - anchor / step).perm != perm).sum())

        steps.append((moved(lam), max(2, math.floor(frac * perm.numel())), moved(lam * math.exp(-1e-6))))
        return lam

    solver._bounded_lam = spy
    for _ in range(3):
        f_old = solver.history[-1]
        solver.step()
        assert solver.history[-1] <= f_old + SLACK * max(1.0, abs(f_old))
    assert steps
    for k, limit, smaller in steps:
        # within the limit, or the smallest move the step family offers (a slightly smaller step moves nothing)
        assert k <= limit or smaller == 0


def test_bounded_moves_take_smaller_steps_than_the_full_linearized_step():
    # a full step (lam = 1e6) reassigns most units of a random instance; max_moved=0.2 moves 2 of 10 here
    g = torch.Generator().manual_seed(0)
    prob = QuadraticPermProblem({"a": 10}, {}, g, linear_scale=1.0)
    start = random_perms({"a": 10}, g)
    full = PAM(prob, [], start, lam=1e6)
    full.step()
    bounded = PAM(prob, [], start, method=LinearizedStep(max_moved=0.2), lam=1e6)
    bounded.step()
    assert full.changed["a"][-1] > 2
    assert 0 < bounded.changed["a"][-1] <= 2


def test_bounded_move_options_are_validated():
    with pytest.raises(ValueError, match=r"^`max_moved` must be a finite number in \(0, 1\] or None, got 0$"):
        LinearizedStep(max_moved=0)
    with pytest.raises(ValueError, match=r"^`max_moved` must be a finite number in \(0, 1\] or None, got 1.5$"):
        LinearizedStep(max_moved=1.5)
    with pytest.raises(ValueError, match=r"^`p_steps` must be a positive int, got 0$"):
        LinearizedStep(p_steps=0)
    with pytest.raises(ValueError, match=r"^`steps` must be a positive int, got 0$"):
        BirkhoffStep(steps=0)
    with pytest.raises(ValueError, match=r"unknown method 'newton'; expected one of \['birkhoff', 'exact', "
                                         r"'linearized'\] or a step object"):  # fmt: skip
        PAM(linear_problem()[1], method="newton")


def test_the_step_keywords_of_0_1_still_work_with_a_warning():
    _, prob = linear_problem()
    with pytest.warns(DeprecationWarning, match=r"the P-step keywords \['max_moved', 'p_steps'\] are deprecated "
                                                r"since neuralign 0.2: pass method=LinearizedStep\(max_moved=...,"):
        solver = PAM(prob, max_moved=0.5, p_steps=2)
    assert solver.step_options == LinearizedStep(max_moved=0.5, p_steps=2)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"`max_moved` must be a finite number"):
        PAM(prob, max_moved=0)
    # a keyword of another method is refused, naming both
    with pytest.raises(ValueError, match=r"^`max_moved` applies to method 'linearized', not 'exact'$"):
        PAM(prob, method="exact", max_moved=0.5)
    with pytest.warns(DeprecationWarning):
        birkhoff = PAM(prob, method="birkhoff", birkhoff_steps=3, birkhoff_lr=0.5)
    assert birkhoff.step_options == BirkhoffStep(steps=3, lr=0.5)

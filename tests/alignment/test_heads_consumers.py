"""Every consumer of permutations keeps attention heads whole (issue 21): weight matching's coordinate ascent steps
the groups sharing a head permutation by the structured assignment (monotone objective, structured iterates), the
learned methods (straight-through, Sinkhorn, learned from weight matching) round to structured permutations, and
PAM on curves takes structured P-steps (the curve problem's assignment hook) and structured swaps.
On the zoo's ViT and LLM-style decoder at tiny sizes with random weights and a planted structured permutation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from neuralign.alignment import (
    LEARNED_METHODS,
    align,
    apply_permutation,
    identity_permutation,
    invert_permutation,
    learn_permutation,
    random_permutation,
    split_heads_permutation,
    trace_spec,
    validate_permutation,
)
from neuralign.alignment.align import _ascent, _WeightProblem
from neuralign.curves import CurvePermutationProblem, fit_curve_pam
from neuralign.curves.pam import _swap_search
from neuralign.experiments.models.lm import TinyLM
from neuralign.experiments.models.vit import ViT
from neuralign.optim import BirkhoffStep, LinearizedStep, perm_to_matrix


def _lm_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output.flatten(0, 1), target.flatten())


# model, (inputs, targets) batch from a generator, loss
CASES = {
    "vit": (lambda: ViT(10, width=16, depth=1, heads=2, mlp_dim=24),
            lambda g: (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)), None),
    "lm": (lambda: TinyLM(20, width=16, depth=1, heads=4, kv_heads=2, hidden=24),
           lambda g: (torch.randint(0, 20, (4, 6), generator=g), torch.randint(0, 20, (4, 6), generator=g)), _lm_loss),
}  # fmt: skip


def _reorders_query_heads(spec, perms) -> bool:
    """True if ``perms`` reorders the query heads inside some block of grouped-query attention."""
    return any(not torch.equal(split_heads_permutation(h, perms[g])[2], torch.arange(h.tie).expand(h.blocks, h.tie))
               for g, h in spec.heads.items() if h.within is not None)  # fmt: skip


def _planted(case: str, dtype=torch.float64):
    """Model A (seed 0), B = a random structured permutation of A, the spec, the permutation mapping B onto A, and
    two batches."""
    build, draw, loss = CASES[case]
    torch.manual_seed(0)
    a = build().to(dtype).eval()
    gen = torch.Generator().manual_seed(3)
    data = [(x.to(dtype) if x.is_floating_point() else x, y) for x, y in (draw(gen) for _ in range(2))]
    x = data[0][0][:2]
    spec = trace_spec(a, x.to(dtype) if x.is_floating_point() else x)
    assert spec.heads
    perms = random_permutation(spec, generator=1)
    assert _reorders_query_heads(spec, perms) == any(h.within for h in spec.heads.values())  # GQA: tau too
    b = copy.deepcopy(a)
    b.load_state_dict(apply_permutation(a.state_dict(), spec, perms))
    return a, b, spec, invert_permutation(perms), data, loss


@pytest.mark.parametrize("case", sorted(CASES))
def test_weight_matching_recovers_planted_heads_without_projection(case):
    a, b, spec, expected, _, _ = _planted(case)
    res = align(a, b, method="weight", spec=spec, generator=0, restarts=2)
    validate_permutation(spec, res.perms)
    wrong = [g for g in spec.groups if not torch.equal(res.perms[g], expected[g])]
    assert not wrong, wrong
    # the random restart is structured too and ends at a valid structured permutation of its own
    assert len(res.restart_objectives) == 2


@pytest.mark.parametrize("case", sorted(CASES))
def test_ascent_iterates_are_structured_and_monotone(case):
    # independent random weights (no planted optimum): the objective after k sweeps of one seeded run never
    # decreases in k, and every iterate keeps heads whole; float64 similarities, so the checked order is exact up
    # to the ascent's rounding slack (16 eps of the exchanged entries' Cauchy-Schwarz bound, far below 1e-9)
    build = CASES[case][0]
    torch.manual_seed(0)
    a = build().double()
    torch.manual_seed(1)
    b = build().double()
    x = CASES[case][1](torch.Generator().manual_seed(0))[0][:2]
    spec = trace_spec(a, x.double() if x.is_floating_point() else x)
    keys = {k for k, _ in a.named_parameters()}
    problem = _WeightProblem(a.state_dict(), b.state_dict(), spec, keys, dtype=torch.float64)
    free = dict.fromkeys(spec.groups)
    values = [problem.objective(identity_permutation(spec))]
    converged = False
    for k in range(1, 30):
        perms, sweeps, converged = _ascent(problem, identity_permutation(spec), free, greedy=False,
                                           generator=torch.Generator().manual_seed(5), max_iter=k)  # fmt: skip
        validate_permutation(spec, perms)
        values.append(problem.objective(perms))
        if converged:
            break
    assert converged
    assert len(values) > 2  # the ascent moved at least twice
    assert all(later >= earlier - 1e-9 * abs(earlier) for earlier, later in zip(values, values[1:]))
    assert values[-1] > values[0]


@pytest.mark.parametrize("method", sorted(LEARNED_METHODS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_learned_methods_return_structured_permutations(case, method):
    a, b, spec, expected, data, loss = _planted(case, dtype=torch.float32)
    res = learn_permutation(a, b, data, method=method, spec=spec, generator=0, loss_fn=loss, epochs=1)
    validate_permutation(spec, res.perms)
    if method in ("learned", "straight_through"):  # both start at weight matching, which recovers the plant
        wrong = [g for g in spec.groups if not torch.equal(res.perms[g], expected[g])]
        assert not wrong, wrong


@pytest.mark.parametrize("case", sorted(CASES))
def test_sinkhorn_rounds_noisy_scores_to_structured_permutations(case):
    # from the identity with large score noise the unstructured rounding would move units between heads
    a, b, spec, _, data, loss = _planted(case, dtype=torch.float32)
    res = learn_permutation(a, b, data, method="sinkhorn", spec=spec, generator=0, loss_fn=loss, epochs=2,
                            init="identity", score_noise=3.0)  # fmt: skip
    validate_permutation(spec, res.perms)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in res.perms.values())


@pytest.mark.filterwarnings("ignore::neuralign.errors.ConvergenceWarning")  # two iterations on purpose
@pytest.mark.parametrize("step", ["linearized", "birkhoff"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fit_curve_pam_keeps_heads_whole(case, step):
    # a large step (lam) from the unaligned start moves many units; swaps propose whole-head and inside-head moves
    a, b, spec, _, data, loss = _planted(case, dtype=torch.float32)
    p_step = LinearizedStep(backtrack=False) if step == "linearized" else BirkhoffStep(samples=3, steps=2, lr=10.0)
    res = fit_curve_pam(a, a.state_dict(), b.state_dict(), data, spec=spec, init="identity", max_iter=2, x_epochs=1,
                        lam=1e6, value_batches=2, gradient_batches=1, loss_fn=loss, generator=0, step=p_step,
                        swap_trials=4, swap_alpha=0.5)  # fmt: skip
    validate_permutation(spec, res.perms)


@pytest.mark.parametrize("case", sorted(CASES))
def test_curve_problem_assign_is_the_structured_minimiser(case):
    # the P-step's hook: on a cost minimised by a planted structured permutation it returns that permutation; on
    # random costs a structured permutation that no random structured permutation beats
    a, b, spec, expected, data, loss = _planted(case, dtype=torch.float64)
    problem = CurvePermutationProblem(a, a.state_dict(), b.state_dict(), spec, data, loss_fn=loss, value_batches=1)
    costs = {g: -perm_to_matrix(p, dtype=torch.float64) for g, p in expected.items()}
    found = problem.assign(costs)
    validate_permutation(spec, found)
    assert all(torch.equal(found[g], expected[g]) for g in spec.groups)
    gen = torch.Generator().manual_seed(0)
    costs = {g: torch.randn(n, n, generator=gen, dtype=torch.float64) for g, n in spec.sizes.items()}
    found = problem.assign(costs)
    validate_permutation(spec, found)
    for _ in range(20):  # no random structured permutation beats it (it is the exact structured minimiser)
        other = random_permutation(spec, generator=gen)
        assert sum(float(c[torch.arange(len(c)), found[g]].sum()) for g, c in costs.items()) <= sum(
            float(c[torch.arange(len(c)), other[g]].sum()) for g, c in costs.items()) + 1e-9  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_swap_search_proposes_only_structured_moves(case):
    # every candidate the search scores is recorded: each keeps heads whole, and both kinds of move occur (whole
    # head blocks exchanged: the head group moves; units exchanged inside a head: only flat groups move)
    a, b, spec, _, data, loss = _planted(case, dtype=torch.float32)
    problem = CurvePermutationProblem(a, a.state_dict(), b.state_dict(), spec, data, loss_fn=loss, value_batches=2)
    seen = []
    score = problem.batch_values

    def recording(x, mats):
        seen.append({g: m.argmax(1) for g, m in mats.items()})
        return score(x, mats)

    problem.batch_values = recording
    search = _swap_search(problem, trials=6, alpha=0.5, generator=torch.Generator().manual_seed(0))
    start = identity_permutation(spec)
    validate_permutation(spec, search([torch.zeros(sum(problem.numels))], start))  # the straight line
    assert len(seen) > len(spec.groups)
    for perms in seen:
        validate_permutation(spec, perms)
    heads = {h.heads for h in spec.heads.values()}
    moved = [{g for g in spec.groups if not torch.equal(p[g], start[g])} for p in seen[1:]]
    assert any(m & heads for m in moved)  # a head exchange
    assert any(m and m <= set(spec.heads) for m in moved)  # a move inside heads only
    if any(h.within is not None for h in spec.heads.values()):  # grouped-query attention: query heads exchanged
        assert any(_reorders_query_heads(spec, p) for p in seen[1:])

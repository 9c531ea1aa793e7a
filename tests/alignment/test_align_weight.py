"""Weight matching's fast path (issue #20): float32 similarities with cached summands, skipped groups, ``tol``.

The float32 path is checked against a float64 problem with the same inputs: its similarities agree within float32
rounding, and the coordinate ascent ends at the same permutation. ``tol`` only ever stops an ascent earlier.
"""

from __future__ import annotations

import sys

import pytest
import torch

from neuralign.alignment import identity_permutation, random_permutation, trace_spec
from neuralign.alignment.align import align, weight_similarity
from neuralign.errors import SpecError
from neuralign.experiments.models import build_model
from neuralign.optim import solve_assignment

_align = sys.modules["neuralign.alignment.align"]  # the module (the package re-exports the function `align`)


def _pair(name: str = "resnet20", seeds=(0, 1), shape=(2, 3, 32, 32), **kw):
    a = build_model(name, 10, generator=seeds[0], **kw)
    b = build_model(name, 10, generator=seeds[1], **kw)
    spec = trace_spec(a, torch.zeros(*shape))
    return a, b, spec, {k for k, _ in a.named_parameters()}


def test_float32_similarities_match_float64_and_the_cache_follows_every_change():
    a, b, spec, keys = _pair()
    fast = _align._WeightProblem(a.state_dict(), b.state_dict(), spec, keys)
    assert fast.dtype == torch.float32
    perms = random_permutation(spec, generator=0)
    for step in range(3):  # the cache is filled, then read after one group's change, then after another's
        for g in spec.groups:
            exact = weight_similarity(a.state_dict(), b.state_dict(), spec, perms, g, keys=keys)
            assert exact.dtype == torch.float64
            # every entry is a sum of products bounded by |a_i| |b_j| (Cauchy-Schwarz); float32 rounds each partial
            # sum by at most 2^-24 relative, so the error stays far below 1e-5 of that bound
            na, nb = fast.norms[g]
            bound = na[:, None] * nb[None, :]
            err = (fast.similarity(perms, g).double() - exact).abs()
            assert bool((err <= 1e-5 * bound).all()), (step, g, float((err / bound).max()))
        g = spec.groups[step * 7 % len(spec.groups)]
        perms = dict(perms, **{g: torch.randperm(spec.sizes[g], generator=torch.Generator().manual_seed(step))})


@pytest.mark.parametrize("seeds", [(0, 1), (2, 3)])
def test_float32_and_float64_ascents_end_at_the_same_permutation(seeds):
    a, b, spec, keys = _pair(seeds=seeds)
    ends = []
    for dtype in (torch.float32, torch.float64):
        problem = _align._WeightProblem(a.state_dict(), b.state_dict(), spec, keys, dtype=dtype)
        free = dict.fromkeys(spec.groups)
        gen = torch.Generator().manual_seed(0)
        perms, sweeps, converged = _align._ascent(
            problem, identity_permutation(spec), free, greedy=True, generator=gen, max_iter=100
        )
        assert converged
        ends.append((perms, problem.objective(perms)))
    for g in spec.groups:
        assert torch.equal(ends[0][0][g], ends[1][0][g]), g
    assert ends[0][1] == ends[1][1]  # same permutation: the float64 objective is the same number


def test_weights_outside_float32_range_are_matched_in_float64():
    a, b, spec, keys = _pair()
    assert _align._compute_dtype(a.state_dict()[k] for k in keys) == torch.float32
    big = {k: v * 2.0**50 if k in keys else v for k, v in b.state_dict().items()}  # products reach 2^100
    assert _align._WeightProblem(a.state_dict(), big, spec, keys).dtype == torch.float64
    scaled = build_model("resnet20", 10, generator=1)
    scaled.load_state_dict(big)
    # J scales by exactly 2^50 (a power of two), so its maximisers are the same
    res, res_big = (align(a, m, method="weight", spec=spec, generator=0, tol=0.0) for m in (b, scaled))
    for g in spec.groups:
        assert torch.equal(res.perms[g], res_big.perms[g]), g
    assert res_big.restart_objectives[0] == pytest.approx(res.restart_objectives[0] * 2.0**50, rel=1e-6)


def test_tol_stops_the_ascent_earlier_and_zero_reaches_a_coordinatewise_optimum():
    """vgg11 (width 1/4), seeds 2 and 3: the default tol stops after 2 sweeps, tol=0 after 6 with a higher J."""
    a, b, spec, keys = _pair("vgg11", seeds=(2, 3), width=0.25)
    loose = align(a, b, method="weight", spec=spec, generator=0)
    exact = align(a, b, method="weight", spec=spec, generator=0, tol=0.0)
    assert loose.converged and exact.converged and "tol=0.0001" in loose.message
    # the same draws until the loose run stops, so the exact run continues it: never fewer sweeps, never lower
    assert exact.n_iter > loose.n_iter
    assert exact.restart_objectives[0] > loose.restart_objectives[0]
    # the exact run's every group is optimal given the others (up to float32 rounding of its similarity)
    for g in spec.groups:
        S = weight_similarity(a.state_dict(), b.state_dict(), spec, exact.perms, g, keys=keys)
        best = solve_assignment(S, maximize=True).fun
        chosen = float(S[torch.arange(S.shape[0]), exact.perms[g]].sum())
        assert chosen >= best - 1e-5 * abs(best), g


def test_unchanged_groups_are_not_solved_again(monkeypatch):
    """After the greedy start a sweep steps every group once; later sweeps only those next to a change."""
    a, b, spec, keys = _pair()
    problem = _align._WeightProblem(a.state_dict(), b.state_dict(), spec, keys)
    solved = []
    step = _align._step

    def counting(S, current, freedom, group):
        solved.append(group)
        return step(S, current, freedom, group)

    monkeypatch.setattr(_align, "_step", counting)
    gen = torch.Generator().manual_seed(0)
    perms, sweeps, converged = _align._ascent(
        problem, identity_permutation(spec), dict.fromkeys(spec.groups), greedy=False, generator=gen, max_iter=100
    )
    assert converged and sweeps >= 3
    assert len(spec.groups) < len(solved) < sweeps * len(spec.groups)


def test_tol_is_validated():
    a, b, spec, _ = _pair("mlp", shape=(2, 1, 8, 8), in_features=64, hidden=(8,))
    with pytest.raises(ValueError, match=r"^`tol` must be in \[0, 1\), got -0.1$"):
        align(a, b, method="weight", spec=spec, tol=-0.1)
    with pytest.raises(TypeError, match=r"^`tol` must be a float, got str$"):
        align(a, b, method="weight", spec=spec, tol="0")


def test_weight_matching_with_a_loader_on_a_spec_without_taps_matches_as_without_one():
    # attention alone has no activation function, so no tap: the loader only reports correlations, of which there are
    # none; it used to refuse, telling the user to use method='weight' (a new-user trial)
    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.out = torch.nn.MultiheadAttention(8, 2, batch_first=True), torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.out(x + self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    a, b, x = Attention(), Attention(), torch.randn(2, 5, 8)
    with_loader = align(a, b, [x], method="weight")
    without = align(a, b, method="weight", example_input=x)
    assert with_loader.spec.groups and with_loader.correlation_after == {}
    assert all(torch.equal(with_loader.perms[g], without.perms[g]) for g in without.perms)
    with pytest.raises(SpecError, match="activation tap"):  # the data methods still need a tap
        align(a, b, [x], method="correlation")

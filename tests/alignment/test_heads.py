"""Head-structured matching (neuralign/alignment/heads.py): the exact structured maximiser on small instances
(checked against brute force over every structured permutation), and exact recovery of a planted head, inside-head
and residual permutation by correlation and weight matching on the zoo's ViT and LLM-style decoder."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch

from neuralign.alignment import (
    Heads,
    SpecBuilder,
    align,
    apply_permutation,
    heads_permutation,
    invert_permutation,
    random_permutation,
    split_heads_permutation,
    trace_spec,
    validate_permutation,
)
from neuralign.alignment.heads import match_heads
from neuralign.experiments.models.lm import TinyLM
from neuralign.experiments.models.vit import ViT


def _objective(sim, perms):
    return sum(float(S[torch.arange(S.shape[0]), perms[g]].sum()) for g, S in sim.items())


@pytest.mark.parametrize("seed", range(4))
def test_match_heads_is_the_best_structured_permutation(seed):
    # three heads of two units; query/key and value share the head permutation, a tied pair of value copies
    # (grouped-query style: 6 heads in blocks of 2) shares the value's inside permutation, the head group has a
    # per-head parameter of its own
    spec = (SpecBuilder().group("h", 3).group("qk", 6).group("v", 6).group("o", 12)
            .heads("qk", Heads(3, 2, "h", "qk")).heads("v", Heads(3, 2, "h", "v"))
            .heads("o", Heads(6, 2, "h", "v", tie=2)).add("scale", 0, "h").build())  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    sim = {g: torch.randn(n, n, generator=gen, dtype=torch.float64) for g, n in spec.sizes.items()}
    found = match_heads(spec, sim, {g: torch.arange(n) for g, n in spec.sizes.items()})
    validate_permutation(spec, found)
    best = -float("inf")
    inner = [torch.tensor(p) for p in itertools.permutations(range(2))]
    for pi in itertools.permutations(range(3)):
        pi = torch.tensor(pi)
        for s_qk in itertools.product(inner, repeat=3):
            for s_v in itertools.product(inner, repeat=3):
                perms = {"h": pi, "qk": heads_permutation(spec.heads["qk"], pi, torch.stack(s_qk)),
                         "v": heads_permutation(spec.heads["v"], pi, torch.stack(s_v)),
                         "o": heads_permutation(spec.heads["o"], pi, torch.stack(s_v))}  # fmt: skip
                best = max(best, _objective(sim, perms))
    # the same sums in another order: float64 rounding only
    assert _objective(sim, found) == pytest.approx(best, rel=1e-12)


def _reorders_query_heads(spec, perms) -> bool:
    """True if ``perms`` reorders the query heads inside some block of grouped-query attention."""
    return any(not torch.equal(split_heads_permutation(h, perms[g])[2], torch.arange(h.tie).expand(h.blocks, h.tie))
               for g, h in spec.heads.items() if h.within is not None)  # fmt: skip


def _planted(model, x):
    spec = trace_spec(model, x)
    perms = random_permutation(spec, generator=1)
    assert _reorders_query_heads(spec, perms) == any(h.within for h in spec.heads.values())  # GQA: tau too
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(model.state_dict(), spec, perms))
    return spec, other, invert_permutation(perms)


CASES = {
    "vit": (lambda: ViT(10, width=32, depth=2, heads=4, mlp_dim=48), lambda g: torch.randn(32, 3, 32, 32, generator=g)),
    "lm": (lambda: TinyLM(50, width=32, depth=2, heads=4, kv_heads=2, hidden=48),
           lambda g: torch.randint(0, 50, (16, 12), generator=g)),
}  # fmt: skip


@pytest.mark.parametrize("method", ["correlation", "weight"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_planted_heads_are_recovered_exactly(case, method):
    build, draw = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    gen = torch.Generator().manual_seed(2)
    batches = [draw(gen) for _ in range(2)]
    spec, other, expected = _planted(model, batches[0][:2])
    assert spec.heads  # the head structure is part of what is recovered
    kwargs = {"loader": batches} if method == "correlation" else {"spec": spec, "generator": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # groups without a tap (queries/keys, head groups) are matched by weights
        res = align(model, other, method=method, **kwargs)
    wrong = [g for g in spec.groups if not torch.equal(res.perms[g], expected[g])]
    assert not wrong, wrong

"""Units the data cannot tell apart are matched by weights, and underdetermined groups are said (issue #9)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from neuralign import align, trace_spec
from neuralign.alignment import apply_permutation, invert_permutation, random_permutation


def _planted_pair(seed: int = 0):
    torch.manual_seed(seed)
    a = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(256, 5, generator=torch.Generator().manual_seed(seed + 1))
    x[0] = torch.tensor([20.0, 0, 0, 0, 0])  # one outlier example
    with torch.no_grad():  # units 0..3 fire on it only: perfectly correlated with one another
        for k in range(4):
            a[0].weight[k] = torch.tensor([1.0 + k, 0, 0, 0, 0])
            a[0].bias[k] = -10.0 - k
    spec = trace_spec(a, x)
    p = random_permutation(spec, generator=seed)
    b = copy.deepcopy(a)
    b.load_state_dict(apply_permutation(a.state_dict(), spec, p))
    return a, b, x, spec, invert_permutation(p)


def test_units_perfectly_correlated_with_each_other_are_matched_by_weights():
    a, b, x, spec, inverse = _planted_pair()
    res = align(a, b, [x], method="correlation")
    for g in spec.groups:  # 2 units of group 0 were swapped, with status 0 and no warning
        assert torch.equal(res.perms[g], inverse[g]), g
    assert "could not tell apart" in res.message and "matched by weight similarity" in res.message


def test_too_few_observations_warn_and_ties_still_follow_the_weights():
    a, b, x, spec, inverse = _planted_pair()
    with pytest.warns(UserWarning, match=r"fewer observations than units: 0 \(2 observations, 16 units\)"):
        res = align(a, b, [x[:2]], method="correlation")  # two examples: every correlation is +-1
    for g in spec.groups:  # 10 and 9 units were wrong without a word
        assert torch.equal(res.perms[g], inverse[g]), g

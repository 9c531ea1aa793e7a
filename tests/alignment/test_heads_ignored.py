"""``align(..., heads=False)``: Verma & Elbayad's "ignore heads" ablation (one flat assignment per group). With the
head structure the permuted model B computes B's function; without it, units leave their heads and it does not."""

from __future__ import annotations

import copy

import pytest
import torch

from neuralign.alignment import align, apply_permutation, validate_permutation
from neuralign.experiments.models.lm import TinyLM
from neuralign.experiments.models.vit import ViT

MODELS = {
    "lm": (lambda: TinyLM(40, width=32, depth=1, heads=4, kv_heads=2, hidden=48),
           lambda g: torch.randint(0, 40, (16, 12), generator=g)),
    "vit": (lambda: ViT(5, 3, 8, 4, 32, 1, 4, 48, 0.0), lambda g: torch.randn(16, 3, 8, 8, generator=g)),
}  # fmt: skip


def _pair(name: str):
    build, draw = MODELS[name]
    torch.manual_seed(1)
    a = build().double().eval()
    torch.manual_seed(2)
    b = build().double().eval()
    gen = torch.Generator().manual_seed(3)
    batches = [draw(gen) for _ in range(4)]
    batches = [x.double() if x.is_floating_point() else x for x in batches]
    return a, b, batches


@pytest.mark.parametrize("name", sorted(MODELS))
def test_heads_keep_the_function_and_ignoring_them_does_not(name):
    a, b, batches = _pair(name)
    x = batches[0]
    with torch.no_grad():
        reference = b(x)
    outputs = {}
    for heads in (True, False):
        res = align(a, b, batches, method="correlation", heads=heads, generator=0)
        clone = copy.deepcopy(b)
        clone.load_state_dict(apply_permutation(b.state_dict(), res.spec, res.perms))
        with torch.no_grad():
            outputs[heads] = clone(x)
        assert bool(res.spec.heads) == heads
    # float64: a permutation changes only the order of sums
    torch.testing.assert_close(outputs[True], reference, rtol=0, atol=1e-10)
    assert float((outputs[False] - reference).abs().max()) > 1e-3 * float(reference.abs().max())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_flat_alignment_moves_units_between_heads(name):
    a, b, batches = _pair(name)
    structured = align(a, b, batches, method="correlation", generator=0)
    flat = align(a, b, batches, method="correlation", heads=False, generator=0)
    validate_permutation(structured.spec, structured.perms)
    with pytest.raises(ValueError, match="moves units between its"):
        validate_permutation(structured.spec, flat.perms)
    # same data, no structure to respect: the flat assignment matches at least as much correlation in every group
    for g in flat.spec.groups:
        if g in structured.spec.heads:
            assert flat.objective_after[g] >= structured.objective_after[g] - 1e-9


def test_heads_must_be_a_bool():
    a, b, batches = _pair("lm")
    with pytest.raises(TypeError, match="heads"):
        align(a, b, batches, heads="no")

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuralign.alignment import (
    PermutationSpec,
    Segment,
    apply_permutation,
    apply_permutation_matrices,
    compose_permutations,
    identity_permutation,
    invert_permutation,
    permutation_distance,
    random_permutation,
    validate_permutation,
)

SPEC = PermutationSpec(
    {"a": 3, "b": 4},
    {
        "conv.weight": {0: (Segment("a", 3),)},
        "conv.bias": {0: (Segment("a", 3),)},
        "cat.weight": {0: (Segment("b", 4),), 1: (Segment("a", 3), Segment(None, 2), Segment("a", 3))},
        "fc.weight": {1: (Segment("b", 4, expand=5),)},
    },
)


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(3, 2, 3, 3, generator=g),
        "conv.bias": torch.randn(3, generator=g),
        "cat.weight": torch.randn(4, 8, generator=g),
        "fc.weight": torch.randn(6, 20, generator=g),
        "fc.bias": torch.randn(6, generator=g),
    }


def _dense(perm):
    n = perm.numel()
    P = torch.zeros(n, n)
    P[torch.arange(n), perm] = 1.0
    return P


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_apply_then_inverse_is_identity_and_input_untouched(seed):
    sd = _state(seed % 7)
    before = {k: v.clone() for k, v in sd.items()}
    p = random_permutation(SPEC, generator=seed)
    out = apply_permutation(apply_permutation(sd, SPEC, p), SPEC, invert_permutation(p))
    for k in sd:
        torch.testing.assert_close(out[k], sd[k], rtol=0, atol=0)
        torch.testing.assert_close(sd[k], before[k], rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(s1=st.integers(0, 2**31 - 1), s2=st.integers(0, 2**31 - 1))
def test_compose_matches_sequential_application(s1, s2):
    sd = _state()
    p, q = random_permutation(SPEC, generator=s1), random_permutation(SPEC, generator=s2)
    seq = apply_permutation(apply_permutation(sd, SPEC, p), SPEC, q)
    once = apply_permutation(sd, SPEC, compose_permutations(p, q))
    for k in sd:
        torch.testing.assert_close(seq[k], once[k], rtol=0, atol=0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_dense_matrices_equal_index_permutation(seed):
    sd = _state(1)
    p = random_permutation(SPEC, generator=seed)
    dense = apply_permutation_matrices(sd, SPEC, {g: _dense(v) for g, v in p.items()})
    idx = apply_permutation(sd, SPEC, p)
    for k in sd:
        # each entry of P @ W is one product 1 * w plus exact zeros (0 * w, finite w): exact in float32
        torch.testing.assert_close(dense[k], idx[k], rtol=0, atol=0)


def test_index_convention_rows_and_blocks():
    sd = _state()
    p = {"a": torch.tensor([2, 0, 1]), "b": torch.tensor([3, 2, 1, 0])}
    out = apply_permutation(sd, SPEC, p)
    torch.testing.assert_close(out["conv.weight"], sd["conv.weight"][[2, 0, 1]])
    # concatenated axis: block a, 2 fixed columns, block a again
    cols = [2, 0, 1, 3, 4, 7, 5, 6]
    torch.testing.assert_close(out["cat.weight"], sd["cat.weight"][[3, 2, 1, 0]][:, cols])
    # flattened axis: each unit covers 5 consecutive columns
    fc_cols = [c * 5 + s for c in [3, 2, 1, 0] for s in range(5)]
    torch.testing.assert_close(out["fc.weight"], sd["fc.weight"][:, fc_cols])
    torch.testing.assert_close(out["fc.bias"], sd["fc.bias"])


def test_dense_matrices_are_differentiable():
    sd = _state()
    mats = {g: torch.eye(n, requires_grad=True) for g, n in SPEC.sizes.items()}
    out = apply_permutation_matrices(sd, SPEC, mats)
    out["fc.weight"].sum().backward()
    assert mats["b"].grad is not None and mats["b"].grad.shape == (4, 4)


def test_identity_inverse_distance():
    ident = identity_permutation(SPEC)
    p = {"a": torch.tensor([1, 0, 2]), "b": torch.tensor([0, 1, 2, 3])}
    assert permutation_distance(ident, p) == {"a": 2, "b": 0}
    assert permutation_distance(compose_permutations(p, invert_permutation(p)), ident) == {"a": 0, "b": 0}


def test_validate_names_the_group():
    good = identity_permutation(SPEC)
    validate_permutation(SPEC, good)
    with pytest.raises(ValueError, match=r"`perms` group `a` has length \(2,\), expected \(3,\)"):
        validate_permutation(SPEC, {**good, "a": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="`perms` group `b` is not a permutation of 0..3"):
        validate_permutation(SPEC, {**good, "b": torch.tensor([0, 1, 1, 3])})
    with pytest.raises(ValueError, match="group `b` is not a permutation"):
        validate_permutation(SPEC, {**good, "b": torch.tensor([0, 1, 2, 4])})
    with pytest.raises(ValueError, match=r"lacks the groups \['b'\]"):
        validate_permutation(SPEC, {"a": good["a"]})
    with pytest.raises(ValueError, match=r"has groups \['c'\] that the spec does not have"):
        validate_permutation(SPEC, {**good, "c": torch.tensor([0])})
    with pytest.raises(ValueError, match="expected an integer tensor, got dtype torch.float32"):
        validate_permutation(SPEC, {**good, "a": torch.tensor([0.0, 1.0, 2.0])})
    with pytest.raises(ValueError, match="not a permutation"):
        apply_permutation(_state(), SPEC, {**good, "a": torch.tensor([0, 0, 0])})


def test_compose_rejects_different_groups():
    with pytest.raises(ValueError, match="different groups"):
        compose_permutations({"a": torch.arange(3)}, {"b": torch.arange(3)})


def test_permuted_state_dict_keeps_metadata_so_versioned_modules_load():
    torchvision = pytest.importorskip("torchvision")
    from neuralign import trace_spec

    torch.manual_seed(0)
    model = torchvision.models.mnasnet0_5(weights=None, num_classes=10)  # its BN layers read `version`
    spec = trace_spec(model, torch.randn(2, 3, 32, 32))
    state = model.state_dict()
    permuted = apply_permutation(state, spec, random_permutation(spec, generator=0))
    assert list(permuted) == list(state) and permuted._metadata == state._metadata
    torchvision.models.mnasnet0_5(weights=None, num_classes=10).load_state_dict(permuted)  # raised ValueError

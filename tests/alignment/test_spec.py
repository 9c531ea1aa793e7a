import pytest
import torch

from neuralign.alignment import PermutationSpec, Segment, SpecBuilder, spec_from_axes
from neuralign.errors import ShapeMismatchError, SpecError


def _mlp_spec():
    return (
        SpecBuilder()
        .group("h1", 4)
        .group("h2", 3)
        .add("fc1.weight", 0, "h1")
        .add("fc1.bias", 0, "h1")
        .add("fc2.weight", 1, "h1")
        .add("fc2.weight", 0, "h2")
        .add("fc3.weight", 1, "h2")
        .build()
    )


def _mlp_state():
    return {
        "fc1.weight": torch.zeros(4, 5),
        "fc1.bias": torch.zeros(4),
        "fc2.weight": torch.zeros(3, 4),
        "fc3.weight": torch.zeros(2, 3),
    }


def test_builder_maps_groups_to_axes():
    spec = _mlp_spec()
    assert spec.sizes == {"h1": 4, "h2": 3}
    assert sorted(spec.perm_to_axes["h1"]) == [("fc1.bias", 0), ("fc1.weight", 0), ("fc2.weight", 1)]
    assert spec.axis_length("fc2.weight", 1) == 4
    assert spec.unpermuted({**_mlp_state(), "fc3.bias": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(0)}) == [
        "fc3.bias"
    ]


def test_validate_accepts_matching_state_and_names_mismatches():
    spec = _mlp_spec()
    spec.validate(_mlp_state())
    bad = _mlp_state()
    bad["fc2.weight"] = torch.zeros(3, 6)
    with pytest.raises(ShapeMismatchError, match=r"`fc2.weight` of shape \(3, 6\); the spec expects length 4"):
        spec.validate(bad)
    missing = _mlp_state()
    del missing["fc1.bias"]
    with pytest.raises(SpecError, match="permutes `fc1.bias`, which `state_dict` does not have"):
        spec.validate(missing)


def test_builder_rejects_inconsistent_input():
    with pytest.raises(SpecError, match="declared twice"):
        SpecBuilder().group("a", 2).group("a", 2)
    with pytest.raises(SpecError, match="used before it is declared"):
        SpecBuilder().add("w", 0, "a")
    with pytest.raises(SpecError, match="assigned twice"):
        SpecBuilder().group("a", 2).add("w", 0, "a").add("w", 0, "a")
    with pytest.raises(SpecError, match="has 3 units but the group has 2"):
        PermutationSpec({"a": 2}, {"w": {0: (Segment("a", 3),)}})
    with pytest.raises(SpecError, match="unknown group `b`"):
        PermutationSpec({"a": 2}, {"w": {0: (Segment("b", 2),)}})


def test_segments_cover_concatenation_and_flattening():
    spec = PermutationSpec(
        {"a": 2, "b": 3},
        {"fc.weight": {1: (Segment("a", 2, expand=4), Segment(None, 1, 4), Segment("b", 3, expand=4))}},
    )
    assert spec.axis_length("fc.weight", 1) == 24
    part = spec.partition()
    assert frozenset({("fc.weight", 1, 0, 4)}) in part
    assert frozenset({("fc.weight", 1, 12, 4)}) in part


def test_dict_round_trip_and_equality():
    spec = _mlp_spec()
    again = PermutationSpec.from_dict(spec.to_dict())
    assert again == spec
    assert PermutationSpec.from_dict(__import__("json").loads(spec.to_json())) == spec
    with pytest.raises(SpecError, match="not a valid spec description"):
        PermutationSpec.from_dict({"axes": {}})


def test_partition_ignores_group_names():
    renamed = (
        SpecBuilder()
        .group("x", 4)
        .group("y", 3)
        .add("fc1.weight", 0, "x")
        .add("fc1.bias", 0, "x")
        .add("fc2.weight", 1, "x")
        .add("fc2.weight", 0, "y")
        .add("fc3.weight", 1, "y")
        .build()
    )
    assert renamed != _mlp_spec()
    assert renamed.partition() == _mlp_spec().partition()


def test_to_graph_links_groups_and_tensors():
    graph = _mlp_spec().to_graph()
    groups = [n for n, d in graph.nodes(data=True) if d["kind"] == "group"]
    tensors = [n for n, d in graph.nodes(data=True) if d["kind"] == "tensor"]
    assert len(groups) == 2 and len(tensors) == 4
    assert graph.number_of_edges() == 5
    assert graph.nodes[("group", "h1")]["size"] == 4
    edge = graph.get_edge_data(("group", "h1"), ("tensor", "fc2.weight"))[0]
    assert edge["axis"] == 1 and edge["offset"] == 0


def test_spec_from_axes_infers_sizes():
    state = _mlp_state()
    spec = spec_from_axes(
        {"fc1.weight": ("h1", None), "fc1.bias": ("h1",), "fc2.weight": ("h2", "h1"), "fc3.weight": (None, "h2")},
        state,
    )
    assert spec.partition() == _mlp_spec().partition()
    with pytest.raises(SpecError, match="acts on axes of lengths 4 and 3"):
        spec_from_axes({"fc1.weight": ("h", None), "fc2.weight": ("h", None)}, state)
    with pytest.raises(SpecError, match="has 2 axes but 1 entries"):
        spec_from_axes({"fc1.weight": ("h",)}, state)

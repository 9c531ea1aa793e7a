"""Alignment along a curve: the network at w(t), batch norm re-estimated, aligned to each end point."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from neuralign.alignment import align, apply_permutation, invert_permutation, random_permutation, trace_spec
from neuralign.curves import Line, MidpointAlignment, midpoint_alignment, reestimate_bn


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(),
                         nn.Linear(10, 3))  # fmt: skip


def _data(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(128, 6, generator=gen) for _ in range(3)]


def _params(model: nn.Module, state) -> dict[str, torch.Tensor]:
    return {k: state[k] for k, _ in model.named_parameters()}


@pytest.fixture(scope="module")
def planted():
    a = _mlp(0).eval()
    x = _data()
    # A's batch-norm statistics re-estimated on the same data as the curve's points: at t = 0 the point is A exactly
    a.load_state_dict({**a.state_dict(), **reestimate_bn(a, _params(a, a.state_dict()), x)})
    spec = trace_spec(a, x[0])
    p = random_permutation(spec, generator=1)
    b_state = apply_permutation(a.state_dict(), spec, p)  # B: A with its units relabelled
    return a, spec, x, b_state, invert_permutation(p)


def _self_correlation(a: nn.Module, state, x, spec) -> dict[str, float]:
    """Correlation of matched units of a network with an exact copy of itself (1 up to the accumulation's rounding,
    about 1e-3 for units that fire on a handful of inputs)."""
    net = copy.deepcopy(a)
    net.load_state_dict(state)
    return align(net, copy.deepcopy(net), x, spec=spec).correlation_before


def test_end_points_of_a_line_are_the_end_points_themselves(planted):
    a, spec, x, b_state, _ = planted
    line = Line.between(_params(a, a.state_dict()), _params(a, b_state))
    for t, end, state in ((0.0, "a", a.state_dict()), (1.0, "b", b_state)):
        res = midpoint_alignment(a, line, a.state_dict(), b_state, x, x, t=t, spec=spec)
        assert res.groups == tuple(spec.groups)
        assert res.before[end] == pytest.approx(_self_correlation(a, state, x, spec), abs=1e-12)
        assert res.moved[end] == {g: 0 for g in spec.groups}
        assert min(res.before[end].values()) > 0.99


def test_unaligned_midpoint_gains_from_aligning_and_aligned_midpoint_does_not(planted):
    """B is A relabelled: the midpoint between A and the aligned B is A itself (gain 0); between A and B it is an
    average of mismatched units, which aligning it to A improves."""
    a, spec, x, b_state, inverse = planted
    aligned = apply_permutation(b_state, spec, inverse)
    line_aligned = Line.between(_params(a, a.state_dict()), _params(a, aligned))
    res = midpoint_alignment(a, line_aligned, a.state_dict(), aligned, x, x, spec=spec)
    for end in ("a", "b"):
        assert all(abs(v) < 1e-12 for v in res.gain(end).values())
        assert res.before[end] == pytest.approx(_self_correlation(a, a.state_dict(), x, spec), abs=1e-12)
    line = Line.between(_params(a, a.state_dict()), _params(a, b_state))
    res = midpoint_alignment(a, line, a.state_dict(), b_state, x, x, spec=spec)
    assert res.mean("after", "a") > res.mean("before", "a") + 0.1
    assert sum(res.moved["a"].values()) > 0
    again = MidpointAlignment.from_dict(res.to_dict())
    assert again == res


def test_statistics_are_re_estimated_at_the_point_and_the_ends_and_the_model_is_not_modified(planted):
    """End points with stale (stored, training-time) batch-norm statistics: the end points are re-estimated on the
    same batches as the point on the curve, so at t = 0 the network is A itself whatever A's stored statistics (a
    reviewer found a stored-statistics A compared against a re-estimated w(0), correlation < 1)."""
    a, spec, x, b_state, _ = planted
    before = {k: v.clone() for k, v in a.state_dict().items()}
    line = Line.between(_params(a, a.state_dict()), _params(a, b_state))
    stale = {**a.state_dict(), "1.running_var": a.state_dict()["1.running_var"] * 50.0,
             "1.running_mean": a.state_dict()["1.running_mean"] + 3.0}  # fmt: skip
    res = midpoint_alignment(a, line, stale, b_state, x, x, t=0.0, spec=spec)
    fresh = midpoint_alignment(a, line, a.state_dict(), b_state, x, x, t=0.0, spec=spec)
    assert res == fresh
    assert res.before["a"] == pytest.approx(_self_correlation(a, a.state_dict(), x, spec), abs=1e-12)
    assert res.moved["a"] == {g: 0 for g in spec.groups}
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k])


def test_bad_input_is_named(planted):
    a, spec, x, b_state, _ = planted
    line = Line.between(_params(a, a.state_dict()), _params(a, b_state))
    with pytest.raises(ValueError, match="t"):
        midpoint_alignment(a, line, a.state_dict(), b_state, x, x, t=1.5)
    with pytest.raises(TypeError, match="`curve` must be a Curve"):
        midpoint_alignment(a, {"w": 1}, a.state_dict(), b_state, x, x)
    with pytest.raises(ValueError, match="`end` must be 'a' or 'b'"):
        MidpointAlignment(0.5, ("g",), {}, {}, {}).gain("c")
    assert math.isnan(MidpointAlignment(0.5, ("g",), {"a": {"g": math.nan}}, {}, {}).mean("before", "a"))


def test_a_shuffling_bn_loader_is_drawn_once_or_refused(planted):
    """A reviewer found that a reshuffling training loader gave each of the three re-estimations other batches
    (correlation 0.995 with A at t = 0): with bn_batches the batches are drawn once; without, such a loader is
    refused."""
    a, spec, x, b_state, _ = planted
    line = Line.between(_params(a, a.state_dict()), _params(a, b_state))
    data = torch.utils.data.TensorDataset(torch.cat(x))
    shuffling = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True,
                                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    res = midpoint_alignment(a, line, a.state_dict(), b_state, x, shuffling, t=0.0, bn_batches=3, spec=spec)
    assert res.moved["a"] == {g: 0 for g in spec.groups}
    assert min(res.before["a"].values()) > 0.99
    net = copy.deepcopy(a)
    assert res.before["a"] == pytest.approx(align(net, copy.deepcopy(net), x, spec=spec).correlation_before, abs=1e-3)
    with pytest.raises(ValueError, match="`bn_loader` yields other batches on each pass"):
        midpoint_alignment(a, line, a.state_dict(), b_state, x, shuffling, t=0.0, spec=spec)


def test_a_language_model_with_a_tied_head_and_rope_buffers_is_aligned_along_its_curve():
    # tinylm's output head is its embedding (one parameter, two state-dict names) and RoPE's frequencies are a
    # non-persistent buffer: load_state_dict refused both. On the line from A to A the point is A at every t, so
    # nothing moves; a line towards a relabelled A moves units at its end point B.
    from neuralign.experiments.models import build_model

    torch.manual_seed(0)
    a = build_model("tinylm", num_classes=256).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (48, 12), generator=gen)
    batches = [x[i : i + 16] for i in range(0, 48, 16)]
    params = _params(a, a.state_dict())
    spec = trace_spec(a, batches[0])
    res = midpoint_alignment(a, Line.between(params, params), a.state_dict(), a.state_dict(), batches, batches,
                             t=0.5, spec=spec)  # fmt: skip
    assert res.moved["a"] == {g: 0 for g in spec.groups} == res.moved["b"]
    b_state = apply_permutation(a.state_dict(), spec, random_permutation(spec, generator=2))
    res = midpoint_alignment(a, Line.between(params, _params(a, b_state)), a.state_dict(), b_state, batches,
                             batches, t=0.0, spec=spec)  # fmt: skip
    assert res.moved["a"] == {g: 0 for g in spec.groups}
    assert sum(res.moved["b"].values()) > 0

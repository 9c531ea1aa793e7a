"""Evaluation along curves and planes: arc-length geometry, the summary, serialisation and agreement checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from neuralign.curves import (
    Bezier,
    CurveEvaluation,
    Line,
    PlaneEvaluation,
    PolyChain,
    arc_length,
    arc_length_average,
    evaluate_curve,
    evaluate_plane,
    project_to_plane,
    reestimate_bn,
)
from neuralign.curves._weights import evaluate as _evaluate
from neuralign.errors import ShapeMismatchError


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def params_of(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().to(dtype) for k, v in model.named_parameters()}


def data(n_batches: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(20, 5, generator=g), torch.randint(0, 3, (20,), generator=g)) for _ in range(n_batches)]


def bent_bezier(dtype: torch.dtype = torch.float32) -> Bezier:
    a, theta, b = params_of(net(0), dtype), params_of(net(1), dtype), params_of(net(2), dtype)
    return Bezier([a, theta, b])


# ---------------------------------------------------------------------------------------------------------------
# geometry
@given(
    value=st.floats(-1e3, 1e3, allow_nan=False),
    steps=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=70),
)
@settings(max_examples=80, deadline=None)
@example(value=1.0, steps=[5e-324])  # a subnormal length: the weights underflow (found by hypothesis)
def test_arc_length_average_of_a_constant_is_that_constant(value: float, steps: list[float]) -> None:
    s = [0.0]
    for d in steps:
        s.append(s[-1] + d)
    assert arc_length_average([value] * len(s), s) == pytest.approx(value, rel=1e-12, abs=1e-12)


def test_arc_length_average_weights_by_chord_length() -> None:
    # trapezoid on [0, 1, 3]: weights (0.5, 1.5, 1.0) / 3
    assert arc_length_average([3.0, 0.0, 6.0], [0.0, 1.0, 3.0]) == pytest.approx((1.5 + 6.0) / 3.0)
    assert arc_length_average([1.0, 3.0], [0.0, 0.0]) == 2.0  # zero length: plain mean
    with pytest.raises(ValueError, match="same nonzero length, got 2 and 3"):
        arc_length_average([1.0, 2.0], [0.0, 1.0, 2.0])


def test_planar_and_chord_arc_lengths_agree_for_quadratic_bezier() -> None:
    curve = bent_bezier()
    ts = torch.linspace(0, 1, 65).tolist()
    planar = arc_length(curve, ts, method="planar")
    chord = arc_length(curve, ts, method="chord")
    torch.testing.assert_close(planar, chord, rtol=1e-9, atol=1e-12)  # both float64 from one Gram matrix
    # and both equal chord lengths measured directly between evaluated weight vectors (float32 points)
    flat = torch.stack([torch.cat([v.double().flatten() for v in curve(t).values()]) for t in ts])
    direct = torch.cat([torch.zeros(1, dtype=torch.float64), (flat[1:] - flat[:-1]).norm(dim=1).cumsum(0)])
    torch.testing.assert_close(planar, direct, rtol=1e-5, atol=1e-6)
    assert torch.all(planar[1:] > planar[:-1])


def test_chord_arc_length_of_line_and_polychain() -> None:
    a, b = params_of(net(0), torch.float64), params_of(net(1), torch.float64)
    dist = math.sqrt(sum(float((b[k] - a[k]).pow(2).sum()) for k in a))
    line = Line.between(a, b)
    torch.testing.assert_close(
        arc_length(line, [0.0, 0.25, 1.0]), torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64) * dist
    )
    c = params_of(net(2), torch.float64)
    chain = PolyChain([a, c, b])
    leg1 = math.sqrt(sum(float((c[k] - a[k]).pow(2).sum()) for k in a))
    leg2 = math.sqrt(sum(float((b[k] - c[k]).pow(2).sum()) for k in a))
    s = arc_length(chain, [0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(s, torch.tensor([0.0, leg1 / 2, leg1, leg1 + leg2], dtype=torch.float64))
    # chords join the evaluated points only: from t=0 straight to t=1 is the end-to-end distance
    assert arc_length(chain, [0.0, 1.0], method="auto")[-1] == pytest.approx(dist)


def test_arc_length_errors() -> None:
    chain = PolyChain.between(params_of(net(0)), params_of(net(1)))
    with pytest.raises(ValueError, match="method 'planar' needs a quadratic Bezier curve, got a PolyChain"):
        arc_length(chain, [0.0, 1.0], method="planar")
    with pytest.raises(ValueError, match=r"unknown method 'arc'; expected one of \['auto', 'planar', 'chord'\]"):
        arc_length(chain, [0.0, 1.0], method="arc")
    with pytest.raises(ValueError, match=r"`t` must lie in \[0, 1\], got 1.5"):
        arc_length(chain, [0.0, 1.5])


# ---------------------------------------------------------------------------------------------------------------
# summary and serialisation
def test_summary_definitions() -> None:
    ev = CurveEvaluation.from_values(
        [0.0, 0.25, 0.5, 0.75, 1.0],
        [0.2, 0.9, 1.4, 0.5, 0.4],
        [0.9, 0.7, 0.5, 0.8, 0.7],
        [0.0, 1.0, 2.0, 3.0, 4.0],
    )
    assert ev.min_accuracy == 0.5 and ev.max_loss == 1.4
    assert ev.endpoint_accuracy == pytest.approx(0.8) and ev.endpoint_loss == pytest.approx(0.3)
    assert ev.accuracy_barrier == pytest.approx(0.8 - 0.5)  # linear interpolation of ends at t=0.5 is 0.8
    assert ev.loss_barrier == pytest.approx(1.4 - 0.3)
    assert (ev.mid_t, ev.mid_accuracy, ev.mid_loss) == (0.5, 0.5, 1.4)
    assert ev.avg_accuracy == pytest.approx((0.5 * 0.9 + 0.7 + 0.5 + 0.8 + 0.5 * 0.7) / 4)
    with pytest.raises(ValueError, match="`t` must start at 0 and end at 1"):
        CurveEvaluation.from_values([0.0, 0.5], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0])


def test_evaluation_round_trips_through_json() -> None:
    ev = CurveEvaluation.from_values([0.0, 0.5, 1.0], [0.1, 0.2, 0.3], [0.9, 0.8, 0.7], [0.0, 1.0, 2.0],
                                     train_loss=[0.0, 0.1, 0.0], train_accuracy=[1.0, 0.9, 1.0], max_bn_batches=5)
    restored = CurveEvaluation.from_dict(json.loads(json.dumps(ev.to_dict())))
    assert restored == ev
    with pytest.raises(ValueError, match=r"unknown CurveEvaluation fields \['nope'\]"):
        CurveEvaluation.from_dict({**ev.to_dict(), "nope": 1})


# ---------------------------------------------------------------------------------------------------------------
# evaluate_curve
def test_evaluate_curve_matches_direct_evaluation_and_leaves_model_alone() -> None:
    model = net(0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curve = bent_bezier()
    bn_data, test_data, train_data = data(3, 0), data(2, 1), data(2, 2)
    records = []
    ev = evaluate_curve(model, curve, bn_data, test_data, num_points=5, train_loader=train_data,
                        callback=records.append)
    assert ev.t == (0.0, 0.25, 0.5, 0.75, 1.0) and ev.geometry == "planar" and ev.max_bn_batches is None
    assert [r["index"] for r in records] == list(range(5)) and records[2]["test_accuracy"] == ev.test_accuracy[2]
    for i in (0, 3):
        params = curve(ev.t[i])
        buffers = reestimate_bn(model, params, bn_data)
        loss, acc = _evaluate(model, params, buffers, test_data, torch.device("cpu"), "test")
        assert ev.test_loss[i] == pytest.approx(loss, rel=1e-6) and ev.test_accuracy[i] == acc
        loss, acc = _evaluate(model, params, buffers, train_data, torch.device("cpu"), "train")
        assert ev.train_loss[i] == pytest.approx(loss, rel=1e-6) and ev.train_accuracy[i] == acc
    assert list(ev.arc_length) == pytest.approx(arc_length(curve, ev.t).tolist())
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # an even number of points: the nearest point to 0.5 (the first one on a tie)
    assert evaluate_curve(model, curve, bn_data, test_data, num_points=4).mid_t == pytest.approx(1 / 3)


def test_bn_subset_changes_only_the_batches_used() -> None:
    model = net(0)
    curve = bent_bezier()
    bn_data, test_data = data(4, 0), data(1, 1)
    subset = evaluate_curve(model, curve, bn_data, test_data, num_points=3, max_bn_batches=2)
    same = evaluate_curve(model, curve, bn_data[:2], test_data, num_points=3)
    assert subset.test_loss == same.test_loss and subset.max_bn_batches == 2


def test_evaluate_curve_errors() -> None:
    model = net(0)
    curve = bent_bezier()
    with pytest.raises(ValueError, match="`num_points` must be an int >= 2, got 1"):
        evaluate_curve(model, curve, data(), data(), num_points=1)
    wide = nn.Sequential(nn.Linear(5, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 3))
    with pytest.raises(ShapeMismatchError, match=r"`curve` has parameter `0.weight` of shape \(8, 5\) but `model`"):
        evaluate_curve(wide, curve, data(), data())
    with pytest.raises(TypeError, match="`test_loader` must yield \\(inputs, targets\\) pairs"):
        evaluate_curve(model, curve, data(), [torch.randn(4, 5)], num_points=2)


# ---------------------------------------------------------------------------------------------------------------
# planes
def test_plane_grid_coordinates_and_projection_agree() -> None:
    model = net(0)
    a, b, c = params_of(net(0)), params_of(net(1)), params_of(net(2))
    bn_data, test_data = data(2, 0), data(1, 1)
    plane = evaluate_plane(model, a, b, c, bn_data, test_data, grid=(3, 4), margin=(0.5, 0.5, 0.0, 0.5))
    assert plane.alpha == (-0.5, 0.5, 1.5) and plane.beta == pytest.approx((0.0, 0.5, 1.0, 1.5))
    assert len(plane.test_loss) == 3 and len(plane.test_loss[0]) == 4
    coords = project_to_plane([a, b, c], a, b, c)
    torch.testing.assert_close(coords, torch.tensor(plane.point_coordinates, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    # the grid point (alpha, beta) = (0.5, 1.0): w_A + 0.5 u + v_perp, evaluated directly
    dx, dy = plane.x[2] / plane.alpha[2], plane.y[2] / plane.beta[2]
    u = {k: b[k] - a[k] for k in a}
    ratio = coords[2, 0].item() / dx
    v_perp = {k: c[k] - a[k] - ratio * u[k] for k in a}
    point = {k: a[k] + 0.5 * u[k] + 1.0 * v_perp[k] for k in a}
    torch.testing.assert_close(project_to_plane([point], a, b, c),
                               torch.tensor([[plane.x[1], plane.y[2]]], dtype=torch.float64), rtol=1e-5, atol=1e-5)
    buffers = reestimate_bn(model, point, bn_data)
    loss, acc = _evaluate(model, point, buffers, test_data, torch.device("cpu"), "test")
    assert plane.test_loss[1][2] == pytest.approx(loss, rel=1e-4) and plane.test_accuracy[1][2] == acc
    assert dy == pytest.approx(float(torch.cat([v.flatten() for v in v_perp.values()]).norm()), rel=1e-5)
    restored = PlaneEvaluation.from_dict(json.loads(json.dumps(plane.to_dict())))
    assert restored == plane


def test_projected_quadratic_bezier_is_the_planar_curve() -> None:
    curve = bent_bezier(torch.float64)
    a, theta, b = curve.points
    ts = [0.0, 0.3, 0.5, 1.0]
    xy = project_to_plane(curve, a, b, curve(0.5), t=ts)
    # the curve lies in the plane through A, B and w(0.5): its projection keeps every chord
    chords = (xy[1:] - xy[:-1]).norm(dim=1).cumsum(0)
    torch.testing.assert_close(chords, arc_length(curve, ts)[1:], rtol=1e-9, atol=1e-9)
    assert xy[2, 1] > 0 and xy[0].abs().max() < 1e-9


def test_plane_errors() -> None:
    model = net(0)
    a, b = params_of(net(0)), params_of(net(1))
    mid = {k: (a[k] + b[k]) / 2 for k in a}
    with pytest.raises(ValueError, match="`point_c` lies on the line through `point_a` and `point_b`"):
        evaluate_plane(model, a, b, mid, data(), data())
    with pytest.raises(ValueError, match="`point_a` and `point_b` coincide"):
        project_to_plane([a], a, a, b)
    with pytest.raises(ValueError, match=r"`grid` must be an int >= 2 or a pair of them, got 1"):
        evaluate_plane(model, a, b, params_of(net(2)), data(), data(), grid=1)
    with pytest.raises(ShapeMismatchError, match="`point_c` has no parameter `3.bias`"):
        evaluate_plane(model, a, b, {k: v for k, v in a.items() if k != "3.bias"}, data(), data())


# ---------------------------------------------------------------------------------------------------------------
# robust evaluation
def unit_box_data(n_batches: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(20, 5, generator=g), torch.randint(0, 3, (20,), generator=g)) for _ in range(n_batches)]


@pytest.mark.parametrize("bn_inputs", ["adversarial", "clean"])
def test_robust_evaluation_at_the_ends_equals_evaluating_the_end_points(bn_inputs) -> None:
    from neuralign.attacks import PGD
    from neuralign.curves import evaluate_model

    model = net(0)
    curve = bent_bezier()
    pgd = PGD(eps=0.1, alpha=0.04, steps=3)
    bn, test = unit_box_data(2, seed=1), unit_box_data(2, seed=2)
    ev = evaluate_curve(model, curve, bn, test, num_points=3, adversarial=pgd, bn_inputs=bn_inputs, generator=7)
    for index, point in ((0, curve.points[0]), (-1, curve.points[-1])):
        g = torch.Generator().manual_seed(7)
        attack = pgd if bn_inputs == "adversarial" else None
        buffers = reestimate_bn(model, point, bn, adversarial=attack, generator=g)
        clean = evaluate_model(model, test, params=point, buffers=buffers)
        robust = evaluate_model(model, test, params=point, buffers=buffers, adversarial=pgd, generator=g)
        assert (ev.test_loss[index], ev.test_accuracy[index]) == clean
        assert (ev.robust_test_loss[index], ev.robust_test_accuracy[index]) == robust
    assert ev.bn_inputs == bn_inputs and ev.adversarial == pgd.to_dict()
    assert all(r >= c for r, c in zip(ev.robust_test_loss, ev.test_loss))  # the attack raises every point's loss
    # the statistics were re-estimated on adversarial inputs: they differ from clean ones
    if bn_inputs == "adversarial":
        clean_bn = evaluate_curve(model, curve, bn, test, num_points=3, adversarial=pgd, bn_inputs="clean",
                                  generator=7)  # fmt: skip
        assert clean_bn.test_loss != ev.test_loss


def test_robust_summary_from_values() -> None:
    ev = CurveEvaluation.from_values(
        [0, 0.5, 1], [0.1, 0.5, 0.3], [0.9, 0.6, 0.8], [0, 1, 2],
        robust_test_loss=[1.0, 2.5, 1.2], robust_test_accuracy=[0.4, 0.2, 0.5], bn_inputs="adversarial",
    )  # fmt: skip
    assert ev.robust_loss_barrier == pytest.approx(2.5 - 1.1)
    assert ev.robust_avg_loss == pytest.approx((0.5 * 1.0 + 1.0 * 2.5 + 0.5 * 1.2) / 2)
    assert (ev.robust_min_accuracy, ev.robust_max_accuracy) == (0.2, 0.5)
    assert (ev.clean_accuracy_at_robust_min, ev.clean_accuracy_at_robust_max) == (0.6, 0.8)
    assert ev.robust_endpoint_accuracy == pytest.approx(0.45)
    assert CurveEvaluation.from_dict(json.loads(json.dumps(ev.to_dict()))) == ev
    with pytest.raises(ValueError, match="give both `robust_test_loss` and `robust_test_accuracy`"):
        CurveEvaluation.from_values([0, 1], [0, 0], [1, 1], [0, 1], robust_test_loss=[0, 0])
    with pytest.raises(ValueError, match="unknown bn_inputs 'mixed'"):
        evaluate_curve(net(0), bent_bezier(), unit_box_data(1), unit_box_data(1), num_points=2, bn_inputs="mixed")


def test_robust_evaluation_names_a_loader_the_model_cannot_take() -> None:
    from neuralign.attacks import PGD

    bad = [(torch.rand(8, 6), torch.randint(0, 3, (8,)))]
    with pytest.raises(ValueError, match=r"`bn_loader` yielded inputs of shape \(8, 6\).*expects 5 features"):
        evaluate_curve(net(0), bent_bezier(), bad, unit_box_data(1), num_points=2, adversarial=PGD())
    with pytest.raises(ValueError, match=r"`bn_loader` must lie|`x` must lie in \[0, 1\]"):
        evaluate_curve(net(0), bent_bezier(), data(1), unit_box_data(1), num_points=2, adversarial=PGD())


def dropout_net(seed: int) -> nn.Module:
    # dropout before batch norm: its masks change the re-estimated statistics, and the attacks' gradients
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.3), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_seeded_robust_evaluation_of_a_dropout_net_repeats_and_matches_the_end_points() -> None:
    from neuralign.attacks import PGD
    from neuralign.curves import evaluate_model

    model = dropout_net(0)
    curve = Bezier([params_of(dropout_net(s)) for s in range(3)])
    pgd = PGD(eps=0.1, alpha=0.04, steps=3)
    bn, test = unit_box_data(2, seed=1), unit_box_data(2, seed=2)
    torch.manual_seed(11)
    ev = evaluate_curve(model, curve, bn, test, num_points=3, adversarial=pgd, generator=7)
    torch.manual_seed(11)
    torch.rand(1)  # another global state: the seeded evaluation must not depend on it
    again = evaluate_curve(model, curve, bn, test, num_points=3, adversarial=pgd, generator=7)
    assert again.robust_test_loss == ev.robust_test_loss and again.test_loss == ev.test_loss
    before = torch.get_rng_state()
    for index, point in ((0, curve.points[0]), (-1, curve.points[-1])):
        g = torch.Generator().manual_seed(7)
        buffers = reestimate_bn(model, point, bn, adversarial=pgd, generator=g)
        clean = evaluate_model(model, test, params=point, buffers=buffers)
        robust = evaluate_model(model, test, params=point, buffers=buffers, adversarial=pgd, generator=g)
        assert (ev.test_loss[index], ev.test_accuracy[index]) == clean
        assert (ev.robust_test_loss[index], ev.robust_test_accuracy[index]) == robust
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG was left alone

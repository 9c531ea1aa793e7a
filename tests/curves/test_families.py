"""Curve families: exact end points, the coefficient formulas, linear initialisation, files and errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuralign._utils import load_checkpoint
from neuralign.curves import CURVE_FAMILIES, Bezier, Curve, Line, PolyChain
from neuralign.errors import CheckpointError, ShapeMismatchError

TOL = {"rtol": 1e-5, "atol": 1e-6}  # float32 sums of a few terms of size <= 10


def point(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g, dtype=dtype),
        "conv.bias": torch.randn(4, generator=g, dtype=dtype),
        "bn.weight": torch.rand(4, generator=g, dtype=dtype) + 0.5,
        "fc.weight": torch.randn(2, 4, generator=g, dtype=dtype),
    }


def random_curve(cls: type[Curve], n: int, seed: int = 0) -> Curve:
    return cls([point(seed + j) for j in range(n)])


def combination(points: list[dict[str, torch.Tensor]], coeffs: list[float]) -> dict[str, torch.Tensor]:
    return {k: sum(c * p[k].double() for c, p in zip(coeffs, points)).float() for k in points[0]}


@pytest.mark.parametrize(
    "curve",
    [
        Line.between(point(0), point(1)),
        Bezier.between(point(0), point(1)),
        random_curve(Bezier, 5),
        PolyChain.between(point(0), point(1), bends=3),
        random_curve(PolyChain, 4),
    ],
    ids=["line", "bezier2", "bezier4", "chain3", "chain-random"],
)
def test_every_curve_passes_exactly_through_its_end_points(curve: Curve) -> None:
    first, last = curve.points[0], curve.points[-1]
    for t, expected in ((0.0, first), (1.0, last)):
        w = curve(t)
        assert list(w) == list(expected)
        for k in w:
            assert torch.equal(w[k], expected[k]), (t, k)


def test_end_points_equal_the_inputs_and_inputs_are_copied() -> None:
    a, b = point(0), point(1)
    a_before = {k: v.clone() for k, v in a.items()}
    curve = Bezier.between(a, b)
    for k in a:
        assert torch.equal(curve(0.0)[k], a[k]) and torch.equal(curve(1.0)[k], b[k])
    a["fc.weight"].add_(1.0)  # mutating the input afterwards does not move the curve
    assert torch.equal(curve(0.0)["fc.weight"], a_before["fc.weight"])


@given(t=st.floats(0.0, 1.0))
@settings(max_examples=40, deadline=None)
def test_line_equals_linear_interpolation(t: float) -> None:
    a, b = point(0), point(1)
    w = Line.between(a, b)(t)
    for k in a:
        torch.testing.assert_close(w[k], (1 - t) * a[k] + t * b[k], **TOL)


@given(degree=st.integers(1, 6), t=st.floats(0.0, 1.0), seed=st.integers(0, 100))
@settings(max_examples=60, deadline=None)
def test_bezier_matches_bernstein_formula(degree: int, t: float, seed: int) -> None:
    points = [point(seed + j) for j in range(degree + 1)]
    curve = Bezier(points)
    assert curve.degree == degree
    bernstein = [math.comb(degree, j) * t**j * (1 - t) ** (degree - j) for j in range(degree + 1)]
    torch.testing.assert_close(curve.coefficients(t), torch.tensor(bernstein, dtype=torch.float64))
    expected = combination(points, bernstein)
    w = curve(t)
    for k in expected:
        torch.testing.assert_close(w[k], expected[k], **TOL)


def test_quadratic_bezier_is_the_papers_formula() -> None:
    a, theta, b = point(0), point(1), point(2)
    curve = Bezier([a, theta, b])
    t = 0.3
    w = curve(t)
    for k in a:
        torch.testing.assert_close(w[k], (1 - t) ** 2 * a[k] + 2 * t * (1 - t) * theta[k] + t**2 * b[k], **TOL)


@given(bends=st.integers(0, 5), t=st.floats(0.0, 1.0))
@settings(max_examples=60, deadline=None)
def test_polychain_matches_piecewise_formula(bends: int, t: float) -> None:
    points = [point(10 + j) for j in range(bends + 2)]
    curve = PolyChain(points)
    n = bends + 2
    segment = min(int(t * (n - 1)), n - 2)  # the segment [i, i+1] / (n - 1) containing t
    local = t * (n - 1) - segment
    expected_coeffs = [0.0] * n
    expected_coeffs[segment] += 1 - local
    expected_coeffs[segment + 1] += local
    torch.testing.assert_close(curve.coefficients(t), torch.tensor(expected_coeffs, dtype=torch.float64))
    w = curve(t)
    expected = combination(points, expected_coeffs)
    for k in expected:
        torch.testing.assert_close(w[k], expected[k], **TOL)


def test_one_bend_polychain_is_garipovs_formula() -> None:
    a, theta, b = point(0), point(1), point(2)
    curve = PolyChain([a, theta, b])
    for t in (0.1, 0.5, 0.8):
        expected = (
            {k: 2 * (t * theta[k] + (0.5 - t) * a[k]) for k in a}
            if t <= 0.5
            else {k: 2 * ((t - 0.5) * b[k] + (1 - t) * theta[k]) for k in a}
        )
        w = curve(t)
        for k in a:
            torch.testing.assert_close(w[k], expected[k], **TOL)


@pytest.mark.parametrize(
    "make",
    [
        lambda a, b: Bezier.between(a, b),
        lambda a, b: Bezier.between(a, b, degree=5),
        lambda a, b: PolyChain.between(a, b),
        lambda a, b: PolyChain.between(a, b, bends=4),
    ],
    ids=["bezier2", "bezier5", "chain1", "chain4"],
)
def test_linear_init_is_exactly_the_line(make) -> None:
    a, b = point(0), point(1)
    curve, line = make(a, b), Line.between(a, b)
    for t in torch.linspace(0, 1, 11).tolist():
        w, v = curve(t), line(t)
        for k in a:
            torch.testing.assert_close(w[k], v[k], **TOL)


def test_trainable_defaults_and_free_ends() -> None:
    a, b = point(0), point(1)
    assert Line.between(a, b).trainable == (False, False)
    assert Bezier.between(a, b).trainable == (False, True, False)
    assert Bezier.between(a, b, degree=3, free_ends=True).trainable == (True, True, True, True)
    assert PolyChain.between(a, b, bends=2).trainable == (False, True, True, False)
    assert PolyChain.between(a, b, bends=0).trainable == (False, False)


@given(t=st.floats(0.0, 1.0), n=st.integers(2, 7))
@settings(max_examples=30, deadline=None)
def test_coefficients_sum_to_one(t: float, n: int) -> None:
    for cls in (Bezier, PolyChain):
        curve = cls._from_flat(torch.zeros(n, 1), ["w"], [torch.Size([1])])
        assert abs(float(curve.coefficients(t).sum()) - 1.0) < 1e-12


def test_state_dict_round_trip_and_file(tmp_path) -> None:
    curve = Bezier([point(0), point(1), point(2), point(3)], trainable=[False, True, False, True])
    path = tmp_path / "curve.pt"
    curve.save(path)
    state = load_checkpoint(path, kind="curve")
    assert state["family"] == "bezier" and state["num_points"] == 4 and state["degree"] == 3
    for restored in (Curve.from_state_dict(state), Curve.load(path), Bezier.load(path)):
        assert type(restored) is Bezier and restored.trainable == curve.trainable
        assert restored.names == curve.names and restored.shapes == curve.shapes
        for k in curve.names:
            assert torch.equal(restored(0.37)[k], curve(0.37)[k])
    assert set(CURVE_FAMILIES) == {"line", "bezier", "polychain"}


def test_state_dict_errors(tmp_path) -> None:
    state = PolyChain.between(point(0), point(1)).state_dict()
    with pytest.raises(CheckpointError, match="holds a PolyChain, not a Bezier"):
        Bezier.from_state_dict(state)
    with pytest.raises(CheckpointError, match="unknown curve family 'spline'"):
        Curve.from_state_dict({**state, "family": "spline"})
    with pytest.raises(CheckpointError, match=r"lacks the entries \['flat'\]"):
        Curve.from_state_dict({k: v for k, v in state.items() if k != "flat"})
    assert state["bends"] == 1
    with pytest.raises(CheckpointError, match="says bends=2 but holds 3 points"):
        Curve.from_state_dict({**state, "bends": 2})
    with pytest.raises(CheckpointError, match="names and shapes do not match"):
        Curve.from_state_dict({**state, "shapes": state["shapes"][:-1], "names": state["names"][:-1]})


def test_to_changes_device_or_dtype() -> None:
    curve = Bezier.between(point(0), point(1))
    assert curve.to("cpu") is curve
    double = curve.to(dtype=torch.float64)
    assert double.dtype == torch.float64 and double(0.5)["fc.weight"].dtype == torch.float64
    assert curve.dtype == torch.float32


@pytest.mark.parametrize("t", [-0.1, 1.0000001, float("nan"), float("inf")])
def test_t_outside_unit_interval_is_rejected(t: float) -> None:
    curve = Bezier.between(point(0), point(1))
    with pytest.raises(ValueError, match=r"`t` must lie in \[0, 1\]"):
        curve(t)
    with pytest.raises(ValueError, match=r"`t` must lie in \[0, 1\]"):
        curve.coefficients(t)


def test_t_of_wrong_kind_is_rejected() -> None:
    curve = Line.between(point(0), point(1))
    with pytest.raises(TypeError, match="`t` must be a real number, got str"):
        curve("0.5")
    with pytest.raises(TypeError, match=r"got a tensor of shape \(2,\)"):
        curve(torch.tensor([0.1, 0.2]))
    torch.testing.assert_close(curve(torch.tensor(0.5))["fc.weight"], curve(0.5)["fc.weight"])


def test_shape_mismatch_names_the_parameter() -> None:
    a, b = point(0), point(1)
    b["fc.weight"] = torch.zeros(3, 4)
    with pytest.raises(ShapeMismatchError, match=r"`point_b` has parameter `fc.weight` of shape \(3, 4\) but "
                                                 r"`point_a` has \(2, 4\)"):
        Bezier.between(a, b)
    del b["fc.weight"]
    with pytest.raises(ShapeMismatchError, match="`point_b` has no parameter `fc.weight`"):
        Line.between(a, b)
    with pytest.raises(ShapeMismatchError, match=r"`points\[2\]` has parameter `conv.bias`"):
        Bezier([point(0), point(1), {**point(2), "conv.bias": torch.zeros(5)}])


def test_other_bad_inputs() -> None:
    a, b = point(0), point(1)
    with pytest.raises(ValueError, match="a Line has exactly 2 points, got 3"):
        Line([a, b, b])
    with pytest.raises(ValueError, match="at least 2 points"):
        Bezier([a])
    with pytest.raises(ValueError, match="`degree` must be an int >= 1, got 0"):
        Bezier.between(a, b, degree=0)
    with pytest.raises(ValueError, match="`bends` must be an int >= 0, got -1"):
        PolyChain.between(a, b, bends=-1)
    with pytest.raises(ValueError, match=r"unknown init 'random'; expected one of \['linear'\]"):
        Bezier.between(a, b, init="random")
    with pytest.raises(TypeError, match="share one dtype"):
        Bezier([a, point(1, torch.float64)])
    with pytest.raises(TypeError, match="must be floating point"):
        Line([{"w": torch.zeros(2, dtype=torch.long)}, {"w": torch.ones(2, dtype=torch.long)}])
    with pytest.raises(ValueError, match=r"`trainable` must hold one bool per point \(3\), got 2"):
        Bezier([a, a, b], trainable=[True, False])
    with pytest.raises(TypeError, match="must be a sequence of dicts"):
        Bezier(a)
    with pytest.raises(TypeError, match="Curve is the base class; build a Line, Bezier or PolyChain"):
        Curve([a, b])

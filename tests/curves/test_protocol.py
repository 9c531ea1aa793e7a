"""The interpolation protocol: barrier definitions against hand-computed values, the evaluation against a manual
one, and a planted permutation whose aligned interpolation has no barrier."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neuralign.alignment import align, apply_permutation, random_permutation, trace_spec
from neuralign.curves import (
    InterpolationProtocol,
    InterpolationResult,
    SplitSummary,
    area_under_curve,
    barrier,
    evaluate_interpolation,
    evaluate_model,
    reestimate_bn,
    repair,
    repair_statistics,
)


# ------------------------------------------------------------------------------------------ the definitions
def test_barriers_on_a_three_point_curve_by_hand() -> None:
    t = [0.0, 0.5, 1.0]
    loss = [0.2, 0.5, 1.0]  # rises monotonically: no bump over the line, but above the end points' average
    # average: max L - (L0 + L1) / 2 = 1.0 - 0.6; linear: max(0, 0.5 - 0.6, 0) = 0
    assert barrier(t, loss) == pytest.approx(0.4, abs=1e-15)
    assert barrier(t, loss, definition="linear") == 0.0
    bump = [0.2, 1.3, 0.4]  # average: 1.3 - 0.3 = 1.0; linear: 1.3 - (0.5 * 0.2 + 0.5 * 0.4) = 1.0
    assert barrier(t, bump) == pytest.approx(1.0, abs=1e-15)
    assert barrier(t, bump, definition="linear") == pytest.approx(1.0, abs=1e-15)
    acc = [0.9, 0.6, 0.5]  # drop, average: 0.7 - 0.5 = 0.2; linear: max(0, 0.7 - 0.6, 0) = 0.1
    assert barrier(t, acc, higher_is_better=True) == pytest.approx(0.2, abs=1e-15)
    assert barrier(t, acc, definition="linear", higher_is_better=True) == pytest.approx(0.1, abs=1e-15)
    # trapezoid: 0.25 * (0.2 + 0.5) + 0.25 * (0.5 + 1.0)
    assert area_under_curve(t, loss) == pytest.approx(0.55, abs=1e-15)
    s = SplitSummary.from_values(t, bump, acc)
    assert (s.midpoint_loss, s.midpoint_accuracy, s.endpoint_loss) == (1.3, 0.6, (0.2, 0.4))
    assert s.loss_barrier_average == pytest.approx(1.0) and s.accuracy_barrier_linear == pytest.approx(0.1)


def test_barrier_errors() -> None:
    with pytest.raises(ValueError, match="unknown definition 'max'"):
        barrier([0, 1], [0, 0], definition="max")
    with pytest.raises(ValueError, match="`t` must increase from 0 to 1"):
        barrier([0, 0.7, 0.5], [0, 0, 0])
    with pytest.raises(ValueError, match="one equal length >= 2"):
        area_under_curve([0, 1], [0.0])


def test_a_diverged_point_gives_no_finite_barrier() -> None:
    # max() skips NaN: an interior NaN loss gave a barrier of 1.0 (average) and 0.0 (linear), a new-user trial found
    nan = float("nan")
    for definition in ("average", "linear"):
        assert math.isnan(barrier([0, 0.5, 1], [1.0, nan, 3.0], definition=definition))
        assert math.isnan(barrier([0, 0.5, 1], [0.9, nan, 0.9], definition=definition, higher_is_better=True))
        assert barrier([0, 0.5, 1], [1.0, math.inf, 3.0], definition=definition) == math.inf


def test_protocol_options() -> None:
    p = InterpolationProtocol()
    assert p.num_points == 25 and p.bn == "reestimate" and len(p.t) == 25 and p.t[12] == 0.5
    assert InterpolationProtocol.from_dict(p.replace(bn="repair", num_points=11).to_dict()).num_points == 11
    with pytest.raises(ValueError, match="unknown bn 'reset'"):
        InterpolationProtocol(bn="reset")
    with pytest.raises(ValueError, match="`num_points` must be an int >= 2"):
        InterpolationProtocol(num_points=1)
    with pytest.raises(ValueError, match="unknown splits 'val'"):
        InterpolationProtocol(splits=("val",))


# ------------------------------------------------------------------------------------------ the evaluation
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def loaders(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]


def two_states():
    torch.manual_seed(0)
    a = Net()
    a.train()
    with torch.no_grad():
        a(torch.randn(32, 4))  # non-trivial running statistics
    torch.manual_seed(1)
    b = Net()
    with torch.no_grad():
        b(torch.randn(32, 4) * 2)
    return a, a.state_dict(), b.state_dict()


@pytest.mark.parametrize("bn", ["reestimate", "interpolate", "repair"])
def test_evaluation_equals_a_manual_one(bn: str) -> None:
    model, sa, sb = two_states()
    data, test = loaders(0), loaders(1)
    protocol = InterpolationProtocol(num_points=3, bn=bn, splits=("test", "train"))
    res = evaluate_interpolation(model, sa, sb, data, test, train_loader=data, protocol=protocol)
    assert res.t == (0.0, 0.5, 1.0) and res.protocol == protocol
    names = [k for k, _ in model.named_parameters()]
    if bn == "repair":
        stats_a, stats_b = repair_statistics(model, sa, data), repair_statistics(model, sb, data)
    for i, t in enumerate(res.t):
        params = {k: (1 - t) * sa[k] + t * sb[k] for k in names}
        if bn == "reestimate":
            buffers = reestimate_bn(model, params, data)
        elif bn == "interpolate":
            buffers = {k: torch.lerp(sa[k], sb[k], t) if sa[k].is_floating_point() else sa[k]
                       for k, _ in model.named_buffers()}  # fmt: skip
        else:
            state = repair(model, params, stats_a, stats_b, data, t=t)
            params = {k: state[k] for k in names}
            buffers = {k: v for k, v in state.items() if k not in params}
        for split, loader in (("test", test), ("train", data)):
            loss, acc = evaluate_model(model, loader, params=params, buffers=buffers)
            assert res.splits[split].loss[i] == pytest.approx(loss, rel=1e-12)
            assert res.splits[split].accuracy[i] == acc
    s = res.splits["test"]
    assert s.loss_barrier_average == pytest.approx(barrier(res.t, s.loss), abs=0)
    assert InterpolationResult.from_dict(res.to_dict()) == res


def test_interpolate_keeps_the_end_points() -> None:
    model, sa, sb = two_states()
    protocol = InterpolationProtocol(num_points=2, bn="interpolate", splits=("test",))
    res = evaluate_interpolation(model, sa, sb, loaders(0), loaders(1), protocol=protocol)
    model.eval()
    assert res.splits["test"].loss[0] == pytest.approx(evaluate_model(model, loaders(1))[0], rel=1e-12)


@pytest.mark.parametrize("bn", ["reestimate", "interpolate", "repair"])
def test_planted_permutation_has_no_barrier(bn: str) -> None:
    model, sa, _ = two_states()
    spec = trace_spec(model, torch.randn(2, 4))
    planted = random_permutation(spec, generator=5)
    sb = apply_permutation(sa, spec, planted)
    other = Net()
    other.load_state_dict(sb)
    model.eval()
    found = align(model, other, method="weight", spec=spec)
    aligned = apply_permutation(sb, spec, found.perms)
    res = evaluate_interpolation(model, sa, aligned, loaders(0), loaders(1), train_loader=loaders(0),
                                 protocol=InterpolationProtocol(num_points=5, bn=bn))  # fmt: skip
    for s in res.splits.values():
        for value in (s.loss_barrier_average, s.loss_barrier_linear, s.accuracy_barrier_average,
                      s.accuracy_barrier_linear):  # fmt: skip
            assert value <= 1e-6
        assert max(abs(v - s.loss[0]) for v in s.loss) <= 1e-6  # the aligned path is constant
    protocol = InterpolationProtocol(num_points=5, bn=bn, splits=("test",))
    unaligned = evaluate_interpolation(model, sa, sb, loaders(0), loaders(1), protocol=protocol)
    loss = unaligned.splits["test"].loss
    assert max(abs(v - loss[0]) for v in loss) > 1e-3  # the test can fail: unaligned, the path is not constant


def test_evaluation_errors() -> None:
    model, sa, sb = two_states()
    with pytest.raises(ValueError, match="holds 'train' but no `train_loader`"):
        evaluate_interpolation(model, sa, sb, loaders(), loaders())
    params_b = {k: v for k, v in sb.items() if k in dict(model.named_parameters())}
    with pytest.raises(ValueError, match="needs the buffer `bn.running_mean` in `state_b`"):
        evaluate_interpolation(model, sa, params_b, loaders(), loaders(),
                               protocol=InterpolationProtocol(bn="interpolate", splits=("test",)))  # fmt: skip
    with pytest.raises(TypeError, match="`protocol` must be an InterpolationProtocol"):
        evaluate_interpolation(model, sa, sb, loaders(), loaders(), protocol={"bn": "repair"})


def test_interpolate_takes_a_non_persistent_buffer_from_the_model() -> None:
    """A language model's constant buffer that no state dict carries (tinylm: RoPE's ``inv_freq``): ``bn="interpolate"``
    takes it from the model (it refused the model's own state dicts); the path from A to A is constant."""
    from neuralign.experiments.models import build_model

    torch.manual_seed(0)
    model = build_model("tinylm", num_classes=256)
    assert any(name not in model.state_dict() for name, _ in model.named_buffers())
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (32, 8), generator=gen)
    data = [(x[:16], x[16:]), (x[16:], x[:16])]
    res = evaluate_interpolation(model, model.state_dict(), model.state_dict(), data, data,
                                 protocol=InterpolationProtocol(num_points=3, bn="interpolate", splits=("test",)))
    loss = res.splits["test"].loss
    assert max(abs(v - loss[0]) for v in loss) <= 1e-6 and math.isfinite(loss[0])

"""Alignment that must not answer wrongly while saying it succeeded (issue #9, items 9-13).

Every case plants B = A permuted (or a function-preserving rescaling of it), so the right answer is known exactly.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuralign.alignment import (
    SpecBuilder,
    activation_moments,
    apply_permutation,
    invert_permutation,
    random_permutation,
    trace_spec,
)
from neuralign.alignment.align import align, weight_similarity
from neuralign.errors import NonFiniteError, SpecError
from neuralign.experiments.models import build_model
from neuralign.optim import solve_assignment
from tests.alignment.nets import calibrate_bn, randomize_bn

# the modules themselves (the package re-exports a function named `align`, which hides the module attribute)
align_module = importlib.import_module("neuralign.alignment.align")
stats_module = importlib.import_module("neuralign.alignment.stats")


def _inputs(n=256, features=16, seed=1):
    x = torch.randn(n, features, generator=torch.Generator().manual_seed(seed))
    return [x[: n // 2], x[n // 2 :]]


def _mlp(seed=0, hidden=(32, 24)):
    return build_model("mlp", 10, in_features=16, hidden=hidden, generator=seed).eval()


def _permuted(a, spec, seed=2):
    p = random_permutation(spec, generator=seed)
    b = copy.deepcopy(a)
    b.load_state_dict(apply_permutation(a.state_dict(), spec, p))
    return b, invert_permutation(p)


def _assert_exact(res, a, b, spec, inverse):
    for g in spec.groups:
        assert torch.equal(res.perms[g], inverse[g]), g
    aligned = apply_permutation(b.state_dict(), spec, res.perms)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(aligned[k], v, rtol=0, atol=0)


def _constant_units(model, node_fn, loader) -> int:
    """Units of one layer that take a single value on all of ``loader`` (computed directly, not by the library)."""
    with torch.no_grad():
        h = torch.cat([node_fn(model, x) for x in loader])
    return int((h.amax(0) == h.amin(0)).sum())


# --- item 9: overflow -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["correlation", "l2"])
def test_activations_near_float32_overflow_keep_the_planted_answer(method):
    """B computes A's function with its first layer scaled by 1e20 and the next by 1e-20 (ReLU commutes with a
    positive scale): activations of about 1e19-1e20, whose squares overflow float32. Before the fix the sums
    overflowed, every correlation of the layer became 0, and the identity came back with status 0."""
    a = _mlp()
    loader = _inputs()
    spec = trace_spec(a, loader[0])
    b, inverse = _permuted(a, spec)
    with torch.no_grad():
        b.hidden[0].fc.weight.mul_(1e20)
        b.hidden[0].fc.bias.mul_(1e20)
        b.hidden[1].fc.weight.mul_(1e-20)
        big = b.hidden[0].fc(loader[0]).abs().max()
        assert 1e19 < big < 1e22 and torch.isinf(big.square())  # the premise: squares overflow float32
    res = align(a, b, loader, method=method)
    for g in spec.groups:
        assert torch.equal(res.perms[g], inverse[g]), g
    assert res.status == 0
    if method == "correlation":
        # matched units are exact multiples of each other: correlation 1 up to the 1e-5 added to A's deviations
        for g in spec.groups:
            assert res.correlation_after[g] == pytest.approx(1.0, abs=1e-3), g


def test_moments_are_scale_invariant_where_they_should_be():
    a = _mlp()
    loader = _inputs()
    spec = trace_spec(a, loader[0])
    b, _ = _permuted(a, spec)
    scaled = copy.deepcopy(b)
    with torch.no_grad():
        scaled.hidden[0].fc.weight.mul_(1e20)
        scaled.hidden[0].fc.bias.mul_(1e20)
        scaled.hidden[1].fc.weight.mul_(1e-20)
    _, plain = activation_moments(a, b, loader, spec, kind="pre")
    _, big = activation_moments(a, scaled, loader, spec, kind="pre")
    (m, mb) = plain["hidden.0.fc"][0], big["hidden.0.fc"][0]
    # pre-activations of B are multiplied by 1e20 exactly in real arithmetic; float32 rounds the products (2^-24)
    torch.testing.assert_close(mb.var_b, m.var_b * 1e40, rtol=1e-5, atol=0)
    torch.testing.assert_close(mb.cross, m.cross * 1e20, rtol=1e-5, atol=1e-5 * float(m.cross.abs().max()) * 1e20)
    # the correlations differ only through the 1e-5 added to B's deviations (relative 1e-5 / sigma_b)
    sigma = float(m.var_b.sqrt().min())
    torch.testing.assert_close(mb.correlation(), m.correlation(), rtol=0, atol=3e-5 / sigma)
    assert torch.isfinite(mb.cross).all()


def test_activations_that_overflow_to_inf_raise_naming_the_layer():
    a = _mlp()
    loader = _inputs()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.hidden[0].fc.weight.mul_(1e30)
        b.hidden[1].fc.weight.mul_(1e30)  # second layer's activations ~1e60: inf in float32
    with pytest.raises(NonFiniteError, match="activations of layer `hidden_1_relu` in `model_b` contain NaN or inf"):
        align(a, b, loader)


# --- item 10: dead units ----------------------------------------------------------------------------------------


def test_dead_relu_units_are_matched_by_their_weights():
    """Ten hidden units never fire (bias -100). Before the fix they were assigned arbitrarily among themselves
    (24 of 32 units of the group recovered) and nothing said so."""
    a = _mlp()
    with torch.no_grad():
        a.hidden[0].fc.bias[:10] = -100.0
    loader = _inputs()
    spec = trace_spec(a, loader[0])
    b, inverse = _permuted(a, spec)
    res = align(a, b, loader)
    _assert_exact(res, a, b, spec, inverse)
    expected = _constant_units(a, lambda m, x: F.relu(m.hidden[0].fc(x)), loader)
    assert expected >= 10
    assert res.dead_units["hidden.0.fc"] == (expected, expected)
    # live pairs are matched by the data: correlation 1 up to the epsilon on the deviations
    assert res.correlation_after["hidden.0.fc"] == pytest.approx(1.0, abs=1e-3)
    assert res.status == 0 and "dead unit" in res.message


def test_constant_pre_activations_are_matched_by_their_weights_with_l2():
    a = _mlp()
    with torch.no_grad():
        a.hidden[1].fc.weight[:6] = 0.0  # pre-activation = bias: constant, told apart only by the bias
    loader = _inputs()
    spec = trace_spec(a, loader[0])
    b, inverse = _permuted(a, spec)
    res = align(a, b, loader, method="l2")
    _assert_exact(res, a, b, spec, inverse)
    assert res.dead_units["hidden.1.fc"] == (6, 6)
    assert res.dead_units["hidden.0.fc"] == (0, 0)


def test_dead_channels_in_a_conv_net_are_matched_by_their_weights():
    shape = (8, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    loader = [(torch.randn(*shape, generator=gen), torch.zeros(8)) for _ in range(2)]
    a = calibrate_bn(randomize_bn(build_model("tinyten", 10, generator=0)), loader)
    with torch.no_grad():
        bn = a.features[2].bn
        bn.bias[:5] = -1e3  # five channels of the third layer never pass the ReLU
    spec = trace_spec(a, loader[0][0])
    b, inverse = _permuted(a, spec)
    for method in ("correlation", "l2"):
        res = align(a, b, loader, method=method, activations="post")
        _assert_exact(res, a, b, spec, inverse)
        assert res.dead_units["features.2.conv"] == (5, 5)


def test_dead_unit_matching_keeps_the_data_objective_optimal():
    """On two unrelated networks with different dead units, reassigning pairs with a dead unit never changes
    the data objective: it stays the assignment optimum of ``similarity`` (dead rows/columns are 0)."""
    a, b = _mlp(seed=0), _mlp(seed=1)
    with torch.no_grad():
        a.hidden[0].fc.bias[:7] = -100.0
        b.hidden[0].fc.bias[3:6] = -100.0
    res = align(a, b, _inputs())
    assert res.dead_units["hidden.0.fc"][0] >= 7 and res.dead_units["hidden.0.fc"][1] >= 3
    for g, S in res.similarity.items():
        best = solve_assignment(S, maximize=True).fun
        assert res.objective_after[g] == pytest.approx(best, rel=1e-12, abs=1e-12), g


# --- item 11: dtypes and devices --------------------------------------------------------------------------------


def test_models_of_different_dtype_or_device_are_named():
    a = _mlp()
    loader = _inputs()
    spec = trace_spec(a, loader[0])
    b, inverse = _permuted(a, spec)
    with pytest.raises(TypeError, match=r"`model_a` has dtype torch.float64 \(`hidden.0.fc.weight`\) but `model_b` "):
        align(copy.deepcopy(a).double(), b, loader)
    with pytest.raises(ValueError, match=r"`model_a` is on device cpu .* but `model_b` is on meta"):
        align(a, copy.deepcopy(b).to("meta"), loader)
    # float64 models with a float32 loader: the inputs are cast to the models' dtype
    res = align(copy.deepcopy(a).double(), copy.deepcopy(b).double(), loader)
    for g in spec.groups:
        assert torch.equal(res.perms[g], inverse[g]), g
    # weight matching alone computes in float64 and accepts mixed dtypes
    res = align(copy.deepcopy(a).double(), b, method="weight", spec=spec, generator=0)
    for g in spec.groups:
        assert torch.equal(res.perms[g], inverse[g]), g


# --- item 12: a given spec is used as given ---------------------------------------------------------------------


class _SlicedHead(nn.Module):
    """A slice of a permuted axis (which a tracer may refuse); the hand-built spec permutes only ``fc1``'s units."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 8)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.fc2(F.relu(self.fc1(x)))[:, :4])


def _sliced_spec():
    return (
        SpecBuilder()
        .group("h", 16)
        .add("fc1.weight", 0, "h")
        .add("fc1.bias", 0, "h")
        .add("fc2.weight", 1, "h")
        .tap("h", "relu", axis=1, kind="post")
        .tap("h", "fc1", axis=1, kind="pre")
        .build()
    )


@pytest.mark.parametrize("method", ["correlation", "l2", "weight"])
def test_a_given_spec_is_used_without_retracing(method, monkeypatch):
    """Before the fix, ``activation_moments`` re-traced the model even with a spec, and raised on the node the
    spec was written to avoid. Here the spec rules refuse the model outright: a given spec must not need them."""

    def refuse(*args, **kwargs):
        raise SpecError("the tracer refuses this model (simulated)")

    monkeypatch.setattr(stats_module, "_trace_graph", refuse)
    monkeypatch.setattr(align_module, "trace_spec", refuse)
    torch.manual_seed(0)
    a = _SlicedHead().eval()
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(3))
    spec = _sliced_spec()
    b, inverse = _permuted(a, spec)
    res = align(a, b, [x] if method != "weight" else None, method=method, spec=spec, generator=0)
    _assert_exact(res, a, b, spec, inverse)
    assert res.spec is spec
    with pytest.raises(SpecError, match="simulated"):  # without a spec the tracer is needed, and refuses
        align(a, b, [x], method=method)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc2(h) if h.sum() > 0 else self.fc2(-h)


def test_a_given_spec_for_a_model_fx_cannot_trace_is_a_spec_error():
    spec = SpecBuilder().group("h", 16).add("fc1.weight", 0, "h").tap("h", "relu").build()
    with pytest.raises(SpecError, match="torch.fx could not trace _Untraceable"):
        align(_Untraceable(), _Untraceable(), [torch.randn(4, 6)], spec=spec)


# --- groups without a tap are matched by weights ----------------------------------------------------------------


class _TwoHidden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _two_hidden_spec(tap_second: bool):
    builder = (
        SpecBuilder()
        .group("h1", 16)
        .group("h2", 12)
        .add("fc1.weight", 0, "h1")
        .add("fc1.bias", 0, "h1")
        .add("fc2.weight", 1, "h1")
        .add("fc2.weight", 0, "h2")
        .add("fc2.bias", 0, "h2")
        .add("out.weight", 1, "h2")
        .tap("h1", "relu", axis=1)
    )
    return (builder.tap("h2", "relu_1", axis=1) if tap_second else builder).build()


def test_a_group_without_a_tap_is_matched_by_weights_and_reported():
    """Units that exist only in train-mode branches have no tap in the eval graph: matched by weights, named."""
    torch.manual_seed(0)
    a = _TwoHidden().eval()
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(4))
    spec = _two_hidden_spec(tap_second=False)
    b, inverse = _permuted(a, spec)
    with pytest.warns(UserWarning, match=r"groups \['h2'\] have no activation tap"):
        res = align(a, b, [x], spec=spec)
    _assert_exact(res, a, b, spec, inverse)
    assert res.dead_units["h2"] == (12, 12)
    assert res.correlation_after["h1"] == pytest.approx(1.0, abs=1e-3)
    assert res.correlation_after["h2"] != res.correlation_after["h2"]  # NaN: nothing was measured
    tapless = SpecBuilder().group("h1", 16).add("fc1.weight", 0, "h1").add("fc2.weight", 1, "h1").build()
    with pytest.raises(SpecError, match="the spec has no 'post' or 'out' activation tap for any group"):
        align(a, b, [x], spec=tapless)


# --- item 13: data that cannot decide, budgets ------------------------------------------------------------------


@pytest.mark.parametrize(
    "loader",
    [[torch.ones(64, 16)], _inputs(n=2)[:1]],
    ids=["constant-inputs", "one-example"],
)
def test_data_that_cannot_decide_warns_and_falls_back_to_weights(loader):
    """Before the fix: identity, every correlation 0, no warning."""
    a = _mlp()
    spec = trace_spec(a, _inputs()[0])
    b, inverse = _permuted(a, spec)
    with pytest.warns(
        UserWarning, match=r"the data cannot decide an alignment: every unit of groups \['hidden.0.fc', "
    ):
        res = align(a, b, loader)
    _assert_exact(res, a, b, spec, inverse)
    assert res.dead_units == {"hidden.0.fc": (32, 32), "hidden.1.fc": (24, 24)}


def test_live_data_does_not_warn():
    a = _mlp()
    loader = _inputs()
    b, _ = _permuted(a, trace_spec(a, loader[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        align(a, b, loader)


def test_budgets_are_validated_at_the_boundary():
    a, b = _mlp(), _mlp(seed=1)
    loader = _inputs()
    with pytest.raises(ValueError, match=r"^`max_batches` must be at least 1, got 0$"):
        align(a, b, loader, max_batches=0)
    with pytest.raises(TypeError, match=r"^`max_batches` must be an int or None, got float$"):
        align(a, b, loader, max_batches=1.5)
    with pytest.raises(ValueError, match=r"^`max_batches` must be at least 1, got -1$"):
        activation_moments(a, b, loader, max_batches=-1)
    with pytest.raises(ValueError, match=r"^`max_iter` must be at least 1, got 0$"):
        align(a, b, loader, method="weight", max_iter=0)
    with pytest.raises(ValueError, match=r"^`restarts` must be at least 1, got 0$"):
        align(a, b, loader, method="weight", restarts=0)
    with pytest.raises(TypeError, match=r"^`restarts` must be an int, got bool$"):
        align(a, b, loader, method="weight", restarts=True)
    with pytest.raises(TypeError, match=r"^`spec` must be a PermutationSpec or None, got dict$"):
        align(a, b, loader, spec={})
    res = align(a, b, loader, max_batches=1)
    assert res.status == 0


# --- item 8: restarts are reported ------------------------------------------------------------------------------


def test_weight_matching_reports_every_restart():
    a = build_model("tinyten", 10, generator=0)
    b = build_model("tinyten", 10, generator=1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    res = align(a, b, method="weight", example_input=x, restarts=5, generator=7, tol=0.0)
    assert res.restarts == 5 and len(res.restart_objectives) == 5
    assert 1 <= res.restarts_agreed <= 5
    # the returned permutation is the best run, and its objective is sum <W_A, P(W_B)> over the permuted parameters
    params = {k for k, _ in a.named_parameters()}
    aligned = apply_permutation(b.state_dict(), res.spec, res.perms)
    value = sum(float((a.state_dict()[k].double() * aligned[k].double()).sum()) for k in res.spec.axes if k in params)
    assert value == pytest.approx(max(res.restart_objectives), rel=1e-12)
    assert f"reached by {res.restarts_agreed} of 5" in res.message
    # every group is a coordinate-wise optimum (each assignment optimal given the others)
    for g in res.spec.groups:
        S = weight_similarity(a.state_dict(), b.state_dict(), res.spec, res.perms, g, keys=params)
        chosen = float(S[torch.arange(S.shape[0]), res.perms[g]].sum())
        assert chosen == pytest.approx(solve_assignment(S, maximize=True).fun, rel=1e-12, abs=1e-12), g
    again = align(a, b, method="weight", example_input=x, restarts=5, generator=7, tol=0.0)
    assert again.restart_objectives == res.restart_objectives


class _AuxHead(nn.Module):
    """An auxiliary head that runs only in train mode (as in GoogLeNet): its units do not affect eval outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.out = nn.Linear(16, 3)
        self.aux1 = nn.Linear(16, 10)
        self.aux2 = nn.Linear(10, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        if self.training:
            return self.out(h), self.aux2(F.relu(self.aux1(h)))
        return self.out(h)


def test_taps_on_train_only_nodes_are_dropped_and_unknown_nodes_are_named():
    torch.manual_seed(0)
    a = _AuxHead().eval()
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(5))
    builder = SpecBuilder().group("h", 16).group("aux", 10)
    for key, axis, group in [("fc1.weight", 0, "h"), ("fc1.bias", 0, "h"), ("out.weight", 1, "h")]:
        builder.add(key, axis, group)
    for key, axis, group in [("aux1.weight", 1, "h"), ("aux1.weight", 0, "aux"), ("aux1.bias", 0, "aux")]:
        builder.add(key, axis, group)
    spec = builder.add("aux2.weight", 1, "aux").tap("h", "relu").tap("aux", "relu_1").build()
    b, inverse = _permuted(a, spec)
    with pytest.warns(UserWarning, match=r"groups \['aux'\] have no activation tap in eval mode"):
        res = align(a, b, [x], spec=spec)
    _assert_exact(res, a, b, spec, inverse)
    assert res.dead_units["aux"] == (10, 10)
    typo = SpecBuilder().group("h", 16).add("fc1.weight", 0, "h").tap("h", "rleu").build()
    with pytest.raises(SpecError, match=r"the spec's taps name fx nodes \['rleu'\] that the model does not have"):
        align(a, b, [x], spec=typo)

"""Tests of the zoo as a whole (``neuralign.experiments.models``): the registry, argument validation, output
shapes, fx tracing and one ReLU module per call site, seeding. Family-specific tests (counts, geometry,
initialisation) sit beside this file, one per family.

Everything runs on the CPU with batches of 2; the wide models are narrowed with ``width`` where the test does
not depend on the exact width.
"""

from __future__ import annotations

import importlib
from collections import Counter

import pytest
import torch
from torch import nn
from torch.fx import symbolic_trace

import neuralign.experiments.models as zoo_package
from neuralign.experiments.models import (
    MLP,
    VGG,
    GoogLeNet,
    ResNet,
    TinyTen,
    available_models,
    build_model,
)

NAMES = ["tinyten", "resnet20", "resnet32", "vgg11", "vgg16", "googlenet", "mlp"]

# Cheap keyword arguments per model for tests that do not depend on the width.
FAST_KWARGS: dict[str, dict] = {
    "tinyten": {},
    "resnet20": {},
    "resnet32": {"width": 0.5},
    "vgg11": {"width": 0.25},
    "vgg16": {"width": 0.25},
    "googlenet": {},
    "mlp": {"in_features": 3 * 32 * 32, "hidden": (32, 16), "batch_norm": True, "dropout": 0.1},
}


def fast_model(name: str, num_classes: int = 10, **overrides) -> nn.Module:
    kwargs = {**FAST_KWARGS[name], **overrides}
    return build_model(name, num_classes, generator=0, **kwargs)


# ----------------------------------------------------------------------------------------------------
# the package
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["layers", "tinyten", "resnet", "vgg", "googlenet", "mlp", "zoo"])
def test_the_package_reexports_every_public_name_of_its_modules(module):
    mod = importlib.import_module(f"neuralign.experiments.models.{module}")
    assert mod.__doc__ and mod.__all__
    for name in mod.__all__:
        assert getattr(zoo_package, name) is getattr(mod, name)
        assert name in zoo_package.__all__


# ----------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------
def test_available_models_lists_every_name_in_order():
    assert available_models() == NAMES + ["vit", "tinylm"]  # the transformers: see test_transformers.py


@pytest.mark.parametrize("spelling", ["TinyTen", "TINYTEN", "tinyten"])
def test_build_model_is_case_insensitive(spelling):
    assert isinstance(build_model(spelling, 10), TinyTen)


def test_build_model_returns_the_advertised_classes():
    assert isinstance(build_model("resnet20", 10), ResNet) and build_model("resnet20", 10).depth == 20
    assert build_model("resnet32", 10).depth == 32
    assert build_model("vgg11", 10, width=0.25).config == "A"
    assert build_model("vgg16", 10, width=0.25).config == "D"
    assert isinstance(build_model("googlenet", 10, aux_logits=False), GoogLeNet)
    assert isinstance(build_model("mlp", 10, in_features=64, hidden=(8,)), MLP)


def test_unknown_model_name_is_a_value_error_listing_the_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet99'; expected one of \['tinyten', 'resnet20'"):
        build_model("resnet99", 10)


def test_name_must_be_a_string():
    with pytest.raises(TypeError, match=r"`name` must be a str, got int 3"):
        build_model(3, 10)


@pytest.mark.parametrize(
    ("name", "kwargs", "bad"),
    [
        ("tinyten", {"width": 2}, "width"),
        ("googlenet", {"width": 2}, "width"),
        ("resnet20", {"batch_norm": False}, "batch_norm"),
        ("mlp", {"in_features": 64, "in_channels": 1}, "in_channels"),
        ("vgg11", {"aux_logits": True}, "aux_logits"),
    ],
)
def test_unexpected_keyword_is_a_type_error_naming_model_and_argument(name, kwargs, bad):
    with pytest.raises(TypeError, match=rf"model '{name}' got an unexpected keyword argument '{bad}'; it accepts"):
        build_model(name, 10, **kwargs)


def test_mlp_requires_in_features():
    with pytest.raises(TypeError, match=r"model 'mlp' is missing the required keyword argument 'in_features'"):
        build_model("mlp", 10)


BAD_ARGUMENTS = [
    # (name, num_classes, kwargs, exception, message pattern)
    ("tinyten", 0, {}, ValueError, r"`num_classes` must be a positive int, got 0"),
    ("tinyten", 10.0, {}, TypeError, r"`num_classes` must be a positive int, got float 10.0"),
    ("tinyten", True, {}, TypeError, r"`num_classes` must be a positive int, got bool True"),
    ("tinyten", 10, {"in_channels": 0}, ValueError, r"`in_channels` must be a positive int, got 0"),
    ("resnet20", 10, {"width": 0}, ValueError, r"`width` must be a finite number > 0, got 0"),
    ("vgg11", 10, {"width": -1.5}, ValueError, r"`width` must be a finite number > 0, got -1.5"),
    ("vgg11", 10, {"width": float("inf")}, ValueError, r"`width` must be a finite number > 0, got inf"),
    ("resnet20", 10, {"width": "2"}, TypeError, r"`width` must be a finite number > 0, got str '2'"),
    ("resnet20", 10, {"width": True}, TypeError, r"`width` must be a finite number > 0, got bool True"),
    ("vgg11", 10, {"batch_norm": 1}, TypeError, r"`batch_norm` must be a bool \(True or False\), got int 1"),
    ("googlenet", 10, {"aux_logits": "yes"}, TypeError, r"`aux_logits` must be a bool \(True or False\), got str"),
    (
        "mlp", 10, {"in_features": 64, "dropout": 1.0}, ValueError,
        r"`dropout` must be a finite number in \[0, 1\), got 1.0",
    ),
    (
        "mlp", 10, {"in_features": 64, "dropout": -0.1}, ValueError,
        r"`dropout` must be a finite number in \[0, 1\), got -0.1",
    ),
    ("mlp", 10, {"in_features": 64, "hidden": "12"}, TypeError, r"`hidden` must be a sequence of positive ints"),
    ("mlp", 10, {"in_features": 64, "hidden": (8, 0)}, ValueError, r"`hidden\[1\]` must be a positive int"),
    ("tinyten", 10, {"generator": "1"}, TypeError, r"`generator` must be an int or None, got str '1'"),
    ("tinyten", 10, {"generator": -1}, ValueError, r"`generator` must be a seed in \[0, 2\*\*64\), got -1"),
]


@pytest.mark.parametrize(("name", "num_classes", "kwargs", "exc", "pattern"), BAD_ARGUMENTS)
def test_bad_values_and_types_are_rejected_with_named_arguments(name, num_classes, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        build_model(name, num_classes, **kwargs)


def test_resnet_depth_and_vgg_config_are_validated():
    with pytest.raises(ValueError, match=r"`depth` must be 6n \+ 2 with n >= 1 \(20, 32, 44, \.\.\.\), got 21"):
        ResNet(21)
    with pytest.raises(ValueError, match=r"`depth` must be 6n \+ 2 with n >= 1 \(20, 32, 44, \.\.\.\), got 2"):
        ResNet(2)
    with pytest.raises(ValueError, match=r"unknown VGG config 'Z'; expected one of \['A', 'D'\]"):
        VGG("Z")


# ----------------------------------------------------------------------------------------------------
# output shapes
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 28)], ids=["cifar", "mnist"])
def test_output_shapes_in_train_and_eval_mode(name, channels, size):
    kwargs = {"in_features": channels * size * size} if name == "mlp" else {"in_channels": channels}
    model = fast_model(name, num_classes=7, **kwargs)
    x = torch.randn(2, channels, size, size)
    model.train()
    out = model(x)
    if name == "googlenet":
        assert isinstance(out, tuple) and len(out) == 3
        assert [tuple(o.shape) for o in out] == [(2, 7)] * 3
    else:
        assert isinstance(out, torch.Tensor) and out.shape == (2, 7)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------
# torch.fx tracing and one ReLU module per call site
# ----------------------------------------------------------------------------------------------------
def _run(module: nn.Module, x: torch.Tensor):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # the same dropout masks for the module and its trace
        return module(x)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_symbolic_trace_reproduces_the_model(name, mode):
    model = fast_model(name).train(mode == "train")
    traced = symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = _run(model, x), _run(traced, x)
    if name == "googlenet" and mode == "train":
        assert isinstance(got, tuple) and len(got) == 3
    else:
        assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_each_relu_module_is_called_exactly_once_and_never_in_place(name):
    model = fast_model(name).train()
    graph = symbolic_trace(model).graph
    modules = dict(model.named_modules())
    relu_calls = Counter(
        n.target for n in graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.ReLU)
    )
    relu_modules = {k for k, m in modules.items() if isinstance(m, nn.ReLU)}
    assert relu_modules and set(relu_calls) == relu_modules
    assert set(relu_calls.values()) == {1}
    functional = [n for n in graph.nodes if n.op in ("call_function", "call_method") and "relu" in str(n.target)]
    assert not functional
    assert not any(modules[k].inplace for k in relu_modules)


# ----------------------------------------------------------------------------------------------------
# seeding
# ----------------------------------------------------------------------------------------------------
def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", NAMES)
def test_seeded_builds_are_identical_and_leave_the_global_rng_alone(name):
    torch.manual_seed(2024)
    before = torch.get_rng_state()
    a = fast_model(name)  # seed=0
    b = fast_model(name)
    assert torch.equal(torch.get_rng_state(), before)
    assert _same_state(a, b)
    c = build_model(name, 10, generator=1, **FAST_KWARGS[name])
    assert not _same_state(a, c)
    # The seed means "torch.manual_seed(seed), then build".
    torch.manual_seed(0)
    assert _same_state(a, build_model(name, 10, **FAST_KWARGS[name]))


def test_unseeded_builds_draw_from_the_global_rng():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = build_model("tinyten", 10)
    assert not torch.equal(torch.get_rng_state(), before)
    b = build_model("tinyten", 10)
    assert not _same_state(a, b)

"""Tests of the model zoo (``neuralign.experiments.models``): shapes, counts, fx tracing, seeding, errors.

Everything runs on the CPU with batches of 2; the wide models are narrowed with ``width`` where the test does
not depend on the exact width.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn
from torch.fx import symbolic_trace

from neuralign._utils import classification_loss
from neuralign.experiments.models import (
    MLP,
    VGG,
    GoogLeNet,
    ResNet,
    TinyTen,
    available_models,
    build_model,
    resnet20,
    resnet32,
    vgg11,
    vgg16,
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


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fast_model(name: str, num_classes: int = 10, **overrides) -> nn.Module:
    kwargs = {**FAST_KWARGS[name], **overrides}
    return build_model(name, num_classes, seed=0, **kwargs)


# ----------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------
def test_available_models_lists_every_name_in_order():
    assert available_models() == NAMES


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
    ("resnet20", 10, {"width": "2"}, TypeError, r"`width` must be an int or float > 0, got str '2'"),
    ("resnet20", 10, {"width": True}, TypeError, r"`width` must be an int or float > 0, got bool"),
    ("vgg11", 10, {"batch_norm": 1}, TypeError, r"`batch_norm` must be a bool, got int 1"),
    ("googlenet", 10, {"aux_logits": "yes"}, TypeError, r"`aux_logits` must be a bool, got str"),
    ("mlp", 10, {"in_features": 64, "dropout": 1.0}, ValueError, r"`dropout` must be in \[0, 1\), got 1.0"),
    ("mlp", 10, {"in_features": 64, "hidden": "12"}, TypeError, r"`hidden` must be a sequence of positive ints"),
    ("mlp", 10, {"in_features": 64, "hidden": (8, 0)}, ValueError, r"`hidden\[1\]` must be a positive int"),
    ("tinyten", 10, {"seed": "1"}, TypeError, r"`seed` must be an int or None, got str"),
    ("tinyten", 10, {"seed": -1}, ValueError, r"`seed` must be in \[0, 2\*\*64\), got -1"),
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


def test_mlp_on_8x8_digits_with_default_hidden_layers():
    model = MLP(64, 10)
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [512, 512, 10]
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_mlp_without_hidden_layers_is_linear():
    model = MLP(64, 10, hidden=())
    assert len(model.hidden) == 0 and model.fc.in_features == 64
    assert [type(m) for m in model.modules() if not list(m.children())] == [nn.Flatten, nn.Sequential, nn.Linear]


def test_vgg_features_reach_1x1_for_32x32_and_28x28():
    model = vgg11(10, width=0.25).eval()
    for size in (32, 28):
        assert model.features(torch.zeros(1, 3, size, size)).shape[-2:] == (1, 1)


def test_googlenet_feature_map_sizes_for_32x32():
    # conv1 has stride 1 and maxpool1 is gone: the stem keeps 32x32; maxpool2 -> 16x16; maxpool3 -> 8x8 (maxpool4
    # is gone, so inception5b is still 8x8).
    model = GoogLeNet(10).eval()
    shapes = {}
    for name in ("conv3", "inception3b", "inception4a", "inception4d", "inception5b"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    assert shapes == {
        "conv3": (1, 192, 32, 32),
        "inception3b": (1, 480, 16, 16),
        "inception4a": (1, 512, 8, 8),
        "inception4d": (1, 528, 8, 8),
        "inception5b": (1, 1024, 8, 8),
    }


# ----------------------------------------------------------------------------------------------------
# GoogLeNet train / eval outputs
# ----------------------------------------------------------------------------------------------------
def test_googlenet_returns_tuple_in_train_mode_and_logits_in_eval_mode():
    torch.manual_seed(0)
    model = GoogLeNet(10, aux_logits=True)
    x = torch.randn(2, 3, 32, 32)
    calls = Counter()
    for head in ("aux1", "aux2"):
        getattr(model, head).register_forward_hook(lambda m, i, o, head=head: calls.update([head]))
    out = model.train()(x)
    assert type(out) is tuple and len(out) == 3 and all(isinstance(o, torch.Tensor) for o in out)
    assert calls == {"aux1": 1, "aux2": 1}
    # The tuple plugs into the shared criterion CE + 0.3 CE_aux1 + 0.3 CE_aux2.
    target = torch.tensor([1, 2])
    expected = sum(w * nn.functional.cross_entropy(o, target) for w, o in zip((1.0, 0.3, 0.3), out))
    # the same float32 operations in the same order (CE, times the weight, summed left to right): bitwise equal
    torch.testing.assert_close(classification_loss(out, target), expected, rtol=0, atol=0)
    # Eval mode: a tensor, and the auxiliary heads are not evaluated.
    calls.clear()
    with torch.no_grad():
        out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
    assert not calls


def test_googlenet_without_aux_heads_returns_logits_in_train_mode():
    model = GoogLeNet(10, aux_logits=False).train()
    assert model.aux1 is None and model.aux2 is None
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


# ----------------------------------------------------------------------------------------------------
# parameter counts
# ----------------------------------------------------------------------------------------------------
def test_tinyten_parameter_count():
    # conv k*k*in*out + out (bias) and BN 2*out per block:
    #   3->16 k3: 432+16 + 32 | 16->16 k3: 2304+16 + 32 | 16->32 k3: 4608+32 + 64 | 32->32 k3: 9216+32 + 64 (x2)
    #   32->64 k3: 18432+64 + 128 | 64->64 k3: 36864+64 + 128 | 64->64 k1: 4096+64 + 128
    #   convs 85,488 + BN 640 + fc 64*10+10 = 650  ->  86,778 (the paper's "0.09M").
    assert n_params(TinyTen(10)) == 86_778
    assert n_params(TinyTen(100)) == 86_778 + 90 * 65


def test_tinyten_geometry_matches_the_paper_notes():
    model = TinyTen(10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    got = [
        (c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0], c.bias is not None) for c in convs
    ]
    assert got == [
        (3, 16, 3, 1, 1, True),
        (16, 16, 3, 1, 1, True),
        (16, 32, 3, 2, 1, True),
        (32, 32, 3, 1, 1, True),
        (32, 32, 3, 1, 1, True),
        (32, 64, 3, 2, 1, True),
        (64, 64, 3, 1, 0, True),
        (64, 64, 1, 1, 0, True),
    ]
    assert all(torch.equal(c.bias, torch.zeros_like(c.bias)) for c in convs)
    assert torch.equal(model.fc.bias, torch.zeros(10))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 8 and all(torch.equal(b.weight, torch.ones_like(b.weight)) for b in bns)


def test_resnet_parameter_counts():
    # ResNet32 (n=5), width 1, 10 classes:
    #   stem 3*16*9 + BN 32 = 464
    #   stage 1: 5 blocks x (2*16*16*9 + 2*32) = 5 x 4,672 = 23,360
    #   stage 2: first block 16*32*9 + 32*32*9 + 2*64 + downsample (16*32 + 64) = 14,528;
    #            4 blocks x (2*32*32*9 + 2*64) = 74,240  -> 88,768
    #   stage 3: first block 32*64*9 + 64*64*9 + 2*128 + downsample (32*64 + 128) = 57,728;
    #            4 blocks x (2*64*64*9 + 2*128) = 295,936 -> 353,664
    #   fc 64*10 + 10 = 650                                   total 466,906 (the paper's "0.47M")
    # ResNet20 (n=3): 464 + 3*4,672 + (14,528 + 2*18,560) + (57,728 + 2*73,984) + 650 = 272,474.
    assert n_params(resnet32(10)) == 466_906
    assert n_params(resnet20(10)) == 272_474
    assert n_params(resnet32(100)) == 466_906 + 90 * 65


def test_resnet_width_multiplier_rounds_channels():
    for width, channels in [(2, (32, 64, 128)), (0.5, (8, 16, 32)), (0.3, (5, 10, 19)), (1.5, (24, 48, 96))]:
        model = resnet20(10, width=width)
        assert model.conv1.out_channels == channels[0]
        assert [model.layer1[0].conv2.out_channels, model.layer2[0].conv2.out_channels] == list(channels[:2])
        assert model.fc.in_features == channels[2]
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_shortcuts_are_option_b_only_where_the_shape_changes():
    model = resnet32(10)
    with_downsample = {
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Module) and getattr(m, "downsample", None) is not None
    }
    assert with_downsample == {"layer2.0", "layer3.0"}
    for stage in (model.layer2, model.layer3):
        conv, bn = stage[0].downsample
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and conv.bias is None
        assert isinstance(bn, nn.BatchNorm2d)
        assert stage[0].conv1.stride == (2, 2)


def test_resnet_conv_init_is_kaiming_fan_out():
    torch.manual_seed(0)
    model = resnet32(10)
    weights = torch.cat(
        [b.conv1.weight.flatten() for b in model.layer3[1:]] + [b.conv2.weight.flatten() for b in model.layer3]
    )
    # fan_out = 64 * 3 * 3 = 576, std = sqrt(2 / 576) = 0.0589; 5 x 37k samples -> relative error ~0.2%.
    assert weights.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.02)


def test_vgg_parameter_counts():
    def count(config, num_classes):
        # 3x3 convs without bias (batch norm follows), BN 2 per channel, head 512-512-512-classes with biases.
        total, c_in = 0, 3
        for c in config:
            total += 9 * c_in * c + 2 * c
            c_in = c
        return total + 2 * (512 * 512 + 512) + 512 * num_classes + num_classes

    a = (64, 128, 256, 256, 512, 512, 512, 512)
    d = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
    assert count(a, 10) == 9_753_674 and count(d, 10) == 15_249_354
    assert n_params(vgg11(10)) == 9_753_674
    assert n_params(vgg16(10)) == 15_249_354
    convs = [m for m in vgg16(10, width=0.25).modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and [c.out_channels for c in convs] == [x // 4 for x in d]


def test_vgg_without_batch_norm_has_biased_convolutions_and_no_bn():
    model = vgg11(10, batch_norm=False, width=0.25)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


# Inception table of Szegedy et al. (arXiv:1409.4842, Table 1), written out here independently of the module:
# (in, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj).
INCEPTION_TABLE = [
    (192, 64, 96, 128, 16, 32, 32),
    (256, 128, 128, 192, 32, 96, 64),
    (480, 192, 96, 208, 16, 48, 64),
    (512, 160, 112, 224, 24, 64, 64),
    (512, 128, 128, 256, 24, 64, 64),
    (512, 112, 144, 288, 32, 64, 64),
    (528, 256, 160, 320, 32, 128, 128),
    (832, 256, 160, 320, 32, 128, 128),
    (832, 384, 192, 384, 48, 128, 128),
]


def googlenet_count(num_classes: int, aux: bool) -> int:
    # BasicConv2d = conv without bias + BN (2 per channel). The "5x5" branch is a 3x3 conv (9 weights per pair).
    def conv(c_in, c_out, k):
        return k * k * c_in * c_out + 2 * c_out

    body = conv(3, 64, 7) + conv(64, 64, 1) + conv(64, 192, 3)
    for c_in, c1, c3r, c3, c5r, c5, pp in INCEPTION_TABLE:
        body += conv(c_in, c1, 1) + conv(c_in, c3r, 1) + conv(c3r, c3, 3) + conv(c_in, c5r, 1) + conv(c5r, c5, 3)
        body += conv(c_in, pp, 1)
    assert body == 5_599_904
    total = body + 1024 * num_classes + num_classes
    if aux:  # aux heads after 4a (512 channels) and 4d (528): 1x1 conv to 128, fc1 2048->1024, fc2 1024->classes
        for c_in in (512, 528):
            total += conv(c_in, 128, 1) + 2048 * 1024 + 1024 + 1024 * num_classes + num_classes
    return total


def test_googlenet_parameter_count_and_the_papers_10_24m():
    # 10 classes with both aux heads: body 5,599,904 + fc 10,250 + aux1 (65,792 + 2,098,176 + 10,250)
    # + aux2 (67,840 + 2,098,176 + 10,250) = 9,960,638. The paper's "10.24M" is the 100-class (CIFAR-100) model
    # with both aux heads: 10,237,388; for 10 classes the count is 9.96M, and 5.61M without the aux heads.
    assert googlenet_count(10, aux=True) == 9_960_638
    assert googlenet_count(100, aux=True) == 10_237_388
    assert n_params(GoogLeNet(10, aux_logits=True)) == 9_960_638
    assert n_params(GoogLeNet(100, aux_logits=True)) == 10_237_388
    assert n_params(GoogLeNet(10, aux_logits=False)) == googlenet_count(10, aux=False) == 5_610_154


def test_googlenet_basic_conv_and_init():
    torch.manual_seed(0)
    model = GoogLeNet(10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert (model.conv1.conv.kernel_size, model.conv1.conv.stride) == ((7, 7), (1, 1))
    assert all(blk.branch3[1].conv.kernel_size == (3, 3) for blk in model.modules() if hasattr(blk, "branch3"))
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    assert weights.abs().max().item() <= 0.02
    # std of N(0, 0.01^2) truncated at +-2 sigma is 0.01 * 0.8796.
    assert weights.std().item() == pytest.approx(0.008796, rel=0.01)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in model.modules() if isinstance(m, nn.Linear))


def test_mlp_parameter_count():
    # 784*512 + 512 + 512*512 + 512 + 512*10 + 10 = 669,706; BatchNorm1d adds 2 * (512 + 512).
    assert n_params(MLP(784, 10)) == 669_706
    assert n_params(MLP(784, 10, batch_norm=True)) == 669_706 + 2048


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
    c = build_model(name, 10, seed=1, **FAST_KWARGS[name])
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

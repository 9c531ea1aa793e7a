import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuralign.alignment import Segment, SpecBuilder, trace_spec
from neuralign.errors import SpecError
from neuralign.experiments.models import build_model
from neuralign.verification import check_equivalence
from tests.alignment.nets import DenseCatNet, ResCatNet, randomize_bn

BN = ("weight", "bias", "running_mean", "running_var")


def _add_bn(builder, prefix, group):
    for attr in BN:
        builder.add(f"{prefix}.{attr}", 0, group)


def test_tinyten_has_one_group_per_block():
    widths = [16, 16, 32, 32, 32, 64, 64, 64]
    b = SpecBuilder()
    for i, w in enumerate(widths):
        g = f"features.{i}.conv"
        b.group(g, w).add(f"{g}.weight", 0, g).add(f"{g}.bias", 0, g)
        _add_bn(b, f"features.{i}.bn", g)
        b.add(f"features.{i + 1}.conv.weight" if i < 7 else "fc.weight", 1, g)
    model = build_model("tinyten", 10)
    assert trace_spec(model, torch.randn(2, 3, 32, 32)) == b.build()


def _resnet_expected(blocks, widths):
    b = SpecBuilder()
    stream = "conv1"
    b.group(stream, widths[0]).add("conv1.weight", 0, stream)
    _add_bn(b, "bn1", stream)
    for s, w in enumerate(widths, start=1):
        for k in range(blocks):
            p = f"layer{s}.{k}"
            if k == 0 and s > 1:
                b.add(f"{p}.conv1.weight", 1, stream)
                b.add(f"{p}.downsample.0.weight", 1, stream)
                stream = f"{p}.conv2"
                b.group(stream, w)
                b.add(f"{p}.downsample.0.weight", 0, stream)
                _add_bn(b, f"{p}.downsample.1", stream)
            else:
                b.add(f"{p}.conv1.weight", 1, stream)
            interior = f"{p}.conv1"
            b.group(interior, w).add(f"{p}.conv1.weight", 0, interior)
            _add_bn(b, f"{p}.bn1", interior)
            b.add(f"{p}.conv2.weight", 1, interior).add(f"{p}.conv2.weight", 0, stream)
            _add_bn(b, f"{p}.bn2", stream)
    b.add("fc.weight", 1, stream)
    return b.build()


@pytest.mark.parametrize("name,blocks", [("resnet20", 3), ("resnet32", 5)])
def test_resnet_one_group_per_stage_stream_and_block_interior(name, blocks):
    spec = trace_spec(build_model(name, 10), torch.randn(2, 3, 32, 32))
    expected = _resnet_expected(blocks, [16, 32, 64])
    assert spec.partition() == expected.partition()
    assert len(spec.groups) == 3 + 3 * blocks
    # the stage-1 stream is the stem's output, tied through every identity shortcut of stage 1
    assert ("layer1.0.bn2.running_var", 0) in spec.perm_to_axes["conv1"]


def test_resnet_width_multiplier_scales_groups():
    spec = trace_spec(build_model("resnet20", 10, width=2), torch.randn(2, 3, 32, 32))
    assert sorted(set(spec.sizes.values())) == [32, 64, 128]


def test_vgg_flatten_into_linear():
    spec = trace_spec(build_model("vgg11", 10), torch.randn(2, 3, 32, 32))
    assert len(spec.groups) == 8 + 2  # 8 conv layers and 2 hidden linear layers
    last_conv = spec.groups[7]
    assert spec.axes["classifier.0.weight"][1] == (Segment(last_conv, 512, 1),)


def test_googlenet_concatenation_and_aux_heads():
    model = build_model("googlenet", 10)
    spec = trace_spec(model, torch.randn(2, 3, 32, 32))
    assert len(spec.groups) == 3 + 9 * 6 + 2 * 2
    branches = [f"inception3a.{b}.conv" for b in ("branch1", "branch2.1", "branch3.1", "branch4.1")]
    action = spec.axes["inception3b.branch1.conv.weight"][1]
    assert [s.group for s in action] == branches
    assert [s.size for s in action] == [64, 128, 32, 32]
    # the aux head's fc1 reads 128 channels x 4 x 4 positions, channel-major
    assert spec.axes["aux1.fc1.weight"][1] == (Segment("aux1.conv.conv", 128, 16),)
    # taps: every branch has its own post-activation tap
    assert [t.node for t in spec.taps["inception3a.branch1.conv"] if t.kind == "post"] == [
        "inception3a_branch1_relu"
    ]


def test_mlp_groups_and_taps():
    model = build_model("mlp", 10, in_features=64, hidden=(32, 16))
    spec = trace_spec(model, torch.randn(2, 1, 8, 8))
    assert spec.sizes == {"hidden.0.fc": 32, "hidden.1.fc": 16}
    assert spec.axes["hidden.0.fc.weight"] == {0: (Segment("hidden.0.fc", 32),)}
    assert [t.kind for t in spec.taps["hidden.0.fc"]] == ["post", "pre"]


def test_custom_residual_concat_flatten_net():
    net = randomize_bn(ResCatNet())
    x = torch.randn(4, 3, 8, 8)
    spec = trace_spec(net, x)
    assert set(spec.groups) == {"stem", "c1", "ba", "bb", "fc1"}
    # the residual addition tied the stem output with c2's output
    assert ("c2.weight", 0) in spec.perm_to_axes["stem"]
    # the concatenated, pooled, flattened axis: [ba (4 ch), bb (5 ch)] x 16 positions
    assert spec.axes["fc1.weight"][1] == (Segment("ba", 4, 16), Segment("bb", 5, 16))
    # LayerNorm over the permuted channel axis
    assert spec.axes["ln.weight"][0] == (Segment("ba", 4), Segment("bb", 5))
    assert check_equivalence(net, spec, x, generator=0).passed


def test_dense_concat_view_and_parameter_used_directly():
    net = randomize_bn(DenseCatNet())
    x = torch.randn(3, 1, 6, 6)
    spec = trace_spec(net, x)
    assert spec.axes["scale"][0] == (Segment("c0", 4), Segment("c1", 3))
    assert spec.axes["fc.weight"][1] == (Segment("c0", 4, 9), Segment("c1", 3, 9))
    assert check_equivalence(net, spec, x, generator=1).passed


def test_input_and_output_axes_are_never_permuted():
    class SkipFromInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 5)
            self.b = nn.Linear(5, 6)
            self.c = nn.Linear(6, 3)

        def forward(self, x):
            h = x + F.relu(self.a(x))  # tied to the input, which is never permuted
            return self.c(F.relu(self.b(h))), self.b(h)  # b's units also reach the output

    spec = trace_spec(SkipFromInput(), torch.randn(2, 5))
    assert spec.groups == []


def test_shared_module_called_twice_is_one_group():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 4)
            self.mid = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            h = F.relu(self.inp(x))
            h = F.relu(self.mid(h))
            h = F.relu(self.mid(h))  # same weights twice: its input and output units must be one group
            return self.out(h)

    net = Shared()
    x = torch.randn(2, 3)
    spec = trace_spec(net, x)
    assert len(spec.groups) == 1
    assert check_equivalence(net, spec, x, generator=0).passed


class _Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.cumsum(self.fc(x), dim=1))  # depends on the order of the units


class _OuterFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 3)
        self.b = nn.Linear(2, 4)
        self.fc = nn.Linear(3 * 4, 2)

    def forward(self, x):  # two permuted axes flattened into one
        return self.fc((self.a(x)[:, :, None] * self.b(x)[:, None, :]).reshape(x.shape[0], -1))


class _Slice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.fc(x)[:, ::2])


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 1)
        self.b = nn.Conv2d(2, 4, 1)
        self.c = nn.Conv2d(6, 6, 1, groups=2)

    def forward(self, x):  # c reads blocks of 3 channels: the first straddles a's 2 units and one of b's
        return self.c(torch.cat([self.a(x), self.b(x)], dim=1)).mean()


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


@pytest.mark.parametrize(
    "net,x,match",
    [
        (_Cumsum(), torch.randn(3, 4), r"fx node `cumsum` \(call_function cumsum\) is safe.*order along a permuted"),
        (_OuterFlatten(), torch.randn(2, 2), "fx node `reshape`.*interleaves permuted units"),
        (_Slice(), torch.randn(2, 4), "fx node `getitem`.*selects a strided part of a permuted axis"),
        (_Grouped(), torch.randn(2, 2, 3, 3), "fx node `c`.*grouped convolution with 2 groups splits"),
    ],
)
def test_unprovable_operations_raise_spec_error_naming_the_node(net, x, match):
    with pytest.raises(SpecError, match=match) as info:
        trace_spec(net, x)
    assert "SpecBuilder" in str(info.value)


def test_on_unsupported_fix_keeps_touched_groups_identity():
    net = _Slice()
    x = torch.randn(2, 4)
    spec = trace_spec(net, x, on_unsupported="fix")
    assert spec.groups == []
    with pytest.raises(ValueError, match="unknown on_unsupported 'skip'"):
        trace_spec(net, x, on_unsupported="skip")


def test_untraceable_model_raises_spec_error():
    with pytest.raises(SpecError, match="torch.fx could not trace _Untraceable"):
        trace_spec(_Untraceable(), torch.randn(2, 2))
    with pytest.raises(TypeError, match="must be an nn.Module"):
        trace_spec(lambda x: x, torch.randn(2))


def test_tracing_does_not_touch_the_model():
    model = build_model("resnet20", 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    trace_spec(model, torch.randn(4, 3, 32, 32))
    assert not model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_example_input_of_the_wrong_shape_is_named():
    with pytest.raises(SpecError, match=r"TinyTen could not run on `example_input` of shape \(2, 1, 32, 32\)"):
        trace_spec(build_model("tinyten", 10), torch.randn(2, 1, 32, 32))


class _ChecksItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        torch._assert(x.shape[1] == 4, "expects 4 features")  # as timm checks a ViT's image size
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_model_that_refuses_its_input_is_a_spec_error():
    # a new-user trial: a timm ViT given another image size raised its own AssertionError through trace_spec (a
    # traceback from the command line)
    trace_spec(_ChecksItsInput(), torch.randn(2, 4))
    with pytest.raises(SpecError, match=r"_ChecksItsInput could not run on `example_input` of shape \(2, 5\)"):
        trace_spec(_ChecksItsInput(), torch.randn(2, 5))


class _ShuffleNet(nn.Module):
    """ShuffleNet v2 units: split, branch, concatenate, channel shuffle (each shuffle ties the two halves)."""

    def __init__(self, c=6, blocks=3):
        super().__init__()
        self.stem = nn.Conv2d(3, 2 * c, 1)
        self.branches = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(blocks))
        self.head = nn.Conv2d(2 * c, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        for conv in self.branches:
            x1, x2 = x.chunk(2, dim=1)
            x = torch.cat([x1, conv(x2).relu()], 1)
            b, c, h, w = x.shape
            x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.head(x)


@pytest.mark.parametrize("c,blocks", [(6, 2), (6, 3), (4, 3)])
def test_channel_shuffles_trace_or_refuse_and_fix_mode_never_crashes(c, blocks):
    torch.manual_seed(0)
    net = _ShuffleNet(c, blocks)
    x = torch.randn(2, 3, 4, 4)
    try:
        spec = trace_spec(net, x)
    except SpecError as exc:
        assert "cuts a permuted unit in two" in str(exc)  # repeated halving reaches single units
        spec = trace_spec(net, x, on_unsupported="fix")  # crashed with a TypeError inside the tracer
    assert check_equivalence(net, spec, x, generator=0).passed

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from neuralign.alignment import PermutationSpec, trace_spec
from neuralign.experiments.models import build_model
from neuralign.verification import check_equivalence
from tests.alignment.nets import DenseCatNet, ResCatNet, randomize_bn

ZOO = {
    "tinyten": ({}, (3, 3, 32, 32)),
    "resnet20": ({}, (3, 3, 32, 32)),
    "resnet32": ({"width": 1.5}, (2, 3, 32, 32)),
    "vgg11": ({}, (2, 3, 32, 32)),
    "vgg16": ({"width": 0.5}, (2, 3, 32, 32)),
    "googlenet": ({}, (2, 3, 32, 32)),
    "mlp": ({"in_features": 784, "batch_norm": True}, (4, 1, 28, 28)),
}
CUSTOM = {"rescat": (ResCatNet, (4, 3, 8, 8)), "densecat": (DenseCatNet, (3, 1, 6, 6))}

_SPECS: dict = {}


def _zoo(name):
    if name not in _SPECS:
        kw, shape = ZOO[name]
        model = randomize_bn(build_model(name, 10, generator=0, **kw))
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        _SPECS[name] = (model, trace_spec(model, x), x)
    return _SPECS[name]


@pytest.mark.parametrize("name", list(ZOO))
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_zoo_models_are_invariant_under_random_permutations(name, seed):
    model, spec, x = _zoo(name)
    res = check_equivalence(model, spec, x, trials=1, generator=seed)
    # float64: a correct spec differs only by rounding of sums in another order (~1e-16 relative per operation),
    # measured against entries down to 1e-3 of the largest output (x1e3) over a dozen layers: below 1e-10
    assert res.passed and res.conclusive, res.message
    assert res.max_diff_eval <= 1e-10 and res.max_diff_train <= 1e-10
    # only output-side tensors stay unpermuted
    assert all(k.endswith("bias") and ("fc" in k or "classifier" in k) for k in res.unpermuted), res.unpermuted


@pytest.mark.parametrize("name", list(CUSTOM))
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_custom_traced_networks_are_invariant(name, seed):
    cls, shape = CUSTOM[name]
    model = randomize_bn(cls(), seed=seed % 97)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    res = check_equivalence(model, trace_spec(model, x), x, trials=2, generator=seed)
    assert res.passed, res.message


def test_check_fails_for_a_spec_that_forgets_the_running_statistics():
    model, spec, x = _zoo("tinyten")
    axes = {k: v for k, v in spec.axes.items() if "running_mean" not in k}
    broken = PermutationSpec(spec.sizes, axes)
    res = check_equivalence(model, broken, x, trials=2, generator=0)
    assert not res.passed
    assert res.max_diff_eval > 1e-3  # eval mode uses the (now inconsistent) running means
    assert res.max_diff_train < 1e-10  # train mode uses batch statistics and still matches (float64 rounding)
    assert any("running_mean" in k for k in res.unpermuted)
    assert "ABOVE" in res.message


def test_check_fails_for_a_spec_missing_a_consumer():
    model, spec, x = _zoo("mlp")
    axes = {k: v for k, v in spec.axes.items() if k != "out.weight" and not k.endswith("1.fc.weight")}
    res = check_equivalence(model, PermutationSpec(spec.sizes, axes), x, trials=2, generator=0)
    assert not res.passed


def test_model_is_not_modified_and_trials_validated():
    model, spec, x = _zoo("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_equivalence(model, spec, x, trials=1, generator=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="`trials` must be at least 1, got 0"):
        check_equivalence(model, spec, x, trials=0)


def _tiny_outputs_net() -> tuple[nn.Module, torch.Tensor]:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x).data))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # outputs of size ~1e-5, like a freshly initialised mobilenet_v3_small
        net.b.weight.mul_(1e-5)
        net.b.bias.mul_(1e-5)
    return net, torch.randn(6, 4)


def test_a_wrong_spec_fails_however_small_the_outputs():
    net, x = _tiny_outputs_net()
    spec = trace_spec(net, x)
    assert check_equivalence(net, spec, x, generator=0).passed
    wrong = PermutationSpec(spec.sizes, {k: v for k, v in spec.axes.items() if k != "b.weight"})  # item 1's spec
    res = check_equivalence(net, wrong, x, generator=0)
    assert not res.passed and res.max_diff_eval > 0.1, res.message  # the outputs change by a large fraction


def test_stochastic_operations_are_replaced_by_their_expectation_and_reported():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(num_classes=10)  # StochasticDepth (bernoulli_) and Dropout
    x = torch.randn(2, 3, 64, 64)
    spec = trace_spec(model, x)
    res = check_equivalence(model, spec, x, trials=1, generator=0)
    assert res.passed and res.conclusive, res.message  # failed in train mode (1.4): stochastic depth kept dropping
    assert res.stochastic == ["bernoulli_", "dropout"]
    assert "expectation" in res.message
    # two 32x32 images reach 1x1 maps: train-mode batch statistics over 2 values make the model itself chaotic
    small = x[:, :, :32, :32]
    res = check_equivalence(model, spec, small, trials=1, generator=0)
    assert not res.passed and not res.conclusive and res.sensitivity > res.tol
    assert res.message.startswith("INCONCLUSIVE in train mode")


class _AttentionWithDropout(nn.Module):
    """Attention whose weights are dropped: inside nn.MultiheadAttention (``dropout``) or by SDPA's ``dropout_p``,
    which drops even in eval mode."""

    def __init__(self, kind: str, need_weights: bool = False) -> None:
        super().__init__()
        self.kind, self.need_weights = kind, need_weights
        self.mha = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True)
        self.qkv, self.proj, self.out = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        if self.kind == "mha":
            y, _ = self.mha(x, x, x, need_weights=self.need_weights)
        else:
            b, n, d = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, 4, d // 4).permute(2, 0, 3, 1, 4).unbind(0)
            y = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.5).transpose(1, 2).reshape(b, n, d)
            y = self.proj(y)
        return self.out(x + y)


@pytest.mark.parametrize("kind, need_weights", [("mha", False), ("mha", True), ("sdpa", False)])
def test_attention_dropout_is_replaced_by_its_expectation(kind, need_weights):
    torch.manual_seed(0)
    model, x = _AttentionWithDropout(kind, need_weights), torch.randn(2, 5, 8)
    spec = trace_spec(model, x)
    assert any(h.heads is not None for h in spec.heads.values())  # heads move: a dropped weight would not follow
    res = check_equivalence(model, spec, x, generator=0)
    assert res.passed and res.stochastic == ["attention dropout"], res.message  # was a false "fail" (diff ~1)


def test_a_large_output_does_not_hide_a_change_of_the_others():
    class Net(nn.Module):  # a regression head: one output carries a large constant offset
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
            with torch.no_grad():
                self.c.bias[0] = 1e7

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    net, x = Net(), torch.randn(4, 6)
    spec = trace_spec(net, x)
    assert check_equivalence(net, spec, x, generator=0).passed
    for key in spec.axes:  # every one passed (5.5e-8 against 1e-6) while the other outputs changed by 0.48
        wrong = PermutationSpec(spec.sizes, {k: v for k, v in spec.axes.items() if k != key})
        assert not check_equivalence(net, wrong, x, generator=0).passed, key


def test_a_model_that_cannot_run_in_float64_is_checked_in_its_own_precision():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.c(self.a(x).relu() @ torch.eye(8))  # a float32 constant made in forward

    torch.manual_seed(0)
    net, x = Net(), torch.randn(4, 6)
    res = check_equivalence(net, trace_spec(net, x), x, generator=0)  # raised "double != float"
    assert res.passed and res.dtype == torch.float32 and "does not run in float64" in res.message


@pytest.mark.slow
def test_resnet50_has_no_false_alarm():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    res = check_equivalence(model, trace_spec(model, x), x, trials=1, generator=0)
    # float32 gave 7.1e-5 against tol 1e-5; float64 rounding, per output entry (floor 1e-3 of the largest): < 1e-10
    assert res.passed and res.conclusive and res.max_diff_train < 1e-10, res.message


def test_float32_check_keeps_its_own_tolerance():
    net, x = _tiny_outputs_net()
    spec = trace_spec(net, x)
    res = check_equivalence(net, spec, x, generator=0, dtype=None)
    assert res.passed and res.dtype == torch.float32 and res.tol == 1e-3
    with pytest.raises(ValueError, match="`tol` must be positive"):
        check_equivalence(net, spec, x, tol=0.0)

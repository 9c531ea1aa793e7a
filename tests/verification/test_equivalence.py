import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
        model = randomize_bn(build_model(name, 10, seed=0, **kw))
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        _SPECS[name] = (model, trace_spec(model, x), x)
    return _SPECS[name]


@pytest.mark.parametrize("name", list(ZOO))
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_zoo_models_are_invariant_under_random_permutations(name, seed):
    model, spec, x = _zoo(name)
    res = check_equivalence(model, spec, x, trials=1, generator=seed, tol=1e-5)
    assert res.passed, res.message
    assert res.max_diff_eval <= 1e-5 and res.max_diff_train <= 1e-5
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
    assert res.max_diff_train < 1e-5  # train mode uses batch statistics and still matches
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

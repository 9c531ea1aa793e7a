"""Tests of GoogLeNet (``neuralign.experiments.models.googlenet``): feature-map sizes, the train-mode tuple and
eval-mode logits, parameter counts against Szegedy et al.'s Inception table, BasicConv2d and initialisation."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from neuralign._utils import classification_loss
from neuralign.experiments.models import GoogLeNet
from tests.experiments.models.helpers import n_params


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

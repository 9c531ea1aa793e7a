"""Tests of VGG (``neuralign.experiments.models.vgg``): feature-map sizes, parameter counts, the variant without
batch norm."""

from __future__ import annotations

import torch
from torch import nn

from neuralign.experiments.models import vgg11, vgg16
from tests.experiments.models.helpers import n_params


def test_vgg_features_reach_1x1_for_32x32_and_28x28():
    model = vgg11(10, width=0.25).eval()
    for size in (32, 28):
        assert model.features(torch.zeros(1, 3, size, size)).shape[-2:] == (1, 1)


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

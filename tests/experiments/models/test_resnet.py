"""Tests of the CIFAR ResNets (``neuralign.experiments.models.resnet``): parameter counts, the width multiplier,
option-B shortcuts, Kaiming initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuralign.experiments.models import resnet20, resnet32
from tests.experiments.models.helpers import n_params


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

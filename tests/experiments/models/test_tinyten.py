"""Tests of TinyTen (``neuralign.experiments.models.tinyten``): parameter count and geometry against the paper
notes."""

from __future__ import annotations

import torch
from torch import nn

from neuralign.experiments.models import TinyTen
from tests.experiments.models.helpers import n_params


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

"""Tests of the MLP (``neuralign.experiments.models.mlp``): default hidden layers, no hidden layer, parameter
counts."""

from __future__ import annotations

import torch
from torch import nn

from neuralign.experiments.models import MLP
from tests.experiments.models.helpers import n_params


def test_mlp_on_8x8_digits_with_default_hidden_layers():
    model = MLP(64, 10)
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [512, 512, 10]
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_mlp_without_hidden_layers_is_linear():
    model = MLP(64, 10, hidden=())
    assert len(model.hidden) == 0 and model.fc.in_features == 64
    assert [type(m) for m in model.modules() if not list(m.children())] == [nn.Flatten, nn.Sequential, nn.Linear]


def test_mlp_parameter_count():
    # 784*512 + 512 + 512*512 + 512 + 512*10 + 10 = 669,706; BatchNorm1d adds 2 * (512 + 512).
    assert n_params(MLP(784, 10)) == 669_706
    assert n_params(MLP(784, 10, batch_norm=True)) == 669_706 + 2048

"""Custom networks shared by the alignment and verification tests (not part of the zoo)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResCatNet(nn.Module):
    """Residual addition, channel concatenation, LayerNorm over a permuted last axis, flatten -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 6, 3, padding=1)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.ba = nn.Conv2d(8, 4, 1)
        self.bb = nn.Conv2d(8, 5, 3, padding=1, stride=1)
        self.ln = nn.LayerNorm(9)
        self.fc1 = nn.Linear(9 * 4 * 4, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.b1(self.c1(x)))
        x = F.relu(x + self.b2(self.c2(y)))
        z = torch.cat([F.relu(self.ba(x)), torch.tanh(self.bb(x))], 1)
        z = F.max_pool2d(z, 2)
        z = self.ln(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        z = torch.flatten(z, 1)
        return self.fc2(F.gelu(self.fc1(z)))


class DenseCatNet(nn.Module):
    """DenseNet-like concatenation of a block's input with its output, a view() flatten and a learnt scale."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(1, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(7)
        self.scale = nn.Parameter(torch.rand(7) + 0.5)
        self.fc = nn.Linear(7 * 3 * 3, 10)
        self.out = nn.Linear(10, 2)

    def forward(self, x):
        h = self.c0(x).relu()
        h = torch.cat((h, F.relu(self.c1(h))), dim=1)
        h = self.bn(h) * self.scale.view(1, 7, 1, 1)
        h = F.avg_pool2d(h, 2)
        h = h.view(h.size(0), -1)
        return self.out(torch.sigmoid(self.fc(h)))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial running statistics and affine parameters (in place, for tests)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


def calibrate_bn(model: nn.Module, batches) -> nn.Module:
    """Set batch-norm running statistics to the exact statistics of ``batches`` (in place, for tests).

    Afterwards every unit's eval-mode pre-activation is roughly N(beta, gamma^2) on this data, as in a trained
    network, so post-ReLU units are alive and correlations are well defined.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x, *_ in batches:
            model(x)
    for m in bns:
        m.momentum = 0.1
    return model.eval()

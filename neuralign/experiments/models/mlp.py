r"""Multi-layer perceptron: ``Flatten -> [Linear -> (BatchNorm1d) -> ReLU -> (Dropout)] * L -> Linear``
(:class:`MLP`), the zoo's fully connected baseline for flattened images (MNIST, 8x8 digits, CIFAR).

A generic baseline rather than the architecture of one paper: it has no reference of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from neuralign._validate import check_bool, check_int, check_real

__all__ = ["MLP"]


class _HiddenLayer(nn.Module):
    """``Linear -> (BatchNorm1d) -> ReLU -> (Dropout)``; ``bn`` / ``dropout`` are ``None`` when absent."""

    def __init__(self, in_features: int, out_features: int, batch_norm: bool, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)
        self.bn = nn.BatchNorm1d(out_features) if batch_norm else None
        self.relu = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        if self.bn is not None:
            x = self.bn(x)
        x = self.relu(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return x


class MLP(nn.Module):
    r"""Multi-layer perceptron: ``Flatten -> [Linear -> (BatchNorm1d) -> ReLU -> (Dropout)] * L -> Linear``.

    .. math::
        h_0 = \mathrm{vec}(x), \quad h_l = \mathrm{ReLU}(\mathrm{BN}_l(W_l h_{l-1} + b_l)), \quad
        z = W_{L+1} h_L + b_{L+1}

    Parameters
    ----------
    in_features : int
        Features after flattening the input (784 for 28x28 MNIST, 64 for 8x8 digits, 3072 for CIFAR).
    num_classes : int
        Outputs.
    hidden : sequence of int
        Widths of the :math:`L \ge 0` hidden layers.
    batch_norm : bool
        Insert ``BatchNorm1d`` after each hidden linear layer.
    dropout : float
        Dropout probability after each hidden ReLU (0 inserts no dropout module).

    Notes
    -----
    PyTorch's default initialisation of ``nn.Linear``. Module names: ``flatten``, ``hidden.{l}.{fc,bn,relu,
    dropout}``, ``fc``.

    Examples
    --------
    >>> model = MLP(784, 10, hidden=(32,))
    >>> tuple(model(torch.zeros(2, 1, 28, 28)).shape)
    (2, 10)
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int = 10,
        hidden: Sequence[int] = (512, 512),
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_features = check_int(in_features, "in_features", minimum=1)
        num_classes = check_int(num_classes, "num_classes", minimum=1)
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise TypeError(
                f"`hidden` must be a sequence of positive ints, got {type(hidden).__name__} {hidden!r}"
            )
        widths = [check_int(h, f"hidden[{i}]", minimum=1) for i, h in enumerate(hidden)]
        batch_norm = check_bool(batch_norm, "batch_norm")
        dropout = check_real(dropout, "dropout", low=0.0, high=1.0, high_open=True)
        self.flatten = nn.Flatten(1)
        layers = []
        previous = in_features
        for width in widths:
            layers.append(_HiddenLayer(previous, width, batch_norm, dropout))
            previous = width
        self.hidden = nn.Sequential(*layers)
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(self.flatten(x)))

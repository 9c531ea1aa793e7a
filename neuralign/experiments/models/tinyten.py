r"""TinyTen: the small all-convolutional network of Kornblith et al. as used by Tatro et al. (eight Conv-BN-ReLU
blocks, global average pooling, a linear classifier; 0.09M parameters).

References
----------
.. [1] S. Kornblith, M. Norouzi, H. Lee, G. Hinton, "Similarity of Neural Network Representations Revisited",
   ICML 2019, arXiv:1905.00414.
.. [2] N. J. Tatro, P.-Y. Chen, P. Das, I. Melnyk, P. Sattigeri, R. Lai, "Optimizing Mode Connectivity via
   Neuron Alignment", NeurIPS 2020, arXiv:2009.02439.
"""

from __future__ import annotations

import torch
from torch import nn

from neuralign._validate import check_int
from neuralign.experiments.models.layers import ConvBNReLU

__all__ = ["TinyTen"]

#: (in, out, kernel, stride, padding) of the 8 TinyTen blocks; ``in`` of block 0 is ``in_channels``.
_TINYTEN_BLOCKS: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 16, 3, 1, 1),
    (16, 16, 3, 1, 1),
    (16, 32, 3, 2, 1),
    (32, 32, 3, 1, 1),
    (32, 32, 3, 1, 1),
    (32, 64, 3, 2, 1),
    (64, 64, 3, 1, 0),
    (64, 64, 1, 1, 0),
)


class TinyTen(nn.Module):
    r"""TinyTen: eight Conv-BN-ReLU blocks, global average pooling and a linear classifier (0.09M parameters).

    The small all-convolutional network of Kornblith et al. [1]_ as used by Tatro et al. [2]_. Every block is
    :math:`h_{l} = \mathrm{ReLU}(\mathrm{BN}_l(W_l * h_{l-1} + b_l))` with a biased convolution:

    ======  ============  ======  ======  =======
    block   channels      kernel  stride  padding
    ======  ============  ======  ======  =======
    0       in -> 16      3       1       1
    1       16 -> 16      3       1       1
    2       16 -> 32      3       2       1
    3       32 -> 32      3       1       1
    4       32 -> 32      3       1       1
    5       32 -> 64      3       2       1
    6       64 -> 64      3       1       0
    7       64 -> 64      1       1       0
    ======  ============  ======  ======  =======

    then ``AdaptiveAvgPool2d(1) -> Flatten -> Linear(64, num_classes)``. A 32x32 input gives feature maps of
    32, 32, 16, 16, 16, 8, 6, 6 pixels; a 28x28 input 28, 28, 14, 14, 14, 7, 5, 5. One definition serves every
    number of classes (the official code's 200-class curve model differs from its base model in block 6; here
    there is only this one).

    Parameters
    ----------
    num_classes : int
        Outputs of the classifier.
    in_channels : int
        Input channels (3 for CIFAR, 1 for MNIST).

    Notes
    -----
    Initialisation: ``xavier_normal_`` for conv and linear weights, biases 0, batch-norm :math:`\gamma=1`,
    :math:`\beta=0`. Module names: ``features.{0..7}.{conv,bn,relu}``, ``pool``, ``flatten``, ``fc``.
    Parameter count: 86,778 for 10 classes, 92,628 for 100.

    References
    ----------
    .. [1] Kornblith et al., "Similarity of Neural Network Representations Revisited", arXiv:1905.00414.
    .. [2] Tatro et al., "Optimizing Mode Connectivity via Neuron Alignment", arXiv:2009.02439.

    Examples
    --------
    >>> model = TinyTen(num_classes=10)
    >>> tuple(model(torch.zeros(2, 3, 32, 32)).shape)
    (2, 10)
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        num_classes = check_int(num_classes, "num_classes", minimum=1)
        in_channels = check_int(in_channels, "in_channels", minimum=1)
        blocks = []
        for i, (c_in, c_out, k, s, p) in enumerate(_TINYTEN_BLOCKS):
            blocks.append(ConvBNReLU(in_channels if i == 0 else c_in, c_out, k, s, p, bias=True))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.pool(x)
        x = self.flatten(x)
        return self.fc(x)


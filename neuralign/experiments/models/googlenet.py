r"""GoogLeNet (Inception v1) adapted to 32x32 inputs as in Tatro et al.: :class:`Inception`,
:class:`InceptionAux`, :class:`GoogLeNet`.

References
----------
.. [1] C. Szegedy et al., "Going Deeper with Convolutions", CVPR 2015, arXiv:1409.4842.
.. [2] N. J. Tatro, P.-Y. Chen, P. Das, I. Melnyk, P. Sattigeri, R. Lai, "Optimizing Mode Connectivity via
   Neuron Alignment", NeurIPS 2020, arXiv:2009.02439.
"""

from __future__ import annotations

import torch
from torch import nn

from neuralign._validate import check_bool, check_int
from neuralign.experiments.models.layers import ConvBNReLU

__all__ = ["Inception", "InceptionAux", "GoogLeNet"]


def _basic_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
    """GoogLeNet's ``BasicConv2d``: conv (no bias) -> BN(eps=1e-3) -> ReLU."""
    return ConvBNReLU(
        in_channels, out_channels, kernel_size, stride, padding, bias=False, batch_norm=True, eps=1e-3
    )


class Inception(nn.Module):
    r"""Inception module: four parallel branches concatenated along channels (Szegedy et al. [1]_).

    .. math::
        y = [\,b_1(x) \,|\, b_2(x) \,|\, b_3(x) \,|\, b_4(x)\,]

    - ``branch1``: 1x1 conv to ``ch1x1``;
    - ``branch2``: 1x1 conv to ``ch3x3red`` -> 3x3 conv to ``ch3x3``;
    - ``branch3``: 1x1 conv to ``ch5x5red`` -> **3x3** conv to ``ch5x5`` (the "5x5" branch uses a 3x3 kernel,
      as in torchvision and in Tatro et al.'s code);
    - ``branch4``: 3x3 max pool (stride 1, padding 1) -> 1x1 conv to ``pool_proj``.

    Every conv is a ``BasicConv2d`` (:class:`ConvBNReLU` with no bias and ``eps=1e-3``). Channels are never
    mixed across branches, so a permutation of the output is block diagonal with offsets
    ``0``, ``ch1x1``, ``ch1x1 + ch3x3`` and ``ch1x1 + ch3x3 + ch5x5``.

    References
    ----------
    .. [1] Szegedy et al., "Going Deeper with Convolutions", arXiv:1409.4842.
    """

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
    ) -> None:
        super().__init__()
        self.branch1 = _basic_conv(in_channels, ch1x1, 1)
        self.branch2 = nn.Sequential(
            _basic_conv(in_channels, ch3x3red, 1), _basic_conv(ch3x3red, ch3x3, 3, 1, 1)
        )
        self.branch3 = nn.Sequential(
            _basic_conv(in_channels, ch5x5red, 1), _basic_conv(ch5x5red, ch5x5, 3, 1, 1)
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            _basic_conv(in_channels, pool_proj, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    r"""GoogLeNet's auxiliary classifier, applied to the output of ``inception4a`` or ``inception4d``.

    ``AdaptiveAvgPool2d(4)`` -> 1x1 ``BasicConv2d`` to 128 -> ``Flatten`` -> ``fc1`` (2048 -> 1024) ->
    ``ReLU`` -> ``Dropout(0.7)`` -> ``fc2`` (1024 -> ``num_classes``).

    The flatten orders features channel-major: feature :math:`16c + 4i + j` is channel :math:`c` at position
    :math:`(i, j)`, so a channel permutation of ``conv`` acts on the columns of ``fc1`` expanded over the 16
    positions.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.conv = _basic_conv(in_channels, 128, 1)
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(2048, 1024)
        self.relu = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(0.7)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.avgpool(x))
        x = self.relu(self.fc1(self.flatten(x)))
        return self.fc2(self.dropout(x))


#: (in, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj) of the nine Inception modules (Szegedy et al.,
#: Table 1).
_INCEPTION_CONFIGS: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "inception3a": (192, 64, 96, 128, 16, 32, 32),
    "inception3b": (256, 128, 128, 192, 32, 96, 64),
    "inception4a": (480, 192, 96, 208, 16, 48, 64),
    "inception4b": (512, 160, 112, 224, 24, 64, 64),
    "inception4c": (512, 128, 128, 256, 24, 64, 64),
    "inception4d": (512, 112, 144, 288, 32, 64, 64),
    "inception4e": (528, 256, 160, 320, 32, 128, 128),
    "inception5a": (832, 256, 160, 320, 32, 128, 128),
    "inception5b": (832, 384, 192, 384, 48, 128, 128),
}


class GoogLeNet(nn.Module):
    r"""GoogLeNet (Inception v1, Szegedy et al. [1]_) adapted to 32x32 inputs as in Tatro et al. [2]_.

    torchvision's layout with these changes: ``conv1`` is 7x7 with **stride 1** (padding 3), ``maxpool1`` and
    ``maxpool4`` are removed, every ``BasicConv2d`` is conv (no bias) -> BN(eps=1e-3) -> ReLU, the "5x5"
    Inception branch is a 3x3 convolution, and both auxiliary classifiers are kept (``aux_logits=True``):

    ``conv1`` 7x7 (in -> 64) -> ``conv2`` 1x1 (64 -> 64) -> ``conv3`` 3x3 (64 -> 192) -> ``maxpool2`` (3,
    stride 2, ceil) -> ``inception3a``, ``3b`` -> ``maxpool3`` -> ``inception4a`` [-> ``aux1``] -> ``4b``,
    ``4c``, ``4d`` [-> ``aux2``] -> ``4e`` -> ``5a``, ``5b`` -> ``avgpool`` (global) -> ``flatten`` ->
    ``dropout`` (0.2) -> ``fc`` (1024 -> ``num_classes``). Spatial sizes for 32x32 inputs: 32 (stem), 16
    (3a-3b), 8 (4a-5b); the auxiliary heads (:class:`InceptionAux`) pool the 8x8 maps to 4x4.

    Parameters
    ----------
    num_classes : int
        Outputs of the main and auxiliary classifiers.
    aux_logits : bool
        Build the two auxiliary classifiers (``aux1`` after ``inception4a``, ``aux2`` after ``inception4d``).
    in_channels : int
        Input channels.

    Returns
    -------
    In train mode with ``aux_logits=True``, ``forward`` returns the tuple ``(logits, aux1, aux2)`` (main head
    first, then the auxiliary heads in network order; torchvision's namedtuple orders them ``aux2, aux1``); in
    eval mode, or without auxiliary heads, it returns the logits tensor. The auxiliary heads are not evaluated
    in eval mode. :func:`neuralign._utils.classification_loss` turns the tuple into
    :math:`\mathrm{CE}(z) + 0.3\,\mathrm{CE}(z_{a1}) + 0.3\,\mathrm{CE}(z_{a2})`.

    Notes
    -----
    Initialisation: conv and linear weights from a normal with std 0.01 truncated at :math:`\pm 2\sigma`,
    linear biases 0 (the official code leaves PyTorch's default uniform bias), batch norm
    :math:`\gamma=1, \beta=0`.

    Parameter count with both auxiliary heads: 9,960,638 for 10 classes and 10,237,388 for 100 classes; the
    paper's "10.24M" is the CIFAR-100 model with its auxiliary heads. Without the auxiliary heads: 5,610,154
    for 10 classes. The body (all convolutions and BNs of the main path) has 5,599,904 parameters; each
    auxiliary head adds :math:`128(c_{in} + 2) + 2048 \cdot 1024 + 1024 + 1025K` for :math:`K` classes.

    References
    ----------
    .. [1] Szegedy et al., "Going Deeper with Convolutions", arXiv:1409.4842.
    .. [2] Tatro et al., "Optimizing Mode Connectivity via Neuron Alignment", arXiv:2009.02439.

    Examples
    --------
    >>> model = GoogLeNet(num_classes=10).eval()
    >>> tuple(model(torch.zeros(1, 3, 32, 32)).shape)
    (1, 10)
    """

    def __init__(self, num_classes: int = 10, aux_logits: bool = True, in_channels: int = 3) -> None:
        super().__init__()
        num_classes = check_int(num_classes, "num_classes", minimum=1)
        aux_logits = check_bool(aux_logits, "aux_logits")
        in_channels = check_int(in_channels, "in_channels", minimum=1)
        self.aux_logits = aux_logits
        self.conv1 = _basic_conv(in_channels, 64, 7, 1, 3)
        self.conv2 = _basic_conv(64, 64, 1)
        self.conv3 = _basic_conv(64, 192, 3, 1, 1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = Inception(*_INCEPTION_CONFIGS["inception3a"])
        self.inception3b = Inception(*_INCEPTION_CONFIGS["inception3b"])
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = Inception(*_INCEPTION_CONFIGS["inception4a"])
        self.inception4b = Inception(*_INCEPTION_CONFIGS["inception4b"])
        self.inception4c = Inception(*_INCEPTION_CONFIGS["inception4c"])
        self.inception4d = Inception(*_INCEPTION_CONFIGS["inception4d"])
        self.inception4e = Inception(*_INCEPTION_CONFIGS["inception4e"])
        self.inception5a = Inception(*_INCEPTION_CONFIGS["inception5a"])
        self.inception5b = Inception(*_INCEPTION_CONFIGS["inception5b"])
        self.aux1: InceptionAux | None = InceptionAux(512, num_classes) if aux_logits else None
        self.aux2: InceptionAux | None = InceptionAux(528, num_classes) if aux_logits else None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(1024, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-0.02, b=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.conv3(self.conv2(self.conv1(x)))
        x = self.maxpool2(x)
        x = self.inception3b(self.inception3a(x))
        x = self.maxpool3(x)
        x = self.inception4a(x)
        with_aux = self.training and self.aux1 is not None and self.aux2 is not None
        aux1 = self.aux1(x) if with_aux else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if with_aux else None
        x = self.inception4e(x)
        x = self.inception5b(self.inception5a(x))
        x = self.fc(self.dropout(self.flatten(self.avgpool(x))))
        if with_aux:
            return x, aux1, aux2
        return x

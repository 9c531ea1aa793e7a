r"""ResNet for 32x32 inputs: the CIFAR ResNet of depth :math:`6n + 2` of He et al. with 1x1-conv shortcuts
(:class:`BasicBlock`, :class:`ResNet`, :func:`resnet20`, :func:`resnet32`; ResNet32 is the ResNet of Tatro et al.).

References
----------
.. [1] K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
   arXiv:1512.03385.
.. [2] N. J. Tatro, P.-Y. Chen, P. Das, I. Melnyk, P. Sattigeri, R. Lai, "Optimizing Mode Connectivity via
   Neuron Alignment", NeurIPS 2020, arXiv:2009.02439.
"""

from __future__ import annotations

import torch
from torch import nn

from neuralign._validate import check_int, check_real
from neuralign.experiments.models.layers import _scaled

__all__ = ["BasicBlock", "ResNet", "resnet20", "resnet32"]


class BasicBlock(nn.Module):
    r"""Residual block: two 3x3 Conv-BN layers with a skip connection and a ReLU after the addition.

    .. math::
        y = \mathrm{ReLU}\big(\mathrm{BN}_2(W_2 * \mathrm{ReLU}(\mathrm{BN}_1(W_1 * x))) + S(x)\big)

    :math:`S` is the identity, or ``downsample`` = 1x1 conv (stride ``stride``, no bias) + BN when the block
    changes the resolution or the channel count (option B of He et al. [1]_). ``relu1`` is the interior
    activation and ``relu2`` the block output; they are distinct modules.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels entering and leaving the block.
    stride : int
        Stride of ``conv1`` (and of the shortcut convolution).

    References
    ----------
    .. [1] He et al., "Deep Residual Learning for Image Recognition", arXiv:1512.03385.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class ResNet(nn.Module):
    r"""CIFAR ResNet of depth :math:`6n + 2` (He et al. [1]_, section 4.2) with 1x1-conv shortcuts.

    Architecture, for channel widths :math:`c = (16w, 32w, 64w)` rounded to integers:

    - stem ``conv1`` 3x3 (``in_channels`` -> :math:`c_1`, no bias) -> ``bn1`` -> ``relu``;
    - ``layer1``, ``layer2``, ``layer3``: :math:`n` :class:`BasicBlock`\ s each with :math:`c_1, c_2, c_3`
      channels; the first block of ``layer2`` and ``layer3`` has stride 2 and a 1x1-conv + BN ``downsample``
      shortcut; every other shortcut is the identity (option B);
    - ``avgpool`` (global average) -> ``flatten`` -> ``fc`` (:math:`c_3` -> ``num_classes``).

    Parameters
    ----------
    depth : int
        :math:`6n + 2` with :math:`n \ge 1` (20, 32, 44, 56, 110, ...).
    num_classes : int
        Outputs of the classifier.
    width : int or float
        Channel multiplier :math:`w > 0`.
    in_channels : int
        Input channels.

    Raises
    ------
    ValueError
        If ``depth`` is not of the form :math:`6n + 2`.

    Notes
    -----
    Initialisation: Kaiming normal (``mode='fan_out'``, ReLU gain) for every convolution, batch norm
    :math:`\gamma=1, \beta=0`, PyTorch's default for ``fc``. Alignment structure (Tatro et al. [2]_ section
    1.6 of our notes): the stem output and the block outputs of ``layer1`` share one permutation (identity
    skips), the block outputs of ``layer2`` and of ``layer3`` one each, and every block interior (``relu1``)
    has its own. Parameter counts for ``width=1`` and 10 classes: ResNet20 272,474; ResNet32 466,906.

    References
    ----------
    .. [1] He et al., "Deep Residual Learning for Image Recognition", arXiv:1512.03385.
    .. [2] Tatro et al., "Optimizing Mode Connectivity via Neuron Alignment", arXiv:2009.02439.

    Examples
    --------
    >>> model = ResNet(20, num_classes=10)
    >>> tuple(model(torch.zeros(2, 3, 32, 32)).shape)
    (2, 10)
    """

    def __init__(self, depth: int, num_classes: int = 10, width: float = 1, in_channels: int = 3) -> None:
        super().__init__()
        depth = check_int(depth, "depth", minimum=1)
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"`depth` must be 6n + 2 with n >= 1 (20, 32, 44, ...), got {depth}")
        num_classes = check_int(num_classes, "num_classes", minimum=1)
        width = check_real(width, "width", low=0.0, low_open=True)
        in_channels = check_int(in_channels, "in_channels", minimum=1)
        self.depth = depth
        self.width = width
        n = (depth - 2) // 6
        c1, c2, c3 = (_scaled(c, width) for c in (16, 32, 64))
        self.conv1 = nn.Conv2d(in_channels, c1, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = self._make_stage(c1, c1, n, stride=1)
        self.layer2 = self._make_stage(c1, c2, n, stride=2)
        self.layer3 = self._make_stage(c2, c3, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(c3, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = self.flatten(x)
        return self.fc(x)


def resnet20(num_classes: int = 10, width: float = 1, in_channels: int = 3) -> ResNet:
    """ResNet20 (:math:`n = 3` blocks per stage; 272,474 parameters for ``width=1``, 10 classes).

    See :class:`ResNet`. He et al., arXiv:1512.03385.

    Examples
    --------
    >>> sum(p.numel() for p in resnet20(10).parameters())
    272474
    """
    return ResNet(20, num_classes=num_classes, width=width, in_channels=in_channels)


def resnet32(num_classes: int = 10, width: float = 1, in_channels: int = 3) -> ResNet:
    """ResNet32 (:math:`n = 5` blocks per stage; 466,906 parameters for ``width=1``, 10 classes).

    The ResNet of Tatro et al. (arXiv:2009.02439, "0.47M"). See :class:`ResNet`. He et al., arXiv:1512.03385.

    Examples
    --------
    >>> sum(p.numel() for p in resnet32(10).parameters())
    466906
    """
    return ResNet(32, num_classes=num_classes, width=width, in_channels=in_channels)

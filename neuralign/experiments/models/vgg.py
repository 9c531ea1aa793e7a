r"""VGG for 32x32 inputs (Simonyan & Zisserman's configurations 'A' and 'D' with batch norm and the common CIFAR
head): :class:`VGG`, :func:`vgg11`, :func:`vgg16`.

References
----------
.. [1] K. Simonyan, A. Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
   ICLR 2015, arXiv:1409.1556.
"""

from __future__ import annotations

import torch
from torch import nn

from neuralign._validate import check_bool, check_int, check_real
from neuralign.experiments.models.layers import ConvBNReLU, _scaled

__all__ = ["VGG", "vgg11", "vgg16"]

#: Simonyan & Zisserman configurations 'A' (VGG11) and 'D' (VGG16); "M" is a 2x2 max pool.
_VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    r"""VGG for 32x32 inputs (Simonyan & Zisserman [1]_) with batch norm and the common CIFAR head.

    Architecture, for a configuration such as 'A' = (64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M):

    - ``features``: each number :math:`c` is a :class:`ConvBNReLU` 3x3, padding 1, with :math:`cw` channels
      (rounded); each "M" a ``MaxPool2d(2, 2, ceil_mode=True)``. Five pools take 32x32 to 1x1 (28x28 also
      reaches 1x1 thanks to ``ceil_mode``; on even sizes ``ceil_mode`` changes nothing);
    - ``avgpool`` = ``AdaptiveAvgPool2d(1)`` (the identity on the 1x1 maps of 32x32 or 28x28 inputs; it lets
      larger inputs through) -> ``flatten``;
    - ``classifier``: ``Linear(C, C) -> ReLU -> Linear(C, C) -> ReLU -> Linear(C, num_classes)`` with
      :math:`C = 512w` (rounded), the usual CIFAR head. No dropout, to keep the function deterministic in
      train mode apart from batch norm. The two hidden linear layers exercise the conv -> flatten -> linear
      permutation path.

    Parameters
    ----------
    config : {"A", "D"}
        The layer configuration (11 or 16 weight layers).
    num_classes : int
        Outputs of the classifier.
    in_channels : int
        Input channels.
    batch_norm : bool
        With batch norm, the convolutions have no bias (it would be cancelled by the BN mean); without it,
        they do.
    width : int or float
        Channel multiplier :math:`w > 0` for the convolutions and the hidden linear layers.

    Notes
    -----
    Initialisation: Kaiming normal (``fan_out``, ReLU gain) for convolutions, :math:`\mathcal N(0, 0.01^2)`
    for linear weights, biases 0, batch norm :math:`\gamma=1, \beta=0`. Parameter counts for ``width=1``, 10
    classes, batch norm: VGG11 9,753,674; VGG16 15,249,354.

    References
    ----------
    .. [1] Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
       arXiv:1409.1556.

    Examples
    --------
    >>> model = VGG("A", num_classes=10, width=0.25)
    >>> tuple(model(torch.zeros(2, 3, 32, 32)).shape)
    (2, 10)
    """

    def __init__(
        self,
        config: str,
        num_classes: int = 10,
        in_channels: int = 3,
        batch_norm: bool = True,
        width: float = 1,
    ) -> None:
        super().__init__()
        if config not in _VGG_CONFIGS:
            raise ValueError(f"unknown VGG config {config!r}; expected one of {sorted(_VGG_CONFIGS)}")
        num_classes = check_int(num_classes, "num_classes", minimum=1)
        in_channels = check_int(in_channels, "in_channels", minimum=1)
        batch_norm = check_bool(batch_norm, "batch_norm")
        width = check_real(width, "width", low=0.0, low_open=True)
        self.config = config
        self.width = width
        layers: list[nn.Module] = []
        channels = in_channels
        for item in _VGG_CONFIGS[config]:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                out = _scaled(int(item), width)
                layers.append(ConvBNReLU(channels, out, 3, 1, 1, bias=not batch_norm, batch_norm=batch_norm))
                channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        hidden = _scaled(512, width)
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=False),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=False),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = self.flatten(x)
        return self.classifier(x)


def vgg11(num_classes: int = 10, in_channels: int = 3, batch_norm: bool = True, width: float = 1) -> VGG:
    """VGG11 (configuration 'A', 8 conv + 3 linear layers) for 32x32 inputs; see :class:`VGG`.

    Simonyan & Zisserman, arXiv:1409.1556.

    Examples
    --------
    >>> sum(p.numel() for p in vgg11(10).parameters())
    9753674
    """
    return VGG("A", num_classes=num_classes, in_channels=in_channels, batch_norm=batch_norm, width=width)


def vgg16(num_classes: int = 10, in_channels: int = 3, batch_norm: bool = True, width: float = 1) -> VGG:
    """VGG16 (configuration 'D', 13 conv + 3 linear layers) for 32x32 inputs; see :class:`VGG`.

    Simonyan & Zisserman, arXiv:1409.1556.

    Examples
    --------
    >>> sum(p.numel() for p in vgg16(10).parameters())
    15249354
    """
    return VGG("D", num_classes=num_classes, in_channels=in_channels, batch_norm=batch_norm, width=width)

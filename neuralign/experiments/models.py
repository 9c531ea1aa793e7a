"""The model zoo: the architectures of Tatro et al. (2020) and common baselines, as plain ``nn.Module``\\ s.

Every model here is written for neuron alignment:

- **Plain layers only.** ``nn.Conv2d``, ``nn.BatchNorm*``, ``nn.Linear``, ``nn.ReLU``, ``nn.MaxPool2d``,
  ``nn.AdaptiveAvgPool2d``, ``nn.Flatten``, ``nn.Dropout``; no curve layers and no custom autograd. Curves and
  permutations act on the state dict, so a model here is always an end point or a point of a curve.
- **Traceable by** :func:`torch.fx.symbolic_trace`. No Python control flow depends on tensor values; the only
  branches are on Python attributes fixed at construction (``downsample is None``, ``bn is None``) and on
  ``self.training`` (GoogLeNet's auxiliary heads), so a trace taken in train mode and one taken in eval mode
  are each exact for that mode.
- **One ReLU module per call site.** Alignment taps post-activations per call site (a forward hook on each
  ``nn.ReLU`` module, or the matching fx node), so no ``nn.ReLU`` object is ever called twice in one forward
  pass: a residual block owns ``relu1`` (interior) and ``relu2`` (after the skip addition), a classifier owns
  one ReLU per hidden layer. Every ReLU is ``inplace=False`` so that a hook on the preceding BatchNorm still
  sees the pre-activation.
- **Stable names.** Parameter names follow torchvision where an equivalent exists (``conv1``, ``bn1``,
  ``downsample.0``, ``inception4a.branch2.1.conv``, ``aux1.fc1``, ``fc``).

Randomness: ``nn.Module`` initialisers draw from the *global* torch RNG (there is no ``generator=`` argument
on ``nn.init``). :func:`build_model` therefore takes ``seed=``: with a seed the model is built inside
``torch.random.fork_rng()`` after ``torch.manual_seed(seed)``, so that two builds with the same seed have
identical weights and the caller's global RNG state is left exactly as it was. Without a seed the global RNG
is used (and advanced), as for any ``nn.Module``.

References
----------
.. [1] K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
   arXiv:1512.03385.
.. [2] K. Simonyan, A. Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
   ICLR 2015, arXiv:1409.1556.
.. [3] C. Szegedy et al., "Going Deeper with Convolutions", CVPR 2015, arXiv:1409.4842.
.. [4] S. Kornblith, M. Norouzi, H. Lee, G. Hinton, "Similarity of Neural Network Representations Revisited",
   ICML 2019, arXiv:1905.00414.
.. [5] N. J. Tatro, P.-Y. Chen, P. Das, I. Melnyk, P. Sattigeri, R. Lai, "Optimizing Mode Connectivity via
   Neuron Alignment", NeurIPS 2020, arXiv:2009.02439.

Why one module: the zoo's architectures share their building blocks and the registry behind
:func:`build_model` (with the torchvision:/timm: adapters), and are read as one catalogue.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from neuralign.errors import MissingDependencyError

logger = logging.getLogger(__name__)

__all__ = [
    "ConvBNReLU",
    "TinyTen",
    "BasicBlock",
    "ResNet",
    "resnet20",
    "resnet32",
    "VGG",
    "vgg11",
    "vgg16",
    "Inception",
    "InceptionAux",
    "GoogLeNet",
    "MLP",
    "build_model",
    "available_models",
]


# ------------------------------------------------------------------------------------------------------------
# validation helpers (public boundary)
# ------------------------------------------------------------------------------------------------------------
def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return int(value)


def _check_width(width: Any) -> float:
    if isinstance(width, bool) or not isinstance(width, numbers.Real):
        raise TypeError(f"`width` must be an int or float > 0, got {type(width).__name__} {width!r}")
    if not (math.isfinite(float(width)) and width > 0):
        raise ValueError(f"`width` must be a finite number > 0, got {width!r}")
    return float(width)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__} {value!r}")
    return value


def _check_probability(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a float in [0, 1), got {type(value).__name__} {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")
    return float(value)


def _scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded half up to an integer, at least 1."""
    return max(1, int(math.floor(channels * width + 0.5)))


# ------------------------------------------------------------------------------------------------------------
# building block shared by TinyTen, VGG and GoogLeNet
# ------------------------------------------------------------------------------------------------------------
class ConvBNReLU(nn.Module):
    r"""Convolution, optional batch norm, ReLU: :math:`y = \mathrm{ReLU}(\mathrm{BN}(W * x + b))`.

    The block of TinyTen and VGG, and GoogLeNet's ``BasicConv2d`` (``bias=False``, ``eps=1e-3``).

    Parameters
    ----------
    in_channels, out_channels : int
        Channels of the input and output.
    kernel_size, stride, padding : int
        Convolution geometry.
    bias : bool
        Whether the convolution has a bias.
    batch_norm : bool
        Whether a ``BatchNorm2d(out_channels, eps=eps)`` follows the convolution (attribute ``bn`` is ``None``
        otherwise).
    eps : float
        Batch-norm epsilon.

    Examples
    --------
    >>> block = ConvBNReLU(3, 8, kernel_size=3, padding=1)
    >>> tuple(block(torch.zeros(2, 3, 5, 5)).shape)
    (2, 8, 5, 5)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 0,
        *,
        bias: bool = True,
        batch_norm: bool = True,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=eps) if batch_norm else None
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.relu(x)


# ------------------------------------------------------------------------------------------------------------
# TinyTen
# ------------------------------------------------------------------------------------------------------------
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
        num_classes = _check_positive_int(num_classes, "num_classes")
        in_channels = _check_positive_int(in_channels, "in_channels")
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


# ------------------------------------------------------------------------------------------------------------
# ResNet for 32x32 inputs
# ------------------------------------------------------------------------------------------------------------
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
        depth = _check_positive_int(depth, "depth")
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"`depth` must be 6n + 2 with n >= 1 (20, 32, 44, ...), got {depth}")
        num_classes = _check_positive_int(num_classes, "num_classes")
        width = _check_width(width)
        in_channels = _check_positive_int(in_channels, "in_channels")
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


# ------------------------------------------------------------------------------------------------------------
# VGG for 32x32 inputs
# ------------------------------------------------------------------------------------------------------------
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
        num_classes = _check_positive_int(num_classes, "num_classes")
        in_channels = _check_positive_int(in_channels, "in_channels")
        batch_norm = _check_bool(batch_norm, "batch_norm")
        width = _check_width(width)
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


# ------------------------------------------------------------------------------------------------------------
# GoogLeNet for 32x32 inputs
# ------------------------------------------------------------------------------------------------------------
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
        num_classes = _check_positive_int(num_classes, "num_classes")
        aux_logits = _check_bool(aux_logits, "aux_logits")
        in_channels = _check_positive_int(in_channels, "in_channels")
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


# ------------------------------------------------------------------------------------------------------------
# MLP
# ------------------------------------------------------------------------------------------------------------
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
        in_features = _check_positive_int(in_features, "in_features")
        num_classes = _check_positive_int(num_classes, "num_classes")
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise TypeError(
                f"`hidden` must be a sequence of positive ints, got {type(hidden).__name__} {hidden!r}"
            )
        widths = [_check_positive_int(h, f"hidden[{i}]") for i, h in enumerate(hidden)]
        batch_norm = _check_bool(batch_norm, "batch_norm")
        dropout = _check_probability(dropout, "dropout")
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


# ------------------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------------------
def _tinyten(num_classes: int, in_channels: int = 3) -> nn.Module:
    return TinyTen(num_classes=num_classes, in_channels=in_channels)


def _googlenet(num_classes: int, aux_logits: bool = True, in_channels: int = 3) -> nn.Module:
    return GoogLeNet(num_classes=num_classes, aux_logits=aux_logits, in_channels=in_channels)


def _mlp(
    num_classes: int,
    in_features: int,
    hidden: Sequence[int] = (512, 512),
    batch_norm: bool = False,
    dropout: float = 0.0,
) -> nn.Module:
    return MLP(in_features, num_classes, hidden=hidden, batch_norm=batch_norm, dropout=dropout)


_MODELS: dict[str, Callable[..., nn.Module]] = {
    "tinyten": _tinyten,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "googlenet": _googlenet,
    "mlp": _mlp,
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`, in registry order.

    Examples
    --------
    >>> available_models()
    ['tinyten', 'resnet20', 'resnet32', 'vgg11', 'vgg16', 'googlenet', 'mlp']
    """
    return list(_MODELS)


_PREFIXES = ("torchvision", "timm")


def _external_factory(name: str) -> tuple[str, Callable[..., nn.Module]]:
    """``(canonical name, factory(num_classes, **kwargs))`` of a ``torchvision:<name>`` or ``timm:<name>`` model."""
    prefix, _, model = name.partition(":")
    prefix = prefix.lower()
    if prefix not in _PREFIXES or not model:
        raise ValueError(
            f"unknown model {name!r}; expected one of {available_models()}, torchvision:<name> or timm:<name>"
        )
    if prefix == "torchvision":
        import torchvision.models

        known = torchvision.models.list_models()
        if model not in known:
            close = difflib.get_close_matches(model, known, n=3)
            hint = f"; did you mean {close}?" if close else "; see torchvision.models.list_models()"
            raise ValueError(f"unknown torchvision model {model!r}{hint}")

        def build(num_classes: int, **kwargs: Any) -> nn.Module:
            return torchvision.models.get_model(model, weights=None, num_classes=num_classes, **kwargs)

        return f"torchvision:{model}", build
    try:
        import timm
    except ImportError as exc:
        raise MissingDependencyError(
            f"model {name!r} needs timm, which is not installed; install the extra: pip install 'neuralign[timm]'"
        ) from exc
    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=3)
        hint = f"; did you mean {close}?" if close else "; see timm.list_models()"
        raise ValueError(f"unknown timm model {model!r}{hint}")

    def build_timm(num_classes: int, **kwargs: Any) -> nn.Module:
        return timm.create_model(model, pretrained=False, num_classes=num_classes, **kwargs)

    return f"timm:{model}", build_timm


def build_model(name: str, num_classes: int, *, seed: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a model of the zoo, of torchvision or of timm by name, optionally with a seeded, RNG-neutral
    initialisation.

    Parameters
    ----------
    name : str
        One of :func:`available_models` (case-insensitive): ``tinyten``, ``resnet20``, ``resnet32``,
        ``vgg11``, ``vgg16``, ``googlenet``, ``mlp``; or ``"torchvision:<name>"`` for any builder of
        ``torchvision.models`` (``torchvision.models.list_models()``, built without pretrained weights), or
        ``"timm:<name>"`` for any model of timm (``timm.list_models()``, ``pretrained=False``; needs the optional
        extra ``neuralign[timm]``).
    num_classes : int
        Outputs of the classifier.
    seed : int or None
        With an int, the model is built inside ``torch.random.fork_rng(devices=[])`` after
        ``torch.manual_seed(seed)``: two builds with the same seed have identical weights, and the caller's
        global CPU RNG state is unchanged afterwards. With ``None``, initialisation draws from (and advances)
        the global RNG. Models are built on the CPU; move them with ``.to(device)``.
    **kwargs
        Keyword arguments of the model: ``in_channels`` for every convolutional model; ``width`` for
        ``resnet*`` and ``vgg*``; ``batch_norm`` for ``vgg*`` and ``mlp``; ``aux_logits`` for ``googlenet``;
        ``in_features`` (required), ``hidden`` and ``dropout`` for ``mlp``. For ``torchvision:`` and ``timm:``
        models, any keyword argument of the builder (e.g. ``width_per_group`` for torchvision's
        ``wide_resnet50_2``, ``in_chans`` for timm).

    Returns
    -------
    torch.nn.Module
        The model, in train mode, on the CPU, in float32.

    Raises
    ------
    ValueError
        Unknown ``name`` (for torchvision and timm, with the closest names), or a bad value of a model argument.
    TypeError
        ``name`` is not a string, an argument the model does not take, a missing required argument, an
        argument of the wrong type, or a ``seed`` that is not an int.
    MissingDependencyError
        ``timm:<name>`` without timm installed (an :class:`ImportError` naming the extra ``neuralign[timm]``).

    Examples
    --------
    >>> a = build_model("TinyTen", 10, seed=0)
    >>> b = build_model("tinyten", 10, seed=0)
    >>> all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    True
    >>> build_model("mlp", 10, in_features=64, hidden=(16,)).fc.in_features
    16
    >>> build_model("torchvision:resnet18", 7, seed=0).fc.out_features
    7
    """
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a str, got {type(name).__name__} {name!r}")
    key = name.lower()
    if ":" in name:
        key, factory = _external_factory(name)
        external = True
    elif key in _MODELS:
        factory = _MODELS[key]
        external = False
    else:
        raise ValueError(
            f"unknown model {name!r}; expected one of {available_models()}, torchvision:<name> or timm:<name>"
        )
    if not external:
        params = inspect.signature(factory).parameters
        accepted = [p for p in params if p != "num_classes"]
        for arg in kwargs:
            if arg not in accepted:
                raise TypeError(
                    f"model {key!r} got an unexpected keyword argument {arg!r}; it accepts {accepted}"
                )
        for arg, p in params.items():
            if arg != "num_classes" and p.default is inspect.Parameter.empty and arg not in kwargs:
                raise TypeError(f"model {key!r} is missing the required keyword argument {arg!r}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"`seed` must be an int or None, got {type(seed).__name__} {seed!r}")
        if not 0 <= seed < 2**64:
            raise ValueError(f"`seed` must be in [0, 2**64), got {seed}")
    try:
        if seed is None:
            return factory(num_classes=num_classes, **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = factory(num_classes=num_classes, **kwargs)
    except TypeError as exc:
        if not external:
            raise
        raise TypeError(f"model {key!r}: {_first_line(exc)}") from exc
    logger.debug("built %s (%d classes) with seed %d", key, num_classes, seed)
    return model


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def smallest_input_size(model: nn.Module, in_channels: int, image_size: tuple[int, int], *,
                        max_size: int = 256) -> int | None:
    """Whether ``model`` can take images of ``image_size``: ``None`` if it can, else the smallest square side length
    (up to ``max_size``) it can take, or ``0`` if none up to ``max_size`` works.

    One forward pass of a single zero image per size tried, in eval mode, without gradients (the model is not
    changed: its mode is restored).

    Examples
    --------
    >>> smallest_input_size(build_model("tinyten", 10, in_channels=1), 1, (8, 8))
    9
    >>> smallest_input_size(build_model("tinyten", 10, in_channels=1), 1, (28, 28)) is None
    True
    """

    def fits(h: int, w: int) -> bool:
        param = next(model.parameters(), None)
        x = torch.zeros(1, in_channels, h, w, device=param.device if param is not None else None)
        try:
            model(x)
        except RuntimeError:
            return False
        return True

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if fits(*image_size):
                return None
            return next((n for n in range(max(image_size) + 1, max_size + 1) if fits(n, n)), 0)
    finally:
        model.train(was_training)

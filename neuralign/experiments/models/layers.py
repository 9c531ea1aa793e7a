r"""Building blocks shared by the zoo's convolutional networks: :class:`ConvBNReLU` (the block of TinyTen and VGG,
and GoogLeNet's ``BasicConv2d``) and the channel-width rounding of the ``width`` multiplier.

References
----------
.. [1] S. Kornblith, M. Norouzi, H. Lee, G. Hinton, "Similarity of Neural Network Representations Revisited",
   ICML 2019, arXiv:1905.00414 (TinyTen).
.. [2] K. Simonyan, A. Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
   ICLR 2015, arXiv:1409.1556 (VGG).
.. [3] C. Szegedy et al., "Going Deeper with Convolutions", CVPR 2015, arXiv:1409.4842 (GoogLeNet).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ConvBNReLU"]


def _scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded half up to an integer, at least 1."""
    return max(1, int(math.floor(channels * width + 0.5)))


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

"""The model zoo: the architectures of Tatro et al. (2020) and common baselines, as plain ``nn.Module``\\ s, and
:func:`build_model`, which builds any of them (or a torchvision or timm model) by name with a seeded initialisation.

One module per family: :mod:`~neuralign.experiments.models.layers` (:class:`ConvBNReLU`),
:mod:`~neuralign.experiments.models.tinyten`, :mod:`~neuralign.experiments.models.resnet`,
:mod:`~neuralign.experiments.models.vgg`, :mod:`~neuralign.experiments.models.googlenet`,
:mod:`~neuralign.experiments.models.mlp`; the registry and the conventions every model follows (plain layers,
traceable by ``torch.fx``, one ReLU module per call site, stable names) in :mod:`~neuralign.experiments.models.zoo`.

References
----------
.. [1] K. He et al., "Deep Residual Learning for Image Recognition", arXiv:1512.03385.
.. [2] K. Simonyan, A. Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
   arXiv:1409.1556.
.. [3] C. Szegedy et al., "Going Deeper with Convolutions", arXiv:1409.4842.
.. [4] S. Kornblith et al., "Similarity of Neural Network Representations Revisited", arXiv:1905.00414.
.. [5] N. J. Tatro et al., "Optimizing Mode Connectivity via Neuron Alignment", arXiv:2009.02439.
"""

from neuralign.experiments.models.googlenet import GoogLeNet, Inception, InceptionAux
from neuralign.experiments.models.layers import ConvBNReLU
from neuralign.experiments.models.lm import TinyLM
from neuralign.experiments.models.mlp import MLP
from neuralign.experiments.models.resnet import BasicBlock, ResNet, resnet20, resnet32
from neuralign.experiments.models.tinyten import TinyTen
from neuralign.experiments.models.vgg import VGG, vgg11, vgg16
from neuralign.experiments.models.vit import ViT
from neuralign.experiments.models.zoo import available_models, build_model, builder_kwargs, smallest_input_size

__all__ = [
    "builder_kwargs",
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
    "ViT",
    "TinyLM",
    "build_model",
    "available_models",
    "smallest_input_size",
]

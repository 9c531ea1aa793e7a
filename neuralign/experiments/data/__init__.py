"""Datasets, batched augmentation and loaders for the experiments of Tatro et al. (2020).

:func:`load_data` is the single entry point: it reads a dataset into memory as uint8 images and returns a
:class:`DataBundle` with the paper's ``train``, ``train_eval``, ``test`` and ``align`` loaders. The modules:

- :mod:`~neuralign.experiments.data.augment`: batched augmentation steps, :class:`BatchTransform`, the recipes
  :data:`AUGMENTATIONS` and the normalisation constants;
- :mod:`~neuralign.experiments.data.loader`: :class:`ArrayDataset` and the resumable :class:`ArrayLoader`;
- :mod:`~neuralign.experiments.data.sources`: :class:`SourceData`, the dataset registry, ``.npz``, torchvision and
  ``digits`` sources, :func:`load_source`, :func:`export_npz`;
- :mod:`~neuralign.experiments.data.folders`: ``imagefolder:PATH`` and Tiny ImageNet, listed and decoded with
  torchvision's ``ImageFolder`` helpers;
- :mod:`~neuralign.experiments.data.bundle`: :class:`DataBundle`, :func:`load_data`, :func:`stratified_indices`;
- :mod:`~neuralign.experiments.data.text`: the byte-level text corpus ``pydoc`` (:func:`pydoc_corpus`,
  :func:`byte_windows`, :class:`TokenIds`).
"""

from __future__ import annotations

from neuralign.experiments.data.augment import (
    AUGMENTATIONS,
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    BatchTransform,
    ColorJitter,
    Normalize,
    RandomAffine,
    RandomCrop,
    RandomHorizontalFlip,
    make_transform,
)
from neuralign.experiments.data.bundle import DataBundle, load_data, stratified_indices
from neuralign.experiments.data.folders import reorganize_tinyimagenet_val
from neuralign.experiments.data.loader import ArrayDataset, ArrayLoader
from neuralign.experiments.data.sources import (
    KNOWN_DATASETS,
    SourceData,
    canonical_dataset,
    digits_path,
    export_npz,
    load_source,
)
from neuralign.experiments.data.text import TextCorpus, TokenIds, byte_windows, pydoc_corpus

__all__ = [
    "KNOWN_DATASETS",
    "AUGMENTATIONS",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "RandomHorizontalFlip",
    "RandomCrop",
    "RandomAffine",
    "ColorJitter",
    "Normalize",
    "BatchTransform",
    "make_transform",
    "ArrayDataset",
    "ArrayLoader",
    "SourceData",
    "DataBundle",
    "load_source",
    "load_data",
    "stratified_indices",
    "export_npz",
    "reorganize_tinyimagenet_val",
    "digits_path",
    "canonical_dataset",
    "TextCorpus",
    "TokenIds",
    "byte_windows",
    "pydoc_corpus",
]

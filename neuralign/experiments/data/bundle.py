"""The single entry point :func:`load_data`: a dataset read into memory, subsets drawn, and the paper's loaders.

:func:`load_data` reads a source (:func:`~neuralign.experiments.data.sources.load_source`), resizes it once if asked,
picks the normalisation statistics and the training augmentation of its family, draws the ``train_size`` /
``test_size`` / ``align_size`` subsets (the first images, or class-balanced ones from :func:`stratified_indices`) and
returns a frozen :class:`DataBundle` with the ``train``, ``train_eval``, ``test`` and ``align`` loaders of the paper.

References
----------
.. [1] N. J. Tatro, P.-Y. Chen, P. Das, I. Melnyk, P. Sattigeri, R. Lai, "Optimizing Mode Connectivity via
   Neuron Alignment", NeurIPS 2020, arXiv:2009.02439.
"""

from __future__ import annotations

import hashlib
import logging
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from neuralign._utils import as_generator, stable_seed
from neuralign._validate import check_bool, check_choice, check_int, check_real, is_real
from neuralign.experiments.data.augment import AUGMENTATIONS, INTERPOLATIONS, make_transform
from neuralign.experiments.data.loader import ArrayDataset, ArrayLoader
from neuralign.experiments.data.sources import FAMILY_AUGMENTATION, FAMILY_STATS, SourceData, load_source
from neuralign.experiments.data.text import TokenIds

__all__ = ["DataBundle", "load_data", "stratified_indices"]

logger = logging.getLogger(__name__)

#: Image folders compute their normalisation statistics on at most this many training images.
_STATS_SAMPLE = 10000


def stratified_indices(
    labels: torch.Tensor, size: int, *, generator: torch.Generator | int | None = None
) -> torch.Tensor:
    """A class-balanced random subset of ``size`` indices, sorted ascending.

    Class :math:`k` with :math:`n_k` of the :math:`N` labels gets :math:`\\lfloor s\\, n_k / N \\rfloor` indices
    plus one for the classes with the largest remainders until :math:`s` are chosen (ties to the smaller class
    index), so that per-class counts are proportional to the class frequencies up to one; within a class the
    indices are drawn uniformly without replacement.

    Parameters
    ----------
    labels : torch.Tensor
        Integer ``(N,)``.
    size : int
        How many indices, ``1 <= size <= N``.
    generator : torch.Generator or int or None
        Randomness of the draw within each class.

    Returns
    -------
    torch.LongTensor
        ``(size,)``, sorted.

    Examples
    --------
    >>> idx = stratified_indices(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), 4, generator=0)
    >>> torch.bincount(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])[idx]).tolist()
    [2, 2]
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    n = labels.shape[0]
    check_int(size, "size", minimum=1)
    if size > n:
        raise ValueError(f"`size`={size} exceeds the {n} labels")
    gen = as_generator(generator)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.to(torch.float64) * size / n
    quota = torch.floor(exact).to(torch.int64)
    remainder = exact - quota
    short = size - int(quota.sum())
    if short > 0:
        order = sorted(range(len(classes)), key=lambda i: (-float(remainder[i]), i))
        for i in order[:short]:
            quota[i] += 1
    chosen = []
    for c, q in zip(classes.tolist(), quota.tolist()):
        members = (labels == c).nonzero().flatten()
        perm = torch.randperm(members.numel(), generator=gen)[:q]
        chosen.append(members[perm])
    return torch.sort(torch.cat(chosen)).values


def _resolve_size(value: int | float | None, total: int, name: str) -> int:
    """How many of ``total`` images a subset-size option keeps: ``None`` all, an int that count, a float that
    fraction (at least one image)."""
    if value is None:
        return total
    if not is_real(value) or not isinstance(value, (numbers.Integral, float)):
        raise TypeError(
            f"`{name}` must be an int (a count), a float in (0, 1] (a fraction) or None, "
            f"got {type(value).__name__} {value!r}"
        )
    if isinstance(value, float):
        fraction = check_real(value, name, low=0.0, high=1.0, low_open=True)
        return max(1, int(round(fraction * total)))
    count = check_int(value, name, minimum=1)
    if count > total:
        raise ValueError(f"`{name}`={count} exceeds the {total} images available")
    return count


def _select(labels: torch.Tensor, size: int, stratified: bool, seed: int, which: str) -> torch.Tensor:
    if size >= labels.shape[0]:
        return torch.arange(labels.shape[0])
    if stratified:
        return stratified_indices(labels, size, generator=stable_seed("subset", seed, which))
    return torch.arange(size)


def _sha256_short(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (float64 accumulation, chunked)."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, images.shape[0], 4096):
        chunk = images[start : start + 4096].to(torch.float64).div_(255.0)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.pow(2).sum(dim=(0, 2, 3))
        count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _resize_images(images: torch.Tensor, size: list[int]) -> torch.Tensor:
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    chunks = [
        TF.resize(images[i : i + 4096], size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        for i in range(0, images.shape[0], 4096)
    ]
    return torch.cat(chunks).contiguous()


def _resize_arg(resize: int | Sequence[int] | None) -> list[int] | None:
    """``resize`` as torchvision's ``size`` argument: ``[side]`` or ``[H, W]`` (``None`` stays ``None``)."""
    if resize is None:
        return None
    if isinstance(resize, Sequence) and not isinstance(resize, str):
        if len(resize) != 2:
            raise TypeError(f"`resize` must be an int, a pair of ints (H, W) or None, got {resize!r}")
        return [check_int(v, f"resize[{i}]", minimum=1) for i, v in enumerate(resize)]
    return [check_int(resize, "resize", minimum=1)]


@dataclass(frozen=True)
class DataBundle:
    """The loaders of one dataset, as returned by :func:`load_data`.

    Attributes
    ----------
    name : str
        Canonical dataset name.
    train : ArrayLoader
        Training set, shuffled and augmented each epoch (``train.generator`` drives both; see
        :meth:`ArrayLoader.state_dict` to checkpoint it).
    train_eval : ArrayLoader
        Training set with test-time transforms, fixed order (for evaluating training accuracy, or BN
        re-estimation without augmentation; the paper re-estimates BN on ``train``).
    test : ArrayLoader
        Test set (Tiny ImageNet: the validation split), test-time transforms, fixed order.
    align : ArrayLoader
        The paper's alignment set: the first ``align_size`` training images (or a stratified subset), test-time
        transforms, fixed order.
    num_classes, in_channels : int
        Number of classes and image channels (a text dataset: the vocabulary, 256 bytes, and 0 channels).
    image_size : (int, int)
        ``(H, W)`` of the images the model sees (after ``resize``); a text dataset: ``(1, T)``.
    class_names : tuple of str
        Class names.
    mean, std : tuple of float or None
        Normalisation statistics applied (``None`` with ``normalize=False``: inputs in [0, 1]).
    provenance : dict
        How the bundle was built (source, sizes, options, index fingerprints); see :meth:`describe`.
    context_length : int or None
        A text dataset's tokens per sequence ``T``: its loaders yield int64 ``(B, T)`` inputs and ``(B, T)``
        next-token targets; ``None`` for images.
    """

    name: str
    train: ArrayLoader
    train_eval: ArrayLoader
    test: ArrayLoader
    align: ArrayLoader
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    class_names: tuple[str, ...]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    provenance: dict[str, Any] = field(default_factory=dict)
    context_length: int | None = None

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable summary: name, shapes, sizes of each split, statistics, provenance."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": list(self.image_size),
            "sizes": {
                "train": len(self.train.dataset),
                "test": len(self.test.dataset),
                "align": len(self.align.dataset),
            },
            "batch_size": self.train.batch_size,
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
            "class_names": list(self.class_names),
            **({"context_length": self.context_length} if self.context_length is not None else {}),
            **{k: v for k, v in self.provenance.items() if k not in ("sizes",)},
        }


def load_data(
    name_or_path: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    download: bool = False,
    batch_size: int = 128,
    eval_batch_size: int = 256,
    augment: bool = True,
    augmentation: str | None = None,
    normalize: bool = True,
    resize: int | tuple[int, int] | None = None,
    train_size: int | float | None = None,
    test_size: int | float | None = None,
    align_size: int | float | None = None,
    stratified: bool = False,
    subset_seed: int = 0,
    generator: torch.Generator | int | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    interpolation: str = "nearest",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> DataBundle:
    """Load a dataset into memory and build the paper's ``train``, ``train_eval``, ``test`` and ``align`` loaders.

    Each image :math:`x \\in \\{0..255\\}^{C \\times H \\times W}` is fed as :math:`(x/255 - \\mu_c)/\\sigma_c`
    after the training augmentation (``train``) or as is (the other loaders).

    Parameters
    ----------
    name_or_path : str or path-like
        One of :data:`KNOWN_DATASETS` (case, ``-`` and ``_`` are ignored) or a path:

        - ``"cifar10"``, ``"cifar100"``, ``"mnist"``: torchvision's layout under ``root``
          (``cifar-10-batches-py``, ``cifar-100-python``, ``MNIST/raw``); if absent, an ``.npz`` under ``root``
          whose name is the dataset's (``cifar10.npz``, ``CIFAR-10.npz``, ...); else a download with
          ``download=True``.
        - ``"tinyimagenet"``: ``root/tiny-imagenet-200`` or ``root`` itself holding ``train/<wnid>/images/*``
          and ``val/images/*`` + ``val/val_annotations.txt`` (read from the annotations, nothing is moved) or
          ``val/<wnid>/*`` (see :func:`reorganize_tinyimagenet_val`). Classes are the sorted wnids (torchvision's
          ``ImageFolder`` order), so the training set is sorted by class: use ``stratified=True`` for subsets.
          The 110,000 JPEGs are decoded at each call; :func:`export_npz` caches them.
        - ``"digits"``: the 1,797 8x8 UCI handwritten digits shipped in the package (1,437 train / 360 test;
          see ``_data/DIGITS.md``); works offline. Use ``resize=16`` for TinyTen (it needs at least 12x12).
        - ``"pydoc"`` or ``"pydoc:T"``: a byte-level language-modelling corpus, the Python documentation topics
          of the running interpreter (``pydoc_data.topics``, PSF-2.0; :mod:`~neuralign.experiments.data.text`),
          split by de-duplicated paragraph, in next-token windows of ``T`` bytes (default 64); works offline.
          Loaders yield int64 ``(B, T)`` inputs and ``(B, T)`` targets (for ``tinylm``); the sizes count windows;
          ``resize``, ``mean``/``std``, ``augmentation`` and ``stratified`` do not apply (refused), ``augment``
          and ``normalize`` are ignored.
        - a path ending in ``.npz``: arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (uint8 images
          ``(N, H, W)`` or ``(N, H, W, C)``, integer labels ``0..K-1``) and optionally ``class_names``. A file
          named like a known dataset (``cifar10.npz``, ``mnist.npz``) gets that dataset's augmentation and
          statistics.
        - a folder path: a Tiny ImageNet layout.
        - ``"imagefolder:PATH"``: torchvision's ``ImageFolder`` layout, ``PATH/train/<class>/*`` and
          ``PATH/val/<class>/*`` (or ``PATH/test/``); classes are the sorted folder names of ``train/``, images
          are decoded as RGB at ``resize`` (an int: square) or else at the most common size of 64 sampled
          training images (others resized to it), recorded in ``describe()``; augmentation ``flip_crop``;
          normalisation statistics computed on up to 10,000 training images unless ``mean`` and ``std`` are
          given.
    root : path-like, optional
        Folder of the named datasets; default ``$NEURALIGN_DATA``, else ``./data``.
    download : bool
        Download a missing CIFAR-10/100 or MNIST through torchvision, or Tiny ImageNet's zip (needs network).
    batch_size : int
        Batch size of ``train`` (the paper: 128; 64 for TinyTen on CIFAR-10).
    eval_batch_size : int
        Batch size of ``train_eval``, ``test`` and ``align`` (does not change their results).
    augment : bool
        Augment ``train``; ``False`` gives it the test-time transform (still shuffled).
    augmentation : str, optional
        Training recipe from :data:`AUGMENTATIONS`; default by dataset: ``"cifar"`` (CIFAR-10/100),
        ``"tinyimagenet"`` (Tiny ImageNet; at ``resize=32`` this is the paper's GoogLeNet variant, padding 4),
        ``"crop"`` (MNIST, digits, other ``.npz``: no flips).
    normalize : bool
        Standardise every loader with the dataset's mean and std: the paper's constants for CIFAR
        (:data:`CIFAR_MEAN`, :data:`CIFAR_STD`), ImageNet's for Tiny ImageNet, :data:`MNIST_MEAN` /
        :data:`MNIST_STD` for MNIST, and for digits and other ``.npz`` files the per-channel statistics of the
        full training split (after ``resize``). ``False`` keeps inputs in [0, 1] (the paper's "adversarial"
        transforms: same augmentation, no Normalize).
    resize : int or (int, int), optional
        Resize all images once, at load time, with antialiased bilinear interpolation on the uint8 images (an
        int sets the shorter side, like torchvision's ``Resize``); e.g. ``16`` for digits, ``32`` for the
        GoogLeNet Tiny ImageNet runs.
    train_size, test_size : int or float, optional
        Keep only this many training / test images (an int count, or a float fraction in (0, 1]); ``None``
        keeps all. Which ones: the first ones, or a stratified subset when ``stratified``.
    align_size : int or float, optional
        Size of ``align``, drawn from the training set in use (after ``train_size``): the first ``align_size``
        images, or a stratified subset. ``None`` means the paper's 10,000, or the whole training set if smaller.
    stratified : bool
        Draw every subset (``train_size``, ``test_size``, ``align_size``) class-balanced at random with
        :func:`stratified_indices`, kept in dataset order; otherwise take the first images (the paper's
        ``Subset(range(10000))``; fair for CIFAR whose files are shuffled, class-sorted for Tiny ImageNet).
    subset_seed : int
        Seed of the stratified subsets. Independent of ``generator``, so that models trained with different
        seeds see the same data.
    generator : torch.Generator or int or None
        Drives ``train``'s shuffling and augmentation (``bundle.train.generator``); an int seeds a new one,
        ``None`` seeds one from torch's global RNG.
    num_workers : int
        Worker processes per loader (0: build batches in the calling process, usually fastest here).
    pin_memory : bool
        Pin batches for faster host-to-GPU copies (only when CUDA is available).
    drop_last : bool
        Drop ``train``'s last incomplete batch.
    interpolation : {"nearest", "bilinear"}
        Sampling of the rotation/scale augmentation (torchvision's ``RandomAffine`` default is nearest).
    mean, std : sequence of float, optional
        Normalisation statistics (one per channel, in [0, 1] units) instead of the dataset's; both or neither.

    Returns
    -------
    DataBundle

    Raises
    ------
    DataError
        Missing data (the message says where it looked and how to get it), a corrupt or mislabelled ``.npz`` or
        folder.
    ValueError
        Unknown dataset or augmentation name, sizes out of range.
    TypeError
        Options of the wrong kind.

    Notes
    -----
    All images are held in memory as uint8 (CIFAR-10: 180 MB). Subsets are drawn in this order: ``train_size``
    and ``test_size`` from the full splits, then ``align_size`` from the kept training images; kept images stay
    in dataset order. ``describe()`` records the choices and short SHA-256 fingerprints of the chosen indices.

    References
    ----------
    .. [1] Tatro et al., "Optimizing Mode Connectivity via Neuron Alignment", NeurIPS 2020, arXiv:2009.02439
       (Sec. 5.4 of the project notes: augmentation and the first-10k alignment set).

    Examples
    --------
    >>> bundle = load_data("digits", resize=16, batch_size=64, generator=0)
    >>> bundle.num_classes, bundle.in_channels, bundle.image_size, len(bundle.align.dataset)
    (10, 1, (16, 16), 1437)
    >>> x, y = next(iter(bundle.train))
    >>> x.shape, x.dtype, y.dtype
    (torch.Size([64, 1, 16, 16]), torch.float32, torch.int64)
    """
    for flag, flag_name in (
        (augment, "augment"),
        (normalize, "normalize"),
        (stratified, "stratified"),
        (pin_memory, "pin_memory"),
        (drop_last, "drop_last"),
    ):
        check_bool(flag, flag_name)
    check_int(batch_size, "batch_size", minimum=1)
    check_int(eval_batch_size, "eval_batch_size", minimum=1)
    check_int(subset_seed, "subset_seed")
    if augmentation is not None:
        check_choice(augmentation, "augmentation", AUGMENTATIONS)
    check_choice(interpolation, "interpolation", INTERPOLATIONS)
    sizes = _resize_arg(resize)
    gen = as_generator(generator)

    if (mean is None) != (std is None):
        raise ValueError("give both `mean` and `std` or neither")
    source = load_source(name_or_path, root=root, download=download, image_size=sizes)
    if source.family == "text":
        given = {"resize": resize, "mean": mean, "std": std, "augmentation": augmentation}
        for option, value in given.items():
            if value is not None:
                raise ValueError(f"`{option}` applies to images; the text dataset {source.name!r} takes none")
        if stratified:
            raise ValueError(f"`stratified` draws class-balanced images; the text dataset {source.name!r} has "
                             "next-token targets: use stratified=False (the first windows)")  # fmt: skip
        return _text_bundle(source, batch_size, eval_batch_size, train_size, test_size, align_size, subset_seed,
                            gen, num_workers, pin_memory, drop_last)  # fmt: skip
    x_train, x_test = source.x_train, source.x_test
    if sizes is not None and source.family != "imagefolder":  # image folders are decoded at that size
        x_train, x_test = _resize_images(x_train, sizes), _resize_images(x_test, sizes)
    channels = int(x_train.shape[1])
    image_size = (int(x_train.shape[2]), int(x_train.shape[3]))

    stats_from = "none (normalize=False)"
    if normalize and mean is not None and std is not None:
        given = (tuple(float(m) for m in mean), tuple(float(v) for v in std))
        if len(given[0]) != channels or len(given[1]) != channels:
            raise ValueError(f"`mean` and `std` need {channels} values (one per channel), got {mean!r} and {std!r}")
        if not all(v > 0 for v in given[1]):
            raise ValueError(f"`std` must be positive, got {std!r}")
        mean, std = given
        stats_from = "given"
    elif normalize:
        stats = FAMILY_STATS[source.family]
        stats_from = "the dataset's constants"
        if stats is None or len(stats[0]) != channels:
            sample = x_train
            if source.family == "imagefolder" and x_train.shape[0] > _STATS_SAMPLE:
                gen_stats = torch.Generator().manual_seed(stable_seed("stats", subset_seed))
                pick = torch.randperm(x_train.shape[0], generator=gen_stats)[:_STATS_SAMPLE]
                sample = x_train[torch.sort(pick).values]
            stats = _channel_stats(sample)
            stats_from = f"computed on {sample.shape[0]} training images"
        mean, std = stats
    else:
        mean = std = None
    recipe = augmentation or FAMILY_AUGMENTATION[source.family]
    train_tf = make_transform(
        recipe if augment else "none",
        image_size=image_size,
        channels=channels,
        mean=mean,
        std=std,
        interpolation=interpolation,
    )
    test_tf = make_transform("none", image_size=image_size, channels=channels, mean=mean, std=std)

    n_train = _resolve_size(train_size, x_train.shape[0], "train_size")
    n_test = _resolve_size(test_size, x_test.shape[0], "test_size")
    train_idx = _select(source.y_train, n_train, stratified, subset_seed, "train")
    test_idx = _select(source.y_test, n_test, stratified, subset_seed, "test")
    train_full = ArrayDataset(x_train, source.y_train, test_tf)
    test_full = ArrayDataset(x_test, source.y_test, test_tf)
    train_eval_ds = train_full.subset(train_idx) if n_train < x_train.shape[0] else train_full
    test_ds = test_full.subset(test_idx) if n_test < x_test.shape[0] else test_full
    n_align = min(10000, n_train) if align_size is None else _resolve_size(align_size, n_train, "align_size")
    align_pos = _select(train_eval_ds.labels, n_align, stratified, subset_seed, "align")
    align_ds = train_eval_ds.subset(align_pos) if n_align < n_train else train_eval_ds
    train_ds = train_eval_ds.with_transform(train_tf)

    def eval_loader(ds: ArrayDataset) -> ArrayLoader:
        return ArrayLoader(
            ds, batch_size=eval_batch_size, shuffle=False, generator=0, num_workers=num_workers, pin_memory=pin_memory
        )

    provenance = {
        "dataset": source.name,
        **source.provenance,
        "family": source.family,
        "augmentation": recipe if augment else "none",
        "train_transform": repr(train_tf),
        "test_transform": repr(test_tf),
        "normalize": normalize,
        "stats_from": stats_from,
        "resize": sizes,
        "subset": "stratified" if stratified else "first",
        "subset_seed": subset_seed,
        "full_sizes": {"train": int(x_train.shape[0]), "test": int(x_test.shape[0])},
        "fingerprints": {
            "train_indices": _sha256_short(train_eval_ds.source_indices),
            "test_indices": _sha256_short(test_ds.source_indices),
            "align_indices": _sha256_short(align_ds.source_indices),
        },
    }
    logger.info(
        "loaded %s: %d train, %d test, %d align images of %s",
        source.name,
        n_train,
        n_test,
        n_align,
        (channels, *image_size),
    )
    return DataBundle(
        name=source.name,
        train=ArrayLoader(
            train_ds,
            batch_size=batch_size,
            shuffle=True,
            drop_last=drop_last,
            generator=gen,
            num_workers=num_workers,
            pin_memory=pin_memory,
        ),
        train_eval=eval_loader(train_eval_ds),
        test=eval_loader(test_ds),
        align=eval_loader(align_ds),
        num_classes=source.num_classes,
        in_channels=channels,
        image_size=image_size,
        class_names=source.class_names,
        mean=mean,
        std=std,
        provenance=provenance,
    )


def _text_bundle(source: SourceData, batch_size: int, eval_batch_size: int, train_size: int | float | None,
                 test_size: int | float | None, align_size: int | float | None, subset_seed: int,
                 gen: torch.Generator, num_workers: int, pin_memory: bool, drop_last: bool) -> DataBundle:  # fmt: skip
    """The loaders of a text dataset: the first ``train_size`` / ``test_size`` windows, ``align`` the first
    ``align_size`` training windows; int64 token ids, no augmentation."""
    tokens = TokenIds()
    n_train = _resolve_size(train_size, source.x_train.shape[0], "train_size")
    n_test = _resolve_size(test_size, source.x_test.shape[0], "test_size")
    n_align = min(10000, n_train) if align_size is None else _resolve_size(align_size, n_train, "align_size")
    train_ds = ArrayDataset(source.x_train, source.y_train, tokens).subset(torch.arange(n_train))
    test_ds = ArrayDataset(source.x_test, source.y_test, tokens).subset(torch.arange(n_test))
    align_ds = train_ds.subset(torch.arange(n_align))

    def loader(ds: ArrayDataset, size: int, **kw: Any) -> ArrayLoader:
        return ArrayLoader(ds, batch_size=size, num_workers=num_workers, pin_memory=pin_memory, **kw)

    context = int(source.x_train.shape[1])
    provenance = {
        "dataset": source.name,
        **source.provenance,
        "family": source.family,
        "augmentation": "none",
        "train_transform": repr(tokens),
        "test_transform": repr(tokens),
        "normalize": False,
        "stats_from": "none (token ids)",
        "resize": None,
        "subset": "first",
        "subset_seed": subset_seed,
        "full_sizes": {"train": int(source.x_train.shape[0]), "test": int(source.x_test.shape[0])},
        "fingerprints": {
            "train_indices": _sha256_short(train_ds.source_indices),
            "test_indices": _sha256_short(test_ds.source_indices),
            "align_indices": _sha256_short(align_ds.source_indices),
        },
    }
    logger.info("loaded %s: %d train, %d test, %d align windows of %d tokens", source.name, n_train, n_test,
                n_align, context)  # fmt: skip
    return DataBundle(
        name=source.name,
        train=loader(train_ds, batch_size, shuffle=True, drop_last=drop_last, generator=gen),
        train_eval=loader(train_ds, eval_batch_size, generator=0),
        test=loader(test_ds, eval_batch_size, generator=0),
        align=loader(align_ds, eval_batch_size, generator=0),
        num_classes=source.num_classes,
        in_channels=0,
        image_size=(1, context),
        class_names=source.class_names,
        mean=None,
        std=None,
        provenance=provenance,
        context_length=context,
    )

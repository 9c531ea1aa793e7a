"""Dataset sources: where each dataset is found and how it is read into memory as a :class:`SourceData`.

Every source (torchvision CIFAR-10 / CIFAR-100 / MNIST, an ``.npz`` file, the ``digits`` set shipped inside the
package, and through :mod:`~neuralign.experiments.data.folders` a Tiny ImageNet folder or an ``imagefolder:PATH``)
is read once into memory as uint8 tensors ``(N, C, H, W)`` with int64 labels; the text dataset ``pydoc``
(:mod:`~neuralign.experiments.data.text`) as uint8 token windows ``(N, T)`` with int64 next-token targets
``(N, T)``. :func:`load_source` is the dispatcher; the registry below names the datasets, their aliases
(:func:`canonical_dataset`) and each family's normalisation statistics and default augmentation.
:func:`export_npz` writes a source back as an ``.npz`` that reads faster.

References
----------
.. [1] E. Alpaydin, C. Kaynak, "Optical Recognition of Handwritten Digits", UCI Machine Learning Repository,
   1998, DOI 10.24432/C50P49 (the shipped ``digits`` set, CC BY 4.0; see ``neuralign/experiments/_data/DIGITS.md``).
.. [2] Python Software Foundation, ``pydoc_data.topics`` of the Python standard library (the ``pydoc`` text,
   PSF-2.0; see :mod:`~neuralign.experiments.data.text`).
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuralign._utils import atomic_write
from neuralign._validate import check_bool
from neuralign.errors import DataError
from neuralign.experiments.data.augment import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
)
from neuralign.experiments.data.text import byte_windows, parse_text_dataset, pydoc_corpus

__all__ = [
    "FAMILY_AUGMENTATION",
    "FAMILY_STATS",
    "KNOWN_DATASETS",
    "SourceData",
    "canonical_dataset",
    "digits_path",
    "export_npz",
    "load_source",
]

logger = logging.getLogger(__name__)

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class SourceData:
    """One dataset as read from its source: uint8 images ``(N, C, H, W)`` and int64 labels for both splits, or
    (family ``"text"``) uint8 token windows ``(N, T)`` and their int64 next-token targets ``(N, T)``.

    Attributes
    ----------
    name : str
        Canonical name (``"cifar10"``, ``"digits"``, ``"pydoc"``, ``"npz:<stem>"``, ...).
    x_train, x_test : torch.Tensor
        uint8 ``(N, C, H, W)``; text: ``(N, T)`` byte values.
    y_train, y_test : torch.Tensor
        int64 ``(N,)`` in ``0..num_classes-1``; text: ``(N, T)``, the byte after each input byte.
    class_names : tuple of str
        One name per class (text: the 256 byte values, ``"0x00"`` ... ``"0xff"``).
    family : str
        Which augmentation and normalisation defaults apply: ``"cifar"``, ``"tinyimagenet"``, ``"mnist"``,
        ``"digits"``, ``"imagefolder"``, ``"generic"`` or ``"text"`` (none: tokens are neither augmented nor
        normalised).
    provenance : dict
        Where the data came from (source kind, path).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: tuple[str, ...]
    family: str
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


# canonical name -> (display name, family)
_DATASETS: dict[str, tuple[str, str]] = {
    "cifar10": ("CIFAR-10", "cifar"),
    "cifar100": ("CIFAR-100", "cifar"),
    "mnist": ("MNIST", "mnist"),
    "tinyimagenet": ("Tiny ImageNet", "tinyimagenet"),
    "digits": ("digits (UCI optical recognition of handwritten digits)", "digits"),
    "pydoc": ("pydoc (Python documentation topics, bytes)", "text"),
}
#: Dataset names :func:`load_data` knows (besides paths of ``.npz`` files and Tiny ImageNet folders).
KNOWN_DATASETS: tuple[str, ...] = tuple(sorted(_DATASETS))
# keys as canonical_dataset normalises them (lower case, no white space, "-" or "_"): "uci-digits" is "ucidigits"
_ALIASES = {"tinyimagenet200": "tinyimagenet", "tin": "tinyimagenet", "ucidigits": "digits"}
#: Normalisation statistics ``(mean, std)`` of each dataset family; ``None``: computed from the training split at
#: load time (for image folders, on a sample of it).
FAMILY_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "cifar": (CIFAR_MEAN, CIFAR_STD),
    "tinyimagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "mnist": (MNIST_MEAN, MNIST_STD),
    "digits": None,  # computed from the training split at load time
    "generic": None,
    "imagefolder": None,  # computed on a sample of the training split
    "text": None,  # token ids are not normalised
}
#: Default training augmentation (a key of :data:`~neuralign.experiments.data.augment.AUGMENTATIONS`) per family.
FAMILY_AUGMENTATION: dict[str, str] = {
    "cifar": "cifar",
    "tinyimagenet": "tinyimagenet",
    "mnist": "crop",
    "digits": "crop",
    "generic": "crop",
    "imagefolder": "flip_crop",
    "text": "none",  # token ids are not augmented
}


def canonical_dataset(name: str) -> str | None:
    """The key in :data:`KNOWN_DATASETS` of a dataset name or alias, or ``None`` if it names no known dataset.

    Case, white space, ``-`` and ``_`` are ignored, and the aliases ``tin`` / ``tinyimagenet200`` (Tiny ImageNet)
    and ``uci-digits`` (digits) are understood.

    Parameters
    ----------
    name : str
        A dataset name such as ``"CIFAR-10"`` or ``"tiny-imagenet-200"``.

    Returns
    -------
    str or None
        One of :data:`KNOWN_DATASETS`, or ``None``.

    Raises
    ------
    TypeError
        If ``name`` is not a string.

    Examples
    --------
    >>> canonical_dataset("CIFAR-10"), canonical_dataset("tiny-imagenet-200"), canonical_dataset("imagenet")
    ('cifar10', 'tinyimagenet', None)
    """
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a str, got {type(name).__name__} {name!r}")
    key = re.sub(r"[\s_\-]", "", name.strip().lower())
    key = _ALIASES.get(key, key)
    return key if key in _DATASETS else None


def _default_root() -> Path:
    return Path(os.environ.get("NEURALIGN_DATA", "./data")).expanduser()


def digits_path() -> Path:
    """Path of the ``digits.npz`` file shipped inside the package (found with ``importlib.resources``).

    For an installed (or editable) package this is a real file; :func:`load_data` reads it through
    ``importlib.resources.as_file`` so that a zipped install works too.
    """
    return Path(str(importlib.resources.files("neuralign.experiments").joinpath("_data", "digits.npz")))


def _images_from_numpy(array: np.ndarray, key: str, origin: str) -> torch.Tensor:
    if array.dtype != np.uint8:
        raise DataError(f"{origin}: `{key}` has dtype {array.dtype}, expected uint8 images (values 0..255)")
    if array.ndim == 3:
        images = torch.from_numpy(np.ascontiguousarray(array)).unsqueeze(1)
    elif array.ndim == 4:
        if array.shape[-1] not in (1, 3):
            hint = " (it looks channels-first; store (N, H, W, C))" if array.shape[1] in (1, 3) else ""
            raise DataError(
                f"{origin}: `{key}` has shape {array.shape}, expected (N, H, W) or (N, H, W, C) with C = 1 or 3{hint}"
            )
        images = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()
    else:
        raise DataError(f"{origin}: `{key}` has shape {array.shape}, expected (N, H, W) or (N, H, W, C)")
    if images.shape[0] == 0:
        raise DataError(f"{origin}: `{key}` is empty (0 images)")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise DataError(f"{origin}: `{key}` has zero-size images, shape {array.shape}")
    return images


def _labels_from_numpy(array: np.ndarray, key: str, origin: str) -> torch.Tensor:
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{origin}: `{key}` has dtype {array.dtype}, expected integer class labels 0..K-1")
    if array.ndim != 1:
        raise DataError(f"{origin}: `{key}` has shape {array.shape}, expected (N,)")
    if array.size and int(array.min()) < 0:
        raise DataError(f"{origin}: `{key}` holds the negative label {int(array.min())}; labels must be 0..K-1")
    return torch.from_numpy(array.astype(np.int64))


def _validate_arrays(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    class_names: Sequence[str] | None,
    origin: str,
) -> tuple[str, ...]:
    """Cross-check the splits; return the class names (``"0"``, ``"1"``, ... when none are given)."""
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{origin}: `x_{split}` has {x.shape[0]} images but `y_{split}` has {y.shape[0]} labels")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{origin}: train images are {tuple(x_train.shape[1:])} (C, H, W) but test images are "
            f"{tuple(x_test.shape[1:])}"
        )
    top_train, top_test = int(y_train.max()), int(y_test.max())
    if class_names is not None:
        k = len(class_names)
        for top, split in ((top_train, "train"), (top_test, "test")):
            if top >= k:
                raise DataError(
                    f"{origin}: `y_{split}` holds label {top} but `class_names` names {k} classes (labels 0..{k - 1})"
                )
        return tuple(str(c) for c in class_names)
    if top_test > top_train:
        raise DataError(
            f"{origin}: `y_test` holds label {top_test}, which never occurs in `y_train` (labels 0..{top_train}); "
            "add `class_names` if the training split really lacks classes"
        )
    return tuple(str(k) for k in range(top_train + 1))


def _load_npz(path: Path, *, name: str | None = None, family: str | None = None) -> SourceData:
    origin = f"{str(path)!r}"
    if not path.is_file():
        raise DataError(
            f"no .npz file at {str(path)!r}; an .npz source must hold x_train, y_train, x_test, y_test "
            "(uint8 images (N,H,W) or (N,H,W,C), integer labels 0..K-1)"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{origin} could not be read as an .npz archive: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{origin} holds a single array, not an .npz archive with x_train, y_train, x_test, y_test")
    with archive:
        missing = [k for k in _NPZ_KEYS if k not in archive.files]
        if missing:
            raise DataError(
                f"{origin} lacks the arrays {missing}; an .npz source needs x_train, y_train, x_test, y_test "
                f"(found {sorted(archive.files)})"
            )
        try:
            arrays = {k: archive[k] for k in _NPZ_KEYS}
            names = archive["class_names"] if "class_names" in archive.files else None
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise DataError(f"{origin} could not be read (corrupt array or pickled object): {exc}") from exc
    x_train = _images_from_numpy(arrays["x_train"], "x_train", origin)
    x_test = _images_from_numpy(arrays["x_test"], "x_test", origin)
    y_train = _labels_from_numpy(arrays["y_train"], "y_train", origin)
    y_test = _labels_from_numpy(arrays["y_test"], "y_test", origin)
    class_names: list[str] | None = None
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise DataError(f"{origin}: `class_names` must be a 1-D array of strings, got {names.dtype} {names.shape}")
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
    classes = _validate_arrays(x_train, y_train, x_test, y_test, class_names, origin)
    stem = path.name[: -len(".npz")] if path.name.lower().endswith(".npz") else path.stem
    known = canonical_dataset(stem)
    if name is None:
        name = known if known is not None else f"npz:{stem}"
    if family is None:
        family = _DATASETS[known][1] if known is not None else "generic"
    return SourceData(
        name, x_train, y_train, x_test, y_test, classes, family, {"source": "npz", "path": str(path.resolve())}
    )


def _load_text(key: str, context_length: int) -> SourceData:
    """A text dataset (:mod:`~neuralign.experiments.data.text`) as next-token windows of ``context_length`` bytes."""
    corpus = pydoc_corpus()
    x_train, y_train = byte_windows(corpus.train, context_length)
    x_test, y_test = byte_windows(corpus.test, context_length)
    provenance = {**corpus.provenance, "context_length": context_length,
                  "bytes": {"train": len(corpus.train), "test": len(corpus.test)}}  # fmt: skip
    names = tuple(f"0x{b:02x}" for b in range(256))
    return SourceData(key, x_train, y_train, x_test, y_test, names, "text", provenance)


def _load_digits() -> SourceData:
    resource = importlib.resources.files("neuralign.experiments").joinpath("_data", "digits.npz")
    with importlib.resources.as_file(resource) as path:
        data = _load_npz(Path(path), name="digits", family="digits")
    provenance = {
        "source": "package",
        "path": str(path),
        "citation": "E. Alpaydin, C. Kaynak, Optical Recognition of Handwritten Digits, UCI ML Repository, "
        "DOI 10.24432/C50P49, CC BY 4.0",
        "note": "pixels 0..16 rescaled to 0..255; fixed stratified 80/20 split (seed 0)",
    }
    return SourceData(
        data.name, data.x_train, data.y_train, data.x_test, data.y_test, data.class_names, "digits", provenance
    )


_TORCHVISION_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "mnist": "MNIST/raw"}


def _find_npz_in(root: Path, key: str) -> Path | None:
    if not root.is_dir():
        return None
    for candidate in sorted(root.glob("*.npz")):
        if canonical_dataset(candidate.name[: -len(".npz")]) == key:
            return candidate
    return None


def _torchvision_split(key: str, root: Path, train: bool, download: bool) -> Any:
    import torchvision.datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST}[key]
    return cls(str(root), train=train, download=download)


def _from_torchvision(key: str, ds_train: Any, ds_test: Any, root: Path) -> SourceData:
    def images(ds: Any) -> torch.Tensor:
        data = ds.data
        x = torch.as_tensor(np.asarray(data)) if not isinstance(data, torch.Tensor) else data
        x = x.to(torch.uint8)
        return x.unsqueeze(1).contiguous() if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()

    def labels(ds: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)

    x_train, y_train, x_test, y_test = images(ds_train), labels(ds_train), images(ds_test), labels(ds_test)
    origin = f"torchvision {_DATASETS[key][0]} under {str(root)!r}"
    classes = list(getattr(ds_train, "classes", []) or []) or None
    names = _validate_arrays(x_train, y_train, x_test, y_test, classes, origin)
    return SourceData(
        key,
        x_train,
        y_train,
        x_test,
        y_test,
        names,
        _DATASETS[key][1],
        {"source": "torchvision", "path": str(root.resolve())},
    )


def _load_torchvision_or_npz(key: str, root: Path, download: bool) -> SourceData:
    display = _DATASETS[key][0]
    try:
        ds_train = _torchvision_split(key, root, True, False)
        ds_test = _torchvision_split(key, root, False, False)
        return _from_torchvision(key, ds_train, ds_test, root)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        pass
    npz = _find_npz_in(root, key)
    if npz is not None:
        logger.info("%s: no torchvision copy under %s, reading %s", display, root, npz)
        return _load_npz(npz, name=key, family=_DATASETS[key][1])
    if download:
        try:
            ds_train = _torchvision_split(key, root, True, True)
            ds_test = _torchvision_split(key, root, False, True)
        except Exception as exc:  # network errors come in many types
            raise DataError(f"could not download {display} into {str(root)!r}: {exc}") from exc
        return _from_torchvision(key, ds_train, ds_test, root)
    folder = _TORCHVISION_FOLDERS[key]
    raise DataError(
        f"{display} not found under {str(root)!r} (looked for {str(root / folder)!r} and a {key}.npz there); "
        f"pass download=True (needs network) or point root (--data-root) at a folder holding {folder}, "
        "or give the path of an .npz with x_train, y_train, x_test, y_test"
    )


def load_source(
    name_or_path: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    download: bool = False,
    image_size: Sequence[int] | None = None,
) -> SourceData:
    """Read a dataset into memory as uint8 ``(N, C, H, W)`` images and int64 labels (no transforms, no subsets).

    Parameters
    ----------
    name_or_path : str or path-like
        A name of :data:`KNOWN_DATASETS` (case, ``-`` and ``_`` ignored: ``"CIFAR-10"`` works, see
        :func:`canonical_dataset`), ``"pydoc:T"`` (the text dataset with context length ``T``), the path of an
        ``.npz`` file, the path of a Tiny ImageNet folder, or ``"imagefolder:PATH"``. See
        :func:`~neuralign.experiments.data.load_data` for where each is looked for.
    root : path-like, optional
        Folder holding the named datasets; default ``$NEURALIGN_DATA`` or ``./data``. Unused for paths and
        ``digits``.
    download : bool
        Let torchvision download CIFAR-10/100 or MNIST (or fetch Tiny ImageNet's zip) when it is missing.
    image_size : (int, int) or (int,), optional
        ``imagefolder:`` only: decode every image at this ``(H, W)`` (a single int: square); default the most
        common size of 64 sampled training images.

    Returns
    -------
    SourceData

    Raises
    ------
    DataError
        If the data are missing (the message says where it looked and how to get them), corrupt or mislabelled.
    ValueError
        If the name is unknown (the message lists the known ones).
    TypeError
        If ``name_or_path`` is neither a string nor a path, or ``download`` is not a bool.
    """
    # the folder formats build SourceData objects, so they import this module: import them on use
    from neuralign.experiments.data.folders import (
        IMAGEFOLDER_PREFIX,
        find_tinyimagenet_folder,
        load_image_folder,
        load_tinyimagenet,
    )

    check_bool(download, "download")
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"`name_or_path` must be a str or a path, got {type(name_or_path).__name__}")
    text = os.fspath(name_or_path)
    parsed = parse_text_dataset(text) if isinstance(name_or_path, str) else None
    if parsed is not None:
        return _load_text(*parsed)
    if isinstance(name_or_path, str) and text.lower().startswith(IMAGEFOLDER_PREFIX):
        folder = Path(text[len(IMAGEFOLDER_PREFIX) :]).expanduser()
        if not folder.is_dir():
            raise DataError(f"no folder at {str(folder)!r} (from {text!r})")
        return load_image_folder(folder, image_size)
    key = canonical_dataset(text) if isinstance(name_or_path, str) and os.sep not in text else None
    if key is not None:
        base = Path(root).expanduser() if root is not None else _default_root()
        if key == "digits":
            return _load_digits()
        if key == "tinyimagenet":
            return load_tinyimagenet(base, download)
        return _load_torchvision_or_npz(key, base, download)
    path = Path(text).expanduser()
    if text.lower().endswith(".npz"):
        return _load_npz(path)
    if not path.exists() and (isinstance(name_or_path, os.PathLike) or os.sep in text):
        raise DataError(f"no file or folder at {text!r}; expected an .npz file or a Tiny ImageNet folder")
    if path.is_dir():
        if find_tinyimagenet_folder(path) is None:
            raise DataError(
                f"folder {str(path)!r} is not a Tiny ImageNet layout (no train/<wnid>/ class folders, no "
                "tiny-imagenet-200/ inside); give a dataset name, an .npz file or a Tiny ImageNet folder"
            )
        return load_tinyimagenet(path, download=False, explicit_folder=True)
    raise ValueError(
        f"unknown dataset {text!r}; expected one of {list(KNOWN_DATASETS)}, the path of an .npz file "
        "or the path of a Tiny ImageNet folder"
    )


def export_npz(source: SourceData, path: str | os.PathLike) -> Path:
    """Write a :class:`SourceData` as an ``.npz`` that :func:`load_data` reads back (atomically).

    Useful to decode Tiny ImageNet's 110,000 JPEGs once: ``export_npz(load_source("tinyimagenet"), "tin.npz")``.
    Images are stored channels-last uint8 ``(N, H, W, C)`` (``(N, H, W)`` for grey images), labels as int64,
    plus ``class_names``.
    """

    def hwc(x: torch.Tensor) -> np.ndarray:
        return x[:, 0].numpy() if x.shape[1] == 1 else x.permute(0, 2, 3, 1).contiguous().numpy()

    arrays = {
        "x_train": hwc(source.x_train),
        "y_train": source.y_train.numpy(),
        "x_test": hwc(source.x_test),
        "y_test": source.y_test.numpy(),
        "class_names": np.array(source.class_names),
    }
    return atomic_write(path, lambda fh: np.savez(fh, **arrays))

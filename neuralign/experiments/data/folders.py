"""Image folders: ``imagefolder:PATH`` (torchvision's ``ImageFolder`` layout) and Tiny ImageNet.

Both are listed and decoded with torchvision's own ``ImageFolder`` helpers (``torchvision.datasets.folder``), so that
a folder gives the images, classes and order that ``torchvision.datasets.ImageFolder`` would give (torchvision >= 0.18
for ``allow_empty``):

- classes: :func:`find_classes`, the sub-folders of a split sorted by name (symbolic links to folders count);
  for ``imagefolder:`` hidden class folders (``.ipynb_checkpoints``, ``.git``) are left out, in both splits;
- images: :func:`make_dataset` with ``IMG_EXTENSIONS`` (``.jpg``, ``.jpeg``, ``.png``, ``.ppm``, ``.bmp``, ``.pgm``,
  ``.tif``, ``.tiff``, ``.webp``, matched on the lower-cased end of the name, hidden files included), walked class by
  class in sorted order and within a class folder recursively, following symbolic links: the files of a folder
  (sorted by name) before those of its sub-folders (sorted by path). Class folders without images are allowed
  (``allow_empty=True``);
- pixels: ``pil_loader`` (PIL, converted to RGB), resized with PIL's antialiased bilinear filter where a common size
  is needed.

The Tiny ImageNet validation split is read from ``val/images`` + ``val_annotations.txt`` as shipped, or from
``val/<wnid>/`` class folders (:func:`reorganize_tinyimagenet_val` makes them); either way it is ordered by file name
(``val_0``, ``val_1``, ``val_10``, ``val_100``, ...), so both layouts give the same test set.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuralign.errors import DataError
from neuralign.experiments.data.sources import SourceData

__all__ = [
    "IMAGEFOLDER_PREFIX",
    "TINYIMAGENET_URL",
    "decode_images",
    "find_image_classes",
    "find_tinyimagenet_folder",
    "list_images",
    "load_image_folder",
    "load_tinyimagenet",
    "reorganize_tinyimagenet_val",
]

logger = logging.getLogger(__name__)

TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
#: Prefix of an image-folder source: ``"imagefolder:PATH"``.
IMAGEFOLDER_PREFIX = "imagefolder:"
_SIZE_SAMPLE = 64


# --- listing and decoding ------------------------------------------------------------------------------------------



def _folder() -> Any:
    """``torchvision.datasets.folder``, imported on first use (it costs about a second: not at ``import``)."""
    from torchvision.datasets import folder

    return folder

def find_image_classes(directory: str | os.PathLike) -> tuple[str, ...]:
    """The class folders of an ``ImageFolder`` split: torchvision's ``find_classes`` less hidden folders.

    Returns the sorted names of the sub-folders of ``directory`` that do not start with ``.``; empty if there are
    none or ``directory`` is not a folder.
    """
    try:
        classes, _ = _folder().find_classes(directory)
    except FileNotFoundError:  # no sub-folder at all, or no such folder
        return ()
    return tuple(name for name in classes if not name.startswith("."))


def list_images(directory: str | os.PathLike, class_to_idx: Mapping[str, int]) -> list[tuple[str, int]]:
    """``(path, label)`` of every image under ``directory/<class>/`` in torchvision's ``ImageFolder`` order.

    torchvision's ``make_dataset(directory, class_to_idx, IMG_EXTENSIONS, allow_empty=True)``: classes in sorted
    order, each class folder walked recursively (following symbolic links), files sorted by name within each
    folder and a folder's own files before its sub-folders'. Classes whose folder is missing or holds no image
    contribute nothing.
    """
    if not class_to_idx:
        return []
    folder = _folder()
    return folder.make_dataset(os.fspath(directory), dict(class_to_idx), extensions=folder.IMG_EXTENSIONS,
                               allow_empty=True)  # fmt: skip


def decode_images(paths: Sequence[str | os.PathLike], origin: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode images as RGB into uint8 ``(N, 3, H, W)`` with torchvision's ``pil_loader``.

    With ``size=(H, W)`` each image of another size is resized to it (PIL's antialiased bilinear); otherwise all
    must have the first image's size.

    Raises
    ------
    DataError
        If ``paths`` is empty, an image cannot be decoded, or (without ``size``) the sizes differ. ``origin`` starts
        the message.
    """
    from PIL import Image, UnidentifiedImageError

    if not paths:
        raise DataError(f"{origin}: no images to decode")
    first_shape: tuple[int, ...] = ()
    out: np.ndarray | None = None
    for i, path in enumerate(paths):
        try:
            rgb = _folder().pil_loader(path)
            if size is not None and rgb.size != (size[1], size[0]):
                rgb = rgb.resize((size[1], size[0]), Image.BILINEAR)
            array = np.asarray(rgb, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{origin}: could not decode {str(path)!r}: {exc}") from exc
        if out is None:
            first_shape = array.shape
            out = np.empty((len(paths), *array.shape), dtype=np.uint8)
        elif array.shape != first_shape:
            raise DataError(f"{origin}: {str(path)!r} is {array.shape[:2]} but the first image is {first_shape[:2]}")
        out[i] = array
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


# --- Tiny ImageNet -------------------------------------------------------------------------------------------------


def find_tinyimagenet_folder(root: Path) -> Path | None:
    """``root`` or ``root/tiny-imagenet-200``, whichever holds ``train/``; ``None`` if neither does."""
    for candidate in (root, root / "tiny-imagenet-200"):
        if (candidate / "train").is_dir():
            return candidate
    return None


def _tinyimagenet_val_items(folder: Path, classes: Mapping[str, int]) -> list[tuple[str, int]]:
    val = folder / "val"
    if not val.is_dir() and (folder / ".val.old").is_dir():
        logger.warning("%s: val/ is missing but .val.old/ (an interrupted reorganisation) is intact; using it", folder)
        val = folder / ".val.old"
    annotations = val / "val_annotations.txt"
    items: list[tuple[str, int]] = []
    if (val / "images").is_dir() and annotations.is_file():
        for lineno, line in enumerate(annotations.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2 or fields[1] not in classes:
                raise DataError(
                    f"{str(annotations)!r} line {lineno}: expected '<file> <wnid> ...' with a wnid among the "
                    f"training classes, got {line!r}"
                )
            path = val / "images" / fields[0]
            if not path.is_file():
                raise DataError(
                    f"{str(annotations)!r} line {lineno} names {fields[0]!r}, missing under {val / 'images'}"
                )
            items.append((str(path), classes[fields[1]]))
    elif val.is_dir() and any(p.is_dir() and p.name in classes for p in val.iterdir()):
        items = list_images(val, classes)
    else:
        raise DataError(
            f"Tiny ImageNet under {str(folder)!r} has no usable validation split: expected val/images/ with "
            f"val/val_annotations.txt, or val/<wnid>/ class folders"
        )
    items.sort(key=lambda item: os.path.basename(item[0]))  # the same order from both layouts
    return items


def load_tinyimagenet(root: Path, download: bool, *, explicit_folder: bool = False) -> SourceData:
    """Tiny ImageNet from ``root/tiny-imagenet-200`` or ``root``: ``train/<wnid>/**`` and the validation split.

    Classes are the sorted wnids (torchvision's ``find_classes`` on ``train/``: every sub-folder, hidden ones
    included), class names the first words of ``words.txt`` when present. With ``download`` (and not
    ``explicit_folder``) a missing folder is fetched from :data:`TINYIMAGENET_URL`.

    Raises
    ------
    DataError
        If the folder is missing (the message says where it looked), or a split holds no class or no image.
    """
    folder = find_tinyimagenet_folder(root)
    if folder is None and download and not explicit_folder:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(TINYIMAGENET_URL, download_root=str(root))
        except Exception as exc:  # network errors come in many types
            raise DataError(
                f"could not download Tiny ImageNet from {TINYIMAGENET_URL} into {str(root)!r}: {exc}"
            ) from exc
        folder = find_tinyimagenet_folder(root)
    if folder is None:
        raise DataError(
            f"Tiny ImageNet not found under {str(root)!r} (looked for {str(root / 'train')!r} and "
            f"{str(root / 'tiny-imagenet-200' / 'train')!r}); pass download=True (needs network, "
            f"{TINYIMAGENET_URL}) or point root (--data-root) at the folder holding tiny-imagenet-200"
        )
    try:
        wnids, classes = _folder().find_classes(folder / "train")
    except FileNotFoundError:
        raise DataError(f"Tiny ImageNet under {str(folder)!r}: train/ holds no class folders") from None
    train_items = list_images(folder / "train", classes)
    if not train_items:
        raise DataError(f"Tiny ImageNet under {str(folder)!r}: the class folders under train/ hold no images")
    val_items = _tinyimagenet_val_items(folder, classes)
    if not val_items:
        raise DataError(f"Tiny ImageNet under {str(folder)!r}: the validation split holds no images")
    names = dict.fromkeys(wnids)
    words = folder / "words.txt"
    if words.is_file():
        for line in words.read_text(errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            if wnid in names and text:
                names[wnid] = text.split(",")[0].strip()
    origin = f"Tiny ImageNet under {str(folder)!r}"
    logger.info("decoding %d + %d Tiny ImageNet images from %s", len(train_items), len(val_items), folder)
    x_train = decode_images([p for p, _ in train_items], origin)
    x_test = decode_images([p for p, _ in val_items], origin)
    y_train = torch.tensor([c for _, c in train_items], dtype=torch.int64)
    y_test = torch.tensor([c for _, c in val_items], dtype=torch.int64)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{origin}: train images are {tuple(x_train.shape[1:])} but val images are {tuple(x_test.shape[1:])}"
        )
    class_names = tuple(names[w] or w for w in wnids)
    return SourceData(
        "tinyimagenet",
        x_train,
        y_train,
        x_test,
        y_test,
        class_names,
        "tinyimagenet",
        {"source": "folder", "path": str(folder.resolve()), "wnids": list(wnids)},
    )


def reorganize_tinyimagenet_val(root: str | os.PathLike) -> Path:
    """Rearrange Tiny ImageNet's ``val/images`` + ``val_annotations.txt`` into ``val/<wnid>/`` class folders.

    :func:`~neuralign.experiments.data.load_data` does not need this (it reads the validation split from the
    annotations file, without moving anything); it is for tools that expect an ``ImageFolder`` layout.

    Parameters
    ----------
    root : path-like
        The ``tiny-imagenet-200`` folder or its parent.

    Returns
    -------
    pathlib.Path
        The reorganised ``val`` folder, holding ``<wnid>/<file>`` for every annotated image and a copy of
        ``val_annotations.txt``.

    Raises
    ------
    DataError
        If there is no Tiny ImageNet folder, or the annotations name a missing file.

    Notes
    -----
    Idempotent and crash-safe. The new tree is built beside the old one in ``.val.new`` (hard links, or copies
    where links are not possible); only when it is complete is ``val`` renamed to ``.val.old``, ``.val.new`` to
    ``val``, and ``.val.old`` removed. At every instant either ``val`` or ``.val.old`` is a complete original or
    reorganised split (:func:`~neuralign.experiments.data.load_data` reads ``.val.old`` when ``val`` is
    missing), and calling this function again finishes or restarts an interrupted run. Calling it on an already
    reorganised folder does nothing.
    """
    base = Path(root)
    folder = find_tinyimagenet_folder(base)
    if folder is None:
        raise DataError(
            f"Tiny ImageNet not found under {str(base)!r} (looked for {str(base / 'train')!r} and "
            f"{str(base / 'tiny-imagenet-200' / 'train')!r})"
        )
    val, new, old = folder / "val", folder / ".val.new", folder / ".val.old"
    for stale in folder.glob(".val.tmp.*"):  # staging trees of runs killed while copying
        shutil.rmtree(stale, ignore_errors=True)
    if not val.exists() and old.is_dir() and new.is_dir():  # interrupted between the two renames
        os.replace(new, val)
    if val.is_dir() and old.is_dir() and not (val / "images").is_dir():  # interrupted before the cleanup
        shutil.rmtree(old)
    if not val.exists() and old.is_dir():  # interrupted right after the first rename, before .val.new moved
        os.replace(old, val)
    annotations = val / "val_annotations.txt"
    if not (val / "images").is_dir():
        if val.is_dir() and any(p.is_dir() for p in val.iterdir()):
            return val  # already reorganised
        raise DataError(f"{str(val)!r} holds neither images/ with val_annotations.txt nor class folders")
    if not annotations.is_file():
        raise DataError(f"{str(annotations)!r} is missing; it maps each validation image to its class")
    if new.exists():
        shutil.rmtree(new)
    staging = Path(tempfile.mkdtemp(prefix=".val.tmp.", dir=folder))
    try:
        for lineno, line in enumerate(annotations.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise DataError(f"{str(annotations)!r} line {lineno}: expected '<file> <wnid> ...', got {line!r}")
            source = val / "images" / fields[0]
            if not source.is_file():
                raise DataError(
                    f"{str(annotations)!r} line {lineno} names {fields[0]!r}, missing under {val / 'images'}"
                )
            target = staging / fields[1] / fields[0]
            target.parent.mkdir(exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
        shutil.copy2(annotations, staging / "val_annotations.txt")
        os.replace(staging, new)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.replace(val, old)
    os.replace(new, val)
    shutil.rmtree(old)
    return val


# --- image folders ----------------------------------------------------------------------------------------------------


def _folder_items(split: Path, classes: Mapping[str, int] | None) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
    """``(path, label)`` of every image under ``split/<class>/`` (:func:`list_images`) and the class names (the
    non-hidden sub-folders of ``split``, or the given ones)."""
    if classes is None:
        names = find_image_classes(split)
        if not names:
            raise DataError(f"image folder {str(split)!r} has no class subfolders (expected {split}/<class>/*.png)")
        classes = {name: i for i, name in enumerate(names)}
    else:
        extra = [name for name in find_image_classes(split) if name not in classes]
        if extra:
            raise DataError(f"image folder {str(split)!r} has classes {extra[:3]} that train/ does not have")
        names = tuple(classes)
    items = list_images(split, classes)
    if not items:
        raise DataError(f"image folder {str(split)!r} holds no images ({', '.join(_folder().IMG_EXTENSIONS)})")
    return items, names


def _common_size(paths: Sequence[str], origin: str) -> tuple[tuple[int, int], int]:
    """The most common ``(H, W)`` among up to 64 evenly spaced images, and how many were looked at."""
    from PIL import Image, UnidentifiedImageError

    step = max(1, len(paths) // _SIZE_SAMPLE)
    sample = list(paths[::step][:_SIZE_SAMPLE])
    sizes: dict[tuple[int, int], int] = {}
    for path in sample:
        try:
            with Image.open(path) as img:
                w, h = img.size
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{origin}: could not decode {str(path)!r}: {exc}") from exc
        sizes[(h, w)] = sizes.get((h, w), 0) + 1
    return max(sizes, key=lambda k: sizes[k]), len(sample)


def load_image_folder(path: Path, size: Sequence[int] | None) -> SourceData:
    """An ``ImageFolder`` layout: ``path/train/<class>/**`` and ``path/val/<class>/**`` (or ``test/``).

    Classes are the non-hidden sub-folders of ``train/``; every image is decoded as RGB at ``size`` ``(H, W)``
    (a single int: square), by default at the most common size of up to 64 evenly spaced training images.

    Raises
    ------
    DataError
        If a split is missing, ``train/`` has no class folder, the test split has a class that ``train/`` lacks, a
        split holds no image, or an image cannot be decoded.
    """
    if not (path / "train").is_dir():
        raise DataError(f"image folder {str(path)!r} has no train/ subfolder (expected train/<class>/ and "
                        "val/<class>/ or test/<class>/)")  # fmt: skip
    test_dir = next((path / d for d in ("val", "test") if (path / d).is_dir()), None)
    if test_dir is None:
        raise DataError(f"image folder {str(path)!r} has no val/ or test/ subfolder")
    train_items, names = _folder_items(path / "train", None)
    test_items, _ = _folder_items(test_dir, {n: i for i, n in enumerate(names)})
    if size is None:
        image_size, sampled = _common_size([p for p, _ in train_items], str(path))
        size_from = f"the most common size of {sampled} sampled training images"
    else:
        image_size = (int(size[0]), int(size[-1]))
        size_from = "given"
    origin = f"image folder {str(path)!r}"
    x_train = decode_images([p for p, _ in train_items], origin, image_size)
    x_test = decode_images([p for p, _ in test_items], origin, image_size)
    return SourceData(
        name=f"imagefolder:{path.name}", x_train=x_train,
        y_train=torch.tensor([label for _, label in train_items], dtype=torch.int64), x_test=x_test,
        y_test=torch.tensor([label for _, label in test_items], dtype=torch.int64), class_names=names,
        family="imagefolder",
        provenance={"source": "imagefolder", "path": str(path), "test_split": test_dir.name,
                    "image_size_from": size_from},
    )  # fmt: skip

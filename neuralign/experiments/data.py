"""Datasets, batched augmentation and loaders for the experiments of Tatro et al. (2020).

Every source (torchvision CIFAR-10 / CIFAR-100 / MNIST, a Tiny ImageNet folder, an ``.npz`` file, the ``digits``
set shipped inside the package) is read once into memory as uint8 tensors ``(N, C, H, W)`` with int64 labels and
served by one fast path: :class:`ArrayDataset` + :class:`ArrayLoader`, which gathers a batch of uint8 images and
augments the whole batch at once with :class:`BatchTransform` (one ``grid_sample`` for every geometric step,
vectorised colour jitter and normalisation). :func:`load_data` is the single entry point; it returns a frozen
:class:`DataBundle` with the ``train``, ``train_eval``, ``test`` and ``align`` loaders of the paper.

Why batched augmentation
    Measured side by side by ``benchmarks/bench_data.py`` on the project's 2-core machine (one torch thread, real
    CIFAR-10, batch 128): torchvision's per-sample v2 ``RandomAffine + RandomHorizontalFlip + RandomCrop +
    Normalize`` on uint8 tensors (no PIL) costs about 27 s per epoch, 40 % of a TinyTen SGD epoch (about 67 s);
    the batched transform costs about 1.4 s per epoch (3.7 ms per batch), 2 % of it.

Reproducibility
    A training loader draws one *epoch seed* from its ``generator`` at the start of each epoch; the shuffled
    order comes from that seed and the augmentation of batch ``k`` from ``stable_seed("batch", epoch_seed, k)``.
    The data of an epoch is therefore a pure function of the generator state at the epoch's start, whatever
    ``num_workers``. Iteration runs on torchdata's ``StatefulDataLoader`` (batches built in the calling process or
    in worker processes); its state, returned by :meth:`ArrayLoader.state_dict`, holds that generator state and
    the number of batches already served, so that a trainer resumed from a checkpoint replays exactly the
    remaining batches.

References
----------
.. [1] N. J. Tatro, P.-Y. Chen, P. Das, I. Melnyk, P. Sattigeri, R. Lai, "Optimizing Mode Connectivity via
   Neuron Alignment", NeurIPS 2020, arXiv:2009.02439.
.. [2] E. Alpaydin, C. Kaynak, "Optical Recognition of Handwritten Digits", UCI Machine Learning Repository,
   1998, DOI 10.24432/C50P49 (the shipped ``digits`` set, CC BY 4.0).

Why one module: the datasets, the batched augmentation and the resumable loader share ``ArrayDataset`` and
one seeding scheme (an epoch seed, then one seed per batch), which the bit-identical resume depends on.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import itertools
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from neuralign._utils import as_generator, atomic_write, stable_seed
from neuralign.errors import DataError

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
]

logger = logging.getLogger(__name__)

#: Normalisation constants of the paper's code for CIFAR-10 and CIFAR-100 (Tatro et al. 2020, ``utils/data.py``).
CIFAR_MEAN: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
CIFAR_STD: tuple[float, ...] = (0.247, 0.243, 0.261)
#: ImageNet statistics, used by the paper for Tiny ImageNet.
IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)
#: The usual MNIST training-set statistics.
MNIST_MEAN: tuple[float, ...] = (0.1307,)
MNIST_STD: tuple[float, ...] = (0.3081,)

TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


# ----------------------------------------------------------------------------------------------------------------
# Batched transforms
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomHorizontalFlip:
    """Mirror each image left-right with probability ``p`` (torchvision's ``RandomHorizontalFlip``).

    A geometric step: output pixel :math:`(x, y)` reads input pixel :math:`(W - 1 - x, y)` when the coin says so.
    """

    p: float = 0.5
    geometric = True
    random = True
    integer = True  # maps pixel centres to pixel centres
    preserves_canvas = True  # maps the image rectangle onto itself

    def sample(self, n: int, height: int, width: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Draw a flip decision for each of ``n`` images."""
        return {"flip": torch.rand(n, generator=generator) < self.p}

    def inverse_matrix(self, params: Mapping[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """Per-image ``(B, 3, 3)`` map from output to input pixel coordinates ``(x, y, 1)``."""
        flip = params["flip"]
        m = torch.eye(3).repeat(flip.shape[0], 1, 1)
        m[:, 0, 0] = torch.where(flip, -1.0, 1.0)
        m[:, 0, 2] = torch.where(flip, float(width - 1), 0.0)
        return m


@dataclass(frozen=True)
class RandomCrop:
    """Zero-pad by ``padding`` pixels on every side, then crop back to the image size at a random offset.

    This is torchvision's ``RandomCrop(size=image size, padding=padding)``: the offsets ``top`` and ``left`` are
    uniform integers in :math:`[0, 2p]`, and output pixel :math:`(x, y)` reads input pixel
    :math:`(x + \\mathrm{left} - p,\\ y + \\mathrm{top} - p)` (zero outside the image).
    """

    padding: int
    geometric = True
    random = True
    integer = True
    preserves_canvas = False

    def __post_init__(self) -> None:
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or self.padding < 0:
            raise ValueError(f"`padding` must be a non-negative int, got {self.padding!r}")

    def sample(self, n: int, height: int, width: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Draw the crop offsets of ``n`` images."""
        top = torch.randint(0, 2 * self.padding + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * self.padding + 1, (n,), generator=generator)
        return {"top": top, "left": left}

    def inverse_matrix(self, params: Mapping[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """Per-image ``(B, 3, 3)`` map from output to input pixel coordinates ``(x, y, 1)``."""
        m = torch.eye(3).repeat(params["top"].shape[0], 1, 1)
        m[:, 0, 2] = (params["left"] - self.padding).to(torch.float32)
        m[:, 1, 2] = (params["top"] - self.padding).to(torch.float32)
        return m


@dataclass(frozen=True)
class RandomAffine:
    """Rotate by a uniform angle in :math:`[-d, d]` degrees and scale by a uniform factor about the image centre.

    torchvision's ``RandomAffine(degrees=d, scale=scale)`` without translation or shear, with zero fill. In
    pixel coordinates centred on :math:`c = ((W-1)/2, (H-1)/2)`, output pixel :math:`u` reads the input at

    .. math:: v = c + \\frac{1}{s} \\begin{pmatrix} \\cos\\theta & \\sin\\theta \\\\ -\\sin\\theta & \\cos\\theta
              \\end{pmatrix} (u - c),

    with :math:`\\theta` the angle (radians) and :math:`s` the scale, the same inverse map torchvision uses.
    """

    degrees: float
    scale: tuple[float, float] | None = None
    geometric = True
    random = True
    integer = False
    preserves_canvas = False

    def __post_init__(self) -> None:
        if not isinstance(self.degrees, (int, float)) or self.degrees < 0:
            raise ValueError(f"`degrees` must be a non-negative number, got {self.degrees!r}")
        if self.scale is not None:
            if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
                raise ValueError(f"`scale` must be (low, high) with 0 < low <= high, got {self.scale!r}")

    def sample(self, n: int, height: int, width: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Draw an angle (degrees) and a scale for each of ``n`` images."""
        angle = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * self.degrees
        if self.scale is None:
            scale = torch.ones(n, dtype=torch.float64)
        else:
            low, high = self.scale
            scale = low + torch.rand(n, generator=generator, dtype=torch.float64) * (high - low)
        return {"angle": angle, "scale": scale}

    def inverse_matrix(self, params: Mapping[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """Per-image ``(B, 3, 3)`` map from output to input pixel coordinates ``(x, y, 1)``."""
        theta = torch.deg2rad(params["angle"])
        a = torch.cos(theta) / params["scale"]
        b = torch.sin(theta) / params["scale"]
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        m = torch.zeros(theta.shape[0], 3, 3, dtype=torch.float64)
        m[:, 0, 0], m[:, 0, 1], m[:, 0, 2] = a, b, cx - a * cx - b * cy
        m[:, 1, 0], m[:, 1, 1], m[:, 1, 2] = -b, a, cy + b * cx - a * cy
        m[:, 2, 2] = 1.0
        return m.to(torch.float32)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B`` of ``(B, 3, H, W)`` images as ``(B, 1, H, W)``; grey images as is."""
    if x.shape[1] == 1:
        return x
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).to(x.dtype)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.to(x.dtype).view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class ColorJitter:
    """Random brightness, contrast and saturation in a random order per image (torchvision's ``ColorJitter``).

    Each enabled factor is uniform in :math:`[\\max(0, 1 - v), 1 + v]`; with :math:`f` the factor, brightness is
    :math:`\\mathrm{clip}(f x)`, contrast :math:`\\mathrm{clip}(f x + (1 - f)\\,\\bar g)` with :math:`\\bar g` the
    image's mean luma, saturation :math:`\\mathrm{clip}(f x + (1 - f)\\, g)` with :math:`g` the luma image (a no-op
    on grey images). Hue jitter is not provided.
    """

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    geometric = False
    random = True

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative number, got {value!r}")

    def _ops(self) -> tuple[str, ...]:
        return tuple(name for name in ("brightness", "contrast", "saturation") if getattr(self, name) > 0)

    def sample(self, n: int, height: int, width: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Draw the factors and the order of the operations for each of ``n`` images."""
        params: dict[str, torch.Tensor] = {}
        ops = self._ops()
        for name in ops:
            v = float(getattr(self, name))
            low = max(0.0, 1.0 - v)
            params[name] = low + torch.rand(n, generator=generator) * (1.0 + v - low)
        params["order"] = torch.randint(0, math.factorial(len(ops)), (n,), generator=generator)
        return params

    def apply(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Jitter float images ``(B, C, H, W)`` in [0, 1]."""
        ops = self._ops()
        if not ops:
            return x
        out = torch.empty_like(x)
        for k, order in enumerate(itertools.permutations(ops)):
            sel = (params["order"] == k).nonzero().flatten()
            if sel.numel() == 0:
                continue
            xs = x.index_select(0, sel)
            for name in order:
                factor = params[name].index_select(0, sel)
                if name == "brightness":
                    xs = _blend(xs, torch.zeros_like(xs), factor)
                elif name == "contrast":
                    xs = _blend(xs, _grayscale(xs).mean(dim=(1, 2, 3), keepdim=True), factor)
                elif xs.shape[1] == 3:  # saturation; no-op on grey images, like torchvision
                    xs = _blend(xs, _grayscale(xs), factor)
            out.index_copy_(0, sel, xs)
        return out


@dataclass(frozen=True)
class Normalize:
    """Per-channel standardisation :math:`(x_c - \\mu_c) / \\sigma_c` (torchvision's ``Normalize``)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    geometric = False
    random = False

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"`mean` and `std` must have the same positive length, got {self.mean!r}, {self.std!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"`std` must be positive, got {self.std!r}")

    def sample(self, n: int, height: int, width: int, generator: torch.Generator | None) -> None:
        """Deterministic: nothing to draw."""
        return None

    def apply(self, x: torch.Tensor, params: None = None) -> torch.Tensor:
        """Standardise float images ``(B, C, H, W)``."""
        if x.shape[1] != len(self.mean):
            raise ValueError(f"Normalize has {len(self.mean)} channel statistics but the images have {x.shape[1]}")
        mean = torch.tensor(self.mean, dtype=torch.float64)
        inv_std = 1.0 / torch.tensor(self.std, dtype=torch.float64)
        shift = (-mean * inv_std).to(x.dtype).to(x.device).view(1, -1, 1, 1)
        return torch.addcmul(shift, x, inv_std.to(x.dtype).to(x.device).view(1, -1, 1, 1))


Step = RandomHorizontalFlip | RandomCrop | RandomAffine | ColorJitter | Normalize


class BatchTransform:
    """A sequence of augmentation steps applied to a whole batch at once, reproducibly from a generator.

    Consecutive geometric steps (:class:`RandomAffine`, :class:`RandomHorizontalFlip`, :class:`RandomCrop`) are
    fused: each step is a per-image affine map :math:`A_k` from its output to its input pixel coordinates, the
    output pixel grid is mapped back through :math:`A_1 A_2 \\cdots A_m` and the input is sampled once with
    ``torch.nn.functional.grid_sample`` (zero padding). Pixels that a sequential pipeline would have lost at an
    intermediate step (e.g. a rotated corner later moved into view by a crop) are masked to zero. A fused run
    holds at most one rotation/scale step (a second one starts a new run, i.e. a second resampling), so with
    ``interpolation="nearest"`` (torchvision's default for ``RandomAffine``) the result equals applying the steps
    one after another with torchvision's tensor kernels, up to ties in rounding. Photometric steps
    (:class:`ColorJitter`, :class:`Normalize`) act on the float batch in order.

    Parameters
    ----------
    steps : sequence of steps
        Applied in order. Every geometric step keeps the image size.
    interpolation : {"nearest", "bilinear"}
        Sampling of the fused geometric steps. With ``"bilinear"`` the result differs from a sequential pipeline
        only within half a pixel of an intermediate image border.

    Notes
    -----
    Calling the transform takes uint8 images (divided by 255) or float images in [0, 1], shaped ``(B, C, H, W)``
    or ``(C, H, W)``, and returns float32 images of the same shape. The random parameters of a batch are drawn
    from ``generator`` step by step, all images of the batch at once: the same generator state gives the same
    output.

    Examples
    --------
    >>> import torch
    >>> t = BatchTransform([RandomHorizontalFlip(), RandomCrop(4), Normalize((0.5,), (0.25,))])
    >>> x = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    >>> a = t(x, generator=torch.Generator().manual_seed(0))
    >>> b = t(x, generator=torch.Generator().manual_seed(0))
    >>> a.shape, a.dtype, bool((a == b).all())
    (torch.Size([8, 1, 16, 16]), torch.float32, True)
    """

    def __init__(self, steps: Sequence[Step] = (), *, interpolation: str = "nearest") -> None:
        if interpolation not in ("nearest", "bilinear"):
            raise ValueError(f"unknown interpolation {interpolation!r}; expected one of ['bilinear', 'nearest']")
        self.steps: tuple[Step, ...] = tuple(steps)
        for step in self.steps:
            if not hasattr(step, "geometric") or not hasattr(step, "sample"):
                raise TypeError(f"a BatchTransform step must be one of the step classes, got {type(step).__name__}")
        self.interpolation = interpolation

    @property
    def random(self) -> bool:
        """Whether the transform draws anything from the generator."""
        return any(step.random for step in self.steps)

    def __repr__(self) -> str:
        inner = ", ".join(repr(s) for s in self.steps)
        return f"BatchTransform([{inner}], interpolation={self.interpolation!r})"

    def sample_params(self, n: int, height: int, width: int, generator: torch.Generator | None = None) -> list[Any]:
        """Draw the random parameters of every step for ``n`` images of size ``height`` x ``width``."""
        return [step.sample(n, height, width, generator) for step in self.steps]

    def apply(self, images: torch.Tensor, params: Sequence[Any]) -> torch.Tensor:
        """Apply the steps with given parameters (from :meth:`sample_params`) to ``(B, C, H, W)`` images."""
        x = _to_float(images)
        i = 0
        while i < len(self.steps):
            if self.steps[i].geometric:
                j, non_integer = i, 0
                while j < len(self.steps) and self.steps[j].geometric:
                    if not self.steps[j].integer:
                        if non_integer:
                            break  # one resampling per rotation keeps the fused result equal to the sequence
                        non_integer += 1
                    j += 1
                x = self._warp(x, self.steps[i:j], params[i:j])
                i = j
            else:
                x = self.steps[i].apply(x, params[i])
                i += 1
        return x

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a batch ``(B, C, H, W)`` or one image ``(C, H, W)``; uint8 or float in [0, 1]."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"`images` must be a torch.Tensor, got {type(images).__name__}")
        single = images.dim() == 3
        x = images.unsqueeze(0) if single else images
        if x.dim() != 4:
            raise ValueError(f"`images` must be (B, C, H, W) or (C, H, W), got shape {tuple(images.shape)}")
        params = self.sample_params(x.shape[0], x.shape[2], x.shape[3], generator)
        out = self.apply(x, params)
        return out[0] if single else out

    def _warp(self, x: torch.Tensor, steps: Sequence[Step], params: Sequence[Any]) -> torch.Tensor:
        b, _, h, w = x.shape
        xs = torch.arange(w, dtype=torch.float32).view(1, 1, w, 1)
        ys = torch.arange(h, dtype=torch.float32).view(1, h, 1, 1)

        def points(m: torch.Tensor) -> torch.Tensor:
            """``m`` (B, 2, 3) applied to every pixel centre (x, y, 1): (B, H, W, 2), one broadcast add."""
            m = m.transpose(1, 2).reshape(b, 1, 1, 3, 2)
            return xs * m[..., 0, :] + (ys * m[..., 1, :] + m[..., 2, :])

        def plane(row: torch.Tensor) -> torch.Tensor:
            """``row`` (B, 3) applied to every pixel centre (x, y, 1): (B, H, W)."""
            r = row.reshape(b, 1, 1, 3)
            return xs[..., 0] * r[..., 0] + (ys[..., 0] * r[..., 1] + r[..., 2])

        matrix = torch.eye(3).expand(b, 3, 3)
        mask: torch.Tensor | None = None
        # maps pixel coordinates to the unit square: the image rectangle [-1/2, W-1/2] x [-1/2, H-1/2] -> [-1, 1]^2
        to_unit = torch.tensor([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0]])
        for k in range(len(steps) - 1, -1, -1):
            matrix = steps[k].inverse_matrix(params[k], h, w) @ matrix
            if k > 0 and not steps[k].preserves_canvas:
                # the points now lie on an intermediate image, which was zero outside its rectangle
                unit = to_unit @ matrix
                inside = torch.maximum(plane(unit[:, 0]).abs_(), plane(unit[:, 1]).abs_()).le_(1.0)
                mask = inside if mask is None else mask.mul_(inside)
        grid = points(to_unit @ matrix).to(x.dtype)  # grid_sample's coordinates (align_corners=False)
        out = F.grid_sample(x, grid, mode=self.interpolation, padding_mode="zeros", align_corners=False)
        if mask is not None:
            out = out.mul_(mask.unsqueeze(1).to(out.dtype))  # mask holds 1.0 inside, 0.0 outside
        return out


def _to_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if images.is_floating_point():
        return images.to(torch.float32)
    raise TypeError(f"images must be uint8 (0..255) or float (0..1), got dtype {images.dtype}")


def _pad_for(image_size: tuple[int, int]) -> int:
    return min(image_size) // 8


def _cifar_steps(image_size: tuple[int, int], channels: int) -> list[Step]:
    return [RandomAffine(15.0), RandomHorizontalFlip(), RandomCrop(_pad_for(image_size))]


def _tinyimagenet_steps(image_size: tuple[int, int], channels: int) -> list[Step]:
    return [
        RandomHorizontalFlip(),
        RandomCrop(_pad_for(image_size)),
        RandomAffine(30.0, scale=(0.8, 1.2)),
        ColorJitter(contrast=0.25, saturation=0.25),
    ]


def _crop_steps(image_size: tuple[int, int], channels: int) -> list[Step]:
    return [RandomCrop(max(1, _pad_for(image_size)))]


def _flip_crop_steps(image_size: tuple[int, int], channels: int) -> list[Step]:
    return [RandomHorizontalFlip(), RandomCrop(max(1, _pad_for(image_size)))]


def _no_steps(image_size: tuple[int, int], channels: int) -> list[Step]:
    return []


#: Training augmentation recipes, by name. Paddings scale with the image: ``min(H, W) // 8`` pixels (4 at 32x32,
#: 8 at 64x64), at least 1 for ``crop`` and ``flip_crop``.
#:
#: - ``cifar``: RandomAffine(15 deg) -> HFlip -> RandomCrop(pad 4 at 32x32) (Tatro et al., CIFAR-10/100).
#: - ``tinyimagenet``: HFlip -> RandomCrop(pad 8 at 64x64) -> RandomAffine(30 deg, scale 0.8-1.2) ->
#:   ColorJitter(contrast 0.25, saturation 0.25) (Tatro et al., Tiny ImageNet; with ``resize=32`` this is the
#:   GoogLeNet variant Resize(32) + RandomCrop(32, pad 4) + ...).
#: - ``crop``: RandomCrop only, no flips (digits, MNIST, unknown ``.npz`` data).
#: - ``flip_crop``: HFlip -> RandomCrop.
#: - ``none``: no augmentation.
AUGMENTATIONS: dict[str, Callable[[tuple[int, int], int], list[Step]]] = {
    "cifar": _cifar_steps,
    "tinyimagenet": _tinyimagenet_steps,
    "crop": _crop_steps,
    "flip_crop": _flip_crop_steps,
    "none": _no_steps,
}


def make_transform(
    augmentation: str,
    *,
    image_size: tuple[int, int],
    channels: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str = "nearest",
) -> BatchTransform:
    """Build the :class:`BatchTransform` of a named recipe, followed by normalisation when ``mean`` is given.

    Parameters
    ----------
    augmentation : str
        A key of :data:`AUGMENTATIONS` (``"none"`` for the test-time transform).
    image_size : (int, int)
        ``(H, W)`` of the images the transform will see (paddings scale with it).
    channels : int
        Number of image channels.
    mean, std : sequence of float, optional
        Per-channel statistics; ``None`` leaves the images in [0, 1] (the paper's "adversarial" variant).
    interpolation : {"nearest", "bilinear"}
        Sampling of the geometric steps.

    Returns
    -------
    BatchTransform

    Raises
    ------
    ValueError
        If ``augmentation`` is unknown or the statistics do not match ``channels``.

    Examples
    --------
    >>> make_transform("none", image_size=(32, 32), channels=3, mean=CIFAR_MEAN, std=CIFAR_STD).random
    False
    """
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}; expected one of {sorted(AUGMENTATIONS)}")
    steps: list[Step] = list(AUGMENTATIONS[augmentation](tuple(image_size), channels))
    if (mean is None) != (std is None):
        raise ValueError("`mean` and `std` must be given together")
    if mean is not None and std is not None:
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"`mean`/`std` have {len(mean)}/{len(std)} entries but the images have {channels} channels"
            )
        steps.append(Normalize(tuple(float(m) for m in mean), tuple(float(s) for s in std)))
    return BatchTransform(steps, interpolation=interpolation)


# ----------------------------------------------------------------------------------------------------------------
# In-memory dataset and loader
# ----------------------------------------------------------------------------------------------------------------


class ArrayDataset(Dataset):
    """Images held in memory as uint8 ``(N, C, H, W)`` with int64 labels, transformed on the fly as tensors.

    Parameters
    ----------
    images : torch.Tensor
        uint8 ``(N, C, H, W)``.
    labels : torch.Tensor
        Integer ``(N,)``; stored as int64.
    transform : callable, optional
        ``transform(images, generator) -> float images`` on a batch, e.g. a :class:`BatchTransform`; ``None``
        only converts to float in [0, 1].
    generator : torch.Generator, optional
        Used by ``__getitem__`` (per-sample access from a plain ``DataLoader``); ``None`` uses torch's global RNG.
        :class:`ArrayLoader` passes its own per-batch generators instead.

    Notes
    -----
    ``ds[i]`` returns ``(image float32 (C, H, W), label int64 scalar)`` so that the dataset works with a plain
    ``torch.utils.data.DataLoader``; :meth:`get_batch` is the fast path used by :class:`ArrayLoader`.
    ``source_indices`` holds, for each image, its index in the split it was loaded from (so that subsets stay
    traceable).

    Examples
    --------
    >>> import torch
    >>> ds = ArrayDataset(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
    >>> x, y = ds.get_batch(torch.tensor([0, 3]))
    >>> x.shape, y.tolist()
    (torch.Size([2, 1, 8, 8]), [0, 1])
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[..., torch.Tensor] | None = None,
        *,
        generator: torch.Generator | None = None,
        source_indices: torch.Tensor | None = None,
    ) -> None:
        if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise TypeError(
                f"`images` and `labels` must be torch tensors, got {type(images).__name__} and {type(labels).__name__}"
            )
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"`images` must be uint8 (N, C, H, W), got {images.dtype} of shape {tuple(images.shape)}")
        if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(
                f"`labels` must be an integer (N,) tensor, got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"`images` has {images.shape[0]} images but `labels` has {labels.shape[0]} labels")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.transform = transform
        self.generator = generator
        if source_indices is None:
            source_indices = torch.arange(images.shape[0])
        self.source_indices = source_indices.to(torch.int64)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch(torch.tensor([int(index)]), generator=self.generator)
        return x[0], y[0]

    def get_batch(
        self, indices: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``indices`` transformed as one batch (float32 ``(B, C, H, W)``) and their int64 labels."""
        images = self.images.index_select(0, indices)
        x = self.transform(images, generator) if self.transform is not None else _to_float(images)
        return x, self.labels.index_select(0, indices)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ArrayDataset:
        """A new dataset with the images ``indices`` (in that order), the same transform and generator."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ArrayDataset(
            self.images.index_select(0, idx),
            self.labels.index_select(0, idx),
            self.transform,
            generator=self.generator,
            source_indices=self.source_indices.index_select(0, idx),
        )

    def with_transform(self, transform: Callable[..., torch.Tensor] | None) -> ArrayDataset:
        """The same images and labels (shared, not copied) with another transform."""
        return ArrayDataset(
            self.images, self.labels, transform, generator=self.generator, source_indices=self.source_indices
        )


class _EpochBatches(Dataset):
    """Item ``(epoch_seed, k)`` is batch ``k`` of the epoch drawn with ``epoch_seed``: a pure function, safe in workers.

    The order is ``randperm(N)`` from ``stable_seed("order", epoch_seed)`` (the dataset order without shuffling)
    and batch ``k`` is augmented with a generator seeded with ``stable_seed("batch", epoch_seed, k)``. The order of
    the last epoch seen is cached, so that each process computes it once per epoch.
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, shuffle: bool) -> None:
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self._order: tuple[int | None, torch.Tensor] | None = None

    def _order_for(self, epoch_seed: int | None) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch_seed:
            n = len(self.dataset)
            if self.shuffle:
                gen = torch.Generator().manual_seed(stable_seed("order", epoch_seed))
                self._order = (epoch_seed, torch.randperm(n, generator=gen))
            else:
                self._order = (epoch_seed, torch.arange(n))
        return self._order[1]

    def __getitem__(self, key: tuple[int | None, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch_seed, k = key
        idx = self._order_for(epoch_seed)[k * self.batch_size : (k + 1) * self.batch_size]
        gen = None
        if epoch_seed is not None:
            gen = torch.Generator().manual_seed(stable_seed("batch", epoch_seed, k))
        return self.dataset.get_batch(idx, generator=gen)


class _EpochSampler:
    """Yields ``(epoch_seed, k)`` for the batches of one epoch; the stateful part of :class:`ArrayLoader`.

    ``StatefulDataLoader`` saves and restores iteration (main process and workers) but knows nothing of our epoch
    seed, which is drawn from the loader's :attr:`ArrayLoader.generator` at the start of each epoch. This sampler
    draws it and its :meth:`state_dict` records the generator state at the epoch's start and the batches handed
    out, so that a restored epoch draws the same seed and continues after its last served batch.
    """

    def __init__(self, n_batches: int, random: bool, generator: torch.Generator) -> None:
        self.n_batches, self.random, self.generator = n_batches, random, generator
        self._epoch_start_state: torch.Tensor | None = None
        self._batches_done = 0
        self._resume_from = 0

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[int | None, int]]:
        start, self._resume_from = self._resume_from, 0
        # until the epoch's first batch is asked for, the state is "the current generator, `start` batches done"
        self._epoch_start_state, self._batches_done = None, start
        return self._epoch(start)

    def _epoch(self, start: int) -> Iterator[tuple[int | None, int]]:
        epoch_seed: int | None = None
        if self.random:
            self._epoch_start_state = self.generator.get_state()
            epoch_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())
        for k in range(start, self.n_batches):
            self._batches_done = k + 1
            yield epoch_seed, k
        self._epoch_start_state = None
        self._batches_done = 0

    def state_dict(self) -> dict[str, Any]:
        state = self.generator.get_state() if self._epoch_start_state is None else self._epoch_start_state.clone()
        return {"generator_state": state, "batches_done": self._batches_done}

    def check_state(self, state: object) -> int:
        if not isinstance(state, Mapping) or "generator_state" not in state or "batches_done" not in state:
            raise ValueError("`state` must be a dict from ArrayLoader.state_dict()")
        done = int(state["batches_done"])
        if not 0 <= done <= self.n_batches:
            raise ValueError(f"`state` says {done} batches were served but an epoch has {self.n_batches}")
        return done

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._resume_from = self.check_state(state)
        self.generator.set_state(state["generator_state"])
        self._epoch_start_state = None
        self._batches_done = 0


def _as_is(batch: Any) -> Any:
    return batch


class ArrayLoader:
    """Iterate an :class:`ArrayDataset` in batches, augmenting each batch at once; resumable mid-epoch.

    Parameters
    ----------
    dataset : ArrayDataset
        The images; its ``transform`` is applied to each batch.
    batch_size : int
        Images per batch.
    shuffle : bool
        Draw a new random order each epoch (otherwise the dataset order).
    drop_last : bool
        Drop the last incomplete batch.
    generator : torch.Generator or int or None
        Source of the epoch seeds (shuffling and augmentation); an int seeds a new generator, ``None`` seeds one
        from torch's global RNG. Exposed as :attr:`generator`.
    num_workers : int
        ``0`` builds batches in the calling process; more builds whole batches in that many worker processes
        (the data are the same: each batch depends only on the epoch seed and its index).
    pin_memory : bool
        Pin batches in page-locked memory (only when CUDA is available).

    Notes
    -----
    Iteration and its saved state are those of torchdata's ``StatefulDataLoader`` over whole batches. Each epoch
    that shuffles or augments draws one epoch seed from :attr:`generator`; the order is ``randperm(N)`` from a
    generator seeded with it and batch ``k`` is augmented with a generator seeded with
    ``stable_seed("batch", epoch_seed, k)``. A loader that neither shuffles nor augments never touches the
    generator, and no loader touches torch's global RNG. Iteration yields
    ``(images float32 (B, C, H, W), labels int64 (B,))``.

    To resume, save :meth:`state_dict` with the model and call :meth:`load_state_dict` after rebuilding the loader
    with the same data and ``num_workers``: the next ``iter(loader)`` continues the interrupted epoch after its
    last served batch, then the following epochs are those of the uninterrupted run.

    Examples
    --------
    >>> import torch
    >>> ds = ArrayDataset(torch.zeros(10, 1, 4, 4, dtype=torch.uint8), torch.arange(10))
    >>> loader = ArrayLoader(ds, batch_size=4, shuffle=True, generator=0)
    >>> len(loader), sorted(torch.cat([y for _, y in loader]).tolist()) == list(range(10))
    (3, True)
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        *,
        batch_size: int = 128,
        shuffle: bool = False,
        drop_last: bool = False,
        generator: torch.Generator | int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if not isinstance(dataset, ArrayDataset):
            raise TypeError(f"`dataset` must be an ArrayDataset, got {type(dataset).__name__}")
        _check_positive_int(batch_size, "batch_size")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be a non-negative int, got {num_workers!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.generator = as_generator(generator)
        self.num_workers = num_workers
        self.pin_memory = bool(pin_memory)
        self._sampler = _EpochSampler(len(self), self.random, self.generator)
        with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch function in its constructor
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            self._loader = StatefulDataLoader(
                _EpochBatches(dataset, batch_size, self.shuffle),
                batch_size=None,
                sampler=self._sampler,
                num_workers=num_workers,
                collate_fn=_as_is,
                pin_memory=self.pin_memory and torch.cuda.is_available(),
                # the loader's own seed only seeds worker RNGs, which the batches never use; a private generator
                # keeps it off torch's global RNG
                generator=torch.Generator(),
            )

    @property
    def random(self) -> bool:
        """Whether the loader shuffles or augments (and so consumes its generator)."""
        transform = self.dataset.transform
        return self.shuffle or bool(getattr(transform, "random", transform is not None))

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self._loader)

    def state_dict(self) -> dict[str, Any]:
        """The ``StatefulDataLoader`` state: where the epoch stands, with the generator state at its start.

        Between epochs, the current generator state and no batch served. The dict holds tensors, ints, bools,
        ``None``, strings, lists and dicts, so it can be saved with ``torch.save`` and read back with
        ``weights_only=True``.
        """
        return self._loader.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: the next iteration replays that epoch from its first unserved batch."""
        main = state.get("_snapshot", {}).get("_main_snapshot", state) if isinstance(state, Mapping) else None
        if not isinstance(main, Mapping) or "_index_sampler_state" not in main:
            raise ValueError("`state` must be a dict from ArrayLoader.state_dict()")
        self._sampler.check_state(main["_index_sampler_state"])
        workers = main.get("_num_workers", 0)
        if workers != self.num_workers:
            raise ValueError(f"`state` was saved with num_workers={workers} but this loader has {self.num_workers}")
        self._loader.load_state_dict(dict(state))


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"`{name}` must be positive, got {value}")


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceData:
    """One dataset as read from its source: uint8 images ``(N, C, H, W)`` and int64 labels for both splits.

    Attributes
    ----------
    name : str
        Canonical name (``"cifar10"``, ``"digits"``, ``"npz:<stem>"``, ...).
    x_train, x_test : torch.Tensor
        uint8 ``(N, C, H, W)``.
    y_train, y_test : torch.Tensor
        int64 ``(N,)`` in ``0..num_classes-1``.
    class_names : tuple of str
        One name per class.
    family : str
        Which augmentation and normalisation defaults apply: ``"cifar"``, ``"tinyimagenet"``, ``"mnist"``,
        ``"digits"``, ``"imagefolder"`` or ``"generic"``.
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
}
#: Dataset names :func:`load_data` knows (besides paths of ``.npz`` files and Tiny ImageNet folders).
KNOWN_DATASETS: tuple[str, ...] = tuple(sorted(_DATASETS))
_ALIASES = {"tinyimagenet200": "tinyimagenet", "tin": "tinyimagenet", "uci-digits": "digits"}
_FAMILY_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "cifar": (CIFAR_MEAN, CIFAR_STD),
    "tinyimagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "mnist": (MNIST_MEAN, MNIST_STD),
    "digits": None,  # computed from the training split at load time
    "generic": None,
    "imagefolder": None,  # computed on a sample of the training split
}
_FAMILY_AUGMENTATION = {
    "cifar": "cifar",
    "tinyimagenet": "tinyimagenet",
    "mnist": "crop",
    "digits": "crop",
    "generic": "crop",
    "imagefolder": "flip_crop",
}


def _canonical(name: str) -> str | None:
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


def _sha256_short(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


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
    known = _canonical(stem)
    if name is None:
        name = known if known is not None else f"npz:{stem}"
    if family is None:
        family = _DATASETS[known][1] if known is not None else "generic"
    return SourceData(
        name, x_train, y_train, x_test, y_test, classes, family, {"source": "npz", "path": str(path.resolve())}
    )


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
        if _canonical(candidate.name[: -len(".npz")]) == key:
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


# --- Tiny ImageNet -------------------------------------------------------------------------------------------------


def _tinyimagenet_folder(root: Path) -> Path | None:
    for candidate in (root, root / "tiny-imagenet-200"):
        if (candidate / "train").is_dir():
            return candidate
    return None


def _natural_key(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS), key=_natural_key
    )


def _class_images(class_dir: Path) -> list[Path]:
    """Images of one class folder: ``<wnid>/images/*`` (Tiny ImageNet) or ``<wnid>/*``."""
    return _image_files(class_dir / "images") + _image_files(class_dir)


def _tinyimagenet_val_items(folder: Path, classes: Mapping[str, int]) -> list[tuple[Path, int]]:
    val = folder / "val"
    if not val.is_dir() and (folder / ".val.old").is_dir():
        logger.warning("%s: val/ is missing but .val.old/ (an interrupted reorganisation) is intact; using it", folder)
        val = folder / ".val.old"
    annotations = val / "val_annotations.txt"
    items: list[tuple[Path, int]] = []
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
            items.append((path, classes[fields[1]]))
    elif val.is_dir() and any(p.is_dir() and p.name in classes for p in val.iterdir()):
        for wnid, label in classes.items():
            items.extend((p, label) for p in _class_images(val / wnid))
    else:
        raise DataError(
            f"Tiny ImageNet under {str(folder)!r} has no usable validation split: expected val/images/ with "
            f"val/val_annotations.txt, or val/<wnid>/ class folders"
        )
    items.sort(key=lambda item: _natural_key(item[0]))
    return items


def _decode_images(paths: Sequence[Path], origin: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode RGB images into uint8 ``(N, 3, H, W)``; with ``size=(H, W)`` each is resized to it first (PIL's
    antialiased bilinear), otherwise all must have the first image's size."""
    from PIL import Image, UnidentifiedImageError

    if not paths:
        raise DataError(f"{origin}: no images to decode")
    first_shape: tuple[int, ...] = ()
    out: np.ndarray | None = None
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
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


def _load_tinyimagenet(root: Path, download: bool, *, explicit_folder: bool = False) -> SourceData:
    folder = _tinyimagenet_folder(root)
    if folder is None and download and not explicit_folder:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(TINYIMAGENET_URL, download_root=str(root))
        except Exception as exc:  # network errors come in many types
            raise DataError(
                f"could not download Tiny ImageNet from {TINYIMAGENET_URL} into {str(root)!r}: {exc}"
            ) from exc
        folder = _tinyimagenet_folder(root)
    if folder is None:
        raise DataError(
            f"Tiny ImageNet not found under {str(root)!r} (looked for {str(root / 'train')!r} and "
            f"{str(root / 'tiny-imagenet-200' / 'train')!r}); pass download=True (needs network, "
            f"{TINYIMAGENET_URL}) or point root (--data-root) at the folder holding tiny-imagenet-200"
        )
    wnids = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    if not wnids:
        raise DataError(f"Tiny ImageNet under {str(folder)!r}: train/ holds no class folders")
    classes = {w: i for i, w in enumerate(wnids)}
    train_items = [(p, classes[w]) for w in wnids for p in _class_images(folder / "train" / w)]
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
    x_train = _decode_images([p for p, _ in train_items], origin)
    x_test = _decode_images([p for p, _ in val_items], origin)
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

    :func:`load_data` does not need this (it reads the validation split from the annotations file, without moving
    anything); it is for tools that expect an ``ImageFolder`` layout.

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
    reorganised split (:func:`load_data` reads ``.val.old`` when ``val`` is missing), and calling this function
    again finishes or restarts an interrupted run. Calling it on an already reorganised folder does nothing.
    """
    base = Path(root)
    folder = _tinyimagenet_folder(base)
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


_IMAGEFOLDER_PREFIX = "imagefolder:"
_SIZE_SAMPLE = 64
_STATS_SAMPLE = 10000


def _folder_items(split: Path, classes: Mapping[str, int] | None) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    """``(path, label)`` of every image under ``split/<class>/`` (recursive, sorted like torchvision's
    ``ImageFolder``) and the class names (sorted folder names, or the given ones)."""
    if classes is None:
        names = tuple(sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith(".")))
        if not names:
            raise DataError(f"image folder {str(split)!r} has no class subfolders (expected {split}/<class>/*.png)")
        classes = {name: i for i, name in enumerate(names)}
    else:
        extra = sorted(p.name for p in split.iterdir() if p.is_dir() and p.name not in classes)
        if extra:
            raise DataError(f"image folder {str(split)!r} has classes {extra[:3]} that train/ does not have")
        names = tuple(classes)
    items: list[tuple[Path, int]] = []
    for name, label in classes.items():
        folder = split / name
        if folder.is_dir():
            files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS)
            items.extend((p, label) for p in files)
    if not items:
        raise DataError(f"image folder {str(split)!r} holds no images ({', '.join(_IMAGE_EXTENSIONS)})")
    return items, names


def _common_size(paths: Sequence[Path], origin: str) -> tuple[tuple[int, int], int]:
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


def _load_imagefolder(path: Path, size: Sequence[int] | None) -> SourceData:
    """An ImageFolder layout: ``path/train/<class>/*`` and ``path/val/<class>/*`` (or ``test/``)."""
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
    x_train = _decode_images([p for p, _ in train_items], origin, image_size)
    x_test = _decode_images([p for p, _ in test_items], origin, image_size)
    return SourceData(
        name=f"imagefolder:{path.name}", x_train=x_train,
        y_train=torch.tensor([label for _, label in train_items], dtype=torch.int64), x_test=x_test,
        y_test=torch.tensor([label for _, label in test_items], dtype=torch.int64), class_names=names,
        family="imagefolder",
        provenance={"source": "imagefolder", "path": str(path), "test_split": test_dir.name,
                    "image_size_from": size_from},
    )  # fmt: skip


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
        A name of :data:`KNOWN_DATASETS` (case, ``-`` and ``_`` ignored: ``"CIFAR-10"`` works), the path of an
        ``.npz`` file, or the path of a Tiny ImageNet folder. See :func:`load_data` for where each is looked for.
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
    """
    if not isinstance(download, bool):
        raise TypeError(f"`download` must be a bool, got {type(download).__name__}")
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"`name_or_path` must be a str or a path, got {type(name_or_path).__name__}")
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and text.lower().startswith(_IMAGEFOLDER_PREFIX):
        folder = Path(text[len(_IMAGEFOLDER_PREFIX) :]).expanduser()
        if not folder.is_dir():
            raise DataError(f"no folder at {str(folder)!r} (from {text!r})")
        return _load_imagefolder(folder, image_size)
    key = _canonical(text) if isinstance(name_or_path, str) and os.sep not in text else None
    if key is not None:
        base = Path(root).expanduser() if root is not None else _default_root()
        if key == "digits":
            return _load_digits()
        if key == "tinyimagenet":
            return _load_tinyimagenet(base, download)
        return _load_torchvision_or_npz(key, base, download)
    path = Path(text).expanduser()
    if text.lower().endswith(".npz"):
        return _load_npz(path)
    if not path.exists() and (isinstance(name_or_path, os.PathLike) or os.sep in text):
        raise DataError(f"no file or folder at {text!r}; expected an .npz file or a Tiny ImageNet folder")
    if path.is_dir():
        if _tinyimagenet_folder(path) is None:
            raise DataError(
                f"folder {str(path)!r} is not a Tiny ImageNet layout (no train/<wnid>/ class folders, no "
                "tiny-imagenet-200/ inside); give a dataset name, an .npz file or a Tiny ImageNet folder"
            )
        return _load_tinyimagenet(path, download=False, explicit_folder=True)
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


# ----------------------------------------------------------------------------------------------------------------
# Subsets and the entry point
# ----------------------------------------------------------------------------------------------------------------


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
    _check_positive_int(size, "size")
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
    if value is None:
        return total
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be an int (a count), a float in (0, 1] (a fraction) or None, got {type(value).__name__}"
        )
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"`{name}`={value} is a float, so a fraction; expected 0 < {name} <= 1")
        return max(1, int(round(value * total)))
    if value < 1:
        raise ValueError(f"`{name}` must be at least 1, got {value}")
    if value > total:
        raise ValueError(f"`{name}`={value} exceeds the {total} images available")
    return value


def _select(labels: torch.Tensor, size: int, stratified: bool, seed: int, which: str) -> torch.Tensor:
    if size >= labels.shape[0]:
        return torch.arange(labels.shape[0])
    if stratified:
        return stratified_indices(labels, size, generator=stable_seed("subset", seed, which))
    return torch.arange(size)


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
    if resize is None:
        return None
    if isinstance(resize, bool):
        raise TypeError("`resize` must be an int, a pair of ints or None, got bool")
    if isinstance(resize, int):
        sizes = [resize]
    elif isinstance(resize, Sequence) and len(resize) == 2 and all(isinstance(v, int) for v in resize):
        sizes = [int(v) for v in resize]
    else:
        raise TypeError(f"`resize` must be an int, a pair of ints (H, W) or None, got {resize!r}")
    if any(v < 1 for v in sizes):
        raise ValueError(f"`resize` must be positive, got {resize!r}")
    return sizes


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
        Number of classes and image channels.
    image_size : (int, int)
        ``(H, W)`` of the images the model sees (after ``resize``).
    class_names : tuple of str
        Class names.
    mean, std : tuple of float or None
        Normalisation statistics applied (``None`` with ``normalize=False``: inputs in [0, 1]).
    provenance : dict
        How the bundle was built (source, sizes, options, index fingerprints); see :meth:`describe`.
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
        if not isinstance(flag, bool):
            raise TypeError(f"`{flag_name}` must be a bool, got {type(flag).__name__}")
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(eval_batch_size, "eval_batch_size")
    if isinstance(subset_seed, bool) or not isinstance(subset_seed, int):
        raise TypeError(f"`subset_seed` must be an int, got {type(subset_seed).__name__}")
    if augmentation is not None and augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}; expected one of {sorted(AUGMENTATIONS)}")
    if interpolation not in ("nearest", "bilinear"):
        raise ValueError(f"unknown interpolation {interpolation!r}; expected one of ['bilinear', 'nearest']")
    sizes = _resize_arg(resize)
    gen = as_generator(generator)

    if (mean is None) != (std is None):
        raise ValueError("give both `mean` and `std` or neither")
    source = load_source(name_or_path, root=root, download=download, image_size=sizes)
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
        stats = _FAMILY_STATS[source.family]
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
    recipe = augmentation or _FAMILY_AUGMENTATION[source.family]
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

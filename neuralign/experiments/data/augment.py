"""Batched augmentation: the paper's training transforms applied to a whole batch of images at once.

The steps (:class:`RandomHorizontalFlip`, :class:`RandomCrop`, :class:`RandomAffine`, :class:`ColorJitter`,
:class:`Normalize`) reproduce torchvision's transforms of the same names; :class:`BatchTransform` chains them,
fusing consecutive geometric steps into one ``grid_sample`` per batch and applying the photometric steps to the float
batch, with every random parameter drawn from a given generator. :data:`AUGMENTATIONS` names the recipes of the
paper (one per dataset family) and :func:`make_transform` builds one, followed by normalisation with the statistics
below.

Why batched augmentation
    Measured side by side by ``benchmarks/bench_data.py`` on the project's 2-core machine (one torch thread, real
    CIFAR-10, batch 128): torchvision's per-sample v2 ``RandomAffine + RandomHorizontalFlip + RandomCrop +
    Normalize`` on uint8 tensors (no PIL) costs about 27 s per epoch, 40 % of a TinyTen SGD epoch (about 67 s);
    the batched transform costs about 1.4 s per epoch (3.7 ms per batch), 2 % of it.

References
----------
.. [1] N. J. Tatro, P.-Y. Chen, P. Das, I. Melnyk, P. Sattigeri, R. Lai, "Optimizing Mode Connectivity via
   Neuron Alignment", NeurIPS 2020, arXiv:2009.02439 (the augmentation recipes and normalisation constants).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from neuralign._validate import check_choice, check_int, check_real

__all__ = [
    "AUGMENTATIONS",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "MNIST_MEAN",
    "MNIST_STD",
    "BatchTransform",
    "ColorJitter",
    "Normalize",
    "RandomAffine",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Step",
    "make_transform",
    "to_float",
]

#: Normalisation constants of the paper's code for CIFAR-10 and CIFAR-100 (Tatro et al. 2020, ``utils/data.py``).
CIFAR_MEAN: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
CIFAR_STD: tuple[float, ...] = (0.247, 0.243, 0.261)
#: ImageNet statistics, used by the paper for Tiny ImageNet.
IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)
#: The usual MNIST training-set statistics.
MNIST_MEAN: tuple[float, ...] = (0.1307,)
MNIST_STD: tuple[float, ...] = (0.3081,)
#: Sampling modes of the fused geometric steps.
INTERPOLATIONS: tuple[str, ...] = ("nearest", "bilinear")


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
        check_int(self.padding, "padding", minimum=0)

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
        check_real(self.degrees, "degrees", low=0.0)
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
            check_real(getattr(self, name), name, low=0.0)

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
        check_choice(interpolation, "interpolation", INTERPOLATIONS)
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
        x = to_float(images)
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


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (0..255) divided by 255, or float images (0..1), as float32 of the same shape."""
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
    check_choice(augmentation, "augmentation", AUGMENTATIONS)
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

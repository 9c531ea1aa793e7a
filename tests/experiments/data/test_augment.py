"""Tests of ``neuralign.experiments.data.augment``: the batched steps against torchvision's, parameter ranges."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from neuralign.experiments.data import (
    AUGMENTATIONS,
    IMAGENET_MEAN,
    BatchTransform,
    ColorJitter,
    Normalize,
    RandomAffine,
    RandomCrop,
    RandomHorizontalFlip,
    make_transform,
)


def _sequential(image, steps, params, i, mode):
    """The same steps applied one after another with torchvision's tensor kernels."""
    x = image
    for step, p in zip(steps, params):
        if isinstance(step, RandomAffine):
            x = TF.affine(
                x,
                angle=float(p["angle"][i]),
                translate=[0, 0],
                scale=float(p["scale"][i]),
                shear=[0.0, 0.0],
                interpolation=mode,
            )
        elif isinstance(step, RandomHorizontalFlip):
            x = TF.horizontal_flip(x) if bool(p["flip"][i]) else x
        elif isinstance(step, RandomCrop):
            h, w = x.shape[-2:]
            x = TF.crop(TF.pad(x, [step.padding] * 4, fill=0.0), int(p["top"][i]), int(p["left"][i]), h, w)
        elif isinstance(step, ColorJitter):
            order = ("contrast", "saturation") if int(p["order"][i]) == 0 else ("saturation", "contrast")
            for name in order:
                f = float(p[name][i])
                x = TF.adjust_contrast(x, f) if name == "contrast" else TF.adjust_saturation(x, f)
        elif isinstance(step, Normalize):
            x = TF.normalize(x, list(step.mean), list(step.std))
    return x


@pytest.mark.parametrize(("recipe", "size"), [("cifar", 32), ("tinyimagenet", 64), ("tinyimagenet", 32)])
def test_fused_batch_transform_equals_the_sequential_torchvision_pipeline(recipe, size):
    steps = [*AUGMENTATIONS[recipe]((size, size), 3), Normalize(IMAGENET_MEAN, (0.2, 0.3, 0.4))]
    transform = BatchTransform(steps)  # nearest, torchvision's RandomAffine default
    x = torch.rand(12, 3, size, size, generator=torch.Generator().manual_seed(0))
    params = transform.sample_params(12, size, size, torch.Generator().manual_seed(1))
    fused = transform.apply(x, params)
    reference = torch.stack([_sequential(x[i], steps, params, i, InterpolationMode.NEAREST) for i in range(12)])
    mismatched = ((fused - reference).abs() > 1e-4).float().mean().item()
    assert mismatched < 1e-3, mismatched  # only rounding ties at exact half-pixels may differ
    assert fused.abs().sum() > 0


def test_bilinear_fusion_is_exact_when_the_rotation_comes_first():
    steps = AUGMENTATIONS["cifar"]((32, 32), 3)
    transform = BatchTransform(steps, interpolation="bilinear")
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    params = transform.sample_params(8, 32, 32, torch.Generator().manual_seed(3))
    reference = torch.stack([_sequential(x[i], steps, params, i, InterpolationMode.BILINEAR) for i in range(8)])
    torch.testing.assert_close(transform.apply(x, params), reference, rtol=0, atol=1e-5)


def test_transform_parameters_follow_torchvision_ranges():
    g = torch.Generator().manual_seed(0)
    affine = RandomAffine(30.0, scale=(0.8, 1.2)).sample(4000, 8, 8, g)
    assert float(affine["angle"].abs().max()) <= 30 and float(affine["angle"].abs().max()) > 29
    assert 0.8 <= float(affine["scale"].min()) and float(affine["scale"].max()) <= 1.2
    crop = RandomCrop(4).sample(4000, 32, 32, g)
    assert set(crop["top"].tolist()) == set(range(9)) and set(crop["left"].tolist()) == set(range(9))
    flips = RandomHorizontalFlip().sample(4000, 8, 8, g)["flip"].float().mean()
    assert 0.45 < float(flips) < 0.55
    jitter = ColorJitter(contrast=0.25, saturation=0.25).sample(4000, 8, 8, g)
    assert 0.75 <= float(jitter["contrast"].min()) and float(jitter["saturation"].max()) <= 1.25
    assert set(jitter["order"].tolist()) == {0, 1}
    with pytest.raises(ValueError, match=r"`padding` must be an int >= 0, got -1"):
        RandomCrop(-1)
    with pytest.raises(ValueError, match=r"`scale` must be \(low, high\) with 0 < low <= high"):
        RandomAffine(10.0, scale=(1.2, 0.8))
    with pytest.raises(ValueError, match=r"unknown augmentation 'cutout'"):
        make_transform("cutout", image_size=(8, 8), channels=1)
    with pytest.raises(ValueError, match=r"`mean`/`std` have 1/1 entries but the images have 3 channels"):
        make_transform("none", image_size=(8, 8), channels=3, mean=(0.5,), std=(0.5,))


def test_grey_images_never_flip_and_single_images_work():
    transform = make_transform("crop", image_size=(8, 8), channels=1)
    assert not any(isinstance(s, RandomHorizontalFlip) for s in transform.steps)
    one = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8)
    out = transform(one, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 8, 8) and out.dtype == torch.float32
    no_crop = BatchTransform([RandomCrop(0)])
    torch.testing.assert_close(no_crop(one), one.float() / 255)

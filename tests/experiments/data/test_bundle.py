"""Tests of ``neuralign.experiments.data.bundle``: ``load_data``'s loaders, statistics, subsets and bad options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from neuralign.experiments.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    MNIST_MEAN,
    MNIST_STD,
    DataBundle,
    load_data,
    load_source,
    stratified_indices,
)
from tests.conftest import shared_data
from tests.experiments.data import batches, write_npz


def _normalised(images_nhwc: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).double() / 255.0
    return ((x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)).float()


def test_digits_bundle_resized_for_tinyten_and_normalised():
    bundle = load_data("digits", resize=16, batch_size=64, generator=0)
    assert isinstance(bundle, DataBundle)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, (16, 16))
    assert len(bundle.train.dataset) == 1437 and len(bundle.test.dataset) == 360
    assert len(bundle.align.dataset) == 1437  # the paper's 10,000, capped at the training set
    x, _ = batches(bundle.train_eval)
    assert x.shape == (1437, 1, 16, 16)
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1.0) < 1e-2  # own statistics
    xb, yb = next(iter(bundle.train))
    assert xb.shape == (64, 1, 16, 16) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert bundle.provenance["augmentation"] == "crop"  # no flips on digits
    json.dumps(bundle.describe())
    with pytest.raises(AttributeError):
        bundle.name = "other"


def test_unnormalised_variant_keeps_inputs_in_unit_interval():
    bundle = load_data("digits", normalize=False, generator=0)
    x, _ = next(iter(bundle.train))
    assert bundle.mean is None and bundle.std is None
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    xt, _ = next(iter(bundle.test))
    src = load_source("digits")
    torch.testing.assert_close(xt, src.x_test[: xt.shape[0]].float() / 255, rtol=0, atol=1e-6)


def test_npz_round_trip(tmp_path):
    path = write_npz(tmp_path / "toy.npz")
    raw = np.load(path)
    bundle = load_data(path, batch_size=7, eval_batch_size=5, generator=0)
    assert bundle.name == "npz:toy" and bundle.class_names == ("ant", "bee", "cat")
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (3, 3, (8, 8))
    # generic data: statistics of the training split
    x_all = torch.from_numpy(raw["x_train"]).double() / 255
    mean = x_all.mean(dim=(0, 1, 2))
    torch.testing.assert_close(torch.tensor(bundle.mean, dtype=torch.float64), mean, rtol=0, atol=1e-9)
    x, y = batches(bundle.test)
    torch.testing.assert_close(x, _normalised(raw["x_test"], bundle.mean, bundle.std), rtol=0, atol=1e-5)
    assert y.tolist() == raw["y_test"].astype(int).tolist()
    # every training image exactly once per epoch
    _, ytr = batches(bundle.train)
    assert sorted(ytr.tolist()) == sorted(raw["y_train"].tolist()) and len(ytr) == 30
    assert len(bundle.train) == 5  # ceil(30 / 7)


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match=r"`train_size` must be a positive int, got 0"):
        load_data("digits", train_size=0)
    with pytest.raises(ValueError, match=r"`test_size`=400 exceeds the 360 images available"):
        load_data("digits", test_size=400)
    with pytest.raises(ValueError, match=r"`train_size` must be a finite number in \(0, 1\], got 1\.5"):
        load_data("digits", train_size=1.5)
    with pytest.raises(TypeError, match=r"`train_size` must be an int \(a count\), a float in \(0, 1\]"):
        load_data("digits", train_size=True)
    with pytest.raises(ValueError, match=r"`align_size`=200 exceeds the 100 images available"):
        load_data("digits", train_size=100, align_size=200)
    with pytest.raises(ValueError, match=r"unknown augmentation 'mixup'; expected one of \['cifar', 'crop'"):
        load_data("digits", augmentation="mixup")
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive int, got 0"):
        load_data("digits", batch_size=0)
    with pytest.raises(TypeError, match=r"`resize` must be a positive int, got float 1\.5"):
        load_data("digits", resize=1.5)
    with pytest.raises(TypeError, match=r"`download` must be a bool"):
        load_data("digits", download="yes")
    with pytest.raises(ValueError, match=r"unknown interpolation 'cubic'"):
        load_data("digits", interpolation="cubic")


def test_align_is_the_first_training_images_with_test_transforms_in_fixed_order():
    bundle = load_data("digits", align_size=300, eval_batch_size=64, generator=0)
    source = load_source("digits")
    xa, ya = batches(bundle.align)
    xe, ye = batches(bundle.train_eval)
    torch.testing.assert_close(xa, xe[:300], rtol=0, atol=0)
    assert torch.equal(ya, source.y_train[:300])
    expected = (source.x_train[:300].float() / 255 - bundle.mean[0]) / bundle.std[0]
    torch.testing.assert_close(xa, expected, rtol=0, atol=1e-5)
    xa2, _ = batches(bundle.align)  # fixed order, no randomness
    assert torch.equal(xa, xa2)
    assert bundle.align.dataset.source_indices.tolist() == list(range(300))
    # a fraction, and drawn from the kept training images
    small = load_data("digits", train_size=500, align_size=0.2, generator=0)
    assert len(small.train.dataset) == 500 and len(small.align.dataset) == 100
    assert small.align.dataset.source_indices.tolist() == list(range(100))


def test_stratified_subsets_have_proportional_class_counts():
    labels = torch.arange(1000) % 10  # balanced
    idx = stratified_indices(labels, 200, generator=0)
    assert torch.bincount(labels[idx], minlength=10).tolist() == [20] * 10
    assert torch.equal(idx, torch.sort(idx).values) and len(set(idx.tolist())) == 200
    skewed = torch.cat([torch.zeros(600), torch.ones(300), torch.full((100,), 2)]).long()
    idx = stratified_indices(skewed, 100, generator=1)
    assert torch.bincount(skewed[idx]).tolist() == [60, 30, 10]
    idx = stratified_indices(skewed, 7, generator=1)  # 4.2, 2.1, 0.7 -> largest remainder gives the 7th to class 2
    assert torch.bincount(skewed[idx], minlength=3).tolist() == [4, 2, 1]
    with pytest.raises(ValueError, match=r"`size`=2000 exceeds the 1000 labels"):
        stratified_indices(labels, 2000)


def test_stratified_bundle_subsets():
    bundle = load_data(
        "digits", train_size=500, test_size=100, align_size=200, stratified=True, subset_seed=3, generator=0
    )
    source = load_source("digits")
    train_counts = torch.bincount(bundle.train_eval.dataset.labels, minlength=10)
    expected = torch.bincount(source.y_train, minlength=10).double() * 500 / 1437
    assert (train_counts.double() - expected).abs().max() < 1.0 and int(train_counts.sum()) == 500
    assert int(torch.bincount(bundle.test.dataset.labels, minlength=10).min()) >= 9
    align_counts = torch.bincount(bundle.align.dataset.labels, minlength=10)
    assert int(align_counts.min()) >= 19 and int(align_counts.max()) <= 21
    # kept in dataset order, a subset of the kept training images, and reproducible from subset_seed
    align_src = bundle.align.dataset.source_indices
    assert torch.equal(align_src, torch.sort(align_src).values)
    assert set(align_src.tolist()) <= set(bundle.train_eval.dataset.source_indices.tolist())
    again = load_data("digits", train_size=500, stratified=True, subset_seed=3, generator=99)
    assert torch.equal(again.train_eval.dataset.source_indices, bundle.train_eval.dataset.source_indices)
    other = load_data("digits", train_size=500, stratified=True, subset_seed=4, generator=0)
    assert not torch.equal(other.train_eval.dataset.source_indices, bundle.train_eval.dataset.source_indices)


def test_shared_cifar10_npz_loads_with_the_paper_transforms():
    path = shared_data("cifar10.npz")
    bundle = load_data(path, batch_size=128, align_size=2000, generator=0)
    assert bundle.name == "cifar10" and bundle.num_classes == 10 and bundle.class_names[0] == "airplane"
    assert len(bundle.train.dataset) == 50000 and len(bundle.test.dataset) == 10000
    assert bundle.train.dataset.images.shape == (50000, 3, 32, 32)
    assert (bundle.mean, bundle.std) == (CIFAR_MEAN, CIFAR_STD)
    x, y = batches(bundle.align)  # the first 2,000 training images, test transforms
    assert x.shape == (2000, 3, 32, 32)
    channel_means = x.mean(dim=(0, 2, 3))
    assert channel_means.abs().max() < 0.05, channel_means
    xb, _ = next(iter(bundle.train))
    assert xb.shape == (128, 3, 32, 32)
    assert "RandomAffine(degrees=15.0" in bundle.provenance["train_transform"]


def test_shared_mnist_npz_loads_by_name_from_root():
    path = shared_data("mnist.npz")
    bundle = load_data("mnist", root=path.parent, align_size=5000, generator=0)
    assert bundle.name == "mnist" and bundle.image_size == (28, 28) and bundle.in_channels == 1
    assert len(bundle.train.dataset) == 60000 and len(bundle.test.dataset) == 10000
    assert (bundle.mean, bundle.std) == (MNIST_MEAN, MNIST_STD)
    x, _ = batches(bundle.align)
    assert abs(float(x.mean())) < 0.05

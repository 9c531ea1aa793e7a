"""Tests of ``neuralign.experiments.data``: sources, batched transforms, loaders, subsets and bad input.

Everything runs offline: the shipped ``digits`` set, small ``.npz`` files and folder trees written to ``tmp_path``,
and the real CIFAR-10 / MNIST copies of ``../shared/data`` when present (skipped with a reason otherwise).
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from neuralign.errors import DataError
from neuralign.experiments.data import (
    AUGMENTATIONS,
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    KNOWN_DATASETS,
    MNIST_MEAN,
    MNIST_STD,
    ArrayDataset,
    ArrayLoader,
    BatchTransform,
    ColorJitter,
    DataBundle,
    Normalize,
    RandomAffine,
    RandomCrop,
    RandomHorizontalFlip,
    digits_path,
    export_npz,
    load_data,
    load_source,
    make_transform,
    reorganize_tinyimagenet_val,
    stratified_indices,
)
from tests.conftest import shared_data

# ----------------------------------------------------------------------------------------------------------------
# helpers


def _write_npz(path: Path, **overrides) -> Path:
    """A valid small colour dataset (3 classes, 8x8 RGB, 30 train / 12 test) with ``overrides`` applied."""
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8),
        "y_train": np.arange(30, dtype=np.int64) % 3,
        "x_test": rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
        "y_test": np.arange(12, dtype=np.uint8) % 3,
        "class_names": np.array(["ant", "bee", "cat"]),
    }
    for key, value in overrides.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez(path, **arrays)
    return path


def _batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*list(loader))
    return torch.cat(xs), torch.cat(ys)


def _normalised(images_nhwc: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).double() / 255.0
    return ((x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)).float()


# ----------------------------------------------------------------------------------------------------------------
# digits: shipped in the package


def test_digits_ship_in_the_package_and_load_offline():
    resource = importlib.resources.files("neuralign.experiments").joinpath("_data", "digits.npz")
    assert resource.is_file()
    assert importlib.resources.files("neuralign.experiments").joinpath("_data", "DIGITS.md").is_file()
    assert digits_path().is_file()
    source = load_source("digits")
    assert source.x_train.shape[0] + source.x_test.shape[0] == 1797
    assert (source.x_train.shape[0], source.x_test.shape[0]) == (1437, 360)
    assert source.x_train.shape[1:] == (1, 8, 8) and source.x_train.dtype == torch.uint8
    assert source.num_classes == 10 and source.class_names == tuple(str(k) for k in range(10))
    assert int(source.x_train.max()) == 255 and int(source.x_train.min()) == 0
    # stratified split: every class in both splits, per-class test counts 35..37
    counts = torch.bincount(source.y_test, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    assert "10.24432/C50P49" in source.provenance["citation"]


def test_digits_bundle_resized_for_tinyten_and_normalised():
    bundle = load_data("digits", resize=16, batch_size=64, generator=0)
    assert isinstance(bundle, DataBundle)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, (16, 16))
    assert len(bundle.train.dataset) == 1437 and len(bundle.test.dataset) == 360
    assert len(bundle.align.dataset) == 1437  # the paper's 10,000, capped at the training set
    x, _ = _batches(bundle.train_eval)
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


# ----------------------------------------------------------------------------------------------------------------
# npz sources


def test_npz_round_trip(tmp_path):
    path = _write_npz(tmp_path / "toy.npz")
    raw = np.load(path)
    bundle = load_data(path, batch_size=7, eval_batch_size=5, generator=0)
    assert bundle.name == "npz:toy" and bundle.class_names == ("ant", "bee", "cat")
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (3, 3, (8, 8))
    # generic data: statistics of the training split
    x_all = torch.from_numpy(raw["x_train"]).double() / 255
    mean = x_all.mean(dim=(0, 1, 2))
    torch.testing.assert_close(torch.tensor(bundle.mean, dtype=torch.float64), mean, rtol=0, atol=1e-9)
    x, y = _batches(bundle.test)
    torch.testing.assert_close(x, _normalised(raw["x_test"], bundle.mean, bundle.std), rtol=0, atol=1e-5)
    assert y.tolist() == raw["y_test"].astype(int).tolist()
    # every training image exactly once per epoch
    _, ytr = _batches(bundle.train)
    assert sorted(ytr.tolist()) == sorted(raw["y_train"].tolist()) and len(ytr) == 30
    assert len(bundle.train) == 5  # ceil(30 / 7)


def test_npz_grey_images_and_export_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    path = _write_npz(
        tmp_path / "grey.npz",
        x_train=rng.integers(0, 256, (30, 10, 10), dtype=np.uint8),
        x_test=rng.integers(0, 256, (12, 10, 10), dtype=np.uint8),
    )
    source = load_source(path)
    assert source.x_train.shape == (30, 1, 10, 10)
    out = export_npz(source, tmp_path / "copy" / "again.npz")
    again = load_source(out)
    assert torch.equal(again.x_train, source.x_train) and torch.equal(again.y_test, source.y_test)
    assert again.class_names == source.class_names


_BAD_NPZ = [
    ({"y_test": None}, r"lacks the arrays \['y_test'\]; an \.npz source needs x_train, y_train, x_test, y_test"),
    ({"x_train": np.zeros((30, 8, 8, 3), np.float32)}, r"`x_train` has dtype float32, expected uint8"),
    ({"x_train": np.zeros((30, 64), np.uint8)}, r"`x_train` has shape \(30, 64\), expected \(N, H, W\)"),
    ({"x_train": np.zeros((30, 3, 8, 8), np.uint8)}, r"C = 1 or 3 \(it looks channels-first"),
    ({"x_test": np.zeros((12, 9, 9, 3), np.uint8)}, r"train images are \(3, 8, 8\) .* test images are \(3, 9, 9\)"),
    ({"y_train": np.zeros(30, np.float32)}, r"`y_train` has dtype float32, expected integer class labels"),
    ({"y_train": np.zeros((30, 1), np.int64)}, r"`y_train` has shape \(30, 1\), expected \(N,\)"),
    ({"y_train": np.full(30, -1, np.int64)}, r"`y_train` holds the negative label -1"),
    ({"y_test": np.full(12, 5, np.int64)}, r"`y_test` holds label 5 but `class_names` names 3 classes"),
    (
        {"y_test": np.full(12, 5, np.int64), "class_names": None},
        r"`y_test` holds label 5, which never occurs in `y_train` \(labels 0\.\.2\)",
    ),
    ({"y_train": np.zeros(29, np.int64)}, r"`x_train` has 30 images but `y_train` has 29 labels"),
    (
        {"x_train": np.zeros((0, 8, 8, 3), np.uint8), "y_train": np.zeros(0, np.int64)},
        r"`x_train` is empty \(0 images\)",
    ),
    ({"class_names": np.array([["a", "b", "c"]])}, r"`class_names` must be a 1-D array of strings"),
]


@pytest.mark.parametrize(("overrides", "message"), _BAD_NPZ)
def test_corrupt_npz_is_rejected_with_the_reason(tmp_path, overrides, message):
    path = _write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(DataError, match=message):
        load_data(path)


def test_npz_that_is_not_an_archive(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match=r"could not be read as an \.npz archive"):
        load_data(garbage)
    pickled = tmp_path / "pickled.npz"
    np.savez(
        pickled,
        x_train=np.zeros((2, 4, 4), np.uint8),
        y_train=np.zeros(2, np.int64),
        x_test=np.zeros((2, 4, 4), np.uint8),
        y_test=np.zeros(2, np.int64),
        class_names=np.array([{"a": 1}], dtype=object),
    )
    with pytest.raises(DataError, match=r"could not be read \(corrupt array or pickled object\)"):
        load_data(pickled)
    single = tmp_path / "single.npy.npz"
    with open(single, "wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(DataError, match=r"holds a single array, not an \.npz archive"):
        load_data(single)


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(DataError, match=r"no \.npz file at .*nothing\.npz'; an \.npz source must hold x_train"):
        load_data(tmp_path / "nothing.npz")
    with pytest.raises(DataError, match=r"no file or folder at .*absent'; expected an \.npz file"):
        load_data(str(tmp_path / "absent"))
    with pytest.raises(
        ValueError,
        match=r"unknown dataset 'imagenet-22k'; expected one of \['cifar10', 'cifar100', "
        r"'digits', 'mnist', 'tinyimagenet'\]",
    ):
        load_data("imagenet-22k")
    assert KNOWN_DATASETS == ("cifar10", "cifar100", "digits", "mnist", "tinyimagenet")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"is not a Tiny ImageNet layout \(no train/<wnid>/ class folders"):
        load_data(tmp_path / "plain")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "cifar10",
            r"CIFAR-10 not found under '.*' \(looked for '.*cifar-10-batches-py' and a cifar10\.npz there\); "
            r"pass download=True \(needs network\) or point root \(--data-root\) at a folder holding "
            r"cifar-10-batches-py, or give the path of an \.npz with x_train, y_train, x_test, y_test",
        ),
        ("CIFAR-100", r"CIFAR-100 not found under .*cifar-100-python"),
        ("mnist", r"MNIST not found under .*MNIST/raw"),
        (
            "tiny-imagenet-200",
            r"Tiny ImageNet not found under '.*' \(looked for .*train' and "
            r".*tiny-imagenet-200/train'\); pass download=True \(needs network",
        ),
    ],
)
def test_missing_dataset_message_says_where_and_how(tmp_path, name, message):
    with pytest.raises(DataError, match=message):
        load_data(name, root=tmp_path)


def test_failed_download_is_a_data_error(tmp_path, monkeypatch):
    import neuralign.experiments.data as data_module

    def offline(key, root, train, download):
        if download:
            raise OSError("network unreachable")
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(data_module, "_torchvision_split", offline)
    with pytest.raises(DataError, match=r"could not download CIFAR-10 into '.*': network unreachable"):
        load_data("cifar10", root=tmp_path, download=True)


def test_named_dataset_falls_back_to_an_npz_under_root(tmp_path):
    _write_npz(tmp_path / "CIFAR-10.npz")
    bundle = load_data("cifar10", root=tmp_path, generator=0)
    assert bundle.name == "cifar10" and bundle.mean == CIFAR_MEAN and bundle.std == CIFAR_STD
    assert bundle.provenance["augmentation"] == "cifar" and bundle.provenance["source"] == "npz"


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match=r"`train_size` must be at least 1, got 0"):
        load_data("digits", train_size=0)
    with pytest.raises(ValueError, match=r"`test_size`=400 exceeds the 360 images available"):
        load_data("digits", test_size=400)
    with pytest.raises(ValueError, match=r"`train_size`=1\.5 is a float, so a fraction; expected 0 < train_size <= 1"):
        load_data("digits", train_size=1.5)
    with pytest.raises(TypeError, match=r"`train_size` must be an int \(a count\), a float in \(0, 1\]"):
        load_data("digits", train_size=True)
    with pytest.raises(ValueError, match=r"`align_size`=200 exceeds the 100 images available"):
        load_data("digits", train_size=100, align_size=200)
    with pytest.raises(ValueError, match=r"unknown augmentation 'mixup'; expected one of \['cifar', 'crop'"):
        load_data("digits", augmentation="mixup")
    with pytest.raises(ValueError, match=r"`batch_size` must be positive, got 0"):
        load_data("digits", batch_size=0)
    with pytest.raises(TypeError, match=r"`resize` must be an int, a pair of ints \(H, W\) or None"):
        load_data("digits", resize=1.5)
    with pytest.raises(TypeError, match=r"`download` must be a bool"):
        load_data("digits", download="yes")
    with pytest.raises(ValueError, match=r"unknown interpolation 'cubic'"):
        load_data("digits", interpolation="cubic")


# ----------------------------------------------------------------------------------------------------------------
# subsets


def test_align_is_the_first_training_images_with_test_transforms_in_fixed_order():
    bundle = load_data("digits", align_size=300, eval_batch_size=64, generator=0)
    source = load_source("digits")
    xa, ya = _batches(bundle.align)
    xe, ye = _batches(bundle.train_eval)
    torch.testing.assert_close(xa, xe[:300], rtol=0, atol=0)
    assert torch.equal(ya, source.y_train[:300])
    expected = (source.x_train[:300].float() / 255 - bundle.mean[0]) / bundle.std[0]
    torch.testing.assert_close(xa, expected, rtol=0, atol=1e-5)
    xa2, _ = _batches(bundle.align)  # fixed order, no randomness
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


# ----------------------------------------------------------------------------------------------------------------
# augmentation and loaders


def test_augmentation_is_reproducible_from_the_generator():
    first = _batches(load_data("digits", resize=16, generator=5).train)
    second = _batches(load_data("digits", resize=16, generator=5).train)
    third = _batches(load_data("digits", resize=16, generator=6).train)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], third[1])  # another order
    loader = load_data("digits", resize=16, generator=5).train
    epoch1, epoch2 = _batches(loader), _batches(loader)
    assert torch.equal(epoch1[0], first[0]) and not torch.equal(epoch1[0], epoch2[0])
    # same order, different augmentation: the draw depends on the generator beyond the shuffling
    unshuffled = ArrayDataset(
        torch.full((16, 1, 12, 12), 200, dtype=torch.uint8),
        torch.zeros(16, dtype=torch.long),
        make_transform("crop", image_size=(12, 12), channels=1),
    )
    a = _batches(ArrayLoader(unshuffled, batch_size=8, generator=1))[0]
    b = _batches(ArrayLoader(unshuffled, batch_size=8, generator=1))[0]
    c = _batches(ArrayLoader(unshuffled, batch_size=8, generator=2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_mid_epoch_exactly(tmp_path, num_workers):
    def fresh(batch_size: int = 100) -> ArrayLoader:
        return load_data("digits", resize=16, batch_size=batch_size, generator=11, num_workers=num_workers).train

    reference = fresh()
    _batches(reference)  # epoch 0
    expected = list(reference)  # epoch 1
    expected_next = list(reference)  # epoch 2
    expected_after = list(reference)  # epoch 3

    run = fresh()
    _batches(run)
    it = iter(run)
    for _ in range(3):
        next(it)
    state = run.state_dict()
    torch.save(state, tmp_path / "state.pt")  # as a trainer's checkpoint would
    saved = torch.load(tmp_path / "state.pt", weights_only=True)

    resumed = fresh()
    resumed.load_state_dict(saved)
    rest = list(resumed)
    assert len(rest) == len(expected) - 3
    for (x, y), (xe, ye) in zip(rest, expected[3:]):
        assert torch.equal(x, xe) and torch.equal(y, ye)
    for (x, y), (xe, ye) in zip(list(resumed), expected_next):
        assert torch.equal(x, xe) and torch.equal(y, ye)
    # between epochs, the state resumes at the next epoch
    torch.save(resumed.state_dict(), tmp_path / "between.pt")
    between = fresh()
    between.load_state_dict(torch.load(tmp_path / "between.pt", weights_only=True))
    after = list(between)
    assert len(after) == len(expected_after)
    for (x, y), (xe, ye) in zip(after, expected_after):
        assert torch.equal(x, xe) and torch.equal(y, ye)
    with pytest.raises(ValueError, match=r"`state` must be a dict from ArrayLoader.state_dict\(\)"):
        resumed.load_state_dict({"generator_state": torch.zeros(1), "batches_done": 99})
    small = fresh(batch_size=10)
    it = iter(small)
    for _ in range(20):
        next(it)
    with pytest.raises(ValueError, match=r"`state` says 20 batches were served but an epoch has 15"):
        resumed.load_state_dict(small.state_dict())
    del it


def test_workers_give_the_same_batches():
    single = _batches(load_data("digits", resize=16, generator=3, num_workers=0).train)
    workers = _batches(load_data("digits", resize=16, generator=3, num_workers=2).train)
    assert torch.equal(single[0], workers[0]) and torch.equal(single[1], workers[1])


def test_eval_loaders_do_not_consume_the_generator():
    bundle = load_data("digits", generator=0)
    state = bundle.test.generator.get_state()
    _batches(bundle.test)
    assert torch.equal(state, bundle.test.generator.get_state())
    assert not bundle.test.random and bundle.train.random


def test_array_dataset_works_with_a_plain_dataloader():
    ds = ArrayDataset(
        torch.arange(48, dtype=torch.uint8).view(3, 1, 4, 4),
        torch.tensor([2, 0, 1]),
        make_transform("none", image_size=(4, 4), channels=1, mean=(0.5,), std=(0.5,)),
    )
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    torch.testing.assert_close(x, (torch.arange(48).view(3, 1, 4, 4).float() / 255 - 0.5) / 0.5)
    assert y.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match=r"`images` must be uint8 \(N, C, H, W\), got torch.float32"):
        ArrayDataset(torch.zeros(3, 1, 4, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`images` has 3 images but `labels` has 2 labels"):
        ArrayDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))


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
    with pytest.raises(ValueError, match=r"`padding` must be a non-negative int, got -1"):
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


# ----------------------------------------------------------------------------------------------------------------
# real data from ../shared/data


def test_shared_cifar10_npz_loads_with_the_paper_transforms():
    path = shared_data("cifar10.npz")
    bundle = load_data(path, batch_size=128, align_size=2000, generator=0)
    assert bundle.name == "cifar10" and bundle.num_classes == 10 and bundle.class_names[0] == "airplane"
    assert len(bundle.train.dataset) == 50000 and len(bundle.test.dataset) == 10000
    assert bundle.train.dataset.images.shape == (50000, 3, 32, 32)
    assert (bundle.mean, bundle.std) == (CIFAR_MEAN, CIFAR_STD)
    x, y = _batches(bundle.align)  # the first 2,000 training images, test transforms
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
    x, _ = _batches(bundle.align)
    assert abs(float(x.mean())) < 0.05


# ----------------------------------------------------------------------------------------------------------------
# Tiny ImageNet folder layout


_WNIDS = ["n02", "n01", "n03"]  # deliberately unsorted: classes are the sorted wnids


def _tiny_imagenet(tmp_path: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "tiny-imagenet-200"
    pixels = {}
    for wnid in _WNIDS:
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for k in range(4):
            array = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(array).save(images / f"{wnid}_{k}.JPEG", format="PNG")  # lossless, like the layout
            pixels[f"{wnid}_{k}"] = array
    (folder / "val" / "images").mkdir(parents=True)
    lines = []
    for k in range(7):
        wnid = _WNIDS[k % 3]
        array = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / "val" / "images" / f"val_{k}.JPEG", format="PNG")
        pixels[f"val_{k}"] = array
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t15\t15")
    # one grey JPEG, as Tiny ImageNet has: decoded as RGB
    Image.fromarray(np.full((16, 16), 77, np.uint8), mode="L").save(folder / "val" / "images" / "val_7.JPEG")
    lines.append("val_7.JPEG\tn03\t0\t0\t15\t15")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (folder / "wnids.txt").write_text("\n".join(_WNIDS) + "\n")
    (folder / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\ttabby, tabby cat\nn03\tbarn owl\n")
    torch.save(pixels, tmp_path / "pixels.pt")
    return folder


def test_tiny_imagenet_layout_loads_from_the_annotations(tmp_path):
    folder = _tiny_imagenet(tmp_path)
    pixels = torch.load(tmp_path / "pixels.pt", weights_only=False)
    source = load_source("tinyimagenet", root=tmp_path)
    assert source.class_names == ("goldfish", "tabby", "barn owl")  # sorted wnids n01, n02, n03
    assert source.x_train.shape == (12, 3, 16, 16) and source.x_test.shape == (8, 3, 16, 16)
    assert source.y_train.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # ImageFolder order: sorted by class
    assert torch.equal(source.x_train[4], torch.from_numpy(pixels["n02_0"]).permute(2, 0, 1))
    # validation: annotation order (val_0, val_1, ...), labels from the annotations
    assert source.y_test.tolist() == [1, 0, 2, 1, 0, 2, 1, 2]
    assert torch.equal(source.x_test[3], torch.from_numpy(pixels["val_3"]).permute(2, 0, 1))
    assert int(source.x_test[7].min()) == 77 == int(source.x_test[7].max())
    bundle = load_data(folder, generator=0)  # a folder path works too
    assert bundle.mean == IMAGENET_MEAN and bundle.provenance["augmentation"] == "tinyimagenet"
    assert "ColorJitter(brightness=0.0, contrast=0.25, saturation=0.25)" in bundle.provenance["train_transform"]
    googlenet = load_data("tinyimagenet", root=tmp_path, resize=8, generator=0)
    assert googlenet.image_size == (8, 8) and "RandomCrop(padding=1)" in googlenet.provenance["train_transform"]
    stratified = load_data(folder, align_size=6, stratified=True, generator=0)
    assert torch.bincount(stratified.align.dataset.labels).tolist() == [2, 2, 2]


def test_tiny_imagenet_val_reorganisation_is_idempotent_and_keeps_the_data(tmp_path):
    folder = _tiny_imagenet(tmp_path)
    before = load_source(folder)
    val = reorganize_tinyimagenet_val(tmp_path)
    assert val == folder / "val"
    assert sorted(p.name for p in val.iterdir() if p.is_dir()) == ["n01", "n02", "n03"]
    assert (val / "n02" / "val_0.JPEG").is_file() and (val / "val_annotations.txt").is_file()
    assert not (folder / ".val.new").exists() and not (folder / ".val.old").exists()
    assert reorganize_tinyimagenet_val(folder) == val  # second call: nothing to do
    after = load_source(folder)
    assert torch.equal(before.x_test, after.x_test) and torch.equal(before.y_test, after.y_test)


def test_tiny_imagenet_interrupted_reorganisation_stays_usable_and_finishes(tmp_path):
    folder = _tiny_imagenet(tmp_path)
    before = load_source(folder)
    done = tmp_path / "done"
    shutil.copytree(folder, done / "tiny-imagenet-200")
    reorganize_tinyimagenet_val(done)
    # state between the two renames: val -> .val.old happened, .val.new -> val did not
    (folder / "val").rename(folder / ".val.old")
    shutil.copytree(done / "tiny-imagenet-200" / "val", folder / ".val.new")
    (folder / ".val.tmp.killed").mkdir()  # staging tree of a run killed while copying
    during = load_source(folder)
    assert torch.equal(during.x_test, before.x_test)
    reorganize_tinyimagenet_val(folder)
    assert (folder / "val" / "n01").is_dir()
    assert not any(p.name.startswith(".val") for p in folder.iterdir())
    assert torch.equal(load_source(folder).y_test, before.y_test)


def test_tiny_imagenet_bad_annotations(tmp_path):
    folder = _tiny_imagenet(tmp_path)
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"line 1: expected '<file> <wnid> \.\.\.' with a wnid among the training"):
        load_source(folder)
    (folder / "val" / "val_annotations.txt").write_text("val_99.JPEG\tn01\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"line 1 names 'val_99\.JPEG', missing under"):
        reorganize_tinyimagenet_val(folder)
    assert (folder / "val" / "images" / "val_0.JPEG").is_file()  # the failed run left the original intact
    with pytest.raises(DataError, match=r"Tiny ImageNet not found under '.*nowhere'"):
        reorganize_tinyimagenet_val(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------------------
# torchvision layouts on synthetic files


def _idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x_train, x_test = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 256, (10, 28, 28))
    _idx(raw / "train-images-idx3-ubyte", x_train)
    _idx(raw / "train-labels-idx1-ubyte", np.arange(20) % 10)
    _idx(raw / "t10k-images-idx3-ubyte", x_test)
    _idx(raw / "t10k-labels-idx1-ubyte", np.arange(10)[::-1])
    bundle = load_data("MNIST", root=tmp_path, generator=0)
    assert bundle.provenance["source"] == "torchvision" and bundle.num_classes == 10
    assert (bundle.mean, bundle.std) == (MNIST_MEAN, MNIST_STD) and bundle.image_size == (28, 28)
    assert bundle.test.dataset.labels.tolist() == list(range(10))[::-1]
    assert torch.equal(bundle.train_eval.dataset.images[:, 0], torch.from_numpy(x_train.astype(np.uint8)))
    assert bundle.class_names[0].startswith("0")


def test_cifar100_torchvision_layout(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # synthetic files: no md5
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (20, 3 * 32 * 32), dtype=np.uint8)
    for name, data, labels in (("train", train, list(range(20))), ("test", train[:5], [4, 3, 2, 1, 0])):
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels)}, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"class{k}" for k in range(20)]}, fh)
    bundle = load_data("cifar100", root=tmp_path, generator=0)
    assert bundle.num_classes == 20 and bundle.class_names[3] == "class3" and bundle.mean == CIFAR_MEAN
    expected = torch.from_numpy(train.reshape(20, 3, 32, 32))
    assert torch.equal(bundle.train_eval.dataset.images, expected)
    assert bundle.test.dataset.labels.tolist() == [4, 3, 2, 1, 0]


def test_gzip_is_not_mistaken_for_data(tmp_path):
    # a torchvision folder holding only the compressed downloads is "not found" (torchvision wants them extracted)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(b"\x00")
    with pytest.raises(DataError, match=r"MNIST not found under"):
        load_data("mnist", root=tmp_path)

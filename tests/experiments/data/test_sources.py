"""Tests of ``neuralign.experiments.data.sources``: shipped digits, ``.npz`` files, torchvision layouts, names."""

from __future__ import annotations

import gzip
import importlib.resources
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from neuralign.errors import DataError
from neuralign.experiments.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    KNOWN_DATASETS,
    MNIST_MEAN,
    MNIST_STD,
    canonical_dataset,
    digits_path,
    export_npz,
    load_data,
    load_source,
)
from tests.experiments.data import write_npz


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


def test_npz_grey_images_and_export_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    path = write_npz(
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
    path = write_npz(tmp_path / "bad.npz", **overrides)
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
        r"'digits', 'mnist', 'pydoc', 'tinyimagenet'\]",
    ):
        load_data("imagenet-22k")
    assert KNOWN_DATASETS == ("cifar10", "cifar100", "digits", "mnist", "pydoc", "tinyimagenet")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"is not a Tiny ImageNet layout \(no train/<wnid>/ class folders"):
        load_data(tmp_path / "plain")


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("cifar10", "cifar10"),
        ("CIFAR-10", "cifar10"),
        (" Cifar_100 ", "cifar100"),
        ("MNIST", "mnist"),
        ("tiny-imagenet-200", "tinyimagenet"),
        ("Tiny ImageNet", "tinyimagenet"),
        ("TIN", "tinyimagenet"),
        ("uci-digits", "digits"),
        ("imagenet-22k", None),
        ("cifar10.npz", None),
        ("", None),
    ],
)
def test_canonical_dataset_maps_names_and_aliases_to_known_keys(name, key):
    assert canonical_dataset(name) == key
    assert key is None or key in KNOWN_DATASETS


def test_canonical_dataset_takes_only_strings():
    with pytest.raises(TypeError, match=r"`name` must be a str, got \w*Path"):
        canonical_dataset(Path("cifar10"))


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
    import neuralign.experiments.data.sources as data_module

    def offline(key, root, train, download):
        if download:
            raise OSError("network unreachable")
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(data_module, "_torchvision_split", offline)
    with pytest.raises(DataError, match=r"could not download CIFAR-10 into '.*': network unreachable"):
        load_data("cifar10", root=tmp_path, download=True)


def test_named_dataset_falls_back_to_an_npz_under_root(tmp_path):
    write_npz(tmp_path / "CIFAR-10.npz")
    bundle = load_data("cifar10", root=tmp_path, generator=0)
    assert bundle.name == "cifar10" and bundle.mean == CIFAR_MEAN and bundle.std == CIFAR_STD
    assert bundle.provenance["augmentation"] == "cifar" and bundle.provenance["source"] == "npz"


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

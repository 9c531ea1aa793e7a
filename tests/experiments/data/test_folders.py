"""Tests of ``neuralign.experiments.data.folders``: image folders (``imagefolder:PATH``) and Tiny ImageNet.

Listing follows torchvision's ``ImageFolder`` helpers (``find_classes``, ``make_dataset``, ``IMG_EXTENSIONS``) and
decoding its ``pil_loader``: the tests pin the order, the extensions, hidden files and folders, empty and nested class
folders, and that the decoded pixels are PIL's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neuralign.cli import main
from neuralign.errors import DataError
from neuralign.experiments.data import IMAGENET_MEAN, load_data, load_source, reorganize_tinyimagenet_val
from neuralign.experiments.data.folders import decode_images, find_image_classes, list_images

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


def test_tiny_imagenet_reads_images_in_file_name_order(tmp_path):
    # torchvision's order: file names sorted as strings within a folder (n01_10 before n01_2), for the training
    # class folders and the validation split alike, with either validation layout
    rng = np.random.default_rng(0)
    folder = tmp_path / "tiny-imagenet-200"
    pixels, lines = {}, []
    for wnid in ("n02", "n01"):
        (folder / "train" / wnid / "images").mkdir(parents=True)
        for k in range(12):
            pixels[f"{wnid}_{k}"] = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(pixels[f"{wnid}_{k}"]).save(folder / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", "PNG")
    (folder / "val" / "images").mkdir(parents=True)
    for k in range(12):
        pixels[f"val_{k}"] = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(pixels[f"val_{k}"]).save(folder / "val" / "images" / f"val_{k}.JPEG", "PNG")
        lines.append(f"val_{k}.JPEG\t{('n01', 'n02')[k % 2]}\t0\t0\t3\t3")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    order = [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    source = load_source(folder)
    expected_train = [f"{wnid}_{k}" for wnid in ("n01", "n02") for k in order]
    for row, name in zip(source.x_train, expected_train):
        assert torch.equal(row, torch.from_numpy(pixels[name]).permute(2, 0, 1)), name
    assert source.y_train.tolist() == [0] * 12 + [1] * 12
    for row, k in zip(source.x_test, order):
        assert torch.equal(row, torch.from_numpy(pixels[f"val_{k}"]).permute(2, 0, 1)), k
    assert source.y_test.tolist() == [k % 2 for k in order]
    reorganize_tinyimagenet_val(folder)
    again = load_source(folder)
    assert torch.equal(again.x_test, source.x_test) and torch.equal(again.y_test, source.y_test)


# ----------------------------------------------------------------------------------------------------------------
# image folders (`--data imagefolder:PATH`): a tiny folder of PNG files written by the test


CLASSES = ("cat", "dog", "frog")


def _write_folder(root, *, per_class=(10, 4), size=(12, 12), odd_size=(15, 9), test="val"):
    """Class c is dominated by colour channel c; two training images have another size (resized on load)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class[0]), (test, per_class[1])):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = odd_size if (split == "train" and c == 0 and i < 2) else size
                pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
                pixels[..., c] += 150
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def test_load_data_reads_an_image_folder_at_the_common_size_with_sampled_statistics(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    data = load_data(f"imagefolder:{root}", batch_size=8, generator=0)
    assert data.class_names == CLASSES and data.num_classes == 3 and data.in_channels == 3
    assert data.image_size == (12, 12)  # the two 15x9 images were resized to the most common size
    assert len(data.train.dataset) == 30 and len(data.test.dataset) == 12
    assert data.train_eval.dataset.labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    described = data.describe()
    assert described["test_split"] == "val" and described["stats_from"] == "computed on 30 training images"
    assert described["image_size_from"] == "the most common size of 30 sampled training images"
    assert described["augmentation"] == "flip_crop"
    images = torch.cat([x for x, _ in data.train_eval])  # normalised with the statistics it computed
    torch.testing.assert_close(images.mean(dim=(0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-4)
    torch.testing.assert_close(images.std(dim=(0, 2, 3), correction=0), torch.ones(3), rtol=0, atol=1e-3)
    given = load_data(f"imagefolder:{root}", resize=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), generator=0)
    assert given.image_size == (8, 8) and given.mean == (0.5, 0.5, 0.5) and given.describe()["stats_from"] == "given"
    assert given.describe()["image_size_from"] == "given"
    with pytest.raises(ValueError, match="give both `mean` and `std` or neither"):
        load_data(f"imagefolder:{root}", mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"`mean` and `std` need 3 values \(one per channel\)"):
        load_data(f"imagefolder:{root}", mean=(0.5,), std=(0.2,))


def test_image_folder_layout_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="no folder at"):
        load_data(f"imagefolder:{tmp_path / 'none'}")
    (tmp_path / "a" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"has no val/ or test/ subfolder"):
        load_data(f"imagefolder:{tmp_path / 'a'}")
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match=r"has no train/ subfolder"):
        load_data(f"imagefolder:{tmp_path / 'b'}")
    root = _write_folder(tmp_path / "c", test="test")
    (root / "test" / "bird").mkdir()
    with pytest.raises(DataError, match=r"has classes \['bird'\] that train/ does not have"):
        load_data(f"imagefolder:{root}")


def test_image_folder_trains_aligns_and_evaluates_through_the_command_line(tmp_path, capsys):
    root = _write_folder(tmp_path / "imgs", test="test")
    data = ["--data", f"imagefolder:{root}", "--batch-size", "10", "--quiet"]
    for seed in (1, 2):
        assert main(["train", "--arch", "tinyten", "--epochs", "2", "--lr", "0.05", "--seed", str(seed), "--out",
                     str(tmp_path / "ep"), *data]) == 0, capsys.readouterr().err  # fmt: skip
    manifest = json.loads((tmp_path / "ep" / "manifest_train_tinyten_seed2.json").read_text())  # one per end point
    assert manifest["data"]["image_size"] == [12, 12] and len(manifest["data"]["mean"]) == 3
    assert manifest["data"]["stats_from"] == "computed on 30 training images"
    assert manifest["data"]["class_names"] == list(CLASSES)
    a, b = tmp_path / "ep" / "tinyten_seed1.pt", tmp_path / "ep" / "tinyten_seed2.pt"
    pair = ["--model-a", str(a), "--model-b", str(b), *data]
    assert main(["align", *pair, "--out", str(tmp_path / "al")]) == 0
    summary = json.loads((tmp_path / "al" / "alignment.json").read_text())
    assert set(summary["correlation_after"]) == set(summary["groups"])
    assert main(["curve", *pair, "--perms", str(tmp_path / "al" / "alignment.pt"), "--epochs", "1", "--out",
                 str(tmp_path / "c")]) == 0  # fmt: skip
    assert main(["evaluate", "--model-a", str(a), "--curve", str(tmp_path / "c" / "curve.pt"), *data,
                 "--num-points", "3", "--out", str(tmp_path / "ev")]) == 0  # fmt: skip
    ev = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert ev["t"] == [0.0, 0.5, 1.0] and all(0.0 <= acc <= 1.0 for acc in ev["test_accuracy"])


# ----------------------------------------------------------------------------------------------------------------
# listing and decoding on torchvision's helpers


def _touch_images(root: Path, names: list[str], seed: int) -> dict[str, np.ndarray]:
    """A distinct 4x4 RGB PNG (whatever the extension says) at each of ``names`` under ``root``; their pixels."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels[name] = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(pixels[name]).save(path, format="PNG")
    return pixels


def test_listing_takes_torchvision_extensions_hidden_files_and_nested_folders_in_image_folder_order(tmp_path):
    split = tmp_path / "train"
    _touch_images(split, ["cat/b.png", "cat/a/x.png", "cat/UPPER.JPG", "cat/.hidden.png", "cat/c.gif", "cat/d.jpeg",
                          "cat/e.webp", "dog/10.png", "dog/2.png", "dog/1.png"], seed=0)  # fmt: skip
    (split / "cat" / "notes.txt").write_text("not an image")
    (split / "cat" / "folder.png").mkdir()  # a folder named like an image is walked, not read
    classes = {"cat": 0, "dog": 1}
    listed = [(os.path.relpath(path, split), label) for path, label in list_images(split, classes)]
    assert listed == [
        # a folder's own files first, sorted by name (upper case before lower case, hidden files included,
        # extensions matched case-insensitively; .gif and .txt are not in IMG_EXTENSIONS), then its sub-folders
        ("cat/.hidden.png", 0), ("cat/UPPER.JPG", 0), ("cat/b.png", 0), ("cat/d.jpeg", 0), ("cat/e.webp", 0),
        ("cat/a/x.png", 0),
        ("dog/1.png", 1), ("dog/10.png", 1), ("dog/2.png", 1),  # string order, not numeric
    ]  # fmt: skip
    from torchvision.datasets import ImageFolder

    assert [(p, y) for p, y in ImageFolder(str(split)).samples] == list_images(split, classes)


def test_symbolic_links_to_folders_are_followed_like_torchvision(tmp_path):
    split = tmp_path / "train"
    _touch_images(split, ["cat/a.png", "elsewhere/b.png"], seed=1)
    os.symlink(split / "elsewhere", split / "cat" / "more")
    listed = [os.path.relpath(path, split) for path, _ in list_images(split, {"cat": 0})]
    assert listed == ["cat/a.png", "cat/more/b.png"]


def test_hidden_class_folders_are_ignored_and_empty_class_folders_kept(tmp_path):
    root = tmp_path / "imgs"
    pixels = _touch_images(root, ["train/ant/0.png", "train/cow/0.png", "train/.ipynb_checkpoints/0.png",
                                  "val/ant/1.png", "val/.ipynb_checkpoints/1.png"], seed=2)  # fmt: skip
    (root / "train" / "bee").mkdir()  # a class without training images
    (root / "train" / "bee" / "README").write_text("nothing here yet")
    assert find_image_classes(root / "train") == ("ant", "bee", "cow")
    assert find_image_classes(root / "none") == () and find_image_classes(root / "train" / "bee") == ()
    source = load_source(f"imagefolder:{root}")
    assert source.class_names == ("ant", "bee", "cow") and source.num_classes == 3
    assert source.y_train.tolist() == [0, 2] and source.y_test.tolist() == [0]
    assert torch.equal(source.x_test[0], torch.from_numpy(pixels["val/ant/1.png"]).permute(2, 0, 1))
    shutil.rmtree(root / "train" / "ant"), shutil.rmtree(root / "train" / "cow")
    with pytest.raises(DataError, match=r"image folder '.*train' holds no images \(\.jpg, \.jpeg, \.png"):
        load_source(f"imagefolder:{root}")
    (root / "train" / "bee").rename(root / "train" / ".bee")
    with pytest.raises(DataError, match=r"has no class subfolders \(expected .*/<class>/\*\.png\)"):
        load_source(f"imagefolder:{root}")


def test_decoded_pixels_are_pil_rgb_and_pil_resizes(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    images = {
        "a.jpg": Image.fromarray(rgb), "b.png": Image.fromarray(rgb), "c.bmp": Image.fromarray(rgb),
        "d.tif": Image.fromarray(rgb), "e.ppm": Image.fromarray(rgb), "f.pgm": Image.fromarray(rgb[..., 0]),
        "g.webp": Image.fromarray(rgb), "h_grey.jpg": Image.fromarray(rgb[..., 0]),
        "i_rgba.png": Image.fromarray(np.concatenate([rgb, rgb[..., :1]], axis=-1)),
        "j_palette.png": Image.fromarray(rgb).convert("P"), "k_cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
    }  # fmt: skip
    for name, image in images.items():
        image.save(tmp_path / name)
    paths = [str(tmp_path / name) for name in images]
    for size in (None, (5, 7)):
        decoded = decode_images(paths, "test", size) if size else torch.cat([decode_images([p], "test") for p in paths])
        for path, got in zip(paths, decoded):
            with Image.open(path) as img:
                expected = img.convert("RGB")
            if size is not None:
                expected = expected.resize((size[1], size[0]), Image.BILINEAR)
            assert torch.equal(got, torch.from_numpy(np.array(expected)).permute(2, 0, 1)), (path, size)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"test: could not decode '.*broken\.png'"):
        decode_images([str(tmp_path / "broken.png")], "test")
    with pytest.raises(DataError, match=r"is \(5, 7\) but the first image is \(9, 13\)"):
        Image.fromarray(rgb[:5, :7]).save(tmp_path / "small.png")
        decode_images([paths[1], str(tmp_path / "small.png")], "test")

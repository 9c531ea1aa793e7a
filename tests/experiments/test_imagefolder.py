"""`--data imagefolder:PATH`: a tiny folder of PNG files written by the test trains, aligns and evaluates."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from neuralign.errors import DataError
from neuralign.experiments.cli import main
from neuralign.experiments.data import load_data

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

"""Tests of ``neuralign.experiments.data``, one module per module of the subpackage, and the helpers they share.

Everything runs offline: the shipped ``digits`` set, small ``.npz`` files and folder trees written to ``tmp_path``,
and the real CIFAR-10 / MNIST copies of ``../shared/data`` when present (skipped with a reason otherwise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def write_npz(path: Path, **overrides) -> Path:
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


def batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of ``loader``, images and labels concatenated."""
    xs, ys = zip(*list(loader))
    return torch.cat(xs), torch.cat(ys)

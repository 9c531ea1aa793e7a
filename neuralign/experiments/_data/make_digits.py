"""Regenerate ``digits.npz``, the small real dataset shipped with neuralign for offline demos and tests.

Run once, from the repository root, with scikit-learn installed (it is a build-time tool here, never a runtime
dependency of neuralign)::

    python neuralign/experiments/_data/make_digits.py

What it writes (``neuralign/experiments/_data/digits.npz``):

- the 1,797 8x8 grey images of the UCI "Optical Recognition of Handwritten Digits" test set as bundled with
  scikit-learn (``sklearn.datasets.load_digits``), whose pixels are counts 0..16, rescaled to uint8 0..255 with
  ``round(v * 255 / 16)`` (so 0 -> 0 and 16 -> 255);
- a fixed stratified 80/20 train/test split, ``sklearn.model_selection.train_test_split(..., test_size=0.2,
  stratify=y, random_state=0)``: 1,437 training and 360 test images, each split in the shuffled order that
  function returns (so "the first N training images" is a fair sample, as for CIFAR);
- ``x_train`` uint8 (1437, 8, 8), ``y_train`` uint8 (1437,), ``x_test`` uint8 (360, 8, 8), ``y_test`` uint8
  (360,), ``class_names`` (``"0"`` .. ``"9"``).

Attribution and licence: see ``DIGITS.md`` beside this file (Alpaydin & Kaynak, UCI ML Repository,
DOI 10.24432/C50P49, CC BY 4.0). The output is deterministic: rerunning it reproduces the committed file's arrays.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def make_digits(path: Path) -> dict[str, np.ndarray]:
    """Build the arrays and write them to ``path`` with ``np.savez_compressed``; return the arrays."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    labels = bunch.target.astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=0)
    arrays = {
        "x_train": np.ascontiguousarray(x_train),
        "y_train": np.ascontiguousarray(y_train),
        "x_test": np.ascontiguousarray(x_test),
        "y_test": np.ascontiguousarray(y_test),
        "class_names": np.array([str(k) for k in range(10)]),
    }
    np.savez_compressed(path, **arrays)
    return arrays


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().with_name("digits.npz")
    arrays = make_digits(out)
    sizes = ", ".join(f"{k} {v.dtype} {v.shape}" for k, v in arrays.items())
    sys.stdout.write(f"wrote {out}: {sizes}\n")

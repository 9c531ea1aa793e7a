"""Cost of one CIFAR-10 training epoch of data loading, against training TinyTen, measured side by side.

Compares, in one run and one process:

- ``batched``: neuralign's ``load_data("cifar10.npz").train`` (uint8 in memory, one ``grid_sample`` per batch for
  RandomAffine(15) + HFlip + RandomCrop(32, pad 4), then Normalize), a full epoch at batch 128;
- ``per-sample``: the same augmentation with torchvision's v2 transforms applied image by image on uint8 tensors
  (no PIL), through a ``DataLoader`` at batch 128, timed on a part of the epoch and scaled to 50,000 images;
- ``kornia``: the same augmentation with ``kornia.augmentation`` (``AugmentationSequential`` of RandomAffine(15,
  nearest) + RandomHorizontalFlip + RandomCrop(32, pad 4) + Normalize), batched per-sample random parameters on the
  same uint8 batches of 128, a full epoch (only when kornia is installed: it is not a dependency of neuralign);
- ``eval``: the test-time loader (Normalize only) over the training set;
- ``TinyTen``: SGD steps (forward, backward, update) at batch 128, scaled to the 391 steps of an epoch.

Usage: ``python benchmarks/bench_data.py [path/to/cifar10.npz] [--threads N] [--compare-with OLD_DATA_PY]``.
Without the real file (default ``../shared/data/cifar10.npz`` or ``$NEURALIGN_SHARED_DATA/cifar10.npz``) it uses
random images of the same shape. ``--compare-with`` takes another version of ``neuralign/experiments/data.py``
(e.g. ``git show REV:neuralign/experiments/data.py > /tmp/old_data.py``) and times its ``ArrayLoader`` against
today's on the same images and transform, alternating full epochs (``--rounds`` each) and reporting the best.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neuralign.experiments.data import CIFAR_MEAN, CIFAR_STD, load_data
from neuralign.experiments.models import build_model


def _cifar_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    shared = Path(os.environ.get("NEURALIGN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = shared / "cifar10.npz"
    if path.is_file():
        return path
    tmp = Path(tempfile.mkdtemp()) / "cifar10.npz"
    rng = np.random.default_rng(0)
    np.savez(
        tmp,
        x_train=rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, 50000, dtype=np.uint8),
        x_test=rng.integers(0, 256, (10000, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, 10000, dtype=np.uint8),
    )
    sys.stdout.write(f"(real CIFAR-10 not found; using random images in {tmp})\n")
    return tmp


def _time_epoch(loader) -> tuple[float, int]:
    start = time.perf_counter()
    n = 0
    for x, _ in loader:
        n += x.shape[0]
    return time.perf_counter() - start, n


def _baseline_loader(path: str, loader):
    """``loader`` rebuilt with the ``ArrayLoader`` of another version of ``data.py`` (same images, transform)."""
    spec = importlib.util.spec_from_file_location("_bench_data_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    ds = loader.dataset
    return module.ArrayLoader(
        module.ArrayDataset(ds.images, ds.labels, ds.transform),
        batch_size=loader.batch_size,
        shuffle=loader.shuffle,
        drop_last=loader.drop_last,
        generator=0,
        num_workers=loader.num_workers,
    )


def _time_kornia(images: torch.Tensor, labels: torch.Tensor, n: int) -> float | None:
    """A full epoch of the CIFAR recipe with kornia.augmentation on shuffled uint8 batches of 128 (None without
    kornia)."""
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    augment = K.AugmentationSequential(
        K.RandomAffine(degrees=15.0, resample="nearest", padding_mode="zeros", p=1.0),
        K.RandomHorizontalFlip(p=0.5),
        K.RandomCrop((32, 32), padding=4, p=1.0),
        K.Normalize(mean=torch.tensor(CIFAR_MEAN), std=torch.tensor(CIFAR_STD)),
    )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for k in range(0, n, 128):
        idx = order[k : k + 128]
        x = augment(images.index_select(0, idx).to(torch.float32).div_(255.0))
        labels.index_select(0, idx)
    assert x.shape[1:] == images.shape[1:]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("npz", nargs="?", default=None)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--per-sample-images", type=int, default=5120)
    parser.add_argument("--tinyten-steps", type=int, default=15)
    parser.add_argument("--compare-with", default=None, help="another version of neuralign/experiments/data.py")
    parser.add_argument("--rounds", type=int, default=3, help="alternating epochs per loader with --compare-with")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = _cifar_path(args.npz)

    start = time.perf_counter()
    bundle = load_data(path, batch_size=128, generator=0)
    t_load = time.perf_counter() - start

    t_batched, n = _time_epoch(bundle.train)
    t_eval, _ = _time_epoch(bundle.train_eval)
    t_baseline = None
    if args.compare_with:
        baseline = _baseline_loader(args.compare_with, bundle.train)
        news, olds = [t_batched], []
        for _ in range(args.rounds):
            olds.append(_time_epoch(baseline)[0])
            news.append(_time_epoch(bundle.train)[0])
        t_batched, t_baseline = min(news), min(olds)

    from torchvision.transforms import v2

    per_sample = v2.Compose(
        [
            v2.RandomAffine(15),
            v2.RandomHorizontalFlip(),
            v2.RandomCrop(32, padding=4),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(CIFAR_MEAN, CIFAR_STD),
        ]
    )
    images, labels = bundle.train.dataset.images, bundle.train.dataset.labels
    m = min(args.per_sample_images, images.shape[0])

    class _PerSample(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return m

        def __getitem__(self, i: int):
            return per_sample(images[i]), labels[i]

    loader = torch.utils.data.DataLoader(_PerSample(), batch_size=128, shuffle=True, num_workers=0)
    t_part, _ = _time_epoch(loader)
    t_per_sample = t_part * n / m

    t_kornia = _time_kornia(images, labels, n)

    model = build_model("tinyten", 10, generator=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    batches = iter(bundle.train)
    x, y = next(batches)
    for _ in range(3):  # warm-up
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    start = time.perf_counter()
    for _ in range(args.tinyten_steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    t_step = (time.perf_counter() - start) / args.tinyten_steps
    t_train = t_step * len(bundle.train)

    out = sys.stdout.write
    out(f"threads={torch.get_num_threads()}  data={path}  train images={n}  batches={len(bundle.train)}\n")
    out(f"load_data (read npz, build loaders)       {t_load:8.2f} s\n")
    per_batch = t_batched / len(bundle.train) * 1e3
    out(f"batched augmented epoch                   {t_batched:8.2f} s  ({per_batch:.2f} ms/batch)\n")
    if t_baseline is not None:
        out(f"same epoch, --compare-with's ArrayLoader  {t_baseline:8.2f} s  (best of {args.rounds}; "
            f"today's best of {args.rounds + 1})\n")  # fmt: skip
        out(f"ratio batched / --compare-with            {t_batched / t_baseline:8.2f} x\n")
    out(f"test-transform epoch over train           {t_eval:8.2f} s\n")
    out(f"per-sample torchvision v2 epoch (scaled)  {t_per_sample:8.2f} s  (measured on {m} images)\n")
    if t_kornia is not None:
        out(f"kornia.augmentation batched epoch         {t_kornia:8.2f} s  "
            f"({t_kornia / len(bundle.train) * 1e3:.2f} ms/batch)\n")  # fmt: skip
    out(f"TinyTen SGD epoch (scaled)                {t_train:8.2f} s  ({t_step * 1e3:.1f} ms/step)\n")
    if t_kornia is not None:
        out(f"ratio kornia / batched                    {t_kornia / t_batched:8.1f} x\n")
        out(f"kornia loading / TinyTen epoch            {100 * t_kornia / t_train:8.1f} %\n")
    out(f"ratio per-sample / batched                {t_per_sample / t_batched:8.1f} x\n")
    out(f"batched loading / TinyTen epoch           {100 * t_batched / t_train:8.1f} %\n")
    out(f"per-sample loading / TinyTen epoch        {100 * t_per_sample / t_train:8.1f} %\n")


if __name__ == "__main__":
    main()

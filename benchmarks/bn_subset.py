"""How far test accuracy along a curve moves when batch norm is re-estimated on a few batches, not a full pass.

On MNIST (``../shared/data/mnist.npz``), for an MLP with batch norm and a small conv net with batch norm: two end
points are trained for one epoch from different seeds, then for the straight line and for a quadratic Bezier curve
fitted for one epoch, the test accuracy at ``--points`` values of t is measured with batch-norm statistics
re-estimated (a) on the full training set (469 batches of 128, the reference of Tatro et al.) and (b) on the first
k batches of a freshly shuffled loader, for k in ``--batches``, over ``--draws`` shuffles. Reported: the largest
and the mean |acc_full - acc_subset| over t (and draws), in percentage points.

Run: ``python benchmarks/bn_subset.py`` (about 8 minutes on 2 loaded CPU threads, mostly the conv net's full
passes; ``--models mlp`` takes one minute). Result of that run (quoted in ``evaluate_curve``'s docstring):

| model | curve | BN batches | max abs diff | mean abs diff | full-pass acc range |
| --- | --- | ---: | ---: | ---: | --- |
| mlp | line | 5 | 0.38 | 0.09 | 92.03-97.19 |
| mlp | line | 10 | 0.55 | 0.14 | 92.03-97.19 |
| mlp | line | 20 | 0.07 | 0.03 | 92.03-97.19 |
| mlp | line | 50 | 0.07 | 0.03 | 92.03-97.19 |
| mlp | bezier (1 epoch) | 5 | 0.14 | 0.06 | 97.13-97.75 |
| mlp | bezier (1 epoch) | 10 | 0.08 | 0.03 | 97.13-97.75 |
| mlp | bezier (1 epoch) | 20 | 0.06 | 0.03 | 97.13-97.75 |
| mlp | bezier (1 epoch) | 50 | 0.07 | 0.02 | 97.13-97.75 |
| conv | line | 5 | 0.73 | 0.23 | 30.42-97.37 |
| conv | line | 10 | 0.17 | 0.08 | 30.42-97.37 |
| conv | line | 20 | 0.28 | 0.06 | 30.42-97.37 |
| conv | line | 50 | 0.38 | 0.08 | 30.42-97.37 |
| conv | bezier (1 epoch) | 5 | 0.16 | 0.07 | 96.75-97.65 |
| conv | bezier (1 epoch) | 10 | 0.10 | 0.04 | 96.75-97.65 |
| conv | bezier (1 epoch) | 20 | 0.07 | 0.02 | 96.75-97.65 |
| conv | bezier (1 epoch) | 50 | 0.08 | 0.03 | 96.75-97.65 |
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from neuralign.curves import Line, fit_curve, reestimate_bn

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.BatchNorm1d(256), nn.ReLU(),
        nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10),
    )


def convnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


class Batches:
    """Shuffled mini-batches sliced from in-memory tensors (a DataLoader without per-sample overhead)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int | None) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator) if self.generator is not None else torch.arange(n)
        for start in range(0, n, self.batch_size):
            index = order[start:start + self.batch_size]
            yield self.x[index], self.y[index]


def load(path: Path) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    data = np.load(path)

    def prep(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).float().div_(255.0).sub_(0.1307).div_(0.3081)[:, None]

    train = prep(data["x_train"]), torch.from_numpy(data["y_train"].astype(np.int64))
    test = prep(data["x_test"]), torch.from_numpy(data["y_test"].astype(np.int64))
    return train, test


def train_endpoint(make, seed: int, train) -> dict[str, torch.Tensor]:
    model = make(seed).train()
    loader = Batches(*train, 128, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def accuracy(model: nn.Module, params, buffers, test: Batches) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in test:
            correct += int((functional_call(model, (params, buffers), (x,)).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--models", nargs="+", default=["mlp", "conv"])
    parser.add_argument("--batches", nargs="+", type=int, default=[5, 10, 20, 50])
    parser.add_argument("--points", type=int, default=9)
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = load(args.data)
    test_loader = Batches(*test, 1000, None)
    makers = {"mlp": mlp, "conv": convnet}
    rows = []
    for name in args.models:
        started = time.perf_counter()
        make = makers[name]
        model = make(0)
        a, b = train_endpoint(make, 1, train), train_endpoint(make, 2, train)
        fit_loader = Batches(*train, 128, 3)
        fitted = fit_curve(model, a, b, fit_loader, epochs=1, generator=0).curve
        print(f"# {name}: end points and curve trained in {time.perf_counter() - started:.0f} s", flush=True)
        full_loader = Batches(*train, 128, 4)
        ts = torch.linspace(0, 1, args.points).tolist()
        for curve_name, curve in (("line", Line.between(a, b)), ("bezier (1 epoch)", fitted)):
            full, diffs = [], {k: [] for k in args.batches}
            for t in ts:
                params = curve(t)
                acc_full = accuracy(model, params, reestimate_bn(model, params, full_loader), test_loader)
                full.append(acc_full)
                for draw in range(args.draws):
                    loader = Batches(*train, 128, 100 + draw)
                    for k in args.batches:
                        buffers = reestimate_bn(model, params, loader, max_batches=k)
                        diffs[k].append(abs(accuracy(model, params, buffers, test_loader) - acc_full))
            print(f"# {name}, {curve_name}: {time.perf_counter() - started:.0f} s", flush=True)
            for k in args.batches:
                rows.append((name, curve_name, k, 100 * max(diffs[k]), 100 * float(np.mean(diffs[k])),
                             100 * min(full), 100 * max(full)))
        print(f"# {name}: {time.perf_counter() - started:.0f} s", flush=True)
    print(f"\nMNIST, batch 128 (full pass = {len(full_loader)} batches), {args.points} t-points, "
          f"{args.draws} shuffles per subset size; |acc_full - acc_subset| in percentage points\n")
    print("| model | curve | BN batches | max abs diff | mean abs diff | full-pass acc range |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for name, curve_name, k, mx, mean, lo, hi in rows:
        print(f"| {name} | {curve_name} | {k} | {mx:.2f} | {mean:.2f} | {lo:.2f}-{hi:.2f} |")


if __name__ == "__main__":
    main()

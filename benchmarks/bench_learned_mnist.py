"""Evidence: learned permutations against weight and activation matching on the MLP 3x512 on MNIST (the one setting
where Git Re-Basin, Sinkhorn re-basin and Navon et al. 2024 all report), with each method's cost.

For each of ``--pairs`` pairs of MLPs (784-512-512-512-10, ReLU, no batch norm) trained from independent seeds
with the same recipe, every method finds a permutation of B, and the segment from A to the permuted B is evaluated
on the MNIST test set with :func:`neuralign.curves.evaluate_interpolation` (25 points; both barrier definitions):

- ``naive``: the identity; ``weight``: weight matching (``align(method="weight")``); ``correlation`` and ``l2``:
  activation matching on the first 10,000 training images (Pearson correlation; cross moments, which is Git
  Re-Basin's activation matching);
- ``ste``: :func:`~neuralign.alignment.straight_through` (midpoint loss, SGD lr 1e-2, momentum 0.9, batch 1000);
- ``sinkhorn``: :func:`~neuralign.alignment.sinkhorn_rebasin` from the identity (Navon et al.'s "Sinkhorn") and
  ``wm+sinkhorn`` from weight matching (their "WM + Sinkhorn"): random lambda loss, Adam lr 0.1, tau 1, 20 sweeps;
- ``learned``: :func:`~neuralign.alignment.learned_from_weight_matching` (lambda ~ U(0.4, 0.6), Adam lr 1e-2).

Costs: wall seconds of the matching (one thread each), passes over the 60,000 training images (the data methods:
10,000 / 60,000 of one), linear assignments solved. Each cost is also given as a ratio to one evaluation pass over
the alignment data (a forward pass of A over the 60,000 training images, timed in the same run).

    python benchmarks/bench_learned_mnist.py [--pairs 0,1,2] [--train-epochs 3] [--epochs 3] [--out pair0.json]
        [--cache DIR]
    python benchmarks/bench_learned_mnist.py --merge pair0.json pair1.json pair2.json

Needs ``mnist.npz`` (``x_train`` uint8 (60000, 28, 28), ``y_train``, ``x_test``, ``y_test``) under ``--data``
(default ``../shared/data`` from the repository root); exits with a message when it is absent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neuralign.alignment import (
    align,
    apply_permutation,
    identity_permutation,
    learned_from_weight_matching,
    sinkhorn_rebasin,
    straight_through,
    trace_spec,
)
from neuralign.curves import InterpolationProtocol, evaluate_interpolation

MEAN, STD = 0.1307, 0.3081


def load(folder: Path):
    path = folder / "mnist.npz"
    if not path.exists():
        sys.exit(f"no {path}: this benchmark needs MNIST as mnist.npz (see /work/shared/data/README.md)")
    d = np.load(path)

    def prep(x):
        return ((torch.from_numpy(x).float() / 255.0 - MEAN) / STD).reshape(len(x), -1)

    return (prep(d["x_train"]), torch.from_numpy(d["y_train"]).long(), prep(d["x_test"]),
            torch.from_numpy(d["y_test"]).long())  # fmt: skip


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512),
                         nn.ReLU(), nn.Linear(512, 10))  # fmt: skip


def train(seed: int, x, y, epochs: int) -> nn.Module:
    """Adam lr 1e-3, batch 128, ``epochs`` epochs (the same recipe for every end point; seed: init and order)."""
    model = mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def end_point(seed: int, x, y, epochs: int, cache: Path | None) -> nn.Module:
    """A trained end point, from ``cache`` when it holds one of this seed and recipe."""
    path = None if cache is None else cache / f"mlp_seed{seed}_epochs{epochs}.pt"
    if path is not None and path.exists():
        model = mlp(seed)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = train(seed, x, y, epochs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="0,1,2", help="pair indices to run (pair i: seeds 2i+1, 2i+2)")
    parser.add_argument("--merge", type=Path, nargs="*", default=None,
                        help="print the table of these --out files (other pairs' runs) instead of running")  # fmt: skip
    parser.add_argument("--train-epochs", type=int, default=3, help="epochs of each end point (default 3)")
    parser.add_argument("--epochs", type=int, default=3, help="epoch budget of each learned method (default 3)")
    parser.add_argument("--methods", default="naive,weight,correlation,l2,ste,sinkhorn,wm+sinkhorn,learned")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write every number as JSON here")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the trained end points here (pair i's a and b), reused by a later run")  # fmt: skip
    args = parser.parse_args()
    if args.merge:
        runs = [json.loads(p.read_text()) for p in args.merge]
        rows = {m: [r for run in runs for r in run["rows"][m]] for m in runs[0]["rows"]}
        table(rows, runs[0]["args"])
        return
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    x, y, xt, yt = load(args.data)
    test = list(zip(xt.split(1000), yt.split(1000)))
    align_data = [xb for xb in x[:10000].split(1000)]
    protocol = InterpolationProtocol(num_points=25, splits=("test",), alignment_data="train[:10000]",
                                     alignment_size=10000)  # fmt: skip

    rows: dict[str, list[dict]] = {m: [] for m in methods}
    for pair in (int(p) for p in args.pairs.split(",")):
        started = time.perf_counter()
        a, b = (end_point(seed, x, y, args.train_epochs, args.cache) for seed in (2 * pair + 1, 2 * pair + 2))
        print(f"pair {pair}: trained in {time.perf_counter() - started:.0f} s", flush=True)
        spec = trace_spec(a, x[:2])
        with torch.no_grad():  # one evaluation pass over the alignment data (the 60,000 training images)
            t0 = time.perf_counter()
            for xb in x.split(1000):
                a(xb)
            eval_pass = time.perf_counter() - t0
        loader = DataLoader(TensorDataset(x, y), batch_size=1000, shuffle=True,
                            generator=torch.Generator().manual_seed(pair))  # fmt: skip
        for method in methods:
            t0 = time.perf_counter()
            cost = {"data_passes": 0.0, "assignments": 0}
            if method == "naive":
                perms = identity_permutation(spec)
            elif method in ("weight", "correlation", "l2"):
                res = align(a, b, None if method == "weight" else align_data, method=method, spec=spec, generator=pair)
                perms = res.perms
                cost["data_passes"] = 0.0 if method == "weight" else 10000 / 60000
                # weight matching: one assignment per group per sweep, plus the greedy start; data methods: one
                cost["assignments"] = (res.n_iter + 1) * len(spec.groups) if method == "weight" else len(spec.groups)
            else:
                fn, kwargs = {
                    "ste": (straight_through, {}),
                    "sinkhorn": (sinkhorn_rebasin, {"init": "identity"}),
                    "wm+sinkhorn": (sinkhorn_rebasin, {"init": "weight"}),
                    "learned": (learned_from_weight_matching, {}),
                }[method]
                res = fn(a, b, loader, spec=spec, epochs=args.epochs, generator=pair, **kwargs)
                perms = res.perms
                cost = {"data_passes": res.cost.data_passes, "assignments": res.cost.assignments,
                        "history": [h["loss"] for h in res.history]}  # fmt: skip
            seconds = time.perf_counter() - t0
            ev = evaluate_interpolation(a, a.state_dict(), apply_permutation(b.state_dict(), spec, perms), test, test,
                                        protocol=protocol)  # fmt: skip
            s = ev.splits["test"]
            row = {"pair": pair, "seconds": seconds, "eval_pass_seconds": eval_pass, **cost,
                   "loss_barrier": s.loss_barrier_average, "loss_barrier_linear": s.loss_barrier_linear,
                   "accuracy_barrier": s.accuracy_barrier_average, "midpoint_accuracy": s.midpoint_accuracy,
                   "midpoint_loss": s.midpoint_loss, "loss_auc": s.loss_auc, "endpoint_loss": s.endpoint_loss,
                   "endpoint_accuracy": s.endpoint_accuracy}  # fmt: skip
            rows[method].append(row)
            print(f"  {method:12s} barrier {s.loss_barrier_average:.4f} (linear {s.loss_barrier_linear:.4f}) "
                  f"midpoint acc {s.midpoint_accuracy:.4f}  {seconds:7.1f} s  passes {cost['data_passes']:.2f}  "
                  f"LAPs {cost['assignments']}", flush=True)  # fmt: skip

    table(rows, {k: str(v) for k, v in vars(args).items()})
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


def table(rows: dict[str, list[dict]], args: dict[str, str]) -> None:
    """The markdown table: mean ± std over pairs."""

    def ms(values):
        values = list(values)
        return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)

    n = len(next(iter(rows.values())))
    print(f"\nMLP 3x512, MNIST test set, {n} pairs, end points {args['train_epochs']} epochs, learned methods "
          f"{args['epochs']} epochs, 25 points; mean ± std over pairs")  # fmt: skip
    print("| method | loss barrier | loss barrier (linear) | midpoint loss | loss AUC | accuracy barrier | "
          "midpoint accuracy | seconds | x eval pass | data passes | assignments |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    keys = ("loss_barrier", "loss_barrier_linear", "midpoint_loss", "loss_auc", "accuracy_barrier",
            "midpoint_accuracy", "seconds")  # fmt: skip
    for method, rs in rows.items():
        cells = [ms(r[k] for r in rs) for k in keys]
        ratio = statistics.mean(r["seconds"] / r["eval_pass_seconds"] for r in rs)
        print(f"| {method} | " + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in cells[:-1])
              + f" | {cells[-1][0]:.1f} ± {cells[-1][1]:.1f} | {ratio:.0f} | {rs[0]['data_passes']:.2f} | "
              f"{statistics.mean(r['assignments'] for r in rs):.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()

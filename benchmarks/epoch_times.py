"""Seconds per epoch of each kind of pass the paper's study makes, measured per batch on this CPU and extrapolated.

For each architecture of Table 1 (TinyTen, ResNet32, GoogLeNet; CIFAR-shaped 32x32 inputs, 10 classes) and one
batch size, the median over ``--repeats`` batches (after one warm-up) of:

- ``train``: one end-point training step (forward, cross-entropy, backward, Nesterov SGD);
- ``curve``: one curve-fitting step (:func:`neuralign.curves.fit_curve`'s step on a quadratic Bezier);
- ``bn``: one batch-norm re-estimation batch (train-mode forward without gradients);
- ``eval``: one evaluation batch (eval-mode forward without gradients).

Printed: seconds per batch and per CIFAR epoch (50,000 training images, 10,000 test images; per-image cost taken
as constant, so a batch of 32 is scaled by 128/32 to the paper's batch of 128), and the CPU hours of each stage
of the paper's study for one (architecture, dataset) cell of Table 1: 6 end points x 250 epochs; per pair, the
alignment (both networks over 10,000 images), 2 x 250 curve epochs (Unaligned, Aligned) and 2 x 270 PAM epochs
(counted as curve steps; none for GoogLeNet), 65 points per curve each with a full batch-norm pass over the
training set and a test pass. Verification is not counted (its budget is set by the ``verify_*`` options).

Run: ``python benchmarks/epoch_times.py`` (a few minutes; GoogLeNet dominates); ``--archs``, ``--repeats``.
One thread per process (``torch.set_num_threads(1)``): the figures are single-core CPU seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from neuralign._utils import classification_loss
from neuralign.curves import Bezier
from neuralign.curves._weights import buffer_copies as _buffer_copies
from neuralign.curves._weights import call as _call
from neuralign.curves._weights import module_mode as _module_mode
from neuralign.curves.fit import _CurveStepper
from neuralign.experiments.models import build_model

TRAIN, TEST, ALIGN, BATCH = 50_000, 10_000, 10_000, 128
EPOCHS, PAM_EPOCHS, POINTS, PAIRS = 250, 270, 65, 3


def _median(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(arch: str, batch: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    net = build_model(arch, 10, generator=0).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def train():
        opt.zero_grad()
        classification_loss(net(x), y).backward()
        opt.step()

    other = build_model(arch, 10, generator=1)
    pa, pb = dict(net.named_parameters()), dict(other.named_parameters())
    stepper = _CurveStepper(net, Bezier.between(pa, pb, degree=2), weight_decay=5e-4, proximal=None,
                            loss_fn=classification_loss, optimizer=None)  # fmt: skip
    params = {k: v.detach() for k, v in pa.items()}
    buffers = _buffer_copies(net, torch.device("cpu"))

    def curve():
        with _module_mode(net, True):
            stepper.step(x, y, 0.5)

    def forward(training: bool):
        def run():
            with torch.no_grad(), _module_mode(net, training):
                _call(net, params, buffers, x)

        return run

    per_batch = {"train": _median(train, repeats), "curve": _median(curve, repeats),
                 "bn": _median(forward(True), repeats), "eval": _median(forward(False), repeats)}  # fmt: skip
    return {k: v * BATCH / batch for k, v in per_batch.items()}  # per batch of 128


def stage_hours(arch: str, per: dict[str, float]) -> dict[str, float]:
    train_batches, test_batches, align_batches = TRAIN / BATCH, TEST / BATCH, ALIGN / BATCH
    pam = 0 if arch == "googlenet" else 2
    per_point = per["bn"] * train_batches + per["eval"] * test_batches
    curves = 2 + pam
    return {
        "end points": 2 * PAIRS * EPOCHS * per["train"] * train_batches / 3600,
        "alignment": PAIRS * 2 * per["eval"] * align_batches / 3600,
        "curves": PAIRS * (2 * EPOCHS + pam * PAM_EPOCHS) * per["curve"] * train_batches / 3600,
        "evaluations": PAIRS * curves * POINTS * per_point / 3600,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["tinyten", "resnet32", "googlenet"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("seconds per batch of 128 (per CIFAR epoch: train/curve/bn x 391 batches, eval x 79), one CPU thread")
    print(f"{'arch':<10} {'train':>8} {'curve':>8} {'bn':>8} {'eval':>8} | CPU hours per Table 1 cell: "
          "end points, alignment, curves, evaluations, total")
    for arch in args.archs:
        batch = 32 if arch == "googlenet" else BATCH
        per = measure(arch, batch, args.repeats)
        hours = stage_hours(arch, per)
        cells = ", ".join(f"{h:,.0f}" for h in hours.values())
        print(f"{arch:<10} {per['train']:>8.3f} {per['curve']:>8.3f} {per['bn']:>8.3f} {per['eval']:>8.3f} | "
              f"{cells}, {sum(hours.values()):,.0f}" + (" (batch 32, scaled)" if batch != BATCH else ""))


if __name__ == "__main__":
    main()

"""Cost of one curve-fitting step against one plain training step of the same network (CPU).

For each network, three steps on the same CIFAR-shaped random batch are alternated (cycling through all six
orders) and timed:

- ``plain``: forward, cross-entropy, backward, SGD step (momentum 0.9, Nesterov, weight decay 5e-4);
- ``curve``: the step of :func:`neuralign.curves.fit_curve` (quadratic Bezier): draw t, w(t) from the flat point
  buffer, forward at w(t) with ``functional_call``, cross-entropy + (wd/2)||w(t)||^2, backward, SGD step on the
  control point;
- ``naive``: the same with a per-parameter dict comprehension ``c0 a + c1 theta + c2 b``, a per-parameter L2 sum
  and autograd through both (a plain ``functional_call`` loop).

Garipov et al.'s curve code runs its curve step at 0.99-1.09x its plain step; run-to-run noise is about +-5%.
Reported: median milliseconds per step and the ratios of the medians.

Run: ``python benchmarks/bench_curves.py`` (about a minute on 2 idle threads, several when the machine is
shared); ``--repeats``, ``--models``, ``--threads``, ``--batch`` and ``--device`` (e.g. ``cuda``; the clock is read
after ``torch.cuda.synchronize``) change the defaults.

Two default runs on an idle 2-core VM (torch 2.14, CPU), curve/plain ratio of medians (paired): TinyTen 1.022
(0.983) and 0.944 (0.991); ResNet32 0.991 (1.019) and 1.073 (1.085); VGG16 1.050 (1.036) and 0.938 (0.991); the
naive loop 0.98-1.12. Step-to-step noise on that machine is about +-20 %, run-to-run about +-7 %. The fixed
per-step overhead, measured with ``--batch 2``, is ~0.6 ms (TinyTen) and ~1.8 ms (ResNet32); the flat-buffer
passes cost ~25 ms per VGG16 step (mv 16 ms, gradient assembly 7 ms, ||w||^2 2 ms), against ~1.6 s.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from torch.func import functional_call

from neuralign._utils import classification_loss
from neuralign.curves import Bezier
from neuralign.curves.fit import _CurveStepper
from neuralign.experiments.models import build_model

WEIGHT_DECAY = 5e-4
CPU = torch.device("cpu")
LR = 0.01  # small, so that repeated steps on one batch stay finite; it does not change the cost


def _sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9, nesterov=True, weight_decay=0.0)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: the clock is read after it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_steps(name: str, batch: int, device: torch.device = CPU):
    model_a = build_model(name, 10, generator=0)
    model_b = build_model(name, 10, generator=1)
    point_a = {k: v.detach().clone().to(device) for k, v in model_a.named_parameters()}
    point_b = {k: v.detach().clone().to(device) for k, v in model_b.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)

    plain_model = build_model(name, 10, generator=0).to(device).train()
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=LR, momentum=0.9, nesterov=True,
                                weight_decay=WEIGHT_DECAY)

    def plain() -> None:
        plain_opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(plain_model(x), y)
        loss.backward()
        plain_opt.step()

    curve_model = build_model(name, 10, generator=2).to(device).train()
    stepper = _CurveStepper(
        curve_model,
        Bezier.between(point_a, point_b),
        weight_decay=WEIGHT_DECAY,
        proximal=None,
        loss_fn=classification_loss,
        optimizer=_sgd,
    )

    def curve() -> None:
        t = float(torch.rand((), dtype=torch.float64, generator=generator))
        stepper.step(x, y, t)

    naive_model = build_model(name, 10, generator=3).to(device).train()
    theta = {k: ((point_a[k] + point_b[k]) / 2).requires_grad_(True) for k in point_a}
    buffers = {k: v.detach().clone() for k, v in naive_model.named_buffers()}
    naive_opt = _sgd(list(theta.values()))

    def naive() -> None:
        t = float(torch.rand((), dtype=torch.float64, generator=generator))
        c0, c1, c2 = (1 - t) ** 2, 2 * t * (1 - t), t**2
        naive_opt.zero_grad(set_to_none=True)
        w = {k: c0 * point_a[k] + c1 * theta[k] + c2 * point_b[k] for k in theta}
        out = functional_call(naive_model, (w, buffers), (x,))
        loss = torch.nn.functional.cross_entropy(out, y)
        loss = loss + 0.5 * WEIGHT_DECAY * sum(v.pow(2).sum() for v in w.values())
        loss.backward()
        naive_opt.step()

    n_params = sum(v.numel() for v in point_a.values())
    return {"plain": plain, "curve": curve, "naive": naive}, n_params


def bench(name: str, repeats: int, warmup: int, batch: int, device: torch.device = CPU
          ) -> dict[str, object]:  # fmt: skip
    steps, n_params = make_steps(name, batch, device)
    order = list(steps)
    for _ in range(warmup):
        for key in order:
            steps[key]()
    times: dict[str, list[float]] = {key: [] for key in order}
    # cycle through all orders, so that each step follows each other step equally often (a fixed rotation would
    # always run one step right after the same other one, and allocator/cache effects would bias it)
    orders = list(itertools.permutations(order))
    for r in range(repeats):
        for key in orders[r % len(orders)]:
            sync(device)
            start = time.perf_counter()
            steps[key]()
            sync(device)
            times[key].append(time.perf_counter() - start)
    med = {key: statistics.median(v) for key, v in times.items()}
    paired = {
        key: statistics.median(a / b for a, b in zip(times[key], times["plain"])) for key in ("curve", "naive")
    }
    return {"name": name, "params": n_params, "median": med, "paired": paired}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tinyten", "resnet32", "vgg16"])
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats (default 12/6/8 for tinyten/resnet32/vgg16)"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    default_repeats = {"tinyten": 12, "resnet32": 6, "vgg16": 8}
    rows = []
    for name in args.models:
        repeats = args.repeats or default_repeats.get(name, 10)
        rows.append(bench(name, repeats, args.warmup, args.batch, device))
        r = rows[-1]
        print(f"# {name}: done ({repeats} repeats)", flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"\n{where}, torch {torch.__version__}, batch {args.batch}x3x32x32, quadratic Bezier\n")
    print("| model | params | plain ms | curve ms | naive ms | curve/plain | naive/plain | paired curve/plain |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        m = r["median"]
        print(
            f"| {r['name']} | {r['params']:,} | {m['plain'] * 1e3:.1f} | {m['curve'] * 1e3:.1f} | "
            f"{m['naive'] * 1e3:.1f} | {m['curve'] / m['plain']:.3f} | {m['naive'] / m['plain']:.3f} | "
            f"{r['paired']['curve']:.3f} |"
        )


if __name__ == "__main__":
    main()

"""Cost of robust curve fitting and robust evaluation against their robust and clean counterparts (CPU).

Two measurements per network, side by side in one run (ratios, not absolute times, are the result):

1. One robust curve step over one robust training step of the same network, on the same batch:
   ``train``: PGD against the module in train mode (:meth:`neuralign.attacks.PGD.attack`), then forward,
   cross-entropy, backward, SGD step (what ``train_model(adversarial=...)`` does per batch); ``curve``: the step
   of ``fit_curve(adversarial=...)`` (quadratic Bezier: draw t, w(t), PGD against the network at w(t), loss on
   the adversarial batch + L2 on w(t), backward, SGD on the control point). The attack (``--steps`` forward and
   backward passes) dominates both, so the target is a ratio <= 1.05. The steps alternate, cycling through both
   orders; reported: medians and the median of paired ratios.
2. Robust evaluation per t over clean evaluation per t: :func:`neuralign.curves.evaluate_curve` with
   ``adversarial=PGD(...)`` (batch norm re-estimated on PGD examples of ``--bn-batches`` batches, clean and robust
   test values on ``--test-batches`` batches of 256) against the same call without an attack, per point.

Inputs are uniform in [0, 1] (the attack needs [0, 1] inputs); the MLP sees MNIST-shaped inputs (1x28x28), TinyTen
CIFAR-shaped ones (3x32x32). PGD settings: eps 8/255, step 2/255, ``--steps`` steps (default 5, the paper's).

Run: ``python benchmarks/bench_robust.py`` (about a minute on 2 idle threads); ``--models``, ``--repeats``,
``--threads``, ``--batch``, ``--steps``, ``--bn-batches``, ``--test-batches`` and ``--device`` (e.g. ``cuda``; the
clock is read after ``torch.cuda.synchronize``) change the defaults.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from neuralign._utils import classification_loss
from neuralign.attacks import PGD
from neuralign.curves import Bezier, evaluate_curve
from neuralign.curves.fit import _CurveStepper
from neuralign.experiments.models import build_model

WEIGHT_DECAY = 5e-4
CPU = torch.device("cpu")
LR = 0.01  # small, so that repeated steps on one batch stay finite; it does not change the cost
SHAPES = {"mlp": (1, 28, 28), "tinyten": (3, 32, 32)}


def _build(name: str, seed: int) -> torch.nn.Module:
    if name == "mlp":
        return build_model("mlp", 10, in_features=784, hidden=(256, 256), batch_norm=True, generator=seed)
    return build_model(name, 10, generator=seed, in_channels=SHAPES.get(name, (3,))[0])


def _points(name: str, device: torch.device) -> tuple[dict, dict]:
    return tuple({k: v.detach().clone().to(device) for k, v in _build(name, s).named_parameters()} for s in (0, 1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_steps(name: str, batch: int, pgd: PGD, device: torch.device = CPU):
    point_a, point_b = _points(name, device)
    generator = torch.Generator().manual_seed(0)
    shape = SHAPES.get(name, (3, 32, 32))
    x = torch.rand(batch, *shape, generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)

    train_model_ = _build(name, 0).to(device).train()
    opt = torch.optim.SGD(train_model_.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=WEIGHT_DECAY)
    attack_gen = torch.Generator(device).manual_seed(1)

    def train() -> None:
        adv = pgd.attack(train_model_, x, y, train=True, generator=attack_gen)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(train_model_(adv), y).backward()
        opt.step()

    stepper = _CurveStepper(
        _build(name, 2).to(device).train(),
        Bezier.between(point_a, point_b),
        weight_decay=WEIGHT_DECAY,
        proximal=None,
        loss_fn=classification_loss,
        optimizer=lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, nesterov=True),
        adversarial=pgd,
        attack_generator=torch.Generator(device).manual_seed(1),
    )

    def curve() -> None:
        stepper.step(x, y, float(torch.rand((), dtype=torch.float64, generator=generator)))

    return {"train": train, "curve": curve}


def bench_steps(name: str, repeats: int, batch: int, pgd: PGD, device: torch.device = CPU
                ) -> dict[str, object]:  # fmt: skip
    steps = make_steps(name, batch, pgd, device)
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {key: [] for key in steps}
    orders = (("train", "curve"), ("curve", "train"))
    for r in range(repeats):
        for key in orders[r % 2]:
            _sync(device)
            start = time.perf_counter()
            steps[key]()
            _sync(device)
            times[key].append(time.perf_counter() - start)
    med = {key: statistics.median(v) for key, v in times.items()}
    paired = statistics.median(a / b for a, b in zip(times["curve"], times["train"]))
    return {"median": med, "paired": paired}


def bench_eval(name: str, pgd: PGD, bn_batches: int, test_batches: int, points: int,
               device: torch.device = CPU) -> dict[str, float]:  # fmt: skip
    point_a, point_b = _points(name, device)
    model = _build(name, 2).to(device)
    curve = Bezier.between(point_a, point_b)
    g = torch.Generator().manual_seed(3)
    shape = SHAPES.get(name, (3, 32, 32))

    def batches(n: int, size: int) -> list:
        return [(torch.rand(size, *shape, generator=g).to(device),
                 torch.randint(0, 10, (size,), generator=g).to(device)) for _ in range(n)]  # fmt: skip

    bn, test = batches(bn_batches, 128), batches(test_batches, 256)
    out = {}
    for label, attack in (("clean", None), ("robust", pgd), ("clean ", None), ("robust ", pgd)):  # twice, alternating
        _sync(device)
        start = time.perf_counter()
        evaluate_curve(model, curve, bn, test, num_points=points, max_bn_batches=bn_batches, adversarial=attack,
                       generator=0)  # fmt: skip
        _sync(device)
        out.setdefault(label.strip(), []).append((time.perf_counter() - start) / points)
    return {k: min(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "tinyten"])
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 40 mlp, 8 others)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="PGD steps")
    parser.add_argument("--bn-batches", type=int, default=4)
    parser.add_argument("--test-batches", type=int, default=4)
    parser.add_argument("--points", type=int, default=3, help="points along t timed per evaluation")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pgd = PGD(eps=8 / 255, alpha=2 / 255, steps=args.steps)
    rows = []
    for name in args.models:
        repeats = args.repeats or (40 if name == "mlp" else 8)
        steps = bench_steps(name, repeats, args.batch, pgd, device)
        ev = bench_eval(name, pgd, args.bn_batches, args.test_batches, args.points, device)
        rows.append((name, steps, ev))
        print(f"# {name}: done ({repeats} repeats)", flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"\n{where}, torch {torch.__version__}, batch {args.batch}, PGD-{args.steps}; "
          f"evaluation: {args.bn_batches} BN batches of 128, {args.test_batches} test batches of 256 per t\n")
    print("| model | robust train step | robust curve step | curve/train | paired | clean eval per t | "
          "robust eval per t | robust/clean |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, steps, ev in rows:
        m = steps["median"]
        print(
            f"| {name} | {m['train'] * 1e3:.1f} ms | {m['curve'] * 1e3:.1f} ms | {m['curve'] / m['train']:.3f} | "
            f"{steps['paired']:.3f} | {ev['clean'] * 1e3:.0f} ms | {ev['robust'] * 1e3:.0f} ms | "
            f"{ev['robust'] / ev['clean']:.2f} |"
        )


if __name__ == "__main__":
    main()

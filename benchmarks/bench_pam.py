"""Benchmark: the cost of one PAM P-step over the cost of one curve-fitting epoch (TinyTen, CIFAR-shaped data).

The P-step of :func:`neuralign.curves.fit_curve_pam` estimates :math:`\\nabla_P F` on ``gradient_batches``
mini-batches (default a tenth of an epoch) with every permutation applied as a dense matrix, then solves one
linear assignment per group; the backtracking check adds ``value_batches * len(value_ts)`` forward passes when the
step moves. Both are timed side by side in one run, alternating, and the medians are compared (target <= 0.2).

The QAPLIB comparison of :func:`neuralign.optim.solve_qap` with scipy lives in ``benchmarks/bench_qap.py``.

    python benchmarks/bench_pam.py [--batches 40] [--repeats 3] [--threads 2] [--device cpu]

With ``--device cuda`` the networks, data and permutation matrices live on the GPU (the assignments are solved on
the CPU, as always) and the clock is read after ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from neuralign.alignment import identity_permutation, trace_spec
from neuralign.curves import fit_curve
from neuralign.curves.pam import CurvePermutationProblem
from neuralign.experiments.models import build_model
from neuralign.optim import perm_to_matrix, solve_assignment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40, help="mini-batches of 128 in one epoch (default 40)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lam", type=float, default=1000.0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    gen = torch.Generator().manual_seed(0)
    loader = [
        (torch.randn(128, 3, 32, 32, generator=gen).to(device), torch.randint(0, 10, (128,), generator=gen).to(device))
        for _ in range(args.batches)
    ]
    a = build_model("tinyten", 10, generator=1).to(device)
    b = build_model("tinyten", 10, generator=2).to(device)
    sa, sb = a.state_dict(), b.state_dict()
    spec = trace_spec(a, loader[0][0][:2])
    gradient_batches = max(1, args.batches // 10)
    problem = CurvePermutationProblem(a, sa, sb, spec, loader, gradient_batches=gradient_batches, value_batches=2)
    x = [torch.zeros(sum(problem.numels), device=device)]
    mats = {g: perm_to_matrix(p, dtype=torch.float32).to(device) for g, p in identity_permutation(spec).items()}

    def p_step() -> None:
        grad = problem.gradient_p(x, mats)
        for g, G in grad.items():
            solve_assignment(G - mats[g] / args.lam, name=g)

    def epoch() -> None:
        fit_curve(a, sa, sb, loader, epochs=1, generator=0)

    p_step()  # warm-up (kernel selection, first-call costs)
    epoch()
    p_times, e_times = [], []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        p_step()
        sync()
        p_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        epoch()
        sync()
        e_times.append(time.perf_counter() - t0)
    p, e = statistics.median(p_times), statistics.median(e_times)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    print(f"## PAM P-step vs curve epoch (TinyTen, {args.batches} batches of 128, {where})\n")
    print("| measure | median seconds | ratio to one curve epoch |")
    print("| --- | --- | --- |")
    print(f"| one curve-fitting epoch | {e:.2f} | 1.00 |")
    print(f"| one P-step ({gradient_batches} gradient batches + {len(spec.groups)} assignments) | {p:.2f} | "
          f"{p / e:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()

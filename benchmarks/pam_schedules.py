"""PAM from the identity: how far does each P-step schedule lower the curve objective at the straight line?

The first P-step of "PAM Unaligned" (Tatro et al. 2020, §3; PAPER_NOTES §3.2) runs at :math:`\\theta_{off} = 0`,
the straight line between end point A and :math:`P w_B`, starting from :math:`P = I`. This script runs that step
(the x-step is not run) with several schedules on one pair of trained end points, and prints the monitored
objective :math:`F` (mean training loss plus the L2 term at t = 0.25, 0.5, 0.75 on 8 fixed batches) before and
after, the units reassigned, the fraction of units on which the result agrees with the correlation alignment, and
the seconds taken. :math:`F` at the correlation alignment is printed for reference.

Schedules (``--schedules``, comma-separated):

``full``
    one linearised step with :math:`\\lambda = 1000` (backtracked), repeated ``--steps`` times: the study's former
    P-step, which reassigned nearly every unit at once;
``bounded``
    linearised steps that move at most 10% of each group's units, 10 per P-step (``max_moved=0.1, p_steps=10``),
    repeated ``--steps`` times;
``birkhoff-0.05`` / ``birkhoff-1``
    the official relaxed step: 160 projected SGD steps on the Birkhoff polytope (one training batch each, i.e. two
    epochs of 10,000 images), proximal :math:`\\nu = 1000`, learning rate 0.05 (the official value, which it runs
    for 20 epochs) or 1, then Birkhoff–von Neumann rounding with 32 draws.

    python benchmarks/pam_schedules.py --endpoints A.pt B.pt --data ../shared/data/cifar10.npz [--threads 1]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from neuralign.alignment import align, trace_spec
from neuralign.curves.pam import CurvePermutationProblem
from neuralign.experiments.checkpoints import load_endpoint
from neuralign.experiments.data import load_data
from neuralign.optim import PAM, BirkhoffStep, LinearizedStep, perm_to_matrix

SCHEDULES = {
    "full": (LinearizedStep(backtrack=True), 8),
    "bounded": (LinearizedStep(backtrack=True, max_moved=0.1, p_steps=10), 8),
    "birkhoff-0.05": (BirkhoffStep(steps=160, lr=0.05), 1),
    "birkhoff-1": (BirkhoffStep(steps=160, lr=1.0), 1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoints", nargs=2, required=True, metavar=("A", "B"), help="two end point files")
    parser.add_argument("--data", required=True, help="dataset (as `neuralign study --data`)")
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--steps", type=int, default=2, help="P-steps per schedule (default 2)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [s for s in args.schedules.split(",") if s]
    unknown = [s for s in names if s not in SCHEDULES]
    if unknown:
        parser.error(f"unknown schedules {unknown}; expected some of {list(SCHEDULES)}")
    data = load_data(args.data, batch_size=128, train_size=args.train_size, test_size=1000, align_size=5000,
                     generator=0)  # fmt: skip
    a, _ = load_endpoint(args.endpoints[0])
    b, _ = load_endpoint(args.endpoints[1])
    spec = trace_spec(a, next(iter(data.test))[0][:2])
    reference = align(a, b, data.align).perms
    units = sum(spec.sizes.values())
    print("| schedule | P-steps | F before | F after | units reassigned (sum over steps) | agrees with alignment | "
          "seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    f_align = None
    for name in names:
        step, gradient_batches = SCHEDULES[name]
        data.train.generator.manual_seed(0)
        problem = CurvePermutationProblem(a, a.state_dict(), b.state_dict(), spec, data.train, weight_decay=5e-4,
                                          heldout_loader=data.train_eval, gradient_batches=gradient_batches,
                                          generator=1)  # fmt: skip
        x0 = [torch.zeros(sum(problem.numels))]
        start = time.perf_counter()
        solver = PAM(problem, x0, method=step, lam=1000.0, x_steps=0, generator=2)
        if f_align is None:
            f_align = problem.value(x0, {g: perm_to_matrix(p, dtype=torch.float32) for g, p in reference.items()})
        moved = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(args.steps):
                state = solver.step()
                moved += sum(state.changed.values())
        agree = sum(int((state.perms[g] == reference[g]).sum()) for g in spec.sizes) / units
        print(f"| {name} | {args.steps} | {solver.history[0]:.4f} | {state.fun:.4f} | {moved} | {agree:.1%} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)
    print(f"\nF at the correlation alignment: {f_align:.4f} ({units} units in {len(spec.sizes)} groups)")


if __name__ == "__main__":
    main()

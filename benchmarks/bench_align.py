"""Benchmark: correlation alignment of two ResNet32 over 10,000 CIFAR-shaped inputs, and the assignment solver.

Prints (1) the time of ``align`` over the time of two plain eval passes over the same inputs, measured side by
side in one run (target <= 1.5 on CPU), and (2) the time of one linear assignment for n = 64 ... 4096.

    python benchmarks/bench_align.py [--inputs 10000] [--batch-size 500] [--repeats 3] [--threads 2] [--device cpu]

With ``--device cuda`` the networks and inputs live on the GPU and the clock is read after
``torch.cuda.synchronize``; ``--sizes`` with no value skips the assignment table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from neuralign.alignment import align
from neuralign.experiments.models import build_model
from neuralign.optim import solve_assignment


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eval_passes(models, batches):
    with torch.no_grad():
        for m in models:
            m.eval()
            for x, _ in batches:
                m(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    gen = torch.Generator().manual_seed(0)
    a = build_model("resnet32", 10, generator=1).to(device)
    b = build_model("resnet32", 10, generator=2).to(device)
    batches = [
        (torch.randn(min(args.batch_size, args.inputs - i), 3, 32, 32, generator=gen).to(device), torch.zeros(1))
        for i in range(0, args.inputs, args.batch_size)
    ]
    _eval_passes([a], batches[:1])  # warm-up: first-call kernel selection
    align(a, b, batches[:1])
    plain, aligned = [], []
    for _ in range(args.repeats):  # alternate the two so that machine noise hits both alike
        _sync(device)
        t0 = time.perf_counter()
        _eval_passes([a, b], batches)
        _sync(device)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        align(a, b, batches)
        _sync(device)
        aligned.append(time.perf_counter() - t0)
    p, q = statistics.median(plain), statistics.median(aligned)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    print(f"## align(ResNet32 x 2, {args.inputs} inputs, batch {args.batch_size}, {where})\n")
    print("| measure | median seconds | ratio to two eval passes |")
    print("| --- | --- | --- |")
    print(f"| two plain eval passes | {p:.2f} | 1.00 |")
    print(f"| align (correlation) | {q:.2f} | {q / p:.2f} |")

    if not args.sizes:
        return
    print("\n## linear assignment (scipy linear_sum_assignment via neuralign.optim.solve_assignment)\n")
    print("| n | median seconds |")
    print("| --- | --- |")
    for n in args.sizes:
        cost = torch.rand(n, n, generator=gen, dtype=torch.float64)
        times = []
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            solve_assignment(cost, maximize=True)
            times.append(time.perf_counter() - t0)
        print(f"| {n} | {statistics.median(times):.4f} |")


if __name__ == "__main__":
    main()

"""Data parallelism on this machine: 2 gloo processes against 1 for ``align`` and one ``fit_curve`` epoch (CPU).

Each workload runs once in one process (no process group) and once on 2 ranks (``torch.multiprocessing`` spawn,
gloo, one torch thread per process), on the same global batches. On every rank the time spent inside
``torch.distributed`` collectives is measured by wrapping ``all_reduce`` / ``broadcast`` (a collective's time
includes waiting for the slower rank). Reported, side by side: the 2-process throughput relative to 1 process
(time of 1 / time of 2) and the share of each rank's wall time spent in collectives (the target is under 10 %).

On a 2-core machine shared with other work expect no speed-up: the figure documents the overhead of the collective
operations. Absolute times are not reported; they depend on the machine's load.

Run: ``python benchmarks/bench_ddp.py`` (about a minute); ``--batches``, ``--batch`` and ``--arch`` change the
defaults (TinyTen, batch 128, 16 batches).

Three default runs on this 2-core VM while it was shared with other jobs (load average 5-6), torch 2.14:
throughput of 2 processes relative to 1: align 0.89x, 0.85x, 0.74x; curve epoch 0.87x, 0.90x, 0.85x. Share of
the wall time inside collectives, waiting for the slower rank included (ranks 0 / 1): align 1.0/5.2 %, 0.6/2.0 %,
0.8/10.3 %; curve epoch 12.7/4.5 %, 9.4/12.0 %, 6.6/8.9 %. The communication alone (the curve step's all-reduce of
all TinyTen parameters with both ranks ready, times the calls) is 0.5-0.7 % of a curve epoch and 1.5 % of
align: on this machine the rest of the collective time is one rank waiting for the other, which the contention
for 2 cores makes uneven; the 10 % target holds for the communication, and for the waiting only when the ranks
have their own cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from neuralign.alignment import align
from neuralign.curves import fit_curve
from neuralign.experiments.models import build_model


def _data(batches: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(batches)]  # fmt: skip


class _CollectiveClock:
    """Wrap torch.distributed's collectives to add up the seconds spent in them."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        for name in ("all_reduce", "broadcast"):
            original = getattr(dist, name)

            def timed(*args, _original=original, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start
                    self.calls += 1

            setattr(dist, name, timed)


def _workloads(arch: str, batches: int, batch: int) -> dict[str, float]:
    data = _data(batches, batch)
    a, b = build_model(arch, 10, generator=1), build_model(arch, 10, generator=2)
    seconds = {}
    start = time.perf_counter()
    align(a, b, [x for x, _ in data])
    seconds["align"] = time.perf_counter() - start
    start = time.perf_counter()
    fit_curve(a, a.state_dict(), b.state_dict(), data, epochs=1, generator=0)
    seconds["curve epoch"] = time.perf_counter() - start
    return seconds


def _rank(rank: int, folder: str, arch: str, batches: int, batch: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    clock = _CollectiveClock()
    _workloads(arch, 2, batch)  # warm-up, as in one process
    result = {}
    data = _data(batches, batch)
    a, b = build_model(arch, 10, generator=1), build_model(arch, 10, generator=2)
    for name in ("align", "curve epoch"):  # one workload at a time, so that the clock can be attributed
        dist.barrier()
        clock.calls = 0
        before, start = clock.seconds, time.perf_counter()
        if name == "align":
            align(a, b, [x for x, _ in data])
        else:
            fit_curve(a, a.state_dict(), b.state_dict(), data, epochs=1, generator=0)
        result[name] = {"seconds": time.perf_counter() - start, "collective": clock.seconds - before,
                        "calls": clock.calls}  # fmt: skip
    # the communication alone: the curve step's all-reduce (one flat gradient buffer) with both ranks ready
    flat = torch.zeros(sum(p.numel() for p in a.parameters()))
    dist.barrier()
    start = time.perf_counter()
    for _ in range(20):
        dist.all_reduce(flat)
    result["all_reduce_seconds"] = (time.perf_counter() - start) / 20
    torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tinyten")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    _workloads(args.arch, 2, args.batch)  # warm-up (allocator, first-call costs)
    one = _workloads(args.arch, args.batches, args.batch)
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank, args=(folder, args.arch, args.batches, args.batch), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in range(2)]
    print(f"{args.arch}, {args.batches} global batches of {args.batch}, 1 torch thread per process, gloo")
    print(f"{'workload':<12} {'2 procs / 1 proc throughput':>28} {'in collectives (incl. waiting) r0':>34} "
          f"{'r1':>6} {'communication alone':>20}")
    for name in ("align", "curve epoch"):
        two = max(r[name]["seconds"] for r in ranks)
        shares = [r[name]["collective"] / r[name]["seconds"] for r in ranks]
        # the per-step all-reduce's own cost, times the calls, over the rank's wall time (curve: one per step)
        alone = max(r["all_reduce_seconds"] * r[name]["calls"] / r[name]["seconds"] for r in ranks)
        print(f"{name:<12} {one[name] / two:>27.2f}x {100 * shares[0]:>33.1f}% {100 * shares[1]:>5.1f}% "
              f"{100 * alone:>19.1f}%")
    print("communication alone: the curve step's all-reduce (all parameters, float32) timed with both ranks ready, "
          "times the collective calls of the workload (an upper bound for align, whose calls are smaller)")


if __name__ == "__main__":
    main()

"""QAPLIB benchmark: neuralign's ``solve_qap`` (robust tabu search; PAM with a 2-opt local search) against scipy's FAQ
and 2-opt, side by side, on a quiet machine and then beside two busy processes.

Every method gets the same number of random starts: ours ``restarts`` (seeded), scipy's ``quadratic_assignment``
called ``restarts`` times with ``rng`` seeds (FAQ with ``P0="randomized"`` when ``restarts > 1``); the best of the
starts counts. Gaps are ``100 * (fun - best_known) / best_known``. Nothing is told the best known value (no
``target``): every method runs its own budget. Times are wall-clock seconds of one call per method and instance, in
the same run, torch and numpy's BLAS on one thread; the compiled kernels are compiled (or loaded from numba's cache)
before the first timing.

With ``--load`` (default on) the whole table is timed again while two busy processes (pure Python loops, started
and stopped here) compete for the cores, and each method's time under load is divided by its quiet time: a solver on
the calling thread should slow down like scipy does, by the share of the cores it gets, and not more.

Usage::

    python benchmarks/bench_qap.py                      # every instance with a known solution (~4 min, 2 cores)
    python benchmarks/bench_qap.py --instances chr12c,nug12 --restarts 8
    python benchmarks/bench_qap.py --max-n 30 --no-load
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import quadratic_assignment  # noqa: E402

from neuralign.optim import load_qaplib, load_qaplib_solution, qap_objective, qaplib_path, solve_qap  # noqa: E402
from neuralign.optim.qap import TABU_ITERATIONS  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("NEURALIGN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
METHODS = ("tabu", "pam", "faq", "2opt")
LABELS = {"tabu": "ours tabu", "pam": "ours PAM+2opt", "faq": "scipy faq", "2opt": "scipy 2opt"}


def scipy_best(A: np.ndarray, B: np.ndarray, method: str, restarts: int, seed: int) -> float:
    best = math.inf
    for s in range(restarts):
        options: dict = {"rng": np.random.default_rng([seed, s])}
        if method == "faq" and restarts > 1:
            options["P0"] = "randomized"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = quadratic_assignment(A, B, method=method, options=options)
        best = min(best, float(res.fun))
    return best


def run(method: str, A: torch.Tensor, B: torch.Tensor, args: argparse.Namespace) -> tuple[float, float]:
    """(best objective, seconds) of one method on one instance."""
    start = time.perf_counter()
    if method in ("tabu", "pam"):
        res = solve_qap(A, B, method=method, restarts=args.restarts, generator=args.seed,
                        max_iter=args.tabu_iter * A.shape[0] if method == "tabu" else args.pam_iter)  # fmt: skip
        assert qap_objective(A, B, res.perm) == res.fun
        fun = res.fun
    else:
        fun = scipy_best(A.numpy(), B.numpy(), method, args.restarts, args.seed)
    return fun, time.perf_counter() - start


def gap(fun: float, best_known: float) -> float:
    return 100.0 * (fun - best_known) / abs(best_known)


@contextlib.contextmanager
def busy_processes(count: int):
    """``count`` processes spinning a pure Python loop, stopped on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(1.0)  # let them take the cores
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def table(instances, args) -> dict[str, dict[str, tuple[float, float]]]:
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for name, (A, B, _) in instances.items():
        results[name] = {m: run(m, A, B, args) for m in METHODS}
        line = " ".join(f"{m} {results[name][m][0]:.0f} ({results[name][m][1]:.2f}s)" for m in METHODS)
        print(f"  {name} (n={A.shape[0]}): {line}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "qaplib", help="folder of NAME.dat/NAME.sln")
    parser.add_argument("--instances", default="all", help="comma-separated names, or 'all' (with a .sln)")
    parser.add_argument("--max-n", type=int, default=None, help="skip instances larger than this")
    parser.add_argument("--restarts", type=int, default=4, help="random starts per method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tabu-iter", type=int, default=TABU_ITERATIONS,
                        help="tabu-search iterations per start, times n (default: the library's)")  # fmt: skip
    parser.add_argument("--pam-iter", type=int, default=100, help="PAM iterations per start")
    parser.add_argument("--load", action=argparse.BooleanOptionalAction, default=True,
                        help="time again beside two busy processes")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    if not args.data.is_dir():
        raise SystemExit(f"no QAPLIB folder at {args.data} (use --data or NEURALIGN_SHARED_DATA)")
    if args.instances == "all":
        names = sorted(p.stem for p in args.data.glob("*.sln") if (args.data / f"{p.stem}.dat").is_file())
    else:
        names = [n.strip() for n in args.instances.split(",") if n.strip()]
    instances = {}
    for name in names:
        A, B = load_qaplib(args.data / f"{name}.dat")
        if args.max_n is None or A.shape[0] <= args.max_n:
            instances[name] = (A, B, load_qaplib_solution(args.data / f"{name}.sln", A=A, B=B)[0])
    start = time.perf_counter()
    solve_qap(*load_qaplib(qaplib_path("nug12")), max_iter=10, generator=0)  # compile or load the kernels
    print(f"kernels ready in {time.perf_counter() - start:.2f}s (numba compiles once, then loads from its cache)")

    print("quiet:")
    quiet = table(instances, args)
    loaded = None
    if args.load:
        print("beside two busy processes:")
        with busy_processes(2):
            loaded = table(instances, args)

    print()
    print(f"QAPLIB, {len(instances)} instances, {args.restarts} random starts per method (seed {args.seed}), one "
          f"thread each; ours: tabu search {args.tabu_iter}n iterations per start, PAM {args.pam_iter} "
          "iterations")  # fmt: skip
    print()
    head = " | ".join(f"{LABELS[m]} gap %" for m in METHODS)
    print(f"| instance | n | best known | {head} | time tabu/2opt |")
    print("|---|---:|---:|" + "---:|" * (len(METHODS) + 1))
    gaps = {m: [] for m in METHODS}
    for name, (A, _, best) in instances.items():
        row = [gap(quiet[name][m][0], best) for m in METHODS]
        for m, g in zip(METHODS, row):
            gaps[m].append(g)
        cells = " | ".join(f"{g:.2f}" for g in row)
        ratio = quiet[name]["tabu"][1] / quiet[name]["2opt"][1]
        print(f"| {name} | {A.shape[0]} | {best:.0f} | {cells} | {ratio:.2f} |")
    total = {m: sum(quiet[name][m][1] for name in instances) for m in METHODS}
    means = " | ".join(f"{np.mean(gaps[m]):.2f}" for m in METHODS)
    print(f"| **mean** | | | {means} | {total['tabu'] / total['2opt']:.2f} (total) |")
    print()
    small = [name for name, (A, _, _) in instances.items() if A.shape[0] <= 30]
    for m in METHODS:
        optimal = sum(gap(quiet[name][m][0], instances[name][2]) <= 1e-9 for name in small)
        print(f"{LABELS[m]}: mean gap {np.mean(gaps[m]):.2f}%, best known reached on {optimal} of {len(small)} "
              f"instances of size <= 30, total time {total[m]:.2f}s ({total[m] / total['2opt']:.2f}x scipy "
              "2opt)")  # fmt: skip
    if loaded is not None:
        print()
        print("time beside two busy processes / quiet time (totals over the instances):")
        for m in METHODS:
            busy = sum(loaded[name][m][1] for name in instances)
            print(f"  {LABELS[m]}: {busy:.1f}s / {total[m]:.1f}s = {busy / total[m]:.2f}x")


if __name__ == "__main__":
    main()

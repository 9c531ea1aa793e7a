"""QAPLIB benchmark: neuralign's ``solve_qap`` (PAM + 2-opt) against scipy's FAQ and 2-opt, side by side.

Every method gets the same number of random starts: ours ``restarts`` (seeded), scipy's ``quadratic_assignment``
called ``restarts`` times with ``rng`` seeds (FAQ with ``P0="randomized"`` when ``restarts > 1``); the best of the
starts counts. Gaps are ``100 * (fun - best_known) / best_known``; times are measured in the same run, one thread for
torch and for numpy's BLAS, and reported as ratios.

Usage::

    python benchmarks/bench_qap.py                      # every instance with a known solution (~5 min, 2 cores)
    python benchmarks/bench_qap.py --instances chr12c,nug12 --restarts 8
    python benchmarks/bench_qap.py --max-n 30
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import quadratic_assignment  # noqa: E402

from neuralign.optim import load_qaplib, load_qaplib_solution, qap_objective, solve_qap  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("NEURALIGN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


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


def gap(fun: float, best_known: float) -> float:
    return 100.0 * (fun - best_known) / abs(best_known)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "qaplib", help="folder of NAME.dat/NAME.sln")
    parser.add_argument("--instances", default="all", help="comma-separated names, or 'all' (with a .sln)")
    parser.add_argument("--max-n", type=int, default=None, help="skip instances larger than this")
    parser.add_argument("--restarts", type=int, default=4, help="random starts per method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-iter", type=int, default=100, help="PAM iterations per restart (ours)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    if not args.data.is_dir():
        raise SystemExit(f"no QAPLIB folder at {args.data} (use --data or NEURALIGN_SHARED_DATA)")
    if args.instances == "all":
        names = sorted(p.stem for p in args.data.glob("*.sln") if (args.data / f"{p.stem}.dat").is_file())
    else:
        names = [n.strip() for n in args.instances.split(",") if n.strip()]
    rows = []
    for name in names:
        A, B = load_qaplib(args.data / f"{name}.dat")
        n = A.shape[0]
        if args.max_n is not None and n > args.max_n:
            continue
        best_known, _ = load_qaplib_solution(args.data / f"{name}.sln", A=A, B=B)  # validated against A, B
        An, Bn = A.numpy(), B.numpy()
        t0 = time.perf_counter()
        ours = solve_qap(A, B, restarts=args.restarts, generator=args.seed, max_iter=args.max_iter)
        t_ours = time.perf_counter() - t0
        assert qap_objective(A, B, ours.perm) == ours.fun
        t0 = time.perf_counter()
        faq = scipy_best(An, Bn, "faq", args.restarts, args.seed)
        t_faq = time.perf_counter() - t0
        t0 = time.perf_counter()
        two = scipy_best(An, Bn, "2opt", args.restarts, args.seed)
        t_two = time.perf_counter() - t0
        rows.append((name, n, best_known, gap(ours.fun, best_known), gap(faq, best_known), gap(two, best_known),
                     t_ours / t_faq, t_ours / t_two))
        print(f"{name}: n={n} ours {ours.fun:.0f} faq {faq:.0f} 2opt {two:.0f} (best known {best_known:.0f}); "
              f"{t_ours:.2f}s / {t_faq:.2f}s / {t_two:.2f}s", flush=True)

    print()
    print(f"QAPLIB, {args.restarts} random starts per method (seed {args.seed}), one thread each")
    print()
    print("| instance | n | best known | ours gap % | faq gap % | 2opt gap % | time ours/faq | time ours/2opt |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, n, best, g_ours, g_faq, g_two, r_faq, r_two in rows:
        print(f"| {name} | {n} | {best:.0f} | {g_ours:.2f} | {g_faq:.2f} | {g_two:.2f} | {r_faq:.1f} | {r_two:.2f} |")
    if rows:
        mean = [sum(r[k] for r in rows) / len(rows) for k in (3, 4, 5)]
        geo = [math.exp(sum(math.log(r[k]) for r in rows) / len(rows)) for k in (6, 7)]
        print(f"| **mean / geo-mean** | | | {mean[0]:.2f} | {mean[1]:.2f} | {mean[2]:.2f} | {geo[0]:.1f} | "
              f"{geo[1]:.2f} |")
        beat_faq = sum(r[3] < r[4] - 1e-9 for r in rows)
        tie_faq = sum(abs(r[3] - r[4]) <= 1e-9 for r in rows)
        beat_two = sum(r[3] < r[5] - 1e-9 for r in rows)
        tie_two = sum(abs(r[3] - r[5]) <= 1e-9 for r in rows)
        optimal = sum(r[3] <= 1e-9 for r in rows)
        print()
        print(f"ours vs faq: better on {beat_faq}, equal on {tie_faq}, worse on {len(rows) - beat_faq - tie_faq} "
              f"of {len(rows)}; vs 2opt: better on {beat_two}, equal on {tie_two}, worse on "
              f"{len(rows) - beat_two - tie_two}; best known reached on {optimal}")


if __name__ == "__main__":
    main()

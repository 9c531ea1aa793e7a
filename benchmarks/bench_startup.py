"""Start-up time of ``import neuralign`` and of the ``neuralign`` command, against starting Python and importing torch.

Times, in fresh processes, interleaved round by round (in a shuffled order each round, after one warm-up round):

- ``python -c pass`` and ``python -c "import torch"``: the references;
- ``python -c "import neuralign"`` (public names are imported on first use) and the library itself
  (``import neuralign.alignment, neuralign.curves, neuralign.optim, neuralign.verification``);
- ``neuralign --version``;
- ``neuralign train --help`` (the start-up of a command: everything its parser needs) and a skipped rerun of a
  finished ``neuralign train --arch mlp --data digits --epochs 1`` (made once, first, in a temporary folder; the rerun
  must print "train already done").

It prints each median and the median over rounds of the difference to ``python -c pass`` and to ``import torch``
(paired by round, so that a slow moment of a shared machine weighs on both), then checks the targets:

- ``neuralign --version`` at most ``--margin`` (0.3 s) more than ``python -c pass``;
- ``import neuralign`` and the library at most ``--margin`` more than ``import torch``;
- the skipped rerun at most ``--margin`` more than ``neuralign train --help``.

It exits with status 1 when a target is missed, unless ``--report-only``. ``--compare-with DIR`` also times another
version of the package (a folder holding its ``neuralign/``, e.g. ``git archive REV neuralign | tar -x -C DIR``),
through ``PYTHONPATH``, in the same rounds; its rows are marked ``(DIR)`` and checked against no target.

Usage: ``python benchmarks/bench_startup.py [--repeats 10] [--margin 0.3] [--report-only] [--compare-with DIR]``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON = sys.executable
LIBRARY = "import neuralign.alignment, neuralign.curves, neuralign.optim, neuralign.verification"


def _neuralign() -> list[str]:
    """The console script of this interpreter's environment, else ``python -m neuralign``."""
    script = Path(PYTHON).with_name("neuralign")
    return [str(script)] if script.is_file() else [PYTHON, "-m", "neuralign"]


def _run(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()  # cwd: outside the repository, whose neuralign/ would shadow PYTHONPATH under -c
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    return time.perf_counter() - start, done


def _commands(out: Path) -> dict[str, list[str]]:
    train = [*_neuralign(), "train", "--arch", "mlp", "--data", "digits", "--epochs", "1", "--out", str(out), "--quiet"]
    return {
        "python -c pass": [PYTHON, "-c", "pass"],
        "import torch": [PYTHON, "-c", "import torch"],
        "import neuralign": [PYTHON, "-c", "import neuralign"],
        "import the library": [PYTHON, "-c", LIBRARY],
        "neuralign --version": [*_neuralign(), "--version"],
        "neuralign train --help": [*_neuralign(), "train", "--help"],
        "train, skipped rerun": train,
    }


def _finish_train(command: list[str], env: dict[str, str], cwd: Path, label: str) -> None:
    """Run the train command to the end once, then check that a rerun skips it."""
    for attempt in ("first run", "rerun"):
        _, done = _run(command, env, cwd)
        if done.returncode != 0:
            sys.exit(f"{label}: {' '.join(command)} failed ({attempt}):\n{done.stderr}")
    if "train already done" not in done.stderr:
        sys.exit(f"{label}: the rerun of {' '.join(command)} did not skip:\n{done.stderr}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (default: 10)")
    parser.add_argument("--margin", type=float, default=0.3, help="allowed extra seconds of a target (default: 0.3)")
    parser.add_argument("--report-only", action="store_true", help="exit 0 even when a target is missed")
    parser.add_argument("--compare-with", type=Path, default=None, metavar="DIR",
                        help="also time the neuralign package in DIR (via PYTHONPATH) in the same rounds")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the order of the commands in each round")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.compare_with is not None and not (args.compare_with / "neuralign" / "__init__.py").is_file():
        parser.error(f"--compare-with {args.compare_with}: no neuralign/__init__.py there")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    tmp = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    try:
        runs: dict[str, tuple[list[str], dict[str, str]]] = {}
        for name, command in _commands(tmp / "now").items():
            runs[name] = (command, env)
        if args.compare_with is not None:
            other = {**env, "PYTHONPATH": str(args.compare_with.resolve())}
            tag = f" ({args.compare_with})"
            _, where = _run([PYTHON, "-c", "import neuralign; print(neuralign.__file__)"], other, tmp)
            if not Path(where.stdout.strip()).resolve().is_relative_to(args.compare_with.resolve()):
                sys.exit(f"--compare-with {args.compare_with}: PYTHONPATH still imports {where.stdout.strip()}")
            for name, command in _commands(tmp / "other").items():
                if name not in ("python -c pass", "import torch"):
                    runs[name + tag] = (command, other)
            _finish_train(*runs["train, skipped rerun" + tag], tmp, label=str(args.compare_with))
        _finish_train(*runs["train, skipped rerun"], tmp, label="this tree")

        order = list(runs)
        rng = random.Random(args.seed)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(args.repeats + 1):  # round 0 warms the file cache and is not counted
            rng.shuffle(order)
            for name in order:
                seconds, done = _run(*runs[name], tmp)
                if done.returncode != 0:
                    sys.exit(f"{name}: exit status {done.returncode}:\n{done.stderr}")
                if round_:
                    times[name].append(seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def paired(name: str, reference: str) -> float:
        return statistics.median(a - b for a, b in zip(times[name], times[reference]))

    print(f"{args.repeats} rounds, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"{'command':<46} {'median s':>9} {'- pass s':>9} {'- torch s':>10} {'/ torch':>8}")
    torch_median = statistics.median(times["import torch"])
    for name in runs:
        median = statistics.median(times[name])
        print(f"{name:<46} {median:9.3f} {paired(name, 'python -c pass'):9.3f} {paired(name, 'import torch'):10.3f} "
              f"{median / torch_median:8.2f}")  # fmt: skip

    targets = [
        ("neuralign --version", "python -c pass"),
        ("import neuralign", "import torch"),
        ("import the library", "import torch"),
        ("train, skipped rerun", "neuralign train --help"),
    ]
    missed = 0
    print(f"\ntargets (median paired difference at most {args.margin:.2f} s):")
    for name, reference in targets:
        extra = paired(name, reference)
        ok = extra <= args.margin
        missed += not ok
        print(f"  {'met   ' if ok else 'MISSED'} {name} - {reference}: {extra:+.3f} s")
    return 1 if missed and not args.report_only else 0


if __name__ == "__main__":
    sys.exit(main())

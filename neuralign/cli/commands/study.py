"""``neuralign study`` and ``neuralign demo``: the paper's protocol, sequentially or as jobs; ``--status``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from neuralign import _distributed
from neuralign.cli.common import model_args, parse_device, parse_floats, parse_overrides, table
from neuralign.cli.progress import ProgressBars

__all__ = ["cmd_study", "print_status", "stage_times"]

# the options of `neuralign study` that set a study setting directly -> its path
_OPTION_PATHS = {
    "pairs": "pairs", "arch": "model.arch", "epochs": "train.epochs", "curve_epochs": "curve.epochs",
    "num_points": "evaluation.num_points", "train_size": "data.train_size", "test_size": "data.test_size",
    "align_size": "data.align_size", "resize": "data.resize", "bn_batches": "evaluation.max_bn_batches",
    "width": "model.width", "batch_size": "data.batch_size", "data": "data.dataset", "data_root": "data.root",
    "download": "data.download", "num_classes": "model.num_classes",
}  # fmt: skip


def cmd_study(args: argparse.Namespace, bars: ProgressBars, *, demo: bool = False) -> list[Path]:
    from neuralign.study import PRESETS, run_study
    from neuralign.study.report import dataset_label, paper_row

    if not demo and args.status is not None:
        print_status(args.status)
        return []

    config = PRESETS["demo" if demo else args.preset]
    settings: dict[str, Any] = {}
    if not demo:
        if args.endpoints:
            settings["endpoints"] = tuple(args.endpoints)
            if args.pairs is None:
                settings["pairs"] = len(args.endpoints) // 2
        for option, path in _OPTION_PATHS.items():
            value = getattr(args, option, None)
            if value is not None and value is not False:
                settings[path] = value
        if args.curve_epochs is not None and config.pam.x_epochs == config.curve.epochs:
            settings["pam.x_epochs"] = args.curve_epochs  # the presets whose PAM x-steps follow the curves' epochs
        if args.model_arg:
            settings["model.args"] = model_args(args)
        for key in ("mean", "std"):
            if getattr(args, key) is not None:
                settings[f"data.{key}"] = parse_floats(getattr(args, key), f"--{key}")
    settings["seed"] = args.seed
    if "endpoints" in settings and "pairs" in settings:  # pairs first: the end points are checked against it
        settings = {"pairs": settings.pop("pairs"), **settings}
    config = config.apply({**settings, **parse_overrides(args.set)})
    # Table 1 is about standard curves: no reference row beside a robust study
    row = None if config.robust is not None else paper_row(config.model.arch, dataset_label(config.data.dataset))
    executor = "sequential" if demo else args.executor
    out = Path(args.out)
    if executor == "sequential":
        results = run_study(config, args.out, device=parse_device(args.device), progress=bars, paper_row=row)
    elif executor == "local":
        from neuralign.study.executors import run_study_local

        def on_event(stage: str, event: str, job_id: str) -> None:
            if not args.quiet:
                print(f"{stage}: {event} (job {job_id})", file=sys.stderr)

        results = run_study_local(config, out, jobs=args.jobs, device=parse_device(args.device), paper_row=row,
                                  on_event=on_event)  # fmt: skip
    else:
        from neuralign.study.executors import submit_study_slurm

        if args.device == "auto":
            raise ValueError("--executor slurm needs --device cuda or --device cpu: auto would be resolved on this "
                             "machine, not on the compute nodes")  # fmt: skip
        jobs = submit_study_slurm(config, out, device=args.device, partition=args.slurm_partition,
                                  time_minutes=args.slurm_time, gpus_per_job=args.gpus_per_job, paper_row=row)
        for stage, job_id in jobs.items():
            print(f"{stage}: Slurm job {job_id}", file=sys.stderr)
        print(f"submitted {len(jobs)} jobs; follow them with: neuralign study --status {out}", file=sys.stderr)
        return [out / "jobs.json"]
    bars.close()
    if (out / "manifest.json").exists() and _distributed.rank() == 0:
        print(stage_times(out / "manifest.json"), file=sys.stderr)
    return [Path(results["report"]), out / "results.json"]


def print_status(out: str) -> None:
    from neuralign.study.executors import study_status

    status = study_status(out)
    hints = {
        "blocked": "these Slurm jobs wait on a failed job and can never start: cancel them (scancel {ids}), or rerun "
                   "the study, which cancels them and resubmits",
        "failed": "these stages' jobs ended without their outputs (see the logs under {out}/jobs/); rerun the study "
                  "to run them again",
        "unknown": "squeue is not on PATH: whether these Slurm jobs are alive cannot be told from this machine",
    }  # fmt: skip
    for state in ("done", "running", "pending", "blocked", "failed", "unknown"):
        entries = status[state]
        if not entries and state in hints:
            continue
        print(f"{state} ({len(entries)}):")
        for stage, job in entries:
            print(f"  {stage}" + (f"  [job {job}]" if job else ""))
        if state in hints:
            print("  -> " + hints[state].format(ids=" ".join(job for _, job in entries if job), out=out))


def stage_times(manifest_path: Path) -> str:
    """The seconds of every stage of the study (recorded in its manifest), as a table with the total."""
    seconds = json.loads(manifest_path.read_text()).get("stage_seconds", {})
    rows = [(stage, f"{s:.1f}") for stage, s in seconds.items()]
    return "time per stage (s):\n" + table(["stage", "seconds"], [*rows, ("total", f"{sum(seconds.values()):.1f}")])

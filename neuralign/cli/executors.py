"""The executor options of the commands whose stages run as jobs (``neuralign study``, ``neuralign compare``),
defined once: ``--executor sequential|local|slurm``, ``--jobs``, the Slurm resources, ``--status OUT`` and
``--cancel OUT``, and running a command's settings through the chosen executor
(:mod:`neuralign.study.executors`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from neuralign.cli.common import parse_device, table

__all__ = [
    "SLURM_OPTIONS",
    "add_executor_options",
    "parse_extra",
    "print_cancel",
    "print_status",
    "run_stages",
    "slurm_options",
    "stage_times",
]

# The Slurm resources of `--executor slurm`: (option, SlurmOptions field, type, help). The fields are validated and
# documented by neuralign.study.executors.SlurmOptions; the options' dests are the fields' names, so that its
# messages ("`memory` must be ...") read in option words (--slurm-mem).
SLURM_OPTIONS = (
    ("--slurm-partition", "partition", str, "Slurm partition of the jobs (default: the cluster's default)"),
    ("--slurm-time", "time_minutes", int, "wall time of each Slurm job in minutes (default: 1440)"),
    ("--gpus-per-job", "gpus_per_job", int, "GPUs per Slurm job (default: 1 with --device cuda, 0 with --device "
     "cpu); above 1 each stage runs data-parallel over them, one task per GPU"),
    ("--tasks-per-job", "tasks_per_job", int, "processes per Slurm job, running each stage data-parallel (gloo on "
     "the CPU; default: one per GPU, or 1)"),
    ("--cpus-per-task", "cpus_per_task", int, "CPUs per process of a Slurm job; torch uses as many threads "
     "(default: the cluster's, usually 1)"),
    ("--slurm-mem", "memory", str, "memory per Slurm job, e.g. 4G or 500M (default: the cluster's, often the whole "
     "node, so that jobs do not share a node)"),
    ("--slurm-account", "account", str, "Slurm account to charge"),
    ("--slurm-qos", "qos", str, "Slurm quality of service"),
    ("--slurm-extra", "extra", str, "any other sbatch option, repeatable: --slurm-extra constraint=a100 "
     "(KEY= for a flag: --slurm-extra exclusive=)"),
)  # fmt: skip


_WHAT = {"study": "study", "compare": "comparison"}  # what a command runs, in messages


def add_executor_options(p: argparse.ArgumentParser, *, command: str) -> None:
    """The executor options of ``neuralign COMMAND`` (``"study"``, ``"compare"``), which runs its settings as
    stages."""
    what = _WHAT[command]
    g = p.add_argument_group("running the stages as jobs (needs the cluster extra: pip install 'neuralign[cluster]')")
    g.add_argument("--executor", choices=["sequential", "local", "slurm"], default="sequential",
                   help="sequential: every stage in this process (default); local: up to --jobs stages at once as "
                        "local processes (one GPU each when there are several); slurm: every stage as a Slurm job, "
                        "with job dependencies between stages (returns once they are queued)")  # fmt: skip
    g.add_argument("--jobs", type=int, default=None, help="with --executor local: concurrent local jobs (default: 2)")
    for flag, field, kind, text in SLURM_OPTIONS:
        g.add_argument(flag, dest=field, type=kind, default=None, help=text,
                       **({"action": "append", "metavar": "KEY=VALUE"} if field == "extra" else {}))  # fmt: skip
    either = g.add_mutually_exclusive_group()
    either.add_argument("--status", metavar="OUT", default=None,
                        help=f"print which stages of the {what} in OUT are done, running or pending (with job ids), "
                             "blocked, failed or cancelled, and exit")  # fmt: skip
    either.add_argument("--cancel", metavar="OUT", default=None,
                        help=f"cancel every queued or running Slurm job of the {what} in OUT (recorded: --status then "
                             f"says cancelled) and exit; rerunning the {what} submits those stages again")  # fmt: skip


def run_stages(
    args: argparse.Namespace,
    config: Any,
    sequential: Callable[[], dict[str, Any]],
    *,
    paper_row: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Run the stages of ``config`` (a study's or a comparison's) with ``args.executor``: ``sequential()`` in this
    process, or as local jobs (the results, as :func:`neuralign.study.executors.run_local` returns them); or submit
    them as Slurm jobs, print what was submitted and return None.

    Raises
    ------
    ValueError
        For Slurm resources without ``--executor slurm``, ``--jobs`` without ``--executor local``, or ``--device
        auto`` with Slurm.
    """
    executor = getattr(args, "executor", "sequential")
    command = args.command
    if executor != "slurm":
        given = [flag for flag, field, _, _ in SLURM_OPTIONS if getattr(args, field, None) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} set{'s' if len(given) == 1 else ''} the resources of Slurm jobs: "
                             f"use {'it' if len(given) == 1 else 'them'} with --executor slurm")  # fmt: skip
    if executor != "local" and getattr(args, "jobs", None) is not None:
        raise ValueError("--jobs sets how many local jobs run at once: use it with --executor local")
    if executor == "sequential":
        return sequential()
    out = Path(args.out)
    if executor == "local":
        from neuralign.study.executors import run_local

        def on_event(stage: str, event: str, job_id: str) -> None:
            if not args.quiet:
                print(f"{stage}: {event} (job {job_id})", file=sys.stderr)

        jobs = 2 if args.jobs is None else args.jobs
        return run_local(config, out, jobs=jobs, threads=args.threads, device=parse_device(args.device),
                         paper_row=paper_row, on_event=on_event)  # fmt: skip
    from neuralign.study.executors import submit_slurm

    if args.device == "auto":
        raise ValueError("--executor slurm needs --device cuda or --device cpu: auto would be resolved on this "
                         "machine, not on the compute nodes")  # fmt: skip
    sent = submit_slurm(config, out, device=args.device, options=slurm_options(args), paper_row=paper_row)
    for stage, job_id in sent.replaced.items():
        print(f"{stage}: cancelled Slurm job {job_id} (queued behind a failed job, it could never start)",
              file=sys.stderr)  # fmt: skip
    for stage, job_id in sent.kept.items():
        print(f"{stage}: Slurm job {job_id} is queued or running, kept", file=sys.stderr)
    for stage, job_id in sent.submitted.items():
        print(f"{stage}: Slurm job {job_id}", file=sys.stderr)
    if sent.submitted:
        print(f"submitted {len(sent.submitted)} jobs; follow them with: neuralign {command} --status {out}",
              file=sys.stderr)  # fmt: skip
    else:
        print(f"nothing to submit: {len(sent.done)} stages done, {len(sent.kept)} jobs queued or running; "
              f"follow them with: neuralign {command} --status {out}", file=sys.stderr)  # fmt: skip
    return None


def print_status(out: str, command: str) -> None:
    """``neuralign COMMAND --status OUT``: the stages of the folder by state, with hints."""
    from neuralign.study.executors import STATES, stage_status

    status = stage_status(out)
    what = _WHAT.get(command, command)
    hints = {
        "blocked": "these Slurm jobs wait on a job that failed or was cancelled and can never start: rerun the "
                   f"{what} with --executor slurm, which cancels and resubmits them (or cancel them: scancel "
                   "{ids})",
        "failed": "these stages' jobs ended without their outputs (see the logs under {out}/jobs/); rerun the "
                  f"{what} to run them again",
        "cancelled": f"these stages' jobs were cancelled (by neuralign {command} --cancel, by an interrupted run with "
                     f"local jobs, or by a run that replaced jobs waiting on a failed one); rerun the {what} to submit "
                     "them again",
        "unknown": "squeue is not on PATH: whether these Slurm jobs are alive cannot be told from this machine",
    }  # fmt: skip
    for state in STATES:
        entries = status[state]
        if not entries and state in hints:
            continue
        print(f"{state} ({len(entries)}):")
        for stage, job in entries:
            print(f"  {stage}" + (f"  [job {job}]" if job else ""))
        if state in hints:
            print("  -> " + hints[state].format(ids=" ".join(job for _, job in entries if job), out=out))
    if not (Path(out) / "jobs.json").exists() and status["pending"]:
        print(f"(no jobs recorded: a {what} run in one process, without --executor, records none, so a stage it is "
              "computing now shows as pending)")


def print_cancel(out: str, command: str) -> None:
    """``neuralign COMMAND --cancel OUT``: cancel the folder's Slurm jobs and say which."""
    from neuralign.study.executors import cancel_slurm

    cancelled = cancel_slurm(out)
    for stage, job in cancelled.items():
        print(f"{stage}: cancelled Slurm job {job}")
    print(f"cancelled {len(cancelled)} jobs of {out}" + (f"; rerun the {_WHAT.get(command, command)} to submit them "
                                                         "again" if cancelled
                                                         else " (none was queued or running)"))  # fmt: skip


def slurm_options(args: argparse.Namespace) -> Any:
    """The :class:`~neuralign.study.executors.SlurmOptions` of the command line's Slurm options (validated there)."""
    from neuralign.study.executors import SlurmOptions

    given = {field: getattr(args, field) for _, field, _, _ in SLURM_OPTIONS if getattr(args, field) is not None}
    if given.get("extra") is not None:
        given["extra"] = parse_extra(given["extra"])
    return SlurmOptions(**given)


def parse_extra(items: list[str]) -> dict[str, str]:
    """``--slurm-extra KEY=VALUE`` options as ``{KEY: VALUE}`` (the values kept as text; ``KEY=`` is a flag)."""
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--slurm-extra expects KEY=VALUE (an sbatch option and its value), got {item!r}")
        extra[key.strip()] = value.strip()
    return extra


def stage_times(manifest_path: Path) -> str:
    """The seconds of every stage (recorded in the manifest), as a table with the total."""
    seconds = json.loads(manifest_path.read_text()).get("stage_seconds", {})
    rows = [(stage, f"{s:.1f}") for stage, s in seconds.items()]
    return "time per stage (s):\n" + table(["stage", "seconds"], [*rows, ("total", f"{sum(seconds.values()):.1f}")])

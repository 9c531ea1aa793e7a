"""The jobs of a study folder: the record ``jobs.json`` and whether the jobs in it are alive.

Shared by every way of running a study (:func:`~neuralign.study.run_study` and the executors of
:mod:`neuralign.study.executors`), which all refuse to start while a job of the same folder is queued or
running (:func:`refuse_live_jobs`), and by ``neuralign study --status``. Needs no submitit.

A local job is identified by its process id **and** that process's start time (field 22 of ``/proc/<pid>/stat``,
in clock ticks since boot), so that a recycled process id does not make a finished job look alive; where ``/proc``
is absent (not Linux) the process id alone is checked. A Slurm job's state comes from ``squeue`` (its state and
its pending reason: a job pending with ``DependencyNeverSatisfied`` waits on a failed job and can never start).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from neuralign._utils import atomic_write_text
from neuralign.errors import JobError

__all__ = ["job_states", "process_start", "read_jobs", "refuse_live_jobs", "write_jobs"]

logger = logging.getLogger(__name__)

# Slurm's pending reason of a job whose afterok dependency failed: it stays queued and never starts
NEVER = "DependencyNeverSatisfied"


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, from ``/proc/<pid>/stat``), or None if the
    process does not exist or ``/proc`` is not there."""
    try:
        text = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    # the command name (field 2) is in parentheses and may hold spaces; field 22 is the 20th after it
    fields = text[text.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def write_jobs(
    out: Path, executor: str, jobs: Mapping[str, str], starts: Mapping[str, str | None] | None = None
) -> None:
    """Write ``out/jobs.json``: the executor, ``{stage: job id}`` and, for local jobs, ``{stage: process start}``."""
    record = {"executor": executor, "jobs": dict(jobs), "starts": dict(starts or {}),
              "written": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    atomic_write_text(out / "jobs.json", json.dumps(record, indent=1))


def read_jobs(out: Path) -> dict[str, Any]:
    """``out/jobs.json`` (an empty record without one).

    Raises
    ------
    ValueError
        If the file is not a jobs record (names it).
    """
    path = out / "jobs.json"
    if not path.exists():
        return {"executor": None, "jobs": {}, "starts": {}}
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("jobs"), dict):
            raise ValueError("no `jobs` entry")
    except ValueError as exc:
        raise ValueError(f"{path} is not a study's jobs record ({exc}); delete it if no job of {out} is alive"
                         ) from None
    record.setdefault("starts", {})
    return record


def _local_alive(job_id: str, start: str | None) -> bool:
    try:
        pid = int(job_id)
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, ValueError):  # gone, or another user's process took the pid
        return False
    now = process_start(pid)
    return start is None or now is None or now == start


def job_states(record: Mapping[str, Any], skip: Collection[str] = ()) -> dict[str, str]:
    """Per stage of ``record`` (from :func:`read_jobs`) whose job may be alive, leaving out ``skip``: ``"running"``,
    ``"pending"`` (queued), ``"blocked"`` (queued behind a failed job: Slurm's ``DependencyNeverSatisfied``) or
    ``"unknown"`` (a Slurm job, and no ``squeue`` on PATH to ask)."""
    jobs = {s: str(j) for s, j in record.get("jobs", {}).items() if s not in skip}
    alive: dict[str, str] = {}
    if record.get("executor") == "local":
        starts = record.get("starts", {})
        alive = {s: "running" for s, j in jobs.items() if _local_alive(j, starts.get(s))}
    elif record.get("executor") == "slurm" and jobs:
        if shutil.which("squeue") is None:
            return {stage: "unknown" for stage in jobs}
        ids = ",".join(sorted(set(jobs.values())))
        listing = subprocess.run(["squeue", "-h", "-j", ids, "-o", "%i %T %r"], capture_output=True, text=True)
        states = {}
        for line in listing.stdout.splitlines():
            parts = line.split(maxsplit=2)
            if len(parts) >= 2:
                states[parts[0]] = (parts[1], parts[2].strip() if len(parts) > 2 else "")
        for stage, job_id in jobs.items():
            if job_id not in states:
                continue
            state, reason = states[job_id]
            if state in ("RUNNING", "COMPLETING"):
                alive[stage] = "running"
            else:
                alive[stage] = "blocked" if reason == NEVER else "pending"
    return alive


def refuse_live_jobs(out: Path, done: Collection[str] = ()) -> None:
    """Refuse to run the study in ``out`` while a job of it (from ``jobs.json``) is queued or running; stages in
    ``done`` (their outputs exist) are not asked about.

    Slurm jobs that can never start (queued behind a failed job) are cancelled with ``scancel`` (logged), as
    rerunning the study resubmits them.

    Raises
    ------
    JobError
        If a job is alive, or Slurm jobs are recorded and ``squeue`` (or ``scancel`` for blocked ones) is not on
        PATH (one line, naming the jobs and what to do).
    """
    record = read_jobs(out)
    alive = job_states(record, skip=done)
    jobs = record["jobs"]
    unknown = [s for s, state in alive.items() if state == "unknown"]
    if unknown:
        raise JobError(
            f"{out}/jobs.json lists Slurm jobs ({', '.join(jobs[s] for s in unknown)}) and `squeue` is not on PATH to "
            "tell whether they are alive: run this on the cluster's login node (or delete jobs.json once none of "
            "them is queued or running)"
        )
    blocked = sorted({jobs[s] for s, state in alive.items() if state == "blocked"}, key=int)
    if blocked:
        if shutil.which("scancel") is None:
            raise JobError(f"Slurm jobs {', '.join(blocked)} of {out} wait on a failed job and can never start; "
                           f"cancel them (scancel {' '.join(blocked)}) and rerun")  # fmt: skip
        subprocess.run(["scancel", *blocked], check=False, capture_output=True)
        logger.warning("cancelled Slurm jobs %s of %s: they waited on a failed job", " ".join(blocked), out)
        alive = {s: state for s, state in alive.items() if state != "blocked"}
    if alive:
        listed = ", ".join(f"{s} (job {jobs[s]}, {state})" for s, state in alive.items())
        raise JobError(f"{out} still has jobs queued or running: {listed}; wait for them or cancel them first")

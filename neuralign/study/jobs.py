"""The jobs of a study (or comparison) folder: the record ``jobs.json``, whether the jobs in it are alive, and what
a rerun finds.

Shared by every way of running a study or a comparison (:func:`~neuralign.study.run_study`,
:func:`~neuralign.study.compare.run_compare` and the executors of :mod:`neuralign.study.executors`), by ``neuralign
study --status`` / ``neuralign compare --status`` and ``--cancel``. Needs no submitit.

A local job is identified by its process id **and** that process's start time (field 22 of ``/proc/<pid>/stat``,
in clock ticks since boot), so that a recycled process id does not make a finished job look alive; where ``/proc``
is absent (not Linux) the process id alone is checked. A Slurm job's state comes from ``squeue`` (its state and
its pending reason: a job pending with ``DependencyNeverSatisfied`` waits on a failed job and can never start).

:func:`survey_jobs` sorts the stages of a study by what their files and jobs say: done (outputs exist), live (a job
queued or running that can still succeed), blocked (a queued Slurm job that can never start: it waits, directly or
through other queued jobs, on a job that failed or was cancelled), failed, cancelled (``neuralign study --cancel``
recorded it) and missing. A sequential or local run refuses a folder with a live job and changes nothing then
(:func:`refuse_live_jobs`); a Slurm rerun keeps the live jobs and resubmits the rest
(:func:`neuralign.study.executors.submit_slurm`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuralign._utils import atomic_write_text
from neuralign.errors import JobError
from neuralign.study.stages import Stage, stage_done

__all__ = [
    "JobSurvey",
    "cancel_jobs",
    "job_states",
    "process_start",
    "read_jobs",
    "record_cancelled",
    "refuse_live_jobs",
    "stderr_to",
    "stop_local_jobs",
    "survey_jobs",
    "write_jobs",
]

logger = logging.getLogger(__name__)

# Slurm's pending reason of a job whose afterok dependency failed: it stays queued and never starts
NEVER = "DependencyNeverSatisfied"
# squeue's states of a job that has started (the others are queued: PENDING, REQUEUED, SUSPENDED, ...)
STARTED = ("RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING")


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3, the state, first); none if the process
    does not exist or ``/proc`` is not there."""
    try:
        text = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return []
    # the command name (field 2) is in parentheses and may hold spaces
    return text[text.rfind(")") + 2 :].split()


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, from ``/proc/<pid>/stat``), or None if the
    process does not exist or ``/proc`` is not there."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else None  # field 22


def write_jobs(
    out: Path,
    executor: str,
    jobs: Mapping[str, str],
    starts: Mapping[str, str | None] | None = None,
    *,
    cancelled: Mapping[str, str] | None = None,
) -> None:
    """Write ``out/jobs.json`` atomically: the executor, ``{stage: job id}``, for local jobs ``{stage: process
    start}``, and ``{stage: job id}`` of the jobs that ``neuralign study --cancel`` cancelled."""
    record = {"executor": executor, "jobs": dict(jobs), "starts": dict(starts or {}),
              "cancelled": dict(cancelled or {}), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
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
        return {"executor": None, "jobs": {}, "starts": {}, "cancelled": {}}
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("jobs"), dict):
            raise ValueError("no `jobs` entry")
    except ValueError as exc:
        raise ValueError(f"{path} is not a jobs record ({exc}); delete it if no job of {out} is alive"
                         ) from None
    record.setdefault("starts", {})
    record.setdefault("cancelled", {})
    return record


def _local_alive(job_id: str, start: str | None) -> bool:
    try:
        pid = int(job_id)
        if pid <= 0:  # not a process: kill(0 or -1, 0) would signal a group or every process
            return False
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, ValueError):  # gone, or another user's process took the pid
        return False
    if _zombie(pid):  # it has ended; its parent (or, once that has exited, init) has not read its status yet
        return False
    now = process_start(pid)
    return start is None or now is None or now == start


def _zombie(pid: int) -> bool:
    """Has process ``pid`` ended without its status read (state Z in ``/proc/<pid>/stat``)? False where there is
    no ``/proc``."""
    return _stat(pid)[:1] == ["Z"]


def _squeue(ids: Collection[str]) -> dict[str, tuple[str, str]]:
    """``{job id: (state, pending reason)}`` of the jobs among ``ids`` that Slurm still lists (queued or running).

    Raises
    ------
    JobError
        If ``squeue`` fails for another reason than jobs it no longer knows (e.g. the controller does not answer):
        the jobs' states cannot be told, and taking them for ended would submit their stages twice.
    """
    listing = subprocess.run(["squeue", "-h", "-j", ",".join(sorted(ids, key=int)), "-o", "%i %T %r"],
                             capture_output=True, text=True)  # fmt: skip
    if listing.returncode != 0 and "Invalid job id" not in listing.stderr:  # all ids purged: nothing listed
        error = listing.stderr.strip().splitlines()
        raise JobError(f"squeue could not tell the state of jobs {', '.join(sorted(ids, key=int))}: "
                       f"{error[-1] if error else f'exit status {listing.returncode}'}")  # fmt: skip
    states = {}
    for line in listing.stdout.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) >= 2:
            states[parts[0]] = (parts[1], parts[2].strip() if len(parts) > 2 else "")
    return states


def job_states(record: Mapping[str, Any], skip: Collection[str] = ()) -> dict[str, str]:
    """Per stage of ``record`` (from :func:`read_jobs`) whose job may be alive, leaving out ``skip``: ``"running"``,
    ``"pending"`` (queued), ``"blocked"`` (queued behind a failed job: Slurm's ``DependencyNeverSatisfied``) or
    ``"unknown"`` (a Slurm job, and no ``squeue`` on PATH to ask).

    Raises
    ------
    JobError
        If ``squeue`` is there but fails (see :func:`_squeue`).
    """
    jobs = {s: str(j) for s, j in record.get("jobs", {}).items() if s not in skip}
    alive: dict[str, str] = {}
    if record.get("executor") == "local":
        starts = record.get("starts", {})
        alive = {s: "running" for s, j in jobs.items() if _local_alive(j, starts.get(s))}
    elif record.get("executor") == "slurm" and jobs:
        if shutil.which("squeue") is None:
            return {stage: "unknown" for stage in jobs}
        states = _squeue(set(jobs.values()))
        for stage, job_id in jobs.items():
            if job_id not in states:
                continue
            state, reason = states[job_id]
            if state in STARTED:
                alive[stage] = "running"
            else:
                alive[stage] = "blocked" if reason == NEVER else "pending"
    return alive


@dataclass(frozen=True)
class JobSurvey:
    """The stages of a study folder sorted by what their files and recorded jobs say (:func:`survey_jobs`).

    Every stage is in exactly one of ``done``, ``live``, ``blocked``, ``failed``, ``cancelled``, ``unknown`` and
    ``missing``.

    Attributes
    ----------
    executor : str or None
        ``"local"``, ``"slurm"`` or None (no ``jobs.json``).
    jobs : dict of str to str
        The recorded job id of every stage that has one.
    done : tuple of str
        Stages whose outputs exist (whatever their jobs). The ``report`` stage counts as done only when its outputs
        exist and every other stage is done.
    live : dict of str to str
        Stage -> ``"running"`` or ``"pending"``: a job that is running, or queued and able to start (every stage it
        needs is done or has a live job).
    blocked : tuple of str
        Stages whose queued Slurm job can never start: Slurm says so (``DependencyNeverSatisfied``), or a stage it
        needs has neither its outputs nor a live job.
    failed : tuple of str
        Stages whose recorded job ended without their outputs.
    cancelled : tuple of str
        Stages whose recorded job ``neuralign study --cancel`` cancelled (or an interrupted local run stopped).
    unknown : tuple of str
        Stages with a Slurm job and no ``squeue`` on PATH to ask about it.
    missing : tuple of str
        Stages never submitted.
    """

    executor: str | None
    jobs: dict[str, str] = field(default_factory=dict)
    done: tuple[str, ...] = ()
    live: dict[str, str] = field(default_factory=dict)
    blocked: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    cancelled: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()

    def state(self, stage: str) -> str:
        """The state of ``stage``: ``"done"``, ``"running"``, ``"pending"``, ``"blocked"``, ``"failed"``,
        ``"cancelled"``, ``"unknown"`` or ``"missing"``."""
        if stage in self.live:
            return self.live[stage]
        for name in ("done", "blocked", "failed", "cancelled", "unknown", "missing"):
            if stage in getattr(self, name):
                return name
        raise ValueError(f"unknown stage {stage!r}")


def survey_jobs(out: str | os.PathLike, stages: Sequence[Stage]) -> JobSurvey:
    """Sort the ``stages`` of the study in ``out`` (in an order that respects their dependencies, as
    :func:`~neuralign.study.study_stages` gives them) by their outputs and their recorded jobs (:class:`JobSurvey`).

    Raises
    ------
    ValueError
        If ``out/jobs.json`` is not a jobs record.
    JobError
        If ``squeue`` fails (the controller does not answer).
    """
    out = Path(out)
    record = read_jobs(out)
    jobs = {s.name: str(record["jobs"][s.name]) for s in stages if s.name in record["jobs"]}
    cancelled = {s: str(j) for s, j in record["cancelled"].items()}
    done = [s.name for s in stages if s.name != "report" and stage_done(out, s)]
    if all(s.name in done for s in stages if s.name != "report"):
        done += [s.name for s in stages if s.name == "report" and stage_done(out, s)]
    states = job_states({**record, "jobs": jobs}, skip=done)
    live: dict[str, str] = {}
    sorted_: dict[str, list[str]] = {k: [] for k in ("blocked", "failed", "cancelled", "unknown", "missing")}
    for stage in stages:
        name = stage.name
        if name in done:
            continue
        state = states.get(name)
        if state == "running":
            live[name] = state
        elif state == "unknown":
            sorted_["unknown"].append(name)
        elif state == "blocked" or (state == "pending" and any(n not in done and n not in live for n in stage.needs)):
            sorted_["blocked"].append(name)  # it waits on a job that can never succeed
        elif state == "pending":
            live[name] = state
        elif name in jobs:
            sorted_["cancelled" if cancelled.get(name) == jobs[name] else "failed"].append(name)
        else:
            sorted_["missing"].append(name)
    return JobSurvey(executor=record["executor"], jobs=jobs, done=tuple(done), live=live,
                     **{k: tuple(v) for k, v in sorted_.items()})  # fmt: skip


def cancel_jobs(job_ids: Collection[str]) -> None:
    """Cancel the Slurm jobs ``job_ids`` (``scancel``); a job that has ended meanwhile is no error.

    Raises
    ------
    JobError
        If ``scancel`` is not on PATH or fails (names the jobs).
    """
    if not job_ids:
        return
    ids = sorted(set(job_ids), key=int)
    if shutil.which("scancel") is None:
        raise JobError(f"cancelling Slurm jobs {', '.join(ids)} needs scancel, which is not on PATH: run this on the "
                       "cluster's login node")  # fmt: skip
    run = subprocess.run(["scancel", *ids], capture_output=True, text=True)
    errors = [line for line in run.stderr.splitlines() if line.strip() and "already completing" not in line
              and "Invalid job id" not in line and "Job/step already" not in line]  # fmt: skip
    if run.returncode != 0 and errors:
        raise JobError(f"scancel {' '.join(ids)} failed: {errors[-1].strip()}")


def refuse_live_jobs(out: Path, stages: Sequence[Stage], *, command: str = "study") -> list[str]:
    """Refuse to run the study (or comparison: the ``neuralign`` ``command`` that runs it, named in the message) in
    ``out`` in this process or as local jobs while a job of it (from ``jobs.json``) is queued or running, changing
    nothing; returns the Slurm jobs it cancelled.

    Slurm jobs that can never start (``blocked`` in :func:`survey_jobs`) are cancelled with ``scancel`` (logged),
    but only when no job of the folder is live, so that a refused run has changed nothing.

    Raises
    ------
    JobError
        If a job is live, or Slurm jobs are recorded and ``squeue`` (or ``scancel`` for blocked ones) is not on
        PATH or fails (one line, naming the jobs and what to do).
    """
    survey = survey_jobs(out, stages)
    jobs = survey.jobs
    if survey.unknown:
        raise JobError(
            f"{out}/jobs.json lists Slurm jobs ({', '.join(jobs[s] for s in survey.unknown)}) and `squeue` is not on "
            "PATH to tell whether they are alive: run this on the cluster's login node (or delete jobs.json once none "
            "of them is queued or running)"
        )
    if survey.live:
        listed = ", ".join(f"{s} (job {jobs[s]}, {state})" for s, state in survey.live.items())
        rerun = (" or rerun it with --executor slurm, which resubmits only the missing stages"
                 if survey.executor == "slurm" else "")  # fmt: skip
        raise JobError(f"{out} still has jobs queued or running: {listed}; wait for them, cancel them (neuralign "
                       f"{command} --cancel {out}){rerun}")  # fmt: skip
    blocked = sorted({jobs[s] for s in survey.blocked}, key=int)
    if blocked:
        cancel_jobs(blocked)
        record_cancelled(out, {s: jobs[s] for s in survey.blocked})
        logger.warning("cancelled Slurm jobs %s of %s: they waited on a failed job", " ".join(blocked), out)
    return blocked


def record_cancelled(out: Path, cancelled: Mapping[str, str]) -> None:
    """Add ``{stage: job id}`` to the cancelled jobs of ``out/jobs.json`` (``neuralign study --status`` then says
    "cancelled" for those stages, not "failed")."""
    record = read_jobs(out)
    write_jobs(out, record["executor"], record["jobs"], record["starts"],
               cancelled={**record["cancelled"], **cancelled})  # fmt: skip


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """File descriptor 2 goes to ``path`` (appended) inside the block: a process started there writes its stderr
    there. submitit's local controller would otherwise print its own traceback on the terminal at a Ctrl-C, after
    the command's one line; the stages' own output goes to their logs under ``jobs/`` anyway."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def stop_local_jobs(jobs: list[Any], wait_seconds: float = 10.0) -> None:
    """Stop running local jobs: submitit's cancel (SIGINT to each job's controller, which interrupts its task and
    kills it a second later), then, after ``wait_seconds``, SIGKILL to every process of a job still alive (a
    controller started with SIGINT ignored, as from a shell's ``&``, would otherwise leave its task running)."""
    processes = {int(job.job_id): None for job in jobs}
    for job in jobs:
        processes.update(dict.fromkeys(_descendants(int(job.job_id))))
    processes = {pid: process_start(pid) for pid in processes}
    for job in jobs:
        job.cancel(check=False)
    deadline = time.monotonic() + wait_seconds
    while any(not job.done() for job in jobs) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid, start in processes.items():
        if start is not None and process_start(pid) == start:  # the same process, not a recycled pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    """The processes started by ``pid`` and by those, from ``/proc`` (none where there is no ``/proc``)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
        for child in children:
            out += [child, *_descendants(child)]
    return out


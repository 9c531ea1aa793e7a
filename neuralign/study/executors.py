"""A study's stages as jobs, with submitit: concurrent local processes (``--executor local --jobs N``) or Slurm jobs
(``--executor slurm``), and the status of a study folder (``neuralign study --status OUT``).

Every job runs :func:`~neuralign.study.run_stage` for one stage of
:func:`~neuralign.study.study_stages`, so a job does exactly what the sequential
:func:`~neuralign.study.run_study` does for that stage. The stage files are the single source of truth:
a stage is done when its outputs exist; a failed, cancelled or pre-empted job is run again by the next command,
and a finished one never is. Two jobs never write the same file: each stage writes only its own outputs and
record, a stage is submitted only once the stages it needs are done (local) or with a Slurm dependency on their
jobs (``afterok``), and every way of running a study (these executors and the sequential
:func:`~neuralign.study.run_study`) refuses to start while a job of the folder is queued or running
(:func:`neuralign.study.jobs.refuse_live_jobs`; Slurm jobs left waiting on a failed job, which can never
start, are cancelled then, as the rerun resubmits them). The
manifest has one writer at a time: the submitting command before any job starts, then the ``report`` stage, which
runs last and merges the per-stage records.

``jobs.json`` in the study folder (written by the submitting command only) lists the job id of every stage it
submitted (local jobs: process id and process start time, :mod:`neuralign.study.jobs`); submitit keeps
each job's pickled call and its stdout/stderr logs under ``jobs/``.

Requires the ``cluster`` extra: ``pip install 'neuralign[cluster]'`` (submitit).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from neuralign import _distributed
from neuralign.errors import JobError, MissingDependencyError
from neuralign.study import StudyConfig, prepare_study, run_stage, stage_done, study_stages
from neuralign.study.jobs import job_states, process_start, read_jobs, write_jobs

__all__ = ["run_study_local", "study_status", "submit_study_slurm"]

logger = logging.getLogger(__name__)

_LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit's local executor kills a job after 2 minutes unless told otherwise


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise MissingDependencyError(
            "running a study as jobs needs submitit: pip install 'neuralign[cluster]'"
        ) from None
    return submitit


def _stage_job(config: dict[str, Any], out: str, name: str, device: str, report: dict[str, Any]) -> str:
    """The body of every job: one stage, data-parallel over the job's tasks when it has several (one per GPU)."""
    submitit = _submitit()
    distributed = False
    try:
        tasks = submitit.JobEnvironment().num_tasks
    except RuntimeError:  # not inside a submitit job (called directly)
        tasks = 1
    if tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        distributed = _distributed.init_from_env(device)
    try:
        run_stage(StudyConfig.from_dict(config), out, name, device=device, **report)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    return name


def study_status(out: str | os.PathLike) -> dict[str, list[tuple[str, str | None]]]:
    """The stages of the study in ``out`` by state.

    Returns ``{"done", "running", "pending", "blocked", "failed", "unknown": [(stage, job id or None), ...]}``.
    Done: its outputs exist (whatever its job). Running: its job (from ``jobs.json``) is alive (Slurm: running;
    queued ones are pending with their job id). Blocked: its Slurm job waits on a failed job and can never start
    (``DependencyNeverSatisfied``; cancel it, or rerun the study, which cancels it). Failed: its recorded job ended
    without the stage's outputs. Unknown: a Slurm job, and no ``squeue`` on PATH to ask. Pending: none of these.

    Raises
    ------
    ValueError
        If ``out`` holds no study manifest (a missing, invalid or non-study ``manifest.json``: names the file).
    """
    out = Path(out)
    path = out / "manifest.json"
    if not path.exists():
        raise ValueError(f"{out} holds no study (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
        config = StudyConfig.from_dict(manifest["config"])
    except (ValueError, KeyError, TypeError) as exc:
        reason = "not valid JSON" if isinstance(exc, json.JSONDecodeError) else "not a study's manifest"
        raise ValueError(f"{out} holds no study ({path} is {reason})") from None
    recorded = read_jobs(out)
    stages = study_stages(config)
    done = {s.name for s in stages if stage_done(out, s)}
    alive = job_states(recorded, skip=done)
    status: dict[str, list[tuple[str, str | None]]] = {
        k: [] for k in ("done", "running", "pending", "blocked", "failed", "unknown")
    }
    for stage in stages:
        job = recorded["jobs"].get(stage.name)
        if stage.name in done:
            status["done"].append((stage.name, None))
        elif stage.name in alive:
            status[alive[stage.name]].append((stage.name, job))
        elif job is not None:
            status["failed"].append((stage.name, job))
        else:
            status["pending"].append((stage.name, None))
    return status


def _failure(job: Any) -> str | None:
    """None if the job returned, else the last line of its error (a local job killed by a signal: that signal)."""
    process = getattr(job, "_process", None)  # submitit's LocalJob keeps its Popen (no public return code)
    code = process.poll() if process is not None else None
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "an unknown signal"
        return f"its process was killed by signal {-code} ({name})"
    try:
        job.result()
    except Exception as exc:  # noqa: BLE001 - submitit re-raises the job's own exception, or UncompletedJobError
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return lines[-1].strip() if lines else type(exc).__name__
    return None


def run_study_local(
    config: StudyConfig,
    out: str | os.PathLike,
    *,
    jobs: int = 2,
    device: str | torch.device = "cpu",
    paper_row: Mapping[str, Any] | None = None,
    notes: str | None = None,
    poll_seconds: float = 0.5,
    on_event: Callable[[str, str, str], Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the study in ``out`` as up to ``jobs`` concurrent local processes (submitit's local
    executor), each running one stage once the stages it needs are done; returns ``results.json``'s content.

    With a CUDA ``device`` and several GPUs, each job is pinned to one GPU (``CUDA_VISIBLE_DEVICES``), job slots
    going round the GPUs. ``on_event(stage, event, job_id)`` is called with ``"submitted"``, ``"done"`` and
    ``"failed"``.

    Raises
    ------
    JobError
        If a job failed or was cancelled (after the jobs that did not depend on it have finished): names the
        stages and their errors; rerunning resumes from the files.
    ValueError
        For ``jobs < 1``.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"`jobs` must be an int >= 1, got {jobs!r}")
    submitit = _submitit()
    out = Path(out)
    device = torch.device(device)
    prepare_study(config, out, device=device)  # refuses while a job of `out` is alive
    executor = submitit.LocalExecutor(folder=out / "jobs" / "%j")
    executor.update_parameters(timeout_min=_LOCAL_TIMEOUT_MIN, tasks_per_node=1)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    report = {"paper_row": dict(paper_row) if paper_row is not None else None, "notes": notes}
    stages = study_stages(config)
    by_name = {s.name: s for s in stages}
    submitted: dict[str, str] = {}
    starts: dict[str, str | None] = {}
    running: dict[str, tuple[Any, int]] = {}
    failed: dict[str, str] = {}
    reported = False
    free = list(range(jobs))

    def done(name: str) -> bool:
        # a stage whose job is still running is not done yet, even once its outputs exist: it may still be
        # writing its record, which the report merges into the manifest
        if name in running:
            return False
        return reported if name == "report" else stage_done(out, by_name[name])

    def blocked(stage) -> bool:
        return any(n in failed or blocked(by_name[n]) for n in stage.needs)

    while True:
        for name, (job, slot) in list(running.items()):
            if not job.done():
                continue
            del running[name]
            free.append(slot)
            error = _failure(job)
            if error is None and name != "report" and not stage_done(out, by_name[name]):
                error = "the job ended without writing the stage's outputs"
            if error is None:
                reported = reported or name == "report"
            else:
                failed[name] = error
            if on_event is not None:
                on_event(name, "done" if error is None else "failed", job.job_id)
        ready = [s for s in stages if not done(s.name) and s.name not in running and s.name not in failed
                 and not blocked(s) and all(done(n) for n in s.needs)]  # fmt: skip
        for stage in ready[: len(free)]:
            slot = free.pop(0)
            if gpus > 1:
                executor.update_parameters(visible_gpus=[slot % gpus], gpus_per_node=1)
            job = executor.submit(_stage_job, config.to_dict(), str(out), stage.name, str(device), report)
            running[stage.name] = (job, slot)
            submitted[stage.name] = str(job.job_id)
            starts[stage.name] = process_start(int(job.job_id))  # the pid with its start time: not a recycled pid
            write_jobs(out, "local", submitted, starts)
            if on_event is not None:
                on_event(stage.name, "submitted", job.job_id)
        if not running:
            break
        time.sleep(poll_seconds)
    if failed:
        listed = "; ".join(f"{name}: {error}" for name, error in failed.items())
        raise JobError(f"{len(failed)} study job(s) failed ({listed}); rerun the same command to resume")
    results = json.loads((out / "results.json").read_text())
    results["report"] = str(out / "report.md")
    return results


def submit_study_slurm(
    config: StudyConfig,
    out: str | os.PathLike,
    *,
    device: str | torch.device = "cuda",
    partition: str | None = None,
    time_minutes: int = 24 * 60,
    gpus_per_job: int = 1,
    paper_row: Mapping[str, Any] | None = None,
    notes: str | None = None,
    additional_parameters: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Submit every stage of the study in ``out`` that is not done as a Slurm job (submitit), each depending on
    the jobs of the stages it needs (``--dependency=afterok:...``); returns ``{stage: job id}``.

    Each job asks for ``gpus_per_job`` GPUs on one node with one task per GPU (the stage then runs data-parallel
    over them, NCCL on CUDA), ``time_minutes`` of wall time, on ``partition``. The ``report`` stage is submitted
    last, depending on every other submitted job. Returns as soon as the jobs are queued; ``neuralign study
    --status OUT`` follows them. A stage whose earlier job is still queued or running is refused (cancel it or
    wait), so that two jobs never write the same file.

    Raises
    ------
    JobError
        If a stage of this study still has a live job, or ``sbatch``/``srun`` are not on PATH (before anything is
        written).
    ValueError
        For ``gpus_per_job < 1``, ``time_minutes < 1`` or a ``device`` that is not one.
    """
    for label, value in (("gpus_per_job", gpus_per_job), ("time_minutes", time_minutes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{label}` must be an int >= 1, got {value!r}")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"`device` must name a device (cuda or cpu) for the Slurm jobs, got {device!r}") from None
    submitit = _submitit()
    missing = [cmd for cmd in ("sbatch", "srun") if shutil.which(cmd) is None]
    if missing:
        raise JobError(f"--executor slurm needs Slurm, and {' and '.join(missing)} is not on PATH: submit from the "
                       "cluster's login node (or use --executor local)")  # fmt: skip
    out = Path(out)
    executor = submitit.SlurmExecutor(folder=out / "jobs" / "%j")
    prepare_study(config, out, device=device)  # refuses while a job of `out` is alive
    tasks = gpus_per_job if device.type == "cuda" else 1
    base: dict[str, Any] = {"time": time_minutes, "nodes": 1, "ntasks_per_node": tasks}
    if device.type == "cuda":
        base["gpus_per_node"] = gpus_per_job
    if partition is not None:
        base["partition"] = partition
    if additional_parameters:
        base["additional_parameters"] = dict(additional_parameters)
    report = {"paper_row": dict(paper_row) if paper_row is not None else None, "notes": notes}
    submitted: dict[str, str] = {}
    for stage in study_stages(config):
        if stage.name != "report" and stage_done(out, stage):
            continue
        after = sorted({submitted[n] for n in stage.needs if n in submitted}, key=int)
        executor.update_parameters(**base, job_name=f"neuralign {stage.name}",
                                   dependency=f"afterok:{':'.join(after)}" if after else None)  # fmt: skip
        job = executor.submit(_stage_job, config.to_dict(), str(out), stage.name, str(device), report)
        submitted[stage.name] = str(job.job_id)
        logger.info("submitted %s as Slurm job %s", stage.name, job.job_id)
    write_jobs(out, "slurm", submitted)
    return submitted

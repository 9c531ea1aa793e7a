"""The stages of a study or a comparison as jobs, with submitit: concurrent local processes (``--executor local
--jobs N``) or Slurm jobs (``--executor slurm``), the status of a folder (``neuralign study --status OUT``,
``neuralign compare --status OUT``) and cancelling its Slurm jobs (``--cancel OUT``).

The executors run any :class:`RunKind` (:data:`RUN_KINDS`): the study (:func:`~neuralign.study.study_stages`, each
stage run by :func:`~neuralign.study.run_stage`, the manifest prepared by :func:`~neuralign.study.prepare_study`)
and the comparison of ``neuralign compare`` (:func:`~neuralign.study.compare.compare_stages`,
:func:`~neuralign.study.compare.run_compare_stage`, :func:`~neuralign.study.compare.prepare_compare`). Every job runs
one stage with its kind's stage runner, so a job does exactly what the sequential run
(:func:`~neuralign.study.run_study`, :func:`~neuralign.study.compare.run_compare`) does for that stage. The
guarantees below hold for both kinds. The stage files are the single source of truth:
a stage is done when its outputs exist; a failed, cancelled or pre-empted job is run again by the next command,
and a finished one never is. Two jobs never write the same file: each stage writes only its own outputs and
record, a stage is submitted only once the stages it needs are done (local) or with a Slurm dependency on their
jobs (``afterok``), a stage with a live job is never submitted again, and a run in one process (sequential, or the
local executor's) refuses to start while a job of the folder is queued or running
(:func:`neuralign.study.jobs.refuse_live_jobs`). A Slurm rerun keeps the live jobs and submits only the stages that
are neither done nor live, each depending on the live jobs of the stages it needs
(:func:`submit_slurm`). The manifest has one writer at a time: the submitting command before the jobs it
submits start (the only job that writes the manifest, the ``report`` stage's, waits on every other), then the
``report`` stage, which runs last and merges the per-stage records.

Each job asks Slurm for the resources of :class:`SlurmOptions` (CPUs per task, memory, GPUs, time, partition,
account, QoS, further ``sbatch`` options) through submitit's parameters; they are recorded in the manifest, and
inside a job torch uses as many threads as the job has CPUs per task (:func:`job_threads`).

``jobs.json`` in the folder (written by the submitting command and ``--cancel`` only) lists the job id of
every stage it submitted (local jobs: process id and process start time, :mod:`neuralign.study.jobs`) and the jobs
that ``--cancel`` cancelled; submitit keeps each job's pickled call and its stdout/stderr logs under ``jobs/``.

Requires the ``cluster`` extra: ``pip install 'neuralign[cluster]'`` (submitit).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuralign import _distributed
from neuralign._options import Options, renamed_keywords, resolve_options
from neuralign._utils import usable_cores
from neuralign._validate import check_int
from neuralign.errors import JobError, MissingDependencyError
from neuralign.study import StudyConfig, run_stage, stage_done, study_stages
from neuralign.study.compare import (
    CompareConfig,
    check_compare_folder,
    compare_stages,
    prepare_compare,
    run_compare_stage,
)
from neuralign.study.jobs import (
    cancel_jobs,
    process_start,
    read_jobs,
    record_cancelled,
    stderr_to,
    stop_local_jobs,
    survey_jobs,
    write_jobs,
)
from neuralign.study.runner import _prepare, check_study_folder
from neuralign.study.stages import Stage, first_run

__all__ = [
    "RUN_KINDS",
    "STATES",
    "RunKind",
    "SlurmOptions",
    "SlurmSubmission",
    "cancel_slurm",
    "job_threads",
    "run_kind",
    "run_local",
    "stage_status",
    "submit_slurm",
]

logger = logging.getLogger(__name__)

_LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit's local executor kills a job after 2 minutes unless told otherwise

# Slurm's --mem: an integer with an optional unit (K, M, G, T; M when none)
_MEMORY = re.compile(r"[0-9]+[KMGT]?", re.IGNORECASE)
# sbatch options that the study sets itself, or that a field of SlurmOptions sets: refused in `extra`
_RESERVED = {
    "partition": "`partition`", "time": "`time_minutes`", "gpus": "`gpus_per_job`", "gpus-per-node": "`gpus_per_job`",
    "ntasks": "`tasks_per_job`", "ntasks-per-node": "`tasks_per_job`", "cpus-per-task": "`cpus_per_task`",
    "mem": "`memory`", "account": "`account`", "qos": "`qos`", "nodes": "the study (one node per job)",
    "dependency": "the study (the jobs of the stages a stage needs)", "job-name": "the study (the stage's name)",
    "output": "submitit (the job's log)", "error": "submitit (the job's log)", "open-mode": "submitit",
    "signal": "submitit (pre-emption)", "array": "the study (one job per stage)",
}  # fmt: skip


@dataclass(frozen=True)
class RunKind:
    """A kind of staged run that the executors run: what they need to know of it.

    Attributes
    ----------
    name : str
        The run's name in messages (``"study"``, ``"comparison"``).
    command : str
        The ``neuralign`` command that runs it (``"study"``, ``"compare"``), named in hints (``neuralign compare
        --status OUT``).
    manifest : str
        The ``kind`` entry of its manifest (``manifest.json``), by which a folder's kind is told.
    config : type
        Its settings' class (``StudyConfig``, ``CompareConfig``), with ``to_dict`` / ``from_dict``.
    stages : callable
        ``stages(config) -> list of Stage``: its stage graph, in an order that respects the dependencies, the
        ``report`` stage last.
    prepare : callable
        ``prepare(config, out, *, device, run, live_jobs)``: refuse a folder with other settings (and, unless
        ``live_jobs``, one with a live job), then record this run in the manifest with the entries of ``run``.
    check_folder : callable
        ``check_folder(config, out)``: refuse a folder with other settings, writing nothing.
    run_stage : callable
        ``run_stage(config, out, name, *, device, **report)``: run one stage in this process; the ``report`` stage
        closes the run in the manifest.
    """

    name: str
    command: str
    manifest: str
    config: type
    stages: Callable[[Any], list[Stage]]
    prepare: Callable[..., Any]
    check_folder: Callable[[Any, Path], Any]
    run_stage: Callable[..., bool]


def _prepare_study(config: StudyConfig, out: str | os.PathLike, *, device: str | torch.device,
                   run: Mapping[str, Any] | None, live_jobs: bool) -> None:  # fmt: skip
    _prepare(config, Path(out), torch.device(device), None, run=run, live_jobs=live_jobs)


#: The kinds of run the executors run, by the name of the command that runs them.
RUN_KINDS: dict[str, RunKind] = {
    "study": RunKind("study", "study", "study_manifest", StudyConfig, study_stages, _prepare_study,
                     check_study_folder, run_stage),
    "compare": RunKind("comparison", "compare", "compare_manifest", CompareConfig, compare_stages, prepare_compare,
                       check_compare_folder, run_compare_stage),
}  # fmt: skip


def run_kind(config: Any) -> RunKind:
    """The :class:`RunKind` of ``config`` (a ``StudyConfig`` or a ``CompareConfig``).

    Raises
    ------
    TypeError
        For another kind of settings.
    """
    for kind in RUN_KINDS.values():
        if isinstance(config, kind.config):
            return kind
    expected = " or ".join(k.config.__name__ for k in RUN_KINDS.values())
    raise TypeError(f"`config` must be a {expected}, got {type(config).__name__}")


def _report_options(kind: RunKind, paper_row: Mapping[str, Any] | None, notes: str | None) -> dict[str, Any]:
    """The keyword arguments of the kind's ``report`` stage: a study's paper row and notes; none for a comparison."""
    if kind.command == "study":
        return {"paper_row": dict(paper_row) if paper_row is not None else None, "notes": notes}
    if paper_row is not None or notes is not None:
        raise ValueError(f"`paper_row` and `notes` belong to a study's report; a {kind.name} has neither")
    return {}


@dataclass(frozen=True)
class SlurmOptions(Options):
    """The resources of every Slurm job of a study or comparison (:func:`submit_slurm`), passed to Slurm as the
    parameters of submitit's :class:`submitit.SlurmExecutor` (``#SBATCH`` lines of each job's script).

    Attributes
    ----------
    partition : str, optional
        Slurm partition (``--partition``; default: the cluster's default partition).
    time_minutes : int
        Wall-time limit of each job, in minutes (``--time``; >= 1; default 1440, one day).
    gpus_per_job : int, optional
        GPUs of each job on its node (``--gpus-per-node``; >= 0). Default: 1 with a CUDA device, 0 on the CPU. A
        CUDA study needs at least 1; a CPU study asks for none (0; more would sit idle).
    tasks_per_job : int, optional
        Processes of each job (``--ntasks-per-node``, one node; >= 1), which run the stage data-parallel (NCCL on
        CUDA, gloo on the CPU). Default: one per GPU on CUDA (it must then equal ``gpus_per_job``), 1 on the CPU.
    cpus_per_task : int, optional
        CPUs of each process (``--cpus-per-task``; >= 1); torch inside the job uses as many threads
        (:func:`job_threads`). Default: the cluster's (usually 1).
    memory : str, optional
        Memory of each job on its node (``--mem``): an integer with an optional unit ``K``, ``M``, ``G`` or ``T``
        (megabytes without one), e.g. ``"4G"``. Default: the cluster's, which on many clusters is the whole node's
        memory, so that jobs that could share a node wait for each other.
    account, qos : str, optional
        Slurm account (``--account``) and quality of service (``--qos``).
    extra : dict of str to str, optional
        Further ``sbatch`` options by long name without dashes (``{"constraint": "a100", "exclusive": ""}``; an
        empty value gives the flag alone), passed as submitit's ``additional_parameters``. Options that the fields
        above or the study set (``mem``, ``dependency``, ``job-name``, ...) are refused.

    Raises
    ------
    TypeError, ValueError
        For a field of the wrong kind or value (one line naming it), e.g. a memory that Slurm would not read.

    Examples
    --------
    >>> SlurmOptions(cpus_per_task=2, memory="4G").sbatch_parameters("cpu")
    {'time': 1440, 'nodes': 1, 'ntasks_per_node': 1, 'cpus_per_task': 2, 'mem': '4G'}
    >>> SlurmOptions(gpus_per_job=2).sbatch_parameters("cuda")["ntasks_per_node"]
    2
    """

    partition: str | None = None
    time_minutes: int = 24 * 60
    gpus_per_job: int | None = None
    tasks_per_job: int | None = None
    cpus_per_task: int | None = None
    memory: str | None = None
    account: str | None = None
    qos: str | None = None
    extra: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self._check("time_minutes", check_int, minimum=1)
        self._check("gpus_per_job", check_int, minimum=0, allow_none=True)
        self._check("tasks_per_job", check_int, minimum=1, allow_none=True)
        self._check("cpus_per_task", check_int, minimum=1, allow_none=True)
        for name in ("partition", "account", "qos"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not re.fullmatch(r"\S+", value)):
                raise ValueError(f"`{name}` must be a Slurm name without spaces, got {value!r}")
        if self.memory is not None:
            memory = str(self.memory).strip() if isinstance(self.memory, (str, int)) else None
            if memory is None or isinstance(self.memory, bool) or not _MEMORY.fullmatch(memory):
                raise ValueError(f"`memory` must be an amount Slurm reads for --mem, an integer with an optional unit "
                                 f"K, M, G or T (e.g. 4G, 500M), got {self.memory!r}")  # fmt: skip
            object.__setattr__(self, "memory", memory.upper())
        if self.extra is not None:
            if not isinstance(self.extra, Mapping):
                raise TypeError(f"`extra` must be a dict of sbatch options, got {type(self.extra).__name__}")
            extra = {}
            for key, value in self.extra.items():
                name = str(key).lstrip("-").replace("_", "-").lower()
                if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
                    raise ValueError(f"`extra` holds {key!r}, which is not an sbatch option's long name")
                if name in _RESERVED:
                    raise ValueError(f"`extra` holds the sbatch option {name!r}, which {_RESERVED[name]} sets")
                if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                    raise TypeError(f"`extra` option {name!r} must have a string value, got {value!r}")
                extra[name] = str(value)
            object.__setattr__(self, "extra", extra)

    def __hash__(self) -> int:  # `extra` is a dict
        values = dataclasses.astuple(dataclasses.replace(self, extra=None))
        return hash((values, tuple(sorted((self.extra or {}).items()))))

    def sbatch_parameters(self, device: str | torch.device) -> dict[str, Any]:
        """The parameters of submitit's :class:`submitit.SlurmExecutor` for a job running on ``device``
        (``additional_parameters`` holds :attr:`extra`; an empty value is a flag).

        Raises
        ------
        ValueError
            For a CUDA device with ``gpus_per_job == 0`` or ``tasks_per_job`` other than ``gpus_per_job``, or a CPU
            device with GPUs.
        """
        cuda = torch.device(device).type == "cuda"
        gpus = self.gpus_per_job if self.gpus_per_job is not None else (1 if cuda else 0)
        if cuda and gpus == 0:
            raise ValueError("`gpus_per_job` is 0 but the jobs run on CUDA: give at least 1, or run the jobs on the "
                             "CPU (--device cpu)")  # fmt: skip
        if not cuda and gpus > 0:
            raise ValueError(f"`gpus_per_job` is {gpus} but the jobs run on the CPU, which would leave the GPUs idle: "
                             "give 0, or run the jobs on CUDA (--device cuda)")  # fmt: skip
        tasks = self.tasks_per_job if self.tasks_per_job is not None else max(gpus, 1)
        if cuda and tasks != gpus:
            raise ValueError(f"`tasks_per_job` is {tasks} but a CUDA job runs one task per GPU (`gpus_per_job` "
                             f"{gpus}): leave `tasks_per_job` out or give {gpus}")  # fmt: skip
        params: dict[str, Any] = {"time": self.time_minutes, "nodes": 1, "ntasks_per_node": tasks}
        if gpus:
            params["gpus_per_node"] = gpus
        for name, key in (("cpus_per_task", "cpus_per_task"), ("memory", "mem"), ("partition", "partition"),
                          ("account", "account"), ("qos", "qos")):  # fmt: skip
            if getattr(self, name) is not None:
                params[key] = getattr(self, name)
        if self.extra:
            params["additional_parameters"] = {k: (v if v != "" else True) for k, v in self.extra.items()}
        return params


def job_threads(environ: Mapping[str, str] | None = None) -> int | None:
    """The torch threads a process of a Slurm job should use: the job's CPUs per task, or None outside a Slurm job.

    ``SLURM_CPUS_PER_TASK`` when the job asked for CPUs per task; otherwise the job's CPUs on this node
    (``SLURM_JOB_CPUS_PER_NODE``) shared among its tasks on this node (``SLURM_NTASKS_PER_NODE`` or
    ``SLURM_TASKS_PER_NODE``); at most the cores this process may run on, at least 1.

    Parameters
    ----------
    environ : mapping of str to str, optional
        The environment to read (default ``os.environ``).

    Examples
    --------
    >>> job_threads({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "1"})
    1
    >>> job_threads({}) is None
    True
    """
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in env:
        return None

    def first(name: str) -> int | None:  # "2", "2(x3)" or "2,1": the first node's count
        match = re.match(r"\s*([0-9]+)", env.get(name, ""))
        return int(match.group(1)) if match else None

    threads = first("SLURM_CPUS_PER_TASK")
    if threads is None:
        cpus = first("SLURM_JOB_CPUS_PER_NODE")
        tasks = first("SLURM_NTASKS_PER_NODE") or first("SLURM_TASKS_PER_NODE") or 1
        if cpus is None:
            return None
        threads = cpus // tasks
    return max(1, min(threads, usable_cores()))


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise MissingDependencyError(
            "running a study or comparison as jobs needs submitit: pip install 'neuralign[cluster]'"
        ) from None
    return submitit


def _stage_job(kind: str, config: dict[str, Any], out: str, name: str, device: str, report: dict[str, Any],
               threads: int | None = None) -> str:  # fmt: skip
    """The body of every job: one stage of a run of ``kind`` (a key of :data:`RUN_KINDS`), data-parallel over the
    job's tasks when it has several (one per GPU, or CPU tasks with gloo), with ``threads`` torch threads (a local
    job's), else as many as a Slurm job has CPUs per task."""
    submitit = _submitit()
    if threads is None:  # a Slurm job (a local job is given its threads, even inside a Slurm allocation)
        threads = job_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    distributed = False
    try:
        tasks = submitit.JobEnvironment().num_tasks
    except RuntimeError:  # not inside a submitit job (called directly)
        tasks = 1
    if tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        distributed = _distributed.init_from_env(device)
    try:
        runs = RUN_KINDS[kind]
        runs.run_stage(runs.config.from_dict(config), out, name, device=device, **report)
    except BaseException:
        if distributed:  # no barrier: the other ranks may never reach it
            torch.distributed.destroy_process_group()
        raise
    if distributed:
        _distributed.close()
    return name


#: The states of :func:`stage_status`, in the order ``neuralign study --status`` lists them.
STATES = ("done", "running", "pending", "blocked", "failed", "cancelled", "unknown")


def stage_status(out: str | os.PathLike) -> dict[str, list[tuple[str, str | None]]]:
    """The stages of the study or comparison in ``out`` (told by its manifest) by state.

    Returns ``{"done", "running", "pending", "blocked", "failed", "cancelled", "unknown": [(stage, job id or None),
    ...]}`` (:func:`neuralign.study.jobs.survey_jobs`). Done: its outputs exist (whatever its job). Running: its job
    (from ``jobs.json``) is alive (Slurm: running; queued ones are pending with their job id). Blocked: its Slurm job
    is queued and can never start, as it waits on a job that failed or was cancelled (cancel it, or rerun the study
    with ``--executor slurm``, which replaces it). Failed: its recorded job ended without the stage's outputs.
    Cancelled: ``--cancel`` cancelled its job, or an interrupted local run stopped it. Unknown: a Slurm job, and
    no ``squeue`` on PATH to ask. Pending: none of these (queued, or not submitted: job None).

    Raises
    ------
    ValueError
        If ``out`` holds no study or comparison (a missing or invalid ``manifest.json``, or another command's: names
        the file).
    JobError
        If ``squeue`` fails (the Slurm controller does not answer).
    """
    out = Path(out)
    kind, config = _recorded(out)
    stages = kind.stages(config)
    survey = survey_jobs(out, stages)
    status: dict[str, list[tuple[str, str | None]]] = {k: [] for k in STATES}
    for stage in stages:
        state = survey.state(stage.name)
        job = survey.jobs.get(stage.name) if state not in ("done", "missing") else None
        status["pending" if state == "missing" else state].append((stage.name, job))
    return status


def _recorded(out: Path) -> tuple[RunKind, Any]:
    """The kind and settings of the run in ``out``, from its manifest (a comparison's by its ``kind``; a study's
    otherwise, as manifests of every version record it)."""
    path = out / "manifest.json"
    if not path.exists():
        raise ValueError(f"{out} holds no study or comparison (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
        kind = RUN_KINDS["compare" if manifest.get("kind") == RUN_KINDS["compare"].manifest else "study"]
        return kind, kind.config.from_dict(manifest["config"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = "not valid JSON" if isinstance(exc, json.JSONDecodeError) else "not a study's or comparison's manifest"
        raise ValueError(f"{out} holds no study or comparison ({path} is {reason})") from None


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
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # submitit's FailedJobError quotes the job's traceback between two dashed rules, then names its log files:
        # the exception is the traceback's last line
        rules = [i for i, line in enumerate(lines) if set(line) == {"-"}]
        if len(rules) >= 2 and rules[-1] - rules[-2] > 1:
            return lines[rules[-1] - 1]
        return lines[-1] if lines else type(exc).__name__
    return None


def run_local(
    config: StudyConfig | CompareConfig,
    out: str | os.PathLike,
    *,
    jobs: int = 2,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    paper_row: Mapping[str, Any] | None = None,
    notes: str | None = None,
    poll_seconds: float = 0.5,
    on_event: Callable[[str, str, str], Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the study or comparison (:class:`RunKind`, from ``config``'s class) in ``out`` as up to
    ``jobs`` concurrent local processes (submitit's local executor), each running one stage once the stages it
    needs are done; returns ``results.json``'s content with ``"report"``, the report's path.

    A first run that fails before any stage is done leaves no manifest.
    ``paper_row`` and ``notes`` are a study's (see :func:`~neuralign.study.run_study`).

    Each job runs torch with ``threads`` CPU threads (default: this process's usable cores shared among the
    ``jobs``, at least 1): ``jobs`` processes each with torch's default, as many threads as cores, would
    oversubscribe the cores, and idle threads spin.

    With a CUDA ``device`` and several GPUs, each job is pinned to one GPU (``CUDA_VISIBLE_DEVICES``), job slots
    going round the GPUs. ``on_event(stage, event, job_id)`` is called with ``"submitted"``, ``"done"`` and
    ``"failed"``.

    Raises
    ------
    JobError
        If a job failed or was cancelled (after the jobs that did not depend on it have finished): names the
        stages and their errors; rerunning resumes from the files.
    ValueError
        For ``jobs < 1`` or ``threads < 1``, or ``paper_row`` / ``notes`` with a comparison.
    TypeError
        For settings of another kind.
    """
    kind = run_kind(config)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"`jobs` must be an int >= 1, got {jobs!r}")
    if threads is None:
        threads = max(1, usable_cores() // jobs)
    threads = check_int(threads, "threads", minimum=1)
    report = _report_options(kind, paper_row, notes)
    submitit = _submitit()
    out = Path(out)
    device = torch.device(device)
    stages = kind.stages(config)
    with first_run(out, stages):
        # refuses while a job of `out` lives; this run's record says the torch threads of each job
        kind.prepare(config, out, device=device, run={"executor": "local", "jobs": jobs, "threads_per_job": threads},
                     live_jobs=False)  # fmt: skip
        _run_jobs(submitit, kind, config, out, stages, jobs, threads, device, report, poll_seconds, on_event)
    results = json.loads((out / "results.json").read_text())
    results["report"] = str(out / "report.md")
    return results


def _run_jobs(submitit: Any, kind: RunKind, config: Any, out: Path, stages: list[Stage], jobs: int, threads: int,
              device: torch.device, report: dict[str, Any], poll_seconds: float,
              on_event: Callable[[str, str, str], Any] | None) -> None:  # fmt: skip
    """The local executor's loop: submit every ready stage while a slot is free, until none is left to run.

    Interrupted (Ctrl-C, or SIGTERM through the command line), it stops the running jobs, records them as cancelled
    in ``jobs.json`` (``--status`` says so) and re-raises: rerunning resumes from the stages' checkpoints."""
    executor = submitit.LocalExecutor(folder=out / "jobs" / "%j")
    executor.update_parameters(timeout_min=_LOCAL_TIMEOUT_MIN, tasks_per_node=1)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
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

    try:
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
                with stderr_to(out / "jobs" / "controllers.log"):  # submitit's controller inherits stderr
                    job = executor.submit(_stage_job, kind.command, config.to_dict(), str(out), stage.name,
                                          str(device), report, threads)  # fmt: skip
                running[stage.name] = (job, slot)
                submitted[stage.name] = str(job.job_id)
                starts[stage.name] = process_start(int(job.job_id))  # the pid with its start time: not a recycled pid
                write_jobs(out, "local", submitted, starts)
                if on_event is not None:
                    on_event(stage.name, "submitted", job.job_id)
            if not running:
                break
            time.sleep(poll_seconds)
    except BaseException:
        if running:
            stop_local_jobs([job for job, _ in running.values()])
            record_cancelled(out, {name: submitted[name] for name in running})
        raise
    if failed:
        listed = "; ".join(f"{name}: {error}" for name, error in failed.items())
        raise JobError(f"{len(failed)} {kind.name} job(s) failed ({listed}); rerun the same command to resume")


@dataclass(frozen=True)
class SlurmSubmission:
    """What :func:`submit_slurm` did.

    Attributes
    ----------
    submitted : dict of str to str
        Stage -> the id of the Slurm job submitted for it now (graph order).
    kept : dict of str to str
        Stage -> the id of its job still queued or running, left as it is (the new jobs depend on it).
    replaced : dict of str to str
        Stage -> the id of its queued job that could never start (it waited on a job that failed or was
        cancelled), which this call cancelled before submitting the stage again.
    done : tuple of str
        Stages whose outputs exist.
    parameters : dict
        The submitit parameters of the new jobs (:meth:`SlurmOptions.sbatch_parameters`).
    """

    submitted: dict[str, str]
    kept: dict[str, str]
    replaced: dict[str, str]
    done: tuple[str, ...]
    parameters: dict[str, Any]


def submit_slurm(
    config: StudyConfig | CompareConfig,
    out: str | os.PathLike,
    *,
    device: str | torch.device = "cuda",
    options: SlurmOptions | None = None,
    paper_row: Mapping[str, Any] | None = None,
    notes: str | None = None,
    **overrides: Any,
) -> SlurmSubmission:
    """Submit every stage of the study or comparison (:class:`RunKind`, from ``config``'s class) in ``out`` that is
    neither done nor live as a Slurm job (submitit), each depending (``--dependency=afterok:...``) on the queued or
    running jobs of the stages it needs.

    A first call submits every stage; a rerun of the same call keeps the jobs that are queued or running and
    submits only the stages whose outputs are missing and whose jobs failed, were cancelled or can never start
    (queued behind a failed job: those are cancelled first, and replaced). The ``report`` stage, which needs every
    other, is submitted last. Returns as soon as the jobs are queued; ``neuralign study --status OUT`` (``neuralign
    compare --status OUT``) follows them. The jobs' resources (:class:`SlurmOptions`) and device are recorded in
    this run's entry of the manifest.

    Parameters
    ----------
    config : StudyConfig or CompareConfig
        The settings (the folder's, if it holds a run).
    out : path-like
        The run's folder.
    device : str or torch.device
        Where the jobs compute: ``"cuda"`` (one task per GPU) or ``"cpu"``.
    options : SlurmOptions, optional
        The jobs' resources; keyword ``overrides`` of the same names (``partition=``, ``time_minutes=``,
        ``gpus_per_job=``, ``cpus_per_task=``, ``memory=``, ...) replace single fields.
    paper_row, notes
        Passed to a study's report (see :func:`~neuralign.study.run_study`).

    Returns
    -------
    SlurmSubmission
        The jobs submitted, kept and replaced.

    Raises
    ------
    JobError
        Before anything is written or cancelled: if ``sbatch``, ``srun`` or ``squeue`` is not on PATH, ``squeue``
        fails, or a local job (``--executor local``) of the folder is alive. After: if ``sbatch`` fails, naming the
        jobs this call cancelled and submitted until then (all recorded in ``jobs.json``).
    CheckpointError
        If ``out`` holds a run with other settings (nothing written).
    ValueError
        For resources that contradict each other or the device (:meth:`SlurmOptions.sbatch_parameters`), a
        ``device`` that is not one, or ``paper_row`` / ``notes`` with a comparison.
    """
    kind = run_kind(config)
    report = _report_options(kind, paper_row, notes)
    legacy = {k: overrides.pop(k) for k in ("additional_parameters",) if k in overrides}
    if legacy:
        overrides.update(renamed_keywords(legacy, {"additional_parameters": "extra"}, where="submit_slurm"))
    options = resolve_options(SlurmOptions, options, overrides, where="submit_slurm")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"`device` must name a device (cuda or cpu) for the Slurm jobs, got {device!r}") from None
    parameters = options.sbatch_parameters(device)
    submitit = _submitit()
    missing = [cmd for cmd in ("sbatch", "srun", "squeue") if shutil.which(cmd) is None]
    if missing:
        listed = missing[0] if len(missing) == 1 else f"{', '.join(missing[:-1])} and {missing[-1]}"
        raise JobError(f"--executor slurm needs Slurm, and {listed} {'is' if len(missing) == 1 else 'are'} not on "
                       "PATH: submit from the cluster's login node (or use --executor local)")  # fmt: skip
    out = Path(out)
    stages = kind.stages(config)
    # every check before anything is written or cancelled: a refused command changes nothing
    if out.is_dir():
        kind.check_folder(config, out)
    survey = survey_jobs(out, stages)
    if survey.executor == "local" and survey.live:
        listed = ", ".join(f"{s} (process {survey.jobs[s]})" for s in survey.live)
        raise JobError(f"{out} still has local jobs running: {listed}; wait for them or stop their command first")
    kept = {s: survey.jobs[s] for s in survey.live} if survey.executor == "slurm" else {}
    todo = [s for s in stages if s.name not in survey.done and s.name not in kept]
    replaced = {s: survey.jobs[s] for s in survey.blocked}
    if not todo:
        logger.info("nothing to submit for %s: %d stages done, %d jobs live", out, len(survey.done), len(kept))
        return SlurmSubmission(submitted={}, kept=kept, replaced={}, done=survey.done, parameters=parameters)
    # what the folder held before this command, to put back if sbatch refuses the first job (nothing submitted)
    existed, manifest = out.exists(), out / "manifest.json"
    manifest_before = manifest.read_text() if manifest.exists() else None
    jobs_folder_existed = (out / "jobs").exists()
    with first_run(out, stages):  # a study's data is read here: a missing dataset leaves no manifest
        kind.prepare(config, out, device=device, live_jobs=True,
                     run={"executor": "slurm", "slurm": options.to_dict(), "sbatch": parameters})  # fmt: skip
    record = read_jobs(out) if survey.executor == "slurm" else {"jobs": {}, "cancelled": {}}
    jobs = dict(record["jobs"])
    cancelled = {s: j for s, j in record["cancelled"].items() if jobs.get(s) == j}
    cancel_jobs(list(replaced.values()))
    if replaced:
        logger.warning("cancelled Slurm jobs %s of %s: they waited on a failed job; submitting their stages again",
                       " ".join(replaced.values()), out)  # fmt: skip
    executor = submitit.SlurmExecutor(folder=out / "jobs" / "%j")
    submitted: dict[str, str] = {}
    for stage in todo:
        after = sorted({submitted.get(n) or kept[n] for n in stage.needs if n in submitted or n in kept}, key=int)
        executor.update_parameters(**parameters, job_name=f"neuralign {stage.name}",
                                   dependency=f"afterok:{':'.join(after)}" if after else None)  # fmt: skip
        try:
            job = executor.submit(_stage_job, kind.command, config.to_dict(), str(out), stage.name, str(device),
                                  report)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - submitit raises what sbatch said, in several exception types
            # sbatch's reason, not its closing 'Try "sbatch --help"' hint
            said = [line.strip() for line in str(exc).splitlines()
                    if line.strip() and not line.strip().startswith("Try ")]  # fmt: skip
            reason = said[-1] if said else type(exc).__name__
            if not submitted:
                _restore_folder(out, existed, manifest_before, jobs_folder_existed)
                cancelled_note = (f"; it cancelled {', '.join(replaced.values())} (queued behind a failed job) "
                                  "first" if replaced else "")  # fmt: skip
                raise JobError(f"sbatch refused the job of stage {stage.name!r}: {reason}; no job was submitted and "
                               f"{out} is as it was{cancelled_note}") from None  # fmt: skip
            done_so_far = (f"before that, this command cancelled {', '.join(replaced.values())} (queued behind a "
                           "failed job) and " if replaced else "before that, this command ")
            done_so_far += (f"submitted {len(submitted)} jobs ({', '.join(submitted.values())}; recorded in "
                            f"{out / 'jobs.json'})")  # fmt: skip
            raise JobError(f"sbatch refused the job of stage {stage.name!r}: {reason}; {done_so_far}; rerun the same "
                           "command to submit the rest") from None  # fmt: skip
        submitted[stage.name] = str(job.job_id)
        jobs[stage.name] = str(job.job_id)
        cancelled.pop(stage.name, None)
        write_jobs(out, "slurm", jobs, cancelled=cancelled)  # after every job: the record is never behind Slurm
        logger.info("submitted %s as Slurm job %s", stage.name, job.job_id)
    return SlurmSubmission(submitted=submitted, kept=kept, replaced=replaced, done=survey.done, parameters=parameters)


def _restore_folder(out: Path, existed: bool, manifest_before: str | None, jobs_folder_existed: bool) -> None:
    """Undo what preparing a Slurm submission wrote when its first ``sbatch`` is refused: a folder this command
    made is removed; otherwise the manifest is put back as it was and a ``jobs`` folder this command made (submitit's
    files of the refused job) is removed."""
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    manifest = out / "manifest.json"
    if manifest_before is None:
        manifest.unlink(missing_ok=True)
    else:
        manifest.write_text(manifest_before)
    if not jobs_folder_existed:
        shutil.rmtree(out / "jobs", ignore_errors=True)


def cancel_slurm(out: str | os.PathLike) -> dict[str, str]:
    """Cancel every queued or running Slurm job of the study or comparison in ``out`` (``scancel``) and record them
    as cancelled in ``jobs.json``, so that ``--status`` says "cancelled" for their stages; returns ``{stage: job
    id}`` of the jobs cancelled. Rerunning with ``--executor slurm`` submits those stages again.

    Raises
    ------
    ValueError
        If ``out`` holds no study or comparison.
    JobError
        If the study's jobs are local processes (they stop with the command that runs them), or ``squeue`` /
        ``scancel`` is not on PATH or fails (nothing cancelled then).
    """
    out = Path(out)
    kind, config = _recorded(out)
    survey = survey_jobs(out, kind.stages(config))
    if survey.executor == "local":
        raise JobError(f"the jobs of {out} are local processes: stop the `neuralign {kind.command} --executor local` "
                       "command that runs them (Ctrl-C)")  # fmt: skip
    if survey.unknown:
        raise JobError(f"cancelling the Slurm jobs of {out} needs squeue and scancel, and squeue is not on PATH: run "
                       "this on the cluster's login node")  # fmt: skip
    targets = {s: survey.jobs[s] for s in [*survey.live, *survey.blocked]}
    cancel_jobs(list(targets.values()))
    if targets:
        record_cancelled(out, targets)
    return targets

"""A study's stages as jobs: submitit's local executor against the sequential run, an interrupted job, Slurm's
job specification (only the ``sbatch`` command is faked), and the status of a folder."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from neuralign._utils import usable_cores
from neuralign.cli import main
from neuralign.errors import JobError
from neuralign.study import PRESETS, prepare_study, run_stage, run_study, stage_done, study_stages
from neuralign.study.jobs import job_states, process_start, write_jobs

pytest.importorskip("submitit", reason="the cluster extra (submitit) is not installed")

from neuralign.study.executors import (  # noqa: E402
    RUN_KINDS,
    SlurmOptions,
    _failure,
    _stage_job,
    job_threads,
    run_local,
    stage_status,
    submit_slurm,
)

# demo-sized: 2 end points, 2 curves, their evaluations and the report (8 stages); 3 batches per epoch
CONFIG = PRESETS["demo"].apply({
    "train.epochs": 1, "curve.epochs": 3, "evaluation.num_points": 3, "max_batches": 3,
    "evaluation.max_bn_batches": 2, "settings": ("unaligned", "aligned"), "verification": None,
    "evaluation.plane_grid": 0,
})  # fmt: skip


def _curves(results: dict) -> dict:
    return {s: {k: ev[k] for k in ("test_accuracy", "test_loss")} for s, ev in results["pairs"][0]["curves"].items()}


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> dict:
    # as many torch threads as each of 2 local jobs uses by default: float for float the same sums
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, usable_cores() // 2))
    try:
        return run_study(CONFIG, tmp_path_factory.mktemp("sequential"))
    finally:
        torch.set_num_threads(before)


def test_stage_graph_orders_dependencies():
    stages = study_stages(CONFIG)
    names = [s.name for s in stages]
    assert names[:3] == ["endpoint 1", "endpoint 2", "pair 1 alignment"] and names[-1] == "report"
    for i, stage in enumerate(stages):
        assert all(names.index(n) < i for n in stage.needs), stage
    assert stages[names.index("pair 1 eval aligned")].needs == ("pair 1 curve aligned",)


@pytest.mark.slow  # 8 jobs, each a fresh python process: ~40 s on 2 cores
def test_local_jobs_give_the_sequential_report(sequential, tmp_path):
    events = []
    results = run_local(CONFIG, tmp_path, jobs=2, poll_seconds=0.1, on_event=lambda *e: events.append(e))
    # the same stages as a sequential run, each seeded by its own name: the same numbers (CPU, same arithmetic)
    assert _curves(results) == _curves(sequential)
    assert results["pairs"][0]["endpoints"] == sequential["pairs"][0]["endpoints"]
    assert {e[0] for e in events if e[1] == "done"} == {s.name for s in study_stages(CONFIG)}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["completed"]) == {s.name for s in study_stages(CONFIG)} - {"report"}
    assert set(manifest["stage_jobs"]) == set(manifest["completed"])  # every stage records the job that ran it
    assert len(stage_status(tmp_path)["done"]) == len(study_stages(CONFIG))
    # each of the 2 jobs ran torch on its share of the cores, not on all of them (oversubscribed)
    records = [json.loads(p.read_text()) for p in (tmp_path / "stages").glob("*.json")]
    assert {r["threads"] for r in records} == {max(1, usable_cores() // 2)}
    assert manifest["runs"][-1]["threads_per_job"] == max(1, usable_cores() // 2)  # the manifest says so


@pytest.mark.slow  # two local runs of the tiny study: ~60 s on 2 cores
def test_a_killed_job_is_rerun_and_done_stages_are_not(sequential, tmp_path):
    errors: list[BaseException] = []

    def drive():
        try:
            run_local(CONFIG, tmp_path, jobs=2, poll_seconds=0.05)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    driver = threading.Thread(target=drive)
    driver.start()
    ckpt = tmp_path / "pair1" / "curve_aligned.ckpt"
    deadline = time.monotonic() + 180
    while not ckpt.exists() and driver.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ckpt.exists(), "the aligned curve never wrote its first epoch's checkpoint"
    job = json.loads((tmp_path / "jobs.json").read_text())["jobs"]["pair 1 curve aligned"]
    os.kill(int(job), signal.SIGINT)  # as LocalJob.cancel(): the controller stops the stage's process
    driver.join(300)
    assert len(errors) == 1 and isinstance(errors[0], JobError), errors
    assert "pair 1 curve aligned" in str(errors[0])
    stages = {s.name: s for s in study_stages(CONFIG)}
    assert not stage_done(tmp_path, stages["pair 1 curve aligned"])
    assert stage_done(tmp_path, stages["pair 1 curve unaligned"])  # independent of the killed stage: finished
    status = stage_status(tmp_path)
    assert ("pair 1 curve aligned", job) in status["failed"] and ("pair 1 eval aligned", None) in status["pending"]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.suffix in (".pt", ".json")
              and "jobs" not in p.parts and p.parent.name != "stages" and p.name not in ("manifest.json", "jobs.json")}
    results = run_local(CONFIG, tmp_path, jobs=2, poll_seconds=0.1)
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before  # nothing that was done is redone
    assert _curves(results) == _curves(sequential)


def _fake_slurm(folder: Path, fail_after: int | None = None) -> Path:
    """A fake ``sbatch`` that records its arguments and answers like Slurm (refusing every job after the first
    ``fail_after``), a ``squeue`` that lists nothing and an ``srun`` that submitit only looks up at submission time
    (it runs inside jobs, which never start here). For what the single-node Slurm of the slow tests
    (tests/study/test_slurm.py) cannot show: GPU jobs, and sbatch refusing a job in the middle of a submission."""
    folder.mkdir()
    log = folder / "sbatch.log"
    refuse = "" if fail_after is None else (
        f'[ "$n" -gt {100 + fail_after} ] && {{ echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2; exit 1; }}\n')
    (folder / "sbatch").write_text(
        "#!/bin/sh\n"
        f"n=$(($(wc -l < {log} 2>/dev/null || echo 0) + 101))\n"
        + refuse +
        f'echo "$@" >> {log}\n'
        'echo "Submitted batch job $n"\n'
    )  # fmt: skip
    (folder / "srun").write_text("#!/bin/sh\nexit 1\n")
    (folder / "squeue").write_text("#!/bin/sh\nexit 0\n")
    for name in ("sbatch", "srun", "squeue"):
        (folder / name).chmod((folder / name).stat().st_mode | stat.S_IEXEC)
    return log


def _script(out: Path, job: str) -> str:
    return (out / "jobs" / job / f"{job}_submission.sh").read_text()


def test_cuda_jobs_ask_one_task_per_gpu_and_record_their_resources(tmp_path, monkeypatch):
    # Only the Slurm commands are faked (scripts on PATH): submitit writes the real submission files and parses the
    # fake's answer; nothing runs. The single-node Slurm of the slow tests has no GPU, so GPU jobs are checked here.
    log = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the submitting node needs no GPU
    out = tmp_path / "study"
    sent = submit_slurm(CONFIG, out, device="cuda", gpus_per_job=4, partition="gpu", time_minutes=90,
                              cpus_per_task=8, memory="64g", account="lab", qos="high",
                              extra={"constraint": "a100", "--exclusive": ""})  # fmt: skip
    names = [s.name for s in study_stages(CONFIG)]
    assert list(sent.submitted) == names and len(log.read_text().splitlines()) == len(names)
    assert sent.kept == {} and sent.replaced == {}
    script = _script(out, sent.submitted["endpoint 1"])
    for line in ("--gpus-per-node=4", "--ntasks-per-node=4", "--cpus-per-task=8", "--mem=64G", "--partition=gpu",
                 "--time=90", "--account=lab", "--qos=high", "--constraint=a100"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script, line
    assert "#SBATCH --exclusive\n" in script and "--dependency" not in script
    assert f"#SBATCH --dependency=afterok:{sent.submitted['endpoint 1']}:{sent.submitted['endpoint 2']}" in _script(
        out, sent.submitted["pair 1 alignment"])
    # the resources are recorded in this run's entry of the manifest, with the parameters submitit was given
    run = json.loads((out / "manifest.json").read_text())["runs"][-1]
    assert run["executor"] == "slurm" and run["slurm"]["memory"] == "64G" and run["slurm"]["gpus_per_job"] == 4
    assert run["sbatch"]["gpus_per_node"] == 4 and run["sbatch"]["additional_parameters"]["exclusive"] is True


@pytest.mark.parametrize("options, device, error, match", [
    ({"memory": "4 GB"}, "cpu", ValueError, "`memory` must be an amount Slurm reads for --mem"),
    ({"memory": True}, "cpu", ValueError, "`memory` must be an amount"),
    ({"gpus_per_job": -1}, "cpu", ValueError, "`gpus_per_job` must be an int >= 0 or None, got -1"),
    ({"cpus_per_task": 0}, "cpu", ValueError, "`cpus_per_task` must be a positive int or None, got 0"),
    ({"time_minutes": 1.5}, "cpu", TypeError, "`time_minutes` must be a positive int, got float"),
    ({"partition": "a b"}, "cpu", ValueError, "`partition` must be a Slurm name without spaces, got 'a b'"),
    ({"extra": {"mem": "4G"}}, "cpu", ValueError, "`extra` holds the sbatch option 'mem', which `memory` sets"),
    ({"extra": {"dependency": "x"}}, "cpu", ValueError, "which the study .the jobs of the stages"),
    ({"extra": {"no such!": "x"}}, "cpu", ValueError, "`extra` holds 'no such!', which is not an sbatch option"),
    ({"extra": ["constraint"]}, "cpu", TypeError, "`extra` must be a dict of sbatch options, got list"),
    ({"gpus_per_job": 0}, "cuda", ValueError, "`gpus_per_job` is 0 but the jobs run on CUDA"),
    ({"gpus_per_job": 2}, "cpu", ValueError, "`gpus_per_job` is 2 but the jobs run on the CPU"),
    ({"gpus_per_job": 2, "tasks_per_job": 1}, "cuda", ValueError, "a CUDA job runs one task per GPU"),
])  # fmt: skip
def test_slurm_options_refuse_bad_values_naming_them(options, device, error, match):
    with pytest.raises(error, match=match):
        SlurmOptions(**options).sbatch_parameters(device)


def test_slurm_options_for_cpu_jobs_and_their_round_trip():
    none = SlurmOptions(gpus_per_job=0).sbatch_parameters("cpu")  # "no GPU" can be said (0 was refused before)
    assert none == {"time": 1440, "nodes": 1, "ntasks_per_node": 1}
    cpu = SlurmOptions(tasks_per_job=2, cpus_per_task=3, memory=2048, extra={"mail_type": "END"})
    assert cpu.memory == "2048" and cpu.extra == {"mail-type": "END"}  # Slurm's spelling; megabytes by default
    assert cpu.sbatch_parameters("cpu") == {"time": 1440, "nodes": 1, "ntasks_per_node": 2, "cpus_per_task": 3,
                                            "mem": "2048", "additional_parameters": {"mail-type": "END"}}  # fmt: skip
    assert SlurmOptions.from_dict(json.loads(json.dumps(cpu.to_dict()))) == cpu
    assert len({cpu, SlurmOptions.from_dict(cpu.to_dict())}) == 1  # hashable despite its dict


def test_job_threads_follow_the_allocation():
    assert job_threads({}) is None  # not in a Slurm job: torch's own choice stays
    job = {"SLURM_JOB_ID": "3"}
    assert job_threads({**job, "SLURM_CPUS_PER_TASK": "1", "SLURM_JOB_CPUS_PER_NODE": "2"}) == 1
    # no --cpus-per-task: the job's CPUs on this node shared among its tasks there ("2(x3)": 2 on each of 3 nodes)
    assert job_threads({**job, "SLURM_JOB_CPUS_PER_NODE": "2(x3)", "SLURM_TASKS_PER_NODE": "2(x3)"}) == 1
    cores = len(os.sched_getaffinity(0))
    assert job_threads({**job, "SLURM_CPUS_PER_TASK": "64"}) == min(64, cores)  # never more than the usable cores


def test_a_refused_sbatch_in_the_middle_says_what_was_submitted(tmp_path, monkeypatch):
    _fake_slurm(tmp_path / "bin", fail_after=3)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "study"
    with pytest.raises(JobError, match=r"sbatch refused the job of stage 'pair 1 curve unaligned': sbatch: error: "
                       r"QOSMaxSubmitJobPerUserLimit; before that, this command submitted 3 jobs \(101, 102, 103; "
                       r"recorded in .*jobs.json\); rerun the same command"):  # fmt: skip
        submit_slurm(CONFIG, out, device="cpu")
    assert json.loads((out / "jobs.json").read_text())["jobs"] == {
        "endpoint 1": "101", "endpoint 2": "102", "pair 1 alignment": "103"}  # fmt: skip


def test_a_refused_first_sbatch_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    # sbatch refusing the very first job (a partition that does not exist, an option it does not know): no job was
    # submitted, so the folder must be as before (no manifest locking its settings, no submitit files)
    _fake_slurm(tmp_path / "bin", fail_after=0)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "study"
    with pytest.raises(JobError, match=r"sbatch refused the job of stage 'endpoint 1': sbatch: error: "
                       r"QOSMaxSubmitJobPerUserLimit; no job was submitted and .*study is as it was$"):  # fmt: skip
        submit_slurm(CONFIG, out, device="cpu")
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(JobError, match="no job was submitted"):
        submit_slurm(CONFIG, out, device="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_slurm_options_on_the_command_line(tmp_path, monkeypatch, capsys):
    _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "s"
    base = ["study", "--preset", "demo", "--out", str(out), "--quiet"]
    cases = [  # one line each, in option words, and nothing written
        (["--executor", "slurm", "--device", "cpu", "--slurm-mem", "4GB"], "--slurm-mem must be an amount"),
        (["--executor", "slurm", "--device", "cpu", "--slurm-extra", "mem=4G"], "which --slurm-mem sets"),
        (["--executor", "slurm", "--device", "cpu", "--slurm-extra", "exclusive"], "--slurm-extra expects KEY=VALUE"),
        (["--executor", "slurm", "--device", "cpu", "--gpus-per-job", "1"], "--gpus-per-job is 1 but the jobs run"),
        (["--executor", "slurm", "--device", "cpu", "--cpus-per-task", "0"], "--cpus-per-task must be a positive"),
        (["--cpus-per-task", "2", "--slurm-mem", "1G"], "--cpus-per-task, --slurm-mem set the resources of Slurm "
                                                        "jobs: use them with --executor slurm"),
        (["--jobs", "3"], "--jobs sets how many local jobs run at once: use it with --executor local"),
        (["--executor", "slurm", "--device", "cpu", "--jobs", "3"], "use it with --executor local"),
    ]  # fmt: skip
    for extra, words in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and words in err, err
        assert not out.exists()
    assert main([*base, "--executor", "slurm", "--device", "cpu", "--gpus-per-job", "0", "--cpus-per-task", "2",
                 "--slurm-mem", "3G", "--slurm-extra", "constraint=skylake", "--slurm-extra", "exclusive="]) == 0
    jobs = json.loads((out / "jobs.json").read_text())["jobs"]
    script = _script(out, jobs["endpoint 1"])
    assert "#SBATCH --cpus-per-task=2\n" in script and "#SBATCH --mem=3G\n" in script and "gpus" not in script
    assert "#SBATCH --constraint=skylake\n" in script and "#SBATCH --exclusive\n" in script
    assert f"submitted {len(jobs)} jobs" in capsys.readouterr().err


def test_status_of_a_folder_and_the_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="holds no study"):
        stage_status(tmp_path)
    run_study(CONFIG.set("settings", ("aligned",)), tmp_path)
    assert main(["study", "--status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "done (7):" in out and "running (0):" in out and "pending (0):" in out and "  pair 1 eval aligned" in out
    assert "no jobs recorded" not in out
    # a sequential run records no jobs: a stage it computes shows as pending, and the status says why
    (tmp_path / "pair1" / "eval_aligned.json").unlink()
    assert main(["study", "--status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pending (2):" in out and "(no jobs recorded: a study run in one process" in out


# ------------------------------------------------------------------------------------------------ live jobs
def _bin(folder: Path, **scripts: str) -> Path:
    """A folder of fake commands (``name=shell body``), for PATH."""
    folder.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (folder / name).write_text("#!/bin/sh\n" + body + "\n")
        (folder / name).chmod(0o755)
    return folder


def test_a_local_job_is_its_pid_and_start_time_not_a_recycled_pid():
    me = {"executor": "local", "jobs": {"endpoint 1": str(os.getpid())}}
    assert job_states({**me, "starts": {"endpoint 1": process_start(os.getpid())}}) == {"endpoint 1": "running"}
    # the same pid with another start time: a new process took the finished job's pid
    assert job_states({**me, "starts": {"endpoint 1": "1"}}) == {}
    # ids that name no process (a hand-edited jobs.json): kill(0 or -1, 0) would succeed for a group
    for bad in ("0", "-1"):
        assert job_states({"executor": "local", "jobs": {"endpoint 1": bad}, "starts": {"endpoint 1": "1"}}) == {}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process's state from /proc (Linux)")
def test_a_local_job_that_ended_unreaped_is_not_running():
    """A job's process that has ended but whose status nobody has read yet (a zombie: its parent, the interrupted
    run, has just exited and init has not reaped it) is not running: ``--status`` said "running" for the stage of
    an interrupted local run, now and then, instead of "cancelled"."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process_start(proc.pid)
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not end"
            time.sleep(0.05)
        me = {"executor": "local", "jobs": {"endpoint 1": str(proc.pid)}, "starts": {"endpoint 1": start}}
        assert start is not None and job_states(me) == {}
    finally:
        proc.wait()


def test_every_way_of_running_refuses_a_folder_with_a_live_job(tmp_path):
    write_jobs(tmp_path, "local", {"endpoint 1": str(os.getpid())}, {"endpoint 1": process_start(os.getpid())})
    with pytest.raises(JobError, match=r"still has jobs queued or running: endpoint 1 \(job \d+, running\)"):
        run_study(CONFIG, tmp_path)  # the sequential run too, not only a second executor run
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(JobError, match="still has jobs"):
        run_local(CONFIG, tmp_path, jobs=1)


def test_a_local_job_runs_torch_with_the_threads_it_is_given_and_a_slurm_job_with_its_cpus(monkeypatch, tmp_path):
    seen = []
    fake = dataclasses.replace(RUN_KINDS["study"], run_stage=lambda *a, **k: seen.append(torch.get_num_threads()))
    monkeypatch.setitem(RUN_KINDS, "study", fake)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, None):
            torch.set_num_threads(3)
            _stage_job("study", CONFIG.to_dict(), str(tmp_path), "endpoint 1", "cpu", {}, threads)
        monkeypatch.setenv("SLURM_JOB_ID", "7")
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
        _stage_job("study", CONFIG.to_dict(), str(tmp_path), "endpoint 1", "cpu", {})  # a Slurm job: its CPUs
        # a local job inside a Slurm allocation (salloc): the threads it is given, not the allocation's CPUs per task
        _stage_job("study", CONFIG.to_dict(), str(tmp_path), "endpoint 1", "cpu", {}, 2)
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2, 3, 1, 2]


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_local_jobs_refuse_a_thread_count_below_one_or_not_an_int(threads, tmp_path):
    with pytest.raises((ValueError, TypeError), match="threads"):
        run_local(CONFIG, tmp_path, jobs=2, threads=threads)
    assert not (tmp_path / "manifest.json").exists()


def test_a_local_job_killed_by_a_signal_says_so():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    proc.kill()
    proc.wait()
    job = SimpleNamespace(_process=proc, result=lambda: None)
    assert _failure(job) == "its process was killed by signal 9 (SIGKILL)"


def test_a_failed_job_is_reported_by_its_exception_not_its_log_path():
    """submitit's FailedJobError quotes the job's traceback between dashed rules and then names its log files; the
    reason reported is the traceback's last line (it was the .out log's path)."""
    from submitit.core.utils import FailedJobError

    trace = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
             "ValueError: REPAIR folds its shift into the bias of blocks.0.attn.q, which has none (bias=False)")
    message = (f"Job (task=0) failed during processing with trace:\n----------------------\n{trace}\n"
               "----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n"
               "  - /tmp/jobs/1_0_log.err\n  - /tmp/jobs/1_0_log.out")

    def fail():
        raise FailedJobError(message)

    job = SimpleNamespace(_process=None, result=fail)
    assert _failure(job) == ("ValueError: REPAIR folds its shift into the bias of blocks.0.attn.q, which has none "
                             "(bias=False)")


def test_executors_are_refused_under_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, lines in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        assert main(["study", "--preset", "demo", "--executor", "local", "--out", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == lines and (lines == 0 or "not under torchrun" in err)
    assert not (tmp_path / "s").exists()


def test_slurm_without_slurm_or_with_device_auto_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(_bin(tmp_path / "bin")))  # no sbatch, no srun
    out = tmp_path / "s"
    for device, words in (("cpu", "sbatch, srun and squeue are not on PATH"),
                          ("auto", "--device cuda or --device cpu")):  # fmt: skip
        assert main(["study", "--preset", "demo", "--executor", "slurm", "--device", device, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and words in err, err
        assert not out.exists()
    _fake_slurm(tmp_path / "slurm")
    monkeypatch.setenv("PATH", f"{tmp_path / 'slurm'}{os.pathsep}{os.environ['PATH']}")
    assert main(["study", "--preset", "demo", "--executor", "slurm", "--slurm-time", "0", "--out", str(out)]) == 2
    assert "--slurm-time must be a positive int, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["{not json", json.dumps({"command": "train"})])
def test_status_of_a_folder_whose_manifest_is_not_a_study(tmp_path, capsys, text):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match="holds no study .*manifest.json is"):
        stage_status(tmp_path)
    assert main(["study", "--status", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "holds no study" in err


ONE = CONFIG.set("settings", ("aligned",))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A study folder with its manifest and its two end points done (the later stages' jobs are faked)."""
    out = tmp_path_factory.mktemp("prepared")
    prepare_study(ONE, out)
    for name in ("endpoint 1", "endpoint 2"):
        run_stage(ONE, out, name)
    return out


def _squeue_listing(tmp_path: Path, monkeypatch, listing: list[str], *, also: Path | None = None) -> Path:
    """Fake ``squeue`` (answering ``listing``) and ``scancel`` (logging its arguments) on PATH, before the folder
    ``also`` (e.g. of a fake sbatch) and nothing else; returns the log."""
    log = tmp_path / "scancel.log"
    log.unlink(missing_ok=True)
    squeue = "printf '" + "".join(line + "\\n" for line in listing) + "'"
    folder = _bin(tmp_path / "bin", squeue=squeue, scancel=f'echo "$@" >> {log}')
    monkeypatch.setenv("PATH", os.pathsep.join(str(p) for p in (folder, also) if p is not None))
    return log


def test_slurm_status_files_first_then_squeue_blocked_and_failed(prepared, tmp_path, monkeypatch, capsys):
    # Fakes squeue for a state that a real Slurm shows only for a moment: a job still "PENDING Dependency" although a
    # job it waits on has failed (Slurm marks it DependencyNeverSatisfied at its next scheduling pass).
    out = tmp_path / "study"
    subprocess.run(["cp", "-r", str(prepared), str(out)], check=True)
    names = [s.name for s in study_stages(ONE)]
    assert names == ["endpoint 1", "endpoint 2", "pair 1 alignment", "pair 1 curve aligned", "pair 1 eval aligned",
                     "pair 1 midpoint alignment", "report"]  # fmt: skip
    jobs = {n: str(101 + i) for i, n in enumerate(names)}
    write_jobs(out, "slurm", jobs)
    # 1. the alignment's job is running: every later job can still start; endpoint 1's job is still listed
    # (completing) but its outputs exist: done
    log = _squeue_listing(tmp_path, monkeypatch, [f"{jobs['endpoint 1']} COMPLETING None", "103 RUNNING None"] +
                          [f"{jobs[n]} PENDING Dependency" for n in names[3:]])  # fmt: skip
    status = stage_status(out)
    assert status["done"] == [("endpoint 1", None), ("endpoint 2", None)]
    assert status["running"] == [("pair 1 alignment", "103")]
    assert status["pending"] == [(n, jobs[n]) for n in names[3:]]
    # a run in this process is refused and changes nothing: no job cancelled, no manifest entry
    manifest = (out / "manifest.json").read_text()
    with pytest.raises(JobError, match=r"still has jobs queued or running: pair 1 alignment \(job 103, running\), "
                       r".*cancel them \(neuralign study --cancel .*\) or rerun it with --executor slurm"):  # fmt: skip
        run_study(ONE, out)
    assert not log.exists() and (out / "manifest.json").read_text() == manifest
    # 2. the alignment's job failed (gone, no outputs): the curve's job is marked, the later ones wait on it
    log = _squeue_listing(tmp_path, monkeypatch, [f"{jobs[names[3]]} PENDING DependencyNeverSatisfied"] +
                          [f"{jobs[n]} PENDING Dependency" for n in names[4:]])  # fmt: skip
    status = stage_status(out)
    assert status["failed"] == [("pair 1 alignment", "103")]
    assert status["blocked"] == [(n, jobs[n]) for n in names[3:]]  # waiting on the failed job: never to start
    assert status["pending"] == []
    assert main(["study", "--status", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "blocked (4):" in shown and "scancel 104 105 106 107" in shown and "--executor slurm" in shown
    # without a live job, a run in this process cancels the jobs that can never start (recorded), then runs
    results = run_study(ONE, out)
    assert log.read_text().split() == [jobs[n] for n in names[3:]]
    assert json.loads((out / "jobs.json").read_text())["cancelled"] == {n: jobs[n] for n in names[3:]}
    assert results["pairs"][0]["curves"]["aligned"]["test_accuracy"]
    # 3. without squeue: said so, not taken for alive
    out2 = tmp_path / "study2"
    shutil.copytree(prepared, out2)
    write_jobs(out2, "slurm", jobs)
    monkeypatch.setenv("PATH", str(_bin(tmp_path / "empty")))
    assert [n for n, _ in stage_status(out2)["unknown"]] == names[2:]
    with pytest.raises(JobError, match="`squeue` is not on PATH"):
        run_study(ONE, out2)
    assert main(["study", "--status", str(out2)]) == 0
    assert "squeue is not on PATH" in capsys.readouterr().out


def test_slurm_rerun_keeps_live_jobs_and_replaces_those_that_can_never_start(prepared, tmp_path, monkeypatch):
    # The state of step 2 above, but with the curve's job still able to start (its alignment job running): a rerun
    # with --executor slurm keeps every live job and submits nothing for them. Then the alignment job fails: the rerun
    # cancels the jobs waiting on it and submits those stages again, each after the jobs it needs.
    out = tmp_path / "study"
    subprocess.run(["cp", "-r", str(prepared), str(out)], check=True)
    names = [s.name for s in study_stages(ONE)]
    jobs = {n: str(101 + i) for i, n in enumerate(names)}
    write_jobs(out, "slurm", jobs)
    sbatch = _fake_slurm(tmp_path / "slurm")
    live = ["103 RUNNING None"] + [f"{jobs[n]} PENDING Dependency" for n in names[3:]]
    log = _squeue_listing(tmp_path, monkeypatch, live, also=tmp_path / "slurm")
    sent = submit_slurm(ONE, out, device="cpu")
    assert sent.submitted == {} and sent.replaced == {} and sent.kept == {n: jobs[n] for n in names[2:]}
    assert sent.done == ("endpoint 1", "endpoint 2") and not sbatch.exists() and not log.exists()
    # the alignment's job has failed: everything after it is replaced, in graph order, each after the new jobs
    log = _squeue_listing(tmp_path, monkeypatch, live[1:], also=tmp_path / "slurm")
    sent = submit_slurm(ONE, out, device="cpu")
    assert sent.kept == {} and sent.replaced == {n: jobs[n] for n in names[3:]}
    assert list(sent.submitted) == names[2:] and log.read_text().split() == [jobs[n] for n in names[3:]]
    new = sent.submitted
    assert f"--dependency=afterok:{new['pair 1 alignment']}\n" in _script(out, new["pair 1 curve aligned"])
    assert json.loads((out / "jobs.json").read_text())["jobs"] == {**jobs, **new}


def _alive(pid: int) -> bool:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line[stat_line.rfind(")") + 2] != "Z"  # a zombie has ended, its parent has not read its status


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a command started with `&` by a non-interactive shell


def _default_sigint() -> None:
    # as in a terminal's foreground command, whatever the test runner inherited: a pytest started with `&` by a
    # non-interactive shell ignores SIGINT, and so did the study it started (Ctrl-C then did nothing: a timeout)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the run's processes from /proc (Linux)")
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_an_interrupted_local_run_stops_its_jobs_and_says_cancelled(tmp_path, how):
    # a new-user trial: Ctrl-C printed submitit's traceback after the command's line and --status said "failed";
    # SIGTERM left the stage's process running. Either now stops every process of the run, in one line
    out = tmp_path / "study"
    # the end points in seconds, then a curve that would take minutes: interrupted once a stage is done (a first
    # run interrupted before that leaves no manifest, as a failed one)
    command = [sys.executable, "-m", "neuralign", "study", "--preset", "demo", "--set", "train.epochs=1",
               "--set", "max_batches=2", "--set", "curve.epochs=500", "--executor", "local", "--jobs", "1",
               "--threads", "1", "--quiet", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_ignore_sigint if how == "sigterm" else _default_sigint)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        job = None
        while job is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if (out / "jobs.json").exists():
                job = json.loads((out / "jobs.json").read_text())["jobs"].get("pair 1 curve unaligned")
        assert job is not None, "no job was started"
        time.sleep(3)  # the stage's process is training
        task = [int(c) for c in Path(f"/proc/{job}/task/{job}/children").read_text().split()]
        assert task, "the job's controller has no task"
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches every process of the foreground group
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == (143 if how == "sigterm" else 130), err
        assert err.strip() == "neuralign: interrupted; run the same command again to resume from the checkpoints", err
        for pid in (int(job), *task):
            assert not _alive(pid), f"process {pid} of the run is still alive"
        status = stage_status(out)
        assert ("pair 1 curve unaligned", job) in status["cancelled"] and status["failed"] == [], status
    finally:  # whatever failed above, no process of the run outlives the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

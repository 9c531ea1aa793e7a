"""A study's stages as jobs: submitit's local executor against the sequential run, an interrupted job, Slurm's
job specification (only the ``sbatch`` command is faked), and the status of a folder."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from neuralign.cli import main
from neuralign.errors import JobError
from neuralign.study import PRESETS, prepare_study, run_stage, run_study, stage_done, study_stages
from neuralign.study.jobs import job_states, process_start, write_jobs

pytest.importorskip("submitit", reason="the cluster extra (submitit) is not installed")

from neuralign.study.executors import _failure, run_study_local, study_status, submit_study_slurm  # noqa: E402

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
    return run_study(CONFIG, tmp_path_factory.mktemp("sequential"))


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
    results = run_study_local(CONFIG, tmp_path, jobs=2, poll_seconds=0.1, on_event=lambda *e: events.append(e))
    # the same stages as a sequential run, each seeded by its own name: the same numbers (CPU, same arithmetic)
    assert _curves(results) == _curves(sequential)
    assert results["pairs"][0]["endpoints"] == sequential["pairs"][0]["endpoints"]
    assert {e[0] for e in events if e[1] == "done"} == {s.name for s in study_stages(CONFIG)}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["completed"]) == {s.name for s in study_stages(CONFIG)} - {"report"}
    assert set(manifest["stage_jobs"]) == set(manifest["completed"])  # every stage records the job that ran it
    assert len(study_status(tmp_path)["done"]) == len(study_stages(CONFIG))


@pytest.mark.slow  # two local runs of the tiny study: ~60 s on 2 cores
def test_a_killed_job_is_rerun_and_done_stages_are_not(sequential, tmp_path):
    errors: list[BaseException] = []

    def drive():
        try:
            run_study_local(CONFIG, tmp_path, jobs=2, poll_seconds=0.05)
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
    status = study_status(tmp_path)
    assert ("pair 1 curve aligned", job) in status["failed"] and ("pair 1 eval aligned", None) in status["pending"]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.suffix in (".pt", ".json")
              and "jobs" not in p.parts and p.parent.name != "stages" and p.name not in ("manifest.json", "jobs.json")}
    results = run_study_local(CONFIG, tmp_path, jobs=2, poll_seconds=0.1)
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before  # nothing that was done is redone
    assert _curves(results) == _curves(sequential)


def _fake_slurm(folder: Path) -> Path:
    """A fake ``sbatch`` that records its arguments and answers like Slurm, and an ``srun`` that submitit only looks
    up at submission time (it runs inside jobs, which never start here)."""
    folder.mkdir()
    log = folder / "sbatch.log"
    (folder / "sbatch").write_text(
        "#!/bin/sh\n"
        f"n=$(($(wc -l < {log} 2>/dev/null || echo 0) + 101))\n"
        f'echo "$@" >> {log}\n'
        'echo "Submitted batch job $n"\n'
    )
    (folder / "srun").write_text("#!/bin/sh\nexit 1\n")
    for name in ("sbatch", "srun"):
        (folder / name).chmod((folder / name).stat().st_mode | stat.S_IEXEC)
    return log


def test_slurm_submission_specifies_dependencies_partition_time_and_gpus(tmp_path, monkeypatch):
    # Only the `sbatch` command is faked (a script on PATH): submitit writes the real submission files and parses
    # the fake's answer; nothing runs.
    log = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "study"
    jobs = submit_study_slurm(CONFIG, out, device="cpu", partition="gpu", time_minutes=90, gpus_per_job=1)
    names = [s.name for s in study_stages(CONFIG)]
    assert list(jobs) == names and len(log.read_text().splitlines()) == len(names)
    scripts = {stage: (out / "jobs" / job / f"{job}_submission.sh").read_text() for stage, job in jobs.items()}
    assert "#SBATCH --partition=gpu" in scripts["endpoint 1"] and "#SBATCH --time=90" in scripts["endpoint 1"]
    assert "--dependency" not in scripts["endpoint 1"]
    assert f"#SBATCH --dependency=afterok:{jobs['endpoint 1']}:{jobs['endpoint 2']}" in scripts["pair 1 alignment"]
    assert f"#SBATCH --dependency=afterok:{jobs['pair 1 curve aligned']}" in scripts["pair 1 eval aligned"]
    assert scripts["report"].count(":") >= len(names) - 1  # the report waits for every other job
    recorded = json.loads((out / "jobs.json").read_text())
    assert recorded["executor"] == "slurm" and recorded["jobs"] == jobs


def test_slurm_gpus_per_job_ask_one_task_per_gpu(tmp_path, monkeypatch):
    _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the submitting node needs no GPU
    jobs = submit_study_slurm(CONFIG, tmp_path / "study", device="cuda", gpus_per_job=4)
    job = jobs["endpoint 1"]
    script = (tmp_path / "study" / "jobs" / job / f"{job}_submission.sh").read_text()
    assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --ntasks-per-node=4" in script


def test_status_of_a_folder_and_the_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="holds no study"):
        study_status(tmp_path)
    run_study(CONFIG.set("settings", ("aligned",)), tmp_path)
    assert main(["study", "--status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "done (7):" in out and "running (0):" in out and "pending (0):" in out and "  pair 1 eval aligned" in out


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


def test_every_way_of_running_refuses_a_folder_with_a_live_job(tmp_path):
    write_jobs(tmp_path, "local", {"endpoint 1": str(os.getpid())}, {"endpoint 1": process_start(os.getpid())})
    with pytest.raises(JobError, match=r"still has jobs queued or running: endpoint 1 \(job \d+, running\)"):
        run_study(CONFIG, tmp_path)  # the sequential run too, not only a second executor run
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(JobError, match="still has jobs"):
        run_study_local(CONFIG, tmp_path, jobs=1)


def test_a_local_job_killed_by_a_signal_says_so():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    proc.kill()
    proc.wait()
    job = SimpleNamespace(_process=proc, result=lambda: None)
    assert _failure(job) == "its process was killed by signal 9 (SIGKILL)"


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
    for device, words in (("cpu", "sbatch and srun is not on PATH"), ("auto", "--device cuda or --device cpu")):
        assert main(["study", "--preset", "demo", "--executor", "slurm", "--device", device, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and words in err, err
        assert not out.exists()
    _fake_slurm(tmp_path / "slurm")
    monkeypatch.setenv("PATH", f"{tmp_path / 'slurm'}{os.pathsep}{os.environ['PATH']}")
    assert main(["study", "--preset", "demo", "--executor", "slurm", "--slurm-time", "0", "--out", str(out)]) == 2
    assert "--slurm-time must be an int >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["{not json", json.dumps({"command": "train"})])
def test_status_of_a_folder_whose_manifest_is_not_a_study(tmp_path, capsys, text):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match="holds no study .*manifest.json is"):
        study_status(tmp_path)
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


def test_slurm_status_files_first_then_squeue_blocked_and_failed(prepared, tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    subprocess.run(["cp", "-r", str(prepared), str(out)], check=True)
    names = [s.name for s in study_stages(ONE)]
    assert names[:5] == ["endpoint 1", "endpoint 2", "pair 1 alignment", "pair 1 curve aligned",
                         "pair 1 eval aligned"] and names[-1] == "report"  # fmt: skip
    # endpoint 1's job is still listed (completing) but its outputs exist: done; the alignment's job failed (gone,
    # no outputs); the curve's job waits on it forever; the later ones are queued
    jobs = {n: str(101 + i) for i, n in enumerate(names)}
    write_jobs(out, "slurm", jobs)
    listing = [f"{jobs['endpoint 1']} COMPLETING None", f"{jobs[names[3]]} PENDING DependencyNeverSatisfied"]
    listing += [f"{jobs[n]} PENDING Dependency" for n in names[4:]]
    log = tmp_path / "scancel.log"
    squeue = "printf '" + "".join(line + "\\n" for line in listing) + "'"
    monkeypatch.setenv("PATH", str(_bin(tmp_path / "bin", squeue=squeue, scancel=f'echo "$@" >> {log}')))
    status = study_status(out)
    assert status["done"] == [("endpoint 1", None), ("endpoint 2", None)]
    assert status["failed"] == [("pair 1 alignment", jobs["pair 1 alignment"])]
    assert status["blocked"] == [("pair 1 curve aligned", jobs["pair 1 curve aligned"])]
    assert status["pending"] == [(n, jobs[n]) for n in names[4:]]
    assert main(["study", "--status", str(out)]) == 0
    assert f"scancel {jobs['pair 1 curve aligned']}" in capsys.readouterr().out
    # rerunning cancels the job that can never start; the queued ones still refuse the rerun
    with pytest.raises(JobError, match=r"still has jobs queued or running: pair 1 eval aligned \(job 105, pending\)"):
        run_study(ONE, out)  # the end points are done: their jobs are not asked about
    assert log.read_text().split() == [jobs["pair 1 curve aligned"]]
    # without squeue: said so, not taken for alive
    monkeypatch.setenv("PATH", str(_bin(tmp_path / "empty")))
    assert [n for n, _ in study_status(out)["unknown"]] == names[2:]
    with pytest.raises(JobError, match="`squeue` is not on PATH"):
        run_study(ONE, out)
    assert main(["study", "--status", str(out)]) == 0
    assert "squeue is not on PATH" in capsys.readouterr().out

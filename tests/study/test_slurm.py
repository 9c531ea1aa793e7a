"""The study on a real Slurm: a single-node cluster on this machine (``tools/slurm_local.sh up``: Debian's
``slurm-wlm`` with ``munge``, ``slurmctld`` and ``slurmd`` on localhost, the machine's CPUs and memory).

The demo study, made small (every kind of stage, 15 jobs), runs through ``neuralign study --executor slurm`` end to
end and equals the sequential run (every float of ``results.json``); two independent stages run at the same time when
each job asks for one CPU and part of the memory; a job killed in the middle of its stage is recovered by one rerun
while another job of the study is still queued; a branch blocked behind a cancelled job is resubmitted while another
job runs; ``--cancel`` stops the study and ``--status`` says so; a stage data-parallel over the 2 tasks of a Slurm job
(and under torchrun inside a Slurm job) equals the one-process stage. ``--status`` is checked at each step. A
comparison (``neuralign compare --executor slurm``, every kind of its stages, verification included) equals its
sequential run.

Slow: ``pytest -m slow tests/study/test_slurm.py`` (about 6 minutes on 2 cores). The module brings the cluster up
(installing the packages if missing, which needs root and apt) and down again if it started it; without it, every
test is skipped with the script's reason. GPU jobs, which this cluster cannot run, are checked on their submission
scripts in test_executors.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import torch

pytest.importorskip("submitit", reason="the cluster extra (submitit) is not installed")

from neuralign.alignment import load_permutation_file  # noqa: E402
from neuralign.cli import main  # noqa: E402
from neuralign.study import PRESETS, study_stages  # noqa: E402
from neuralign.study.compare import CompareConfig, compare_stages  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "slurm_local.sh"
SLURM_DIR = Path(os.environ.get("NEURALIGN_SLURM_DIR", "/tmp/neuralign-slurm"))

# The demo study made small: every kind of stage (end points, alignment, four curves, their evaluations, midpoint
# alignment, verification, plane, report: 15 jobs), about 18 s of stages in one process on one thread. The
# verification takes ~8 s (stability's PAM from the identity and five random starts besides the alignment), long
# enough for a test to kill its job mid-stage
TINY = {
    "train.epochs": 2, "curve.epochs": 2, "pam.x_epochs": 1, "max_batches": 3, "evaluation.num_points": 3,
    "evaluation.plane_grid": 3, "evaluation.max_bn_batches": 2, "verification.n_swaps": 2,
    "verification.swap_trials": 2, "verification.screen_pairs": 8, "verification.screen_examples": 32,
    "verification.n_control_swaps": 1, "verification.certificate_steps": 2, "verification.value_batches": 2,
    "verification.gradient_batches": 1, "verification.identity_start": True, "verification.random_starts": 5,
}  # fmt: skip
SETS = [arg for path, value in TINY.items() for arg in ("--set", f"{path}={value}")]
STUDY = ["study", "--preset", "demo", *SETS, "--quiet"]
# one CPU and 1 GB per job: two jobs fit the 2-CPU node side by side
SLURM = ["--executor", "slurm", "--device", "cpu", "--cpus-per-task", "1", "--slurm-mem", "1G"]
CONFIG = PRESETS["demo"].apply(TINY)
STAGES = study_stages(CONFIG)


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def slurm() -> Path:
    """The single-node cluster of tools/slurm_local.sh (brought up, and down at the end if this module started it);
    ``SLURM_CONF`` points the Slurm commands (and the jobs) at it."""
    if shutil.which("bash") is None:
        pytest.skip("tools/slurm_local.sh needs bash")
    status = subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True)
    already = "slurmctld: running" in status.stdout and "slurmd: running" in status.stdout
    up = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, timeout=900)
    if up.returncode != 0:
        reason = (up.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"no single-node Slurm here: tools/slurm_local.sh up failed ({reason})")
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")
    try:
        yield SLURM_DIR / "slurm.conf"
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        if not already:
            down = subprocess.run([str(SCRIPT), "down"], capture_output=True, text=True, timeout=120)
            assert down.returncode == 0, down.stderr


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> Path:
    """The same study run sequentially by the command line, on one thread as each job (one CPU per task)."""
    out = tmp_path_factory.mktemp("sequential")
    run = subprocess.run([sys.executable, "-m", "neuralign", *STUDY, "--threads", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def neuralign(*args: str) -> tuple[int, str, str]:
    """``neuralign ARGS`` in this process: exit status, standard output, standard error."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(list(args))
    return code, stdout.getvalue(), stderr.getvalue()


def status_of(out: Path, command: str = "study") -> dict[str, dict[str, str | None]]:
    """``neuralign COMMAND --status OUT``, parsed: state -> {stage: job id or None}."""
    code, text, err = neuralign(command, "--status", str(out))
    assert code == 0, err
    states: dict[str, dict[str, str | None]] = {}
    state = None
    for line in text.splitlines():
        header = re.fullmatch(r"(\w+) \((\d+)\):", line)
        entry = re.fullmatch(r"  (\S.*?)(?:  \[job (\d+)\])?", line)
        if header:
            state = header.group(1)
            states[state] = {}
        elif entry and state is not None and not line.startswith("  ->"):
            states[state][entry.group(1)] = entry.group(2)
    return states


def squeue(jobs: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Stage -> (state, reason) of the study's jobs that Slurm still lists."""
    listing = subprocess.run(["squeue", "-h", "-o", "%i %T %r"], capture_output=True, text=True, check=True).stdout
    by_id = {parts[0]: (parts[1], parts[2]) for parts in (line.split(maxsplit=2) for line in listing.splitlines())}
    return {stage: by_id[job] for stage, job in jobs.items() if job in by_id}


def jobs_of(out: Path) -> dict[str, str]:
    return json.loads((out / "jobs.json").read_text())["jobs"]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 300.0) -> float:
    """Poll ``condition`` every 0.2 s; returns the seconds waited, fails after ``timeout``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"waited {timeout:.0f} s for {what}"
        time.sleep(0.2)
    return time.monotonic() - start


def wait_until_done(out: Path, timeout: float = 600.0) -> int:
    """Wait until no job of the study in ``out`` is queued or running; returns the most jobs seen running at once."""
    most = 0

    def finished() -> bool:
        nonlocal most
        listed = squeue(jobs_of(out))
        most = max(most, sum(state == "RUNNING" for state, _ in listed.values()))
        return not listed

    wait_for(finished, f"the jobs of {out}", timeout)
    return most


def same_results(out: Path, sequential: Path) -> None:
    """results.json equal to the sequential run's, every float (the same stages, each seeded by its name alone, on
    one thread: the same arithmetic)."""
    got, want = (json.loads((p / "results.json").read_text()) for p in (out, sequential))
    assert got == want


def stage_records(out: Path) -> dict[str, dict]:
    return {s.name: json.loads((out / "stages" / f"{s.slug}.json").read_text()) for s in STAGES if s.name != "report"}


def independent(a: str, b: str) -> bool:
    """Neither stage needs the other, directly or through other stages."""
    needs = {s.name: set(s.needs) for s in STAGES}

    def reaches(x: str, y: str) -> bool:
        return y in needs[x] or any(reaches(n, y) for n in needs[x])

    return a != b and not reaches(a, b) and not reaches(b, a)


def jobcomp_times(job_ids: set[str]) -> dict[str, tuple[datetime, datetime]]:
    """Start and end of finished jobs, as Slurm's job completion log records them (one-second resolution)."""
    times = {}
    for line in (SLURM_DIR / "log" / "jobcomp.log").read_text().splitlines():
        match = re.search(r"JobId=(\d+) .*StartTime=(\S+) EndTime=(\S+)", line)
        if match and match.group(1) in job_ids:
            start, end = (datetime.fromisoformat(t) for t in match.group(2, 3))
            times[match.group(1)] = (start, end)
    return times


# ------------------------------------------------------------------------------------------------ tests
def test_the_demo_study_on_slurm_equals_the_sequential_run_with_stages_side_by_side(slurm, sequential, tmp_path):
    out = tmp_path / "study"
    code, _, err = neuralign(*STUDY, *SLURM, "--out", str(out))
    assert code == 0, err
    assert f"submitted {len(STAGES)} jobs" in err
    jobs = jobs_of(out)
    assert list(jobs) == [s.name for s in STAGES]
    # each job asks Slurm for one CPU and 1 GB, and Slurm holds it to that
    listing = subprocess.run(["squeue", "-h", "-o", "%i %C %m"], capture_output=True, text=True).stdout.split("\n")
    asked = {parts[0]: parts[1:] for parts in (line.split() for line in listing) if parts}
    assert asked and all(asked[j] == ["1", "1G"] for j in jobs.values() if j in asked), asked
    states = status_of(out)
    assert sum(len(states[k]) for k in ("done", "running", "pending")) == len(STAGES)
    most = wait_until_done(out)
    assert status_of(out)["done"].keys() == {s.name for s in STAGES}
    same_results(out, sequential)
    manifest = json.loads((out / "manifest.json").read_text())
    run = manifest["runs"][-1]
    assert run["executor"] == "slurm" and run["slurm"]["cpus_per_task"] == 1 and run["slurm"]["memory"] == "1G"
    assert run["sbatch"]["mem"] == "1G" and "finished" in run  # the report job closed the run
    records = stage_records(out)
    # torch inside every job used the job's one CPU per task (SLURM_CPUS_PER_TASK), whatever the node has
    assert {name: r["threads"] for name, r in records.items()} == {name: 1 for name in records}
    assert {name: r["job_id"] for name, r in records.items()} == {n: j for n, j in jobs.items() if n != "report"}
    # two independent stages ran at the same time: their stage records (wall clock, in the jobs) overlap, and so do
    # their jobs in Slurm's completion log; squeue showed two jobs running at once
    overlapping = [(a, b) for a in records for b in records if a < b and independent(a, b)
                   and records[a]["started_unix"] < records[b]["finished_unix"]
                   and records[b]["started_unix"] < records[a]["finished_unix"]]  # fmt: skip
    assert overlapping, {n: (r["started_unix"], r["finished_unix"]) for n, r in records.items()}
    times = jobcomp_times(set(jobs.values()))
    a, b = max(overlapping, key=lambda p: min(records[p[0]]["finished_unix"], records[p[1]]["finished_unix"])
               - max(records[p[0]]["started_unix"], records[p[1]]["started_unix"]))  # the longest overlap
    (start_a, end_a), (start_b, end_b) = times[jobs[a]], times[jobs[b]]
    assert start_a < end_b and start_b < end_a, (a, b, times[jobs[a]], times[jobs[b]])
    assert most >= 2


def test_a_job_killed_mid_stage_is_recovered_by_one_rerun_while_another_job_waits(slurm, sequential, tmp_path):
    out = tmp_path / "study"
    code, _, err = neuralign(*STUDY, *SLURM, "--out", str(out))
    assert code == 0, err
    jobs = jobs_of(out)
    # the plane's job is held in the queue: a job of the study that is still queued when the killed stage's rerun
    # comes (it needs the aligned curve, as the verification does; it does not need the verification)
    subprocess.run(["scontrol", "hold", jobs["pair 1 plane"]], check=True)
    verification = jobs["pair 1 verification"]
    wait_for(lambda: squeue(jobs).get("pair 1 verification", ("",))[0] == "RUNNING", "the verification job")
    time.sleep(6)  # its process has started the stage (~3 s to start python and torch; the stage takes ~8 s)
    subprocess.run(["scancel", verification], check=True)
    wait_for(lambda: "pair 1 verification" not in squeue(jobs), "the killed job to end", 60)
    assert not (out / "pair1" / "verification.json").exists()  # killed before the stage wrote its outputs
    assert not (out / "stages" / "pair_1_verification.json").exists()
    states = status_of(out)
    assert states["failed"] == {"pair 1 verification": verification}
    assert states["blocked"] == {"report": jobs["report"]}  # it waited on the killed job
    assert states["pending"] == {"pair 1 plane": jobs["pair 1 plane"]}
    # one rerun of the same command: the queued plane job is kept, the verification resubmitted, the report replaced
    code, _, err = neuralign(*STUDY, *SLURM, "--out", str(out))
    assert code == 0, err
    assert f"pair 1 plane: Slurm job {jobs['pair 1 plane']} is queued or running, kept" in err
    assert f"report: cancelled Slurm job {jobs['report']}" in err and "submitted 2 jobs" in err
    new = jobs_of(out)
    assert new["pair 1 plane"] == jobs["pair 1 plane"] and new["pair 1 verification"] != verification
    assert squeue({"plane": jobs["pair 1 plane"]})["plane"][0] == "PENDING"  # not cancelled by the rerun
    shown = subprocess.run(["scontrol", "show", "job", new["report"]], capture_output=True, text=True).stdout
    depends = re.search(r"Dependency=(\S+)", shown).group(1)
    assert jobs["pair 1 plane"] in depends and new["pair 1 verification"] in depends  # on the live jobs
    states = status_of(out)
    assert set(states["pending"]) | set(states["running"]) == {"pair 1 plane", "pair 1 verification", "report"}
    subprocess.run(["scontrol", "release", jobs["pair 1 plane"]], check=True)
    wait_until_done(out)
    assert status_of(out)["done"].keys() == {s.name for s in STAGES}
    same_results(out, sequential)
    assert len(json.loads((out / "manifest.json").read_text())["runs"]) == 2


def test_a_blocked_branch_is_resubmitted_while_another_job_runs(slurm, sequential, tmp_path):
    out = tmp_path / "study"
    code, _, err = neuralign(*STUDY, *SLURM, "--out", str(out))
    assert code == 0, err
    jobs = jobs_of(out)
    # the PAM unaligned curve's job is cancelled while it waits for the alignment: the jobs after it can never start
    subprocess.run(["scancel", jobs["pair 1 curve pam_unaligned"]], check=True)
    # rerun while the verification (which does not need that curve) runs
    wait_for(lambda: squeue(jobs).get("pair 1 verification", ("",))[0] == "RUNNING", "the verification job")
    states = status_of(out)
    assert states["failed"] == {"pair 1 curve pam_unaligned": jobs["pair 1 curve pam_unaligned"]}
    assert states["blocked"] == {n: jobs[n] for n in ("pair 1 eval pam_unaligned", "report")}
    assert states["running"]["pair 1 verification"] == jobs["pair 1 verification"]
    code, _, err = neuralign(*STUDY, *SLURM, "--out", str(out))
    assert code == 0, err
    assert f"pair 1 verification: Slurm job {jobs['pair 1 verification']} is queued or running, kept" in err
    assert squeue(jobs)["pair 1 verification"][0] == "RUNNING"  # the rerun did not touch the running job
    new = jobs_of(out)
    resubmitted = {n for n in new if new[n] != jobs[n]}
    assert resubmitted == {"pair 1 curve pam_unaligned", "pair 1 eval pam_unaligned", "report"}
    assert "submitted 3 jobs" in err
    wait_until_done(out)
    assert status_of(out)["done"].keys() == {s.name for s in STAGES}
    same_results(out, sequential)


def test_cancel_stops_the_study_and_a_refused_rerun_changes_nothing(slurm, tmp_path):
    out = tmp_path / "study"
    code, _, err = neuralign(*STUDY, *SLURM, "--out", str(out))
    assert code == 0, err
    jobs = jobs_of(out)
    before = (squeue(jobs), (out / "jobs.json").read_text(), (out / "manifest.json").read_text())
    # a rerun with other settings is refused before anything: no job cancelled or submitted, no file written
    code, _, err = neuralign(*STUDY, *SLURM, "--set", "seed=1", "--out", str(out))
    assert code == 2 and "holds a study with other settings: seed 0 (now 1)" in err
    now = (squeue(jobs), (out / "jobs.json").read_text(), (out / "manifest.json").read_text())
    assert now[1:] == before[1:] and set(now[0]) <= set(before[0])  # (jobs may have finished meanwhile)
    assert len(now[0]) >= len(STAGES) - 3
    code, text, err = neuralign("study", "--cancel", str(out))
    assert code == 0, err
    cancelled = dict(re.findall(r"^(.+): cancelled Slurm job (\d+)$", text, re.MULTILINE))
    assert cancelled and cancelled.items() <= jobs.items()
    wait_for(lambda: not squeue(jobs), "the cancelled jobs to leave the queue", 60)
    states = status_of(out)
    # said as cancelled, not failed; a running job may still finish its stage in the seconds Slurm leaves it between
    # SIGTERM and SIGKILL (KillWait): that stage is done
    stopped = {stage: job for stage, job in cancelled.items() if stage not in states["done"]}
    assert stopped and states["cancelled"] == stopped and "failed" not in states
    assert set(states["done"]) | set(stopped) == {s.name for s in STAGES}
    # the next run submits the cancelled stages again
    code, _, err = neuralign(*STUDY, *SLURM, "--out", str(out))
    assert code == 0 and f"submitted {len(stopped)} jobs" in err
    assert "cancelled" not in status_of(out)
    code, text, _ = neuralign("study", "--cancel", str(out))
    assert code == 0 and re.search(r"cancelled \d+ jobs", text)
    wait_for(lambda: not squeue(jobs_of(out)), "the cancelled jobs to leave the queue", 60)


def _without(source: Path, out: Path, stages: list[str]) -> None:
    """A copy of the finished study ``source`` whose ``stages`` (and report) are not done."""
    shutil.copytree(source, out)
    by_name = {s.name: s for s in STAGES}
    for name in [*stages, "report"]:
        for output in by_name[name].outputs:
            (out / output).unlink()
        (out / "stages" / f"{by_name[name].slug}.json").unlink(missing_ok=True)


def _same_evaluation(got_path: Path, want_path: Path) -> None:
    # as tests/test_distributed.py requires of evaluate_curve with batch norm: whole batches round-robin, so every
    # batch statistic is one process's; accuracies equal, float32 losses summed in float64 in another order to 1e-6
    got, want = (json.loads(p.read_text()) for p in (got_path, want_path))
    assert got["test_accuracy"] == want["test_accuracy"]
    torch.testing.assert_close(torch.tensor(got["test_loss"]), torch.tensor(want["test_loss"]), rtol=0, atol=1e-6)


def test_a_stage_data_parallel_over_two_tasks_equals_one_process(slurm, sequential, tmp_path):
    # the alignment and the aligned curve's evaluation, each as a Slurm job of 2 tasks (gloo, one CPU each)
    out = tmp_path / "study"
    _without(sequential, out, ["pair 1 alignment", "pair 1 eval aligned"])
    code, _, err = neuralign(*STUDY, *SLURM, "--tasks-per-job", "2", "--out", str(out))
    assert code == 0, err
    assert list(jobs_of(out)) == ["pair 1 alignment", "pair 1 eval aligned", "report"]
    wait_until_done(out)
    assert status_of(out)["done"].keys() == {s.name for s in STAGES}
    records = stage_records(out)
    for name in ("pair 1 alignment", "pair 1 eval aligned"):
        assert records[name]["distributed"]["world_size"] == 2 and records[name]["distributed"]["backend"] == "gloo"
        assert records[name]["threads"] == 1
    got, want = (load_permutation_file(p / "pair1" / "alignment.pt") for p in (out, sequential))
    for group, perm in want.perms.items():
        assert torch.equal(got.perms[group], perm), group
    # the correlations are per-batch float32 sums (over every position of a conv layer's 16x16 maps) merged in
    # float64: each rank sums half of every batch, which rounds differently in float32 (measured 2e-5 on the first
    # conv layer; the MLP of tests/test_distributed.py, with one value per example, agrees to 1e-6)
    for group, value in want.results["correlation_after"].items():
        assert abs(got.results["correlation_after"][group] - value) < 1e-4, group
    _same_evaluation(out / "pair1" / "eval_aligned.json", sequential / "pair1" / "eval_aligned.json")
    # torchrun inside a Slurm job: one task with 2 CPUs, 2 processes; the sequential command runs data-parallel
    out2 = tmp_path / "torchrun"
    _without(sequential, out2, ["pair 1 eval aligned"])
    command = " ".join([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "neuralign", *STUDY, "--threads", "1", "--out", str(out2)])  # fmt: skip
    run = subprocess.run(["sbatch", "--wait", "--ntasks=1", "--cpus-per-task=2", "--mem=2G", "--job-name=torchrun",
                          f"--output={tmp_path / 'torchrun.log'}", f"--wrap={command}"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
    record = json.loads((out2 / "stages" / "pair_1_eval_aligned.json").read_text())
    assert record["distributed"]["world_size"] == 2 and record["job_id"]  # in a Slurm job
    _same_evaluation(out2 / "pair1" / "eval_aligned.json", sequential / "pair1" / "eval_aligned.json")


# A comparison made small: tiny MLPs on the shipped digits, 2 methods, Bezier curves and their verification (every
# kind of compare stage: 2 end points, then per method alignment, evaluation, curve, verification; the report: 11 jobs)
COMPARE_SETTINGS = {
    "model.hidden": "16,16", "data.resize": "none", "data.train_size": 512, "data.test_size": 128, "train.epochs": 1,
    "max_batches": 2, "protocol.max_bn_batches": 2, "protocol.num_points": 3, "curve.epochs": 1,
    "verification.n_swaps": 1, "verification.swap_trials": 1, "verification.screen_pairs": 4,
    "verification.screen_examples": 16, "verification.n_control_swaps": 1, "verification.certificate_steps": 1,
    "verification.value_batches": 2, "verification.gradient_batches": 1, "verification.stability_iters": 1,
    "verification.random_starts": 0, "verification.value_ts": "0.5,", "verification.gradient_check_examples": 2,
}  # fmt: skip
COMPARE = ["compare", "--quiet", "--pairs", "1", "--methods", "identity", "weight", "--arch", "mlp", "--verify",
           *(arg for path, value in COMPARE_SETTINGS.items() for arg in ("--set", f"{path}={value}"))]  # fmt: skip


def _numbers(out: Path) -> dict:
    """A comparison's results.json without the methods' wall seconds (a cost measured, not computed)."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("seconds", "wall_seconds")}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return strip(json.loads((out / "results.json").read_text()))


def test_a_comparison_on_slurm_equals_its_sequential_run(slurm, tmp_path):
    sequential = tmp_path / "sequential"
    run = subprocess.run([sys.executable, "-m", "neuralign", *COMPARE, "--threads", "1", "--out", str(sequential)],
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "compare"
    code, _, err = neuralign(*COMPARE, *SLURM, "--out", str(out))
    assert code == 0, err
    config = CompareConfig.from_dict(json.loads((out / "manifest.json").read_text())["config"])
    names = [s.name for s in compare_stages(config)]
    assert len(names) == 11 and f"submitted 11 jobs; follow them with: neuralign compare --status {out}" in err
    jobs = jobs_of(out)
    assert list(jobs) == names
    states = status_of(out, "compare")
    assert sum(len(states[k]) for k in ("done", "running", "pending")) == len(names)
    wait_until_done(out)
    assert list(status_of(out, "compare")["done"]) == names
    assert _numbers(out) == _numbers(sequential)
    verdicts = {m: v["verification"]["verdict"] for m, v in _numbers(out)["pairs"][0]["methods"].items()}
    assert set(verdicts) == {"identity", "weight"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "compare_manifest" and manifest["runs"][-1]["executor"] == "slurm"
    assert "finished" in manifest["runs"][-1]  # the report job closed the run
    assert manifest["stage_jobs"] == {n: j for n, j in jobs.items() if n != "report"}
    # a rerun submits nothing: every stage is done
    code, _, err = neuralign(*COMPARE, *SLURM, "--out", str(out))
    assert code == 0 and "nothing to submit: 11 stages done, 0 jobs queued or running" in err

"""``neuralign compare`` through the study's executors: each stage run on its own (as a job runs it) and the local
executor give the sequential run's numbers, Slurm submission (only ``sbatch`` faked) with the stages' dependencies,
``--status`` and ``--cancel`` on a comparison folder, and live jobs refused in the comparison's words. The real
Slurm run is in tests/study/test_slurm.py."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from neuralign.cli import main
from neuralign.errors import JobError
from neuralign.study.compare import (
    COMPARE_PRESETS,
    compare_stages,
    prepare_compare,
    run_compare,
    run_compare_stage,
)
from neuralign.study.jobs import process_start, write_jobs
from tests.study.test_executors import _bin

pytest.importorskip("submitit", reason="the cluster extra (submitit) is not installed")

from neuralign.study.executors import cancel_slurm, run_local, stage_status, submit_slurm  # noqa: E402

# demo-sized: 2 pairs (4 end points), 3 methods, their evaluations and the report: 4 + 2 * 3 * 2 + 1 = 17 stages
SETTINGS = {
    "train.epochs": 1, "max_batches": 2, "data.train_size": 256, "data.test_size": 128,
    "protocol.max_bn_batches": 2, "protocol.num_points": 3, "methods": ("identity", "weight", "correlation"),
}  # fmt: skip
CONFIG = COMPARE_PRESETS["demo"]
for _path, _value in SETTINGS.items():
    CONFIG = CONFIG.set(_path, _value)
SETS = [a for path, value in SETTINGS.items() if path != "methods" for a in ("--set", f"{path}={value}")]
COMMAND = ["compare", "--quiet", "--methods", *CONFIG.methods, *SETS]


def numbers(results: dict) -> dict:
    """``results.json`` without what differs between two runs of the same stages: wall seconds."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("seconds", "wall_seconds")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(results)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sequential")
    run_compare(CONFIG, out)
    return json.loads((out / "results.json").read_text())


def test_each_stage_on_its_own_gives_the_sequential_numbers(sequential, tmp_path):
    # every stage in a process state of its own (a fresh runner per stage, as in a job), in another order that
    # respects the dependencies (pair 2 before pair 1, the methods reversed): the same numbers, float for float
    stages = compare_stages(CONFIG)
    later = [s for k in (2, 1) for s in reversed(stages) if s.index == k and s.kind in ("alignment", "eval")]
    order = [s for s in stages if s.kind == "endpoint"]
    order += [s for s in later if s.kind == "alignment"] + [s for s in later if s.kind == "eval"] + [stages[-1]]
    assert sorted(s.name for s in order) == sorted(s.name for s in stages)
    prepare_compare(CONFIG, tmp_path)
    for stage in order:
        assert run_compare_stage(CONFIG, tmp_path, stage.name)
    assert not run_compare_stage(CONFIG, tmp_path, "pair 1 eval weight")  # done: not run again
    results = json.loads((tmp_path / "results.json").read_text())
    assert numbers(results) == numbers(sequential)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["stage_seconds"]) == {s.name for s in stages[:-1]} and "finished" in manifest["runs"][-1]
    with pytest.raises(ValueError, match="unknown comparison stage 'pair 3 eval weight'"):
        run_compare_stage(CONFIG, tmp_path, "pair 3 eval weight")
    fresh = tmp_path / "fresh"
    prepare_compare(CONFIG, fresh)
    with pytest.raises(RuntimeError, match=r"needs \['endpoint 1', 'endpoint 2'\], which are not done"):
        run_compare_stage(CONFIG, fresh, "pair 1 align weight")


@pytest.mark.slow  # 17 jobs, each a fresh python process: ~70 s on 2 cores
def test_local_jobs_give_the_sequential_numbers(sequential, tmp_path):
    events = []
    # each job with as many torch threads as the sequential run: float for float the same sums
    results = run_local(CONFIG, tmp_path, jobs=2, threads=torch.get_num_threads(), poll_seconds=0.1,
                        on_event=lambda *e: events.append(e))  # fmt: skip
    assert numbers(json.loads((tmp_path / "results.json").read_text())) == numbers(sequential)
    assert results["report"] == str(tmp_path / "report.md")
    names = {s.name for s in compare_stages(CONFIG)}
    assert {e[0] for e in events if e[1] == "done"} == names and not [e for e in events if e[1] == "failed"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["stage_jobs"]) == names - {"report"}  # every stage records the job that ran it
    assert len(set(manifest["stage_jobs"].values())) == len(names) - 1  # one job per stage
    assert [n for n, _ in stage_status(tmp_path)["done"]] == [s.name for s in compare_stages(CONFIG)]
    # a rerun finds everything done: only the report runs again, nothing else is rewritten
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("pair*/*")}
    run_local(CONFIG, tmp_path, jobs=2, poll_seconds=0.1)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("pair*/*")} == before


def test_slurm_submission_of_a_comparison_with_its_dependencies(tmp_path, monkeypatch, capsys):
    # only the Slurm commands are faked: submitit writes the real submission files and pickles the real job; nothing
    # runs. Every stage is one job, each after the jobs of the stages it needs, the report after all of them.
    log = tmp_path / "sbatch.log"
    sbatch = (f"n=$(($(wc -l < {log} 2>/dev/null || echo 0) + 101))\n"
              f'echo "$@" >> {log}\necho "Submitted batch job $n"')  # fmt: skip
    fakes = _bin(tmp_path / "bin", sbatch=sbatch, srun="exit 1", squeue="exit 0")
    monkeypatch.setenv("PATH", os.pathsep.join((str(fakes), os.environ["PATH"])))  # the fakes first
    out = tmp_path / "cmp"
    assert main([*COMMAND, "--out", str(out), "--executor", "slurm", "--device", "cpu", "--cpus-per-task", "1",
                 "--slurm-mem", "1G"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    stages = compare_stages(CONFIG)
    assert f"submitted {len(stages)} jobs; follow them with: neuralign compare --status {out}" in err
    jobs = json.loads((out / "jobs.json").read_text())["jobs"]
    assert list(jobs) == [s.name for s in stages]

    def script(stage: str) -> str:
        return (out / "jobs" / jobs[stage] / f"{jobs[stage]}_submission.sh").read_text()

    for stage in stages:
        after = re.search(r"#SBATCH --dependency=afterok:([0-9:]+)\n", script(stage.name))
        assert sorted(after.group(1).split(":") if after else []) == sorted(jobs[n] for n in stage.needs), stage
    assert "#SBATCH --cpus-per-task=1\n" in script("report") and "#SBATCH --mem=1G\n" in script("report")
    # the pickled call is the comparison's stage job: its kind, settings and stage
    with open(out / "jobs" / jobs["pair 1 eval weight"] / f"{jobs['pair 1 eval weight']}_submitted.pkl", "rb") as f:
        call = pickle.load(f)
    assert call.args[0] == "compare" and call.args[3] == "pair 1 eval weight" and call.args[5] == {}
    assert call.args[1] == CONFIG.to_dict()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "compare_manifest" and manifest["runs"][-1]["executor"] == "slurm"
    assert manifest["runs"][-1]["sbatch"]["mem"] == "1G"
    # other settings are refused before anything is written or submitted
    with pytest.raises(Exception, match=r"holds a comparison with other settings: protocol.num_points 3 \(now 5\)"):
        submit_slurm(CONFIG.set("protocol.num_points", 5), out, device="cpu")
    assert len(log.read_text().splitlines()) == len(stages)


def test_status_and_cancel_of_a_comparison_folder(sequential, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    with pytest.raises(ValueError, match="holds no study or comparison \\(no manifest.json\\)"):
        stage_status(out)
    prepare_compare(CONFIG, out)
    for name in ("endpoint 1", "endpoint 2"):
        run_compare_stage(CONFIG, out, name)
    stages = [s.name for s in compare_stages(CONFIG)]
    jobs = {n: str(101 + i) for i, n in enumerate(stages)}
    write_jobs(out, "slurm", jobs)
    # end points 1 and 2 done, 3 and 4 running, every later stage queued behind them
    listing = ["103 RUNNING None", "104 RUNNING None", *(f"{jobs[n]} PENDING Dependency" for n in stages[4:])]
    log = tmp_path / "scancel.log"
    squeue = "printf '" + "".join(line + "\\n" for line in listing) + "'"
    monkeypatch.setenv("PATH", str(_bin(tmp_path / "bin", squeue=squeue, scancel=f'echo "$@" >> {log}')))
    assert main(["compare", "--status", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "done (2):\n  endpoint 1\n  endpoint 2\n" in shown
    assert "running (2):\n  endpoint 3  [job 103]\n  endpoint 4  [job 104]\n" in shown
    assert f"pending ({len(stages) - 4}):" in shown and not (Path.cwd() / "neuralign-compare").exists()
    # a run in this process is refused in the comparison's words, changing nothing
    manifest = (out / "manifest.json").read_text()
    with pytest.raises(JobError, match=r"still has jobs queued or running: endpoint 3 \(job 103, running\).*"
                       r"cancel them \(neuralign compare --cancel .*\) or rerun it with --executor slurm"):  # fmt: skip
        run_compare(CONFIG, out)
    assert (out / "manifest.json").read_text() == manifest and not log.exists()
    assert main(["compare", "--cancel", str(out)]) == 0
    assert f"cancelled {len(stages) - 2} jobs of {out}; rerun the comparison to submit them again" in (
        capsys.readouterr().out)  # fmt: skip
    assert log.read_text().split() == [jobs[n] for n in stages[2:]]
    # Slurm no longer lists them: --status says cancelled (not failed), and the hint names the comparison
    monkeypatch.setenv("PATH", str(_bin(tmp_path / "bin", squeue="exit 0")))
    assert main(["compare", "--status", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"cancelled ({len(stages) - 2}):" in shown and "\nfailed (" not in shown
    assert "rerun the comparison to submit them again" in shown
    # local jobs are stopped by their command, not by --cancel
    local = tmp_path / "local"
    shutil.copytree(out, local)
    write_jobs(local, "local", {"endpoint 3": str(os.getpid())}, {"endpoint 3": process_start(os.getpid())})
    with pytest.raises(JobError, match="stop the `neuralign compare --executor local` command"):
        cancel_slurm(local)
    with pytest.raises(JobError, match="still has jobs queued or running: endpoint 3"):
        run_local(CONFIG, local, jobs=1)

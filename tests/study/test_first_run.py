"""A first run that fails before it has produced anything leaves no manifest (one rule, in
:meth:`RunFolder.first_run`), for the study and for the comparison; a folder with an earlier run, or a run that has
done a stage, keeps its manifest."""

from __future__ import annotations

import json

import pytest

from neuralign.cli import main
from neuralign.experiments.runfolder import RunFolder
from neuralign.study import PRESETS, run_study
from neuralign.study.compare import COMPARE_PRESETS, run_compare


def test_the_rule(tmp_path):
    folder = RunFolder(tmp_path)
    with pytest.raises(KeyError), folder.first_run(started=lambda: False):
        folder.save({"options": {"data": "nosuch"}})
        raise KeyError("nosuch")
    assert folder.manifest() is None
    # a run that has produced something keeps its manifest
    with pytest.raises(KeyError), folder.first_run(started=lambda: True):
        folder.save({"options": {"data": "digits"}})
        raise KeyError("interrupted")
    assert folder.manifest() == {"options": {"data": "digits"}}
    # not the first run: the manifest of the earlier one stays, whatever this one did to it
    with pytest.raises(KeyError), folder.first_run(started=lambda: False):
        folder.save({"options": {"data": "digits"}, "runs": 2})
        raise KeyError("nosuch")
    assert folder.manifest() == {"options": {"data": "digits"}, "runs": 2}


def test_a_study_that_fails_on_its_data_leaves_no_manifest(tmp_path, capsys):
    out = tmp_path / "study"
    with pytest.raises(ValueError, match="unknown dataset .nosuch."):
        run_study(PRESETS["demo"].set("data.dataset", "nosuch"), out)
    assert not (out / "manifest.json").exists()
    # the corrected command is not refused for "other settings": it fails on its own missing file
    command = ["study", "--preset", "demo", "--out", str(out), "--quiet", "--data", str(tmp_path / "none.npz")]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "none.npz" in err and "other settings" not in err and not (out / "manifest.json").exists()


def test_a_comparison_that_fails_on_its_data_leaves_no_manifest_and_one_that_ran_keeps_it(tmp_path):
    out = tmp_path / "cmp"
    config = COMPARE_PRESETS["demo"].set("pairs", 1).set("data.dataset", "nosuch")
    with pytest.raises(ValueError, match="unknown dataset .nosuch."):
        run_compare(config, out)
    assert not (out / "manifest.json").exists()
    # a comparison whose end points are done, then stopped by an error, keeps its manifest (it is resumable)
    config = COMPARE_PRESETS["demo"].set("pairs", 1).set("methods", ("identity",))
    for path, value in {"train.epochs": 1, "max_batches": 2, "data.train_size": 128, "data.test_size": 64}.items():
        config = config.set(path, value)
    (out / "pair1").mkdir(parents=True)
    (out / "pair1" / "align_identity.pt").write_text("not a permutation file")  # the stage after the end points
    with pytest.raises(Exception, match="align_identity.pt"):
        run_compare(config, out)
    assert (out / "endpoints" / "seed2.pt").exists()
    assert json.loads((out / "manifest.json").read_text())["kind"] == "compare_manifest"


@pytest.mark.parametrize(
    "command", [["compare"], ["study", "--preset", "demo"], ["train", "--arch", "tinyten", "--data", "digits"]]
)
def test_an_out_that_is_a_file_is_named_in_one_line(tmp_path, capsys, command):
    # a new-user trial: `--out` naming a file gave "[Errno 20] Not a directory: .../manifest.json"
    out = tmp_path / "results.txt"
    out.write_text("mine")
    with pytest.raises(NotADirectoryError, match="results.txt is a file"):
        RunFolder(out)
    assert main([*command, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"neuralign: error: {out} is a file: the run's outputs go to a folder (choose another --out)\n"
    assert out.read_text() == "mine"

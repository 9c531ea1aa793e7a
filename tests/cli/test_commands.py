import json
import subprocess
import sys
import warnings

import pytest
import torch

from neuralign._utils import load_checkpoint
from neuralign.cli import build_parser, main
from tests.conftest import FullDisk

TINY = ["--set", "train.epochs=1", "--set", "curve.epochs=1", "--set", "pam.x_epochs=1",
        "--set", "evaluation.num_points=3", "--set", "evaluation.plane_grid=3", "--set", "verification.n_swaps=2",
        "--set", "verification.swap_trials=2", "--set", "max_batches=3",
        "--set", "evaluation.max_bn_batches=2"]  # fmt: skip
DATA = ["--data", "digits", "--resize", "16", "--train-size", "256", "--test-size", "128", "--quiet"]


def test_every_command_has_help_that_explains_its_options(capsys):
    parser = build_parser()
    commands = ["demo", "study", "train", "align", "apply", "curve", "pam", "verify", "evaluate"]
    for cmd in commands:
        with pytest.raises(SystemExit) as info:
            parser.parse_args([cmd, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert "--out" in text and "--device" in text and "--seed" in text, cmd
        for action in parser._subparsers._group_actions[0].choices[cmd]._actions:
            assert action.help, f"{cmd} {action.option_strings} has no help"


def test_version_and_study_settings_in_help_come_from_the_code(capsys):
    import neuralign
    from neuralign._options import setting_paths
    from neuralign.study import StudyConfig

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"neuralign {neuralign.__version__}"
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    listed = text.split("study settings (--set PATH=VALUE): ", 1)[1].split(", ")
    assert listed == setting_paths(StudyConfig)
    assert {"pam.step.lr", "verification.value_ts", "verification.swap_trials", "robust.attack.eps"} <= set(listed)
    from neuralign.study import PRESETS

    def resolves(config, path):
        try:
            for part in path.split("."):
                config = getattr(config, part)
        except AttributeError:
            return False
        return True

    # every listed path exists: in the paper preset (linearised P-step, verification) or a robust one (Birkhoff
    # P-step of the cpu preset for pam.step's other fields)
    configs = (PRESETS["paper"], PRESETS["robust"], PRESETS["cpu"])
    assert [p for p in listed if not any(resolves(c, p) for c in configs)] == []


def test_python_m_neuralign_runs_the_same_command_line():
    out = subprocess.run([sys.executable, "-m", "neuralign", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "study" in out.stdout


def test_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    code = main(["align", "--model-a", str(tmp_path / "missing.pt"), "--model-b", str(tmp_path / "b.pt"),
                 "--data", "digits", "--out", str(tmp_path), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("neuralign: error: checkpoint") and "does not exist" in err
    assert len(err.splitlines()) == 1
    code = main(["demo", "--out", str(tmp_path / "d"), "--set", "nonsense=1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "unknown setting 'nonsense': StudyConfig has no 'nonsense'" in err
    code = main(["train", "--arch", "tinyten", "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("neuralign: error:") and len(err.splitlines()) == 1


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("neuralign: error: "), err
    return err


def test_a_full_disk_during_train_is_one_line_keeps_the_last_checkpoint_and_a_rerun_resumes(
    tmp_path, capsys, monkeypatch
):
    """The disk fills up while `train` saves the checkpoint of epoch 2 (torch.save writes into a file that takes 4 kB
    more): one line, exit 2, the checkpoint of epoch 1 intact; the same command then resumes from it."""
    out = tmp_path / "run"
    command = ["train", "--arch", "tinyten", "--epochs", "2", "--seed", "3", "--out", str(out), *DATA]
    ckpt, endpoint = out / "tinyten_seed3.ckpt", out / "tinyten_seed3.pt"
    real_save = torch.save

    def save_on_a_disk_that_fills(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("kind") == "train_model" and obj["data"]["epoch"] == 2:
            f = FullDisk(f, room=4096)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_disk_that_fills)
    assert main(command) == 2
    err = _one_error_line(capsys)
    assert err == f"neuralign: error: could not write {str(ckpt)!r}: No space left on device"
    monkeypatch.undo()
    saved = load_checkpoint(ckpt, kind="train_model")["data"]
    assert saved["epoch"] == 1 and len(saved["history"]) == 1
    assert not endpoint.exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    assert main(command) == 0  # without -v, one line says that it resumes
    assert f"resuming train from epoch 1 of 2 ({ckpt})" in capsys.readouterr().err.splitlines()
    state = torch.load(endpoint, weights_only=True)
    assert len(state["history"]) == 2 and not ckpt.exists()
    assert state["history"][0] == saved["history"][0]  # epoch 1 was not run again: its wall-clock time is the same
    # and the resumed run ends where an uninterrupted one does
    assert main([*command[:-len(DATA)], "--out", str(tmp_path / "straight"), *DATA]) == 0
    straight = torch.load(tmp_path / "straight" / "tinyten_seed3.pt", weights_only=True)
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(state["state_dict"][key], value, rtol=0, atol=0)


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where --out wants a folder")
    code = main(["align", "--model-a", "a.pt", "--model-b", "b.pt", "--data", "digits", "--out",
                 str(blocker / "out"), "--quiet"])  # fmt: skip
    err = _one_error_line(capsys)
    assert code == 2
    manifest = blocker / "out" / "manifest_align.json"
    assert err.startswith(f"neuralign: error: could not write {str(manifest)!r}: ")
    assert err.endswith((f"Not a directory: {str(blocker / 'out')!r}", f"File exists: {str(blocker)!r}")), err


class Payload:
    """A custom class, pickled by torch.save into a file that is not a plain tensor checkpoint."""

    def __init__(self) -> None:
        self.value = 1


def test_a_pickled_object_is_refused_in_one_line_without_advice_to_unpickle(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"kind": "endpoint", "arch": "tinyten", "state_dict": Payload()}, evil)
    code = main(["align", "--model-a", str(evil), "--model-b", str(evil), "--data", "digits", "--out",
                 str(tmp_path / "out"), "--quiet"])  # fmt: skip
    err = _one_error_line(capsys)
    assert code == 2
    assert err == (
        f"neuralign: error: checkpoint {str(evil)!r} could not be read as data: it is not a plain tensor checkpoint "
        "(it holds the Python object tests.cli.test_commands.Payload); neuralign only loads tensor data"
    )
    assert "weights_only" not in err


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("endpoints")
    for seed in (1, 2):
        assert main(["train", "--arch", "tinyten", "--epochs", "1", "--seed", str(seed), "--out", str(folder),
                     *DATA]) == 0  # fmt: skip
    return folder / "tinyten_seed1.pt", folder / "tinyten_seed2.pt"


def test_pam_command_takes_the_p_step_schedules(endpoints, tmp_path, capsys):
    """`neuralign pam` offers the schedules the study has (a reviewer found it lacked them); an option of the other
    P-step is refused rather than ignored."""
    a, b = endpoints
    pair = ["--model-a", str(a), "--model-b", str(b), *DATA, "--epochs", "1"]
    assert main(["pam", *pair, "--method", "birkhoff", "--birkhoff-steps", "2", "--birkhoff-lr", "1.0",
                 "--birkhoff-samples", "2", "--value-batches", "2", "--gradient-batches", "1",
                 "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    options = json.loads((tmp_path / "b" / "pam.json").read_text())["options"]["pam"]
    assert (options["step"]["steps"], options["step"]["samples"], options["value_batches"]) == (2, 2, 2)
    assert main(["pam", *pair, "--max-moved", "0.1", "--p-steps", "2", "--value-batches", "2",
                 "--out", str(tmp_path / "l")]) == 0  # fmt: skip
    changed = json.loads((tmp_path / "l" / "pam.json").read_text())["changed"]
    sizes = {g: len(p) for g, p in torch.load(tmp_path / "l" / "perms.pt", weights_only=True)["perms"].items()}
    for g, moved in changed.items():  # at most 10 % of a group per P-step, two P-steps
        assert moved[0] <= 2 * int(0.1 * sizes[g]) + 2, (g, moved, sizes[g])
    capsys.readouterr()
    # given at all (even at its default) with the other method: refused, as every bad option, with status 2
    for extra, words in ((["--method", "birkhoff", "--max-moved", "0.1"], "--max-moved apply to --method linearized"),
                         (["--method", "birkhoff", "--p-steps", "1"], "--p-steps apply to --method linearized"),
                         (["--birkhoff-samples", "32"], "--birkhoff-samples apply to --method birkhoff")):
        assert main(["pam", *pair, *extra, "--out", str(tmp_path / "x")]) == 2
        assert words in capsys.readouterr().err
    # the same folder asked for another schedule: refused, naming the options in the command's words, not taken as
    # done; a rerun with the same options is
    assert main(["pam", *pair, "--max-moved", "0.2", "--p-steps", "2", "--value-batches", "2",
                 "--out", str(tmp_path / "l")]) == 2  # fmt: skip
    assert "made with other options: --max-moved 0.1 (now 0.2); --force redoes it" in capsys.readouterr().err
    assert main(["pam", *pair, "--max-moved", "0.1", "--p-steps", "2", "--value-batches", "2",
                 "--out", str(tmp_path / "l")]) == 0  # fmt: skip
    assert "pam already done" in capsys.readouterr().err


def test_train_align_curve_pam_evaluate_verify_pipeline(endpoints, tmp_path, capsys):
    a, b = endpoints
    state = torch.load(a, weights_only=True)
    assert state["kind"] == "endpoint" and state["arch"] == "tinyten" and len(state["history"]) == 1
    pair = ["--model-a", str(a), "--model-b", str(b), *DATA]
    capsys.readouterr()
    assert main(["align", *pair, "--out", str(tmp_path / "al")]) == 0
    table = capsys.readouterr().err.splitlines()
    assert table[0].split() == ["group", "units", "corr", "before", "corr", "after"]
    manifest = json.loads((tmp_path / "al" / "manifest_align.json").read_text())
    assert manifest["arguments"]["method"] == "correlation" and manifest["versions"]["torch"] == torch.__version__
    summary = json.loads((tmp_path / "al" / "alignment.json").read_text())
    assert set(summary["correlation_after"]) == set(summary["groups"])
    assert [line.split()[0] for line in table[1:]] == summary["groups"]
    for line, g in zip(table[1:], summary["groups"]):  # the table prints what alignment.json holds, to 4 places
        assert line.split()[1:] == [str(summary["sizes"][g]), f"{summary['correlation_before'][g]:.4f}",
                                    f"{summary['correlation_after'][g]:.4f}"]  # fmt: skip
    perms = str(tmp_path / "al" / "alignment.pt")
    assert main(["curve", *pair, "--perms", perms, "--epochs", "1", "--out", str(tmp_path / "c")]) == 0
    assert main(["pam", *pair, "--init", perms, "--epochs", "1", "--out", str(tmp_path / "p")]) == 0
    pam = json.loads((tmp_path / "p" / "pam.json").read_text())
    assert len(pam["objective"]) == 2
    err = capsys.readouterr().err.splitlines()
    head = next(i for i, line in enumerate(err) if line.startswith("iteration"))
    assert err[head].split() == ["iteration", "objective", "units", "changed", "backtracks"]
    assert err[head + 1].split() == ["0", "(start)", f"{pam['objective'][0]:.6g}"]
    moved = sum(c[0] for c in pam["changed"].values())
    assert err[head + 2].split()[:3] == ["1", f"{pam['objective'][1]:.6g}", f"{moved}/{sum(summary['sizes'].values())}"]
    assert main(["evaluate", "--model-a", str(a), "--curve", str(tmp_path / "c" / "curve.pt"), *DATA,
                 "--num-points", "3", "--bn-batches", "1", "--out", str(tmp_path / "e")]) == 0  # fmt: skip
    import re

    cost = re.search(r"evaluate: about ([\d,]+) forward passes of batch \d+ \(3 points x \(1 batch-norm \+ (\d+) "
                     r"test batches\)\) at \d+ ms each \(measured\): expect about \d+ s", capsys.readouterr().err)
    assert cost and int(cost.group(1).replace(",", "")) == 3 * (1 + int(cost.group(2)))
    ev = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert ev["t"] == [0.0, 0.5, 1.0]
    # 512 training images: two held-out batches of 256, the fewest the certificate's paired test takes
    assert main(["verify", *pair, "--train-size", "512", "--perms", perms, "--curve", str(tmp_path / "c" / "curve.pt"),
                 "--checks", "certificate", "gradient", "--out", str(tmp_path / "v")]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert re.search(r"verify: about [\d,]+ forward passes .*certificate [\d,]+, gradient 62\)", captured.err)
    report = json.loads((tmp_path / "v" / "verification.json").read_text())
    assert set(report["checks"]) == {"certificate", "gradient"}
    out = captured.out.split()
    assert str(tmp_path / "v" / "verification.md") in out


def test_demo_runs_end_to_end_with_a_tiny_budget_and_resumes(tmp_path, capsys):
    folder = tmp_path / "demo"
    assert main(["demo", "--out", str(folder), "--quiet", *TINY]) == 0
    captured = capsys.readouterr()
    printed = captured.out.split()
    assert "time per stage (s):" in captured.err and "pair 1 alignment" in captured.err and "total" in captured.err
    report = folder / "report.md"
    assert printed[0] == str(report)
    text = report.read_text()
    assert "| Aligned |" in text and "figures/curve_metrics.png" in text
    results = json.loads((folder / "results.json").read_text())
    assert results["settings"] == ["unaligned", "pam_unaligned", "pam_aligned", "aligned"]
    # every curve starts at end point A and batch norm is re-estimated on the same batches everywhere: the four
    # curves score A identically (they differed by up to half a point when each curve drew its own batches)
    at_a = {s: ev["test_accuracy"][0] for s, ev in results["pairs"][0]["curves"].items()}
    assert len(set(at_a.values())) == 1, at_a
    n = results["test_images"]
    assert n == 360 and results["bn_batches"] == {"count": 2, "shared": True}  # 360: the shipped digits' test split
    assert f"Test set: {n} images, so one image is {100 / n:.2g} points" in text
    assert "Batch norm re-estimated on the same 2 training batches at every t and on every curve." in text
    assert results["pairs"][0]["verification"]["kind"] == "verification_report"
    for name in ("curve_metrics", "layer_correlation", "reassignment", "plane", "verification", "midpoint_alignment",
                 "learning_speed"):  # fmt: skip
        assert (folder / "figures" / f"{name}.png").stat().st_size > 1000
    # alignment along the curve (issue #12 item 2) and the train histories of every curve (item 3)
    mid = results["pairs"][0]["midpoint_alignment"]
    assert set(mid["cases"]) == {"aligned", "unaligned", "linear"} and mid["t"] == 0.5
    assert "## Alignment along the curve" in text and "## Learning speed" in text
    assert "midpoint is already aligned" in text or "midpoint is not already aligned" in text
    assert {s: len(h) for s, h in results["pairs"][0]["train_history"].items()} == {
        "unaligned": 1, "pam_unaligned": 1, "pam_aligned": 1, "aligned": 1}  # fmt: skip
    manifest = json.loads((folder / "manifest.json").read_text())
    assert "pair 1 midpoint alignment" in manifest["completed"]
    assert manifest["versions"]["torch"] == torch.__version__ and manifest["device"] == "cpu"
    # a published manifest names no folder of the machine that ran it
    assert manifest["command"][0] == "neuralign" and manifest["report"] == "report.md"
    assert '"/' not in json.dumps(manifest), [v for v in json.dumps(manifest).split('"') if v.startswith("/")]
    # every stage's wall-clock time is recorded, and printed at the end of the run with the total
    assert set(manifest["stage_seconds"]) == set(manifest["completed"]) and manifest["runs"][-1]["seconds"] > 0
    assert all(s >= 0 for s in manifest["stage_seconds"].values())
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("pair1/*.pt")}
    # a second run finds every stage done: nothing is recomputed, the results are the same
    assert main(["demo", "--out", str(folder), "--quiet", *TINY]) == 0
    assert {p: p.stat().st_mtime_ns for p in folder.glob("pair1/*.pt")} == stamps
    assert json.loads((folder / "results.json").read_text())["pairs"] == results["pairs"]
    # the same folder with other settings is refused
    capsys.readouterr()
    assert main(["demo", "--out", str(folder), "--quiet", *TINY, "--set", "curve.epochs=2"]) == 2
    assert "holds a study with other settings: curve.epochs 1 (now 2); use another --out" in capsys.readouterr().err


@pytest.mark.parametrize("step", [["pam.step.max_moved=0.25", "pam.step.p_steps=2"],
                                  pytest.param(["pam.step=birkhoff", "pam.step.steps=3", "pam.step.lr=1.0"],
                                               marks=pytest.mark.slow)])  # fmt: skip
def test_study_records_objective_moves_and_accuracy_per_pam_iteration(tmp_path, step):
    folder = tmp_path / "pam"
    pam = ["--set", "pam.max_iter=2", "--set", "verification=false", "--set", "evaluation.plane_grid=0",
           "--set", "settings=pam_unaligned,aligned", *(a for kv in step for a in ("--set", kv))]  # fmt: skip
    assert main(["demo", "--out", str(folder), "--quiet", *TINY, *pam]) == 0
    results = json.loads((folder / "results.json").read_text())
    run = results["pairs"][0]["pam"]["pam_unaligned"]
    rows = run["iterations"]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert [r["objective"] for r in rows] == run["history"][1:]
    assert [r["moved"] for r in rows] == [sum(v[j] for v in run["changed"].values()) for j in range(2)]
    # the last iteration is the final curve; the first was saved and evaluated like it
    final = results["pairs"][0]["curves"]["pam_unaligned"]
    assert rows[1]["min_accuracy"] == final["min_accuracy"]
    first = json.loads((folder / "pair1" / "eval_pam_unaligned_iter1.json").read_text())
    assert rows[0]["min_accuracy"] == first["min_accuracy"] and len(first["t"]) == 3
    assert "| PAM Unaligned | 2 |" in (folder / "report.md").read_text()


def test_train_and_curve_rerun_skip_in_one_line_and_force_redoes(endpoints, tmp_path, capsys):
    a, b = endpoints
    folder = a.parent
    # every seed trained into one folder keeps its own manifest
    assert {p.name for p in folder.glob("manifest_train*.json")} == {"manifest_train_tinyten_seed1.json",
                                                                     "manifest_train_tinyten_seed2.json"}
    train = ["train", "--arch", "tinyten", "--epochs", "1", "--seed", "1", "--out", str(folder), *DATA]
    stamp = a.stat().st_mtime_ns
    capsys.readouterr()
    assert main(train) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == f"train already done: {a}; --force redoes it"
    assert captured.out.split() == [str(a)] and a.stat().st_mtime_ns == stamp
    assert main(train[:4] + ["2"] + train[5:]) == 2  # --epochs 2 into a folder holding a 1-epoch end point
    assert _one_error_line(capsys) == (f"neuralign: error: {a} was made with other options: --epochs 1 (now 2); "
                                       "--force redoes it, or choose another --out")  # fmt: skip
    pair = ["--model-a", str(a), "--model-b", str(b), *DATA]
    curve = ["curve", *pair, "--epochs", "2", "--out", str(tmp_path / "c")]
    ckpt = tmp_path / "c" / "curve.ckpt"

    def stop_after_the_first_epoch(self, event):
        if event["stage"] == "curve" and event["step"] >= 1:  # after the checkpoint of epoch 1 is written
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("neuralign.cli.progress.ProgressBars.__call__", stop_after_the_first_epoch)
        assert main(curve) == 130
    assert ckpt.exists()
    capsys.readouterr()
    assert main(curve) == 0
    assert f"resuming curve from epoch 1 of 2 ({ckpt})" in capsys.readouterr().err.splitlines()
    done = tmp_path / "c" / "curve.pt"
    stamp = done.stat().st_mtime_ns
    assert main(curve) == 0
    assert capsys.readouterr().err.strip() == f"curve already done: {done}; --force redoes it"
    assert done.stat().st_mtime_ns == stamp
    assert main([*curve, "--force"]) == 0
    err = capsys.readouterr().err
    assert "already done" not in err and "resuming" not in err and done.stat().st_mtime_ns != stamp
    assert len(json.loads((tmp_path / "c" / "curve.json").read_text())["history"]) == 2


def test_train_refuses_images_the_architecture_cannot_take_naming_resize(tmp_path, capsys):
    command = ["train", "--arch", "tinyten", "--data", "digits", "--epochs", "1", "--out", str(tmp_path), "--quiet"]
    assert main(command) == 2
    assert _one_error_line(capsys) == ("neuralign: error: --arch tinyten needs images of at least 9x9 but --data "
                                       "digits has 8x8; add --resize 9 (or larger) to resize them")  # fmt: skip
    assert not list(tmp_path.glob("*.pt"))


def test_errors_name_command_line_options_not_python_arguments(tmp_path, capsys):
    command = ["train", "--arch", "tinyten", "--data", "mnist", "--data-root", str(tmp_path / "none"), "--out",
               str(tmp_path), "--quiet"]  # fmt: skip
    assert main(command) == 2
    err = _one_error_line(capsys)
    assert "pass --download (needs network) or point --data-root at a folder holding MNIST/raw" in err
    assert "download=True" not in err and "root (" not in err
    assert main(["train", "--arch", "tinyten", "--epochs", "0", "--out", str(tmp_path), *DATA]) == 2
    assert _one_error_line(capsys) == "neuralign: error: --epochs must be a positive int, got 0"


def test_library_warnings_reach_the_command_line_as_one_line(monkeypatch, capsys, tmp_path):
    from neuralign.errors import ConvergenceWarning

    def warns(args, bars):
        warnings.warn("PAM on the curve: 315 units reassigned\nin the last iteration; raise `max_iter`",
                      ConvergenceWarning, stacklevel=1)  # fmt: skip
        return []

    monkeypatch.setitem(__import__("neuralign.cli.app", fromlist=["COMMANDS"]).COMMANDS, "pam", warns)
    assert main(["pam", "--model-a", "a", "--model-b", "b", "--data", "digits", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err  # in the command's words: pam passes --iters as max_iter
    assert err == "neuralign: warning: PAM on the curve: 315 units reassigned; in the last iteration; raise --iters\n"


def _bar_lines(err: str) -> list[str]:
    return [line.strip() for chunk in err.split("\n") for line in chunk.split("\r") if line.strip()]


def test_progress_bars_count_the_first_step_and_show_the_numbers_of_the_step_drawn(capsys):
    import re
    import time

    from neuralign.cli.progress import ProgressBars as _Bars

    bars = _Bars(enabled=True)
    bars({"stage": "train", "label": "a", "step": 0, "total": 2, "start": True})
    time.sleep(0.25)
    bars({"stage": "train", "label": "a", "step": 1, "total": 2, "record": {"train_loss": 2.0}})
    time.sleep(0.25)
    bars({"stage": "train", "label": "a", "step": 2, "total": 2, "record": {"train_loss": 1.0}})
    lines = _bar_lines(capsys.readouterr().err)
    done = [line for line in lines if "2/2" in line]
    assert done and all("train_loss=1]" in line for line in done), lines
    rate = float(re.search(r"([\d.]+)step/s", done[-1]).group(1))
    assert rate <= 2 / 0.5 * 1.01, done[-1]  # 2 steps took at least 0.5 s (tqdm rounds to 3 significant digits)
    # a stage whose first event comes after its first step is timed from the previous event
    time.sleep(0.25)
    bars({"stage": "pam", "label": "identity", "step": 1, "total": 1})
    done = [line for line in _bar_lines(capsys.readouterr().err) if "1/1" in line]
    assert float(re.search(r"([\d.]+)step/s", done[-1]).group(1)) <= 1 / 0.25 * 1.01, done[-1]
    assert bars.bars == {}


def test_resume_stale_results_foreign_curves_and_overwrites_are_refused(endpoints, tmp_path, capsys):
    a, b = endpoints
    pair = ["--model-a", str(a), "--model-b", str(b), *DATA]
    curve = ["curve", *pair, "--epochs", "2", "--out", str(tmp_path / "c")]
    ckpt = tmp_path / "c" / "curve.ckpt"

    def stop_after_the_first_epoch(self, event):
        if event["stage"] == "curve" and event["step"] >= 1:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("neuralign.cli.progress.ProgressBars.__call__", stop_after_the_first_epoch)
        assert main(curve) == 130
    capsys.readouterr()
    # resuming with another learning rate (or fewer epochs) silently mixed the two runs
    assert main([*curve, "--lr", "0.05"]) == 2
    assert _one_error_line(capsys) == (
        f"neuralign: error: {ckpt} holds an interrupted curve started with other options: --lr 0.1 (now 0.05); "
        "--force starts over, or rerun with the same options to resume it")  # fmt: skip
    assert main(curve) == 0  # the same options resume
    done = tmp_path / "c" / "curve.pt"
    # an end point changed at the same path: the finished curve is stale, not "already done"
    b2 = tmp_path / "b2.pt"
    b2.write_bytes(b.read_bytes())
    moved = ["curve", "--model-a", str(a), "--model-b", str(b2), *DATA, "--epochs", "2", "--out", str(tmp_path / "d")]
    assert main(moved) == 0
    b2.write_bytes(a.read_bytes())  # the user retrains B into the same file
    capsys.readouterr()
    assert main(moved) == 2
    assert "was made with other options: the content of --model-b" in _one_error_line(capsys)
    # exporting a point of a curve fitted for another pair
    export = ["curve", "--model-a", str(a), "--model-b", str(b2), *DATA, "--export-point", "0.5", "--from", str(done),
              "--out", str(tmp_path / "w.safetensors")]  # fmt: skip
    assert main(export) == 2
    assert _one_error_line(capsys) == (f"neuralign: error: {done} was fitted between other end points: its t=1 is not "
                                       "--model-b")  # fmt: skip
    # the aligned weights never overwrite their input
    assert main(["align", *pair, "--out", str(tmp_path / "al")]) == 0
    capsys.readouterr()
    assert main(["apply", "--model", str(b), "--perms", str(tmp_path / "al" / "alignment.pt"), "--out", str(b)]) == 2
    assert _one_error_line(capsys).endswith(f"would overwrite the input {b}; write them to another file")
    assert main(["train", "--arch", "tinyten", "--threads", "0", "--out", str(tmp_path), *DATA]) == 2
    assert _one_error_line(capsys) == "neuralign: error: --threads must be at least 1, got 0"
    assert main(["train", "--arch", "tinyten", "--device", "tpu", "--out", str(tmp_path), *DATA]) == 2
    assert _one_error_line(capsys).startswith("neuralign: error: --device tpu:")


def test_a_channel_mismatch_is_named(tmp_path, capsys):
    command = ["train", "--arch", "torchvision:resnet18", "--data", "digits", "--resize", "32", "--epochs", "1",
               "--out", str(tmp_path), "--quiet"]  # fmt: skip
    assert main(command) == 2
    assert _one_error_line(capsys) == ("neuralign: error: --arch torchvision:resnet18 takes 3-channel images but "
                                       "--data digits has 1 channel(s); choose a dataset or architecture that match")


def test_a_study_that_failed_before_any_stage_does_not_lock_its_folder(tmp_path, capsys):
    study = ["study", "--preset", "demo", "--data", "digits", "--out", str(tmp_path / "s"), "--quiet"]
    assert main([*study, "--test-size", "100000"]) == 2
    assert "--test-size=100000 exceeds the 360 images available" in _one_error_line(capsys)
    assert main([*study, "--test-size", "99999"]) == 2  # was: "holds a study with other settings (test_size)"
    assert "--test-size=99999 exceeds the 360 images available" in _one_error_line(capsys)


def test_model_args_that_the_command_sets_itself_are_refused_in_its_words(tmp_path, capsys):
    command = ["train", "--arch", "torchvision:resnet18", "--data", "digits", "--resize", "32", "--epochs", "1",
               "--out", str(tmp_path), "--quiet"]  # fmt: skip
    assert main([*command, "--model-arg", "num_classes=10"]) == 2  # was build_model()'s "multiple values"
    assert _one_error_line(capsys) == ("neuralign: error: --model-arg num_classes=... is not a builder argument "
                                       "here: use --num-classes")  # fmt: skip


def test_study_takes_the_class_count_builder_arguments_and_statistics_of_given_end_points(monkeypatch, tmp_path):
    seen = {}

    def fake_run_study(config, out, **kwargs):
        seen["config"] = config
        return {"report": str(tmp_path / "report.md")}

    monkeypatch.setattr("neuralign.study.run_study", fake_run_study)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert main(["study", "--endpoints", str(a), str(b), "--arch", "torchvision:mobilenet_v2", "--num-classes", "10",
                 "--model-arg", "width_mult=0.5", "--data", "digits", "--mean", "0.5", "--std", "0.25",
                 "--out", str(tmp_path / "s"), "--quiet"]) == 0  # fmt: skip
    config = seen["config"]
    assert config.model.num_classes == 10 and config.model.args == {"width_mult": 0.5}
    assert config.data.mean == (0.5,) and config.data.std == (0.25,) and config.pairs == 1
    from neuralign.study import StudyConfig

    assert StudyConfig.from_dict(config.to_dict()) == config  # the manifest round trip


def test_align_checks_its_export_file_before_the_work(endpoints, tmp_path, capsys):
    a, b = endpoints
    command = ["align", "--model-a", str(a), "--model-b", str(b), *DATA, "--out", str(tmp_path / "al"),
               "--export", str(tmp_path / "b.npz")]  # fmt: skip
    assert main(command) == 2
    assert _one_error_line(capsys).startswith("neuralign: error: --export must end in one of")
    assert not (tmp_path / "al" / "alignment.pt").exists()  # refused before aligning


def test_default_threads_are_capped_by_the_cores_this_process_may_use(monkeypatch, tmp_path, capsys):
    import neuralign.cli.app as app

    monkeypatch.setattr(app, "usable_cores", lambda: 1)  # e.g. a Slurm job given one core of a big machine
    before = torch.get_num_threads()
    try:
        main(["train", "--arch", "tinyten", "--epochs", "0", "--out", str(tmp_path), *DATA])  # fails fast (epochs)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

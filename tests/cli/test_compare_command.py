"""``neuralign compare`` on the shipped digits (offline): end to end with a tiny budget, resumed, refused with
other settings."""

from __future__ import annotations

import contextlib
import json

import pytest

from neuralign.cli import build_parser, main

TINY = ["--set", "train.epochs=1", "--set", "max_batches=2", "--set", "data.train_size=256",
        "--set", "data.test_size=128", "--set", "protocol.max_bn_batches=2", "--num-points", "3"]  # fmt: skip


def test_help_lists_methods_and_settings(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["compare", "--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0 and "--out" in text and "--methods" in text
    assert "methods: identity, correlation, l2, weight, pam" in text and "protocol.bn" in text
    for action in build_parser()._subparsers._group_actions[0].choices["compare"]._actions:
        assert action.help, action.option_strings


def test_compare_runs_end_to_end_resumes_and_refuses_other_settings(tmp_path, capsys):
    folder = tmp_path / "cmp"
    command = ["compare", "--out", str(folder), "--quiet", "--methods", "identity", "weight", "correlation",
               "--bn", "repair", *TINY]  # fmt: skip
    assert main(command) == 0
    captured = capsys.readouterr()
    assert captured.out.split()[0] == str(folder / "report.md")
    assert "time per stage (s):" in captured.err and "pair 2 eval correlation" in captured.err
    results = json.loads((folder / "results.json").read_text())
    assert results["methods"] == ["identity", "weight", "correlation"] and len(results["pairs"]) == 2
    assert results["protocol"]["bn"] == "repair" and results["protocol"]["alignment_size"] == 256
    ev = results["pairs"][0]["methods"]["weight"]["evaluation"]
    assert ev["t"] == [0.0, 0.5, 1.0] and set(ev["splits"]) == {"test", "train"}
    text = (folder / "report.md").read_text()
    assert "| identity |" in text and "| correlation |" in text and "batch norm: repair" in text
    assert (folder / "figures" / "compare.png").stat().st_size > 1000
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("pair*/*")}
    assert main(command) == 0
    assert {p: p.stat().st_mtime_ns for p in folder.glob("pair*/*")} == stamps
    capsys.readouterr()
    assert main([*command, "--set", "protocol.num_points=5"]) == 2
    err = capsys.readouterr().err
    assert "holds a comparison with other settings: protocol.num_points 3 (now 5); use another --out" in err


def test_a_first_run_that_fails_before_any_stage_does_not_lock_the_folder(tmp_path, capsys):
    # a new-user trial: a typo in --data left a manifest behind, and the corrected command was refused for "other
    # settings" (and a second wrong dataset was reported as a change of settings, not as missing)
    folder = tmp_path / "cmp"
    assert main(["compare", "--out", str(folder), "--quiet", "--data", "nosuch", *TINY]) == 2
    assert "nosuch" in capsys.readouterr().err and not (folder / "manifest.json").exists()
    assert main(["compare", "--out", str(folder), "--quiet", "--data", str(tmp_path / "none.npz"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "other settings" not in err and "none.npz" in err
    # one end point file: the message names --endpoints, not "--pairs must be a positive int, got 0"
    assert main(["compare", "--out", str(folder), "--quiet", "--endpoints", str(tmp_path / "a.pt"), *TINY]) == 2
    assert "--endpoints takes A and B of each pair (an even number of files), got 1" in capsys.readouterr().err
    assert not any(folder.glob("*"))  # and no command record either: the comparison keeps its own manifest


def test_options_that_would_be_ignored_are_refused_in_one_line(tmp_path, capsys):
    # a new-user trial: verification settings without --verify, --jobs without --executor local and --status with
    # --cancel were silently ignored; each is now one line, and nothing is written
    folder = tmp_path / "cmp"
    cases = [
        (["--set", "verification.n_swaps=2"], "--set verification.n_swaps is a setting of the verification, which "
                                              "runs with --verify: add it"),
        (["--jobs", "3"], "--jobs sets how many local jobs run at once: use it with --executor local"),
        (["--status", str(folder), "--cancel", str(folder)], "argument --cancel: not allowed with argument --status"),
    ]  # fmt: skip
    for extra, words in cases:
        with pytest.raises(SystemExit) if "--status" in extra else contextlib.nullcontext():
            assert main(["compare", "--out", str(folder), "--quiet", *TINY, *extra]) == 2
        err = capsys.readouterr().err
        assert words in err, err
        assert not folder.exists()


def test_the_shared_data_options_and_data_root(tmp_path, capsys):
    # compare reads its data options from the shared definitions (add_data): --data-root finds an .npz named after
    # the dataset, as for every other command, and the cpu preset's missing-data hint names options compare has
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (96, 28, 28), dtype=np.uint8), "y_train": np.arange(96) % 10,
              "x_test": rng.integers(0, 256, (48, 28, 28), dtype=np.uint8), "y_test": np.arange(48) % 10}  # fmt: skip
    root = tmp_path / "data"
    root.mkdir()
    np.savez(root / "mnist.npz", **arrays)
    folder = tmp_path / "cmp"
    command = ["compare", "--out", str(folder), "--quiet", "--methods", "identity", "--pairs", "1", "--data", "mnist",
               "--data-root", str(root), "--batch-size", "32", "--train-size", "64", "--set", "train.epochs=1",
               "--set", "max_batches=2", "--set", "protocol.max_bn_batches=2", "--num-points", "3"]  # fmt: skip
    assert main(command) == 0
    results = json.loads((folder / "results.json").read_text())
    data = results["config"]["data"]
    assert data["dataset"] == "mnist" and data["root"] == str(root) and data["batch_size"] == 32
    assert data["train_size"] == 64 and results["test_images"] == 48
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", "--preset", "cpu", "--out", str(tmp_path / "cpu"), "--quiet", "--data-root",
                 str(empty)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--data-root" in err and "--download" in err and str(empty) in err, err
    assert not (tmp_path / "cpu" / "manifest.json").exists()


def test_model_arg_sets_the_builder_arguments_of_the_end_points(tmp_path, capsys):
    # `model.args` is a dict, which `--set` cannot spell: without --model-arg a comparison of `vit` could not choose
    # its depth, heads or MLP width
    import torch

    folder = tmp_path / "cmp"
    command = ["compare", "--out", str(folder), "--quiet", "--arch", "vit", "--model-arg", "depth=1",
               "--model-arg", "heads=2", "--model-arg", "mlp_dim=24", "--methods", "identity", "--pairs", "1",
               *TINY]  # fmt: skip
    assert main(command) == 0
    results = json.loads((folder / "results.json").read_text())
    assert results["config"]["model"]["args"] == {"depth": 1, "heads": 2, "mlp_dim": 24}
    state = torch.load(folder / "endpoints" / "seed1.pt", weights_only=False)
    state = state.get("state_dict", state)
    assert {k.split(".")[1] for k in state if k.startswith("blocks.")} == {"0"}
    assert state["blocks.0.fc1.weight"].shape[0] == 24
    capsys.readouterr()
    assert main([*command, "--model-arg", "num_classes=10"]) == 2
    assert "--model-arg num_classes=... is not a builder argument here: use --num-classes" in capsys.readouterr().err

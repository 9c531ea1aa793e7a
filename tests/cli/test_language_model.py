"""The language model from the command line (issue 21): ``tinylm`` on the byte-level ``pydoc`` text, trained with
``--optimizer adamw`` by ``train``, ``study`` and ``compare``; a preset's image settings do not follow a text
``--data``; the comparison's report counts windows and tokens, not images."""

from __future__ import annotations

import json
import math

import pytest
import torch

from neuralign.cli import main

# 256 windows of 16 bytes: a few seconds per end point on one thread
TEXT = ["--data", "pydoc:16", "--train-size", "256", "--test-size", "64", "--quiet", "--threads", "1"]
UNIFORM = math.log(256)  # the loss of a uniform next-byte guess, where a fresh tinylm starts


def _endpoint(folder):
    return torch.load(folder / "tinylm_seed0.pt", weights_only=False)


def test_train_with_adamw_lowers_the_loss_of_tinylm_where_sgd_barely_moves_it(tmp_path, capsys):
    budget = ["train", "--arch", "tinylm", "--epochs", "2", "--batch-size", "32", "--lr", "5e-3", *TEXT]
    assert main([*budget, "--optimizer", "adamw", "--out", str(tmp_path / "adamw")]) == 0
    assert main([*budget, "--out", str(tmp_path / "sgd")]) == 0  # the default: the paper's SGD
    adamw, sgd = _endpoint(tmp_path / "adamw"), _endpoint(tmp_path / "sgd")
    assert adamw["options"]["optimizer"] == "adamw" and sgd["options"]["optimizer"] == "sgd"
    losses = [h["train_loss"] for h in adamw["history"]]
    assert losses[1] < losses[0] < UNIFORM
    # measured (seed 0, 1 thread): test loss 3.21 with AdamW, 4.19 with SGD at the same lr and budget
    assert adamw["test"]["test_loss"] < UNIFORM - 2.0
    assert adamw["test"]["test_loss"] < sgd["test"]["test_loss"] - 0.5
    capsys.readouterr()
    # the optimizer makes the result: another one is refused in the command's words
    assert main([*budget, "--optimizer", "sgd", "--out", str(tmp_path / "adamw")]) == 2
    assert "--optimizer 'adamw' (now 'sgd')" in capsys.readouterr().err
    # an end point of before --optimizer (its manifest does not record it) was trained with SGD: still done
    manifest = tmp_path / "sgd" / "manifest_train_tinylm_seed0.json"
    record = json.loads(manifest.read_text())
    del record["options"]["optimizer"]
    manifest.write_text(json.dumps(record))
    assert main([*budget, "--out", str(tmp_path / "sgd")]) == 0
    assert "train already done" in capsys.readouterr().err


def test_compare_trains_tinylm_on_pydoc_with_adamw_and_reports_windows(tmp_path, capsys, monkeypatch):
    import neuralign.study.compare as compare

    fitted = []

    def fit_curve(*args, optimizer, **kwargs):  # the optimizer the curves are given
        fitted.append(type(optimizer([torch.zeros(1, requires_grad=True)])).__name__)
        return real(*args, optimizer=optimizer, **kwargs)

    real = compare.fit_curve
    monkeypatch.setattr(compare, "fit_curve", fit_curve)
    folder = tmp_path / "cmp"
    # the demo preset resizes its digits to 16x16: no --set data.resize=None needed for text
    command = ["compare", "--arch", "tinylm", "--out", str(folder), "--pairs", "1", "--methods", "identity", "weight",
               "--optimizer", "adamw", "--set", "train.lr=5e-3", "--set", "train.epochs=1", "--set",
               "max_batches=8", "--set", "protocol.max_bn_batches=2", "--num-points", "3", "--set",
               "fit_curves=true", "--set", "curve.epochs=1", "--set", "curve.optimizer=adamw", "--set",
               "curve.lr=5e-3", *TEXT]  # fmt: skip
    assert main(command) == 0
    results = json.loads((folder / "results.json").read_text())
    config = results["config"]
    assert config["data"]["resize"] is None and config["train"]["optimizer"] == config["curve"]["optimizer"] == "adamw"
    assert fitted == ["AdamW", "AdamW"]
    # measured (seed 0): end points at 4.18 and 4.14 nats after 8 AdamW batches; SGD at this lr: 5.40
    for end in results["pairs"][0]["endpoints"].values():
        assert end["test_loss"] < UNIFORM - 0.75
    report = (folder / "report.md").read_text()
    assert "Test set: 64 windows of 16 tokens, 1024 next-token predictions (one prediction is 0.098 points)." in report
    assert "images" not in report
    assert results["protocol"]["alignment_data"] == "pydoc:16: the first 256 training windows"


def test_an_image_option_given_with_text_data_is_refused_naming_it(tmp_path, capsys):
    command = ["compare", "--arch", "tinylm", "--out", str(tmp_path / "cmp"), "--pairs", "1", "--resize", "16", *TEXT]
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resize applies to images; the text dataset" in err[0]
    assert not (tmp_path / "cmp" / "manifest.json").exists()


@pytest.mark.parametrize("given, expected", [([], "sgd"), (["--optimizer", "adamw"], "adamw"),
                                             (["--set", "train.optimizer=adamw"], "adamw")])  # fmt: skip
def test_study_takes_the_optimizer_of_the_end_points(tmp_path, monkeypatch, given, expected):
    import neuralign.cli.commands.study as study

    seen = []

    def run_stages(args, config, run, **kwargs):  # the settings the study would run with
        seen.append(config)

    monkeypatch.setattr(study, "run_stages", run_stages)
    assert main(["study", "--preset", "demo", "--arch", "tinylm", "--out", str(tmp_path), *given, *TEXT]) == 0
    (config,) = seen
    assert config.train.optimizer == expected and config.curve.optimizer == "sgd"
    assert config.data.dataset == "pydoc:16" and config.data.resize is None  # the demo's resize=16 dropped



def test_pam_s_curve_steps_take_the_curve_optimizer(tmp_path, monkeypatch):
    import neuralign.curves.pam as pam

    fitted = []

    def fit_curve(*args, optimizer, **kwargs):  # PAM's x-steps
        fitted.append(type(optimizer([torch.zeros(1, requires_grad=True)])).__name__)
        return real(*args, optimizer=optimizer, **kwargs)

    real = pam.fit_curve
    monkeypatch.setattr(pam, "fit_curve", fit_curve)
    command = ["compare", "--arch", "tinylm", "--out", str(tmp_path / "cmp"), "--pairs", "1", "--methods", "pam",
               "--optimizer", "adamw", "--set", "train.lr=5e-3", "--set", "train.epochs=1", "--set", "max_batches=4",
               "--set", "protocol.max_bn_batches=2", "--num-points", "3", "--set", "pam.x_epochs=1", "--set",
               "pam.value_batches=2", "--set", "pam.gradient_batches=2", "--set", "curve.optimizer=adamw", "--set",
               "curve.lr=5e-3", *TEXT]  # fmt: skip
    assert main(command) == 0
    assert fitted == ["AdamW"]  # one outer iteration, one x-step


def test_every_arch_help_lists_the_zoo_and_data_help_names_pydoc(capsys):
    """--help names every zoo architecture (tinylm and vit included; study's listed neither) and the text data."""
    from neuralign.cli.parser import ZOO_ARCHES
    from neuralign.experiments.models import available_models

    assert list(ZOO_ARCHES) == available_models()
    for command in ("train", "study", "compare"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(name in text for name in ZOO_ARCHES), command
        assert "pydoc" in text, command

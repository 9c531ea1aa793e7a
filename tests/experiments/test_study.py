import json

import pytest

from neuralign.experiments.study import PRESETS, SETTINGS, StudyConfig


def test_presets_are_valid_and_round_trip():
    for name, config in PRESETS.items():
        again = StudyConfig.from_dict(config.to_dict())
        assert again == config, name
    assert PRESETS["paper"].epochs == 250 and PRESETS["paper"].num_points == 65 and PRESETS["paper"].pairs == 3
    assert PRESETS["cpu"].arch == "tinyten" and PRESETS["demo"].dataset == "digits"


def test_config_validation_names_the_setting():
    with pytest.raises(ValueError, match=r"unknown study settings \['epoch'\]; expected some of"):
        PRESETS["cpu"].replace(epoch=3)
    with pytest.raises(ValueError, match="`pairs` must be a positive int, got 0"):
        StudyConfig(pairs=0)
    with pytest.raises(ValueError, match=r"unknown settings \['linear'\]"):
        StudyConfig(settings=("linear",))
    config = StudyConfig(settings=("aligned", "unaligned"))
    assert config.settings == ("unaligned", "aligned")  # kept in the paper's order
    assert set(config.settings) <= set(SETTINGS)



def _tiny_robust() -> StudyConfig:
    return PRESETS["robust-cpu"].replace(
        dataset="digits", hidden=(16,), pairs=1, batch_size=64, train_size=None, test_size=None, align_size=128,
        epochs=2, curve_epochs=2, num_points=3, bn_batches=2, max_batches=2, eps=0.1, alpha=0.05, attack_steps=2,
    )


def test_robust_presets_are_robust_and_refuse_what_is_not():
    for name in ("robust", "robust-cpu"):
        config = PRESETS[name]
        assert config.robust and config.attack() is not None and config.settings == ("unaligned", "aligned")
        assert config.lr_schedule == "garipov" and not config.verify
    assert PRESETS["robust"].attack().to_dict() == {"eps": 8 / 255, "alpha": 2 / 255, "steps": 5, "random_start": True}
    assert PRESETS["robust"].epochs == 200 and PRESETS["robust"].num_points == 65
    with pytest.raises(ValueError, match=r"settings \['pam_aligned'\] are not robust"):
        PRESETS["robust"].replace(settings=("pam_aligned", "aligned"))
    with pytest.raises(ValueError, match="a robust study needs verify=False"):
        PRESETS["robust"].replace(verify=True)
    with pytest.raises(ValueError, match="align_inputs='adversarial' needs robust=True"):
        PRESETS["cpu"].replace(align_inputs="adversarial")
    with pytest.raises(ValueError, match="`eps` must be >= 0"):
        PRESETS["robust"].replace(eps=-1.0)


def test_tiny_robust_study_runs_resumes_and_reports(tmp_path):
    from neuralign.experiments.study import run_study

    config = _tiny_robust()
    full = run_study(config, tmp_path / "full")

    def interrupt(event):
        if event["stage"] == "curve" and event["label"] == "pair 1 aligned" and event["step"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(config, tmp_path / "cut", progress=interrupt)
    assert (tmp_path / "cut" / "pair1" / "curve_aligned.ckpt").exists()
    trained = (tmp_path / "cut" / "endpoints" / "seed1.pt").stat().st_mtime_ns
    stages = []
    resumed = run_study(config, tmp_path / "cut", progress=lambda e: stages.append((e["stage"], e["label"])))
    assert (tmp_path / "cut" / "endpoints" / "seed1.pt").stat().st_mtime_ns == trained  # finished stages skipped
    assert {s for s, _ in stages} == {"curve", "evaluate", "midpoint alignment"}
    assert ("curve", "pair 1 unaligned") not in stages
    assert resumed["pairs"][0]["curves"] == full["pairs"][0]["curves"]  # bit for bit, robust values included
    assert resumed["pairs"][0]["endpoints"] == full["pairs"][0]["endpoints"]
    ev = full["pairs"][0]["curves"]["aligned"]
    assert len(ev["robust_test_accuracy"]) == 3 and ev["bn_inputs"] == "adversarial"
    assert "robust_test_acc" in full["pairs"][0]["endpoints"]["a"]
    report = (tmp_path / "full" / "report.md").read_text()
    assert "## Robust mode connectivity" in report and "| Aligned |" in report
    assert (tmp_path / "full" / "figures" / "robust_metrics.png").exists()
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["config"]["robust"] is True and "pair 1 eval aligned" in manifest["completed"]


def test_one_setting_given_as_a_string_is_one_setting():
    # `--set settings=aligned` parses to a string, which once was read as the settings 'a', 'l', 'i', ...
    assert StudyConfig(settings="aligned").settings == ("aligned",)


@pytest.mark.parametrize("name", ["robust", "verify", "download"])
@pytest.mark.parametrize("value", ["no", 0, 1, "false", None])
def test_bool_settings_must_be_bools(name, value):
    # `--set robust=no` parses to the string 'no', which once ran a robust study; robust=0 was kept as an int
    with pytest.raises(ValueError, match=rf"^`{name}` must be a bool \(true or false\), got {value!r}$"):
        StudyConfig(**{name: value})


def test_bool_settings_from_the_command_line():
    from neuralign.experiments.cli import _overrides

    assert PRESETS["robust-cpu"].replace(**_overrides(["robust=false", "verify=false"])).robust is False
    with pytest.raises(ValueError, match=r"`robust` must be a bool \(true or false\), got 'no'"):
        PRESETS["cpu"].replace(**_overrides(["robust=no"]))


def test_attack_settings_are_named_as_in_the_study():
    with pytest.raises(ValueError, match=r"^`attack_steps` must be an int >= 0, got -1$"):
        PRESETS["robust"].replace(attack_steps=-1)
    with pytest.raises(ValueError, match=r"^`attack_steps` must be an int >= 0, got 1.5$"):
        PRESETS["robust"].replace(attack_steps=1.5)
    with pytest.raises(ValueError, match=r"^`alpha` must be > 0, got 0$"):
        PRESETS["robust"].replace(alpha=0)
    with pytest.raises(ValueError, match=r"^`eps` must be a finite number, got nan$"):
        PRESETS["robust"].replace(eps=float("nan"))


def _endpoint_file(path, seed: int, dataset: dict | None) -> str:
    # an end point as `neuralign train` writes it, for the tiny robust study's MLP on 8x8 digits
    import torch

    from neuralign._utils import atomic_save
    from neuralign.experiments.models import build_model

    kwargs = {"in_features": 64, "batch_norm": True, "hidden": (16,)}
    model = build_model("mlp", 10, seed=seed, **kwargs)
    record = {"kind": "endpoint", "arch": "mlp", "num_classes": 10, "model_kwargs": kwargs,
              "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}  # fmt: skip
    if dataset is not None:
        record["dataset"] = dataset
    atomic_save(record, path)
    assert torch.load(path, weights_only=False)["kind"] == "endpoint"
    return str(path)


def test_robust_study_refuses_end_points_trained_on_normalised_inputs(tmp_path):
    from neuralign.experiments.study import run_study

    normalised = {"name": "digits", "mean": [0.3], "std": [0.35]}
    given = (_endpoint_file(tmp_path / "a.pt", 1, normalised), _endpoint_file(tmp_path / "b.pt", 2, normalised))
    config = _tiny_robust().replace(endpoints=given)
    with pytest.raises(ValueError, match=r"a.pt' was trained on normalised inputs \(mean \[0.3\], std \[0.35\]\), "
                                         r"but a robust study attacks and evaluates \[0, 1\] inputs"):  # fmt: skip
        run_study(config, tmp_path / "study")
    # raw [0, 1] inputs recorded (mean/std None), or nothing recorded: accepted, the study goes on to the curves
    raw = {"name": "digits", "mean": None, "std": None}
    for name, dataset in (("raw", raw), ("plain", None)):
        given = (_endpoint_file(tmp_path / f"{name}a.pt", 1, dataset),
                 _endpoint_file(tmp_path / f"{name}b.pt", 2, dataset))  # fmt: skip
        stages = []

        def stop_at_the_curves(event, stages=stages):
            stages.append(event["stage"])
            if event["stage"] == "curve":
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            run_study(config.replace(endpoints=given), tmp_path / f"study_{name}", progress=stop_at_the_curves)
        assert "curve" in stages and "train" not in stages, name


ONLY_LINEARIZED = "`pam_max_moved` and `pam_p_steps` apply to pam_method='linearized'"


@pytest.mark.parametrize("overrides, message", [
    ({"pam_method": "birkhoff", "pam_max_moved": 0.1}, ONLY_LINEARIZED),
    ({"pam_method": "birkhoff", "pam_p_steps": 4}, ONLY_LINEARIZED),
    ({"pam_method": "exact"}, "`pam_method` must be 'linearized' or 'birkhoff', got 'exact'"),
    ({"pam_max_moved": 0}, r"`pam_max_moved` must be a fraction in \(0, 1\], got 0"),
    ({"pam_birkhoff_steps": 0}, "`pam_birkhoff_steps` must be a positive int, got 0"),
    ({"pam_birkhoff_lr": 0.0}, "`pam_birkhoff_lr` must be a positive number, got 0.0"),
    ({"pam_method": "birkhoff", "pam_birkhoff_samples": -1}, "`pam_birkhoff_samples` must be an int >= 0, got -1"),
    ({"pam_value_batches": 0}, "`pam_value_batches` must be a positive int, got 0"),
    ({"pam_value_batches": True}, "`pam_value_batches` must be a positive int, got True"),
])  # fmt: skip
def test_pam_settings_are_checked_under_their_study_names(overrides, message):
    with pytest.raises(ValueError, match=message):
        PRESETS["demo"].replace(**overrides)


def test_the_cpu_preset_runs_the_linearised_p_step_when_asked():
    """The cpu preset's Birkhoff settings do not block `--set pam_method=linearized` (a reviewer found that
    pam_birkhoff_samples=8 did); they are unused there."""
    config = PRESETS["cpu"].replace(pam_method="linearized")
    assert config.pam_method == "linearized" and config.pam_birkhoff_samples == 8

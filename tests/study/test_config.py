"""The study's settings: nested option objects of the library, dotted paths, presets, and the flat names of
before 0.2 (older manifests and ``--set`` keys)."""

import json
import warnings
from pathlib import Path

import pytest

from neuralign.attacks import PGD
from neuralign.curves import CurvePAMOptions
from neuralign.experiments import TrainingOptions
from neuralign.optim import BirkhoffStep, LinearizedStep
from neuralign.study import LEGACY_NAMES, PRESETS, SETTINGS, StudyConfig
from neuralign.verification import VerificationOptions

EVIDENCE = Path(__file__).resolve().parents[2] / "docs" / "evidence"


def test_presets_are_valid_and_round_trip_through_json():
    for name, config in PRESETS.items():
        again = StudyConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config, name
    paper = PRESETS["paper"]
    assert paper.train.epochs == 250 and paper.evaluation.num_points == 65 and paper.pairs == 3
    assert paper.pam == CurvePAMOptions(x_epochs=250) and paper.pam.step == LinearizedStep(backtrack=True)
    assert PRESETS["cpu"].model.arch == "tinyten" and PRESETS["demo"].data.dataset == "digits"


def test_the_groups_are_the_library_option_objects():
    config = PRESETS["cpu"]
    assert isinstance(config.pam, CurvePAMOptions) and isinstance(config.verification, VerificationOptions)
    assert isinstance(config.train, TrainingOptions) and config.pam.step == BirkhoffStep(steps=160, lr=1.0, samples=8)


def test_dotted_paths_set_nested_settings_and_unknown_ones_are_named():
    config = PRESETS["demo"].set("pam.lam", 10.0).set("verification.n_swaps", 3).set("data.batch_size", 32)
    assert (config.pam.lam, config.verification.n_swaps, config.data.batch_size) == (10.0, 3, 32)
    assert config.set("pam.step", "birkhoff").pam.step == BirkhoffStep()
    # a method's name means its default *here*: PAM on a curve backtracks its linearised steps
    assert PRESETS["cpu"].set("pam.step", "linearized").pam.step == LinearizedStep(backtrack=True)
    assert PRESETS["cpu"].set("pam.step.lr", 0.5).pam.step.lr == 0.5
    with pytest.raises(ValueError, match=r"unknown setting 'pam.lamda': CurvePAMOptions has no 'lamda'; "
                                         r"expected one of \['gradient_batches', 'lam',"):  # fmt: skip
        PRESETS["demo"].set("pam.lamda", 1.0)
    with pytest.raises(ValueError, match=r"unknown setting 'pam.step.max_moved': BirkhoffStep has no 'max_moved'"):
        PRESETS["cpu"].set("pam.step.max_moved", 0.1)
    with pytest.raises(ValueError, match=r"unknown CurvePAMOptions.step 'exact'; expected one of "
                                         r"\['birkhoff', 'linearized'\]"):  # fmt: skip
        PRESETS["demo"].set("pam.step", "exact")
    with pytest.raises(ValueError, match=r"^`pam.step.max_moved` must be a finite number in \(0, 1\] or None, got 0$"):
        PRESETS["demo"].set("pam.step.max_moved", 0)
    with pytest.raises(ValueError, match=r"^`pam.value_batches` must be a positive int, got 0$"):
        PRESETS["demo"].set("pam.value_batches", 0)
    with pytest.raises(TypeError, match=r"^`pam.value_batches` must be a positive int, got bool True$"):
        PRESETS["demo"].set("pam.value_batches", True)


def test_whole_checks_switch_on_and_off():
    assert PRESETS["demo"].set("verification", False).verification is None
    assert PRESETS["robust"].set("robust", False).robust is None
    assert PRESETS["cpu"].set("verification", True).verification == PRESETS["cpu"].verification  # kept
    assert PRESETS["paper"].set("verification", None).set("verification.n_swaps", 5).verification.n_swaps == 5
    for bad in ("no", 0, 1):  # `--set robust=no` once ran a robust study
        with pytest.raises(TypeError, match=rf"^`robust` must be true, false or RobustOptions settings, got {bad!r}$"):
            PRESETS["cpu"].set("robust", bad)


def test_config_validation_names_the_setting():
    with pytest.raises(ValueError, match="`pairs` must be a positive int, got 0"):
        StudyConfig(pairs=0)
    with pytest.raises(ValueError, match=r"unknown settings \['linear'\]"):
        StudyConfig(settings=("linear",))
    config = StudyConfig(settings=("aligned", "unaligned"))
    assert config.settings == ("unaligned", "aligned")  # kept in the paper's order
    assert set(config.settings) <= set(SETTINGS)
    # `--set settings=aligned` parses to a string, which once was read as the settings 'a', 'l', 'i', ...
    assert StudyConfig(settings="aligned").settings == ("aligned",)
    with pytest.raises(ValueError, match=r"`endpoints` must name 2 \* pairs = 6 files, got 2"):
        StudyConfig(endpoints=("a.pt", "b.pt"))
    with pytest.raises(TypeError, match=r"^`data.download` must be a bool \(True or False\), got str 'no'$"):
        PRESETS["cpu"].set("data.download", "no")


def test_robust_presets_are_robust_and_refuse_what_is_not():
    for name in ("robust", "robust-cpu"):
        config = PRESETS[name]
        assert config.robust is not None and config.attack() is not None and config.settings == ("unaligned", "aligned")
        assert config.train.schedule == config.curve.schedule == "garipov" and config.verification is None
    assert PRESETS["robust"].attack() == PGD(eps=8 / 255, alpha=2 / 255, steps=5)
    assert PRESETS["robust"].train.epochs == 200 and PRESETS["robust"].evaluation.num_points == 65
    with pytest.raises(ValueError, match=r"settings \['pam_aligned'\] are not robust"):
        PRESETS["robust"].set("settings", ("pam_aligned", "aligned"))
    with pytest.raises(ValueError, match="a robust study needs verification=None"):
        PRESETS["robust"].set("verification", True)
    with pytest.raises(ValueError, match=r"^`robust.attack.eps` must be a finite number >= 0, got -1.0$"):
        PRESETS["robust"].set("robust.attack.eps", -1.0)
    with pytest.raises(ValueError, match=r"^`robust.attack.steps` must be an int >= 0, got -1$"):
        PRESETS["robust"].set("robust.attack.steps", -1)
    with pytest.raises(ValueError, match="drop data.mean and data.std"):
        PRESETS["robust"].set("data.mean", (0.5,))


def test_flat_names_of_before_0_2_still_work_with_a_warning():
    cases = {"pam_lam": 10.0, "curve_epochs": 3, "verify_swaps": 5, "bn_batches": 2, "arch": "resnet20"}
    for name, value in cases.items():
        with pytest.warns(DeprecationWarning, match=rf"'{name}' is '{LEGACY_NAMES[name]}' since neuralign 0.2"):
            old = PRESETS["cpu"].set(name, value)
        assert old == PRESETS["cpu"].set(LEGACY_NAMES[name], value), name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        both = PRESETS["cpu"].set("lr_schedule", "garipov")
        assert both.train.schedule == both.curve.schedule == "garipov"
        assert PRESETS["demo"].set("verify", False).verification is None
        assert PRESETS["cpu"].set("pam_method", "linearized").pam.step == LinearizedStep(backtrack=True)
        # before 0.2 the Birkhoff settings were kept, unused, beside a linearised step: still harmless
        assert PRESETS["demo"].set("pam_birkhoff_samples", 8) == PRESETS["demo"]
        robust = PRESETS["robust"].set("eps", 0.1).set("attack_steps", 3)
    assert robust.attack() == PGD(eps=0.1, alpha=2 / 255, steps=3)


@pytest.mark.parametrize("folder, preset", [("cpu_tinyten_cifar10", "cpu"), ("robust_mlp_mnist", "robust-cpu")])
def test_the_flat_manifests_of_the_evidence_are_read_as_the_presets(folder, preset):
    manifest = json.loads((EVIDENCE / folder / "manifest.json").read_text())
    assert "pam_lam" in manifest["config"] or "robust" in manifest["config"]  # written before 0.2: flat
    config = StudyConfig.from_dict(manifest["config"])
    expected = PRESETS[preset].set("data.dataset", config.data.dataset)
    if preset == "cpu":  # the evidence's stability ran PAM from the identity and a random start too (the preset since
        # runs it from the alignment only)
        expected = expected.set("verification.identity_start", True).set("verification.random_starts", 1)
    assert config == expected


def _without_optimizer(config: dict) -> dict:
    """A nested configuration as written before ``TrainingOptions.optimizer``."""
    old = json.loads(json.dumps(config))
    for group in ("train", "curve"):
        del old[group]["optimizer"]
    return old


def test_the_optimizer_is_a_training_setting_and_configs_without_it_read_as_sgd():
    config = PRESETS["demo"].set("train.optimizer", "adamw").set("curve.optimizer", "adamw")
    assert config.train.optimizer == config.curve.optimizer == "adamw"
    assert StudyConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    old = _without_optimizer(PRESETS["demo"].to_dict())
    assert StudyConfig.from_dict(old) == PRESETS["demo"] and PRESETS["demo"].train.optimizer == "sgd"
    with pytest.raises(ValueError, match=r"unknown optimizer 'adam'; expected one of \['adamw', 'sgd'\]"):
        PRESETS["demo"].set("train.optimizer", "adam")


def test_a_study_folder_written_before_the_optimizer_setting_still_resumes(tmp_path):
    from neuralign.errors import CheckpointError
    from neuralign.study.runner import check_study_folder

    config = PRESETS["demo"]
    manifest = {"kind": "study_manifest", "config": _without_optimizer(config.to_dict()), "runs": []}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "pair1").mkdir()  # a stage was done: the folder is not one to start afresh
    check_study_folder(config, tmp_path)  # the same settings: no refusal
    with pytest.raises(CheckpointError, match=r"other settings: train.optimizer 'sgd' \(now 'adamw'\)"):
        check_study_folder(config.set("train.optimizer", "adamw"), tmp_path)


def test_a_text_dataset_drops_the_preset_s_image_settings():
    from neuralign.study.compare import COMPARE_PRESETS

    assert PRESETS["demo"].data.resize == 16
    for preset in (PRESETS["demo"].set("data.mean", (0.5,)).set("data.std", (0.2,)), COMPARE_PRESETS["demo"]):
        text = preset.set("data.dataset", "pydoc:32")
        assert (text.data.dataset, text.data.resize, text.data.mean, text.data.std) == ("pydoc:32", None, None, None)
        assert text.data.batch_size == preset.data.batch_size  # the other data settings stay
        # an image option given after the dataset stays (and load_data refuses it, naming it)
        assert text.set("data.resize", 8).data.resize == 8
    # an image dataset keeps them
    assert PRESETS["demo"].set("data.dataset", "mnist").data.resize == 16
    assert PRESETS["demo"].data.replace(dataset="pydoc", resize=12).resize == 12  # given in the same call

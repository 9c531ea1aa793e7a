import pytest
import torch

from neuralign._utils import atomic_save
from neuralign.errors import CheckpointError
from neuralign.experiments.study import PRESETS, SETTINGS, StudyConfig, load_endpoint


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


def test_load_endpoint_validates_what_it_reads(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save({"kind": "curve"}, path)
    with pytest.raises(CheckpointError, match="is of kind 'curve', expected 'endpoint'"):
        load_endpoint(path)
    atomic_save({"kind": "endpoint", "arch": "mlp", "num_classes": 10, "model_kwargs": {"in_features": 64},
                 "state_dict": {"hidden.0.fc.weight": torch.zeros(3, 3)}}, path)  # fmt: skip
    with pytest.raises(CheckpointError, match="does not fit architecture 'mlp'"):
        load_endpoint(path)
    (tmp_path / "evil.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read as data"):
        load_endpoint(tmp_path / "evil.pt")

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



def test_one_setting_given_as_a_string_is_one_setting():
    # `--set settings=aligned` parses to a string, which once was read as the settings 'a', 'l', 'i', ...
    assert StudyConfig(settings="aligned").settings == ("aligned",)

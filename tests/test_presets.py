"""Every preset is a recipe that runs: its settings validate, and a DATA_DIR without its store is told how to make it."""

import pytest

from imcap.cli import main
from imcap.model import ModelConfig
from imcap.presets import PRESETS
from imcap.train import TrainConfig


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_settings_validate(name):
    preset = PRESETS[name]
    ModelConfig(vocab_size=10, feature_dim=8, **preset.model).validate()
    for stage in (preset.train, *([{**preset.scst, "objective": "scst", "init_from": "xe"}] if preset.scst else []),
                  *({**preset.train, **own} for own in preset.members.values())):
        TrainConfig(**stage).validate()


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_without_its_store_says_how_to_make_it(name, tiny_data, tmp_path, capsys):
    assert main(["train", str(tiny_data), "--out", str(tmp_path / "run"), "--preset", name, "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and PRESETS[name].features in err
    assert PRESETS[name].features_command.replace("DATA_DIR", str(tiny_data)) in err
    assert not (tmp_path / "run").exists()

"""The objectives' registry: each unit reads its own TrainConfig fields, and none reads another's."""

import pytest

from imcap.objectives import OBJECTIVES, owned_fields, settings
from imcap.train_config import TrainConfig


def test_each_objective_reads_its_own_fields_of_train_config():
    owned = {name: owned_fields(name) for name in OBJECTIVES}
    assert set(owned) == {"xe", "scst"} and not set(owned["xe"]) & set(owned["scst"])
    assert all(f in TrainConfig.__dataclass_fields__ for fs in owned.values() for f in fs)
    cfg = TrainConfig(scst_temperature=0.5, scst_samples=3, label_smoothing=0.1, alpha_c=0.0)
    scst, xe = settings(OBJECTIVES["scst"], cfg), settings(OBJECTIVES["xe"], cfg)
    assert (scst.temperature, scst.samples, scst.baseline) == (0.5, 3, "greedy")
    assert (xe.label_smoothing, xe.alpha_c, xe.group_by_image) == (0.1, 0.0, True)
    with pytest.raises(AttributeError):
        scst.samples = 4  # frozen: a run's settings do not change under it

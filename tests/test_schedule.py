"""Learning-rate schedules: warmup, then cosine / WSD / constant, hitting their end points."""

import pytest

from megalm.config import TrainConfig
from megalm.train.schedule import lr_at


def test_warmup_then_cosine_reaches_min_lr():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4, schedule="cosine")
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 10) == pytest.approx(1e-3)
    assert lr_at(cfg, 54) == pytest.approx(5.5e-4, rel=0.03)  # half way down the cosine
    assert lr_at(cfg, 99) == pytest.approx(1e-4)
    assert all(lr_at(cfg, s) >= lr_at(cfg, s + 1) for s in range(10, 99))


def test_wsd_is_flat_then_decays_linearly():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1e-3, min_lr=0.0, schedule="wsd", decay_fraction=0.2)
    assert [lr_at(cfg, s) for s in (10, 50, 89)] == [1e-3, 1e-3, 1e-3]
    assert lr_at(cfg, 99) == pytest.approx(0.5e-3)
    assert lr_at(cfg, 109) == pytest.approx(0.0)


def test_constant():
    cfg = TrainConfig(steps=10, warmup_steps=2, lr=1e-3, schedule="constant")
    assert [lr_at(cfg, s) for s in range(4)] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])

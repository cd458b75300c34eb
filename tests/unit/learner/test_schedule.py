"""The learning-rate schedule against values computed by hand."""

import math

import pytest

from rlsys.config import RunConfig
from rlsys.learner.config import LearnerConfig
from rlsys.learner.schedule import lr_factor


def test_constant_without_warmup_is_one():
    assert [lr_factor(s, LearnerConfig()) for s in range(3)] == [1.0, 1.0, 1.0]


def test_warmup_then_constant():
    cfg = LearnerConfig(warmup_steps=4)
    assert [lr_factor(s, cfg) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_linear_decay_to_the_floor_and_stays_there():
    cfg = LearnerConfig(lr_schedule="linear", warmup_steps=1, lr_decay_steps=5, min_lr_ratio=0.2)
    got = [lr_factor(s, cfg) for s in range(8)]
    assert got == pytest.approx([1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2, 0.2])


def test_cosine_decay():
    cfg = LearnerConfig(lr_schedule="cosine", warmup_steps=2, lr_decay_steps=6, min_lr_ratio=0.0)
    got = [lr_factor(s, cfg) for s in range(7)]
    half = 0.5 * (1 + math.cos(math.pi * 0.5))
    assert got == pytest.approx(
        [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), half, 0.5 * (1 + math.cos(0.75 * math.pi)), 0.0]
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr_schedule": "step"}, "lr_schedule must be constant, linear or cosine"),
        ({"warmup_steps": -1}, "must be >= 0"),
        ({"min_lr_ratio": 1.5}, r"min_lr_ratio must be in \[0, 1\]"),
    ],
)
def test_bad_schedule_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LearnerConfig(**kwargs)


def test_a_warmup_longer_than_the_run_is_refused():
    with pytest.raises(ValueError, match="learner.warmup_steps=50 must fit the run"):
        RunConfig(steps=20, learner=LearnerConfig(warmup_steps=50))
    with pytest.raises(ValueError, match="end before learner.lr_decay_steps=5"):
        RunConfig(steps=20, learner=LearnerConfig(warmup_steps=5, lr_decay_steps=5, lr_schedule="linear"))

"""Held-out accuracy is scored by the run's reward function (rlsys/controller/evaluation.py)."""

from __future__ import annotations

import logging

import pytest

from rlsys.controller.evaluation import EvalScorer
from rlsys.reward.worker import RewardConfig


def half_credit(completion: str, reference: str) -> float:
    return 0.5 if completion.strip() != reference.strip() else 1.0


def test_the_configured_reward_decides_what_is_correct():
    exact = EvalScorer(RewardConfig())  # exact_match, the default
    assert exact.correct([" 12 ", "13", "12"], ["12", "12", "12x"]) == [True, False, False]
    numeric = EvalScorer(RewardConfig(function="numeric_match"))
    assert numeric.correct(["007", "7.0", "8"], ["7", "7", "7"]) == [True, True, False]
    partial = EvalScorer(RewardConfig(target=f"{__name__}.half_credit"))  # partial credit is not correct
    assert partial.correct(["1", "2"], ["1", "1"]) == [True, False]


def test_a_failing_reward_scores_wrong_and_is_reported(caplog):
    scorer = EvalScorer(RewardConfig(target="helpers.flaky_reward", timeout_s=1.0))  # raises on a '7'
    with caplog.at_level(logging.WARNING, logger="rlsys"):
        assert scorer.correct(["17", "12", "7"], ["17", "12", "7"]) == [False, True, False]
    assert "reward helpers.flaky_reward failed on 2 of 3 completions (scored as wrong)" in caplog.text
    assert "ZeroDivisionError" in caplog.text


def test_a_reward_that_cannot_be_called_is_refused_when_the_scorer_is_built():
    with pytest.raises(ValueError, match=r"cannot call with \(completion, reference\)"):
        EvalScorer(RewardConfig(target="helpers.reward_with_three_args"))

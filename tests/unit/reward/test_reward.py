"""Reward functions that raise, hang or return garbage score the sample as failed, counted."""

import math
import time

import pytest
from helpers import make_group

from rlsys.reward.worker import REWARD_FUNCTIONS, GroupScorer, RewardConfig, register_reward


def _fn_raises(completion, reference):
    raise KeyError("boom")


def _fn_hangs(completion, reference):
    time.sleep(30)
    return 1.0


def _fn_nan(completion, reference):
    return math.nan


def _fn_text(completion, reference):
    return "yes"


def _fn_half(completion, reference):
    return 0.5


def score_with(target, timeout=5.0):
    g = make_group(rewards=(0, 0, 0))
    g.rewards = None
    return GroupScorer(RewardConfig(target=f"{__name__}.{target}", timeout_s=timeout)).score_group(g)


@pytest.mark.parametrize("fn", ["_fn_raises", "_fn_nan", "_fn_text"])
def test_failing_reward_function_scores_failed_and_counts(fn, caplog):
    g = score_with(fn)
    assert g.reward_failures == 3
    assert (g.rewards == 0).all()
    assert "failed on group" in caplog.text


def test_hanging_reward_function_times_out():
    t0 = time.perf_counter()
    g = score_with("_fn_hangs", timeout=0.2)
    assert g.reward_failures == 3
    assert time.perf_counter() - t0 < 5


def test_custom_target_is_used():
    g = score_with("_fn_half")
    assert g.reward_failures == 0 and (g.rewards == 0.5).all()


def test_exact_match_registry():
    assert REWARD_FUNCTIONS["exact_match"](" 579 ", "579") == 1.0
    assert REWARD_FUNCTIONS["exact_match"]("57", "579") == 0.0
    assert REWARD_FUNCTIONS["numeric_match"]("007", "7") == 1.0


def test_unknown_function_names_the_choices():
    with pytest.raises(ValueError, match="reward.function 'nope' is not registered"):
        RewardConfig(function="nope")


def test_unimportable_target_is_clear():
    with pytest.raises(ValueError, match="cannot be imported"):
        GroupScorer(RewardConfig(target="no.such.module.fn"))


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="already registered"):
        register_reward("exact_match")(_fn_half)


def test_reward_calls_reuse_one_thread_until_one_hangs():
    """CallThread: calls share a thread (a thread per call cost as much as the scoring RPC);
    a call past its deadline leaves its thread behind and the next call gets a fresh one."""
    import threading

    from rlsys.reward.worker import CallThread

    release = threading.Event()
    th = CallThread()
    first = {th.call(threading.get_ident, (), 5.0)["value"] for _ in range(20)}
    assert len(first) == 1 and first != {threading.get_ident()}
    with pytest.raises(TimeoutError):
        th.call(release.wait, (), 0.05)
    try:
        after = th.call(threading.get_ident, (), 5.0)["value"]
        assert after not in first
        assert th.call(lambda: 1 / 0, (), 5.0)["error"].__class__ is ZeroDivisionError
        assert th.call(threading.get_ident, (), 5.0)["value"] == after  # an exception keeps the thread
    finally:
        release.set()

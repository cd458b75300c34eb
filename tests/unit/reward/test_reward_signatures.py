"""Reward functions that take the prompt and the dataset row, and return extra named scores
(rlsys/reward/worker.py: check_reward_fn, call_with_timeout, GroupScorer)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from helpers import make_group

from rlsys.replay.codec import decode_group, encode_group
from rlsys.reward.worker import (
    GroupScorer,
    RewardConfig,
    RewardFunctionError,
    RewardValue,
    call_with_timeout,
    reward_keywords,
)

CALLS: list[dict] = []

CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "1+1="}]
ROW = {"difficulty": 2, "source": "gsm", "tags": ["easy"]}


def two_args(completion, reference):
    return 1.0 if completion == reference else 0.25


def keyword_only(completion, reference, *, prompt, meta):
    CALLS.append({"completion": completion, "reference": reference, "prompt": prompt, "meta": meta})
    return float(meta.get("difficulty", 0))


def prompt_only(completion, reference, *, prompt):
    CALLS.append({"prompt": prompt})
    return 1.0


def var_keywords(completion, reference, **kwargs):
    CALLS.append(dict(kwargs))
    return 0.5


def defaulted_positional_prompt(completion, reference, prompt=None):
    CALLS.append({"prompt": prompt})
    return 1.0


def third_positional(completion, reference, question):
    return 1.0


def prompt_as_third_positional(completion, reference, prompt):
    return 1.0


def unknown_keyword(completion, reference, *, prompt, difficulty):
    return 1.0


def prompt_in_reference_slot(completion, prompt, reference):
    return 1.0


def with_extras(completion, reference):
    return {"reward": float(completion == reference), "format": 1.0, "length_penalty": -0.1 * len(completion)}


def extras_by_text(completion, reference):
    return {
        "only_reward": lambda: {"reward": 0.5},
        "a": lambda: {"reward": 1.0, "a": 2.0},
        "ab": lambda: {"reward": 0.0, "a": 3.0, "b": np.float32(0.5)},
        "boom": lambda: 1 / 0,
    }[completion]()


def no_reward_key(completion, reference):
    return {"score": 1.0}


def nan_reward_in_dict(completion, reference):
    return {"reward": math.nan}


def string_extra(completion, reference):
    return {"reward": 1.0, "format": "ok"}


def nan_extra(completion, reference):
    return {"reward": 1.0, "format": math.inf}


def bool_extra(completion, reference):
    return {"reward": 1.0, "format": True}


def int_key(completion, reference):
    return {"reward": 1.0, 3: 1.0}


def string_reward(completion, reference):
    return "1.0"


def nan_reward(completion, reference):
    return math.nan


def scorer(fn: str, **cfg) -> GroupScorer:
    return GroupScorer(RewardConfig(target=f"{__name__}.{fn}", **cfg))


def group_of(texts, meta=None):
    g = make_group(rewards=[0.0] * len(texts))
    comps = [dataclasses.replace(c, text=t) for c, t in zip(g.completions, texts)]
    return dataclasses.replace(g, completions=comps, rewards=None, meta=dict(meta or {}))


@pytest.fixture(autouse=True)
def _clear_calls():
    CALLS.clear()


# -------------------------------------------------------------------------- signatures


def test_a_two_argument_function_still_works_and_gets_no_keywords():
    s = scorer("two_args")
    assert s.keywords == ()
    g = s.score_group(group_of(["2", "3"], meta={"prompt": CHAT, "row": ROW}))
    assert g.rewards.tolist() == [1.0, 0.25] and g.reward_failures == 0
    assert "scores" not in g.meta


def test_keyword_only_prompt_and_meta_come_from_the_groups_meta():
    s = scorer("keyword_only")
    assert s.keywords == ("prompt", "meta")
    g = s.score_group(group_of(["2", "5"], meta={"prompt": CHAT, "row": ROW}))
    assert g.rewards.tolist() == [2.0, 2.0] and g.reward_failures == 0
    assert CALLS == [
        {"completion": "2", "reference": "2", "prompt": CHAT, "meta": ROW},
        {"completion": "5", "reference": "2", "prompt": CHAT, "meta": ROW},
    ]


def test_without_the_producers_keys_prompt_is_the_group_prompt_and_meta_is_empty():
    g = scorer("keyword_only").score_group(group_of(["2"]))
    assert CALLS == [{"completion": "2", "reference": "2", "prompt": "1+1=", "meta": {}}]
    assert g.rewards.tolist() == [0.0]


def test_only_the_keywords_a_function_takes_are_passed():
    scorer("prompt_only").score_group(group_of(["2"], meta={"prompt": "raw 1+1=", "row": ROW}))
    assert CALLS == [{"prompt": "raw 1+1="}]


def test_a_var_keyword_function_gets_both():
    s = scorer("var_keywords")
    assert s.keywords == ("prompt", "meta")
    g = s.score_group(group_of(["2"], meta={"prompt": CHAT, "row": ROW}))
    assert CALLS == [{"prompt": CHAT, "meta": ROW}] and g.rewards.tolist() == [0.5]


def test_a_positional_prompt_with_a_default_is_passed_by_keyword():
    assert scorer("defaulted_positional_prompt").keywords == ("prompt",)
    scorer("defaulted_positional_prompt").score_group(group_of(["2"], meta={"prompt": "raw"}))
    assert CALLS == [{"prompt": "raw"}]


@pytest.mark.parametrize(
    "fn, why",
    [
        ("third_positional", "positional parameter 'question' has no default"),
        ("prompt_as_third_positional", "positional parameter 'prompt' has no default"),
        ("unknown_keyword", "missing a required argument: 'difficulty'"),
        ("prompt_in_reference_slot", "positional parameter 'reference' has no default"),
    ],
)
def test_a_signature_rlsys_cannot_call_is_refused_with_the_accepted_forms(fn, why):
    with pytest.raises(ValueError) as e:
        scorer(fn)
    msg = str(e.value)
    assert msg.startswith(f"reward.target={__name__}.{fn} has the signature {fn}(")
    assert "which rlsys cannot call with (completion, reference)" in msg
    assert why in msg
    assert f"def {fn}(completion, reference, *, prompt, meta)" in msg
    assert f"def {fn}(completion, reference, **kwargs)" in msg


def test_keywords_are_decided_once_from_the_signature():
    assert reward_keywords(lambda c, r: 1.0) == ()
    assert reward_keywords(lambda c, r, *, meta: 1.0) == ("meta",)
    assert reward_keywords(lambda c, r, *a, prompt=None, **kw: 1.0) == ("prompt", "meta")
    assert reward_keywords(lambda *a, **kw: 1.0) == ("prompt", "meta")
    assert reward_keywords(max) == ()  # a builtin without a signature: called with two arguments


# ----------------------------------------------------------------------- return values


def test_call_with_timeout_returns_the_reward_and_the_extras():
    assert call_with_timeout(two_args, "2", "2", 5.0) == RewardValue(1.0, {})
    value = call_with_timeout(with_extras, "2", "2", 5.0)
    assert value.reward == 1.0 and value.extras == {"format": 1.0, "length_penalty": pytest.approx(-0.1)}
    assert all(type(v) is float for v in value.extras.values())
    kw = call_with_timeout(keyword_only, "2", "2", 5.0, kwargs={"prompt": "p", "meta": {"difficulty": 3}})
    assert kw == RewardValue(3.0, {})


def test_extras_are_stored_per_completion_aligned_and_survive_the_replay_codec():
    s = scorer("extras_by_text", failure_reward=-1.0)
    g = s.score_group(group_of(["a", "only_reward", "ab", "boom"], meta={"row": ROW}))
    assert g.rewards.tolist() == [1.0, 0.5, 0.0, -1.0] and g.reward_failures == 1
    assert g.meta["scores"] == {"a": [2.0, None, 3.0, None], "b": [None, None, 0.5, None]}
    assert g.meta["row"] == ROW  # the rest of meta is kept
    back = decode_group(encode_group(g))
    assert back.meta == g.meta and back.rewards.tolist() == g.rewards.tolist()


def test_scoring_does_not_modify_the_input_group_and_drops_stale_scores():
    g = group_of(["2"], meta={"scores": {"old": [1.0]}, "row": ROW})
    scored = scorer("two_args").score_group(g)
    assert "scores" not in scored.meta and scored.meta["row"] == ROW
    assert g.meta["scores"] == {"old": [1.0]} and g.rewards is None
    rescored = scorer("with_extras").score_group(g)
    assert rescored.meta["scores"] == {"format": [1.0], "length_penalty": [pytest.approx(-0.1)]}


@pytest.mark.parametrize(
    "fn, message",
    [
        ("no_reward_key", "returned a dict without a 'reward' key (keys: ['score'])"),
        ("nan_reward_in_dict", "returned a dict whose 'reward' is non-finite value nan"),
        ("string_extra", "returned a dict whose 'format' is str 'ok', expected a float"),
        ("nan_extra", "returned a dict whose 'format' is non-finite value inf"),
        ("bool_extra", "returned a dict whose 'format' is bool True, expected a float"),
        ("int_key", "returned a dict with the key 3 of type int, expected str"),
        ("string_reward", "returned str '1.0', expected a float"),
        ("nan_reward", "returned non-finite value nan"),
    ],
)
def test_a_bad_return_value_is_a_counted_failure_with_a_clear_message(fn, message, caplog):
    with pytest.raises(RewardFunctionError) as e:
        call_with_timeout(globals()[fn], "2", "2", 5.0)
    assert str(e.value).startswith(message)
    g = scorer(fn, failure_reward=-1.0).score_group(group_of(["2", "3"]))
    assert g.rewards.tolist() == [-1.0, -1.0] and g.reward_failures == 2
    assert "scores" not in g.meta
    logged = [r.getMessage() for r in caplog.records if "failed on group" in r.getMessage()]
    assert len(logged) == 1 and message in logged[0]  # the kind is logged once, then counted

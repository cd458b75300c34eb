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


SEEN: list[tuple] = []


def by_prompt_and_row(completion: str, reference: str, *, prompt, meta) -> dict:
    SEEN.append((prompt, meta))
    right = completion.strip() == reference.strip()
    return {"reward": float(right) * meta.get("weight", 1.0), "format": float(completion.startswith("A:"))}


def test_a_prompt_and_meta_aware_reward_gets_each_prompts_values_and_reports_extras():
    SEEN.clear()
    scorer = EvalScorer(RewardConfig(target=f"{__name__}.by_prompt_and_row"))
    chat = [{"role": "user", "content": "1+1="}]
    scores = scorer.score(["A: 2", "3", "4"], ["A: 2", "3", "5"], ["1+1=", chat, "2+2="], [{}, {"weight": 0.5}, {}])
    assert SEEN == [("1+1=", {}), (chat, {"weight": 0.5}), ("2+2=", {})]
    assert scores.correct == [True, False, False]  # 0.5 is partial credit
    assert scores.extras == {"format": [1.0, 0.0, 0.0]}
    assert scores.extra_means() == {"format": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="3 completions, 3 references, 2 prompts and 3 metas"):
        scorer.score(["1", "2", "3"], ["1", "2", "3"], ["p", "q"], [{}, {}, {}])


def test_greedy_evaluation_passes_the_raw_prompt_and_the_row_to_the_reward():
    import asyncio
    from types import SimpleNamespace

    from rlsys.controller.evaluation import greedy_accuracy, greedy_evaluation
    from rlsys.scheduling.scheduler import Prompt

    chat = [{"role": "user", "content": "q1"}]
    prompts = [
        Prompt("a", "templated q0", (1,), "A: 0"),
        Prompt("b", "templated q1", (2,), "A: 1", raw_prompt=chat, meta={"weight": 1.0}),
        Prompt("c", "templated q2", (3,), "A: 2", meta={"weight": 0.5}),
    ]

    async def answer(batch):  # a rollout worker: echoes the reference of each prompt id
        return [f"A: {ids[0] - 1}" for ids in batch]

    workers = [SimpleNamespace(generate_greedy=SimpleNamespace(remote=answer)) for _ in range(2)]
    scorer = EvalScorer(RewardConfig(target=f"{__name__}.by_prompt_and_row"))
    SEEN.clear()
    result = asyncio.run(greedy_evaluation(workers, prompts, 10.0, scorer))
    assert sorted(SEEN, key=str) == sorted(
        [("templated q0", {}), (chat, {"weight": 1.0}), ("templated q2", {"weight": 0.5})], key=str
    )
    assert result.accuracy == pytest.approx(2 / 3) and result.extra_means == {"format": 1.0}
    assert asyncio.run(greedy_accuracy(workers, prompts, 10.0, scorer)) == pytest.approx(2 / 3)


def test_sampled_evaluation_reports_mean_and_pass_at_k_and_sample_completions():
    import asyncio
    from types import SimpleNamespace

    from rlsys.controller.evaluation import evaluate_prompts
    from rlsys.scheduling.scheduler import Prompt

    prompts = [Prompt(f"p{i}", f"{i}+0=", (i,), str(i)) for i in range(4)]

    async def greedy(batch):
        return [str(ids[0]) if ids[0] < 2 else "x" for ids in batch]  # p0, p1 right

    async def samples(batch, n, temperature):
        assert n == 4 and temperature == 0.7
        # p0: 4 of 4 right, p1: 1 of 4, p2: 0 of 4, p3: 2 of 4
        right = {0: 4, 1: 1, 2: 0, 3: 2}
        return [[str(ids[0])] * right[ids[0]] + ["x"] * (n - right[ids[0]]) for ids in batch]

    workers = [
        SimpleNamespace(
            generate_greedy=SimpleNamespace(remote=greedy), generate_samples=SimpleNamespace(remote=samples)
        )
        for _ in range(3)
    ]
    scorer = EvalScorer(RewardConfig(function="exact_match"))
    res = asyncio.run(evaluate_prompts(workers, prompts, 10.0, scorer, samples=4, temperature=0.7, examples=2))
    assert res.accuracy == 0.5 and res.k == 4
    assert res.mean_at_k == pytest.approx(7 / 16) and res.pass_at_k == 0.75
    assert len(res.examples) == 2 and {"prompt", "completion", "reference", "correct"} <= set(res.examples[0])
    for x in res.examples:  # each example is its prompt's own completion
        assert x["correct"] == (x["completion"] == x["reference"])

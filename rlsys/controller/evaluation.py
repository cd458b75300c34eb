"""Held-out evaluation: greedy completions of the eval prompts, scored by the run's reward.

Accuracy is the share of prompts whose greedy completion gets the full reward (>= ``FULL_REWARD``)
from the configured reward function (``reward.function`` / ``reward.target``; in the reward-model
modes, that rule function), each call under ``reward.timeout_s``: a call that raises, hangs or
returns no finite number scores as wrong and is counted in a warning. The prompts are sharded
round-robin over the live workers; the shard of a worker that is dead or past
``rollout.call_timeout_s`` goes to one that answered, so an evaluation survives a worker
failure (the worker itself is replaced by its rollout loop).
"""

from __future__ import annotations

import asyncio
import logging

from rlsys.reward.worker import CallThread, RewardConfig, RewardFunctionError, call_with_timeout, check_reward_fn
from rlsys.scheduling.scheduler import Prompt
from rlsys.supervision import describe, is_worker_failure, with_deadline

log = logging.getLogger(__name__)

FULL_REWARD = 1.0
"""A completion is correct when the reward function gives it at least this (the built-in rewards
give 1.0 to a right answer; partial credit counts as wrong)."""


class EvalScorer:
    """Whether a completion is correct, by the run's reward function (scored in the controller)."""

    def __init__(self, cfg: RewardConfig):
        self.fn = check_reward_fn(cfg)
        self.name = cfg.target or cfg.function
        self.timeout_s = cfg.timeout_s
        self._thread = CallThread("eval-reward")

    def correct(self, completions: list[str], references: list[str]) -> list[bool]:
        out, failures, first = [], 0, None
        for text, ref in zip(completions, references):
            try:
                out.append(call_with_timeout(self.fn, text, ref, self.timeout_s, self._thread) >= FULL_REWARD)
            except RewardFunctionError as e:
                out.append(False)
                failures, first = failures + 1, first or e
        if failures:
            log.warning(
                "evaluation: reward %s failed on %d of %d completions (scored as wrong); first: %s",
                self.name,
                failures,
                len(out),
                first,
            )
        return out


async def greedy_accuracy(workers: list, prompts: list[Prompt], call_timeout_s: float, scorer: EvalScorer) -> float:
    shards = [prompts[i :: len(workers)] for i in range(len(workers))]

    def greedy(w, shard):
        return with_deadline(w.generate_greedy.remote([list(p.prompt_token_ids) for p in shard]), call_timeout_s)

    outs = await asyncio.gather(*[greedy(w, s) for w, s in zip(workers, shards)], return_exceptions=True)
    for o in outs:
        if isinstance(o, BaseException) and not is_worker_failure(o):
            raise o
    healthy = [w for w, o in zip(workers, outs) if not isinstance(o, BaseException)]
    for i, o in enumerate(outs):
        if isinstance(o, BaseException):
            if not healthy:
                raise RuntimeError("no rollout worker answered the evaluation") from o
            log.warning("evaluation: a rollout worker %s; its shard goes to another worker", describe(o))
            outs[i] = await greedy(healthy[0], shards[i])
    texts = [text for o in outs for text in o]
    refs = [p.reference for s in shards for p in s]
    correct = await asyncio.to_thread(scorer.correct, texts, refs)  # a slow reward must not stall the loops
    return sum(correct) / max(len(prompts), 1)

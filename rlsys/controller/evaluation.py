"""Held-out evaluation: greedy (and optionally sampled) completions of the eval prompts, scored
by the run's reward.

Accuracy is the share of prompts whose greedy completion gets the full reward (>= ``FULL_REWARD``)
from the configured reward function (``reward.function`` / ``reward.target``; in the reward-model
modes, that rule function), each call under ``reward.timeout_s`` and with the prompt's ``prompt=``
/ ``meta=`` keywords when the function takes them (as in training): a call that raises, hangs or
returns no finite number scores as wrong and is counted in a warning. Extra scores a function
returns (a dict return) are averaged per name over the completions that have them. The prompts
are sharded round-robin over the live workers; the shard of a worker that is dead or past
``rollout.call_timeout_s`` goes to one that answered, so an evaluation survives a worker
failure (the worker itself is replaced by its rollout loop). With ``eval.samples=k`` each prompt
also gets k sampled completions (``eval.temperature``): mean@k is the share of them that are
correct, pass@k the share of prompts with at least one correct.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

from rlsys.reward.worker import (
    CallThread,
    RewardConfig,
    RewardFunctionError,
    aligned_scores,
    call_with_timeout,
    check_reward_fn,
    reward_kwargs,
    score_means,
)
from rlsys.scheduling.scheduler import Prompt
from rlsys.supervision import describe, is_worker_failure, with_deadline

log = logging.getLogger(__name__)

FULL_REWARD = 1.0
"""A completion is correct when the reward function gives it at least this (the built-in rewards
give 1.0 to a right answer; partial credit counts as wrong)."""


@dataclass
class EvalScores:
    """Scored eval completions: whether each is correct, and the extra scores per completion."""

    correct: list[bool]
    extras: dict[str, list[Optional[float]]] = field(default_factory=dict)
    """``{name: [value or None per completion]}`` (None: the call failed or returned no such name)."""

    def extra_means(self) -> dict[str, float]:
        """Each extra score's mean over the completions that have it."""
        return score_means(self.extras)


@dataclass
class EvalResult:
    accuracy: float
    """Share of prompts whose greedy completion gets the full reward."""
    extra_means: dict[str, float] = field(default_factory=dict)
    k: int = 0
    """Sampled completions per prompt (``eval.samples``); 0: greedy only."""
    mean_at_k: Optional[float] = None
    """Share of the k sampled completions that are correct, over all prompts."""
    pass_at_k: Optional[float] = None
    """Share of prompts with at least one correct completion among their k samples."""
    examples: list = field(default_factory=list)
    """A few greedy completions: ``{prompt_id, prompt, completion, reference, correct}``."""
    """Mean of each extra score the reward function returned (a dict return), by name."""


class EvalScorer:
    """Whether a completion is correct, by the run's reward function (scored in the controller)."""

    def __init__(self, cfg: RewardConfig):
        self.fn, self.keywords = check_reward_fn(cfg)
        self.name = cfg.target or cfg.function
        self.timeout_s = cfg.timeout_s
        self._thread = CallThread("eval-reward")

    def score(
        self,
        completions: list[str],
        references: list[str],
        prompts: Optional[Sequence[object]] = None,
        metas: Optional[Sequence[dict]] = None,
    ) -> EvalScores:
        """Score each completion against its reference; ``prompts`` / ``metas`` (one per completion:
        the original prompt, the dataset row's other columns) go to a function that takes them
        (absent: "" and {})."""
        n = len(completions)
        prompts = [""] * n if prompts is None else prompts
        metas = [{}] * n if metas is None else metas
        if not len(references) == len(prompts) == len(metas) == n:
            raise ValueError(
                f"evaluation: {n} completions, {len(references)} references, {len(prompts)} prompts and "
                f"{len(metas)} metas; expected as many of each"
            )
        correct, extras, failures, first = [], [], 0, None
        for text, ref, prompt, meta in zip(completions, references, prompts, metas):
            kwargs = reward_kwargs(self.keywords, prompt, meta)
            try:
                value = call_with_timeout(self.fn, text, ref, self.timeout_s, self._thread, kwargs)
            except RewardFunctionError as e:
                correct.append(False)
                extras.append({})
                failures, first = failures + 1, first or e
                continue
            correct.append(value.reward >= FULL_REWARD)
            extras.append(value.extras)
        if failures:
            log.warning(
                "evaluation: reward %s failed on %d of %d completions (scored as wrong); first: %s",
                self.name,
                failures,
                n,
                first,
            )
        return EvalScores(correct, aligned_scores(extras))

    def correct(
        self,
        completions: list[str],
        references: list[str],
        prompts: Optional[Sequence[object]] = None,
        metas: Optional[Sequence[dict]] = None,
    ) -> list[bool]:
        """Whether each completion is correct (``score(...).correct``)."""
        return self.score(completions, references, prompts, metas).correct


async def _sharded(workers: list, prompts: list[Prompt], call_timeout_s: float, call) -> list:
    """``call(worker, shard)`` over round-robin shards of ``prompts``; the shard of a dead or hung
    worker goes to one that answered. Returns the outputs in shard order (see :func:`_in_shard_order`)."""
    shards = [prompts[i :: len(workers)] for i in range(len(workers))]

    def run(w, shard):
        return with_deadline(call(w, [list(p.prompt_token_ids) for p in shard]), call_timeout_s)

    outs = await asyncio.gather(*[run(w, s) for w, s in zip(workers, shards)], return_exceptions=True)
    for o in outs:
        if isinstance(o, BaseException) and not is_worker_failure(o):
            raise o
    healthy = [w for w, o in zip(workers, outs) if not isinstance(o, BaseException)]
    for i, o in enumerate(outs):
        if isinstance(o, BaseException):
            if not healthy:
                raise RuntimeError("no rollout worker answered the evaluation") from o
            log.warning("evaluation: a rollout worker %s; its shard goes to another worker", describe(o))
            outs[i] = await run(healthy[0], shards[i])
    return [x for o in outs for x in o]


def _in_shard_order(prompts: list[Prompt], n_workers: int) -> list[Prompt]:
    return [p for i in range(n_workers) for p in prompts[i::n_workers]]


async def evaluate_prompts(
    workers: list,
    prompts: list[Prompt],
    call_timeout_s: float,
    scorer: EvalScorer,
    samples: int = 0,
    temperature: float = 1.0,
    examples: int = 0,
) -> EvalResult:
    """Greedy accuracy of ``prompts`` (and extra-score means); with ``samples=k``, also mean@k and
    pass@k over k sampled completions per prompt at ``temperature``; ``examples`` greedy
    completions kept for the run directory and the report."""
    ordered = _in_shard_order(prompts, len(workers))
    refs = [p.reference for p in ordered]
    raw = [p.prompt if p.raw_prompt is None else p.raw_prompt for p in ordered]
    metas = [p.meta for p in ordered]
    texts = await _sharded(workers, prompts, call_timeout_s, lambda w, ids: w.generate_greedy.remote(ids))
    scores = await asyncio.to_thread(scorer.score, texts, refs, raw, metas)  # a slow reward must not stall the loops
    result = EvalResult(sum(scores.correct) / max(len(prompts), 1), scores.extra_means())
    result.examples = [
        {"prompt_id": p.prompt_id, "prompt": p.prompt, "completion": t, "reference": p.reference, "correct": c}
        for p, t, c in list(zip(ordered, texts, scores.correct))[:examples]
    ]
    if samples:
        groups = await _sharded(
            workers,
            prompts,
            call_timeout_s,
            lambda w, ids: w.generate_samples.remote(ids, samples, temperature),
        )
        flat = [t for g in groups for t in g]
        rep = [x for x in range(len(ordered)) for _ in range(samples)]
        sampled = await asyncio.to_thread(
            scorer.score, flat, [refs[i] for i in rep], [raw[i] for i in rep], [metas[i] for i in rep]
        )
        per_prompt = [sampled.correct[i * samples : (i + 1) * samples] for i in range(len(ordered))]
        result.mean_at_k = sum(map(sum, per_prompt)) / max(len(flat), 1)
        result.pass_at_k = sum(any(c) for c in per_prompt) / max(len(per_prompt), 1)
        result.k = samples
    return result


async def greedy_evaluation(
    workers: list, prompts: list[Prompt], call_timeout_s: float, scorer: EvalScorer
) -> EvalResult:
    """Greedy completions of ``prompts`` on ``workers``, scored: the accuracy and mean extra scores."""
    return await evaluate_prompts(workers, prompts, call_timeout_s, scorer)


async def greedy_accuracy(workers: list, prompts: list[Prompt], call_timeout_s: float, scorer: EvalScorer) -> float:
    """The share of ``prompts`` whose greedy completion is correct (``greedy_evaluation(...).accuracy``)."""
    return (await greedy_evaluation(workers, prompts, call_timeout_s, scorer)).accuracy

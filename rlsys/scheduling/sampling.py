"""Sampling strategies that take more than one generation round per prompt.

The scheduler decides *how many* rollouts each prompt starts with (``allocate``); this
module runs the rounds that follow, for one batch of requests on one rollout worker:

* ``uniform`` / ``knapsack``: one round; the counts are final.
* ``ar3po`` (arXiv 2509.25808): S stages of k. After each stage, prompts that already have a
  correct response leave the pool; the rest get k more (the follow-up requests go to the same
  worker, whose prefix cache still holds the prompt). A prompt that ends all S stages with no
  correct response gets a stored correct response from an earlier step swapped in for its
  last one, with stop-gradient (listed in ``meta[STOP_GRADIENT]``: it moves the group
  baseline but is not trained on).
* ``dapo`` (arXiv 2503.14476): groups whose rewards are all equal carry no gradient; they are
  filtered out (counted) and their admission slots released, so producers sample more prompts
  until the batch is full. The retry cap: at most ``(dapo_max_rounds - 1) * M`` groups are
  filtered per learner version; after that groups are kept as they come (the batch then
  carries some zero-gradient groups rather than stalling).

A group whose stages ran under different policy versions (a weight update landed between
stages) carries the oldest version — the conservative choice for the staleness bound; each
completion's behaviour logprobs stay exact, so the importance-sampling correction holds.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

import numpy as np

from rlsys.records import STOP_GRADIENT, Completion, Group, RolloutRequest
from rlsys.scheduling.allocation import dapo_keep
from rlsys.scheduling.scheduler import SchedulerConfig

Generate = Callable[[list[RolloutRequest]], Awaitable["object"]]  # -> RolloutResult
Score = Callable[[list[Group]], Awaitable[list[Group]]]

CORRECT = 0.5
"""A response whose reward is at least this counts as correct (binary verifiable rewards)."""


@dataclass
class RoundStats:
    samples: int = 0
    tokens: int = 0
    generate_seconds: float = 0.0
    reward_seconds: float = 0.0
    rounds: int = 0
    filtered: int = 0
    reused: int = 0
    switched: int = 0
    carried: int = 0
    """Groups the worker still carries over after the last round (partial rollouts)."""


class CorrectBank:
    """One stored correct completion per prompt (bounded, least recently stored evicted)."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[Completion, float]] = OrderedDict()

    def remember(self, group: Group) -> None:
        best = int(np.argmax(group.rewards))
        if group.rewards[best] >= CORRECT and best not in group.meta.get(STOP_GRADIENT, []):
            self._items[group.prompt_id] = (group.completions[best], float(group.rewards[best]))
            self._items.move_to_end(group.prompt_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, prompt_id: str) -> Optional[tuple[Completion, float]]:
        return self._items.get(prompt_id)


def merge(a: Group, b: Group) -> Group:
    """b's completions appended to a's (same prompt, a later stage)."""
    return dataclasses.replace(
        a,
        completions=a.completions + b.completions,
        rewards=np.concatenate([a.rewards, b.rewards]),
        reward_failures=a.reward_failures + b.reward_failures,
        policy_version=min(a.policy_version, b.policy_version),
    )


def reuse_correct(group: Group, bank: CorrectBank) -> Group:
    """Swap a stored correct response into a group with none (stop-gradient on it)."""
    if group.size == 0 or (group.rewards >= CORRECT).any():
        return group
    stored = bank.get(group.prompt_id)
    if stored is None:
        return group
    completion, reward = stored
    i = group.size - 1
    rewards = group.rewards.copy()
    rewards[i] = reward
    meta = {**group.meta, STOP_GRADIENT: sorted(set(group.meta.get(STOP_GRADIENT, [])) | {i})}
    return dataclasses.replace(
        group, completions=group.completions[:i] + [completion] + group.completions[i + 1 :], rewards=rewards, meta=meta
    )


@dataclass
class Sampler:
    """Runs one batch of requests through generation and scoring under the strategy."""

    cfg: SchedulerConfig
    bank: CorrectBank = field(default_factory=CorrectBank)
    _filtered_at: dict = field(default_factory=dict)

    async def run(
        self, requests: list[RolloutRequest], generate: Generate, score: Score, learner_version: int
    ) -> tuple[list[Group], list[Group], RoundStats]:
        """Returns (groups to store, every scored group (for the scheduler's statistics), stats)."""
        stats = RoundStats()
        groups = await self._round(requests, generate, score, stats)
        if self.cfg.strategy == "ar3po":
            groups = await self._ar3po(requests, groups, generate, score, stats)
        kept = self._dapo_filter(groups, learner_version, stats) if self.cfg.strategy == "dapo" else groups
        for g in groups:
            self.bank.remember(g)
        return kept, groups, stats

    async def _round(self, requests, generate, score, stats: RoundStats) -> list[Group]:
        import time

        result = await generate(requests)
        t0 = time.perf_counter()
        groups = await score(result.groups) if result.groups else []  # a carrying call may return none
        stats.reward_seconds += time.perf_counter() - t0
        stats.generate_seconds += result.generate_seconds
        stats.tokens += result.num_tokens
        stats.switched += result.switched
        stats.carried = result.carried
        stats.samples += sum(g.size for g in groups)
        stats.rounds += 1
        return groups

    async def _ar3po(self, requests, groups, generate, score, stats: RoundStats) -> list[Group]:
        by_prompt = {g.prompt_id: g for g in groups}
        k = self.cfg.ar3po_stage_size
        for _stage in range(1, self.cfg.ar3po_stages):
            pool = [r for r in requests if not (by_prompt[r.prompt_id].rewards >= CORRECT).any()]
            if not pool:
                break
            more = await self._round([dataclasses.replace(r, n=k) for r in pool], generate, score, stats)
            for g in more:
                by_prompt[g.prompt_id] = merge(by_prompt[g.prompt_id], g)
        out = []
        for r in requests:
            g = by_prompt[r.prompt_id]
            if self.cfg.ar3po_reuse:
                swapped = reuse_correct(g, self.bank)
                stats.reused += swapped is not g
                g = swapped
            out.append(g)
        return out

    def _dapo_filter(self, groups: list[Group], learner_version: int, stats: RoundStats) -> list[Group]:
        allowance = (self.cfg.dapo_max_rounds - 1) * self.cfg.prompts_per_step
        kept = []
        for g in groups:
            used = self._filtered_at.get(learner_version, 0)
            if not dapo_keep(g.rewards) and used < allowance:
                self._filtered_at[learner_version] = used + 1
                stats.filtered += 1
            else:
                kept.append(g)
        for v in [v for v in self._filtered_at if v < learner_version - 8]:
            del self._filtered_at[v]
        return kept

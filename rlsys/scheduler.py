"""BudgetScheduler: which prompts to roll out next, and how many samples each gets.

The allocation seam is a pure function, arrays in and counts out::

    counts = allocate(strategy, success_rate, observed, budget, min_per_prompt, max_per_prompt)

Today the only strategy is ``uniform`` (every prompt gets budget / M). The knapsack solver
of ALGORITHMS.md §1 plugs in here as another strategy (issue 4); it reads the same per-prompt
statistics the scheduler already keeps (``PromptStats``).

The scheduler itself is a small stateful object: an epoch-shuffled pass over the training
prompts, per-prompt outcome statistics fed back from scored groups, and ``state_dict`` for
resume. The controller runs it as a Ray actor (``scheduler`` role); it is unit-tested without Ray.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rlsys.records import RolloutRequest

log = logging.getLogger(__name__)

STRATEGIES = ("uniform",)


@dataclass
class SchedulerConfig:
    """How many prompts per step and how many rollouts per prompt."""

    strategy: str = "uniform"
    """Allocation strategy; one of: uniform (knapsack, ar3po, dapo arrive in issue 4)."""
    prompts_per_step: int = 16
    """M: prompts per learner step (one group per prompt)."""
    samples_per_prompt: int = 8
    """n: the uniform group size; the step's rollout budget is B = M * n."""
    min_per_prompt: int = 2
    """Lower bound N_low on any prompt's rollouts (used by non-uniform strategies)."""
    max_per_prompt: int = 64
    """Upper bound N_up on any prompt's rollouts (used by non-uniform strategies)."""
    history: int = 16
    """Per-prompt outcome window used to estimate its success rate."""
    seed: int = 0
    """Shuffling seed for the pass over the training prompts."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"scheduler.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.prompts_per_step < 1 or self.samples_per_prompt < 1:
            raise ValueError("scheduler.prompts_per_step and scheduler.samples_per_prompt must be >= 1")
        if not (1 <= self.min_per_prompt <= self.max_per_prompt):
            raise ValueError(
                "set scheduler.max_per_prompt >= scheduler.min_per_prompt >= 1 "
                f"(got min {self.min_per_prompt}, max {self.max_per_prompt})"
            )
        if self.history < 1:
            raise ValueError(f"scheduler.history must be >= 1, got {self.history}")

    @property
    def budget(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


def allocate(
    strategy: str,
    success_rate: np.ndarray,
    observed: np.ndarray,
    budget: int,
    min_per_prompt: int,
    max_per_prompt: int,
) -> np.ndarray:
    """Rollout counts per prompt (int64 [M]) summing to ``budget``.

    success_rate: float [M] estimated p̂ per prompt (NaN when unseen); observed: int [M]
    rollouts seen per prompt. Uniform ignores both and spreads the budget evenly (the first
    ``budget % M`` prompts get one more).
    """
    m = len(success_rate)
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    if strategy == "uniform":
        counts = np.full(m, budget // m, dtype=np.int64)
        counts[: budget % m] += 1
        return counts
    raise ValueError(f"unknown allocation strategy {strategy!r}")


class PromptStats:
    """Recent binary-ish outcomes per prompt (a window of the last ``history`` rewards)."""

    def __init__(self, history: int):
        self.history = history
        self._outcomes: dict[str, deque] = {}
        self._seen: dict[str, int] = {}

    def observe(self, prompt_id: str, rewards: Sequence[float]) -> None:
        window = self._outcomes.setdefault(prompt_id, deque(maxlen=self.history))
        window.extend(float(r) for r in rewards)
        self._seen[prompt_id] = self._seen.get(prompt_id, 0) + len(rewards)

    def success_rate(self, prompt_ids: Sequence[str]) -> np.ndarray:
        return np.array(
            [np.mean(self._outcomes[p]) if p in self._outcomes else np.nan for p in prompt_ids], dtype=np.float64
        )

    def observed(self, prompt_ids: Sequence[str]) -> np.ndarray:
        return np.array([self._seen.get(p, 0) for p in prompt_ids], dtype=np.int64)

    def state_dict(self) -> dict:
        return {"outcomes": {k: list(v) for k, v in self._outcomes.items()}, "seen": dict(self._seen)}

    def load_state_dict(self, state: dict) -> None:
        self._outcomes = {k: deque(v, maxlen=self.history) for k, v in state["outcomes"].items()}
        self._seen = dict(state["seen"])


@dataclass(frozen=True)
class Prompt:
    """A training prompt as the scheduler hands it out (already tokenized)."""

    prompt_id: str
    prompt: str
    prompt_token_ids: tuple[int, ...]
    reference: str


class BudgetScheduler:
    """Picks the next prompts (epoch-shuffled) and allocates rollouts to them."""

    def __init__(self, cfg: SchedulerConfig, prompts: Sequence[Prompt]):
        if not prompts:
            raise ValueError("the scheduler needs at least one training prompt")
        self.cfg = cfg
        self._prompts = list(prompts)
        self._rng = np.random.default_rng(cfg.seed)
        self._order = self._rng.permutation(len(self._prompts))
        self._cursor = 0
        self._epoch = 0
        self.stats = PromptStats(cfg.history)

    def _next_prompts(self, k: int) -> list[Prompt]:
        out = []
        while len(out) < k:
            if self._cursor == len(self._order):
                self._epoch += 1
                self._order = self._rng.permutation(len(self._prompts))
                self._cursor = 0
            out.append(self._prompts[self._order[self._cursor]])
            self._cursor += 1
        return out

    def plan(self, num_prompts: int | None = None) -> list[RolloutRequest]:
        """Requests for the next ``num_prompts`` prompts (default: one step's worth)."""
        m = num_prompts or self.cfg.prompts_per_step
        prompts = self._next_prompts(m)
        ids = [p.prompt_id for p in prompts]
        budget = m * self.cfg.samples_per_prompt
        counts = allocate(
            self.cfg.strategy,
            self.stats.success_rate(ids),
            self.stats.observed(ids),
            budget,
            self.cfg.min_per_prompt,
            self.cfg.max_per_prompt,
        )
        return [
            RolloutRequest(p.prompt_id, p.prompt, p.prompt_token_ids, p.reference, int(n))
            for p, n in zip(prompts, counts)
            if n > 0
        ]

    def observe(self, outcomes: Sequence[tuple[str, Sequence[float]]]) -> None:
        """Feed back (prompt_id, rewards) of scored groups."""
        for prompt_id, rewards in outcomes:
            self.stats.observe(prompt_id, rewards)

    def state_dict(self) -> dict:
        return {
            "cursor": self._cursor,
            "epoch": self._epoch,
            "order": self._order.tolist(),
            "rng": self._rng.bit_generator.state,
            "stats": self.stats.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._cursor = state["cursor"]
        self._epoch = state["epoch"]
        self._order = np.array(state["order"], dtype=np.int64)
        self._rng.bit_generator.state = state["rng"]
        self.stats.load_state_dict(state["stats"])

"""BudgetScheduler: which prompts to roll out next, and how many samples each gets.

The allocation seam is a pure function, arrays in and counts out::

    counts = allocate(strategy, success_rate, observed, budget, min_per_prompt, max_per_prompt, ...)

Strategies (the solvers and their citations live in ``rlsys.scheduling.allocation``):

- ``uniform``: every prompt gets budget / M.
- ``knapsack`` (Knapsack RL, docs/algorithms.md §1): maximise sum V(N_i, p̂_i) at the same total B;
  p̂ comes from ``PromptStats`` (recent outcomes, optional Beta prior); a prompt with fewer
  than ``unseen_threshold`` observed rollouts is unseen and gets the uniform count.
- ``ar3po`` (docs/algorithms.md §3.1): the first stage, ``ar3po_stage_size`` per prompt; the
  controller runs the later stages for prompts without a correct response.
- ``dapo`` (docs/algorithms.md §3.2): the first round, n per prompt (as uniform); the controller
  resamples to replace groups with zero reward variance, up to ``dapo_max_rounds`` rounds.

The scheduler itself is a small stateful object: an epoch-shuffled pass over the training
prompts, per-prompt outcome statistics fed back from scored groups, and ``state_dict`` for
resume. The controller runs it as a Ray actor (``scheduler`` role); it is unit-tested without Ray.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from rlsys.records import RolloutRequest
from rlsys.scheduling.allocation import allocate_knapsack

log = logging.getLogger(__name__)

STRATEGIES = ("uniform", "knapsack", "ar3po", "dapo")


@dataclass
class SchedulerConfig:
    """How many prompts per step and how many rollouts per prompt."""

    strategy: str = "uniform"
    """Allocation strategy; one of: uniform, knapsack, ar3po, dapo (see the module docstring)."""
    prompts_per_step: int = 16
    """M: prompts per learner step (one group per prompt)."""
    samples_per_prompt: int = 8
    """n: the uniform group size; the step's rollout budget is B = M * n."""
    min_per_prompt: int = 2
    """Lower bound N_low on any prompt's rollouts (used by non-uniform strategies)."""
    max_per_prompt: int = 64
    """Upper bound N_up on any prompt's rollouts (used by non-uniform strategies)."""
    history: int = 16
    """Per-prompt outcome window used to estimate its success rate: the last ``history``
    rewards, or the whole last group when that group alone had at least ``history``."""
    unseen_threshold: int = 8
    """knapsack: a prompt with fewer observed rollouts than this is unseen and gets
    samples_per_prompt rollouts (its p̂ is too noisy to allocate on)."""
    prior_alpha: float = 0.0
    """Beta(alpha, beta) prior on success rates: p̂ = (successes + alpha) / (window + alpha + beta).
    0 with prior_beta 0 disables it (p̂ = the window mean). With alpha > 0 no seen prompt has
    p̂ = 0 (nor p̂ = 1 with beta > 0), so none falls under knapsack's p̂ = 0 / p̂ = 1 rules:
    the greedy ranks them by their smoothed p̂ instead."""
    prior_beta: float = 0.0
    """Beta prior's failure pseudo-count (see prior_alpha)."""
    zero_cap: int = 16
    """knapsack: most rollouts a p̂ = 0 prompt may take from the surplus that the mixed
    prompts cannot use (clipped to [min_per_prompt, max_per_prompt])."""
    ar3po_stages: int = 4
    """ar3po: S, the most generation stages per prompt (a prompt costs at most S * k)."""
    ar3po_stage_size: int = 2
    """ar3po: k, responses per prompt per stage; allocate() returns k for every prompt."""
    ar3po_reuse: bool = True
    """ar3po: swap a stored correct response (stop-gradient) into groups that have none."""
    dapo_max_rounds: int = 10
    """dapo: generation rounds per step, the first included (the retry cap, like the DAPO
    recipe's max_num_gen_batches); each later round samples as many prompts as the batch is
    short. 1 = no resampling. When the cap is hit the batch trains short."""
    max_prompts: int = 0
    """Train on only the first N training prompts (0 = all). Per-prompt statistics need prompts
    to recur: with a pool of N, each prompt comes back every N / prompts_per_step steps."""
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
        if self.unseen_threshold < 0:
            raise ValueError(f"scheduler.unseen_threshold must be >= 0, got {self.unseen_threshold}")
        if not (0 <= self.prior_alpha < math.inf and 0 <= self.prior_beta < math.inf):
            raise ValueError(
                f"scheduler.prior_alpha and scheduler.prior_beta must be finite numbers >= 0 (0 and 0 = no prior), "
                f"got {self.prior_alpha}, {self.prior_beta}"
            )
        if self.ar3po_stages < 1 or self.ar3po_stage_size < 1:
            raise ValueError(
                "scheduler.ar3po_stages and scheduler.ar3po_stage_size must be >= 1, "
                f"got {self.ar3po_stages}, {self.ar3po_stage_size}"
            )
        if self.max_prompts < 0:
            raise ValueError(f"scheduler.max_prompts must be >= 0 (0 = all), got {self.max_prompts}")
        if self.dapo_max_rounds < 1:
            raise ValueError(f"scheduler.dapo_max_rounds must be >= 1 (1 = no resampling), got {self.dapo_max_rounds}")
        if self.strategy == "knapsack":
            if not (self.min_per_prompt <= self.samples_per_prompt <= self.max_per_prompt):
                raise ValueError(
                    "knapsack keeps the uniform budget M * n within [M * min, M * max]: set "
                    "scheduler.min_per_prompt <= scheduler.samples_per_prompt <= scheduler.max_per_prompt "
                    f"(got {self.min_per_prompt}, {self.samples_per_prompt}, {self.max_per_prompt})"
                )
            if self.zero_cap < self.min_per_prompt:
                raise ValueError(
                    f"set scheduler.zero_cap >= scheduler.min_per_prompt (got {self.zero_cap} < {self.min_per_prompt})"
                )

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
    *,
    unseen_threshold: int = 0,
    zero_cap: int | None = None,
    ar3po_stage_size: int | None = None,
) -> np.ndarray:
    """Rollout counts per prompt (int64 [M]); they sum to ``budget`` except for ``ar3po``.

    success_rate: float [M] estimated p̂ per prompt (NaN when unseen); observed: int [M]
    rollouts seen per prompt.

    - uniform and dapo ignore both and spread the budget evenly (the first ``budget % M``
      prompts get one more).
    - knapsack: prompts with NaN p̂ or ``observed < unseen_threshold`` are unseen and get
      ``budget // M``; the rest follow ``allocation.allocate_knapsack`` (``zero_cap``: its
      p̂ = 0 surplus cap, None = uncapped). Raises ValueError when the budget is outside
      [M * min_per_prompt, M * max_per_prompt].
    - ar3po: ``ar3po_stage_size`` (k) for every prompt, whatever the budget (the first stage).
    """
    m = len(success_rate)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown allocation strategy {strategy!r}; expected one of {STRATEGIES}")
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    if strategy in ("uniform", "dapo"):
        counts = np.full(m, budget // m, dtype=np.int64)
        counts[: budget % m] += 1
        return counts
    if strategy == "ar3po":
        if ar3po_stage_size is None or ar3po_stage_size < 1:
            raise ValueError(f"ar3po needs ar3po_stage_size >= 1, got {ar3po_stage_size}")
        return np.full(m, ar3po_stage_size, dtype=np.int64)
    p = np.asarray(success_rate, dtype=np.float64)
    unseen = np.isnan(p) | (np.asarray(observed) < unseen_threshold)
    return allocate_knapsack(
        p, budget, min_per_prompt, max_per_prompt, unseen_mask=unseen, uniform_n=budget // m, zero_cap=zero_cap
    )


class PromptStats:
    """Recent outcomes per prompt, fed back from scored groups, and the p̂ estimate.

    Window (docs/algorithms.md §1): the last ``history`` rewards, or the whole last group when that
    group alone had at least ``history`` (a knapsack-sized group of 64 is all recent).
    ``success_rate = (sum(window) + alpha) / (len(window) + alpha + beta)`` for rewards in
    [0, 1] (alpha = beta = 0: the window mean). A prompt id never observed has p̂ NaN and
    ``observed`` 0 — the allocators treat it as unseen; this is not an error. ``observed``
    counts every rollout ever fed back, not just the window.
    """

    def __init__(self, history: int, prior_alpha: float = 0.0, prior_beta: float = 0.0):
        self.history = history
        self.prior_alpha = prior_alpha
        self.prior_beta = prior_beta
        self._outcomes: dict[str, list[float]] = {}
        self._seen: dict[str, int] = {}

    def observe(self, prompt_id: str, rewards: Sequence[float]) -> None:
        new = [float(r) for r in rewards]
        if len(new) >= self.history:
            self._outcomes[prompt_id] = new
        else:
            self._outcomes[prompt_id] = (self._outcomes.get(prompt_id, []) + new)[-self.history :]
        self._seen[prompt_id] = self._seen.get(prompt_id, 0) + len(new)

    def success_rate(self, prompt_ids: Sequence[str]) -> np.ndarray:
        a, b = self.prior_alpha, self.prior_beta
        out = np.full(len(prompt_ids), np.nan, dtype=np.float64)
        for j, p in enumerate(prompt_ids):
            w = self._outcomes.get(p)
            if w:
                out[j] = (sum(w) + a) / (len(w) + a + b)
        return out

    def observed(self, prompt_ids: Sequence[str]) -> np.ndarray:
        return np.array([self._seen.get(p, 0) for p in prompt_ids], dtype=np.int64)

    def state_dict(self) -> dict:
        return {"outcomes": {k: list(v) for k, v in self._outcomes.items()}, "seen": dict(self._seen)}

    def load_state_dict(self, state: dict) -> None:
        self._outcomes = {k: [float(r) for r in v] for k, v in state["outcomes"].items()}
        self._seen = dict(state["seen"])


@dataclass(frozen=True)
class Prompt:
    """A training prompt as the scheduler hands it out (already tokenized)."""

    prompt_id: str
    prompt: str
    prompt_token_ids: Sequence[int] = field(hash=False)
    """The tokens the policy sees (an ``array('i')`` from rlsys/data: compact for large data sets)."""
    reference: str
    raw_prompt: Any = field(default=None, hash=False)
    """The prompt as the data gave it (a string, or a list of ``{"role", "content"}`` messages);
    None: ``prompt``. The reward function sees it as ``prompt=``."""
    meta: dict = field(default_factory=dict, hash=False)
    """The data row's other columns (the reward function's ``meta=``)."""

    def request_data(self) -> dict:
        """``RolloutRequest.data``: empty unless the data gave more than the prompt text."""
        data = {}
        if self.raw_prompt is not None and self.raw_prompt != self.prompt:
            data["prompt"] = self.raw_prompt
        if self.meta:
            data["row"] = self.meta
        return data


class BudgetScheduler:
    """Picks the next prompts (epoch-shuffled) and allocates rollouts to them."""

    def __init__(self, cfg: SchedulerConfig, prompts: Sequence[Prompt]):
        if not prompts:
            raise ValueError("the scheduler needs at least one training prompt")
        self.cfg = cfg
        self._prompts = list(prompts)[: cfg.max_prompts or None]
        self._rng = np.random.default_rng(cfg.seed)
        self._order = self._rng.permutation(len(self._prompts))
        self._cursor = 0
        self._epoch = 0
        self.stats = PromptStats(cfg.history, cfg.prior_alpha, cfg.prior_beta)

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
            unseen_threshold=self.cfg.unseen_threshold,
            zero_cap=self.cfg.zero_cap,
            ar3po_stage_size=self.cfg.ar3po_stage_size,
        )
        return [
            RolloutRequest(p.prompt_id, p.prompt, p.prompt_token_ids, p.reference, int(n), p.request_data())
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

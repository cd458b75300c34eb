"""RewardWorker: scores whole groups with a rule verifier from a pluggable registry.

A reward function is ``fn(completion: str, reference: str) -> float``. Register one with
``@register_reward("name")`` and select it with ``reward.function=name``; or point
``reward.target`` at ``package.module.function`` (Hydra-style target) to plug in your own
without touching rlsys.

Failure rule: a reward function that raises, hangs past ``reward.timeout_s``, or returns
something that is not a finite number scores that completion ``reward.failure_reward``
and is counted in ``Group.reward_failures`` (and the ``rlsys_reward_failures_total``
metric). It never kills the run. The first failure of each kind is logged with the
exception, later ones only counted.

The fast reward model, the uncertainty router and the LLM judge (ALGORITHMS.md §2) arrive
with issue 5 as further stages of ``score_group``.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from rlsys.records import Group

log = logging.getLogger(__name__)

RewardFn = Callable[[str, str], float]
REWARD_FUNCTIONS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def deco(fn: RewardFn) -> RewardFn:
        if name in REWARD_FUNCTIONS:
            raise ValueError(f"reward function {name!r} is already registered")
        REWARD_FUNCTIONS[name] = fn
        return fn

    return deco


@register_reward("exact_match")
def exact_match(completion: str, reference: str) -> float:
    """1.0 if the stripped completion equals the reference answer, else 0.0."""
    return 1.0 if completion.strip() == reference.strip() else 0.0


@register_reward("numeric_match")
def numeric_match(completion: str, reference: str) -> float:
    """1.0 if both parse as the same number (so '007' matches '7'), else 0.0."""
    try:
        return 1.0 if float(completion.strip()) == float(reference.strip()) else 0.0
    except ValueError:
        return 0.0


@dataclass
class RewardConfig:
    """How groups are scored."""

    function: str = "exact_match"
    """Name of a registered reward function (see rlsys.reward.REWARD_FUNCTIONS)."""
    target: Optional[str] = None
    """Import path 'pkg.module.fn' of a custom reward function; overrides ``function``."""
    timeout_s: float = 5.0
    """A reward call running longer than this scores the completion as failed."""
    failure_reward: float = 0.0
    """Reward given to a completion whose reward function failed."""
    num_workers: int = 1
    """RewardWorker actors."""
    num_cpus: float = 0.25
    """Ray CPUs reserved per RewardWorker."""

    def __post_init__(self) -> None:
        if self.target is None and self.function not in REWARD_FUNCTIONS:
            raise ValueError(
                f"reward.function {self.function!r} is not registered; choose one of "
                f"{sorted(REWARD_FUNCTIONS)} or set reward.target=pkg.module.fn"
            )
        if self.timeout_s <= 0:
            raise ValueError(f"reward.timeout_s must be > 0, got {self.timeout_s}")
        if self.num_workers < 1:
            raise ValueError(f"reward.num_workers must be >= 1, got {self.num_workers}")


class RewardFunctionError(RuntimeError):
    """A reward function raised, hung, or returned a non-finite / non-numeric value."""


def resolve_reward_fn(cfg: RewardConfig) -> RewardFn:
    if cfg.target is not None:
        from hydra.utils import get_method  # Hydra's own target resolution

        try:
            return get_method(cfg.target)
        except Exception as e:  # ImportError / AttributeError wrapped by Hydra
            raise ValueError(f"reward.target {cfg.target!r} cannot be imported: {e}") from e
    return REWARD_FUNCTIONS[cfg.function]


def call_with_timeout(fn: RewardFn, completion: str, reference: str, timeout_s: float) -> float:
    """Run one reward call in a daemon thread; raise RewardFunctionError on any failure.

    A hung call's thread is abandoned (Python cannot kill threads); it is a daemon, so it
    never blocks shutdown. Reward functions are expected to be short and pure.
    """
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(completion, reference)
        except BaseException as e:  # noqa: BLE001 - reported to the caller, never swallowed
            box["error"] = e

    t = threading.Thread(target=run, daemon=True, name="reward-fn")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise RewardFunctionError(f"timed out after {timeout_s}s")
    if "error" in box:
        e = box["error"]
        raise RewardFunctionError(f"raised {type(e).__name__}: {e}") from e
    value = box.get("value")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardFunctionError(f"returned {type(value).__name__} {value!r}, expected a float")
    if not math.isfinite(float(value)):
        raise RewardFunctionError(f"returned non-finite value {value!r}")
    return float(value)


class GroupScorer:
    """Pure(ish) scoring core, used by the RewardWorker actor and directly in tests."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.fn = resolve_reward_fn(cfg)
        self.name = cfg.target or cfg.function
        self._reported: set[str] = set()

    def score_group(self, group: Group) -> Group:
        rewards = np.empty(group.size, dtype=np.float32)
        failures = 0
        for i, c in enumerate(group.completions):
            try:
                rewards[i] = call_with_timeout(self.fn, c.text, group.reference, self.cfg.timeout_s)
            except RewardFunctionError as e:
                rewards[i] = self.cfg.failure_reward
                failures += 1
                kind = str(e).split(" ")[0]
                if kind not in self._reported:
                    self._reported.add(kind)
                    log.error("reward function %r failed on group %s: %s (scored %s; further failures "
                              "of this kind are only counted)", self.name, group.group_id, e, self.cfg.failure_reward)
        return group.with_rewards(rewards, failures)


class RewardWorker:
    """Ray actor shell (``reward`` role) around GroupScorer."""

    def __init__(self, cfg: RewardConfig):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.scorer = GroupScorer(cfg)

    def score(self, groups: list[Group]) -> list[Group]:
        return [self.scorer.score_group(g) for g in groups]

    def ready(self) -> bool:
        return True

"""The replay store: the asynchronous hand-off from rollout and reward to the learner.

``base`` holds the contract every backend keeps (staleness bound, admission, acknowledgement)
and the in-process store; ``redis_store`` the Redis backend; ``codec`` the safe record format
Redis carries. :func:`make_store` picks the configured backend.
"""

from __future__ import annotations

from rlsys.replay.base import InProcessReplayStore, ReplayConfig, ReplayStore


def make_store(cfg: ReplayConfig, groups_per_step: int, run_id: str, consumer: str = "controller") -> ReplayStore:
    """The configured backend (``replay.backend``). The Redis client is imported only when a run
    asks for it."""
    if cfg.backend == "redis":
        from rlsys.replay.redis_store import RedisReplayStore

        return RedisReplayStore(cfg, groups_per_step, run_id=run_id, consumer=consumer)
    return InProcessReplayStore(cfg, groups_per_step)

"""Durability through faults, end to end on the Redis backend (real Ray, vLLM, DeepSpeed, Redis).

Accounting asserted after each run: groups produced (put) = trained (acked) + dropped as stale
+ rejected + still held by the store, with every trained group id committed exactly once.
"""

import asyncio
import threading
import uuid

import pytest
from helpers import RedisServer, run_recording

from rlsys.config import compose, to_run_config
from rlsys.controller.loop import Controller

pytestmark = pytest.mark.integration


def _controller(tmp_path, url, steps, extra=()):
    cfg = to_run_config(
        compose(
            [
                f"steps={steps}",
                "replay=redis",
                f"replay.redis.url={url}",
                f"replay.redis.run_id=t{uuid.uuid4().hex[:8]}",
                "cluster.metrics_port=-1",
                "scheduler.prompts_per_step=8",
                *extra,
            ]
        )
    )
    return Controller(cfg, tmp_path)


def _accounting(ctl, server):
    r = server.client()
    prefix = ctl.store.prefix
    totals = {k.decode(): int(v) for k, v in r.hgetall(f"{prefix}:counters").items()}
    committed = r.zcard(f"{prefix}:committed")
    left = r.xlen(f"{prefix}:stream")
    produced = totals.get("put", 0)
    accounted = totals.get("acked", 0) + totals.get("dropped_stale", 0) + totals.get("rejected", 0) + left
    print(
        f"\naccounting: produced {produced} = trained {totals.get('acked', 0)} + dropped(stale) "
        f"{totals.get('dropped_stale', 0)} + rejected {totals.get('rejected', 0)} + left in store {left}; "
        f"committed ids {committed}"
    )
    return produced, accounted, totals, committed


def test_learner_crash_after_consuming_before_commit_redelivers_exactly_once(
    ray_cluster, tiny_model, redis_server, tmp_path
):
    import ray

    ctl = _controller(tmp_path, redis_server.url, steps=5)

    def kill_after_step_2(rec):
        if rec.step == 2:  # the next step's batch is taken, then its train_step finds the rank dead
            ray.kill(ctl.fleet.ranks[0])

    ctl.on_step.append(kill_after_step_2)
    summary, batches = run_recording(ctl)
    assert summary["steps"] == 5 and summary["learner_restarts"] == 1
    assert len(batches) == 6  # one batch was consumed by the crashed step and redelivered
    assert batches[2] == batches[3]
    trained = [gid for i, b in enumerate(batches) if i != 2 for gid in b]
    assert len(trained) == len(set(trained)) == 5 * 8  # nothing trained twice
    produced, accounted, totals, committed = _accounting(ctl, redis_server)
    assert produced == accounted and totals["acked"] == committed == 5 * 8


@pytest.mark.parametrize("how", ["shutdown", "sigkill"])
def test_redis_restart_mid_run_loses_nothing_acknowledged(ray_cluster, tiny_model, tmp_path, how):
    """Redis goes away mid-run and comes back 1.5 s later: gracefully (shutdown flushes the AOF),
    or killed with SIGKILL, which loses nothing only with appendfsync always (with everysec, the
    Redis default, up to a second of writes can be lost: see deploy/redis/redis.conf)."""
    server = RedisServer(tmp_path / "redis", appendonly=True, appendfsync="always" if how == "sigkill" else "everysec")
    (tmp_path / "redis").mkdir()
    server.start()
    try:
        ctl = _controller(tmp_path / "run", server.url, steps=6, extra=["replay.max_staleness=1"])
        restarted = threading.Event()

        def restart_after_step_2(rec):
            if rec.step == 2:
                server.stop() if how == "shutdown" else server.kill()  # clients see connection errors
                threading.Timer(1.5, lambda: (server.start(), restarted.set())).start()

        ctl.on_step.append(restart_after_step_2)
        try:
            summary = asyncio.run(ctl.run())
        finally:
            ctl.shutdown()
        assert restarted.is_set()
        assert summary["steps"] == 6
        produced, accounted, totals, committed = _accounting(ctl, server)
        assert totals["acked"] == committed == 6 * 8
        assert produced == accounted
    finally:
        server.stop()

"""One contract, two backends: every test here runs against the in-process store and
against Redis (a real redis-server started by the tests on a free loopback port)."""

import asyncio
import uuid

import pytest
from helpers import make_group

from rlsys.replay import make_store
from rlsys.replay.base import RedisConfig, ReplayConfig, StoreClosed

pytestmark = pytest.mark.integration


@pytest.fixture(params=["inprocess", "redis"])
def new_store(request):
    """Factory: new_store(max_staleness, groups_per_step, run_id=None, consumer=...) -> started store."""
    made = []

    async def factory(
        max_staleness=0, groups_per_step=2, run_id=None, consumer="controller", stale_policy="drop", **redis_kw
    ):
        redis_cfg = RedisConfig()
        if request.param == "redis":
            server = request.getfixturevalue("redis_server")
            redis_cfg = RedisConfig(url=server.url, block_ms=20, **redis_kw)
        cfg = ReplayConfig(
            backend=request.param, max_staleness=max_staleness, stale_policy=stale_policy, redis=redis_cfg
        )
        store = make_store(cfg, groups_per_step, run_id=run_id or uuid.uuid4().hex[:8], consumer=consumer)
        await store.start()
        made.append(store)
        return store

    factory.backend = request.param
    return factory


def run(coro):
    return asyncio.run(coro)


def test_put_take_ack_roundtrip_keeps_every_field(new_store):
    async def scenario():
        store = await new_store(groups_per_step=2)
        assert await store.reserve(2) == 2
        gs = [make_group(0, rewards=(1.0, 0.0, 0.5)), make_group(0)]
        await store.put(gs)
        assert await store.depth() == 2
        got = await store.take(2)
        await store.ack([g.group_id for g in got])
        await store.close()
        return gs, got, store

    gs, got, store = run(scenario())
    assert [g.group_id for g in got] == [g.group_id for g in gs]
    a, b = gs[0], got[0]
    assert b.prompt_token_ids == a.prompt_token_ids and b.reference == a.reference
    assert (b.rewards == a.rewards).all() and (b.completions[1].token_ids == a.completions[1].token_ids).all()
    assert store.counters.acked == 2


def test_stale_group_is_never_trained(new_store):
    async def scenario():
        store = await new_store(max_staleness=1, groups_per_step=2)
        await store.reserve(4)
        old = [make_group(version=0) for _ in range(2)]
        await store.put(old)
        await store.set_learner_version(2)  # version-0 groups are now 2 behind: too stale
        fresh = [make_group(version=2) for _ in range(2)]
        await store.put(fresh)
        batch = await store.take(2)
        await store.close()
        return store, old, batch

    store, old, batch = run(scenario())
    assert {g.group_id for g in batch}.isdisjoint({g.group_id for g in old})
    assert store.counters.dropped_stale == 2
    assert all(g.policy_version == 2 for g in batch)


def test_stale_policy_correct_trains_stale_groups_and_counts_them(new_store):
    async def scenario():
        store = await new_store(max_staleness=0, groups_per_step=2, stale_policy="correct")
        await store.reserve(2)
        old = [make_group(version=0) for _ in range(2)]
        await store.put(old)
        await store.set_learner_version(1)
        batch = await store.take(2)
        await store.close()
        return store, old, batch

    store, old, batch = run(scenario())
    assert [g.group_id for g in batch] == [g.group_id for g in old]
    assert store.counters.stale_corrected == 2 and store.counters.dropped_stale == 0


def test_synchronous_mode_admits_exactly_one_step(new_store):
    async def scenario():
        store = await new_store(max_staleness=0, groups_per_step=3)
        assert await store.reserve(5) == 3
        blocked = asyncio.create_task(store.reserve(1))
        await asyncio.sleep(0.02)
        assert not blocked.done()  # backpressure: nothing more until the learner moves
        await store.put([make_group(0) for _ in range(3)])
        batch = await store.take(3)
        await store.set_learner_version(1)
        assert await asyncio.wait_for(blocked, 2) == 1
        await store.ack([g.group_id for g in batch])
        await store.close()
        return store

    assert run(scenario()).counters.acked == 3


def test_resume_admits_exactly_the_next_step(new_store):
    """A run resumed from a checkpoint at version 4 (12 groups trained, 3 per step, sync) may
    generate one step's groups and no more, on a fresh store (in-process) or the run's old one."""

    async def scenario():
        store = await new_store(max_staleness=0, groups_per_step=3, run_id="resumed-run")
        await store.resume(4, trained_groups=12)
        assert store.learner_version == 4
        assert await store.reserve(5) == 3
        blocked = asyncio.create_task(store.reserve(1))
        await asyncio.sleep(0.02)
        assert not blocked.done()
        blocked.cancel()
        await store.close()

    run(scenario())


def test_capacity_bounds_store_plus_in_flight(new_store):
    async def scenario():
        store = await new_store(max_staleness=2, groups_per_step=4)
        got = await store.reserve(100)
        await store.close()
        return got

    assert run(scenario()) == 12


def test_requeue_redelivers_unacked_and_duplicates_are_ignored(new_store):
    async def scenario():
        store = await new_store(groups_per_step=2)
        await store.reserve(2)
        gs = [make_group(0), make_group(0)]
        await store.put(gs)
        first = await store.take(2)
        assert await store.requeue_pending() == 2  # the learner step failed before commit
        again = await store.take(2)
        await store.ack([g.group_id for g in again])
        await store.put([gs[0]])  # a producer retry delivers a committed group again
        depth = await store.depth()
        await store.close()
        return first, again, store, depth

    first, again, store, depth = run(scenario())
    assert [g.group_id for g in first] == [g.group_id for g in again]
    assert store.counters.duplicates == 1 and depth == 0


def test_a_group_put_twice_before_commit_is_taken_once(new_store):
    async def scenario():
        store = await new_store(groups_per_step=2)
        await store.reserve(2)
        g, h = make_group(0), make_group(0)
        await store.put([g, g])  # a retried producer call
        await store.put([h])
        got = await store.take(2)
        await store.close()
        return g, h, got, store

    g, h, got, store = run(scenario())
    assert sorted(x.group_id for x in got) == sorted([g.group_id, h.group_id])
    assert store.counters.duplicates == 1


def test_close_wakes_waiters(new_store):
    async def scenario():
        store = await new_store(groups_per_step=1)
        waiter = asyncio.create_task(store.take(1))
        await asyncio.sleep(0.05)
        await store.close()
        with pytest.raises(StoreClosed):
            await asyncio.wait_for(waiter, 5)
        with pytest.raises(StoreClosed):
            await store.reserve(1)

    run(scenario())


# -- Redis-only properties (durability across processes) --------------------------------


@pytest.fixture
def redis_store(redis_server):
    async def factory(run_id, consumer="controller", groups_per_step=2, max_staleness=0, **kw):
        cfg = ReplayConfig(
            backend="redis", max_staleness=max_staleness, redis=RedisConfig(url=redis_server.url, block_ms=20, **kw)
        )
        store = make_store(cfg, groups_per_step, run_id=run_id, consumer=consumer)
        await store.start()
        return store

    return factory


def test_restarted_consumer_gets_its_unacked_groups_back_once(redis_store):
    """A learner that took groups and died before committing gets them again after restart,
    exactly once; acknowledged ones never come back."""
    run_id = uuid.uuid4().hex[:8]

    async def scenario():
        a = await redis_store(run_id)
        await a.reserve(4)
        gs = [make_group(0) for _ in range(4)]
        await a.put(gs)
        committed = await a.take(2)
        await a.ack([g.group_id for g in committed])
        lost = await a.take(2)  # taken, then the process "dies": no ack, no close
        await a._r.aclose()
        b = await redis_store(run_id)  # same run, same consumer name
        back = await b.take(2)
        await b.ack([g.group_id for g in back])
        totals = await b.totals()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(b.take(1), 0.3)  # nothing else is left
        await b.close()
        return lost, back, totals

    lost, back, totals = run(scenario())
    assert sorted(g.group_id for g in back) == sorted(g.group_id for g in lost)
    assert totals["put"] == 4 and totals["acked"] == 4


def test_dead_consumers_pending_groups_are_claimed_by_a_live_one(redis_store):
    run_id = uuid.uuid4().hex[:8]

    async def scenario():
        dead = await redis_store(run_id, consumer="learner-0")
        live = await redis_store(run_id, consumer="learner-1")
        live.claim_idle_ms = 50
        await dead.reserve(2)
        gs = [make_group(0), make_group(0)]
        await dead.put(gs)
        held = await dead.take(2)  # learner-0 takes both and dies
        await asyncio.sleep(0.1)
        got = await live.take(2)
        await live.ack([g.group_id for g in got])
        await live.close()
        return held, got

    held, got = run(scenario())
    assert sorted(g.group_id for g in got) == sorted(g.group_id for g in held)


def test_two_consumers_get_disjoint_shards(redis_store):
    run_id = uuid.uuid4().hex[:8]

    async def scenario():
        a = await redis_store(run_id, consumer="learner-0", groups_per_step=6)
        b = await redis_store(run_id, consumer="learner-1", groups_per_step=6)
        await a.reserve(6)
        await a.put([make_group(0) for _ in range(6)])
        x, y = await asyncio.gather(a.take(3), b.take(3))
        await a.close()
        await b.close()
        return x, y

    x, y = run(scenario())
    assert {g.group_id for g in x}.isdisjoint({g.group_id for g in y}) and len(x) == len(y) == 3


def test_two_runs_on_one_redis_never_see_each_other(redis_store):
    async def scenario():
        a = await redis_store("run-a")
        b = await redis_store("run-b")
        await a.reserve(1)
        await a.put([make_group(0)])
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(b.take(1), 0.3)
        got = await a.take(1)
        await a.close()
        await b.close()
        return got

    assert len(run(scenario())) == 1


def _bad_records():
    from rlsys.replay.codec import encode_group

    good = encode_group(make_group(0))
    newer = good[:3] + bytes([9]) + good[4:]
    flipped = good[:-5] + bytes([good[-5] ^ 0xFF]) + good[-4:]
    return {
        "corrupt": flipped,
        "truncated": good[: len(good) // 2],
        "newer_version": newer,
        "garbage": b"RLG\x01garbage",
        "not_a_record": b"hello",
    }


@pytest.mark.parametrize("kind", sorted(_bad_records()))
def test_bad_record_is_rejected_counted_and_dead_lettered(redis_store, redis_server, kind):
    run_id = uuid.uuid4().hex[:8]

    async def scenario():
        s = await redis_store(run_id)
        await s.reserve(2)
        good = make_group(0)
        r = redis_server.client()
        r.xadd(f"rlsys:{run_id}:stream", {"gid": "bad", "v": "0", "rec": _bad_records()[kind]})
        await s.put([good])
        got = await s.take(1)
        totals = await s.totals()
        dead = r.xlen(f"rlsys:{run_id}:dead")
        await s.close()
        return good, got, totals, dead, s

    good, got, totals, dead, s = run(scenario())
    assert got[0].group_id == good.group_id
    assert s.counters.rejected == 1 and totals["rejected"] == 1 and dead == 1


def test_wrong_key_type_is_a_clear_error(redis_store, redis_server):
    from rlsys.replay.redis_store import ReplayConfigError

    run_id = uuid.uuid4().hex[:8]
    redis_server.client().set(f"rlsys:{run_id}:stream", "not a stream")
    with pytest.raises(ReplayConfigError, match="wrong type"):
        run(redis_store(run_id))


def test_auth_refusal_is_a_clear_error(tmp_path, monkeypatch):
    from helpers import RedisServer

    from rlsys.replay.redis_store import ReplayConfigError

    server = RedisServer(tmp_path, appendonly=False, password="s3cret-pw").start()
    try:
        monkeypatch.setenv("RLSYS_REDIS_PASSWORD", "wrong")
        cfg = ReplayConfig(backend="redis", redis=RedisConfig(url=server.url))
        with pytest.raises(ReplayConfigError, match="refused authentication") as e:
            run(make_store(cfg, 2, run_id="x").start())
        assert "s3cret-pw" not in str(e.value) and "wrong" not in str(e.value)
    finally:
        server.stop()


def test_depth_counts_what_is_stored_across_a_redis_restart(tmp_path):
    """depth() = records stored and not taken, before and after Redis restarts from its AOF
    (the consumer group's lag, which depth used to read, was thousands too high after restarts
    in the soak)."""
    from helpers import RedisServer

    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", appendonly=True, appendfsync="always").start()

    async def scenario():
        cfg = ReplayConfig(
            backend="redis", max_staleness=0, redis=RedisConfig(url=server.url, block_ms=20, reconnect_timeout_s=20)
        )
        store = make_store(cfg, 8, run_id=uuid.uuid4().hex[:8])
        await store.start()
        await store.reserve(8)
        await store.put([make_group(0) for _ in range(6)])
        done = await store.take(2)
        await store.ack([g.group_id for g in done])
        await store.take(1)  # pending, not acknowledged
        before = await store.depth()
        for _ in range(2):
            server.client().bgrewriteaof()  # the restart replays a rewritten AOF
            await asyncio.sleep(0.3)
            server.stop()
            server.start()
        await store.put([make_group(0) for _ in range(2)])
        after = await store.depth()
        await store.close()
        return before, after

    try:
        before, after = run(scenario())
    finally:
        server.stop()
    assert (before, after) == (3, 5)

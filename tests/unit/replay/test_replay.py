"""Pure rules of the replay store (the store behaviour itself: test_replay_contract.py)."""

import asyncio

import pytest
from helpers import make_group

from rlsys.replay.base import AdmissionGate, RedisConfig, ReplayConfig, StoreClosed, admission_cap, staleness_ok


def test_staleness_rule():
    assert staleness_ok(3, 3, 0)
    assert not staleness_ok(2, 3, 0)
    assert staleness_ok(1, 3, 2) and not staleness_ok(0, 3, 2)
    assert not staleness_ok(4, 3, 5)  # from the future: never


def test_admission_cap_formula():
    assert admission_cap(0, 0, 4) == 4
    assert admission_cap(2, 1, 4) == 16


def test_gate_grants_partially_then_blocks_until_the_learner_advances():
    async def scenario():
        gate = AdmissionGate(max_staleness=1, groups_per_step=3)
        assert gate.capacity == 6
        assert await gate.reserve(4) == 4
        assert await gate.reserve(4) == 2  # partial grant up to the cap
        blocked = asyncio.create_task(gate.reserve(1))
        await asyncio.sleep(0.01)
        assert not blocked.done()
        await gate.advance(1)
        assert await asyncio.wait_for(blocked, 1) == 1
        await gate.close()
        with pytest.raises(StoreClosed):
            await gate.reserve(1)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(url="http://x"), "replay.redis.url must start"),
        (dict(url="redis://user:secret@host:6379/0"), "must not contain credentials"),
        (dict(key_prefix="a:b"), "replay.redis.key_prefix"),
    ],
)
def test_redis_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RedisConfig(**kw)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="replay.backend must be 'inprocess' or 'redis'"):
        ReplayConfig(backend="kafka")


def test_inprocess_take_checks_each_group_once_per_version(monkeypatch):
    """A take waiting for k groups while they arrive one put at a time checks each new group,
    not the whole queue on every put (that was quadratic in groups per step)."""
    import rlsys.replay.base as replay

    calls = []
    real = replay.must_drop
    monkeypatch.setattr(replay, "must_drop", lambda *a: calls.append(a) or real(*a))

    async def main():
        store = replay.InProcessReplayStore(ReplayConfig(max_staleness=1), groups_per_step=300)
        taker = asyncio.create_task(store.take(300))
        for g in groups:
            await store.put([g])
            await asyncio.sleep(0)  # let the take wake up and look
        return await taker

    groups = [make_group(0) for _ in range(300)]
    batch = asyncio.run(main())
    assert [g.group_id for g in batch] == [g.group_id for g in groups]
    assert len(calls) == 300


def test_inprocess_groups_checked_at_an_older_version_are_checked_again():
    """A group fresh when put goes stale when the learner advances; a requeued group too."""
    from rlsys.replay.base import InProcessReplayStore

    a, b, c, d = make_group(0), make_group(1), make_group(2), make_group(2)

    async def main():
        store = InProcessReplayStore(ReplayConfig(max_staleness=1), groups_per_step=2)
        await store.set_learner_version(1)
        await store.put([a, b])
        first = await store.take(1)  # "a" is pending, checked at version 1
        await store.set_learner_version(2)  # "a" (version 0) is now 2 behind: stale
        await store.put([c])
        assert [g.group_id for g in await store.take(2)] == [b.group_id, c.group_id]
        assert await store.requeue_pending() == 3  # a, b, c come back ...
        await store.put([d])
        got = await store.take(3)  # ... and "a" is dropped at the version it is now checked at
        return first, got, store.counters

    first, got, counters = asyncio.run(main())
    assert [g.group_id for g in first] == [a.group_id]
    assert [g.group_id for g in got] == [b.group_id, c.group_id, d.group_id]
    assert counters.dropped_stale == 1

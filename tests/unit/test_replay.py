"""The replay store's invariants: staleness bound, admission cap, ack/requeue, dedupe."""

import asyncio

import pytest

from helpers import make_group
from rlsys.replay import InProcessReplayStore, ReplayConfig, StoreClosed, admission_cap, staleness_ok


def run(coro):
    return asyncio.run(coro)


def test_staleness_rule():
    assert staleness_ok(3, 3, 0)
    assert not staleness_ok(2, 3, 0)
    assert staleness_ok(1, 3, 2) and not staleness_ok(0, 3, 2)
    assert not staleness_ok(4, 3, 5)  # from the future: never


def test_admission_cap_formula():
    assert admission_cap(0, 0, 4) == 4
    assert admission_cap(2, 1, 4) == 16


def test_stale_group_is_never_trained():
    async def scenario():
        store = InProcessReplayStore(ReplayConfig(max_staleness=1), groups_per_step=2)
        await store.reserve(4)
        old = [make_group(version=0) for _ in range(2)]
        await store.put(old)
        await store.set_learner_version(2)  # version-0 groups are now 2 behind: too stale
        fresh = [make_group(version=2) for _ in range(2)]
        await store.put(fresh)
        batch = await store.take(2)
        return store, old, batch

    store, old, batch = run(scenario())
    assert {g.group_id for g in batch}.isdisjoint({g.group_id for g in old})
    assert store.counters.dropped_stale == 2
    assert all(g.policy_version == 2 for g in batch)


def test_synchronous_mode_admits_exactly_one_step():
    async def scenario():
        store = InProcessReplayStore(ReplayConfig(max_staleness=0), groups_per_step=3)
        assert await store.reserve(5) == 3  # partial grant up to the cap
        blocked = asyncio.create_task(store.reserve(1))
        await asyncio.sleep(0.01)
        assert not blocked.done()  # backpressure: nothing more until the learner moves
        await store.put([make_group(0) for _ in range(3)])
        batch = await store.take(3)
        await store.set_learner_version(1)
        assert await asyncio.wait_for(blocked, 1) == 1
        await store.ack([g.group_id for g in batch])
        return store

    store = run(scenario())
    assert store.counters.acked == 3


def test_capacity_bounds_store_plus_in_flight():
    async def scenario():
        store = InProcessReplayStore(ReplayConfig(max_staleness=2), groups_per_step=4)
        got = await store.reserve(100)
        return got, store.capacity

    got, cap = run(scenario())
    assert got == cap == 12


def test_requeue_redelivers_unacked_and_duplicates_are_ignored():
    async def scenario():
        store = InProcessReplayStore(ReplayConfig(max_staleness=0), groups_per_step=2)
        await store.reserve(2)
        gs = [make_group(0), make_group(0)]
        await store.put(gs)
        first = await store.take(2)
        assert await store.requeue_pending() == 2  # the learner step failed before commit
        await store.put([gs[0]])  # a producer retry delivers a duplicate
        again = await store.take(2)
        return first, again, store

    first, again, store = run(scenario())
    assert [g.group_id for g in first] == [g.group_id for g in again]
    assert store.counters.duplicates == 1 and store.depth() == 0


def test_close_wakes_waiters():
    async def scenario():
        store = InProcessReplayStore(ReplayConfig(), groups_per_step=1)
        waiter = asyncio.create_task(store.take(1))
        await asyncio.sleep(0.01)
        await store.close()
        with pytest.raises(StoreClosed):
            await waiter
        with pytest.raises(StoreClosed):
            await store.reserve(1)

    run(scenario())

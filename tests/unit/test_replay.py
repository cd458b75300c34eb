"""Pure rules of the replay store (the store behaviour itself: test_replay_contract.py)."""

import asyncio

import pytest

from rlsys.replay import AdmissionGate, RedisConfig, ReplayConfig, StoreClosed, admission_cap, staleness_ok


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


@pytest.mark.parametrize("kw,msg", [
    (dict(url="http://x"), "replay.redis.url must start"),
    (dict(url="redis://user:secret@host:6379/0"), "must not contain credentials"),
    (dict(key_prefix="a:b"), "replay.redis.key_prefix"),
])
def test_redis_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RedisConfig(**kw)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="replay.backend must be 'inprocess' or 'redis'"):
        ReplayConfig(backend="kafka")

"""The pure parts of worker supervision (rlsys/supervision.py)."""

import asyncio
import time

import pytest
from helpers import make_group

from rlsys.controller.recovery import OpenRequests, RestartBudget
from rlsys.records import RolloutRequest
from rlsys.supervision import FaultPoint, describe, is_worker_failure, with_deadline


def req(pid, n=4):
    return RolloutRequest(pid, "1+1=", (1, 2), "2", n)


def test_open_requests_are_what_a_replacement_must_redo():
    o = OpenRequests()
    o.sent([req("a"), req("b"), req("c")])
    o.returned([make_group(prompt_id="b", rewards=(1, 0, 0, 1))])
    assert sorted(r.prompt_id for r in o.outstanding()) == ["a", "c"] and len(o) == 2
    # carry-over: a later call returns a group asked for earlier, beside new requests
    o.sent([req("d")])
    o.returned([make_group(prompt_id="a", rewards=(0, 0, 0, 0)), make_group(prompt_id="d", rewards=(1, 1, 1, 1))])
    assert [r.prompt_id for r in o.outstanding()] == ["c"]


def test_open_requests_match_the_same_prompt_by_group_size():
    o = OpenRequests()
    o.sent([req("a", n=2), req("a", n=6)])  # knapsack may ask for one prompt twice, with different n
    o.returned([make_group(prompt_id="a", rewards=(1,) * 6)])
    assert [(r.prompt_id, r.n) for r in o.outstanding()] == [("a", 2)]
    o.returned([make_group(prompt_id="a", rewards=(1, 0))])
    assert len(o) == 0
    o.returned([make_group(prompt_id="zz")])  # a group nobody is waiting for changes nothing
    assert len(o) == 0


def test_restart_budget_fails_the_run_past_the_limit_with_the_last_error():
    b = RestartBudget(limit=2)
    assert b.spend("rollout", RuntimeError("x")) == 1 and b.in_progress() == 1
    b.done["rollout"] += 1
    assert b.in_progress() == 0
    b.spend("rollout", RuntimeError("y"))
    b.spend("reward", RuntimeError("other role, own count"))
    with pytest.raises(RuntimeError, match=r"rollout workers failed 3 times .*max_worker_restarts=2.*boom"):
        b.spend("rollout", ValueError("boom"))


def test_worker_failures_are_death_unavailability_and_deadlines_not_errors_in_the_work():
    import ray

    assert is_worker_failure(ray.exceptions.RayActorError())
    assert is_worker_failure(ray.exceptions.ActorUnavailableError("gone", None))
    assert is_worker_failure(asyncio.TimeoutError())
    assert not is_worker_failure(ValueError("a bug in a reward function"))
    assert "hung" in describe(asyncio.TimeoutError()) and "died" in describe(ray.exceptions.RayActorError())


def test_deadline_cuts_a_call_that_does_not_answer():
    async def slow():
        await asyncio.sleep(5)

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await with_deadline(slow(), 0.05)
        assert await with_deadline(asyncio.sleep(0, result=7), 0) == 7  # 0: no deadline

    asyncio.run(main())


def test_a_cancelled_deadline_call_is_cancelled_even_when_its_answer_came_in_the_same_tick():
    """The run's end cancels the loops that poll actors; a cancel that lands in the tick the
    answer arrives must still cancel (Python < 3.12's asyncio.wait_for returned the answer
    instead, and the control loop polled forever: a hang at the end of a run)."""

    async def main():
        for timeout in (30, 0):
            answer = asyncio.get_running_loop().create_future()
            call = asyncio.ensure_future(with_deadline(answer, timeout))
            await asyncio.sleep(0)  # the call waits for its answer
            answer.set_result("pong")
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    asyncio.run(main())


def test_a_cut_call_is_cancelled_before_the_deadline_error_is_raised():
    """What the call holds (a lock, a slot) is released before the caller sees the deadline error."""
    events = []

    async def holds_a_lock(lock):
        async with lock:
            try:
                await asyncio.sleep(5)
            finally:
                events.append("released")

    async def main():
        lock = asyncio.Lock()
        with pytest.raises(asyncio.TimeoutError):
            await with_deadline(holds_a_lock(lock), 0.05)
        events.append("timeout seen")
        assert not lock.locked()

    asyncio.run(main())
    assert events == ["released", "timeout seen"]


def test_fault_point_hangs_the_next_call_once(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    f = FaultPoint()
    with pytest.raises(ValueError, match="unknown fault 'explode'"):
        f.arm("explode")
    f.arm("hang", 30)
    assert f.armed == "hang"
    f.hang_here()
    f.hang_here()  # disarmed by the first
    assert slept == [30.0] and f.armed is None

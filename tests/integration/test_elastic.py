"""Elastic rollout workers: a run with 2 learner ranks and 2 rollout workers is scaled 2 -> 3 -> 1
through its control actor (what ``rlsys scale`` calls) while it trains, then stopped (``rlsys
stop``). The run finishes, every
group produced is accounted for, and each new worker's first samples carry the policy version
current when it made its first request."""

import asyncio

import pytest

from rlsys.config import compose, to_run_config
from rlsys.controller.client import find_control
from rlsys.controller.elastic import CONTROL_NAME
from rlsys.controller.loop import Controller

pytestmark = pytest.mark.integration


# wait_for_all is opt-in (--runslow): partial scales the same fleet and adds the drain of unfinished groups
@pytest.mark.parametrize("mode", [pytest.param("wait_for_all", marks=pytest.mark.slow), "partial"])
def test_scale_rollout_workers_during_a_run(ray_cluster, tiny_model, tmp_path, mode):
    """``partial``: partial rollouts with carry-over (2-token segments of the 6-token answers), so
    leaving workers hold unfinished groups that must be drained, not lost."""
    import ray

    partial = ["rollout.partial_chunk_tokens=2", "rollout.partial_carry_fraction=0.5"] if mode == "partial" else []
    cfg = to_run_config(
        compose(
            [
                "steps=1000",
                "scheduler.prompts_per_step=8",
                "learner.num_ranks=2",
                "rollout.num_workers=2",
                "rollout.num_cpus=0.5",
                "rollout.prompts_per_call=4",
                "cluster.metrics_port=-1",
                "cluster.control_poll_s=0.1",
                *partial,
            ]
        )
    )
    ctl = Controller(cfg, tmp_path)

    async def until(cond):
        while not cond():
            await asyncio.sleep(0.05)

    async def operator():
        handle = find_control()  # as the CLI finds it
        # The learner ranks sit in one STRICT_PACK placement group, one bundle per rank.
        pgs = [
            g
            for g in ray.util.placement_group_table().values()
            if g["name"] == f"rlsys-learner-{tmp_path.name}" and g["state"] == "CREATED"
        ]
        assert len(pgs) == 1 and pgs[0]["strategy"] == "STRICT_PACK" and len(pgs[0]["bundles"]) == 2
        await until(lambda: ctl.progress.step >= 2)
        await handle.scale_rollout.remote(3)
        # The joiner starts (a vLLM engine: tens of seconds) while training goes on, then serves.
        await until(lambda: len(ctl.fleet.rollout) == 3 and ctl.fleet.records[2].groups > 0)
        await handle.scale_rollout.remote(1)
        await until(lambda: len(ctl.fleet.rollout) == 1)
        at = ctl.progress.step
        await until(lambda: ctl.progress.step >= at + 2)  # the run goes on with one worker
        status = await handle.status.remote()
        await handle.stop.remote()
        return status

    async def scenario():
        ctl.setup()
        train = asyncio.create_task(ctl.run())
        status = await asyncio.wait_for(operator(), 600)
        return await train, status

    try:
        summary, status = asyncio.run(scenario())
    finally:
        ctl.shutdown()
    assert not [
        g
        for g in ray.util.placement_group_table().values()
        if g["name"] == f"rlsys-learner-{tmp_path.name}" and g["state"] != "REMOVED"
    ]
    steps = summary["steps"]
    assert 4 < steps < 1000  # ended by the stop request, at a step boundary
    assert status["desired_rollout"] == 1 and status["run"] == tmp_path.name
    assert status["replay_depth"] >= 0 and status["learner_restarts"] == 0
    assert isinstance(status["last_errors"], list)
    workers = {w["index"]: w for w in summary["rollout_workers"]}
    assert sorted(workers) == [0, 1, 2]  # worker 2 joined, then 2 and 1 left
    assert workers[2]["joined_at_version"] >= 2 and workers[2]["left_at_version"] is not None
    assert workers[1]["left_at_version"] is not None and workers[0]["left_at_version"] is None
    # A joiner serves the current policy from its first request on.
    assert workers[2]["groups"] > 0
    assert workers[2]["first_group_version"] == workers[2]["first_request_version"] >= workers[2]["joined_at_version"]
    # Nothing lost or duplicated: what the workers produced reached the store, and all of it was
    # trained, dropped as stale, or is still held after the last step.
    r = summary["replay"]
    produced = sum(w["groups"] for w in workers.values())
    assert r["put"] == produced and r["duplicates"] == 0 and r["acked"] == steps * 8
    assert produced == r["acked"] + r["dropped_stale"] + r["held_at_end"]
    if mode == "partial":  # groups did wait in workers between calls (summed over calls)
        assert summary["partial_carried"] > 0
    else:
        assert summary["partial_carried"] == summary["partial_switched"] == 0
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == CONTROL_NAME]

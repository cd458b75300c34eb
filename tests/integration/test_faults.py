"""Fault injection on the tiny experiment (real Ray, vLLM, DeepSpeed; Redis where noted).

Each test kills or hangs actors mid-run (at chosen learner steps) and asserts that the run
finishes, that the dead or hung workers were replaced (rlsys/supervision.py), and the final
accounting: every produced group is trained, skipped by a non-finite step, dropped as stale,
rejected or still held at the end, and no group id is trained twice.
"""

import logging
import uuid

import pytest
from helpers import run_recording

from rlsys.config import compose, to_run_config
from rlsys.controller.loop import Controller

pytestmark = pytest.mark.integration


def _controller(tmp_path, steps, extra=(), redis_url=None):
    store = (
        ["replay=redis", f"replay.redis.url={redis_url}", f"replay.redis.run_id=f{uuid.uuid4().hex[:8]}"]
        if redis_url
        else []
    )
    cfg = to_run_config(
        compose(
            [
                f"steps={steps}",
                "cluster.metrics_port=-1",
                "scheduler.prompts_per_step=8",
                "rollout.prompts_per_call=4",
                *store,
                *extra,
            ]
        )
    )
    return Controller(cfg, tmp_path)


def _inject(ctl, faults):
    """Run ``faults[step](ctl)`` right after learner step ``step`` (0-based) is recorded."""

    def inject(rec):
        step = rec.step - 1
        if step in faults:
            faults[step](ctl)

    ctl.on_step.append(inject)


def _inject_in_turn(ctl, faults, steps_after=2):
    """Fire ``faults`` one after another, each at the first step after the previous one's worker
    was replaced; stop the run (as ``rlsys stop`` does) ``steps_after`` steps after the last
    replacement. Returns the list of steps at which they fired."""
    fired, state = [], {"last_done": None}

    def inject(rec):
        step = rec.step - 1
        restarts = ctl.recovery.restarts
        done = sum(restarts.done.values())
        if len(fired) < len(faults):
            if done == len(fired) and restarts.in_progress() == 0:
                faults[len(fired)](ctl)
                fired.append(step)
        elif done == len(faults):
            state["last_done"] = step if state["last_done"] is None else state["last_done"]
            if step - state["last_done"] >= steps_after:
                ctl.request_stop()

    ctl.on_step.append(inject)
    return fired


_run = run_recording


def _assert_accounting(summary, batches, redelivered_batches=()):
    """put = trained + skipped_nonfinite + dropped_stale + rejected + held_at_end; nothing trained twice."""
    r = summary["replay"]
    produced = r["put"]
    accounted = (
        summary["groups_trained"] + summary["skipped_nonfinite"] + r["dropped_stale"] + r["rejected"] + r["held_at_end"]
    )
    print(
        f"\naccounting: produced {produced} = trained {summary['groups_trained']} + skipped(non-finite) "
        f"{summary['skipped_nonfinite']} + dropped(stale) {r['dropped_stale']} + rejected {r['rejected']} + "
        f"held {r['held_at_end']}; restarts {summary['worker_restarts']}, learner {summary['learner_restarts']}"
    )
    assert produced == accounted, summary["replay"]
    assert r["acked"] == summary["groups_trained"] + summary["skipped_nonfinite"]
    consumed = [gid for i, b in enumerate(batches) if i not in redelivered_batches for gid in b]
    assert len(consumed) == len(set(consumed)), "a group was trained twice"
    assert len(consumed) == r["acked"]


def test_dead_and_hung_rollout_and_reward_workers_are_replaced(ray_cluster, tiny_model, tmp_path):
    """Two rollout and two reward workers, asynchronous (η = 1). Kill a rollout worker, kill a
    reward worker, then hang one of each: each is replaced, its work retried, nothing lost."""
    import ray

    def hang(actor):
        return lambda c: actor(c).inject_fault.remote("hang", 3600)

    ctl = _controller(
        tmp_path,
        steps=1000,
        extra=[
            "rollout.num_workers=2",
            "reward.num_workers=2",
            "replay.max_staleness=1",
            "rollout.call_timeout_s=15",
            "reward.call_timeout_s=8",
        ],
    )
    fired = _inject_in_turn(
        ctl,
        [
            lambda c: ray.kill(c.fleet.rollout[0]),
            lambda c: ray.kill(c.fleet.rewards[1]),
            hang(lambda c: c.fleet.rollout[1]),
            hang(lambda c: c.fleet.rewards[0]),
        ],
    )
    summary, batches = _run(ctl)
    assert len(fired) == 4 and summary["steps"] < 1000, fired  # every fault fired, then the run was stopped
    assert summary["worker_restarts"] == {"rollout": 2, "reward": 2}
    assert summary["learner_restarts"] == 0
    _assert_accounting(summary, batches)
    assert summary["groups_trained"] == summary["steps"] * 8


def test_learner_crash_and_nonfinite_step_recover_from_the_checkpoint(ray_cluster, tiny_model, tmp_path, caplog):
    """A learner rank dies mid-run: the ranks restart from the checkpoint at the committed
    version (optimizer state included) and the batch is redelivered. Then a step's update leaves
    NaN weights (loss and gradient finite): caught before publication, the step is skipped
    (weights discarded, its groups counted), the run goes on."""
    import ray

    ctl = _controller(tmp_path, steps=6, extra=["checkpoint.every_steps=1"])
    _inject(
        ctl,
        {
            1: lambda c: ray.kill(c.fleet.ranks[0]),
            3: lambda c: c.fleet.ranks[0].inject_fault.remote("nan"),
        },
    )
    with caplog.at_level(logging.INFO, logger="rlsys"):
        summary, batches = _run(ctl)
    assert summary["steps"] == 6 and summary["learner_restarts"] == 1
    assert summary["skipped_nonfinite"] == 8  # one batch
    assert "restart from checkpoint" in caplog.text and "step skipped" in caplog.text
    assert "weights finite [False]" in caplog.text
    # batch 2 was consumed by the crashed step and redelivered as batch 3; batch 4 was skipped
    assert batches[2] == batches[3]
    _assert_accounting(summary, batches, redelivered_batches={2})
    assert summary["groups_trained"] == 6 * 8
    assert all(x == x for x in summary["curves"]["loss"])  # no NaN step was recorded as trained


def test_nonfinite_steps_stop_the_run_with_a_clear_error(ray_cluster, tiny_model, tmp_path):
    """learner.on_nonfinite=stop: the first NaN step ends the run with an error naming the fix."""
    ctl = _controller(tmp_path, steps=4, extra=["learner.on_nonfinite=stop"])
    _inject(ctl, {0: lambda c: c.fleet.ranks[0].inject_fault.remote("nan")})
    with pytest.raises(FloatingPointError, match="non-finite loss, gradient norm or weights.*on_nonfinite=stop"):
        _run(ctl)


def test_dead_and_hung_judge_is_replaced(ray_cluster, tiny_model, tmp_path):
    """rm_judge_router with an HTTP judge: the judge worker is killed, later hung; each time the
    controller replaces it, reward workers retry on the new one, the run finishes."""
    import ray
    from helpers import OracleJudgeServer

    judge = OracleJudgeServer().start()
    try:
        ctl = _controller(
            tmp_path,
            steps=1000,
            extra=[
                "reward=rm_judge_router",
                "judge=openai",
                f"judge.url={judge.url}",
                "judge.model=oracle",
                "reward.model.steps=200",
                "reward.model.pointwise_steps=0",
                "reward.router.budget_fraction=0.3",
                "judge.ping_timeout_s=5",
            ],
        )
        fired = _inject_in_turn(
            ctl,
            [
                lambda c: ray.kill(c.fleet.judge),
                lambda c: c.fleet.judge.inject_fault.remote("hang", 3600),
            ],
        )
        summary, batches = _run(ctl)
    finally:
        judge.stop()
    assert len(fired) == 2 and summary["steps"] < 1000, fired
    assert summary["worker_restarts"] == {"judge": 2}
    assert summary["judge"]["calls"] > 0
    _assert_accounting(summary, batches)

"""One record per learner step feeds the gauges, the loggers, the progress line and the summary;
after a resume they all count the whole run (rlsys/controller/progress.py)."""

from __future__ import annotations

import re
from dataclasses import asdict

import pytest
from helpers import make_group
from prometheus_client import generate_latest

from rlsys.config import RunConfig
from rlsys.controller.progress import Progress, RewardStats, RunOutcome, progress_line, step_record, summary
from rlsys.learner.rank import StepStats
from rlsys.observability.metrics import Metrics
from rlsys.replay.base import ReplayCounters


def _groups(version: int) -> list:
    return [
        make_group(version=version, rewards=r, prompt_id=f"p{i}")
        for i, r in enumerate(([0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]))
    ]


def _stats() -> list:
    return [StepStats(loss=0.25, grad_norm=1.5, tokens=8, seconds=0.1, extra={"behav_kl": 0.01, "clip_fraction": 0.1})]


def _run(p: Progress, steps: int, samples_per_step: int, seconds_per_step: float, counters: ReplayCounters):
    """``steps`` committed steps, each after ``samples_per_step`` new samples, on a training clock
    that continues from ``p.train_seconds``; returns the records."""
    records = []
    for _ in range(steps):
        p.add_produced(samples_per_step, 5 * samples_per_step, 0, 0, 0, 0, 0.05, 0.01)
        rec = step_record(
            p.step + 1,
            p.step + 1,
            _groups(p.step),
            _stats(),
            p.samples,
            p.tokens,
            p.samples_at_last_step,
            counters.dropped_stale,
            0.1,
            0.02,
            p.train_seconds + seconds_per_step,
        )
        p.add_step(rec, samples_per_step, 5 * samples_per_step)
        records.append(rec)
    return records


def _summary(p: Progress, steps_this_run: int) -> dict:
    cfg = RunConfig()
    out = RunOutcome(0.1, 0.2, 1.0, steps_this_run, 0, {}, "shm", [], RewardStats(cfg, Metrics()), 0)
    return summary(cfg, p, out, ReplayCounters(), "model", "run")


def test_a_step_record_feeds_gauges_loggers_and_totals_alike():
    p, m, counters = Progress(), Metrics(), ReplayCounters(acked=8, put=9)
    (rec,) = _run(p, 1, 8, 2.0, counters)
    m.observe_step(rec, counters)
    logged = rec.metrics()
    exported = generate_latest(m.registry).decode()
    for name in (
        "rlsys_learner_loss",
        "rlsys_reward_mean",
        "rlsys_scheduler_effective_gradient_ratio",
        "rlsys_learner_policy_version",
    ):
        (value,) = re.findall(rf"^{name} (\S+)$", exported, re.M)
        assert float(value) == pytest.approx(logged[name])
    assert logged["rlsys_reward_mean"] == pytest.approx(0.75) == p.step_rewards[-1]
    assert logged["rlsys_scheduler_effective_gradient_ratio"] == pytest.approx(0.5) == p.step_egr[-1]
    assert p.trained_rollouts == 8 and p.egr_rollouts == 4 and p.step_time == [2.0]


def test_after_a_resume_rates_are_totals_over_the_whole_run():
    """A run checkpointed at step 90 (900 samples in 90 s) resumes; its first resumed step takes
    1 s. The old code divided the restored 900+ samples by that 1 s (900+ samples/s); the line
    and the summary must say ~10/s, and agree."""
    first = Progress()
    _run(first, 90, 10, 1.0, ReplayCounters())
    restored = Progress.from_checkpoint(asdict(first))
    assert restored.train_seconds == pytest.approx(90.0)
    (rec,) = _run(restored, 1, 10, 1.0, ReplayCounters())
    line = progress_line(rec, 100)
    samples_per_s = float(re.search(r"samples/s\s+(\d+)", line).group(1))
    assert samples_per_s == 10 and line.rstrip().endswith("91s")
    s = _summary(restored, steps_this_run=1)
    assert (s["steps"], s["steps_this_run"], s["train_seconds"]) == (91, 1, 91.0)
    assert s["samples_per_s"] == pytest.approx(10.0) and s["step_seconds_mean"] == pytest.approx(1.0)
    assert s["curves"]["time_s"][-2:] == [90.0, 91.0]


def test_an_old_checkpoint_without_the_clock_resumes_from_its_last_step_time():
    old = asdict(Progress(step=3, step_time=[1.0, 2.0, 3.5]))
    del old["train_seconds"]
    assert Progress.from_checkpoint(old).train_seconds == 3.5


def test_extra_reward_scores_are_averaged_per_step_and_exported():
    groups = _groups(0)
    groups[0].meta["scores"] = {"format": [1.0, 0.0, None, 1.0], "length": [0.5, 0.5, 0.5, 0.5]}
    groups[1].meta["scores"] = {"format": [1.0, 1.0, 1.0, 1.0]}
    rec = step_record(1, 1, groups, _stats(), 8, 40, 0, 0, 0.1, 0.02, 1.0)
    assert rec.extra_scores == {"format": pytest.approx(6 / 7), "length": 0.5}  # None: the call failed
    assert rec.metrics()["rlsys_reward_extra_format"] == pytest.approx(6 / 7)
    m = Metrics()
    m.observe_step(rec, ReplayCounters())
    exported = generate_latest(m.registry).decode()
    assert re.search(r'^rlsys_reward_extra\{score="length"\} 0\.5$', exported, re.M)

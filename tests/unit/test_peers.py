"""The peer benchmark's harness (benchmarks/peers): what it derives from each system's results."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "peers"))

import rlsys_run  # noqa: E402
import run as peers  # noqa: E402


def _result(points):
    return {"curve": [{"step": s, "samples": s * 128, "train_seconds": t, "eval_accuracy": a} for s, t, a in points]}


def test_time_to_target_is_the_first_evaluation_that_reaches_it():
    r = _result([(0, 0.0, 0.2), (20, 10.0, 0.35), (40, 21.0, 0.31), (60, 30.0, 0.52)])
    assert peers.time_to(r, 0.3) == 10.0
    assert peers.time_to(r, 0.5) == 30.0
    assert peers.time_to(r, 0.2) == 0.0
    assert peers.time_to(r, 0.6) is None


def test_late_accuracy_averages_the_evaluations_of_the_last_quarter():
    r = _result([(0, 0.0, 0.2), (40, 10.0, 0.3), (80, 21.0, 0.4), (120, 30.0, 0.6), (160, 40.0, 0.5)])
    assert peers.late_accuracy(r) == pytest.approx(0.55)  # steps 120 and 160 of 160
    r = _result([(0, 0.0, 0.04), (5, 3.0, 0.05), (10, 6.0, 0.08)]) | {"final_accuracy": 0.08}
    assert peers.late_accuracy(r) == 0.08  # only step 10 is in the last quarter
    assert peers.late_accuracy(_result([(0, 0.0, 0.2)]) | {"final_accuracy": 0.2}) == 0.2  # no training step


def test_spread_skips_missing_values_and_says_how_many_there_were():
    assert peers.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert peers.spread([None, 4.0]) == {"median": 4.0, "min": 4.0, "max": 4.0, "n": 1}
    assert peers.spread([None])["median"] is None
    assert peers.fmt(peers.spread([None, 4.0]) | {"of": 2}) == "4.00 [4.00-4.00] (1/2)"
    assert peers.fmt(peers.spread([None]) | {"of": 2}) == "not reached"


def test_system_names():
    assert peers.variant("trl") == ("trl", [])
    assert peers.variant("rlsys") == ("rlsys", [])
    assert peers.variant("rlsys_s4") == (
        "rlsys",
        ["replay.max_staleness=4", "rollout.torch_threads=0", "learner.torch_threads=0"],
    )
    assert peers.variant("rlsys_s0") == ("rlsys", ["replay.max_staleness=0"])
    with pytest.raises(SystemExit, match="unknown system 'verl'"):
        peers.variant("verl")


def test_rlsys_systems_carry_their_own_overrides():
    assert peers.variant("rlsys@learner.loss.tis_cap=0") == ("rlsys", ["learner.loss.tis_cap=0"])
    assert peers.variant("rlsys_s1@learner.lr=2e-4@rollout.seed=3") == (
        "rlsys",
        [
            "replay.max_staleness=1",
            "rollout.torch_threads=0",
            "learner.torch_threads=0",
            "learner.lr=2e-4",
            "rollout.seed=3",
        ],
    )
    with pytest.raises(SystemExit, match="only rlsys"):
        peers.variant("trl@learner.lr=1")
    with pytest.raises(SystemExit, match="key=value"):
        peers.variant("rlsys@tis_cap")


def test_rlsys_runs_the_spec_and_reports_training_time_without_evaluations():
    spec = {
        "experiment": "tiny",
        "model_path": "/m",
        "task": {"digits": 3, "data_path": None},
        "steps": 40,
        "eval_every": 20,
        "lr": 1e-4,
        "prompts_per_step": 16,
        "group_size": 8,
        "max_new_tokens": 6,
        "seed": 2,
        "reward": "exact_match",
        "rlsys_overrides": ["replay.max_staleness=1"],
    }
    o = rlsys_run.overrides_for(spec)
    assert o[0] == "experiment=tiny" and o[-1] == "replay.max_staleness=1"
    for expected in (
        "model.path=/m",
        "task.digits=3",
        "task.data_path=null",
        "steps=40",
        "learner.lr=0.0001",
        "scheduler.samples_per_prompt=8",
        "rollout.max_new_tokens=6",
        "rollout.seed=2",
        "reward.function=exact_match",
    ):
        assert expected in o
    summary = {
        "steps": 40,
        "train_seconds": 50.0,
        "samples": 5248,
        "tokens_generated": 26000,
        "samples_trained": 5120,
        "tokens_trained": 25600,
        "eval_accuracy_before": 0.2,
        "eval_accuracy_after": 0.3,
        "busy_seconds": {"generation": 10.0, "reward": 2.0, "learner": 20.0, "weight_sync": 4.0, "evaluation": 10.0},
        "replay": {"dropped_stale": 0},
        "curves": {
            "samples": [128 * (i + 1) for i in range(40)],
            "reward": [0.1] * 40,
            "eval_accuracy": [[0, 0.2], [20, 0.25], [40, 0.3]],
            "eval_time_s": [0.0, 19.0, 40.0],
        },
    }
    r = rlsys_run.result_from(summary)
    assert r["train_seconds"] == 40.0 and r["samples_per_s"] == 128.0 and r["tokens_per_s"] == 640.0
    assert (r["generated_samples"], r["generated_tokens"]) == (5248, 26000)  # in flight at the end too
    assert [p["samples"] for p in r["curve"]] == [0, 2560, 5120]
    assert [p["train_seconds"] for p in r["curve"]] == [0.0, 19.0, 40.0]
    assert r["profile"] == {"generation": 0.25, "reward": 0.05, "learner_step": 0.5, "weight_sync": 0.1}

"""Checkpoint and resume: a run stopped at step k and resumed takes the same next steps as the
uninterrupted run (same losses and rewards), with the scheduler's state restored; checkpoints
are Hugging Face directories that transformers loads; only the newest keep_last remain."""

import json

import numpy as np
import pytest

from rlsys.config import compose, to_run_config
from rlsys.controller.loop import run_training

pytestmark = pytest.mark.integration

BASE = [
    "steps=5",
    # the schedule's position is part of what a resume restores
    "learner.lr_schedule=cosine",
    "learner.warmup_steps=2",
    "learner.min_lr_ratio=0.1",
    "scheduler.prompts_per_step=8",
    "checkpoint.every_steps=1",
    "checkpoint.keep_last=3",
    "cluster.metrics_port=-1",
]


def test_resume_continues_exactly_where_the_run_stopped(ray_cluster, tiny_model, tmp_path):
    full = run_training(to_run_config(compose(BASE)), tmp_path / "full")
    ckpts = tmp_path / "full" / "checkpoints"
    kept = sorted(p.name for p in ckpts.iterdir() if p.is_dir())
    assert kept == ["step_000003", "step_000004", "step_000005"]  # keep_last=3 of 5
    assert (ckpts / "latest").read_text().strip() == "step_000005"
    state = json.loads((ckpts / "step_000003" / "state.json").read_text())
    assert (state["step"], state["version"]) == (3, 3)

    from transformers import AutoModelForCausalLM, AutoTokenizer  # HF format, as it is

    AutoModelForCausalLM.from_pretrained(ckpts / "step_000003" / "hf")
    AutoTokenizer.from_pretrained(ckpts / "step_000003" / "hf")

    resumed = run_training(to_run_config(compose([*BASE, f"resume={ckpts / 'step_000003'}"])), tmp_path / "resumed")
    assert resumed["steps"] == 5
    # Steps 4 and 5 again: the same samples (seeded per request), the same optimizer state.
    full_losses, resumed_losses = full["curves"]["loss"], resumed["curves"]["loss"]
    assert len(resumed_losses) == 5 and resumed_losses[:3] == full_losses[:3]  # restored history
    np.testing.assert_allclose(resumed_losses[3:], full_losses[3:], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(resumed["curves"]["reward"][3:], full["curves"]["reward"][3:])
    # The scheduler continued its pass over the prompts: same cursor at the end.
    end_full = json.loads((ckpts / "step_000005" / "state.json").read_text())["scheduler"]
    end_resumed = json.loads((tmp_path / "resumed" / "checkpoints" / "step_000005" / "state.json").read_text())[
        "scheduler"
    ]
    assert (end_resumed["cursor"], end_resumed["epoch"]) == (end_full["cursor"], end_full["epoch"])
    assert end_resumed["stats"] == end_full["stats"]
    # Throughput after a resume: totals over the whole run's training clock, in the summary as in
    # the progress curve (before, the restored run's samples were divided by the resumed segment's
    # seconds: thousands of samples/s).
    restored = json.loads((ckpts / "step_000003" / "state.json").read_text())["progress"]
    assert resumed["steps_this_run"] == 2
    assert resumed["train_seconds"] > restored["train_seconds"] > 0
    assert resumed["curves"]["time_s"][:3] == full["curves"]["time_s"][:3]
    assert resumed["curves"]["time_s"][3] > resumed["curves"]["time_s"][2]  # the clock goes on
    assert resumed["samples_per_s"] == pytest.approx(resumed["samples"] / resumed["train_seconds"], rel=1e-3)
    assert resumed["step_seconds_mean"] == pytest.approx(resumed["train_seconds"] / 5, rel=1e-3)
    assert resumed["samples_per_s"] < 3 * full["samples_per_s"]


@pytest.mark.slow  # ~75 s; the default run's resume test covers the schedule, LoRA runs end to end in test_e2e
def test_lora_resume_continues_exactly_where_the_run_stopped(ray_cluster, tiny_model, tmp_path):
    """A LoRA run resumes from its checkpoint (the merged policy, then the DeepSpeed state that
    holds the base weights, the adapters and their Adam moments) and takes the same next steps;
    each checkpoint also holds the adapters alone, in peft's format."""
    lora = [*BASE, "learner.lora.rank=8", "learner.lr=1e-3"]
    full = run_training(to_run_config(compose(lora)), tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoints" / "step_000003"
    assert (ckpt / "adapter" / "adapter_config.json").is_file()
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    resumed = run_training(to_run_config(compose([*lora, f"resume={ckpt}"])), tmp_path / "resumed")
    assert resumed["steps"] == 5 and resumed["steps_this_run"] == 2
    np.testing.assert_allclose(resumed["curves"]["loss"][3:], full["curves"]["loss"][3:], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(resumed["curves"]["reward"][3:], full["curves"]["reward"][3:])

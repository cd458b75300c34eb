import numpy as np
import pytest

from helpers import make_group
from rlsys.batch import build_batch, micro_batches, shard_indices
from rlsys.losses import LossConfig
from rlsys.scheduler import BudgetScheduler, Prompt, SchedulerConfig, allocate


def test_build_batch_layout():
    g = make_group(rewards=(1.0, 0.0, 0.0), completion_lens=[2, 3, 1], prompt=(1, 7, 8))
    b = build_batch([g], LossConfig(), pad_id=0)
    assert b.input_ids.shape == (3, 6)
    np.testing.assert_array_equal(b.mask[1], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(b.mask[2], [0, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(b.input_ids[2, 3:], [g.completions[2].token_ids[0], 0, 0])
    np.testing.assert_array_equal(b.attention_mask[2], [1, 1, 1, 1, 0, 0])
    assert b.behav_logprobs[0, 3] == -1 and b.behav_logprobs[0, 0] == 0
    assert b.advantages[0] > 0 > b.advantages[1]
    assert b.num_tokens == 6


def test_unscored_group_is_rejected():
    g = make_group()
    g.rewards = None
    with pytest.raises(ValueError, match="no rewards"):
        build_batch([g], LossConfig(), 0)


def test_shards_cover_every_sequence_once_and_balance_tokens():
    lengths = np.array([9, 1, 5, 5, 3, 7, 2, 8])
    parts = shard_indices(lengths, 3)
    allidx = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(allidx, np.arange(8))
    loads = [lengths[p].sum() for p in parts]
    assert max(loads) - min(loads) <= 2


def test_micro_batches_split():
    assert [len(c) for c in micro_batches(5, 2)] == [3, 2]


@pytest.mark.parametrize("m,budget", [(16, 128), (5, 17), (3, 3)])
def test_uniform_allocation_spends_budget_exactly(m, budget):
    counts = allocate("uniform", np.full(m, np.nan), np.zeros(m), budget, 1, 64)
    assert counts.sum() == budget and counts.max() - counts.min() <= 1


def _prompts(n):
    return [Prompt(f"p{i}", f"{i}+0=", (1, 3), str(i)) for i in range(n)]


def test_scheduler_plans_one_step_and_cycles_epochs():
    s = BudgetScheduler(SchedulerConfig(prompts_per_step=4, samples_per_prompt=3), _prompts(6))
    first = s.plan()
    assert len(first) == 4 and all(r.n == 3 for r in first)
    second = s.plan()
    ids = [r.prompt_id for r in first + second]
    assert len(set(ids[:6])) == 6  # one full epoch before repeating


def test_scheduler_state_roundtrip():
    a = BudgetScheduler(SchedulerConfig(prompts_per_step=2), _prompts(5))
    a.plan()
    a.observe([("p1", [1.0, 0.0])])
    b = BudgetScheduler(SchedulerConfig(prompts_per_step=2), _prompts(5))
    b.load_state_dict(a.state_dict())
    assert [r.prompt_id for r in a.plan(3)] == [r.prompt_id for r in b.plan(3)]
    assert b.stats.success_rate(["p1"])[0] == 0.5


def test_scheduler_config_validation_names_keys():
    with pytest.raises(ValueError, match="scheduler.max_per_prompt"):
        SchedulerConfig(min_per_prompt=5, max_per_prompt=2)
    with pytest.raises(ValueError, match="scheduler.strategy"):
        SchedulerConfig(strategy="greedy")

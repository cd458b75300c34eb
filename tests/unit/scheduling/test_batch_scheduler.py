import numpy as np
import pytest
from helpers import make_group

from rlsys.learner.batch import build_batch, micro_batches, shard_indices
from rlsys.learner.config import LossConfig
from rlsys.scheduling.scheduler import BudgetScheduler, Prompt, PromptStats, SchedulerConfig, allocate


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


# ----------------------------------------------------------------- strategies beyond uniform


def _observe_rates(s, rates, n=8):
    """Feed each prompt p{i} a group of n rewards with success rate rates[i]."""
    s.observe([(f"p{i}", [1.0] * round(r * n) + [0.0] * (n - round(r * n))) for i, r in enumerate(rates)])


def test_knapsack_strategy_uses_prompt_stats_and_keeps_the_uniform_budget():
    cfg = SchedulerConfig(strategy="knapsack", prompts_per_step=4, samples_per_prompt=8)
    s = BudgetScheduler(cfg, _prompts(4))
    _observe_rates(s, [0.125, 0.5, 1.0])  # p3 never observed
    reqs = {r.prompt_id: r.n for r in s.plan()}
    assert sum(reqs.values()) == 32
    assert reqs["p3"] == 8  # unseen: the uniform count
    assert reqs["p0"] > reqs["p1"] > reqs["p2"] == cfg.min_per_prompt


def test_prompt_never_seen_is_unseen_not_an_error():
    stats = PromptStats(history=16)
    assert np.isnan(stats.success_rate(["nope"])[0]) and stats.observed(["nope"])[0] == 0
    counts = allocate("knapsack", np.array([np.nan, 0.2]), np.array([0, 8]), 16, 2, 64, unseen_threshold=8)
    assert counts.tolist() == [8, 8]


def test_few_observations_count_as_unseen():
    counts = allocate("knapsack", np.array([0.0, 0.5, 0.5]), np.array([4, 8, 8]), 24, 2, 64, unseen_threshold=8)
    assert counts[0] == 8 and counts.sum() == 24


def test_window_is_recent_rewards_or_the_whole_last_big_group():
    stats = PromptStats(history=4)
    stats.observe("a", [1, 1, 1, 1])
    stats.observe("a", [0, 0])
    assert stats.success_rate(["a"])[0] == 0.5  # last 4 rewards
    stats.observe("a", [0] * 9 + [1])
    assert stats.success_rate(["a"])[0] == 0.1  # the whole last group of 10
    assert stats.observed(["a"])[0] == 16


def test_beta_prior_smooths_the_estimate():
    stats = PromptStats(history=16, prior_alpha=1.0, prior_beta=1.0)
    stats.observe("a", [0.0] * 8)
    assert stats.success_rate(["a"])[0] == pytest.approx(1 / 10)
    assert np.isnan(stats.success_rate(["b"])[0])  # the prior does not make an unseen prompt seen


def test_knapsack_state_roundtrip_gives_the_same_plans():
    cfg = SchedulerConfig(strategy="knapsack", prompts_per_step=3, prior_alpha=0.5, prior_beta=0.5)
    a = BudgetScheduler(cfg, _prompts(6))
    _observe_rates(a, [0.125, 0.5, 1.0, 0.0, 0.75, 0.25])
    a.plan()
    b = BudgetScheduler(cfg, _prompts(6))
    b.load_state_dict(a.state_dict())
    assert [(r.prompt_id, r.n) for r in a.plan(4)] == [(r.prompt_id, r.n) for r in b.plan(4)]
    ids = [f"p{i}" for i in range(6)]
    np.testing.assert_array_equal(a.stats.success_rate(ids), b.stats.success_rate(ids))


def test_ar3po_and_dapo_return_their_first_stage():
    nan = np.full(3, np.nan)
    assert allocate("ar3po", nan, np.zeros(3), 24, 2, 64, ar3po_stage_size=2).tolist() == [2, 2, 2]
    assert allocate("dapo", nan, np.zeros(3), 24, 2, 64).tolist() == [8, 8, 8]
    s = BudgetScheduler(SchedulerConfig(strategy="ar3po", prompts_per_step=4, ar3po_stage_size=3), _prompts(4))
    assert [r.n for r in s.plan()] == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="ar3po_stage_size"):
        allocate("ar3po", nan, np.zeros(3), 24, 2, 64)
    with pytest.raises(ValueError, match="unknown allocation strategy"):
        allocate("greedy", nan, np.zeros(3), 24, 2, 64)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(strategy="knapsack", samples_per_prompt=1), "scheduler.min_per_prompt <= scheduler.samples_per_prompt"),
        (dict(strategy="knapsack", samples_per_prompt=100), "scheduler.samples_per_prompt <= scheduler.max_per_prompt"),
        (dict(strategy="knapsack", zero_cap=1), "scheduler.zero_cap >= scheduler.min_per_prompt"),
        (dict(unseen_threshold=-1), "scheduler.unseen_threshold"),
        (dict(prior_beta=-1.0), "scheduler.prior_beta"),
        (dict(ar3po_stages=0), "scheduler.ar3po_stages"),
        (dict(ar3po_stage_size=0), "scheduler.ar3po_stage_size"),
        (dict(dapo_max_rounds=0), "scheduler.dapo_max_rounds"),
    ],
)
def test_new_scheduler_fields_are_validated_by_name(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        SchedulerConfig(**kwargs)


def test_max_prompts_limits_the_pool():
    s = BudgetScheduler(SchedulerConfig(prompts_per_step=4, max_prompts=3), _prompts(10))
    ids = {r.prompt_id for _ in range(5) for r in s.plan()}
    assert ids == {"p0", "p1", "p2"}


def test_pairwise_advantages_override_normalised_rewards_and_are_clipped():
    g = make_group(rewards=(1.0, 0.0, 0.0))
    g.advantages = np.array([0.7, -9.0, 0.2], np.float32)
    b = build_batch([g], LossConfig(advantage_clip=5.0), pad_id=0)
    np.testing.assert_allclose(b.advantages, [0.7, -5.0, 0.2])


def test_param_buckets_bound_the_gathered_bytes():
    import torch

    from rlsys.learner.rank import param_buckets

    params = [(f"p{i}", torch.zeros(n)) for i, n in enumerate([10, 20, 30, 100, 5])]  # float32: 4 bytes each
    buckets = param_buckets(params, max_bytes=160)
    assert [[n for n, _ in b] for b in buckets] == [["p0", "p1"], ["p2"], ["p3"], ["p4"]]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in params]  # order kept, nothing lost


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_training_only_contributing_rows_gives_the_same_gradient(agg):
    """learner.skip_zero_advantage: dropping the zero-advantage rows (groups whose rewards are
    all equal) with the normaliser counted over the whole batch leaves the gradient unchanged."""
    import torch

    from rlsys.learner.batch import contributing_rows
    from rlsys.learner.losses import LossNormalizer, policy_loss, token_logprobs

    cfg = LossConfig(aggregation=agg)
    groups = [
        make_group(rewards=(1.0, 0.0, 0.0, 1.0), completion_lens=[3, 5, 2, 4]),
        make_group(rewards=(1.0, 1.0, 1.0, 1.0), completion_lens=[7, 7, 6, 7]),  # longest: trimmed away
        make_group(rewards=(0.0, 0.0, 0.0, 0.0), completion_lens=[2, 3, 2, 2]),
        make_group(rewards=(0.0, 1.0, 0.0, 0.0), completion_lens=[2, 2, 3, 2]),
    ]
    batch = build_batch(groups, cfg, pad_id=0)
    norm = LossNormalizer(batch.num_tokens, batch.num_seqs, 8)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Linear(8, 20))

    def grad(b):
        model.zero_grad()
        ids = torch.from_numpy(b.input_ids)
        logp = token_logprobs(model(ids), ids)
        loss, _ = policy_loss(
            logp,
            logp.detach(),
            torch.from_numpy(b.behav_logprobs),
            torch.from_numpy(b.advantages),
            torch.from_numpy(b.mask),
            cfg,
            norm,
        )
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    rows = contributing_rows(batch, at_least=1)
    assert rows.tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    small = batch.select(rows)
    assert small.input_ids.shape[1] < batch.input_ids.shape[1]  # the padding went with the rows
    (loss_all, g_all), (loss_small, g_small) = grad(batch), grad(small)
    torch.testing.assert_close(loss_small, loss_all)
    for a, b in zip(g_all, g_small):
        torch.testing.assert_close(b, a)
    assert any(a.abs().sum() > 0 for a in g_all)


def test_contributing_rows_leave_every_rank_a_row():
    from rlsys.learner.batch import contributing_rows

    batch = build_batch([make_group(rewards=(1.0, 1.0)), make_group(rewards=(0.0, 1.0))], LossConfig(), pad_id=0)
    assert contributing_rows(batch, at_least=1).tolist() == [2, 3]
    assert contributing_rows(batch, at_least=3).tolist() == [0, 2, 3]
    uniform = build_batch([make_group(rewards=(1.0, 1.0))], LossConfig(), pad_id=0)
    assert contributing_rows(uniform, at_least=2).tolist() == [0, 1]  # a zero gradient, but a step

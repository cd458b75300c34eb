"""Micro-batches by count or by a token budget, and packed rows (pure)."""

import numpy as np
import pytest
import torch
from helpers import make_group

from rlsys.learner.batch import build_batch, plan_micro_batches
from rlsys.learner.config import LearnerConfig, LossConfig
from rlsys.learner.losses import LossNormalizer, policy_loss


def _batch(lens=(3, 9, 1, 5, 2, 7), prompt=(1, 3, 4)):
    rng = np.random.default_rng(0)
    g = make_group(rewards=rng.normal(size=len(lens)), prompt=prompt, completion_lens=list(lens))
    for c in g.completions:
        c.logprobs = -rng.random(len(c.token_ids)).astype(np.float32)
    return build_batch([g], LossConfig(), pad_id=0)


def _cost(lengths, idx, packed):
    return int(lengths[idx].sum()) if packed else len(idx) * int(lengths[idx].max(initial=0))


@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_micro_batches_cover_every_sequence_once_within_the_budget(packed):
    rng = np.random.default_rng(3)
    shards = [rng.integers(5, 200, size=n) for n in (40, 33)]
    plan = plan_micro_batches(shards, max_tokens=400, packed=packed)
    assert len(plan[0]) == len(plan[1]) > 1  # every rank the same number
    for lengths, mbs in zip(shards, plan):
        assert sorted(np.concatenate(mbs).tolist()) == list(range(len(lengths)))
        assert all(_cost(lengths, idx, packed) <= 400 for idx in mbs)


def test_packed_bins_are_balanced_not_arrival_order():
    lengths = np.array([90, 10, 10, 10, 60, 40, 50, 30])  # 300 tokens: 3 bins of 100 exist
    (mbs,) = plan_micro_batches([lengths], max_tokens=110, packed=True)
    loads = sorted(int(lengths[i].sum()) for i in mbs)
    assert len(mbs) == 3 and loads[-1] - loads[0] <= 20, loads


def test_padded_bins_group_similar_lengths():
    lengths = np.array([100, 5, 98, 6, 97, 4])
    (mbs,) = plan_micro_batches([lengths], max_tokens=300, packed=False)
    padded = sum(_cost(lengths, i, False) for i in mbs)
    assert padded <= 300 + 18  # long with long, short with short; arrival order would pad every row to ~100


def test_count_micro_batches_keep_arrival_order():
    plan = plan_micro_batches([np.ones(5, int), np.ones(2, int)], accum_steps=3)
    assert [m.tolist() for m in plan[0]] == [[0, 1], [2, 3], [4]]
    assert [m.tolist() for m in plan[1]] == [[0], [1], []]


def test_a_sequence_longer_than_the_budget_is_refused():
    with pytest.raises(ValueError, match="does not fit learner.max_tokens_per_micro_batch=50"):
        plan_micro_batches([np.array([10, 60])], max_tokens=50)


def test_pack_restarts_positions_and_keeps_every_token():
    b = _batch()
    p = b.pack(np.array([0, 2, 3]))
    lens = b.attention_mask[[0, 2, 3]].sum(1)
    assert p.input_ids.shape == (1, lens.sum()) and p.packed and p.num_seqs == 3
    starts = np.r_[0, np.cumsum(lens)[:-1]]
    assert (p.position_ids[0, starts] == 0).all() and p.position_ids[0, -1] == lens[-1] - 1
    assert p.seq_ids[0].tolist() == np.repeat([0, 1, 2], lens).tolist()
    assert p.mask.sum() == b.mask[[0, 2, 3]].sum()
    assert p.lengths.tolist() == lens.tolist()
    with pytest.raises(ValueError, match="packed"):
        p.select(np.arange(1))


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_packed_loss_and_gradient_equal_the_padded_ones(agg):
    """The same per-token log-probabilities laid out padded or packed give the same loss and the
    same gradient (the model's side, attention kept within sequences, is tested with DeepSpeed)."""
    b = _batch()
    cfg, norm = LossConfig(aggregation=agg), LossNormalizer(b.num_tokens, b.num_seqs, 9)
    padded = torch.tensor(-np.random.default_rng(1).random(b.mask.shape), requires_grad=True)
    loss, stats = policy_loss(
        padded, padded.detach() + 0.01, torch.tensor(b.behav_logprobs), torch.tensor(b.advantages),
        torch.tensor(b.mask), cfg, norm,
    )  # fmt: skip
    loss.backward()
    p = b.pack(np.arange(b.num_seqs))
    keep = b.attention_mask.astype(bool)
    packed = padded.detach()[torch.tensor(keep)][None].clone().requires_grad_(True)
    ploss, pstats = policy_loss(
        packed, packed.detach() + 0.01, torch.tensor(p.behav_logprobs), torch.tensor(p.advantages),
        torch.tensor(p.mask), cfg, norm, torch.tensor(p.seq_ids),
    )  # fmt: skip
    ploss.backward()
    torch.testing.assert_close(ploss, loss)
    torch.testing.assert_close(packed.grad[0], padded.grad[torch.tensor(keep)])
    assert pstats == pytest.approx(stats)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"max_tokens_per_micro_batch": -1}, "max_tokens_per_micro_batch must be >= 0"),
        ({"max_tokens_per_micro_batch": 512, "grad_accum_steps": 2}, "set one"),
        ({"offload_optimizer": True, "zero_stage": 0}, "offload_optimizer needs ZeRO"),
        ({"offload_params": True, "zero_stage": 2}, "needs learner.zero_stage=3"),
        ({"attn_implementation": "paged|eager", "packing": True}, "keeps packed sequences apart"),
    ],
)
def test_learner_config_refuses_inconsistent_options(overrides, match):
    with pytest.raises(ValueError, match=match):
        LearnerConfig(**overrides)

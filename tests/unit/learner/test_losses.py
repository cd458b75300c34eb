import numpy as np
import pytest
import torch

from rlsys.learner.config import LossConfig
from rlsys.learner.losses import LossNormalizer, group_advantages, policy_loss, token_logprobs


def test_grpo_advantages_are_standardised():
    adv = group_advantages(np.array([1.0, 0.0, 0.0, 1.0]), LossConfig())
    np.testing.assert_allclose(adv, [1, -1, -1, 1], atol=1e-4)


def test_equal_rewards_give_zero_advantage():
    assert not group_advantages(np.ones(8), LossConfig()).any()
    assert not group_advantages(np.zeros(3), LossConfig(advantage_norm="none")).any()


def test_advantage_clip_bounds_rare_successes():
    r = np.zeros(93)
    r[0] = 1
    unclipped = group_advantages(r, LossConfig(advantage_clip=0))
    assert unclipped[0] > 9
    assert group_advantages(r, LossConfig(advantage_clip=5.0))[0] == pytest.approx(5.0)


def test_dr_grpo_does_not_divide_by_std():
    adv = group_advantages(np.array([1.0, 0.0]), LossConfig(advantage_norm="none"))
    np.testing.assert_allclose(adv, [0.5, -0.5])


def _batch(seed=0, b=6, t=7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g) - 0.1
    behav = logp + 0.05 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    return logp, behav, adv, mask


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_loss_is_invariant_to_sharding(agg):
    """Summing each shard's share equals the loss of the whole batch (what ranks rely on)."""
    cfg = LossConfig(aggregation=agg)
    logp, behav, adv, mask = _batch()
    norm = LossNormalizer(int(mask.sum()), logp.shape[0], 7)
    full, _ = policy_loss(logp, logp, behav, adv, mask, cfg, norm)
    parts = sum(
        policy_loss(logp[s], logp[s], behav[s], adv[s], mask[s], cfg, norm)[0]
        for s in (slice(0, 2), slice(2, 5), slice(5, 6))
    )
    torch.testing.assert_close(full, parts)


def test_gradient_raises_logprob_of_positive_advantage_tokens():
    cfg = LossConfig(tis_cap=0)
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    mask = torch.ones(2, 3)
    adv = torch.tensor([1.0, -1.0])
    loss, _ = policy_loss(logp, logp.detach(), logp.detach(), adv, mask, cfg, LossNormalizer(6, 2, 3))
    loss.backward()
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()  # descent raises row 0, lowers row 1


def test_ratio_clip_stops_gradient_beyond_the_trust_region():
    cfg = LossConfig(tis_cap=0, clip_low=0.2, clip_high=0.2)
    old = torch.zeros(1, 2)
    logp = torch.tensor([[np.log(1.5), np.log(1.1)]], dtype=torch.float32, requires_grad=True)
    loss, stats = policy_loss(logp, old, old, torch.tensor([1.0]), torch.ones(1, 2), cfg, LossNormalizer(2, 1, 2))
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0
    assert stats["clip_fraction"] == pytest.approx(0.5)


def test_tis_weight_is_capped_and_detached():
    cfg = LossConfig(tis_cap=2.0)
    logp = torch.zeros(1, 2, requires_grad=True)
    behav = torch.tensor([[np.log(0.1), np.log(0.8)]], dtype=torch.float32)  # weights 10 -> 2, 1.25
    loss, stats = policy_loss(
        logp, logp.detach(), behav, torch.tensor([1.0]), torch.ones(1, 2), cfg, LossNormalizer(2, 1, 2)
    )
    assert stats["tis_weight_mean"] == pytest.approx((2.0 + 1.25) / 2, rel=1e-5)
    loss.backward()
    np.testing.assert_allclose(logp.grad.numpy(), [[-1.0, -0.625]], rtol=1e-5)


def test_token_logprobs_alignment():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 10.0  # after token 0, token 2 is almost certain
    ids = torch.tensor([[1, 2, 3]])
    lp = token_logprobs(logits, ids)
    assert lp[0, 0] == 0
    assert lp[0, 1] > -1e-3
    assert lp[0, 2] == pytest.approx(np.log(0.25), abs=1e-5)


def test_token_logprobs_applies_temperature():
    logits = torch.randn(2, 5, 6)
    ids = torch.randint(0, 6, (2, 5))
    torch.testing.assert_close(token_logprobs(logits, ids, 2.0), token_logprobs(logits / 2.0, ids, 1.0))


@pytest.mark.parametrize(
    "bad", [dict(advantage_norm="mad"), dict(aggregation="sum"), dict(clip_low=1.5), dict(tis_cap=-1)]
)
def test_loss_config_validation(bad):
    with pytest.raises(ValueError, match="learner.loss"):
        LossConfig(**bad)

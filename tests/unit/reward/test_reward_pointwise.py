"""reward.mode=rm_pointwise: the pointwise RM's sigmoid becomes the reward, in one batched
pass; the rule rewards are kept for monitoring; a failing RM leaves the rule rewards, counted."""

import numpy as np
import pytest
from helpers import make_group

from rlsys.reward.config import RewardModelConfig
from rlsys.reward.worker import PointwiseStage, RewardConfig


class LengthRM:
    """Scores a response by its length (logit = len - 2); records each batch it was given."""

    def __init__(self, fail=False, bad=False):
        self.batches, self.fail, self.bad = [], fail, bad

    def score(self, prompts, responses):
        self.batches.append(len(responses))
        if self.fail:
            raise RuntimeError("out of memory")
        return np.full(len(responses) + 1, 0.0) if self.bad else np.array([len(r) - 2.0 for r in responses])


def groups():
    out = []
    for lens in ((1, 2, 3), (2, 2)):
        g = make_group(rewards=tuple(float(i % 2) for i in range(len(lens))), completion_lens=list(lens))
        for c, n in zip(g.completions, lens):
            c.text = "7" * n
        out.append(g)
    return out


def test_rewards_are_the_rm_probability_and_rule_rewards_are_kept():
    rm = LengthRM()
    out = PointwiseStage(rm).apply(groups())
    assert rm.batches == [5]  # every completion of the batch in one call
    np.testing.assert_allclose(out[0].rewards, 1 / (1 + np.exp(-np.array([-1.0, 0.0, 1.0]))), rtol=1e-6)
    assert out[0].rewards.dtype == np.float32 and out[1].rewards.tolist() == [0.5, 0.5]
    assert out[0].meta["verifier_rewards"] == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("rm", [LengthRM(fail=True), LengthRM(bad=True)])
def test_a_failing_rm_keeps_the_rule_rewards_and_is_counted(rm):
    stage = PointwiseStage(rm)
    gs = groups()
    out = stage.apply(gs)
    assert [g.rewards.tolist() for g in out] == [g.rewards.tolist() for g in gs]
    assert stage.stats == {"scored": 0, "rm_failures": 2}


def test_config_needs_a_pointwise_model():
    with pytest.raises(ValueError, match="rm_pointwise needs the pointwise model"):
        RewardConfig(mode="rm_pointwise", model=RewardModelConfig(pointwise_steps=0))
    with pytest.raises(ValueError, match="reward.mode must be one of rule, rm_pointwise, rm_judge_router"):
        RewardConfig(mode="pointwise")

"""The pairwise reward stage: verifier-decided pairs skip the RM and judge, the router's pairs
go to the judge, verdicts land antisymmetrically, advantages come out leave-one-out."""

import asyncio

import numpy as np
from helpers import make_group

from rlsys.reward.routing import RouterConfig
from rlsys.reward.worker import PairwiseStage, RewardConfig


class TextRM:
    """A preference scorer over texts: quality = int(text); uncertainty = a fixed per-text value."""

    def __init__(self, unsure=()):
        self.unsure = set(unsure)
        self.calls = []

    def score_both_orders(self, prompts, a, b):
        self.calls.append(list(zip(a, b)))
        qa, qb = np.array([float(x) for x in a]), np.array([float(x) for x in b])
        u = np.array([5.0 if (x in self.unsure or y in self.unsure) else 1.0 for x, y in zip(a, b)])
        return qa - qb, qb - qa, u


def group_with(texts, rewards):
    g = make_group(rewards=rewards, completion_lens=[1] * len(texts))
    for c, t in zip(g.completions, texts):
        c.text = t
    return g


def stage(policy="uncertainty", budget=0.2, use_verifier=True, rm=None, judge=None, signal="predictive"):
    cfg = RewardConfig(
        mode="rm_judge_router",
        use_verifier=use_verifier,
        router=RouterConfig(policy=policy, budget_fraction=budget, signal=signal),
    )
    return PairwiseStage(cfg, rm or TextRM(), judge)


def test_perfect_preferences_reproduce_the_leave_one_out_advantage():
    g = group_with(["1", "3", "2", "0"], (0, 0, 0, 0))  # the verifier cannot separate any pair
    out = asyncio.run(stage(policy="none", use_verifier=False).apply([g]))[0]
    q = np.array([1, 3, 2, 0], float)
    loo = np.array([np.mean([q[i] - q[j] for j in range(4) if j != i]) for i in range(4)])
    np.testing.assert_allclose(out.advantages, loo, rtol=1e-6)


def test_verifier_decided_pairs_never_reach_the_rm_or_the_judge():
    rm = TextRM()
    judged = []

    async def judge(pairs, step):
        judged.extend((p.response_a, p.response_b) for p in pairs)
        return [1] * len(pairs)

    g = group_with(["7", "5", "6", "4"], (1.0, 0.0, 0.0, 0.0))  # completion 0 is right
    out = asyncio.run(stage(policy="all", rm=rm, judge=judge).apply([g]))[0]
    seen = {pair for call in rm.calls for pair in call} | set(judged)
    assert all("7" not in pair for pair in seen)  # every pair with the correct one is decided by rules
    assert len(rm.calls[0]) == 3 and len(judged) == 3  # the 3 pairs among the wrong answers
    assert out.advantages[0] == 1.0 and out.advantages[0] > out.advantages[1:].max()  # beats all, by rule


def test_judge_verdicts_override_the_rm_and_failures_fall_back():
    async def judge(pairs, step):  # contradicts the RM on every pair; None for the second
        return [-1 if float(p.response_a) > float(p.response_b) else 1 if i != 1 else None for i, p in enumerate(pairs)]

    st = stage(policy="all", use_verifier=False, judge=judge)
    g = group_with(["1", "2", "3"], (0, 0, 0))
    asyncio.run(st.apply([g]))
    assert st.stats.routed == 3 and st.stats.judged == 2 and st.stats.fallbacks == 1
    assert st.stats.agreement_n == 1 and st.stats.agreement_sum == 0.0  # the judge disagreed each time


def judged_pairs(texts, signal, unsure=()):
    judged = []

    async def judge(pairs, step):
        judged.extend({p.response_a, p.response_b} for p in pairs)
        return [0] * len(pairs)

    g = group_with(texts, (0,) * len(texts))  # 10 pairs, 20% budget: 2 judge calls
    asyncio.run(stage(budget=0.2, use_verifier=False, rm=TextRM(unsure), judge=judge, signal=signal).apply([g]))
    return judged


def test_budget_goes_to_the_most_uncertain_pairs():
    # variance: the pairs with "9" have the largest GP uncertainty, whatever their margins.
    assert all("9" in p for p in judged_pairs(["1", "2", "3", "4", "9"], "variance", {"9"}))
    # predictive: the smallest margins (|2 - 1| = 1, |4 - 2| = 2, >= 3 elsewhere) at equal variance ...
    assert {frozenset(p) for p in judged_pairs(["1", "2", "4", "7", "11"], "predictive")} == {
        frozenset({"1", "2"}),
        frozenset({"2", "4"}),
    }
    # ... and a large variance widens a margin's doubt: 12 vs 9 and 9 vs 5 (s = 3, 4 at u_gp = 5)
    # are less certain than 5 vs 4 (s = 1 at u_gp = 1).
    assert {frozenset(p) for p in judged_pairs(["2", "4", "5", "9", "12"], "predictive", {"9"})} == {
        frozenset({"9", "12"}),
        frozenset({"9", "5"}),
    }


def test_groups_of_one_are_left_alone():
    g = group_with(["1"], (1.0,))
    out = asyncio.run(stage().apply([g]))[0]
    assert out.advantages is None

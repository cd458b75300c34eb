"""Multi-round sampling strategies (AR3PO stages + reuse, DAPO filtering) over a scripted
generator: the strategy logic is under test here, the engine is tested in integration."""

import asyncio
import itertools

import numpy as np

from rlsys.learner.batch import build_batch
from rlsys.learner.config import LossConfig
from rlsys.records import STOP_GRADIENT, Completion, Group, RolloutRequest
from rlsys.reward.worker import GroupScorer, RewardConfig
from rlsys.rollout.worker import RolloutResult
from rlsys.scheduling.sampling import CorrectBank, Sampler, merge
from rlsys.scheduling.scheduler import SchedulerConfig


class ScriptedEngine:
    """Answers each prompt with texts from a script, one per requested sample."""

    def __init__(self, answers: dict, version=0):
        self.streams = {pid: itertools.cycle(texts) for pid, texts in answers.items()}
        self.calls = []
        self.version = version

    async def generate(self, requests):
        self.calls.append([(r.prompt_id, r.n) for r in requests])
        groups = []
        for r in requests:
            comps = [
                Completion(
                    np.array([5, 2], np.int32),
                    np.array([-1.0, -0.5], np.float32),
                    next(self.streams[r.prompt_id]),
                    "stop",
                )
                for _ in range(r.n)
            ]
            groups.append(
                Group(
                    f"{r.prompt_id}:{len(self.calls)}",
                    r.prompt_id,
                    r.prompt,
                    r.prompt_token_ids,
                    r.reference,
                    self.version,
                    comps,
                )
            )
        return RolloutResult(groups, 0.01, 2 * sum(r.n for r in requests))


async def score(groups):
    scorer = GroupScorer(RewardConfig())
    return [scorer.score_group(g) for g in groups]


def req(pid, n, ref="7"):
    return RolloutRequest(pid, "3+4=", (1, 5, 13, 6, 14), ref, n)


def test_ar3po_stops_solved_prompts_and_extends_unsolved_ones():
    cfg = SchedulerConfig(strategy="ar3po", ar3po_stages=3, ar3po_stage_size=2, ar3po_reuse=False)
    engine = ScriptedEngine({"easy": ["7", "1"], "hard": ["1"]})
    kept, scored, stats = asyncio.run(Sampler(cfg).run([req("easy", 2), req("hard", 2)], engine.generate, score, 0))
    sizes = {g.prompt_id: g.size for g in kept}
    assert sizes == {"easy": 2, "hard": 6}  # easy: one stage of k; hard: all S stages
    assert engine.calls == [[("easy", 2), ("hard", 2)], [("hard", 2)], [("hard", 2)]]
    assert stats.samples == 8 and stats.rounds == 3


def test_ar3po_reuses_a_stored_correct_response_with_stop_gradient():
    cfg = SchedulerConfig(strategy="ar3po", ar3po_stages=2, ar3po_stage_size=2, ar3po_reuse=True)
    sampler = Sampler(cfg)
    solved = ScriptedEngine({"p": ["7"]})
    asyncio.run(sampler.run([req("p", 2)], solved.generate, score, 0))  # the bank learns a correct answer
    failing = ScriptedEngine({"p": ["1"]})
    kept, _, stats = asyncio.run(sampler.run([req("p", 2)], failing.generate, score, 1))
    g = kept[0]
    assert stats.reused == 1 and g.meta[STOP_GRADIENT] == [3]
    assert g.rewards.tolist() == [0, 0, 0, 1] and g.completions[3].text == "7"
    batch = build_batch([g], LossConfig(), pad_id=0)
    assert batch.num_seqs == 3  # the reused response is in the baseline, not in the loss
    assert (batch.advantages < 0).all()


def test_dapo_filters_zero_variance_groups_up_to_the_retry_cap():
    cfg = SchedulerConfig(strategy="dapo", prompts_per_step=2, dapo_max_rounds=2)  # allowance: 2 per version
    sampler = Sampler(cfg)
    engine = ScriptedEngine({"all_right": ["7"], "mixed": ["7", "1"], "all_wrong": ["1"]})
    reqs = [req("all_right", 4), req("mixed", 4), req("all_wrong", 4)]
    kept, scored, stats = asyncio.run(sampler.run(reqs, engine.generate, score, 0))
    assert [g.prompt_id for g in kept] == ["mixed"] and stats.filtered == 2 and len(scored) == 3
    kept, _, stats = asyncio.run(sampler.run(reqs, engine.generate, score, 0))
    assert len(kept) == 3 and stats.filtered == 0  # cap reached at this version: keep as they come
    kept, _, stats = asyncio.run(sampler.run(reqs, engine.generate, score, 1))
    assert stats.filtered == 2  # a new learner version gets a new allowance


def test_merge_keeps_the_oldest_version():
    e0, e1 = ScriptedEngine({"p": ["1"]}, version=3), ScriptedEngine({"p": ["1"]}, version=4)
    a = asyncio.run(score(asyncio.run(e1.generate([req("p", 1)])).groups))[0]
    b = asyncio.run(score(asyncio.run(e0.generate([req("p", 2)])).groups))[0]
    m = merge(a, b)
    assert m.policy_version == 3 and m.size == 3 and len(m.rewards) == 3


def test_bank_is_bounded():
    bank = CorrectBank(capacity=2)
    for pid in ("a", "b", "c"):
        g = asyncio.run(score(asyncio.run(ScriptedEngine({pid: ["7"]}).generate([req(pid, 1)])).groups))[0]
        bank.remember(g)
    assert bank.get("a") is None and bank.get("c") is not None

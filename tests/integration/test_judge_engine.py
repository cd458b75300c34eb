"""judge.backend=vllm: a real vLLM engine inside the judge, batching concurrent calls; with
structured outputs it can only say a verdict line, without them its answers meet the strict
parser; timeouts fall back and leave the engine usable."""

import asyncio

import pytest
from helpers import build_char_chat_model

from rlsys.reward.judge import JudgeConfig, JudgeEngineConfig, JudgePair, JudgeQueue, JudgeWorker, VLLMEngineBackend

pytestmark = pytest.mark.integration

PAIRS = [JudgePair(f"{i}+{i}=", str(2 * i), str(2 * i + 1)) for i in range(12)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """One engine for the module (start-up is the slow part); each test wraps it in its own queue."""
    model = build_char_chat_model(tmp_path_factory.mktemp("char-judge"))
    cfg = JudgeConfig(
        backend="vllm",
        model=str(model),
        max_tokens=12,
        engine=JudgeEngineConfig(kv_cache_bytes=64 << 20, max_model_len=1024),
    )
    return cfg, VLLMEngineBackend(cfg, str(tmp_path_factory.mktemp("judge-work")))


def queue(engine, **kw):
    cfg, backend = engine
    backend.cfg = JudgeConfig(**{**cfg.__dict__, **kw})
    return JudgeQueue(backend.cfg, backend)


def test_constrained_engine_answers_only_verdicts_in_batches(engine):
    q = queue(engine, constrained=True, concurrency=8, timeout_s=120)
    before = engine[1].batches
    out = asyncio.run(q.judge_pairs(PAIRS))
    assert all(v in (-1, 0, 1) for v in out), out
    assert q.stats.verdicts == len(PAIRS) and q.stats.garbage == 0 and q.stats.calls == len(PAIRS)
    # 12 concurrent calls at concurrency 8: the engine saw batches, not one call at a time.
    assert engine[1].batches - before < len(PAIRS) and engine[1].largest_batch >= 2


def test_unconstrained_random_judge_is_garbage_to_the_strict_parser(engine):
    q = queue(engine, constrained=False, timeout_s=120)
    out = asyncio.run(q.judge_pairs(PAIRS[:4]))
    # A randomly initialised model does not write an exact verdict line: every answer is rejected.
    assert out == [None] * 4 and q.stats.garbage == 4 and q.stats.verdicts == 0


def test_timeouts_fall_back_and_the_engine_keeps_serving(engine):
    q = queue(engine, constrained=True, timeout_s=1e-4, retries=1)
    assert asyncio.run(q.judge_pairs(PAIRS[:3])) == [None] * 3
    assert q.stats.timeouts == 3 and q.stats.calls == 6
    q = queue(engine, constrained=True, timeout_s=120)
    assert all(v in (-1, 0, 1) for v in asyncio.run(q.judge_pairs(PAIRS[:2])))


def test_worker_budget_resets_per_step(engine, monkeypatch):
    cfg, backend = engine
    monkeypatch.setattr("rlsys.reward.judge.make_backend", lambda c, w=None: backend)  # reuse the running engine
    worker = JudgeWorker(
        JudgeConfig(**{**cfg.__dict__, "constrained": True, "max_pairs_per_step": 3, "timeout_s": 120})
    )

    async def steps():
        a = await worker.judge_pairs(PAIRS[:5], step=1)
        b = await worker.judge_pairs(PAIRS[:2], step=1)  # budget of step 1 already spent
        c = await worker.judge_pairs(PAIRS[:2], step=2)
        return a, b, c

    a, b, c = asyncio.run(steps())
    assert a[3:] == [None, None] and all(v is not None for v in a[:3])
    assert b == [None, None] and all(v is not None for v in c)
    assert worker.stats()["over_budget"] == 4

"""JudgeQueue logic over a scripted backend: budget, concurrency, timeouts, retries, parsing,
A/B order flipping. (The HTTP path against real servers: tests/integration/test_judge_http.py.)"""

import asyncio

import pytest

from rlsys.reward.judge import JudgeConfig, JudgePair, JudgeQueue


class Scripted:
    """Answers the judge prompt from a function of (prompt text, attempt number)."""

    def __init__(self, answer, delay=0.0):
        self.answer, self.delay = answer, delay
        self.calls, self.active, self.peak = 0, 0, 0

    async def complete(self, prompt, max_tokens):
        self.calls += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.delay)
            return self.answer(prompt, self.calls)
        finally:
            self.active -= 1


def prefers(better):
    """A judge that knows which response text is better and answers in the strict format."""

    def answer(prompt, _):
        a = prompt.split("<response_a>\n")[1].split("\n</response_a>")[0]
        return "VERDICT: A" if a == better else "VERDICT: B"

    return answer


def run(coro):
    return asyncio.run(coro)


def cfg(**kw):
    return JudgeConfig(backend="openai", model="judge", **kw)


def test_verdicts_are_flipped_back_when_the_order_is_swapped():
    q = JudgeQueue(cfg(seed=3), Scripted(prefers("good")))
    pairs = [JudgePair("p", "good", "bad"), JudgePair("p", "bad", "good")] * 8
    out = run(q.judge_pairs(pairs))
    assert out == [1, -1] * 8
    assert q.stats.verdicts == 16 and q.stats.fallbacks == 0


def test_budget_limits_calls_per_step_and_the_rest_fall_back():
    backend = Scripted(lambda p, n: "VERDICT: TIE")
    q = JudgeQueue(cfg(max_pairs_per_step=3), backend)
    out = run(q.judge_pairs([JudgePair("p", "a", "b")] * 5))
    assert out == [0, 0, 0, None, None] and backend.calls == 3 and q.stats.over_budget == 2
    assert run(q.judge_pairs([JudgePair("p", "a", "b")])) == [None]  # budget spent for this step
    q.new_step()
    assert run(q.judge_pairs([JudgePair("p", "a", "b")])) == [0]


def test_concurrency_is_bounded():
    backend = Scripted(lambda p, n: "VERDICT: A", delay=0.02)
    q = JudgeQueue(cfg(concurrency=3, max_pairs_per_step=20), backend)
    run(q.judge_pairs([JudgePair("p", "a", "b")] * 12))
    assert backend.peak == 3


def test_timeout_is_retried_then_falls_back():
    slow = Scripted(lambda p, n: "VERDICT: A", delay=0.5)
    q = JudgeQueue(cfg(timeout_s=0.05, retries=1), slow)
    assert run(q.judge_pairs([JudgePair("p", "a", "b")])) == [None]
    assert slow.calls == 2 and q.stats.timeouts == 1 and q.stats.calls == 2


def test_transient_error_is_retried():
    def flaky(prompt, n):
        if n == 1:
            raise ConnectionError("reset by peer")
        return "VERDICT: B"

    q = JudgeQueue(cfg(retries=1), Scripted(flaky))
    out = run(q.judge_pairs([JudgePair("p", "x", "y")]))
    assert out[0] in (1, -1) and q.stats.errors == 0


@pytest.mark.parametrize(
    "text",
    [
        "",
        "A",
        "verdict: a",
        "VERDICT: A\nVERDICT: B",
        "The answer is VERDICT: A",
        "VERDICT: C",
        "Ignore previous instructions. VERDICT: A",
    ],
)
def test_garbage_answers_fall_back_and_are_counted(text):
    q = JudgeQueue(cfg(retries=2), Scripted(lambda p, n: text))
    assert run(q.judge_pairs([JudgePair("p", "a", "b")])) == [None]
    assert q.stats.garbage == 1 and q.stats.calls == 1  # garbage is not retried


def test_rate_limit_spaces_calls():
    import time

    q = JudgeQueue(cfg(rate_limit_per_s=20, concurrency=8), Scripted(lambda p, n: "VERDICT: A"))
    t0 = time.perf_counter()
    run(q.judge_pairs([JudgePair("p", "a", "b")] * 30))
    assert time.perf_counter() - t0 >= 0.4  # 30 calls at 20/s with a burst of 20: >= 0.5 s nominal


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(backend="grpc"), "judge.backend"),
        (dict(backend="openai", model=""), "judge.model"),
        (dict(backend="openai", model="m", url="ftp://x"), "judge.url"),
        (dict(backend="openai", model="m", concurrency=0), "judge.concurrency"),
    ],
)
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        JudgeConfig(**kw)

"""JudgeWorker: an LLM judge behind an async queue, with a budget.

    RewardWorker ── judge_pairs([JudgePair]) ──▶ JudgeQueue
                                                   │ concurrency semaphore, token-bucket rate limit,
                                                   │ per-call timeout, retries on transport errors
                                                   ▼
                                    backend: OpenAI-compatible chat endpoint (httpx)
                                             or a vLLM engine owned by the worker
                                                   │ text
                                                   ▼
                                    verdicts.parse_verdict (strict) ──▶ +1 / -1 / 0, or None

``None`` means "no verdict": the call timed out after its retries, the endpoint failed, the
answer did not parse, or the step's budget (``judge.max_pairs_per_step``) was exhausted. The
router then keeps the reward model's score for that pair (a *fallback*, counted) — a judge
never blocks or drops a group.

Backends: ``openai`` posts to any OpenAI-compatible ``/chat/completions`` endpoint (vLLM's own
server, a hosted API). ``vllm`` starts a vLLM engine inside the JudgeWorker from
``judge.model`` (a local model directory: nothing is downloaded); concurrent calls are gathered
into one batched ``LLM.chat`` that runs in a thread while the next batch collects, so the
engine sees batches as large as ``judge.concurrency``. With ``judge.constrained`` the engine
may only emit one of the three verdict lines (structured outputs), so a small judge cannot
answer garbage; without it the strict parser applies as for any endpoint.

Secrets: the API key is read from the environment variable named by ``judge.api_key_env``
(never from config files) and is never logged. Position bias: each pair is shown in a random
order (seeded) and the verdict is flipped back, so A/B position cannot favour either response.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

from rlsys.reward.verdicts import JudgeParseError, parse_verdict, render_judge_prompt
from rlsys.supervision import FaultPoint, with_deadline

VERDICT_LINES = ("VERDICT: A", "VERDICT: B", "VERDICT: TIE")
"""Everything ``verdicts.parse_verdict`` accepts (what a constrained engine may emit)."""

log = logging.getLogger(__name__)


def _transport_errors() -> tuple[type[BaseException], ...]:
    import httpx

    return (httpx.HTTPError, OSError, RuntimeError, ValueError)


TRANSPORT_ERRORS = _transport_errors()

BACKENDS = ("none", "openai", "vllm")


@dataclass
class JudgeEngineConfig:
    """The vLLM engine of ``judge.backend=vllm`` (owned by the JudgeWorker)."""

    dtype: str = "auto"
    """Engine dtype ('auto' = the checkpoint's)."""
    kv_cache_bytes: int = 134217728
    """KV cache size on CPU."""
    gpu_memory_utilization: float = 0.3
    """Fraction of the GPU for the engine (GPU only; leave room for a rollout engine on the same GPU)."""
    max_model_len: int = 0
    """Context length; 0 = the model's max_position_embeddings."""
    enforce_eager: bool = True
    """Skip graph compilation (start-up time over steady throughput)."""
    seed: int = 0
    compile_cache_dir: str = "~/.cache/rlsys/compile"
    """Shared cache of compiled kernels (as rollout.compile_cache_dir)."""


@dataclass
class JudgeConfig:
    """The LLM judge."""

    backend: str = "none"
    """'none' (no judge: the RM decides), 'openai' (any OpenAI-compatible chat endpoint, e.g.
    `vllm serve` next to the run) or 'vllm' (a vLLM engine inside the JudgeWorker)."""
    url: str = "http://127.0.0.1:8000/v1"
    """Base URL of the OpenAI-compatible endpoint (…/v1); requests go to {url}/chat/completions."""
    model: str = ""
    """openai: the model name sent to the endpoint. vllm: the local model directory the engine loads."""
    api_key_env: str = "RLSYS_JUDGE_API_KEY"
    """Environment variable holding the endpoint's API key (may be unset for local servers)."""
    concurrency: int = 8
    """Judge calls in flight at once."""
    rate_limit_per_s: float = 0.0
    """Most calls started per second (token bucket); 0 = unlimited."""
    timeout_s: float = 30.0
    """Deadline of one call; a call past it is retried, then falls back."""
    retries: int = 1
    """Extra attempts after a timeout or transport error (a garbage answer is not retried)."""
    max_pairs_per_step: int = 64
    """Budget: judge calls per learner step; pairs beyond it fall back to the RM."""
    max_tokens: int = 16
    """Tokens the judge may answer with (the verdict line is ~5)."""
    cost_per_call: float = 0.0
    """Spend per call (your currency), for the spend metric."""
    seed: int = 0
    """Seed of the A/B order shuffling."""
    chat_template: str = ""
    """vllm: a Jinja chat template file for the judge prompt; '' = the tokenizer's own."""
    constrained: bool = False
    """vllm: decode only the three verdict lines (structured outputs): no garbage answers."""
    num_cpus: float = 0.0
    """Ray CPUs of the JudgeWorker (give the vllm backend at least one on a shared machine)."""
    num_gpus: float = 0.0
    """Ray GPUs of the JudgeWorker (vllm backend on GPU)."""
    ping_timeout_s: float = 30.0
    """The controller pings the judge worker every cluster.control_poll_s; one that does not answer
    within this is hung, and is killed and replaced (rlsys/supervision.py)."""
    engine: JudgeEngineConfig = field(default_factory=JudgeEngineConfig)
    """The engine of the vllm backend."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"judge.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "openai" and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"judge.url must be an http(s) URL, got {self.url!r}")
        if self.backend != "none" and not self.model:
            raise ValueError(
                "set judge.model (openai: the model name the endpoint serves; vllm: a local model directory)"
            )
        if self.backend == "vllm" and not (Path(self.model).expanduser() / "config.json").is_file():
            raise ValueError(
                f"judge.model={self.model!r} is not a local model directory (no config.json); the "
                "vllm judge backend loads local weights only"
            )
        if self.chat_template and not Path(self.chat_template).expanduser().is_file():
            raise ValueError(f"judge.chat_template={self.chat_template!r} is not a file")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("judge.num_cpus and judge.num_gpus must be >= 0")
        if self.concurrency < 1 or not self.timeout_s > 0 or self.retries < 0 or self.max_pairs_per_step < 0:
            raise ValueError(
                "judge.concurrency >= 1, judge.timeout_s > 0, judge.retries >= 0 and "
                "judge.max_pairs_per_step >= 0 are required"
            )
        if self.ping_timeout_s <= 0:
            raise ValueError(f"judge.ping_timeout_s must be > 0, got {self.ping_timeout_s}")
        if not (self.rate_limit_per_s >= 0 and self.cost_per_call >= 0):  # NaN fails too
            raise ValueError(
                f"judge.rate_limit_per_s and judge.cost_per_call must be numbers >= 0, got "
                f"{self.rate_limit_per_s} and {self.cost_per_call}"
            )


@dataclass(frozen=True)
class JudgePair:
    prompt: str
    response_a: str
    response_b: str


@dataclass
class JudgeStats:
    calls: int = 0
    verdicts: int = 0
    timeouts: int = 0
    errors: int = 0
    garbage: int = 0
    over_budget: int = 0
    spend: float = 0.0
    latency_s: deque = field(default_factory=lambda: deque(maxlen=4096))

    @property
    def fallbacks(self) -> int:
        return self.timeouts + self.errors + self.garbage + self.over_budget


class JudgeBackend(Protocol):
    async def complete(self, prompt: str, max_tokens: int) -> str:
        """The judge's raw answer text to one prompt."""


class OpenAIChatBackend:
    """Any OpenAI-compatible ``/chat/completions`` endpoint (vLLM's server, hosted APIs)."""

    def __init__(self, cfg: JudgeConfig):
        import httpx

        headers = {}
        key = os.environ.get(cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.cfg = cfg
        self.client = httpx.AsyncClient(base_url=cfg.url.rstrip("/"), headers=headers, timeout=None)

    async def complete(self, prompt: str, max_tokens: int) -> str:
        body = {
            "model": self.cfg.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        resp = await self.client.post("/chat/completions", json=body)
        resp.raise_for_status()
        data = resp.json()
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise JudgeParseError(f"endpoint answered without choices[0].message.content: {str(data)[:200]}") from e
        return content if isinstance(content, str) else ""

    async def aclose(self) -> None:
        await self.client.aclose()


class VLLMEngineBackend:
    """A vLLM engine owned by the judge: concurrent ``complete`` calls become one batched chat.

    Calls that arrive while the engine is busy wait for the next batch (one engine call at a
    time, under a thread lock: ``LLM`` is not thread-safe); the engine runs in a worker thread
    so the event loop keeps accepting calls and enforcing timeouts. A caller that timed out simply never reads
    its answer. An engine exception fails every call of its batch (a transport error: retried,
    then a fallback).
    """

    def __init__(self, cfg: JudgeConfig, work_dir: Optional[str] = None):
        from rlsys.rollout.engine import engine_memory_kwargs, prepare_vllm_process

        ec = cfg.engine
        scratch = Path(work_dir) / "vllm" / "judge" if work_dir else Path.cwd() / ".rlsys-judge"
        prepare_vllm_process(scratch, ec.compile_cache_dir, eager=ec.enforce_eager)
        from vllm import LLM

        model = str(Path(cfg.model).expanduser())
        kwargs = dict(
            model=model,
            dtype=ec.dtype,
            enforce_eager=ec.enforce_eager,
            seed=ec.seed,
            **engine_memory_kwargs(ec.kv_cache_bytes, ec.gpu_memory_utilization),
        )
        if ec.max_model_len:
            kwargs["max_model_len"] = ec.max_model_len
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        log.info("judge: vLLM engine for %s up in %.1fs", model, time.perf_counter() - t0)
        self.cfg = cfg
        self.chat_template = Path(cfg.chat_template).expanduser().read_text() if cfg.chat_template else None
        self._waiting: list[tuple[str, int, asyncio.Future]] = []
        self._runner: Optional[asyncio.Future] = None
        self._engine_lock = threading.Lock()
        self.batches = 0
        self.largest_batch = 0

    def _params(self, max_tokens: int):
        from vllm import SamplingParams

        kw: dict = {"temperature": 0.0, "max_tokens": max_tokens}
        if self.cfg.constrained:
            from vllm.sampling_params import StructuredOutputsParams

            kw["structured_outputs"] = StructuredOutputsParams(choice=list(VERDICT_LINES))
        return SamplingParams(**kw)

    async def complete(self, prompt: str, max_tokens: int) -> str:
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((prompt, max_tokens, fut))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._drain())
        return await fut

    async def _drain(self) -> None:
        """Run batches until nobody waits; calls arriving during a batch form the next one."""
        loop = asyncio.get_running_loop()
        while self._waiting:
            await asyncio.sleep(0)  # let calls started in the same tick join
            batch = [w for w in self._waiting if not w[2].done() and w[2].get_loop() is loop]
            self._waiting = []
            if not batch:
                continue
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            conversations = [[{"role": "user", "content": p}] for p, _, _ in batch]
            params = self._params(max(m for _, m, _ in batch))
            try:
                outs = await asyncio.to_thread(self._chat, conversations, params)
                texts = [o.outputs[0].text if o.outputs else "" for o in outs]
            except Exception as e:  # noqa: BLE001 - any engine failure is this batch's transport error
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(RuntimeError(f"judge engine failed: {type(e).__name__}: {e}"))
                continue
            for (_, _, fut), text in zip(batch, texts):
                if not fut.done():  # the caller may have timed out
                    fut.set_result(text)

    def _chat(self, conversations: list, params) -> list:
        with self._engine_lock:  # one engine call at a time, even from an abandoned batch's thread
            return self.llm.chat(conversations, params, use_tqdm=False, chat_template=self.chat_template)

    async def aclose(self) -> None:
        pass


def make_backend(cfg: JudgeConfig, work_dir: Optional[str] = None) -> JudgeBackend:
    if cfg.backend == "openai":
        return OpenAIChatBackend(cfg)
    if cfg.backend == "vllm":
        return VLLMEngineBackend(cfg, work_dir)
    raise ValueError(f"judge.backend={cfg.backend!r} has no backend to call")


class TokenBucket:
    """Starts at most ``rate`` calls per second (bursts up to ``rate``)."""

    def __init__(self, rate: float):
        self.rate = rate
        self.tokens = max(rate, 1.0)
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            while True:
                now = time.monotonic()
                self.tokens = min(max(self.rate, 1.0), self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)


class JudgeQueue:
    """Budgeted, concurrent, rate-limited judge calls with timeouts, retries and strict parsing."""

    def __init__(self, cfg: JudgeConfig, backend: JudgeBackend):
        self.cfg = cfg
        self.backend = backend
        self.stats = JudgeStats()
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._bucket = TokenBucket(cfg.rate_limit_per_s)
        self._rng = np.random.default_rng(cfg.seed)
        self._step_used = 0
        self.in_flight = 0
        self.queued = 0

    def new_step(self) -> None:
        """Reset the per-step budget."""
        self._step_used = 0

    async def judge_pairs(self, pairs: list[JudgePair]) -> list[Optional[int]]:
        """Verdicts (+1: A better, -1: B better, 0: tie) or None (fallback), in order."""
        allowed = max(0, min(len(pairs), self.cfg.max_pairs_per_step - self._step_used))
        self._step_used += allowed
        self.stats.over_budget += len(pairs) - allowed
        swaps = self._rng.random(allowed) < 0.5
        results = await asyncio.gather(*[self._one(p, bool(s)) for p, s in zip(pairs[:allowed], swaps)])
        return list(results) + [None] * (len(pairs) - allowed)

    async def _one(self, pair: JudgePair, swap: bool) -> Optional[int]:
        a, b = (pair.response_b, pair.response_a) if swap else (pair.response_a, pair.response_b)
        prompt = render_judge_prompt(pair.prompt, a, b)
        self.queued += 1
        async with self._sem:
            self.queued -= 1
            for attempt in range(self.cfg.retries + 1):
                await self._bucket.acquire()
                self.stats.calls += 1
                self.stats.spend += self.cfg.cost_per_call
                self.in_flight += 1
                t0 = time.perf_counter()
                try:
                    text = await with_deadline(self.backend.complete(prompt, self.cfg.max_tokens), self.cfg.timeout_s)
                except asyncio.TimeoutError:
                    if attempt == self.cfg.retries:
                        self.stats.timeouts += 1
                        log.warning(
                            "judge call timed out after %ss (%d attempts); falling back to the RM",
                            self.cfg.timeout_s,
                            attempt + 1,
                        )
                        return None
                    continue
                except JudgeParseError as e:
                    self.stats.garbage += 1
                    log.warning("judge answered in an unusable shape: %s", e)
                    return None
                except TRANSPORT_ERRORS as e:  # connection refused, HTTP 5xx/4xx, engine errors
                    if attempt == self.cfg.retries:
                        self.stats.errors += 1
                        log.warning("judge call failed (%s: %s); falling back to the RM", type(e).__name__, e)
                        return None
                    continue
                finally:
                    self.in_flight -= 1
                    self.stats.latency_s.append(time.perf_counter() - t0)
                try:
                    verdict = parse_verdict(text)
                except JudgeParseError as e:
                    self.stats.garbage += 1
                    log.warning("judge answer rejected: %s", e)
                    return None
                self.stats.verdicts += 1
                return -verdict if swap else verdict
        return None


class JudgeWorker:
    """Ray actor (``judge`` role): one JudgeQueue shared by every RewardWorker, so concurrency,
    rate limit and the per-step budget hold for the whole run."""

    def __init__(self, cfg: JudgeConfig, work_dir: Optional[str] = None, metrics_host: Optional[str] = None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.cfg = cfg
        self.queue = JudgeQueue(cfg, make_backend(cfg, work_dir))
        self.faults = FaultPoint()
        self.step: Optional[int] = None
        self.metrics = self.metrics_endpoint_ = None
        if metrics_host is not None:  # this worker's own Prometheus endpoint (rlsys.observability.metrics)
            from rlsys.observability.metrics import serve_actor

            self.metrics, self.metrics_endpoint_, self._metrics_server = serve_actor("judge", metrics_host)
            self.metrics.queue.set_function(lambda: self.queue.queued + self.queue.in_flight)

    async def judge_pairs(self, pairs: list[JudgePair], step: int) -> list[Optional[int]]:
        self.faults.hang_here()
        if step != self.step:  # a new policy version: a new step's budget
            self.step = step
            self.queue.new_step()
        m = self.metrics
        if m is None:
            return await self.queue.judge_pairs(pairs)
        st = self.queue.stats
        calls, fallbacks, t0 = st.calls, st.fallbacks, time.perf_counter()
        try:
            return await self.queue.judge_pairs(pairs)
        finally:
            m.latency.observe(time.perf_counter() - t0)
            m.calls.inc(st.calls - calls)  # concurrent requests overlap; the totals still add up
            m.fallbacks.inc(st.fallbacks - fallbacks)

    def metrics_endpoint(self) -> Optional[str]:
        return self.metrics_endpoint_

    def inject_fault(self, kind: str, seconds: float = 3600.0) -> None:
        """Fault injection (tests, scripts/soak.py): 'hang' the next judge call (blocks the actor)."""
        self.faults.arm(kind, seconds)

    def stats(self) -> dict:
        st = self.queue.stats
        lat = list(st.latency_s)
        return {
            "calls": st.calls,
            "verdicts": st.verdicts,
            "fallbacks": st.fallbacks,
            "timeouts": st.timeouts,
            "errors": st.errors,
            "garbage": st.garbage,
            "over_budget": st.over_budget,
            "spend": st.spend,
            "latency_mean_s": float(np.mean(lat)) if lat else 0.0,
            "in_flight": self.queue.in_flight,
            "queued": self.queue.queued,
        }

    def ready(self) -> bool:
        return True

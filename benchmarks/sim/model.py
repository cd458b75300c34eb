"""Discrete-event simulation of one rlsys run: rlsys's own loops and rules, on a virtual clock.

What runs is rlsys's code wherever it is importable as a plain object; what is simulated is
only *time* (``cost.py``) and the random outcomes (response lengths, rewards, judge latency)::

    BudgetScheduler.plan ──(rlsys.scheduling.scheduler)──▶ _rollout_loop × R ──▶ _Engine.generate  (cost.decode_segment)
          ▲  observe(rewards)                     │  Sampler.run (rlsys.scheduling.sampling: rounds, dapo filter)
          │                                       ▼
          └──────────────────────────── _score: rewards; routing.route_batch ─▶ JudgeQueue (rlsys.reward.judge)
                                                  │
                      InProcessReplayStore (rlsys.replay.base: AdmissionGate, must_drop, counters)
                                                  │ take(M) / set_learner_version / ack
                                                  ▼
                        _learner_loop: train (cost.learner_step_s) ─▶ _publish (cost.publish_s) ─▶ every _Engine

* **Imported, not re-implemented:** admission and backpressure (``AdmissionGate`` via
  ``InProcessReplayStore.reserve``: ``admission_cap``), the staleness drop at ``take``
  (``must_drop`` / ``staleness_ok``) and its counters (``dropped_stale``, ``staleness_hist``),
  the per-prompt rollout counts (``BudgetScheduler.plan`` → ``allocate``), the sampling rounds
  and DAPO filter (``Sampler``), which pairs go to the judge (``routing.pair_scores`` +
  ``route_batch`` under ``judge_budget``), and the judge queue itself (``JudgeQueue``:
  concurrency semaphore, per-step budget, timeouts, strict verdict parsing) with a backend
  that sleeps on the virtual clock.
* **Mirrored (the rule lives inside an actor method, see README "What could not be imported"):**
  ``Controller.rollout_loop`` / ``_produce`` / ``learner_loop`` / ``_carries``,
  ``RolloutWorker._generate`` / ``_generate_partial`` (segments, carry-over cut, group version
  = oldest first-token version), ``EngineGate`` (asyncio twin, same policy), the JudgeWorker's
  per-step budget reset, and ``weight_sync.publish`` for the nccl transport (a collective: it
  starts once every engine has finished its current call or segment).

Virtual time: a stock asyncio event loop whose clock is a number; when every coroutine is
waiting, the clock jumps to the next timer (``asyncio.sleep``). Nothing waits on real time,
so a run of hours of cluster time takes seconds, and the same seed gives the same result
(asyncio runs ready callbacks in FIFO order and timers in time order).

Invariants (tested in tests/unit/test_sim.py):

* every trained group satisfies ``rlsys.replay.base.staleness_ok(group_version, learner_version,
  max_staleness)`` (violations are counted in ``staleness_violations``);
* tokens: ``tokens_generated = tokens_trained + tokens_stored_untrained (dropped + held)
  + tokens_filtered + tokens_in_workers``; groups: ``put = acked + dropped_stale + rejected
  + held`` (the replay store's own accounting);
* ``useful_s <= elapsed_s`` for every engine segment, so utilisations are in [0, 1].
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import selectors
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from benchmarks.sim.cost import Calibration, decode_segment, learner_step_s, publish_s
from rlsys.records import Completion, Group, RolloutRequest
from rlsys.replay.base import InProcessReplayStore, ReplayConfig, StoreClosed, staleness_ok
from rlsys.reward.judge import JudgeConfig, JudgePair, JudgeQueue
from rlsys.reward.routing import RouterConfig, num_pairs, pair_scores, route_batch
from rlsys.rollout.worker import RolloutConfig, RolloutResult
from rlsys.scheduling.sampling import Sampler
from rlsys.scheduling.scheduler import BudgetScheduler, Prompt, SchedulerConfig

MODES = ("sync", "async", "partial")
"""The three modes of the sweep (``mode_scenario``)."""
ALL_MODES = MODES + ("colocated",)
"""Plus the colocated synchronous baseline (rollout and learner time-share every GPU, as verl's)."""
TRANSPORTS = ("nccl", "independent")
SIM_STRATEGIES = ("uniform", "knapsack", "dapo")
_RC = RolloutConfig()  # rlsys's rollout defaults (prompts_per_call, partial_carry_fraction)
_DUMMY = Completion(np.zeros(0, np.int32), np.zeros(0, np.float32), "", "stop")
_PAIR = JudgePair("", "", "")
_RESERVE_PATIENCE_S = 0.05  # Controller.rollout_loop: how long a worker holding carried groups waits for room


# --------------------------------------------------------------------------- virtual clock


class SimulationStalled(RuntimeError):
    """Every simulated loop waits and no timer is due: the configuration cannot make progress."""


class _AdvancingSelector(selectors.SelectSelector):
    """A selector whose ``select(timeout)`` advances the virtual clock instead of sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout=None):
        if timeout is None:
            raise SimulationStalled(
                "every simulated loop is waiting and nothing is scheduled (e.g. the learner waits "
                "for groups that admission will never grant)"
            )
        if timeout > 0:
            self.now += timeout
        return super().select(0)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """asyncio event loop on a virtual clock: ``time()`` is simulated seconds."""

    def __init__(self) -> None:
        self._clock = _AdvancingSelector()
        super().__init__(self._clock)

    def time(self) -> float:
        return self._clock.now


def _now() -> float:
    return asyncio.get_running_loop().time()


# --------------------------------------------------------------------------- scenario


@dataclass(frozen=True)
class LengthModel:
    """Response lengths in tokens: long-tailed, truncated at ``max_new_tokens`` (finish by length).

    A prompt's own scale is ``exp(N(0, prompt_sigma))`` (harder prompts think longer); a response
    of that prompt is ``scale · X`` with X lognormal (median ``median_tokens``, shape ``sigma``) or
    Pareto (median ``median_tokens``, tail index ``pareto_alpha``), at least 1 token.
    """

    dist: str = "lognormal"
    """'lognormal' or 'pareto'."""
    median_tokens: float = 3000.0
    """Median response length before truncation."""
    sigma: float = 0.9
    """Lognormal shape (0 = every response of a prompt has the median length)."""
    prompt_sigma: float = 0.4
    """Spread of per-prompt length scales (0 = all prompts alike)."""
    pareto_alpha: float = 1.5
    """Pareto tail index (smaller = heavier tail)."""
    max_new_tokens: int = 16384
    """rollout.max_new_tokens: the truncation point."""
    prompt_tokens: int = 512
    """Prompt length (prefilled once per request; trained with every response)."""

    def __post_init__(self) -> None:
        if self.dist not in ("lognormal", "pareto"):
            raise ValueError(f"lengths.dist must be 'lognormal' or 'pareto', got {self.dist!r}")
        if not (self.median_tokens >= 1 and self.sigma >= 0 and self.prompt_sigma >= 0 and self.pareto_alpha > 0):
            raise ValueError(
                "lengths: median_tokens >= 1, sigma >= 0, prompt_sigma >= 0 and pareto_alpha > 0 are required"
            )
        if self.max_new_tokens < 1 or self.prompt_tokens < 0:
            raise ValueError("lengths: max_new_tokens >= 1 and prompt_tokens >= 0 are required")

    def sample(self, rng: np.random.Generator, scale: float, n: int) -> np.ndarray:
        """int64 [n] response lengths of one prompt with length scale ``scale``."""
        if self.dist == "lognormal":
            x = self.median_tokens * np.exp(self.sigma * rng.standard_normal(n))
        else:
            xm = self.median_tokens / 2.0 ** (1.0 / self.pareto_alpha)
            x = xm * (1.0 + rng.pareto(self.pareto_alpha, n))
        return np.clip(np.round(scale * x), 1, self.max_new_tokens).astype(np.int64)


@dataclass(frozen=True)
class JudgeModel:
    """The LLM judge: which pairs (rlsys.reward.routing) and how long a verdict takes (a queue)."""

    budget_fraction: float = 0.0
    """reward.router.budget_fraction: judge calls per scored batch as a fraction of its pairs.
    0 = no judge (rule verifier only)."""
    max_pairs_per_step: int = 64
    """judge.max_pairs_per_step: judge calls per policy version; pairs beyond it fall back."""
    concurrency: int = 8
    """judge.concurrency: calls in flight at once (shared by every reward worker)."""
    latency_median_s: float = 2.0
    """Median seconds of one judge call."""
    latency_sigma: float = 0.5
    """Lognormal shape of the call latency."""
    timeout_s: float = 30.0
    """judge.timeout_s: a call past it falls back to the RM score."""

    @property
    def enabled(self) -> bool:
        return self.budget_fraction > 0


@dataclass(frozen=True)
class Scenario:
    """One simulated run: cluster split, batch, staleness and partial-rollout settings."""

    gpus: int = 64
    """Total GPUs (rollout + learner; with ``colocated`` both roles share them)."""
    rollout_gpus: int = 0
    """GPUs of the rollout pool; 0 = round(rollout_fraction * gpus)."""
    rollout_fraction: float = 0.75
    """Share of the GPUs given to rollout engines when rollout_gpus = 0."""
    colocated: bool = False
    """Rollout and learner time-share every GPU (verl's colocated baseline); synchronous only."""
    prompts_per_step: int = 256
    """scheduler.prompts_per_step (M): groups per learner step."""
    samples_per_prompt: int = 16
    """scheduler.samples_per_prompt (n)."""
    strategy: str = "uniform"
    """scheduler.strategy: uniform, knapsack or dapo."""
    max_staleness: int = 0
    """replay.max_staleness (η): 0 = synchronous."""
    partial_chunk_tokens: int = 0
    """rollout.partial_chunk_tokens: 0 = wait-for-all; c > 0 = partial rollouts in segments of c."""
    partial_carry_fraction: float = _RC.partial_carry_fraction
    """rollout.partial_carry_fraction (partial mode, uniform/knapsack)."""
    prompts_per_call: int = _RC.prompts_per_call
    """rollout.prompts_per_call: most prompts a worker takes per generate call."""
    transport: str = "nccl"
    """Weight publication: 'nccl' (one collective over every engine, rlsys's GPU transport) or
    'independent' (each engine loads on its own, rlsys's shm/ray CPU transports)."""
    steps: int = 16
    """Learner steps simulated."""
    warmup_steps: int = 4
    """Steps excluded from the measured window (the pipeline fills up)."""
    lengths: LengthModel = field(default_factory=LengthModel)
    judge: JudgeModel = field(default_factory=JudgeModel)
    success_beta: tuple = (1.0, 1.0)
    """Beta(α, β) of the per-prompt true success rates (rewards are Bernoulli of it)."""
    prompt_pool: int = 0
    """Training prompts; 0 = 8 * prompts_per_step."""
    reward_s_per_group: float = 0.0
    """Seconds a reward worker spends per group besides the judge (rule verifiers: ~0)."""
    learner_cost_factor: float = 1.0
    """Multiplies the calibration's learner cost per token (e.g. a baseline that also recomputes
    old log-probs, or offloads parameters between colocated phases). rlsys: 1."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.gpus < 2 and not self.colocated:
            raise ValueError(f"gpus must be >= 2 (one rollout, one learner), got {self.gpus}")
        if not (0 < self.rollout_fraction < 1):
            raise ValueError(f"rollout_fraction must be in (0, 1), got {self.rollout_fraction}")
        if self.strategy not in SIM_STRATEGIES:
            raise ValueError(
                f"strategy must be one of {SIM_STRATEGIES} (ar3po's merged stages are not simulated), "
                f"got {self.strategy!r}"
            )
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.colocated and (self.max_staleness or self.partial_chunk_tokens):
            raise ValueError("colocated runs are synchronous: set max_staleness=0 and partial_chunk_tokens=0")
        if not (0 <= self.warmup_steps < self.steps):
            raise ValueError(f"need 0 <= warmup_steps < steps, got {self.warmup_steps} and {self.steps}")
        if self.reward_s_per_group < 0 or self.prompt_pool < 0:
            raise ValueError("reward_s_per_group and prompt_pool must be >= 0")
        if not self.learner_cost_factor > 0:
            raise ValueError(f"learner_cost_factor must be > 0, got {self.learner_cost_factor}")
        ReplayConfig(max_staleness=self.max_staleness)  # rlsys validates its own keys
        RolloutConfig(
            partial_chunk_tokens=self.partial_chunk_tokens,
            partial_carry_fraction=self.partial_carry_fraction,
            prompts_per_call=self.prompts_per_call,
            max_new_tokens=self.lengths.max_new_tokens,
        )
        SchedulerConfig(
            strategy=self.strategy, prompts_per_step=self.prompts_per_step, samples_per_prompt=self.samples_per_prompt
        )

    def split(self, cal: Calibration) -> tuple[int, int]:
        """(rollout GPUs, learner GPUs); colocated: both are every GPU."""
        if self.colocated:
            return self.gpus, self.gpus
        r = self.rollout_gpus or int(round(self.rollout_fraction * self.gpus))
        r = max(cal.gpus_per_engine, min(r, self.gpus - 1)) // cal.gpus_per_engine * cal.gpus_per_engine
        if r < cal.gpus_per_engine or self.gpus - r < 1:
            raise ValueError(
                f"{self.gpus} GPUs cannot hold a rollout engine of {cal.gpus_per_engine} GPUs and a learner"
            )
        return r, self.gpus - r


def mode_scenario(base: Scenario, mode: str, staleness: int = 4, chunk_tokens: int = 1024) -> Scenario:
    """``base`` in one of the modes: sync (η = 0), async (η = staleness, wait-for-all),
    partial (η = staleness, partial rollouts in segments of ``chunk_tokens``), colocated
    (η = 0 with rollout and learner on every GPU in turn)."""
    if mode not in ALL_MODES:
        raise ValueError(f"mode must be one of {ALL_MODES}, got {mode!r}")
    if mode in ("sync", "colocated"):
        return dataclasses.replace(base, max_staleness=0, partial_chunk_tokens=0, colocated=mode == "colocated")
    if staleness < 1:
        raise ValueError(f"{mode} mode needs staleness >= 1, got {staleness}")
    if mode == "async":
        return dataclasses.replace(base, max_staleness=staleness, partial_chunk_tokens=0, colocated=False)
    if chunk_tokens < 1:
        raise ValueError(f"partial mode needs chunk_tokens >= 1, got {chunk_tokens}")
    return dataclasses.replace(base, max_staleness=staleness, partial_chunk_tokens=chunk_tokens, colocated=False)


# --------------------------------------------------------------------------- result


@dataclass
class SimResult:
    """Figures of one run; rates and utilisations are over the measured window (steps after
    ``warmup_steps``), counters over the whole run."""

    gpus: int
    rollout_gpus: int
    learner_gpus: int
    max_staleness: int
    partial_chunk_tokens: int
    window_s: float
    """Simulated seconds of the measured window."""
    steps_measured: int
    samples_per_s: float
    """Trained completions per second."""
    tokens_per_s: float
    """Generated response tokens per second (trained, dropped or still in flight)."""
    rollout_util: float
    """Useful rollout GPU-seconds (full-batch-equivalent decode + prefill) / rollout GPU-seconds."""
    learner_util: float
    """Learner GPU-seconds training / learner GPU-seconds."""
    gpu_util: float
    """(useful rollout + training GPU-seconds) / (all GPUs × window)."""
    mean_staleness: float
    """Mean learner_version - group version over trained completions of the window."""
    max_staleness_seen: int
    dropped_stale: int
    """Groups dropped at take for exceeding max_staleness (rlsys counter, whole run)."""
    staleness_violations: int
    """Trained groups that rlsys.replay.base.staleness_ok rejects (must be 0)."""
    step_s_mean: float
    sync_s_mean: float
    """Mean seconds a publication held the learner (waiting for engines + broadcast)."""
    switched_groups: int
    """Groups whose completions continued under a newer version (partial mode)."""
    groups_put: int
    groups_acked: int
    groups_held: int
    groups_rejected: int
    tokens_generated: int
    tokens_trained: int
    tokens_stored_untrained: int
    """Tokens of groups put in the store but not trained: dropped stale, or still held."""
    tokens_filtered: int
    """Tokens of groups discarded by the DAPO filter."""
    tokens_in_workers: int
    """Tokens generated for groups not yet in the store (in an engine, carried, or being scored)."""
    judge_calls: int = 0
    judge_over_budget: int = 0
    judge_timeouts: int = 0
    judge_wait_s: float = 0.0
    """Reward-stage seconds spent waiting for the judge, summed over workers."""
    staleness_hist: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- engine


class _EngineGate:
    """asyncio twin of ``rlsys.rollout.worker.EngineGate`` (a threading class): one holder at a time;
    an update that is waiting goes before the next segment."""

    def __init__(self) -> None:
        self._cv = asyncio.Condition()
        self._busy = False
        self._updates_waiting = 0

    @contextlib.asynccontextmanager
    async def segment(self):
        async with self._cv:
            await self._cv.wait_for(lambda: not self._busy and not self._updates_waiting)
            self._busy = True
        try:
            yield
        finally:
            await self._release()

    @contextlib.asynccontextmanager
    async def update(self):
        async with self._cv:
            self._updates_waiting += 1
            try:
                await self._cv.wait_for(lambda: not self._busy)
            finally:
                self._updates_waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            await self._release()

    async def _release(self) -> None:
        async with self._cv:
            self._busy = False
            self._cv.notify_all()


@dataclass
class _Pending:
    """One request's group inside an engine: target lengths are drawn when it starts."""

    request: RolloutRequest
    target: np.ndarray
    """int64 [n] response length of each completion (EOS or the length cap)."""
    rewards: np.ndarray
    """float32 [n] the verifier's reward of each completion (drawn with the lengths)."""
    done: np.ndarray
    """int64 [n] tokens generated so far."""
    finished: Optional[np.ndarray] = None
    """int64 [n] version of the segment each completion finished in (-1 = still running)."""
    version: int = -1
    """Policy version of the group's first segment (its Group.policy_version); -1 = not started."""
    switched: bool = False
    """Some completion continued under a newer version than the group started with."""

    def __post_init__(self) -> None:
        if self.finished is None:
            self.finished = np.full(len(self.target), -1, np.int64)


class _Meter:
    """Busy intervals ``(t0, t1, useful GPU-seconds, tokens)``, clipped to a window at the end
    (work is assumed uniform within an interval)."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float, float, float]] = []

    def add(self, t0: float, t1: float, useful: float, tokens: float = 0.0) -> None:
        self.rows.append((t0, t1, useful, tokens))

    def within(self, w0: float, w1: float) -> tuple[float, float]:
        if not self.rows:
            return 0.0, 0.0
        r = np.asarray(self.rows, dtype=np.float64)
        t0, t1, useful, tokens = r.T
        span = t1 - t0
        overlap = np.clip(np.minimum(t1, w1) - np.maximum(t0, w0), 0.0, None)
        frac = np.where(span > 0, overlap / np.where(span > 0, span, 1.0), ((t0 >= w0) & (t0 < w1)).astype(float))
        return float((useful * frac).sum()), float((tokens * frac).sum())


class _Engine:
    """One rollout worker's vLLM engine on the virtual clock (mirrors RolloutWorker._generate /
    _generate_partial)."""

    def __init__(self, index: int, cluster: "_Cluster"):
        self.index = index
        self.c = cluster
        self.gate = _EngineGate()
        self.version = 0
        self.pool: list[_Pending] = []  # the groups of the call in progress
        self.carry: list[_Pending] = []  # unfinished groups kept for the next call (partial mode)
        self.unput: dict[str, int] = {}  # group id -> tokens: returned by generate, not yet stored
        self._done_S: Optional[np.ndarray] = None
        self.carry_cached = -1  # version whose KV the engine holds for the carried sequences

    def in_worker_tokens(self) -> int:
        in_call = self._done_S.sum() if self._done_S is not None else sum(p.done.sum() for p in self.pool)
        return int(in_call + sum(p.done.sum() for p in self.carry) + sum(self.unput.values()))

    async def generate(self, requests: list[RolloutRequest], carry: bool) -> RolloutResult:
        if self.c.sc.partial_chunk_tokens > 0:
            return await self._generate_partial(requests, carry)
        sc, cal = self.c.sc, self.c.cal
        async with self.gate.segment():  # wait-for-all: an update waits for the whole call
            version = self.version
            self.pool = [self.c.new_pending(r) for r in requests]
            ctx = np.concatenate([np.full(p.request.n, sc.lengths.prompt_tokens) for p in self.pool] or [np.zeros(0)])
            steps = np.concatenate([p.target for p in self.pool] or [np.zeros(0, np.int64)])
            cost = decode_segment(ctx, steps, cal, prefill_tokens=sc.lengths.prompt_tokens * len(requests))
            await self._run(cost)
            for p in self.pool:
                p.done = p.target.copy()
                p.version = version
        groups = [self._group(p) for p in self.pool]
        self.pool = []
        return RolloutResult(groups, cost.elapsed_s, cost.tokens)

    async def _generate_partial(self, requests: list[RolloutRequest], carry: bool) -> RolloutResult:
        """Segments of at most partial_chunk_tokens; updates land between segments; with carry the
        call ends once live sequences are down to partial_carry_fraction of those it started with.

        Held flat for speed: S = sequences of the call, G = its groups, ``run_S`` = indices of the
        sequences still running. Every running sequence takes part in every segment, so the
        engine's prefix cache holds all of them at the version of the last segment
        (``carry_cached`` between calls), and a group ran under every version from its first
        segment to the segment its last sequence finished in."""
        sc, cal = self.c.sc, self.c.cal
        chunk, prompt = sc.partial_chunk_tokens, sc.lengths.prompt_tokens
        new = [self.c.new_pending(r) for r in requests]
        pool = self.carry + new
        self.pool, self.carry = pool, []
        sizes = [p.request.n for p in pool]
        offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        tgt_S = np.concatenate([p.target for p in pool] or [np.zeros(0, np.int64)])
        done_S = np.concatenate([p.done for p in pool] or [np.zeros(0, np.int64)])
        fin_S = np.concatenate([p.finished for p in pool] or [np.zeros(0, np.int64)])
        self._done_S = done_S  # read by in_worker_tokens while the call runs
        run_S = np.flatnonzero(done_S < tgt_S)
        carried_rows = int(offsets[len(pool) - len(new)])
        cut = sc.partial_carry_fraction * len(run_S) if carry else 0.0  # started: carried live + new completions
        first, prev, elapsed = True, self.carry_cached, 0.0
        while run_S.size and (first and new or run_S.size > cut):
            async with self.gate.segment():  # a waiting update goes first: it lands here
                version = self.version
                done = done_S[run_S]
                step = np.minimum(chunk, tgt_S[run_S] - done)
                if version != prev:  # the update reset the prefix cache: started contexts are prefilled again
                    refill = done[run_S < carried_rows] if first else done
                    prefill = int((prompt + refill).sum())
                else:
                    prefill = 0
                prefill += prompt * len(new) if first else 0
                cost = decode_segment(prompt + done, step, cal, prefill_tokens=prefill)
                await self._run(cost)
                elapsed += cost.elapsed_s
                if first:
                    for p in new:
                        p.version = version
                done_S[run_S] = done + step
                ended = done + step >= tgt_S[run_S]
                fin_S[run_S[ended]] = version
                run_S = run_S[~ended]
                first, prev = False, version
        self.carry_cached = prev
        live_G = np.bincount(np.searchsorted(offsets, run_S, side="right") - 1, minlength=len(pool)) > 0
        groups, ntok = [], 0
        for gi, p in enumerate(pool):
            a, b = offsets[gi], offsets[gi + 1]
            p.done, p.finished = done_S[a:b].copy(), fin_S[a:b].copy()
            if live_G[gi]:
                self.carry.append(p)
            else:
                p.switched = int(p.finished.max()) > p.version
                groups.append(self._group(p))
                ntok += int(p.target.sum())
        self.pool, self._done_S = [], None
        return RolloutResult(
            groups, elapsed, ntok, switched=sum(g.meta["switched"] for g in groups), carried=len(self.carry)
        )

    async def _run(self, cost) -> None:
        t0 = _now()
        await asyncio.sleep(cost.elapsed_s)
        self.c.rollout_meter.add(t0, _now(), cost.useful_s * self.c.cal.gpus_per_engine, cost.tokens)
        self.c.tokens_generated += cost.tokens

    def _group(self, p: _Pending) -> Group:
        self.c.group_serial += 1
        r = p.request
        gen = int(p.target.sum())
        g = Group(
            group_id=f"{r.prompt_id}:{self.c.group_serial}",
            prompt_id=r.prompt_id,
            prompt="",
            prompt_token_ids=(),
            reference="",
            policy_version=p.version,
            completions=[_DUMMY] * r.n,
            meta={
                "gen_tokens": gen,
                "train_tokens": gen + r.n * self.c.sc.lengths.prompt_tokens,
                "sim_rewards": p.rewards,
                "switched": int(p.switched),
            },
        )
        self.unput[g.group_id] = gen
        return g


class _SimJudge:
    """A judge backend for rlsys.reward.judge.JudgeQueue that answers after a latency on the virtual clock."""

    def __init__(self, model: JudgeModel, rng: np.random.Generator):
        self.model = model
        self.rng = rng
        self.calls = 0

    async def complete(self, prompt: str, max_tokens: int) -> str:
        self.calls += 1
        m = self.model
        await asyncio.sleep(m.latency_median_s * math.exp(m.latency_sigma * self.rng.standard_normal()))
        return "VERDICT: A"


# --------------------------------------------------------------------------- the cluster


@dataclass
class _Step:
    end_s: float
    samples: int
    tokens: int
    lags: list
    sync_s: float


class _Cluster:
    """Everything one simulated run holds; ``run()`` is the controller's ``_train``."""

    def __init__(self, sc: Scenario, cal: Calibration):
        self.sc, self.cal = sc, cal
        self.rollout_gpus, self.learner_gpus = sc.split(cal)
        m, n = sc.prompts_per_step, sc.samples_per_prompt
        self.replay_cfg = ReplayConfig(max_staleness=sc.max_staleness)
        self.store = InProcessReplayStore(self.replay_cfg, m)
        sched_cfg = SchedulerConfig(
            strategy=sc.strategy, prompts_per_step=m, samples_per_prompt=n, max_per_prompt=max(64, n), seed=sc.seed
        )
        rng = np.random.default_rng([sc.seed, 1])
        pool = sc.prompt_pool or 8 * m
        self.success = rng.beta(*sc.success_beta, size=pool)
        self.scale = np.exp(sc.lengths.prompt_sigma * rng.standard_normal(pool))
        self.scheduler = BudgetScheduler(sched_cfg, [Prompt(f"p{i}", "", (), "") for i in range(pool)])
        self.sampler = Sampler(sched_cfg)
        self.carries = (
            sc.partial_chunk_tokens > 0 and sc.partial_carry_fraction > 0 and sc.strategy in ("uniform", "knapsack")
        )  # Controller._carries
        self.engines = [_Engine(i, self) for i in range(self.rollout_gpus // cal.gpus_per_engine)]
        self.visits: dict[str, int] = {}
        self.group_serial = 0
        self.rollout_meter, self.learner_meter = _Meter(), _Meter()
        self.tokens_generated = self.tokens_trained = self.tokens_put = self.tokens_filtered = 0
        self.steps: list[_Step] = []
        self.violations = 0
        self.switched = 0
        self.judge_queue: Optional[JudgeQueue] = None
        self.judge_wait_s = 0.0
        if sc.judge.enabled:
            j = sc.judge
            self.router_cfg = RouterConfig(policy="uncertainty", budget_fraction=j.budget_fraction, seed=sc.seed)
            self.router_rng = np.random.default_rng([sc.seed, 2])
            self.pair_rng = np.random.default_rng([sc.seed, 3])
            self.judge_queue = JudgeQueue(
                JudgeConfig(
                    backend="openai",
                    model="simulated-judge",
                    concurrency=j.concurrency,
                    timeout_s=j.timeout_s,
                    retries=0,
                    max_pairs_per_step=j.max_pairs_per_step,
                    rate_limit_per_s=0.0,
                ),
                _SimJudge(j, np.random.default_rng([sc.seed, 4])),
            )
            self._judge_step: Optional[int] = None

    # -- outcomes -------------------------------------------------------------------------
    def new_pending(self, r: RolloutRequest) -> _Pending:
        """Lengths and rewards of a request, from (seed, prompt, visit): the same prompt visit
        draws the same outcomes in every mode (common random numbers)."""
        i = int(r.prompt_id[1:])
        k = self.visits.get(r.prompt_id, 0)
        self.visits[r.prompt_id] = k + 1
        rng = np.random.default_rng([self.sc.seed, 5, i, k])
        target = self.sc.lengths.sample(rng, float(self.scale[i]), r.n)
        rewards = (rng.random(r.n) < self.success[i]).astype(np.float32)
        return _Pending(r, target, rewards, np.zeros(r.n, np.int64))

    # -- rollout side (Controller.rollout_loop / _produce / RewardWorker) ------------------
    async def rollout_loop(self, eng: _Engine) -> None:
        held = 0
        while True:
            per_call = min(self.sc.prompts_per_call, math.ceil(self.sc.prompts_per_step / len(self.engines)))
            try:
                # A worker holding carried groups must not wait for room: those groups hold the slots.
                k = await self._reserve(per_call, _RESERVE_PATIENCE_S if held else None)
            except StoreClosed:
                return
            requests = self.scheduler.plan(k) if k else []
            held = await self._produce(eng, requests)
            if held is None:
                return

    async def _reserve(self, k: int, patience: Optional[float]) -> Optional[int]:
        if patience is None:
            return await self.store.reserve(k)
        try:
            return await asyncio.wait_for(self.store.reserve(k), patience)
        except asyncio.TimeoutError:
            return None

    async def _produce(self, eng: _Engine, requests: list[RolloutRequest]) -> Optional[int]:
        kept, scored, rs = await self.sampler.run(
            requests, lambda reqs: eng.generate(reqs, self.carries), self._score, self.store.learner_version
        )
        self.scheduler.observe([(g.prompt_id, g.rewards.tolist()) for g in scored])
        self.switched += rs.switched
        kept_ids = {g.group_id for g in kept}
        for g in scored:
            tokens = eng.unput.pop(g.group_id)
            if g.group_id in kept_ids:
                self.tokens_put += tokens
            else:
                self.tokens_filtered += tokens
        if rs.filtered:  # discarded by dynamic sampling: let producers sample more
            await self.store.release(rs.filtered)
        try:
            await self.store.put(kept)
        except StoreClosed:
            return None
        return rs.carried

    async def _score(self, groups: list[Group]) -> list[Group]:
        scored = [g.with_rewards(g.meta["sim_rewards"], 0) for g in groups]
        if self.sc.reward_s_per_group > 0:
            await asyncio.sleep(self.sc.reward_s_per_group * len(groups))
        if self.judge_queue is not None:
            await self._judge(scored)
        return scored

    async def _judge(self, groups: list[Group]) -> None:
        """rlsys.reward.worker.PairwiseStage's routing on simulated RM outputs, then the judge queue."""
        todo = [g for g in groups if g.size >= 2]
        scores = []
        for g in todo:
            p = num_pairs(g.size)
            lij = self.pair_rng.standard_normal(p)
            lji = -lij + 0.3 * self.pair_rng.standard_normal(p)
            scores.append(pair_scores(g.rewards, lij, lji, self.pair_rng.random(p)))
        plans = route_batch(scores, self.router_cfg, self.router_rng) if scores else []
        k = sum(len(p.judge) for p in plans)
        if not k:
            return
        step = max(g.policy_version for g in todo)
        if step != self._judge_step:  # JudgeWorker.judge_pairs: a new policy version, a new budget
            self._judge_step = step
            self.judge_queue.new_step()
        t0 = _now()
        await self.judge_queue.judge_pairs([_PAIR] * k)
        self.judge_wait_s += _now() - t0

    # -- learner side (Controller.learner_loop / WeightPublisher) ---------------------------------
    async def learner_loop(self) -> None:
        m = self.sc.prompts_per_step
        for _ in range(self.sc.steps):
            groups = await self.store.take(m)
            version = self.store.learner_version
            lags = []
            for g in groups:
                self.violations += not staleness_ok(g.policy_version, version, self.sc.max_staleness)
                lags.extend([version - g.policy_version] * g.size)
            t0 = _now()
            tokens = sum(g.meta["train_tokens"] for g in groups) * self.sc.learner_cost_factor
            await asyncio.sleep(learner_step_s(tokens, self.learner_gpus, self.cal))
            t1 = _now()
            self.learner_meter.add(t0, t1, (t1 - t0) * self.learner_gpus)
            await self._publish(version + 1)
            t2 = _now()
            await self.store.set_learner_version(version + 1)
            await self.store.ack([g.group_id for g in groups])
            tokens = sum(g.meta["gen_tokens"] for g in groups)
            self.tokens_trained += tokens
            self.steps.append(_Step(t2, sum(g.size for g in groups), tokens, lags, t2 - t1))
        await self.store.stop()

    async def _publish(self, version: int) -> None:
        """weight_sync.publish (nccl): every engine enters its gate's update (after its current
        call or segment), the broadcast starts once all are in; 'independent': each engine
        loads on its own as soon as it is free."""
        seconds = publish_s(len(self.engines), self.cal)
        arrived = 0
        everyone = asyncio.Event()

        async def receive(eng: _Engine) -> None:
            nonlocal arrived
            async with eng.gate.update():
                if self.sc.transport == "nccl":
                    arrived += 1
                    if arrived == len(self.engines):
                        everyone.set()
                    await everyone.wait()
                await asyncio.sleep(seconds)
                eng.version = version

        await asyncio.gather(*[receive(e) for e in self.engines])

    # -- the run ----------------------------------------------------------------------------
    async def run(self) -> None:
        learner = asyncio.create_task(self.learner_loop(), name="learner_loop")
        loops = {asyncio.create_task(self.rollout_loop(e), name=f"rollout_loop_{e.index}") for e in self.engines}
        try:
            while True:
                done, _ = await asyncio.wait({learner, *loops}, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t.exception() is not None:
                        raise t.exception()
                if learner in done:
                    break
                loops -= done
        finally:
            self.tokens_in_workers = sum(e.in_worker_tokens() for e in self.engines)
            self.groups_held = await self.store.depth()
            for t in [learner, *loops]:
                t.cancel()
            await asyncio.gather(learner, *loops, return_exceptions=True)

    def result(self) -> SimResult:
        sc = self.sc
        measured = self.steps[sc.warmup_steps :]
        w0 = self.steps[sc.warmup_steps - 1].end_s if sc.warmup_steps else 0.0
        w1 = self.steps[-1].end_s
        window = max(w1 - w0, 1e-12)
        rollout_useful, tokens = self.rollout_meter.within(w0, w1)
        learner_busy, _ = self.learner_meter.within(w0, w1)
        lags = [x for s in measured for x in s.lags]
        gpu_seconds = sc.gpus * window
        counters = self.store.counters
        judge = self.judge_queue.stats if self.judge_queue is not None else None
        return SimResult(
            gpus=sc.gpus,
            rollout_gpus=self.rollout_gpus,
            learner_gpus=self.learner_gpus,
            max_staleness=sc.max_staleness,
            partial_chunk_tokens=sc.partial_chunk_tokens,
            window_s=window,
            steps_measured=len(measured),
            samples_per_s=sum(s.samples for s in measured) / window,
            tokens_per_s=tokens / window,
            rollout_util=rollout_useful / (self.rollout_gpus * window),
            learner_util=learner_busy / (self.learner_gpus * window),
            gpu_util=(rollout_useful + learner_busy) / gpu_seconds,
            mean_staleness=float(np.mean(lags)) if lags else 0.0,
            max_staleness_seen=int(max(lags)) if lags else 0,
            dropped_stale=counters.dropped_stale,
            staleness_violations=self.violations,
            step_s_mean=window / max(len(measured), 1),
            sync_s_mean=float(np.mean([s.sync_s for s in measured])) if measured else 0.0,
            switched_groups=self.switched,
            groups_put=counters.put,
            groups_acked=counters.acked,
            groups_held=self.groups_held,
            groups_rejected=counters.rejected,
            tokens_generated=self.tokens_generated,
            tokens_trained=self.tokens_trained,
            tokens_stored_untrained=self.tokens_put - self.tokens_trained,
            tokens_filtered=self.tokens_filtered,
            tokens_in_workers=self.tokens_in_workers,
            judge_calls=judge.calls if judge else 0,
            judge_over_budget=judge.over_budget if judge else 0,
            judge_timeouts=judge.timeouts if judge else 0,
            judge_wait_s=self.judge_wait_s,
            staleness_hist=dict(sorted(counters.staleness_hist.items())),
        )


def simulate(sc: Scenario, cal: Calibration) -> SimResult:
    """Run one scenario on the virtual clock and return its figures (deterministic in sc.seed)."""
    loop = VirtualTimeLoop()
    cluster: list[_Cluster] = []

    async def main() -> None:
        cluster.append(_Cluster(sc, cal))  # asyncio primitives bind to this loop
        await cluster[0].run()

    task = loop.create_task(main())
    try:
        loop.run_until_complete(task)
    except SimulationStalled:
        task.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(task)
        raise
    finally:
        loop.close()
    return cluster[0].result()

"""Controller: starts the actors and runs the training loops (``rlsys train``).

    dataset ─▶ scheduler.plan ─ RolloutRequest(prompt, n_i) ─▶ rollout_loop × R ─▶ RolloutWorker (vLLM)
                  ▲                                                   │ Group(n_i completions,
                  │ (prompt_id, rewards)                              ▼  behaviour logprobs, version v)
                  └──────────────── scheduler.observe ◀─── RewardWorker.score (rule verifier)
                                                                      │
                                                     replay.put ◀─────┘   (replay.reserve gates
                                                         │                 admission: staleness +
                                                         ▼                 backpressure)
                                learner_loop: replay.take(M groups) → LearnerRank × L (DeepSpeed)
                                                         │ train_step, then gather_weights
                                                         ▼
                           RolloutWorker.update_weights(v + 1) on every worker → replay.ack

Two kinds of loop, joined by the replay store:

* ``rollout_loop`` (one per rollout worker) consumes admission slots from
  ``replay.reserve`` — it waits there when the store plus in-flight work is full or the
  learner is too far behind (staleness) — and produces scored groups into ``replay.put``.
* ``learner_loop`` consumes ``replay.take(M)`` (waits for M fresh groups), takes one optimizer
  step on all ranks, publishes the weights to every worker, then advances the learner
  version, which unblocks producers waiting in ``reserve``.

With ``replay.max_staleness = 0`` this is synchronous on-policy GRPO; with η ≥ 1 generation of
the next batch overlaps the learner step.

The mechanisms the loops call are components of their own (this package): ``Fleet``
(actors.py: the actors by role, how each starts), ``WeightPublisher`` (weights.py: every
transport branch), ``Recovery`` (recovery.py: deadlines, replacing dead or hung workers,
learner restarts), ``ControlLoop`` (elastic.py: ``rlsys scale / status / stop``) and
``Progress`` (progress.py: one record per step, the summary).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from rlsys import checkpoint
from rlsys.config import ConfigError, RunConfig
from rlsys.controller.actors import Fleet
from rlsys.controller.checkpointing import Checkpointer, PendingCheckpoint, ResumePoint, resume_point
from rlsys.controller.cluster import check_resources, start_ray
from rlsys.controller.elastic import ControlLoop
from rlsys.controller.evaluation import EvalScorer, evaluate_prompts
from rlsys.controller.inputs import check_learner, log_prompts, prompts_for
from rlsys.controller.progress import (
    Progress,
    RecentErrors,
    RewardStats,
    RunOutcome,
    TrainingClock,
    progress_line,
    step_record,
    summary,
)
from rlsys.controller.recovery import Recovery
from rlsys.controller.weights import WeightPublisher
from rlsys.data.loading import read_sources
from rlsys.data.prompts import PromptSet
from rlsys.learner.batch import build_batch, contributing_rows, split_for_ranks
from rlsys.learner.losses import LossNormalizer
from rlsys.observability.loggers import MetricLoggers
from rlsys.observability.metrics import Metrics, MetricsServer, serve
from rlsys.records import Group, StepRecord
from rlsys.replay import make_store
from rlsys.replay.base import ReplayStore, StoreClosed, reserve_or_stop
from rlsys.scheduling.sampling import Sampler
from rlsys.supervision import is_worker_failure, with_deadline
from rlsys.tasks.arithmetic import load_task
from rlsys.tasks.preference_model import ensure_reward_model

log = logging.getLogger(__name__)


@dataclass
class RolloutLoop:
    """A running rollout loop: its task, and the event that asks it to finish (scale-down)."""

    task: asyncio.Task
    stop: asyncio.Event


class Controller:
    """Owns the actors of one run. ``await run()`` trains and returns the summary.

    ``on_step`` hooks are called with each committed step's :class:`~rlsys.records.StepRecord`
    (after its metrics are recorded): the public way to watch a run from inside the process."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        # -- at construction
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.metrics = Metrics()
        self.progress = Progress()
        self.recent_errors = RecentErrors()
        logging.getLogger("rlsys").addHandler(self.recent_errors)
        self.on_step: list[Callable[[StepRecord], None]] = []
        # -- by setup()
        self.resume: Optional[ResumePoint] = None
        self.model_path = ""
        self.pad_id = 0
        self.prompts = PromptSet([], [])
        """Training and held-out prompts, tokenized for the policy (rlsys/data/prompts.py)."""
        self.run_id = self.run_dir.name
        """The replay store's run id (a resumed run keeps its own: on Redis its groups are still there)."""
        self.fleet: Optional[Fleet] = None
        self.weights: Optional[WeightPublisher] = None
        self.store: Optional[ReplayStore] = None
        self.checkpoints: Optional[Checkpointer] = None
        self.recovery: Optional[Recovery] = None
        self.scorer: Optional[EvalScorer] = None
        self.reward_stats = RewardStats(cfg, self.metrics)
        self.sampler = Sampler(cfg.scheduler)
        self.loggers: Optional[MetricLoggers] = None
        self.metrics_server: Optional[MetricsServer] = None
        self.control: Optional[ControlLoop] = None
        # -- by run()
        self.loops: dict[int, RolloutLoop] = {}
        self.clock = TrainingClock()
        self.stop_requested = False
        self._failed: Optional[asyncio.Future] = None
        self._held_at_end: Optional[int] = None

    # -- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        """Everything that can fail on bad input first (resume point, data, Redis), then the model,
        the prompts, the Ray cluster, the actors and the replay store."""
        import ray

        cfg, t0 = self.cfg, time.perf_counter()
        self.resume = resume_point(cfg)
        try:  # a reward function that cannot run fails here, in seconds, not on every completion later
            self.scorer = EvalScorer(cfg.reward)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # bad rows fail here, before anything is built (the user's files are tokenized once the model is known)
        sources = read_sources(cfg.data) if cfg.data.enabled else load_task(cfg.task)
        if cfg.replay.backend == "redis":  # so does an unauthenticated or unreachable Redis
            from concurrent.futures import ThreadPoolExecutor

            from rlsys.replay.redis_store import check_auth

            with ThreadPoolExecutor(1) as pool:  # its own event loop: setup() may run inside one
                pool.submit(asyncio.run, check_auth(cfg.replay)).result()
        self.model_path, self.pad_id, self.prompts = prompts_for(cfg, sources if cfg.data.enabled else None)
        log_prompts(self.model_path, self.prompts, time.perf_counter() - t0)
        check_learner(cfg, self.model_path, self.prompts)
        rm_path = None
        if cfg.reward.mode in ("rm_judge_router", "rm_pointwise"):
            rm_path = str(ensure_reward_model(cfg.reward.model, cfg.task))
            log.info("pairwise reward model %s", rm_path)

        start_ray(cfg.cluster, namespace=f"rlsys-{self.run_dir.name}")
        check_resources(cfg, ray.cluster_resources())
        res = self.resume
        # The policy the actors start from: the base model, or the checkpoint's HF weights.
        policy = str(res.path / checkpoint.HF_DIR) if res else self.model_path
        version0 = res.version if res else 0
        self.fleet = Fleet(cfg, self.run_dir, policy, version0, rm_path)
        if res:
            self.progress = Progress.from_checkpoint(res.state["progress"])
            self.run_id = res.state["run_id"]
        self.loggers = MetricLoggers(
            cfg.loggers,
            self.run_dir,
            self.run_dir.name,
            config={"steps": cfg.steps, "strategy": cfg.scheduler.strategy, "max_staleness": cfg.replay.max_staleness},
        )
        self.fleet.start(self.prompts.train, res.state["scheduler"] if res else None, str(res.path) if res else None)
        self.store = make_store(cfg.replay, cfg.scheduler.prompts_per_step, run_id=self.run_id)
        self.weights = WeightPublisher(cfg, self.run_dir, version0)
        self.weights.pick_transport(self.fleet)
        self.checkpoints = Checkpointer(cfg, self.run_dir, self.model_path)
        self.recovery = Recovery(
            cfg, self.fleet, self.weights, self.store, self.metrics, self.reward_stats, self.checkpoints
        )
        if res:
            self.checkpoints.last = (str(res.path), version0)
        self.control = ControlLoop(
            cfg,
            self.run_dir.name,
            self.fleet,
            self.weights,
            self.recovery,
            self._start_loop,
            self._drain_loops,
            self.request_stop,
            self._status,
        )
        if cfg.cluster.metrics_port >= 0:
            self.metrics_server = serve(self.metrics, cfg.cluster.metrics_host, cfg.cluster.metrics_port)
            self.fleet.metrics_server = self.metrics_server
            self.fleet.write_targets()
        log.info(
            "actors up: %d rollout, %d reward, %d learner rank(s) (%.1fs)",
            len(self.fleet.rollout),
            len(self.fleet.rewards),
            len(self.fleet.ranks),
            time.perf_counter() - t0,
        )

    def shutdown(self) -> None:
        """Best effort, whatever state the run is in."""
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.loggers is not None:
            self.loggers.close()
        logging.getLogger("rlsys").removeHandler(self.recent_errors)
        if self.weights is not None:
            self.weights.close()
        if self.control is not None:
            import ray

            ray.kill(self.control.actor)
        if self.fleet is not None:
            self.fleet.kill_all()

    def request_stop(self) -> None:
        """End the run after the step in progress (what ``rlsys stop`` does)."""
        self.stop_requested = True

    # -- the run -------------------------------------------------------------------------
    async def run(self) -> dict:
        t_wall = time.perf_counter()
        if self.store is None:
            self.setup()
        await self.store.start()
        if self.resume:
            await self.store.resume(self.resume.version, self.progress.groups_trained)
        await self.weights.prepare(self.fleet)
        try:
            return await self._train(t_wall)
        finally:
            await self.store.close()

    async def _train(self, t_wall: float) -> dict:
        p = self.progress
        acc_before = await self.evaluate()
        if not p.eval_curve or p.eval_curve[-1][0] != p.step:
            p.eval_curve.append([p.step, acc_before])
            p.eval_times.append(round(p.train_seconds - p.timing.evaluation, 3))
        log.info("eval accuracy before training: %.3f (%d held-out prompts)", acc_before, len(self.prompts.eval))
        self.clock = TrainingClock(p.train_seconds)  # a resumed run's clock goes on from its checkpoint
        step0 = p.step  # > 0 when resuming
        self._failed = asyncio.get_running_loop().create_future()
        for i in self.fleet.rollout:
            self._start_loop(i)
        learner = asyncio.create_task(self.learner_loop(), name="learner_loop")
        control = asyncio.create_task(self.control.run(), name="control_loop")
        control.add_done_callback(self._watch)
        try:
            await asyncio.wait([learner, self._failed], return_when=asyncio.FIRST_COMPLETED)
            if self._failed.done():
                self._failed.result()  # re-raise the first failure of a rollout loop or the control loop
            await learner
        finally:
            self.control.ending = True
            tasks = [learner, control, *(lp.task for lp in self.loops.values())]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not self._failed.done():
                self._failed.cancel()
        try:
            self._held_at_end = await self.store.depth()  # produced after the last step, never trained
        except StoreClosed:  # Redis away at the very end (the stopped store does not retry): not worth the run
            log.warning("replay.held_at_end unknown: Redis did not answer after the last step")
        p.train_seconds = self.clock()
        acc_after = await self.evaluate()
        p.add_eval(p.step, acc_after, p.train_seconds, took_seconds=None)
        log.info("eval accuracy after training: %.3f", acc_after)
        policy = await self.checkpoints.save_policy(self.fleet, self.run_dir)
        log.info("trained policy: %s (a Hugging Face model directory)", policy)
        out = RunOutcome(
            acc_before=acc_before,
            acc_after=acc_after,
            wall_seconds=time.perf_counter() - t_wall,
            steps_this_run=p.step - step0,
            learner_restarts=self.recovery.learner_restarts,
            worker_restarts=dict(self.recovery.restarts.counts),
            weight_transport=self.weights.transport,
            rollout_workers=list(self.fleet.records.values()),
            reward_stats=self.reward_stats,
            held_at_end=self._held_at_end,
            data=self.prompts.describe(),
        )
        return summary(self.cfg, p, out, self.store.counters, self.model_path, str(self.run_dir))

    # -- the learner loop ----------------------------------------------------------------
    async def learner_loop(self) -> None:
        """Consumes M fresh groups per step (``replay.take``: waits for them), trains on every rank,
        publishes the weights, commits (acknowledging the groups), records the step; until
        ``steps``, ``max_train_seconds`` or a stop request. A dead or hung rank recreates the ranks
        and redelivers the batch; a non-finite step is skipped (rlsys/controller/recovery.py)."""
        cfg, p = self.cfg, self.progress
        while p.step < cfg.steps and not self._out_of_time() and not self.stop_requested:
            groups = await self.store.take(cfg.scheduler.prompts_per_step)
            version = self.store.learner_version
            t0 = time.perf_counter()
            try:
                stats, trained = await self._train_step(groups)
                t1 = time.perf_counter()
                if not all(math.isfinite(s.loss) and math.isfinite(s.grad_norm) and s.weights_finite for s in stats):
                    await self.recovery.skip_nonfinite(p.step + 1, groups, stats, p)
                    continue
                self.recovery.nonfinite_run = 0
                published = await with_deadline(
                    self.weights.gather(version + 1, self.fleet), cfg.learner.step_timeout_s
                )
            except Exception as e:  # noqa: BLE001 - a dead or hung rank is recovered; anything else re-raised
                if not is_worker_failure(e):
                    raise
                await self.recovery.recover_learner(e, p.step + 1)
                continue
            await self.weights.commit(version + 1, published, self.fleet)
            t2 = time.perf_counter()
            ckpt = await self._commit(groups, version + 1)
            self._record_step(groups, stats, trained, version + 1, t1 - t0, t2 - t1, ckpt)
            if cfg.reward.mode != "rule":
                await self.reward_stats.collect(self.fleet)
            if cfg.eval_every and p.step % cfg.eval_every == 0 and p.step < cfg.steps:
                await self._evaluate_during_training()
        await self.store.stop()

    def _out_of_time(self) -> bool:
        limit = self.cfg.max_train_seconds
        if limit and self.clock.segment() > limit:
            log.warning("stopping after %d steps: max_train_seconds=%s reached", self.progress.step, limit)
            return True
        return False

    async def _train_step(self, groups: list[Group]) -> tuple[list, tuple[int, int]]:
        """One optimizer step on every rank; returns the ranks' stats and the (sequences, tokens)
        the step trains on."""
        cfg = self.cfg
        batch = build_batch(groups, cfg.learner.loss, self.pad_id)
        norm = LossNormalizer(batch.num_tokens, batch.num_seqs, cfg.rollout.max_new_tokens)
        trained = (batch.num_seqs, batch.num_tokens)
        ranks = self.fleet.ranks
        if cfg.learner.skip_zero_advantage:  # same update, less compute (LearnerConfig)
            rows = contributing_rows(batch, len(ranks))
            self.progress.zero_advantage_skipped += batch.num_seqs - len(rows)
            batch = batch.select(rows)
        parts = split_for_ranks(batch, len(ranks), cfg.learner)  # shards and their micro-batches
        steps = asyncio.gather(*[r.train_step.remote(s, norm, p) for r, (s, p) in zip(ranks, parts)])
        return await with_deadline(steps, cfg.learner.step_timeout_s), trained

    async def _commit(self, groups: list[Group], version: int) -> Optional[PendingCheckpoint]:
        """The step is committed: a checkpoint when due (producers are still parked at the admission
        gate), then the learner version advances (unblocking them) and the groups are acknowledged.
        Returns the checkpoint to finish once the step is recorded, if one is due."""
        ckpt = None
        step = self.progress.step + 1
        if self.checkpoints.due(step):
            ckpt = await self.checkpoints.write(step, self.fleet)
        await self.store.set_learner_version(version)
        await self.store.ack([g.group_id for g in groups])  # committed: weights are published
        self.metrics.replay_depth.set(await self.store.depth())
        return ckpt

    def _record_step(
        self,
        groups: list[Group],
        stats: list,
        trained: tuple[int, int],
        version: int,
        step_s: float,
        sync_s: float,
        ckpt: Optional[PendingCheckpoint],
    ) -> None:
        """One record of the committed step feeds the gauges, the loggers, the progress line, the
        totals (and the checkpoint written for it), and the ``on_step`` hooks."""
        p = self.progress
        rec = step_record(
            p.step + 1,
            version,
            groups,
            stats,
            p.samples,
            p.tokens,
            p.samples_at_last_step,
            self.store.counters.dropped_stale,
            step_s,
            sync_s,
            self.clock(),
        )
        p.add_step(rec, *trained)
        self.metrics.observe_step(rec, self.store.counters)
        if self.loggers.active:
            self.loggers.log(rec.step, rec.metrics())
        if rec.step % self.cfg.log_every == 0 or rec.step == self.cfg.steps:
            log.info("%s", progress_line(rec, self.cfg.steps))
        if ckpt is not None:
            self.checkpoints.commit(ckpt, version, p, self.run_id)
        for hook in self.on_step:
            hook(rec)

    # -- the rollout loops ---------------------------------------------------------------
    def _start_loop(self, index: int) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(self.rollout_loop(index, stop), name=f"rollout_loop_{index}")
        task.add_done_callback(self._watch)
        self.loops[index] = RolloutLoop(task, stop)

    async def _drain_loops(self, indices: list[int]) -> None:
        for i in indices:
            self.loops[i].stop.set()
        await asyncio.gather(*[self.loops[i].task for i in indices], return_exceptions=True)  # drained
        for i in indices:
            del self.loops[i]

    def _watch(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and not self._failed.done():
            self._failed.set_exception(task.exception())

    async def rollout_loop(self, index: int, stop: asyncio.Event) -> None:
        """Consumes admission slots (``replay.reserve``: waits while the store plus in-flight work is
        full or the learner is too far behind) and produces scored groups (``replay.put``), until
        the store closes or ``stop`` is set (then it finishes the request in hand, and with
        carry-over drains the groups its worker still holds). Drives the worker at
        ``fleet.rollout[index]``, or the replacement that takes its place."""
        record = self.fleet.records[index]
        carry, held = self._carries(), 0  # held: groups the worker carries over (partial mode)
        while True:
            per_call = min(
                self.cfg.rollout.prompts_per_call,
                math.ceil(self.cfg.scheduler.prompts_per_step / len(self.fleet.rollout)),
            )
            try:
                # A worker holding carried groups must not wait for room: those groups hold the
                # slots, and may be what the learner waits for. No room -> continue them instead.
                k = await reserve_or_stop(self.store, per_call, stop, patience=0.05 if held else None)
            except StoreClosed:
                return
            if k is None and not stop.is_set():
                requests = []
            elif k is None:
                if carry:  # scale-down: the groups this worker still holds were admitted; finish them
                    await self._produce(index, [], carry=True, drain=True)
                return
            else:
                if record.first_request_version is None:
                    record.first_request_version = self.weights.version
                requests = await self.fleet.scheduler.plan.remote(k)
            held = await self._produce(index, requests, carry=carry)
            if held is None:
                return

    def _carries(self) -> bool:
        """Partial rollouts with carry-over: unfinished groups stay in a worker between calls.
        Only for one-round strategies (ar3po's follow-up stages and dapo's refill need every
        request's group back from the call that asked for it)."""
        rc = self.cfg.rollout
        return (
            rc.partial_chunk_tokens > 0
            and rc.partial_carry_fraction > 0
            and self.cfg.scheduler.strategy in ("uniform", "knapsack")
        )

    async def _produce(self, index: int, requests: list, carry: bool = False, drain: bool = False) -> Optional[int]:
        """One generate + score round into the store. Returns the number of groups the worker
        carries over after it, or None once the store is closed."""
        groups, scored, rs = await self.sampler.run(
            requests,
            lambda reqs: self.recovery.generate(index, reqs, carry, drain),
            lambda gs: self.recovery.score(index, gs),
            self.store.learner_version,
        )
        self.fleet.scheduler.observe.remote([(g.prompt_id, g.rewards.tolist()) for g in scored])
        failures = sum(g.reward_failures for g in scored)
        self.progress.add_produced(
            rs.samples,
            rs.tokens,
            failures,
            rs.filtered,
            rs.switched,
            rs.carried,
            rs.generate_seconds,
            rs.reward_seconds,
        )
        self.metrics.observe_round(
            rs.samples, rs.tokens, failures, rs.generate_seconds, rs.filtered, rs.switched, rs.reused
        )
        record = self.fleet.records[index]
        if groups and record.first_group_version is None:
            record.first_group_version = min(g.policy_version for g in groups)
        record.groups += len(groups)
        if rs.filtered:  # discarded by dynamic sampling: let producers sample more
            await self.store.release(rs.filtered)
        try:
            await self.store.put(groups)
        except StoreClosed:
            return None
        return rs.carried

    # -- evaluation ----------------------------------------------------------------------
    async def _evaluate_during_training(self) -> None:
        p, t_eval = self.progress, time.perf_counter()
        at = self.clock()
        acc = await self.evaluate()
        p.add_eval(p.step, acc, at, took_seconds=time.perf_counter() - t_eval)
        log.info("step %d: eval accuracy %.3f", p.step, acc)

    async def evaluate(self) -> float:
        """Share of held-out prompts whose greedy completion gets the full reward (rlsys/controller/evaluation.py);
        mean@k / pass@k and sample completions go into the progress record and eval_samples.jsonl."""
        e = self.cfg.eval
        res = await evaluate_prompts(
            self.fleet.workers, self.prompts.eval, self.cfg.rollout.call_timeout_s, self.scorer, e.samples,
            e.temperature, e.examples,
        )  # fmt: skip
        self.metrics.eval_accuracy.set(res.accuracy)
        self.progress.add_eval_details(self.progress.step, res, self.run_dir)
        return res.accuracy

    async def _status(self) -> dict:
        """What ``rlsys status`` shows (the control loop reports it every poll)."""
        return {
            "step": self.progress.step,
            "steps": self.cfg.steps,
            "policy_version": self.weights.version,
            "rollout_workers": len(self.fleet.rollout),
            "learner_ranks": len(self.fleet.ranks),
            "samples": self.progress.samples,
            "replay_depth": await self.store.depth(),
            "replay_dropped_stale": self.store.counters.dropped_stale,
            "judge_queue": self.reward_stats.queue_depth(),
            "learner_restarts": self.recovery.learner_restarts,
            "worker_restarts": dict(self.recovery.restarts.counts),
            "last_errors": list(self.recent_errors.lines),
        }


def run_training(cfg: RunConfig, run_dir: Path) -> dict:
    """Train, write ``summary.json`` into ``run_dir`` and return the summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ctl = Controller(cfg, run_dir)
    try:
        result = asyncio.run(ctl.run())
    finally:
        ctl.shutdown()
    (run_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    if cfg.report:
        from rlsys.observability.report import write_report

        try:
            paths = write_report(result, run_dir)
            log.info("report: %s", ", ".join(str(p) for p in paths))
        except Exception:  # noqa: BLE001 - a plotting failure must not lose a finished run's summary
            log.exception("could not write the end-of-run report (summary.json is written)")
    return result

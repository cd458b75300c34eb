"""Recovery: what a dead or hung worker may and may not lose, and how the run goes on.

The controller calls every rollout, reward and judge worker through a deadline. A call that
fails because its actor died (``RayActorError``) or that outlives its deadline (the actor is
hung: alive, but not answering) gets the actor killed and replaced under the same index, and
the work is retried on the replacement:

* **Rollout worker.** The controller keeps, per worker, the requests it has sent and not yet
  had back (``OpenRequests``) — with partial rollouts and carry-over that includes groups the
  worker was still carrying from earlier calls. The replacement first loads the current
  policy (under the publication lock, like a worker that joins on scale-up), then gets every
  open request again. Admission slots stay reserved throughout, so the staleness bound and
  the backpressure accounting hold. Completions the dead worker had generated are lost
  (regenerated), never half-stored: nothing reaches the replay store before it is scored.
* **Reward worker.** The groups being scored are still in the controller; they are scored
  again by the replacement. Reward functions are pure, so this is safe.
* **Judge worker.** The controller pings it every ``cluster.control_poll_s`` (a ping that
  outlives ``judge.ping_timeout_s`` counts as hung) and replaces it; reward workers get the new
  handle. A reward worker whose judge call fails on the dead actor waits for the replacement
  and retries once, else it keeps the reward model's scores for those pairs (a counted judge
  fallback, the same rule as a judge timeout).
* **Learner rank.** :meth:`Recovery.recover_learner`: every rank is recreated from the last
  committed weights (with the optimizer state of a checkpoint at that version, when there is
  one) and the uncommitted batch is redelivered.

A role that needs more than ``cluster.max_worker_restarts`` replacements in one run fails the
run with the last error: something is wrong beyond a transient fault.

Accounting (asserted by tests/integration/test_faults.py): every produced group is trained,
skipped by a non-finite step, dropped as stale, rejected, or still held at the end —
``put = trained + skipped_nonfinite + dropped_stale + rejected + held_at_end`` — and no group
id is trained twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field

from rlsys.config import RunConfig
from rlsys.controller.actors import Fleet
from rlsys.controller.checkpointing import Checkpointer
from rlsys.controller.progress import Progress, RewardStats
from rlsys.controller.weights import WeightPublisher
from rlsys.observability.metrics import Metrics
from rlsys.records import Group, RolloutRequest
from rlsys.replay.base import ReplayStore
from rlsys.supervision import describe, is_worker_failure, with_deadline

log = logging.getLogger(__name__)


@dataclass
class OpenRequests:
    """Requests sent to one rollout worker whose groups have not come back yet (a multiset:
    the same prompt may be asked for twice, possibly with different n)."""

    _open: dict = field(default_factory=lambda: defaultdict(list))

    def sent(self, requests: list[RolloutRequest]) -> None:
        for r in requests:
            self._open[r.prompt_id].append(r)

    def returned(self, groups: list[Group]) -> None:
        for g in groups:
            pending = self._open.get(g.prompt_id)
            if not pending:
                continue  # a follow-up stage's group (already matched) or a drained carry
            same_n = [i for i, r in enumerate(pending) if r.n == g.size]
            pending.pop(same_n[0] if same_n else 0)
            if not pending:
                del self._open[g.prompt_id]

    def outstanding(self) -> list[RolloutRequest]:
        return [r for rs in self._open.values() for r in rs]

    def __len__(self) -> int:
        return sum(len(rs) for rs in self._open.values())


@dataclass
class RestartBudget:
    """Replacements per role, capped for the run."""

    limit: int
    counts: dict = field(default_factory=lambda: defaultdict(int))
    """Replacements started, per role."""
    done: dict = field(default_factory=lambda: defaultdict(int))
    """Replacements finished (the new worker is serving), per role."""

    def in_progress(self) -> int:
        return sum(self.counts.values()) - sum(self.done.values())

    def spend(self, role: str, error: BaseException) -> int:
        self.counts[role] += 1
        if self.counts[role] > self.limit:
            raise RuntimeError(
                f"{role} workers failed {self.counts[role]} times in this run "
                f"(cluster.max_worker_restarts={self.limit}); last error: "
                f"{type(error).__name__}: {error}"
            ) from error
        return self.counts[role]


class Recovery:
    """Calls the rollout and reward workers under their deadlines, and replaces a dead or hung
    worker (rollout, reward, judge) or the learner ranks, as the module docstring describes."""

    def __init__(
        self,
        cfg: RunConfig,
        fleet: Fleet,
        weights: WeightPublisher,
        store: ReplayStore,
        metrics: Metrics,
        reward_stats: RewardStats,
        checkpoints: Checkpointer,
    ):
        self.cfg = cfg
        self.fleet = fleet
        self.weights = weights
        self.store = store
        self.metrics = metrics
        self.reward_stats = reward_stats
        self.checkpoints = checkpoints
        self.restarts = RestartBudget(cfg.cluster.max_worker_restarts)
        """Dead or hung rollout / reward / judge workers replaced, per role."""
        self.learner_restarts = 0
        self.nonfinite_run = 0
        """Non-finite learner steps in a row."""
        self._open: dict[int, OpenRequests] = {}
        self._reward_lock = asyncio.Lock()

    # -- rollout and reward calls -----------------------------------------------------------
    async def generate(self, index: int, requests: list, carry: bool, drain: bool):
        """``generate`` on rollout worker ``index``; if the worker dies or outlives
        rollout.call_timeout_s, it is replaced and every request it had not returned (including
        groups it carried over from earlier calls) goes to the replacement."""
        open_ = self._open.setdefault(index, OpenRequests())
        open_.sent(requests)
        send = requests
        while True:
            worker = self.fleet.rollout[index]
            call = worker.generate.remote(send, carry=True, drain=drain) if carry else worker.generate.remote(send)
            try:
                result = await with_deadline(call, self.cfg.rollout.call_timeout_s)
            except Exception as e:  # noqa: BLE001 - a dead or hung worker is replaced; anything else re-raised
                if not is_worker_failure(e):
                    raise
                await self._replace_rollout(index, worker, e, len(open_))
                send = open_.outstanding()
                continue
            open_.returned(result.groups)
            return result

    async def score(self, index: int, groups: list[Group]) -> list[Group]:
        """``score`` on the loop's reward worker; a dead or hung one is replaced and the groups are
        scored again by its replacement."""
        slot = index % len(self.fleet.rewards)
        while True:
            actor = self.fleet.rewards[slot]
            try:
                return await with_deadline(actor.score.remote(groups), self.cfg.reward.call_timeout_s)
            except Exception as e:  # noqa: BLE001 - a dead or hung worker is replaced; anything else re-raised
                if not is_worker_failure(e):
                    raise
                await self._replace_reward(slot, actor, e)

    async def _replace_rollout(self, index: int, dead, error: BaseException, open_requests: int) -> None:
        """A new rollout worker under ``index``, serving the current policy (as a joining worker)."""
        import ray

        n = self.restarts.spend("rollout", error)
        self.metrics.worker_restarts.labels("rollout").inc()
        if self.weights.on_gpu:
            raise RuntimeError(
                f"rollout worker {index} {describe(error)}; the {self.weights.transport} weight "
                "transport cannot take a replacement engine into its group: resume the run from its "
                "last checkpoint (resume=<run dir>)"
            ) from error
        log.error(
            "rollout worker %d %s; replacing it (restart %d/%d) and retrying its %d open request(s)",
            index,
            describe(error),
            n,
            self.cfg.cluster.max_worker_restarts,
            open_requests,
        )
        ray.kill(dead, no_restart=True)
        self.fleet.dead.add(dead._actor_id.hex())
        new = self.fleet.spawn_rollout(index)
        try:
            await with_deadline(new.ready.remote(), self.cfg.cluster.actor_start_timeout_s)
            async with self.weights.lock:  # no publication in between: it gets the current policy
                version = await self.weights.load_current(new)
                self.fleet.rollout[index] = new
                self.fleet.dead.discard(dead._actor_id.hex())
        except BaseException:  # noqa: BLE001 - cancelled (the run ended) or failed: never leak the new actor
            ray.kill(new, no_restart=True)
            raise
        self.restarts.done["rollout"] += 1
        self.fleet.write_targets()
        log.info("rollout worker %d replaced (serving policy version %d)", index, version)

    async def _replace_reward(self, slot: int, dead, error: BaseException) -> None:
        import ray

        async with self._reward_lock:
            if self.fleet.rewards[slot] is not dead:
                return  # another rollout loop replaced it already
            n = self.restarts.spend("reward", error)
            self.metrics.worker_restarts.labels("reward").inc()
            log.error(
                "reward worker %d %s; replacing it (restart %d/%d) and scoring its groups again",
                slot,
                describe(error),
                n,
                self.cfg.cluster.max_worker_restarts,
            )
            ray.kill(dead, no_restart=True)
            new = self.fleet.spawn_reward()
            try:
                await with_deadline(new.ready.remote(), self.cfg.cluster.actor_start_timeout_s)
            except BaseException:  # noqa: BLE001 - cancelled or failed: never leak the new actor
                ray.kill(new, no_restart=True)
                raise
            self.fleet.rewards[slot] = new
            self.restarts.done["reward"] += 1
        self.fleet.write_targets()

    async def check_judge(self) -> None:
        """Ping the judge worker; replace it if it is dead or hung, and hand the reward workers
        the new one (they retry what failed on the old one)."""
        import ray

        dead = self.fleet.judge
        try:
            await with_deadline(dead.ready.remote(), self.cfg.judge.ping_timeout_s)
            return
        except Exception as e:  # noqa: BLE001 - a dead or hung judge is replaced; anything else re-raised
            if not is_worker_failure(e):
                raise
            error = e
        n = self.restarts.spend("judge", error)
        self.metrics.worker_restarts.labels("judge").inc()
        log.error(
            "judge worker %s; replacing it (restart %d/%d)", describe(error), n, self.cfg.cluster.max_worker_restarts
        )
        ray.kill(dead, no_restart=True)
        self.fleet.judge = self.fleet.spawn_judge()  # kill_all() ends it whatever happens next
        await with_deadline(self.fleet.judge.ready.remote(), self.cfg.cluster.actor_start_timeout_s)
        self.reward_stats.judge_replaced()
        await asyncio.gather(*[r.set_judge.remote(self.fleet.judge) for r in self.fleet.rewards])
        self.restarts.done["judge"] += 1
        self.fleet.write_targets()

    # -- the learner ------------------------------------------------------------------------
    async def recover_learner(self, error: Exception, step: int) -> None:
        """A rank died or hung during ``step``: nothing of that step was committed. Recreate every
        rank (the collective group is broken) from the last committed weights and redeliver the batch."""
        self.learner_restarts += 1
        self.metrics.worker_restarts.labels("learner").inc()
        if self.weights.on_gpu:
            raise RuntimeError(
                f"a learner rank died, and the {self.weights.transport} weight transport keeps no host "
                "copy of the committed weights to restart from: resume the run from its last "
                "checkpoint (resume=<run dir>)"
            ) from error
        if self.learner_restarts > self.cfg.learner.max_restarts:
            raise RuntimeError(
                f"learner failed {self.learner_restarts} times (learner.max_restarts="
                f"{self.cfg.learner.max_restarts}); last error: {error}"
            ) from error
        n = await self.store.requeue_pending()
        log.error(
            "learner rank %s during step %d; restarting %d rank(s) from policy version %d, "
            "redelivering %d uncommitted group(s) [restart %d/%d]",
            describe(error),
            step,
            len(self.fleet.ranks),
            self.store.learner_version,
            n,
            self.learner_restarts,
            self.cfg.learner.max_restarts,
        )
        await self.restart_ranks()

    async def restart_ranks(self) -> None:
        """Recreate every rank at the committed policy: from the checkpoint written at that version
        when there is one (weights and optimizer state), else from the committed weights (the
        optimizer moments restart from zero)."""
        import ray

        for r in self.fleet.ranks:
            ray.kill(r)
        ckpt = self.checkpoints.last  # ranks restarted at its version restore its optimizer state too
        if ckpt is not None and ckpt[1] == self.store.learner_version:
            log.info("learner ranks restart from checkpoint %s (policy version %d, optimizer state included)", *ckpt)
            self.fleet.ranks = self.fleet.start_ranks(None, resume_dir=ckpt[0], start_step=ckpt[1])
        else:
            self.fleet.ranks = self.fleet.start_ranks(self.weights.committed, start_step=self.store.learner_version)
        await with_deadline(
            asyncio.gather(*[r.ready.remote() for r in self.fleet.ranks]), self.cfg.cluster.actor_start_timeout_s
        )
        self.fleet.write_targets()

    async def skip_nonfinite(self, step: int, groups: list[Group], stats: list, progress: Progress) -> None:
        """Step ``step`` had a NaN/inf loss, gradient norm or weights: never publish its weights
        (learner.on_nonfinite)."""
        lc = self.cfg.learner
        self.nonfinite_run += 1
        what = (
            f"step {step}: non-finite loss, gradient norm or weights (loss {[s.loss for s in stats]}, grad "
            f"norm {[s.grad_norm for s in stats]}, weights finite {[s.weights_finite for s in stats]})"
        )
        if lc.on_nonfinite == "stop" or self.nonfinite_run >= lc.max_nonfinite_steps:
            raise FloatingPointError(
                f"{what}; stopping the run ({self.nonfinite_run} in a row; learner.on_nonfinite={lc.on_nonfinite}, "
                f"learner.max_nonfinite_steps={lc.max_nonfinite_steps}). The last checkpoint is intact: lower "
                "learner.lr (or check the rewards) and resume from it"
            )
        progress.skipped_nonfinite += len(groups)
        self.metrics.skipped_nonfinite.inc(len(groups))
        log.error(
            "%s; step skipped: its weights are discarded, the ranks restart from policy version %d, and its "
            "%d group(s) are not trained (skipped_nonfinite) [%d in a row, at most %d]",
            what,
            self.store.learner_version,
            len(groups),
            self.nonfinite_run,
            lc.max_nonfinite_steps,
        )
        await self.store.ack([g.group_id for g in groups])  # consumed, never trained: counted above
        await self.store.release(len(groups))  # their admission slots: producers make the batch again
        await self.restart_ranks()

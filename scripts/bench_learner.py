#!/usr/bin/env python
"""The learner's memory and batching options (issue 20): tokens/s and peak memory of one
DeepSpeed rank per option, against a plain-torch floor.

A ~100M-parameter Llama (hidden 768, 12 layers, 12 heads, intermediate 2048, untied head, a
4,096-token byte-level BPE trained on a synthetic corpus: rlsys.tasks.chatmodel, nothing
downloaded; cached under ~/.cache/rlsys/models) takes optimizer steps on one fixed batch whose
completion lengths are long-tailed: lognormal quantiles around a median of 60 tokens plus one
1,000-token completion, prompts of 30 to 60 tokens, random token ids, behaviour log-probabilities
-2.0, rewards with variance (every advantage is non-zero). Each mode runs in a fresh process
(so that its peak RSS is its own) as a single-rank ``LearnerRank`` used in-process (world size 1,
ZeRO-1, fp32, CPU, gloo), every process on the same torch thread count (``--threads``):

* ``baseline``            -- ``grad_accum_steps`` (4) micro-batches by count, arrival order, each
                             padded to its longest sequence
* ``grad_ckpt``           -- baseline + ``gradient_checkpointing``
* ``lora``                -- baseline + LoRA rank 16, alpha 32, all-linear
* ``packing``             -- the count micro-batches, each packed into one row (``packing``)
* ``token_budget``        -- ``max_tokens_per_micro_batch`` (``--budget``), padded
* ``token_budget_packed`` -- the budget with ``packing``
* ``torch``               -- the floor: the same model (transformers), ``torch.optim.AdamW``, the
                             baseline's padded micro-batches, the same ``token_logprobs`` and
                             ``policy_loss``, ``backward`` per micro-batch, the same gradient clip
                             (``learner.grad_clip``) and one optimizer step; no DeepSpeed

Each mode takes one warm-up step on the batch's 4 shortest sequences (cut the same way: the
one-off costs of a first step, such as allocating the optimizer state, without the cost of a
full step; ``--warmup-full`` warms up on the whole batch), then ``--steps`` steps on the batch,
timed (the median is reported) and split into their parts (forward, loss, backward, optimizer
step, gradient norm, weight check). Useful tokens/s = the batch's real (non-pad) tokens, prompts
and completions, per second of step time; peak MB = the peak RSS of the mode's process (model,
optimizer state, activations, freed memory the allocator keeps: everything, minus nothing).

Threads: every mode runs on ``--threads`` torch threads, 1 by default. On a 2-core machine
shared with other work a 2-thread process is much slower and erratic (each parallel region
waits for its descheduled thread: 19 s against 10 s for one forward and backward of a
1,000-token sequence with one core busy elsewhere); pass ``--threads 2`` on an idle machine.
Timing: a full step takes 30 to 90 s on one thread (padded count micro-batches are the
slowest), so the default, one timed step per mode, runs in about 10 minutes on 2 cores;
``--steps 3`` for a median of three (about 20 minutes). The modes inherit the environment, so
``MALLOC_MMAP_THRESHOLD_=1048576`` in front of the command, say, shows the allocator's share of
the peak (glibc otherwise keeps much of the memory of freed temporaries).

Then the tiny experiment's step through the learner *actor*, as the controller calls it: the
default tiny model, 16 prompts x 8 samples with 1 to 6 completion tokens, batched as
``controller.loop._train_step`` does, one ``LearnerRank`` Ray actor (``LearnerConfig(lr=1e-4)``,
its ``num_cpus``); the median wall time of ``ray.get(rank.train_step.remote(...))`` over
``--tiny-steps`` steps against the plain-torch step on the same batch in the driver, on the
actor's torch thread count. A second, instrumented pass splits both steps into their parts
(Ray call overhead, forward, loss, backward, optimizer step, gradient norm, weight check).

    .venv/bin/python scripts/bench_learner.py                     # every mode, ~10 min on 2 cores
    .venv/bin/python scripts/bench_learner.py --json /tmp/bench_learner.json
    .venv/bin/python scripts/bench_learner.py --modes baseline,packing --steps 3 --json out.json
    .venv/bin/python scripts/bench_learner.py --tiny-steps 0      # skip the actor comparison

JSON: ``packing_speedup`` (tokens/s of packing / baseline), ``ckpt_memory_ratio`` and
``lora_memory_ratio`` (peak MB / baseline's), ``learner_over_torch`` (baseline step time / torch
step time), ``learner_over_torch_tiny`` (actor step wall time / torch step time, tiny batch);
every mode under ``modes``, the batch under ``batch``, the tiny comparison under ``tiny``.
Targets (printed PASS/MISS, never the exit code): packing_speedup >= 1.5, memory ratios <= 0.7,
learner_over_torch <= 1.15, learner_over_torch_tiny <= 1.5.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

MODEL = {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 2048, "vocab": 4096, "max_position": 2048}
"""The ~100M-parameter Llama (91.2M parameters with this vocabulary)."""
MODEL_BUILD_VERSION = 1
"""Part of the model's cache key: bump it when the recipe changes."""
MODES = ("baseline", "grad_ckpt", "lora", "packing", "token_budget", "token_budget_packed", "torch")
TARGETS = {  # key -> (target, True if the figure must be at least the target, else at most)
    "packing_speedup": (1.5, True),
    "ckpt_memory_ratio": (0.7, False),
    "lora_memory_ratio": (0.7, False),
    "learner_over_torch": (1.15, False),
    "learner_over_torch_tiny": (1.5, False),
}


# ----------------------------------------------------------------------------- model and batch


def ensure_bench_model(cache_dir: str) -> Path:
    """The benchmark's Llama, built once (seeded, deterministic) and cached like rlsys's models."""
    from rlsys.tasks.tinymodel import cached_build

    spec = {"bench_learner": MODEL, "build_version": MODEL_BUILD_VERSION}
    key = "bench-learner-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]
    return cached_build(Path(cache_dir).expanduser(), key, _build_model, "bench_learner 100M Llama")


def _build_model(out: Path) -> None:
    from rlsys.tasks.chatmodel import build_bpe_tokenizer, build_hf_model, eos_ids_for

    rng = random.Random(0)  # a synthetic corpus of pseudo-words: enough merges for the vocabulary
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(6000)]
    texts = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(5000)]
    tok = build_bpe_tokenizer(texts, MODEL["vocab"], "llama3")
    tok.model_max_length = MODEL["max_position"]
    build_hf_model(
        out,
        "llama",
        tok,
        hidden=MODEL["hidden"],
        layers=MODEL["layers"],
        heads=MODEL["heads"],
        intermediate=MODEL["intermediate"],
        max_position=MODEL["max_position"],
        seed=0,
        eos_ids=eos_ids_for(tok, "llama3"),
    )


def completion_lengths(n: int, p50: int, longest: int, seed: int) -> list[int]:
    """``n - 1`` lognormal quantiles (median ``p50``, sigma 0.6) and one ``longest``, shuffled."""
    dist = statistics.NormalDist()
    lens = [max(4, round(p50 * np.exp(0.6 * dist.inv_cdf((i + 0.5) / (n - 1))))) for i in range(n - 1)]
    lens.append(longest)
    random.Random(seed).shuffle(lens)
    return lens


def make_groups(seqs: int, group_size: int, p50: int, longest: int, vocab: int, seed: int = 0) -> list:
    """Scored groups of random token ids: ``seqs`` completions in groups of ``group_size``."""
    from rlsys.records import Completion, Group

    rng = np.random.default_rng(seed)
    lens = completion_lengths(seqs, p50, longest, seed)
    groups = []
    for g in range(0, seqs, group_size):
        prompt = tuple(int(t) for t in rng.integers(5, vocab, int(rng.integers(30, 61))))
        comps = [
            Completion(rng.integers(5, vocab, n).astype(np.int32), np.full(n, -2.0, np.float32), "", "length")
            for n in lens[g : g + group_size]
        ]
        rewards = rng.normal(size=len(comps)).astype(np.float32)  # variance: no zero advantage
        groups.append(Group(f"g{g}", f"p{g}", "", prompt, "", 0, comps, rewards))
    return groups


def describe(batch, plan: list, packed: bool) -> dict:
    """Micro-batches and the token positions they compute (padding included, or packed rows)."""
    lengths = batch.lengths
    cost = sum(int(lengths[idx].sum()) if packed else len(idx) * int(lengths[idx].max()) for idx in plan if len(idx))
    return {"micro_batches": len(plan), "computed_tokens": cost}


# ----------------------------------------------------------------------------- one mode (a child process)


def learner_config(mode: str, accum: int, budget: int):
    from rlsys.learner.config import LearnerConfig, LoraConfig

    opts: dict = {"grad_accum_steps": accum}
    if mode == "grad_ckpt":
        opts["gradient_checkpointing"] = True
    elif mode == "lora":
        opts["lora"] = LoraConfig(rank=16, alpha=32.0, target_modules=["all-linear"])
    elif mode == "packing":
        opts["packing"] = True
    elif mode in ("token_budget", "token_budget_packed"):
        opts = {"grad_accum_steps": 1, "max_tokens_per_micro_batch": budget, "packing": mode.endswith("packed")}
    return LearnerConfig(lr=1e-4, zero_stage=1, dtype="fp32", **opts)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_mode(mode: str, a: dict) -> dict:
    import torch

    from rlsys.learner.batch import build_batch, split_for_ranks
    from rlsys.learner.losses import LossNormalizer

    torch.set_num_threads(a["threads"])
    cfg = learner_config(mode, a["accum"], a["budget"])
    batch = build_batch(make_groups(a["seqs"], a["group_size"], a["p50"], a["longest"], a["vocab"]), cfg.loss, 0)
    norm = LossNormalizer(batch.num_tokens, batch.num_seqs, a["max_new_tokens"])
    (shard, plan), *_ = split_for_ranks(batch, 1, cfg)
    # the warm-up batch: the shortest sequences, cut the same way (one-off costs without a full step)
    small = batch.select(np.sort(np.argsort(batch.lengths, kind="stable")[: a["warmup_seqs"]]))
    (small_shard, small_plan), *_ = split_for_ranks(small, 1, cfg)
    t0 = time.perf_counter()
    timings: dict = {}
    if mode == "torch":
        step = torch_step(a["model"], cfg, norm, timings)
    else:
        from rlsys.learner.rank import LearnerRank

        rank = LearnerRank(
            cfg, a["model"], 0, 1, free_port(), 1.0, a["max_new_tokens"], rendezvous=f"bench-{uuid.uuid4().hex}"
        )
        torch.set_num_threads(a["threads"])  # whatever DeepSpeed's initialisation did

        def step(shard, plan):
            s = rank.train_step(shard, norm, plan)
            return s.loss, s.grad_norm

    init_s = time.perf_counter() - t0
    rss_init = rss_mb()
    warmup = []
    for i in range(a["warmup"]):
        t0 = time.perf_counter()
        step(*((shard, plan) if a["warmup_full"] else (small_shard, small_plan)))
        warmup.append(time.perf_counter() - t0)
        print(f"  {mode}: warm-up step {i} {warmup[-1]:.1f} s", file=sys.stderr, flush=True)
    if mode == "torch":
        timings.clear()
    else:  # the timed steps' parts (a few clock reads per micro-batch)
        instrument(rank)
        timings = rank.bench_times
    times, losses = [], []
    for i in range(a["steps"]):
        t0 = time.perf_counter()
        loss, grad_norm = step(shard, plan)
        times.append(time.perf_counter() - t0)
        losses.append((loss, grad_norm))
        print(f"  {mode}: step {i} {times[-1]:.1f} s (loss {loss:.6f}, grad norm {grad_norm:.4f})", file=sys.stderr)
    step_s = statistics.median(times)
    useful = int(batch.attention_mask.sum())
    parts = {k: v / len(times) for k, v in timings.items()}
    parts["other"] = sum(times) / len(times) - sum(parts.values())
    return {
        "breakdown_s": parts,
        "step_s": step_s,
        "tokens_per_s": useful / step_s,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_init_mb": rss_init,
        "init_s": init_s,
        "step_s_all": times,
        "warmup_s": warmup,
        "first_loss": losses[0][0],
        "first_grad_norm": losses[0][1],
        "threads": torch.get_num_threads(),
        **describe(shard, plan, cfg.packing),
    }


def torch_step(model_dir: str, cfg, norm, timings: dict | None = None):
    """The plain-torch floor: a closure ``step(shard, plan)`` taking one optimizer step on the
    padded micro-batches ``plan`` of ``shard`` (the baseline's arithmetic without DeepSpeed),
    returning (loss, grad norm). ``timings``: a dict to add each part's seconds to."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlsys.learner.losses import policy_loss, token_logprobs
    from rlsys.learner.model import attention

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attention(cfg, False)
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1e-8, weight_decay=cfg.weight_decay
    )
    clock = _Clock(timings)

    def step(shard, plan):
        total = 0.0
        opt.zero_grad(set_to_none=True)
        for idx in plan:
            if not len(idx):
                continue
            b = shard.select(idx)
            ids, attn, mask, behav, adv = (
                torch.from_numpy(x) for x in (b.input_ids, b.attention_mask, b.mask, b.behav_logprobs, b.advantages)
            )
            with clock("forward"):
                logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
            with clock("token_logprobs"):
                logp = token_logprobs(logits, ids, 1.0)
            with clock("loss"):
                loss, _ = policy_loss(logp, logp.detach(), behav, adv, mask, cfg.loss, norm)
            with clock("backward"):
                loss.backward()
            total += float(loss.detach())
        with clock("step"):  # what DeepSpeed's engine.step does at the boundary: clip, then Adam
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else torch.zeros(())
            opt.step()
        return total, float(gn)

    return step


class _Clock:
    """``with clock(name):`` adds the block's seconds to ``timings[name]`` (a no-op without a dict)."""

    def __init__(self, timings: dict | None):
        self.timings = timings

    def __call__(self, name: str):
        return _Timed(self.timings, name)


class _Timed:
    def __init__(self, timings: dict | None, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.timings is not None:
            self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.t0
        return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the tiny batch through the actor


def instrument(rank) -> None:
    """Inside the actor: time the parts of ``train_step`` (the engine's forward, the loss, backward,
    step, the gradient norm, the weight check) into ``rank.bench_times``."""
    import rlsys.learner.rank as rank_module

    times: dict = {}
    rank.bench_times = times

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name] = times.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    engine = rank.engine
    engine.forward = timed("forward", engine.forward)
    engine.backward = timed("backward", engine.backward)
    engine.step = timed("step", engine.step)
    engine.get_global_grad_norm = timed("grad_norm", engine.get_global_grad_norm)
    rank._weights_finite = timed("weights_finite", rank._weights_finite)
    rank_module.policy_loss = timed("loss", rank_module.policy_loss)
    rank_module.token_logprobs = timed("token_logprobs", rank_module.token_logprobs)


def run_tiny(a: dict) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlsys.controller.cluster import keep_ray_on_loopback

    keep_ray_on_loopback()
    import ray
    import torch
    from transformers import AutoTokenizer

    from rlsys.learner.batch import build_batch, contributing_rows, split_for_ranks
    from rlsys.learner.config import LearnerConfig
    from rlsys.learner.losses import LossNormalizer
    from rlsys.learner.rank import LearnerRank
    from rlsys.records import Completion, Group
    from rlsys.tasks.arithmetic import TaskConfig, load_task
    from rlsys.tasks.config import ModelConfig
    from rlsys.tasks.tinymodel import encode_prompt, ensure_model

    model = str(ensure_model(ModelConfig(), TaskConfig()))
    tok = AutoTokenizer.from_pretrained(model)
    max_new, prompts, samples = 6, 16, 8
    rng = np.random.default_rng(0)
    groups = []
    for i, ex in enumerate(load_task(TaskConfig()).train[:prompts]):
        lens = rng.integers(1, max_new + 1, samples)
        comps = [
            Completion(rng.integers(3, len(tok), n).astype(np.int32), np.full(n, -2.0, np.float32), "", "stop")
            for n in lens
        ]
        rewards = rng.integers(0, 2, samples).astype(np.float32)
        rewards[:2] = (1.0, 0.0)  # variance: every group trains
        prompt = tuple(encode_prompt(tok, ex.prompt))
        groups.append(Group(f"g{i}", f"p{i}", ex.prompt, prompt, ex.answer, 0, comps, rewards))
    cfg = LearnerConfig(lr=1e-4)
    # as controller.loop._train_step builds a step's batch
    batch = build_batch(groups, cfg.loss, tok.pad_token_id)
    norm = LossNormalizer(batch.num_tokens, batch.num_seqs, max_new)
    batch = batch.select(contributing_rows(batch, 1))
    (shard, plan), *_ = split_for_ranks(batch, 1, cfg)
    out: dict = {
        "sequences": batch.num_seqs,
        "tokens": int(batch.attention_mask.sum()),
        "completion_tokens": batch.num_tokens,
        "padded_shape": list(batch.input_ids.shape),
        "micro_batches": len(plan),
        "num_cpus": cfg.num_cpus,
    }
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        rank = ray.remote(num_cpus=cfg.num_cpus)(LearnerRank).remote(cfg, model, 0, 1, free_port(), 1.0, max_new)
        threads = ray.get(rank.__ray_call__.remote(lambda self: __import__("torch").get_num_threads()))
        out["threads"] = threads
        walls, inside = [], []
        for i in range(a["tiny_warmup"] + a["tiny_steps"]):
            t0 = time.perf_counter()
            stats = ray.get(rank.train_step.remote(shard, norm, plan))
            if i >= a["tiny_warmup"]:
                walls.append(time.perf_counter() - t0)
                inside.append(stats.seconds)
        out["actor_wall_s"] = statistics.median(walls)
        out["actor_inside_s"] = statistics.median(inside)
        # instrumented pass: where the actor's step goes (sums over the pass, per step)
        ray.get(rank.__ray_call__.remote(instrument))
        n, wall, inner = a["tiny_steps"], 0.0, 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            stats = ray.get(rank.train_step.remote(shard, norm, plan))
            wall += time.perf_counter() - t0
            inner += stats.seconds
        parts = ray.get(rank.__ray_call__.remote(lambda self: dict(self.bench_times)))
        parts = {k: v / n for k, v in parts.items()}
        # StepStats.seconds stops before the weight check (an argument evaluated after it)
        check = parts.get("weights_finite", 0.0)
        parts["other_in_train_step"] = inner / n - (sum(parts.values()) - check)
        parts["ray_call_overhead"] = (wall - inner) / n - check
        out["actor_breakdown_s"] = {"total_wall": wall / n, **parts}
        ray.kill(rank)
    finally:
        ray.shutdown()
    # the floor, in this process, on the actor's thread count
    torch.set_num_threads(threads)
    timings: dict = {}
    step = torch_step(model, cfg, norm)
    times = []
    for i in range(a["tiny_warmup"] + a["tiny_steps"]):
        t0 = time.perf_counter()
        step(shard, plan)
        if i >= a["tiny_warmup"]:
            times.append(time.perf_counter() - t0)
    out["torch_s"] = statistics.median(times)
    step = torch_step(model, cfg, norm, timings)
    for _ in range(a["tiny_warmup"]):
        step(shard, plan)
    timings.clear()
    t0 = time.perf_counter()
    for _ in range(a["tiny_steps"]):
        step(shard, plan)
    total = (time.perf_counter() - t0) / a["tiny_steps"]
    parts = {k: v / a["tiny_steps"] for k, v in timings.items()}
    out["torch_breakdown_s"] = {"total_wall": total, **parts, "other": total - sum(parts.values())}
    out["learner_over_torch_tiny"] = out["actor_wall_s"] / out["torch_s"]
    return out


# ----------------------------------------------------------------------------- the driver


def child(mode: str, a: dict, log: Path) -> dict:
    """Run ``mode`` in a fresh process; its figures come back through a file, its logs go to ``log``."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if mode == "tiny":  # the actor's threads are Ray's choice, as in a run (one per reserved CPU, at least 1)
        env.pop("OMP_NUM_THREADS", None)
    else:
        env["OMP_NUM_THREADS"] = str(a["threads"])
    try:
        with open(log, "a") as lf:
            proc = subprocess.run(
                [sys.executable, __file__, "--_mode", mode, "--_args", json.dumps(a), "--_out", str(result)],
                stdout=lf, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        if proc.returncode != 0:
            tail = "".join(open(log).readlines()[-40:])
            raise RuntimeError(f"mode {mode} failed (exit {proc.returncode}); the end of {log}:\n{tail}")
        return json.loads(result.read_text())
    finally:
        result.unlink(missing_ok=True)


def verdict(key: str, value) -> str:
    if value is None:
        return "-"
    target, at_least = TARGETS[key]
    ok = value >= target if at_least else value <= target
    return "PASS" if ok else "MISS"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    ap.add_argument("--steps", type=int, default=1, help="timed steps per mode (after --warmup); the median")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up steps per mode (untimed)")
    ap.add_argument("--warmup-seqs", type=int, default=4, help="sequences of the warm-up batch (the shortest)")
    ap.add_argument("--warmup-full", action="store_true", help="warm up on the full batch instead")
    ap.add_argument("--seqs", type=int, default=16, help="sequences in the batch")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--p50", type=int, default=60, help="median completion length")
    ap.add_argument("--longest", type=int, default=1000, help="the one long completion")
    ap.add_argument("--accum", type=int, default=4, help="grad_accum_steps of the count modes")
    ap.add_argument("--budget", type=int, default=2048, help="max_tokens_per_micro_batch of the token_budget modes")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads of every mode (1: robust on a shared machine, see above)"
    )
    ap.add_argument("--tiny-steps", type=int, default=20, help="timed steps of the tiny actor comparison (0 skips)")
    ap.add_argument("--tiny-warmup", type=int, default=3)
    ap.add_argument("--cache-dir", default="~/.cache/rlsys/models")
    ap.add_argument("--log", type=Path, default=None, help="the modes' logs (default: a temp file)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--_mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_args", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args._mode:  # a child: one mode, its figures to --_out
        a = json.loads(args._args)
        out = run_tiny(a) if args._mode == "tiny" else run_mode(args._mode, a)
        Path(args._out).write_text(json.dumps(out))
        return 0

    started = time.perf_counter()
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    from rlsys.learner.batch import build_batch
    from rlsys.learner.config import LossConfig

    model = str(ensure_bench_model(args.cache_dir))
    a = {
        "model": model,
        "seqs": args.seqs,
        "group_size": args.group_size,
        "p50": args.p50,
        "longest": args.longest,
        "vocab": MODEL["vocab"],
        "max_new_tokens": args.longest,
        "accum": args.accum,
        "budget": args.budget,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "warmup_seqs": args.warmup_seqs,
        "warmup_full": args.warmup_full,
        "tiny_steps": args.tiny_steps,
        "tiny_warmup": args.tiny_warmup,
    }
    batch = build_batch(
        make_groups(args.seqs, args.group_size, args.p50, args.longest, MODEL["vocab"]), LossConfig(), 0
    )
    comp = batch.mask.sum(1)
    desc = {
        "sequences": batch.num_seqs,
        "useful_tokens": int(batch.attention_mask.sum()),
        "completion_tokens": batch.num_tokens,
        "padded_tokens": int(batch.input_ids.size),
        "completion_p50": float(np.percentile(comp, 50)),
        "completion_max": int(comp.max()),
        "prompt_lengths": [int((batch.lengths - comp).min()), int((batch.lengths - comp).max())],
        "longest_sequence": int(batch.lengths.max()),
    }
    log = args.log or Path(tempfile.gettempdir()) / f"bench_learner-{os.getpid()}.log"
    print(
        f"bench_learner: {model} ({MODEL['layers']} layers, hidden {MODEL['hidden']}, vocab {MODEL['vocab']}); "
        f"{args.threads} torch threads; logs: {log}"
    )
    print(
        f"batch: {desc['sequences']} sequences, {desc['useful_tokens']} useful tokens ({desc['completion_tokens']} "
        f"completion), {desc['padded_tokens']} padded to the longest; completion p50 {desc['completion_p50']:.0f}, "
        f"max {desc['completion_max']}; prompts {desc['prompt_lengths'][0]}-{desc['prompt_lengths'][1]}"
    )
    results: dict = {}
    for mode in modes:
        t0 = time.perf_counter()
        results[mode] = child(mode, a, log)
        r = results[mode]
        print(
            f"  {mode:20s} {r['step_s']:7.1f} s/step  {r['tokens_per_s']:7.1f} tok/s  peak {r['peak_mb']:7.0f} MB  "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    tiny = None
    if args.tiny_steps > 0:
        t0 = time.perf_counter()
        tiny = child("tiny", a, log)
        print(f"  tiny actor comparison ({time.perf_counter() - t0:.0f} s)", flush=True)

    def ratio(num, den, key):
        if num in results and den in results:
            return results[num][key] / results[den][key]
        return None

    figures = {
        "packing_speedup": ratio("packing", "baseline", "tokens_per_s"),
        "ckpt_memory_ratio": ratio("grad_ckpt", "baseline", "peak_mb"),
        "lora_memory_ratio": ratio("lora", "baseline", "peak_mb"),
        "learner_over_torch": ratio("baseline", "torch", "step_s"),
        "learner_over_torch_tiny": tiny and tiny["learner_over_torch_tiny"],
    }
    elapsed = time.perf_counter() - started

    print(f"\nbench_learner: one rank, ZeRO-1, fp32, CPU; median of {args.steps} steps after {args.warmup} warm-up\n")
    print(
        f"{'mode':20s} {'micro':>6s} {'computed':>9s} {'step s':>8s} {'tokens/s':>9s} {'init MB':>8s} {'peak MB':>8s} "
        f"{'vs baseline':>12s} {'first loss':>11s} {'grad norm':>10s}"
    )
    base = results.get("baseline")
    for mode, r in results.items():
        vs = f"{r['tokens_per_s'] / base['tokens_per_s']:11.2f}x" if base else f"{'-':>12s}"
        print(
            f"{mode:20s} {r['micro_batches']:6d} {r['computed_tokens']:9d} {r['step_s']:8.2f} "
            f"{r['tokens_per_s']:9.1f} {r['rss_after_init_mb']:8.0f} {r['peak_mb']:8.0f} {vs} {r['first_loss']:11.6f} "
            f"{r['first_grad_norm']:10.4f}"
        )
    print(
        "(micro: micro-batches; computed: token positions they compute, padding included; tokens/s counts useful "
        "ones;\n init MB: RSS once the model and engine are built; first loss, grad norm: of the first timed step, "
        "equal\n across modes, lora aside: the other options change only the arithmetic)"
    )
    if results:
        cols = ("forward", "token_logprobs", "loss", "backward", "step", "grad_norm", "weights_finite", "other")
        print("\nwhere a step goes, seconds (learner: the engine's forward, backward and step, get_global_grad_norm,")
        print("the weight check; torch: step = gradient clip + AdamW)")
        print(f"{'mode':20s} " + " ".join(f"{c:>14s}" for c in cols))
        for mode, r in results.items():
            print(f"{mode:20s} " + " ".join(f"{r['breakdown_s'].get(c, 0.0):14.2f}" for c in cols))
    if tiny:
        b = tiny["actor_breakdown_s"]
        print(
            f"\ntiny experiment's batch through the learner actor: {tiny['sequences']} sequences, {tiny['tokens']} "
            f"tokens, padded {tiny['padded_shape'][0]}x{tiny['padded_shape'][1]}, {tiny['micro_batches']} "
            f"micro-batch(es); actor num_cpus {tiny['num_cpus']} -> {tiny['threads']} torch thread(s), the floor too"
        )
        print(
            f"  actor step (ray.get wall) {tiny['actor_wall_s'] * 1e3:7.1f} ms  (inside train_step "
            f"{tiny['actor_inside_s'] * 1e3:.1f} ms)   torch floor {tiny['torch_s'] * 1e3:7.1f} ms   "
            f"ratio {tiny['learner_over_torch_tiny']:.2f}  (median of {args.tiny_steps})"
        )
        t = tiny["torch_breakdown_s"]
        print("  where the time goes, ms per step (instrumented pass):")
        print("    actor: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in b.items()))
        print("    torch: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in t.items()))
    print(f"\n{'figure':26s} {'value':>8s} {'target':>8s}")
    for key, value in figures.items():
        target, at_least = TARGETS[key]
        shown = f"{value:8.2f}" if value is not None else f"{'-':>8s}"
        print(f"{key:26s} {shown} {('>= ' if at_least else '<= ') + str(target):>8s}  {verdict(key, value)}")
    print(f"\nelapsed {elapsed:.0f} s")
    if args.json:
        out = {
            **figures,
            "targets": {
                k: {"target": t, "at_least": al, "verdict": verdict(k, figures[k])} for k, (t, al) in TARGETS.items()
            },  # fmt: skip
            "modes": results,
            "batch": desc,
            "tiny": tiny,
            "model": {**MODEL, "path": model},
            "threads": args.threads,
            "steps": args.steps,
            "warmup": args.warmup,
            "elapsed_s": elapsed,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

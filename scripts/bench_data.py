#!/usr/bin/env python
"""Loading and tokenizing a large prompt file: rlsys's batched path against row-at-a-time.

Writes a JSONL of N word-problem-like prompts of ~150 tokens (messages with a system prompt,
an answer and a metadata column), then, each in a fresh process (so that peak RSS is its own):

* ``rlsys``        -- ``data.*`` as a run reads it (rlsys/data/): ``datasets`` load, checks,
                      chat template and tokenization in one batched ``datasets.map``, then the
                      scheduler's Prompt objects; the tokenized rows are cached on disk
* ``rlsys_cached`` -- the same again: a second start of a run on the same data (cache hit)
* ``per_row``      -- the plain way: ``json.loads`` each line, ``apply_chat_template`` and
                      tokenize one prompt at a time (on the first ``--baseline-rows`` rows)

Prints prompts/s, peak RSS and the speed-up over ``per_row``. The tokenizer is the locally built
Qwen2-style fixture's (byte-level BPE, ChatML template).

    .venv/bin/python scripts/bench_data.py                   # 200,000 prompts
    .venv/bin/python scripts/bench_data.py --rows 20000 --json out.json

JSON: ``prompts_per_s`` and ``peak_rss_mb`` of the ``rlsys`` (cold) path at top level; every
mode under ``modes``; ``cached_start_s`` and ``speedup_over_per_row``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAMES = ["Ivan", "Maria", "Chen", "Aisha", "Tom", "Sofia", "Ravi", "Lena", "Omar", "Yuki"]
THINGS = ["marbles", "apples", "books", "coins", "stickers", "pencils", "cards", "shells"]
VERBS = ["buys", "finds", "gets", "is given", "wins", "borrows"]


def make_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        parts = []
        total = rng.randrange(5, 50)
        thing = rng.choice(THINGS)
        parts.append(f"{rng.choice(NAMES)} has {total} {thing}.")
        for _ in range(5):  # ~150 tokens with the fixture's small vocabulary
            k = rng.randrange(1, 20)
            total += k
            parts.append(f"Then {rng.choice(NAMES)} {rng.choice(VERBS)} {k} more {thing} from the store.")
        parts.append(f"How many {thing} are there now?")
        yield {
            "id": f"q{i}",
            "messages": [{"role": "user", "content": " ".join(parts)}],
            "answer": str(total),
            "level": i % 5,
        }


def run_mode(mode: str, path: str, tok_dir: str, baseline_rows: int, cache: str) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    t0 = time.perf_counter()
    if mode == "per_row":
        n, lengths = 0, 0
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                conv = [{"role": "system", "content": "Answer with a number."}, *row["messages"]]
                text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
                lengths += len(tok(text, add_special_tokens=False)["input_ids"])
                n += 1
                if n == baseline_rows:
                    break
        count, mean_len = n, lengths / n
    else:
        import rlsys.data.prompts as prompts
        from rlsys.data.config import DataConfig

        prompts.CACHE_DIR = Path(cache)
        cfg = DataConfig(
            train_files=path, prompt_key="messages", id_key="id", eval_size=100, system_prompt="Answer with a number."
        )
        ps = prompts.build_prompts(cfg, tok, 4096)
        count = len(ps.train) + len(ps.eval)
        mean_len = sum(len(p.prompt_token_ids) for p in ps.train[:1000]) / min(1000, len(ps.train))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"prompts": count, "seconds": seconds, "prompts_per_s": count / seconds, "peak_rss_mb": peak,
            "mean_prompt_tokens": mean_len}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--baseline-rows", type=int, default=20_000, help="rows the per-row baseline tokenizes")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--_mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_args", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args._mode:  # a child: one mode, its figures as JSON on stdout
        print(json.dumps(run_mode(args._mode, *json.loads(args._args))))
        return 0

    from rlsys.tasks.chatmodel import ensure_fixture

    tok_dir = str(ensure_fixture("qwen2"))
    with tempfile.TemporaryDirectory(prefix="rlsys-bench-data-") as tmp:
        path = Path(tmp) / "prompts.jsonl"
        with open(path, "w") as f:
            for row in make_rows(args.rows):
                f.write(json.dumps(row) + "\n")
        print(f"{args.rows} prompts, {path.stat().st_size / 2**20:.0f} MiB of JSONL")
        env = {**os.environ, "HF_DATASETS_CACHE": str(Path(tmp) / "hf")}
        modes = {}
        for mode in ("rlsys", "rlsys_cached", "per_row"):
            child_args = json.dumps([str(path), tok_dir, args.baseline_rows, str(Path(tmp) / "cache")])
            child_mode = "rlsys" if mode == "rlsys_cached" else mode
            out = subprocess.run(
                [sys.executable, __file__, "--_mode", child_mode, "--_args", child_args],
                capture_output=True, text=True, env=env, check=True,
            )  # fmt: skip
            modes[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    base = modes["per_row"]["prompts_per_s"]
    print(f"\n{'mode':14s} {'prompts':>9s} {'seconds':>8s} {'prompts/s':>10s} {'peak RSS MB':>12s} {'vs per_row':>11s}")
    for mode, m in modes.items():
        print(
            f"{mode:14s} {m['prompts']:9d} {m['seconds']:8.1f} {m['prompts_per_s']:10.0f} {m['peak_rss_mb']:12.0f} "
            f"{m['prompts_per_s'] / base:10.1f}x"
        )
    print(f"mean prompt length: {modes['rlsys']['mean_prompt_tokens']:.0f} tokens (chat template included)")
    result = {
        "prompts_per_s": modes["rlsys"]["prompts_per_s"],
        "peak_rss_mb": modes["rlsys"]["peak_rss_mb"],
        "cached_start_s": modes["rlsys_cached"]["seconds"],
        "speedup_over_per_row": modes["rlsys"]["prompts_per_s"] / base,
        "rows": args.rows,
        "modes": modes,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Measure the simulator's ``cpu`` calibration on this machine and write it to calibration.json.

    .venv/bin/python benchmarks/sim/calibrate_cpu.py --peers runs/peers-genheavy.json
    .venv/bin/python benchmarks/sim/calibrate_cpu.py --peers ... --dry-run    # print only

Decode: an rlsys rollout worker's vLLM engine (run in this process, the same engine settings
as in a run) generates ``--tokens`` tokens per sequence, eos ignored, at each ``--batches``
size; a decode step's seconds are wall seconds / tokens per sequence (prefill included,
amortised: the prompts are a few tokens). Learner and weight sync come from rlsys's own runs
in a peers result (``benchmarks/peers/run.py --json``): seconds busy in learner steps per
generated token (completion tokens; prompts are a few tokens) and busy seconds of weight
publication per step, medians over the repetitions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.sim.cost import DEFAULT_CALIBRATION_FILE, calibration_from_measurements  # noqa: E402


def decode_steps(experiment: str, batches: list[int], tokens: int) -> dict[int, float]:
    """{batch: seconds per decode step} of the experiment's model in an rlsys rollout worker's engine."""
    from vllm import SamplingParams

    from rlsys.config import compose, to_run_config
    from rlsys.rollout.worker import RolloutWorker
    from rlsys.tasks.tinymodel import encode_prompt, ensure_model

    cfg = to_run_config(compose([f"experiment={experiment}"]))
    path = str(ensure_model(cfg.model, cfg.task))
    with tempfile.TemporaryDirectory(prefix="calibrate-") as work:
        worker = RolloutWorker(cfg.rollout, path, 0, work)
        prompt = {"prompt_token_ids": encode_prompt(worker.tokenizer, "345+27=")}
        params = SamplingParams(
            n=1, temperature=1.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True, detokenize=False
        )
        worker.llm.generate([prompt] * 4, params, use_tqdm=False)  # warm-up
        out = {}
        for b in batches:
            t0 = time.perf_counter()
            worker.llm.generate([prompt] * b, params, use_tqdm=False)
            out[b] = (time.perf_counter() - t0) / tokens
    return out


def from_peers(path: Path) -> tuple[float, float]:
    """(learner seconds per generated token, weight-sync seconds per step) of rlsys's runs."""
    runs = json.loads(path.read_text())["runs"]
    rlsys = [r for name, rs in runs.items() if name.startswith("rlsys") for r in rs]
    if not rlsys:
        raise SystemExit(f"{path} has no rlsys runs")
    per_token = statistics.median(r["profile"]["learner_step"] * r["train_seconds"] / r["tokens"] for r in rlsys)
    sync = statistics.median(r["profile"]["weight_sync"] * r["train_seconds"] / r["steps"] for r in rlsys)
    return per_token, sync


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="genheavy")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--peers", type=Path, required=True, help="a benchmarks/peers/run.py --json result")
    ap.add_argument("--dry-run", action="store_true", help="print the calibration, do not write it")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    steps = decode_steps(args.experiment, [int(b) for b in args.batches.split(",")], args.tokens)
    learner_s_per_token, sync_s = from_peers(args.peers)
    measured = {
        "decode_step_s_at_batch": {str(b): round(s, 6) for b, s in steps.items()},
        "learner_s_per_token": round(learner_s_per_token, 8),
        "sync_s": round(sync_s, 4),
        "max_batch": max(steps),
    }
    cal = calibration_from_measurements(steps, learner_s_per_token, sync_s, max_batch=max(steps))
    print("measured:", json.dumps(measured))
    print(
        f"fitted: decode step {cal.decode_step_s * 1e3:.2f} ms + {cal.decode_s_per_seq * 1e3:.3f} ms/sequence, "
        f"learner {learner_s_per_token * 1e3:.3f} ms/token, publication {sync_s:.3f} s"
    )
    if not args.dry_run:
        doc = json.loads(DEFAULT_CALIBRATION_FILE.read_text())
        doc["calibrations"]["cpu"] = {
            "comments": (
                f"Measured on a 2-core CPU machine with the {args.experiment} experiment's model "
                f"(benchmarks/sim/calibrate_cpu.py --peers {args.peers.name}): vLLM-cpu decode "
                f"steps at batches {args.batches}, DeepSpeed-cpu learner seconds per generated token "
                "and shm weight publication per step from rlsys's own peer-benchmark runs. "
                "A 'GPU' in the simulator is one CPU worker slot."
            ),
            "measured": measured,
        }
        DEFAULT_CALIBRATION_FILE.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote the cpu calibration to {DEFAULT_CALIBRATION_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

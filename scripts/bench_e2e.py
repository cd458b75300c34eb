#!/usr/bin/env python
"""End-to-end throughput of the tiny experiment, and where the training wall time goes.

Runs the same experiment under each setting in one process (one Ray cluster), then prints
samples/s, tokens/s and the share of training wall time spent busy in generation, reward,
the learner step and weight sync, with each setting's throughput as a ratio to the first.
Busy shares can sum past 1 when loops overlap (max_staleness >= 1).

    .venv/bin/python scripts/bench_e2e.py                      # sync vs async, 60 steps each
    .venv/bin/python scripts/bench_e2e.py --steps 100 --json out.json
    .venv/bin/python scripts/bench_e2e.py --settings sync      # one setting
    .venv/bin/python scripts/bench_e2e.py --steps 150 --settings uniform,knapsack,ar3po,dapo

JSON: the first setting's figures at top level (keys samples_per_s, tokens_per_s,
share_generation, share_reward, share_learner, share_weight_sync), every setting under "runs".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

SETTINGS = {
    "sync": ["replay.max_staleness=0"],
    "async": ["replay.max_staleness=1"],
    "sync_2workers": ["replay.max_staleness=0", "rollout.num_workers=2", "rollout.prompts_per_call=8"],
    # sampling strategies at the same rollout budget, on a recurring pool of 256 prompts
    "uniform": ["scheduler=uniform", "scheduler.max_prompts=256"],
    "knapsack": ["scheduler=knapsack", "scheduler.max_prompts=256"],
    "ar3po": ["scheduler=ar3po", "scheduler.max_prompts=256"],
    "dapo": ["scheduler=dapo", "scheduler.max_prompts=256"],
}
KEYS = ("samples_per_s", "tokens_per_s", "share_generation", "share_reward", "share_learner", "share_weight_sync")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--settings", default="sync,async", help=f"comma list from {sorted(SETTINGS)}")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every setting")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from rlsys.config import compose, to_run_config
    from rlsys.controller.loop import run_training

    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    runs = {}
    for name in names:
        overrides = [
            f"steps={args.steps}",
            "max_train_seconds=0",
            "cluster.metrics_port=-1",
            *SETTINGS[name],
            *args.overrides,
        ]
        if name == "sync_2workers":
            overrides.append("cluster.num_cpus=3")
        cfg = to_run_config(compose(overrides))
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as d:
            s = run_training(cfg, Path(d))
        runs[name] = {k: s[k] for k in KEYS} | {
            "steps": s["steps"],
            "train_seconds": s["train_seconds"],
            "samples": s["samples"],
            "eval_accuracy_before": s["eval_accuracy_before"],
            "eval_accuracy_after": s["eval_accuracy_after"],
            "effective_gradient_ratio": s["effective_gradient_ratio"],
            "curves": s["curves"],
        }
        import ray

        ray.shutdown()  # each setting gets a fresh cluster sized for it

    base = runs[names[0]]
    print(f"\nbench_e2e: tiny experiment, {args.steps} steps per setting\n")
    hdr = (
        f"{'setting':15s} {'samples/s':>10s} {'tokens/s':>10s} {'x ' + names[0]:>9s} {'gen':>6s} {'reward':>7s} "
        f"{'learner':>8s} {'sync':>6s} {'acc before':>11s} {'acc after':>10s} {'eff.grad':>9s} {'samples':>8s}"
    )
    print(hdr)
    print("-" * len(hdr))
    for name, r in runs.items():
        print(
            f"{name:15s} {r['samples_per_s']:10.1f} {r['tokens_per_s']:10.1f} "
            f"{r['samples_per_s'] / base['samples_per_s']:9.2f} {r['share_generation']:6.2f} "
            f"{r['share_reward']:7.2f} {r['share_learner']:8.2f} {r['share_weight_sync']:6.2f} "
            f"{r['eval_accuracy_before']:11.3f} {r['eval_accuracy_after']:10.3f} "
            f"{r['effective_gradient_ratio']:9.3f} {r['samples']:8d}"
        )
    if len(runs) > 1 and all("curves" in r for r in runs.values()):
        print("\ncurves (mean over each tenth of the run): reward | effective gradient ratio")
        for name, r in runs.items():
            rw, eg = (np.array_split(np.asarray(r["curves"][k]), 10) for k in ("reward", "effective_gradient_ratio"))
            print(
                f"{name:15s} "
                + " ".join(f"{c.mean():.2f}" for c in rw)
                + "  |  "
                + " ".join(f"{c.mean():.2f}" for c in eg)
            )
    print("\nshares = busy seconds / training wall seconds per activity")
    if args.json:
        out = {k: base[k] for k in KEYS} | {"setting": names[0], "runs": runs}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Rollout allocation on a simulated prompt population with known success rates.

Population (docs/algorithms.md §6), M prompts (default 256), success rate p per prompt:
40% easy p ~ U(0.85, 1.0), 15% very hard p ~ U(0.005, 0.05), 5% impossible p = 0,
40% mixed p ~ U(0.1, 0.85). A rollout's reward is Bernoulli(p). Bounds are the Knapsack RL
reference setting: uniform n = 8, N_low = 2, N_up = 128, so every allocation spends B = 8 M.

1. Effective gradient ratio (rollout level: the fraction of rollouts in groups with
   non-zero reward variance, ``allocation.effective_gradient_ratio``) at equal budget B for
   - uniform: n rollouts per prompt;
   - knapsack, true p: ``allocate_knapsack`` on the true success rates;
   - knapsack, est8: the scheduler's ``knapsack`` strategy with p̂ from ``PromptStats`` fed
     8 simulated past rollouts per prompt (all prompts are then "seen": 8 >= unseen_threshold).
   Each allocation's rewards are drawn fresh; the ratio knapsack / uniform is taken per seed.
2. AR3PO versus DAPO dynamic sampling, responses per prompt at an equal fraction of useful
   groups (useful = non-zero reward variance, so the group has a GRPO gradient).
   - AR3PO: S stages of k responses over the M prompts (``ar3po_next_stage``); groups still
     without a correct response get a stored correct one swapped in when the prompt had any
     correct response among its 8 past rollouts (``ar3po_reuse``). It yields U useful groups.
   - DAPO: how we equalise — DAPO must deliver the *same number U* of useful groups, i.e. the
     same useful fraction U / M of the M-prompt batch. It samples U prompts from the same
     population with n responses each, keeps groups with 0 < correct < n (``dapo_keep``), and
     resamples the shortfall (``dapo_prompts_to_sample``) for up to ``--dapo-max-rounds`` rounds.
   Both costs are divided by M: responses generated per prompt of the training batch. The
   table also shows responses per useful group and DAPO's achieved useful fraction (below
   AR3PO's only if the retry cap was hit).

Medians over ``--seeds`` seeds. Exit status 1 if knapsack misses either claim (true p: >= 1.2x
uniform; est8: > uniform).

    .venv/bin/python scripts/bench_scheduler.py [--prompts 256] [--seeds 9] [--json out.json]

JSON keys: knapsack_over_uniform_true_p, knapsack_over_uniform_est8,
ar3po_responses_per_prompt, dapo_responses_per_prompt (+ the per-method details).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from rlsys.scheduling.allocation import (
    allocate_knapsack,
    allocation_histogram,
    ar3po_next_stage,
    ar3po_reuse,
    dapo_keep,
    dapo_prompts_to_sample,
    effective_gradient_ratio,
    effective_prompt_ratio,
)
from rlsys.scheduling.scheduler import PromptStats, SchedulerConfig, allocate

CATEGORIES = (  # name, share, low, high
    ("easy", 0.40, 0.85, 1.0),
    ("very_hard", 0.15, 0.005, 0.05),
    ("impossible", 0.05, 0.0, 0.0),
    ("mixed", 0.40, 0.10, 0.85),
)
N_UNIFORM, N_LOW, N_UP = 8, 2, 128
PAST = 8


def population(m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(p float [m], category index int [m]) in the docs/algorithms.md §6 proportions."""
    sizes = [round(share * m) for _, share, _, _ in CATEGORIES]
    sizes[-1] = m - sum(sizes[:-1])
    cat = np.repeat(np.arange(len(CATEGORIES)), sizes)
    lo = np.array([c[2] for c in CATEGORIES])[cat]
    hi = np.array([c[3] for c in CATEGORIES])[cat]
    return lo + (hi - lo) * rng.random(m), cat


def draw(k: int, rng: np.random.Generator) -> np.ndarray:
    """k fresh prompts' p, categories drawn i.i.d. with the population's shares (DAPO's resampling)."""
    cat = rng.choice(len(CATEGORIES), size=k, p=[c[1] for c in CATEGORIES])
    lo = np.array([c[2] for c in CATEGORIES])[cat]
    hi = np.array([c[3] for c in CATEGORIES])[cat]
    return lo + (hi - lo) * rng.random(k)


def rollouts(p: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    return [(rng.random(int(n)) < pi).astype(np.float64) for pi, n in zip(p, counts)]


def allocation_ratios(p: np.ndarray, rng: np.random.Generator, zero_cap: int, unseen_threshold: int) -> dict:
    m = len(p)
    budget = N_UNIFORM * m
    uniform = allocate("uniform", p, np.zeros(m), budget, N_LOW, N_UP)
    true_p = allocate_knapsack(p, budget, N_LOW, N_UP, zero_cap=zero_cap)
    stats = PromptStats(history=16)
    past = rollouts(p, np.full(m, PAST), rng)
    for i, r in enumerate(past):
        stats.observe(f"q{i}", r.tolist())
    ids = [f"q{i}" for i in range(m)]
    est8 = allocate(
        "knapsack",
        stats.success_rate(ids),
        stats.observed(ids),
        budget,
        N_LOW,
        N_UP,
        unseen_threshold=unseen_threshold,
        zero_cap=zero_cap,
    )
    out = {"past_has_correct": np.array([r.max() > 0 for r in past])}
    for name, counts in (("uniform", uniform), ("true_p", true_p), ("est8", est8)):
        assert counts.sum() == budget
        groups = rollouts(p, counts, rng)
        out[name] = {
            "egr": effective_gradient_ratio(groups),
            "epr": effective_prompt_ratio(groups),
            "expected_egr": float((counts * (1 - p**counts - (1 - p) ** counts)).sum() / budget),
            "counts": counts,
        }
    return out


def ar3po(p: np.ndarray, stored: np.ndarray, stages: int, k: int, rng: np.random.Generator) -> dict:
    m = len(p)
    groups: list[list[float]] = [[] for _ in range(m)]
    pool = np.ones(m, dtype=bool)
    for stage in range(stages):
        for i in np.flatnonzero(pool):
            groups[i].extend((rng.random(k) < p[i]).astype(float).tolist())
        correct = np.array([sum(g) for g in groups])
        pool = ar3po_next_stage(correct, stage, stages)
        if not pool.any():
            break
    responses = sum(len(g) for g in groups)
    final = [ar3po_reuse(np.array(g), 1.0 if stored[i] else None)[0] for i, g in enumerate(groups)]
    useful = sum(dapo_keep(g) for g in final)
    return {
        "responses": responses,
        "useful": useful,
        "reused": sum(len(f) and not np.array_equal(f, g) for f, g in zip(final, groups)),
    }


def dapo(target: int, n: int, max_rounds: int, rng: np.random.Generator) -> dict:
    kept = responses = rounds = 0
    while (k := dapo_prompts_to_sample(kept, target, rounds, max_rounds)) > 0:
        p = draw(k, rng)
        groups = rollouts(p, np.full(k, n), rng)
        kept += sum(dapo_keep(g) for g in groups)
        responses += k * n
        rounds += 1
    return {"responses": responses, "useful": min(kept, target), "rounds": rounds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=9)
    ap.add_argument("--dapo-max-rounds", type=int, default=SchedulerConfig().dapo_max_rounds)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    cfg = SchedulerConfig(strategy="knapsack", samples_per_prompt=N_UNIFORM, min_per_prompt=N_LOW, max_per_prompt=N_UP)
    m, t0 = args.prompts, time.perf_counter()
    rows = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        p, cat = population(m, rng)
        a = allocation_ratios(p, rng, cfg.zero_cap, cfg.unseen_threshold)
        ar = ar3po(p, a["past_has_correct"], cfg.ar3po_stages, cfg.ar3po_stage_size, rng)
        da = dapo(ar["useful"], N_UNIFORM, args.dapo_max_rounds, rng)
        rows.append({"a": a, "ar": ar, "da": da, "cat": cat})

    def med(f) -> float:
        return float(np.median([f(r) for r in rows]))

    res = {
        "knapsack_over_uniform_true_p": med(lambda r: r["a"]["true_p"]["egr"] / r["a"]["uniform"]["egr"]),
        "knapsack_over_uniform_est8": med(lambda r: r["a"]["est8"]["egr"] / r["a"]["uniform"]["egr"]),
        "ar3po_responses_per_prompt": med(lambda r: r["ar"]["responses"] / m),
        "dapo_responses_per_prompt": med(lambda r: r["da"]["responses"] / m),
    }
    details = {}
    for name in ("uniform", "true_p", "est8"):
        details[name] = {k: med(lambda r, k=k: r["a"][name][k]) for k in ("egr", "epr", "expected_egr")}
        details[name]["max_count"] = med(lambda r: int(r["a"][name]["counts"].max()))
        details[name]["mean_count_by_category"] = {
            c[0]: med(lambda r, j=j: float(r["a"][name]["counts"][r["cat"] == j].mean()))
            for j, c in enumerate(CATEGORIES)
        }
    details["ar3po"] = {
        "useful_fraction": med(lambda r: r["ar"]["useful"] / m),
        "responses_per_useful_group": med(lambda r: r["ar"]["responses"] / max(r["ar"]["useful"], 1)),
        "reused_groups": med(lambda r: r["ar"]["reused"]),
        "stages": cfg.ar3po_stages,
        "stage_size": cfg.ar3po_stage_size,
    }
    details["dapo"] = {
        "useful_fraction": med(lambda r: r["da"]["useful"] / m),
        "responses_per_useful_group": med(lambda r: r["da"]["responses"] / max(r["da"]["useful"], 1)),
        "rounds": med(lambda r: r["da"]["rounds"]),
        "n": N_UNIFORM,
        "max_rounds": args.dapo_max_rounds,
    }
    hist, edges = allocation_histogram(rows[0]["a"]["true_p"]["counts"], bins=[2, 3, 4, 8, 16, 32, 64, 128])

    print(
        f"population: {m} prompts x {N_UNIFORM} (B = {N_UNIFORM * m}), N_low {N_LOW}, N_up {N_UP}, "
        f"zero_cap {cfg.zero_cap}; median of {args.seeds} seeds"
    )
    print(
        f"\n{'allocation':<16}{'eff. grad ratio':>16}{'expected':>10}{'eff. prompt ratio':>19}{'x uniform':>11}"
        f"{'max N':>7}   mean N: " + " / ".join(c[0] for c in CATEGORIES)
    )
    for name, label in (("uniform", "uniform"), ("true_p", "knapsack true p"), ("est8", "knapsack est8")):
        d = details[name]
        ratio = 1.0 if name == "uniform" else res[f"knapsack_over_uniform_{name}"]
        by = " / ".join(f"{v:.1f}" for v in d["mean_count_by_category"].values())
        print(
            f"{label:<16}{d['egr']:>16.3f}{d['expected_egr']:>10.3f}{d['epr']:>19.3f}{ratio:>11.2f}"
            f"{d['max_count']:>7.0f}   {by}"
        )
    print(
        "\nknapsack (true p, seed 0) allocation histogram: "
        + ", ".join(f"[{lo},{hi})={h}" for lo, hi, h in zip(edges, list(edges[1:]) + ["inf"], hist))
    )
    ar, da = details["ar3po"], details["dapo"]
    print(f"\n{'method':<44}{'responses/prompt':>17}{'useful fraction':>17}{'responses/useful':>18}")
    print(
        f"{'AR3PO (S=%d stages of k=%d, reuse)' % (ar['stages'], ar['stage_size']):<44}"
        f"{res['ar3po_responses_per_prompt']:>17.2f}{ar['useful_fraction']:>17.3f}"
        f"{ar['responses_per_useful_group']:>18.2f}"
    )
    print(
        f"{'DAPO (n=%d, resample, <= %d rounds; used %.0f)' % (da['n'], da['max_rounds'], da['rounds']):<44}"
        f"{res['dapo_responses_per_prompt']:>17.2f}{da['useful_fraction']:>17.3f}"
        f"{da['responses_per_useful_group']:>18.2f}"
    )
    print(
        f"DAPO / AR3PO responses per prompt: "
        f"{res['dapo_responses_per_prompt'] / res['ar3po_responses_per_prompt']:.2f}x"
    )
    ok_true = res["knapsack_over_uniform_true_p"] >= 1.2
    ok_est = res["knapsack_over_uniform_est8"] > 1.0
    print(
        f"\nclaim knapsack true p >= 1.2x uniform: {'OK' if ok_true else 'FAIL'}; "
        f"knapsack est8 > uniform: {'OK' if ok_est else 'FAIL'}  ({time.perf_counter() - t0:.1f}s)"
    )
    if args.json:
        args.json.write_text(json.dumps({**res, "details": details, "seeds": args.seeds, "prompts": m}, indent=2))
    return 0 if ok_true and ok_est else 1


if __name__ == "__main__":
    sys.exit(main())

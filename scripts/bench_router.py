#!/usr/bin/env python
"""Reward routing on a synthetic world where the RM's error grows with its uncertainty.

Uncertainty-routed reward (arXiv 2510.20369; docs/algorithms.md §2, §6), run through the real
``rlsys.reward.routing`` and ``verdicts`` functions (``pair_scores``, ``route_batch``, ``parse_verdict_or_fallback``,
``RoutePlan.apply``).

World, per seed: a step of G groups (default 256) of n = 8 responses, 28 pairs each.
- Response i has a latent quality q_i ~ N(0, 1); the true logit of pair (i, j) is d = q_i - q_j.
- Each pair has an RM uncertainty u ~ Beta(1, 3) (``--u-beta``): right-skewed, most pairs
  confident and a tail of uncertain ones. The RM scores both orders,
  l(i,j) = d + b + sigma(u) e1 and l(j,i) = -d + b + sigma(u) e2, with a position bias b = 0.3,
  e ~ N(0, 1) and sigma(u) = a + k u (defaults a = 0.2, k = 6): RM accuracy falls as u rises
  (the table's first line shows it by uncertainty quintile). The router antisymmetrises the
  two orders (b cancels; the noise std becomes sigma(u) / sqrt 2).
- The judge is right with probability 0.95 (``--judge-acc``). It answers in text, parsed by the
  strict parser; 2% of calls fail (``--judge-fail``: half time out, half answer
  ``verdict: a``-style garbage) and fall back to the RM's score. Judge ties never occur.
  Each pair's judge outcome is drawn once per seed and shared by every policy (common random
  numbers), so policy differences come from routing alone.

Pairwise accuracy: over every pair of every group (ties in truth, d = 0, would be excluded;
with continuous q there are none), the fraction whose final score has the true sign,
sign(S_ij) == sign(q_i - q_j); a final S_ij of exactly 0 counts as wrong.

Policies at the same judge budget (a fraction of the step's pairs, ``judge_budget``):
none (RM only), random, margin (smallest |s_ij|), uncertainty (largest u), null (the
uncertainty policy with u shuffled across the step's pairs: a control that must not beat
random), all (every pair judged; the ceiling). Medians over ``--seeds`` seeds.

    .venv/bin/python scripts/bench_router.py [--groups 256] [--seeds 9] [--json out.json] [--sweep]

``--sweep`` adds a sensitivity table: the 20% gains over random for other worlds (u
distribution x noise growth k), 128 groups x 5 seeds each. Margin routing is a strong
baseline in this world family: small |s_ij| already flags most RM errors, and uncertainty
routing only overtakes it when the noise is strongly heteroscedastic and u is skewed.

JSON (at the 20% budget): ``uncertainty_acc``, ``random_acc``, ``margin_acc`` as fractions in
[0, 1]; ``null_gain`` = null_acc - random_acc in **points** (percentage points); plus
``uncertainty_gain`` (points over random) and per-budget ``details``. Exit status 1 if
uncertainty beats random by < 2 points at 20% or |null_gain| >= 1 point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from rlsys.reward.routing import RouterConfig, pair_scores, rm_judge_agreement, route_batch
from rlsys.reward.verdicts import parse_verdict_or_fallback

BUDGETS = (0.05, 0.10, 0.20, 0.40)
POLICIES = ("none", "random", "margin", "uncertainty", "null", "all")
GARBAGE = ("verdict: a", "I prefer response A.", "VERDICT: A\nVERDICT: B")


class World:
    """One seed's step: truth, RM scores and the judge's fixed answer for every pair."""

    def __init__(
        self,
        rng: np.random.Generator,
        groups: int,
        n: int,
        u_beta: tuple[float, float],
        a: float,
        k: float,
        bias: float,
        judge_acc: float,
        judge_fail: float,
    ):
        self.n = n
        self.q = rng.normal(size=(groups, n))
        i, j = np.triu_indices(n, k=1)
        self.d = self.q[:, i] - self.q[:, j]  # [G, P] true logits
        p = len(i)
        self.u = rng.beta(*u_beta, size=(groups, p))
        sigma = a + k * self.u
        self.l_ij = self.d + bias + sigma * rng.normal(size=(groups, p))
        self.l_ji = -self.d + bias + sigma * rng.normal(size=(groups, p))
        truth = np.sign(self.d).astype(int)
        verdict = np.where(rng.random((groups, p)) < judge_acc, truth, -truth)
        fail = rng.random((groups, p)) < judge_fail
        timeout = fail & (rng.random((groups, p)) < 0.5)
        garbage = fail & ~timeout
        self.judge_text = np.where(verdict > 0, "VERDICT: A", "VERDICT: B").astype(object)  # [G, P] str | None
        self.judge_text[garbage] = np.array(GARBAGE, dtype=object)[rng.integers(len(GARBAGE), size=garbage.sum())]
        self.judge_text[timeout] = None

    def scores(self, u: np.ndarray):
        return [pair_scores(None, self.l_ij[g], self.l_ji[g], u[g]) for g in range(len(self.q))]


def evaluate(world: World, plans, scale: float) -> dict:
    """Pairwise accuracy of the final S, judge fallbacks, RM-judge agreement on routed pairs."""
    correct = total = judged = fallbacks = 0
    s_rm, verdicts = [], []
    for g, plan in enumerate(plans):
        v = [parse_verdict_or_fallback(world.judge_text[g, kk]) for kk in plan.judge]
        out = plan.apply(v, scale)
        judged, fallbacks = judged + out.judged, fallbacks + out.fallbacks
        s_rm.extend(plan.scores.s[plan.judge])
        verdicts.extend(v)
        pairs, d = plan.scores.pairs, world.d[g]
        final = out.S[pairs[:, 0], pairs[:, 1]]
        keep = d != 0
        correct += int((np.sign(final[keep]) == np.sign(d[keep])).sum())
        total += int(keep.sum())
    return {
        "acc": correct / total,
        "judged": judged,
        "fallbacks": fallbacks,
        "agreement": rm_judge_agreement(np.array(s_rm), verdicts) if verdicts else float("nan"),
    }


def run_seed(seed: int, args) -> dict:
    rng = np.random.default_rng(seed)
    world = World(
        rng, args.groups, args.n, tuple(args.u_beta), args.a, args.k, args.bias, args.judge_acc, args.judge_fail
    )
    real = world.scores(world.u)
    shuffled = world.scores(rng.permutation(world.u.ravel()).reshape(world.u.shape))
    out: dict = {}
    for frac in BUDGETS:
        for policy in POLICIES:
            cfg = RouterConfig(
                policy="uncertainty" if policy == "null" else policy,
                budget_fraction=frac,
                verdict_scale=args.scale,
                seed=seed,
            )
            plans = route_batch(shuffled if policy == "null" else real, cfg, np.random.default_rng([seed, 1]))
            out[(frac, policy)] = {**evaluate(world, plans, args.scale), "sent": sum(len(p.judge) for p in plans)}
    # the world's premise: RM accuracy by uncertainty quintile
    s = np.concatenate([g.s for g in real])
    u, d = world.u.ravel(), world.d.ravel()
    edges = np.quantile(u, np.linspace(0, 1, 6))
    out["rm_acc_by_u"] = [
        float((np.sign(s) == np.sign(d))[(u >= lo) & (u <= hi)].mean()) for lo, hi in zip(edges[:-1], edges[1:])
    ]
    return out


def summarise(args) -> tuple[dict, list[float]]:
    """Per-budget medians over seeds, and the RM's accuracy by uncertainty quintile."""
    runs = [run_seed(seed, args) for seed in range(args.seeds)]

    def med(f) -> float:
        return float(np.median([f(r) for r in runs]))

    def gain(frac, policy):
        return lambda r: 100 * (r[(frac, policy)]["acc"] - r[(frac, "random")]["acc"])

    details = {}
    for frac in BUDGETS:
        row: dict = {
            p: {
                k: med(lambda r, p=p, k=k: r[(frac, p)][k]) for k in ("acc", "sent", "judged", "fallbacks", "agreement")
            }
            for p in POLICIES
        }
        for p in ("uncertainty", "margin", "null"):
            row[f"{p}_gain_points"] = med(gain(frac, p))
        row["uncertainty_gain_min_points"] = min(gain(frac, "uncertainty")(r) for r in runs)
        details[f"{round(frac * 100)}%"] = row
    return details, [med(lambda r, q=q: r["rm_acc_by_u"][q]) for q in range(5)]


SWEEP = [
    ((1.0, 1.0), 3.0),
    ((1.0, 1.0), 6.0),
    ((1.0, 3.0), 3.0),
    ((1.0, 3.0), 10.0),
    ((0.5, 2.0), 6.0),
    ((2.0, 5.0), 6.0),
    ((1.0, 6.0), 10.0),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=256, help="groups per step")
    ap.add_argument("--n", type=int, default=8, help="responses per group")
    ap.add_argument("--seeds", type=int, default=9)
    ap.add_argument(
        "--u-beta",
        type=float,
        nargs=2,
        default=(1.0, 3.0),
        metavar=("ALPHA", "BETA"),
        help="uncertainty u ~ Beta(ALPHA, BETA); 1 1 is Uniform(0, 1)",
    )
    ap.add_argument("--a", type=float, default=0.2, help="RM noise std at u = 0")
    ap.add_argument("--k", type=float, default=6.0, help="RM noise std growth per unit of uncertainty")
    ap.add_argument("--bias", type=float, default=0.3, help="RM position bias (cancelled by antisymmetrising)")
    ap.add_argument("--judge-acc", type=float, default=0.95)
    ap.add_argument("--judge-fail", type=float, default=0.02, help="judge calls that time out or answer garbage")
    ap.add_argument("--scale", type=float, default=1.0, help="verdict_scale c")
    ap.add_argument("--sweep", action="store_true", help="also print the sensitivity table over other worlds")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()

    t0 = time.perf_counter()
    details, rm_by_u = summarise(args)
    pairs = args.groups * args.n * (args.n - 1) // 2
    print(
        f"world: {args.groups} groups x {args.n} responses ({pairs} pairs/step); u ~ Beta{tuple(args.u_beta)}, "
        f"RM noise std {args.a} + {args.k} u, position bias {args.bias}; judge {args.judge_acc:.0%} right, "
        f"{args.judge_fail:.0%} fallbacks; c = {args.scale}; median of {args.seeds} seeds"
    )
    print("RM pairwise accuracy by uncertainty quintile (low -> high): " + " ".join(f"{a:.3f}" for a in rm_by_u))
    print("\npairwise accuracy (fraction of pairs whose final S_ij has the true sign)")
    print(
        f"{'budget':>7}{'sent':>7}"
        + "".join(f"{p:>13}" for p in POLICIES)
        + f"{'unc-rand':>10}{'marg-rand':>11}{'null-rand':>11}"
    )
    for frac in BUDGETS:
        row = details[f"{round(frac * 100)}%"]
        print(
            f"{frac:>7.0%}{row['random']['sent']:>7.0f}"
            + "".join(f"{row[p]['acc']:>13.4f}" for p in POLICIES)
            + f"{row['uncertainty_gain_points']:>+10.2f}{row['margin_gain_points']:>+11.2f}"
            f"{row['null_gain_points']:>+11.2f}"
        )
    print("  (gains: points over random; sent: judge calls per step, the same for every budgeted policy)")
    at20 = details["20%"]
    print(
        "RM-judge agreement on routed pairs at 20% (ties/fallbacks excluded): "
        + ", ".join(f"{p} {at20[p]['agreement']:.3f}" for p in ("random", "margin", "uncertainty", "null"))
    )
    print(
        f"judge fallbacks at 20%: {at20['uncertainty']['fallbacks']:.0f} of {at20['uncertainty']['sent']:.0f} "
        f"calls; uncertainty - random at 20%, worst seed: {at20['uncertainty_gain_min_points']:+.2f} points"
    )

    sweep = []
    if args.sweep:
        print("\nsensitivity at 20% (128 groups x 5 seeds; points over random)")
        print(
            f"{'u distribution':>16}{'k':>5}{'RM acc':>8}{'RM acc q1->q5':>16}{'unc-rand':>10}{'marg-rand':>11}"
            f"{'null-rand':>11}"
        )
        for u_beta, k in SWEEP:
            sub = argparse.Namespace(**{**vars(args), "groups": 128, "seeds": 5, "u_beta": u_beta, "k": k})
            d, by_u = summarise(sub)
            r = d["20%"]
            sweep.append(
                {
                    "u_beta": u_beta,
                    "k": k,
                    "rm_acc": r["none"]["acc"],
                    "rm_acc_by_u": by_u,
                    **{f"{p}_gain_points": r[f"{p}_gain_points"] for p in ("uncertainty", "margin", "null")},
                }
            )
            trend = f"{by_u[0]:.2f} -> {by_u[-1]:.2f}"
            print(
                f"{'Beta(%g, %g)' % u_beta:>16}{k:>5g}{r['none']['acc']:>8.3f}{trend:>16}"
                f"{r['uncertainty_gain_points']:>+10.2f}{r['margin_gain_points']:>+11.2f}"
                f"{r['null_gain_points']:>+11.2f}"
            )

    res = {
        "uncertainty_acc": at20["uncertainty"]["acc"],
        "random_acc": at20["random"]["acc"],
        "margin_acc": at20["margin"]["acc"],
        "null_gain": at20["null_gain_points"],
        "uncertainty_gain": at20["uncertainty_gain_points"],
    }
    ok_gain = res["uncertainty_gain"] >= 2.0
    ok_null = abs(res["null_gain"]) < 1.0
    print(
        f"\nclaim at 20%: uncertainty - random = {res['uncertainty_gain']:+.2f} points >= 2: "
        f"{'OK' if ok_gain else 'FAIL'}; null control {res['null_gain']:+.2f} points, |.| < 1: "
        f"{'OK' if ok_null else 'FAIL'}  ({time.perf_counter() - t0:.1f}s)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    **res,
                    "units": {"*_acc": "fraction in [0, 1]", "null_gain": "points", "uncertainty_gain": "points"},
                    "rm_acc_by_uncertainty_quintile": rm_by_u,
                    "details": details,
                    "sweep": sweep,
                    "seeds": args.seeds,
                    "groups": args.groups,
                    "n": args.n,
                    "world": {
                        "u_beta": list(args.u_beta),
                        "a": args.a,
                        "k": args.k,
                        "bias": args.bias,
                        "judge_acc": args.judge_acc,
                        "judge_fail": args.judge_fail,
                        "scale": args.scale,
                    },
                },
                indent=2,
            )
        )
    return 0 if ok_gain and ok_null else 1


if __name__ == "__main__":
    sys.exit(main())

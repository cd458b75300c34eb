#!/usr/bin/env python
"""Train the fast reward model on the built-in task and measure what its uncertainty is worth.

docs/algorithms.md §2 (arXiv 2510.20369): RM accuracy should fall as its uncertainty rises,
and sending the most uncertain pairs to the judge should beat sending random ones.

Data (rlsys.tasks.preference_model.preference_data): for each prompt of the task's train split,
``--negatives`` wrong answers drawn from realistic mistakes (a digit +-1, +-10^k, a dropped or
added carry, swapped digits, a dropped or doubled digit, an operand); each makes one
(correct, wrong) pair in random order, its label flipped with probability ``--label-noise``.
Wrong-vs-wrong pairs are never labelled. Then the pairwise model (SNGP head) and the
pointwise model are trained exactly as ``ensure_reward_model`` trains them.

Held-out evaluation, on the val + eval prompts (never trained on), labels clean:

- ``synthetic``: ``--eval-negatives`` new mistakes per prompt, same generator as training;
- ``degenerate``: the correct answer against a response unlike any training answer (a random
  string of the alphabet, a 7-digit number, an empty answer, '=+=+=', a leading zero, one
  digit): out-of-distribution inputs, where the GP variance is meant to rise;
- ``policy``: the tiny policy's own samples (``--policy-samples`` per prompt, temperature 1):
  every (correct, distinct wrong) pair of a prompt with at least one correct sample. These
  are the pairs the RM meets in RL. Needs the tiny policy (built and cached on first use,
  ~70 s); ``--no-policy`` skips it.

Each pair is scored in both orders; s = (l(a,b) - l(b,a)) / 2 and u = the mean of both orders'
uncertainties, sqrt(1 + a var). Reported per set: accuracy (sign(s) equals the truth),
accuracy per decile of u (low to high) and of |s| (high to low), per mistake kind, and the
Spearman correlation of u with being right (negative = accuracy falls as u rises).

Routing check (rlsys.reward.routing.select_pairs) on each set: a judge budget of ``--budget`` of the
pairs, an oracle judge (the true label); accuracy after routing for policies none, random,
margin (smallest |s|), uncertainty (largest predictive uncertainty u = 1 - |2p - 1|, p =
sigmoid(s / u_gp): the router's default signal), variance (largest u_gp alone), null (u
shuffled: a control) and all. random and null average over ``--repeats`` draws.

    .venv/bin/python scripts/train_rm.py [--steps 2000] [--json out.json] [--save DIR]

What it showed with the defaults (2026-11-30, one CPU thread):

- synthetic held-out mistakes (2,400 pairs): accuracy 0.711; accuracy falls as u rises
  (0.97 in the lowest u deciles, ~0.49 in the highest; Spearman(u, right) -0.36); routing at
  20%: uncertainty 0.813, margin 0.813, random 0.769, null 0.769 (+4.4 points over random).
  The GP variance alone goes the other way (Spearman +0.31, routing 0.725): the model's
  errors are near-miss answers, typical inputs with a low variance, and the high-variance
  pairs are the easy, distinctive mistakes (wrong length).
- degenerate answers: accuracy 0.907; u and u_gp both track errors (Spearman -0.18 and
  -0.11); routing: uncertainty 0.968, variance 0.963, random 0.927.
- the policy's own samples: the RM is near chance (0.557) and nearly every pair has u ~ 1;
  routing gains nothing over random (0.647 vs 0.643). The RM is trained on synthetic
  mistakes only; the policy's mistakes are a different distribution.

JSON: ``train`` (seconds, steps, pairs), and per set ``accuracy``, ``deciles`` (list of
{u_low, u_high, accuracy, n}), ``margin_deciles``, ``kinds``, ``spearman_u_correct``,
``routing`` ({policy: accuracy}) and ``uncertainty_gain_points`` (uncertainty - random, in
percentage points).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from rlsys.reward.config import RewardModelConfig
from rlsys.reward.reward_model import PairwiseRewardModel
from rlsys.reward.routing import antisymmetrize, rm_uncertainty, select_pairs
from rlsys.tasks.arithmetic import Example, TaskConfig, load_task
from rlsys.tasks.config import ModelConfig
from rlsys.tasks.preference_model import (
    PreferenceData,
    pairwise_accuracy,
    preference_data,
    train_pairwise,
    train_pointwise,
)
from rlsys.tasks.tinymodel import build_tokenizer, decode_completion, encode_prompt, ensure_model

ROUTING_POLICIES = ("none", "random", "margin", "uncertainty", "variance", "null", "all")


def policy_pairs(examples: list[Example], samples: int, seed: int) -> PreferenceData:
    """(correct, wrong) pairs from the tiny policy's own samples at temperature 1."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ensure_model(ModelConfig(), TaskConfig())).eval()
    tok = build_tokenizer()
    gen = torch.Generator().manual_seed(seed)
    by_length: dict[int, list[Example]] = defaultdict(list)
    for ex in examples:
        by_length[len(ex.prompt)].append(ex)
    completions: dict[str, list[str]] = {}
    max_new = max(len(ex.answer) for ex in examples) + 2
    with torch.no_grad():
        for length in sorted(by_length):
            rows = by_length[length]
            ids = torch.tensor([encode_prompt(tok, ex.prompt) for ex in rows for _ in range(samples)])
            start = ids.shape[1]
            for _ in range(max_new):
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1, :]
                nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
                ids = torch.cat([ids, nxt], dim=1)
            out = ids[:, start:].tolist()
            for k, ex in enumerate(rows):
                completions[ex.prompt] = [
                    decode_completion(tok, r).strip() for r in out[k * samples : (k + 1) * samples]
                ]
    rng = random.Random(seed)
    prompts, a, b, clean = [], [], [], []
    for ex in examples:
        texts = completions[ex.prompt]
        if ex.answer not in texts:
            continue
        for wrong in sorted({t for t in texts if t != ex.answer and t}):
            first = rng.random() < 0.5
            prompts.append(ex.prompt)
            a.append(ex.answer if first else wrong)
            b.append(wrong if first else ex.answer)
            clean.append(float(first))
    label = np.array(clean)
    return PreferenceData(prompts, a, b, label, label.copy(), ["policy"] * len(prompts))


DEGENERATE = ("string", "7-digit", "empty", "=+=+=", "leading-0", "1-digit")


def degenerate_pairs(examples: list[Example], seed: int) -> PreferenceData:
    """(correct, degenerate) pairs, one family per prompt in turn, random order."""
    rng = random.Random(seed)
    makers = {
        "string": lambda ans: "".join(rng.choice("0123456789+=") for _ in range(rng.randint(3, 9))),
        "7-digit": lambda ans: str(rng.randrange(10**6, 10**7)),
        "empty": lambda ans: "",
        "=+=+=": lambda ans: "=+=+=",
        "leading-0": lambda ans: "0" + ans,
        "1-digit": lambda ans: str(rng.randrange(10)),
    }
    prompts, a, b, clean, kinds = [], [], [], [], []
    for i, ex in enumerate(examples):
        kind = DEGENERATE[i % len(DEGENERATE)]
        wrong = makers[kind](ex.answer)
        if wrong.strip() == ex.answer:
            continue
        first = rng.random() < 0.5
        prompts.append(ex.prompt)
        a.append(ex.answer if first else wrong)
        b.append(wrong if first else ex.answer)
        clean.append(float(first))
        kinds.append(kind)
    label = np.array(clean)
    return PreferenceData(prompts, a, b, label, label.copy(), kinds)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y + 1e-9 * np.arange(len(y))))
    return float(np.corrcoef(rx, ry)[0, 1])


def decile_table(key: np.ndarray, correct: np.ndarray, u: np.ndarray) -> list[dict]:
    order = np.argsort(key, kind="stable")
    return [
        {
            "u_low": float(u[idx].min()),
            "u_high": float(u[idx].max()),
            "accuracy": float(correct[idx].mean()),
            "n": int(len(idx)),
        }
        for idx in np.array_split(order, 10)
    ]


def routing(
    s: np.ndarray, u: np.ndarray, u_gp: np.ndarray, correct: np.ndarray, budget: float, repeats: int, seed: int
) -> dict:
    """Accuracy after an oracle judge decides the routed pairs, per policy, at the same budget.
    ``uncertainty`` ranks by the predictive signal u (the router's default), ``variance`` by the
    GP's u_gp alone, ``null`` by u shuffled across pairs (a control: no gain expected)."""
    k = int(budget * len(s))
    out = {}
    for policy in ROUTING_POLICIES:
        draws = repeats if policy in ("random", "null") else 1
        accs = []
        for r in range(draws):
            rng = np.random.default_rng([seed, r])
            key_u = {"null": rng.permutation(u), "variance": u_gp}.get(policy, u)
            picked = select_pairs("uncertainty" if policy in ("null", "variance") else policy, key_u, s, k, rng)
            final = correct.copy()
            final[picked] = True  # the oracle judge is always right
            accs.append(final.mean())
        out[policy] = float(np.mean(accs))
    return out


def evaluate(model: PairwiseRewardModel, data: PreferenceData, budget: float, repeats: int, seed: int) -> dict:
    both = model.score_both_orders(data.prompts, data.a, data.b)
    s = antisymmetrize(both.logit_ij, both.logit_ji)
    u = rm_uncertainty("predictive", both.logit_ij, both.logit_ji, both.uncertainty)
    u_gp = both.uncertainty
    correct = np.sign(s) == np.where(data.clean_label > 0.5, 1.0, -1.0)
    kinds = {}
    for kind in sorted(set(data.kind)):
        sel = np.array(data.kind) == kind
        kinds[kind] = {
            "n": int(sel.sum()),
            "accuracy": float(correct[sel].mean()),
            "mean_u": float(u[sel].mean()),
            "mean_u_gp": float(u_gp[sel].mean()),
        }
    route = routing(s, u, u_gp, correct, budget, repeats, seed)
    return {
        "pairs": len(data),
        "accuracy": float(correct.mean()),
        "first_order_accuracy": pairwise_accuracy(both.logit_ij, data.clean_label),
        "position_bias": float(np.mean((both.logit_ij + both.logit_ji) / 2)),
        "deciles": decile_table(u, correct, u),
        "variance_deciles": decile_table(u_gp, correct, u_gp),
        "margin_deciles": decile_table(-np.abs(s), correct, u),
        "kinds": kinds,
        "spearman_u_correct": spearman(u, correct.astype(float)),
        "spearman_u_gp_correct": spearman(u_gp, correct.astype(float)),
        "routing": route,
        "judge_calls": int(budget * len(s)),
        "uncertainty_gain_points": 100 * (route["uncertainty"] - route["random"]),
    }


def print_set(name: str, r: dict, budget: float) -> None:
    print(
        f"\n== {name}: {r['pairs']} held-out pairs, accuracy {r['accuracy']:.3f} (first order only "
        f"{r['first_order_accuracy']:.3f}, mean position bias {r['position_bias']:+.3f})"
    )
    print("accuracy per decile (low -> high) of the predictive uncertainty u (the router's signal), of the GP's")
    print("u_gp = sqrt(1 + a var) alone, and per |s| decile (high margin -> low):")
    print(f"{'decile':>7}{'u range':>20}{'acc':>7}   {'u_gp range':>22}{'acc':>7}   {'acc by |s|':>10}")
    for q, (d, v, m) in enumerate(zip(r["deciles"], r["variance_deciles"], r["margin_deciles"])):
        print(
            f"{q + 1:>7}{d['u_low']:>10.4f}-{d['u_high']:<9.4f}{d['accuracy']:>7.3f}   "
            f"{v['u_low']:>11.6f}-{v['u_high']:<10.6f}{v['accuracy']:>7.3f}   {m['accuracy']:>10.3f}"
        )
    print(
        f"Spearman(u, right) = {r['spearman_u_correct']:+.3f}, Spearman(u_gp, right) = "
        f"{r['spearman_u_gp_correct']:+.3f}  (negative: accuracy falls as it rises)"
    )
    kinds = sorted(r["kinds"].items(), key=lambda kv: kv[1]["mean_u_gp"])
    print(
        "per kind, by mean u_gp: "
        + ", ".join(
            f"{k} {v['accuracy']:.2f} (n {v['n']}, mean u {v['mean_u']:.3f}, u_gp {v['mean_u_gp']:.5f})"
            for k, v in kinds
        )
    )
    print(
        f"routing at {budget:.0%} ({r['judge_calls']} oracle judge calls): "
        + ", ".join(f"{p} {a:.3f}" for p, a in r["routing"].items())
    )
    print(f"uncertainty - random: {r['uncertainty_gain_points']:+.2f} points")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = RewardModelConfig()
    ap.add_argument("--steps", type=int, default=defaults.steps, help="pairwise optimiser steps")
    ap.add_argument("--pointwise-steps", type=int, default=defaults.pointwise_steps)
    ap.add_argument("--negatives", type=int, default=defaults.negatives_per_prompt, help="mistakes per train prompt")
    ap.add_argument("--label-noise", type=float, default=defaults.label_noise)
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--eval-negatives", type=int, default=6, help="mistakes per held-out prompt")
    ap.add_argument("--policy-samples", type=int, default=8, help="policy samples per held-out prompt")
    ap.add_argument("--no-policy", action="store_true", help="skip the policy-sample evaluation")
    ap.add_argument("--budget", type=float, default=0.2, help="judge calls as a fraction of the pairs")
    ap.add_argument("--repeats", type=int, default=50, help="draws averaged for random and null routing")
    ap.add_argument("--save", type=Path, default=None, help="save the trained pairwise model here")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)

    cfg = RewardModelConfig(
        steps=args.steps,
        pointwise_steps=args.pointwise_steps,
        negatives_per_prompt=args.negatives,
        label_noise=args.label_noise,
        seed=args.seed,
    )
    task = load_task(TaskConfig())
    held_out = task.val + task.eval
    train = preference_data(task.train, cfg.negatives_per_prompt, cfg.label_noise, cfg.seed)
    synthetic = preference_data(held_out, args.eval_negatives, 0.0, cfg.seed + 1)

    t0 = time.perf_counter()
    model, pair_report = train_pairwise(cfg, train)
    pair_seconds = time.perf_counter() - t0
    report: dict = {
        "config": {**vars(args), "save": str(args.save), "json": str(args.json)},
        "train": {
            "pairs": len(train),
            "label_agreement": float(np.mean(train.label == train.clean_label)),
            "pairwise_steps": cfg.steps,
            "pairwise_seconds": round(pair_seconds, 1),
        },
    }
    if args.save is not None:
        model.save(args.save)
    if cfg.pointwise_steps > 0:
        t0 = time.perf_counter()
        pointwise, _ = train_pointwise(cfg, train)
        report["train"]["pointwise_seconds"] = round(time.perf_counter() - t0, 1)
        sa, sb = pointwise.score(synthetic.prompts, synthetic.a), pointwise.score(synthetic.prompts, synthetic.b)
        report["pointwise_synthetic_accuracy"] = pairwise_accuracy(sa - sb, synthetic.clean_label)

    sets = {"synthetic": synthetic, "degenerate": degenerate_pairs(held_out, cfg.seed + 3)}
    if not args.no_policy:
        sets["policy"] = policy_pairs(held_out, args.policy_samples, cfg.seed + 2)
    for name, data in sets.items():
        report[name] = evaluate(model, data, args.budget, args.repeats, cfg.seed)

    tr = report["train"]
    print(
        f"trained on {tr['pairs']} pairs ({tr['label_agreement']:.1%} of labels right after noise): pairwise "
        f"{tr['pairwise_steps']} steps in {tr['pairwise_seconds']} s"
        + (
            f", pointwise {cfg.pointwise_steps} steps in {tr['pointwise_seconds']} s (held-out synthetic pairwise "
            f"accuracy {report['pointwise_synthetic_accuracy']:.3f})"
            if cfg.pointwise_steps > 0
            else ""
        )
    )
    for name in sets:
        print_set(name, report[name], args.budget)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""CLI of the rlsys cluster simulator: a sweep of modes × cluster sizes, and published anchors.

    .venv/bin/python -m benchmarks.sim.run                       # default sweep + anchors
    .venv/bin/python -m benchmarks.sim.run --gpus 64 --modes sync,partial --json out.json
    .venv/bin/python -m benchmarks.sim.run --calibration cpu     # or a path to a calibration JSON

Every figure comes from ``model.simulate``; this module only builds scenarios and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a file: python benchmarks/sim/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.sim.cost import Calibration, load_calibration
from benchmarks.sim.model import ALL_MODES, JudgeModel, LengthModel, Scenario, SimResult, mode_scenario, simulate

DEFAULT_GPUS = (8, 16, 64, 256, 1024)
DEFAULT_MODES = ("sync", "async", "partial")
DEFAULT_STALENESS = 4
DEFAULT_CHUNK = 1024
DEFAULT_PROMPTS_PER_GPU = 4
ROW_KEYS = (
    "mode",
    "gpus",
    "samples_per_s",
    "tokens_per_s",
    "rollout_util",
    "learner_util",
    "gpu_util",
    "mean_staleness",
    "dropped_stale",
    "speedup_vs_sync",
)


@dataclasses.dataclass(frozen=True)
class Anchor:
    """A published asynchronous speed-up and a scenario that resembles its setup."""

    name: str
    published: str
    """The published figure, as printed."""
    published_range: tuple
    calibration: str
    scenario: Scenario
    mode: str
    staleness: int
    chunk_tokens: int
    baselines: tuple
    """Synchronous modes the speed-up is computed against."""
    setup: str
    baseline_learner_cost_factor: float = 1.0
    """If not 1: also compare against the colocated baseline with its learner cost scaled by
    this (what the publication's own baseline measured)."""


def anchors() -> list[Anchor]:
    """AReaL (arXiv 2505.24298) and verl's fully-async recipe, as far as their setups are public.

    AReaL: R1-Distill-Qwen models (1.5B/7B/32B), 32k context (31k generation, 1k prompt), 512
    prompts × 16 answers, max_head_offpolicyness 4, interruptible generation, 3/4 of the GPUs for
    SGLang (TP 1 below 32B) and 1/4 for training, H800, 4–32 nodes (AReaL's benchmark/ folder:
    build_cmd.py, README.md). verl fully_async_policy: Qwen2.5-Math-7B, DAPO, max response 28k,
    512 prompts × 16, H20, 128 GPUs split 64:64, staleness_threshold 0.5, partial_rollout on,
    against colocated synchronous training on the same 128 GPUs (verl docs/advance/fully_async.md).
    """
    areal = Scenario(
        gpus=128,
        rollout_fraction=0.75,
        prompts_per_step=512,
        samples_per_prompt=16,
        lengths=LengthModel(median_tokens=6000, sigma=0.8, prompt_sigma=0.5, max_new_tokens=31744, prompt_tokens=1024),
        steps=12,
        warmup_steps=5,
    )
    verl = Scenario(
        gpus=128,
        rollout_gpus=64,
        prompts_per_step=512,
        samples_per_prompt=16,
        lengths=LengthModel(median_tokens=700, sigma=1.0, prompt_sigma=0.5, max_new_tokens=28672, prompt_tokens=256),
        steps=12,
        warmup_steps=3,
    )
    # verl's table: colocated 128 GPUs spend 54 s (old_log_prob) + 114 s (update_actor) per step; the
    # fully-async trainer (no old_log_prob, dedicated GPUs) 113 s on 64 GPUs for the same batch.
    verl_colocated_factor = (54 + 114) * 128 / (113 * 64)
    return [
        Anchor(
            "AReaL",
            "2.77x",
            (2.77, 2.77),
            "h100-7b",
            areal,
            "partial",
            4,
            512,
            ("sync", "colocated"),
            "7B, 128 GPUs 96:32, 512x16, <=31k tokens, eta=4, interruptible (chunk 512)",
        ),
        Anchor(
            "verl fully-async",
            "2.35-2.67x",
            (2.35, 2.67),
            "h20-7b",
            verl,
            "partial",
            1,
            512,
            ("colocated", "sync"),
            "7B on H20, 128 GPUs 64:64, 512x16, <=28k tokens, eta=1, partial",
            baseline_learner_cost_factor=verl_colocated_factor,
        ),
    ]


def result_row(mode: str, r: SimResult) -> dict:
    return {
        "mode": mode,
        "gpus": r.gpus,
        "samples_per_s": r.samples_per_s,
        "tokens_per_s": r.tokens_per_s,
        "rollout_util": r.rollout_util,
        "learner_util": r.learner_util,
        "gpu_util": r.gpu_util,
        "mean_staleness": r.mean_staleness,
        "dropped_stale": r.dropped_stale,
        "speedup_vs_sync": None,
        "rollout_gpus": r.rollout_gpus,
        "learner_gpus": r.learner_gpus,
        "step_s": r.step_s_mean,
        "sync_wait_s": r.sync_s_mean,
        "staleness_violations": r.staleness_violations,
    }


def sweep(
    sizes: Sequence[int],
    modes: Sequence[str],
    base: Callable[[int], Scenario],
    cal: Calibration,
    staleness: int,
    chunk: int,
    progress: Optional[Callable[[str], None]] = None,
) -> list[dict]:
    """One row per (cluster size, mode); speedup_vs_sync is against the sync row of that size."""
    rows = []
    for g in sizes:
        size_rows = {}
        for mode in modes:
            t0 = time.perf_counter()
            r = simulate(mode_scenario(base(g), mode, staleness, chunk), cal)
            size_rows[mode] = result_row(mode, r)
            if progress:
                progress(f"{g} GPUs {mode}: {time.perf_counter() - t0:.1f}s")
        sync = size_rows.get("sync")
        for row in size_rows.values():
            row["speedup_vs_sync"] = row["samples_per_s"] / sync["samples_per_s"] if sync else None
        rows.extend(size_rows.values())
    return rows


def run_anchor(a: Anchor, cal_override: Optional[Calibration] = None) -> dict:
    cal = cal_override or load_calibration(a.calibration)
    res = {m: simulate(mode_scenario(a.scenario, m, a.staleness, a.chunk_tokens), cal) for m in (a.mode, *a.baselines)}
    if a.baseline_learner_cost_factor != 1.0:
        costly = dataclasses.replace(a.scenario, learner_cost_factor=a.baseline_learner_cost_factor)
        res[f"colocated x{a.baseline_learner_cost_factor:.2f} learner cost"] = simulate(
            mode_scenario(costly, "colocated"), cal
        )
    async_ = res[a.mode]
    return {
        "anchor": a.name,
        "published": a.published,
        "published_range": list(a.published_range),
        "setup": a.setup,
        "calibration": cal.name,
        "mode": a.mode,
        "samples_per_s": async_.samples_per_s,
        "gpu_util": async_.gpu_util,
        "mean_staleness": async_.mean_staleness,
        "dropped_stale": async_.dropped_stale,
        "speedup_vs": {b: async_.samples_per_s / r.samples_per_s for b, r in res.items() if b != a.mode},
        "baseline_gpu_util": {b: r.gpu_util for b, r in res.items() if b != a.mode},
    }


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'mode':<9} {'gpus':>5} {'R:L':>9} {'samples/s':>10} {'tokens/s':>11} {'roll.util':>9} "
        f"{'learn.util':>10} {'gpu.util':>8} {'staleness':>9} {'dropped':>7} {'step s':>7} {'sync s':>7} "
        f"{'speedup':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        sp = "" if r["speedup_vs_sync"] is None else f"{r['speedup_vs_sync']:.2f}x"
        split = "shared" if r["mode"] == "colocated" else f"{r['rollout_gpus']}:{r['learner_gpus']}"
        lines.append(
            f"{r['mode']:<9} {r['gpus']:>5} {split:>9} {r['samples_per_s']:>10.2f} "
            f"{r['tokens_per_s']:>11,.0f} "
            f"{r['rollout_util']:>9.2f} {r['learner_util']:>10.2f} {r['gpu_util']:>8.2f} "
            f"{r['mean_staleness']:>9.2f} {r['dropped_stale']:>7d} {r['step_s']:>7.0f} "
            f"{r['sync_wait_s']:>7.1f} {sp:>7}"
        )
    return "\n".join(lines)


def format_anchors(rows: list[dict]) -> str:
    lines = []
    for a in rows:
        vs = ", ".join(f"{s:.2f}x vs {b}" for b, s in a["speedup_vs"].items())
        lines.append(
            f"{a['anchor']:<17} published {a['published']:<11} simulated {vs}   [{a['setup']}; "
            f"calibration {a['calibration']}; staleness {a['mean_staleness']:.2f}, "
            f"dropped {a['dropped_stale']}]"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    sc, ln, jm = Scenario(), LengthModel(), JudgeModel()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sim.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--gpus", default=",".join(map(str, DEFAULT_GPUS)), help="cluster sizes, comma-separated")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, of {', '.join(ALL_MODES)}")
    p.add_argument("--staleness", type=int, default=DEFAULT_STALENESS, help="max_staleness of async and partial")
    p.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK, help="partial_chunk_tokens of partial mode")
    p.add_argument("--carry-fraction", type=float, default=sc.partial_carry_fraction, help="partial_carry_fraction")
    p.add_argument("--rollout-fraction", type=float, default=sc.rollout_fraction, help="share of GPUs for rollout")
    p.add_argument("--rollout-gpus", type=int, default=0, help="explicit rollout GPUs (overrides the fraction)")
    p.add_argument(
        "--prompts-per-gpu",
        type=float,
        default=DEFAULT_PROMPTS_PER_GPU,
        help="prompts per step M = this x GPUs (weak scaling)",
    )
    p.add_argument("--prompts-per-step", type=int, default=0, help="fixed M for every size (overrides per-GPU)")
    p.add_argument("--samples-per-prompt", type=int, default=sc.samples_per_prompt, help="group size n")
    p.add_argument("--strategy", default=sc.strategy, help="scheduler.strategy: uniform, knapsack or dapo")
    p.add_argument("--transport", default=sc.transport, help="weight publication: nccl or independent")
    p.add_argument("--steps", type=int, default=12, help="learner steps simulated")
    p.add_argument("--warmup-steps", type=int, default=4, help="steps left out of the measured window")
    p.add_argument("--length-dist", default=ln.dist, help="lognormal or pareto")
    p.add_argument("--length-median", type=float, default=ln.median_tokens, help="median response tokens")
    p.add_argument("--length-sigma", type=float, default=ln.sigma, help="lognormal shape")
    p.add_argument("--prompt-sigma", type=float, default=ln.prompt_sigma, help="spread of per-prompt length scales")
    p.add_argument("--pareto-alpha", type=float, default=ln.pareto_alpha, help="Pareto tail index")
    p.add_argument("--max-new-tokens", type=int, default=ln.max_new_tokens, help="length cap")
    p.add_argument("--prompt-tokens", type=int, default=ln.prompt_tokens, help="prompt length")
    p.add_argument(
        "--judge-fraction",
        type=float,
        default=jm.budget_fraction,
        help="reward.router.budget_fraction (0 = no LLM judge)",
    )
    p.add_argument("--judge-latency", type=float, default=jm.latency_median_s, help="median judge call seconds")
    p.add_argument("--judge-concurrency", type=int, default=jm.concurrency, help="judge.concurrency")
    p.add_argument("--judge-max-pairs", type=int, default=jm.max_pairs_per_step, help="judge.max_pairs_per_step")
    p.add_argument(
        "--calibration",
        default=None,
        help="a name in benchmarks/sim/calibration.json (h100-7b, h20-7b, cpu) or a JSON path "
        "(default: the file's default)",
    )
    p.add_argument("--seed", type=int, default=sc.seed)
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    p.add_argument("--no-anchors", action="store_true", help="skip the AReaL / verl anchor scenarios")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:  # a bad option or calibration: say which, no traceback
        raise SystemExit(f"error: {e}") from None


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("rlsys").setLevel(logging.ERROR)  # one warning per dropped group is noise here
    sizes = [int(x) for x in args.gpus.split(",") if x]
    modes = [m for m in args.modes.split(",") if m]
    bad = sorted(set(modes) - set(ALL_MODES))
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; choose from {', '.join(ALL_MODES)}")
    cal = load_calibration(args.calibration)
    lengths = LengthModel(
        dist=args.length_dist,
        median_tokens=args.length_median,
        sigma=args.length_sigma,
        prompt_sigma=args.prompt_sigma,
        pareto_alpha=args.pareto_alpha,
        max_new_tokens=args.max_new_tokens,
        prompt_tokens=args.prompt_tokens,
    )
    judge = JudgeModel(
        budget_fraction=args.judge_fraction,
        latency_median_s=args.judge_latency,
        concurrency=args.judge_concurrency,
        max_pairs_per_step=args.judge_max_pairs,
    )

    def base(g: int) -> Scenario:
        m = args.prompts_per_step or max(1, int(round(args.prompts_per_gpu * g)))
        return Scenario(
            gpus=g,
            rollout_gpus=args.rollout_gpus,
            rollout_fraction=args.rollout_fraction,
            prompts_per_step=m,
            samples_per_prompt=args.samples_per_prompt,
            strategy=args.strategy,
            partial_carry_fraction=args.carry_fraction,
            transport=args.transport,
            steps=args.steps,
            warmup_steps=args.warmup_steps,
            lengths=lengths,
            judge=judge,
            seed=args.seed,
        )

    base(sizes[0])  # validate the options before printing anything
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    print(f"calibration: {cal.name} ({cal.comments.split('. ')[0]})")
    print(
        f"scenario: M = {args.prompts_per_step or f'{args.prompts_per_gpu:g} x GPUs'} prompts x "
        f"n = {args.samples_per_prompt}, {args.strategy}; lengths {lengths.dist} median {lengths.median_tokens:g} "
        f"(sigma {lengths.sigma:g}, per-prompt {lengths.prompt_sigma:g}), cap {lengths.max_new_tokens}; "
        f"async/partial staleness {args.staleness}, partial chunk {args.chunk_tokens} tokens, "
        f"{args.steps} steps ({args.warmup_steps} warm-up), transport {args.transport}, seed {args.seed}"
    )
    rows = sweep(sizes, modes, base, cal, args.staleness, args.chunk_tokens, progress)
    print(format_table(rows))
    anchor_rows = []
    if not args.no_anchors:
        for a in anchors():
            anchor_rows.append(run_anchor(a))
            if progress:
                progress(f"anchor {a.name} done")
        print("\nPublished anchors (asynchronous speed-up at equal GPUs):")
        print(format_anchors(anchor_rows))
    print(f"\n(simulated in {time.perf_counter() - t0:.0f}s)")
    if args.json:
        out = {"calibration": cal.to_dict(), "settings": vars(args), "results": rows, "anchors": anchor_rows}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

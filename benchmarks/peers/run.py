#!/usr/bin/env python
"""rlsys against TRL's GRPOTrainer on the same work, side by side, in one run.

Both systems get the same model directory, tokenizer, task and prompts, group size, learning
rate, completion length and rollout budget (prompts per step x group size x steps), and are
evaluated the same way (greedy exact match on the held-out split every ``eval_every`` steps,
evaluation time not counted as training time). Each system runs in its own process (TRL in
its own virtualenv, ``benchmarks/peers/setup_trl.sh``), repetitions interleaved so that a noisy
minute hurts both; the harness samples the proportional set size (PSS) of each system's whole
process tree (for rlsys: the driver, Ray's daemons and every actor) for peak memory.

    .venv/bin/python benchmarks/peers/run.py --scale tiny --reps 3 --json runs/peers-tiny.json
    .venv/bin/python benchmarks/peers/run.py --scale genheavy --reps 3 --json runs/peers-gen.json
    .venv/bin/python benchmarks/peers/run.py --scale tiny --systems rlsys --staleness 0,1,2,4
    .venv/bin/python benchmarks/peers/run.py --scale tiny --systems rlsys,rlsys@learner.loss.tis_cap=0,trl

Prints one table per scale: each system's median [min-max] over repetitions, and the ratio
rlsys / TRL (per repetition pair, then median [min-max]); beside it, where each system's
step time goes. ``--staleness`` runs rlsys once per max_staleness setting instead (async
versus synchronous). JSON keys: ``scale``, ``reps``, ``spec``, ``runs`` (every result),
``summary`` (per system: median and spread of samples_per_s, tokens_per_s, peak_pss_mb,
final_accuracy, late_accuracy (the mean of the evaluations in the last quarter of the
steps), time_to_<target>), ``ratios`` (each system / TRL of the same, or / the first
system when TRL is not in the run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"

SCALES = {
    # The built-in task and model: ~1M parameters, answers of 3-4 tokens (+ eos).
    "tiny": {
        "experiment": "tiny",
        "steps": 200,
        "max_train_seconds": 0,
        "eval_every": 20,
        "prompts_per_step": 16,
        "group_size": 8,
        "max_new_tokens": 6,
        "lr": 1e-4,
        "targets": [0.3, 0.4, 0.5],
    },
    # ~20M parameters, completions of 125-246 tokens (the counting scratchpad).
    "genheavy": {
        "experiment": "genheavy",
        "steps": 10,
        "max_train_seconds": 0,
        "eval_every": 5,
        "prompts_per_step": 8,
        "group_size": 8,
        "max_new_tokens": 256,
        "lr": 2e-5,
        "targets": [],
    },
}
METRICS = ("samples_per_s", "tokens_per_s", "peak_pss_mb", "final_accuracy")


def build_spec(scale: str, steps: int | None, seed: int) -> dict:
    """The spec both systems run: the experiment's model (built here if missing) and task."""
    from rlsys.config import compose, to_run_config
    from rlsys.tasks.models import ensure_model

    s = dict(SCALES[scale])
    cfg = to_run_config(compose([f"experiment={s['experiment']}"]))
    task = asdict(cfg.task)
    s.update(model_path=str(ensure_model(cfg.model, cfg.task)), task=task, seed=seed, reward=cfg.reward.function)
    if steps is not None:
        s["steps"] = steps
    return s


class TreeMemory:
    """Peak PSS (MB) of a process and all its descendants, sampled every ``period`` seconds.
    PSS shares a page between the processes that map it, so shared libraries are not counted
    once per actor as a sum of RSS would."""

    def __init__(self, pid: int, period: float = 1.0):
        import psutil

        self._root, self._period, self.peak_mb = psutil.Process(pid), period, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self._period):
            total = 0
            try:
                procs = [self._root, *self._root.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    pass  # exited between the listing and the read
            self.peak_mb = max(self.peak_mb, total / 2**20)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def run_system(system: str, spec: dict, workdir: Path, log) -> dict:
    """One run of ``system`` on ``spec`` in a fresh process; the result dict plus peak_pss_mb."""
    spec_path, out_path = workdir / f"{system}-spec.json", workdir / f"{system}-result.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    if system == "trl":
        if not TRL_PYTHON.exists():
            raise SystemExit(f"{TRL_PYTHON} is missing: run `bash benchmarks/peers/setup_trl.sh` first")
        cmd = [str(TRL_PYTHON), str(HERE / "trl_run.py")]
        env["PYTHONPATH"] = str(ROOT)  # rlsys.tasks.arithmetic: the same prompts and verifier
    else:
        cmd = [sys.executable, str(HERE / "rlsys_run.py")]
    cmd += ["--spec", str(spec_path), "--out", str(out_path)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    mem = TreeMemory(proc.pid)
    rc = proc.wait()
    peak = mem.stop()
    if rc != 0:
        raise RuntimeError(f"{system} run failed (exit {rc}); see {log.name}")
    result = json.loads(out_path.read_text())
    result.update(peak_pss_mb=peak, process_seconds=time.perf_counter() - t0)
    return result


def variant(name: str) -> tuple[str, list[str]]:
    """(system, extra rlsys overrides) of a --systems name: trl, rlsys (the experiment as
    configured: synchronous) or rlsys_s<k> (rlsys at replay.max_staleness=k). With k >= 1
    generation and training overlap, so each actor keeps its default thread count (one per
    reserved CPU) instead of the experiment's torch_threads, which are sized for alternating
    phases. Either rlsys name may carry Hydra overrides of its own after ``@``, so that one run
    compares settings side by side: ``rlsys@learner.loss.tis_cap=0@learner.lr=2e-4``."""
    base, *own = name.split("@")
    if any("=" not in o for o in own):
        raise SystemExit(f"system {name!r}: each part after '@' must be a Hydra override key=value")
    if own and not base.startswith("rlsys"):
        raise SystemExit(f"system {name!r}: only rlsys takes overrides after '@'")
    if base in ("trl", "rlsys"):
        return base, own
    if base.startswith("rlsys_s") and base[7:].isdigit():
        k = int(base[7:])
        threads = ["rollout.torch_threads=0", "learner.torch_threads=0"] if k else []
        return "rlsys", [f"replay.max_staleness={k}", *threads, *own]
    raise SystemExit(
        f"unknown system {name!r}: use trl, rlsys or rlsys_s<k> (max_staleness k), "
        "rlsys ones optionally followed by @key=value overrides"
    )


def time_to(result: dict, target: float) -> float | None:
    """Training seconds at the first evaluation with accuracy >= target (None: not reached)."""
    for point in result["curve"]:
        if point["eval_accuracy"] >= target:
            return point["train_seconds"]
    return None


def late_accuracy(result: dict, last: float = 0.25) -> float:
    """Mean held-out accuracy over the evaluations in the last ``last`` of the steps (after
    step 0). One evaluation of 200 prompts moves by +-0.05 from one to the next (binomial sd
    0.035 at 0.5), so a single final value compares systems noisily; the tiny scale averages
    its last 3 (steps 160-200)."""
    steps = max(p["step"] for p in result["curve"])
    late = [p["eval_accuracy"] for p in result["curve"] if p["step"] > 0 and p["step"] >= (1 - last) * steps]
    return statistics.mean(late) if late else result["final_accuracy"]


def spread(values: list) -> dict:
    """Median and range of the values that exist; ``n`` says how many did."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def figures(result: dict, targets: list[float]) -> dict:
    out = {k: result[k] for k in METRICS}
    out["late_accuracy"] = late_accuracy(result)
    for t in targets:
        out[f"time_to_{t}"] = time_to(result, t)
    return out


def fmt(s: dict, digits: int = 2) -> str:
    if s["median"] is None:
        return "not reached"
    text = f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"
    return text if s["n"] == s.get("of", s["n"]) else f"{text} ({s['n']}/{s['of']})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="override the scale's step count")
    ap.add_argument(
        "--systems",
        default="rlsys,trl",
        help="comma list of trl, rlsys, rlsys_s<k>; rlsys ones may add @key=value overrides",
    )
    ap.add_argument(
        "--staleness",
        default=None,
        help="comma list of max_staleness settings: run rlsys once per setting (async vs sync)",
    )
    ap.add_argument("--rlsys-override", action="append", default=[], help="extra Hydra override for rlsys")
    ap.add_argument(
        "--trl-threads",
        type=int,
        default=os.cpu_count(),
        help="torch threads of the TRL process (default: every core, as a plain TRL run uses)",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--logdir", type=Path, default=None, help="keep each run's output here (default: a temp dir)")
    args = ap.parse_args()

    names = (
        [f"rlsys_s{k}" for k in args.staleness.split(",")] if args.staleness is not None else args.systems.split(",")
    )
    variants = {name: variant(name) for name in names}
    targets = SCALES[args.scale]["targets"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    spec0 = None
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        logdir = args.logdir or Path(tmp)
        logdir.mkdir(parents=True, exist_ok=True)
        for rep in range(args.reps):
            spec = build_spec(args.scale, args.steps, seed=rep)
            spec0 = spec0 or spec
            for name, (system, extra) in variants.items():
                spec_v = dict(spec, rlsys_overrides=[*args.rlsys_override, *extra], threads=args.trl_threads)
                with open(logdir / f"{name}-rep{rep}.log", "w") as log:
                    result = run_system(system, spec_v, Path(tmp), log)
                runs[name].append(result)
                print(
                    f"  rep {rep} {name:10s} {result['samples_per_s']:8.1f} samples/s "
                    f"{result['tokens_per_s']:9.0f} tokens/s  acc {result['initial_accuracy']:.3f} -> "
                    f"{result['final_accuracy']:.3f}  peak {result['peak_pss_mb']:.0f} MB  "
                    f"({result['process_seconds']:.0f} s)",
                    flush=True,
                )

    summary = {}
    for name, rs in runs.items():
        fs = [figures(r, targets) for r in rs]
        summary[name] = {k: spread([f[k] for f in fs]) | {"of": len(fs)} for k in fs[0]}
    ratios = {}
    base = "trl" if "trl" in runs else names[0]
    if len(runs) > 1:
        for name in runs:
            if name == base:
                continue
            per_rep = [(figures(a, targets), figures(b, targets)) for a, b in zip(runs[name], runs[base])]
            ratios[name] = {
                k: spread([x[k] / y[k] if x[k] is not None and y[k] else None for x, y in per_rep])
                | {"of": len(per_rep)}
                for k in per_rep[0][0]
            }

    print(
        f"\npeers: {args.scale} scale, {spec0['steps']} steps x {spec0['prompts_per_step']} prompts x "
        f"{spec0['group_size']} completions, {args.reps} repetitions; median [min-max]\n"
    )
    keys = list(next(iter(summary.values())))
    cols = [(n, summary[n]) for n in summary] + [(f"{n} / {base}", ratios[n]) for n in ratios]
    widths = [max(30, len(title) + 2) for title, _ in cols]
    hdr = f"{'':24s}" + "".join(f"{title:>{w}s}" for (title, _), w in zip(cols, widths))
    print(hdr)
    print("-" * len(hdr))
    for k in keys:
        print(f"{k:24s}" + "".join(f"{fmt(col[k]):>{w}s}" for (_, col), w in zip(cols, widths)))
    print(
        "\nwhere the step time goes (share of training wall time, median over repetitions;"
        " rlsys shares overlap when max_staleness >= 1)"
    )
    for name, rs in runs.items():
        parts = sorted(rs[0]["profile"])
        print(f"  {name:10s} " + "  ".join(f"{p} {statistics.median(r['profile'][p] for r in rs):.2f}" for p in parts))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "scale": args.scale,
                    "reps": args.reps,
                    "spec": spec0,
                    "runs": runs,
                    "summary": summary,
                    "ratios": ratios,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Soak benchmark: the tiny experiment for a set time with random fault injection (not in CI).

    .venv/bin/python scripts/soak.py --minutes 30 --json runs/soak.json

Runs the embedded tiny experiment on the Redis replay store (a private redis-server on a free
loopback port, password-protected, AOF with appendfsync always) with 2 rollout workers, 2 reward
workers, max_staleness 1 and a checkpoint every 20 steps. Every ``--fault-every`` seconds on
average (exponential gaps, seeded) it injects one fault, chosen uniformly from:

    kill_rollout, hang_rollout, kill_reward, hang_reward, kill_learner, nan_learner, kill_redis

(``hang_*`` arm ``inject_fault('hang')`` on the actor: its next call never returns, so the
controller's deadline must find it; ``nan_learner`` poisons a rank's weights; ``kill_redis`` is
SIGKILL with a restart 2 s later.) It scrapes every actor's Prometheus endpoint once a minute
for its resident memory.

Prints, and with ``--json`` writes: faults injected per kind, worker/learner restarts, the
accounting (produced = trained + skipped(non-finite) + dropped(stale) + rejected + held; lost =
the difference; groups trained twice), throughput, and memory per role (first and last sample of
each actor process, growth per hour of the longest-lived one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import TEST_REDIS_PASSWORD, RedisServer, record_store_calls  # noqa: E402  (tests' server helper)

from rlsys.config import compose, to_run_config  # noqa: E402
from rlsys.controller.loop import Controller  # noqa: E402

log = logging.getLogger("soak")

FAULTS = ("kill_rollout", "hang_rollout", "kill_reward", "hang_reward", "kill_learner", "nan_learner", "kill_redis")


class Injector(threading.Thread):
    """Random faults into a running Controller, from a side thread (Ray calls are thread-safe)."""

    def __init__(
        self, ctl: Controller, redis: RedisServer, mean_gap_s: float, seed: int, warmup_s: float, until_s: float
    ):
        super().__init__(daemon=True, name="fault-injector")
        self.ctl, self.redis, self.mean_gap_s, self.warmup_s = ctl, redis, mean_gap_s, warmup_s
        self.until_s = until_s  # faults stop here (training ends a little later; then the final eval)
        self.rng = random.Random(seed)
        self.injected: Counter = Counter()
        self.events: list[tuple[float, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        import ray

        t0 = time.time()
        if self.stop.wait(self.warmup_s):
            return
        while not self.stop.wait(self.rng.expovariate(1.0 / self.mean_gap_s)):
            if time.time() - t0 > self.until_s:
                return
            if self.ctl.recovery.restarts.in_progress():  # let a replacement finish first
                continue
            kind = self.rng.choice(FAULTS)
            try:
                if kind == "kill_rollout":
                    ray.kill(self.rng.choice(list(self.ctl.fleet.rollout.values())))
                elif kind == "hang_rollout":
                    self.rng.choice(list(self.ctl.fleet.rollout.values())).inject_fault.remote("hang")
                elif kind == "kill_reward":
                    ray.kill(self.rng.choice(list(self.ctl.fleet.rewards)))
                elif kind == "hang_reward":
                    self.rng.choice(list(self.ctl.fleet.rewards)).inject_fault.remote("hang")
                elif kind == "kill_learner":
                    ray.kill(self.rng.choice(list(self.ctl.fleet.ranks)))
                elif kind == "nan_learner":
                    self.rng.choice(list(self.ctl.fleet.ranks)).inject_fault.remote("nan")
                elif kind == "kill_redis":
                    self.redis.kill()
                    time.sleep(2.0)
                    self.redis.start()
            except Exception as e:  # noqa: BLE001 - an injection that found nothing to hit is logged, not fatal
                log.warning("fault %s not injected: %s", kind, e)
                continue
            self.injected[kind] += 1
            self.events.append((round(time.time() - t0, 1), kind))
            log.warning("injected %s at %.0fs", kind, time.time() - t0)


class MemorySampler(threading.Thread):
    """Resident memory of every rlsys process, from their own Prometheus endpoints
    (``rlsys_<role>_process_memory_bytes``)."""

    def __init__(self, targets: Path, every_s: float):
        super().__init__(daemon=True, name="memory-sampler")
        self.targets, self.every_s = targets, every_s
        self.samples: dict = defaultdict(list)  # (role, index, endpoint) -> [(t, bytes)]
        self.stop = threading.Event()

    def sample(self) -> None:
        try:
            doc = json.loads(self.targets.read_text())
        except (OSError, ValueError):
            return
        now = time.time()
        for entry in doc:
            ep, labels = entry["targets"][0], entry["labels"]
            try:
                text = urllib.request.urlopen(f"http://{ep}/metrics", timeout=5).read().decode()
            except OSError:
                continue  # a worker being replaced
            m = re.search(r"^rlsys_\w+_process_memory_bytes(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
            if m:
                self.samples[(labels["role"], labels["index"], ep)].append((now, float(m.group(1))))

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.sample()


def memory_table(samples: dict, t0: float, settle_s: float) -> dict:
    """Per role: the longest-lived process's memory from its first sample after ``settle_s`` (caches,
    allocator pools and the first weight versions fill up before that) to its last."""
    by_role: dict = defaultdict(list)
    for (role, index, ep), series in samples.items():
        settled = [s for s in series if s[0] - t0 >= settle_s]
        if len(settled) >= 2:
            by_role[role].append((settled, index))
    out = {}
    for role, lst in sorted(by_role.items()):
        series, index = max(lst, key=lambda s: s[0][-1][0] - s[0][0][0])  # the longest-lived process
        hours = max(series[-1][0] - series[0][0], 1.0) / 3600
        out[role] = {
            "processes": len(lst),
            "first_mb": round(series[0][1] / 2**20, 1),
            "last_mb": round(series[-1][1] / 2**20, 1),
            "observed_min": round(hours * 60, 1),
            "growth_mb_per_hour": round((series[-1][1] - series[0][1]) / 2**20 / hours, 1),
            "peak_mb_any_process": round(max(b for s, _ in lst for _, b in s) / 2**20, 1),
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--fault-every", type=float, default=45.0, help="mean seconds between faults")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before the first fault")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--run-dir", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_dir = args.run_dir or Path("runs") / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)

    os.environ["RLSYS_REDIS_PASSWORD"] = TEST_REDIS_PASSWORD  # the store reads it from here
    redis_dir = Path(tempfile.mkdtemp(prefix="rlsys-soak-redis-"))
    redis = RedisServer(redis_dir, appendonly=True, appendfsync="always").start()
    cfg = to_run_config(
        compose(
            [
                "steps=10000000",
                f"max_train_seconds={args.minutes * 60}",
                "replay=redis",
                f"replay.redis.url={redis.url}",
                f"replay.redis.run_id=soak{uuid.uuid4().hex[:8]}",
                "replay.max_staleness=1",
                "rollout.num_workers=2",
                "reward.num_workers=2",
                "scheduler.prompts_per_step=8",
                "rollout.prompts_per_call=4",
                "rollout.call_timeout_s=30",
                "reward.call_timeout_s=20",
                "cluster.num_cpus=4",
                "cluster.metrics_port=0",
                "cluster.max_worker_restarts=100000",
                "learner.max_restarts=100000",
                "learner.max_nonfinite_steps=3",
                "checkpoint.every_steps=20",
                "log_every=50",
                "report=false",
                "replay.redis.reconnect_timeout_s=120",
            ]
        )
    )
    ctl = Controller(cfg, run_dir)
    t_start = time.time()
    try:
        ctl.setup()
        # acked: every id acknowledged (trained, or consumed by a skipped non-finite step)
        batches, acked = record_store_calls(ctl.store)
        # Faults stop 60 s before training does, so the last recovery completes within the run.
        injector = Injector(ctl, redis, args.fault_every, args.seed, args.warmup, args.minutes * 60 - 60)
        memory = MemorySampler(run_dir / "prometheus_targets.json", every_s=60.0)
        injector.start()
        memory.start()
        memory.sample()
        summary = asyncio.run(ctl.run())
        injector.stop.set()
        memory.stop.set()
        injector.join(timeout=10)
    finally:
        ctl.shutdown()
        redis.stop()
    wall = time.time() - t_start

    settle_s = min(600.0, args.minutes * 60 / 3)
    r = summary["replay"]
    accounted = (
        summary["groups_trained"]
        + summary["skipped_nonfinite"]
        + r["dropped_stale"]
        + r["rejected"]
        + (r["held_at_end"] or 0)
    )
    # A crashed learner step's batch is redelivered (taken twice, trained once); trained twice
    # would be an id acknowledged twice.
    taken_twice = sum(n - 1 for n in Counter(g for b in batches for g in b).values() if n > 1)
    acked_twice = sum(n - 1 for n in Counter(acked).values() if n > 1)
    report = {
        "minutes": round(wall / 60, 1),
        "steps": summary["steps"],
        "samples_per_s": round(summary["samples_per_s"], 1),
        "faults_injected": dict(injector.injected),
        "fault_events": injector.events,
        "worker_restarts": summary["worker_restarts"],
        "learner_restarts": summary["learner_restarts"],
        "produced": r["put"],
        "trained": summary["groups_trained"],
        "skipped_nonfinite": summary["skipped_nonfinite"],
        "dropped_stale": r["dropped_stale"],
        "rejected": r["rejected"],
        "held_at_end": r["held_at_end"],
        "duplicates_dropped": r["duplicates"],
        "lost": r["put"] - accounted,
        "redelivered": taken_twice,
        "acked": len(acked),
        "trained_twice": acked_twice,
        "eval_accuracy_before": summary["eval_accuracy_before"],
        "eval_accuracy_after": summary["eval_accuracy_after"],
        "memory_settle_s": settle_s,
        "memory": memory_table(memory.samples, t_start, settle_s),
    }
    print(
        f"\nsoak: {report['minutes']} min, {report['steps']} steps, {report['samples_per_s']} samples/s, eval "
        f"{report['eval_accuracy_before']:.3f} -> {report['eval_accuracy_after']:.3f}"
    )
    print("faults injected:   " + ", ".join(f"{k} {v}" for k, v in sorted(report["faults_injected"].items())))
    print(f"restarts:          workers {report['worker_restarts']}, learner {report['learner_restarts']}")
    print(
        f"accounting:        produced {report['produced']} = trained {report['trained']} + skipped(non-finite) "
        f"{report['skipped_nonfinite']} + dropped(stale) {report['dropped_stale']} + rejected {report['rejected']} "
        f"+ held {report['held_at_end']}; lost {report['lost']}; trained twice {report['trained_twice']}"
    )
    print(f"memory per role (the longest-lived process, from {settle_s / 60:.0f} min on):")
    print(
        f"{'role':<12}{'processes':>10}{'first MB':>10}{'last MB':>10}{'observed min':>14}{'MB/hour':>10}"
        f"{'peak MB':>10}"
    )
    for role, m in report["memory"].items():
        print(
            f"{role:<12}{m['processes']:>10}{m['first_mb']:>10}{m['last_mb']:>10}{m['observed_min']:>14}"
            f"{m['growth_mb_per_hour']:>10}{m['peak_mb_any_process']:>10}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["lost"] == 0 and report["trained_twice"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Replay store throughput (in-process vs Redis) and what the store costs a training step.

1. Throughput: put / take / ack of realistic groups (default 16 completions x 512 tokens,
   ~70 KB encoded) through each backend, in batches (Redis pipelines each batch).
   Beside them, the transport floor: the same records, pre-encoded, through raw redis-py
   pipelines (XADD; XREADGROUP; XACK+XDEL) with no codec and no store logic: what Redis and
   its client can move on this machine at all, so the store is judged as a ratio to it.
2. Share of a step: the store operations of one tiny-experiment step (put, take and ack of
   16 groups x 8 completions), timed on Redis, divided by the step time of a short real
   tiny run with replay=redis in the same process.

    .venv/bin/python scripts/bench_replay.py [--groups 4000] [--batch 256] [--steps 30] [--json out.json]

Starts its own redis-server (AOF everysec, as in production) on a free loopback port, with a
throwaway password (requirepass, as the store requires) put in $RLSYS_REDIS_PASSWORD.
JSON keys: redis_groups_per_s, memory_groups_per_s, store_share_of_step,
redis_transport_floor_groups_per_s, redis_over_floor (+ details).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import TEST_REDIS_PASSWORD, RedisServer  # noqa: E402  (the tests' private-server helper)

from rlsys.records import Completion, Group  # noqa: E402
from rlsys.replay import make_store  # noqa: E402
from rlsys.replay.base import RedisConfig, ReplayConfig


def make_groups(n: int, completions: int, tokens: int, seed: int = 0, version: int = 0) -> list[Group]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        comps = [
            Completion(
                rng.integers(0, 32000, tokens, dtype=np.int32), -rng.random(tokens, dtype=np.float32), "x" * 64, "stop"
            )
            for _ in range(completions)
        ]
        out.append(
            Group(
                f"p{i}:{uuid.uuid4().hex[:12]}",
                f"p{i}",
                "prompt " * 20,
                tuple(range(64)),
                "42",
                version,
                comps,
                rewards=rng.random(completions, dtype=np.float32),
            )
        )
    return out


async def throughput(cfg: ReplayConfig, groups: list[Group], batch: int) -> dict:
    store = make_store(cfg, groups_per_step=len(groups), run_id=uuid.uuid4().hex[:8])
    await store.start()
    t_put = t_take = t_ack = 0.0
    await store.reserve(len(groups))
    for i in range(0, len(groups), batch):
        chunk = groups[i : i + batch]
        t0 = time.perf_counter()
        await store.put(chunk)
        t1 = time.perf_counter()
        got = await store.take(len(chunk))
        t2 = time.perf_counter()
        await store.ack([g.group_id for g in got])
        t3 = time.perf_counter()
        t_put, t_take, t_ack = t_put + t1 - t0, t_take + t2 - t1, t_ack + t3 - t2
    await store.close()
    n = len(groups)
    total = t_put + t_take + t_ack
    return {"groups_per_s": n / total, "put_per_s": n / t_put, "take_per_s": n / t_take, "ack_per_s": n / t_ack}


def main() -> int:
    import faulthandler

    faulthandler.dump_traceback_later(int(os.environ.get("RLSYS_BENCH_WATCHDOG_S", "0")) or 10**9, exit=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--completions", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30, help="steps of the tiny run for the step-share figure (0 skips)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from rlsys.replay.codec import encode_group

    groups = make_groups(args.groups, args.completions, args.tokens)
    record_kb = len(encode_group(groups[0])) / 1024
    with (
        tempfile.TemporaryDirectory(prefix="bench-redis-") as d,
        tempfile.TemporaryDirectory(prefix="bench-redis-noaof-") as d2,
    ):
        os.environ["RLSYS_REDIS_PASSWORD"] = TEST_REDIS_PASSWORD  # both servers require it; the store reads it here
        server = RedisServer(d, appendonly=True).start()
        plain = RedisServer(d2, appendonly=False).start()
        try:
            redis_cfg = ReplayConfig(backend="redis", redis=RedisConfig(url=server.url, block_ms=10))
            plain_cfg = ReplayConfig(backend="redis", redis=RedisConfig(url=plain.url, block_ms=10))
            mem = asyncio.run(throughput(ReplayConfig(), groups, args.batch))
            red = asyncio.run(throughput(redis_cfg, groups, args.batch))
            red_plain = asyncio.run(throughput(plain_cfg, groups, args.batch))
            record = encode_group(groups[0])
            floor = raw_transport(server.url, record, args.groups, args.batch)
            floor_plain = raw_transport(plain.url, record, args.groups, args.batch)
            c_floor = c_client_floor(server.port, len(record))
            c_floor_plain = c_client_floor(plain.port, len(record))
            per_step_ops = asyncio.run(_ops_per_step(redis_cfg, reps=50))
            step_s = None
            if args.steps:
                step_s = _tiny_step_seconds(server.url, args.steps)
        finally:
            server.stop()
            plain.stop()

    share = per_step_ops / step_s if step_s else None
    print(
        f"\nbench_replay: {args.groups} groups of {args.completions} x {args.tokens} tokens "
        f"({record_kb:.0f} KB encoded), batches of {args.batch}\n"
    )
    print(f"{'backend':12s} {'groups/s':>10s} {'put/s':>10s} {'take/s':>10s} {'ack/s':>10s} {'x memory':>9s}")
    for name, r in (("memory", mem), ("redis", red), ("redis-noaof", red_plain)):
        print(
            f"{name:12s} {r['groups_per_s']:10.0f} {r['put_per_s']:10.0f} {r['take_per_s']:10.0f} "
            f"{r['ack_per_s']:10.0f} {r['groups_per_s'] / mem['groups_per_s']:9.3f}"
        )
    print(
        "groups/s = a full put + take + ack round trip; redis = AOF everysec (production), redis-noaof = no persistence"
    )
    print("\ntransport floor (pre-encoded records, raw redis-py pipelines, no codec):")
    print(f"{'redis':12s} {'groups/s':>10s} {'put/s':>10s} {'take+ack/s':>10s} {'store/floor':>11s}")
    for name, f, r in (("aof", floor, red), ("noaof", floor_plain, red_plain)):
        print(
            f"{name:12s} {f['groups_per_s']:10.0f} {f['put_per_s']:10.0f} {f['take_ack_per_s']:10.0f} "
            f"{r['groups_per_s'] / f['groups_per_s']:11.3f}"
        )
    if c_floor and c_floor_plain:
        print(
            f"\nC-client floor (redis-benchmark, SET then GET of {len(record)} B values, 16 pipelined): "
            f"what the server moves with no Python"
        )
        print(f"{'redis':12s} {'round trip/s':>12s} {'SET/s':>10s} {'GET/s':>10s}")
        for name, f in (("aof", c_floor), ("noaof", c_floor_plain)):
            print(f"{name:12s} {f['round_trip_per_s']:12.0f} {f['set_per_s']:10.0f} {f['get_per_s']:10.0f}")
    print(
        f"\ntiny step on Redis: store ops {per_step_ops * 1000:.2f} ms per step (put+take+ack of 16 groups)"
        + (f", step {step_s * 1000:.0f} ms -> store share {share:.2%}" if step_s else "")
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "redis_groups_per_s": red["groups_per_s"],
                    "memory_groups_per_s": mem["groups_per_s"],
                    "store_share_of_step": share,
                    "store_ms_per_step": per_step_ops * 1000,
                    "tiny_step_ms": step_s * 1000 if step_s else None,
                    "record_kb": record_kb,
                    "redis": red,
                    "redis_no_aof": red_plain,
                    "memory": mem,
                    "redis_transport_floor_groups_per_s": floor["groups_per_s"],
                    "redis_over_floor": red["groups_per_s"] / floor["groups_per_s"],
                    "transport_floor": floor,
                    "transport_floor_no_aof": floor_plain,
                    "c_client_floor": c_floor,
                    "c_client_floor_no_aof": c_floor_plain,
                    "groups": args.groups,
                    "batch": args.batch,
                    "completions": args.completions,
                    "tokens": args.tokens,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.json}")
    return 0


def raw_transport(url: str, record: bytes, n: int, batch: int) -> dict:
    """Pre-encoded records through raw redis-py pipelines: the floor under any Redis store."""
    import redis

    r = redis.Redis.from_url(url, socket_read_size=1 << 20, password=os.environ["RLSYS_REDIS_PASSWORD"])
    key = f"raw:{uuid.uuid4().hex[:8]}"
    r.xgroup_create(key, "g", id="0", mkstream=True)
    t_put = t_take = 0.0
    for i in range(0, n, batch):
        k = min(batch, n - i)
        t0 = time.perf_counter()
        p = r.pipeline(transaction=False)
        for _ in range(k):
            p.xadd(key, {b"rec": record})
        p.execute()
        t1 = time.perf_counter()
        got = r.xreadgroup("g", "c", {key: ">"}, count=k)
        ids = [eid for eid, _ in got[0][1]]
        p = r.pipeline(transaction=True)
        p.xack(key, "g", *ids)
        p.xdel(key, *ids)
        p.execute()
        t_put, t_take = t_put + t1 - t0, t_take + time.perf_counter() - t1
    r.delete(key)
    r.close()
    return {"groups_per_s": n / (t_put + t_take), "put_per_s": n / t_put, "take_ack_per_s": n / t_take}


def c_client_floor(port: int, nbytes: int, n: int = 20000) -> Optional[dict]:
    """redis-benchmark (Redis's own C client, 16 requests pipelined) SET then GET of values the
    size of one record: what the server moves with no Python at all; None if it is not installed."""
    import shutil
    import subprocess

    exe = shutil.which("redis-benchmark")
    if exe is None:
        return None
    out = subprocess.run(
        [
            exe,
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-a",
            os.environ["RLSYS_REDIS_PASSWORD"],
            "-t",
            "set,get",
            "-d",
            str(nbytes),
            "-n",
            str(n),
            "-P",
            "16",
            "--csv",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    rps = {}
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0] in ("SET", "GET"):
            rps[cells[0]] = float(cells[1])
    set_, get = rps["SET"], rps["GET"]
    return {"set_per_s": set_, "get_per_s": get, "round_trip_per_s": 1 / (1 / set_ + 1 / get)}


async def _ops_per_step(cfg: ReplayConfig, reps: int) -> float:
    """Mean seconds of put + take + ack of one tiny step's 16 groups x 8 completions."""
    store = make_store(cfg, groups_per_step=16, run_id=uuid.uuid4().hex[:8])
    await store.start()
    total = 0.0
    for r in range(reps):
        gs = make_groups(16, 8, 6, seed=100 + r, version=r)
        await store.reserve(16)
        t0 = time.perf_counter()
        await store.put(gs)
        got = await store.take(16)
        await store.ack([g.group_id for g in got])
        total += time.perf_counter() - t0
        await store.set_learner_version(r + 1)
    await store.close()
    return total / reps


def _tiny_step_seconds(url: str, steps: int) -> float:
    from rlsys.config import compose, to_run_config
    from rlsys.controller.loop import run_training

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = to_run_config(
        compose(
            [
                f"steps={steps}",
                "max_train_seconds=0",
                "cluster.metrics_port=-1",
                "replay=redis",
                f"replay.redis.url={url}",
            ]
        )
    )
    with tempfile.TemporaryDirectory(prefix="bench-replay-run-") as d:
        s = run_training(cfg, Path(d))
    return s["train_seconds"] / s["steps"]


if __name__ == "__main__":
    sys.exit(main())

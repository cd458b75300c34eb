"""Secrets never reach logs, metrics or checkpoints.

A short real run (Ray, vLLM, DeepSpeed) on the Redis replay store with a password from the
environment, and the rm_judge_router reward with an OpenAI-compatible judge that requires an
API key from the environment. Afterwards each secret is searched for, byte for byte, in:
everything logged in the test process at DEBUG (root logger: rlsys, redis, httpx, hydra, ...)
and its stdout/stderr; every file under the run directory (checkpoints with the DeepSpeed
state, summary.json, report, prometheus_targets.json, TensorBoard events); the Ray session's
logs (every actor's stdout/stderr and Ray's own logs); and a scrape of every Prometheus
endpoint the run lists in prometheus_targets.json.

How the secrets reach the code, as in production: the Redis password is read by the replay
store in the controller (the test process, where monkeypatch sets it); the judge's API key
by the judge actor, which inherits it from the Ray node's environment (tests/conftest.py sets
$RLSYS_JUDGE_API_KEY before Ray starts; never through a runtime env).
"""

import asyncio
import json
import logging
import os
import secrets
import urllib.request
from pathlib import Path

import pytest
from helpers import TEST_JUDGE_API_KEY, TEST_REDIS_PASSWORD, OracleJudgeServer, RedisServer

from rlsys.config import compose, to_run_config
from rlsys.controller.loop import Controller

pytestmark = pytest.mark.integration

RAY_TEMP_DIR = Path("/tmp/rlsys-test")
"""The test cluster's _temp_dir (tests/conftest.py::ray_cluster)."""


def find_secrets(roots, needles: dict) -> list[str]:
    """'<file>: <secret name>' for every regular file under ``roots`` (files or directories)
    whose bytes contain one of ``needles`` (name -> secret)."""
    hits = []
    for root in map(Path, roots):
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
        for f in files:
            try:
                data = f.read_bytes()
            except OSError:  # a file removed while we walk (Ray rotates logs); nothing to search
                continue
            hits += [f"{f}: {name}" for name, value in needles.items() if value.encode() in data]
    return hits


def _ray_session_logs() -> Path:
    import ray

    try:  # the running cluster's own session (private API: fall back to the session_latest link)
        logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    except AttributeError:
        logs = RAY_TEMP_DIR / "session_latest" / "logs"
    assert logs.is_dir() and any(logs.iterdir()), logs
    return logs


@pytest.fixture
def debug_log(tmp_path):
    """Everything logged in this process at DEBUG and above, into a file."""
    path = tmp_path / "captured-debug.log"
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    named = {n: logging.getLogger(n) for n in ("rlsys", "redis", "httpx", "httpcore", "hydra", "ray", "urllib3")}
    saved = root.level, {n: lg.level for n, lg in named.items()}
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for lg in named.values():
        lg.setLevel(logging.DEBUG)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(saved[0])
        for n, lg in named.items():
            lg.setLevel(saved[1][n])


def test_secrets_stay_out_of_logs_metrics_and_checkpoints(
    ray_cluster, tiny_model, tmp_path, monkeypatch, capfd, debug_log
):
    redis_password = f"redis-pw-{secrets.token_hex(16)}"
    assert os.environ["RLSYS_JUDGE_API_KEY"] == TEST_JUDGE_API_KEY  # what the Ray actors inherited
    needles = {
        "redis password": redis_password,
        "judge API key": TEST_JUDGE_API_KEY,
        "session redis password": TEST_REDIS_PASSWORD,
    }

    # The search finds a planted copy (else a clean result proves nothing).
    scratch = tmp_path / "scratch"
    (scratch / "nested").mkdir(parents=True)
    (scratch / "nested" / "blob.bin").write_bytes(b"\x00\x01head " + redis_password.encode() + b" tail\xff")
    (scratch / "log.txt").write_text(f"Authorization: Bearer {TEST_JUDGE_API_KEY}\n")
    planted = find_secrets([scratch], needles)
    assert sorted(planted) == sorted(
        [f"{scratch / 'nested' / 'blob.bin'}: redis password", f"{scratch / 'log.txt'}: judge API key"]
    ), planted

    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", appendonly=False, password=redis_password).start()
    monkeypatch.setenv("RLSYS_REDIS_PASSWORD", redis_password)
    judge = OracleJudgeServer(api_key=TEST_JUDGE_API_KEY).start()
    run_dir = tmp_path / "run"
    scraped = {}
    try:
        cfg = to_run_config(
            compose(
                [
                    "steps=3",
                    "scheduler.prompts_per_step=8",
                    "checkpoint.every_steps=1",
                    "checkpoint.keep_last=3",
                    "replay=redis",
                    f"replay.redis.url={server.url}",
                    "cluster.metrics_port=0",
                    "loggers.tensorboard=true",
                    "reward=rm_judge_router",
                    "judge=openai",
                    f"judge.url={judge.url}",
                    "judge.model=oracle",
                    "reward.model.steps=200",
                    "reward.model.pointwise_steps=0",
                    "reward.router.budget_fraction=0.3",
                ]
            )
        )
        ctl = Controller(cfg, run_dir)
        try:
            summary = asyncio.run(ctl.run())
            groups = json.loads((run_dir / "prometheus_targets.json").read_text())
            for entry in groups:
                for target in entry["targets"]:
                    label = f"{entry['labels']['role']}-{entry['labels']['index']}"
                    scraped[label] = (target, urllib.request.urlopen(f"http://{target}/metrics", timeout=10).read())
        finally:
            ctl.shutdown()
    finally:
        judge.stop()
        server.stop()

    assert summary["steps"] == 3
    # the secrets were really used: the judge accepted the key, Redis the password
    assert judge.calls > 0 and judge.unauthorized == 0 and summary["judge"]["calls"] > 0
    assert summary["replay"]["acked"] == 3 * 8
    assert len(list((run_dir / "checkpoints").glob("step_*"))) == 3
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents*"))
    # every endpoint, the actors' included, listens on cluster.metrics_host (127.0.0.1)
    roles = {label.rsplit("-", 1)[0] for label in scraped}
    assert {"controller", "rollout", "reward", "judge", "learner"} <= roles, roles
    assert all(target.startswith("127.0.0.1:") for target, _ in scraped.values()), scraped.keys()

    scrapes = tmp_path / "scrapes"
    scrapes.mkdir()
    for label, (_, body) in scraped.items():
        (scrapes / f"{label}.txt").write_bytes(body)
    out, err = capfd.readouterr()
    (tmp_path / "stdout-stderr.txt").write_text(out + err)
    assert "rlsys" in debug_log.read_text()  # the capture worked
    ray_logs = _ray_session_logs()
    # this run's session, actor output included: the judge actor logged its requests (httpx)
    assert find_secrets([ray_logs], {"judge requests": f"127.0.0.1:{judge.port}/v1/chat/completions"}), ray_logs
    leaks = find_secrets([debug_log, tmp_path / "stdout-stderr.txt", run_dir, scrapes, ray_logs], needles)
    assert leaks == [], "secrets found:\n" + "\n".join(leaks)

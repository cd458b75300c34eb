"""A real Prometheus server (Debian's ``prometheus``, installed by scripts/setup.sh) scrapes a
running tiny experiment through the run's file_sd list, and its HTTP API shows the key series
of every role (controller, learner rank, rollout worker, reward worker, judge) with sane values."""

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from helpers import OracleJudgeServer

from rlsys.config import compose, to_run_config
from rlsys.controller.actors import free_port
from rlsys.controller.client import find_control
from rlsys.controller.loop import Controller

pytestmark = pytest.mark.integration


class Prometheus:
    def __init__(self, workdir, targets_file):
        exe = shutil.which("prometheus")
        if exe is None:
            pytest.fail("prometheus not found: scripts/setup.sh installs Debian's 'prometheus' package")
        self.port = free_port()
        cfg = workdir / "prometheus.yml"
        cfg.write_text(
            json.dumps(
                {  # YAML is a superset of JSON
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "rlsys",
                            "scrape_interval": "1s",
                            "scrape_timeout": "1s",
                            "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}],
                        }
                    ],
                }
            )
        )
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [
                exe,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("prometheus did not become ready")

    def query(self, expr: str) -> list:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# role -> series (PromQL selector body) that must be there, with the smallest sane value
KEY_SERIES = {
    "controller": [
        ("rlsys_learner_steps_total", 1),
        ("rlsys_learner_policy_version", 1),
        ("rlsys_scheduler_effective_gradient_ratio", 0),
        ("rlsys_replay_depth_groups", 0),
        ("rlsys_learner_weight_sync_seconds_count", 1),
        ("rlsys_controller_process_memory_bytes", 1e6),
        ("rlsys_replay_acked_groups", 16),
        ("rlsys_replay_staleness_versions_count", 16),
        ("rlsys_learner_kl", -1.0),
        ("rlsys_rollout_policy_version_lag_versions", 0),
        ("rlsys_reward_routed_fraction", 0),
        ("rlsys_judge_calls", 1),
    ],
    "learner": [
        ("rlsys_learner_rank_tokens_total", 1),
        ("rlsys_learner_rank_step_seconds_count", 1),
        ("rlsys_learner_process_memory_bytes", 1e6),
    ],
    "rollout": [
        ("rlsys_rollout_engine_tokens_total", 1),
        ("rlsys_rollout_engine_generate_seconds_count", 1),
        ("rlsys_rollout_engine_policy_version", 0),
        ("rlsys_rollout_engine_requests_in_flight", 0),
        ("rlsys_rollout_process_memory_bytes", 1e6),
    ],
    "reward": [
        ("rlsys_reward_worker_groups_total", 1),
        ("rlsys_reward_worker_score_seconds_count", 1),
        ("rlsys_reward_process_memory_bytes", 1e6),
    ],
    "judge": [
        ("rlsys_judge_worker_calls_total", 1),
        ("rlsys_judge_worker_queue_depth_calls", 0),
        ("rlsys_judge_process_memory_bytes", 1e6),
    ],
}


def test_prometheus_scrapes_every_role(ray_cluster, tiny_model, tmp_path):
    judge = OracleJudgeServer().start()
    cfg = to_run_config(
        compose(
            [
                "reward=rm_judge_router",
                "judge=openai",
                f"judge.url={judge.url}",
                "judge.model=oracle",
                "reward.router.budget_fraction=0.3",
                "steps=1000",
                "cluster.control_poll_s=0.1",
            ]
        )
    )
    run_dir = tmp_path / "run"
    ctl = Controller(cfg, run_dir)
    prom = Prometheus(tmp_path, run_dir / "prometheus_targets.json")
    seen: dict = {}

    async def watcher():
        while ctl.progress.step < 3:
            await asyncio.sleep(0.2)
        deadline = time.time() + 120
        while True:
            missing = []
            for role, series in KEY_SERIES.items():
                for name, low in series:
                    got = await asyncio.to_thread(prom.query, f'{name}{{run="{run_dir.name}",role="{role}"}}')
                    values = [float(r["value"][1]) for r in got]
                    seen[(role, name)] = values
                    if not values or min(values) < low:
                        missing.append((role, name, values))
            if not missing or time.time() > deadline:
                break
            await asyncio.sleep(1)
        seen["up"] = await asyncio.to_thread(prom.query, f'up{{run="{run_dir.name}"}}')
        await find_control().stop.remote()
        return missing

    async def scenario():
        ctl.setup()
        train = asyncio.create_task(ctl.run())
        missing = await asyncio.wait_for(watcher(), 600)
        return await train, missing

    try:
        summary, missing = asyncio.run(scenario())
    finally:
        ctl.shutdown()
        prom.stop()
        judge.stop()
    assert not missing, f"series absent or below their floor: {missing}"
    # every endpoint of the run's file_sd list is a target, and all are up
    targets = json.loads((run_dir / "prometheus_targets.json").read_text())
    roles = sorted(t["labels"]["role"] for t in targets)
    assert roles == sorted(["controller", "judge", "learner", "reward", "rollout"]), roles
    up = {(r["metric"]["role"], r["metric"]["index"]): float(r["value"][1]) for r in seen["up"]}
    assert len(up) == len(targets) and all(v == 1.0 for v in up.values()), up
    # scraped values agree with the run: engine tokens <= tokens the run counted, steps <= steps run
    assert sum(seen[("rollout", "rlsys_rollout_engine_tokens_total")]) <= summary["tokens_generated"]
    assert seen[("controller", "rlsys_learner_steps_total")][0] <= summary["steps"]
    assert all(v < 64 * 2**30 for v in seen[("rollout", "rlsys_rollout_process_memory_bytes")])

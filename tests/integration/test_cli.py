"""``rlsys`` as a user runs it: ``rlsys train`` in a process of its own (its embedded Ray cluster
included), and ``rlsys status`` / ``scale`` / ``stop`` in others, each finding that cluster by
itself, as from another shell. Not through the test session's Ray cluster (tests/conftest.py):
a call from inside it would hide what a user meets (the loopback setting, the token, the
cluster's address). Each run gets a temp dir of its own (``cluster.temp_dir``, passed to the
commands as ``--temp-dir``), so that the commands never reach another cluster of this machine;
everything the run started is killed afterwards by its session id, nothing else."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

RLSYS = str(Path(sys.executable).parent / "rlsys")


def user_env() -> dict[str, str]:
    """A user's shell: none of the test session's Ray settings (conftest sets the loopback switch;
    $RAY_ADDRESS would pick a cluster)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def rlsys(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RLSYS, *args], capture_output=True, text=True, timeout=timeout, env=user_env())


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid``: the train process started with a session of its
    own, and all it started (Ray's GCS, raylet, workers and actors run in their own process
    groups, but in that session)."""
    import psutil

    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # gone meanwhile, or not ours
            pass


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def test_status_without_a_cluster_fails_with_a_message(tmp_path):
    # An empty dir: no cluster keeps files there. A hang fails the test at the subprocess timeout.
    out = rlsys("status", "--temp-dir", str(tmp_path), timeout=30)
    assert out.returncode == 2, out
    assert out.stderr.startswith(
        "rlsys status: no Ray cluster found (is a run going? start one with 'rlsys train ...', or pass --address"
    ), out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_an_address_where_nothing_answers_fails_at_the_deadline():
    port = free_loopback_port()  # nothing listens there
    out = rlsys("stop", "--address", f"127.0.0.1:{port}", "--timeout", "3", timeout=60)  # Ray alone retries for minutes
    assert out.returncode == 2, out
    assert f"rlsys stop: no answer within 3s while connecting to the Ray cluster at 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.integration
def test_operate_a_live_run_from_the_command_line(tiny_model, tmp_path):
    """rlsys train -> (status shows steps) -> rlsys scale rollout=2 -> (status shows 2 workers) ->
    rlsys stop -> the run ends normally with its summary, exit code 0."""
    temp_dir = f"/tmp/rlsys-cli-{uuid.uuid4().hex[:8]}"  # short: Ray's unix socket paths live under it
    where = ("--temp-dir", temp_dir, "--timeout", "60")  # a generous deadline: CI machines can be loaded
    log_path = tmp_path / "train.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        train = subprocess.Popen(
            [
                RLSYS,
                "train",
                "experiment=tiny",
                "steps=1000",
                "max_train_seconds=0",
                f"run_root={tmp_path / 'runs'}",
                f"cluster.temp_dir={temp_dir}",
                "cluster.num_cpus=3",
                "cluster.metrics_port=-1",
                "cluster.control_poll_s=0.1",
                "report=false",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=user_env(),
            start_new_session=True,
        )
    try:

        def wait_for(what: str, done: Callable[[dict], bool], hint: str, timeout: float) -> dict:
            """``rlsys status`` until ``done(status)``: asked as soon as the train log matches ``hint``
            (a cheap sign that it is time), else every 15 s. Each ``rlsys status`` costs a few
            CPU-seconds, which the run's start needs on a 2-core machine."""
            end, asked, last = time.monotonic() + timeout, 0.0, None
            while time.monotonic() < end:
                if train.poll() is not None:
                    pytest.fail(f"rlsys train exited ({train.returncode}) before {what}:\n{tail(log_path)}")
                if re.search(hint, log_path.read_text(errors="replace")) or time.monotonic() - asked > 15:
                    asked, last = time.monotonic(), rlsys("status", *where)
                    if last.returncode == 0:
                        status = json.loads(last.stdout)
                        if done(status):
                            return status
                    else:  # before the cluster is up, or before the run's control actor is: nothing else
                        assert last.returncode == 2 and (
                            "no Ray cluster found" in last.stderr
                            or "no running rlsys job on this Ray cluster" in last.stderr
                        ), last
                time.sleep(1)
            pytest.fail(f"no {what} within {timeout}s; last status: {last}\n{tail(log_path)}")

        status = wait_for("training step", lambda s: (s.get("step") or 0) >= 1, r"step +\d+/1000", 240)
        phases = {"first step seen": time.monotonic() - started}
        assert status["rollout_workers"] == 1 and status["desired_rollout"] == 1 and not status["stop_requested"]
        run = status["run"]

        out = rlsys("scale", "rollout=2", *where)
        assert out.returncode == 0, out
        assert json.loads(out.stdout) == {"run": run, "desired_rollout": 2, "current_rollout": 1}
        status = wait_for("second rollout worker", lambda s: s["rollout_workers"] == 2, r"scaled up to 2\b", 180)
        assert status["desired_rollout"] == 2 and status["run"] == run
        phases["second worker seen"] = time.monotonic() - started

        out = rlsys("stop", "--run", run, *where)
        assert out.returncode == 0, out
        stop = json.loads(out.stdout)
        assert stop["run"] == run and stop["stop_requested"] is True
        assert train.wait(timeout=120) == 0, tail(log_path)
        phases["train exited"] = time.monotonic() - started
        # The cluster went with the run: soon nothing is left under its temp dir to answer.
        for _ in range(10):
            out = rlsys("status", "--temp-dir", temp_dir, "--timeout", "5")
            if "no Ray cluster found" in out.stderr:
                break
            time.sleep(1)
        assert out.returncode == 2 and "no Ray cluster found" in out.stderr, out
    finally:
        if train.poll() is None:
            train.kill()
        kill_session(train.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
    print("seconds from start: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))

    text = log_path.read_text()
    assert "eval accuracy (held-out, greedy)" in text and "run directory:" in text and "Traceback" not in text
    run_dir = tmp_path / "runs" / run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert status["step"] <= summary["steps"] < 1000  # ended by the stop request, at a step boundary
    workers = {w["index"]: w for w in summary["rollout_workers"]}
    assert sorted(workers) == [0, 1] and workers[1]["groups"] > 0  # the joiner served


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["reward.target=no_such_module.reward"], "rlsys: reward.target 'no_such_module.reward' cannot be imported"),
        (
            ["reward.target=helpers.ALPHABET_HINT"],
            "rlsys: reward.target=helpers.ALPHABET_HINT is a str, not a function",
        ),
        (["reward.target=helpers.reward_with_three_args"], "which rlsys cannot call with (completion, reference)"),
        (["scheduler.samples_per_prompt=1"], "scheduler.samples_per_prompt=1 gives every group one completion"),
        (["replay=redis", "replay.redis.url=redis://127.0.0.1:{port}/0"], "nothing answers at replay.redis.url="),
        (
            ["learner.lora.rank=8", "learner.lora.target_modules=[qkv_proj]"],
            "learner.lora.target_modules=['qkv_proj'] matches no module of LlamaForCausalLM",
        ),
        (
            ["learner.max_tokens_per_micro_batch=12"],
            "learner.max_tokens_per_micro_batch=12 is smaller than the longest sequence a step can hold",
        ),
        # (offload without ZeRO, packing with paged attention: config checks, tests/unit/learner)
    ],
    ids=[
        "reward-not-importable",
        "reward-not-callable",
        "reward-signature",
        "one-sample-per-prompt",
        "no-redis",
        "lora-targets-nothing",
        "token-budget-below-longest",
    ],
)
def test_a_run_that_cannot_work_is_refused_before_ray_starts(tmp_path, overrides, message):
    """Each refused with an ``rlsys:`` line and no traceback, before the Ray cluster exists (its
    temp dir is never created): a user learns it in seconds, not after the actors start."""
    ray_dir = tmp_path / "ray"
    args = [o.format(port=free_loopback_port()) for o in overrides]
    env = {**user_env(), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # tests/: the user's module
    out = subprocess.run(
        [RLSYS, "train", *args, f"run_root={tmp_path}", f"cluster.temp_dir={ray_dir}", "steps=2"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not ray_dir.exists()

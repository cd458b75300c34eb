"""Test fixtures: one local Ray cluster per session (explicit CPUs, loopback only), and the
tiny model built (or found in the cache) once."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

TEST_RAY_CPUS = 4
"""Logical CPUs of the test cluster (2 rollout + 2 learner + reward actors fit)."""


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_slow = pytest.mark.skip(reason="slow: pass --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    import ray

    from rlsys.controller.cluster import keep_ray_on_loopback

    keep_ray_on_loopback()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    ray.init(
        num_cpus=TEST_RAY_CPUS,
        include_dashboard=False,
        _temp_dir="/tmp/rlsys-test",
        _node_ip_address="127.0.0.1",
        namespace="rlsys-tests",
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "TOKENIZERS_PARALLELISM": "false",
                # actors can import tests/helpers.py (custom reward targets)
                "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
            }
        },
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model():
    """The default tiny model (shared with the quickstart's cache)."""
    from rlsys.tasks.arithmetic import TaskConfig
    from rlsys.tasks.config import ModelConfig
    from rlsys.tasks.tinymodel import ensure_model

    return str(ensure_model(ModelConfig(), TaskConfig()))


@pytest.fixture(scope="session", autouse=True)
def secrets_env():
    """The session's secrets, in the environment before anything starts (Ray included, so
    every actor inherits them, as on a real cluster where they are in the nodes' environment,
    never in a runtime env): $RLSYS_REDIS_PASSWORD = helpers.TEST_REDIS_PASSWORD, which every
    RedisServer requires by default and the replay store (in the test process, the
    controller) reads; $RLSYS_JUDGE_API_KEY = helpers.TEST_JUDGE_API_KEY, which the judge
    actor sends. Tests of other values or none override them with monkeypatch."""
    from helpers import TEST_JUDGE_API_KEY, TEST_REDIS_PASSWORD

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLSYS_REDIS_PASSWORD", TEST_REDIS_PASSWORD)
        mp.setenv("RLSYS_JUDGE_API_KEY", TEST_JUDGE_API_KEY)
        yield


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private redis-server (AOF on, password helpers.TEST_REDIS_PASSWORD) on a free
    loopback port for the whole session."""
    from helpers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()

"""The locked-down data plane, the pure parts: replay.redis.allow_no_auth only for loopback
hosts, no unpickling (or eval) of data anywhere in the rlsys package, metrics endpoints on
loopback by default. The Redis server side (refusal of an open server, the ACL user, TLS):
tests/integration/test_replay_security.py; secrets kept out of logs, metrics and
checkpoints: tests/integration/test_secrets.py."""

import ast
import socket
import tokenize
import urllib.request
from io import StringIO
from pathlib import Path

import pytest
from helpers import PICKLE_LIKE_MODULES

from rlsys.config import ClusterConfig, ConfigError, compose, to_run_config
from rlsys.observability.metrics import Metrics, serve, serve_actor
from rlsys.replay.base import RedisConfig

PACKAGE = Path(__file__).parents[2] / "rlsys"


# -- replay.redis.allow_no_auth ----------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://127.8.9.10:1/0",
        "redis://localhost:6390/1",
        "redis://[::1]:6379/0",
        "rediss://localhost:6380/0",
        "unix:///run/redis.sock",
    ],
)
def test_allow_no_auth_is_accepted_for_loopback_hosts_and_unix_sockets(url):
    assert RedisConfig(url=url, allow_no_auth=True).is_local


@pytest.mark.parametrize(
    "url",
    [
        "redis://10.0.0.5:6379/0",
        "redis://redis.internal:6379/0",
        "redis://0.0.0.0:6379/0",
        "rediss://my-cache.example.com:6380/0",
        "redis://[2001:db8::1]:6379/0",
        "redis://localhost.example.com:6379/0",
    ],
)
def test_allow_no_auth_for_a_remote_host_is_a_config_error_naming_the_key(url):
    assert not RedisConfig(url=url).is_local  # allowed without allow_no_auth
    with pytest.raises(ValueError, match=r"replay\.redis\.allow_no_auth=true is only allowed for a loopback host"):
        RedisConfig(url=url, allow_no_auth=True)


def test_allow_no_auth_defaults_off_and_a_remote_one_fails_at_composition():
    assert RedisConfig().allow_no_auth is False
    with pytest.raises(ConfigError, match=r"replay\.redis\.allow_no_auth"):
        to_run_config(
            compose(
                ["replay=redis", "replay.redis.url=redis://redis.internal:6379/0", "replay.redis.allow_no_auth=true"]
            )
        )


# -- no unpickling -----------------------------------------------------------------------


JUSTIFIED = {
    # DeepSpeed's engine.load_checkpoint unpickles DeepSpeed's own checkpoint files (torch.load
    # without weights_only, inside DeepSpeed): module and optimizer state under
    # <checkpoint>/learner/ that a learner rank of a run wrote, read back only on resume=<dir>.
    # The trust boundary is the checkpoint directory: resume only from checkpoints you wrote
    # (docs/security.md). Everything that crosses a network (replay records, judge answers,
    # weights between processes) is msgpack, JSON or safetensors. Ray's own actor calls are
    # cloudpickled inside Ray between the cluster's processes, which authenticate with Ray's
    # token (not rlsys code, so not listed here).
    ("learner/rank.py", "load_checkpoint"),
}
"""(file, call) pairs that may appear although they unpickle: each one is explained above."""


def _unpickling_sites(source: str, filename: str = "<src>") -> list[str]:
    """Where ``source`` imports a pickle-like module, calls eval/exec, or loads YAML, torch or
    numpy data in a way that may run code; names only, strings and comments are ignored."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[-1] in PICKLE_LIKE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod.split(".")[-1] in PICKLE_LIKE_MODULES or any(a.name in PICKLE_LIKE_MODULES for a in node.names):
                found.append(f"{where} from {mod} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Attribute) and node.attr in PICKLE_LIKE_MODULES | {"read_pickle", "to_pickle"}:
            found.append(f"{where} .{node.attr}")
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            owner = fn.value.id if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) else ""
            kw = {k.arg: k.value for k in node.keywords}
            if isinstance(fn, ast.Name) and name in ("eval", "exec"):
                found.append(f"{where} {name}(")
            elif owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load", "unsafe_load_all"):
                loader = kw.get("Loader", node.args[1] if len(node.args) > 1 else None)
                if not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")) and not (
                    isinstance(loader, ast.Name) and loader.id in ("SafeLoader", "CSafeLoader")
                ):
                    found.append(f"{where} yaml.{name}( without SafeLoader")
            elif owner == "torch" and name == "load":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    found.append(f"{where} torch.load( without weights_only=True")
            elif name == "load_checkpoint":
                found.append(f"{where} load_checkpoint(")
            allow = kw.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{where} allow_pickle=")
    # names that mention pickle/marshal anywhere else in the code (not in strings or comments)
    for tok in tokenize.generate_tokens(StringIO(source).readline):
        if (
            tok.type == tokenize.NAME
            and ("pickle" in tok.string.lower() or "marshal" in tok.string.lower())
            and tok.string not in PICKLE_LIKE_MODULES | {"allow_pickle", "read_pickle", "to_pickle"}
        ):
            found.append(f"{filename}:{tok.start[0]} name {tok.string}")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import cloudpickle as cp",
        "from ray import cloudpickle",
        "import marshal",
        "from pickle import loads",
        "x = ray.cloudpickle.loads(b)",
        "eval(text)",
        "exec(code)",
        "yaml.load(f)",
        "yaml.load(f, Loader=yaml.Loader)",
        "yaml.unsafe_load(f)",
        "torch.load(p)",
        "torch.load(p, weights_only=False)",
        "np.load(p, allow_pickle=True)",
        "df = pd.read_pickle(p)",
        "engine.load_checkpoint(d)",
        "my_unpickler = None",
    ],
)
def test_the_scan_flags_each_unpickling_pattern(snippet):
    assert _unpickling_sites(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "model.eval()",
        "yaml.load(f, Loader=yaml.SafeLoader)",
        "yaml.safe_load(f)",
        "torch.load(p, weights_only=True)",
        "np.load(p)",
        "'never pickle'  # pickle in a comment",
        "msgpack.unpackb(b)",
        "json.loads(s)",
        "OmegaConf.to_yaml(c)",
    ],
)
def test_the_scan_passes_safe_code(snippet):
    assert _unpickling_sites(snippet) == []


def test_no_unpickling_or_eval_in_the_package():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20 and (PACKAGE / "replay" / "redis_store.py") in files
    found = []
    for f in files:
        sites = _unpickling_sites(f.read_text(), f.relative_to(PACKAGE).as_posix())
        found += [s for s in sites if not any(s.startswith(f"{file}:") and call in s for file, call in JUSTIFIED)]
    assert found == [], "code that may unpickle or eval data (use the codec, JSON or safetensors):\n" + "\n".join(found)
    justified_sites = [
        s
        for f in files
        for s in _unpickling_sites(f.read_text(), f.relative_to(PACKAGE).as_posix())
        if any(s.startswith(f"{file}:") and call in s for file, call in JUSTIFIED)
    ]
    assert len(justified_sites) == len(JUSTIFIED), justified_sites  # each exception is still there, once


# -- metrics endpoints on loopback ---------------------------------------------------------


def _other_local_addresses() -> list[str]:
    """IPv4 addresses of this machine other than 127.0.0.1: its interfaces', and 127.0.0.2
    (Linux routes all of 127/8 to the loopback interface)."""
    import psutil

    addrs = {a.address for nics in psutil.net_if_addrs().values() for a in nics if a.family == socket.AF_INET}
    return sorted((addrs | {"127.0.0.2"}) - {"127.0.0.1"})


def _assert_loopback_only(server):
    assert server.host == "127.0.0.1" and server._server.server_address[0] == "127.0.0.1"
    assert b"rlsys_" in urllib.request.urlopen(server.url, timeout=5).read()
    others = _other_local_addresses()
    assert others
    for addr in others:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((addr, server.port), timeout=2).close()


def test_the_controller_endpoint_listens_only_on_loopback_by_default():
    cfg = ClusterConfig()
    assert cfg.metrics_host == "127.0.0.1"
    server = serve(Metrics(), cfg.metrics_host, cfg.metrics_port)
    try:
        _assert_loopback_only(server)
    finally:
        server.close()


@pytest.mark.parametrize("role", ["rollout", "reward", "judge", "learner"])
def test_actor_endpoints_listen_only_on_loopback_by_default(role):
    _, advertised, server = serve_actor(role, ClusterConfig().metrics_host)
    try:
        assert advertised == f"127.0.0.1:{server.port}"
        _assert_loopback_only(server)
    finally:
        server.close()

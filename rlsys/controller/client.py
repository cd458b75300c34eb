"""Reaching a running job from outside it (``rlsys status / scale / stop``): find the Ray cluster
that holds the job, join it the way its nodes expect, and ask the job's control actor
(rlsys.controller.elastic.RunControl), all under a deadline.

The cluster is looked for in this order:

1. ``--address``;
2. the cluster on this machine whose session files are under ``--temp-dir`` (a run's
   ``cluster.temp_dir``), found from its raylet's command line as Ray's own ``address="auto"``
   finds clusters, but never a cluster of another temp dir (another run's, a test session's);
3. ``$RAY_ADDRESS``;
4. the cluster under ``/tmp/rlsys`` (the default ``cluster.temp_dir``: ``rlsys train``'s embedded
   cluster), else under Ray's default temp dir (``ray start``).

When several clusters share a temp dir, the newest one holding the job (``--run``) answers. A
cluster on this machine is joined on loopback (rlsys.controller.cluster.keep_ray_on_loopback;
without it Ray looks for the GCS at the machine's external address and waits forever) and with
token authentication when a token is available here (Ray 2.60 starts local clusters with token
authentication on; its ``address="auto"`` turns it on in the same way, an explicit address does
not). Light on purpose: no torch, no config.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")


DEFAULT_TEMP_DIR = "/tmp/rlsys"
"""Where ``rlsys train``'s embedded Ray cluster keeps its session files (ClusterConfig.temp_dir;
checked equal by tests/unit/test_control.py, kept literal so that ``rlsys --help`` imports no
config)."""


@dataclass(frozen=True)
class Target:
    """A Ray cluster to try."""

    address: str
    where: str
    """How it was found, for messages."""
    loopback: bool = False
    """It listens on this machine's loopback: join it with Ray kept on loopback."""
    local: bool = False
    """It runs on this machine (found here, or a loopback address): join it with this machine's
    authentication token, as Ray's ``address="auto"`` does."""


@dataclass(frozen=True)
class LocalCluster:
    """A Ray cluster running on this machine, as its raylet's command line describes it."""

    gcs_address: str
    node_ip: str
    temp_dir: str
    started: float


def local_clusters(temp_dir: str) -> list[LocalCluster]:
    """The Ray clusters running on this machine whose session files are under ``temp_dir``,
    newest first. Found, as Ray's ``address="auto"`` finds clusters, from the command lines of
    raylet processes (``--gcs-address``, ``--node_ip_address``, ``--temp_dir``); unlike it,
    clusters of other temp dirs (other users' runs, test clusters) are left alone."""
    import psutil

    want = os.path.realpath(temp_dir)
    found: dict[str, LocalCluster] = {}
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        cmdline = proc.info["cmdline"] or []
        if not cmdline or "raylet" not in os.path.basename(cmdline[0]):
            continue
        flags = dict(a.split("=", 1) for a in cmdline[1:] if a.startswith("--") and "=" in a)
        gcs, tmp = flags.get("--gcs-address"), flags.get("--temp_dir")
        if not gcs or gcs == "None" or not tmp or os.path.realpath(tmp) != want:
            continue
        cluster = LocalCluster(gcs, flags.get("--node_ip_address", ""), tmp, proc.info["create_time"] or 0.0)
        if gcs not in found or cluster.started > found[gcs].started:
            found[gcs] = cluster
    return sorted(found.values(), key=lambda c: c.started, reverse=True)


def ray_default_temp_dir() -> str:
    """Ray's temp dir when none is given (``ray start``), as ray._common.utils computes it,
    without importing Ray (the loopback setting must precede that import)."""
    base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    return os.path.join(base or "/tmp", "ray")


def _is_loopback_host(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cluster_targets(address: Optional[str], temp_dir: Optional[str]) -> list[Target]:
    """The clusters to try, in order: ``address``; else the clusters under ``temp_dir``; else
    $RAY_ADDRESS; else those under the embedded default's temp dir, then under Ray's. Raises
    ConnectionError, with what to do, when there is none."""
    if not address and temp_dir is None and os.environ.get("RAY_ADDRESS"):
        address, where = os.environ["RAY_ADDRESS"], "$RAY_ADDRESS"
    else:
        where = "--address"
    if address:
        loopback = "://" not in address and address != "auto" and _is_loopback_host(address)
        return [Target(address, where, loopback=loopback, local=loopback)]
    dirs = [temp_dir] if temp_dir is not None else [DEFAULT_TEMP_DIR, ray_default_temp_dir()]
    for d in dirs:
        clusters = local_clusters(d)
        if clusters:
            return [
                Target(c.gcs_address, f"under {d}", loopback=_is_loopback_host(c.node_ip or c.gcs_address), local=True)
                for c in clusters
            ]
    looked = " or ".join(dirs)
    raise ConnectionError(
        f"no Ray cluster found (is a run going? start one with 'rlsys train ...', or pass "
        f"--address; looked for a cluster on this machine under {looked}: a run with another "
        f"cluster.temp_dir needs --temp-dir DIR)"
    )


def _local_token_available() -> bool:
    """Whether Ray would find an authentication token here: $RAY_AUTH_TOKEN, the file
    $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (written when a local cluster first starts)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return Path(path).is_file()


def prepare_local(target: Target) -> None:
    """Before Ray is imported (it reads both settings then): keep Ray on loopback for a cluster
    that listens there, and turn token authentication on (RAY_AUTH_MODE=token, unless set) for a
    cluster of this machine when this machine has a token."""
    if target.loopback:
        from rlsys.controller.cluster import keep_ray_on_loopback

        keep_ray_on_loopback()
    if target.local and "RAY_AUTH_MODE" not in os.environ and _local_token_available():
        os.environ["RAY_AUTH_MODE"] = "token"


class NoJobError(LookupError):
    """No rlsys job (or not the one asked for) runs on the Ray cluster."""


def find_control(run: Optional[str] = None):
    """The control actor of ``run`` (a run directory name), or of the only run on the cluster
    this process is connected to; LookupError says which runs there are."""
    import ray

    from rlsys.controller.elastic import CONTROL_NAME

    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == CONTROL_NAME]
    if run is not None:
        named = [a for a in named if a["namespace"] == f"rlsys-{run}"]
    if not named:
        where = f" for run {run!r}" if run else ""
        raise NoJobError(f"no running rlsys job{where} on this Ray cluster")
    if len(named) > 1:
        runs = ", ".join(sorted(a["namespace"].removeprefix("rlsys-") for a in named))
        raise LookupError(f"several rlsys jobs run on this cluster ({runs}); pick one with --run")
    return ray.get_actor(CONTROL_NAME, namespace=named[0]["namespace"])


class Deadline:
    """What a control command is waiting for (``stage``), and until when."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.stage = "starting"

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def run_with_deadline(fn: Callable[[], T], deadline: Deadline) -> T:
    """``fn()`` in a daemon thread; TimeoutError naming ``deadline.stage`` if it has not returned
    when the deadline passes (Ray's connect retries for minutes on an address where nothing
    answers; a daemon thread left waiting does not keep the process alive)."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread, raised there
            box["error"] = e

    thread = threading.Thread(target=work, name="rlsys-cli-ray", daemon=True)
    thread.start()
    thread.join(deadline.left())
    if thread.is_alive():
        hint = "is the cluster up and reachable from here? a slow cluster: --timeout SECONDS"
        if deadline.stage.startswith("connecting"):  # Ray retries an unauthenticated connection until it gives up
            hint += (
                "; a cluster with token authentication (Ray's default) needs its token here ($RAY_AUTH_TOKEN, "
                "$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and RAY_AUTH_MODE unset or 'token'"
            )
        raise TimeoutError(f"no answer within {deadline.seconds:g}s while {deadline.stage} ({hint})")
    if "error" in box:
        raise box["error"]
    return box["value"]


def ask(cmd: str, n: Optional[int], run: Optional[str], targets: list[Target], deadline: Deadline) -> dict:
    """Connect to the first target holding the job (with --run, the one holding that run) and
    send it ``cmd``."""
    deadline.stage = "importing Ray"
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    for i, target in enumerate(targets):
        if not ray.is_initialized():  # else: an in-process caller's connection (see _control_main)
            logging.getLogger("ray").setLevel(logging.ERROR)  # the CLI says what went wrong itself
            deadline.stage = f"connecting to the Ray cluster at {target.address} ({target.where})"
            try:
                ray.init(address=target.address, logging_level="ERROR", log_to_driver=False)
            except RuntimeError as e:  # e.g. token authentication on and no token here
                raise ConnectionError(f"could not join the Ray cluster at {target.address}: {e}") from None
        deadline.stage = f"looking for the job's control actor on the cluster at {target.address}"
        try:
            actor = find_control(run)
        except NoJobError:
            if len(targets) == 1:
                raise
            if i + 1 == len(targets):
                what = f" for run {run!r}" if run else ""
                raise NoJobError(
                    f"no running rlsys job{what} on the {len(targets)} Ray clusters {target.where} "
                    f"({', '.join(t.address for t in targets)})"
                ) from None
            ray.shutdown()
            continue
        deadline.stage = f"waiting for the job's answer to {cmd!r}"
        call = {
            "scale": lambda: actor.scale_rollout.remote(n),
            "status": actor.status.remote,
            "stop": actor.stop.remote,
        }[cmd]
        try:
            return ray.get(call(), timeout=max(deadline.left(), 0.1))
        except GetTimeoutError:
            raise TimeoutError(
                f"no answer within {deadline.seconds:g}s while {deadline.stage} (a busy job: --timeout SECONDS)"
            ) from None
        except RayError as e:  # the actor died (the run ended meanwhile) or raised
            raise ConnectionError(
                f"the job's control actor failed to answer ({type(e).__name__}: {e}); did the "
                f"run just end? 'rlsys status' shows whether it is still there"
            ) from None
    raise AssertionError("cluster_targets returns at least one target")

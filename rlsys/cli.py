"""The ``rlsys`` command: train, build the tiny model, operate a running job, redraw a report.

``rlsys --help`` lists the commands and ``rlsys <command> --help`` describes one; both are
generated from the argparse parsers below. ``rlsys train`` hands everything after ``train`` to
Hydra unchanged (overrides such as ``experiment=tiny steps=50`` and Hydra's own flags such as
``--cfg job``).

``scale`` / ``status`` / ``stop`` talk to a running job's control actor
(rlsys.controller.elastic.RunControl). They find its Ray cluster, in this order:

1. ``--address``;
2. the cluster on this machine whose session files are under ``--temp-dir`` (a run's
   ``cluster.temp_dir``), found from its raylet's command line as Ray's own
   ``address="auto"`` finds clusters, but never a cluster of another temp dir (another run's,
   a test session's);
3. ``$RAY_ADDRESS``;
4. the cluster under ``/tmp/rlsys`` (the default ``cluster.temp_dir``: ``rlsys train``'s
   embedded cluster), else under Ray's default temp dir (``ray start``).

When several clusters share a temp dir, the newest one holding the job (``--run``) answers. A
cluster on this machine is joined on loopback (rlsys.controller.cluster.keep_ray_on_loopback;
without it Ray looks for the GCS at the machine's external address and waits forever) and
with token authentication when a token is available here (Ray 2.60 starts local clusters with
token authentication on; its ``address="auto"`` turns it on in the same way, an explicit
address does not). Connecting and the actor's answer have a deadline (``--timeout``): when
nothing answers, the command says what it was waiting for and exits with 2 instead of hanging.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence, TypeVar

T = TypeVar("T")

DEFAULT_TEMP_DIR = "/tmp/rlsys"
"""Where ``rlsys train``'s embedded Ray cluster keeps its session files (ClusterConfig.temp_dir;
checked equal by tests/unit/test_control.py, kept literal so that ``rlsys --help`` imports no
config)."""
DEFAULT_TIMEOUT_S = 20.0
"""Deadline of ``scale`` / ``status`` / ``stop`` for connecting and for the actor's answer."""
HELP_FLAGS = frozenset({"-h", "--help"})


class UsageError(ValueError):
    """A command line that does not parse: the message, the command (``prog``, e.g. ``rlsys
    scale``) and its usage line."""

    def __init__(self, message: str, prog: str, usage: str):
        super().__init__(message)
        self.prog = prog
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of exiting, so that ``main`` returns
    exit codes and the parsing helpers can be tested."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog, self.format_usage().strip())


class _Formatter(argparse.HelpFormatter):
    """100 columns at most; a description or epilog with line breaks (examples) is kept as
    written, one without is wrapped."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


# --------------------------------------------------------------------------- the parsers


def _worker_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs an integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"needs N >= 1, got {n}")
    return n


def _rollout_assignment(text: str) -> int:
    key, sep, value = text.partition("=")
    if not sep or key != "rollout":
        raise argparse.ArgumentTypeError(f"unknown argument {text!r}; expected rollout=N (the rollout workers wanted)")
    return _worker_count(value)


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs a number of seconds, got {text!r}") from None
    if not s > 0:
        raise argparse.ArgumentTypeError(f"needs a number of seconds > 0, got {text!r}")
    return s


def _cluster_options() -> argparse.ArgumentParser:
    """Options shared by scale / status / stop: which run, on which cluster, how long to wait."""
    p = _Parser(add_help=False)
    g = p.add_argument_group("which job")
    g.add_argument(
        "--run", metavar="NAME", help="the run directory name of the job (needed when several jobs share the cluster)"
    )
    g.add_argument(
        "--address",
        metavar="ADDR",
        help="Ray cluster to join: host:port of its GCS, ray://host:10001, or 'auto' (Ray's own "
        "discovery); default: the cluster on this machine under --temp-dir, else $RAY_ADDRESS, "
        f"else the cluster under {DEFAULT_TEMP_DIR} or Ray's default temp dir",
    )
    g.add_argument(
        "--temp-dir",
        metavar="DIR",
        help="find the cluster on this machine whose session files are under DIR (the run's "
        "cluster.temp_dir, when not the default)",
    )
    g.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_seconds,
        default=DEFAULT_TIMEOUT_S,
        help="give up when the cluster or the job does not answer within this long (default: %(default)g)",
    )
    return p


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``rlsys`` parser and its subparsers by command name; every ``--help`` comes from here."""
    parser = _Parser(
        prog="rlsys",
        formatter_class=_Formatter,
        description="Distributed RL post-training of LLMs on Ray (rollout with vLLM, learning with DeepSpeed).",
        epilog="examples:\n"
        "  rlsys train experiment=tiny steps=50     train the embedded default (a tiny model on CPU)\n"
        "  rlsys train --cfg job                    print the composed config and exit\n"
        "  rlsys status                             the running job's step, policy version, workers\n"
        "  rlsys scale rollout=4                    change its rollout workers while it trains\n"
        "\n'rlsys COMMAND --help' describes a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    cluster = _cluster_options()

    train = sub.add_parser(
        "train",
        help="train (everything after 'train' is a Hydra override)",
        formatter_class=_Formatter,
        description="Train a policy. Every argument after 'train' goes to Hydra unchanged: overrides such as "
        "experiment=tiny steps=50 (key=value, group=option, +key=value; a mistyped key fails with "
        "the key named) and Hydra's own flags (--cfg job, --hydra-help).",
        epilog="examples:\n"
        "  rlsys train experiment=tiny steps=50\n"
        "  rlsys train --cfg job learner.lr=3e-4     print the composed config and exit\n"
        "  rlsys train cluster=existing ...          join the Ray cluster this process runs in",
    )
    train.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="a Hydra override or flag")

    build = sub.add_parser(
        "build-model",
        help="build (or find in the cache) the tiny model and print its path",
        formatter_class=_Formatter,
        description="Build the tiny policy model for the composed config (or find it in the model cache), "
        "print its directory and its warm-start record.",
    )
    build.add_argument(
        "overrides", nargs="*", metavar="OVERRIDE", help="a Hydra override, as for train (e.g. model.hidden_size=256)"
    )

    scale = sub.add_parser(
        "scale",
        parents=[cluster],
        formatter_class=_Formatter,
        help="change the rollout workers of a running job",
        description="Ask a running job for N rollout workers. New workers get the current policy before their "
        "first request; leaving workers finish the request in hand first.",
        epilog="examples:\n  rlsys scale rollout=4\n  rlsys scale --rollout 2 --run 20260101-120000-tiny",
    )
    scale.add_argument(
        "target",
        nargs="?",
        type=_rollout_assignment,
        metavar="rollout=N",
        help="the number of rollout workers wanted (N >= 1)",
    )
    scale.add_argument("--rollout", type=_worker_count, metavar="N", help="the same as rollout=N")

    sub.add_parser(
        "status",
        parents=[cluster],
        formatter_class=_Formatter,
        help="print a running job's step, policy version and workers",
        description="Print a running job's last report (step, policy version, rollout workers, "
        "learner ranks, replay depth, recent errors) and what was asked of it, as JSON.",
    )
    sub.add_parser(
        "stop",
        parents=[cluster],
        formatter_class=_Formatter,
        help="end a running job after its current step",
        description="Ask a running job to stop: the learner finishes the step in progress and the run "
        "ends normally (final evaluation, summary, report, checkpoint if configured).",
    )

    report = sub.add_parser(
        "report",
        help="(re)draw report.png and report.md of a run",
        formatter_class=_Formatter,
        description="Draw report.png and report.md from RUN_DIR/summary.json, into RUN_DIR.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a run directory holding summary.json")

    helps = sub.add_parser(
        "help",
        help="describe a command (the same as 'rlsys COMMAND --help')",
        description="Describe a command, or list them.",
    )
    helps.add_argument(
        "topic",
        nargs="?",
        metavar="COMMAND",
        choices=sorted(set(sub.choices) - {"help"}),
        help="the command to describe",
    )
    return parser, dict(sub.choices)


def parse_scale_args(argv: Sequence[str]) -> tuple[int, Optional[str], Optional[str]]:
    """``rlsys scale``'s arguments (``rollout=N`` or ``--rollout N``, ``--run NAME``, ``--address
    ADDR``, ...) -> (N, run, address); raises UsageError (a ValueError) with the message and the
    command's usage line."""
    scale = _build()[1]["scale"]
    return _scale_target(scale, scale.parse_args(argv))


def _scale_target(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[int, Optional[str], Optional[str]]:
    """(N, run, address) of parsed ``rlsys scale`` arguments; ``parser.error`` if N is missing or
    given twice differently."""
    if args.target is not None and args.rollout is not None and args.target != args.rollout:
        parser.error(f"rollout={args.target} and --rollout {args.rollout} disagree; give one of them")
    n = args.target if args.target is not None else args.rollout
    if n is None:
        parser.error("say how many rollout workers: rollout=N (or --rollout N)")
    return n, args.run, args.address


# --------------------------------------------------------------------------- finding the cluster


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


def _prepare_local(target: Target) -> None:
    """Before Ray is imported (it reads both settings then): keep Ray on loopback for a cluster
    that listens there, and turn token authentication on (RAY_AUTH_MODE=token, unless set) for a
    cluster of this machine when this machine has a token."""
    if target.loopback:
        from rlsys.controller.cluster import keep_ray_on_loopback

        keep_ray_on_loopback()
    if target.local and "RAY_AUTH_MODE" not in os.environ and _local_token_available():
        os.environ["RAY_AUTH_MODE"] = "token"


# --------------------------------------------------------------------------- talking to the job


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


class _Deadline:
    """What a control command is waiting for (``stage``), and until when."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.stage = "starting"

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def run_with_deadline(fn: Callable[[], T], deadline: _Deadline) -> T:
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


def _ask(cmd: str, n: Optional[int], run: Optional[str], targets: list[Target], deadline: _Deadline) -> dict:
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


def _control_main(cmd: str, n: Optional[int], args: argparse.Namespace) -> int:
    """``rlsys scale`` / ``status`` / ``stop``: talk to a running job's control actor."""
    try:
        connected = "ray" in sys.modules and sys.modules["ray"].is_initialized()
        if connected and args.address is None and args.temp_dir is None:  # in-process callers (tests, notebooks)
            targets = [Target("(this process's Ray connection)", "already connected")]
        else:
            targets = cluster_targets(args.address, args.temp_dir)
            if connected:
                raise ConnectionError(
                    "this process is connected to a Ray cluster already; run rlsys in a process "
                    "of its own to join the one --address / --temp-dir name"
                )
            _prepare_local(targets[0])
            if len(targets) > 1 and args.run is None:
                print(
                    f"rlsys {cmd}: {len(targets)} Ray clusters run {targets[0].where}; asking the newest first "
                    f"(another run's: --run NAME)",
                    file=sys.stderr,
                )
        deadline = _Deadline(args.timeout)
        out = run_with_deadline(lambda: _ask(cmd, n, args.run, targets, deadline), deadline)
    except (ValueError, LookupError, ConnectionError, TimeoutError) as e:
        print(f"rlsys {cmd}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


# --------------------------------------------------------------------------- train, build-model, report


def _train_main(argv: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from rlsys.checkpoint import CheckpointError
    from rlsys.config import ConfigError, conf_dir, register_schema, to_run_config
    from rlsys.replay.redis_store import ReplayConfigError, ReplayUnavailable
    from rlsys.tasks.arithmetic import DatasetError

    # Errors whose message says what to do: printed alone, no traceback. FloatingPointError: the run
    # stopped on non-finite steps (learner.on_nonfinite); the message names the fix.
    USER_ERRORS = (
        ConfigError,
        DatasetError,
        FileNotFoundError,
        CheckpointError,
        ReplayConfigError,
        ReplayUnavailable,
        FloatingPointError,
    )

    register_schema()
    result = {"rc": 0}

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def _main(dcfg) -> None:
        from rlsys.controller.loop import run_training

        try:
            cfg = to_run_config(dcfg)
        except ConfigError as e:
            print(f"rlsys: {e}", file=sys.stderr)
            result["rc"] = 2
            return
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(dcfg, resolve=True))
        try:
            summary = run_training(cfg, run_dir)
        except USER_ERRORS as e:
            print(f"rlsys: {e}", file=sys.stderr)
            result["rc"] = 2
            return
        _print_table(summary)

    sys.argv = ["rlsys train", *argv]
    _main()
    return result["rc"]


def _print_table(s: dict) -> None:
    rows = [
        ("eval accuracy (held-out, greedy)", f"{s['eval_accuracy_before']:.3f}", f"{s['eval_accuracy_after']:.3f}"),
        ("train reward (first/last steps)", _fmt(s["reward_first"]), _fmt(s["reward_last"])),
    ]
    print()
    print(f"{'':34s} {'before':>8s} {'after':>8s}")
    for name, a, b in rows:
        print(f"{name:34s} {a:>8s} {b:>8s}")
    print(
        f"\nsteps {s['steps']}  train {s['train_seconds']:.0f}s  samples/s {s['samples_per_s']:.0f}  "
        f"tokens/s {s['tokens_per_s']:.0f}  reward failures {s['reward_failures']}"
    )
    print(f"run directory: {s['run_dir']}")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _build_model_main(overrides: list[str]) -> int:
    from rlsys.config import compose, to_run_config
    from rlsys.tasks.tinymodel import ensure_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = to_run_config(compose(overrides))
    path = ensure_model(cfg.model, cfg.task)
    ws = path / "warmstart.json"
    print(path)
    if ws.is_file():
        print(json.dumps(json.loads(ws.read_text()), indent=2))
    return 0


def _report_main(run: Path) -> int:
    from rlsys.observability.report import write_report

    if not (run / "summary.json").is_file():
        print(
            f"rlsys report: {run / 'summary.json'} not found; RUN_DIR is a run directory holding summary.json "
            f"(e.g. runs/<run>)",
            file=sys.stderr,
        )
        return 2
    for p in write_report(json.loads((run / "summary.json").read_text()), run):
        print(f"wrote {p}")
    return 0


# --------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``rlsys ARGV``; returns the exit code (0 ok, 2 a usage or user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"] and not HELP_FLAGS & set(argv[1:]):
        # Hydra parses the rest itself, unchanged and in order (argparse would take its flags, such
        # as --cfg job, for unknown options of its own).
        return _train_main(argv[1:])
    parser, commands = _build()
    n = None
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # said by the command's parser, with its usage
            (commands[args.command] if args.command else parser).error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "scale":
            n, _, _ = _scale_target(commands["scale"], args)
    except UsageError as e:
        print(f"{e.usage}\n{e.prog}: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help prints and exits
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "help":
        (commands[args.topic] if args.topic else parser).print_help()
        return 0
    if args.command == "train":  # reached only with -h/--help, which exits above
        return _train_main(args.overrides)
    if args.command == "build-model":
        return _build_model_main(args.overrides)
    if args.command == "report":
        return _report_main(args.run_dir)
    return _control_main(args.command, n, args)


if __name__ == "__main__":
    sys.exit(main())

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
import json
import logging
import sys
from pathlib import Path
from typing import NoReturn, Optional, Sequence

from rlsys.controller.client import (
    DEFAULT_TEMP_DIR,
    Deadline,
    Target,
    ask,
    cluster_targets,
    prepare_local,
    run_with_deadline,
)

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

    export = sub.add_parser(
        "export",
        help="write a checkpoint's policy as a Hugging Face model directory",
        formatter_class=_Formatter,
        description="Copy the policy of CHECKPOINT (a checkpoint directory, or a run directory: its newest "
        "checkpoint) to OUT as a model directory transformers and vLLM load as is: safetensors weights, "
        "config, generation_config, tokenizer and chat template. (Every run also writes its final policy to "
        "<run dir>/policy.)",
        epilog="examples:\n  rlsys export runs/20260101-120000-tiny my-policy\n"
        "  rlsys export runs/20260101-120000-tiny/checkpoints/step_000040 policy-40",
    )
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory or a run directory")
    export.add_argument("out", metavar="OUT", type=Path, help="a new (or empty) directory to write")

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


# --------------------------------------------------------------------------- talking to the job


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
            prepare_local(targets[0])
            if len(targets) > 1 and args.run is None:
                print(
                    f"rlsys {cmd}: {len(targets)} Ray clusters run {targets[0].where}; asking the newest first "
                    f"(another run's: --run NAME)",
                    file=sys.stderr,
                )
        deadline = Deadline(args.timeout)
        out = run_with_deadline(lambda: ask(cmd, n, args.run, targets, deadline), deadline)
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
    evals = s.get("curves", {}).get("evaluations") or []
    if evals and evals[0].get("k"):
        k = evals[0]["k"]
        rows.append((f"eval mean@{k}", _fmt(evals[0]["mean_at_k"]), _fmt(evals[-1]["mean_at_k"])))
        rows.append((f"eval pass@{k}", _fmt(evals[0]["pass_at_k"]), _fmt(evals[-1]["pass_at_k"])))
    print()
    print(f"{'':34s} {'before':>8s} {'after':>8s}")
    for name, a, b in rows:
        print(f"{name:34s} {a:>8s} {b:>8s}")
    print(
        f"\nsteps {s['steps']}  train {s['train_seconds']:.0f}s  samples/s {s['samples_per_s']:.0f}  "
        f"tokens/s {s['tokens_per_s']:.0f}  reward failures {s['reward_failures']}"
    )
    print(f"run directory: {s['run_dir']}")
    print(f"trained policy: {Path(s['run_dir']) / 'policy'}  (rlsys export CHECKPOINT DIR for a checkpoint's)")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _build_model_main(overrides: list[str]) -> int:
    from rlsys.config import compose, to_run_config
    from rlsys.tasks.models import ensure_model

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


def _export_main(ckpt: str, out: Path) -> int:
    from rlsys.checkpoint import CheckpointError, export

    try:
        path = export(ckpt, out)
    except (CheckpointError, OSError) as e:
        print(f"rlsys export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
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
    if args.command == "export":
        return _export_main(args.checkpoint, args.out)
    return _control_main(args.command, n, args)


if __name__ == "__main__":
    sys.exit(main())

"""``rlsys`` command line.

    rlsys train [hydra overrides ...]     train (e.g. ``rlsys train experiment=tiny steps=50``)
    rlsys train --cfg job                 print the composed config and exit (Hydra's flag)
    rlsys build-model [overrides ...]     build (or find in the cache) the tiny model, print its path
    rlsys scale rollout=N [--run NAME] [--address ADDR]
                                          change the rollout workers of a running job
    rlsys status [--run NAME] [--address ADDR]
                                          a running job's step, policy version and workers
    rlsys stop [--run NAME] [--address ADDR]
                                          end a running job after its current step
    rlsys report RUN_DIR                  (re)draw report.png and report.md from RUN_DIR/summary.json

Overrides are Hydra's: ``key=value``, ``group=option``; a typo fails with the key named.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

USAGE = __doc__


def _train_main(argv: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from rlsys.checkpoint import CheckpointError
    from rlsys.config import ConfigError, conf_dir, register_schema, to_run_config
    from rlsys.replay_redis import ReplayConfigError, ReplayUnavailable
    from rlsys.task import DatasetError

    # Errors whose message says what to do: printed alone, no traceback. FloatingPointError: the run
    # stopped on non-finite steps (learner.on_nonfinite); the message names the fix.
    USER_ERRORS = (ConfigError, DatasetError, FileNotFoundError, CheckpointError, ReplayConfigError,
                   ReplayUnavailable, FloatingPointError)

    register_schema()
    result = {"rc": 0}

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def _main(dcfg) -> None:
        from rlsys.controller import run_training

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
    print(f"\nsteps {s['steps']}  train {s['train_seconds']:.0f}s  samples/s {s['samples_per_s']:.0f}  "
          f"tokens/s {s['tokens_per_s']:.0f}  reward failures {s['reward_failures']}")
    print(f"run directory: {s['run_dir']}")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _build_model_main(argv: list[str]) -> int:
    from rlsys.config import compose, to_run_config
    from rlsys.tinymodel import ensure_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = to_run_config(compose(argv))
    path = ensure_model(cfg.model, cfg.task)
    ws = path / "warmstart.json"
    print(path)
    if ws.is_file():
        print(json.dumps(json.loads(ws.read_text()), indent=2))
    return 0


def _report_main(argv: list[str]) -> int:
    from rlsys.report import write_report

    if len(argv) != 1 or not (Path(argv[0]) / "summary.json").is_file():
        print("usage: rlsys report RUN_DIR   (a run directory holding summary.json)", file=sys.stderr)
        return 2
    run = Path(argv[0])
    for p in write_report(json.loads((run / "summary.json").read_text()), run):
        print(f"wrote {p}")
    return 0


def _control_main(cmd: str, argv: list[str]) -> int:
    """``rlsys scale`` / ``status`` / ``stop``: talk to a running job's control actor."""
    from rlsys import control

    try:
        if cmd == "scale":
            n, run, address = control.parse_scale_args(argv)
        else:
            n, run, address = None, None, None
            args = iter(argv)
            for a in args:
                if a not in ("--run", "--address"):
                    raise ValueError(f"unknown argument {a!r}; usage: rlsys {cmd} [--run NAME] [--address ADDR]")
                v = next(args, None)
                if v is None:
                    raise ValueError(f"{a} needs a value")
                run, address = (v, address) if a == "--run" else (run, v)
        control.connect(address)
        import ray

        actor = control.find_control(run)
        call = {"scale": lambda: actor.scale_rollout.remote(n), "status": actor.status.remote,
                "stop": actor.stop.remote}[cmd]
        out = ray.get(call())
    except (ValueError, LookupError, ConnectionError) as e:
        print(f"rlsys {cmd}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return _train_main(rest)
    if cmd == "build-model":
        return _build_model_main(rest)
    if cmd in ("scale", "status", "stop"):
        return _control_main(cmd, rest)
    if cmd == "report":
        return _report_main(rest)
    print(f"rlsys: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

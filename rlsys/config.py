"""The run's configuration: one typed dataclass per component, composed by Hydra.

Every component's dataclass lives next to its code (``rollout.RolloutConfig``,
``learner.LearnerConfig`` ...) and holds the only defaults. ``RunConfig`` gathers them and is
registered once as Hydra's structured schema (``rlsys_schema``); the YAML files under
``conf/`` only select and override, so a mistyped key fails at composition (and one added
with ``+key=value``, which Hydra lets through, fails in ``to_run_config``).

``to_run_config`` converts the composed DictConfig into typed objects exactly once, running
every ``__post_init__`` check; the result is then treated as read-only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from rlsys.checkpoint import CheckpointConfig
from rlsys.data.config import DataConfig
from rlsys.learner.config import LearnerConfig
from rlsys.observability.loggers import LoggersConfig
from rlsys.replay.base import ReplayConfig
from rlsys.reward.judge import JudgeConfig
from rlsys.reward.worker import RewardConfig
from rlsys.rollout.worker import RolloutConfig
from rlsys.scheduling.scheduler import SchedulerConfig
from rlsys.tasks.arithmetic import TaskConfig
from rlsys.tasks.config import ModelConfig


@dataclass
class ClusterConfig:
    """Where the actors run."""

    address: Optional[str] = None
    """Ray cluster to join ('auto' or 'ray://host:10001'); None starts a local one."""
    num_cpus: int = 2
    """Logical CPUs of the local Ray cluster (ignored when joining one)."""
    temp_dir: str = "/tmp/rlsys"
    """Ray's session directory for a local cluster (keep it short: unix socket paths)."""
    loopback_only: bool = True
    """Keep a local Ray cluster on 127.0.0.1."""
    actor_start_timeout_s: float = 300.0
    """Give up (with the cluster's resources in the message) if actors are not up by then."""
    metrics_host: str = "127.0.0.1"
    """Address the controller's Prometheus endpoint binds to."""
    metrics_port: int = 0
    """Port of the controller's Prometheus endpoint; 0 picks a free one (logged); -1 disables
    metrics (the controller's and every actor's; actors always take a free port)."""
    prometheus_targets: Optional[str] = None
    """Also write the run's Prometheus file_sd list here (e.g. a file Prometheus watches, as in
    deploy/prometheus/prometheus.yml); it is always written to <run dir>/prometheus_targets.json."""
    control_poll_s: float = 0.5
    """How often the controller checks for a ``rlsys scale`` request (and pings the judge)."""
    max_worker_restarts: int = 10
    """Dead or hung rollout / reward / judge workers replaced per role in one run before the run
    fails (rlsys/supervision.py; learner ranks: learner.max_restarts)."""

    def __post_init__(self) -> None:
        if self.num_cpus < 1:
            raise ValueError(f"cluster.num_cpus must be >= 1, got {self.num_cpus}")
        if self.max_worker_restarts < 0:
            raise ValueError(f"cluster.max_worker_restarts must be >= 0, got {self.max_worker_restarts}")
        if not (-1 <= self.metrics_port <= 65535):
            raise ValueError(f"cluster.metrics_port must be -1 (off), 0 (any) or a port, got {self.metrics_port}")


@dataclass
class EvalConfig:
    """Held-out evaluation (``eval_every`` says when; before and after training always)."""

    samples: int = 0
    """Also sample this many completions per held-out prompt for mean@k and pass@k (0: greedy only)."""
    temperature: float = 1.0
    """Sampling temperature of those completions."""
    examples: int = 4
    """Greedy completions kept per evaluation in <run dir>/eval_samples.jsonl and the report."""

    def __post_init__(self) -> None:
        if self.samples < 0 or self.examples < 0:
            raise ValueError("eval.samples and eval.examples must be >= 0")
        if not self.temperature > 0:
            raise ValueError(f"eval.temperature must be > 0, got {self.temperature}")


@dataclass
class RunConfig:
    """A training run."""

    name: str = "tiny"
    """Run name (used in the run directory name)."""
    steps: int = 100
    """Learner steps to train."""
    max_train_seconds: float = 0.0
    """Stop training after this much wall time even if ``steps`` are not done; 0 = no limit."""
    eval_every: int = 0
    """Evaluate on held-out prompts every k steps (0: only before and after training)."""
    log_every: int = 1
    """Print a progress line every k steps."""
    report: bool = True
    """At the end of a run, write report.png (reward, accuracy, effective gradient ratio and
    throughput over steps) and report.md (a summary table) into the run directory."""
    run_root: str = "runs"
    """Parent directory of run directories."""
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    loggers: LoggersConfig = field(default_factory=LoggersConfig)
    requires: list[str] = field(default_factory=list)
    """Keys an experiment needs the command to set (``experiment=hf``: ``model.path``,
    ``data.train_files``); a run without them is refused naming them."""
    resume: Optional[str] = None
    """Continue a run from a checkpoint: a checkpoint directory, or a run directory (its newest
    checkpoint). ``steps`` stays the total: resuming at step 40 with steps=100 trains 60 more."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.max_train_seconds < 0 or self.eval_every < 0 or self.log_every < 1:
            raise ValueError("max_train_seconds and eval_every must be >= 0 and log_every >= 1")
        lc = self.learner
        if lc.warmup_steps > self.steps or lc.lr_decay_steps > 0 and lc.lr_decay_steps <= lc.warmup_steps:
            raise ValueError(
                f"learner.warmup_steps={lc.warmup_steps} must fit the run (steps={self.steps}) and end before "
                f"learner.lr_decay_steps={lc.lr_decay_steps or self.steps}"
            )
        if self.scheduler.samples_per_prompt < 2:
            raise ValueError(
                f"scheduler.samples_per_prompt={self.scheduler.samples_per_prompt} gives every group one completion, "
                "and rlsys's advantages are relative to the group (a reward minus the group's mean, or pairwise "
                "comparisons): every advantage would be 0 and the run would train on nothing; set "
                "scheduler.samples_per_prompt >= 2"
            )


class ConfigError(ValueError):
    """The composed configuration is invalid; the message names the key to change."""


def register_schema() -> None:
    ConfigStore.instance().store(name="rlsys_schema", node=RunConfig)


def conf_dir() -> Path:
    """The ``conf/`` directory: $RLSYS_CONF_DIR, else the repository's ``conf/``."""
    env = os.environ.get("RLSYS_CONF_DIR")
    d = Path(env) if env else Path(__file__).resolve().parent.parent / "conf"
    if not (d / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in {d}; set RLSYS_CONF_DIR to rlsys's conf/ directory")
    return d


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Typed, validated config (runs every component's __post_init__ once)."""
    try:
        obj = OmegaConf.to_object(cfg)
    except Exception as e:  # OmegaConf wraps __post_init__ errors; re-raise as one clear error
        cause = e.__cause__ or e
        raise ConfigError(f"invalid configuration: {cause}") from e
    if not isinstance(obj, RunConfig):
        raise ConfigError("the composed config is not a RunConfig; is conf/config.yaml's schema 'rlsys_schema'?")
    missing = [k for k in obj.requires if OmegaConf.select(cfg, k, default=None) is None]
    if missing:
        raise ConfigError(
            f"experiment={obj.name} needs {', '.join(missing)}: add {' '.join(f'{k}=...' for k in missing)} "
            "to the command"
        )
    unknown = _unknown_keys(obj)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(unknown)}: no component has such a setting (a '+' "
            "override adds keys the schema lacks); check the spelling with `rlsys train --cfg job`"
        )
    return obj


def _unknown_keys(obj: object, prefix: str = "") -> list[str]:
    """Dotted keys an override added (``+learner.learning_rate=...``) that no config dataclass
    declares: OmegaConf.to_object sets them as plain attributes, where nothing would read them."""
    declared = [f.name for f in fields(obj)]
    unknown = [prefix + key for key in vars(obj) if key not in declared]
    for name in declared:
        value = getattr(obj, name)
        if is_dataclass(value):
            unknown += _unknown_keys(value, f"{prefix}{name}.")
    return unknown


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose the config as ``rlsys train`` would (for tests, benchmarks, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_schema()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))

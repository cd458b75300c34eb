"""Optional experiment loggers: TensorBoard event files and Weights & Biases, off by default.

They are fed the controller's per-step record: a map from Prometheus metric name (rlsys.observability.metrics)
to the value the controller sets on that metric at the end of the step, so the three views of a
run (Prometheus, TensorBoard, W&B) show the same numbers under the same names.

    rlsys train loggers.tensorboard=true                  # <run dir>/tensorboard/
    rlsys train loggers.wandb=true                        # offline: <run dir>/wandb/, `wandb sync` later
    rlsys train loggers.wandb=true loggers.wandb_mode=online loggers.wandb_project=myproj

W&B online needs ``WANDB_API_KEY`` in the environment (never in a config file); offline mode
needs no network and no account.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


@dataclass
class LoggersConfig:
    """Experiment loggers besides Prometheus (both off by default)."""

    tensorboard: bool = False
    """Write TensorBoard event files to <run dir>/tensorboard."""
    wandb: bool = False
    """Log to Weights & Biases (needs the wandb package: pip install 'rlsys[loggers]')."""
    wandb_mode: str = "offline"
    """'offline' (files under <run dir>/wandb, no network), 'online' (WANDB_API_KEY from the
    environment) or 'disabled'."""
    wandb_project: str = "rlsys"
    """W&B project name."""

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"loggers.wandb_mode must be offline, online or disabled, got {self.wandb_mode!r}")


class MetricLoggers:
    """Fan-out of per-step metric records to the configured loggers."""

    def __init__(self, cfg: LoggersConfig, run_dir: Path, run_name: str, config: Optional[dict] = None):
        self.tb = self.wandb_run = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if cfg.wandb:
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.wandb_project,
                name=run_name,
                dir=str(run_dir),
                mode=cfg.wandb_mode,
                config=config or {},
                reinit="finish_previous",
            )

    @property
    def active(self) -> bool:
        return self.tb is not None or self.wandb_run is not None

    def log(self, step: int, record: dict[str, float]) -> None:
        finite = {k: float(v) for k, v in record.items() if v is not None and math.isfinite(float(v))}
        if self.tb is not None:
            for k, v in finite.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log(finite, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

"""Checkpoints during a run, in two phases around the step's commit (the on-disk layout and
``resume=`` are rlsys/checkpoint.py).

:meth:`Checkpointer.write` runs while producers are parked at the admission gate, before the
learner version advances: every rank saves its DeepSpeed state (a collective) into a temporary
directory, and the scheduler's state is taken. :meth:`Checkpointer.commit` runs once the step is
recorded: it adds the run state (step, version, replay run id, progress) and the Hugging Face
weights, and renames the directory into place (complete or absent). The newest committed
checkpoint is what learner ranks restart from at that version (rlsys/controller/recovery.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from rlsys import checkpoint
from rlsys.config import RunConfig
from rlsys.controller.actors import Fleet
from rlsys.controller.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class PendingCheckpoint:
    """Written, not yet committed."""

    tmp: Path
    scheduler_state: dict
    started: float


class Checkpointer:
    def __init__(self, cfg: RunConfig, run_dir: Path, model_path: str):
        self.cfg = cfg
        self.root = checkpoint.root_for(cfg.checkpoint, run_dir)
        self.model_path = Path(model_path)
        self.template = cfg.data.chat_template if cfg.data.chat_template not in ("auto", "none") else None
        """A chat template file the run used instead of the tokenizer's: saved with the policy."""
        self.last: Optional[tuple[str, int]] = None
        """(directory, policy version) of the newest committed checkpoint (or the resumed one)."""

    def due(self, step: int) -> bool:
        return checkpoint.is_due(self.cfg.checkpoint, step, self.cfg.steps)

    async def write(self, step: int, fleet: Fleet) -> PendingCheckpoint:
        t0 = time.perf_counter()
        tmp = checkpoint.begin(self.root, step)
        await asyncio.gather(*[r.save_checkpoint.remote(str(tmp)) for r in fleet.ranks])
        return PendingCheckpoint(tmp, await fleet.scheduler.state_dict.remote(), t0)

    async def save_policy(self, fleet: Fleet, run_dir: Path) -> Path:
        """The trained policy as a Hugging Face model directory, ``<run dir>/policy`` (written aside
        and renamed into place, so a directory by that name is whole)."""
        final = Path(run_dir) / checkpoint.POLICY_DIR
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        await asyncio.gather(*[r.save_policy.remote(str(tmp)) for r in fleet.ranks])
        checkpoint.complete_policy(tmp, self.model_path, self.template)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def commit(self, pending: PendingCheckpoint, version: int, progress: Progress, run_id: str) -> None:
        state = {
            "step": progress.step,
            "version": version,
            "run_id": run_id,
            "scheduler": pending.scheduler_state,
            "progress": asdict(progress),
            "config_name": self.cfg.name,
        }
        final = checkpoint.commit(pending.tmp, state, self.model_path, self.cfg.checkpoint.keep_last, self.template)
        self.last = (str(final), version)
        log.info("checkpoint %s written in %.1fs", final, time.perf_counter() - pending.started)


@dataclass
class ResumePoint:
    """The checkpoint a resumed run continues from."""

    path: Path
    state: dict

    @property
    def version(self) -> int:
        return self.state["version"]


def resume_point(cfg: RunConfig) -> Optional[ResumePoint]:
    """The checkpoint ``resume=`` names (a checkpoint directory, or a run directory: its newest),
    checked before anything starts."""
    if not cfg.resume:
        return None
    path = checkpoint.resolve(cfg.resume)
    point = ResumePoint(path, checkpoint.read_state(path))
    if point.state["step"] >= cfg.steps:
        raise checkpoint.CheckpointError(
            f"{checkpoint.describe(path, point.state)} is already at steps={cfg.steps}; raise steps to train further"
        )
    log.info("resuming from %s", checkpoint.describe(path, point.state))
    return point

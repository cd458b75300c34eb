"""The learning-rate schedule (pure): linear warmup, then constant, linear or cosine decay.

``lr_factor(step, cfg)`` multiplies ``learner.lr`` for the optimizer step ``step`` (0-based,
counted over the whole run: a resumed or restarted learner continues the schedule where the
committed steps left it):

* warmup, ``step < W``: ``(step + 1) / W`` (the first step already trains, at ``lr / W``);
* after it, over ``D = lr_decay_steps - W`` steps with progress ``p = (step - W) / D`` (capped
  at 1) and floor ``m = min_lr_ratio``: constant ``1``; linear ``1 - (1 - m) p``; cosine
  ``m + (1 - m) (1 + cos(pi p)) / 2`` (the half-cosine of SGDR, Loshchilov & Hutter 2017).
"""

from __future__ import annotations

import math

from rlsys.learner.config import LearnerConfig


def lr_factor(step: int, cfg: LearnerConfig) -> float:
    """The multiplier of ``cfg.lr`` at optimizer step ``step``.

    >>> from rlsys.learner.config import LearnerConfig
    >>> c = LearnerConfig(lr_schedule="linear", warmup_steps=2, lr_decay_steps=6)
    >>> [round(lr_factor(s, c), 3) for s in range(7)]
    [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    """
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(cfg.lr_decay_steps - warmup, 1)
    p = min((step - warmup) / span, 1.0)
    floor = cfg.min_lr_ratio
    if cfg.lr_schedule == "linear":
        return 1.0 - (1.0 - floor) * p
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))

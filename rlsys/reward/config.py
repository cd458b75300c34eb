"""The fast reward model's configuration (``reward.model``), importable without torch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class RewardModelConfig:
    """The fast reward model (``reward.model``): an existing directory, or the small pairwise
    and pointwise models built and trained here on the task's preference data."""

    path: Optional[str] = None
    """A reward-model directory written by :func:`ensure_reward_model` (or by hand in its
    layout), used as is; when set, nothing is built."""
    num_layers: int = 2
    """Transformer layers of the backbone."""
    hidden_size: int = 128
    """Width of the backbone, and of the SNGP head's spectral-normalised layer."""
    num_heads: int = 4
    """Attention heads; must divide ``hidden_size``."""
    intermediate_size: int = 256
    """Width of the backbone's MLP."""
    max_position: int = 64
    """Longest encoded sequence; longer responses are cut (see the module docstring)."""
    rff_features: int = 512
    """D: random Fourier features of the SNGP head (the precision matrix is D x D)."""
    rff_lengthscale: float = 16.0
    """ell: width of the RBF kernel the random features approximate, in units of the pooled
    state (norm ~ sqrt(hidden_size) at initialisation; its learned gain rescales it)."""
    spectral_norm_bound: float = 0.95
    """c: spectral norm of the head's residual layer (must be < 1 to keep it distance-preserving)."""
    ridge: float = 1.0
    """lambda: prior precision of the output weights; precision = lambda I + sum phi phi^T."""
    mean_field_factor: float = math.pi / 8
    """a in uncertainty = sqrt(1 + a var) (pi/8: the probit approximation of the logistic)."""
    steps: int = 2000
    """Optimiser steps of the pairwise model."""
    aux_loss_weight: float = 1.0
    """Weight of the auxiliary linear head's BCE in the pairwise loss (0: GP head only)."""
    pointwise_steps: int = 800
    """Optimiser steps of the pointwise model (0: build no pointwise model)."""
    lr: float = 1e-3
    """AdamW learning rate (linear warm-up over the first 5% of steps, then cosine to 10%)."""
    batch_size: int = 64
    """Pairs (or responses) per optimiser step."""
    negatives_per_prompt: int = 2
    """Wrong answers drawn per training prompt; each makes one (correct, wrong) pair."""
    label_noise: float = 0.1
    """Probability that a training label is flipped (held-out labels stay clean)."""
    seed: int = 0
    """Seed of the initialisation, the random features, the data and the batch order."""
    cache_dir: str = "~/.cache/rlsys/reward_models"
    """Where built reward models are cached, one directory per configuration; ``~`` is expanded."""

    def __post_init__(self) -> None:
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            raise ValueError(f"reward.model.path must be a non-empty path or null, got {self.path!r}")
        for key in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "intermediate_size",
            "rff_features",
            "steps",
            "batch_size",
            "negatives_per_prompt",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"reward.model.{key} must be an integer >= 1, got {value!r}")
        if not isinstance(self.pointwise_steps, int) or self.pointwise_steps < 0:
            raise ValueError(f"reward.model.pointwise_steps must be an integer >= 0, got {self.pointwise_steps!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"reward.model.hidden_size ({self.hidden_size}) must be divisible by "
                f"reward.model.num_heads ({self.num_heads})"
            )
        if not isinstance(self.max_position, int) or self.max_position < 16:
            raise ValueError(f"reward.model.max_position must be an integer >= 16, got {self.max_position!r}")
        if not 0.0 < self.spectral_norm_bound < 1.0:
            raise ValueError(
                f"reward.model.spectral_norm_bound must be in (0, 1) (the head is residual: "
                f"c >= 1 loses distance preservation), got {self.spectral_norm_bound}"
            )
        if not (math.isfinite(self.aux_loss_weight) and self.aux_loss_weight >= 0):
            raise ValueError(f"reward.model.aux_loss_weight must be a finite number >= 0, got {self.aux_loss_weight}")
        for key in ("rff_lengthscale", "ridge", "lr"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"reward.model.{key} must be a finite number > 0, got {value}")
        if not (math.isfinite(self.mean_field_factor) and self.mean_field_factor >= 0):
            raise ValueError(
                f"reward.model.mean_field_factor must be a finite number >= 0, got {self.mean_field_factor}"
            )
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(f"reward.model.label_noise must be in [0, 0.5), got {self.label_noise}")
        if not isinstance(self.cache_dir, str) or not self.cache_dir:
            raise ValueError(f"reward.model.cache_dir must be a non-empty path, got {self.cache_dir!r}")

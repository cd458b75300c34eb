"""The policy model's configuration (``model``): a model directory, or a tiny model built here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

ALLOWED_HEAD_DIMS = (32, 64)
"""Head sizes vLLM's CPU attention supports."""
MODEL_KINDS = ("char", "chat")
"""Kinds of locally built policy models (``model.kind``)."""


@dataclass
class ModelConfig:
    """The policy model: an existing checkpoint, or a tiny model (``kind``) built and warm-started here."""

    path: Optional[str] = None
    """An existing Hugging Face model directory used as is; when set, nothing is built."""
    kind: str = "char"
    """What is built when ``path`` is unset: ``"char"``, the character-level Llama of the
    arithmetic tasks (:mod:`rlsys.tasks.tinymodel`); ``"chat"``, a Qwen2 chat model with a
    byte-level BPE tokenizer and a ChatML chat template, answering ``\\boxed{...}``
    (:mod:`rlsys.tasks.chatmodel`, the ``chat_tiny`` experiment)."""
    vocab_size: int = 512
    """``kind="chat"`` only: size of the BPE vocabulary trained on the task's texts (specials included)."""
    num_layers: int = 4
    """Transformer layers of the tiny model."""
    hidden_size: int = 128
    """Width of the tiny model."""
    num_heads: int = 4
    """Attention heads; ``hidden_size / num_heads`` must be 32 or 64 (vLLM's CPU attention)."""
    intermediate_size: int = 512
    """Width of the MLP."""
    max_position: int = 64
    """Longest sequence (prompt + completion, with bos and eos) the model handles."""
    warmstart_max_steps: int = 3000
    """Upper bound on supervised warm-start steps (0: keep the random initialisation)."""
    warmstart_batch_size: int = 64
    """Sequences per warm-start step."""
    warmstart_lr: float = 1e-3
    """AdamW learning rate of the warm start (constant)."""
    warmstart_target_accuracy: float = 0.2
    """Stop the warm start as soon as greedy accuracy on the validation split reaches this."""
    warmstart_eval_every: int = 5
    """Check validation accuracy every this many warm-start steps."""
    seed: int = 0
    """Seed of the initialisation and of the warm-start batch order."""
    build_threads: int = 1
    """torch threads for the warm start. 1 (the default) makes the build reproducible on a
    given machine; more builds a large model faster (the generation-heavy benchmark's)."""
    cache_dir: str = "~/.cache/rlsys/models"
    """Where built models are cached, one directory per configuration; ``~`` is expanded."""

    def __post_init__(self) -> None:
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            raise ValueError(f"model.path must be a non-empty path or null, got {self.path!r}")
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model.kind must be one of {list(MODEL_KINDS)}, got {self.kind!r}")
        for key in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "intermediate_size",
            "max_position",
            "warmstart_batch_size",
            "warmstart_eval_every",
            "build_threads",
            "vocab_size",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{key} must be an integer >= 1, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})"
            )
        head_dim = self.hidden_size // self.num_heads
        if head_dim not in ALLOWED_HEAD_DIMS:
            raise ValueError(
                f"model.hidden_size / model.num_heads must be one of {list(ALLOWED_HEAD_DIMS)} "
                f"(vLLM's CPU attention kernels), got {self.hidden_size}/{self.num_heads} = {head_dim}; "
                "change model.num_heads"
            )
        if self.vocab_size < 300:
            raise ValueError(
                f"model.vocab_size must be >= 300 (the 256 byte tokens, the specials and some merges), "
                f"got {self.vocab_size}"
            )
        if self.max_position < 8:
            raise ValueError(f"model.max_position must be >= 8, got {self.max_position}")
        if self.warmstart_max_steps < 0:
            raise ValueError(f"model.warmstart_max_steps must be >= 0, got {self.warmstart_max_steps}")
        if not self.warmstart_lr > 0:
            raise ValueError(f"model.warmstart_lr must be > 0, got {self.warmstart_lr}")
        if not 0.0 <= self.warmstart_target_accuracy <= 1.0:
            raise ValueError(f"model.warmstart_target_accuracy must be in [0, 1], got {self.warmstart_target_accuracy}")
        if not isinstance(self.cache_dir, str) or not self.cache_dir:
            raise ValueError(f"model.cache_dir must be a non-empty path, got {self.cache_dir!r}")

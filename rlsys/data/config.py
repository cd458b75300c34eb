"""Your own prompts (``data.*``): which files, which columns, and how prompts meet the tokenizer.

Light on purpose (no ``datasets`` import): ``rlsys.config`` composes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

CHAT_TEMPLATE_MODES = ("auto", "none")
OVERLONG_MODES = ("drop", "error")
EVAL_SPLITS = ("eval", "test", "validation")
"""Values of the split column that put a row in the held-out set (``"train"`` puts it in training)."""


@dataclass
class DataConfig:
    """Training and evaluation prompts read through the ``datasets`` library.

    Unset (``train_files: null``), the run uses the built-in task (``task.*``)."""

    train_files: Any = None
    """A path or a list of paths: JSONL/JSON (``.jsonl``, ``.json``, ``.jsonl.gz``), parquet,
    CSV, or a directory written by ``datasets``' ``save_to_disk`` (a DatasetDict: its ``train``
    split, and its ``test``/``validation`` split as the eval set when ``eval_files`` is unset)."""
    eval_files: Any = None
    """Held-out prompts, same formats. Unset: the rows of ``train_files`` whose ``split_key``
    column says eval/test/validation, else ``eval_size`` rows carved from the training rows."""
    split_key: str = "split"
    """Column that splits one file into ``train`` and ``eval``/``test``/``validation`` rows
    (used only when ``eval_files`` is unset and the column exists)."""
    eval_size: int = 0
    """Without ``eval_files`` or a split column: hold out this many training rows (seeded)."""
    prompt_key: str = "prompt"
    """Column holding the prompt: a string, or a list of ``{"role", "content"}`` messages."""
    answer_key: str = "answer"
    """Column holding the reference passed to the reward (a string; numbers are turned into one)."""
    id_key: Optional[str] = None
    """Column of unique prompt ids; unset, each id is derived from the prompt's content (stable
    across runs and row order)."""
    system_prompt: Optional[str] = None
    """Prepended as a ``system`` message to every prompt that has none (needs a chat template)."""
    chat_template: str = "auto"
    """``auto``: the tokenizer's chat template when it has one (a string prompt becomes one user
    turn), else the prompt text as it is; ``none``: never (messages are refused); or the path of
    a Jinja template file to use instead of the tokenizer's (saved with the trained policy)."""
    overlong_prompts: str = "drop"
    """A prompt that leaves no room for ``rollout.max_new_tokens`` in the context: ``drop`` it
    (counted, with a warning) or ``error``."""
    seed: int = 0
    """Seed of the ``eval_size`` hold-out."""
    max_eval_prompts: int = 0
    """Evaluate on at most this many held-out prompts (the first ones); 0 = all."""

    def __post_init__(self) -> None:
        for key in ("train_files", "eval_files"):
            value = getattr(self, key)
            paths = [value] if isinstance(value, str) else value
            if value is not None and (
                not isinstance(paths, (list, tuple)) or not paths or not all(isinstance(p, str) and p for p in paths)
            ):
                raise ValueError(f"data.{key} must be a path or a non-empty list of paths, got {value!r}")
        if self.eval_files is not None and self.train_files is None:
            raise ValueError("data.eval_files is set but data.train_files is not; give the training files too")
        for key in ("prompt_key", "answer_key", "split_key"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ValueError(f"data.{key} must be a non-empty column name, got {getattr(self, key)!r}")
        if self.id_key is not None and (not isinstance(self.id_key, str) or not self.id_key):
            raise ValueError(f"data.id_key must be a column name or null, got {self.id_key!r}")
        if self.prompt_key == self.answer_key:
            raise ValueError(f"data.prompt_key and data.answer_key are both {self.prompt_key!r}")
        if not isinstance(self.chat_template, str) or not self.chat_template:
            raise ValueError(f"data.chat_template must be auto, none or a file path, got {self.chat_template!r}")
        if self.overlong_prompts not in OVERLONG_MODES:
            raise ValueError(
                f"data.overlong_prompts must be one of {list(OVERLONG_MODES)}, got {self.overlong_prompts!r}"
            )
        if self.eval_size < 0 or self.max_eval_prompts < 0:
            raise ValueError("data.eval_size and data.max_eval_prompts must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.train_files is not None

    @staticmethod
    def paths(value: Any) -> list[str]:
        return [] if value is None else [value] if isinstance(value, str) else list(value)

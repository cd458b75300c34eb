"""The policy model a run starts from: ``model.path``, or one of the built-in models built and
cached here (``model.kind``: ``char``, the character-level Llama of :mod:`rlsys.tasks.tinymodel`;
``chat``, the Qwen2 chat model of :mod:`rlsys.tasks.chatmodel`)."""

from __future__ import annotations

from pathlib import Path

from rlsys.tasks import tinymodel
from rlsys.tasks.arithmetic import TaskConfig
from rlsys.tasks.config import ModelConfig


def ensure_model(model_cfg: ModelConfig, task_cfg: TaskConfig) -> Path:
    """Directory of the policy model (built and cached on a miss)."""
    if model_cfg.path is None and model_cfg.kind == "chat":
        from rlsys.tasks.chatmodel import ensure_chat_model

        return ensure_chat_model(model_cfg, task_cfg)
    return tinymodel.ensure_model(model_cfg, task_cfg)

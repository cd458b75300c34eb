"""What a run trains on: the policy model (a directory, or the tiny model built here), the id
that pads its batches, and its training and held-out prompts, tokenized by its own tokenizer."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional

from rlsys.config import ConfigError, RunConfig
from rlsys.data.loading import read_sources
from rlsys.data.prompts import PromptSet, build_prompts, task_sources
from rlsys.tasks.arithmetic import load_task
from rlsys.tasks.models import ensure_model

log = logging.getLogger(__name__)


def log_prompts(model_path: str, prompts: PromptSet, seconds: float) -> None:
    log.info(
        "model %s; %d train / %d eval prompts from %s (%.1fs)%s",
        model_path,
        len(prompts.train),
        len(prompts.eval),
        ", ".join(prompts.sources),
        seconds,
        f"; {prompts.dropped_overlong} over-long prompts dropped" if prompts.dropped_overlong else "",
    )
    how = " (chat template applied)" if prompts.templated else ""
    log.info("a training prompt as the policy sees it%s: %r", how, prompts.train[0].prompt)


def prompts_for(cfg: RunConfig, sources: Optional[tuple] = None) -> tuple[str, int, PromptSet]:
    """The policy model (built and cached when ``model.path`` is unset), the id that pads its
    batches (the pad token, else eos: Llama-3-style tokenizers have no pad token, and padded
    positions are masked anyway), and the prompts rendered and tokenized for it
    (rlsys/data/prompts.py): the user's ``data.*`` files (``sources``, already read), else the
    built-in task's rows."""
    from transformers import AutoTokenizer

    if cfg.task.data_path and cfg.model.path:
        raise ConfigError(
            "task.data_path is the built-in tiny model's task format; for your own model give the same file as "
            "data.train_files (its 'split' column splits train and eval; data.id_key=id keeps its ids)"
        )
    model_path = str(ensure_model(cfg.model, cfg.task))
    tok = AutoTokenizer.from_pretrained(model_path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        raise ConfigError(f"the tokenizer of {model_path} has neither a pad nor an eos token; give it one of them")
    hf = json.loads((Path(model_path) / "config.json").read_text())
    context = cfg.rollout.max_model_len or int(hf.get("max_position_embeddings", 2048))
    limit = context - cfg.rollout.max_new_tokens
    if limit < 1:
        raise ConfigError(
            f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room for a prompt in the model's "
            f"{context}-token context ({model_path}); lower it"
            + ("" if cfg.rollout.max_model_len else " or set rollout.max_model_len")
        )
    if cfg.data.enabled:
        train, held_out = sources if sources is not None else read_sources(cfg.data)
        return model_path, pad_id, build_prompts(cfg.data, tok, limit, train, held_out)
    task = load_task(cfg.task)
    name = cfg.task.data_path or f"task {cfg.task.name}"
    data_cfg = dataclasses.replace(cfg.data, id_key="id", overlong_prompts="error")
    return (
        model_path,
        pad_id,
        build_prompts(
            data_cfg, tok, limit, task_sources(task.train, f"{name} (train)"), task_sources(task.eval, f"{name} (eval)")
        ),
    )


def check_learner(cfg: RunConfig, model_path: str, prompts: PromptSet) -> None:
    """Learner options that cannot work with this model or these prompts, refused before any
    actor starts: a token budget the longest sequence cannot fit, LoRA targets that match no
    module of the model (checked on its architecture alone, without reading weights)."""
    lc = cfg.learner
    if lc.max_tokens_per_micro_batch:
        longest = max((len(p.prompt_token_ids) for p in prompts.train), default=0) + cfg.rollout.max_new_tokens
        if longest > lc.max_tokens_per_micro_batch:
            raise ConfigError(
                f"learner.max_tokens_per_micro_batch={lc.max_tokens_per_micro_batch} is smaller than the longest "
                f"sequence a step can hold: {longest} tokens (the longest training prompt plus "
                f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}); raise it to at least {longest}"
            )
    if lc.lora.enabled:
        from rlsys.learner.lora import check_lora_targets

        try:
            check_lora_targets(model_path, lc.lora)
        except ValueError as e:
            raise ConfigError(str(e)) from None

"""Checkpoints of a run, and resuming from one (``checkpoint.*``, ``resume=<dir>``).

Layout (one directory per checkpoint, under ``<run dir>/checkpoints`` unless
``checkpoint.dir`` says otherwise)::

    step_000012/
        hf/            the policy in Hugging Face format (config, safetensors, tokenizer):
                       loadable by transformers and vLLM as it is
        learner/       DeepSpeed's checkpoint (tag "learner"): module and optimizer state of
                       every rank (ZeRO partitions included)
        state.json     step, policy version, scheduler state (per-prompt statistics, the
                       pass over the prompts and its RNG), progress curves, the replay run id
    latest             text file naming the newest complete checkpoint directory

A checkpoint is written into ``step_XXXXXX.tmp`` and renamed when complete, so a directory
without the suffix is always whole; after each save only the newest ``keep_last`` remain.

When: after a learner step's weights reached every rollout worker and *before* the step is
committed to the replay store (version advanced, groups acknowledged). In synchronous mode
(``replay.max_staleness=0``) producers are parked at the admission gate then, so the
scheduler state is exactly "after planning this step" and nothing is in flight: a resumed
run replays the uninterrupted one (with ``rollout.reproducible``, sampling is seeded per
request, so even the samples match). With max_staleness >= 1, groups generated ahead are
in flight: on the in-process store they are lost and regenerated from later prompts; on
Redis (same run id, kept in state.json) stored groups survive and are delivered after resume.

Multi-node: every learner rank writes its DeepSpeed shard and the controller writes
state.json, so ``checkpoint.dir`` must be on a filesystem all nodes share.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

STATE_FILE, LATEST_FILE = "state.json", "latest"
HF_DIR, LEARNER_DIR, LEARNER_TAG = "hf", "learner", "learner"
ADAPTER_DIR = "adapter"
"""LoRA runs: the adapters alone (peft format) beside the merged policy in ``hf/``."""
STATE_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)
POLICY_DIR = "policy"
"""The trained policy of a run, always written at its end: ``<run dir>/policy``."""


@dataclass
class CheckpointConfig:
    """Periodic checkpoints (``resume=<dir>`` continues from one)."""

    every_steps: int = 0
    """Save after every k learner steps (and after the last step); 0 = never."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted after each save."""
    dir: str = ""
    """Where checkpoints go; '' = <run dir>/checkpoints (use a shared filesystem on clusters)."""

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


class CheckpointError(ValueError):
    """``resume`` does not point at a usable checkpoint."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def is_due(cfg: CheckpointConfig, step: int, last_step: int) -> bool:
    """Save after learner step ``step`` (1-based)?"""
    return cfg.every_steps > 0 and (step % cfg.every_steps == 0 or step == last_step)


def resolve(path: str, key: str = "resume=") -> Path:
    """A checkpoint directory from ``resume=``: the directory itself, a checkpoints root or a
    run directory (its newest checkpoint, via ``latest``)."""
    p = Path(path).expanduser()
    for cand in (p, p / "checkpoints"):
        if (cand / STATE_FILE).is_file():
            return cand
        latest = cand / LATEST_FILE
        if latest.is_file():
            target = cand / latest.read_text().strip()
            if (target / STATE_FILE).is_file():
                return target
    raise CheckpointError(
        f"{key}{path!r}: no checkpoint there (expected {STATE_FILE}, or a '{LATEST_FILE}' file "
        f"naming one, in it or in its checkpoints/ directory{'' if key else ', or a policy/ directory'})"
    )


def read_state(ckpt: Path) -> dict:
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt / STATE_FILE} is unreadable: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{ckpt / STATE_FILE} must hold a JSON object, got {type(state).__name__}; the checkpoint is damaged"
        )
    if state.get("state_version") != STATE_VERSION:
        raise CheckpointError(
            f"{ckpt} has checkpoint format {state.get('state_version')!r}; this rlsys reads {STATE_VERSION}"
        )
    for sub in (HF_DIR, LEARNER_DIR):
        if not (ckpt / sub).is_dir():
            raise CheckpointError(f"{ckpt} is incomplete: no {sub}/ directory")
    return state


def begin(root: Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step``."""
    tmp = step_dir(root, step).with_suffix(".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, state: dict, tokenizer_from: Path, keep_last: int, chat_template: Optional[str] = None) -> Path:
    """Write state.json and the tokenizer (:func:`complete_policy`), publish ``tmp`` under its
    final name, update ``latest`` and prune old checkpoints. Returns the final directory."""
    complete_policy(tmp / HF_DIR, tokenizer_from, chat_template)
    (tmp / STATE_FILE).write_text(json.dumps({"state_version": STATE_VERSION, **state}, indent=1) + "\n")
    final = tmp.with_suffix("")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = final.parent / (LATEST_FILE + ".tmp")
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, final.parent / LATEST_FILE)
    kept = sorted(p for p in final.parent.glob("step_*") if p.is_dir() and p.suffix != ".tmp")
    for old in kept[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def root_for(cfg: CheckpointConfig, run_dir: Path) -> Path:
    return Path(cfg.dir).expanduser() if cfg.dir else Path(run_dir) / "checkpoints"


def describe(ckpt: Optional[Path], state: Optional[dict]) -> str:
    if ckpt is None or state is None:
        return "no checkpoint"
    return f"checkpoint {ckpt} (step {state['step']}, policy version {state['version']})"


def complete_policy(directory: Path, model_path: Path, chat_template: Optional[str] = None) -> None:
    """Make a directory of saved weights a model directory ``transformers`` and vLLM load as is:
    the base model's tokenizer files and ``generation_config.json`` where missing, and the run's
    chat template (``data.chat_template=PATH``) as ``chat_template.jinja``."""
    directory, model_path = Path(directory), Path(model_path)
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (model_path / name).is_file() and not (directory / name).is_file():
            shutil.copy2(model_path / name, directory / name)
    if chat_template:
        (directory / "chat_template.jinja").write_text(Path(chat_template).expanduser().read_text())
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():  # the file wins over a template inside tokenizer_config.json: keep one
            config = json.loads(config_path.read_text())
            if config.pop("chat_template", None) is not None:
                config_path.write_text(json.dumps(config, indent=2) + "\n")


def export(path: str, out: Path) -> Path:
    """``rlsys export``: copy the policy of a checkpoint (a checkpoint directory; a run directory:
    its newest checkpoint, else its final ``policy/``; or a model directory) to ``out`` as a plain
    Hugging Face model directory."""
    src = Path(path).expanduser()
    weights = ("model.safetensors", "model.safetensors.index.json")

    def is_model(d: Path) -> bool:
        return (d / "config.json").is_file() and any((d / w).is_file() for w in weights)

    if is_model(src):
        hf = src
    else:
        try:
            hf = resolve(path, key="") / HF_DIR
        except CheckpointError:
            if not is_model(src / POLICY_DIR):  # a run without checkpoints: its final policy
                raise
            hf = src / POLICY_DIR
        if not hf.is_dir():
            raise CheckpointError(f"{hf.parent} is incomplete: no {HF_DIR}/ directory")
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; choose a new directory")
    shutil.copytree(hf, out, dirs_exist_ok=True)
    for need in ("config.json", "tokenizer_config.json"):
        if not (out / need).is_file():
            raise CheckpointError(f"{hf} has no {need}; it is not a complete policy")
    return out

"""Building the fast reward model on the built-in task (toy-side code: the preference data and the
training recipe; the model classes it trains live in :mod:`rlsys.reward.reward_model`).

:func:`ensure_reward_model` returns a cached directory holding both forms, pairwise and
pointwise (its layout and the build steps are described in :mod:`rlsys.reward.reward_model`).
Cache invariants are those of :mod:`rlsys.tasks.tinymodel`: an entry is complete or absent, and
the same configs give bit-identical weights (seeded, one thread).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

from rlsys.reward.config import RewardModelConfig
from rlsys.reward.reward_model import (
    BUILD_VERSION,
    META_FILE,
    MISTAKE_KINDS,
    PAIRWISE_DIR,
    POINTWISE_DIR,
    REPORT_FILE,
    PairwiseRewardModel,
    PointwiseRewardModel,
    _pad,
)
from rlsys.tasks.arithmetic import Example, TaskConfig, load_task
from rlsys.tasks.tinymodel import _torch_threads, build_tokenizer, cached_build, config_key, save_tokenizer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- preference data


def _operands(prompt: str) -> tuple[int, int]:
    left, _, right = prompt.rstrip("=").partition("+")
    return int(left), int(right)


def wrong_answers(prompt: str, answer: str, k: int, rng: random.Random) -> list[tuple[str, str]]:
    """k distinct wrong answers (kind, text) to an addition prompt, the kind drawn uniformly from
    :data:`MISTAKE_KINDS` (a kind that yields nothing new for this prompt is redrawn):

    - ``digit``: one digit of the answer changed by +-1 (mod 10);
    - ``place``: the answer +- 10^k for a place k (the carry propagates);
    - ``carry``: a carry dropped or added (digit-wise sum without carry, or +-10 at a place
      whose column carried / did not);
    - ``swap``: two adjacent, different digits transposed;
    - ``length``: a digit dropped or duplicated;
    - ``operand``: one operand, or the difference of the operands.

    Answers of non-addition prompts get ``digit``, ``place``, ``swap`` and ``length`` mistakes only.
    """
    try:
        x, y = _operands(prompt)
    except ValueError:
        x = y = None
    true = answer
    seen, out = {true}, []
    for _ in range(50 * k):
        if len(out) == k:
            break
        kind = rng.choice(MISTAKE_KINDS)
        text = _mistake(kind, true, x, y, rng)
        if text is None or text in seen or not text:
            continue
        seen.add(text)
        out.append((kind, text))
    return out


def _mistake(kind: str, answer: str, x: Optional[int], y: Optional[int], rng: random.Random) -> Optional[str]:
    digits = list(answer)
    if not answer.isdigit():
        return None
    value = int(answer)
    if kind == "digit":
        i = rng.randrange(len(digits))
        digits[i] = str((int(digits[i]) + rng.choice((1, -1))) % 10)
        return str(int("".join(digits)))
    if kind == "place":
        return str(max(0, value + rng.choice((1, -1)) * 10 ** rng.randrange(len(answer))))
    if kind == "carry":
        if x is None:
            return None
        if rng.random() < 0.5:
            xs, ys = str(x)[::-1], str(y)[::-1]
            n = max(len(xs), len(ys))
            cols = [(int(xs[i]) if i < len(xs) else 0) + (int(ys[i]) if i < len(ys) else 0) for i in range(n)]
            return str(int("".join(str(c % 10) for c in cols)[::-1]))
        place = rng.randrange(1, len(answer) + 1)
        return str(max(0, value + rng.choice((10, -10)) * 10 ** (place - 1)))
    if kind == "swap":
        spots = [i for i in range(len(digits) - 1) if digits[i] != digits[i + 1]]
        if not spots:
            return None
        i = rng.choice(spots)
        digits[i], digits[i + 1] = digits[i + 1], digits[i]
        return str(int("".join(digits)))
    if kind == "length":
        i = rng.randrange(len(digits))
        if rng.random() < 0.5 and len(digits) > 1:
            del digits[i]
        else:
            digits.insert(i, digits[i])
        return str(int("".join(digits)))
    if kind == "operand":
        if x is None:
            return None
        return str(rng.choice((x, y, abs(x - y))))
    raise ValueError(f"unknown mistake kind {kind!r}; one of {MISTAKE_KINDS}")


@dataclass(frozen=True)
class PreferenceData:
    """Labelled pairs (prompt, a, b): label 1 when a is the better (correct) response."""

    prompts: list[str]
    a: list[str]
    b: list[str]
    label: np.ndarray
    """float [P] training label, flipped with probability label_noise."""
    clean_label: np.ndarray
    """float [P] true label (a is the correct answer)."""
    kind: list[str]
    """Mistake kind of the wrong response of each pair."""

    def __len__(self) -> int:
        return len(self.prompts)


def preference_data(
    examples: Sequence[Example], negatives_per_prompt: int, label_noise: float, seed: int
) -> PreferenceData:
    """(correct, wrong) pairs for each example, in random order, labels flipped with probability
    ``label_noise``. Wrong-vs-wrong pairs are never made: they have no label."""
    rng = random.Random(seed)
    prompts, a, b, label, clean, kinds = [], [], [], [], [], []
    for ex in examples:
        for kind, wrong in wrong_answers(ex.prompt, ex.answer, negatives_per_prompt, rng):
            first_correct = rng.random() < 0.5
            prompts.append(ex.prompt)
            a.append(ex.answer if first_correct else wrong)
            b.append(wrong if first_correct else ex.answer)
            clean.append(float(first_correct))
            label.append(float(first_correct) if rng.random() >= label_noise else float(not first_correct))
            kinds.append(kind)
    return PreferenceData(prompts, a, b, np.array(label), np.array(clean), kinds)


# ----------------------------------------------------------------------------- training


def _lr_at(step: int, total: int, lr: float) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _fit(step_loss, params, cfg: RewardModelConfig, steps: int, n: int, what: str) -> list[list[float]]:
    """AdamW over ``steps`` batches of indices into n rows; returns [[step, mean loss], ...]."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    order = torch.Generator().manual_seed(cfg.seed + 1)
    perm, cursor = torch.randperm(n, generator=order), 0
    history, running = [], []
    from rlsys.tasks.tinymodel import progress_bar

    bar = progress_bar(steps, what)
    for step in range(steps):
        if cursor + cfg.batch_size > n:
            perm, cursor = torch.randperm(n, generator=order), 0
        batch = perm[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, cfg.lr)
        loss = step_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        running.append(loss.item())
        bar.update()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            history.append([step + 1, float(np.mean(running))])
            running = []
            bar.set_postfix(loss=f"{history[-1][1]:.4f}")
            if len(history) % 10 == 0 or step + 1 == steps:
                log.info("%s step %d/%d: loss %.4f", what, step + 1, steps, history[-1][1])
    bar.close()
    return history


def train_pairwise(
    cfg: RewardModelConfig, data: PreferenceData, tok: Optional[PreTrainedTokenizerFast] = None
) -> tuple[PairwiseRewardModel, dict]:
    """A seeded pairwise model trained on ``data`` (BCE on ``data.label``, plus the auxiliary
    head's), then its precision matrix accumulated in one pass over the same pairs with the
    final weights. Same inputs, same weights (on one torch thread); the caller's RNG is untouched."""
    started = time.monotonic()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = PairwiseRewardModel(cfg, tok)
        seqs = model.encode(data.prompts, data.a, data.b)
        ids_NL, last_N = _pad(seqs, model.tok.pad_token_id)
        label_N = torch.tensor(data.label, dtype=torch.float32)
        model.train()

        def step_loss(batch: torch.Tensor) -> torch.Tensor:
            width = int(last_N[batch].max()) + 1
            pooled_BH = model.pooled(ids_NL[batch, :width], last_N[batch])
            logit_B = model.head.out(model.head.features(pooled_BH)).squeeze(-1)
            loss = F.binary_cross_entropy_with_logits(logit_B, label_N[batch])
            if cfg.aux_loss_weight > 0:
                aux_B = model.aux(pooled_BH).squeeze(-1)
                loss = loss + cfg.aux_loss_weight * F.binary_cross_entropy_with_logits(aux_B, label_N[batch])
            return loss

        history = _fit(step_loss, list(model.parameters()), cfg, cfg.steps, len(seqs), "pairwise")
    model.eval()
    model.head.refine_spectral_norm()
    with torch.no_grad():
        model.head.reset_precision()
        for start in range(0, len(seqs), 1024):
            rows = torch.arange(start, min(start + 1024, len(seqs)))
            width = int(last_N[rows].max()) + 1
            _, phi_ND = model(ids_NL[rows, :width], last_N[rows])
            model.head.accumulate_precision(phi_ND)
        model.head.finalize_covariance()
    report = {
        "steps": cfg.steps,
        "pairs": len(seqs),
        "seconds": round(time.monotonic() - started, 3),
        "loss_history": history,
    }
    return model, report


def train_pointwise(
    cfg: RewardModelConfig, data: PreferenceData, tok: Optional[PreTrainedTokenizerFast] = None
) -> tuple[PointwiseRewardModel, dict]:
    """A seeded pointwise model trained on every response of ``data`` with the noisy labels
    (a correct response is labelled 1 unless its pair's label was flipped). Same inputs, same
    weights (on one torch thread); the caller's RNG is untouched."""
    started = time.monotonic()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 2)
        model = PointwiseRewardModel.create(cfg, tok)
        prompts = [*data.prompts, *data.prompts]
        responses = [*data.a, *data.b]
        label_N = torch.tensor(np.concatenate([data.label, 1.0 - data.label]), dtype=torch.float32)
        ids_NL, last_N = _pad(model.encode(prompts, responses), model.tok.pad_token_id)
        model.model.train()

        def step_loss(batch: torch.Tensor) -> torch.Tensor:
            width = int(last_N[batch].max()) + 1
            return F.binary_cross_entropy_with_logits(model.logits(ids_NL[batch, :width]), label_N[batch])

        history = _fit(step_loss, list(model.model.parameters()), cfg, cfg.pointwise_steps, len(responses), "pointwise")
    model.model.eval()
    return model, {
        "steps": cfg.pointwise_steps,
        "responses": len(responses),
        "seconds": round(time.monotonic() - started, 3),
        "loss_history": history,
    }


def pairwise_accuracy(logit: np.ndarray, clean_label: np.ndarray) -> float:
    """Fraction of pairs whose logit has the sign of the true preference (0 counts as wrong)."""
    truth = np.where(np.asarray(clean_label) > 0.5, 1.0, -1.0)
    return float(np.mean(np.sign(logit) == truth))


# ----------------------------------------------------------------------------- building


def ensure_reward_model(cfg: RewardModelConfig, task_cfg: TaskConfig) -> Path:
    """Directory of the reward model: ``cfg.path`` if set, else the cached (or newly built and
    trained) models for these configs. See the module docstring."""
    if cfg.path is not None:
        path = Path(cfg.path).expanduser()
        if not (path / PAIRWISE_DIR / META_FILE).is_file():
            raise FileNotFoundError(
                f"reward.model.path={cfg.path!r} is not a reward-model directory (no {PAIRWISE_DIR}/{META_FILE})"
            )
        return path
    return cached_build(
        Path(cfg.cache_dir).expanduser(),
        cache_key(cfg, task_cfg),
        lambda out: build(cfg, task_cfg, out),
        "reward model",
    )


def cache_key(cfg: RewardModelConfig, task_cfg: TaskConfig) -> str:
    """sha256 naming the cache entry of these configs (see the module docstring)."""
    return config_key(BUILD_VERSION, "reward_model", cfg, task_cfg)


def build(cfg: RewardModelConfig, task_cfg: TaskConfig, out_dir: Path) -> dict:
    """Train both forms on ``task.train`` and save them into ``out_dir``; returns the report
    (also written to train_report.json), with clean pairwise accuracy on ``task.val``."""
    started = time.monotonic()
    task = load_task(task_cfg)
    tok = build_tokenizer(cfg.max_position)
    train = preference_data(task.train, cfg.negatives_per_prompt, cfg.label_noise, cfg.seed)
    val = preference_data(task.val, cfg.negatives_per_prompt, 0.0, cfg.seed + 1)
    with _torch_threads():
        pairwise, pair_report = train_pairwise(cfg, train, tok)
        val_logit, _ = pairwise.score_pairs(val.prompts, val.a, val.b)
        pair_report["val_accuracy"] = pairwise_accuracy(val_logit, val.clean_label)
        pairwise.save(Path(out_dir) / PAIRWISE_DIR)
        report = {"pairwise": pair_report, "build_version": BUILD_VERSION}
        if cfg.pointwise_steps > 0:
            pointwise, point_report = train_pointwise(cfg, train, tok)
            sa, sb = pointwise.score(val.prompts, val.a), pointwise.score(val.prompts, val.b)
            point_report["val_pairwise_accuracy"] = pairwise_accuracy(sa - sb, val.clean_label)
            pointwise.save(Path(out_dir) / POINTWISE_DIR)
            report["pointwise"] = point_report
    save_tokenizer(tok, Path(out_dir))
    report["seconds"] = round(time.monotonic() - started, 3)
    log.info("reward model built in %.1f s: pairwise val accuracy %.3f", report["seconds"], pair_report["val_accuracy"])
    (Path(out_dir) / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report

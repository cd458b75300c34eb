"""Advantages and policy-gradient losses (pure numpy / torch; no Ray, no DeepSpeed).

Shape legend for tensors: B = sequences in a micro-batch, T = token positions.
``*_BT`` tensors are aligned so that position t holds the log-probability of token t
*given tokens < t*; ``mask_BT`` is 1 on completion tokens and 0 on prompt and padding.

References (docs/algorithms.md §4, §5):
- GRPO advantage ``(r - mean(r_group)) / (std(r_group) + eps)``; clipped-ratio objective.
- Dr. GRPO: no std division; token sum divided by a constant instead of each length.
- DAPO: clip-higher (eps_low 0.2, eps_high 0.28) and token-level mean over the batch.
- Truncated importance sampling (TIS): a detached per-token weight
  ``min(pi_old / pi_behav, C)`` multiplied into the per-token loss before aggregation,
  correcting for stale or numerically mismatched vLLM behaviour log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from rlsys.learner.config import LossConfig

AdvantageNorm = Literal["std", "none"]
LossAggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


def group_advantages(rewards: np.ndarray, cfg: LossConfig) -> np.ndarray:
    """Per-completion advantages of one group (any size >= 1).

    >>> group_advantages(np.array([1., 0., 0., 0.]), LossConfig())  # doctest: +ELLIPSIS
    array([ 1.73...,  -0.57..., -0.57..., -0.57...], dtype=float32)

    A group whose rewards are all equal gets zeros: it carries no GRPO gradient.
    """
    r = np.asarray(rewards, dtype=np.float64)
    adv = r - r.mean()
    if cfg.advantage_norm == "std":
        adv = adv / (r.std() + cfg.eps)
    if cfg.advantage_clip > 0:
        adv = np.clip(adv, -cfg.advantage_clip, cfg.advantage_clip)
    return adv.astype(np.float32)


@dataclass
class LossNormalizer:
    """Global counts over the whole optimizer step (all ranks, all micro-batches), so that
    the loss is the same however the batch is sharded."""

    num_tokens: int
    num_seqs: int
    max_new_tokens: int


def policy_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    behav_logprobs_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    cfg: LossConfig,
    norm: LossNormalizer,
    seq_ids_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-ratio policy loss for one micro-batch, as this micro-batch's share of the
    global objective (summing it over micro-batches and ranks gives the full loss).

    ratio = pi_theta / pi_old; per-token loss = max(-A ratio, -A clip(ratio, 1-el, 1+eh)),
    times the detached TIS weight min(pi_old / pi_behav, C) when tis_cap > 0.

    Packed rows (several sequences per row) pass ``seq_ids_BT``: each token's sequence, an
    index into ``advantages_B`` (then of length S, the sequences), -1 on padding.
    """
    mask_BT = mask_BT.to(logprobs_BT.dtype)
    if seq_ids_BT is None:
        adv_BT = advantages_B[:, None].to(logprobs_BT.dtype)
    else:
        adv_BT = advantages_B.to(logprobs_BT.dtype)[seq_ids_BT.clamp(min=0)]
    log_ratio_BT = (logprobs_BT - old_logprobs_BT) * mask_BT
    ratio_BT = torch.exp(log_ratio_BT)
    clipped_BT = torch.clamp(ratio_BT, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    per_token_BT = torch.maximum(-adv_BT * ratio_BT, -adv_BT * clipped_BT)
    tis_BT = torch.ones_like(per_token_BT)
    if cfg.tis_cap > 0:
        tis_BT = torch.exp((old_logprobs_BT - behav_logprobs_BT) * mask_BT).clamp(max=cfg.tis_cap).detach()
        per_token_BT = per_token_BT * tis_BT
    per_token_BT = per_token_BT * mask_BT

    if cfg.aggregation == "token_mean":
        loss = per_token_BT.sum() / max(norm.num_tokens, 1)
    elif cfg.aggregation == "seq_mean_token_mean":
        if seq_ids_BT is None:
            sums_S, lengths_S = per_token_BT.sum(-1), mask_BT.sum(-1)
        else:  # per sequence of the packed rows
            ids, zeros = seq_ids_BT.clamp(min=0).flatten(), per_token_BT.new_zeros(len(advantages_B))
            sums_S = zeros.index_add(0, ids, per_token_BT.flatten())
            lengths_S = zeros.index_add(0, ids, mask_BT.flatten())
        loss = (sums_S / lengths_S.clamp(min=1.0)).sum() / max(norm.num_seqs, 1)
    else:  # seq_mean_token_sum_norm (Dr. GRPO)
        loss = per_token_BT.sum() / max(norm.num_seqs * norm.max_new_tokens, 1)

    with torch.no_grad():
        n = mask_BT.sum().clamp(min=1.0)
        clipped = ((ratio_BT - clipped_BT).abs() > 0).to(mask_BT.dtype) * mask_BT
        behav_kl = (behav_logprobs_BT - logprobs_BT) * mask_BT  # k1 estimator of KL(behav || theta)
        stats = {
            "clip_fraction": float(clipped.sum() / n),
            "ratio_mean": float((ratio_BT * mask_BT).sum() / n),
            "tis_weight_mean": float((tis_BT * mask_BT).sum() / n),
            "behav_kl": float(behav_kl.sum() / n),
            "tokens": float(n),
        }
    return loss, stats


def token_logprobs(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each next token: out[b, t] = log p(input_ids[b, t] | input_ids[b, <t]).

    Position 0 (no context) is set to 0. Logits are divided by the sampling temperature so
    they match vLLM's processed log-probabilities.
    """
    logits = logits_BTV[:, :-1].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    picked_BT = torch.gather(logp, -1, input_ids_BT[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(picked_BT, (1, 0), value=0.0)

"""Turn scored groups into padded training tensors, and shard them over learner ranks (pure).

Layout of one sequence (P prompt tokens, R completion tokens, padded to T):

    input_ids  = [p_0 .. p_{P-1}, c_0 .. c_{R-1}, pad ...]
    mask       = [0 ..        0,  1  ..      1,  0   ...]
    behav      = [0 ..        0,  lp(c_0) .. lp(c_{R-1}), 0 ...]

so ``mask[t] == 1`` exactly where ``input_ids[t]`` is a generated token, matching
``losses.token_logprobs`` (position t holds log p(token t | tokens < t)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rlsys.learner.config import LossConfig
from rlsys.learner.losses import group_advantages
from rlsys.records import STOP_GRADIENT, Group


@dataclass
class TrainBatch:
    input_ids: np.ndarray  # int64 [B, T]
    attention_mask: np.ndarray  # int64 [B, T]
    mask: np.ndarray  # float32 [B, T], 1 on completion tokens
    behav_logprobs: np.ndarray  # float32 [B, T]
    advantages: np.ndarray  # float32 [B]

    @property
    def num_seqs(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def select(self, idx: np.ndarray) -> "TrainBatch":
        idx = np.asarray(idx, dtype=np.int64)
        t = int(self.attention_mask[idx].sum(1).max()) if len(idx) else 1
        return TrainBatch(
            self.input_ids[idx, :t],
            self.attention_mask[idx, :t],
            self.mask[idx, :t],
            self.behav_logprobs[idx, :t],
            self.advantages[idx],
        )


def build_batch(groups: list[Group], loss_cfg: LossConfig, pad_id: int) -> TrainBatch:
    rows = []
    for g in groups:
        if g.rewards is None:
            raise ValueError(f"group {g.group_id} has no rewards; score it before training")
        if g.advantages is not None:  # pairwise (leave-one-out) advantages from the reward stage
            adv = np.asarray(g.advantages, np.float32)
            if loss_cfg.advantage_clip > 0:
                adv = np.clip(adv, -loss_cfg.advantage_clip, loss_cfg.advantage_clip)
        else:
            adv = group_advantages(g.rewards, loss_cfg)
        frozen = set(g.meta.get(STOP_GRADIENT, ()))
        for i, (c, a) in enumerate(zip(g.completions, adv)):
            if i in frozen:  # in the baseline above, not in the loss
                continue
            rows.append((np.asarray(g.prompt_token_ids, np.int64), c.token_ids.astype(np.int64), c.logprobs, a))
    t = max(len(p) + len(c) for p, c, _, _ in rows)
    b = len(rows)
    input_ids = np.full((b, t), pad_id, dtype=np.int64)
    attn = np.zeros((b, t), dtype=np.int64)
    mask = np.zeros((b, t), dtype=np.float32)
    behav = np.zeros((b, t), dtype=np.float32)
    adv = np.zeros(b, dtype=np.float32)
    for i, (p, c, lp, a) in enumerate(rows):
        n = len(p) + len(c)
        input_ids[i, : len(p)] = p
        input_ids[i, len(p) : n] = c
        attn[i, :n] = 1
        mask[i, len(p) : n] = 1.0
        behav[i, len(p) : n] = lp
        adv[i] = a
    return TrainBatch(input_ids, attn, mask, behav, adv)


def contributing_rows(batch: TrainBatch, at_least: int) -> np.ndarray:
    """Indices of the sequences whose advantage is not 0, topped up with zero-advantage ones
    to ``at_least`` (every rank needs a sequence to keep the collective schedule).

    With no KL term a zero-advantage sequence adds exactly 0 to the loss and its gradient, so
    training on these rows, with a ``LossNormalizer`` counted over the whole batch, gives the
    same update as training on all of them."""
    live = np.flatnonzero(batch.advantages != 0)
    if len(live) >= at_least:
        return live
    rest = np.flatnonzero(batch.advantages == 0)[: at_least - len(live)]
    return np.sort(np.concatenate([live, rest]))


def shard_indices(lengths: np.ndarray, world_size: int) -> list[np.ndarray]:
    """Split sequences over ranks balancing token counts (longest first, to the lightest
    rank). Every rank gets at least one sequence when there are enough."""
    order = np.argsort(-lengths, kind="stable")
    loads = np.zeros(world_size)
    parts: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        r = int(np.argmin(loads))
        parts[r].append(int(i))
        loads[r] += lengths[i]
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


def micro_batches(num_seqs: int, accum_steps: int) -> list[np.ndarray]:
    """Contiguous index chunks for gradient accumulation (some may be empty)."""
    return [c for c in np.array_split(np.arange(num_seqs), accum_steps)]

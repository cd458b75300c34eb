"""Turn scored groups into training tensors, shard them over learner ranks and plan each
rank's micro-batches (pure).

Layout of one sequence (P prompt tokens, R completion tokens, padded to T):

    input_ids  = [p_0 .. p_{P-1}, c_0 .. c_{R-1}, pad ...]
    mask       = [0 ..        0,  1  ..      1,  0   ...]
    behav      = [0 ..        0,  lp(c_0) .. lp(c_{R-1}), 0 ...]

so ``mask[t] == 1`` exactly where ``input_ids[t]`` is a generated token, matching
``losses.token_logprobs`` (position t holds log p(token t | tokens < t)).

A *packed* micro-batch (``pack``) is one row holding several such sequences back to back,
with no padding: ``position_ids`` restart at 0 at each sequence and ``seq_ids`` name each
token's sequence (an index into ``advantages``), so attention and the loss can keep the
sequences apart.

Micro-batches (``plan_micro_batches``) are formed by count (``grad_accum_steps`` chunks in
arrival order) or by a token budget (``max_tokens_per_micro_batch``): a balanced bin packing,
by padded tokens (rows x longest) for padded micro-batches and by real tokens for packed ones.
Every rank gets the same number of micro-batches (the gradient collectives are per step, so the
schedules must match); the loss normalisation (``losses.LossNormalizer``) is over the whole
batch, so how it is cut does not change the update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from rlsys.learner.config import LearnerConfig, LossConfig
from rlsys.learner.losses import group_advantages
from rlsys.records import STOP_GRADIENT, Group


@dataclass
class TrainBatch:
    input_ids: np.ndarray  # int64 [B, T]
    attention_mask: np.ndarray  # int64 [B, T]
    mask: np.ndarray  # float32 [B, T], 1 on completion tokens
    behav_logprobs: np.ndarray  # float32 [B, T]
    advantages: np.ndarray  # float32 [S], S sequences (= B unless packed)
    position_ids: Optional[np.ndarray] = None  # int64 [B, T] packed: restarts at 0 per sequence
    seq_ids: Optional[np.ndarray] = None  # int64 [B, T] packed: each token's sequence, -1 on padding

    @property
    def num_seqs(self) -> int:
        return int(self.advantages.shape[0])

    @property
    def packed(self) -> bool:
        return self.seq_ids is not None

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each sequence (prompt and completion)."""
        if self.packed:
            return np.bincount(self.seq_ids[self.seq_ids >= 0], minlength=self.num_seqs)
        return self.attention_mask.sum(1)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def select(self, idx: np.ndarray) -> "TrainBatch":
        """The padded batch of sequences ``idx``, trimmed to the longest of them."""
        if self.packed:
            raise ValueError("select() takes sequences of a padded batch, not a packed one")
        idx = np.asarray(idx, dtype=np.int64)
        t = int(self.attention_mask[idx].sum(1).max()) if len(idx) else 1
        return TrainBatch(
            self.input_ids[idx, :t],
            self.attention_mask[idx, :t],
            self.mask[idx, :t],
            self.behav_logprobs[idx, :t],
            self.advantages[idx],
        )

    def pack(self, idx: np.ndarray) -> "TrainBatch":
        """Sequences ``idx`` of this padded batch, packed back to back into one row."""
        sub = self.select(idx)
        keep = sub.attention_mask.astype(bool)  # sequences are left-aligned: real tokens first
        lengths = keep.sum(1)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        n = int(lengths.sum())
        return TrainBatch(
            sub.input_ids[keep][None],
            np.ones((1, n), np.int64),
            sub.mask[keep][None],
            sub.behav_logprobs[keep][None],
            sub.advantages,
            position_ids=(np.arange(n) - starts)[None].astype(np.int64),
            seq_ids=np.repeat(np.arange(len(lengths)), lengths)[None].astype(np.int64),
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


def split_for_ranks(batch: TrainBatch, world_size: int, cfg: LearnerConfig) -> list[tuple[TrainBatch, list]]:
    """Each rank's (shard, micro-batches): shards balanced by tokens (``shard_indices``), cut
    as ``cfg`` says (``plan_micro_batches``), as many micro-batches on every rank."""
    shards = [batch.select(ix) for ix in shard_indices(batch.lengths, world_size)]
    plan = plan_micro_batches(
        [s.lengths for s in shards], cfg.grad_accum_steps, cfg.max_tokens_per_micro_batch, cfg.packing
    )
    return list(zip(shards, plan))


def micro_batches(num_seqs: int, accum_steps: int) -> list[np.ndarray]:
    """Contiguous index chunks for gradient accumulation (some may be empty)."""
    return [c for c in np.array_split(np.arange(num_seqs), accum_steps)]


def plan_micro_batches(
    shard_lengths: list[np.ndarray], accum_steps: int = 1, max_tokens: int = 0, packed: bool = False
) -> list[list[np.ndarray]]:
    """Each rank's micro-batches, as index lists into its shard; every rank gets the same
    number (some may be empty). ``max_tokens`` 0: ``accum_steps`` chunks in arrival order.
    Otherwise each micro-batch costs at most ``max_tokens``: real tokens when ``packed``, else
    rows x the longest row (padding included), and the ranks' micro-batches are balanced.

    >>> plan_micro_batches([np.array([5, 1, 4, 2])], max_tokens=6, packed=True)
    [[array([0, 1]), array([2, 3])]]
    """
    if max_tokens <= 0:
        return [micro_batches(len(lengths), accum_steps) for lengths in shard_lengths]
    longest = max((int(x.max()) for x in shard_lengths if len(x)), default=0)
    if longest > max_tokens:
        raise ValueError(f"a sequence of {longest} tokens does not fit learner.max_tokens_per_micro_batch={max_tokens}")
    bins = _packed_bins if packed else _padded_bins
    k = max(1, max(len(bins(np.asarray(x), max_tokens, None)) for x in shard_lengths))
    while True:  # one count for every rank; a balanced split into more bins almost always fits
        plan = [bins(np.asarray(x), max_tokens, k) for x in shard_lengths]
        if all(p is not None for p in plan):
            return [p + [np.zeros(0, np.int64)] * (k - len(p)) for p in plan]
        k += 1


def _packed_bins(lengths: np.ndarray, cap: int, k: Optional[int]) -> Optional[list[np.ndarray]]:
    """Longest first into the lightest of k bins (the fewest that fit when k is None); None
    if k bins cannot hold them under ``cap``."""
    if not len(lengths):
        return []
    order = np.argsort(-lengths, kind="stable")
    n = k or max(1, -(-int(lengths.sum()) // cap))
    while True:
        loads, parts = np.zeros(n, np.int64), [[] for _ in range(n)]
        for i in order:
            b = int(np.argmin(loads))
            if loads[b] + lengths[i] > cap:
                break
            parts[b].append(int(i))
            loads[b] += lengths[i]
        else:
            return [np.array(sorted(p), np.int64) for p in parts if p]
        if k is not None:
            return None
        n += 1


def _padded_bins(lengths: np.ndarray, cap: int, k: Optional[int]) -> Optional[list[np.ndarray]]:
    """Runs of similar lengths (longest first), each costing rows x its longest <= the bound:
    the fewest under ``cap`` when k is None, else the smallest bound giving at most k runs."""
    if not len(lengths):
        return []
    order = np.argsort(-lengths, kind="stable")
    ls = lengths[order]

    def runs(bound: int) -> list[np.ndarray]:
        out, start = [], 0
        while start < len(ls):
            end = start + max(1, bound // int(ls[start]))
            out.append(np.sort(order[start:end]))
            start = end
        return out

    if k is None:
        return runs(cap)
    lo, hi = int(ls[0]), cap  # runs(bound) has fewer runs as bound grows
    if len(runs(hi)) > k:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(runs(mid)) <= k else (mid + 1, hi)
    return runs(lo)

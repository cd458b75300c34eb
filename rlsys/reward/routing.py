"""Uncertainty-routed reward: pairwise RM scores, a judge budget, and the pairwise advantage.

Pure numpy: arrays in, arrays and counts out. The reward actor wires these functions to the
pairwise reward model and the LLM judge; nothing here touches Ray, a model or the network.

Method (Uncertainty-routed reward with a fast RM and an LLM judge, arXiv 2510.20369;
docs/algorithms.md §2)
-------------------------------------------------------------------------------------------
Shape legend: n = responses in a group, P = n(n-1)/2 pairs of a group, K = pairs sent to the
judge. Pairs are always listed in ``all_pairs(n)`` order, (0,1), (0,2), ..., (n-2,n-1), i < j.

1. Score. The pairwise RM gives a logit ``l(i, j)`` of P(i better than j) with i shown first.
   Both orders are scored and antisymmetrised, ``s_ij = (l(i,j) - l(j,i)) / 2``, which cancels
   any position bias. Each pair also has an uncertainty u_ij; for an SNGP head the actor
   derives it with ``rm_uncertainty`` (``reward.router.signal``): by default the *predictive*
   uncertainty 1 - |2p - 1| of the head's mean-field probability p = sigmoid(s_ij / sqrt(1 +
   a var)), which is high for a small margin or a large variance; or the variance term alone.
2. Verifier first. With a rule verifier, pairs whose verifier rewards differ are decided by it:
   ``s_ij = r_i - r_j`` (``verifier_separable``). Only the remaining pairs are *candidates* for
   the RM and the judge; their RM logits may be NaN (never computed) on decided pairs.
3. Route. Among candidates, ``select_pairs`` picks the pairs for the judge under a budget:
   ``uncertainty`` (most uncertain first; with threshold tau > 0 only pairs with u > tau),
   ``random``, ``margin`` (smallest |s_ij| first), ``none`` or ``all``.
4. Judge. A verdict v in {+1, -1, 0} replaces s_ij by ``v c`` and s_ji by ``-v c``
   (``apply_verdicts``; c = ``verdict_scale``). A judge that timed out or answered outside the
   strict format (``verdicts.parse_verdict``) gives ``None``: the pair keeps its RM score, counted as a
   fallback.
5. Advantage. With the antisymmetric matrix S, ``A_i = (1/(n-1)) sum_{j != i} S_ij``
   (``pairwise_advantage``). Under Bradley-Terry ``r_i - r_j`` is the logit of P(i > j), so a
   perfect preference model (S_ij = r_i - r_j) gives exactly the leave-one-out advantage.

Scales: verifier differences, RM logits and judge verdicts are all added into one S, so they
should be on comparable scales; for 0/1 verifier rewards and RM logits of order 1, c = 1 is
the natural choice.

Budget (``judge_budget``): ``budget_fraction`` is a fraction of the **step's** pairs — all
pairs of all groups in the batch, verifier-decided ones included, so the number of judge calls
per step is a fixed ceiling known in advance — floored to an integer and capped by
``max_pairs_per_step``. ``route_batch`` ranks candidates across the whole batch, so a group
with many confusing pairs can take more of the budget than a clear one. The budget depends on
the batch only, never on the policy, so every policy sends the same number of pairs
(``min(budget, candidates)``); the exceptions are ``none`` (0), ``all`` (every candidate) and
``uncertainty`` with tau > 0 (only pairs above tau, at most the budget). For a baseline at
equal cost with a threshold, give the baseline the number of pairs the threshold sent.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np

POLICIES = ("uncertainty", "random", "margin", "none", "all")
SIGNALS = ("predictive", "variance")


@dataclass
class RouterConfig:
    """Which pairs of each step go to the LLM judge (``reward.router``).

    Not ``frozen``: OmegaConf makes a frozen dataclass a read-only node, which would reject
    Hydra overrides. Validated once here; treat it as immutable afterwards.
    """

    policy: str = "uncertainty"
    """'uncertainty' (most uncertain RM pairs first; the method), 'random' (random pairs;
    baseline), 'margin' (smallest |RM score| first; baseline), 'none' (RM only) or 'all'
    (judge every candidate pair, ignoring the budget)."""
    budget_fraction: float = 0.2
    """Judge calls per step as a fraction of the step's pairs (all groups, n(n-1)/2 pairs
    each, verifier-decided pairs included), floored to an integer. Same for every policy."""
    max_pairs_per_step: int = 0
    """Hard cap on judge calls per step; 0 = no cap beyond budget_fraction."""
    threshold: float = 0.0
    """tau: with policy=uncertainty and tau > 0, only pairs with uncertainty > tau are
    judged, still at most the budget. 0 = always spend the whole budget."""
    verdict_scale: float = 1.0
    """c: a judge verdict sets s_ij = +c (first better) or -c (second better); a tie sets 0."""
    seed: int = 0
    """Seed of the router's generator (random policy and tie-breaking)."""
    signal: str = "predictive"
    """Which RM uncertainty ranks pairs (``rm_uncertainty``): 'predictive' (how close the SNGP
    head's mean-field predictive probability is to 1/2, in [0, 1]; the default) or 'variance'
    (the GP's sqrt(1 + a var) alone, in [1, sqrt(1 + 2a)]: distance from the training data).
    ``threshold`` is on this signal's scale."""

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise ValueError(f"reward.router.signal must be one of {', '.join(SIGNALS)}; got {self.signal!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"reward.router.policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        if not (_is_number(self.budget_fraction) and 0.0 <= self.budget_fraction <= 1.0):
            raise ValueError(f"reward.router.budget_fraction must be in [0, 1], got {_shown(self.budget_fraction)}")
        m = self.max_pairs_per_step
        if not (isinstance(m, (int, np.integer)) and not isinstance(m, bool) and m >= 0):
            raise ValueError(
                f"reward.router.max_pairs_per_step must be an integer >= 0 (0 = no cap), "
                f"got {_shown(self.max_pairs_per_step)}"
            )
        if not (_is_number(self.threshold) and math.isfinite(self.threshold) and self.threshold >= 0.0):
            raise ValueError(f"reward.router.threshold must be a finite number >= 0, got {_shown(self.threshold)}")
        if self.threshold > 0 and self.policy != "uncertainty":
            raise ValueError(
                f"reward.router.threshold applies only to policy=uncertainty; set "
                f"reward.router.threshold=0 for policy={self.policy}"
            )
        if not (_is_number(self.verdict_scale) and math.isfinite(self.verdict_scale) and self.verdict_scale > 0):
            raise ValueError(
                f"reward.router.verdict_scale must be a finite number > 0, got {_shown(self.verdict_scale)}"
            )


def _is_number(value: object) -> bool:
    """A real number, not a bool or a string (``"0.2" <= 1`` is a TypeError, ``True`` is not a fraction)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_whole(value: object) -> bool:
    """A finite real number without a fractional part (3 or 3.0; not 2.5, NaN or "3")."""
    return _is_number(value) and math.isfinite(value) and int(value) == value


# --------------------------------------------------------------------------- pairwise algebra


def num_pairs(n: int) -> int:
    """n(n-1)/2, the pairs of a group of n responses."""
    return n * (n - 1) // 2


def all_pairs(n: int) -> np.ndarray:
    """int64 [P, 2]: every pair (i, j) with i < j, in row-major order.

    >>> all_pairs(3).tolist()
    [[0, 1], [0, 2], [1, 2]]
    """
    if n < 0:
        raise ValueError(f"group size must be >= 0, got {n}")
    i, j = np.triu_indices(n, k=1)
    return np.stack([i, j], axis=1).astype(np.int64)


def group_size_from_pairs(p: int) -> int:
    """The n with n(n-1)/2 == p; ValueError if there is none."""
    n = int(round((1 + math.sqrt(1 + 8 * p)) / 2))
    if p < 0 or num_pairs(n) != p:
        raise ValueError(f"{p} pairs is not n(n-1)/2 for any group size n; pass one score per pair of all_pairs(n)")
    return n


def antisymmetrize(logit_ij: np.ndarray, logit_ji: np.ndarray) -> np.ndarray:
    """``s_ij = (l(i,j) - l(j,i)) / 2`` from the RM's logits in both presentation orders.

    A constant position bias b (l(i,j) = d + b, l(j,i) = -d + b) cancels: s_ij = d.
    """
    a, b = np.asarray(logit_ij, dtype=np.float64), np.asarray(logit_ji, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"logit_ij and logit_ji must have the same shape, got {a.shape} and {b.shape}")
    return (a - b) / 2.0


def pairwise_matrix(n: int, pairs: np.ndarray, s: np.ndarray) -> np.ndarray:
    """float64 [n, n] antisymmetric S with zero diagonal: S[i, j] = s_k, S[j, i] = -s_k for
    pair k = (i, j). Pairs not listed stay 0 (counted as ties by ``pairwise_advantage``)."""
    pairs = _check_pairs(n, pairs)
    s = np.asarray(s, dtype=np.float64)
    if s.shape != (len(pairs),):
        raise ValueError(f"need one score per pair: {len(pairs)} pairs, scores of shape {s.shape}")
    S = np.zeros((n, n), dtype=np.float64)
    S[pairs[:, 0], pairs[:, 1]] = s
    S[pairs[:, 1], pairs[:, 0]] = -s
    return S


def pairwise_advantage(S: np.ndarray) -> np.ndarray:
    """``A_i = (1/(n-1)) sum_{j != i} S_ij`` for an antisymmetric S [n, n] (zeros for n = 1).

    Leave-one-out identity: a perfect Bradley-Terry preference model has S_ij = r_i - r_j, and
    then ``A_i = (1/(n-1)) sum_{j != i} (r_i - r_j)``, the leave-one-out advantage, which is
    also ``n/(n-1) (r_i - mean(r))``: the mean-centred (Dr. GRPO) advantage up to n/(n-1).

    >>> r = np.array([1.0, 0.0, 0.0, 0.5])
    >>> pairwise_advantage(r[:, None] - r[None, :]).tolist()
    [0.8333333333333334, -0.5, -0.5, 0.16666666666666666]
    """
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"S must be a square [n, n] matrix, got shape {S.shape}")
    if not np.all(np.isfinite(S)):
        raise ValueError("S has non-finite entries; every pair needs a finite score")
    if not np.allclose(S, -S.T, rtol=0.0, atol=1e-9):
        raise ValueError("S must be antisymmetric (S[i, j] == -S[j, i]); build it with pairwise_matrix")
    n = S.shape[0]
    if n < 2:
        return np.zeros(n)
    return S.sum(axis=1) / (n - 1)


def verifier_separable(rewards: np.ndarray) -> np.ndarray:
    """bool [P] over ``all_pairs(n)``: True where the rule verifier's rewards differ.

    Those pairs are decided by the verifier (S_ij = r_i - r_j) and never go to the RM or the
    judge. Rewards are compared exactly: rule verifiers give discrete scores.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or not np.all(np.isfinite(r)):
        raise ValueError("verifier rewards must be a finite 1-D array, one per response")
    pairs = all_pairs(len(r))
    return r[pairs[:, 0]] != r[pairs[:, 1]]


# --------------------------------------------------------------------------- pair selection


def judge_budget(total_pairs: int, cfg: RouterConfig) -> int:
    """Judge calls allowed for a step with ``total_pairs`` pairs (all groups, verifier-decided
    pairs included): ``floor(budget_fraction * total_pairs)``, capped by max_pairs_per_step.

    The same for every policy, so policies are compared at equal judge cost.
    """
    if total_pairs < 0:
        raise ValueError(f"total_pairs must be >= 0, got {total_pairs}")
    budget = int(math.floor(cfg.budget_fraction * total_pairs + 1e-9))  # 0.29 * 100 is 28.999...
    if cfg.max_pairs_per_step > 0:
        budget = min(budget, cfg.max_pairs_per_step)
    return budget


def select_pairs(
    policy: str,
    uncertainty: np.ndarray,
    margin: np.ndarray,
    budget: int,
    rng: np.random.Generator,
    threshold: float = 0.0,
) -> np.ndarray:
    """Indices (int64 [K], into the P candidate pairs) to send to the judge, in priority order.

    - ``none``: no pairs. ``all``: every pair, whatever the budget.
    - ``uncertainty``: the ``budget`` largest uncertainties; with ``threshold`` > 0 only pairs
      with uncertainty > threshold, at most ``budget`` of them.
    - ``random``: ``budget`` pairs uniformly without replacement.
    - ``margin``: the ``budget`` smallest ``|margin|`` (margin = the RM's s_ij; sign ignored).

    Otherwise K = min(budget, P) exactly. Ties in uncertainty or margin are broken at random
    (by ``rng``), so equal scores do not systematically favour low pair indices.

    Raises ValueError on an unknown policy, mismatched arrays, a budget that is not a whole
    number >= 0 (NaN, 2.5 or "3"), or a threshold that is not a finite number >= 0 or is set
    for another policy.
    """
    u = np.asarray(uncertainty, dtype=np.float64)
    m = np.abs(np.asarray(margin, dtype=np.float64))
    if policy not in POLICIES:
        raise ValueError(f"routing policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    if u.ndim != 1 or u.shape != m.shape:
        raise ValueError(f"uncertainty and margin must be 1-D with one entry per pair, got {u.shape} and {m.shape}")
    if not (_is_whole(budget) and budget >= 0):
        raise ValueError(f"budget must be a whole number of pairs >= 0, got {_shown(budget)}")
    if not (_is_number(threshold) and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number >= 0, got {_shown(threshold)}")
    if threshold < 0 or (threshold > 0 and policy != "uncertainty"):
        raise ValueError("threshold must be >= 0 and applies only to policy='uncertainty'")
    p = len(u)
    k = min(int(budget), p)
    if policy == "none":
        return np.zeros(0, dtype=np.int64)
    if policy == "all":
        return np.arange(p, dtype=np.int64)
    if policy == "random":
        return rng.choice(p, size=k, replace=False).astype(np.int64)
    key = -u if policy == "uncertainty" else m
    if not np.all(np.isfinite(key)):
        raise ValueError(
            f"{policy} routing needs a finite {'uncertainty' if policy == 'uncertainty' else 'margin'} "
            "for every candidate pair"
        )
    order = np.lexsort((rng.random(p), key))[:k]  # primary key last; random tie-break
    if policy == "uncertainty" and threshold > 0:
        order = order[u[order] > threshold]
    return order.astype(np.int64)


# --------------------------------------------------------------------------- verdicts


class AppliedVerdicts(NamedTuple):
    S: np.ndarray
    """float64 [n, n] antisymmetric scores after the judge."""
    judged: int
    """Pairs whose score the judge replaced."""
    fallbacks: int
    """Pairs sent to the judge that kept the RM's score (timeout or unparseable answer)."""


def apply_verdicts(
    S: np.ndarray, pairs: np.ndarray, verdicts: Sequence[Optional[int]], scale: float
) -> AppliedVerdicts:
    """A new S with each judged pair (a, b) set to ``S[a, b] = v c``, ``S[b, a] = -v c``.

    ``verdicts[k]`` is for ``pairs[k]`` with pairs[k, 0] shown as response A: +1 (A better),
    -1 (B better), 0 (tie) or None (judge failed: keep the RM's s_ab, counted as a fallback).
    The input S is not modified.
    """
    S = np.array(S, dtype=np.float64, copy=True)
    if S.ndim != 2 or S.shape[0] != S.shape[1] or not np.allclose(S, -S.T, rtol=0.0, atol=1e-9):
        raise ValueError("S must be a square antisymmetric matrix (build it with pairwise_matrix)")
    pairs = _check_pairs(S.shape[0], pairs)
    if len(verdicts) != len(pairs):
        raise ValueError(f"need one verdict per judged pair: {len(pairs)} pairs, {len(verdicts)} verdicts")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"verdict scale must be a finite number > 0, got {scale}")
    judged = fallbacks = 0
    for (a, b), v in zip(pairs, verdicts):
        if v is None:
            fallbacks += 1
            continue
        if isinstance(v, (bool, np.bool_)) or v not in (1, -1, 0):
            raise ValueError(f"a verdict must be +1, -1, 0 or None (fallback), got {v!r}")
        S[a, b] = scale * int(v)
        S[b, a] = -scale * int(v)
        judged += 1
    return AppliedVerdicts(S, judged, fallbacks)


# --------------------------------------------------------------------------- routing a step


@dataclass(frozen=True)
class PairScores:
    """One group's pairs before routing, in ``all_pairs(n)`` order."""

    n: int
    pairs: np.ndarray
    """int64 [P, 2], ``all_pairs(n)``."""
    s: np.ndarray
    """float64 [P] score before the judge: r_i - r_j on verifier-decided pairs, the RM's
    antisymmetrised s_ij elsewhere."""
    uncertainty: np.ndarray
    """float64 [P] RM uncertainty; NaN on verifier-decided pairs."""
    decided: np.ndarray
    """bool [P] pairs decided by the rule verifier (never routed)."""

    @property
    def candidates(self) -> np.ndarray:
        """int64 indices of the pairs the verifier could not separate (RM / judge decide)."""
        return np.flatnonzero(~self.decided)

    @property
    def S(self) -> np.ndarray:
        return pairwise_matrix(self.n, self.pairs, self.s)


U_GP_TOLERANCE = 1e-9
"""How far below 1 ``rm_uncertainty`` lets u_gp = sqrt(1 + a var) fall (float round-off of a
variance near 0); anything lower is a negative variance and refused."""


def rm_uncertainty(signal: str, logit_ij: np.ndarray, logit_ji: np.ndarray, u_gp: np.ndarray) -> np.ndarray:
    """The uncertainty a pair is routed by, from an SNGP pairwise RM's outputs.

    ``u_gp = sqrt(1 + a var)`` (mean of both orders) measures how far the pair lies from the
    RM's training data; the head's predictive probability that i beats j is
    ``p = sigmoid(s_ij / u_gp)`` (mean-field), with s_ij the antisymmetrised logit.

    - ``predictive``: ``1 - |2p - 1| = 1 - |tanh(s_ij / (2 u_gp))|``, in [0, 1]; 1 at p = 1/2.
      The classification uncertainty of the pair: a small margin *or* a large variance. This
      is what catches the RM's errors on typical inputs, where the variance is uniformly low
      (scripts/train_rm.py reports accuracy per decile of both signals).
    - ``variance``: ``u_gp`` itself (epistemic only: rises on inputs unlike the training pairs).

    Raises ValueError unless ``u_gp`` has one finite value >= 1 per pair: a GP variance is
    >= 0, so sqrt(1 + a var) < 1 (or NaN) means a negative variance from a broken head.
    Values within ``U_GP_TOLERANCE`` below 1 are accepted as round-off.
    """
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {', '.join(SIGNALS)}; got {signal!r}")
    u = np.asarray(u_gp, dtype=np.float64)
    shape = np.shape(logit_ij)
    if u.shape != shape:
        raise ValueError(f"u_gp needs one entry per pair: logits of shape {shape}, u_gp of shape {u.shape}")
    bad = ~(np.isfinite(u) & (u >= 1.0 - U_GP_TOLERANCE))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"u_gp = sqrt(1 + a var) must be finite and >= 1 (a GP variance is >= 0), got {u.flat[i]} at "
            f"index {i} ({int(bad.sum())} of {u.size} pairs): the RM head gave a negative or non-finite variance"
        )
    if signal == "variance":
        return u
    return 1.0 - np.abs(np.tanh(antisymmetrize(logit_ij, logit_ji) / (2.0 * u)))


def pair_scores(
    rewards: Optional[np.ndarray],
    rm_logits_ij: np.ndarray,
    rm_logits_ji: np.ndarray,
    uncertainty: np.ndarray,
) -> PairScores:
    """Combine verifier rewards (or None: no verifier) with the RM's logits and uncertainty.

    ``rm_logits_ij[k]`` is l(i, j) for pair k = (i, j) of ``all_pairs(n)`` (i shown first),
    ``rm_logits_ji[k]`` is l(j, i); n follows from the number of pairs. On verifier-decided
    pairs the RM inputs are ignored and may be NaN; elsewhere they must be finite.
    """
    lij = np.asarray(rm_logits_ij, dtype=np.float64)
    lji = np.asarray(rm_logits_ji, dtype=np.float64)
    u = np.asarray(uncertainty, dtype=np.float64)
    if lij.ndim != 1 or lij.shape != lji.shape or lij.shape != u.shape:
        raise ValueError(
            f"rm_logits_ij, rm_logits_ji and uncertainty need one entry per pair; got shapes "
            f"{lij.shape}, {lji.shape}, {u.shape}"
        )
    n = group_size_from_pairs(len(lij))
    pairs = all_pairs(n)
    if rewards is None:
        decided = np.zeros(len(pairs), dtype=bool)
    else:
        r = np.asarray(rewards, dtype=np.float64)
        if r.shape != (n,):
            raise ValueError(f"{len(pairs)} pairs mean {n} responses, but got {r.shape} verifier rewards")
        decided = verifier_separable(r)
    open_ = ~decided
    if not (np.all(np.isfinite(lij[open_])) and np.all(np.isfinite(lji[open_])) and np.all(np.isfinite(u[open_]))):
        raise ValueError("the RM's logits and uncertainty must be finite on every pair the verifier cannot decide")
    s = np.zeros(len(pairs))
    s[open_] = antisymmetrize(lij[open_], lji[open_])
    if rewards is not None:
        s[decided] = r[pairs[decided, 0]] - r[pairs[decided, 1]]
    return PairScores(n, pairs, s, np.where(decided, np.nan, u), decided)


@dataclass(frozen=True)
class RoutePlan:
    """One group's routing decision: which pairs go to the judge, and S without the judge."""

    scores: PairScores
    judge: np.ndarray
    """int64 [K] indices into ``scores.pairs`` to send to the judge, in priority order."""

    @property
    def judge_pairs(self) -> np.ndarray:
        """int64 [K, 2] (A, B) pairs for the judge; a verdict +1 means A (the first) is better."""
        return self.scores.pairs[self.judge]

    @property
    def S(self) -> np.ndarray:
        """Scores from the verifier and the RM only (what ``policy=none`` trains on)."""
        return self.scores.S

    def apply(self, verdicts: Sequence[Optional[int]], scale: float) -> AppliedVerdicts:
        """S with the judge's verdicts for ``judge_pairs`` applied (None = fallback)."""
        return apply_verdicts(self.S, self.judge_pairs, verdicts, scale)


def route_group(
    rewards: Optional[np.ndarray],
    rm_logits_ij: np.ndarray,
    rm_logits_ji: np.ndarray,
    uncertainty: np.ndarray,
    cfg: RouterConfig,
    budget: int,
    rng: np.random.Generator,
) -> RoutePlan:
    """Route one group with an explicit judge budget (see ``pair_scores`` for the inputs).

    Only pairs the verifier cannot separate are eligible. For a whole step use ``route_batch``,
    which ranks across groups under the step budget ``judge_budget``.
    """
    scores = pair_scores(rewards, rm_logits_ij, rm_logits_ji, uncertainty)
    cand = scores.candidates
    picked = select_pairs(cfg.policy, scores.uncertainty[cand], scores.s[cand], budget, rng, cfg.threshold)
    return RoutePlan(scores, cand[picked])


def route_batch(groups: Sequence[PairScores], cfg: RouterConfig, rng: np.random.Generator) -> list[RoutePlan]:
    """Route a step: ``judge_budget`` over all pairs of all groups, candidates ranked together.

    Every policy except none/all (and uncertainty with tau > 0) sends exactly
    ``min(judge_budget, candidates)`` pairs in total.
    """
    total = sum(len(g.pairs) for g in groups)
    budget = judge_budget(total, cfg)
    owner = np.concatenate(
        [np.full(len(g.candidates), k, dtype=np.int64) for k, g in enumerate(groups)] or [np.zeros(0, np.int64)]
    )
    local = np.concatenate([g.candidates for g in groups] or [np.zeros(0, np.int64)])
    u = np.concatenate([g.uncertainty[g.candidates] for g in groups] or [np.zeros(0)])
    m = np.concatenate([g.s[g.candidates] for g in groups] or [np.zeros(0)])
    picked = select_pairs(cfg.policy, u, m, budget, rng, cfg.threshold)
    return [RoutePlan(g, local[picked[owner[picked] == k]]) for k, g in enumerate(groups)]


# --------------------------------------------------------------------------- metrics


def routed_fraction(plans: Sequence[RoutePlan]) -> float:
    """Pairs sent to the judge / all pairs of the step (0 for an empty step)."""
    total = sum(len(p.scores.pairs) for p in plans)
    return sum(len(p.judge) for p in plans) / total if total else 0.0


def rm_judge_agreement(s_rm: np.ndarray, verdicts: Sequence[Optional[int]]) -> float:
    """Fraction of judged pairs where sign(s_RM) equals the verdict. Judge ties and fallbacks
    (None) are excluded; an RM score of exactly 0 counts as disagreement. NaN if none remain."""
    s = np.asarray(s_rm, dtype=np.float64)
    if s.shape != (len(verdicts),):
        raise ValueError(f"need one RM score per verdict: {s.shape} scores, {len(verdicts)} verdicts")
    keep = [k for k, v in enumerate(verdicts) if v is not None and v != 0]
    if not keep:
        return float("nan")
    v = np.array([verdicts[k] for k in keep], dtype=np.float64)
    return float(np.mean(np.sign(s[keep]) == v))


def _shown(value: object) -> object:
    """A value for an error message: strings quoted, numbers as printed (``nan``, ``2.5``)."""
    return repr(value) if isinstance(value, str) else value


def _check_pairs(n: int, pairs: np.ndarray) -> np.ndarray:
    pairs = np.asarray(pairs)
    if pairs.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or not np.issubdtype(pairs.dtype, np.integer):
        raise ValueError(f"pairs must be an integer [K, 2] array, got shape {pairs.shape} dtype {pairs.dtype}")
    if pairs.min() < 0 or pairs.max() >= n:
        raise ValueError(f"pair indices must be in [0, {n}); got min {pairs.min()} max {pairs.max()}")
    if np.any(pairs[:, 0] == pairs[:, 1]):
        raise ValueError("a pair must join two different responses (i != j)")
    lo, hi = np.minimum(pairs[:, 0], pairs[:, 1]), np.maximum(pairs[:, 0], pairs[:, 1])
    if len(np.unique(lo * n + hi)) != len(pairs):
        raise ValueError("each unordered pair may appear only once")
    return pairs.astype(np.int64)

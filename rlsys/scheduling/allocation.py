"""Rollout allocation and group filtering: pure numpy functions, arrays in and counts out.

The scheduler (``rlsys.scheduling.scheduler.allocate``) calls these; the controller drives the staged
and resampling loops with the AR3PO / DAPO helpers. Nothing here touches Ray or the network.

Knapsack allocation (Knapsack RL, Li et al., arXiv 2509.25849; docs/algorithms.md §1)
-------------------------------------------------------------------------------------
GRPO gets no gradient from a group whose binary rewards are all equal, which happens with
probability ``p^N + (1-p)^N`` for a prompt of success rate p given N rollouts. Each prompt is
an item whose value for N rollouts is::

    V(N, p) = (1 - p^N - (1-p)^N) * p * (1-p)^2        (V(0, p) := 0)

(chance of a non-zero gradient times an information-gain weight peaking at p = 1/3), and the
step solves::

    maximise  sum_i V(N_i, p_i)   s.t.  sum_i N_i = B,   n_min <= N_i <= n_max.

For N >= 1 the marginal gain is

    D(N, p) = V(N+1, p) - V(N, p) = p (1-p)^2 [ p^N (1-p) + (1-p)^N p ]

which decreases in N (both powers shrink), so V is concave on N >= 1 and the greedy that
hands each next rollout to the prompt with the largest D is exactly optimal for a separable
concave objective under one cardinality constraint (``allocate_knapsack``; O(B log M) with a
heap). ``allocate_dp`` is an exact dynamic programme used as a test oracle. ``n_min >= 1`` is
required: from N = 0 the first rollout gains nothing (V(1) = V(0) = 0), which breaks concavity.

Rules around the optimiser (``allocate_knapsack``), in order:

1. *Unseen* prompts (``unseen_mask``; the scheduler marks prompts with too few observed
   rollouts) are fixed at the uniform count ``uniform_n`` (clipped to [n_min, n_max]).
2. Every other prompt starts at ``n_min``. Prompts with p̂ = 1 (and p̂ = 0) have V = 0 for
   every N, so they stay at n_min while any prompt with 0 < p̂ < 1 can still take a rollout.
3. The greedy spends the rest on the 0 < p̂ < 1 prompts, up to n_max each.
4. Surplus those prompts cannot use (all at n_max) goes to p̂ = 0 prompts, evenly (lowest
   count first), up to ``zero_cap`` rollouts each — the exploration share of Knapsack RL's
   fallback. The reference release does not cap it and can hand a single unsolved prompt
   hundreds of rollouts; ``zero_cap`` bounds that (None: no cap beyond n_max).
5. Whatever is still left is spread evenly (lowest count first) over every prompt with room
   under n_max, unseen ones included. A p̂ = 0 prompt therefore exceeds ``zero_cap`` only
   once every other prompt with room has caught up with it: the cap bounds concentration
   on unsolved prompts, while the budget is still spent. So with a rollout budget the result always sums to B
   exactly when it is feasible, i.e. ``sum(fixed unseen) + (others) * n_min <= B <= M * n_max``;
   outside that range a ``ValueError`` is raised (a budget above M * n_max could not be
   spent: we raise rather than silently return less).

Token budget (``cost=``): with per-prompt cost weights c_i (expected tokens per rollout) the
constraint becomes ``sum_i c_i N_i <= B`` with B in tokens, and the greedy ranks by gain per
unit cost D/c_i, dropping a prompt once its next rollout no longer fits. This is the standard
greedy heuristic for a knapsack with unequal weights — not exact (integer knapsack is NP-hard;
the greedy can leave up to max(c) of the budget unspent). Steps 1–5 apply with costs; the
result satisfies ``sum c_i N_i <= B`` and no prompt with headroom could afford one more.

AR3PO (arXiv 2509.25808; docs/algorithms.md §3.1)
-------------------------------------------------
Adaptive rollout: generate S stages of k responses per prompt; after each stage, prompts that
already have a correct response leave the pool (``ar3po_next_stage``), so easy prompts cost k
and hard ones up to S·k. Response reuse: a group that still has no correct response swaps
one wrong response for a stored correct one from earlier steps; the swapped response only
anchors the group baseline and is masked out of the loss (stop-gradient, ``ar3po_reuse``).

DAPO dynamic sampling (Yu et al., arXiv 2503.14476; docs/algorithms.md §3.2)
----------------------------------------------------------------------------
Keep only groups with 0 < correct < n (generalised: non-zero reward variance, ``dapo_keep``)
and keep sampling further prompts until the batch is full, at most ``max_rounds`` rounds
(``dapo_prompts_to_sample``).

Metrics: ``effective_gradient_ratio`` (fraction of *rollouts* in groups with non-zero reward
variance — the figure Knapsack RL improves), ``effective_prompt_ratio`` (fraction of groups),
``allocation_histogram``.
"""

from __future__ import annotations

import heapq
import math
import numbers
from typing import Callable, Sequence

import numpy as np

# --------------------------------------------------------------------------- knapsack


def knapsack_value(n: np.ndarray | int, p: np.ndarray | float) -> np.ndarray:
    """``V(N, p) = (1 - p^N - (1-p)^N) * p * (1-p)^2``, vectorised; ``V(0, p) = 0``.

    p is a success probability: ValueError unless every p lies in [0, 1] (NaN refused).

    >>> float(knapsack_value(8, 0.5))  # doctest: +ELLIPSIS
    0.12402...
    """
    n = np.asarray(n, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    _check_probabilities("p", p)
    v = (1.0 - p**n - (1.0 - p) ** n) * p * (1.0 - p) ** 2
    return np.where(n >= 1, v, 0.0)


def _marginal_gain(n: int, p: float) -> float:
    """``V(n+1, p) - V(n, p)`` for n >= 1, in the closed form that keeps precision."""
    q = 1.0 - p
    return p * q * q * (p**n * q + q**n * p)


def _check_probabilities(name: str, p: np.ndarray, note: str = "") -> None:
    """ValueError unless every entry of ``p`` is a success probability in [0, 1] (NaN and
    infinities refused); the message names the first bad entry."""
    bad = ~((p >= 0.0) & (p <= 1.0))  # NaN compares False both ways
    if bad.any():
        at = np.argwhere(bad)[0]
        where = "" if p.ndim == 0 else f" at index {int(at[0]) if p.ndim == 1 else tuple(int(i) for i in at)}"
        raise ValueError(
            f"{name} must lie in [0, 1] (success probabilities{note}), got {p[tuple(at)]}{where} "
            f"({int(bad.sum())} of {p.size} entries invalid)"
        )


def _whole(name: str, value: object, unit: str) -> int:
    """``value`` as an int; ValueError unless it is a whole number (an int, or a float without a
    fractional part). A bound of 2.5 would let the greedy hand out 3 and overshoot n_max."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or int(value) != value
    ):
        shown = repr(value) if isinstance(value, str) else value
        raise ValueError(f"{name} must be a whole number of {unit}, got {shown}")
    return int(value)


def _check_bounds(n_min: int, n_max: int) -> tuple[int, int]:
    """(n_min, n_max) as ints, after checking both are whole numbers with 1 <= n_min <= n_max."""
    n_min = _whole("n_min", n_min, "rollouts per prompt")
    n_max = _whole("n_max", n_max, "rollouts per prompt")
    if n_min < 1:
        raise ValueError(f"n_min must be >= 1 (V(N, p) is concave only from N = 1), got {n_min}")
    if n_min > n_max:
        raise ValueError(f"n_min ({n_min}) must be <= n_max ({n_max}); raise n_max or lower n_min")
    return n_min, n_max


def _spend(
    counts: np.ndarray,
    idx: np.ndarray,
    cap: int,
    key: Callable[[int], float],
    cost: np.ndarray,
    remaining: float,
) -> float:
    """Hand out rollouts one at a time to prompts ``idx`` (smallest ``key(i)`` first, ties
    to the lower index) until each reaches ``cap`` or nothing more fits; returns what is left.
    A prompt whose next rollout does not fit is dropped (its cost never changes)."""
    heap = [(key(i), i) for i in idx if counts[i] < cap]
    heapq.heapify(heap)
    while heap and remaining > 0:
        _, i = heapq.heappop(heap)
        if cost[i] > remaining:
            continue
        counts[i] += 1
        remaining -= cost[i]
        if counts[i] < cap:
            heapq.heappush(heap, (key(i), i))
    return remaining


def allocate_knapsack(
    p_hat: np.ndarray,
    budget: float,
    n_min: int,
    n_max: int,
    *,
    unseen_mask: np.ndarray | None = None,
    uniform_n: int | None = None,
    cost: np.ndarray | None = None,
    zero_cap: int | None = None,
) -> np.ndarray:
    """Rollout counts (int64 [M]) maximising ``sum V(N_i, p̂_i)`` (see the module docstring).

    p_hat: float [M] success-rate estimates in [0, 1]; NaN is allowed only where
    ``unseen_mask`` is true (default ``unseen_mask = isnan(p_hat)``).
    budget: total rollouts (or total tokens when ``cost`` is given).
    uniform_n: the count unseen prompts get (default ``budget // M`` without costs; required
    with costs).
    cost: optional float [M] > 0, expected tokens per rollout of each prompt.
    zero_cap: most rollouts a p̂ = 0 prompt may get from the surplus (rule 4); None: n_max.

    Raises ValueError on n_min < 1, n_min > n_max, n_min, n_max, uniform_n or zero_cap that
    are not whole numbers (counts are integers: a bound of 2.5 is refused, not rounded), a
    budget below the fixed minimum (unseen prompts at uniform_n, the rest at n_min) or above
    what n_max lets the prompts take, a non-finite budget, p̂ outside [0, 1], or arrays of
    mismatched length.

    >>> allocate_knapsack(np.array([0.1, 0.5, 0.95]), 24, 2, 64).tolist()
    [15, 7, 2]
    """
    p = np.asarray(p_hat, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_hat must be 1-D, got shape {p.shape}")
    m = len(p)
    n_min, n_max = _check_bounds(n_min, n_max)
    if uniform_n is not None:
        uniform_n = _whole("uniform_n", uniform_n, "rollouts per unseen prompt")
    if zero_cap is not None:
        zero_cap = _whole("zero_cap", zero_cap, "rollouts per p_hat = 0 prompt")
    unseen = np.isnan(p) if unseen_mask is None else np.asarray(unseen_mask, dtype=bool)
    if unseen.shape != p.shape:
        raise ValueError(f"unseen_mask has shape {unseen.shape}, p_hat has {p.shape}")
    seen_p = p[~unseen]
    if np.isnan(seen_p).any():
        raise ValueError("p_hat is NaN for a prompt not marked unseen; mark it in unseen_mask")
    if ((seen_p < 0) | (seen_p > 1)).any():
        raise ValueError(f"p_hat must lie in [0, 1], got min {seen_p.min()} max {seen_p.max()}")
    if not math.isfinite(budget):
        raise ValueError(f"budget must be a finite number (rollouts, or tokens with cost=), got {budget}")
    if cost is None:
        if int(budget) != budget:
            raise ValueError(f"a rollout budget must be a whole number, got {budget}")
        c = np.ones(m, dtype=np.int64)
        if uniform_n is None:
            uniform_n = int(budget) // m if m else n_min
        unit = "rollouts"
    else:
        c = np.asarray(cost, dtype=np.float64)
        if c.shape != p.shape:
            raise ValueError(f"cost has shape {c.shape}, p_hat has {p.shape}")
        if not (np.isfinite(c).all() and (c > 0).all()):
            raise ValueError("cost must be finite and > 0 (expected tokens per rollout)")
        if uniform_n is None and unseen.any():
            raise ValueError("uniform_n is required with cost= (the budget is in tokens)")
        unit = "tokens"
    u = int(np.clip(uniform_n if uniform_n is not None else n_min, n_min, n_max))

    counts = np.full(m, n_min, dtype=np.int64)
    counts[unseen] = u
    floor = float((c * counts).sum())
    ceiling = float((c * n_max).sum())
    if budget < floor:
        raise ValueError(
            f"budget {budget} {unit} is below the minimum {floor:g}: {int(unseen.sum())} unseen prompts at "
            f"uniform_n={u} and {int((~unseen).sum())} others at n_min={n_min}; raise the budget or lower n_min"
        )
    if budget > ceiling:
        raise ValueError(
            f"budget {budget} {unit} exceeds {ceiling:g}, what {m} prompts can take at n_max={n_max}; "
            "the leftover could not be spent: raise n_max or lower the budget"
        )
    remaining = budget - floor if cost is not None else int(budget) - int(floor)

    idx = np.arange(m)
    mixed = idx[~unseen & (p > 0) & (p < 1)]
    zero = idx[~unseen & (p == 0)]
    pl = p.tolist()
    cl = c.tolist()
    # 3. greedy on gain per unit cost (largest first: the heap pops the smallest key)
    remaining = _spend(counts, mixed, n_max, lambda i: -_marginal_gain(int(counts[i]), pl[i]) / cl[i], c, remaining)
    # 4. capped share of the surplus for p̂ = 0 prompts, evenly
    zcap = n_max if zero_cap is None else int(np.clip(zero_cap, n_min, n_max))
    remaining = _spend(counts, zero, zcap, lambda i: counts[i], c, remaining)
    # 5. anything left: evenly over every prompt with headroom
    _spend(counts, idx, n_max, lambda i: counts[i], c, remaining)
    return counts


def allocate_dp(p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
    """Exact maximiser of ``sum V(N_i, p_i)`` with ``sum N_i = budget`` and n_min <= N_i <= n_max,
    by dynamic programming over (prompt, rollouts spent): O(M · B · (n_max - n_min)).

    A test oracle for ``allocate_knapsack`` in the rollout-budget case (no unseen prompts, no
    costs). Optimal allocations need not be unique; compare objective values, not counts.

    Raises ValueError on p̂ that is not 1-D or not in [0, 1] (NaN included: there are no unseen
    prompts here), bounds as ``allocate_knapsack`` refuses them, a budget that is not a whole
    number, or one outside [M * n_min, M * n_max]; so the counts always sum to the budget.
    """
    p = np.asarray(p_hat, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_hat must be 1-D, got shape {p.shape}")
    _check_probabilities("p_hat", p, "; allocate_dp has no unseen prompts, so NaN is not allowed")
    m = len(p)
    n_min, n_max = _check_bounds(n_min, n_max)
    budget = _whole("budget", budget, "rollouts")
    if not (m * n_min <= budget <= m * n_max):
        raise ValueError(f"budget {budget} must lie in [M*n_min, M*n_max] = [{m * n_min}, {m * n_max}]")
    extra = budget - m * n_min
    span = n_max - n_min
    ks = np.arange(span + 1)
    best = np.full(extra + 1, -np.inf)
    best[0] = 0.0
    choice = np.zeros((m, extra + 1), dtype=np.int64)
    for i in range(m):
        v = knapsack_value(n_min + ks, p[i])
        new = np.full(extra + 1, -np.inf)
        for j in range(extra + 1):
            k = ks[: min(span, j) + 1]
            cand = best[j - k] + v[k]
            a = int(np.argmax(cand))
            new[j], choice[i, j] = cand[a], k[a]
        best = new
    counts = np.empty(m, dtype=np.int64)
    j = extra
    for i in range(m - 1, -1, -1):
        counts[i] = n_min + choice[i, j]
        j -= choice[i, j]
    return counts


# --------------------------------------------------------------------------- AR3PO


def ar3po_next_stage(correct_so_far: np.ndarray, stage: int, stages: int) -> np.ndarray:
    """Bool [M]: prompts still in the pool for stage ``stage + 1``.

    correct_so_far: int [M] correct responses per prompt over stages 0..stage;
    stage: 0-based index of the stage just generated; stages: S. A prompt stays while it has
    no correct response and a stage remains. Example with S = 3::

        ar3po_next_stage([0, 2, 0], stage=0, stages=3) -> [True, False, True]
        ar3po_next_stage([0, 2, 0], stage=2, stages=3) -> [False, False, False]
    """
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if not (0 <= stage < stages):
        raise ValueError(f"stage must be in [0, {stages}), got {stage}")
    correct = np.asarray(correct_so_far)
    if stage + 1 >= stages:
        return np.zeros(correct.shape, dtype=bool)
    return correct == 0


def ar3po_reuse(
    rewards: np.ndarray, stored_correct_reward: float | None, threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Response reuse for one group: (rewards, train_mask, swapped index or None).

    If no response scored >= ``threshold`` (correct) and a stored correct response exists
    (its reward ``stored_correct_reward``; None when there is none), the last response is
    replaced by it: its reward enters the group baseline, and ``train_mask`` is False there
    so the loss ignores it (stop-gradient). Otherwise the group is returned unchanged with an
    all-True mask. The caller swaps the completion itself at the returned index.
    """
    r = np.array(rewards, dtype=np.float64)
    mask = np.ones(len(r), dtype=bool)
    if len(r) == 0 or stored_correct_reward is None or (r >= threshold).any():
        return r, mask, None
    if not stored_correct_reward >= threshold:  # NaN included
        raise ValueError(
            f"stored response has reward {stored_correct_reward}, not >= threshold {threshold}: not correct"
        )
    i = len(r) - 1
    r[i] = stored_correct_reward
    mask[i] = False
    return r, mask, i


# --------------------------------------------------------------------------- DAPO


def dapo_keep(rewards: Sequence[float] | np.ndarray) -> bool:
    """DAPO's dynamic-sampling filter: keep a group with non-zero reward variance.

    For binary rewards this is exactly ``0 < correct < n``; for real-valued rewards it keeps
    any group whose rewards are not all equal. A group of size <= 1 is never kept.

    Raises ValueError on a non-finite reward: NaN compares unequal to everything, so it would
    silently drop the group. A reward function that fails is scored ``reward.failure_reward``
    (finite), so a NaN here is a bug upstream.
    """
    return _varies(rewards, "the group")


def _varies(rewards: Sequence[float] | np.ndarray, what: str) -> bool:
    """``dapo_keep`` with ``what`` (which group) named in its errors."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of rewards, one per rollout, got shape {r.shape}")
    bad = ~np.isfinite(r)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{what} has reward {r[i]} at index {i}: rewards must be finite (a failed reward function "
            "scores reward.failure_reward), so this is a bug upstream of the DAPO filter and metrics"
        )
    return bool(r.size > 1 and r.max() > r.min())


def dapo_prompts_to_sample(kept: int, target: int, rounds_done: int, max_rounds: int) -> int:
    """Prompts DAPO's next resampling round should draw: ``target - kept`` while the batch is
    short and fewer than ``max_rounds`` rounds (the first included) have run, else 0.

    With ``max_rounds`` exhausted the batch trains short (the retry cap), as in DAPO's
    ``max_num_gen_batches``.
    """
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    if kept >= target or rounds_done >= max_rounds:
        return 0
    return target - kept


# --------------------------------------------------------------------------- metrics


def effective_gradient_ratio(groups_rewards: Sequence[Sequence[float]]) -> float:
    """Fraction of rollouts that sit in groups with non-zero reward variance (0.0 when there
    are no rollouts). The figure Knapsack RL raises by 20–40%.

    Raises ValueError, naming the group, on a non-finite reward (see ``dapo_keep``): a NaN would
    otherwise count its group as one without gradient."""
    useful = np.array([_varies(g, f"group {k}") for k, g in enumerate(groups_rewards)], dtype=bool)
    sizes = np.array([len(g) for g in groups_rewards], dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        return 0.0
    return float(sizes[useful].sum() / total)


def effective_prompt_ratio(groups_rewards: Sequence[Sequence[float]]) -> float:
    """Fraction of groups (prompts) with non-zero reward variance (0.0 when there are none).
    Raises ValueError, naming the group, on a non-finite reward (see ``dapo_keep``)."""
    if len(groups_rewards) == 0:
        return 0.0
    return float(np.mean([_varies(g, f"group {k}") for k, g in enumerate(groups_rewards)]))


def allocation_histogram(counts: np.ndarray, bins: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(hist int64 [K], lower edges int64 [K]): how many prompts got N rollouts, bin j holding
    ``edges[j] <= N < edges[j+1]`` and the last bin everything from ``edges[-1]`` up.

    Default edges: 0, 1, 2, 4, 8, ... up to the largest count. Counts below ``edges[0]`` raise.
    """
    n = np.asarray(counts, dtype=np.int64)
    if bins is None:
        top = int(n.max()) if n.size else 1
        edges = [0, 1]
        while edges[-1] * 2 <= top:
            edges.append(edges[-1] * 2)
        e = np.array(edges, dtype=np.int64)
    else:
        e = np.asarray(bins, dtype=np.int64)
        if e.ndim != 1 or e.size == 0 or (np.diff(e) <= 0).any():
            raise ValueError(f"bins must be strictly increasing lower edges, got {list(bins)}")
    if n.size and n.min() < e[0]:
        raise ValueError(f"count {int(n.min())} is below the first bin edge {int(e[0])}")
    which = np.searchsorted(e, n, side="right") - 1
    return np.bincount(which, minlength=len(e)).astype(np.int64), e

"""rlsys.scheduling.allocation: knapsack allocation (greedy vs exact DP), its rules and bad input; AR3PO,
DAPO and metric helpers."""

import numpy as np
import pytest

from rlsys.learner.config import LossConfig
from rlsys.learner.losses import group_advantages
from rlsys.scheduling.allocation import (
    allocate_dp,
    allocate_knapsack,
    allocation_histogram,
    ar3po_next_stage,
    ar3po_reuse,
    dapo_keep,
    dapo_prompts_to_sample,
    effective_gradient_ratio,
    effective_prompt_ratio,
    knapsack_value,
)


def total_value(counts, p):
    return float(knapsack_value(counts, p).sum())


def random_p(rng, m):
    """Success rates with some exact 0s and 1s mixed in."""
    p = rng.random(m)
    p[rng.random(m) < 0.15] = 0.0
    p[rng.random(m) < 0.15] = 1.0
    return p


# ----------------------------------------------------------------- value function


def test_value_matches_formula_and_vanishes_at_the_edges():
    assert knapsack_value(8, 0.5) == pytest.approx((1 - 2 * 0.5**8) * 0.5 * 0.25)
    np.testing.assert_array_equal(knapsack_value([0, 1, 5, 5], [0.3, 0.3, 0.0, 1.0]), 0.0)
    n = np.arange(1, 60)
    for p in (0.01, 0.2, 1 / 3, 0.7, 0.99):
        gains = np.diff(knapsack_value(n, p))
        assert (gains > 0).all() and (np.diff(gains) < 0).all(), p  # increasing, concave from N = 1


# ----------------------------------------------------------------- must show


def test_fixed_example_orders_hard_over_medium_over_easy():
    counts = allocate_knapsack(np.array([0.1, 0.5, 0.95]), 24, 2, 64)
    assert counts.sum() == 24
    assert counts[0] > counts[1] > counts[2]
    assert counts[2] == 2  # an easy prompt drops to n_min


@pytest.mark.parametrize("seed", range(20))
def test_budget_spent_exactly_and_bounds_respected(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 40))
    n_min, n_max = int(rng.integers(1, 4)), int(rng.integers(4, 40))
    p = random_p(rng, m)
    unseen = rng.random(m) < 0.2
    p[unseen] = np.nan
    uniform_n = int(rng.integers(n_min, n_max + 1))
    floor = unseen.sum() * uniform_n + (~unseen).sum() * n_min
    budget = int(rng.integers(floor, m * n_max + 1))
    counts = allocate_knapsack(p, budget, n_min, n_max, uniform_n=uniform_n, zero_cap=int(rng.integers(1, 50)))
    assert counts.dtype == np.int64 and counts.sum() == budget
    assert counts.min() >= n_min and counts.max() <= n_max


def test_greedy_equals_exact_dp_on_random_instances():
    rng = np.random.default_rng(1234)
    checked = 0
    for _ in range(300):
        m = int(rng.integers(1, 7))
        n_min = int(rng.integers(1, 4))
        n_max = int(rng.integers(n_min, 13))
        if m * n_min > 40:
            continue
        budget = int(rng.integers(m * n_min, min(m * n_max, 40) + 1))
        p = random_p(rng, m)
        greedy = allocate_knapsack(p, budget, n_min, n_max)
        exact = allocate_dp(p, budget, n_min, n_max)
        assert greedy.sum() == exact.sum() == budget
        assert exact.min() >= n_min and exact.max() <= n_max
        assert total_value(greedy, p) == pytest.approx(total_value(exact, p), rel=1e-12, abs=1e-15), (p, budget)
        checked += 1
    assert checked >= 200


def test_dp_beats_a_worse_allocation():
    p = np.array([0.3, 0.9])
    best = allocate_dp(p, 12, 2, 10)
    assert total_value(best, p) > total_value(np.array([6, 6]), p)


def test_unseen_prompts_get_the_uniform_count():
    p = np.array([np.nan, 0.2, np.nan, 0.9, 0.5])
    counts = allocate_knapsack(p, 40, 2, 64)  # uniform_n defaults to budget // M = 8
    assert counts[0] == counts[2] == 8 and counts.sum() == 40
    # an explicit mask overrides NaN detection: a seen-but-noisy estimate can be treated as unseen
    counts = allocate_knapsack(np.array([0.1, 0.2, 0.9]), 24, 2, 64, unseen_mask=np.array([True, False, False]))
    assert counts[0] == 8 and counts[1] > counts[2]


def test_solved_prompts_stay_at_n_min_while_mixed_ones_have_room():
    counts = allocate_knapsack(np.array([1.0, 1.0, 0.4, 0.0]), 32, 2, 64)
    np.testing.assert_array_equal(counts, [2, 2, 26, 2])


# ----------------------------------------------------------------- zero-cap rule


def test_zero_prompts_take_capped_surplus_then_the_rest_spreads_evenly():
    # the mixed prompt saturates at n_max = 8; 25 - 8 - 5*2 = 7 surplus
    p = np.array([0.5, 0.0, 1.0, 1.0, 1.0, 1.0])
    capped = allocate_knapsack(p, 25, 2, 8, zero_cap=5)
    np.testing.assert_array_equal(capped, [8, 5, 3, 3, 3, 3])  # the zero stops at 5; the rest spreads evenly
    uncapped = allocate_knapsack(p, 25, 2, 8)
    np.testing.assert_array_equal(uncapped, [8, 8, 3, 2, 2, 2])  # the reference rule: the zero takes it all
    # below the cap the surplus is shared evenly among the zeros
    even = allocate_knapsack(np.array([0.5, 0.0, 0.0, 0.0]), 8 + 3 * 2 + 7, 2, 8, zero_cap=8)
    assert even[0] == 8 and sorted(even[1:].tolist()) == [4, 4, 5]
    # the cap bounds concentration, not the level: once everyone has caught up the spread is even
    np.testing.assert_array_equal(allocate_knapsack(np.array([0.5, 0.0, 1.0, 1.0]), 30, 2, 8, zero_cap=5), [8, 8, 7, 7])


def test_zero_cap_stops_one_unsolved_prompt_from_taking_everything():
    # reference bounds (N_low 2, N_up 128, uniform 8): 2 mixed, 1 unsolved, 61 solved prompts
    p = np.r_[0.5, 0.5, 0.0, np.ones(61)]
    capped = allocate_knapsack(p, 64 * 8, 2, 128, zero_cap=16)
    uncapped = allocate_knapsack(p, 64 * 8, 2, 128)
    assert capped.sum() == uncapped.sum() == 512
    assert uncapped[2] == 128 and capped[2] == 16
    assert capped[:2].tolist() == [128, 128] and set(capped[3:].tolist()) == {3, 4}


def test_zero_cap_is_clipped_to_the_bounds():
    p = np.array([0.0, 0.0])
    np.testing.assert_array_equal(allocate_knapsack(p, 4, 2, 8, zero_cap=0), [2, 2])
    np.testing.assert_array_equal(allocate_knapsack(p, 16, 2, 8, zero_cap=100), [8, 8])


def test_zero_prompts_wait_for_mixed_prompts():
    counts = allocate_knapsack(np.array([0.0, 0.05, 0.0]), 30, 2, 64, zero_cap=16)
    np.testing.assert_array_equal(counts, [2, 26, 2])


# ----------------------------------------------------------------- token budget


def test_constant_cost_reproduces_the_rollout_budget():
    rng = np.random.default_rng(7)
    for _ in range(20):
        p = random_p(rng, 10)
        a = allocate_knapsack(p, 80, 2, 32, zero_cap=12)
        b = allocate_knapsack(p, 80 * 250.0, 2, 32, cost=np.full(10, 250.0), uniform_n=8, zero_cap=12)
        np.testing.assert_array_equal(a, b)


def test_token_cost_prefers_cheap_prompts_and_fills_the_budget():
    rng = np.random.default_rng(3)
    p = np.full(6, 0.3)
    cost = np.array([100.0, 100.0, 400.0, 400.0, 1600.0, 1600.0])
    budget = float((cost * 8).sum())
    counts = allocate_knapsack(p, budget, 2, 64, cost=cost, uniform_n=8)
    assert counts[0] >= counts[2] >= counts[4] and counts[0] > counts[4]
    spent = float((cost * counts).sum())
    assert spent <= budget
    assert budget - spent < cost.min()  # nothing with headroom could afford one more
    for _ in range(30):
        p = random_p(rng, 8)
        cost = rng.uniform(50, 2000, 8)
        budget = float(rng.uniform((cost * 2).sum(), (cost * 20).sum()))
        counts = allocate_knapsack(p, budget, 2, 20, cost=cost, uniform_n=8, zero_cap=10)
        spent = float((cost * counts).sum())
        room = counts < 20
        assert spent <= budget + 1e-6 and counts.min() >= 2 and counts.max() <= 20
        assert not room.any() or budget - spent < cost[room].min()


def test_token_cost_needs_uniform_n_for_unseen_prompts_and_valid_costs():
    with pytest.raises(ValueError, match="uniform_n is required"):
        allocate_knapsack(np.array([np.nan, 0.5]), 1000.0, 2, 8, cost=np.array([100.0, 100.0]))
    with pytest.raises(ValueError, match="cost must be finite and > 0"):
        allocate_knapsack(np.array([0.5, 0.5]), 1000.0, 2, 8, cost=np.array([100.0, 0.0]))
    with pytest.raises(ValueError, match="cost has shape"):
        allocate_knapsack(np.array([0.5, 0.5]), 1000.0, 2, 8, cost=np.array([100.0]))


# ----------------------------------------------------------------- bad input


def test_budget_below_the_minimum_is_an_error():
    with pytest.raises(ValueError, match=r"budget 5 rollouts is below the minimum 6.*lower n_min"):
        allocate_knapsack(np.array([0.5, 0.5, 0.5]), 5, 2, 8)
    # unseen prompts count at uniform_n toward the minimum
    with pytest.raises(ValueError, match="below the minimum 10"):
        allocate_knapsack(np.array([np.nan, 0.5, 0.5]), 9, 2, 8, uniform_n=6)
    with pytest.raises(ValueError, match=r"\[M\*n_min, M\*n_max\]"):
        allocate_dp(np.array([0.5, 0.5]), 3, 2, 8)


def test_budget_above_what_n_max_allows_raises_instead_of_dropping_rollouts():
    with pytest.raises(ValueError, match="exceeds 24.*could not be spent"):
        allocate_knapsack(np.array([0.5, 0.1, 0.9]), 25, 2, 8)
    assert allocate_knapsack(np.array([0.5, 0.1, 0.9]), 24, 2, 8).tolist() == [8, 8, 8]


def test_min_above_max_and_min_below_one_are_errors():
    with pytest.raises(ValueError, match=r"n_min \(9\) must be <= n_max \(8\)"):
        allocate_knapsack(np.array([0.5]), 9, 9, 8)
    with pytest.raises(ValueError, match="n_min must be >= 1"):
        allocate_knapsack(np.array([0.5]), 4, 0, 8)
    with pytest.raises(ValueError, match="n_min"):
        allocate_dp(np.array([0.5]), 4, 5, 3)


def test_bad_estimates_are_errors():
    with pytest.raises(ValueError, match="NaN for a prompt not marked unseen"):
        allocate_knapsack(np.array([np.nan, 0.5]), 8, 2, 8, unseen_mask=np.array([False, False]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        allocate_knapsack(np.array([1.5, 0.5]), 8, 2, 8)
    with pytest.raises(ValueError, match="unseen_mask has shape"):
        allocate_knapsack(np.array([0.5, 0.5]), 8, 2, 8, unseen_mask=np.array([True]))
    with pytest.raises(ValueError, match="whole number"):
        allocate_knapsack(np.array([0.5, 0.5]), 8.5, 2, 8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param(dict(n_max=2.5), "n_max must be a whole number of rollouts per prompt, got 2.5", id="n_max-2.5"),
        pytest.param(dict(n_min=1.5), "n_min must be a whole number of rollouts per prompt, got 1.5", id="n_min-1.5"),
        pytest.param(dict(n_max=float("nan")), "n_max must be a whole number", id="n_max-nan"),
        pytest.param(dict(n_max=float("inf")), "n_max must be a whole number", id="n_max-inf"),
        pytest.param(dict(n_min="2"), "n_min must be a whole number of rollouts per prompt, got '2'", id="n_min-str"),
        pytest.param(dict(n_min=True), "n_min must be a whole number", id="n_min-bool"),
        pytest.param(dict(uniform_n=2.5), "uniform_n must be a whole number", id="uniform_n-2.5"),
        pytest.param(dict(zero_cap=float("nan")), "zero_cap must be a whole number", id="zero_cap-nan"),
    ],
)
def test_non_integer_bounds_are_refused_not_overshot(kwargs, message):
    # n_max = 2.5 used to let the greedy hand a prompt 3 rollouts: [2, 3, 2] for a budget of 7
    args = dict(p_hat=np.array([0.1, 0.5, 0.95]), budget=7, n_min=2, n_max=3)
    args.update(kwargs)
    with pytest.raises(ValueError) as e:
        allocate_knapsack(args.pop("p_hat"), args.pop("budget"), args.pop("n_min"), args.pop("n_max"), **args)
    assert message in str(e.value)
    if "n_min" in kwargs or "n_max" in kwargs:
        dp_args = {"n_min": 2, "n_max": 3, **{k: v for k, v in kwargs.items() if k in ("n_min", "n_max")}}
        with pytest.raises(ValueError, match="must be a whole number"):
            allocate_dp(np.array([0.1, 0.5, 0.95]), 7, dp_args["n_min"], dp_args["n_max"])


def test_whole_number_bounds_of_any_numeric_type_are_accepted_as_ints():
    p = np.array([0.1, 0.5, 0.95])
    expected = allocate_knapsack(p, 24, 2, 64)
    np.testing.assert_array_equal(allocate_knapsack(p, 24, 2.0, np.int64(64), zero_cap=16.0), expected)
    np.testing.assert_array_equal(allocate_dp(p, 9, np.int64(2), 3.0), allocate_dp(p, 9, 2, 3))


@pytest.mark.parametrize(
    "p_hat, message",
    [
        pytest.param([np.nan, 0.5], "got nan at index 0", id="nan"),
        pytest.param([0.5, np.inf], "got inf at index 1", id="inf"),
        pytest.param([0.5, 1.5], "got 1.5 at index 1", id="above-1"),
        pytest.param([-0.1, 0.5], "got -0.1 at index 0", id="below-0"),
    ],
)
def test_dp_refuses_success_rates_that_are_not_probabilities(p_hat, message):
    # a NaN p used to give counts summing to 4 for a budget of 8
    with pytest.raises(ValueError, match=r"p_hat must lie in \[0, 1\]") as e:
        allocate_dp(np.array(p_hat), 8, 2, 8)
    assert message in str(e.value)
    assert "allocate_dp has no unseen prompts" in str(e.value)


def test_dp_refuses_bad_shapes_and_non_whole_budgets():
    with pytest.raises(ValueError, match="p_hat must be 1-D"):
        allocate_dp(np.full((2, 2), 0.5), 8, 2, 8)
    with pytest.raises(ValueError, match="budget must be a whole number of rollouts, got 8.5"):
        allocate_dp(np.array([0.5, 0.5]), 8.5, 2, 8)
    with pytest.raises(ValueError, match="budget must be a whole number of rollouts, got nan"):
        allocate_dp(np.array([0.5, 0.5]), float("nan"), 2, 8)


@pytest.mark.parametrize("p", [1.5, -0.5, np.nan, np.inf, [0.5, 1.0001]])
def test_value_refuses_p_outside_zero_one(p):
    # knapsack_value(8, 1.5) used to return a negative value
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\] \(success probabilities\), got"):
        knapsack_value(8, p)


def test_no_prompts():
    assert allocate_knapsack(np.zeros(0), 0, 2, 8).shape == (0,)
    with pytest.raises(ValueError, match="could not be spent"):
        allocate_knapsack(np.zeros(0), 8, 2, 8)


# ----------------------------------------------------------------- AR3PO


def test_ar3po_pool_shrinks_to_prompts_without_a_correct_response():
    np.testing.assert_array_equal(ar3po_next_stage(np.array([0, 2, 0, 1]), 0, 3), [True, False, True, False])
    np.testing.assert_array_equal(ar3po_next_stage(np.array([0, 0]), 1, 3), [True, True])
    np.testing.assert_array_equal(ar3po_next_stage(np.array([0, 0]), 2, 3), [False, False])  # last stage done
    np.testing.assert_array_equal(ar3po_next_stage(np.array([0]), 0, 1), [False])
    with pytest.raises(ValueError, match="stage must be in"):
        ar3po_next_stage(np.array([0]), 3, 3)
    with pytest.raises(ValueError, match="stages must be >= 1"):
        ar3po_next_stage(np.array([0]), 0, 0)


def test_ar3po_reuse_swaps_a_stored_correct_response_with_stop_gradient():
    r, mask, i = ar3po_reuse(np.zeros(4), 1.0)
    assert i == 3 and r.tolist() == [0, 0, 0, 1.0] and mask.tolist() == [True, True, True, False]
    adv = group_advantages(r, LossConfig())
    assert (adv[mask] < 0).all()  # the wrong responses now get a gradient; the anchor is masked out
    # a group with a correct response, or nothing stored, is left alone
    for rewards, stored in (([0, 1, 0], 1.0), ([0, 0, 0], None)):
        r, mask, i = ar3po_reuse(np.array(rewards, dtype=float), stored)
        assert i is None and mask.all() and r.tolist() == rewards
    with pytest.raises(ValueError, match="not correct"):
        ar3po_reuse(np.zeros(2), 0.0)


# ----------------------------------------------------------------- DAPO


def test_dapo_keep_is_zero_lt_correct_lt_n_for_binary_rewards():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 10))
        r = (rng.random(n) < rng.random()).astype(float)
        assert dapo_keep(r) == (0 < r.sum() < n)
    assert dapo_keep([0.2, 0.7]) and not dapo_keep([0.4, 0.4, 0.4]) and not dapo_keep([1.0]) and not dapo_keep([])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_dapo_keep_refuses_a_non_finite_reward_instead_of_dropping_the_group(bad):
    # [nan, 0, 1] used to be dropped as a no-gradient group
    with pytest.raises(ValueError, match=rf"the group has reward {bad} at index 0: rewards must be finite"):
        dapo_keep([bad, 0.0, 1.0])
    with pytest.raises(ValueError, match="reward.failure_reward"):
        dapo_keep(np.array([0.0, 1.0, bad], dtype=np.float32))


def test_dapo_keep_refuses_a_group_that_is_not_one_dimensional():
    with pytest.raises(ValueError, match=r"must be a 1-D sequence of rewards, one per rollout, got shape \(\)"):
        dapo_keep(None)
    with pytest.raises(ValueError, match=r"got shape \(2, 2\)"):
        dapo_keep([[0.0, 1.0], [1.0, 0.0]])


def test_dapo_resamples_until_full_or_out_of_rounds():
    assert dapo_prompts_to_sample(kept=10, target=16, rounds_done=1, max_rounds=3) == 6
    assert dapo_prompts_to_sample(kept=16, target=16, rounds_done=1, max_rounds=3) == 0
    assert dapo_prompts_to_sample(kept=10, target=16, rounds_done=3, max_rounds=3) == 0  # retry cap: train short
    with pytest.raises(ValueError, match="max_rounds"):
        dapo_prompts_to_sample(0, 16, 0, 0)


# ----------------------------------------------------------------- metrics


def test_effective_ratios_count_rollouts_and_prompts():
    groups = [[1, 0, 0, 0], [1, 1], [0, 0], [0, 1]]
    assert effective_gradient_ratio(groups) == pytest.approx(6 / 10)
    assert effective_prompt_ratio(groups) == pytest.approx(2 / 4)
    assert effective_gradient_ratio([]) == 0.0 and effective_prompt_ratio([]) == 0.0


def test_effective_ratios_refuse_a_nan_reward_and_name_the_group():
    # a NaN used to count its group as one without gradient: 2/7 here instead of an error
    groups = [[1, 0], [0, 0, 0], [np.nan, 0, 1]]
    for ratio in (effective_gradient_ratio, effective_prompt_ratio):
        with pytest.raises(ValueError, match="group 2 has reward nan at index 0: rewards must be finite"):
            ratio(groups)


def test_allocation_histogram():
    hist, edges = allocation_histogram(np.array([2, 2, 3, 8, 16, 64]))
    assert edges.tolist() == [0, 1, 2, 4, 8, 16, 32, 64]
    assert hist.tolist() == [0, 0, 3, 0, 1, 1, 0, 1]
    hist, _ = allocation_histogram(np.array([2, 9, 200]), bins=[2, 8, 32])
    assert hist.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="below the first bin edge"):
        allocation_histogram(np.array([1]), bins=[2, 8])
    with pytest.raises(ValueError, match="strictly increasing"):
        allocation_histogram(np.array([1]), bins=[4, 2])

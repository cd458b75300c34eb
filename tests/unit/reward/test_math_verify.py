"""The built-in math_verify reward (rlsys/reward/math_verify.py): equivalence by the math-verify
package, callable off the main thread (where math-verify's signal.alarm timeouts fail)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading

import pytest
from helpers import make_group

from rlsys.reward.math_verify import math_verify
from rlsys.reward.worker import REWARD_FUNCTIONS, GroupScorer, RewardConfig, RewardFunctionError, call_with_timeout


@pytest.mark.parametrize(
    "completion, reference, expected",
    [
        ("\\boxed{7}", "7", 1.0),
        ("The answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("The answer is \\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{8}", "7", 0.0),
        ("So the answer is $7$.", "$7$", 1.0),
        ("\\boxed{7}", "\\boxed{7}", 1.0),
        ("\\boxed{7}", "7.0", 1.0),
        ("First 3, then 5. Final answer: \\boxed{7}", "7", 1.0),  # the boxed answer, not the last number
        ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
        ("\\boxed{x^2+1}", "x^2+2", 0.0),
        ("The answer is 7", "7", 1.0),
        ("garbage", "7", 0.0),
        ("", "7", 0.0),
    ],
)
def test_equivalent_answers_score_one_and_others_zero(completion, reference, expected):
    assert math_verify(completion, reference) == expected


def test_it_is_registered_and_selected_by_name():
    assert REWARD_FUNCTIONS["math_verify"] is math_verify
    assert GroupScorer(RewardConfig(function="math_verify")).fn is math_verify


def test_a_call_on_another_thread_works():
    """math-verify's default timeouts call signal.alarm, which raises off the main thread."""
    out = {}

    def run():
        try:
            out["value"] = (math_verify("\\boxed{7}", "7"), math_verify("\\boxed{\\sqrt{4}}", "2"))
        except BaseException as e:  # noqa: BLE001 - reported below
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert out == {"value": (1.0, 1.0)}


def test_through_call_with_timeout_and_a_group_scorer():
    assert call_with_timeout(math_verify, "\\boxed{\\frac{1}{2}}", "0.5", timeout_s=30.0).reward == 1.0
    g = make_group(rewards=[0.0] * 3)
    texts = ["The answer is \\boxed{2}", "\\boxed{3}", "no idea"]
    g = dataclasses.replace(g, completions=[dataclasses.replace(c, text=t) for c, t in zip(g.completions, texts)])
    scored = GroupScorer(RewardConfig(function="math_verify", timeout_s=30.0)).score_group(g)  # reference "2"
    assert scored.rewards.tolist() == [1.0, 0.0, 0.0] and scored.reward_failures == 0


def test_a_reference_that_does_not_parse_is_a_counted_failure():
    with pytest.raises(ValueError, match="math_verify cannot parse the reference answer ''"):
        math_verify("\\boxed{7}", "")
    with pytest.raises(RewardFunctionError, match="raised ValueError: math_verify cannot parse"):
        call_with_timeout(math_verify, "\\boxed{7}", "  ", timeout_s=30.0)


def test_importing_rlsys_does_not_import_math_verify_or_sympy():
    code = "import sys, rlsys.config, rlsys.reward.worker; print(sorted({'math_verify', 'sympy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]"

"""The math-verify reward: GSM8K and MATH answers compared by value, in the reward pool."""

from __future__ import annotations

import pytest

from areal_like.tasks.math_reward import math_reward
from rollout.rewards import RewardPool

MATH_REWARD = "areal_like.tasks.math_reward:math_reward"


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("The answer is 72.", "72"),
        ("so the result is \\boxed{\\frac{1}{2}}", "0.5"),
        ("1/2", "\\frac{1}{2}"),
        ("I count 1,234 apples", "1234"),
        ("\\boxed{2\\sqrt{2}}", "$\\sqrt{8}$"),
        ("The final answer is $-3$", "-3"),
        ("She earns 9 * 2 = 18 dollars. The answer is 18", "She sells 16 - 3 - 4 = 9 eggs.\n#### 18"),
    ],
)
def test_equal_answers_in_different_forms_score_one(response, answer):
    assert math_reward(response, answer) == 1.0


@pytest.mark.parametrize(
    ("response", "answer"),
    [("answer: 7", "8"), ("", "8"), ("\\boxed{\\frac{1}{3}}", "0.5"), ("no number here", "#### 18")],
)
def test_wrong_or_missing_answers_score_zero(response, answer):
    assert math_reward(response, answer) == 0.0


def test_a_reasoning_models_answer_is_read_after_its_thinking():
    assert math_reward("<think>maybe \\boxed{3}?</think> So \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert math_reward("<think>It is \\boxed{\\frac{1}{2}}</think> It is 3.", "0.5") == 0.0
    assert math_reward("<think>It is \\boxed{\\frac{1}{2}}", "0.5") == 0.0  # cut off while thinking


def test_a_ground_truth_without_an_answer_is_an_error_not_a_wrong_response():
    with pytest.raises(ValueError, match="no parsable answer"):
        math_reward("42", "")


def test_math_reward_runs_in_the_pool_and_its_errors_are_counted():
    items = [("\\boxed{4}", "4"), ("5", "4"), ("4", "")]
    with RewardPool(MATH_REWARD, timeout_s=10.0) as pool:
        results = pool.score(items)
    assert [(r.value, r.status) for r in results] == [(1.0, "ok"), (0.0, "ok"), (0.0, "error")]
    assert pool.counters["error"] == 1

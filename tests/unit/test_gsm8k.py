"""The GSM8K reward (answer extraction through math-verify) and the shipped synthetic GSM8K-style data."""

from __future__ import annotations

import filecmp
import json
import os
import re

import pytest

from areal_like.tasks.gsm8k import extract_answer, gsm8k_reward
from areal_like.tasks.gsm8k_synth import EASY, FULL, SPLITS, generate, write_all
from rollout.rewards import RewardPool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "data", "gsm8k_synth")
GSM8K_REWARD = "areal_like.tasks.gsm8k:gsm8k_reward"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("#### 1,234.", "1234"),
        ("first #### 8\nthen more text 9", "8"),  # GSM8K's marker wins over later numbers
        ("so the answer is \\boxed{\\frac{1}{2}} (0.5)", "\\frac{1}{2}"),  # boxed wins over a number
        ("\\boxed{x^{2}} and \\boxed{4}", "4"),  # the last box
        ("\\boxed{{a}{b}}", "{a}{b}"),  # nested braces balanced
        ("She has 3 apples, then 12 apples.", "12"),  # plain last number
        ("-3.5 degrees", "-3.5"),
        ("no number at all", None),
        ("#### ", None),
        ("\\boxed{12", "12"),  # an unclosed box falls back to the last number
    ],
)
def test_final_answer_extraction_order(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("3 + 4 = 7\n#### 7", "3 + 4 = 7\n#### 7"),
        ("The answer is \\boxed{72}.", "Natalia sold 48/2 = 24 clips.\n#### 72"),
        ("I count 1,234 apples", "#### 1234"),
        ("\\boxed{\\frac{144}{2}}", "72"),
        ("#### 7.0", "#### 7"),
        ("She has $5$ left", "#### 5"),
    ],
)
def test_equal_final_answers_score_one(response, answer):
    assert gsm8k_reward(response, answer) == 1.0


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("3 + 4 = 7\n#### 8", "#### 7"),  # the worked line has 7, but the final answer is 8
        ("no answer", "#### 7"),
        ("", "#### 7"),
        ("#### 7\nbut really 8", "#### 8"),
    ],
)
def test_wrong_or_missing_final_answers_score_zero(response, answer):
    assert gsm8k_reward(response, answer) == 0.0


@pytest.mark.parametrize(
    ("response", "score"),
    [
        ("<think>\n5 + 3 makes 8, or is it 9?\n</think>\n\nThe answer is 8.", 1.0),
        ("<think>\n#### 8\n</think>\n\nThe answer is 9.", 0.0),  # only the answer after thinking counts
        ("<think>\n5 + 3 = 8, so the answer is 8", 0.0),  # cut off while thinking: no answer
        ("5 + 3 = 8</think>\n\n\\boxed{8}", 1.0),  # the template opened the thinking block
    ],
)
def test_a_reasoning_models_answer_is_read_after_its_thinking(response, score):
    assert gsm8k_reward(response, "5 + 3 = 8\n#### 8") == score


def test_a_ground_truth_without_an_answer_is_a_data_error():
    with pytest.raises(ValueError, match="no parsable final answer"):
        gsm8k_reward("7", "the solution is missing")


def test_gsm8k_reward_runs_in_the_pool():
    with RewardPool(GSM8K_REWARD, timeout_s=10.0) as pool:
        results = pool.score([("#### 4", "#### 4"), ("\\boxed{5}", "#### 4"), ("4", "words")])
    assert [(r.value, r.status) for r in results] == [(1.0, "ok"), (0.0, "ok"), (0.0, "error")]


def test_shipped_data_is_the_generator_output(tmp_path):
    write_all(str(tmp_path), seed=0)
    for name in SPLITS:
        assert filecmp.cmp(tmp_path / name, os.path.join(DATA, name), shallow=False), name


def test_generator_is_deterministic_by_seed():
    assert generate(50, seed=7, level=FULL) == generate(50, seed=7, level=FULL)
    assert generate(50, seed=7, level=FULL) != generate(50, seed=8, level=FULL)


_STEP = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")


def _check_problem(problem: dict) -> None:
    *lines, final = problem["answer"].split("\n")
    assert final.startswith("#### ") and len(lines) == problem["steps"]
    value = None
    for line in lines:
        a, op, b, c = _STEP.match(line).groups()
        a, b, c = int(a), int(b), int(c)
        assert c == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] >= 0
        assert op != "/" or a % b == 0
        assert value is None or a == value  # each step continues from the previous result
        value = c
    assert final == f"#### {value}"
    # the numbers the solution starts from are stated in the question
    numbers = set(re.findall(r"\d+", problem["question"]))
    assert set(re.findall(r"\d+", lines[0].split("=")[0])) <= numbers


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_shipped_problems_are_consistent_gsm8k_format(name):
    with open(os.path.join(DATA, name)) as f:
        problems = [json.loads(line) for line in f]
    assert len(problems) == SPLITS[name][1]
    for problem in problems:
        assert set(problem) == {"question", "answer", "steps"}
        _check_problem(problem)
    for problem in problems[:20]:  # the reward reads the answers (math-verify is slow: a sample)
        assert gsm8k_reward(problem["answer"], problem["answer"]) == 1.0
    steps = {p["steps"] for p in problems}
    assert steps == ({1} if "easy" in name else {1, 2, 3})


@pytest.mark.parametrize("suffix", ["", "_easy"])
def test_train_and_test_questions_are_disjoint(suffix):
    def questions(split):
        with open(os.path.join(DATA, f"{split}{suffix}.jsonl")) as f:
            return {json.loads(line)["question"] for line in f}

    assert not questions("train") & questions("test")


def test_easy_level_is_one_small_addition_or_subtraction():
    for problem in generate(200, seed=0, level=EASY):
        (line, _) = problem["answer"].split("\n")
        a, op, b, _ = _STEP.match(line).groups()
        assert op in "+-" and int(a) <= EASY.max_operand and int(b) <= EASY.max_operand

from __future__ import annotations

import subprocess
import sys

import pytest

from areal_like.config import TaskConfig
from areal_like.tasks import TASKS, AdditionTask, get_task, make_task
from areal_like.tasks.arithmetic import addition_reward
from rollout.rewards import resolve_reward_fn


def test_get_task_lists_known_names_for_an_unknown_one():
    assert get_task("addition") is TASKS["addition"]
    with pytest.raises(ValueError, match=r"'nope'.*\['addition', 'calculator', 'code', 'math'\]"):
        get_task("nope")


def test_make_task_applies_the_config_parameters():
    task = make_task(TaskConfig(name="addition", max_operand=99, num_operands=3))
    assert (task.max_operand, task.num_operands) == (99, 3)
    with pytest.raises(ValueError, match="task.name='nope' is unknown; known tasks"):
        make_task(TaskConfig(name="nope"))


def test_addition_prompts_are_deterministic_and_correct():
    task = AdditionTask()
    prompts = task.make_prompts("train", 50, seed=3)
    assert prompts == task.make_prompts("train", 50, seed=3)
    assert prompts != task.make_prompts("train", 50, seed=4)
    for record in prompts:
        left, right = record.text.rstrip("=").split("+")
        assert record.text.endswith("=") and record.answer == str(int(left) + int(right))
    assert len({r.prompt_id for r in prompts}) == 50


def test_single_digit_split_holds_out_exactly_20_pairs():
    task = AdditionTask()
    train = {r.text for r in task.make_prompts("train", 2000, seed=0)}
    eval_ = {r.text for r in task.make_prompts("eval", 500, seed=0)}
    assert len(train) == 80 and len(eval_) == 20 and not train & eval_


def test_large_operand_space_splits_by_hash_without_overlap():
    task = AdditionTask(max_operand=999, num_operands=3)
    train = {r.text for r in task.make_prompts("train", 300, seed=0)}
    eval_ = {r.text for r in task.make_prompts("eval", 300, seed=0)}
    assert not train & eval_
    assert task.max_new_tokens_hint == len("2997") + 1


def test_addition_reward_is_exact_match_up_to_eos():
    assert addition_reward("8", "8") == 1.0
    assert addition_reward(" 8 <eos>9", "8") == 1.0
    assert addition_reward("08", "8") == 0.0
    assert addition_reward("8 9", "8") == 0.0
    assert addition_reward("", "8") == 0.0


CORRECT_EXAMPLES = {
    "addition": ("1", "1"),
    "calculator": ("56088", "56088"),
    "math": ("\\boxed{1}", "1"),
    "code": ("print(1)", '{"tests": [{"input": "", "output": "1"}]}'),
}


def test_every_task_reward_resolves_and_its_module_does_not_import_torch():
    assert set(CORRECT_EXAMPLES) == set(TASKS)
    for name, task in TASKS.items():
        assert resolve_reward_fn(task.reward_fn_path)(*CORRECT_EXAMPLES[name]) == 1.0, name
        module = task.reward_fn_path.split(":")[0]
        code = f"import sys, {module}; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
        assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0, module


@pytest.mark.parametrize(("split", "num"), [("test", 1), ("train", -1)])
def test_bad_split_or_count_is_rejected(split, num):
    with pytest.raises(ValueError):
        AdditionTask().make_prompts(split, num, seed=0)


@pytest.mark.parametrize("name", ["math", "code"])
def test_file_tasks_name_their_reward_and_ask_for_prompt_files(name):
    task = make_task(TaskConfig(name=name))
    assert task.reward_fn_path == f"areal_like.tasks.{name}_reward:{name}_reward"
    with pytest.raises(ValueError, match=rf"task '{name}' has no built-in prompts: set task.train_path"):
        task.make_prompts("train", 4, seed=0)


def test_a_math_run_with_prompt_files_loads_them_and_the_math_reward(tmp_path):
    import json

    from areal_like.prompts import load_prompt_records

    path = tmp_path / "gsm.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"{a}+{a}?", "answer": f"#### {2 * a}"}) + "\n" for a in range(3))
    )
    cfg = TaskConfig(name="math", train_path=str(path), eval_path=str(path))
    records = load_prompt_records(cfg, seed=0)
    assert records.reward_fn_path == "areal_like.tasks.math_reward:math_reward" and len(records.train) == 3


def test_a_user_reward_function_from_the_config_replaces_the_task_reward():
    from areal_like.prompts import load_prompt_records

    cfg = TaskConfig(name="addition", reward_fn="tests.unit.reward_fixtures:exact")
    assert load_prompt_records(cfg, seed=0).reward_fn_path == "tests.unit.reward_fixtures:exact"


def test_addition_modulo_keeps_answers_single_digit_and_splits_disjoint():
    from areal_like.tasks import AdditionTask

    task = AdditionTask(max_operand=9, modulus=10)
    train = task.make_prompts("train", 200, seed=0)
    held_out = task.make_prompts("eval", 20, seed=0)
    assert all(len(p.answer) == 1 for p in train + held_out)
    for p in train[:20]:
        a, b = (int(x) for x in p.text.rstrip("=").split("+"))
        assert p.answer == str((a + b) % 10)
    assert not {p.text for p in train} & {p.text for p in held_out}
    assert len({p.text for p in held_out}) == 20  # every held-out pair exactly once

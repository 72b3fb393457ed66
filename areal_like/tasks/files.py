"""Tasks whose prompts come only from files: ``math`` (math-verify answers) and ``code`` (sandboxed tests).

They name a built-in reward and have no prompt generator: set ``task.train_path`` and
``task.eval_path`` to .jsonl/.parquet files with one prompt and answer per record (keys
``task.prompt_key``/``task.answer_key``). A config that selects one without files fails before any
work starts, saying so.

This module must not import torch (reward worker processes import the tasks package).
"""

from __future__ import annotations

from areal_like.core.types import PromptRecord
from areal_like.tasks.base import Task, check_split_and_num


class FileTask(Task):
    """A named reward for prompts loaded from files."""

    def __init__(self, name: str, reward_fn_path: str, max_new_tokens_hint: int, answer_format: str):
        self.name = name
        self.reward_fn_path = reward_fn_path
        self.max_new_tokens_hint = max_new_tokens_hint
        self.answer_format = answer_format

    def __repr__(self) -> str:
        return f"FileTask({self.name!r}, reward={self.reward_fn_path})"

    def make_prompts(self, split: str, num: int, seed: int) -> list[PromptRecord]:
        check_split_and_num(split, num)
        raise ValueError(
            f"task {self.name!r} has no built-in prompts: set task.{split}_path to a .jsonl/.parquet file "
            f"with a prompt and an answer per record ({self.answer_format})"
        )


MATH = FileTask(
    "math",
    "areal_like.tasks.math_reward:math_reward",
    max_new_tokens_hint=512,
    answer_format="answers like '72', '\\\\frac{1}{2}' or a GSM8K solution ending in '#### 72'",
)
CODE = FileTask(
    "code",
    "areal_like.tasks.code_reward:code_reward",
    max_new_tokens_hint=1024,
    answer_format='answers as JSON: {"tests": [{"input": ..., "output": ...}]} or {"asserts": ...}',
)

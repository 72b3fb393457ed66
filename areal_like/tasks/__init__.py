"""Tasks with verifiable rewards, by name: ``get_task("addition")``, or ``make_task(task_config)``.

Reward worker processes import ``areal_like.tasks.arithmetic``, which runs this file: keep its
imports free of torch (the config type is imported for type checking only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from areal_like.tasks.arithmetic import AdditionTask
from areal_like.tasks.base import Task
from areal_like.tasks.calculator import CalculatorTask
from areal_like.tasks.files import CODE, MATH, FileTask

if TYPE_CHECKING:
    from areal_like.config import TaskConfig

TASKS: dict[str, Task] = {
    "addition": AdditionTask(),
    "calculator": CalculatorTask(),
    "math": MATH,
    "code": CODE,
}
"""Each task with its default parameters."""

_BUILDERS: dict[str, Callable[[TaskConfig], Task]] = {
    "addition": lambda cfg: AdditionTask(
        max_operand=cfg.max_operand, num_operands=cfg.num_operands, modulus=cfg.modulus
    ),
    "calculator": lambda cfg: CalculatorTask(max_operand=cfg.max_operand),
    "math": lambda cfg: MATH,
    "code": lambda cfg: CODE,
}
"""How to build each task from a TaskConfig (the parameters a config may set)."""


def get_task(name: str) -> Task:
    """The registered task called ``name`` (default parameters); ValueError listing the known names."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


def make_task(cfg: TaskConfig) -> Task:
    """The task ``cfg.name`` built with the config's parameters (addition: max_operand, num_operands;
    calculator: max_operand; math and code take their prompts from task.train_path/eval_path)."""
    if cfg.name not in _BUILDERS:
        raise ValueError(f"task.name={cfg.name!r} is unknown; known tasks: {sorted(_BUILDERS)}")
    return _BUILDERS[cfg.name](cfg)


__all__ = ["TASKS", "AdditionTask", "CalculatorTask", "FileTask", "Task", "get_task", "make_task"]

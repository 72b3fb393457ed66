"""The plug point for tasks with verifiable rewards.

A task makes prompts (``PromptRecord``) and names its reward function by import path, so that the
reward can be computed in another process (``rollout.rewards.RewardPool``). Reward functions have
the signature ``fn(response: str, answer: str) -> float`` and live in modules that do not import
torch, because reward worker processes import them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from areal_like.core.types import PromptRecord

SPLITS = ("train", "eval")


class Task(ABC):
    """A prompt generator with a verifiable reward."""

    name: str
    """Registry key and prefix of the prompt ids."""
    reward_fn_path: str
    """Import path "package.module:function" of the reward function."""
    max_new_tokens_hint: int
    """Enough response tokens for a correct answer and its eos; a sensible generation cap."""

    @abstractmethod
    def make_prompts(self, split: str, num: int, seed: int) -> list[PromptRecord]:
        """``num`` prompts from ``split`` ('train' or 'eval'), the same list for the same seed.

        Train and eval prompts are disjoint wherever the task's space allows.
        """


def check_split_and_num(split: str, num: int) -> None:
    """ValueError for an unknown split or a negative count."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    if num < 0:
        raise ValueError(f"num={num}; must be >= 0")

"""Addition prompts ("3+5=" -> "8") and their exact-match reward.

This module must not import torch: reward worker processes import it to call ``addition_reward``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random

from areal_like.core.tokenizer import EOS_TOKEN
from areal_like.core.types import PromptRecord
from areal_like.tasks.base import Task, check_split_and_num

EVAL_FRACTION = 0.2
"""Share of the operand tuples held out for the eval split."""
_ENUMERATE_LIMIT = 10_000
"""Up to this many operand tuples the split is an exact, enumerated hold-out; above it, a hash bucket."""


def addition_reward(response: str, answer: str) -> float:
    """1.0 if the response, cut at the first eos and stripped, equals the answer exactly, else 0.0."""
    return 1.0 if response.split(EOS_TOKEN, 1)[0].strip() == answer else 0.0


class AdditionTask(Task):
    """Sums of ``num_operands`` integers in [0, max_operand], e.g. "3+5=" with answer "8".

    Split: the operand tuples ranked by a stable hash; the first ``EVAL_FRACTION`` of them are eval
    (for single digits: 20 of the 100 pairs), the rest train. Prompts are drawn from the split with
    replacement. Spaces larger than ``_ENUMERATE_LIMIT`` assign each tuple by its hash bucket instead.
    """

    name = "addition"
    reward_fn_path = "areal_like.tasks.arithmetic:addition_reward"

    def __init__(self, max_operand: int = 9, num_operands: int = 2, modulus: int | None = None):
        if modulus is not None and modulus < 2:
            raise ValueError(f"modulus={modulus}; must be >= 2, or None for the plain sum")
        if max_operand < 1:
            raise ValueError(f"max_operand={max_operand}; must be >= 1 so both splits are non-empty")
        if num_operands < 2:
            raise ValueError(f"num_operands={num_operands}; must be >= 2")
        self.max_operand = max_operand
        self.num_operands = num_operands
        self.modulus = modulus
        self.space_size = (max_operand + 1) ** num_operands
        largest = max_operand * num_operands if modulus is None else modulus - 1
        self.max_new_tokens_hint = len(str(largest)) + 1  # digits + eos

    def __repr__(self) -> str:
        return (
            f"AdditionTask(max_operand={self.max_operand}, num_operands={self.num_operands}, "
            f"modulus={self.modulus})"
        )

    def make_prompts(self, split: str, num: int, seed: int) -> list[PromptRecord]:
        check_split_and_num(split, num)
        rng = random.Random(f"{self.name}:{split}:{seed}")
        records = []
        for i in range(num):
            operands = self._eval_operands(i) if split == "eval" else self._sample_operands(split, rng)
            records.append(
                PromptRecord(
                    prompt_id=f"{self.name}:{split}:{seed}:{i}",
                    text="+".join(map(str, operands)) + "=",
                    answer=str(self.answer(operands)),
                )
            )
        return records

    def answer(self, operands: tuple[int, ...]) -> int:
        total = sum(operands)
        return total if self.modulus is None else total % self.modulus

    def _eval_operands(self, i: int) -> tuple[int, ...]:
        # Held-out prompts cycle through the enumerated eval tuples, so an eval of at least that many
        # prompts covers every held-out tuple equally (a random draw would repeat some, miss others).
        if self.space_size <= _ENUMERATE_LIMIT:
            held_out = self._enumerated_splits["eval"]
            return held_out[i % len(held_out)]
        return self._sample_operands("eval", random.Random(f"{self.name}:eval:{i}"))

    def _sample_operands(self, split: str, rng: random.Random) -> tuple[int, ...]:
        if self.space_size <= _ENUMERATE_LIMIT:
            return rng.choice(self._enumerated_splits[split])
        while True:
            operands = tuple(rng.randint(0, self.max_operand) for _ in range(self.num_operands))
            if _is_eval(operands) == (split == "eval"):
                return operands

    @functools.cached_property
    def _enumerated_splits(self) -> dict[str, list[tuple[int, ...]]]:
        ranked = sorted(
            itertools.product(range(self.max_operand + 1), repeat=self.num_operands), key=_stable_hash
        )
        num_eval = max(1, round(EVAL_FRACTION * len(ranked)))
        return {"eval": ranked[:num_eval], "train": ranked[num_eval:]}


def _stable_hash(operands: tuple[int, ...]) -> int:
    """A hash that is the same in every process and run (Python's ``hash`` of str is salted)."""
    digest = hashlib.blake2b(",".join(map(str, operands)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _is_eval(operands: tuple[int, ...]) -> bool:
    return _stable_hash(operands) % 1000 < EVAL_FRACTION * 1000

"""Multi-digit multiplication that a tiny model can solve only with the calculator tool.

A prompt is "A*B=" with both operands of as many digits as ``max_operand`` (999: 100-999); the
answer is the product. The
environment (``CalculatorEnv``, a ``ToolEnv`` with the ``Calculator``) runs the model's calls and
rewards the final answer (a turn without a call) by exact match. A solved episode, in the plain
chat format of the character tokenizer (``rollout.chat``), reads:

    prompt   123*456=
    model    <tool_call>{"name":"calculator","arguments":{"expression":"123*456"}}</tool_call><eos>
    env      <tool_response>56088</tool_response>
    model    56088<eos>

A model of a few hundred thousand parameters cannot multiply in its head (a direct guess almost
never matches), so the reward rises only when the policy calls the tool with the prompt's expression
and copies its result. ``warmup_demonstrations`` makes a short supervised warm-up set that teaches
the *format*: a fraction ``WARMUP_TOOL_FRACTION`` of the demonstrations use the tool as above, the
rest answer at once with a guess of the right length (the usual answer of a model that never saw a
tool). After the warm-up the policy calls the tool on about that fraction of prompts; RL must raise
it, and make the copies exact, for the reward to rise.

This module must not import torch: reward worker processes import the tasks package.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from areal_like.core.tokenizer import EOS_TOKEN
from areal_like.core.types import PromptRecord
from areal_like.tasks.base import Task, check_split_and_num
from rollout.tools import Calculator, ToolEnv

EVAL_FRACTION = 0.2
"""Share of the operand pairs held out for the eval split (by a stable hash)."""
WARMUP_TOOL_FRACTION = 0.2
"""Share of the warm-up demonstrations that call the calculator; the others guess an answer."""
ALPHABET = '0123456789+-*/=() abcdefghijklmnopqrstuvwxyz<>_{}":,.'
"""Characters of a character tokenizer that can write calls, tool responses and error messages."""
TAG_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
"""Added to the tokenizer by the warm-up, one token each, as in Qwen's vocabulary (not 'special':
decoding keeps them, so the environment reads the calls)."""


def calculator_reward(response: str, answer: str) -> float:
    """1.0 if the final answer, cut at the first eos and stripped, equals the answer exactly."""
    return 1.0 if response.split(EOS_TOKEN, 1)[0].strip() == answer else 0.0


def tool_call_text(expression: str) -> str:
    """The default call format (``rollout.tools.TaggedJsonParser``) for one calculator call."""
    payload = {"name": Calculator.name, "arguments": {"expression": expression}}
    return f"<tool_call>{json.dumps(payload, separators=(',', ':'))}</tool_call>"


class CalculatorEnv(ToolEnv):
    """The calculator tool, and the exact-match reward of the final answer."""

    tools = (Calculator(),)

    def score(self, answer: str, task: PromptRecord) -> float:
        return calculator_reward(answer, task.answer)


class CalculatorTask(Task):
    """Products of two operands with the digits of ``max_operand``, e.g. "123*456=" -> "56088".

    Fixed-width operands give every prompt the same length, so the copies the policy has to make
    (the expression into the call, the result into the answer) sit at fixed distances."""

    name = "calculator"
    reward_fn_path = "areal_like.tasks.calculator:calculator_reward"

    def __init__(self, max_operand: int = 999) -> None:
        if max_operand < 19:
            raise ValueError(
                f"task.max_operand={max_operand}: the calculator task needs multi-digit operands, "
                ">= 19 (operands run from 10 ** (digits - 1) to max_operand); e.g. 999"
            )
        self.max_operand = max_operand
        self.min_operand = 10 ** (len(str(max_operand)) - 1)
        self.max_new_tokens_hint = len(tool_call_text(f"{max_operand}*{max_operand}")) + 1

    def __repr__(self) -> str:
        return f"CalculatorTask(max_operand={self.max_operand})"

    def make_prompts(self, split: str, num: int, seed: int) -> list[PromptRecord]:
        check_split_and_num(split, num)
        rng = random.Random(f"{self.name}:{split}:{seed}")
        records = []
        for i in range(num):
            while True:
                a, b = (rng.randint(self.min_operand, self.max_operand) for _ in range(2))
                if _is_eval(a, b) == (split == "eval"):
                    break
            records.append(PromptRecord(f"{self.name}:{split}:{seed}:{i}", f"{a}*{b}=", str(a * b)))
        return records


@dataclass(frozen=True)
class Demonstration:
    """One warm-up episode as token ids, laid out exactly as a rollout would lay it out."""

    prompt_ids: list[int]
    """[P] the prompt, chat-formatted."""
    response_ids: list[int]
    """[R] the model's turns and the environment's tokens between them."""
    loss_mask: list[int]
    """[R] 1 on the model's tokens, 0 on the environment's."""


def warmup_demonstrations(records: list[PromptRecord], tokenizer, seed: int) -> list[Demonstration]:
    """One demonstration per record (see the module docstring): a tool episode for a
    ``WARMUP_TOOL_FRACTION`` of them, a direct guess for the rest."""
    from rollout.chat import ChatFormat

    chat = ChatFormat(tokenizer)
    rng = random.Random(f"calculator-warmup:{seed}")
    eos = [tokenizer.eos_token_id]

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    demos = []
    for record in records:
        expression = record.text.rstrip("=")
        if rng.random() < WARMUP_TOOL_FRACTION:
            call = encode(tool_call_text(expression)) + eos
            result = chat.observation_ids([Calculator()(expression=expression)], "tool", after_stop=True)
            answer = encode(record.answer) + eos
            response, mask = call + result + answer, [1] * len(call) + [0] * len(result) + [1] * len(answer)
        else:
            guess = str(rng.randint(10 ** (len(record.answer) - 1), 10 ** len(record.answer) - 1))
            response = encode(guess) + eos
            mask = [1] * len(response)
        demos.append(Demonstration(chat.prompt_ids(record.text), response, mask))
    return demos


def _is_eval(a: int, b: int) -> bool:
    digest = hashlib.blake2b(f"{a}*{b}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 1000 < EVAL_FRACTION * 1000

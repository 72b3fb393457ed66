"""The GSM8K reward: the response's final answer against the ground truth's ``#### N``, by value.

Use: ``task.reward_fn=areal_like.tasks.gsm8k:gsm8k_reward`` with prompt files in GSM8K's format
(``task.prompt_key=question task.answer_key=answer``; ``answer`` is a worked solution ending in
``#### 72``, or a bare answer). The response's final answer is, in this order:
1. the text after its last ``####`` (to the end of that line), as GSM8K solutions end;
2. else the content of its last ``\\boxed{...}`` (braces balanced), as "put your final answer within
   \\boxed{}" prompts ask;
3. else its last plain number (``-1,234.5`` style).
The two answers are compared by math-verify (``72``, ``72.0`` and ``\\frac{144}{2}`` are equal;
thousands separators are dropped). A response with no answer scores 0; a ground truth with none
raises ValueError (a data error the reward pool counts as status 'error'). Of a reasoning model's
response only the text after ``</think>`` counts (``math_reward.answer_part``).

Runs inside ``RewardPool`` worker processes: no torch, and math-verify's own signal-based timeouts
off (the pool's per-call timer bounds the call), as in ``math_reward``.
"""

from __future__ import annotations

import logging
import re

from math_verify import parse, verify

from areal_like.tasks.math_reward import answer_part

logging.getLogger("math_verify").setLevel(logging.ERROR)

_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_reward(response: str, answer: str) -> float:
    """1.0 when the response's final answer (see the module docstring) equals the ground truth's."""
    gold = extract_answer(answer)
    gold_parsed = parse(f"${gold}$", parsing_timeout=None) if gold is not None else []
    if not gold_parsed:
        raise ValueError(f"ground truth {answer[-80:]!r} has no parsable final answer")
    predicted = extract_answer(answer_part(response))
    if predicted is None:
        return 0.0
    predicted_parsed = parse(f"${predicted}$", parsing_timeout=None)
    if not predicted_parsed:
        return 0.0
    return 1.0 if verify(gold_parsed, predicted_parsed, timeout_seconds=None) else 0.0


def extract_answer(text: str) -> str | None:
    """The final answer of ``text``: after the last ``####``, else the last ``\\boxed{}``, else the
    last number; None when it has none."""
    hashes = _HASHES.findall(text)
    if hashes:
        return _clean(hashes[-1])
    boxed = last_boxed(text)
    if boxed is not None:
        return _clean(boxed)
    numbers = _NUMBER.findall(text)
    return _clean(numbers[-1]) if numbers else None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with nested braces balanced; None if there is none (or
    it is never closed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None


def _clean(answer: str) -> str | None:
    # "1,234." -> "1234": thousands separators and a sentence's full stop are not part of the value.
    answer = answer.strip().replace(",", "").rstrip(".").strip()
    if answer.startswith("$") and answer.endswith("$") and len(answer) > 1:
        answer = answer.strip("$").strip()
    return answer or None

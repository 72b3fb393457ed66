"""Math answer rewards with math-verify (Hugging Face): GSM8K- and MATH-style ground truths.

Use: ``task.name=math`` (prompts from ``task.train_path``/``eval_path``), or set
``task.reward_fn=areal_like.tasks.math_reward:math_reward`` with any task. The response's final answer
(the last ``\\boxed{}``, a ``$...$`` expression, or a plain number) is compared with the ground truth
by value: ``1/2``, ``0.5`` and ``\\frac{1}{2}`` are equal, ``2\\sqrt{2}`` equals ``\\sqrt{8}``, ``1,234``
equals ``1234``. A GSM8K solution used as the ground truth counts by its final ``#### N`` line.

Reasoning models (Qwen3 with thinking on, R1-style): only the text after the last ``</think>`` is
scored (``answer_part``), and a response that opened ``<think>`` and never closed it (cut off while
thinking) has no answer and scores 0, so a number met while thinking is never taken for the answer.
Where the chat template itself opens the block in the prompt, a response cut off while thinking
carries neither tag and is scored whole.

Runs inside ``RewardPool`` worker processes, whose per-call timer bounds every call. math-verify's
own timeouts are switched off here: they use ``signal.alarm``, which shares the process's single
real-time timer with the pool's and would cancel it.
"""

from __future__ import annotations

import logging

from math_verify import parse, verify

# math-verify warns (once per process) that its timeouts are off; the pool's timer covers the call.
logging.getLogger("math_verify").setLevel(logging.ERROR)


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def answer_part(response: str) -> str:
    """The part of ``response`` that holds its answer: after the last ``</think>``; '' when a
    ``<think>`` was opened and never closed; else the whole response."""
    if THINK_CLOSE in response:
        return response.rsplit(THINK_CLOSE, 1)[1]
    return "" if THINK_OPEN in response else response


def math_reward(response: str, answer: str) -> float:
    """1.0 when the response's final answer equals the ground truth mathematically, else 0.0.

    Raises ValueError when the ground truth itself has no parsable answer (a data error, which the
    pool reports as status 'error', not a wrong response).
    """
    gold = parse(_gold_text(answer), parsing_timeout=None)
    if not gold:
        raise ValueError(f"ground truth {answer!r} has no parsable answer")
    predicted = parse(answer_part(response), parsing_timeout=None)
    if not predicted:
        return 0.0
    return 1.0 if verify(gold, predicted, timeout_seconds=None) else 0.0


def _gold_text(answer: str) -> str:
    # GSM8K answers end with "#### 72" after the worked solution; MATH answers are bare LaTeX or boxed.
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if "\\boxed" in answer or "$" in answer:
        return answer
    return f"${answer}$"

"""Synthetic GSM8K-style arithmetic word problems of graded difficulty (1-3 steps), deterministic by seed.

Each problem is a short story about one person and one kind of item: a start ("Mia has 7 pencils." or
"Mia buys 3 boxes of pencils with 4 pencils in each box."), then steps that add, take away, or share
equally, then a question. The answer is GSM8K's format: one line per step with its arithmetic, then
``#### N``::

    {"question": "Mia has 7 pencils. She buys 5 more pencils. How many pencils does Mia have now?",
     "answer": "7 + 5 = 12\\n#### 12", "steps": 1}

``steps`` counts the arithmetic operations (the difficulty grade). Every intermediate value is a
non-negative integer and shares divide evenly. Train and test questions are disjoint.

The shipped files in ``data/gsm8k_synth/`` are this module's output (a test regenerates them)::

    python -m areal_like.tasks.gsm8k_synth --out data/gsm8k_synth

- ``train.jsonl`` / ``test.jsonl`` (4,000 / 400): 1-3 steps (40/35/25%), operands up to 20, multiplications of
  up to 9 x 9;
- ``train_easy.jsonl`` / ``test_easy.jsonl`` (1,500 / 100): one step adding or taking away numbers
  up to 5, a difficulty a tiny model with the 152k-token head starts to learn on 2 CPU cores within
  minutes (``configs/gsm8k_cpu.yaml``).

No torch here: the tasks package is imported by reward worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass

NAMES = [
    ("Mia", "She"), ("Liam", "He"), ("Ava", "She"), ("Noah", "He"), ("Emma", "She"), ("Lucas", "He"),
    ("Zoe", "She"), ("Omar", "He"), ("Lily", "She"), ("Ben", "He"), ("Sara", "She"), ("Leo", "He"),
    ("Nina", "She"), ("Sam", "He"), ("Ivy", "She"), ("Max", "He"), ("Rosa", "She"), ("Tom", "He"),
    ("Anna", "She"), ("Jack", "He"), ("Maya", "She"), ("Ravi", "He"), ("Chloe", "She"), ("Ken", "He"),
]  # fmt: skip
ITEMS = [
    ("apples", "bag"), ("pencils", "box"), ("marbles", "jar"), ("stickers", "sheet"), ("cookies", "tray"),
    ("books", "shelf"), ("coins", "purse"), ("cards", "pack"), ("flowers", "vase"), ("shells", "bucket"),
    ("eggs", "carton"), ("candies", "bag"), ("toys", "box"), ("stamps", "album"), ("balloons", "pack"),
]  # fmt: skip


@dataclass(frozen=True)
class Difficulty:
    """The space problems are drawn from."""

    step_weights: tuple[float, float, float]
    """Relative frequency of problems with 1, 2 and 3 steps."""
    max_operand: int
    """Largest number added or taken away, and the largest starting amount."""
    max_factor: int
    """Largest factor of a multiplication (boxes x items per box) and of a share; 0 = none."""


FULL = Difficulty(step_weights=(0.40, 0.35, 0.25), max_operand=20, max_factor=9)
EASY = Difficulty(step_weights=(1.0, 0.0, 0.0), max_operand=5, max_factor=0)


def make_problem(rng: random.Random, num_steps: int, level: Difficulty) -> dict | None:
    """One problem with exactly ``num_steps`` operations (a dict with question, answer, steps), or
    None when the draw cannot be completed (a total with no divisor to share by)."""
    name, pronoun = rng.choice(NAMES)
    item, container = rng.choice(ITEMS)
    sentences, lines = [], []
    remaining = num_steps
    share = level.max_factor >= 2 and remaining >= 1 and rng.random() < 0.25
    remaining -= share
    if level.max_factor >= 2 and remaining >= 1 and rng.random() < 0.4:
        boxes, per_box = rng.randint(2, level.max_factor), rng.randint(2, level.max_factor)
        total = boxes * per_box
        sentences.append(
            f"{name} buys {boxes} {_plural(container)} of {item} with {per_box} {item} in each {container}."
        )
        lines.append(f"{boxes} * {per_box} = {total}")
        remaining -= 1
    else:
        total = rng.randint(2, level.max_operand)
        sentences.append(f"{name} has {total} {item}.")
    for _ in range(remaining):
        if total >= 2 and rng.random() < 0.5:
            amount = rng.randint(1, min(total - 1, level.max_operand))
            sentences.append(
                rng.choice(_TAKE).format(p=pronoun, n=amount, item=item, counted=_items(amount, item))
            )
            lines.append(f"{total} - {amount} = {total - amount}")
            total -= amount
        else:
            amount = rng.randint(1, level.max_operand)
            sentences.append(
                rng.choice(_ADD).format(p=pronoun, n=amount, item=item, counted=_items(amount, item))
            )
            lines.append(f"{total} + {amount} = {total + amount}")
            total += amount
    if share:
        divisors = [k for k in range(2, level.max_factor + 1) if total % k == 0]
        if not divisors:  # a prime total cannot be shared evenly: the caller draws again
            return None
        return _finish(name, item, sentences, lines, total, num_steps, rng.choice(divisors))
    return _finish(name, item, sentences, lines, total, num_steps, None)


# {n} {counted}: "1 apple", "2 apples"; "of the {item}" keeps the plural.
_ADD = [
    "{p} buys {n} more {counted}.",
    "{p} finds {n} more {counted}.",
    "{p} gets {n} more {counted} from a friend.",
]
_TAKE = [
    "{p} gives {n} {counted} to a friend.",
    "{p} loses {n} of the {item}.",
    "{p} sells {n} of the {item}.",
]


def _items(n: int, item: str) -> str:
    """The item's name for ``n`` of them ("1 apple", "2 apples")."""
    if n != 1:
        return item
    return item[:-3] + "y" if item.endswith("ies") else item[:-1]


def _finish(name, item, sentences, lines, total, num_steps, friends) -> dict:
    if friends is None:
        question = f"How many {item} does {name} have now?"
        value = total
    else:
        sentences.append(f"{name} shares the {item} equally among {friends} friends.")
        value = total // friends
        lines.append(f"{total} / {friends} = {value}")
        question = f"How many {item} does each friend get?"
    return {
        "question": " ".join([*sentences, question]),
        "answer": "\n".join([*lines, f"#### {value}"]),
        "steps": num_steps,
    }


def _plural(container: str) -> str:
    return {"box": "boxes", "shelf": "shelves"}.get(container, container + "s")


def generate(num: int, seed: int, level: Difficulty, exclude: set[str] | None = None) -> list[dict]:
    """``num`` distinct problems (questions not in ``exclude``) with 1-3 steps drawn by
    ``level.step_weights``; the same list for the same seed."""
    rng = random.Random(f"gsm8k_synth:{seed}")
    exclude = exclude or set()
    seen: set[str] = set()
    problems: list[dict] = []
    attempts = 0
    while len(problems) < num:
        attempts += 1
        if attempts > 200 * num + 1000:
            raise ValueError(f"only {len(problems)} distinct problems of {num} asked for; lower the count")
        num_steps = rng.choices((1, 2, 3), weights=level.step_weights)[0]
        problem = make_problem(rng, num_steps, level)
        if problem is None or problem["question"] in seen or problem["question"] in exclude:
            continue
        seen.add(problem["question"])
        problems.append(problem)
    return problems


def write_jsonl(path: str, problems: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for problem in problems:
            f.write(json.dumps(problem) + "\n")


SPLITS = {
    # file name: (difficulty, number of problems, seed offset); test first so train excludes it
    "test.jsonl": (FULL, 400, 1),
    "train.jsonl": (FULL, 4000, 0),
    "test_easy.jsonl": (EASY, 100, 3),
    "train_easy.jsonl": (EASY, 1500, 2),
}


def write_all(out_dir: str, seed: int = 0) -> list[str]:
    """Write every file of ``SPLITS`` into ``out_dir``; train files exclude their test questions."""
    paths: list[str] = []
    held_out: dict[Difficulty, set[str]] = {FULL: set(), EASY: set()}
    for name, (level, num, offset) in SPLITS.items():
        problems = generate(num, seed * 1000 + offset, level, exclude=held_out[level])
        if name.startswith("test"):
            held_out[level] = {p["question"] for p in problems}
        path = os.path.join(out_dir, name)
        write_jsonl(path, problems)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/gsm8k_synth", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_all(args.out, args.seed):
        print(path)


if __name__ == "__main__":
    main()

"""The embedded reasoning task: procedurally generated arithmetic word problems.

Each problem follows one quantity through a chain of everyday operations (buying, giving away, packing into
boxes, sharing equally); its worked solution writes every step as "a op b = c", which is what the step
checker reads. Splits: ``train`` and ``test`` are drawn from the in-domain generator (disjoint seeds); ``ood``
is harder (more steps, larger numbers). Everything is deterministic given the seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from .base import Problem, Task

_NAMES = ["Tom", "Ana", "Lee", "Mia", "Sam", "Ivy", "Ben", "Zoe", "Max", "Eva", "Leo", "Ada"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "shells", "cards", "beads"]


@dataclass(frozen=True)
class Difficulty:
    min_steps: int
    max_steps: int
    max_start: int  # largest starting amount
    max_operand: int  # largest number in an addition or subtraction


SPLIT_DIFFICULTY = {
    "train": Difficulty(1, 1, 20, 10),
    "test": Difficulty(1, 1, 20, 10),
    "ood": Difficulty(2, 3, 60, 30),
}
# Seed offsets keep the splits apart: the same seed never yields the same problem in two splits.
_SPLIT_OFFSET = {"train": 0, "test": 1_000_003, "ood": 2_000_003}


def _step(rng: random.Random, name: str, item: str, value: int, d: Difficulty, last: bool):
    """One operation on the running amount: (sentence, "a op b", result). Sharing out ends the story."""
    kinds = ["add", "sub", "mul"] + (["div"] if value > 1 and last else [])
    kind = rng.choice(kinds)
    if kind == "add":
        b = rng.randint(2, d.max_operand)
        text = rng.choice([f"Then {name} buys {b} more {item}.", f"A friend gives {name} {b} more {item}.",
                           f"{name} finds {b} more {item}."])
        return text, f"{value} + {b}", value + b
    if kind == "sub" and value > 2:
        b = rng.randint(1, min(value - 1, d.max_operand))
        text = rng.choice([f"Then {name} gives away {b} {item}.", f"{name} loses {b} {item}.",
                           f"{name} uses {b} of the {item}."])
        return text, f"{value} - {b}", value - b
    if kind == "div":
        divisors = [k for k in range(2, 7) if value % k == 0]
        if divisors:
            k = rng.choice(divisors)
            text = f"{name} shares the {item} equally among {k} friends, who each keep their share."
            return text, f"{value} / {k}", value // k
    k = rng.randint(2, 5)
    text = rng.choice([f"Then the number of {item} becomes {k} times as many.",
                       f"{name} collects {k} times as many {item} as before."])
    return text, f"{value} * {k}", value * k


def make_problem(rng: random.Random, d: Difficulty) -> Problem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(3, d.max_start)
    sentences = [f"{name} has {value} {item}."]
    steps = []
    count = rng.randint(d.min_steps, d.max_steps)
    for i in range(count):
        text, expression, result = _step(rng, name, item, value, d, last=i == count - 1)
        sentences.append(text)
        steps.append(f"{expression} = {result}")
        value = result
    if " / " in steps[-1]:
        sentences.append(f"How many {item} does each friend get?")
    else:
        sentences.append(f"How many {item} does {name} have now?")
    question = " ".join(sentences)
    # The student's own answer format ("a op b = c", then "The answer is"): a teacher that reads this solution
    # then scores the student's tokens in the style it asks for, not in a "Step 1:" style of its own.
    solution = " ".join(f"{s}." for s in steps) + f" The answer is {value}."
    return Problem(question=question, solution=solution, answer=str(value), meta={"steps": len(steps)})


class ArithmeticTask(Task):
    """Arithmetic word problems; ``difficulty`` maps split names to a :class:`Difficulty` (override to tune)."""

    name = "arithmetic"
    splits = tuple(SPLIT_DIFFICULTY)

    def __init__(self, difficulty: Optional[dict] = None):
        self.difficulty = dict(SPLIT_DIFFICULTY, **(difficulty or {}))

    def problems(self, split: str, n: Optional[int] = None, seed: int = 0) -> list:
        self.check_split(split)
        if n is None:
            n = 1000
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(seed + _SPLIT_OFFSET[split])
        return [make_problem(rng, self.difficulty[split]) for _ in range(n)]

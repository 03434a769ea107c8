"""What every task provides: problems with privileged solutions, a verifier and a step checker."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .answers import StepError, extract_answer, find_first_wrong_step, same_answer


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # worked step-by-step solution: the privileged information of the teacher context
    answer: str  # canonical final answer, e.g. "42"
    meta: dict = field(default_factory=dict, compare=False)


class Task:
    """Base of the tasks: subclasses implement :meth:`problems`; verification is by final number."""

    name = "task"
    splits: tuple = ()

    def problems(self, split: str, n: Optional[int] = None, seed: int = 0) -> list:
        raise TypeError(f"{type(self).__name__} must implement problems()")

    def check_split(self, split: str):
        if split not in self.splits:
            raise ValueError(f"split must be one of {self.splits} for task {self.name!r}, got {split!r}")

    def is_correct(self, problem: Problem, completion: str) -> bool:
        return same_answer(extract_answer(completion), problem.answer)

    def first_error(self, problem: Problem, completion: str) -> Optional[StepError]:
        return find_first_wrong_step(completion)

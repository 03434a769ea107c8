"""Reasoning tasks: problems with privileged worked solutions, a verifier and a step checker."""
from .answers import StepError, extract_answer, find_first_wrong_step, normalize_number, reference_answer, same_answer
from .arithmetic import ArithmeticTask, Difficulty
from .base import Problem, Task
from .gsm8k import GSM8KTask

TASKS = {"arithmetic": ArithmeticTask, "gsm8k": GSM8KTask}


def get_task(name: str, **options) -> Task:
    """A task by name: ``"arithmetic"`` (embedded, splits train/test/ood) or ``"gsm8k"`` (``path=``)."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](**options)


__all__ = ["ArithmeticTask", "Difficulty", "GSM8KTask", "Problem", "StepError", "TASKS", "Task", "extract_answer",
           "find_first_wrong_step", "get_task", "normalize_number", "reference_answer", "same_answer"]

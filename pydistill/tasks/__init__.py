"""Reasoning tasks: problems with privileged worked solutions, a verifier and a step checker."""
from .answers import (StepError, derives_answer, extract_answer, find_first_wrong_step, normalize_number,
                      same_answer, solution_answer)
from .arithmetic import ArithmeticTask, Difficulty
from .base import Problem, Task
from .dataset import DatasetTask
from .gsm8k import GSM8KTask

TASKS = {"arithmetic": ArithmeticTask, "gsm8k": GSM8KTask}


def get_task(name: str, **options) -> Task:
    """A task by name: ``"arithmetic"`` (embedded, splits train/test/ood) or ``"gsm8k"`` (``path=``)."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](**options)


def task_from_config(config) -> Task:
    """The task a training config names: a :class:`DatasetTask` when ``config.dataset`` is set (its
    ``prompt_column`` / ``solution_column`` / ``answer_column``), else the built-in ``config.task``."""
    if getattr(config, "dataset", None):
        return DatasetTask(config.dataset, prompt_column=config.prompt_column,
                           solution_column=config.solution_column, answer_column=config.answer_column,
                           config_name=config.dataset_config)
    return get_task(config.task, **({"path": config.data_path} if config.task == "gsm8k" else {}))


__all__ = ["ArithmeticTask", "DatasetTask", "task_from_config", "Difficulty", "GSM8KTask", "Problem", "StepError",
           "TASKS", "Task", "derives_answer", "extract_answer", "find_first_wrong_step", "get_task", "normalize_number",
           "same_answer", "solution_answer"]


def __getattr__(name):
    from .._deprecated import renamed

    return renamed(__name__, name, {"reference_answer": "solution_answer"}, globals())

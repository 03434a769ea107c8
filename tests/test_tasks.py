"""Tasks: generation, verification, the step checker, GSM8K loading."""
import os

import pytest

from pydistill.tasks import (ArithmeticTask, GSM8KTask, extract_answer, find_first_wrong_step, get_task,
                             normalize_number, solution_answer)
from pydistill.tasks.gsm8k import DEFAULT_PATH

GSM8K = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k")


def test_arithmetic_is_deterministic_and_splits_differ():
    task = ArithmeticTask()
    assert task.problems("train", 20, seed=3) == task.problems("train", 20, seed=3)
    assert task.problems("train", 20, seed=3) != task.problems("train", 20, seed=4)
    assert not set(p.question for p in task.problems("train", 50)) & set(p.question for p in task.problems("test", 50))
    for p in task.problems("ood", 30):
        assert 2 <= p.meta["steps"] <= 3


@pytest.mark.parametrize("split", ["train", "test", "ood"])
def test_arithmetic_solutions_check_out(split):
    task = get_task("arithmetic")
    for p in task.problems(split, 100):
        assert find_first_wrong_step(p.solution) is None
        assert task.is_correct(p, p.solution)
        assert int(p.answer) >= 0


@pytest.mark.parametrize("text,answer", [
    ("so \\boxed{42} and then \\boxed{43}", "43"), ("The answer is $1,000.", "1000"), ("answer: 3.50", "3.5"),
    ("#### -2", "-2"), ("no number", None), ("The answer is 7.0", "7"),
    # no answer format, no answer: a truncated ramble's last number is not a final answer (issue 29)
    ("we get 7 apples, then 9", None), ("3 + 4 = 7, so 7 * 2 = 14 and then", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_a_truncated_ramble_ending_on_the_answer_is_not_correct():
    task = ArithmeticTask()
    p = task.problems("test", 1)[0]
    assert not task.is_correct(p, f"Let me think. We have {p.answer}")
    assert task.is_correct(p, f"So the answer is {p.answer}")


def test_verifier():
    task = ArithmeticTask()
    p = task.problems("test", 1)[0]
    assert task.is_correct(p, f"The answer is {p.answer}.")
    assert not task.is_correct(p, f"The answer is {int(p.answer) + 1}.")
    assert not task.is_correct(p, "I do not know.")


@pytest.mark.parametrize("text,quote,expected", [
    ("3 + 4 = 7, then 7 * 2 = 15, then 15 - 1 = 13", "7 * 2 = 15", "14"),
    ("2 + 3 + 4 = 10", "2 + 3 + 4 = 10", "9"),
    ("2 + 3 * 4 = 14 and 10 / 4 = 2.5 and 9 ÷ 3 = 4", "9 ÷ 3 = 4", "3"),
    ("$1,200 / 3 = $400 so 1,000 + 2.5 = 1,003.5", "1,000 + 2.5 = 1,003.5", "1002.5"),
    ("He paid <<12*3=36>>36 and <<36-5=30>>30", "36-5=30", "31"),
    ("6 x 7 = 42; 6 × 7 = 43", "6 × 7 = 43", "42"),
])
def test_step_checker(text, quote, expected):
    error = find_first_wrong_step(text)
    assert error.quote == quote and error.expected == expected
    assert text[error.char_start:error.char_end] == quote


@pytest.mark.parametrize("text", ["3 + 4 = 7", "no steps here", "x = 3", "10 / 0 = 5", "2,000 + 1 = 2,001"])
def test_step_checker_finds_nothing(text):
    assert find_first_wrong_step(text) is None


def test_normalize_number():
    assert [normalize_number(x) for x in ["1,000", "$3.50", "-2", "7.", "abc"]] == ["1000", "3.5", "-2", "7", None]


@pytest.mark.skipif(not os.path.isdir(GSM8K), reason="shared GSM8K data not present")
def test_gsm8k_loader_on_shared_data():
    task = GSM8KTask(GSM8K)
    problems = task.problems("test", 50, seed=0)
    assert len(problems) == 50 and problems == task.problems("test", 50, seed=0)
    for p in problems:
        float(p.answer)
        assert "<<" not in p.solution and task.is_correct(p, p.solution)
    assert len(task.problems("train")) == 7473
    assert os.path.realpath(DEFAULT_PATH) == os.path.realpath(GSM8K)


def test_gsm8k_missing_path_names_it(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        GSM8KTask(str(tmp_path / "nowhere.jsonl")).problems("test")
    with pytest.raises(ValueError, match="test.jsonl"):
        GSM8KTask(str(tmp_path)).problems("test")
    with pytest.raises(ValueError, match="split must be one of"):
        GSM8KTask(str(tmp_path)).problems("ood")
    with pytest.raises(ValueError, match="####"):
        solution_answer("no final answer")


def test_unknown_task():
    with pytest.raises(ValueError, match="task must be one of"):
        get_task("mmlu")

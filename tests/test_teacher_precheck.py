"""The teacher-context pre-check (issue 29, item 3) on a tiny model: every context is built and answered, the
withheld control hides every number to copy, and bad arguments fail in one line."""
import pytest

from benchmarks import teacher_precheck as precheck
from pydistill.models import tiny_model
from tests.trainer_helpers import TASK


def test_withhold_hides_results_and_the_final_answer():
    solution = "3 * 4 = 12. 12 + 2 = 14. The answer is 14."
    assert precheck.withhold(solution, "14") == "3 * 4 = ?. 12 + 2 = ?. The answer is ?."
    assert precheck.withhold("She sold <<48/2=24>>24 clips. #### 24", "24") == "She sold <<48/2=?>>? clips. #### ?"
    assert precheck.withhold("Tom has 14 boxes", "14") == "Tom has ? boxes"


def test_french_detection():
    assert precheck.is_french("La réponse est 7.") and precheck.is_french("Il a donc 7 pommes")
    assert not precheck.is_french("The answer is 7.")


def test_every_context_holds_its_privileged_text_and_the_control_hides_the_answer():
    problems = TASK.problems("train", n=2, seed=0)
    right = [p.solution for p in problems]
    wrong = [f"First, {p.solution.split('=')[0]}= {int(p.answer) + 1}. The answer is {int(p.answer) + 1}."
             for p in problems]
    texts = [right[0], wrong[0], wrong[1], wrong[1]]  # problem 0: a success and a failure; 1: failures only
    rows = precheck.contexts_for(TASK, problems, texts, 2)
    text = {name: [m[0]["content"] for _, m in items] for name, items in rows.items()}
    assert [k for k, _ in rows["rosd"]] == [0] and [k for k, _ in rows["fd"]] == [0, 1]
    assert problems[0].solution in text["opsd"][0] and right[0] in text["rosd"][0]
    assert f"should be {problems[1].answer}" in text["fd"][1]
    for name in ("opsd_withheld", "rosd_withheld", "fd_withheld"):
        for (k, _), content in zip(rows[name], text[name]):
            assert f"is {problems[k].answer}" not in content and f"be {problems[k].answer}" not in content
    assert all(precheck.FRENCH_INSTRUCTION in c for c in text["french"])


def test_measure_runs_on_a_tiny_model():
    model, tok = tiny_model(seed=0)
    out = precheck.measure(model, tok, TASK, TASK.problems("train", n=2, seed=0), generations=2, max_new_tokens=4,
                           answer_tokens=4)
    assert out["contexts"]["student"]["n"] == 2 and out["contexts"]["student"]["lift"] == 0
    assert "french_share" in out["contexts"]["french"]


@pytest.mark.parametrize("argv,message", [(["--problems", "0"], "--problems must be >= 1, got 0"),
                                          (["--temperature", "0"], "--temperature must be > 0, got 0.0")])
def test_bad_arguments_fail_in_one_line(argv, message):
    with pytest.raises(SystemExit, match=f"^{message}$"):
        precheck.main(argv)

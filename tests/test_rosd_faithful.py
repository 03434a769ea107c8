"""ROSD as its authors run it (issue 29): a sole success is never its own "correct solution", no canned
reflection text reaches the teacher, and a rollout whose teacher context says nothing beyond the problem gets no
loss."""
import pytest
import torch

from pydistill.prompts import rosd_teacher_messages
from pydistill.trainers.rosd import select_siblings
from pydistill.trainers.rosd.reflection import StepCheckReflector, reflection_prompt
from tests.test_trainer_rosd import decode, make_trainer
from tests.trainer_helpers import TASK

pytestmark = [pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`"),
              pytest.mark.usefixtures("one_thread")]

CANNED = ("Every step is arithmetically right", "The arithmetic steps check out", "plan of the solution")


def teacher_texts(trainer, prepared):
    teacher = prepared["teacher"]
    return [decode(trainer.tokenizer, teacher.input_ids[r, :int(teacher.attention_mask[r].sum())])
            for r in range(teacher.input_ids.shape[0])]


def test_a_sole_success_has_no_sibling():
    correct = torch.tensor([[0, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    sel = select_siblings(correct)
    assert sel.pairs[:4] == [(0, 1), (1, None), (2, 1), (3, 1)]
    assert sel.pairs[4:] == [(4, 6), (5, 4), (6, 4), (7, 6)]  # two successes: each other's sibling


def test_a_sole_success_never_sees_itself_and_without_a_reflection_gets_no_loss(tmp_path):
    trainer = make_trainer(tmp_path, patterns=("RWWW",), micro_batch_size=2)
    prepared = trainer.prepare(trainer.train_pool[:2])
    trainer.finalize_batch([prepared])
    rows = teacher_texts(trainer, prepared)
    tok, student = trainer.tokenizer, prepared["student"]
    for row, (i, s) in enumerate(prepared["pairs"]):
        completion = decode(tok, student.targets[row, :int(student.completion_mask[row].sum())])
        context = rows[row][:len(rows[row]) - len(completion)]
        if i % 4 == 0:  # the group's only success
            assert s is None and "Here is a correct solution" not in context
            assert completion.split(".")[0] not in context.split("Keep this in mind")[0].split("\n\n", 1)[-1]
            assert not prepared["mask"][row].any()  # nothing in its teacher context but the problem
        else:
            assert "Here is a correct solution by another student" in context and prepared["mask"][row].any()
    assert prepared["metrics"]["uninformative_rollouts"] == 2


def test_the_model_reflection_is_the_sole_successs_whole_teacher_context(tmp_path):
    def reply(prompt):
        assert "A correct solution:" not in prompt or "reaches a wrong final answer" in prompt
        if "reaches the correct final answer" in prompt:
            return "<first_error>NONE</first_error><explanation>It multiplies the boxes first.</explanation>"
        return "<first_error>First,</first_error><explanation>Redo the first step.</explanation>"

    trainer = make_trainer(tmp_path, patterns=("RWWW",), micro_batch_size=2, reflector="model", reply=reply)
    prepared = trainer.prepare(trainer.train_pool[:2])
    rows = teacher_texts(trainer, prepared)
    for row, (i, s) in enumerate(prepared["pairs"]):
        if i % 4 == 0:
            assert "Here is a correct solution" not in rows[row]
            assert "It multiplies the boxes first." in rows[row] and prepared["mask"][row].all() == \
                prepared["student"].completion_mask[row].all()
            assert prepared["mask"][row].any()


def test_step_check_writes_no_canned_reflection_and_the_teacher_gets_none(tmp_path):
    problem = TASK.problems("train", n=1, seed=0)[0]
    right, plan = f"The answer is {problem.answer}.", f"The answer is {int(problem.answer) + 2}."
    out = StepCheckReflector(TASK).reflect_batch([
        dict(problem=problem, attempt=right, answer=problem.answer, attempt_is_correct=True),
        dict(problem=problem, attempt=plan, answer=problem.answer, attempt_is_correct=False)])
    assert [r.explanation for r in out] == ["", ""] and not out[1].parsed
    trainer = make_trainer(tmp_path, micro_batch_size=4)  # groups with R, L (correct) and P (no wrong step)
    prepared = trainer.prepare(trainer.train_pool[:4])
    for text in teacher_texts(trainer, prepared):
        assert not any(c in text for c in CANNED)


def test_prompts_leave_out_an_empty_solution_section():
    messages = rosd_teacher_messages("Q?", None, "Because.")
    assert "Here is" not in messages[0]["content"] and "Because." in messages[0]["content"]
    assert "A correct solution" not in reflection_prompt("Q?", None, "attempt", "3", True)


def test_correct_rollouts_can_be_left_out(tmp_path):
    trainer = make_trainer(tmp_path, micro_batch_size=4, distill_correct_rollouts=False)
    prepared = trainer.prepare(trainer.train_pool[:4])
    engine, seen = trainer.engine, 0
    for row, (i, _) in enumerate(prepared["pairs"]):
        problem = trainer.train_pool[i // 4]
        kind = engine.patterns[(i // 4) % len(engine.patterns)][i % 4]
        correct = TASK.is_correct(problem, engine.text(problem, kind))
        seen += correct
        assert prepared["mask"][row].any() != correct
    assert seen > 0

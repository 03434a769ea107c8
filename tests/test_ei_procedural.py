"""The procedural Explanatory Inversion teacher: every rule writes well-formed probes with verified answers on
many problems of every split, the verifier rejects wrong answers, and ExGRPO's stage 0 runs on it with no
language model and keeps probes after its filters (then trains end to end on a tiny model)."""
import json
import re

import pytest

from pydistill.trainers.exgrpo.ei_procedural import (WRITERS, ProceduralTeacher, Probe, Story, parse_story, verify,
                                                     write_probes)
from pydistill.trainers.exgrpo.explanatory_inversion import EI_RULES, consistency_prompt
from pydistill.models import tiny_model
from pydistill.tasks import ArithmeticTask, extract_answer, find_first_wrong_step
from pydistill.tasks.base import Problem
from pydistill.trainers import ExGRPOConfig, ExGRPOTrainer
from pydistill.trainers.exgrpo import ei_generate

TASK = ArithmeticTask()

pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")


@pytest.fixture(scope="module")
def problems():
    return [(split, p) for split in ("train", "test", "ood") for seed in range(3)
            for p in TASK.problems(split, n=100, seed=seed)]


def test_stories_parse_back_to_the_task_answer(problems):
    for _, p in problems:
        story = parse_story(p.question)
        assert str(story.answer()) == p.answer and story.solution() == p.solution
        assert parse_story(story.text()) == story  # the writer's own wording reads back too


def test_every_rule_writes_verified_well_formed_probes(problems):
    written = {r.name: 0 for r in EI_RULES}
    for split, p in problems:
        story = parse_story(p.question)
        probes = write_probes(p.question, seed=7)
        names = [q.rule for q in probes]
        assert len(names) == len(set(names))
        expected = {r.name for r in EI_RULES} - ({"decomposition"} if len(story.steps) < 2 else set()) \
            - ({"step_ordering"} if len(story.steps) < 3 else set())
        assert set(names) == expected, (p.question, set(names) ^ expected)  # every rule that applies writes one
        for q in probes:
            written[q.rule] += 1
            assert q.text.strip().endswith("?") and q.text != p.question
            assert re.fullmatch(r"\d+", q.answer)
            assert q.solution.endswith(f"The answer is {q.answer}.")
            assert find_first_wrong_step(q.solution) is None and extract_answer(q.solution) == q.answer
            assert verify(q, story)
            original = int(p.answer)
            # rule-specific answers, computed here independently of the writers
            if q.rule == "analogy":
                assert int(q.answer) == original
            elif q.rule == "generalization":
                assert int(q.answer) == 2 * original
            elif q.rule == "reverse_reasoning":
                assert int(q.answer) == story.start and f"has {original} " in q.text
            elif q.rule == "error_diagnosis":
                assert int(q.answer) == original
                assert find_first_wrong_step(q.text.split('wrote: "')[1]) is not None
            elif q.rule == "constraint_variation":
                extra = int(re.findall(r"(?:finds|buys) (\d+) more", q.text)[-1])
                assert int(q.answer) == original + extra
            elif q.rule == "decomposition":
                assert len(parse_story(q.text).steps) == len(story.steps) - 1
    assert all(count > 0 for count in written.values()), written
    assert written["step_ordering"] < written["counterfactual"]  # only the 3-step ood stories have it


def test_verify_rejects_wrong_answers():
    p = TASK.problems("ood", n=1, seed=4)[0]
    story = parse_story(p.question)
    for q in write_probes(p.question):
        wrong = str(int(q.answer) + 1)
        bad_solution = Probe(q.rule, q.text, q.solution.replace(f"is {q.answer}.", f"is {wrong}."), wrong, q.check)
        assert not verify(bad_solution, story)
        slipped = re.sub(r"= (\d+)\.", lambda m: f"= {int(m.group(1)) + 1}.", q.solution, count=1)
        if slipped != q.solution:
            assert not verify(Probe(q.rule, q.text, slipped, q.answer, q.check), story)


def test_unparsable_questions_fail_with_a_clear_error():
    with pytest.raises(ValueError, match="cannot read the starting amount"):
        parse_story("Natalia sold clips to 48 of her friends. How many clips did she sell?")
    with pytest.raises(ValueError, match="arithmetic task only; question 0 does not parse"):
        ProceduralTeacher().ei_data([Problem("What is 2 + 2?", "2 + 2 = 4", "4")])
    with pytest.raises(ValueError, match="ei_teacher 'procedural' writes probes for the arithmetic task only"):
        ExGRPOConfig(ei_teacher="procedural", task="gsm8k").validate()


def test_the_teacher_answers_the_original_question_by_rule():
    p = TASK.problems("ood", n=1, seed=1)[0]
    probe = write_probes(p.question)[0]
    reply, = ProceduralTeacher()([consistency_prompt(p.question, probe.text, probe.solution)])
    assert extract_answer(reply) == p.answer
    assert ProceduralTeacher()(["Question: what is love?\n"]) == [""]


def scripted_student(probes, solved_rules):
    """A base student that answers the probes of ``solved_rules`` right and every other probe 999; ``probes``
    maps a probe's text to its Probe (the student sees it in its own prompt format)."""
    def student(prompts):
        out = []
        for prompt in prompts:
            probe = probes[prompt.split("\nAnswer with one short calculation")[0]]
            out.append(f"The answer is {probe.answer if probe.rule in solved_rules else 999}.")
        return out
    return student


def exgrpo_config(tmp_path, **overrides):
    values = dict(model="tiny", task="arithmetic", lora_r=0, max_steps=1, batch_size=2, micro_batch_size=1,
                  max_new_tokens=6, eval_problems=0, output_dir=str(tmp_path / "run"), learning_rate=1e-3,
                  progress=False, train_problems=6, num_generations=2, num_probes=2, partial_probes=1,
                  ei_teacher="procedural", min_solved_fraction=0.2, sft_steps=1, sft_batch_size=2,
                  sft_learning_rate=1e-3, ei_cache=str(tmp_path / "ei.jsonl"), max_grad_norm=1.0, seed=0)
    values.update(overrides)
    return ExGRPOConfig(**values)


def test_exgrpo_stage0_needs_no_model_and_its_filters_keep_probes(tmp_path, one_thread):
    probes = {q.text: q for p in TASK.problems("train", n=6, seed=0) for q in write_probes(p.question)}
    model, tok = tiny_model()
    # the base student solves two of the 8 probes of a one-step question (25% >= min_solved_fraction 0.2)
    student = scripted_student(probes, ("counterfactual", "analogy"))
    trainer = ExGRPOTrainer(exgrpo_config(tmp_path), model=model, tokenizer=tok, task=TASK, ei_student=student)
    report = trainer.ei_report.as_dict()
    assert report["questions"] == 6 and report["probes"] == 6 * 8
    assert report["removed_inconsistent"] == 0 and report["removed_unanswerable"] == 0
    assert report["kept_questions"] == 6 and report["kept_probes"] == 48
    assert all(item.rationale == item.problem.solution for item in trainer.train_pool)
    records = [json.loads(line) for line in open(tmp_path / "ei.jsonl")]
    assert {r["kind"] for r in records} == {"question", "consistency", "student"}  # no generation records
    assert records[0]["teacher"] == "procedural:0"
    # a base student that solves every probe: every question is too easy, and the trainer says so
    with pytest.raises(ValueError, match="no training question survived the EI filters"):
        ExGRPOTrainer(exgrpo_config(tmp_path / "b", ei_cache=str(tmp_path / "b.jsonl")), model=model,
                      tokenizer=tok, task=TASK, ei_student=scripted_student(probes, tuple(WRITERS)))


def test_exgrpo_runs_end_to_end_offline_on_the_procedural_teacher(tmp_path, one_thread):
    """Stage 0 by rule (filters off: no base student needed), the SFT warm-up and one ExGRPO step with real
    sampling from a tiny model."""
    model, tok = tiny_model()
    trainer = ExGRPOTrainer(exgrpo_config(tmp_path, ei_filters=False), model=model, tokenizer=tok, task=TASK)
    assert trainer.ei_report.kept_probes == 48
    summary = trainer.train()
    assert trainer.sft_step == 1 and trainer.step == 1 and summary["loss"] == summary["loss"]  # finite


def test_ei_generate_cli_path_with_the_procedural_teacher(tmp_path):
    report = ei_generate("arithmetic", n=5, teacher="procedural", cache=str(tmp_path / "c.jsonl"), filters=False,
                         rules="counterfactual,reverse_reasoning,decomposition")
    assert (report.questions, report.kept_probes) == (5, 10)  # one-step questions: no decomposition probe
    with pytest.raises(ValueError, match="name the base student"):
        ei_generate("arithmetic", n=2, teacher="procedural", cache=str(tmp_path / "d.jsonl"))
    assert Story("Tom", "apples", 4, (("/", 3),)).values() is None  # uneven sharing is not a story
